//! Captures on demand (`bakeoff capture start`), the collector's side: probes keep a control
//! channel open (`api::control`); a capture asked for an experiment's cohort is sent to every
//! connected probe that watches it, their recorded (already redacted) records come back over the
//! channels and are written into one capture file, connections renumbered per probe. A capture
//! ends when every probe has sent its final status (a limit reached, a stop, the probe gone);
//! then the file is completed and a JSON sidecar keeps its status, losses included.

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::BufWriter,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bakeoff_capture::{CaptureWriter, Direction, Kind, Meta, Record};
use bakeoff_proto::v1::{
    CaptureData, CaptureStatus, Command, ProbeHello, StartCapture, StopCapture,
    command::Command as Cmd,
};
use tokio::sync::mpsc;

/// How long probes have, after a capture's duration or a stop, to send their last status
/// before the capture is completed without it.
const GRACE: Duration = Duration::from_secs(10);

/// What `bakeoff capture start` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureSpec {
    pub experiment: String,
    pub cohort: String,
    /// `http1`, `http2` (or `grpc`), `postgres`; empty for every protocol.
    #[serde(default)]
    pub protocol: String,
    /// Limits (0: none); a capture without any stops only when asked to.
    #[serde(default)]
    pub max_requests: u64,
    #[serde(default)]
    pub max_bytes: u64,
    #[serde(default)]
    pub duration_ms: u64,
    /// Redaction rules added to each probe's own.
    #[serde(default)]
    pub redact_headers: Vec<String>,
    #[serde(default)]
    pub redact_json: Vec<String>,
    #[serde(default)]
    pub redact_regex: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "no connected probe watches experiment {experiment:?} cohort {cohort:?} and takes captures (connected: {connected})"
    )]
    NoProbe {
        experiment: String,
        cohort: String,
        connected: String,
    },
    #[error("no capture {0:?}")]
    NotFound(String),
    #[error("capture {0} is still recording: stop it or wait for its end")]
    NotDone(String),
    #[error("capture {0} is complete: there is nothing more to stream (download its file)")]
    Complete(String),
    #[error("bad capture request: {0}")]
    Bad(String),
    #[error("capture file: {0}")]
    File(#[from] bakeoff_capture::CaptureError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A probe's part in a capture, as the capture status shows it.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ProbePart {
    pub probe_id: String,
    pub node: String,
    /// The probe's verified client certificate, when the gRPC port uses mutual TLS.
    pub identity: Option<String>,
    /// `recording`, `done` or `failed`.
    pub state: String,
    /// The probe said it is recording (its first status arrived): traffic from then on is in.
    #[serde(default)]
    pub confirmed: bool,
    pub reason: String,
    pub requests: u64,
    pub records: u64,
    pub bytes: u64,
    pub connections: u64,
    pub bytes_lost: u64,
    pub records_over_limit: u64,
    pub records_dropped: u64,
    pub fields_masked: u64,
    /// Data chunks that never arrived (their records are missing from the file).
    pub chunks_missing: u64,
    pub redaction: Vec<String>,
}

/// A capture's status (`bakeoff capture status`, the sidecar file).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CaptureInfo {
    pub id: String,
    pub spec: CaptureSpec,
    /// Who asked (the API caller).
    pub actor: String,
    /// `recording`, `stopping`, `done` or `failed`.
    pub state: String,
    pub reason: String,
    pub started_unix_ns: u64,
    pub ended_unix_ns: u64,
    pub probes: Vec<ProbePart>,
    /// Totals over the probes.
    pub requests: u64,
    /// Records in the file.
    pub records: u64,
    pub file: PathBuf,
    pub file_bytes: u64,
    /// Every loss, summed: bytes the probes lost, records over the byte limit, records dropped
    /// on the way, chunks missing.
    pub losses: BTreeMap<String, u64>,
}

/// A connected probe.
struct Link {
    hello: ProbeHello,
    identity: Option<String>,
    tx: mpsc::Sender<Result<Command, tonic::Status>>,
}

struct Running {
    info: CaptureInfo,
    /// Links taking part, with their last data sequence.
    links: BTreeMap<u64, (ProbePart, u64)>,
    writer: Option<CaptureWriter<BufWriter<File>>>,
    conns: HashMap<(u64, u64), u64>,
    next_conn: u64,
    /// When it is given up waiting for the probes' last status.
    deadline: Option<SystemTime>,
    write_error: Option<String>,
    /// Live readers of the records (`subscribe`); dropped at completion, which ends them.
    subscribers: Vec<mpsc::Sender<Vec<Record>>>,
    /// Records a subscriber could not take (its queue full): it is never waited for, so a
    /// slow reader costs its own records, not the capture's.
    stream_dropped: u64,
}

#[derive(Default)]
struct State {
    links: HashMap<u64, Link>,
    next_link: u64,
    running: BTreeMap<String, Running>,
    finished: BTreeMap<String, CaptureInfo>,
    next_id: u64,
}

/// The collector's captures.
pub struct Captures {
    dir: PathBuf,
    state: Mutex<State>,
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Records in the capture file's record framing (`kind:u8 direction:u8 conn:u64
/// ts_unix_ns:u64 len:u32 body`, little-endian), what `GET /api/v1/captures/{id}/stream`
/// sends: one format to read, whether from a file's blocks or from the stream.
pub fn encode_records(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        records
            .iter()
            .map(|r| bakeoff_capture::RECORD_HEADER + r.body.len())
            .sum(),
    );
    for r in records {
        out.push(r.kind as u8);
        out.push(r.direction as u8);
        out.extend_from_slice(&r.conn.to_le_bytes());
        out.extend_from_slice(&r.ts_unix_ns.to_le_bytes());
        out.extend_from_slice(&(r.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.body);
    }
    out
}

fn kind(v: u32) -> Option<Kind> {
    Some(match v {
        1 => Kind::Open,
        2 => Kind::Data,
        3 => Kind::Close,
        4 => Kind::Loss,
        _ => return None,
    })
}

fn direction(v: u32) -> Direction {
    match v {
        1 => Direction::Ingress,
        2 => Direction::Egress,
        _ => Direction::None,
    }
}

impl Captures {
    /// Captures kept in `dir`; the ones completed before (their sidecars) are listed again.
    pub fn open(dir: &Path) -> Result<Self, CaptureError> {
        std::fs::create_dir_all(dir)?;
        let mut state = State::default();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "json")
                && let Ok(text) = std::fs::read(&path)
                && let Ok(info) = serde_json::from_slice::<CaptureInfo>(&text)
            {
                state.finished.insert(info.id.clone(), info);
            }
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A probe opened its control channel; commands for it go to `tx`.
    pub fn connect(
        &self,
        hello: ProbeHello,
        identity: Option<String>,
        tx: mpsc::Sender<Result<Command, tonic::Status>>,
    ) -> u64 {
        let mut s = self.lock();
        s.next_link += 1;
        let link = s.next_link;
        s.links.insert(
            link,
            Link {
                hello,
                identity,
                tx,
            },
        );
        link
    }

    /// A probe's channel closed: its part in running captures ends, failed.
    pub fn disconnect(&self, link: u64) {
        let mut s = self.lock();
        s.links.remove(&link);
        let ids: Vec<String> = s.running.keys().cloned().collect();
        for id in ids {
            if let Some(r) = s.running.get_mut(&id)
                && let Some((part, _)) = r.links.get_mut(&link)
                && part.state == "recording"
            {
                part.state = "failed".into();
                part.reason = "the probe disconnected".into();
            }
            self.complete_if_done(&mut s, &id);
        }
    }

    /// Connected probes (for messages and `capture ls`).
    pub fn probes(&self) -> Vec<String> {
        let s = self.lock();
        let mut v: Vec<String> = s
            .links
            .values()
            .map(|l| {
                format!(
                    "{} (node {}, experiment {:?}, cohorts {:?}{})",
                    l.hello.probe_id,
                    l.hello.node,
                    l.hello.experiment,
                    l.hello.cohorts,
                    if l.hello.captures {
                        ""
                    } else {
                        ", captures off"
                    }
                )
            })
            .collect();
        v.sort();
        v
    }

    /// Starts a capture on every connected probe that watches the cohort.
    pub fn start(&self, spec: CaptureSpec, actor: &str) -> Result<CaptureInfo, CaptureError> {
        if spec.experiment.is_empty() || spec.cohort.is_empty() {
            return Err(CaptureError::Bad(
                "experiment and cohort are required".into(),
            ));
        }
        if !["", "http1", "http2", "grpc", "postgres"].contains(&spec.protocol.as_str()) {
            return Err(CaptureError::Bad(format!(
                "unknown protocol {:?} (http1, http2, grpc, postgres)",
                spec.protocol
            )));
        }
        let mut s = self.lock();
        let links: Vec<u64> = s
            .links
            .iter()
            .filter(|(_, l)| {
                l.hello.captures
                    && l.hello.experiment == spec.experiment
                    && l.hello.cohorts.contains(&spec.cohort)
            })
            .map(|(k, _)| *k)
            .collect();
        if links.is_empty() {
            drop(s);
            return Err(CaptureError::NoProbe {
                experiment: spec.experiment,
                cohort: spec.cohort,
                connected: {
                    let p = self.probes();
                    if p.is_empty() {
                        "none".into()
                    } else {
                        p.join("; ")
                    }
                },
            });
        }
        s.next_id += 1;
        let started = now_ns();
        let id = format!("cap-{}-{}", started / 1_000_000_000, s.next_id);
        let file = self.dir.join(format!("{id}.bkcap"));
        let meta = Meta {
            experiment: spec.experiment.clone(),
            cohort: spec.cohort.clone(),
            protocol: spec.protocol.clone(),
            started_unix_ns: started,
            redaction: Vec::new(),
            attributes: [
                ("capture_id".to_string(), id.clone()),
                ("actor".to_string(), actor.to_string()),
            ]
            .into(),
        };
        let writer = CaptureWriter::new(BufWriter::new(File::create(&file)?), &meta)?;
        let command = Command {
            command: Some(Cmd::StartCapture(StartCapture {
                capture_id: id.clone(),
                experiment: spec.experiment.clone(),
                cohort: spec.cohort.clone(),
                protocol: spec.protocol.clone(),
                max_requests: spec.max_requests,
                max_bytes: spec.max_bytes,
                duration_ms: spec.duration_ms,
                redact_headers: spec.redact_headers.clone(),
                redact_json: spec.redact_json.clone(),
                redact_regex: spec.redact_regex.clone(),
            })),
        };
        let mut parts = BTreeMap::new();
        for link in links {
            let Some(l) = s.links.get(&link) else {
                continue;
            };
            let mut part = ProbePart {
                probe_id: l.hello.probe_id.clone(),
                node: l.hello.node.clone(),
                identity: l.identity.clone(),
                state: "recording".into(),
                ..ProbePart::default()
            };
            if l.tx.try_send(Ok(command.clone())).is_err() {
                part.state = "failed".into();
                part.reason = "the probe's command queue is full or closed".into();
            }
            parts.insert(link, (part, 0));
        }
        let info = CaptureInfo {
            id: id.clone(),
            spec: spec.clone(),
            actor: actor.to_string(),
            state: "recording".into(),
            started_unix_ns: started,
            file,
            ..CaptureInfo::default()
        };
        let deadline = (spec.duration_ms > 0)
            .then(|| SystemTime::now() + Duration::from_millis(spec.duration_ms) + GRACE);
        s.running.insert(
            id.clone(),
            Running {
                info,
                links: parts,
                writer: Some(writer),
                conns: HashMap::new(),
                next_conn: 1,
                deadline,
                write_error: None,
                subscribers: Vec::new(),
                stream_dropped: 0,
            },
        );
        self.complete_if_done(&mut s, &id);
        tracing::info!(
            capture = id,
            actor,
            experiment = spec.experiment,
            cohort = spec.cohort,
            "capture started"
        );
        Self::info_of(&s, &id).ok_or(CaptureError::NotFound(id))
    }

    /// Asks the probes to stop; the capture completes when they have said so (or after a grace).
    pub fn stop(&self, id: &str) -> Result<CaptureInfo, CaptureError> {
        let mut s = self.lock();
        let State { links, running, .. } = &mut *s;
        if let Some(r) = running.get_mut(id) {
            r.info.state = "stopping".into();
            r.deadline = Some(SystemTime::now() + GRACE);
            let command = Command {
                command: Some(Cmd::StopCapture(StopCapture {
                    capture_id: id.to_string(),
                })),
            };
            for (link, (part, _)) in &mut r.links {
                if part.state == "recording"
                    && links
                        .get(link)
                        .is_none_or(|l| l.tx.try_send(Ok(command.clone())).is_err())
                {
                    part.state = "failed".into();
                    part.reason = "the stop could not be sent".into();
                }
            }
        }
        self.complete_if_done(&mut s, id);
        Self::info_of(&s, id).ok_or_else(|| CaptureError::NotFound(id.to_string()))
    }

    /// A probe's status for one of its captures.
    pub fn status(&self, link: u64, status: CaptureStatus) {
        let mut s = self.lock();
        let id = status.capture_id.clone();
        let Some(r) = s.running.get_mut(&id) else {
            return;
        };
        let Some((part, _)) = r.links.get_mut(&link) else {
            return;
        };
        if part.state != "recording" {
            return;
        }
        part.confirmed = true;
        part.state = status.state;
        part.reason = status.reason;
        part.requests = status.requests;
        part.records = status.records;
        part.bytes = status.bytes;
        part.connections = status.connections;
        part.bytes_lost = status.bytes_lost;
        part.records_over_limit = status.records_over_limit;
        part.records_dropped = status.records_dropped;
        part.fields_masked = status.fields_masked;
        part.redaction = status.redaction;
        self.complete_if_done(&mut s, &id);
    }

    /// Records from a probe: renumbered per probe connection and written.
    pub fn data(&self, link: u64, data: CaptureData) {
        let mut s = self.lock();
        let Some(r) = s.running.get_mut(&data.capture_id) else {
            return;
        };
        let Some((part, last)) = r.links.get_mut(&link) else {
            return;
        };
        if data.sequence > *last + 1 {
            part.chunks_missing += data.sequence - *last - 1;
        }
        *last = (*last).max(data.sequence);
        let Some(writer) = r.writer.as_mut() else {
            return;
        };
        let mut copies = Vec::new();
        for rec in data.records {
            let Some(kind) = kind(rec.kind) else { continue };
            let conn = *r.conns.entry((link, rec.conn)).or_insert_with(|| {
                r.next_conn += 1;
                r.next_conn - 1
            });
            let record = Record {
                kind,
                direction: direction(rec.direction),
                conn,
                ts_unix_ns: rec.ts_unix_ns,
                body: rec.body,
            };
            if let Err(e) = writer.write(&record) {
                tracing::error!(capture = data.capture_id, error = %e, "capture file write failed");
                r.write_error = Some(e.to_string());
                r.writer = None;
                break;
            }
            if !r.subscribers.is_empty() {
                copies.push(record);
            }
        }
        if copies.is_empty() {
            return;
        }
        let mut dropped = 0;
        r.subscribers
            .retain(|tx| match tx.try_send(copies.clone()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    dropped += copies.len() as u64;
                    true
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
        r.stream_dropped += dropped;
    }

    /// A live reader of a running capture's records from now on, as written to its file
    /// (connections renumbered), in batches; at most `batches` wait in its queue, beyond that
    /// they are dropped and counted (`losses["stream_dropped"]`). Its receiver ends when the
    /// capture completes.
    pub fn subscribe(
        &self,
        id: &str,
        batches: usize,
    ) -> Result<mpsc::Receiver<Vec<Record>>, CaptureError> {
        let mut s = self.lock();
        if s.finished.contains_key(id) {
            return Err(CaptureError::Complete(id.to_string()));
        }
        let r = s
            .running
            .get_mut(id)
            .ok_or_else(|| CaptureError::NotFound(id.to_string()))?;
        let (tx, rx) = mpsc::channel(batches.max(1));
        r.subscribers.push(tx);
        Ok(rx)
    }

    /// Completes captures whose probes are past their grace (called every second).
    pub fn expire(&self) {
        let mut s = self.lock();
        let now = SystemTime::now();
        let due: Vec<String> = s
            .running
            .iter()
            .filter(|(_, r)| r.deadline.is_some_and(|d| now >= d))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            if let Some(r) = s.running.get_mut(&id) {
                for (part, _) in r.links.values_mut() {
                    if part.state == "recording" {
                        part.state = "failed".into();
                        part.reason = "no final status from the probe in time".into();
                    }
                }
            }
            self.complete_if_done(&mut s, &id);
        }
    }

    fn complete_if_done(&self, s: &mut State, id: &str) {
        let done = s
            .running
            .get(id)
            .is_some_and(|r| r.links.values().all(|(p, _)| p.state != "recording"));
        if !done {
            return;
        }
        let Some(mut r) = s.running.remove(id) else {
            return;
        };
        let mut finished = r.write_error.is_none();
        if let Some(w) = r.writer.take() {
            match w.finish() {
                Ok(_) => {}
                Err(e) => {
                    finished = false;
                    r.write_error = Some(e.to_string());
                }
            }
        }
        let mut info = Self::summarize(&r);
        info.ended_unix_ns = now_ns();
        let all_failed = r.links.values().all(|(p, _)| p.state == "failed");
        info.state = if finished && !all_failed {
            "done"
        } else {
            "failed"
        }
        .into();
        info.reason = match (&r.write_error, all_failed) {
            (Some(e), _) => format!("the capture file could not be written: {e}"),
            (None, true) => "no probe recorded it".into(),
            (None, false) => String::new(),
        };
        info.file_bytes = std::fs::metadata(&info.file).map_or(0, |m| m.len());
        let sidecar = info.file.with_extension("json");
        if let Err(e) = serde_json::to_vec_pretty(&info)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&sidecar, b))
        {
            tracing::warn!(file = %sidecar.display(), error = %e, "cannot write the capture's status");
        }
        tracing::info!(
            capture = id,
            state = info.state,
            requests = info.requests,
            records = info.records,
            "capture completed"
        );
        s.finished.insert(id.to_string(), info);
    }

    fn summarize(r: &Running) -> CaptureInfo {
        let mut info = r.info.clone();
        info.probes = r.links.values().map(|(p, _)| p.clone()).collect();
        info.requests = info.probes.iter().map(|p| p.requests).sum();
        info.records = r.writer.as_ref().map_or_else(
            || info.probes.iter().map(|p| p.records).sum(),
            |w| w.records(),
        );
        let mut losses = BTreeMap::new();
        for p in &info.probes {
            for (k, v) in [
                ("bytes_lost", p.bytes_lost),
                ("records_over_limit", p.records_over_limit),
                ("records_dropped", p.records_dropped),
                ("chunks_missing", p.chunks_missing),
            ] {
                *losses.entry(k.to_string()).or_insert(0) += v;
            }
        }
        losses.insert("stream_dropped".to_string(), r.stream_dropped);
        info.losses = losses;
        info.file_bytes = r.writer.as_ref().map_or(0, |w| w.bytes_written());
        info
    }

    fn info_of(s: &State, id: &str) -> Option<CaptureInfo> {
        s.running
            .get(id)
            .map(Self::summarize)
            .or_else(|| s.finished.get(id).cloned())
    }

    /// A capture's status.
    pub fn info(&self, id: &str) -> Result<CaptureInfo, CaptureError> {
        Self::info_of(&self.lock(), id).ok_or_else(|| CaptureError::NotFound(id.to_string()))
    }

    /// Every capture, newest first.
    pub fn list(&self) -> Vec<CaptureInfo> {
        let s = self.lock();
        let mut v: Vec<CaptureInfo> = s
            .running
            .values()
            .map(Self::summarize)
            .chain(s.finished.values().cloned())
            .collect();
        v.sort_by_key(|c| std::cmp::Reverse(c.started_unix_ns));
        v
    }

    /// The file of a completed capture.
    pub fn file(&self, id: &str) -> Result<(CaptureInfo, PathBuf), CaptureError> {
        let info = self.info(id)?;
        if info.state == "recording" || info.state == "stopping" {
            return Err(CaptureError::NotDone(id.to_string()));
        }
        let file = info.file.clone();
        Ok((info, file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bakeoff_proto::v1::CaptureRecord;

    fn data(sequence: u64, conn: u64, body: &[u8]) -> CaptureData {
        CaptureData {
            capture_id: String::new(),
            sequence,
            records: vec![CaptureRecord {
                kind: Kind::Data as u32,
                direction: Direction::Ingress as u32,
                conn,
                ts_unix_ns: 7,
                body: body.to_vec(),
            }],
        }
    }

    /// A subscriber gets the records renumbered as in the file; a full one loses records,
    /// counted, without holding the capture up; completion ends every stream.
    #[tokio::test]
    async fn subscribers_get_renumbered_records_and_overflow_is_counted() {
        let dir = std::env::temp_dir().join(format!("bakeoff-cap-sub-{}", std::process::id()));
        let caps = Captures::open(&dir).expect("capture dir");
        let (tx, mut commands) = mpsc::channel(8);
        let link = caps.connect(
            ProbeHello {
                probe_id: "p1".into(),
                experiment: "e".into(),
                cohorts: vec!["c".into()],
                captures: true,
                ..ProbeHello::default()
            },
            None,
            tx,
        );
        let spec = CaptureSpec {
            experiment: "e".into(),
            cohort: "c".into(),
            ..CaptureSpec::default()
        };
        let id = caps.start(spec, "test").expect("started").id;
        assert!(commands.recv().await.is_some());
        assert!(matches!(
            caps.subscribe("cap-none", 1),
            Err(CaptureError::NotFound(_))
        ));
        let mut rx = caps.subscribe(&id, 1).expect("subscribed");
        let chunk = |seq, conn, body: &[u8]| CaptureData {
            capture_id: id.clone(),
            ..data(seq, conn, body)
        };
        caps.data(link, chunk(1, 900, b"first"));
        // The queue holds one batch: this one is dropped and counted.
        caps.data(link, chunk(2, 900, b"second"));
        let got = rx.recv().await.expect("a batch");
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].conn, got[0].body.as_slice()), (1, &b"first"[..]));
        assert_eq!(caps.info(&id).expect("info").losses["stream_dropped"], 1);
        caps.data(link, chunk(3, 901, b"third"));
        assert_eq!(rx.recv().await.expect("a batch")[0].conn, 2);
        caps.status(
            link,
            CaptureStatus {
                capture_id: id.clone(),
                state: "done".into(),
                ..CaptureStatus::default()
            },
        );
        assert!(rx.recv().await.is_none(), "completion ends the stream");
        assert!(matches!(
            caps.subscribe(&id, 1),
            Err(CaptureError::Complete(_))
        ));
        let encoded = encode_records(&got);
        assert_eq!(encoded.len(), bakeoff_capture::RECORD_HEADER + 5);
        assert_eq!(&encoded[2..10], &1u64.to_le_bytes());
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! `bakeoff shadow`: live shadowing. A capture of the cohort is started through the collector
//! and read as it records (`GET /api/v1/captures/{id}/stream`); each captured connection's
//! request side is framed into HTTP/1 requests and its response side into responses, paired in
//! order. Idempotent requests (GET, HEAD, OPTIONS) are sent at once to the shadow instance,
//! one keep-alive connection per live connection (so a connection's requests stay in order),
//! and the shadow's answers are compared with the live ones per endpoint, as `bakeoff replay`
//! compares two targets. Nothing that may change state is ever sent to the shadow.
//!
//! The two latencies are not measured at the same place: the live one is the probe's view of
//! the service (last request byte read to last response byte written: server time, without
//! the network), the shadow one this client's (request written to response read: server time
//! plus a round trip on this host's network). A shadow that is as fast as the live service
//! therefore looks slower by about one round trip: routes that answer in well under a
//! millisecond are compared with that bias (`--tolerance` is relative).

use std::{
    collections::{HashMap, VecDeque},
    io::Read,
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bakeoff_capture::{Direction, Kind, Record};
use bakeoff_collector::{
    audit::{self, AuditLog},
    capture::{CaptureInfo, CaptureSpec},
};
use bakeoff_replay::{Noise, NoiseRules, Outcome, Replayed};

use crate::{ApiArgs, ApiClient};

/// Methods the shadow receives: the ones that must not change state (RFC 9110 §9.2.2).
const IDEMPOTENT: [&str; 3] = ["GET", "HEAD", "OPTIONS"];

/// Largest record the stream may carry (the capture file's own limit).
const MAX_RECORD: u32 = bakeoff_capture::MAX_BLOCK_BYTES;

#[derive(clap::Args)]
pub struct ShadowArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[arg(long)]
    experiment: String,
    /// The live cohort whose requests are teed.
    #[arg(long)]
    cohort: String,
    /// The shadow instance. Nothing else is contacted (but the collector).
    #[arg(long)]
    target: SocketAddr,
    /// Stop after this long (e.g. 10m); Ctrl-C stops earlier.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Stop once this many requests of the cohort were captured (on each probe).
    #[arg(long)]
    max_requests: Option<u64>,
    /// Requests sent to the shadow at once (each live connection's on one of them, in order).
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Requests waiting for the shadow; beyond this they are skipped and counted
    /// (`overload_skipped`), never holding up the reading of the capture.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Per request to the shadow (connect, write, read).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// A response header left out of the comparison (repeatable; case-insensitive). Always
    /// left out: Date, Content-Length, Transfer-Encoding, Connection, Keep-Alive.
    #[arg(long, value_name = "NAME")]
    noise_header: Vec<String>,
    /// A JSON body field whose value is not compared (repeatable): a name, matched at any
    /// depth, or a dotted path (`items.updated_at`; `$.` anchors it at the root).
    #[arg(long, value_name = "FIELD")]
    noise_json: Vec<String>,
    /// A regular expression whose matches in bodies are not compared (repeatable).
    #[arg(long, value_name = "RE", value_parser = crate::noise_regex)]
    noise_regex: Vec<String>,
    /// Latency differences within this share are not reported.
    #[arg(long, default_value_t = 0.05)]
    tolerance: f64,
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// The audit log the shadowing is recorded in before it starts (it refuses to start when
    /// it cannot be). Default: $BAKEOFF_AUDIT_LOG, else $XDG_STATE_HOME/bakeoff/audit.log,
    /// else ~/.local/state/bakeoff/audit.log.
    #[arg(long, value_name = "PATH")]
    audit_log: Option<PathBuf>,
}

/// What happened to the captured requests: `requests == teed + writes_skipped +
/// overload_skipped`.
#[derive(Debug, Default, serde::Serialize)]
struct Counts {
    /// Requests framed from the capture.
    requests: u64,
    /// Sent to the shadow.
    teed: u64,
    /// Not idempotent: never sent.
    writes_skipped: u64,
    /// Idempotent, but the shadow's queue was full.
    overload_skipped: u64,
    /// Teed requests whose live response was not seen (the connection lost bytes, closed, or
    /// the capture ended first): not compared.
    unpaired: u64,
    /// Live responses without a request before them.
    unpaired_responses: u64,
    /// Shadow requests that failed (connect, timeout, a broken answer).
    shadow_errors: u64,
    /// Captured bytes that could not be framed (a loss on the connection, another protocol).
    unframed_bytes: u64,
}

/// A request whose live response is awaited.
struct Pending {
    index: usize,
    method: String,
    path: String,
    /// When the last piece of the request was read by the service.
    read_ns: u64,
    teed: bool,
}

/// One live connection being reassembled.
struct Conn {
    /// The service accepted it (requests are its ingress); a client connection's requests are
    /// its egress.
    server: bool,
    requests: Vec<u8>,
    responses: Vec<u8>,
    pending: VecDeque<Pending>,
    next_index: usize,
    /// Bytes were lost: nothing more of it can be framed.
    broken: bool,
}

impl Conn {
    fn new() -> Self {
        Self {
            server: true,
            requests: Vec::new(),
            responses: Vec::new(),
            pending: VecDeque::new(),
            next_index: 0,
            broken: false,
        }
    }
}

/// Work for a shadow worker.
enum Job {
    Send {
        conn: u64,
        /// Boxed: the queue holds small jobs.
        outcome: Box<Outcome>,
        bytes: Vec<u8>,
    },
    /// The live connection closed: so does its shadow connection.
    Close(u64),
}

/// Sends requests to the shadow, one connection per live connection; outcomes to `results`.
fn worker(
    jobs: mpsc::Receiver<Job>,
    results: mpsc::Sender<Outcome>,
    target: SocketAddr,
    timeout: Duration,
    noise: Noise,
) {
    let mut conns: HashMap<u64, TcpStream> = HashMap::new();
    for job in jobs {
        match job {
            Job::Send {
                conn,
                outcome,
                bytes,
            } => {
                let (outcome, keep) = bakeoff_replay::send(
                    conns.remove(&conn),
                    &target,
                    timeout,
                    &noise,
                    *outcome,
                    &bytes,
                );
                if let Some(keep) = keep {
                    conns.insert(conn, keep);
                }
                if results.send(outcome).is_err() {
                    return;
                }
            }
            Job::Close(conn) => {
                conns.remove(&conn);
            }
        }
    }
}

/// The teeing and pairing state, fed record by record.
struct Shadow {
    conns: HashMap<u64, Conn>,
    workers: Vec<mpsc::SyncSender<Job>>,
    noise: Noise,
    live: Vec<Outcome>,
    counts: Counts,
}

impl Shadow {
    fn record(&mut self, r: Record) {
        match r.kind {
            Kind::Open => {
                let c = self.conns.entry(r.conn).or_insert_with(Conn::new);
                if let Ok(info) = r.conn_info() {
                    c.server = info.role != "client";
                }
            }
            Kind::Data => {
                let c = self.conns.entry(r.conn).or_insert_with(Conn::new);
                if c.broken {
                    self.counts.unframed_bytes += r.body.len() as u64;
                    return;
                }
                let request_side = (r.direction == Direction::Ingress) == c.server;
                if request_side {
                    c.requests.extend_from_slice(&r.body);
                    self.requests(r.conn, r.ts_unix_ns);
                } else {
                    c.responses.extend_from_slice(&r.body);
                    self.responses(r.conn, r.ts_unix_ns, false);
                }
            }
            Kind::Loss => {
                // What follows a loss cannot be framed: the connection's waiting requests
                // go unpaired.
                if let Some(c) = self.conns.get_mut(&r.conn) {
                    c.broken = true;
                    self.counts.unframed_bytes += (c.requests.len() + c.responses.len()) as u64;
                    self.counts.unpaired += c.pending.iter().filter(|p| p.teed).count() as u64;
                    c.pending.clear();
                    c.requests.clear();
                    c.responses.clear();
                }
            }
            Kind::Close => {
                self.responses(r.conn, r.ts_unix_ns, true);
                if let Some(c) = self.conns.remove(&r.conn) {
                    self.close(r.conn, c);
                }
            }
        }
    }

    /// A connection is gone: what waits is unpaired, its shadow connection closed.
    fn close(&mut self, conn: u64, c: Conn) {
        self.counts.unpaired += c.pending.iter().filter(|p| p.teed).count() as u64;
        self.counts.unframed_bytes += (c.requests.len() + c.responses.len()) as u64;
        if let Some(w) = self.worker(conn) {
            // A full queue keeps the old connection open a little longer: harmless.
            let _ = w.try_send(Job::Close(conn));
        }
    }

    fn worker(&self, conn: u64) -> Option<&mpsc::SyncSender<Job>> {
        self.workers
            .get((conn % self.workers.len().max(1) as u64) as usize)
    }

    /// Frames the complete requests of `conn`, tees the idempotent ones.
    fn requests(&mut self, conn: u64, ts: u64) {
        loop {
            let Some(c) = self.conns.get_mut(&conn) else {
                return;
            };
            let Some((len, method, path)) = bakeoff_replay::session::request_len(&c.requests)
            else {
                return;
            };
            let bytes: Vec<u8> = c.requests.drain(..len).collect();
            let index = c.next_index;
            c.next_index += 1;
            self.counts.requests += 1;
            let mut teed = false;
            if IDEMPOTENT.contains(&method.as_str()) {
                let outcome = Box::new(Outcome::new(conn, index, &method, &path));
                let job = Job::Send {
                    conn,
                    outcome,
                    bytes,
                };
                match self.worker(conn).map(|w| w.try_send(job)) {
                    Some(Ok(())) => {
                        self.counts.teed += 1;
                        teed = true;
                    }
                    _ => self.counts.overload_skipped += 1,
                }
            } else {
                self.counts.writes_skipped += 1;
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.pending.push_back(Pending {
                    index,
                    method,
                    path,
                    read_ns: ts,
                    teed,
                });
            }
        }
    }

    /// Frames the complete responses of `conn` (at its close, one delimited by it too) and
    /// pairs each with the oldest waiting request.
    fn responses(&mut self, conn: u64, ts: u64, closed: bool) {
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        loop {
            let head = c.pending.front().is_some_and(|p| p.method == "HEAD");
            let framed = if closed {
                bakeoff_replay::response::response_at_close(&c.responses, head)
            } else {
                bakeoff_replay::response::response_len(&c.responses, head)
            };
            let Some((len, status)) = framed else {
                return;
            };
            let bytes: Vec<u8> = c.responses.drain(..len).collect();
            if (100..200).contains(&status) && status != 101 {
                // Interim: the final response follows.
                continue;
            }
            let Some(p) = c.pending.pop_front() else {
                self.counts.unpaired_responses += 1;
                continue;
            };
            if !p.teed {
                continue;
            }
            let mut live = Outcome::new(conn, p.index, &p.method, &p.path);
            // Server time: the request's last piece read to the response's last piece written.
            live.latency_ns = ts.saturating_sub(p.read_ns);
            match bakeoff_replay::response::parse(&bytes, head) {
                Some(r) => live.answered(&self.noise, r.status, &r.headers, &r.body),
                None => live.error = Some("the live response cannot be parsed".into()),
            }
            self.live.push(live);
        }
    }
}

/// Reads the next record of the stream; `None` at its end (between records).
fn next_record(r: &mut impl Read) -> Result<Option<Record>> {
    let mut head = [0u8; bakeoff_capture::RECORD_HEADER];
    let mut got = 0;
    while got < head.len() {
        let n = r
            .read(&mut head[got..])
            .context("the capture stream broke")?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            bail!("the capture stream was cut inside a record");
        }
        got += n;
    }
    let kind = match head[0] {
        1 => Kind::Open,
        2 => Kind::Data,
        3 => Kind::Close,
        4 => Kind::Loss,
        k => bail!("the capture stream is damaged: record kind {k}"),
    };
    let direction = match head[1] {
        0 => Direction::None,
        1 => Direction::Ingress,
        2 => Direction::Egress,
        d => bail!("the capture stream is damaged: direction {d}"),
    };
    let le64 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[at..at + 8]);
        u64::from_le_bytes(b)
    };
    let (conn, ts_unix_ns) = (le64(2), le64(10));
    let len = u32::from_le_bytes([head[18], head[19], head[20], head[21]]);
    if len > MAX_RECORD {
        bail!("the capture stream is damaged: a record of {len} bytes");
    }
    let mut body = vec![0u8; len as usize];
    r.read_exact(&mut body)
        .context("the capture stream was cut inside a record")?;
    Ok(Some(Record {
        kind,
        direction,
        conn,
        ts_unix_ns,
        body,
    }))
}

/// Records the shadowing in the audit log before anything is captured or sent (the same log
/// and rules as `bakeoff replay`'s entry); an error refuses it.
fn audit_start(args: &ShadowArgs, noise: &Noise) -> Result<()> {
    let refused = "not shadowing: it cannot be recorded in the audit log (--audit-log)";
    let path = match &args.audit_log {
        Some(p) => p.clone(),
        None => audit::default_path().context(refused)?,
    };
    let mut log = AuditLog::open(&path).context(refused)?;
    let details = serde_json::json!({
        "api": args.api.api,
        "max_requests": args.max_requests,
        "duration_ms": args.duration.map(|d| d.as_millis() as u64),
        "concurrency": args.concurrency,
        "methods": IDEMPOTENT,
        "noise": noise.names(),
        "uid": audit::local_uid(),
    });
    log.append(audit::Entry {
        actor: audit::local_actor(),
        action: "shadow.start".into(),
        experiment: Some(args.experiment.clone()),
        cohort: Some(args.cohort.clone()),
        target: Some(args.target.to_string()),
        bytes: None,
        redaction: Vec::new(),
        details: match details {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    })
    .context(refused)?;
    Ok(())
}

/// On Ctrl-C, asks the collector to stop the capture: the stream then ends once the probes
/// sent what they hold, and the comparison is printed. A second Ctrl-C exits at once.
fn stop_on_ctrl_c(client: ApiClient, id: String) {
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            eprintln!("stopping (Ctrl-C): the probes send what they hold; Ctrl-C again to quit");
            let stop = client.post_json::<serde_json::Value>(
                &format!("/api/v1/captures/{id}/stop"),
                &serde_json::json!({}),
                "stop the capture",
            );
            if let Err(e) = stop {
                eprintln!("bakeoff: error: {e:#}");
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
}

/// Runs `bakeoff shadow`; the exit code (1 when the shadow is slower or answers differently).
pub fn run(args: ShadowArgs) -> Result<i32> {
    let noise = match Noise::new(&NoiseRules {
        headers: args.noise_header.clone(),
        json_fields: args.noise_json.clone(),
        regexes: args.noise_regex.clone(),
    }) {
        Ok(noise) => noise,
        Err(e) => {
            // A rule that cannot be used is a usage error, as clap's are.
            eprintln!("bakeoff: error: {e}");
            return Ok(2);
        }
    };
    let client = args.api.client()?;
    let stopper = args.api.client()?;
    // Before anything is captured or sent.
    audit_start(&args, &noise)?;
    let spec = CaptureSpec {
        experiment: args.experiment.clone(),
        cohort: args.cohort.clone(),
        protocol: "http1".into(),
        max_requests: args.max_requests.unwrap_or(0),
        duration_ms: args.duration.map_or(0, |d| d.as_millis() as u64),
        ..CaptureSpec::default()
    };
    let info: CaptureInfo = client.post_json(
        "/api/v1/captures",
        &serde_json::to_value(&spec)?,
        "start the capture",
    )?;
    let mut resp = crate::send(
        client.get(&format!("/api/v1/captures/{}/stream", info.id)),
        "the capture's stream",
        &client.base,
    )?;
    eprintln!(
        "shadowing cohort {} to {} through capture {} on {} probe(s); Ctrl-C stops",
        args.cohort,
        args.target,
        info.id,
        info.probes.len()
    );
    stop_on_ctrl_c(stopper, info.id.clone());

    let (results_tx, results) = mpsc::channel();
    let workers = args.concurrency.max(1);
    let per_worker = (args.queue / workers).max(1);
    let mut senders = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..workers {
        let (tx, rx) = mpsc::sync_channel(per_worker);
        senders.push(tx);
        let (results_tx, noise) = (results_tx.clone(), noise.clone());
        let (target, timeout) = (args.target, args.timeout);
        handles.push(std::thread::spawn(move || {
            worker(rx, results_tx, target, timeout, noise);
        }));
    }
    drop(results_tx);
    let mut shadow = Shadow {
        conns: HashMap::new(),
        workers: senders,
        noise: noise.clone(),
        live: Vec::new(),
        counts: Counts::default(),
    };
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut stream_error = None;
    loop {
        match next_record(&mut reader) {
            Ok(Some(r)) => shadow.record(r),
            Ok(None) => break,
            Err(e) => {
                stream_error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    // The capture is over: what waits is unpaired; the workers finish their queues.
    let open: Vec<(u64, Conn)> = shadow.conns.drain().collect();
    for (conn, c) in open {
        shadow.close(conn, c);
    }
    let Shadow {
        workers: senders,
        live,
        mut counts,
        ..
    } = shadow;
    drop(senders);
    for h in handles {
        let _ = h.join();
    }
    let shadowed: Vec<Outcome> = results.into_iter().collect();
    counts.shadow_errors = shadowed.iter().filter(|o| o.error.is_some()).count() as u64;
    let final_info: Option<CaptureInfo> = client
        .get(&format!("/api/v1/captures/{}", info.id))
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_json().ok());
    let as_replay = |outcomes: Vec<Outcome>| Replayed {
        outcomes,
        ..Replayed::default()
    };
    let compared = live.len();
    let comparison = bakeoff_collector::replay::compare(
        &as_replay(live),
        &as_replay(shadowed),
        None,
        args.alpha,
        args.tolerance,
    );
    let losses = final_info.as_ref().map(|i| i.losses.clone());
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "capture": info.id,
                "state": final_info.as_ref().map(|i| i.state.clone()),
                "target": args.target.to_string(),
                "counts": counts,
                "compared": compared,
                "losses": losses,
                "stream_error": stream_error,
                "noise": noise.names(),
                "latency": "live: server time seen by the probe; shadow: measured by this client (adds a round trip)",
                "comparison": comparison,
            })
        );
    } else {
        println!(
            "capture {}: {} requests, {} teed to {}, {} compared ({} writes skipped, {} skipped \
             for overload, {} unpaired, {} shadow errors)",
            info.id,
            counts.requests,
            counts.teed,
            args.target,
            compared,
            counts.writes_skipped,
            counts.overload_skipped,
            counts.unpaired,
            counts.shadow_errors
        );
        if let Some(e) = &stream_error {
            println!("the stream ended early: {e}");
        }
        if let Some(l) = losses.filter(|l| l.values().any(|v| *v > 0)) {
            println!("capture losses: {l:?}");
        }
        println!(
            "latency: live = server time seen by the probe, shadow = measured here (adds a round trip)"
        );
        println!("noise (not compared): {}", noise.names().join(", "));
        print!(
            "{}",
            bakeoff_collector::replay::table(&comparison, "live", &args.target.to_string())
        );
    }
    if let Some(e) = stream_error {
        eprintln!("bakeoff: error: {e}");
        return Ok(3);
    }
    Ok(if comparison.regressed() { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(conn: u64, direction: Direction, ts: u64, body: &[u8]) -> Record {
        Record::data(conn, direction, ts, body.to_vec())
    }

    /// Requests and responses split across pieces are paired in order; only idempotent ones
    /// are teed, a full queue skips without blocking, a request left without a response is
    /// unpaired, and the live latency is the server's (last request piece to last response
    /// piece).
    #[test]
    fn requests_are_teed_and_paired_with_their_live_responses() {
        let (tx, rx) = mpsc::sync_channel(2);
        let mut s = Shadow {
            conns: HashMap::new(),
            workers: vec![tx],
            noise: Noise::default(),
            live: Vec::new(),
            counts: Counts::default(),
        };
        let get = b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\n";
        let post = b"POST /b HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi";
        s.record(data(1, Direction::Ingress, 100, &get[..10]));
        s.record(data(
            1,
            Direction::Ingress,
            110,
            &[&get[10..], &post[..]].concat(),
        ));
        s.record(data(
            1,
            Direction::Egress,
            150,
            b"HTTP/1.1 200 OK\r\nContent-Le",
        ));
        s.record(data(
            1,
            Direction::Egress,
            170,
            b"ngth: 2\r\n\r\nokHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n",
        ));
        // Two more GETs: the queue (2) takes one, the next is skipped for overload.
        s.record(data(
            1,
            Direction::Ingress,
            200,
            &[&get[..], &get[..]].concat(),
        ));
        s.record(Record::close(1, 300));
        assert_eq!(s.counts.requests, 4);
        assert_eq!(s.counts.teed, 2);
        assert_eq!(s.counts.writes_skipped, 1);
        assert_eq!(s.counts.overload_skipped, 1);
        assert_eq!(s.counts.unpaired, 1, "the last teed GET got no response");
        assert_eq!(s.live.len(), 1);
        let live = &s.live[0];
        assert_eq!(
            (live.index, live.status, live.latency_ns),
            (0, Some(200), 60)
        );
        assert_eq!(live.body_bytes, 2);
        let queued: Vec<Job> = rx.try_iter().collect();
        assert!(matches!(
            &queued[0],
            Job::Send { bytes, .. } if bytes.as_slice() == get
        ));
    }
}

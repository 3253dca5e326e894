//! Recording a cohort's traffic: the bytes the decoders see (TLS plaintext included), per
//! connection and direction, redacted before they leave the recording, into a capture file
//! (`--capture-cohort`) or to the collector over the control channel (`bakeoff capture start`).
//! Sessions already open when the recording starts are recorded from there, marked `midstream`.
//! With a protocol named, a connection's records are held until its request side shows its
//! protocol, and dropped (counted) if it is another one.
//!
//! Redaction is stateful per direction so a secret split across two pieces is still masked: an
//! HTTP header line is matched with the end of the previous piece in front of it, and Postgres
//! frontend messages are followed by their lengths, so a password message's body is masked
//! wherever the pieces cut it.

use std::{collections::HashMap, fs::File, io::BufWriter, path::Path};

use bakeoff_capture::{
    CaptureError, CaptureWriter, ConnInfo, Direction as CapDir, Loss, Meta, Record,
    redact::{Masked, Redactor},
};
use bakeoff_protocol::detect::{Detected, detect};

use crate::{
    clock::Clock,
    conn::{ConnKey, Direction, Role, TapEvent, Tapped},
};

/// Bytes of an HTTP line kept from one piece to the next (a longer header line is not
/// matched across pieces).
const CARRY_MAX: usize = 8192;

/// Counters of a recording.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordingStats {
    pub connections: u64,
    pub records: u64,
    pub payload_bytes: u64,
    /// Pieces the kernel captured only in part (longer than the payload prefix): the rest is a
    /// `Loss` record.
    pub pieces_cut: u64,
    pub bytes_lost: u64,
    pub gaps: u64,
    pub fields_masked: u64,
    /// Records not written because `max_bytes` was reached.
    pub records_over_limit: u64,
    /// Records the channel to the collector could not take (a `Loss` record marks each
    /// connection that lost some).
    pub records_dropped: u64,
    /// Connections left out: another protocol than the one asked for.
    pub connections_excluded: u64,
}

/// Where a recording's records go.
pub enum Sink {
    /// A capture file the probe writes (`--capture-file`).
    File(CaptureWriter<BufWriter<File>>),
    /// The collector, over the control channel.
    Channel(crate::export::control::ChannelSink),
}

impl Sink {
    fn write(&mut self, r: &Record) -> Result<(), CaptureError> {
        match self {
            Sink::File(w) => w.write(r),
            Sink::Channel(c) => {
                c.write(r);
                Ok(())
            }
        }
    }

    fn bytes_written(&self) -> u64 {
        match self {
            Sink::File(w) => w.bytes_written(),
            Sink::Channel(c) => c.bytes_written(),
        }
    }

    fn flush(&mut self) -> Result<(), CaptureError> {
        match self {
            Sink::File(w) => w.flush(),
            Sink::Channel(c) => {
                c.flush();
                Ok(())
            }
        }
    }
}

/// Largest bytes of records held per connection while its protocol is not known yet; beyond,
/// the connection is left out.
const PENDING_MAX: usize = 64 * 1024;

/// The protocol a connection's first request-side bytes show, by the names captures use.
fn protocol_of(first: &[u8]) -> Option<&'static str> {
    match detect(first) {
        Some(Detected::Http1) => Some("http1"),
        Some(Detected::Http2) => Some("http2"),
        Some(Detected::Postgres) => Some("postgres"),
        // Midstream: a tagged Postgres frontend message (tag, then a sane length).
        None if first.len() >= 5
            && b"QPBEDSCHFXdcfp".contains(&first[0])
            && (4..1 << 30).contains(&u32::from_be_bytes([
                first[1], first[2], first[3], first[4],
            ])) =>
        {
            Some("postgres")
        }
        None => None,
    }
}

/// Protocol names a capture may be narrowed to.
pub const PROTOCOLS: [&str; 3] = ["http1", "http2", "postgres"];

/// Postgres frontend framing, followed across pieces.
#[derive(Debug, Default)]
struct PgFront {
    /// The startup phase (untagged messages) is over.
    started: bool,
    header: Vec<u8>,
    /// Body bytes of the current message still to come, and whether they are masked.
    remaining: u64,
    masking: bool,
}

impl PgFront {
    fn mask(&mut self, buf: &mut [u8], masked: &mut Masked) {
        let mut at = 0;
        while at < buf.len() {
            if self.remaining > 0 {
                let n = (self.remaining as usize).min(buf.len() - at);
                if self.masking {
                    buf[at..at + n].fill(b'*');
                    masked.bytes += n as u64;
                }
                at += n;
                self.remaining -= n as u64;
                continue;
            }
            // Untagged during startup: length (4) then body; tagged after: tag, length.
            let need = if self.started { 5 } else { 4 };
            let take = (need - self.header.len()).min(buf.len() - at);
            self.header.extend_from_slice(&buf[at..at + take]);
            at += take;
            if self.header.len() < need {
                break;
            }
            let l = &self.header[need - 4..need];
            let len = u64::from(u32::from_be_bytes([l[0], l[1], l[2], l[3]]));
            self.masking = self.started && self.header[0] == b'p';
            if self.masking {
                masked.fields += 1;
            }
            if !self.started {
                // SSLRequest and GSSENCRequest keep the startup phase; anything else ends it.
                let code = buf
                    .get(at..at + 4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
                if !matches!(code, Some(80_877_103 | 80_877_104)) {
                    self.started = true;
                }
            }
            self.remaining = len.saturating_sub(4);
            self.header.clear();
        }
    }
}

/// Redaction state of one connection.
#[derive(Debug, Default)]
struct ConnState {
    id: u64,
    postgres: Option<PgFront>,
    decided: bool,
    /// With a protocol asked for, until it is known: the connection's records, held.
    pending: Option<(Vec<Record>, usize)>,
    /// Another protocol than the one asked for: nothing of it is recorded.
    excluded: bool,
    /// Per direction (ingress, egress): the unfinished last line of the previous piece.
    carry: [Vec<u8>; 2],
}

/// A recording in progress.
pub struct Recording {
    cohort: u32,
    sink: Sink,
    /// Only connections of this protocol (`PROTOCOLS`), if set.
    protocol: Option<String>,
    redactor: Redactor,
    conns: HashMap<ConnKey, ConnState>,
    next_id: u64,
    max_bytes: u64,
    clock: Clock,
    pub stats: RecordingStats,
}

fn cap_dir(dir: Direction) -> CapDir {
    match dir {
        Direction::Ingress => CapDir::Ingress,
        Direction::Egress => CapDir::Egress,
    }
}

impl Recording {
    /// Creates `path` and writes the capture's header.
    pub fn create(
        path: &Path,
        cohort: u32,
        mut meta: Meta,
        redactor: Redactor,
        max_bytes: u64,
    ) -> Result<Self, CaptureError> {
        let file = File::create(path)?;
        meta.redaction = redactor.names().to_vec();
        let writer = CaptureWriter::new(BufWriter::new(file), &meta)?;
        Ok(Self::new(
            cohort,
            Sink::File(writer),
            None,
            redactor,
            max_bytes,
        ))
    }

    /// A recording into `sink`, of `protocol`'s connections only if one is named.
    pub fn new(
        cohort: u32,
        sink: Sink,
        protocol: Option<String>,
        redactor: Redactor,
        max_bytes: u64,
    ) -> Self {
        Self {
            cohort,
            sink,
            protocol,
            redactor,
            conns: HashMap::new(),
            next_id: 1,
            max_bytes,
            clock: Clock::new(),
            stats: RecordingStats::default(),
        }
    }

    /// Names of the redaction rules in force.
    pub fn redaction(&self) -> &[String] {
        self.redactor.names()
    }

    /// Bytes recorded so far (the sink's).
    pub fn bytes_written(&self) -> u64 {
        self.sink.bytes_written()
    }

    /// Counters, the sink's drops included.
    pub fn stats(&self) -> RecordingStats {
        let mut s = self.stats.clone();
        if let Sink::Channel(c) = &self.sink {
            s.records_dropped = c.records_dropped();
        }
        s
    }

    /// The cohort recorded.
    pub fn cohort(&self) -> u32 {
        self.cohort
    }

    /// Writes `r` for the connection `key` (held while its protocol is not known).
    fn write(&mut self, key: Option<&ConnKey>, r: Record) -> Result<(), CaptureError> {
        if let Some(c) = key.and_then(|k| self.conns.get_mut(k)) {
            if c.excluded {
                return Ok(());
            }
            if let Some((held, bytes)) = &mut c.pending {
                *bytes += r.body.len() + bakeoff_capture::RECORD_HEADER;
                held.push(r);
                if *bytes > PENDING_MAX {
                    c.pending = None;
                    c.excluded = true;
                    self.stats.connections_excluded += 1;
                }
                return Ok(());
            }
        }
        self.emit(&r)
    }

    fn emit(&mut self, r: &Record) -> Result<(), CaptureError> {
        if self.sink.bytes_written() >= self.max_bytes {
            self.stats.records_over_limit += 1;
            return Ok(());
        }
        self.sink.write(r)?;
        self.stats.records += 1;
        Ok(())
    }

    /// The connection's protocol is known: its held records go out, or it is left out.
    fn decide(&mut self, key: &ConnKey, protocol: Option<&str>) -> Result<(), CaptureError> {
        let Some(c) = self.conns.get_mut(key) else {
            return Ok(());
        };
        let Some((held, _)) = c.pending.take() else {
            return Ok(());
        };
        if protocol.is_some() && protocol == self.protocol.as_deref() {
            for r in held {
                self.emit(&r)?;
            }
        } else {
            c.excluded = true;
            self.stats.connections_excluded += 1;
        }
        Ok(())
    }

    /// Writes what the recorded connections produced.
    pub fn record(&mut self, events: Vec<TapEvent>) -> Result<(), CaptureError> {
        for e in events {
            match e {
                TapEvent::Piece {
                    key,
                    tgid,
                    role,
                    peer,
                    midstream,
                    piece,
                    state,
                } => self.piece(key, tgid, role, peer, (midstream, state), piece)?,
                TapEvent::Close { key } => {
                    if let Some(c) = self.conns.remove(&key)
                        && !c.excluded
                        && c.pending.is_none()
                    {
                        let now = self.clock.unix_ns(self.clock.monotonic_now());
                        self.emit(&Record::close(c.id, now))?;
                    }
                }
            }
        }
        Ok(())
    }

    fn piece(
        &mut self,
        key: ConnKey,
        tgid: u32,
        role: Option<Role>,
        peer: Option<std::net::SocketAddr>,
        (midstream, state): (bool, Vec<(String, String)>),
        piece: Tapped,
    ) -> Result<(), CaptureError> {
        let ts = self.clock.unix_ns(piece.ts);
        if !self.conns.contains_key(&key) {
            // Session state may hold what the rules mask (a `SET` with a key in it).
            let mut masked = Masked::default();
            let attributes = state
                .into_iter()
                .map(|(k, v)| {
                    let mut bytes = v.into_bytes();
                    self.redactor.bodies(&mut bytes, &mut masked);
                    (k, String::from_utf8_lossy(&bytes).into_owned())
                })
                .collect();
            self.stats.fields_masked += u64::from(masked.fields);
            let id = self.next_id;
            self.next_id += 1;
            self.stats.connections += 1;
            let info = ConnInfo {
                role: match role {
                    Some(Role::Server) => "server",
                    Some(Role::Client) => "client",
                    None => "",
                }
                .into(),
                protocol: String::new(),
                peer: peer.map(|p| p.to_string()),
                pid: tgid,
                midstream,
                attributes,
            };
            self.conns.insert(
                key,
                ConnState {
                    id,
                    pending: self.protocol.as_ref().map(|_| (Vec::new(), 0)),
                    ..ConnState::default()
                },
            );
            self.write(Some(&key), Record::open(id, ts, &info))?;
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        let id = c.id;
        let dir = cap_dir(piece.dir);
        if piece.gap {
            self.stats.gaps += 1;
            self.stats.bytes_lost += piece.len;
            return self.write(
                Some(&key),
                Record::loss(
                    id,
                    dir,
                    ts,
                    &Loss {
                        bytes: piece.len,
                        reason: "stream_gap".into(),
                    },
                ),
            );
        }
        let request_side = match role {
            Some(r) => (r == Role::Server) == (piece.dir == Direction::Ingress),
            None => piece.dir == Direction::Ingress,
        };
        let mut decided = None;
        if !c.decided && request_side && !piece.prefix.is_empty() {
            c.decided = true;
            let protocol = protocol_of(&piece.prefix);
            if protocol == Some("postgres") {
                // Midstream, the startup is over: the framing starts at a tagged message.
                c.postgres = Some(PgFront {
                    started: detect(&piece.prefix) != Some(Detected::Postgres),
                    ..PgFront::default()
                });
            }
            decided = Some(protocol);
        }
        let mut bytes = piece.prefix;
        let mut masked = Masked::default();
        match (&mut c.postgres, request_side) {
            (Some(pg), true) => {
                pg.mask(&mut bytes, &mut masked);
                self.redactor.bodies(&mut bytes, &mut masked);
            }
            (Some(_), false) => self.redactor.bodies(&mut bytes, &mut masked),
            (None, _) => {
                // The unfinished line before this piece, so a header split by the cut is seen
                // whole; only this piece's bytes are written.
                let carry = &mut c.carry[piece.dir.index()];
                let mut joined = std::mem::take(carry);
                let keep = joined.len();
                joined.extend_from_slice(&bytes);
                masked = self.redactor.http1(&mut joined);
                bytes.copy_from_slice(&joined[keep..]);
                let tail = joined
                    .iter()
                    .rposition(|&b| b == b'\n')
                    .map_or(0, |i| i + 1);
                if joined.len() - tail <= CARRY_MAX {
                    joined.drain(..tail);
                    *carry = joined;
                }
            }
        }
        self.stats.fields_masked += u64::from(masked.fields);
        let captured = bytes.len() as u64;
        self.stats.payload_bytes += captured;
        if let Some(protocol) = decided {
            self.decide(&key, protocol)?;
        }
        self.write(Some(&key), Record::data(id, dir, ts, bytes))?;
        if captured < piece.len {
            self.stats.pieces_cut += 1;
            self.stats.bytes_lost += piece.len - captured;
            self.write(
                Some(&key),
                Record::loss(
                    id,
                    dir,
                    ts,
                    &Loss {
                        bytes: piece.len - captured,
                        reason: "payload_truncated".into(),
                    },
                ),
            )?;
        }
        Ok(())
    }

    /// Flushes what is written (readable so far).
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.sink.flush()
    }

    /// Ends the capture: open connections are left open in it (no `Close`), the file complete
    /// (or the last records sent).
    pub fn finish(mut self) -> Result<RecordingStats, CaptureError> {
        if let Sink::Channel(c) = &mut self.sink {
            c.flush();
        }
        let stats = self.stats();
        if let Sink::File(w) = self.sink {
            w.finish()?;
        }
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::control::ChannelSink;
    use bakeoff_proto::v1::{ProbeMessage, probe_message::Message};

    fn piece(socket: u64, dir: Direction, bytes: &[u8], state: Vec<(String, String)>) -> TapEvent {
        TapEvent::Piece {
            key: ConnKey::Socket(socket),
            tgid: 7,
            role: Some(Role::Server),
            peer: None,
            midstream: !state.is_empty(),
            piece: Tapped {
                dir,
                ts: 1,
                len: bytes.len() as u64,
                prefix: bytes.to_vec(),
                gap: false,
            },
            state,
        }
    }

    fn records(m: ProbeMessage) -> Vec<bakeoff_proto::v1::CaptureRecord> {
        match m.message {
            Some(Message::CaptureData(d)) => d.records,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_capture_of_one_protocol_leaves_the_others_out_and_keeps_session_state() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let redactor = Redactor::new(&bakeoff_capture::redact::Rules {
            regexes: vec!["sk_[a-z0-9]+".into()],
            ..Default::default()
        })
        .expect("rules");
        let mut rec = Recording::new(
            1,
            Sink::Channel(ChannelSink::new("c1".into(), tx)),
            Some("postgres".into()),
            redactor,
            u64::MAX,
        );
        let state = vec![
            ("pg.user".to_string(), "alice".to_string()),
            (
                "pg.set.00".to_string(),
                "SET app.key = 'sk_live42'".to_string(),
            ),
        ];
        rec.record(vec![
            // HTTP/1: left out. Postgres, open before the capture (a tagged message first).
            piece(
                1,
                Direction::Ingress,
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
                Vec::new(),
            ),
            piece(2, Direction::Ingress, b"Q\0\0\0\x0dSELECT 1;\0", state),
            piece(1, Direction::Egress, b"HTTP/1.1 200 OK\r\n\r\n", Vec::new()),
            TapEvent::Close {
                key: ConnKey::Socket(1),
            },
        ])
        .expect("record");
        let stats = rec.finish().expect("finish");
        assert_eq!(stats.connections_excluded, 1, "{stats:?}");
        let got = records(rx.try_recv().expect("one chunk"));
        // Open and Data of the Postgres connection only.
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got.iter().all(|r| r.conn == 2), "{got:?}");
        let info: bakeoff_capture::ConnInfo = serde_json::from_slice(&got[0].body).expect("open");
        assert!(info.midstream);
        assert_eq!(
            info.attributes.get("pg.user").map(String::as_str),
            Some("alice")
        );
        assert_eq!(
            info.attributes.get("pg.set.00").map(String::as_str),
            Some("SET app.key = '*********'")
        );
    }

    #[test]
    fn records_the_channel_cannot_take_are_counted_and_marked_as_losses() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(1);
        let mut sink = ChannelSink::new("c1".into(), tx);
        let data =
            |conn| Record::data(conn, bakeoff_capture::Direction::Ingress, 1, vec![b'x'; 10]);
        sink.write(&data(1));
        sink.flush();
        // The queue is full: these two records are dropped, counted.
        sink.write(&data(2));
        sink.write(&data(3));
        sink.flush();
        assert_eq!(sink.records_dropped(), 2);
        assert_eq!(records(rx.try_recv().expect("first chunk")).len(), 1);
        // Room again: the next chunk says where the holes are.
        sink.write(&data(2));
        sink.flush();
        let got = records(rx.try_recv().expect("second chunk"));
        let losses: Vec<u64> = got
            .iter()
            .filter(|r| r.kind == bakeoff_capture::Kind::Loss as u32)
            .map(|r| r.conn)
            .collect();
        assert_eq!(losses, [2, 3]);
        assert_eq!(got.len(), 3);
        assert_eq!(sink.records_dropped(), 2);
    }

    #[test]
    fn a_password_message_split_across_pieces_is_masked() {
        let mut pg = PgFront::default();
        let mut m = Masked::default();
        let mut stream = Vec::new();
        let params = b"\0\x03\0\0user\0bob\0\0";
        stream.extend_from_slice(&((params.len() + 4) as u32).to_be_bytes());
        stream.extend_from_slice(params);
        stream.extend_from_slice(b"p\0\0\0\x0dhunter2\0\0");
        stream.extend_from_slice(b"Q\0\0\0\x0dSELECT 1;\0");
        let expect_q = b"Q\0\0\0\x0dSELECT 1;\0".to_vec();
        // Cut everywhere in pieces of 3 bytes.
        let mut out = Vec::new();
        for chunk in stream.chunks(3) {
            let mut c = chunk.to_vec();
            pg.mask(&mut c, &mut m);
            out.extend(c);
        }
        let text = String::from_utf8_lossy(&out);
        assert!(!text.contains("hunter"), "{text}");
        assert!(out.ends_with(&expect_q));
        assert_eq!(m.fields, 1);
    }
}

//! Recording a cohort's traffic into a capture file (`--capture-cohort`): the bytes the
//! decoders see (TLS plaintext included), per connection and direction, redacted before they
//! are written. Sessions already open when the recording starts are recorded from there, marked
//! `midstream`.
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
}

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
    /// Per direction (ingress, egress): the unfinished last line of the previous piece.
    carry: [Vec<u8>; 2],
}

/// A recording in progress.
pub struct Recording {
    cohort: u32,
    writer: CaptureWriter<BufWriter<File>>,
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
        Ok(Self {
            cohort,
            writer,
            redactor,
            conns: HashMap::new(),
            next_id: 1,
            max_bytes,
            clock: Clock::new(),
            stats: RecordingStats::default(),
        })
    }

    /// The cohort recorded.
    pub fn cohort(&self) -> u32 {
        self.cohort
    }

    fn write(&mut self, r: &Record) -> Result<(), CaptureError> {
        if self.writer.bytes_written() >= self.max_bytes {
            self.stats.records_over_limit += 1;
            return Ok(());
        }
        self.writer.write(r)?;
        self.stats.records += 1;
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
                } => self.piece(key, tgid, role, peer, midstream, piece)?,
                TapEvent::Close { key } => {
                    if let Some(c) = self.conns.remove(&key) {
                        let now = self.clock.unix_ns(self.clock.monotonic_now());
                        self.write(&Record::close(c.id, now))?;
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
        midstream: bool,
        piece: Tapped,
    ) -> Result<(), CaptureError> {
        let ts = self.clock.unix_ns(piece.ts);
        if !self.conns.contains_key(&key) {
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
                attributes: Default::default(),
            };
            self.write(&Record::open(id, ts, &info))?;
            self.conns.insert(
                key,
                ConnState {
                    id,
                    ..ConnState::default()
                },
            );
        }
        let Some(c) = self.conns.get_mut(&key) else {
            return Ok(());
        };
        let id = c.id;
        let dir = cap_dir(piece.dir);
        if piece.gap {
            self.stats.gaps += 1;
            self.stats.bytes_lost += piece.len;
            return self.write(&Record::loss(
                id,
                dir,
                ts,
                &Loss {
                    bytes: piece.len,
                    reason: "stream_gap".into(),
                },
            ));
        }
        let request_side = match role {
            Some(r) => (r == Role::Server) == (piece.dir == Direction::Ingress),
            None => piece.dir == Direction::Ingress,
        };
        if !c.decided && request_side && !piece.prefix.is_empty() {
            c.decided = true;
            if detect(&piece.prefix) == Some(Detected::Postgres) {
                c.postgres = Some(PgFront::default());
            }
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
        self.write(&Record::data(id, dir, ts, bytes))?;
        if captured < piece.len {
            self.stats.pieces_cut += 1;
            self.stats.bytes_lost += piece.len - captured;
            self.write(&Record::loss(
                id,
                dir,
                ts,
                &Loss {
                    bytes: piece.len - captured,
                    reason: "payload_truncated".into(),
                },
            ))?;
        }
        Ok(())
    }

    /// Flushes what is written (readable so far).
    pub fn flush(&mut self) -> Result<(), CaptureError> {
        self.writer.flush()
    }

    /// Ends the capture: open connections are left open in it (no `Close`), the file complete.
    pub fn finish(self) -> Result<RecordingStats, CaptureError> {
        self.writer.finish()?;
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

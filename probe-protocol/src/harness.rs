//! Fuzz harnesses: each turns arbitrary bytes into calls of one decoder, the way the probe
//! drives it, and checks the invariants that are cheap to check. They live in this crate (not
//! in `fuzz/`) so that the libFuzzer targets and the plain `cargo test` that replays the
//! committed corpora and regression inputs (`tests/fuzz_corpus.rs`) run the very same code:
//! an input that crashed a target fails the normal test run too.
//!
//! The stateful decoders (HTTP/1, HTTP/2, Postgres, HPACK, TCP reassembly) are driven by a
//! *script* read from the input: a sequence of operations (bytes of one side with a captured
//! prefix and uncaptured bytes, the same bytes split into small reads, a gap, the end of the
//! connection), so that coverage reaches pairing, gap and resynchronisation paths and not only
//! the framing of one buffer. [`Script`] writes that format, for seeds and tests.
//!
//! Every harness is total: it never panics on any input unless a decoder breaks an invariant,
//! which is then a bug to fix in the decoder.

use crate::{
    Call, Decoder, Http1Exchange,
    detect::{self, Detected},
    exchange::Anomaly,
    hpack::{self, HpackDecoder},
    http1::Side,
    http2::{self, Http2Exchange},
    postgres::PostgresExchange,
    sql,
    stream::{
        Piece,
        tcp::{Limits, Reassembler, Segment},
    },
};

/// Reads a script: bytes, big-endian integers, and slices of what is left.
#[derive(Clone, Copy, Debug)]
struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.data.split_first()?;
        self.data = rest;
        Some(b)
    }

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_be_bytes([self.byte()?, self.byte()?]))
    }

    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes([
            self.byte()?,
            self.byte()?,
            self.byte()?,
            self.byte()?,
        ]))
    }

    /// At most `n` bytes (fewer when the input ends).
    fn take(&mut self, n: usize) -> &'a [u8] {
        let (taken, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        taken
    }
}

// ----- the stream decoders (HTTP/1, HTTP/2, Postgres) -----

/// Operation codes of a decoder script (low 3 bits of an operation byte; bit 0 is the side:
/// 0 request, 1 response).
///
/// - `0|side`, `DATA`: `u16 n`, then `n` bytes, fed as one read. With bit 3 set, a `u16 c`
///   and a byte `e` follow the `n` bytes: only the first `c` bytes were captured, and
///   `e << (2 * (op >> 4))` more bytes moved uncaptured (lengths up to 2^38: length bombs).
/// - `2|side`, `SPLIT`: `u16 n`, a byte `s`, then `n` bytes fed as reads of `s + 1` bytes.
/// - `4|side`, `GAP`: bytes of that side were lost.
/// - `6`, `CLOSE`: the connection ends (bit 3: by a reset); the script ends here.
///
/// The first byte of a script is its configuration: bit 0 builds the decoder for a connection
/// joined mid-way. A script that ends without `CLOSE` is closed normally.
pub mod op {
    pub const DATA: u8 = 0;
    pub const SPLIT: u8 = 2;
    pub const GAP: u8 = 4;
    pub const CLOSE: u8 = 6;
    /// With `DATA`: a captured prefix and uncaptured bytes follow.
    pub const CUT: u8 = 8;
    /// With `CLOSE`: closed by a reset.
    pub const RESET: u8 = 8;
}

/// Writes decoder scripts (the format of [`op`]): seeds for the corpora, and tests.
#[derive(Clone, Debug, Default)]
pub struct Script {
    bytes: Vec<u8>,
}

fn side_bit(side: Side) -> u8 {
    match side {
        Side::Request => 0,
        Side::Response => 1,
    }
}

impl Script {
    /// A script for a connection seen from its start, or joined mid-way.
    pub fn new(midstream: bool) -> Self {
        Self {
            bytes: vec![u8::from(midstream)],
        }
    }

    /// Reads of at most 65535 bytes each (longer data is cut into several).
    pub fn data(mut self, side: Side, data: &[u8]) -> Self {
        for chunk in data.chunks(usize::from(u16::MAX)) {
            self.bytes.push(op::DATA | side_bit(side));
            self.bytes.extend((chunk.len() as u16).to_be_bytes());
            self.bytes.extend_from_slice(chunk);
        }
        self
    }

    /// One read of which only `captured` bytes were captured, and `extra << (2 * scale)`
    /// more bytes moved uncaptured (`scale` at most 15).
    pub fn cut(mut self, side: Side, data: &[u8], captured: u16, extra: u8, scale: u8) -> Self {
        let data = &data[..data.len().min(usize::from(u16::MAX))];
        self.bytes
            .push(op::DATA | op::CUT | side_bit(side) | (scale.min(15) << 4));
        self.bytes.extend((data.len() as u16).to_be_bytes());
        self.bytes.extend_from_slice(data);
        self.bytes.extend(captured.to_be_bytes());
        self.bytes.push(extra);
        self
    }

    /// The same bytes as reads of `step` bytes (1 to 256).
    pub fn split(mut self, side: Side, data: &[u8], step: usize) -> Self {
        for chunk in data.chunks(usize::from(u16::MAX)) {
            self.bytes.push(op::SPLIT | side_bit(side));
            self.bytes.extend((chunk.len() as u16).to_be_bytes());
            self.bytes.push(step.clamp(1, 256).saturating_sub(1) as u8);
            self.bytes.extend_from_slice(chunk);
        }
        self
    }

    pub fn gap(mut self, side: Side) -> Self {
        self.bytes.push(op::GAP | side_bit(side));
        self
    }

    pub fn close(mut self, reset: bool) -> Self {
        self.bytes
            .push(op::CLOSE | if reset { op::RESET } else { 0 });
        self
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// What a decoder reported while a script ran.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Calls completed, then those returned unanswered at the close.
    pub calls: Vec<Call>,
    pub anomalies: Vec<Anomaly>,
}

/// Runs a decoder script against the decoder `new(midstream)` builds, and checks:
/// - no call ends before it starts (timestamps grow with every read);
/// - the calls' request (response) bytes add up to no more than the bytes that side moved;
/// - every call names its protocol (its method may be unknown: empty);
/// - no more than `max_in_flight` requests wait for an answer after any operation.
pub fn drive_decoder(
    input: &[u8],
    new: fn(bool) -> Box<dyn Decoder>,
    max_in_flight: usize,
) -> Outcome {
    let mut r = Reader { data: input };
    let midstream = r.byte().is_some_and(|c| c & 1 != 0);
    let mut decoder = new(midstream);
    let mut out = Outcome::default();
    let mut ts = 0u64;
    let mut moved = [0u64; 2];
    let mut reset = false;
    let mut feed = |decoder: &mut Box<dyn Decoder>, out: &mut Outcome, side, prefix, len| {
        ts += 1_000;
        moved[usize::from(side_bit(side))] += len;
        decoder.on_bytes(side, ts, prefix, len, &mut out.calls, &mut out.anomalies);
    };
    while let Some(code) = r.byte() {
        let side = if code & 1 == 0 {
            Side::Request
        } else {
            Side::Response
        };
        match code & 0x06 {
            op::DATA => {
                let Some(n) = r.u16() else { break };
                let data = r.take(usize::from(n));
                let (captured, len) = if code & op::CUT != 0 {
                    let c = r.u16().unwrap_or(0);
                    let extra = u64::from(r.byte().unwrap_or(0)) << (2 * (code >> 4));
                    let captured = &data[..data.len().min(usize::from(c))];
                    (captured, data.len() as u64 + extra)
                } else {
                    (data, data.len() as u64)
                };
                feed(&mut decoder, &mut out, side, captured, len);
            }
            op::SPLIT => {
                let (Some(n), Some(s)) = (r.u16(), r.byte()) else {
                    break;
                };
                let data = r.take(usize::from(n));
                for chunk in data.chunks(usize::from(s) + 1) {
                    feed(&mut decoder, &mut out, side, chunk, chunk.len() as u64);
                }
            }
            op::GAP => decoder.gap(side, &mut out.anomalies),
            _ => {
                reset = code & op::RESET != 0;
                break;
            }
        }
        let n = decoder.in_flight();
        assert!(n <= max_in_flight, "{n} requests in flight");
    }
    let done_before_close = out.calls.len();
    let unanswered = decoder.close(reset, &mut out.calls);
    out.calls.extend(unanswered);
    let mut sums = [0u64; 2];
    for (i, call) in out.calls.iter().enumerate() {
        assert!(
            call.end_ts == 0 || call.end_ts >= call.start_ts,
            "call {i} ends before it starts: {call:?}"
        );
        assert!(
            !call.protocol.is_empty(),
            "call {i} without protocol: {call:?}"
        );
        sums[0] += call.request_bytes;
        sums[1] += call.response_bytes;
    }
    assert!(
        sums[0] <= moved[0] && sums[1] <= moved[1],
        "calls count {sums:?} bytes, the sides moved {moved:?} ({} calls, {done_before_close} \
         before the close)",
        out.calls.len()
    );
    out
}

/// HTTP/1.x ([`Http1Exchange`]) driven by a decoder script.
pub fn http1(input: &[u8]) {
    drive_decoder(input, |_| Box::new(Http1Exchange::new()), usize::MAX);
}

/// HTTP/2 and gRPC ([`Http2Exchange`]) driven by a decoder script; also checks the bound on
/// streams in flight.
pub fn http2(input: &[u8]) {
    fn new(midstream: bool) -> Box<dyn Decoder> {
        Box::new(Http2Exchange::new(midstream))
    }
    let out = drive_decoder(input, new, http2::MAX_STREAMS);
    for call in &out.calls {
        assert!(
            matches!(call.protocol, "http2" | "grpc"),
            "HTTP/2 call of protocol {}",
            call.protocol
        );
    }
}

/// Postgres ([`PostgresExchange`]) driven by a decoder script. (Its queue is bounded in items;
/// one multi-statement query is one item of many calls, so no bound on calls is checked.)
pub fn postgres(input: &[u8]) {
    let out = drive_decoder(
        input,
        |midstream| Box::new(PostgresExchange::new(midstream)),
        usize::MAX,
    );
    for call in &out.calls {
        assert_eq!(call.protocol, "postgres");
        assert_eq!(call.method, "SQL");
    }
}

// ----- HPACK -----

/// HPACK: the first byte chooses a synced (bit 0) or mid-connection decoder; then operations,
/// each a byte `k` and a `u16 n`-byte header block: `k % 4` 0 decodes it as a complete block,
/// 1 as a truncated one, 2 hands fields to a callback, 3 forgets the table first. Each block
/// is also Huffman-decoded on its own. Checks: the table stays within its memory bound; after
/// an error or a truncated block the decoder is unsynced with an empty table; Huffman output
/// is at most 8/5 of its input.
pub fn hpack(input: &[u8]) {
    let mut r = Reader { data: input };
    let synced = r.byte().is_some_and(|c| c & 1 != 0);
    let mut d = HpackDecoder::new(synced);
    let mut scratch = Vec::new();
    while let Some(k) = r.byte() {
        let Some(n) = r.u16() else { break };
        let block = r.take(usize::from(n));
        match k % 4 {
            0 => {
                if let Ok(fields) = d.decode_block(block) {
                    // Each field took at least one byte of the block.
                    assert!(fields.len() <= block.len());
                } else {
                    assert!(!d.is_synced() && d.table_len() == 0);
                }
            }
            1 => {
                let mut n = 0usize;
                d.decode_truncated(block, |_, _| n += 1);
                assert!(n <= block.len());
                assert!(!d.is_synced() && d.table_len() == 0);
            }
            2 => {
                let mut bytes = 0usize;
                let result = d.decode_block_with(block, |name, value| {
                    bytes += name.map_or(0, <[u8]>::len) + value.map_or(0, <[u8]>::len);
                });
                if result.is_err() {
                    assert!(!d.is_synced() && d.table_len() == 0);
                }
            }
            _ => {
                d.mark_unsynced();
                assert!(!d.is_synced() && d.table_len() == 0 && d.table_size() == 0);
                let _ = d.decode_block(block);
            }
        }
        assert!(d.table_size() <= hpack::MAX_HELD_TABLE_SIZE);
        scratch.clear();
        if hpack::huffman_decode(block, &mut scratch).is_ok() {
            assert!(scratch.len() <= block.len() * 8 / 5);
        }
    }
}

// ----- SQL -----

/// The SQL normalizer on any text (invalid UTF-8 replaced): [`sql::normalize`] is idempotent
/// and bounded, [`sql::split_statements`] returns pieces of its input, [`sql::traceparent`] a
/// 55-character value, and nothing panics.
pub fn sql(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let text = text.as_ref();
    let n = sql::normalize(text);
    // `MAX_LEN` bytes, then ` ...` (a character is cut whole, so up to 3 bytes more).
    assert!(
        n.len() <= sql::MAX_LEN + 8,
        "normalized to {} bytes",
        n.len()
    );
    assert_eq!(
        sql::normalize(&n),
        n,
        "normalize is not idempotent on {text:?}"
    );
    let cut = sql::normalize_cut(text);
    assert!(cut.len() <= sql::MAX_LEN + 16, "cut to {} bytes", cut.len());
    let _ = sql::statement_kind(text);
    let range = text.as_bytes().as_ptr_range();
    for stmt in sql::split_statements(text) {
        let _ = sql::statement_kind(stmt);
        let _ = sql::normalize(stmt);
        if !stmt.is_empty() {
            let r = stmt.as_bytes().as_ptr_range();
            assert!(
                range.start <= r.start && r.end <= range.end,
                "a statement that is not part of the text"
            );
        }
    }
    if let Some(tp) = sql::traceparent(text) {
        assert_eq!(tp.len(), 55);
    }
}

// ----- protocol detection -----

/// Protocol detection on any first bytes: consistent with the HTTP/2 preface, and stable
/// under a shorter capture of the same bytes (a protocol detected on the whole is detected on
/// every prefix long enough to tell: 4 bytes, 8 for Postgres' length and code).
pub fn detect(input: &[u8]) {
    let found = detect::detect(input);
    let _ = detect::detect_midstream(input);
    if found == Some(Detected::Http2) {
        assert!(http2::starts_with_preface(input));
    }
    if input.len() >= 4 && http2::starts_with_preface(input) {
        assert_eq!(found, Some(Detected::Http2));
    }
    if let Some(d) = found {
        let least = if d == Detected::Postgres { 8 } else { 4 };
        for cut in [4usize, 8, 9, 16, 24] {
            if let Some(short) = input.get(..cut)
                && cut >= least
            {
                assert_eq!(detect::detect(short), found, "on the first {cut} bytes");
            }
        }
    }
}

// ----- TCP reassembly -----

/// The byte at sequence number `seq` of the stream a consistent script sends.
fn stream_byte(seq: u32) -> u8 {
    (seq.wrapping_mul(0x9E37_79B9) >> 24) as u8
}

/// TCP reassembly of one direction. The first byte: bit 0 sends *consistent* segments (their
/// bytes are a function of their sequence numbers, so every retransmission agrees), else
/// captured bytes come from the input; bits 1-2 choose small buffer limits. Then operations,
/// an op byte `k` each:
/// - `k % 8` 0-3: a segment: `u32 seq`, `u16 len`, `u16 captured`, flags (`k & 0x10` SYN,
///   `0x20` FIN, `0x40` RST, `0x80`: `seq` is relative to the last segment's); inconsistent
///   scripts then carry the captured bytes;
/// - 4: `u32 ack` acknowledged; 5: `expire` at a `u16` ms later; 6: give up holes before now;
/// - 7: finish (the script ends).
///
/// Checks: pieces have no more captured bytes than their length; the stream delivered (data
/// and gaps) never holds more data bytes than were pushed, nor more captured bytes than were
/// captured, and never more than the buffer limits; on consistent scripts every delivered byte
/// is the byte at its sequence number.
pub fn tcp(input: &[u8]) {
    let mut r = Reader { data: input };
    let config = r.byte().unwrap_or(0);
    let consistent = config & 1 != 0;
    let limits = match (config >> 1) & 3 {
        0 => Limits::default(),
        n => Limits {
            max_segments: usize::from(n) * 2,
            max_bytes: usize::from(n) * 64,
            hole_timeout_ns: 1_000_000 * u64::from(n),
        },
    };
    let mut re = Reassembler::new(limits.clone());
    let mut check = Delivered {
        consistent,
        ..Delivered::default()
    };
    let mut ts = 0u64;
    let mut last_seq = 0u32;
    let mut started = false;
    let mut bytes = Vec::new();
    while let Some(k) = r.byte() {
        ts += 1_000_000;
        match k % 8 {
            0..=3 => {
                let (Some(seq), Some(len), Some(cap)) = (r.u32(), r.u16(), r.u16()) else {
                    break;
                };
                let seq = if k & 0x80 != 0 {
                    last_seq.wrapping_add(seq)
                } else {
                    seq
                };
                last_seq = seq;
                let (syn, fin, rst) = (k & 0x10 != 0, k & 0x20 != 0, k & 0x40 != 0);
                // Captures are at most a few segments' worth (as the kernel's are): longer
                // ones only slow the runs.
                let captured = usize::from(cap.min(len)).min(4096);
                let data_seq = if syn { seq.wrapping_add(1) } else { seq };
                bytes.clear();
                if consistent {
                    bytes.extend(
                        (0..captured as u32).map(|i| stream_byte(data_seq.wrapping_add(i))),
                    );
                } else {
                    bytes.extend_from_slice(r.take(captured));
                }
                // Where the stream starts, as `Reassembler` documents it.
                if !started && !rst && (syn || len > 0) {
                    started = true;
                    check.start = data_seq;
                }
                check.pushed_len += u64::from(len);
                check.pushed_captured += bytes.len() as u64;
                let seg = Segment {
                    seq,
                    len: u32::from(len),
                    prefix: &bytes,
                    ts,
                    syn,
                    fin,
                    rst,
                };
                re.push(&seg, &mut |p| check.piece(p));
                if rst && !started {
                    // Closed before it started: nothing can come.
                    started = true;
                }
            }
            4 => {
                let Some(ack) = r.u32() else { break };
                if !started {
                    started = true;
                    check.start = ack;
                }
                re.acknowledged(ack, &mut |p| check.piece(p));
            }
            5 => {
                let Some(ms) = r.u16() else { break };
                re.expire(ts + u64::from(ms) * 1_000_000, &mut |p| check.piece(p));
            }
            6 => re.give_up_holes_before(ts, &mut |p| check.piece(p)),
            _ => break,
        }
        assert!(re.buffered_bytes() <= limits.max_bytes.max(1) + usize::from(u16::MAX));
    }
    re.finish(&mut |p| check.piece(p));
    assert_eq!(re.buffered_bytes(), 0);
    assert!(
        check.data_len <= check.pushed_len,
        "delivered {} data bytes of {} pushed",
        check.data_len,
        check.pushed_len
    );
    assert!(check.data_captured <= check.pushed_captured);
    let stats = re.stats();
    assert_eq!(stats.gap_bytes, check.gap_bytes);
}

/// What a reassembler delivered.
#[derive(Debug, Default)]
struct Delivered {
    consistent: bool,
    /// Sequence number of the stream's first byte.
    start: u32,
    /// Stream offset of the next byte (data and gaps).
    offset: u64,
    data_len: u64,
    data_captured: u64,
    gap_bytes: u64,
    pushed_len: u64,
    pushed_captured: u64,
}

impl Delivered {
    fn piece(&mut self, p: Piece<'_>) {
        match p {
            Piece::Data { len, prefix, .. } => {
                assert!(
                    prefix.len() as u64 <= len,
                    "{} captured of {len}",
                    prefix.len()
                );
                if self.consistent {
                    for (i, &b) in prefix.iter().enumerate() {
                        let seq = self.start.wrapping_add((self.offset + i as u64) as u32);
                        assert_eq!(
                            b,
                            stream_byte(seq),
                            "byte at stream offset {} is not the stream's",
                            self.offset + i as u64
                        );
                    }
                }
                self.offset += len;
                self.data_len += len;
                self.data_captured += prefix.len() as u64;
            }
            Piece::Gap { bytes } => {
                let n = bytes.unwrap_or(0);
                self.offset += n;
                self.gap_bytes += n;
            }
        }
    }
}

/// A harness: input bytes in, a panic on a broken invariant.
pub type Harness = fn(&[u8]);

/// The harness of each fuzz target, by target name: what the corpus replay test runs.
pub const TARGETS: [(&str, Harness); 7] = [
    ("http1", http1),
    ("http2", http2),
    ("hpack", hpack),
    ("postgres", postgres),
    ("sql", sql),
    ("detect", detect),
    ("tcp", tcp),
];

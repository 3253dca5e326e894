//! Postgres wire protocol (v3) of one connection, seen from the outside: frames both
//! directions, pairs the client's queries with the server's answers, and reports one [`Call`]
//! per executed statement.
//!
//! The framers are our own and never allocate by a length they read: `pgwire` panicked and
//! `postgres-protocol` tried to allocate 4 GB on a few bytes when fuzzed (shared/PROTOCOLS.md).
//! They keep at most a bounded prefix of the few message bodies the pairing reads (query
//! text, names, CommandComplete tags, ErrorResponse fields) and skip every other body, and
//! every byte beyond the captured prefix, by count. Password and SASL messages (`p`) and
//! authentication requests (`R`) are skipped by length: their content is never copied.
//!
//! Pairing follows the server: answers come in request order, an ErrorResponse makes the
//! server skip to the next Sync, one ReadyForQuery ends each Sync (or simple Query). Requests
//! queue as [`Item`]s; each answer message is matched against the front item. One call per
//! executed statement: per Execute, and per statement of a simple Query (a multi-statement
//! `Q` gives one call per statement). Parse/Bind/Describe messages and their answers count
//! into the call of the Execute they lead to; a Sync and its ReadyForQuery into the last call
//! of their group.
//!
//! When bytes are missing (captured prefix shorter than the segment, a gap, an attach in the
//! middle of the connection), the decoder finds message boundaries again by plausibility and
//! by request/response turn-taking, and says through [`Anomaly`] and the `decoded` attribute
//! what it could not read.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use super::call::{Call, Decoder};
use super::exchange::Anomaly;
use super::http1::{DesyncReason, Side};
use super::sql;

/// Largest message the server accepts (`PQ_LARGE_MESSAGE_LIMIT`, 1 GiB): any longer length is
/// not Postgres.
const MAX_MESSAGE: u32 = 1 << 30;
/// Query text kept per Q/P message; the normalized path is at most [`sql::MAX_LEN`] anyway.
const MAX_SQL: usize = 8 * 1024;
/// Startup packet bytes kept (the server itself refuses more than 10000).
const MAX_STARTUP: usize = 8 * 1024;
/// Items waiting for an answer; more means the server is not answering what we think.
const MAX_QUEUE: usize = 4096;
/// Prepared statements remembered per connection (pgx caches 512 by default).
const MAX_STATEMENTS: usize = 512;
/// Bytes of remembered statement paths and names per connection.
const MAX_STATEMENT_BYTES: usize = 256 * 1024;
/// Named portals remembered (cursors; most clients use only the unnamed one).
const MAX_PORTALS: usize = 64;
/// Longest error message kept in `Call::error`.
const MAX_ERROR_TEXT: usize = 256;
/// Longest statement or portal name shown in a path.
const MAX_NAME: usize = 64;
/// Consecutive plausible headers that prove a boundary even before the capture ends.
const CHAIN_PROOF: usize = 8;
/// Path of a statement whose text was never captured.
pub const UNKNOWN_STATEMENT: &str = "/* statement not captured */";

const CANCEL_REQUEST: u32 = 80_877_102;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

/// Lengths (the 4-byte field, which counts itself) a message with this tag can have on this
/// side, or `None` for a tag that side never sends. Tags `C D E H S d c` mean different things
/// per direction. Limits follow the server: small frontend messages are capped at 10000 bytes
/// (`PQ_SMALL_MESSAGE_LIMIT`).
fn length_range(side: Side, tag: u8) -> Option<(u32, u32)> {
    const SMALL: u32 = 10_000;
    const BIG: u32 = MAX_MESSAGE;
    Some(match side {
        Side::Request => match tag {
            b'Q' => (5, BIG),
            b'P' => (8, BIG),
            b'B' => (12, BIG),
            b'D' => (6, SMALL),
            b'E' => (9, SMALL),
            b'C' => (6, SMALL),
            b'S' | b'H' | b'X' | b'c' => (4, 4),
            b'F' => (14, BIG),
            b'd' => (4, BIG),
            b'f' => (5, SMALL),
            b'p' => (4, 1 << 20),
            _ => return None,
        },
        Side::Response => match tag {
            b'R' => (8, 1 << 20),
            b'K' => (12, 264),
            b'S' => (6, 1 << 20),
            b'Z' => (5, 5),
            b'1' | b'2' | b'3' | b'n' | b'I' | b's' | b'c' => (4, 4),
            b'C' => (5, 1024),
            b'D' | b'T' | b't' => (6, BIG),
            b'E' | b'N' => (5, 16 << 20),
            b'A' => (10, 1 << 20),
            b'G' | b'H' | b'W' => (7, 1 << 16),
            b'd' => (4, BIG),
            b'V' => (8, BIG),
            b'v' => (12, 1 << 16),
            _ => return None,
        },
    })
}

/// Body bytes of a message the pairing reads; all others are skipped unread.
fn keep_for(side: Side, tag: u8) -> usize {
    match (side, tag) {
        (Side::Request, b'Q') => MAX_SQL,
        (Side::Request, b'P') => MAX_SQL + 2 * MAX_NAME,
        (Side::Request, b'B' | b'E' | b'C' | b'D') => 4 * MAX_NAME,
        (Side::Request, b'F') => 4,
        (Side::Response, b'C') => 128,
        (Side::Response, b'E') => 2048,
        (Side::Response, b'Z') => 1,
        _ => 0,
    }
}

/// Whether a header (and what is captured of its body) looks like a real message: used only
/// while looking for a boundary, where a false match misframes the stream.
fn plausible(side: Side, tag: u8, len: u32, body: &[u8]) -> bool {
    let Some((min, max)) = length_range(side, tag) else {
        return false;
    };
    if len < min || len > max {
        return false;
    }
    let first = body.first().copied();
    match (side, tag) {
        (Side::Response, b'Z') => first.is_none_or(|c| matches!(c, b'I' | b'T' | b'E')),
        (Side::Response, b'C') => first.is_none_or(|c| c.is_ascii_uppercase()),
        (Side::Response, b'E' | b'N') => first.is_none_or(|c| c.is_ascii_alphabetic()),
        (Side::Response, b'D') => body.len() < 2 || u16::from_be_bytes([body[0], body[1]]) <= 1664,
        (Side::Request, b'D' | b'C') => first.is_none_or(|c| matches!(c, b'S' | b'P')),
        _ => true,
    }
}

/// Framer state of one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FState {
    /// Start of the request side: untagged messages (length, then a code).
    Startup,
    /// At a message header (`hdr_len` bytes of it buffered).
    Header,
    /// Inside a message body.
    Body,
    /// The server's one-byte answer to SSLRequest/GSSENCRequest comes next.
    AnswerByte,
    /// Framing lost: looking for a plausible header.
    Scan,
    /// Nothing more is readable (TLS or GSS encryption, or a CancelRequest connection).
    Stopped,
}

/// Splits one direction into messages. Bodies beyond `keep` bytes and uncaptured bytes are
/// skipped by count, so exact sizes survive short captures.
#[derive(Debug)]
struct Framer {
    side: Side,
    state: FState,
    hdr: [u8; 8],
    hdr_len: usize,
    /// Tag of the current message; 0 for the untagged messages of the startup phase.
    tag: u8,
    /// Code of an untagged message (protocol version or request code).
    code: u32,
    body_len: u64,
    remaining: u64,
    keep: usize,
    /// Kept body bytes of a message that spans segments.
    buf: Vec<u8>,
    /// Kept body bytes fell into uncaptured bytes.
    cut: bool,
    start_ts: u64,
}

/// One message: its exact size and what was captured of the part of its body that matters.
#[derive(Debug)]
struct Msg<'a> {
    tag: u8,
    code: u32,
    /// All its bytes (tag, length, body), exact even when not captured.
    size: u64,
    /// The captured part of the first `keep_for` body bytes (a text cut by the capture or by
    /// `keep_for` lacks its NUL).
    body: &'a [u8],
    start_ts: u64,
    end_ts: u64,
}

/// What a framer reports.
#[derive(Debug)]
enum Ev<'a> {
    Msg(Msg<'a>),
    /// The server's one-byte answer to SSLRequest or GSSENCRequest.
    Answer(u8),
    /// Framing lost at `ts`; `bytes` (exact) from there to the end of the segment are unframed.
    Lost {
        reason: DesyncReason,
        bytes: u64,
        ts: u64,
    },
    /// Bytes passed over while looking for a boundary.
    Skipped {
        bytes: u64,
        ts: u64,
    },
    /// The request side starts with a TLS handshake (direct SSL): nothing to read.
    Encrypted,
}

impl Framer {
    fn new(side: Side, state: FState) -> Self {
        Self {
            side,
            state,
            hdr: [0; 8],
            hdr_len: 0,
            tag: 0,
            code: 0,
            body_len: 0,
            remaining: 0,
            keep: 0,
            buf: Vec::new(),
            cut: false,
            start_ts: 0,
        }
    }

    /// Forget framing: the next bytes are searched for a boundary.
    fn lose(&mut self) {
        if self.state != FState::Stopped {
            self.state = FState::Scan;
            self.hdr_len = 0;
            self.buf.clear();
        }
    }

    /// Trust that the next segment starts at a message boundary.
    fn at_boundary(&mut self) {
        if self.state != FState::Stopped {
            self.state = FState::Header;
            self.hdr_len = 0;
            self.buf.clear();
        }
    }

    /// State after a message ends.
    fn next_state(&self) -> FState {
        if self.tag != 0 {
            return FState::Header;
        }
        match self.code {
            SSL_REQUEST | GSSENC_REQUEST => FState::Startup,
            CANCEL_REQUEST => FState::Stopped,
            _ => FState::Header,
        }
    }

    /// Feeds one segment: `data` is what was captured of `len` bytes.
    fn feed(&mut self, ts: u64, data: &[u8], len: u64, sink: &mut dyn FnMut(Ev<'_>)) {
        let len = len.max(data.len() as u64);
        let mut i = 0usize;
        while i < data.len() {
            match self.state {
                FState::Stopped => return,
                FState::Scan => match self.find_boundary(data, i, len) {
                    Some(p) => {
                        if p > i {
                            sink(Ev::Skipped {
                                bytes: (p - i) as u64,
                                ts,
                            });
                        }
                        self.state = FState::Header;
                        self.hdr_len = 0;
                        i = p;
                    }
                    None => {
                        sink(Ev::Skipped {
                            bytes: len - i as u64,
                            ts,
                        });
                        return;
                    }
                },
                FState::AnswerByte => match data[i] {
                    b @ (b'S' | b'G') => {
                        self.state = FState::Stopped;
                        sink(Ev::Answer(b));
                        return;
                    }
                    b'N' => {
                        i += 1;
                        self.state = FState::Header;
                        sink(Ev::Answer(b'N'));
                    }
                    // Not an answer byte (an old server's ErrorResponse): a tagged message.
                    _ => self.state = FState::Header,
                },
                FState::Startup => {
                    if self.hdr_len == 0 {
                        self.start_ts = ts;
                        match data[i] {
                            0 => {}
                            // A TLS handshake record: direct SSL negotiation.
                            0x16 => {
                                self.state = FState::Stopped;
                                sink(Ev::Encrypted);
                                return;
                            }
                            // A tagged message: the startup happened before we looked.
                            _ => {
                                self.state = FState::Header;
                                continue;
                            }
                        }
                    }
                    let take = (8 - self.hdr_len).min(data.len() - i);
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[i..i + take]);
                    self.hdr_len += take;
                    i += take;
                    if self.hdr_len < 8 {
                        continue;
                    }
                    let n =
                        u32::from_be_bytes([self.hdr[0], self.hdr[1], self.hdr[2], self.hdr[3]]);
                    let code =
                        u32::from_be_bytes([self.hdr[4], self.hdr[5], self.hdr[6], self.hdr[7]]);
                    let ok = match code {
                        SSL_REQUEST | GSSENC_REQUEST => n == 8,
                        CANCEL_REQUEST => (16..=264).contains(&n),
                        c if c >> 16 == 3 => (8..=10_000).contains(&n),
                        _ => false,
                    };
                    if !ok {
                        self.lose();
                        sink(Ev::Lost {
                            reason: DesyncReason::Malformed,
                            bytes: 0,
                            ts,
                        });
                        continue;
                    }
                    self.tag = 0;
                    self.code = code;
                    let keep = if code >> 16 == 3 { MAX_STARTUP } else { 0 };
                    if let Some(used) =
                        self.begin_body(ts, u64::from(n) - 8, keep, &data[i..], sink)
                    {
                        i += used;
                    } else {
                        i = data.len();
                    }
                }
                FState::Header => {
                    if self.hdr_len == 0 {
                        self.start_ts = ts;
                    }
                    let take = (5 - self.hdr_len).min(data.len() - i);
                    self.hdr[self.hdr_len..self.hdr_len + take].copy_from_slice(&data[i..i + take]);
                    self.hdr_len += take;
                    i += take;
                    if self.hdr_len < 5 {
                        continue;
                    }
                    let tag = self.hdr[0];
                    let n =
                        u32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]);
                    let valid = length_range(self.side, tag)
                        .is_some_and(|(min, max)| (min..=max).contains(&n));
                    if !valid {
                        // Not a message (pairing is given up, so no byte count matters):
                        // look for one from the byte after this bad tag.
                        self.lose();
                        sink(Ev::Lost {
                            reason: DesyncReason::Malformed,
                            bytes: 0,
                            ts,
                        });
                        i = if i >= 5 { i - 4 } else { i - take };
                        continue;
                    }
                    self.tag = tag;
                    self.code = 0;
                    let keep = keep_for(self.side, tag);
                    if let Some(used) =
                        self.begin_body(ts, u64::from(n) - 4, keep, &data[i..], sink)
                    {
                        i += used;
                    } else {
                        i = data.len();
                    }
                }
                FState::Body => {
                    let avail = data.len() - i;
                    let take = usize::try_from(self.remaining).map_or(avail, |r| r.min(avail));
                    let want = self.keep.min(self.body_len as usize);
                    if self.buf.len() < want && !self.cut {
                        let n = (want - self.buf.len()).min(take);
                        self.buf.extend_from_slice(&data[i..i + n]);
                    }
                    self.remaining -= take as u64;
                    i += take;
                    if self.remaining == 0 {
                        self.end_buffered(ts, sink);
                    }
                }
            }
        }
        let mut gap = len - data.len() as u64;
        if gap == 0 {
            return;
        }
        match self.state {
            FState::Stopped => {}
            FState::Scan => sink(Ev::Skipped { bytes: gap, ts }),
            FState::Body => {
                let take = self.remaining.min(gap);
                self.remaining -= take;
                gap -= take;
                if (self.buf.len() as u64) < (self.keep as u64).min(self.body_len) {
                    self.cut = true;
                }
                if self.remaining == 0 {
                    self.end_buffered(ts, sink);
                }
                if gap > 0 && self.state != FState::Stopped {
                    // The next header was not captured.
                    self.lose();
                    sink(Ev::Lost {
                        reason: DesyncReason::HeadTruncated,
                        bytes: gap,
                        ts,
                    });
                }
            }
            FState::Header | FState::Startup | FState::AnswerByte => {
                let bytes = gap + self.hdr_len as u64;
                self.lose();
                sink(Ev::Lost {
                    reason: DesyncReason::HeadTruncated,
                    bytes,
                    ts,
                });
            }
        }
    }

    /// A header was read and its body starts at `rest[0]`: emits the message at once when
    /// the whole body is in `rest` (no copy), else starts buffering. Returns the bytes of
    /// `rest` used, or `None` when all of them were.
    fn begin_body(
        &mut self,
        ts: u64,
        body_len: u64,
        keep: usize,
        rest: &[u8],
        sink: &mut dyn FnMut(Ev<'_>),
    ) -> Option<usize> {
        self.hdr_len = 0;
        self.body_len = body_len;
        self.keep = keep;
        self.cut = false;
        if (rest.len() as u64) >= body_len {
            let n = body_len as usize;
            let kept = &rest[..keep.min(n)];
            let size = body_len + if self.tag == 0 { 4 } else { 5 };
            self.state = self.next_state();
            sink(Ev::Msg(Msg {
                tag: self.tag,
                code: self.code,
                size,
                body: kept,
                start_ts: self.start_ts,
                end_ts: ts,
            }));
            return Some(n);
        }
        self.buf.clear();
        let want = keep.min(body_len as usize);
        self.buf.extend_from_slice(&rest[..want.min(rest.len())]);
        self.remaining = body_len - rest.len() as u64;
        self.state = FState::Body;
        None
    }

    /// The last byte of a buffered message was passed.
    fn end_buffered(&mut self, ts: u64, sink: &mut dyn FnMut(Ev<'_>)) {
        let size = self.body_len + if self.tag == 0 { 4 } else { 5 };
        self.state = self.next_state();
        sink(Ev::Msg(Msg {
            tag: self.tag,
            code: self.code,
            size,
            body: &self.buf,
            start_ts: self.start_ts,
            end_ts: ts,
        }));
        self.buf.clear();
        self.cut = false;
    }

    /// First offset at or after `from` where a plausible chain of headers starts. At the
    /// start of a segment (where writes usually start messages) one plausible header is
    /// enough; inside one, two in a row are needed. A chain must stay plausible up to the end
    /// of the capture, or for [`CHAIN_PROOF`] headers.
    fn find_boundary(&self, data: &[u8], from: usize, len: u64) -> Option<usize> {
        (from..data.len()).find(|&p| {
            let need = if p == 0 { 1 } else { 2 };
            self.chain(data, p, len) >= need
        })
    }

    /// How many consecutive plausible headers start at `p` (0 when the chain breaks).
    fn chain(&self, data: &[u8], mut p: usize, len: u64) -> usize {
        let mut count = 0;
        loop {
            if p == data.len() {
                return count;
            }
            let avail = &data[p..];
            if avail.len() < 5 {
                // A header cut by the capture: its tag and length bytes so far must fit.
                let tag_ok = length_range(self.side, avail[0]).is_some();
                let len_ok = avail.get(1).is_none_or(|&b| b <= 0x40);
                return if tag_ok && len_ok && count > 0 {
                    count
                } else {
                    0
                };
            }
            let n = u32::from_be_bytes([avail[1], avail[2], avail[3], avail[4]]);
            if !plausible(self.side, avail[0], n, &avail[5..]) {
                return 0;
            }
            count += 1;
            if count >= CHAIN_PROOF {
                return count;
            }
            let end = p as u64 + 1 + u64::from(n);
            if end > len {
                // Runs past this segment: continues in the next one.
                return count;
            }
            if end >= data.len() as u64 {
                return count;
            }
            p = end as usize;
        }
    }
}

/// A statement as a path: shared by the statement map, portals and queued calls.
#[derive(Clone, Debug)]
struct Stmt {
    path: Arc<str>,
    /// The path is the statement's text (not a stand-in for one never seen).
    known: bool,
    /// From a sqlcommenter comment in the text.
    traceparent: Option<Arc<str>>,
}

impl Stmt {
    fn unknown(path: String) -> Self {
        Self {
            path: path.into(),
            known: false,
            traceparent: None,
        }
    }

    fn from_sql(text: &str, cut: bool) -> Self {
        let path = if cut {
            sql::normalize_cut(text)
        } else {
            sql::normalize(text)
        };
        Self {
            path: path.into(),
            known: true,
            traceparent: sql::traceparent(text).map(Arc::from),
        }
    }
}

/// A simple Query (or a FunctionCall): its statements run in order, then one ReadyForQuery.
#[derive(Debug)]
struct Query {
    stmts: Vec<Stmt>,
    /// Index of the statement the next answer belongs to.
    next: usize,
}

/// A request waiting for its answer, in the order the server answers.
#[derive(Debug)]
struct Item {
    kind: ItemKind,
    /// First byte of its message.
    ts: u64,
    /// Its bytes not yet counted into a call (CopyData and Flush add to the last item).
    req_bytes: u64,
}

#[derive(Debug)]
enum ItemKind {
    /// StartupMessage: answered by authentication, parameters, then ReadyForQuery.
    Startup,
    /// SSLRequest or GSSENCRequest: answered by one byte.
    Answer,
    Parse(Stmt),
    Bind(Stmt),
    /// Describe of a statement (answered by ParameterDescription first) or of a portal.
    Describe,
    Close,
    Execute(Stmt),
    Query(Query),
    Sync,
    /// Request bytes whose messages were not captured: inferred from the answers, assumed to
    /// end with one Sync (one write per Sync group, as clients do). Holds the statement the
    /// last captured Parse or Bind named.
    Blind(Option<Stmt>),
    /// The client ended a COPY IN (CopyDone/CopyFail), for Syncs the server ignores.
    CopyMark,
}

impl Item {
    /// Ends a group: answered by ReadyForQuery.
    fn ender(&self) -> bool {
        matches!(
            self.kind,
            ItemKind::Startup | ItemKind::Sync | ItemKind::Query(_) | ItemKind::Blind(_)
        )
    }

    /// Gives calls.
    fn call(&self) -> bool {
        matches!(
            self.kind,
            ItemKind::Execute(_) | ItemKind::Query(_) | ItemKind::Blind(_)
        )
    }

    /// Calls still to come from this item.
    fn calls(&self) -> usize {
        match &self.kind {
            ItemKind::Execute(_) => 1,
            ItemKind::Query(q) => q.stmts.len().saturating_sub(q.next),
            ItemKind::Blind(_) => 1,
            _ => 0,
        }
    }
}

/// What answered non-call items before their call exists: counted into the next call.
#[derive(Debug, Default)]
struct Acc {
    start_ts: Option<u64>,
    req_bytes: u64,
    resp_bytes: u64,
}

/// A call whose answer is coming in.
#[derive(Debug)]
struct Building {
    stmt: Stmt,
    start_ts: u64,
    req_bytes: u64,
    resp_bytes: u64,
    end_ts: u64,
    data_rows: u64,
}

/// How a call ended.
enum Outcome<'a> {
    /// CommandComplete with its tag.
    Complete(&'a [u8]),
    /// EmptyQueryResponse.
    Empty,
    /// PortalSuspended: the row limit of the Execute was reached.
    Suspended,
    /// ErrorResponse fields.
    Error(&'a [u8]),
    /// Its answer fell into uncaptured bytes.
    Unknown,
    /// The connection ended first.
    Closed(&'static str),
}

/// A prepared statement and when it was last used (for eviction).
#[derive(Debug)]
struct Entry {
    stmt: Stmt,
    used: u64,
    /// Raw text hash, to reuse the normalization when the same text is parsed again.
    raw: u64,
    /// The exact text (when it was captured whole), for a capture's replay of a session
    /// prepared before the capture.
    sql: Option<Box<str>>,
}

/// Session state kept for captures: startup parameters and `SET`s (at most this many each).
const MAX_SESSION_ITEMS: usize = 32;

/// Bytes an entry counts against `MAX_STATEMENT_BYTES`.
fn entry_bytes(e: &Entry, name: &[u8]) -> usize {
    e.stmt.path.len() + name.len() + e.sql.as_ref().map_or(0, |s| s.len())
}

/// A session-level `SET` (not `SET LOCAL`, which ends with its transaction, nor `SET
/// TRANSACTION`).
fn session_set(sql: &str) -> bool {
    // Per statement of every simple query: no allocation.
    let mut words = sql.split_ascii_whitespace();
    words.next().is_some_and(|w| w.eq_ignore_ascii_case("SET"))
        && !words.next().is_some_and(|w| {
            w.eq_ignore_ascii_case("LOCAL") || w.eq_ignore_ascii_case("TRANSACTION")
        })
}

/// Pairing state (everything but the two framers).
#[derive(Debug, Default)]
struct Pairing {
    queue: VecDeque<Item>,
    /// Enders in `queue`.
    enders: usize,
    statements: HashMap<Box<[u8]>, Entry>,
    statement_bytes: usize,
    uses: u64,
    portals: HashMap<Box<[u8]>, Stmt>,
    /// Statement the last Parse or Bind of the group being sent named (for [`ItemKind::Blind`]).
    group_stmt: Option<Stmt>,
    acc: Acc,
    cur: Option<Building>,
    /// A finished call that may still take the rest of its group (Sync, ReadyForQuery).
    tail: Option<Call>,
    /// Finished calls not handed out yet (completed where no output vector was at hand).
    ready: Vec<Call>,
    /// After an ErrorResponse: the server skips to the next Sync; `tail` holds the error.
    skipping: bool,
    /// Requests and answers are framed but not paired, until turn-taking lines them up.
    unpaired: bool,
    midstream: bool,
    /// The client was seen sending while an earlier group was unanswered.
    pipelined: bool,
    /// Response framing was lost inside the front group's answer.
    resp_lost: bool,
    /// Answers may be missing (lost in uncaptured bytes): skip forward instead of desyncing.
    lenient: bool,
    /// A response message was framed since pairing stopped.
    resp_seen: bool,
    /// The last framed response message was ReadyForQuery (the server is idle).
    last_z: bool,
    resp_last_ts: u64,
    /// The server is in COPY IN: it ignores Sync and Flush until CopyDone/CopyFail.
    copy_in: bool,
    encrypted: bool,
    statements_dropped: bool,
    user: Option<String>,
    database: Option<String>,
    /// Startup parameters other than user and database (application_name, options, ...).
    params: Vec<(String, String)>,
    /// Session-level `SET`s, in order (a replay of a session open before a capture runs them
    /// first).
    sets: Vec<String>,
}

/// Postgres state of one connection.
#[derive(Debug)]
pub struct PostgresExchange {
    req: Framer,
    resp: Framer,
    st: Pairing,
}

impl PostgresExchange {
    /// `midstream`: the connection was already open when the probe attached, so its start
    /// (startup, prepared statements) was not seen and boundaries must be found.
    pub fn new(midstream: bool) -> Self {
        let (req, resp) = if midstream {
            (FState::Scan, FState::Scan)
        } else {
            (FState::Startup, FState::Header)
        };
        Self {
            req: Framer::new(Side::Request, req),
            resp: Framer::new(Side::Response, resp),
            st: Pairing {
                unpaired: midstream,
                midstream,
                ..Pairing::default()
            },
        }
    }

    /// The connection switched to TLS or GSS encryption (or started with a TLS handshake):
    /// nothing more is decoded.
    pub fn encrypted(&self) -> bool {
        self.st.encrypted
    }

    /// User and database from the StartupMessage, when it was seen.
    pub fn user_database(&self) -> (Option<&str>, Option<&str>) {
        (self.st.user.as_deref(), self.st.database.as_deref())
    }
}

impl Decoder for PostgresExchange {
    fn on_bytes(
        &mut self,
        side: Side,
        ts: u64,
        prefix: &[u8],
        len: u64,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let Self { req, resp, st } = self;
        done.append(&mut st.ready);
        match side {
            Side::Request => req.feed(ts, prefix, len, &mut |ev| {
                st.frontend(ev, resp, done, anomalies);
            }),
            Side::Response => resp.feed(ts, prefix, len, &mut |ev| {
                st.backend(ev, req, done, anomalies);
            }),
        }
    }

    /// Bytes of one side are missing: that side looks for its next boundary, and nothing in
    /// flight can be paired any more (how many answers or requests the gap held is unknown).
    fn gap(&mut self, side: Side, anomalies: &mut Vec<Anomaly>) {
        match side {
            Side::Request => self.req.lose(),
            Side::Response => self.resp.lose(),
        }
        if self.st.encrypted {
            return;
        }
        if side == Side::Request {
            // Parse messages may have been in the gap.
            self.st.statements_dropped = true;
        }
        let mut ready = std::mem::take(&mut self.st.ready);
        self.st
            .drop_all(side, DesyncReason::EventsLost, &mut ready, anomalies);
        self.st.ready = ready;
    }

    fn close(&mut self, reset: bool, done: &mut Vec<Call>) -> Vec<Call> {
        let st = &mut self.st;
        done.append(&mut st.ready);
        st.flush_tail(done);
        let why = if reset {
            "connection reset"
        } else {
            "connection closed before the answer"
        };
        let mut out = Vec::new();
        if let Some(mut b) = st.cur.take() {
            // The call being answered: its item is the front one.
            if let Some(front) = st.queue.front_mut() {
                b.req_bytes += std::mem::take(&mut front.req_bytes);
                if let ItemKind::Query(q) = &mut front.kind {
                    q.next += 1;
                } else {
                    st.queue.pop_front();
                }
            }
            out.push(st.finish(b, Outcome::Closed(why)));
        }
        while let Some(item) = st.queue.pop_front() {
            let stmts: Vec<Stmt> = match item.kind {
                ItemKind::Execute(s) => vec![s],
                ItemKind::Query(q) => q.stmts.into_iter().skip(q.next).collect(),
                ItemKind::Blind(s) => {
                    vec![s.unwrap_or_else(|| Stmt::unknown(UNKNOWN_STATEMENT.into()))]
                }
                _ => {
                    st.acc.start_ts.get_or_insert(item.ts);
                    st.acc.req_bytes += item.req_bytes;
                    continue;
                }
            };
            let mut req_bytes = item.req_bytes + std::mem::take(&mut st.acc.req_bytes);
            let start_ts = st.acc.start_ts.take().unwrap_or(item.ts);
            for stmt in stmts {
                let b = Building {
                    stmt,
                    start_ts,
                    req_bytes: std::mem::take(&mut req_bytes),
                    resp_bytes: std::mem::take(&mut st.acc.resp_bytes),
                    end_ts: 0,
                    data_rows: 0,
                };
                out.push(st.finish(b, Outcome::Closed(why)));
            }
        }
        st.enders = 0;
        st.acc = Acc::default();
        out
    }

    fn session_state(&self) -> Vec<(String, String)> {
        let st = &self.st;
        let mut out = Vec::new();
        if let Some(u) = &st.user {
            out.push(("pg.user".into(), u.clone()));
        }
        if let Some(d) = &st.database {
            out.push(("pg.database".into(), d.clone()));
        }
        for (k, v) in &st.params {
            out.push((format!("pg.param.{k}"), v.clone()));
        }
        for (i, set) in st.sets.iter().enumerate() {
            out.push((format!("pg.set.{i:02}"), set.clone()));
        }
        for (name, e) in &st.statements {
            if let Some(sql) = &e.sql
                && !name.is_empty()
            {
                out.push((
                    format!("pg.statement.{}", String::from_utf8_lossy(name)),
                    sql.to_string(),
                ));
            }
        }
        out
    }

    fn in_flight(&self) -> usize {
        self.st
            .queue
            .iter()
            .filter(|i| i.call())
            .map(Item::calls)
            .sum()
    }
}

/// The NUL-terminated string at the start of `b`, and what follows it (None when `b` holds no
/// NUL: the string was cut).
fn cstr(b: &[u8]) -> (&[u8], Option<&[u8]>) {
    match b.iter().position(|&c| c == 0) {
        Some(n) => (&b[..n], Some(&b[n + 1..])),
        None => (b, None),
    }
}

/// Text of captured bytes; a UTF-8 sequence cut at the end of a cut text is dropped.
fn text(raw: &[u8], cut: bool) -> std::borrow::Cow<'_, str> {
    match std::str::from_utf8(raw) {
        Ok(s) => s.into(),
        Err(e) if cut && e.error_len().is_none() => {
            String::from_utf8_lossy(&raw[..e.valid_up_to()])
        }
        Err(_) => String::from_utf8_lossy(raw),
    }
}

/// A statement or portal name for a path.
fn shown_name(name: &[u8]) -> String {
    if name.is_empty() {
        return "<unnamed>".into();
    }
    let mut s: String = String::from_utf8_lossy(&name[..name.len().min(MAX_NAME)])
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    if name.len() > MAX_NAME {
        s.push('…');
    }
    s
}

fn hash(b: &[u8]) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut h = DefaultHasher::new();
    h.write(b);
    h.finish()
}

/// Row count from a CommandComplete tag (`INSERT 0 5`, `UPDATE 3`, `SELECT 10`, `COPY 7`).
fn tag_rows(tag: &[u8]) -> Option<u64> {
    let tag = std::str::from_utf8(cstr(tag).0).ok()?;
    let mut words = tag.split(' ');
    let verb = words.next()?;
    if !matches!(
        verb,
        "INSERT" | "DELETE" | "UPDATE" | "SELECT" | "MERGE" | "MOVE" | "FETCH" | "COPY"
    ) {
        return None;
    }
    words.next_back()?.parse().ok()
}

/// SQLSTATE and message of ErrorResponse fields.
fn error_fields(body: &[u8]) -> (String, String) {
    let (mut code, mut message) = (String::new(), String::new());
    let mut rest = body;
    while let Some((&kind, after)) = rest.split_first() {
        if kind == 0 {
            break;
        }
        let (value, next) = cstr(after);
        match kind {
            b'C' => code = String::from_utf8_lossy(&value[..value.len().min(5)]).into_owned(),
            b'M' => {
                let m = text(value, next.is_none());
                message = m.chars().take(MAX_ERROR_TEXT).collect();
            }
            _ => {}
        }
        match next {
            Some(n) => rest = n,
            None => break,
        }
    }
    (code, message)
}

impl Pairing {
    // ----- request side -----

    fn frontend(
        &mut self,
        ev: Ev<'_>,
        resp: &mut Framer,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        match ev {
            Ev::Msg(m) => self.frontend_msg(m, resp, done, anomalies),
            Ev::Lost {
                reason: DesyncReason::HeadTruncated,
                bytes,
                ts,
            } if !self.unpaired => {
                // Messages beyond the capture: what they were comes from the answers.
                if let Some(Item {
                    kind: ItemKind::Blind(_),
                    req_bytes,
                    ..
                }) = self.queue.back_mut()
                {
                    *req_bytes += bytes;
                    return;
                }
                // The client spoke, if uncaptured: answer bytes lost before now belong to
                // what was sent before (never to this request).
                self.turn(resp, done, anomalies);
                if self.unpaired {
                    return;
                }
                let stmt = self.group_stmt.take();
                anomalies.push(Anomaly::EndedAtTurn(DesyncReason::HeadTruncated));
                self.push(
                    Item {
                        kind: ItemKind::Blind(stmt),
                        ts,
                        req_bytes: bytes,
                    },
                    done,
                    anomalies,
                );
            }
            Ev::Lost { reason, .. } => {
                if !self.unpaired {
                    self.drop_all(Side::Request, reason, done, anomalies);
                }
            }
            Ev::Skipped { bytes, .. } => {
                if let Some(Item {
                    kind: ItemKind::Blind(_),
                    req_bytes,
                    ..
                }) = self.queue.back_mut()
                {
                    *req_bytes += bytes;
                }
            }
            Ev::Encrypted => self.encrypted = true,
            Ev::Answer(_) => {}
        }
    }

    /// Queues a request (unless unpaired); a new request while a group is unanswered means
    /// the client pipelines.
    fn push(&mut self, item: Item, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        if self.unpaired {
            return;
        }
        if self.queue.len() >= MAX_QUEUE {
            self.drop_all(Side::Request, DesyncReason::Malformed, done, anomalies);
            return;
        }
        if self.enders > 0 && !matches!(item.kind, ItemKind::CopyMark) {
            self.pipelined = true;
        }
        if item.ender() {
            self.enders += 1;
        }
        self.queue.push_back(item);
    }

    /// Bytes of a message that gets no answer of its own: part of the last request.
    fn add_to_last(&mut self, bytes: u64) {
        if self.unpaired {
            return;
        }
        if let Some(b) = self.queue.back_mut() {
            b.req_bytes += bytes;
        }
    }

    /// The client speaks: turn-taking tells what the lost answer bytes held.
    fn turn(&mut self, resp: &mut Framer, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        if self.unpaired {
            // Pair again when the server is idle: nothing framed since the loss, or a
            // ReadyForQuery last, or (a client that waits for its answers) framing lost.
            let idle = match resp.state {
                FState::Header => resp.hdr_len == 0 && (!self.resp_seen || self.last_z),
                FState::Scan => !self.pipelined,
                _ => false,
            };
            if idle {
                if let Some(t) = self.tail.take() {
                    done.push(t);
                }
                self.unpaired = false;
                self.resp_lost = false;
                self.lenient = false;
                self.skipping = false;
                resp.at_boundary();
            }
            return;
        }
        if self.resp_lost && resp.state == FState::Scan {
            if self.pipelined {
                self.drop_all(Side::Response, DesyncReason::HeadTruncated, done, anomalies);
                return;
            }
            // The answer ended in the uncaptured bytes before the client spoke again.
            self.end_group_at_turn(done);
            anomalies.push(Anomaly::EndedAtTurn(DesyncReason::HeadTruncated));
            resp.at_boundary();
        }
    }

    fn frontend_msg(
        &mut self,
        m: Msg<'_>,
        resp: &mut Framer,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        if !matches!(m.tag, b'd' | b'c' | b'f' | b'p') {
            self.turn(resp, done, anomalies);
        }
        let item = |kind| Item {
            kind,
            ts: m.start_ts,
            req_bytes: m.size,
        };
        match m.tag {
            0 => match m.code {
                SSL_REQUEST | GSSENC_REQUEST => {
                    resp.state = FState::AnswerByte;
                    self.push(item(ItemKind::Answer), done, anomalies);
                }
                CANCEL_REQUEST => {}
                _ => {
                    self.startup_params(m.body);
                    self.push(item(ItemKind::Startup), done, anomalies);
                }
            },
            b'Q' => {
                let (raw, end) = cstr(m.body);
                let cut = end.is_none();
                let sql = text(raw, cut);
                let stmts = self.query_statements(&sql, cut);
                self.group_stmt = None;
                self.push(
                    item(ItemKind::Query(Query { stmts, next: 0 })),
                    done,
                    anomalies,
                );
            }
            b'F' => {
                let oid = m
                    .body
                    .get(..4)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                let stmts = vec![Stmt {
                    path: format!("FUNCTION {oid}").into(),
                    known: true,
                    traceparent: None,
                }];
                self.push(
                    item(ItemKind::Query(Query { stmts, next: 0 })),
                    done,
                    anomalies,
                );
            }
            b'P' => {
                let (name, rest) = cstr(m.body);
                let (raw, end) = rest.map_or((&[][..], None), cstr);
                let stmt = match rest {
                    None => Stmt::unknown(UNKNOWN_STATEMENT.into()),
                    Some(_) => self.parse_statement(name, raw, end.is_none()),
                };
                self.group_stmt = Some(stmt.clone());
                self.push(item(ItemKind::Parse(stmt)), done, anomalies);
            }
            b'B' => {
                let (portal, rest) = cstr(m.body);
                let stmt = match rest.map(cstr) {
                    Some((name, Some(_))) => self.lookup_statement(name),
                    // Names beyond the capture: most likely the statement just parsed, into
                    // the unnamed portal.
                    _ => self.guess_statement(),
                };
                self.bind_portal(if rest.is_some() { portal } else { b"" }, stmt.clone());
                self.group_stmt = Some(stmt.clone());
                self.push(item(ItemKind::Bind(stmt)), done, anomalies);
            }
            b'E' => {
                let (portal, end) = cstr(m.body);
                let stmt = match (end, self.portals.get(portal)) {
                    (Some(_), Some(s)) => s.clone(),
                    (Some(_), None) => Stmt::unknown(format!(
                        "EXECUTE {} /* portal bound before attach */",
                        shown_name(portal)
                    )),
                    (None, _) => self.guess_statement(),
                };
                self.push(item(ItemKind::Execute(stmt)), done, anomalies);
            }
            b'D' => self.push(item(ItemKind::Describe), done, anomalies),
            b'C' => {
                if let Some((&kind, rest)) = m.body.split_first()
                    && let (name, Some(_)) = cstr(rest)
                {
                    if kind == b'S' {
                        if let Some(e) = self.statements.remove(name) {
                            self.statement_bytes -= e.stmt.path.len() + name.len();
                        }
                    } else {
                        self.portals.remove(name);
                    }
                }
                self.push(item(ItemKind::Close), done, anomalies);
            }
            b'S' => {
                if self.copy_in {
                    self.add_to_last(m.size);
                } else {
                    self.group_stmt = None;
                    self.push(item(ItemKind::Sync), done, anomalies);
                }
            }
            b'c' | b'f' => {
                self.add_to_last(m.size);
                if self.copy_in {
                    self.copy_in = false;
                } else {
                    // Its bytes went to the COPY it ends (above): the mark only holds its place.
                    let mark = Item {
                        req_bytes: 0,
                        ..item(ItemKind::CopyMark)
                    };
                    self.push(mark, done, anomalies);
                }
            }
            // Flush, CopyData: no answer of their own. Terminate: none at all.
            b'H' | b'd' | b'X' => self.add_to_last(m.size),
            // Password, SASL, GSS messages: never read, never counted into a call.
            _ => {}
        }
    }

    /// The statement a message whose names were not captured most likely refers to: the
    /// last one parsed or bound in this group.
    fn guess_statement(&self) -> Stmt {
        self.group_stmt
            .clone()
            .unwrap_or_else(|| Stmt::unknown(UNKNOWN_STATEMENT.into()))
    }

    fn startup_params(&mut self, body: &[u8]) {
        let mut rest = body;
        while let (key, Some(after)) = cstr(rest) {
            if key.is_empty() {
                break;
            }
            let (value, next) = cstr(after);
            if next.is_none() {
                break;
            }
            let value = String::from_utf8_lossy(&value[..value.len().min(MAX_NAME)]).into_owned();
            match key {
                b"user" => self.user = Some(value),
                b"database" => self.database = Some(value),
                _ if self.params.len() < MAX_SESSION_ITEMS => self.params.push((
                    String::from_utf8_lossy(&key[..key.len().min(MAX_NAME)]).into_owned(),
                    value,
                )),
                _ => {}
            }
            rest = next.unwrap_or_default();
        }
        if self.database.is_none() {
            self.database.clone_from(&self.user);
        }
    }

    fn query_statements(&mut self, sql: &str, cut: bool) -> Vec<Stmt> {
        // Without a `;` there is one statement: no splitting pass.
        let pieces = if sql.contains(';') {
            sql::split_statements(sql)
        } else {
            vec![sql]
        };
        let tp: Option<Arc<str>> = sql::traceparent(sql).map(Arc::from);
        let last = pieces.len() - 1;
        let stmts: Vec<Stmt> = pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut s = Stmt::from_sql(p, cut && i == last);
                s.traceparent.clone_from(&tp);
                s
            })
            .collect();
        for (i, (piece, stmt)) in pieces.iter().zip(&stmts).enumerate() {
            if matches!(&*stmt.path, "RESET ALL" | "DISCARD ALL") {
                self.sets.clear();
            } else if session_set(piece)
                && !(cut && i == last)
                && self.sets.len() < MAX_SESSION_ITEMS
            {
                self.sets.push(piece.trim().to_string());
            }
        }
        if stmts.iter().any(|s| {
            matches!(
                &*s.path,
                "DEALLOCATE ALL" | "DEALLOCATE PREPARE ALL" | "DISCARD ALL"
            )
        }) {
            self.statements.clear();
            self.statement_bytes = 0;
            self.portals.clear();
        }
        stmts
    }

    /// Parse: normalizes the text (or reuses the normalization of the same text under that
    /// name) and remembers the statement.
    fn parse_statement(&mut self, name: &[u8], raw: &[u8], cut: bool) -> Stmt {
        let h = hash(raw) ^ u64::from(cut);
        self.uses += 1;
        if let Some(e) = self.statements.get_mut(name)
            && e.raw == h
        {
            e.used = self.uses;
            return e.stmt.clone();
        }
        let sql = text(raw, cut);
        let stmt = Stmt::from_sql(&sql, cut);
        // Only named statements outlive their group: the unnamed one (re-parsed by every
        // extended-protocol call of most drivers) is never session state, so no copy of it.
        let sql = (!cut && !name.is_empty()).then(|| Box::<str>::from(sql.as_ref()));
        let size = stmt.path.len() + name.len() + sql.as_ref().map_or(0, |s| s.len());
        if let Some(old) = self.statements.remove(name) {
            self.statement_bytes -= entry_bytes(&old, name);
        }
        while !self.statements.is_empty()
            && (self.statements.len() >= MAX_STATEMENTS
                || self.statement_bytes + size > MAX_STATEMENT_BYTES)
        {
            // Least recently used goes (a scan: only when full).
            let Some(victim) = self
                .statements
                .iter()
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone())
            else {
                break;
            };
            if let Some(e) = self.statements.remove(&victim) {
                self.statement_bytes -= entry_bytes(&e, &victim);
            }
            self.statements_dropped = true;
        }
        self.statements.insert(
            name.into(),
            Entry {
                stmt: stmt.clone(),
                used: self.uses,
                raw: h,
                sql,
            },
        );
        self.statement_bytes += size;
        stmt
    }

    fn lookup_statement(&mut self, name: &[u8]) -> Stmt {
        self.uses += 1;
        if let Some(e) = self.statements.get_mut(name) {
            e.used = self.uses;
            return e.stmt.clone();
        }
        let why = if self.midstream && !self.statements_dropped {
            "prepared before attach"
        } else {
            "statement not tracked"
        };
        Stmt::unknown(format!("EXECUTE {} /* {why} */", shown_name(name)))
    }

    fn bind_portal(&mut self, portal: &[u8], stmt: Stmt) {
        if !self.portals.contains_key(portal) && self.portals.len() >= MAX_PORTALS {
            // Keep the unnamed portal; drop some named one (cursors left open).
            if let Some(k) = self.portals.keys().find(|k| !k.is_empty()).cloned() {
                self.portals.remove(&k);
            }
        }
        if let Some(s) = self.portals.get_mut(portal) {
            *s = stmt;
        } else {
            self.portals.insert(portal.into(), stmt);
        }
    }

    // ----- response side -----

    fn backend(
        &mut self,
        ev: Ev<'_>,
        req: &mut Framer,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        match ev {
            Ev::Msg(m) => {
                self.resp_last_ts = m.end_ts;
                self.resp_seen = true;
                self.last_z = m.tag == b'Z';
                if self.unpaired {
                    if let Some(t) = self.tail.take() {
                        done.push(t);
                    }
                    return;
                }
                self.backend_msg(&m, done, anomalies);
                if m.tag == b'Z' {
                    self.resp_lost = false;
                    self.lenient = false;
                }
            }
            Ev::Answer(b) => {
                if let Some(Item {
                    kind: ItemKind::Answer,
                    ..
                }) = self.queue.front()
                {
                    self.queue.pop_front();
                }
                if b != b'N' {
                    self.encrypted = true;
                    req.state = FState::Stopped;
                }
            }
            Ev::Lost { reason, bytes, ts } => {
                self.resp_last_ts = ts;
                if self.unpaired {
                    return;
                }
                let several = self.enders > 1 || self.front_group_calls() > 1;
                if reason != DesyncReason::HeadTruncated || several {
                    // Which answers the lost bytes held cannot be told apart.
                    self.drop_all(Side::Response, reason, done, anomalies);
                } else {
                    self.resp_lost = true;
                    self.lenient = true;
                    self.add_resp_bytes(bytes, ts);
                }
            }
            Ev::Skipped { bytes, ts } => {
                self.resp_last_ts = ts;
                if !self.unpaired && self.resp_lost {
                    self.add_resp_bytes(bytes, ts);
                }
            }
            Ev::Encrypted => {}
        }
    }

    /// Calls of the front group (items up to its first ender).
    fn front_group_calls(&self) -> usize {
        if self.skipping {
            // The rest of the group is skipped: only its ReadyForQuery is to come.
            return 0;
        }
        let mut n = 0;
        for item in &self.queue {
            // Uncaptured requests after an Execute most likely hold just the Sync.
            if !(matches!(item.kind, ItemKind::Blind(_)) && n > 0) {
                n += item.calls();
            }
            if item.ender() {
                break;
            }
        }
        n
    }

    /// Unframed answer bytes: part of the answer in progress.
    fn add_resp_bytes(&mut self, bytes: u64, ts: u64) {
        if !self.skipping && (self.cur.is_some() || self.front_owes_call()) {
            self.ensure_cur();
            if let Some(b) = &mut self.cur {
                b.resp_bytes += bytes;
                b.end_ts = ts;
            }
        } else if let Some(t) = &mut self.tail {
            t.response_bytes += bytes;
            t.end_ts = ts;
        } else if !self.queue.is_empty() {
            self.acc.resp_bytes += bytes;
        }
        // Else the server spoke unasked (a notification while idle): no call's bytes.
    }

    /// Whether the front item still has a call to give (beyond the one being built): an
    /// Execute; a Query with statements left; requests not captured that gave none yet.
    fn front_owes_call(&self) -> bool {
        match self.queue.front().map(|i| &i.kind) {
            Some(ItemKind::Execute(_)) => true,
            Some(ItemKind::Query(q)) => q.next < q.stmts.len(),
            Some(ItemKind::Blind(_)) => self.tail.is_none(),
            _ => false,
        }
    }

    /// Makes the front item's call the one being built, if the front item gives calls.
    fn ensure_cur(&mut self) -> bool {
        if self.cur.is_some() {
            return true;
        }
        let Some(front) = self.queue.front_mut() else {
            return false;
        };
        let stmt = match &mut front.kind {
            ItemKind::Execute(s) => s.clone(),
            ItemKind::Query(q) => q
                .stmts
                .get(q.next)
                .cloned()
                .unwrap_or_else(|| Stmt::unknown(UNKNOWN_STATEMENT.into())),
            ItemKind::Blind(s) => s
                .take()
                .unwrap_or_else(|| Stmt::unknown(UNKNOWN_STATEMENT.into())),
            _ => return false,
        };
        let acc = std::mem::take(&mut self.acc);
        self.cur = Some(Building {
            stmt,
            start_ts: acc.start_ts.unwrap_or(front.ts),
            req_bytes: acc.req_bytes + std::mem::take(&mut front.req_bytes),
            resp_bytes: acc.resp_bytes,
            end_ts: 0,
            data_rows: 0,
        });
        true
    }

    /// Pops the front item; its request bytes go to the tail (`to_tail`) or the next call.
    fn pop_front(&mut self, to_tail: bool) -> Option<Item> {
        let item = self.queue.pop_front()?;
        if item.ender() {
            self.enders -= 1;
        }
        match (&mut self.tail, to_tail) {
            (Some(t), true) => t.request_bytes += item.req_bytes,
            _ => {
                self.acc.start_ts.get_or_insert(item.ts);
                self.acc.req_bytes += item.req_bytes;
            }
        }
        Some(item)
    }

    fn flush_tail(&mut self, done: &mut Vec<Call>) {
        if let Some(t) = self.tail.take() {
            done.push(t);
        }
        self.skipping = false;
    }

    /// Finishes the call being built.
    fn finish_cur(&mut self, outcome: Outcome<'_>, m: Option<&Msg<'_>>) {
        let Some(mut b) = self.cur.take() else {
            return;
        };
        if let Some(m) = m {
            b.resp_bytes += m.size;
            b.end_ts = m.end_ts;
        }
        let call = self.finish(b, outcome);
        self.tail = Some(call);
    }

    fn finish(&self, b: Building, outcome: Outcome<'_>) -> Call {
        let mut attributes = Vec::new();
        if let Some(u) = &self.user {
            attributes.push(("db.user".to_string(), u.clone()));
        }
        if let Some(d) = &self.database {
            attributes.push(("db.name".to_string(), d.clone()));
        }
        let mut error = None;
        let mut rows = None;
        let mut status_read = true;
        match outcome {
            Outcome::Complete(tag) => {
                rows = tag_rows(tag).or((b.data_rows > 0).then_some(b.data_rows));
            }
            Outcome::Empty => {}
            Outcome::Suspended => {
                rows = Some(b.data_rows);
                attributes.push(("db.suspended".to_string(), "true".to_string()));
            }
            Outcome::Error(fields) => {
                let (code, message) = error_fields(fields);
                error = Some(match (code.is_empty(), message.is_empty()) {
                    (true, true) => "ErrorResponse (fields not captured)".to_string(),
                    (true, false) => message,
                    (false, _) => format!("{code} {message}"),
                });
                if !code.is_empty() {
                    attributes.push(("db.sqlstate".to_string(), code));
                }
            }
            Outcome::Unknown => status_read = false,
            Outcome::Closed(why) => error = Some(why.to_string()),
        }
        if let Some(r) = rows {
            attributes.push(("db.rows".to_string(), r.to_string()));
        }
        if !b.stmt.known || !status_read {
            let decoded = match (b.stmt.known, status_read) {
                (true, _) => "method,path",
                (false, true) => "method,status",
                (false, false) => "method",
            };
            attributes.push(("decoded".to_string(), decoded.to_string()));
        }
        Call {
            protocol: "postgres",
            method: "SQL".to_string(),
            path: b.stmt.path.to_string(),
            status: None,
            grpc_status: None,
            error,
            start_ts: b.start_ts,
            end_ts: b.end_ts,
            request_bytes: b.req_bytes,
            response_bytes: b.resp_bytes,
            request_id: None,
            traceparent: b.stmt.traceparent.as_deref().map(str::to_string),
            user_agent: None,
            attributes,
        }
    }

    /// Pairing is lost: calls in flight are given up (the finished ones kept), and pairing
    /// waits for turn-taking to line requests and answers up again.
    fn drop_all(
        &mut self,
        side: Side,
        reason: DesyncReason,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        self.flush_tail(done);
        let dropped = self
            .queue
            .iter()
            .filter(|i| i.call())
            .map(Item::calls)
            .sum();
        self.queue.clear();
        self.enders = 0;
        self.cur = None;
        self.acc = Acc::default();
        self.resp_lost = false;
        self.lenient = false;
        self.copy_in = false;
        self.unpaired = true;
        self.resp_seen = false;
        self.last_z = false;
        anomalies.push(Anomaly::Desync {
            side,
            reason,
            dropped,
        });
    }

    /// The front group's answer ended in uncaptured bytes: its calls are reported without a
    /// result, and the group is done.
    fn end_group_at_turn(&mut self, done: &mut Vec<Call>) {
        let ts = self.resp_last_ts;
        if self.skipping {
            // After an error only the ReadyForQuery was lost.
            self.skip_group(ts);
            self.flush_tail(done);
        }
        while let Some(front) = self.queue.front() {
            let ender = front.ender();
            if self.cur.is_some() || self.front_owes_call() {
                self.ensure_cur();
                self.pop_call_item();
                if let Some(b) = &mut self.cur {
                    b.end_ts = b.end_ts.max(ts);
                }
                self.flush_tail(done);
                self.finish_cur(Outcome::Unknown, None);
            } else {
                self.pop_front(true);
            }
            if ender {
                break;
            }
        }
        self.flush_tail(done);
        self.acc = Acc::default();
        self.resp_lost = false;
        self.lenient = false;
    }

    /// Pops the front item, whose call is `cur`: its remaining request bytes go there.
    fn pop_call_item(&mut self) {
        if let Some(item) = self.queue.pop_front() {
            if item.ender() {
                self.enders -= 1;
            }
            if let Some(b) = &mut self.cur {
                b.req_bytes += item.req_bytes;
            }
        }
    }

    /// The answer does not fit the requests: pairing is lost.
    fn misaligned(&mut self, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        self.drop_all(Side::Response, DesyncReason::Malformed, done, anomalies);
    }

    fn backend_msg(&mut self, m: &Msg<'_>, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        // Messages the server sends at any time: counted into the answer in progress.
        if matches!(m.tag, b'N' | b'A' | b'S') {
            self.add_resp_bytes(m.size, m.end_ts);
            return;
        }
        // CopyMarks get no answer: pass them.
        while matches!(
            self.queue.front().map(|i| &i.kind),
            Some(ItemKind::CopyMark)
        ) {
            let to_tail = self.tail.is_some();
            self.pop_front(to_tail);
        }
        if self.skipping {
            self.skip_to_sync(m, done, anomalies);
            return;
        }
        if self.tail.is_some() && self.tail_takes(m, done) {
            return;
        }
        self.flush_tail(done);
        let Some(front) = self.queue.front() else {
            if m.tag == b'Z' {
                anomalies.push(Anomaly::UnmatchedResponse);
            }
            return;
        };
        match &front.kind {
            ItemKind::Startup => {
                if matches!(m.tag, b'Z' | b'E') {
                    self.pop_front(false);
                    self.acc = Acc::default();
                }
            }
            ItemKind::Answer => {
                // A tagged answer to SSLRequest (servers before 7.0 sent ErrorResponse).
                self.pop_front(false);
                self.acc = Acc::default();
            }
            ItemKind::Parse(_) | ItemKind::Bind(_) | ItemKind::Describe | ItemKind::Close => {
                self.non_call_answer(m, done, anomalies);
            }
            ItemKind::Execute(_) => self.execute_answer(m, done, anomalies),
            ItemKind::Query(_) | ItemKind::Blind(_) => self.group_answer(m, done, anomalies),
            ItemKind::Sync => {
                if m.tag == b'Z' {
                    self.pop_front(false);
                    self.acc = Acc::default();
                } else if m.tag == b'E' {
                    // An error at Sync (a failed implicit COMMIT) with no call to carry it.
                } else if self.lenient {
                    // Answers of an earlier group missing: ignore until its ReadyForQuery.
                } else {
                    self.misaligned(done, anomalies);
                }
            }
            ItemKind::CopyMark => {}
        }
    }

    /// Whether the finished call before this answer takes it (what ends its group, or an
    /// answer to a message sent after it in the same group).
    fn tail_takes(&mut self, m: &Msg<'_>, done: &mut Vec<Call>) -> bool {
        let Some(front) = self.queue.front() else {
            return false;
        };
        let take = match (&front.kind, m.tag) {
            // Ends the group: take it and the Sync (or Query) item.
            (_, b'Z') => front.ender(),
            (ItemKind::Sync, b'E') => true,
            (ItemKind::Parse(_), b'1')
            | (ItemKind::Bind(_), b'2')
            | (ItemKind::Close, b'3')
            | (ItemKind::Describe, b't' | b'T' | b'n') => self.after_front_is_ender(),
            _ => false,
        };
        if !take {
            return false;
        }
        if let Some(t) = &mut self.tail {
            t.response_bytes += m.size;
            t.end_ts = m.end_ts;
            if m.tag == b'E' {
                let (code, message) = error_fields(m.body);
                t.error = Some(format!("{code} {message}"));
                if !code.is_empty() {
                    t.attributes.push(("db.sqlstate".to_string(), code));
                }
                self.skipping = true;
                return true;
            }
        }
        if m.tag != b't' {
            self.pop_front(true);
        }
        if m.tag == b'Z' {
            self.acc = Acc::default();
            self.flush_tail(done);
        }
        true
    }

    /// Whether the front (non-call) item belongs to the finished call before it: no call
    /// comes between it and the next ender.
    fn after_front_is_ender(&self) -> bool {
        for item in self.queue.iter().skip(1) {
            if item.ender() {
                return true;
            }
            if item.call() {
                return false;
            }
        }
        // Nothing queued after it yet: the group may go on.
        false
    }

    /// After an ErrorResponse the server discards messages up to the next Sync and answers
    /// it with ReadyForQuery: those requests have no answer. They are not reported as
    /// calls; their count goes to the failed call as `db.skipped`, their bytes into it.
    fn skip_to_sync(&mut self, m: &Msg<'_>, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        if m.tag != b'Z' {
            if self.lenient {
                return;
            }
            self.misaligned(done, anomalies);
            return;
        }
        if let Some(t) = &mut self.tail {
            t.response_bytes += m.size;
        }
        self.skip_group(m.end_ts);
        self.flush_tail(done);
    }

    /// Ends a group that failed: its remaining requests (up to its ender) go into the failed
    /// call, counted as `db.skipped`.
    fn skip_group(&mut self, end_ts: u64) {
        let mut skipped = 0usize;
        while let Some(item) = self.pop_front(true) {
            if item.ender() {
                if let ItemKind::Query(q) = &item.kind {
                    skipped += q.stmts.len().saturating_sub(q.next);
                }
                break;
            }
            skipped += item.calls();
        }
        self.acc = Acc::default();
        if let Some(t) = &mut self.tail {
            t.end_ts = end_ts;
            if skipped > 0 {
                t.attributes
                    .push(("db.skipped".to_string(), skipped.to_string()));
            }
        }
        self.skipping = false;
    }

    /// Answer to Parse, Bind, Describe or Close.
    fn non_call_answer(&mut self, m: &Msg<'_>, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        let Some(front) = self.queue.front() else {
            return;
        };
        let matches = matches!(
            (&front.kind, m.tag),
            (ItemKind::Parse(_), b'1')
                | (ItemKind::Bind(_), b'2')
                | (ItemKind::Close, b'3')
                | (ItemKind::Describe, b't' | b'T' | b'n')
        );
        if matches {
            self.acc.start_ts.get_or_insert(front.ts);
            self.acc.resp_bytes += m.size;
            if m.tag != b't' {
                self.pop_front(false);
            }
            return;
        }
        if m.tag == b'E' {
            // The group fails here: the error belongs to its next Execute, or (a prepare
            // without execution) to this statement.
            let call_at = self
                .queue
                .iter()
                .position(|i| i.call() || i.ender())
                .filter(|&p| self.queue[p].call() && !self.queue[p].ender());
            let stmt = match &front.kind {
                ItemKind::Parse(s) | ItemKind::Bind(s) => s.clone(),
                _ => self
                    .group_stmt
                    .clone()
                    .unwrap_or_else(|| Stmt::unknown(UNKNOWN_STATEMENT.into())),
            };
            match call_at {
                Some(p) => {
                    for _ in 0..p {
                        self.pop_front(false);
                    }
                    self.ensure_cur();
                    self.pop_call_item();
                }
                None => {
                    self.pop_front(false);
                    let acc = std::mem::take(&mut self.acc);
                    self.cur = Some(Building {
                        stmt,
                        start_ts: acc.start_ts.unwrap_or(m.start_ts),
                        req_bytes: acc.req_bytes,
                        resp_bytes: acc.resp_bytes,
                        end_ts: 0,
                        data_rows: 0,
                    });
                }
            }
            self.finish_cur(Outcome::Error(m.body), Some(m));
            self.skipping = true;
            return;
        }
        if self.lenient || matches!(m.tag, b'1' | b'2' | b'3' | b't' | b'T' | b'n') {
            // An answer missing (lost bytes, or a Describe answered differently): move on to
            // the item this answer fits.
            let fits = self.queue.iter().position(|i| {
                i.call()
                    || matches!(
                        (&i.kind, m.tag),
                        (ItemKind::Parse(_), b'1')
                            | (ItemKind::Bind(_), b'2')
                            | (ItemKind::Close, b'3')
                            | (ItemKind::Describe, b't' | b'T' | b'n')
                    )
            });
            if let Some(p) = fits.filter(|&p| p > 0) {
                for _ in 0..p {
                    self.pop_front(false);
                }
                self.backend_msg(m, done, anomalies);
                return;
            }
        }
        self.misaligned(done, anomalies);
    }

    fn execute_answer(&mut self, m: &Msg<'_>, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        self.ensure_cur();
        match m.tag {
            b'D' | b'd' | b'c' | b'G' | b'H' | b'W' => {
                if m.tag == b'G' {
                    self.copy_in_started();
                }
                if let Some(b) = &mut self.cur {
                    b.resp_bytes += m.size;
                    b.end_ts = m.end_ts;
                    b.data_rows += u64::from(m.tag == b'D');
                }
            }
            b'C' | b'I' | b's' | b'E' => {
                let outcome = match m.tag {
                    b'C' => Outcome::Complete(m.body),
                    b'I' => Outcome::Empty,
                    b's' => Outcome::Suspended,
                    _ => Outcome::Error(m.body),
                };
                self.pop_call_item();
                self.finish_cur(outcome, Some(m));
                self.skipping = m.tag == b'E';
            }
            b'Z' if self.lenient => {
                // Its result was in lost bytes.
                self.pop_call_item();
                self.finish_cur(Outcome::Unknown, None);
                self.backend_msg(m, done, anomalies);
            }
            _ if self.lenient => {}
            _ => self.misaligned(done, anomalies),
        }
    }

    /// Answer to a simple Query (or FunctionCall), or to requests not captured.
    fn group_answer(&mut self, m: &Msg<'_>, done: &mut Vec<Call>, anomalies: &mut Vec<Anomaly>) {
        let blind = matches!(
            self.queue.front().map(|i| &i.kind),
            Some(ItemKind::Blind(_))
        );
        match m.tag {
            b'1' | b'2' | b'3' | b't' | b'n' if blind => {
                self.acc.resp_bytes += m.size;
            }
            b'T' if blind && self.cur.is_none() => {
                self.acc.resp_bytes += m.size;
            }
            b'T' | b'D' | b'd' | b'c' | b'G' | b'H' | b'W' => {
                if m.tag == b'G' {
                    self.copy_in_started();
                }
                self.ensure_cur();
                if let Some(b) = &mut self.cur {
                    b.resp_bytes += m.size;
                    b.end_ts = m.end_ts;
                    b.data_rows += u64::from(m.tag == b'D');
                }
            }
            b'C' | b'I' | b's' | b'V' | b'E' => {
                self.ensure_cur();
                let outcome = match m.tag {
                    b'C' => Outcome::Complete(m.body),
                    b'I' | b'V' => Outcome::Empty,
                    b's' => Outcome::Suspended,
                    _ => Outcome::Error(m.body),
                };
                if let Some(Item {
                    kind: ItemKind::Query(q),
                    ..
                }) = self.queue.front_mut()
                {
                    q.next += 1;
                }
                self.finish_cur(outcome, Some(m));
                self.skipping = m.tag == b'E';
            }
            b'Z' => {
                if self.cur.is_some() {
                    self.finish_cur(Outcome::Unknown, None);
                    self.tail_takes(m, done);
                    self.flush_tail(done);
                    return;
                }
                self.pop_front(false);
                self.acc = Acc::default();
            }
            _ if self.lenient => {}
            _ => self.misaligned(done, anomalies),
        }
    }

    /// CopyInResponse: the server now ignores Sync and Flush until CopyDone/CopyFail, so
    /// Syncs sent before it (libpq sends one after every Execute) get no ReadyForQuery.
    fn copy_in_started(&mut self) {
        let i = 1;
        while i < self.queue.len() {
            match self.queue[i].kind {
                ItemKind::Sync => {
                    if let Some(s) = self.queue.remove(i) {
                        self.enders -= 1;
                        if let Some(front) = self.queue.front_mut() {
                            front.req_bytes += s.req_bytes;
                        }
                    }
                }
                ItemKind::CopyMark => {
                    if let Some(s) = self.queue.remove(i)
                        && let Some(front) = self.queue.front_mut()
                    {
                        front.req_bytes += s.req_bytes;
                    }
                    return;
                }
                _ => return,
            }
        }
        self.copy_in = true;
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    // ----- a small encoder of both directions -----

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn cs(parts: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        for p in parts {
            b.extend_from_slice(p);
            b.push(0);
        }
        b
    }

    fn untagged(code: u32, body: &[u8]) -> Vec<u8> {
        let mut m = (body.len() as u32 + 8).to_be_bytes().to_vec();
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    fn startup(user: &str, db: &str) -> Vec<u8> {
        let mut body = cs(&[
            b"user",
            user.as_bytes(),
            b"database",
            db.as_bytes(),
            b"application_name",
            b"test",
        ]);
        body.push(0);
        untagged(196_608, &body)
    }

    fn ssl_request() -> Vec<u8> {
        untagged(SSL_REQUEST, &[])
    }

    fn q(sql: &str) -> Vec<u8> {
        msg(b'Q', &cs(&[sql.as_bytes()]))
    }

    fn p(name: &str, sql: &str) -> Vec<u8> {
        let mut b = cs(&[name.as_bytes(), sql.as_bytes()]);
        b.extend_from_slice(&1u16.to_be_bytes());
        b.extend_from_slice(&23u32.to_be_bytes());
        msg(b'P', &b)
    }

    fn b(portal: &str, stmt: &str, value: &[u8]) -> Vec<u8> {
        let mut body = cs(&[portal.as_bytes(), stmt.as_bytes()]);
        body.extend_from_slice(&0u16.to_be_bytes());
        body.extend_from_slice(&1u16.to_be_bytes());
        body.extend_from_slice(&(value.len() as u32).to_be_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(&0u16.to_be_bytes());
        msg(b'B', &body)
    }

    fn e(portal: &str, max_rows: u32) -> Vec<u8> {
        let mut body = cs(&[portal.as_bytes()]);
        body.extend_from_slice(&max_rows.to_be_bytes());
        msg(b'E', &body)
    }

    fn describe_portal(portal: &str) -> Vec<u8> {
        let mut body = vec![b'P'];
        body.extend(cs(&[portal.as_bytes()]));
        msg(b'D', &body)
    }

    fn describe_stmt(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend(cs(&[name.as_bytes()]));
        msg(b'D', &body)
    }

    fn close_stmt(name: &str) -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend(cs(&[name.as_bytes()]));
        msg(b'C', &body)
    }

    fn sync() -> Vec<u8> {
        msg(b'S', &[])
    }

    fn parse_complete() -> Vec<u8> {
        msg(b'1', &[])
    }

    fn bind_complete() -> Vec<u8> {
        msg(b'2', &[])
    }

    fn close_complete() -> Vec<u8> {
        msg(b'3', &[])
    }

    fn row_description() -> Vec<u8> {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(cs(&[b"col"]));
        body.extend_from_slice(&[0u8; 18]);
        msg(b'T', &body)
    }

    fn param_description() -> Vec<u8> {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend_from_slice(&23u32.to_be_bytes());
        msg(b't', &body)
    }

    fn data_row(size: usize) -> Vec<u8> {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend_from_slice(&(size as u32).to_be_bytes());
        body.extend((0..size).map(|i| b'a' + (i % 26) as u8));
        msg(b'D', &body)
    }

    fn complete(tag: &str) -> Vec<u8> {
        msg(b'C', &cs(&[tag.as_bytes()]))
    }

    fn error(code: &str, text: &str) -> Vec<u8> {
        let mut body = Vec::new();
        for (k, v) in [(b'S', "ERROR"), (b'V', "ERROR"), (b'C', code), (b'M', text)] {
            body.push(k);
            body.extend(cs(&[v.as_bytes()]));
        }
        body.push(0);
        msg(b'E', &body)
    }

    fn notice() -> Vec<u8> {
        let mut body = vec![b'S'];
        body.extend(cs(&[b"NOTICE"]));
        body.push(b'M');
        body.extend(cs(&[b"note"]));
        body.push(0);
        msg(b'N', &body)
    }

    fn ready(status: u8) -> Vec<u8> {
        msg(b'Z', &[status])
    }

    fn auth(code: u32, extra: &[u8]) -> Vec<u8> {
        let mut body = code.to_be_bytes().to_vec();
        body.extend_from_slice(extra);
        msg(b'R', &body)
    }

    fn parameter_status(k: &str, v: &str) -> Vec<u8> {
        msg(b'S', &cs(&[k.as_bytes(), v.as_bytes()]))
    }

    fn backend_key() -> Vec<u8> {
        msg(b'K', &[0, 0, 0, 7, 1, 2, 3, 4])
    }

    fn server_hello() -> Vec<u8> {
        [
            auth(0, &[]),
            parameter_status("server_version", "17.2"),
            backend_key(),
            ready(b'I'),
        ]
        .concat()
    }

    fn copy_response(tag: u8) -> Vec<u8> {
        msg(tag, &[0, 0, 1, 0, 0])
    }

    fn copy_data(n: usize) -> Vec<u8> {
        msg(b'd', &vec![b'x'; n])
    }

    fn copy_done() -> Vec<u8> {
        msg(b'c', &[])
    }

    // ----- a driver -----

    struct H {
        x: PostgresExchange,
        done: Vec<Call>,
        an: Vec<Anomaly>,
        ts: u64,
        /// Captured prefix per segment.
        cap: usize,
    }

    impl H {
        fn new(midstream: bool) -> Self {
            Self {
                x: PostgresExchange::new(midstream),
                done: Vec::new(),
                an: Vec::new(),
                ts: 0,
                cap: usize::MAX,
            }
        }

        fn send(&mut self, side: Side, bytes: &[u8]) -> u64 {
            self.ts += 10;
            let cap = &bytes[..bytes.len().min(self.cap)];
            self.x.on_bytes(
                side,
                self.ts,
                cap,
                bytes.len() as u64,
                &mut self.done,
                &mut self.an,
            );
            self.ts
        }

        fn req(&mut self, parts: &[Vec<u8>]) -> u64 {
            self.send(Side::Request, &parts.concat())
        }

        fn resp(&mut self, parts: &[Vec<u8>]) -> u64 {
            self.send(Side::Response, &parts.concat())
        }

        fn paths(&self) -> Vec<&str> {
            self.done.iter().map(|c| c.path.as_str()).collect()
        }
    }

    fn attr<'a>(c: &'a Call, k: &str) -> Option<&'a str> {
        c.attributes
            .iter()
            .find(|(a, _)| a == k)
            .map(|(_, v)| v.as_str())
    }

    fn len(parts: &[Vec<u8>]) -> u64 {
        parts.iter().map(|p| p.len() as u64).sum()
    }

    /// Found by fuzzing (fuzz/regressions/postgres/answer-before-request): answer bytes lost
    /// while nothing waited for an answer were taken as the answer of an uncaptured request
    /// sent after them, giving a call that ended before it started.
    #[test]
    fn answer_bytes_lost_before_an_uncaptured_request_do_not_answer_it() {
        let mut h = H::new(false);
        h.req(&[ssl_request()]);
        // 'N', then 16 bytes the capture missed.
        h.cap = 1;
        h.resp(&[b"N".to_vec(), vec![0; 16]]);
        // The startup, not captured at all.
        h.cap = 0;
        h.req(&[startup("alice", "shop")]);
        h.cap = usize::MAX;
        h.req(&[q("select 1")]);
        h.resp(&[complete("SELECT 1"), ready(b'I')]);
        let unanswered = h.x.close(false, &mut h.done);
        for c in h.done.iter().chain(&unanswered) {
            assert!(c.end_ts == 0 || c.end_ts >= c.start_ts, "{c:?}");
        }
    }

    #[test]
    fn ssl_refused_then_startup_then_simple_query() {
        let mut h = H::new(false);
        h.req(&[ssl_request()]);
        h.resp(&[b"N".to_vec()]);
        h.req(&[startup("alice", "shop")]);
        h.resp(&[server_hello()]);
        assert!(h.done.is_empty());
        let request = [q("select * from items where id = 42")];
        let t0 = h.req(&request);
        let response = [
            row_description(),
            data_row(10),
            complete("SELECT 1"),
            ready(b'I'),
        ];
        let t1 = h.resp(&response);
        assert!(h.an.is_empty(), "{:?}", h.an);
        assert_eq!(h.paths(), ["SELECT * FROM items WHERE id = $?"]);
        let c = &h.done[0];
        assert_eq!((c.protocol, c.method.as_str()), ("postgres", "SQL"));
        assert_eq!((c.start_ts, c.end_ts), (t0, t1));
        assert_eq!(c.request_bytes, len(&request));
        assert_eq!(c.response_bytes, len(&response));
        assert_eq!(attr(c, "db.user"), Some("alice"));
        assert_eq!(attr(c, "db.name"), Some("shop"));
        assert_eq!(attr(c, "db.rows"), Some("1"));
        assert_eq!(attr(c, "decoded"), None);
        assert_eq!(h.x.in_flight(), 0);
    }

    #[test]
    fn ssl_accepted_stops_decoding() {
        let mut h = H::new(false);
        h.req(&[ssl_request()]);
        h.resp(&[b"S\x16\x03\x01".to_vec()]);
        assert!(h.x.encrypted());
        h.req(&[b"\x16\x03\x01\x02\x00garbage".to_vec()]);
        h.resp(&[b"\x16\x03\x03 more".to_vec()]);
        assert!(h.done.is_empty() && h.an.is_empty(), "{:?}", h.an);
        // Direct TLS (no SSLRequest) is recognised too.
        let mut h = H::new(false);
        h.req(&[b"\x16\x03\x01\x02\x00\x01".to_vec()]);
        assert!(h.x.encrypted());
    }

    #[test]
    fn multi_statement_query_gives_one_call_per_statement() {
        let mut h = H::new(false);
        let request = [q("BEGIN; UPDATE t SET a = 1 WHERE b = 'x'; COMMIT")];
        let t0 = h.req(&request);
        let r1 = [complete("BEGIN")];
        let r2 = [complete("UPDATE 3")];
        let r3 = [complete("COMMIT"), ready(b'I')];
        let t1 = h.resp(&[r1.concat(), r2.concat(), r3.concat()]);
        assert!(h.an.is_empty(), "{:?}", h.an);
        assert_eq!(
            h.paths(),
            ["BEGIN", "UPDATE t SET a = $? WHERE b = $?", "COMMIT"]
        );
        assert_eq!(h.done[0].request_bytes, len(&request));
        assert_eq!(h.done[1].request_bytes, 0);
        assert_eq!(h.done[1].response_bytes, len(&r2));
        assert_eq!(h.done[2].response_bytes, len(&r3));
        assert!(h.done.iter().all(|c| c.start_ts == t0 && c.end_ts == t1));
        assert_eq!(attr(&h.done[1], "db.rows"), Some("3"));
    }

    #[test]
    fn an_error_in_a_multi_statement_query_skips_the_rest() {
        let mut h = H::new(false);
        h.req(&[q("SELECT 1; SELECT 1/0; SELECT 3")]);
        h.resp(&[
            row_description(),
            data_row(1),
            complete("SELECT 1"),
            error("22012", "division by zero"),
            ready(b'I'),
        ]);
        assert_eq!(h.paths(), ["SELECT $?", "SELECT $? / $?"]);
        let c = &h.done[1];
        assert_eq!(c.error.as_deref(), Some("22012 division by zero"));
        assert_eq!(attr(c, "db.sqlstate"), Some("22012"));
        assert_eq!(attr(c, "db.skipped"), Some("1"));
        assert_eq!(h.x.in_flight(), 0);
    }

    #[test]
    fn session_state_keeps_startup_sets_and_prepared_statements_for_a_capture() {
        let mut h = H::new(false);
        h.req(&[startup("alice", "shop")]);
        h.req(&[q(
            "SET search_path = app, public; SET LOCAL work_mem = '1MB'; SELECT 1",
        )]);
        h.req(&[p("s1", "SELECT name FROM users WHERE id = $1"), sync()]);
        h.req(&[p("", "SELECT 2"), sync()]);
        let state: std::collections::BTreeMap<String, String> =
            h.x.session_state().into_iter().collect();
        assert_eq!(state.get("pg.user").map(String::as_str), Some("alice"));
        assert_eq!(state.get("pg.database").map(String::as_str), Some("shop"));
        assert_eq!(
            state.get("pg.param.application_name").map(String::as_str),
            Some("test")
        );
        assert_eq!(
            state.get("pg.set.00").map(String::as_str),
            Some("SET search_path = app, public")
        );
        assert!(!state.contains_key("pg.set.01"), "{state:?}");
        assert_eq!(
            state.get("pg.statement.s1").map(String::as_str),
            Some("SELECT name FROM users WHERE id = $1")
        );
        // The unnamed statement is not session state.
        assert_eq!(state.len(), 5, "{state:?}");
        h.req(&[q("DISCARD ALL")]);
        let state = h.x.session_state();
        assert!(
            !state
                .iter()
                .any(|(k, _)| k.starts_with("pg.set") || k.starts_with("pg.statement")),
            "{state:?}"
        );
    }

    #[test]
    fn extended_query_unnamed_and_named_statements() {
        let mut h = H::new(false);
        // Unnamed: Parse, Bind, Describe, Execute, Sync in one write.
        let request = [
            p("", "SELECT name FROM users WHERE id = $1"),
            b("", "", b"7"),
            describe_portal(""),
            e("", 0),
            sync(),
        ];
        let response = [
            parse_complete(),
            bind_complete(),
            row_description(),
            data_row(5),
            data_row(5),
            complete("SELECT 2"),
            ready(b'I'),
        ];
        h.req(&request);
        h.resp(&response);
        assert_eq!(h.paths(), ["SELECT name FROM users WHERE id = $1"]);
        assert_eq!(h.done[0].request_bytes, len(&request));
        assert_eq!(h.done[0].response_bytes, len(&response));
        assert_eq!(attr(&h.done[0], "db.rows"), Some("2"));
        // Named: prepared once (no call), executed twice in later groups.
        h.req(&[
            p("s1", "UPDATE t SET n = n + 1 WHERE id = $1"),
            describe_stmt("s1"),
            sync(),
        ]);
        h.resp(&[
            parse_complete(),
            param_description(),
            msg(b'n', &[]),
            ready(b'I'),
        ]);
        assert_eq!(h.done.len(), 1);
        for _ in 0..2 {
            let request = [b("", "s1", b"9"), e("", 0), sync()];
            let t0 = h.req(&request);
            h.resp(&[bind_complete(), complete("UPDATE 1"), ready(b'T')]);
            let c = h.done.last().unwrap();
            assert_eq!(c.path, "UPDATE t SET n = n + $? WHERE id = $1");
            assert_eq!((c.start_ts, c.request_bytes), (t0, len(&request)));
        }
        // Closed: a later Bind to it is not tracked.
        h.req(&[close_stmt("s1"), sync()]);
        h.resp(&[close_complete(), ready(b'I')]);
        assert_eq!(h.done.len(), 3);
        assert!(h.an.is_empty(), "{:?}", h.an);
    }

    #[test]
    fn pipelining_with_an_error_in_the_middle_skips_to_sync() {
        let mut h = H::new(false);
        let g1 = [
            p("", "INSERT INTO a VALUES (1)"),
            b("", "", b""),
            e("", 0),
            p("", "INSERT INTO b VALUES (1)"),
            b("", "", b""),
            e("", 0),
            p("", "INSERT INTO c VALUES (1)"),
            b("", "", b""),
            e("", 0),
            sync(),
        ];
        let g2 = [p("", "SELECT 1"), b("", "", b""), e("", 0), sync()];
        // Both groups before any answer.
        h.req(&[g1.concat(), g2.concat()]);
        h.resp(&[
            parse_complete(),
            bind_complete(),
            complete("INSERT 0 1"),
            parse_complete(),
            bind_complete(),
            error(
                "23505",
                "duplicate key value violates unique constraint \"b_pkey\"",
            ),
            ready(b'E'),
            parse_complete(),
            bind_complete(),
            data_row(1),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        assert!(h.an.is_empty(), "{:?}", h.an);
        assert_eq!(
            h.paths(),
            [
                "INSERT INTO a VALUES ($?)",
                "INSERT INTO b VALUES ($?)",
                "SELECT $?"
            ]
        );
        assert_eq!(h.done[0].error, None);
        assert_eq!(attr(&h.done[1], "db.sqlstate"), Some("23505"));
        assert_eq!(attr(&h.done[1], "db.skipped"), Some("1"));
        // The failed call carries the skipped requests and the Sync.
        assert_eq!(h.done[1].request_bytes, len(&g1[3..]));
        assert_eq!(attr(&h.done[2], "db.rows"), Some("1"));
        assert_eq!(h.x.in_flight(), 0);
    }

    #[test]
    fn a_parse_error_without_execute_is_a_call() {
        let mut h = H::new(false);
        h.req(&[p("s2", "SELEC oops"), describe_stmt("s2"), sync()]);
        h.resp(&[
            error("42601", "syntax error at or near \"SELEC\""),
            ready(b'I'),
        ]);
        assert_eq!(h.paths(), ["SELEC oops"]);
        assert_eq!(attr(&h.done[0], "db.sqlstate"), Some("42601"));
    }

    #[test]
    fn an_error_at_sync_fails_the_last_call() {
        let mut h = H::new(false);
        h.req(&[
            p("", "INSERT INTO d VALUES (1)"),
            b("", "", b""),
            e("", 0),
            sync(),
        ]);
        h.resp(&[
            parse_complete(),
            bind_complete(),
            complete("INSERT 0 1"),
            error("23503", "deferred constraint violated"),
            ready(b'I'),
        ]);
        assert_eq!(h.done.len(), 1);
        assert_eq!(attr(&h.done[0], "db.sqlstate"), Some("23503"));
    }

    #[test]
    fn portal_suspended_then_resumed() {
        let mut h = H::new(false);
        h.req(&[
            p("", "SELECT * FROM big"),
            b("c1", "", b""),
            e("c1", 2),
            sync(),
        ]);
        h.resp(&[
            parse_complete(),
            bind_complete(),
            data_row(3),
            data_row(3),
            msg(b's', &[]),
            ready(b'T'),
        ]);
        h.req(&[e("c1", 2), sync()]);
        h.resp(&[data_row(3), complete("SELECT 1"), ready(b'T')]);
        assert!(h.an.is_empty(), "{:?}", h.an);
        assert_eq!(h.paths(), ["SELECT * FROM big", "SELECT * FROM big"]);
        assert_eq!(attr(&h.done[0], "db.suspended"), Some("true"));
        assert_eq!(attr(&h.done[0], "db.rows"), Some("2"));
        assert_eq!(attr(&h.done[1], "db.rows"), Some("1"));
    }

    /// Found by fuzzing (fuzz/regressions/postgres/copy-done-counted-twice): a CopyDone or
    /// CopyFail sent before the server's CopyInResponse counted twice into request bytes.
    #[test]
    fn copy_sent_ahead_of_its_answer_counts_its_bytes_once() {
        let mut h = H::new(false);
        let request = [q("COPY t FROM STDIN"), copy_data(20), copy_done()];
        h.req(&request);
        h.resp(&[copy_response(b'G'), complete("COPY 1"), ready(b'I')]);
        let unanswered = h.x.close(false, &mut h.done);
        let total: u64 = h
            .done
            .iter()
            .chain(&unanswered)
            .map(|c| c.request_bytes)
            .sum();
        assert_eq!(total, len(&request));
    }

    #[test]
    fn copy_in_and_out() {
        let mut h = H::new(false);
        // Simple-query COPY IN.
        let t0 = h.req(&[q("COPY t FROM STDIN")]);
        h.resp(&[copy_response(b'G')]);
        h.req(&[copy_data(100), copy_data(50)]);
        h.req(&[copy_done()]);
        let t1 = h.resp(&[complete("COPY 2"), ready(b'I')]);
        assert_eq!(h.paths(), ["COPY t FROM STDIN"]);
        let c = &h.done[0];
        assert_eq!(
            c.request_bytes,
            len(&[
                q("COPY t FROM STDIN"),
                copy_data(100),
                copy_data(50),
                copy_done()
            ])
        );
        assert_eq!((c.start_ts, c.end_ts), (t0, t1));
        assert_eq!(attr(c, "db.rows"), Some("2"));
        // Extended COPY IN, libpq style: the Sync sent with the Execute is ignored by the
        // server, a second one follows CopyDone.
        h.req(&[p("", "COPY t FROM STDIN"), b("", "", b""), e("", 0), sync()]);
        h.resp(&[parse_complete(), bind_complete(), copy_response(b'G')]);
        h.req(&[copy_data(10), copy_done(), sync()]);
        h.resp(&[complete("COPY 1"), ready(b'I')]);
        assert_eq!(h.done.len(), 2);
        assert_eq!(attr(&h.done[1], "db.rows"), Some("1"));
        // COPY OUT.
        h.req(&[q("COPY t TO STDOUT")]);
        let response = [
            copy_response(b'H'),
            copy_data(30),
            copy_data(30),
            copy_done(),
            complete("COPY 2"),
            ready(b'I'),
        ];
        h.resp(&response);
        assert_eq!(h.done.len(), 3);
        assert_eq!(h.done[2].response_bytes, len(&response));
        // Still paired afterwards.
        h.req(&[q("SELECT 1")]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.done.len(), 4);
        assert!(h.an.is_empty(), "{:?}", h.an);
    }

    #[test]
    fn command_complete_row_counts() {
        for (tag, rows) in [
            ("INSERT 0 5", Some("5")),
            ("UPDATE 3", Some("3")),
            ("DELETE 0", Some("0")),
            ("SELECT 7", Some("7")),
            ("MERGE 2", Some("2")),
            ("FETCH 4", Some("4")),
            ("CREATE TABLE", None),
            ("BEGIN", None),
        ] {
            let mut h = H::new(false);
            h.req(&[q("x")]);
            h.resp(&[complete(tag), ready(b'I')]);
            assert_eq!(attr(&h.done[0], "db.rows"), rows, "{tag}");
        }
    }

    #[test]
    fn execute_of_a_statement_prepared_before_attach() {
        let mut h = H::new(true);
        // The tail of an answer to something before the attach.
        h.resp(&[
            data_row(20)[7..].to_vec(),
            complete("SELECT 9"),
            ready(b'I'),
        ]);
        let request = [b("", "lrupsc_1_0", b"1"), e("", 0), sync()];
        h.req(&request);
        h.resp(&[
            bind_complete(),
            data_row(4),
            complete("SELECT 1"),
            ready(b'I'),
        ]);
        assert_eq!(
            h.paths(),
            ["EXECUTE lrupsc_1_0 /* prepared before attach */"]
        );
        let c = &h.done[0];
        assert_eq!(attr(c, "decoded"), Some("method,status"));
        assert_eq!(attr(c, "db.rows"), Some("1"));
        assert_eq!(c.request_bytes, len(&request));
        // A statement parsed after the attach is known.
        h.req(&[p("s3", "SELECT 2"), b("", "s3", b""), e("", 0), sync()]);
        h.resp(&[
            parse_complete(),
            bind_complete(),
            complete("SELECT 0"),
            ready(b'I'),
        ]);
        assert_eq!(h.done[1].path, "SELECT $?");
    }

    #[test]
    fn midstream_attach_finds_boundaries_inside_a_segment() {
        let mut h = H::new(true);
        // A request segment starting inside a Query, then a whole Query.
        let mut seg = q("SELECT 'tail of a previous query'")[9..].to_vec();
        seg.extend(q("SELECT 5"));
        seg.extend(q("SELECT 6"));
        h.req(&[seg]);
        // Nothing answered since the attach: the server is taken as idle, pairing starts at
        // the first whole request.
        h.resp(&[
            complete("SELECT 0"),
            ready(b'I'),
            complete("SELECT 0"),
            ready(b'I'),
        ]);
        h.req(&[q("SELECT 7")]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.paths(), ["SELECT $?"; 3]);
        assert!(h.an.is_empty(), "{:?}", h.an);
        // Attached while the server was answering: unpaired until it is idle.
        let mut h = H::new(true);
        h.resp(&[row_description(), data_row(5)]);
        h.req(&[q("SELECT 8")]);
        h.resp(&[
            complete("SELECT 1"),
            ready(b'I'),
            complete("SELECT 0"),
            ready(b'I'),
        ]);
        h.req(&[q("SELECT 9")]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.done.len(), 1);
        assert_eq!(h.x.in_flight(), 0);
    }

    #[test]
    fn data_rows_longer_than_the_capture() {
        let mut h = H::new(false);
        h.cap = 64;
        h.req(&[q("SELECT blob FROM files")]);
        // Row by row writes: each DataRow is cut by the capture, nothing is lost.
        h.resp(&[row_description()]);
        h.resp(&[data_row(10_000)]);
        h.resp(&[data_row(10_000)]);
        let t1 = h.resp(&[complete("SELECT 2"), ready(b'I')]);
        assert!(h.an.is_empty(), "{:?}", h.an);
        assert_eq!(attr(&h.done[0], "db.rows"), Some("2"));
        assert_eq!(h.done[0].end_ts, t1);
        assert_eq!(
            h.done[0].response_bytes,
            len(&[
                row_description(),
                data_row(10_000),
                data_row(10_000),
                complete("SELECT 2"),
                ready(b'I')
            ])
        );
        // One write holding many rows and the end: the end is not captured, and comes from
        // the client's next request.
        h.req(&[q("SELECT blob FROM files")]);
        let big = [
            row_description(),
            data_row(5000),
            data_row(5000),
            complete("SELECT 2"),
            ready(b'I'),
        ];
        let t2 = h.resp(&big);
        assert_eq!(h.done.len(), 1);
        h.req(&[q("SELECT 1")]);
        assert_eq!(h.done.len(), 2);
        let c = &h.done[1];
        assert_eq!(c.response_bytes, len(&big));
        assert_eq!(c.end_ts, t2);
        assert_eq!(attr(c, "decoded"), Some("method,path"));
        assert_eq!(h.an, [Anomaly::EndedAtTurn(DesyncReason::HeadTruncated)]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.done.len(), 3);
        assert_eq!(h.done[2].path, "SELECT $?");
    }

    #[test]
    fn a_final_write_starting_inside_a_row_resynchronises() {
        let mut h = H::new(false);
        h.cap = 1024;
        h.req(&[q("SELECT * FROM t")]);
        let mut all = [
            row_description(),
            data_row(300),
            data_row(300),
            data_row(300),
            data_row(300),
        ]
        .concat();
        all.extend(
            [
                data_row(300),
                data_row(300),
                complete("SELECT 6"),
                ready(b'I'),
            ]
            .concat(),
        );
        // Written in two pieces split inside a row; the first piece's end is uncaptured.
        let cut = 1500;
        h.send(Side::Response, &all[..cut]);
        h.send(Side::Response, &all[cut..]);
        assert_eq!(h.done.len(), 1, "{:?}", h.an);
        assert_eq!(attr(&h.done[0], "db.rows"), Some("6"));
        assert_eq!(h.done[0].response_bytes, all.len() as u64);
    }

    #[test]
    fn a_query_cut_by_the_capture_is_marked() {
        let mut h = H::new(false);
        h.cap = 40;
        let sql = format!(
            "SELECT * FROM t WHERE name = 'a long literal {}'",
            "x".repeat(100)
        );
        h.req(&[q(&sql)]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.paths(), ["SELECT * FROM t WHERE name = $? …"]);
        assert_eq!(h.done[0].request_bytes, q(&sql).len() as u64);
    }

    #[test]
    fn requests_beyond_the_capture_are_inferred_from_answers() {
        let mut h = H::new(false);
        h.cap = 256;
        let long = format!(
            "SELECT {} FROM wide WHERE id = $1",
            vec!["col"; 200].join(", ")
        );
        let request = [
            p("", &long),
            b("", "", b"1"),
            describe_portal(""),
            e("", 0),
            sync(),
        ];
        let t0 = h.req(&request);
        let response = [
            parse_complete(),
            bind_complete(),
            row_description(),
            data_row(8),
            complete("SELECT 1"),
            ready(b'I'),
        ];
        let t1 = h.resp(&response);
        assert_eq!(h.done.len(), 1, "{:?}", h.an);
        let c = &h.done[0];
        assert!(
            c.path.starts_with("SELECT col, col") && c.path.ends_with(" …"),
            "{}",
            c.path
        );
        assert_eq!((c.start_ts, c.end_ts), (t0, t1));
        assert_eq!(c.request_bytes, len(&request));
        assert_eq!(c.response_bytes, len(&response));
        assert_eq!(attr(c, "db.rows"), Some("1"));
        // And the next group pairs normally.
        h.req(&[q("SELECT 2")]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.done.len(), 2);
    }

    #[test]
    fn lengths_below_four_are_malformed() {
        for n in 0u32..4 {
            for side in [Side::Request, Side::Response] {
                let mut h = H::new(false);
                h.req(&[q("SELECT 1")]);
                let mut bad = vec![if side == Side::Request { b'Q' } else { b'C' }];
                bad.extend_from_slice(&n.to_be_bytes());
                bad.extend_from_slice(b"JUNK");
                h.send(side, &bad);
                assert!(
                    matches!(
                        h.an.as_slice(),
                        [Anomaly::Desync {
                            reason: DesyncReason::Malformed,
                            dropped: 1,
                            ..
                        }]
                    ),
                    "{n} {side:?} {:?}",
                    h.an
                );
            }
        }
        // The fuzz crash input of pgwire.
        let mut h = H::new(false);
        h.send(Side::Request, &[0x4e, 0, 0, 0, 0, 0x4a]);
        h.send(Side::Response, &[0x4e, 0, 0, 0, 0, 0x4a]);
        let _ = h.x.close(true, &mut h.done);
    }

    #[test]
    fn passwords_are_never_visible() {
        let secret = "hunter2-Sup3rSecret";
        let mut h = H::new(false);
        h.req(&[startup("bob", "app")]);
        h.resp(&[auth(3, &[])]);
        h.req(&[msg(b'p', &cs(&[secret.as_bytes()]))]);
        // SASL: initial response and a final message.
        h.resp(&[auth(10, &cs(&[b"SCRAM-SHA-256", b""]))]);
        let mut sasl = cs(&[b"SCRAM-SHA-256"]);
        let first = format!("n,,n=,r={secret}");
        sasl.extend_from_slice(&(first.len() as u32).to_be_bytes());
        sasl.extend_from_slice(first.as_bytes());
        h.req(&[msg(b'p', &sasl)]);
        h.resp(&[auth(11, format!("r={secret},s=c2FsdA==,i=4096").as_bytes())]);
        h.req(&[msg(b'p', format!("c=biws,r={secret},p=proof").as_bytes())]);
        h.resp(&[auth(12, b"v=signature"), server_hello()]);
        h.req(&[q(&format!("ALTER USER bob PASSWORD '{secret}'"))]);
        h.resp(&[complete("ALTER ROLE"), ready(b'I')]);
        let unanswered = h.x.close(false, &mut h.done);
        let seen = format!("{:?} {:?} {:?} {:?}", h.done, h.an, h.x, unanswered);
        assert!(!seen.contains("hunter2"), "{seen}");
        assert_eq!(h.paths(), ["ALTER USER bob PASSWORD $?"]);
        assert_eq!(attr(&h.done[0], "db.user"), Some("bob"));
    }

    /// A whole session with its expected calls, for the splitting tests.
    fn session() -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let reqs = vec![
            [ssl_request()].concat(),
            startup("u", "d"),
            q("SELECT 1; SELECT 2"),
            [p("s", "SELECT $1::int"), b("", "s", b"5"), e("", 0), sync()].concat(),
            [
                b("", "s", b"6"),
                e("", 0),
                p("", "bad"),
                b("", "", b""),
                e("", 0),
                sync(),
            ]
            .concat(),
            q("COPY t TO STDOUT"),
        ];
        let resps = vec![
            b"N".to_vec(),
            [server_hello(), notice()].concat(),
            [
                row_description(),
                data_row(3),
                complete("SELECT 1"),
                row_description(),
                data_row(3),
                complete("SELECT 1"),
                ready(b'I'),
            ]
            .concat(),
            [
                parse_complete(),
                bind_complete(),
                data_row(2),
                complete("SELECT 1"),
                ready(b'I'),
            ]
            .concat(),
            [
                bind_complete(),
                data_row(2),
                complete("SELECT 1"),
                error("42601", "syntax"),
                ready(b'I'),
            ]
            .concat(),
            [
                copy_response(b'H'),
                copy_data(5),
                copy_done(),
                complete("COPY 1"),
                ready(b'I'),
            ]
            .concat(),
        ];
        (reqs, resps)
    }

    fn run_session(split: impl Fn(&[u8]) -> Vec<&[u8]>) -> (Vec<Call>, Vec<Anomaly>) {
        let (reqs, resps) = session();
        let mut x = PostgresExchange::new(false);
        let (mut done, mut an) = (Vec::new(), Vec::new());
        for (r, s) in reqs.iter().zip(&resps) {
            for seg in split(r) {
                x.on_bytes(Side::Request, 1, seg, seg.len() as u64, &mut done, &mut an);
            }
            for seg in split(s) {
                x.on_bytes(Side::Response, 2, seg, seg.len() as u64, &mut done, &mut an);
            }
        }
        (done, an)
    }

    #[test]
    fn byte_by_byte_splitting_changes_nothing() {
        let whole = run_session(|b| vec![b]);
        let bytes = run_session(|b| b.chunks(1).collect());
        assert!(whole.1.is_empty(), "{:?}", whole.1);
        assert_eq!(whole.0.len(), 6);
        assert_eq!(whole, bytes);
        assert_eq!(attr(&whole.0[4], "db.sqlstate"), Some("42601"));
        assert_eq!(attr(&whole.0[5], "db.rows"), Some("1"));
    }

    #[test]
    fn gaps_drop_what_is_in_flight_and_pairing_resumes() {
        let mut h = H::new(false);
        h.req(&[q("SELECT 1")]);
        h.x.gap(Side::Response, &mut h.an);
        assert_eq!(
            h.an,
            [Anomaly::Desync {
                side: Side::Response,
                reason: DesyncReason::EventsLost,
                dropped: 1
            }]
        );
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        h.req(&[q("SELECT 2")]);
        h.resp(&[complete("SELECT 0"), ready(b'I')]);
        assert_eq!(h.done.len(), 1);
        assert_eq!(h.done[0].request_bytes, q("SELECT 2").len() as u64);
    }

    #[test]
    fn notifications_while_idle_belong_to_no_call() {
        let mut h = H::new(false);
        h.req(&[q("LISTEN ch")]);
        h.resp(&[complete("LISTEN"), ready(b'I')]);
        let mut body = 42u32.to_be_bytes().to_vec();
        body.extend(cs(&[b"ch", b"payload"]));
        h.resp(&[msg(b'A', &body), parameter_status("TimeZone", "UTC")]);
        h.req(&[q("SELECT 1")]);
        let response = [complete("SELECT 0"), ready(b'I')];
        h.resp(&response);
        assert_eq!(h.done.len(), 2);
        assert_eq!(h.done[1].response_bytes, len(&response));
        assert!(h.an.is_empty(), "{:?}", h.an);
    }

    #[test]
    fn in_flight_counts_statements_waiting() {
        let mut h = H::new(false);
        h.req(&[q("SELECT 1; SELECT 2; SELECT 3")]);
        assert_eq!(h.x.in_flight(), 3);
        h.resp(&[complete("SELECT 0")]);
        assert_eq!(h.x.in_flight(), 2);
        h.req(&[p("", "SELECT 4"), b("", "", b""), e("", 0), sync()]);
        assert_eq!(h.x.in_flight(), 3);
    }

    #[test]
    fn close_returns_what_is_unanswered() {
        let mut h = H::new(false);
        h.req(&[q("SELECT pg_sleep(10); SELECT 2")]);
        h.resp(&[row_description(), data_row(1)]);
        h.req(&[]);
        let out = h.x.close(true, &mut h.done);
        assert!(h.done.is_empty());
        assert_eq!(out.len(), 2);
        assert!(
            out.iter()
                .all(|c| c.error.as_deref() == Some("connection reset"))
        );
        assert_eq!(out[0].path, "SELECT pg_sleep($?)");
        assert_eq!(h.x.in_flight(), 0);
    }

    // ----- properties -----

    /// One Sync group (or simple Query) and what it must decode to.
    #[derive(Clone, Debug)]
    struct Group {
        req: Vec<u8>,
        resp: Vec<u8>,
        /// Expected calls with the stream offsets of their first request byte and last
        /// response byte (relative to this group).
        calls: Vec<(Call, usize, usize)>,
    }

    #[derive(Clone, Debug)]
    enum Shape {
        /// Statements of one Query, failing at the given one.
        Simple(Vec<(u8, u8)>, Option<usize>),
        /// Executes before one Sync: (statement, rows, named, row limit reached, with a
        /// Describe, with a notice), failing at one.
        Extended(Vec<(u8, u8, bool, bool, bool, bool)>, Option<usize>),
    }

    fn sql_of(k: u8) -> String {
        match k % 4 {
            0 => format!("SELECT * FROM t{k} WHERE id = {}", k as u32 * 7),
            1 => format!("UPDATE t{k} SET v = 'x' WHERE id IN (1, 2, {k})"),
            2 => format!("INSERT INTO t{k} VALUES ({k}, 'a')"),
            _ => format!("DELETE FROM t{k} WHERE a = $1"),
        }
    }

    fn tag_of(k: u8, rows: u8) -> String {
        match k % 4 {
            0 => format!("SELECT {rows}"),
            1 => format!("UPDATE {rows}"),
            2 => format!("INSERT 0 {rows}"),
            _ => format!("DELETE {rows}"),
        }
    }

    fn expected(path: String, start: usize, req_bytes: usize) -> (Call, usize) {
        (
            Call {
                protocol: "postgres",
                method: "SQL".into(),
                path,
                request_bytes: req_bytes as u64,
                ..Call::default()
            },
            start,
        )
    }

    fn encode(shape: &Shape) -> Group {
        let (mut req, mut resp, mut calls) = (Vec::new(), Vec::new(), Vec::new());
        match shape {
            Shape::Simple(stmts, fail) => {
                let texts: Vec<String> = stmts.iter().map(|(k, _)| sql_of(*k)).collect();
                req = q(&texts.join("; "));
                for (i, (k, rows)) in stmts.iter().enumerate() {
                    let (mut c, start) = expected(
                        sql::normalize(&texts[i]),
                        0,
                        if i == 0 { req.len() } else { 0 },
                    );
                    let before = resp.len();
                    if *fail == Some(i) {
                        resp.extend(error("40001", "could not serialize"));
                        c.error = Some("40001 could not serialize".into());
                        c.attributes.push(("db.sqlstate".into(), "40001".into()));
                        let skipped = stmts.len() - i - 1;
                        if skipped > 0 {
                            c.attributes
                                .push(("db.skipped".into(), skipped.to_string()));
                        }
                    } else {
                        if k % 4 == 0 {
                            resp.extend(row_description());
                            for _ in 0..*rows {
                                resp.extend(data_row(usize::from(*k)));
                            }
                        }
                        resp.extend(complete(&tag_of(*k, *rows)));
                        c.attributes.push(("db.rows".into(), rows.to_string()));
                    }
                    let last = *fail == Some(i) || i + 1 == stmts.len();
                    if last {
                        resp.extend(ready(b'I'));
                    }
                    c.response_bytes = (resp.len() - before) as u64;
                    calls.push((c, start, resp.len() - 1));
                    if last {
                        break;
                    }
                }
            }
            Shape::Extended(execs, fail) => {
                for (i, (k, rows, named, limit, describe, note)) in execs.iter().enumerate() {
                    let start = req.len();
                    let name = if *named {
                        format!("s{k}")
                    } else {
                        String::new()
                    };
                    let limit = *limit && *rows > 0;
                    let mut part = [p(&name, &sql_of(*k)), b("", &name, b"v")].concat();
                    if *describe {
                        part.extend(describe_portal(""));
                    }
                    part.extend(e("", if limit { u32::from(*rows) } else { 0 }));
                    req.extend(&part);
                    let (mut c, start) = expected(sql::normalize(&sql_of(*k)), start, part.len());
                    let before = resp.len();
                    match fail {
                        Some(f) if *f < i => {
                            // Skipped: counted into the failed call.
                            calls.last_mut().unwrap().0.request_bytes += part.len() as u64;
                            continue;
                        }
                        Some(f) if *f == i => {
                            resp.extend(parse_complete());
                            resp.extend(error("23505", "dup"));
                            c.error = Some("23505 dup".into());
                            c.attributes.push(("db.sqlstate".into(), "23505".into()));
                            let skipped = execs.len() - i - 1;
                            if skipped > 0 {
                                c.attributes
                                    .push(("db.skipped".into(), skipped.to_string()));
                            }
                        }
                        _ => {
                            resp.extend(parse_complete());
                            resp.extend(bind_complete());
                            if *describe {
                                resp.extend(row_description());
                            }
                            for r in 0..*rows {
                                resp.extend(data_row(3));
                                if *note && r == 0 {
                                    resp.extend(notice());
                                }
                            }
                            if limit {
                                resp.extend(msg(b's', &[]));
                                c.attributes.push(("db.suspended".into(), "true".into()));
                            } else {
                                resp.extend(complete(&tag_of(*k, *rows)));
                            }
                            c.attributes.push(("db.rows".into(), rows.to_string()));
                        }
                    }
                    c.response_bytes = (resp.len() - before) as u64;
                    calls.push((c, start, resp.len() - 1));
                }
                let s = sync();
                req.extend(&s);
                resp.extend(ready(b'I'));
                if let Some(last) = calls.last_mut() {
                    last.0.request_bytes += s.len() as u64;
                    last.0.response_bytes += 6;
                    last.2 = resp.len() - 1;
                }
            }
        }
        Group { req, resp, calls }
    }

    fn shape() -> impl Strategy<Value = Shape> {
        prop_oneof![
            (
                prop::collection::vec((any::<u8>(), 0u8..4), 1..4),
                prop::option::of(0usize..4)
            )
                .prop_map(|(s, f)| Shape::Simple(s, f)),
            (
                prop::collection::vec(
                    (
                        any::<u8>(),
                        0u8..4,
                        any::<bool>(),
                        any::<bool>(),
                        any::<bool>(),
                        any::<bool>()
                    ),
                    1..4,
                ),
                prop::option::of(0usize..4)
            )
                .prop_map(|(s, f)| Shape::Extended(s, f)),
        ]
    }

    /// Cut points of `n` bytes from fractions.
    fn cuts(n: usize, fr: &[u16]) -> Vec<(usize, usize)> {
        let mut pts: Vec<usize> = fr.iter().map(|c| *c as usize * n / 1000).collect();
        pts.push(0);
        pts.push(n);
        pts.sort_unstable();
        pts.dedup();
        pts.windows(2).map(|w| (w[0], w[1])).collect()
    }

    /// Feeds a stream in segments; returns each segment's (start, end, ts).
    fn feed(
        x: &mut PostgresExchange,
        side: Side,
        bytes: &[u8],
        segs: &[(usize, usize)],
        ts: &mut u64,
        done: &mut Vec<Call>,
        an: &mut Vec<Anomaly>,
    ) -> Vec<(usize, usize, u64)> {
        segs.iter()
            .map(|&(a, z)| {
                *ts += 1;
                x.on_bytes(side, *ts, &bytes[a..z], (z - a) as u64, done, an);
                (a, z, *ts)
            })
            .collect()
    }

    fn ts_at(map: &[(usize, usize, u64)], off: usize) -> u64 {
        map.iter()
            .find(|(a, z, _)| (*a..*z).contains(&off))
            .map_or(0, |m| m.2)
    }

    fn normalized(mut calls: Vec<Call>) -> Vec<Call> {
        for c in &mut calls {
            c.attributes.sort();
        }
        calls
    }

    proptest! {
        /// Groups sent one at a time (each answered before the next), split anywhere.
        #[test]
        fn random_sessions_decode_to_the_generated_calls(
            shapes in prop::collection::vec(shape(), 1..6),
            fr in prop::collection::vec(prop::collection::vec(0u16..1000, 0..6), 12),
        ) {
            let groups: Vec<Group> = shapes.iter().map(encode).collect();
            let mut x = PostgresExchange::new(false);
            let (mut done, mut an, mut ts) = (Vec::new(), Vec::new(), 0);
            let mut want = Vec::new();
            for (i, g) in groups.iter().enumerate() {
                let rm = feed(&mut x, Side::Request, &g.req, &cuts(g.req.len(), &fr[(2 * i) % 12]), &mut ts, &mut done, &mut an);
                let sm = feed(&mut x, Side::Response, &g.resp, &cuts(g.resp.len(), &fr[(2 * i + 1) % 12]), &mut ts, &mut done, &mut an);
                for (c, start, end) in &g.calls {
                    let mut c = c.clone();
                    c.start_ts = ts_at(&rm, *start);
                    c.end_ts = ts_at(&sm, *end);
                    want.push(c);
                }
            }
            prop_assert!(an.is_empty(), "{:?}", an);
            prop_assert_eq!(normalized(done), normalized(want));
            prop_assert_eq!(x.in_flight(), 0);
        }

        /// Every request first (pipelined), then every answer.
        #[test]
        fn pipelined_sessions_pair_in_order(
            shapes in prop::collection::vec(shape(), 1..6),
            rfr in prop::collection::vec(0u16..1000, 0..12),
            sfr in prop::collection::vec(0u16..1000, 0..12),
        ) {
            let groups: Vec<Group> = shapes.iter().map(encode).collect();
            let req: Vec<u8> = groups.iter().flat_map(|g| g.req.clone()).collect();
            let resp: Vec<u8> = groups.iter().flat_map(|g| g.resp.clone()).collect();
            let mut x = PostgresExchange::new(false);
            let (mut done, mut an, mut ts) = (Vec::new(), Vec::new(), 0);
            let rm = feed(&mut x, Side::Request, &req, &cuts(req.len(), &rfr), &mut ts, &mut done, &mut an);
            let sm = feed(&mut x, Side::Response, &resp, &cuts(resp.len(), &sfr), &mut ts, &mut done, &mut an);
            let (mut ro, mut so) = (0, 0);
            let mut want = Vec::new();
            for g in &groups {
                for (c, start, end) in &g.calls {
                    let mut c = c.clone();
                    c.start_ts = ts_at(&rm, ro + start);
                    c.end_ts = ts_at(&sm, so + end);
                    want.push(c);
                }
                ro += g.req.len();
                so += g.resp.len();
            }
            prop_assert!(an.is_empty(), "{:?}", an);
            prop_assert_eq!(normalized(done), normalized(want));
        }

        /// One write per group and side, with a short capture: groups of one call are all
        /// reported (answers cut by the capture end at the client's next turn, requests cut
        /// are inferred from the answers) with exact request bytes, and a path that is the
        /// statement, or a prefix of it marked cut.
        #[test]
        fn short_captures_still_report_every_call(
            shapes in prop::collection::vec(shape(), 1..8),
            cap in 16usize..600,
        ) {
            let groups: Vec<Group> = shapes
                .iter()
                .map(encode)
                .filter(|g| g.calls.len() == 1)
                .collect();
            let mut x = PostgresExchange::new(false);
            let (mut done, mut an, mut ts) = (Vec::new(), Vec::new(), 0);
            for g in &groups {
                for (side, bytes) in [(Side::Request, &g.req), (Side::Response, &g.resp)] {
                    ts += 1;
                    let c = &bytes[..bytes.len().min(cap)];
                    x.on_bytes(side, ts, c, bytes.len() as u64, &mut done, &mut an);
                }
            }
            ts += 1;
            x.on_bytes(Side::Request, ts, &q("SELECT 1"), 14, &mut done, &mut an);
            let want: Vec<&Call> = groups.iter().map(|g| &g.calls[0].0).collect();
            prop_assert_eq!(done.len(), want.len(), "{:?}", an);
            for (got, want) in done.iter().zip(want) {
                prop_assert_eq!(got.request_bytes, want.request_bytes);
                // A cut statement: all but its last (maybe partial) token is the same.
                let ok = got.path == want.path
                    || got.path.strip_suffix('…').is_some_and(|p| {
                        let p = p.trim_end();
                        want.path.starts_with(&p[..p.rfind(' ').unwrap_or(0)])
                    });
                prop_assert!(ok, "{} vs {}", got.path, want.path);
                prop_assert_eq!(got.error.is_some(), want.error.is_some());
                if attr(got, "decoded").is_none() {
                    prop_assert_eq!(got.response_bytes, want.response_bytes);
                }
            }
        }

        /// Arbitrary bytes, uncaptured tails and gaps on either side never panic, and memory
        /// stays bounded.
        #[test]
        fn garbage_is_survived(
            midstream in any::<bool>(),
            chunks in prop::collection::vec(
                (0u8..3, prop::collection::vec(any::<u8>(), 0..300), 0u64..3000),
                0..40,
            ),
        ) {
            let mut x = PostgresExchange::new(midstream);
            let (mut done, mut an) = (Vec::new(), Vec::new());
            for (what, bytes, extra) in chunks {
                match what {
                    0 => x.on_bytes(Side::Request, 1, &bytes, bytes.len() as u64 + extra, &mut done, &mut an),
                    1 => x.on_bytes(Side::Response, 2, &bytes, bytes.len() as u64 + extra, &mut done, &mut an),
                    _ => x.gap(if extra % 2 == 0 { Side::Request } else { Side::Response }, &mut an),
                }
                prop_assert!(x.st.queue.len() <= MAX_QUEUE);
                prop_assert!(x.req.buf.len() <= MAX_SQL + 2 * MAX_NAME);
                prop_assert!(x.resp.buf.len() <= MAX_SQL);
            }
            let _ = x.close(true, &mut done);
        }

        /// Valid messages with random junk, cut captures and gaps mixed in never panic.
        #[test]
        fn damaged_sessions_are_survived(
            shapes in prop::collection::vec(shape(), 1..6),
            damage in prop::collection::vec((0usize..5000, 0u8..4, any::<u8>()), 0..6),
            cap in 1usize..400,
        ) {
            let groups: Vec<Group> = shapes.iter().map(encode).collect();
            let mut x = PostgresExchange::new(false);
            let (mut done, mut an) = (Vec::new(), Vec::new());
            for g in &groups {
                for (side, bytes) in [(Side::Request, &g.req), (Side::Response, &g.resp)] {
                    let mut bytes = bytes.clone();
                    for (at, kind, v) in &damage {
                        let at = at % (bytes.len() + 1);
                        match kind {
                            0 => bytes.insert(at, *v),
                            1 if at < bytes.len() => { bytes[at] = *v; }
                            2 => { x.gap(side, &mut an); }
                            _ => {}
                        }
                    }
                    let c = &bytes[..bytes.len().min(cap)];
                    x.on_bytes(side, 1, c, bytes.len() as u64, &mut done, &mut an);
                }
            }
            let _ = x.close(false, &mut done);
        }
    }
}

//! HTTP/1.x message framing over one direction of a connection.
//!
//! The input is what the kernel saw per syscall: a payload prefix plus the exact length, so a
//! segment may end in a *gap* of bytes that were moved but not captured. Bodies are skipped by
//! count, so gaps inside bodies are harmless; a gap where bytes must be read (headers, chunk-size
//! lines) loses the framing, and the parser says so and waits for the next segment that starts a
//! message.

use bytes::BytesMut;

/// Which side of the exchange this parser reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Request,
    Response,
}

/// Longest header block we buffer before giving up on a message.
pub const MAX_HEAD: usize = 64 * 1024;
/// Most headers a message may have.
const MAX_HEADERS: usize = 96;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 1024;

/// The parsed start line and the headers bakeoff keeps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Head {
    /// Request method (requests only).
    pub method: String,
    /// Request target as sent (requests only).
    pub path: String,
    /// Status code (responses only).
    pub status: u16,
    /// `x-request-id`, if present.
    pub request_id: Option<String>,
    /// `traceparent`, if present.
    pub traceparent: Option<String>,
    /// `user-agent`, if present: the kind of client, a drill-down dimension.
    pub user_agent: Option<String>,
    /// The connection changes protocol after this message (101, or a 2xx to CONNECT).
    pub upgrade: bool,
    /// A request offering an upgrade to HTTP/2 over cleartext (`Upgrade: h2c`).
    pub h2c: bool,
    /// `host`, if present (the authority an upgraded HTTP/2 stream inherits).
    pub host: Option<String>,
}

/// Something the parser found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    /// A message's head is complete; `start_ts` is the time of the segment holding its first byte.
    Head { head: Head, start_ts: u64 },
    /// The message (head and body) is complete. `bytes` counts all of it.
    End { end_ts: u64, bytes: u64 },
    /// Framing was lost; the reason says where. Bytes up to the next segment are discarded.
    Desync(DesyncReason),
    /// Body framing was lost, but the message is kept: it ends when the other side speaks
    /// (request/response turn-taking) or the connection closes.
    EndsAtTurn(DesyncReason),
}

/// Why framing was lost (each is counted by the probe).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DesyncReason {
    /// Headers longer than the captured prefix of their segment.
    HeadTruncated,
    /// Bytes that are not HTTP/1.x.
    Malformed,
    /// A chunk-size line fell into uncaptured bytes.
    ChunkTruncated,
    /// The kernel lost events of this connection (ring buffer full).
    EventsLost,
}

impl DesyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::HeadTruncated => "head_truncated",
            Self::Malformed => "malformed",
            Self::ChunkTruncated => "chunk_truncated",
            Self::EventsLost => "events_lost",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Body {
    Length(u64),
    Chunked(Chunk),
    /// Response delimited by connection close.
    UntilClose,
    /// Framing lost mid-body: ends when the other side speaks, or at close.
    UntilTurn,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Chunk {
    Size,
    Data(u64),
    /// CRLF after a chunk's data.
    DataEnd(u8),
    Trailer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum State {
    /// Between messages: the next byte starts one.
    Idle,
    /// Reading a head; bytes buffered in `line`.
    Head,
    Body(Body),
    /// Framing lost: skip to the next segment.
    Lost,
    /// The connection switched protocol: ignore the rest.
    Upgraded,
}

/// Per-direction parser state.
#[derive(Debug)]
pub struct MessageParser {
    side: Side,
    state: State,
    /// Buffered head or line bytes.
    buf: BytesMut,
    start_ts: u64,
    /// Bytes of the current message so far.
    bytes: u64,
    /// Bytes of interim (1xx) responses, counted into the final response.
    interim: Option<(u64, u64)>,
    last_ts: u64,
}

/// What the response parser needs to know about the request it answers.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestContext {
    pub head: bool,
    pub connect: bool,
}

impl MessageParser {
    pub fn new(side: Side) -> Self {
        Self {
            side,
            state: State::Idle,
            buf: BytesMut::new(),
            start_ts: 0,
            bytes: 0,
            interim: None,
            last_ts: 0,
        }
    }

    /// Drops all framing: used when events were lost.
    pub fn reset_lost(&mut self) {
        self.buf.clear();
        self.state = State::Lost;
    }

    /// Feeds one syscall's worth of bytes: `data` is the captured prefix and `len >= data.len()`
    /// the exact count. `ctx` tells a response parser about the request it answers (HEAD,
    /// CONNECT); it is asked each time a response head completes.
    pub fn feed(
        &mut self,
        ts: u64,
        data: &[u8],
        len: u64,
        ctx: &mut dyn FnMut() -> RequestContext,
        out: &mut Vec<Output>,
    ) {
        let gap = len.saturating_sub(data.len() as u64);
        // A lost parser tries each new segment as a message start, quietly until one is.
        let resyncing = self.state == State::Lost;
        if resyncing {
            if data.is_empty() {
                return;
            }
            self.state = State::Idle;
        }
        let mut rest = data;
        while !rest.is_empty() {
            match self.state {
                State::Upgraded | State::Lost => return,
                State::Idle => {
                    if !starts_message(self.side, rest) {
                        self.state = State::Lost;
                        if !resyncing {
                            out.push(Output::Desync(DesyncReason::Malformed));
                        }
                        return;
                    }
                    self.state = State::Head;
                    // After an interim response, the final one continues its count and start.
                    (self.start_ts, self.bytes) = self.interim.take().unwrap_or((ts, 0));
                    self.buf.clear();
                }
                State::Head => {
                    let used = self.feed_head(ts, rest, ctx, out);
                    rest = &rest[used..];
                }
                State::Body(_) => {
                    let used = self.feed_body(ts, rest, out);
                    rest = &rest[used..];
                }
            }
        }
        if gap > 0 {
            self.feed_gap(ts, gap, out);
        }
    }

    /// Uncaptured bytes at the end of a segment.
    fn feed_gap(&mut self, ts: u64, gap: u64, out: &mut Vec<Output>) {
        match &mut self.state {
            State::Upgraded | State::Lost => {}
            State::Idle | State::Head => {
                self.state = State::Lost;
                out.push(Output::Desync(DesyncReason::HeadTruncated));
            }
            State::Body(_) => {
                let mut left = gap;
                while left > 0 {
                    let before = left;
                    left = self.skip_body(ts, left, out);
                    if left == before || !matches!(self.state, State::Body(_)) {
                        break;
                    }
                }
                if left > 0 && self.state == State::Idle {
                    // The head of a next message was not captured.
                    self.state = State::Lost;
                    out.push(Output::Desync(DesyncReason::HeadTruncated));
                } else if left > 0 && matches!(self.state, State::Body(_)) {
                    // A chunk-size line was not captured: keep counting until the turn ends.
                    self.bytes += left;
                    self.state = State::Body(Body::UntilTurn);
                    out.push(Output::EndsAtTurn(DesyncReason::ChunkTruncated));
                }
            }
        }
    }

    /// Skips up to `n` uncaptured body bytes; returns how many remain unconsumed.
    fn skip_body(&mut self, ts: u64, n: u64, out: &mut Vec<Output>) -> u64 {
        let State::Body(body) = &mut self.state else {
            return n;
        };
        match body {
            Body::UntilClose | Body::UntilTurn => {
                self.bytes += n;
                self.last_ts = ts;
                0
            }
            Body::Length(remaining) | Body::Chunked(Chunk::Data(remaining)) => {
                let take = n.min(*remaining);
                *remaining -= take;
                self.bytes += take;
                self.last_ts = ts;
                let done = *remaining == 0;
                if done {
                    if let Body::Chunked(chunk) = body {
                        *chunk = Chunk::DataEnd(2);
                    } else {
                        self.finish(ts, out);
                    }
                }
                n - take
            }
            Body::Chunked(Chunk::DataEnd(k)) => {
                let take = n.min(u64::from(*k));
                *k -= take as u8;
                self.bytes += take;
                if *k == 0 {
                    *body = Body::Chunked(Chunk::Size);
                }
                n - take
            }
            Body::Chunked(Chunk::Size | Chunk::Trailer) => n,
        }
    }

    /// Buffers head bytes; returns how many of `data` were used.
    fn feed_head(
        &mut self,
        ts: u64,
        data: &[u8],
        ctx: &mut dyn FnMut() -> RequestContext,
        out: &mut Vec<Output>,
    ) -> usize {
        let before = self.buf.len();
        self.buf.extend_from_slice(data);
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let parsed = match self.side {
            Side::Request => {
                let mut req = httparse::Request::new(&mut headers);
                req.parse(&self.buf).map(|status| {
                    complete(status).map(|n| {
                        let head = Head {
                            method: req.method.unwrap_or_default().to_string(),
                            path: req.path.unwrap_or_default().to_string(),
                            ..Head::default()
                        };
                        (n, Framing::scan(req.headers, head))
                    })
                })
            }
            Side::Response => {
                let mut resp = httparse::Response::new(&mut headers);
                resp.parse(&self.buf).map(|status| {
                    complete(status).map(|n| {
                        let head = Head {
                            status: resp.code.unwrap_or_default(),
                            ..Head::default()
                        };
                        (n, Framing::scan(resp.headers, head))
                    })
                })
            }
        };
        match parsed {
            Ok(None) => {
                if self.buf.len() > MAX_HEAD {
                    self.state = State::Lost;
                    out.push(Output::Desync(DesyncReason::Malformed));
                }
                data.len()
            }
            Err(_) => {
                self.state = State::Lost;
                out.push(Output::Desync(DesyncReason::Malformed));
                data.len()
            }
            Ok(Some((head_len, (framing, mut head)))) => {
                let used = head_len - before;
                self.bytes += head_len as u64;
                self.last_ts = ts;
                self.buf.clear();
                let body = match self.side {
                    Side::Request => {
                        if framing.chunked {
                            Some(Body::Chunked(Chunk::Size))
                        } else {
                            match framing.length {
                                Some(n) if n > 0 => Some(Body::Length(n)),
                                _ => None,
                            }
                        }
                    }
                    Side::Response => {
                        let req = ctx();
                        let status = head.status;
                        if status == 101 || (req.connect && (200..300).contains(&status)) {
                            head.upgrade = true;
                            None
                        } else if (100..200).contains(&status) {
                            // Interim response: not the answer; the final one follows.
                            self.state = State::Idle;
                            self.interim = Some((self.start_ts, self.bytes));
                            return used;
                        } else if req.head || status == 204 || status == 304 {
                            None
                        } else if framing.chunked {
                            Some(Body::Chunked(Chunk::Size))
                        } else {
                            match framing.length {
                                Some(0) => None,
                                Some(n) => Some(Body::Length(n)),
                                None => Some(Body::UntilClose),
                            }
                        }
                    }
                };
                let upgrade = head.upgrade;
                out.push(Output::Head {
                    head,
                    start_ts: self.start_ts,
                });
                match body {
                    Some(body) => self.state = State::Body(body),
                    None => {
                        self.finish(ts, out);
                        if upgrade {
                            self.state = State::Upgraded;
                        }
                    }
                }
                used
            }
        }
    }

    /// Consumes captured body bytes; returns how many of `data` were used.
    fn feed_body(&mut self, ts: u64, data: &[u8], out: &mut Vec<Output>) -> usize {
        let State::Body(body) = &mut self.state else {
            return 0;
        };
        self.last_ts = ts;
        match body {
            Body::UntilClose | Body::UntilTurn => {
                self.bytes += data.len() as u64;
                data.len()
            }
            Body::Length(_) | Body::Chunked(Chunk::Data(_) | Chunk::DataEnd(_)) => {
                let left = self.skip_body(ts, data.len() as u64, out);
                data.len() - left as usize
            }
            Body::Chunked(chunk @ (Chunk::Size | Chunk::Trailer)) => {
                let Some(nl) = data.iter().position(|&b| b == b'\n') else {
                    self.buf.extend_from_slice(data);
                    self.bytes += data.len() as u64;
                    if self.buf.len() > MAX_LINE {
                        self.state = State::Lost;
                        out.push(Output::Desync(DesyncReason::Malformed));
                    }
                    return data.len();
                };
                self.buf.extend_from_slice(&data[..=nl]);
                self.bytes += nl as u64 + 1;
                let line = self.buf.split().freeze();
                let line = trim_line(&line);
                match chunk {
                    Chunk::Size => match parse_chunk_size(line) {
                        Some(0) => *chunk = Chunk::Trailer,
                        Some(n) => *chunk = Chunk::Data(n),
                        None => {
                            self.state = State::Lost;
                            out.push(Output::Desync(DesyncReason::Malformed));
                        }
                    },
                    Chunk::Trailer if line.is_empty() => self.finish(ts, out),
                    _ => {}
                }
                nl + 1
            }
        }
    }

    fn finish(&mut self, ts: u64, out: &mut Vec<Output>) {
        out.push(Output::End {
            end_ts: ts,
            bytes: self.bytes,
        });
        self.state = State::Idle;
        self.bytes = 0;
        self.buf.clear();
    }

    /// The other side started speaking: a message whose framing was lost ends here.
    pub fn end_turn(&mut self, out: &mut Vec<Output>) {
        if self.state == State::Body(Body::UntilTurn) {
            let ts = self.last_ts;
            self.finish(ts, out);
        }
    }

    /// The connection closed: a close-delimited response ends here. Returns whether a message
    /// was finished.
    pub fn close(&mut self, out: &mut Vec<Output>) -> bool {
        if matches!(
            self.state,
            State::Body(Body::UntilClose) | State::Body(Body::UntilTurn)
        ) {
            let ts = self.last_ts;
            self.finish(ts, out);
            return true;
        }
        false
    }
}

#[derive(Default)]
struct Framing {
    chunked: bool,
    length: Option<u64>,
}

impl Framing {
    /// Reads the framing headers, and copies the ones bakeoff keeps into `head`.
    fn scan(headers: &[httparse::Header<'_>], mut head: Head) -> (Self, Head) {
        let mut f = Framing::default();
        let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
        for h in headers {
            if h.name.eq_ignore_ascii_case("transfer-encoding") {
                let v = text(h.value).to_ascii_lowercase();
                f.chunked = v.split(',').any(|t| t.trim() == "chunked");
            } else if h.name.eq_ignore_ascii_case("content-length") {
                f.length = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse().ok());
            } else if h.name.eq_ignore_ascii_case("x-request-id") {
                head.request_id = Some(text(h.value));
            } else if h.name.eq_ignore_ascii_case("traceparent") {
                head.traceparent = Some(text(h.value));
            } else if h.name.eq_ignore_ascii_case("user-agent") {
                head.user_agent = Some(text(h.value));
            } else if h.name.eq_ignore_ascii_case("upgrade") {
                head.h2c = text(h.value)
                    .split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("h2c"));
            } else if h.name.eq_ignore_ascii_case("host") {
                head.host = Some(text(h.value));
            }
        }
        (f, head)
    }
}

fn complete(status: httparse::Status<usize>) -> Option<usize> {
    match status {
        httparse::Status::Complete(n) => Some(n),
        httparse::Status::Partial => None,
    }
}

fn trim_line(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_chunk_size(line: &[u8]) -> Option<u64> {
    let hex = line.split(|&b| b == b';').next()?;
    let hex = std::str::from_utf8(hex).ok()?.trim();
    if hex.is_empty() || hex.len() > 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

/// Whether `data` can be the start of a message on this side (a prefix of one is enough).
pub fn starts_message(side: Side, data: &[u8]) -> bool {
    let matches = |token: &[u8]| {
        let n = token.len().min(data.len());
        data[..n] == token[..n]
    };
    match side {
        Side::Request => METHODS.iter().any(|m| matches(m)),
        Side::Response => matches(b"HTTP/1."),
    }
}

//! HTTP/2 (RFC 9113) and gRPC over it: frames of both directions of a connection paired into one
//! [`Call`] per stream.
//!
//! The input is what the kernel saw per syscall: a captured prefix and the exact length. So:
//!
//! - Each side has a frame reader that needs no more than the 9-byte frame header to move on:
//!   payloads are skipped by count, whether captured or not; only header blocks (HEADERS,
//!   CONTINUATION, PUSH_PROMISE, at most [`MAX_HEADER_BLOCK`]) and the first bytes of RST_STREAM
//!   and GOAWAY are kept. Frames and the client preface may be split anywhere.
//! - A frame header that falls into uncaptured bytes, or a gap ([`Decoder::gap`]), loses the
//!   framing of that side: the reader then hunts for a *plausible* frame header (known type,
//!   flags, stream id and length rules of its type) confirmed by the next one, or ending exactly
//!   where the syscall's bytes end. Streams in flight on that side are given up (their bytes and
//!   ends may be in the gap) and counted in an [`Anomaly::Desync`]; so are requests seen while
//!   that side still hunts, if it then passes over bytes. So every call reported is exact.
//! - Header blocks go through a tolerant [`HpackDecoder`] per side, so a decoder attached
//!   mid-connection reports fields from table entries it never saw as unknown; the attribute
//!   `decoded` of each call says which of method, path and status were really read.
//! - Memory is bounded: at most [`MAX_STREAMS`] open streams, one header block per side of at
//!   most [`MAX_HEADER_BLOCK`] bytes, [`MAX_FIELD`] bytes kept per header value.

use std::collections::BTreeMap;

use super::{
    call::{Call, Decoder},
    exchange::Anomaly,
    hpack::HpackDecoder,
    http1::{DesyncReason, Side},
};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Open streams tracked per connection; requests beyond are not reported (counted in
/// [`Http2Stats::streams_over_limit`]).
pub const MAX_STREAMS: usize = 1024;

/// Longest header block buffered (HEADERS or PUSH_PROMISE with its CONTINUATIONs). A longer one
/// is not decoded: its stream is given up and that side's HPACK table is unknown afterwards.
pub const MAX_HEADER_BLOCK: usize = 64 * 1024;

/// Bytes kept of one header value (a path, a user agent): bounds memory per stream.
pub const MAX_FIELD: usize = 4096;

/// Frames checked after a candidate frame header when hunting for framing.
const CHAIN_CHECK: usize = 8;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PUSH_PROMISE: u8 = 0x5;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY_FLAG: u8 = 0x20;

/// Whether `data` can be the start of a client preface (a prefix of one is enough): how a
/// connection's first bytes tell HTTP/2 with prior knowledge.
pub fn starts_with_preface(data: &[u8]) -> bool {
    let n = data.len().min(PREFACE.len());
    data[..n] == PREFACE[..n]
}

/// The name of an HTTP/2 error code (RFC 9113 §7), as RST_STREAM and GOAWAY carry.
pub fn error_code_name(code: u32) -> Option<&'static str> {
    Some(match code {
        0x0 => "NO_ERROR",
        0x1 => "PROTOCOL_ERROR",
        0x2 => "INTERNAL_ERROR",
        0x3 => "FLOW_CONTROL_ERROR",
        0x4 => "SETTINGS_TIMEOUT",
        0x5 => "STREAM_CLOSED",
        0x6 => "FRAME_SIZE_ERROR",
        0x7 => "REFUSED_STREAM",
        0x8 => "CANCEL",
        0x9 => "COMPRESSION_ERROR",
        0xa => "CONNECT_ERROR",
        0xb => "ENHANCE_YOUR_CALM",
        0xc => "INADEQUATE_SECURITY",
        0xd => "HTTP_1_1_REQUIRED",
        _ => return None,
    })
}

fn code_text(code: Option<u32>) -> String {
    match code {
        Some(c) => error_code_name(c).map_or_else(|| format!("0x{c:x}"), str::to_string),
        None => "(code not captured)".to_string(),
    }
}

/// Things given up or seen on a connection that no [`Anomaly`] names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Http2Stats {
    /// New requests not tracked because [`MAX_STREAMS`] were open.
    pub streams_over_limit: u64,
    /// Header blocks over [`MAX_HEADER_BLOCK`] (their streams given up).
    pub blocks_oversized: u64,
    /// Header blocks not fully captured (decoded as far as captured).
    pub blocks_truncated: u64,
    /// Header blocks HPACK could not decode.
    pub hpack_errors: u64,
    /// Times a side lost its framing and hunted for it.
    pub resyncs: u64,
    /// Response heads for streams whose request was not seen.
    pub unmatched_responses: u64,
}

/// A 9-byte frame header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct FrameHead {
    len: u32,
    ty: u8,
    flags: u8,
    /// Stream id without the reserved bit.
    stream: u32,
    reserved: bool,
}

impl FrameHead {
    fn parse(b: &[u8]) -> Option<Self> {
        let b: &[u8; 9] = b.get(..9)?.try_into().ok()?;
        let id = u32::from_be_bytes([b[5], b[6], b[7], b[8]]);
        Some(Self {
            len: u32::from_be_bytes([0, b[0], b[1], b[2]]),
            ty: b[3],
            flags: b[4],
            stream: id & 0x7fff_ffff,
            reserved: id & 0x8000_0000 != 0,
        })
    }

    /// Whether this header could begin a frame sent by `side`: used only to find framing again,
    /// so it is strict (defined flags only, each type's stream and length rules; clients open
    /// odd streams and do not push). Lengths are 24 bits, within the 16 MiB frame size bound.
    fn plausible(&self, side: Side) -> bool {
        let f = self.flags;
        let padded = u32::from(f & PADDED != 0);
        let client_stream = self.stream != 0 && (side == Side::Response || self.stream % 2 == 1);
        !self.reserved
            && match self.ty {
                DATA => f & !(END_STREAM | PADDED) == 0 && client_stream && self.len >= padded,
                HEADERS => {
                    let prio = if f & PRIORITY_FLAG != 0 { 5 } else { 0 };
                    f & !(END_STREAM | END_HEADERS | PADDED | PRIORITY_FLAG) == 0
                        && client_stream
                        && self.len >= padded + prio
                }
                PRIORITY => f == 0 && self.stream != 0 && self.len == 5,
                RST_STREAM => f == 0 && self.stream != 0 && self.len == 4,
                SETTINGS => {
                    f & !ACK == 0
                        && self.stream == 0
                        && if f & ACK != 0 {
                            self.len == 0
                        } else {
                            self.len.is_multiple_of(6)
                        }
                }
                PUSH_PROMISE => {
                    f & !(END_HEADERS | PADDED) == 0
                        && side == Side::Response
                        && self.stream % 2 == 1
                        && self.len >= 4 + padded
                }
                PING => f & !ACK == 0 && self.stream == 0 && self.len == 8,
                GOAWAY => f == 0 && self.stream == 0 && self.len >= 8,
                WINDOW_UPDATE => f == 0 && self.len == 4,
                CONTINUATION => f & !END_HEADERS == 0 && client_stream,
                _ => false,
            }
    }

    /// Payload bytes worth keeping: header blocks, error codes, GOAWAY's last stream id.
    fn keep(&self) -> u32 {
        match self.ty {
            HEADERS | CONTINUATION | PUSH_PROMISE => self.len.min(MAX_HEADER_BLOCK as u32),
            RST_STREAM => self.len.min(4),
            GOAWAY => self.len.min(8),
            _ => 0,
        }
    }

    /// Bytes of the frame on the wire.
    fn wire_len(&self) -> u64 {
        9 + u64::from(self.len)
    }
}

/// A complete frame, as far as it was captured.
#[derive(Debug)]
struct Frame<'a> {
    head: FrameHead,
    /// Time of the piece holding the frame's first byte.
    start_ts: u64,
    /// Time of the piece holding its last byte.
    end_ts: u64,
    /// The kept payload prefix ([`FrameHead::keep`]), all captured.
    payload: &'a [u8],
}

impl Frame<'_> {
    /// The whole payload was kept.
    fn complete(&self) -> bool {
        self.payload.len() == self.head.len as usize
    }
}

/// What a frame reader reports.
#[derive(Debug)]
enum Event<'a> {
    Frame(Frame<'a>),
    /// Framing was lost; the reader hunts for it.
    Lost(DesyncReason),
    /// While hunting, bytes were passed over (for the reason framing was lost): frames of any
    /// stream may have been among them.
    Skipped(DesyncReason),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadState {
    /// Matching the client preface; this many bytes matched.
    Preface(usize),
    /// Reading a frame header (`have` bytes so far).
    Header,
    /// Reading or skipping a payload.
    Payload,
    /// Framing lost: looking for a plausible frame header in each new piece.
    Hunting,
}

/// Frames of one direction of a connection.
#[derive(Debug)]
struct FrameReader {
    side: Side,
    state: ReadState,
    hdr: [u8; 9],
    have: usize,
    head: FrameHead,
    start_ts: u64,
    /// Payload bytes not yet read or skipped.
    left: u32,
    /// Payload prefix to keep.
    keep: u32,
    payload: Vec<u8>,
    /// Part of the kept prefix was not captured: stop keeping.
    lost: bool,
    /// Why the reader is hunting (a decoder attached mid-connection starts so: `Malformed`, as
    /// for bytes that are not a message start).
    hunt_reason: DesyncReason,
}

impl FrameReader {
    fn new(side: Side, state: ReadState) -> Self {
        Self {
            side,
            state,
            hdr: [0; 9],
            have: 0,
            head: FrameHead::default(),
            start_ts: 0,
            left: 0,
            keep: 0,
            payload: Vec::new(),
            lost: false,
            hunt_reason: DesyncReason::Malformed,
        }
    }

    /// Forgets the current frame and hunts for framing (quietly: the caller reports it).
    fn reset_lost(&mut self, reason: DesyncReason) {
        self.hunt_reason = reason;
        self.state = ReadState::Hunting;
        self.have = 0;
        self.payload.clear();
        self.lost = false;
    }

    fn lose(&mut self, reason: DesyncReason, out: &mut dyn FnMut(Event<'_>)) {
        self.reset_lost(reason);
        out(Event::Lost(reason));
    }

    /// Feeds one piece: `data` captured of `len` bytes.
    fn feed(&mut self, ts: u64, data: &[u8], len: u64, out: &mut dyn FnMut(Event<'_>)) {
        let len = len.max(data.len() as u64);
        let mut pos = 0;
        while pos < data.len() {
            match self.state {
                ReadState::Preface(n) => {
                    let want = &PREFACE[n..];
                    let take = want.len().min(data.len() - pos);
                    if data[pos..pos + take] != want[..take] {
                        // Not a connection start after all: find frames from here.
                        self.lose(DesyncReason::Malformed, out);
                        continue;
                    }
                    pos += take;
                    self.state = if n + take == PREFACE.len() {
                        ReadState::Header
                    } else {
                        ReadState::Preface(n + take)
                    };
                }
                ReadState::Header => {
                    if self.have == 0 {
                        self.start_ts = ts;
                    }
                    let take = (9 - self.have).min(data.len() - pos);
                    self.hdr[self.have..self.have + take].copy_from_slice(&data[pos..pos + take]);
                    self.have += take;
                    pos += take;
                    if self.have == 9 {
                        self.begin_payload();
                        if self.left == 0 {
                            self.emit(ts, out);
                        }
                    }
                }
                ReadState::Payload => {
                    let avail = data.len() - pos;
                    let at_start = self.left == self.head.len;
                    if at_start && avail >= self.left as usize {
                        // The whole payload is here: no copy.
                        let end = pos + self.left as usize;
                        let payload = &data[pos..pos + self.keep as usize];
                        pos = end;
                        self.state = ReadState::Header;
                        self.have = 0;
                        out(Event::Frame(Frame {
                            head: self.head,
                            start_ts: self.start_ts,
                            end_ts: ts,
                            payload,
                        }));
                        continue;
                    }
                    let take = avail.min(self.left as usize);
                    let done = self.head.len - self.left;
                    if !self.lost && done < self.keep {
                        let k = ((self.keep - done) as usize).min(take);
                        self.payload.extend_from_slice(&data[pos..pos + k]);
                    }
                    pos += take;
                    self.left -= take as u32;
                    if self.left == 0 {
                        self.emit(ts, out);
                    }
                }
                ReadState::Hunting => {
                    let found = find_framing(self.side, &data[pos..], len - pos as u64);
                    let passed = found.map_or(data.len() - pos, |(passed, _)| passed);
                    if passed > 0 || (found.is_none() && len > data.len() as u64) {
                        out(Event::Skipped(self.hunt_reason));
                    }
                    match found {
                        Some((_, resume)) => {
                            pos += resume;
                            self.state = ReadState::Header;
                            self.have = 0;
                        }
                        None => return,
                    }
                }
            }
        }
        let gap = len - data.len() as u64;
        if gap > 0 {
            self.skip(ts, gap, out);
        }
    }

    /// `gap` bytes that were sent but not captured.
    fn skip(&mut self, ts: u64, mut gap: u64, out: &mut dyn FnMut(Event<'_>)) {
        match self.state {
            ReadState::Hunting => out(Event::Skipped(self.hunt_reason)),
            ReadState::Preface(_) | ReadState::Header => {
                self.lose(DesyncReason::HeadTruncated, out);
            }
            ReadState::Payload => {
                let take = gap.min(u64::from(self.left)) as u32;
                if self.head.len - self.left < self.keep {
                    self.lost = true;
                }
                self.left -= take;
                gap -= u64::from(take);
                if self.left == 0 {
                    self.emit(ts, out);
                }
                if gap > 0 {
                    // The next frame header was not captured.
                    self.lose(DesyncReason::HeadTruncated, out);
                }
            }
        }
    }

    fn begin_payload(&mut self) {
        // Nine bytes are there: parsing cannot fail.
        self.head = FrameHead::parse(&self.hdr).unwrap_or_default();
        self.left = self.head.len;
        self.keep = self.head.keep();
        self.payload.clear();
        self.lost = false;
        self.state = ReadState::Payload;
    }

    fn emit(&mut self, ts: u64, out: &mut dyn FnMut(Event<'_>)) {
        self.state = ReadState::Header;
        self.have = 0;
        out(Event::Frame(Frame {
            head: self.head,
            start_ts: self.start_ts,
            end_ts: ts,
            payload: &self.payload,
        }));
        self.payload.clear();
    }
}

/// Where framing resumes in `data` (captured bytes of a piece whose remaining exact length is
/// `piece_len`): after a client preface, or at a plausible frame header that the next one
/// confirms, or that ends exactly where the piece ends (senders write whole frames). Returns the
/// bytes passed over (not a preface) and the offset to read frames from.
fn find_framing(side: Side, data: &[u8], piece_len: u64) -> Option<(usize, usize)> {
    for i in 0..data.len() {
        if side == Side::Request && data[i] == b'P' && data[i..].starts_with(PREFACE) {
            return Some((i, i + PREFACE.len()));
        }
        let Some(head) = FrameHead::parse(&data[i..]) else {
            // Fewer than 9 bytes left (a preface needs more).
            return None;
        };
        if head.plausible(side) && confirmed(side, data, piece_len, i, head) {
            return Some((i, i));
        }
    }
    None
}

fn confirmed(side: Side, data: &[u8], piece_len: u64, start: usize, head: FrameHead) -> bool {
    let mut next = start as u64 + head.wire_len();
    let mut seen = 1;
    while seen < CHAIN_CHECK {
        if next == piece_len {
            return true;
        }
        if next > piece_len {
            break;
        }
        let Some(h) = data.get(next as usize..).and_then(FrameHead::parse) else {
            break;
        };
        if !h.plausible(side) {
            return false;
        }
        seen += 1;
        next += h.wire_len();
    }
    seen >= 2
}

/// One stream (request and response) being followed.
#[derive(Debug, Default)]
struct Stream {
    id: u32,
    start_ts: u64,
    /// End of the last response frame of the stream.
    resp_ts: u64,
    request_bytes: u64,
    response_bytes: u64,
    req_ended: bool,
    resp_ended: bool,
    /// The final (non-1xx) response head was seen: a later block is trailers.
    head_seen: bool,
    req: Fields,
    resp: Fields,
}

/// Header fields of one block that calls use. `None`: absent or unknown.
#[derive(Debug, Default)]
struct Fields {
    method: Option<String>,
    path: Option<String>,
    authority: Option<String>,
    host: Option<String>,
    status: Option<u16>,
    content_type: Option<String>,
    user_agent: Option<String>,
    request_id: Option<String>,
    traceparent: Option<String>,
    grpc_status: Option<i32>,
    grpc_message: Option<String>,
    /// A known pseudo-header was seen: the block is a request or response head, not trailers.
    pseudo: bool,
}

impl Fields {
    fn add(&mut self, name: Option<&[u8]>, value: Option<&[u8]>) {
        let Some(name) = name else { return };
        if name.first() == Some(&b':') {
            self.pseudo = true;
        }
        let Some(v) = value else { return };
        let slot = match name {
            b":method" => &mut self.method,
            b":path" => &mut self.path,
            b":authority" => &mut self.authority,
            b"host" => &mut self.host,
            b"content-type" => &mut self.content_type,
            b"user-agent" => &mut self.user_agent,
            b"x-request-id" => &mut self.request_id,
            b"traceparent" => &mut self.traceparent,
            b":status" => {
                self.status = parse_num(v).and_then(|s| u16::try_from(s).ok());
                return;
            }
            b"grpc-status" => {
                self.grpc_status = parse_num(v).and_then(|s| i32::try_from(s).ok());
                return;
            }
            b"grpc-message" => {
                self.grpc_message = Some(percent_decode(&v[..v.len().min(MAX_FIELD)]));
                return;
            }
            _ => return,
        };
        *slot = Some(text(v));
    }

    /// Fields of a later block fill what an earlier one left unknown.
    fn merge(&mut self, other: Fields) {
        fn or<T>(a: &mut Option<T>, b: Option<T>) {
            if a.is_none() {
                *a = b;
            }
        }
        or(&mut self.method, other.method);
        or(&mut self.path, other.path);
        or(&mut self.authority, other.authority);
        or(&mut self.host, other.host);
        or(&mut self.status, other.status);
        or(&mut self.content_type, other.content_type);
        or(&mut self.user_agent, other.user_agent);
        or(&mut self.request_id, other.request_id);
        or(&mut self.traceparent, other.traceparent);
        self.pseudo |= other.pseudo;
        if other.grpc_status.is_some() {
            self.grpc_status = other.grpc_status;
            self.grpc_message = other.grpc_message;
        }
    }
}

fn text(v: &[u8]) -> String {
    let v = &v[..v.len().min(MAX_FIELD)];
    String::from_utf8_lossy(v).into_owned()
}

fn parse_num(v: &[u8]) -> Option<u32> {
    if v.is_empty() || v.len() > 9 {
        return None;
    }
    v.iter().try_fold(0u32, |n, &b| {
        b.is_ascii_digit().then(|| n * 10 + u32::from(b - b'0'))
    })
}

/// `grpc-message` is percent-encoded (gRPC's PROTOCOL-HTTP2.md); malformed escapes stay as they
/// are.
fn percent_decode(v: &[u8]) -> String {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        let decoded = (v[i] == b'%')
            .then(|| Some((hex(*v.get(i + 1)?)? * 16 + hex(*v.get(i + 2)?)?) as u8))
            .flatten();
        match decoded {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(v[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A header block being assembled from HEADERS (or PUSH_PROMISE) and CONTINUATION frames.
#[derive(Debug)]
struct Block {
    stream: u32,
    push: bool,
    end_stream: bool,
    buf: Vec<u8>,
    /// Every fragment so far was captured whole.
    complete: bool,
    /// Longer than [`MAX_HEADER_BLOCK`].
    oversized: bool,
    start_ts: u64,
    end_ts: u64,
    /// Wire bytes of the block's frames.
    bytes: u64,
}

/// The header block fragment of a HEADERS or PUSH_PROMISE payload, without padding, priority or
/// promised stream id: the captured part, and whether all of it was captured. `None` when the
/// padding is longer than the frame (malformed).
fn fragment<'a>(head: &FrameHead, payload: &'a [u8]) -> Option<(&'a [u8], bool)> {
    let total = head.len as usize;
    let mut start = 0;
    let mut pad = 0;
    if head.flags & PADDED != 0 {
        match payload.first() {
            Some(&p) => pad = usize::from(p),
            // The pad length was not captured: where the fragment ends is unknown.
            None => return (total > 0).then_some((&[][..], false)),
        }
        start = 1;
    }
    match head.ty {
        HEADERS if head.flags & PRIORITY_FLAG != 0 => start += 5,
        PUSH_PROMISE => start += 4,
        _ => {}
    }
    let end = total.checked_sub(pad)?;
    if start > end {
        return None;
    }
    let have = payload.len().min(end);
    Some((
        payload.get(start..have).unwrap_or_default(),
        payload.len() >= end,
    ))
}

/// Everything of a connection but the frame readers.
#[derive(Debug)]
struct Conn {
    streams: BTreeMap<u32, Stream>,
    /// Per side (request, response).
    hpack: [HpackDecoder; 2],
    blocks: [Option<Block>; 2],
    /// Highest request stream id seen.
    max_request_stream: u32,
    /// GOAWAY from the server: its last stream id and error code.
    goaway: Option<(u32, Option<u32>)>,
    stats: Http2Stats,
}

fn index(side: Side) -> usize {
    match side {
        Side::Request => 0,
        Side::Response => 1,
    }
}

impl Conn {
    fn on_frame(
        &mut self,
        side: Side,
        frame: Frame<'_>,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let si = index(side);
        let head = frame.head;
        // A header block is followed only by its CONTINUATIONs (RFC 9113 §6.10); anything
        // else means its end was not seen.
        if let Some(b) = &self.blocks[si]
            && !(head.ty == CONTINUATION && head.stream == b.stream)
            && let Some(mut b) = self.blocks[si].take()
        {
            b.complete = false;
            self.finish_block(side, b, None, done, anomalies);
        }
        match head.ty {
            HEADERS | PUSH_PROMISE => {
                let Some((frag, whole)) = fragment(&head, frame.payload) else {
                    // Malformed padding: the block cannot be read, nor what it inserted.
                    self.hpack[si].mark_unsynced();
                    self.stats.hpack_errors += 1;
                    anomalies.push(Anomaly::Desync {
                        side,
                        reason: DesyncReason::Malformed,
                        dropped: 0,
                    });
                    return;
                };
                let block = Block {
                    stream: head.stream,
                    push: head.ty == PUSH_PROMISE,
                    end_stream: head.ty == HEADERS && head.flags & END_STREAM != 0,
                    buf: Vec::new(),
                    complete: whole,
                    oversized: head.len as usize > MAX_HEADER_BLOCK,
                    start_ts: frame.start_ts,
                    end_ts: frame.end_ts,
                    bytes: head.wire_len(),
                };
                if head.flags & END_HEADERS != 0 {
                    self.finish_block(side, block, Some(frag), done, anomalies);
                } else {
                    let mut block = block;
                    if !block.oversized {
                        block.buf.extend_from_slice(frag);
                    }
                    self.blocks[si] = Some(block);
                }
            }
            CONTINUATION => {
                let Some(mut b) = self.blocks[si].take() else {
                    // Its HEADERS was not seen: what that block inserted is unknown.
                    self.hpack[si].mark_unsynced();
                    return;
                };
                b.bytes += head.wire_len();
                b.end_ts = frame.end_ts;
                if b.buf.len() + head.len as usize > MAX_HEADER_BLOCK {
                    b.oversized = true;
                    b.buf = Vec::new();
                } else if b.complete && !b.oversized {
                    b.buf.extend_from_slice(frame.payload);
                }
                b.complete &= frame.complete();
                if head.flags & END_HEADERS != 0 {
                    self.finish_block(side, b, None, done, anomalies);
                } else {
                    self.blocks[si] = Some(b);
                }
            }
            DATA => {
                let Some(st) = self.streams.get_mut(&head.stream) else {
                    return;
                };
                match side {
                    Side::Request => st.request_bytes += head.wire_len(),
                    Side::Response => {
                        st.response_bytes += head.wire_len();
                        st.resp_ts = frame.end_ts;
                    }
                }
                if head.flags & END_STREAM != 0 {
                    match side {
                        Side::Request => st.req_ended = true,
                        Side::Response => st.resp_ended = true,
                    }
                    self.complete_if_done(head.stream, done);
                }
            }
            RST_STREAM => {
                let Some(mut st) = self.streams.remove(&head.stream) else {
                    return;
                };
                match side {
                    Side::Request => st.request_bytes += head.wire_len(),
                    Side::Response => {
                        st.response_bytes += head.wire_len();
                        st.resp_ts = frame.end_ts;
                    }
                }
                let code = read_u32(frame.payload);
                // After a complete response, a reset only stops the rest of the request
                // (RFC 9113 §8.1): the call succeeded.
                let error = (!st.resp_ended).then(|| format!("RST_STREAM {}", code_text(code)));
                done.push(st.into_call(error));
            }
            GOAWAY if side == Side::Response => {
                let last = read_u32(frame.payload).map(|l| l & 0x7fff_ffff);
                let code = frame.payload.get(4..).and_then(read_u32);
                if let Some(last) = last {
                    self.goaway = Some((last, code));
                    // Requests above the last stream id were not processed.
                    let unanswered: Vec<u32> =
                        self.streams.range(last + 1..).map(|(&id, _)| id).collect();
                    for id in unanswered {
                        if let Some(st) = self.streams.remove(&id) {
                            done.push(st.into_call(Some(format!("GOAWAY {}", code_text(code)))));
                        }
                    }
                }
            }
            // PRIORITY, SETTINGS, PING, WINDOW_UPDATE, a client's GOAWAY (about pushed streams)
            // and extension frames do not change calls.
            _ => {}
        }
    }

    /// Decodes a complete header block (from `direct`, or the assembled buffer) and applies it.
    fn finish_block(
        &mut self,
        side: Side,
        block: Block,
        direct: Option<&[u8]>,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let si = index(side);
        let bytes = direct.unwrap_or(&block.buf);
        let mut fields = Fields::default();
        let add = |n: Option<&[u8]>, v: Option<&[u8]>| fields.add(n, v);
        if block.oversized {
            self.hpack[si].mark_unsynced();
            self.stats.blocks_oversized += 1;
        } else if block.complete {
            if self.hpack[si].decode_block_with(bytes, add).is_err() {
                self.stats.hpack_errors += 1;
                anomalies.push(Anomaly::Desync {
                    side,
                    reason: DesyncReason::Malformed,
                    dropped: 0,
                });
            }
        } else {
            self.hpack[si].decode_truncated(bytes, add);
            self.stats.blocks_truncated += 1;
            anomalies.push(Anomaly::Desync {
                side,
                reason: DesyncReason::HeadTruncated,
                dropped: 0,
            });
        }
        if block.push {
            // A promised request: its block only matters to the HPACK table. The frame is one of
            // the associated stream's.
            if let Some(st) = self.streams.get_mut(&block.stream) {
                match side {
                    Side::Response => {
                        st.response_bytes += block.bytes;
                        st.resp_ts = block.end_ts;
                    }
                    // Clients never push (RFC 9113 §8.4); the bytes are still the client's.
                    Side::Request => st.request_bytes += block.bytes,
                }
            }
            return;
        }
        let id = block.stream;
        match side {
            Side::Request => self.request_block(block, fields, anomalies, done),
            Side::Response => self.response_block(block, fields, anomalies),
        }
        self.complete_if_done(id, done);
    }

    fn request_block(
        &mut self,
        block: Block,
        fields: Fields,
        anomalies: &mut Vec<Anomaly>,
        done: &mut Vec<Call>,
    ) {
        let id = block.stream;
        if let Some(st) = self.streams.get_mut(&id) {
            // Trailers of the request.
            st.request_bytes += block.bytes;
            st.req_ended |= block.end_stream;
            if block.oversized {
                self.streams.remove(&id);
                anomalies.push(Anomaly::Desync {
                    side: Side::Request,
                    reason: DesyncReason::HeadTruncated,
                    dropped: 1,
                });
            }
            return;
        }
        // A new request: an odd stream above those seen, with a request head (not the trailers
        // of a stream opened before the probe attached or in a gap), or a block too cut to tell.
        if id.is_multiple_of(2)
            || id <= self.max_request_stream
            || !(fields.pseudo || !block.complete || block.oversized)
        {
            return;
        }
        self.max_request_stream = id;
        if block.oversized {
            anomalies.push(Anomaly::Desync {
                side: Side::Request,
                reason: DesyncReason::HeadTruncated,
                dropped: 1,
            });
            return;
        }
        if self.streams.len() >= MAX_STREAMS {
            self.stats.streams_over_limit += 1;
            return;
        }
        let st = Stream {
            id,
            start_ts: block.start_ts,
            request_bytes: block.bytes,
            req_ended: block.end_stream,
            req: fields,
            ..Stream::default()
        };
        match self.goaway {
            // Sent after the server's GOAWAY: never processed.
            Some((last, code)) if id > last => {
                done.push(st.into_call(Some(format!("GOAWAY {}", code_text(code)))));
            }
            _ => {
                self.streams.insert(id, st);
            }
        }
    }

    fn response_block(&mut self, block: Block, fields: Fields, anomalies: &mut Vec<Anomaly>) {
        let id = block.stream;
        let Some(st) = self.streams.get_mut(&id) else {
            if fields.status.is_some() && id % 2 == 1 {
                self.stats.unmatched_responses += 1;
                anomalies.push(Anomaly::UnmatchedResponse);
            }
            return;
        };
        st.response_bytes += block.bytes;
        st.resp_ts = block.end_ts;
        if block.oversized {
            self.streams.remove(&id);
            anomalies.push(Anomaly::Desync {
                side: Side::Response,
                reason: DesyncReason::HeadTruncated,
                dropped: 1,
            });
            return;
        }
        st.resp_ended |= block.end_stream;
        if st.head_seen {
            // Trailers: only gRPC's status matters.
            if fields.grpc_status.is_some() {
                st.resp.grpc_status = fields.grpc_status;
                st.resp.grpc_message = fields.grpc_message;
            }
        } else if fields.status.is_some_and(|s| (100..200).contains(&s)) && !block.end_stream {
            // An interim response (100 Continue, 103 Early Hints): the final one follows.
        } else {
            st.head_seen = true;
            st.resp.merge(fields);
        }
    }

    fn complete_if_done(&mut self, id: u32, done: &mut Vec<Call>) {
        if self
            .streams
            .get(&id)
            .is_some_and(|s| s.req_ended && s.resp_ended)
            && let Some(st) = self.streams.remove(&id)
        {
            done.push(st.into_call(None));
        }
    }

    /// Framing of one side was lost: what that side's frames would have told (ends, header
    /// blocks, table insertions) is unknown, so the streams still waiting on that side are
    /// given up and its HPACK table forgotten.
    fn desync(&mut self, side: Side, reason: DesyncReason, anomalies: &mut Vec<Anomaly>) {
        let si = index(side);
        self.hpack[si].mark_unsynced();
        self.blocks[si] = None;
        self.stats.resyncs += 1;
        let before = self.streams.len();
        self.streams.retain(|_, st| match side {
            Side::Request => st.req_ended,
            Side::Response => st.resp_ended,
        });
        anomalies.push(Anomaly::Desync {
            side,
            reason,
            dropped: before - self.streams.len(),
        });
    }
}

impl Conn {
    /// A hunting side passed over bytes. Streams waiting on that side were given up when
    /// framing was lost, but requests seen since (on the other side) may have had frames among
    /// these bytes too: give them up as well, so that every reported call is exact.
    fn skipped(&mut self, side: Side, reason: DesyncReason, anomalies: &mut Vec<Anomaly>) {
        self.hpack[index(side)].mark_unsynced();
        let before = self.streams.len();
        self.streams.retain(|_, st| match side {
            Side::Request => st.req_ended,
            Side::Response => st.resp_ended,
        });
        let dropped = before - self.streams.len();
        if dropped > 0 {
            anomalies.push(Anomaly::Desync {
                side,
                reason,
                dropped,
            });
        }
    }
}

fn read_u32(b: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(..4)?.try_into().ok()?))
}

impl Stream {
    fn into_call(self, error: Option<String>) -> Call {
        let Stream { req, resp, .. } = &self;
        let content_type = req.content_type.as_deref().or(resp.content_type.as_deref());
        let grpc = match content_type {
            Some(ct) => ct.starts_with("application/grpc"),
            None => resp.grpc_status.is_some(),
        };
        let mut attributes = Vec::new();
        if grpc {
            attributes.push(("rpc.system".to_string(), "grpc".to_string()));
            if let Some((service, method)) = req
                .path
                .as_deref()
                .and_then(|p| p.strip_prefix('/'))
                .and_then(|p| p.split_once('/'))
                .filter(|(s, m)| !s.is_empty() && !m.is_empty() && !m.contains('/'))
            {
                attributes.push(("rpc.service".to_string(), service.to_string()));
                attributes.push(("rpc.method".to_string(), method.to_string()));
            }
        }
        if let Some(authority) = req.authority.as_deref().or(req.host.as_deref()) {
            let (host, port) = split_authority(authority);
            attributes.push(("server.address".to_string(), host.to_string()));
            if let Some(port) = port {
                attributes.push(("server.port".to_string(), port.to_string()));
            }
        }
        attributes.push(("http2.stream".to_string(), self.id.to_string()));
        let decoded: Vec<&str> = [
            ("method", req.method.is_some()),
            ("path", req.path.is_some()),
            ("status", resp.status.is_some()),
        ]
        .iter()
        .filter(|(_, d)| *d)
        .map(|(n, _)| *n)
        .collect();
        attributes.push(("decoded".to_string(), decoded.join(",")));
        let grpc_status = resp.grpc_status;
        let error = error.or_else(|| {
            grpc_status
                .filter(|s| *s != 0)
                .map(|s| match resp.grpc_message.as_deref() {
                    Some(m) if !m.is_empty() => format!("grpc-status {s}: {m}"),
                    _ => format!("grpc-status {s}"),
                })
        });
        let Stream { req, resp, .. } = self;
        Call {
            protocol: if grpc { "grpc" } else { "http2" },
            method: req.method.unwrap_or_default(),
            path: req.path.unwrap_or_default(),
            status: resp.status,
            grpc_status,
            error,
            start_ts: self.start_ts,
            end_ts: self.resp_ts,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            request_id: req.request_id,
            traceparent: req.traceparent,
            user_agent: req.user_agent,
            attributes,
        }
    }
}

/// `host:port` (or `[v6]:port`) into host and port.
fn split_authority(a: &str) -> (&str, Option<&str>) {
    let a = a.rsplit_once('@').map_or(a, |(_, h)| h);
    if let Some(rest) = a.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((host, tail)) => (host, tail.strip_prefix(':').filter(|p| !p.is_empty())),
            None => (a, None),
        };
    }
    match a.rsplit_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, Some(port))
        }
        _ => (a, None),
    }
}

/// HTTP/2 state of one connection: a frame reader per side and the streams in flight.
#[derive(Debug)]
pub struct Http2Exchange {
    readers: [FrameReader; 2],
    conn: Conn,
}

impl Http2Exchange {
    /// A decoder for a connection seen from its start (the request side begins with the client
    /// preface), or, `midstream`, from anywhere: framing is found by hunting and HPACK tables
    /// start unknown.
    pub fn new(midstream: bool) -> Self {
        let (request, response) = if midstream {
            (ReadState::Hunting, ReadState::Hunting)
        } else {
            (ReadState::Preface(0), ReadState::Header)
        };
        Self {
            readers: [
                FrameReader::new(Side::Request, request),
                FrameReader::new(Side::Response, response),
            ],
            conn: Conn {
                streams: BTreeMap::new(),
                hpack: [HpackDecoder::new(!midstream), HpackDecoder::new(!midstream)],
                blocks: [None, None],
                max_request_stream: 0,
                goaway: None,
                stats: Http2Stats::default(),
            },
        }
    }

    /// A connection that switched from HTTP/1.1 by an `Upgrade: h2c` request the server
    /// accepted (101): that request is stream 1, half-closed by the client, answered in HTTP/2
    /// (RFC 7540 section 3.2). Both sides continue with their connection prefaces.
    pub fn upgraded(request: &crate::http1::Head, start_ts: u64, request_bytes: u64) -> Self {
        let mut h2 = Self::new(false);
        let req = Fields {
            method: Some(request.method.clone()),
            path: Some(request.path.clone()),
            host: request.host.clone(),
            user_agent: request.user_agent.clone(),
            request_id: request.request_id.clone(),
            traceparent: request.traceparent.clone(),
            pseudo: true,
            ..Fields::default()
        };
        h2.conn.streams.insert(
            1,
            Stream {
                id: 1,
                start_ts,
                request_bytes,
                req_ended: true,
                req,
                ..Stream::default()
            },
        );
        h2.conn.max_request_stream = 1;
        h2
    }

    /// Counters of what was given up or not paired.
    pub fn stats(&self) -> Http2Stats {
        self.conn.stats
    }

    /// Whether a side's HPACK table is fully known (false after attaching mid-connection until
    /// a size update proves it, and after a lost header block).
    pub fn hpack_synced(&self, side: Side) -> bool {
        self.conn.hpack[index(side)].is_synced()
    }
}

impl Decoder for Http2Exchange {
    fn on_bytes(
        &mut self,
        side: Side,
        ts: u64,
        prefix: &[u8],
        len: u64,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let Self { readers, conn } = self;
        readers[index(side)].feed(ts, prefix, len, &mut |event| match event {
            Event::Frame(frame) => conn.on_frame(side, frame, done, anomalies),
            Event::Lost(reason) => conn.desync(side, reason, anomalies),
            Event::Skipped(reason) => conn.skipped(side, reason, anomalies),
        });
    }

    fn gap(&mut self, side: Side, anomalies: &mut Vec<Anomaly>) {
        self.readers[index(side)].reset_lost(DesyncReason::EventsLost);
        self.conn.desync(side, DesyncReason::EventsLost, anomalies);
    }

    fn close(&mut self, reset: bool, done: &mut Vec<Call>) -> Vec<Call> {
        let error = if reset {
            "connection reset before the response"
        } else {
            "connection closed before the response"
        };
        let mut unanswered = Vec::new();
        for st in std::mem::take(&mut self.conn.streams).into_values() {
            if st.resp_ended {
                // Answered; only the request's end was not seen.
                done.push(st.into_call(None));
            } else {
                unanswered.push(st.into_call(Some(error.to_string())));
            }
        }
        unanswered
    }

    fn in_flight(&self) -> usize {
        self.conn.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::hpack::encoder::{Encoder, Mode};

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.push(ty);
        f.push(flags);
        f.extend(stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A header block as HEADERS and `continuations` CONTINUATION frames, optionally padded and
    /// with a priority.
    fn headers_frames(
        stream: u32,
        block: &[u8],
        end_stream: bool,
        continuations: usize,
        pad: Option<u8>,
        priority: bool,
    ) -> Vec<u8> {
        let parts = continuations + 1;
        let size = block.len().div_ceil(parts).max(1);
        let mut chunks: Vec<&[u8]> = block.chunks(size).collect();
        while chunks.len() < parts {
            chunks.push(&[]);
        }
        let mut out = Vec::new();
        for (i, chunk) in chunks.iter().enumerate() {
            let last = i + 1 == chunks.len();
            let eh = if last { END_HEADERS } else { 0 };
            if i == 0 {
                let mut flags = eh;
                let mut payload = Vec::new();
                if let Some(p) = pad {
                    flags |= PADDED;
                    payload.push(p);
                }
                if priority {
                    flags |= PRIORITY_FLAG;
                    payload.extend([0x80, 0, 0, 0, 15]);
                }
                if end_stream {
                    flags |= END_STREAM;
                }
                payload.extend_from_slice(chunk);
                payload.extend(std::iter::repeat_n(0, usize::from(pad.unwrap_or(0))));
                out.extend(frame(HEADERS, flags, stream, &payload));
            } else {
                out.extend(frame(CONTINUATION, eh, stream, chunk));
            }
        }
        out
    }

    fn data(stream: u32, len: usize, end: bool, pad: Option<u8>) -> Vec<u8> {
        let mut payload = Vec::new();
        let mut flags = if end { END_STREAM } else { 0 };
        if let Some(p) = pad {
            flags |= PADDED;
            payload.push(p);
        }
        payload.extend((0..len).map(|i| (i * 7 + stream as usize) as u8));
        payload.extend(std::iter::repeat_n(0, usize::from(pad.unwrap_or(0))));
        frame(DATA, flags, stream, &payload)
    }

    fn rst(stream: u32, code: u32) -> Vec<u8> {
        frame(RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    fn settings() -> Vec<u8> {
        frame(
            SETTINGS,
            0,
            0,
            &[0, 4, 0, 0, 0xff, 0xff, 0, 3, 0, 0, 0, 100],
        )
    }

    fn goaway(last: u32, code: u32) -> Vec<u8> {
        let mut p = last.to_be_bytes().to_vec();
        p.extend(code.to_be_bytes());
        p.extend(b"bye");
        frame(GOAWAY, 0, 0, &p)
    }

    /// Feeds pieces and keeps what comes out.
    struct Feeder {
        x: Http2Exchange,
        done: Vec<Call>,
        an: Vec<Anomaly>,
        ts: u64,
    }

    impl Feeder {
        fn new(midstream: bool) -> Self {
            Self {
                x: Http2Exchange::new(midstream),
                done: Vec::new(),
                an: Vec::new(),
                ts: 0,
            }
        }

        /// One piece, all captured; returns its time.
        fn feed(&mut self, side: Side, bytes: &[u8]) -> u64 {
            self.feed_capped(side, bytes, usize::MAX)
        }

        /// One piece of which only `prefix` bytes were captured.
        fn feed_capped(&mut self, side: Side, bytes: &[u8], prefix: usize) -> u64 {
            self.ts += 1;
            let cap = &bytes[..bytes.len().min(prefix)];
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

        fn attr(call: &Call, key: &str) -> Option<String> {
            call.attributes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.clone())
        }
    }

    const REQ: Side = Side::Request;
    const RESP: Side = Side::Response;

    fn grpc_request(path: &str) -> Vec<(&str, &str)> {
        vec![
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", "checkout.svc:50051"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            ("user-agent", "grpc-go/1.60.0"),
            ("x-request-id", "req-1"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ]
    }

    fn connection_start() -> (Vec<u8>, Vec<u8>) {
        let mut req = PREFACE.to_vec();
        req.extend(settings());
        let mut resp = settings();
        resp.extend(frame(SETTINGS, ACK, 0, &[]));
        (req, resp)
    }

    #[test]
    fn a_grpc_call_with_trailers_after_data() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        let block = renc.block(&grpc_request("/shop.Checkout/PlaceOrder"), Mode::Index);
        let mut req = headers_frames(1, &block, false, 0, None, false);
        req.extend(data(1, 20, true, None));
        let t_req = f.feed(REQ, &req);
        let head = senc.block(
            &[(":status", "200"), ("content-type", "application/grpc")],
            Mode::Index,
        );
        let mut resp = headers_frames(1, &head, false, 0, None, false);
        resp.extend(data(1, 100, false, None));
        f.feed(RESP, &resp);
        let trailers = senc.block(&[("grpc-status", "0")], Mode::Index);
        let tr = headers_frames(1, &trailers, true, 0, None, false);
        let t_end = f.feed(RESP, &tr);
        assert!(f.an.is_empty(), "{:?}", f.an);
        assert_eq!(f.done.len(), 1);
        let c = &f.done[0];
        assert_eq!(c.protocol, "grpc");
        assert_eq!(
            (c.method.as_str(), c.path.as_str()),
            ("POST", "/shop.Checkout/PlaceOrder")
        );
        assert_eq!(
            (c.status, c.grpc_status, c.error.as_deref()),
            (Some(200), Some(0), None)
        );
        assert_eq!((c.start_ts, c.end_ts), (t_req, t_end));
        assert_eq!(c.request_bytes, req.len() as u64);
        assert_eq!(c.response_bytes, (resp.len() + tr.len()) as u64);
        assert_eq!(c.user_agent.as_deref(), Some("grpc-go/1.60.0"));
        assert_eq!(c.request_id.as_deref(), Some("req-1"));
        assert!(
            c.traceparent
                .as_deref()
                .is_some_and(|t| t.starts_with("00-4bf9"))
        );
        let attr = |k| Feeder::attr(c, k);
        assert_eq!(attr("rpc.system").as_deref(), Some("grpc"));
        assert_eq!(attr("rpc.service").as_deref(), Some("shop.Checkout"));
        assert_eq!(attr("rpc.method").as_deref(), Some("PlaceOrder"));
        assert_eq!(attr("server.address").as_deref(), Some("checkout.svc"));
        assert_eq!(attr("server.port").as_deref(), Some("50051"));
        assert_eq!(attr("http2.stream").as_deref(), Some("1"));
        assert_eq!(attr("decoded").as_deref(), Some("method,path,status"));
        assert_eq!(f.x.in_flight(), 0);
    }

    /// Found by fuzzing (fuzz/regressions/http2/push-promise-from-client): a PUSH_PROMISE sent
    /// by the client (invalid) counted as response bytes of its stream.
    #[test]
    fn a_client_push_promise_counts_as_request_bytes() {
        let (mut renc, mut senc) = (Encoder::new(false), Encoder::new(false));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        let block = renc.block(&grpc_request("/a.B/C"), Mode::Index);
        let mut req = headers_frames(1, &block, false, 0, None, false);
        let mut promise = 2u32.to_be_bytes().to_vec();
        promise.extend(renc.block(&[(":method", "GET")], Mode::WithoutIndexing));
        req.extend(frame(PUSH_PROMISE, END_HEADERS, 1, &promise));
        req.extend(data(1, 5, true, None));
        f.feed(REQ, &req);
        let head = senc.block(&[(":status", "200"), ("grpc-status", "0")], Mode::Index);
        let resp = headers_frames(1, &head, true, 0, None, false);
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert_eq!(f.done[0].request_bytes, req.len() as u64);
        assert_eq!(f.done[0].response_bytes, resp.len() as u64);
    }

    #[test]
    fn trailers_only_and_grpc_errors() {
        let (mut renc, mut senc) = (Encoder::new(false), Encoder::new(false));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        for id in [1, 3] {
            let block = renc.block(&grpc_request("/a.B/C"), Mode::Index);
            let mut req = headers_frames(id, &block, false, 0, None, false);
            req.extend(data(id, 5, true, None));
            f.feed(REQ, &req);
        }
        // Trailers-Only: one HEADERS with the status and END_STREAM.
        let only = senc.block(
            &[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "14"),
                ("grpc-message", "upstream%20unavailable"),
            ],
            Mode::Index,
        );
        f.feed(RESP, &headers_frames(3, &only, true, 0, None, false));
        // Trailers after data, with an error.
        let head = senc.block(&[(":status", "200")], Mode::Index);
        let mut resp = headers_frames(1, &head, false, 0, None, false);
        resp.extend(data(1, 3, false, None));
        let tr = senc.block(
            &[("grpc-status", "5"), ("grpc-message", "order not found")],
            Mode::Index,
        );
        resp.extend(headers_frames(1, &tr, true, 0, None, false));
        f.feed(RESP, &resp);
        let ids: Vec<_> = f
            .done
            .iter()
            .map(|c| Feeder::attr(c, "http2.stream"))
            .collect();
        assert_eq!(ids, [Some("3".into()), Some("1".into())]);
        assert_eq!(f.done[0].grpc_status, Some(14));
        assert_eq!(f.done[0].status, Some(200));
        assert_eq!(
            f.done[0].error.as_deref(),
            Some("grpc-status 14: upstream unavailable")
        );
        assert_eq!(f.done[1].grpc_status, Some(5));
        assert_eq!(
            f.done[1].error.as_deref(),
            Some("grpc-status 5: order not found")
        );
    }

    #[test]
    fn continuation_padding_priority_and_interim_responses() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        let block = renc.block(
            &[
                (":method", "PUT"),
                (":scheme", "https"),
                (":path", "/upload/photo?size=large"),
                (":authority", "[::1]:8443"),
                ("content-type", "image/png"),
                ("expect", "100-continue"),
            ],
            Mode::Incremental,
        );
        let mut req = headers_frames(1, &block, false, 3, Some(7), true);
        req.extend(frame(PRIORITY, 0, 1, &[0, 0, 0, 0, 20]));
        req.extend(frame(WINDOW_UPDATE, 0, 1, &[0, 0, 1, 0]));
        let req_data = data(1, 300, true, Some(10));
        let t0 = f.feed(REQ, &req);
        let interim = senc.block(&[(":status", "100")], Mode::Index);
        let interim = headers_frames(1, &interim, false, 0, Some(3), false);
        f.feed(RESP, &interim);
        f.feed(REQ, &req_data);
        let head = senc.block(
            &[(":status", "201"), ("content-type", "text/plain")],
            Mode::Index,
        );
        let resp = headers_frames(1, &head, true, 2, Some(0), false);
        let t1 = f.feed(RESP, &resp);
        assert!(f.an.is_empty(), "{:?}", f.an);
        let c = &f.done[0];
        assert_eq!(c.protocol, "http2");
        assert_eq!(
            (c.method.as_str(), c.path.as_str(), c.status),
            ("PUT", "/upload/photo?size=large", Some(201))
        );
        assert_eq!(Feeder::attr(c, "server.address").as_deref(), Some("::1"));
        assert_eq!(Feeder::attr(c, "rpc.system"), None);
        // PRIORITY and WINDOW_UPDATE are not the request's message.
        let prio_wu = 9 + 5 + 9 + 4;
        assert_eq!(
            c.request_bytes,
            (req.len() - prio_wu + req_data.len()) as u64
        );
        assert_eq!(c.response_bytes, (interim.len() + resp.len()) as u64);
        assert_eq!((c.start_ts, c.end_ts), (t0, t1));
    }

    /// Every byte in its own piece: times are those of the first and last bytes.
    #[test]
    fn frames_split_byte_by_byte() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let (mut req, mut resp) = connection_start();
        let req_start = req.len();
        let block = renc.block(&grpc_request("/a.B/C"), Mode::Index);
        req.extend(headers_frames(1, &block, false, 1, Some(2), true));
        req.extend(data(1, 10, true, None));
        let head = senc.block(&[(":status", "200")], Mode::Index);
        resp.extend(headers_frames(1, &head, false, 0, None, false));
        resp.extend(data(1, 10, false, None));
        let tr = senc.block(&[("grpc-status", "0")], Mode::Index);
        resp.extend(headers_frames(1, &tr, true, 1, None, false));
        let mut f = Feeder::new(false);
        let mut t_first = 0;
        for (i, b) in req.iter().enumerate() {
            let t = f.feed(REQ, std::slice::from_ref(b));
            if i == req_start {
                t_first = t;
            }
        }
        let mut t_last = 0;
        for b in &resp {
            t_last = f.feed(RESP, std::slice::from_ref(b));
        }
        assert!(f.an.is_empty(), "{:?}", f.an);
        assert_eq!(f.done.len(), 1);
        assert_eq!((f.done[0].start_ts, f.done[0].end_ts), (t_first, t_last));
        assert_eq!(f.done[0].request_bytes, (req.len() - req_start) as u64);
        assert_eq!(f.done[0].grpc_status, Some(0));
    }

    #[test]
    fn the_preface_inside_a_buffer_and_split() {
        let mut renc = Encoder::new(false);
        let mut senc = Encoder::new(false);
        let block = renc.block(&[(":method", "GET"), (":path", "/x")], Mode::Index);
        let mut req = PREFACE.to_vec();
        req.extend(settings());
        req.extend(headers_frames(1, &block, true, 0, None, false));
        let head = senc.block(&[(":status", "204")], Mode::Index);
        let resp = headers_frames(1, &head, true, 0, None, false);
        // Preface, SETTINGS and HEADERS in one buffer.
        let mut f = Feeder::new(false);
        f.feed(REQ, &req);
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert_eq!(f.done[0].path, "/x");
        // The same split inside the preface.
        let mut f = Feeder::new(false);
        f.feed(REQ, &req[..5]);
        f.feed(REQ, &req[5..30]);
        f.feed(REQ, &req[30..]);
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert!(f.an.is_empty());
        // Created mid-stream but the preface comes after all: found by hunting.
        let mut f = Feeder::new(true);
        f.feed(REQ, &req);
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert_eq!(f.done[0].path, "/x");
    }

    #[test]
    fn many_interleaved_streams() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        let ids: Vec<u32> = (0..300).map(|i| 2 * i + 1).collect();
        let mut req = Vec::new();
        for &id in &ids {
            let path = format!("/svc.S/M{}", id % 7);
            let block = renc.block(&grpc_request(&path), Mode::Index);
            req.extend(headers_frames(id, &block, false, 0, None, false));
        }
        for &id in ids.iter().rev() {
            req.extend(data(id, 40, true, None));
        }
        f.feed(REQ, &req);
        let mut resp = Vec::new();
        for &id in &ids {
            let block = senc.block(&[(":status", "200")], Mode::Index);
            resp.extend(headers_frames(id, &block, false, 0, None, false));
            resp.extend(data(id, 10, false, None));
        }
        for &id in &ids {
            let status = (id % 3).to_string();
            let block = senc.block(&[("grpc-status", status.as_str())], Mode::Index);
            resp.extend(headers_frames(id, &block, true, 0, None, false));
        }
        for piece in resp.chunks(1000) {
            f.feed(RESP, piece);
        }
        assert!(f.an.is_empty(), "{:?}", f.an);
        assert_eq!(f.done.len(), ids.len());
        for c in &f.done {
            let id: u32 = Feeder::attr(c, "http2.stream").unwrap().parse().unwrap();
            assert_eq!(c.path, format!("/svc.S/M{}", id % 7));
            assert_eq!(c.grpc_status, Some((id % 3) as i32));
            assert_eq!(c.request_bytes, c.request_bytes.max(1));
        }
    }

    #[test]
    fn rst_stream_from_either_side() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        for id in [1, 3, 5] {
            let block = renc.block(&grpc_request("/a.B/Slow"), Mode::Index);
            f.feed(REQ, &headers_frames(id, &block, false, 0, None, false));
        }
        // The client cancels 1; the server refuses 3.
        f.feed(REQ, &rst(1, 8));
        let t = f.feed(RESP, &rst(3, 7));
        // 5: a complete response, then RST(NO_ERROR) stops the request body.
        let head = senc.block(&[(":status", "200"), ("grpc-status", "0")], Mode::Index);
        f.feed(RESP, &headers_frames(5, &head, true, 0, None, false));
        f.feed(RESP, &rst(5, 0));
        let by_id = |id: &str| {
            f.done
                .iter()
                .find(|c| Feeder::attr(c, "http2.stream").as_deref() == Some(id))
                .unwrap()
        };
        assert_eq!(by_id("1").error.as_deref(), Some("RST_STREAM CANCEL"));
        assert_eq!(by_id("1").end_ts, 0);
        assert_eq!(
            by_id("3").error.as_deref(),
            Some("RST_STREAM REFUSED_STREAM")
        );
        assert_eq!(by_id("3").end_ts, t);
        assert_eq!(by_id("3").response_bytes, 13);
        assert_eq!(by_id("5").error, None);
        assert_eq!(by_id("5").grpc_status, Some(0));
        assert_eq!(f.x.in_flight(), 0);
    }

    #[test]
    fn goaway_ends_streams_above_the_last_id_unanswered() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        for id in [1, 3, 5, 7] {
            let block = renc.block(&[(":method", "GET"), (":path", "/g")], Mode::Index);
            f.feed(REQ, &headers_frames(id, &block, true, 0, None, false));
        }
        f.feed(RESP, &goaway(3, 0));
        let ended: Vec<_> = f.done.iter().map(|c| (c.error.clone(), c.end_ts)).collect();
        assert_eq!(
            ended,
            vec![
                (Some("GOAWAY NO_ERROR".into()), 0),
                (Some("GOAWAY NO_ERROR".into()), 0)
            ]
        );
        // 1 and 3 are still answered.
        for id in [1, 3] {
            let block = senc.block(&[(":status", "200")], Mode::Index);
            f.feed(RESP, &headers_frames(id, &block, true, 0, None, false));
        }
        assert_eq!(f.done.len(), 4);
        assert_eq!(f.done[3].status, Some(200));
        // A request sent after the GOAWAY is not processed either.
        let block = renc.block(&[(":method", "GET"), (":path", "/g")], Mode::Index);
        f.feed(REQ, &headers_frames(9, &block, true, 0, None, false));
        assert_eq!(f.done[4].error.as_deref(), Some("GOAWAY NO_ERROR"));
    }

    #[test]
    fn headers_longer_than_the_captured_prefix() {
        let (mut renc, mut senc) = (Encoder::new(false), Encoder::new(false));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        let cookie = "c".repeat(3000);
        let block = renc.block(
            &[
                (":method", "GET"),
                (":path", "/big"),
                ("cookie", cookie.as_str()),
                ("user-agent", "curl/8"),
            ],
            Mode::Incremental,
        );
        let req = headers_frames(1, &block, true, 0, None, false);
        // 1024 captured of ~3040: the path is read, the rest of the block is not.
        f.feed_capped(REQ, &req, 1024);
        let head = senc.block(&[(":status", "200")], Mode::Index);
        let resp = headers_frames(1, &head, true, 0, None, false);
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        let c = &f.done[0];
        assert_eq!((c.path.as_str(), c.user_agent.as_deref()), ("/big", None));
        assert_eq!(
            Feeder::attr(c, "decoded").as_deref(),
            Some("method,path,status")
        );
        assert_eq!(c.request_bytes, req.len() as u64);
        assert_eq!(
            f.an,
            vec![Anomaly::Desync {
                side: REQ,
                reason: DesyncReason::HeadTruncated,
                dropped: 0
            }]
        );
        assert!(!f.x.hpack_synced(REQ));
        // The next request refers to entries of the cut block: unknown, not guessed.
        let block = renc.block(
            &[
                (":method", "GET"),
                (":path", "/big"),
                ("user-agent", "curl/8"),
            ],
            Mode::Index,
        );
        f.feed(REQ, &headers_frames(3, &block, true, 0, None, false));
        f.feed(
            RESP,
            &headers_frames(
                3,
                &senc.block(&[(":status", "200")], Mode::Index),
                true,
                0,
                None,
                false,
            ),
        );
        let c = &f.done[1];
        assert_eq!(
            (c.method.as_str(), c.path.as_str(), c.user_agent.as_deref()),
            ("GET", "", None)
        );
        assert_eq!(Feeder::attr(c, "decoded").as_deref(), Some("method,status"));
        // A block cut before the path: the path is unknown.
        let mut f2 = Feeder::new(false);
        f2.feed(REQ, &req0);
        let mut renc = Encoder::new(false);
        let block = renc.block(
            &[
                (":method", "GET"),
                ("cookie", cookie.as_str()),
                (":path", "/late"),
            ],
            Mode::WithoutIndexing,
        );
        f2.feed_capped(REQ, &headers_frames(1, &block, true, 0, None, false), 100);
        f2.feed(RESP, &resp);
        assert_eq!(
            Feeder::attr(&f2.done[0], "decoded").as_deref(),
            Some("method,status")
        );
    }

    #[test]
    fn attach_mid_connection_then_a_size_update_syncs() {
        let (mut renc, mut senc) = (Encoder::new(true), Encoder::new(true));
        let (mut req, mut resp) = connection_start();
        let mut calls = |req: &mut Vec<u8>, resp: &mut Vec<u8>, id: u32, size_update: bool| {
            let mut block = Vec::new();
            if size_update {
                renc.size_update(&mut block, 0);
                renc.size_update(&mut block, 4096);
            }
            block.extend(renc.block(&grpc_request("/inventory.Stock/Reserve"), Mode::Index));
            req.extend(headers_frames(id, &block, false, 0, None, false));
            req.extend(data(id, 30, true, None));
            let head = senc.block(
                &[(":status", "200"), ("content-type", "application/grpc")],
                Mode::Index,
            );
            resp.extend(headers_frames(id, &head, false, 0, None, false));
            resp.extend(data(id, 30, false, None));
            let tr = senc.block(&[("grpc-status", "0")], Mode::Index);
            resp.extend(headers_frames(id, &tr, true, 0, None, false));
        };
        calls(&mut req, &mut resp, 1, false);
        let (req_attach, resp_attach) = (req.len(), resp.len());
        calls(&mut req, &mut resp, 3, false);
        let (req_sync, resp_sync) = (req.len(), resp.len());
        calls(&mut req, &mut resp, 5, true);
        calls(&mut req, &mut resp, 7, false);
        // Attach in the middle of stream 1's frames: the end of its response, then stream 3's
        // request a few bytes after its start.
        let mut f = Feeder::new(true);
        f.feed(RESP, &resp[resp_attach - 7..resp_attach]);
        f.feed(REQ, &req[req_attach - 20..req_sync]);
        f.feed(RESP, &resp[resp_attach..resp_sync]);
        assert_eq!(f.done.len(), 1, "{:?}", f.an);
        let c = &f.done[0];
        // :method POST is static; the path, content-type and grpc-status were indexed in the
        // dynamic table before the attach.
        assert_eq!((c.method.as_str(), c.path.as_str()), ("POST", ""));
        assert_eq!(Feeder::attr(c, "decoded").as_deref(), Some("method,status"));
        assert_eq!((c.status, c.grpc_status), (Some(200), None));
        assert_eq!(c.protocol, "http2");
        assert_eq!(c.request_bytes, (req_sync - req_attach) as u64);
        // Stream 5's block starts with a size update to 0: the request side is in sync again.
        f.feed(REQ, &req[req_sync..]);
        f.feed(RESP, &resp[resp_sync..]);
        assert!(f.x.hpack_synced(REQ));
        assert!(!f.x.hpack_synced(RESP));
        assert_eq!(f.done.len(), 3);
        for c in &f.done[1..] {
            assert_eq!(c.path, "/inventory.Stock/Reserve");
            assert_eq!(c.protocol, "grpc");
            assert_eq!(
                Feeder::attr(c, "decoded").as_deref(),
                Some("method,path,status")
            );
        }
        assert!(f.an.is_empty(), "{:?}", f.an);
    }

    #[test]
    fn a_gap_drops_what_is_in_flight_on_that_side_and_framing_is_found_again() {
        let (mut renc, mut senc) = (Encoder::new(false), Encoder::new(false));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        for id in [1, 3] {
            let block = renc.block(&[(":method", "GET"), (":path", "/a")], Mode::Index);
            f.feed(REQ, &headers_frames(id, &block, true, 0, None, false));
        }
        let head = senc.block(&[(":status", "200")], Mode::Index);
        f.feed(RESP, &headers_frames(1, &head, false, 0, None, false));
        f.x.gap(RESP, &mut f.an);
        assert_eq!(
            f.an,
            vec![Anomaly::Desync {
                side: RESP,
                reason: DesyncReason::EventsLost,
                dropped: 2
            }]
        );
        // The rest of stream 1's data (no frame boundary in it), then a new call: framing is
        // found at its response.
        f.feed(RESP, &data(1, 50, true, None)[20..]);
        let block = renc.block(&[(":method", "GET"), (":path", "/b")], Mode::Index);
        f.feed(REQ, &headers_frames(5, &block, true, 0, None, false));
        let head = senc.block(&[(":status", "200"), ("x-n", "5")], Mode::Index);
        let mut resp = headers_frames(5, &head, false, 0, None, false);
        resp.extend(data(5, 5, true, None));
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert_eq!(
            (f.done[0].path.as_str(), f.done[0].status),
            ("/b", Some(200))
        );
        assert_eq!(f.x.stats().resyncs, 1);
        assert_eq!(f.an.len(), 1);
        // Lost again; a request sent while the response side hunts may have had its response
        // in the bytes passed over: given up too, so what is reported stays exact.
        f.x.gap(RESP, &mut f.an);
        let block = renc.block(&[(":method", "GET"), (":path", "/c")], Mode::Index);
        f.feed(REQ, &headers_frames(7, &block, true, 0, None, false));
        let mut resp = vec![0xaa; 5];
        let head = senc.block(&[(":status", "200")], Mode::Index);
        resp.extend(headers_frames(7, &head, true, 0, None, false));
        f.feed(RESP, &resp);
        assert_eq!(f.done.len(), 1);
        assert_eq!(
            f.an[2],
            Anomaly::Desync {
                side: RESP,
                reason: DesyncReason::EventsLost,
                dropped: 1
            }
        );
    }

    #[test]
    fn a_frame_header_beyond_the_capture_loses_framing_until_the_next_piece() {
        let (mut renc, mut senc) = (Encoder::new(false), Encoder::new(false));
        let mut f = Feeder::new(false);
        let (req0, resp0) = connection_start();
        f.feed(REQ, &req0);
        f.feed(RESP, &resp0);
        for id in [1, 3] {
            let block = renc.block(&[(":method", "GET"), (":path", "/a")], Mode::Index);
            f.feed(REQ, &headers_frames(id, &block, true, 0, None, false));
        }
        // One write: headers, 2000 bytes of data, trailers; 1024 captured.
        let head = senc.block(&[(":status", "200")], Mode::Index);
        let mut w = headers_frames(1, &head, false, 0, None, false);
        w.extend(data(1, 2000, false, None));
        w.extend(headers_frames(
            1,
            &senc.block(&[("grpc-status", "0")], Mode::Index),
            true,
            0,
            None,
            false,
        ));
        f.feed_capped(RESP, &w, 1024);
        assert_eq!(
            f.an,
            vec![Anomaly::Desync {
                side: RESP,
                reason: DesyncReason::HeadTruncated,
                dropped: 2
            }]
        );
        // A data frame alone beyond the prefix is skipped by count, framing kept.
        let block = renc.block(&[(":method", "GET"), (":path", "/c")], Mode::Index);
        f.feed(REQ, &headers_frames(5, &block, true, 0, None, false));
        let head = senc.block(&[(":status", "200")], Mode::Index);
        let head = headers_frames(5, &head, false, 0, None, false);
        f.feed(RESP, &head);
        let big = data(5, 5000, true, None);
        f.feed_capped(RESP, &big, 1024);
        assert_eq!(f.done.len(), 1);
        assert_eq!(f.done[0].path, "/c");
        assert_eq!(f.done[0].response_bytes, (head.len() + big.len()) as u64);
    }

    #[test]
    fn close_returns_what_is_in_flight() {
        let mut renc = Encoder::new(false);
        let mut senc = Encoder::new(false);
        let mut f = Feeder::new(false);
        let (req0, _) = connection_start();
        f.feed(REQ, &req0);
        let block = renc.block(&[(":method", "POST"), (":path", "/p")], Mode::Index);
        let t = f.feed(REQ, &headers_frames(1, &block, false, 0, None, false));
        let block = renc.block(&[(":method", "GET"), (":path", "/q")], Mode::Index);
        f.feed(REQ, &headers_frames(3, &block, false, 0, None, false));
        // 3 answered while the client keeps its side open.
        let head = senc.block(&[(":status", "200")], Mode::Index);
        f.feed(RESP, &headers_frames(3, &head, true, 0, None, false));
        assert_eq!(f.x.in_flight(), 2);
        let left = f.x.close(false, &mut f.done);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].path, "/p");
        assert_eq!(left[0].start_ts, t);
        assert_eq!(
            left[0].error.as_deref(),
            Some("connection closed before the response")
        );
        assert_eq!(f.done.len(), 1);
        assert_eq!(f.done[0].error, None);
        let mut f = Feeder::new(false);
        f.feed(REQ, &req0);
        f.feed(
            REQ,
            &headers_frames(
                1,
                &Encoder::new(false).block(&[(":method", "GET")], Mode::Index),
                true,
                0,
                None,
                false,
            ),
        );
        let left = f.x.close(true, &mut f.done);
        assert_eq!(
            left[0].error.as_deref(),
            Some("connection reset before the response")
        );
    }

    #[test]
    fn limits_bound_streams_and_header_blocks() {
        let mut renc = Encoder::new(false);
        let mut f = Feeder::new(false);
        let (req0, _) = connection_start();
        f.feed(REQ, &req0);
        let mut req = Vec::new();
        for i in 0..1100u32 {
            let block = renc.block(&[(":method", "GET"), (":path", "/l")], Mode::Index);
            req.extend(headers_frames(2 * i + 1, &block, true, 0, None, false));
        }
        f.feed(REQ, &req);
        assert_eq!(f.x.in_flight(), MAX_STREAMS);
        assert_eq!(f.x.stats().streams_over_limit, 1100 - MAX_STREAMS as u64);
        // A header block of 70 KiB in CONTINUATIONs: given up, counted, table unknown.
        let mut f = Feeder::new(false);
        f.feed(REQ, &req0);
        let big = "v".repeat(70_000);
        let block = Encoder::new(false).block(
            &[
                (":method", "GET"),
                (":path", "/big"),
                ("x-big", big.as_str()),
            ],
            Mode::WithoutIndexing,
        );
        f.feed(REQ, &headers_frames(1, &block, true, 5, None, false));
        assert_eq!(f.x.in_flight(), 0);
        assert_eq!(f.x.stats().blocks_oversized, 1);
        assert_eq!(
            f.an,
            vec![Anomaly::Desync {
                side: REQ,
                reason: DesyncReason::HeadTruncated,
                dropped: 1
            }]
        );
        assert!(!f.x.hpack_synced(REQ));
    }

    #[test]
    fn unmatched_responses_and_orphan_continuations_are_survived() {
        let mut senc = Encoder::new(false);
        let mut f = Feeder::new(false);
        let (_, resp0) = connection_start();
        f.feed(RESP, &resp0);
        let head = senc.block(&[(":status", "200")], Mode::Index);
        f.feed(RESP, &headers_frames(9, &head, true, 0, None, false));
        assert_eq!(f.an, vec![Anomaly::UnmatchedResponse]);
        f.feed(RESP, &frame(CONTINUATION, END_HEADERS, 9, &[0x88]));
        assert!(!f.x.hpack_synced(RESP));
    }

    // ---- Generated conversations -------------------------------------------------------

    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum Outcome {
        Normal,
        TrailersOnly,
        ClientCancel,
        ServerRefused,
    }

    #[derive(Clone, Debug)]
    struct Spec {
        grpc: bool,
        method: &'static str,
        path: String,
        status: u16,
        grpc_status: i32,
        req_data: Vec<usize>,
        resp_data: Vec<usize>,
        outcome: Outcome,
        continuations: usize,
        pad: Option<u8>,
        priority: bool,
        request_id: Option<String>,
    }

    fn spec_strategy() -> impl Strategy<Value = Spec> {
        (
            any::<bool>(),
            0usize..3,
            0u32..20,
            prop::sample::select(vec![200u16, 204, 404, 503, 200]),
            prop::sample::select(vec![0i32, 0, 5, 14]),
            prop::collection::vec(0usize..3000, 0..3),
            prop::collection::vec(0usize..3000, 0..3),
            prop::sample::select(vec![
                Outcome::Normal,
                Outcome::Normal,
                Outcome::Normal,
                Outcome::TrailersOnly,
                Outcome::ClientCancel,
                Outcome::ServerRefused,
            ]),
            (
                0usize..3,
                prop::option::of(0u8..20),
                any::<bool>(),
                any::<bool>(),
            ),
        )
            .prop_map(
                |(grpc, m, p, status, gs, req_data, resp_data, outcome, (cont, pad, prio, rid))| {
                    let method = if grpc {
                        "POST"
                    } else {
                        ["GET", "POST", "DELETE"][m]
                    };
                    Spec {
                        grpc,
                        method,
                        path: if grpc {
                            format!("/pkg.v{}.Service/Method{}", p % 3, p)
                        } else {
                            format!("/api/items/{p}?q={}", p * 7)
                        },
                        status,
                        grpc_status: gs,
                        req_data: if method == "GET" {
                            Vec::new()
                        } else {
                            req_data
                        },
                        resp_data,
                        outcome: if grpc || outcome != Outcome::TrailersOnly {
                            outcome
                        } else {
                            Outcome::Normal
                        },
                        continuations: cont,
                        pad,
                        priority: prio,
                        request_id: rid.then(|| format!("id-{p}")),
                    }
                },
            )
    }

    /// One step of a stream on one side.
    #[derive(Clone, Debug)]
    enum Step {
        ReqHeaders { end: bool },
        ReqData { len: usize, end: bool },
        RespHeaders { end: bool },
        RespData { len: usize, end: bool },
        Trailers,
        ClientRst,
        ServerRst,
    }

    fn steps(s: &Spec) -> (Vec<Step>, Vec<Step>) {
        let mut req = vec![Step::ReqHeaders {
            end: s.req_data.is_empty(),
        }];
        let n = s.req_data.len();
        for (i, &len) in s.req_data.iter().enumerate() {
            req.push(Step::ReqData {
                len,
                end: i + 1 == n,
            });
        }
        let mut resp = Vec::new();
        match s.outcome {
            Outcome::Normal => {
                let trailers = s.grpc;
                let n = s.resp_data.len();
                resp.push(Step::RespHeaders {
                    end: n == 0 && !trailers,
                });
                for (i, &len) in s.resp_data.iter().enumerate() {
                    resp.push(Step::RespData {
                        len,
                        end: i + 1 == n && !trailers,
                    });
                }
                if trailers {
                    resp.push(Step::Trailers);
                }
            }
            Outcome::TrailersOnly => resp.push(Step::RespHeaders { end: true }),
            Outcome::ClientCancel => {
                // The request may not have ended; the cancel comes last on the request side.
                req.retain(|st| !matches!(st, Step::ReqData { end: true, .. }));
                if let Some(Step::ReqHeaders { end }) = req.first_mut() {
                    *end = false;
                }
                req.push(Step::ClientRst);
            }
            Outcome::ServerRefused => resp.push(Step::ServerRst),
        }
        (req, resp)
    }

    /// A whole conversation: each side's bytes cut into runs fed in order, and the calls the
    /// decoder must report.
    struct Conversation {
        /// (side, bytes) in feeding order; runs of one side are cut further by the feeder.
        runs: Vec<(Side, Vec<u8>)>,
        /// Per stream: (stream id, run index and offset of the request HEADERS' first byte, run
        /// index and offset of the last response byte, request bytes, response bytes).
        expect: Vec<Expect>,
    }

    /// Per stream: id, (run, offset) of the request's first byte, (run, offset) of the last
    /// response byte, request bytes, response bytes.
    type Expect = (u32, (usize, usize), Option<(usize, usize)>, u64, u64);

    struct Rng(u64);
    impl Rng {
        fn next(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n.max(1) as u64) as usize
        }
    }

    fn conversation(specs: &[Spec], seed: u64, huffman: bool, preface: bool) -> Conversation {
        let mut rng = Rng(seed | 1);
        let (mut renc, mut senc) = (Encoder::new(huffman), Encoder::new(!huffman));
        let mut runs: Vec<(Side, Vec<u8>)> = Vec::new();
        let push =
            |runs: &mut Vec<(Side, Vec<u8>)>, side: Side, bytes: Vec<u8>| -> (usize, usize) {
                match runs.last_mut() {
                    Some((s, b)) if *s == side => {
                        let at = b.len();
                        b.extend(bytes);
                        (runs.len() - 1, at)
                    }
                    _ => {
                        runs.push((side, bytes));
                        (runs.len() - 1, 0)
                    }
                }
            };
        if preface {
            let (req0, resp0) = connection_start();
            push(&mut runs, REQ, req0);
            push(&mut runs, RESP, resp0);
        }
        let plan: Vec<(Vec<Step>, Vec<Step>)> = specs.iter().map(steps).collect();
        let mut cursor = vec![(0usize, 0usize); specs.len()];
        let mut expect: Vec<Expect> = specs
            .iter()
            .enumerate()
            .map(|(i, _)| (2 * i as u32 + 1, (0, 0), None, 0, 0))
            .collect();
        let mode = |rng: &mut Rng| {
            [
                Mode::Index,
                Mode::Index,
                Mode::Incremental,
                Mode::WithoutIndexing,
            ][rng.next(4)]
        };
        loop {
            // Streams that can move: the request side any time; the response side after the
            // request headers, and its last step only after the request ended.
            let mut movable = Vec::new();
            for (i, (req, resp)) in plan.iter().enumerate() {
                let (r, s) = cursor[i];
                // Streams open in order of their ids.
                if r < req.len() && (r > 0 || i == 0 || cursor[i - 1].0 > 0) {
                    movable.push((i, REQ));
                }
                let req_done = r == req.len();
                if r > 0 && s < resp.len() && (s + 1 < resp.len() || req_done) {
                    movable.push((i, RESP));
                }
            }
            if movable.is_empty() {
                break;
            }
            let (i, side) = movable[rng.next(movable.len())];
            let s = &specs[i];
            let id = 2 * i as u32 + 1;
            let step = match side {
                Side::Request => plan[i].0[cursor[i].0].clone(),
                Side::Response => plan[i].1[cursor[i].1].clone(),
            };
            let bytes = match step {
                Step::ReqHeaders { end } => {
                    let mut h: Vec<(&str, &str)> = vec![
                        (":method", s.method),
                        (":scheme", "https"),
                        (":path", &s.path),
                        (":authority", "api.example:443"),
                    ];
                    if s.grpc {
                        h.push(("content-type", "application/grpc+proto"));
                        h.push(("te", "trailers"));
                    }
                    if let Some(r) = &s.request_id {
                        h.push(("x-request-id", r));
                    }
                    h.push(("user-agent", "bakeoff-test/1"));
                    let mut block = Vec::new();
                    if rng.next(10) == 0 {
                        let size = [0, 64, 256, 4096][rng.next(4)];
                        renc.size_update(&mut block, size);
                    }
                    let m = mode(&mut rng);
                    for (n, v) in &h {
                        renc.encode(&mut block, n.as_bytes(), v.as_bytes(), m);
                    }
                    headers_frames(id, &block, end, s.continuations, s.pad, s.priority)
                }
                Step::ReqData { len, end } => data(id, len, end, s.pad),
                Step::RespHeaders { end } => {
                    let status = s.status.to_string();
                    let gs = s.grpc_status.to_string();
                    let mut h: Vec<(&str, &str)> = vec![(":status", &status)];
                    if s.grpc {
                        h.push(("content-type", "application/grpc"));
                    }
                    if end && s.grpc {
                        h.push(("grpc-status", &gs));
                    }
                    let block = senc.block(&h, mode(&mut rng));
                    headers_frames(id, &block, end, s.continuations.min(1), None, false)
                }
                Step::RespData { len, end } => data(id, len, end, None),
                Step::Trailers => {
                    let gs = s.grpc_status.to_string();
                    let mut h: Vec<(&str, &str)> = vec![("grpc-status", &gs)];
                    if s.grpc_status != 0 {
                        h.push(("grpc-message", "went%20wrong"));
                    }
                    let block = senc.block(&h, mode(&mut rng));
                    headers_frames(id, &block, true, 0, None, false)
                }
                Step::ClientRst => rst(id, 8),
                Step::ServerRst => rst(id, 7),
            };
            let wire = bytes.len() as u64;
            let (run, at) = push(&mut runs, side, bytes);
            let e = &mut expect[i];
            match side {
                Side::Request => {
                    if cursor[i].0 == 0 {
                        e.1 = (run, at);
                    }
                    e.3 += wire;
                    cursor[i].0 += 1;
                }
                Side::Response => {
                    e.2 = Some((run, at + wire as usize - 1));
                    e.4 += wire;
                    cursor[i].1 += 1;
                }
            }
            // Flow-control and liveness frames in between, not part of any call.
            match rng.next(12) {
                0 => {
                    push(&mut runs, side, frame(WINDOW_UPDATE, 0, 0, &[0, 1, 0, 0]));
                }
                1 => {
                    push(&mut runs, side, frame(PING, 0, 0, &[1; 8]));
                }
                2 => {
                    push(&mut runs, side, frame(WINDOW_UPDATE, 0, id, &[0, 0, 0, 9]));
                }
                _ => {}
            }
        }
        Conversation { runs, expect }
    }

    fn expected_call(s: &Spec) -> (Option<u16>, Option<i32>, Option<String>) {
        match s.outcome {
            Outcome::Normal | Outcome::TrailersOnly => {
                let gs = s.grpc.then_some(s.grpc_status);
                let err = match gs {
                    Some(0) | None => None,
                    Some(n) if s.outcome == Outcome::Normal => {
                        Some(format!("grpc-status {n}: went wrong"))
                    }
                    Some(n) => Some(format!("grpc-status {n}")),
                };
                (Some(s.status), gs, err)
            }
            Outcome::ClientCancel => (None, None, Some("RST_STREAM CANCEL".into())),
            Outcome::ServerRefused => (None, None, Some("RST_STREAM REFUSED_STREAM".into())),
        }
    }

    /// Feeds a conversation from run `from` on, each run cut at `cuts` (fractions of 1000) and
    /// captured up to `prefix` bytes per piece; returns the feeder and each run's pieces (end
    /// offset, time).
    fn feed_conversation(
        f: &mut Feeder,
        conv: &Conversation,
        from: usize,
        cuts: &[Vec<u16>],
        prefix: usize,
    ) -> Vec<Vec<(usize, u64)>> {
        let mut pieces = vec![Vec::new(); conv.runs.len()];
        for (r, (side, bytes)) in conv.runs.iter().enumerate().skip(from) {
            let mut points: Vec<usize> = cuts[r % cuts.len()]
                .iter()
                .map(|c| *c as usize * bytes.len() / 1000)
                .collect();
            points.extend([0, bytes.len()]);
            points.sort_unstable();
            points.dedup();
            for w in points.windows(2) {
                let t = f.feed_capped(*side, &bytes[w[0]..w[1]], prefix);
                pieces[r].push((w[1], t));
            }
        }
        pieces
    }

    fn ts_at(pieces: &[Vec<(usize, u64)>], (run, off): (usize, usize)) -> u64 {
        pieces[run]
            .iter()
            .find(|(end, _)| *end > off)
            .map_or(0, |(_, t)| *t)
    }

    fn stream_of(c: &Call) -> usize {
        let id: usize = Feeder::attr(c, "http2.stream").unwrap().parse().unwrap();
        (id - 1) / 2
    }

    /// What a call reports agrees with what was sent: decoded fields exact, unknown ones
    /// reported as such.
    fn check_sound(c: &Call, s: &Spec) -> Result<(), TestCaseError> {
        let decoded = Feeder::attr(c, "decoded").unwrap();
        let decoded: Vec<&str> = decoded.split(',').collect();
        prop_assert_eq!(decoded.contains(&"method"), !c.method.is_empty());
        if !c.method.is_empty() {
            prop_assert_eq!(c.method.as_str(), s.method);
        }
        if !c.path.is_empty() {
            prop_assert_eq!(&c.path, &s.path);
        }
        let (status, gs, _) = expected_call(s);
        if let Some(st) = c.status {
            prop_assert_eq!(Some(st), status);
        }
        if let Some(g) = c.grpc_status {
            prop_assert_eq!(Some(g), gs);
        }
        if c.protocol == "grpc" {
            prop_assert!(s.grpc);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

        /// Random conversations over several streams, cut anywhere, decode to exactly the calls
        /// that were sent.
        #[test]
        fn generated_conversations_decode_exactly(
            specs in prop::collection::vec(spec_strategy(), 1..8),
            seed in any::<u64>(),
            huffman in any::<bool>(),
            cuts in prop::collection::vec(prop::collection::vec(0u16..1000, 0..6), 1..10),
        ) {
            let conv = conversation(&specs, seed, huffman, true);
            let mut f = Feeder::new(false);
            let pieces = feed_conversation(&mut f, &conv, 0, &cuts, usize::MAX);
            prop_assert!(f.an.is_empty(), "{:?}", f.an);
            prop_assert_eq!(f.done.len(), specs.len());
            prop_assert_eq!(f.x.in_flight(), 0);
            let mut done = f.done.clone();
            done.sort_by_key(stream_of);
            for (i, c) in done.iter().enumerate() {
                let s = &specs[i];
                let e = &conv.expect[i];
                prop_assert_eq!(stream_of(c), i);
                prop_assert_eq!(c.method.as_str(), s.method);
                prop_assert_eq!(&c.path, &s.path);
                let (status, gs, err) = expected_call(s);
                prop_assert_eq!((c.status, c.grpc_status, &c.error), (status, gs, &err));
                prop_assert_eq!(c.protocol, if s.grpc { "grpc" } else { "http2" });
                prop_assert_eq!(&c.request_id, &s.request_id);
                prop_assert_eq!(c.request_bytes, e.3);
                prop_assert_eq!(c.response_bytes, e.4);
                prop_assert_eq!(c.start_ts, ts_at(&pieces, e.1));
                prop_assert_eq!(c.end_ts, e.2.map_or(0, |p| ts_at(&pieces, p)));
                let want_decoded = if status.is_some() { "method,path,status" } else { "method,path" };
                let decoded = Feeder::attr(c, "decoded");
                prop_assert_eq!(decoded.as_deref(), Some(want_decoded));
            }
        }

        /// Attached anywhere (mid-frame too) and with captures cut short, the decoder never
        /// reports anything that was not sent: decoded fields are exact, byte counts too.
        #[test]
        fn attached_anywhere_and_cut_short_nothing_is_guessed(
            specs in prop::collection::vec(spec_strategy(), 1..8),
            seed in any::<u64>(),
            huffman in any::<bool>(),
            cuts in prop::collection::vec(prop::collection::vec(0u16..1000, 0..6), 1..10),
            from in 0usize..12,
            skip in prop_oneof![Just(0usize), 0usize..40],
            prefix in prop::sample::select(vec![usize::MAX, 1024, 300, 64]),
        ) {
            let mut conv = conversation(&specs, seed, huffman, from == 0);
            let from = from.min(conv.runs.len().saturating_sub(1));
            if let Some((_, b)) = conv.runs.get_mut(from) {
                let n = skip.min(b.len());
                b.drain(..n);
            }
            let mut f = Feeder::new(from > 0 || skip > 0);
            let pieces = feed_conversation(&mut f, &conv, from, &cuts, prefix);
            let _ = f.x.close(false, &mut f.done);
            let _ = pieces;
            let mut seen = std::collections::HashSet::new();
            for c in &f.done {
                let i = stream_of(c);
                prop_assert!(i < specs.len());
                prop_assert!(seen.insert(i), "stream reported twice");
                check_sound(c, &specs[i])?;
                // Whatever was missed, what is reported is exact.
                prop_assert_eq!(c.request_bytes, conv.expect[i].3);
                prop_assert_eq!(c.response_bytes, conv.expect[i].4);
            }
        }

        /// Attached where one side's write begins, every call whose request starts after that
        /// is reported, exact in bytes and times; fields from table entries never seen are
        /// unknown, the others exact.
        #[test]
        fn attached_at_a_write_every_later_call_is_reported(
            specs in prop::collection::vec(spec_strategy(), 1..10),
            seed in any::<u64>(),
            huffman in any::<bool>(),
            from in 1usize..12,
        ) {
            let conv = conversation(&specs, seed, huffman, true);
            let from = from.min(conv.runs.len() - 1);
            let mut f = Feeder::new(true);
            let pieces = feed_conversation(&mut f, &conv, from, &[Vec::new()], usize::MAX);
            let want: Vec<usize> = (0..specs.len()).filter(|&i| conv.expect[i].1.0 >= from).collect();
            let mut got: Vec<usize> = f.done.iter().map(stream_of).collect();
            got.sort_unstable();
            prop_assert_eq!(&got, &want, "{:?}", f.an);
            for c in &f.done {
                let i = stream_of(c);
                let e = &conv.expect[i];
                check_sound(c, &specs[i])?;
                prop_assert_eq!(c.request_bytes, e.3);
                prop_assert_eq!(c.response_bytes, e.4);
                prop_assert_eq!(c.start_ts, ts_at(&pieces, e.1));
                prop_assert_eq!(c.end_ts, e.2.map_or(0, |p| ts_at(&pieces, p)));
            }
            prop_assert!(f.an.iter().all(|a| *a == Anomaly::UnmatchedResponse), "{:?}", f.an);
        }

        /// Arbitrary bytes, lengths and gaps on either side never panic and stay bounded.
        #[test]
        fn arbitrary_input_never_panics(
            midstream in any::<bool>(),
            chunks in prop::collection::vec(
                (any::<bool>(), prop::collection::vec(any::<u8>(), 0..300), 0u64..2000, 0u8..20),
                0..40,
            ),
        ) {
            let mut f = Feeder::new(midstream);
            for (req, mut bytes, extra, kind) in chunks {
                let side = if req { REQ } else { RESP };
                // Sometimes a plausible frame header in front, to get past the framing.
                if kind < 8 && bytes.len() >= 9 {
                    let len = (bytes.len() - 9) as u32;
                    bytes[..3].copy_from_slice(&len.to_be_bytes()[1..]);
                    bytes[3] = kind % 10;
                    bytes[5..9].copy_from_slice(&(u32::from(kind) * 2 + 1).to_be_bytes());
                }
                if kind == 19 {
                    f.x.gap(side, &mut f.an);
                    continue;
                }
                f.ts += 1;
                f.x.on_bytes(side, f.ts, &bytes, bytes.len() as u64 + extra, &mut f.done, &mut f.an);
                prop_assert!(f.x.in_flight() <= MAX_STREAMS);
            }
            let _ = f.x.close(true, &mut f.done);
        }
    }
}

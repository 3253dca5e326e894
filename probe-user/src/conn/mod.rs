//! The connection table: per-connection state fed by the kernel's records, turned into each
//! direction's byte stream (`stream::Piece`) and decoded into complete exchanges.
//!
//! Connections come from either kernel path: the syscall path keys them by (tgid, fd) and sees
//! one record per read or write; the cgroup path keys them by socket cookie and sees TCP
//! segments, put back in order per direction by `stream::tcp`.

pub mod tls;

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
};

use crate::{
    protocol::{
        Call, Decoder, Http1Exchange,
        detect::{Detected, detect, detect_midstream, detect_midstream_request},
        exchange::Anomaly,
        http1::{Side, starts_message},
        http2::Http2Exchange,
        postgres::PostgresExchange,
    },
    stream::{
        Piece,
        tcp::{Limits, Reassembler, ReassemblyStats, Segment},
    },
};

/// Which end of the connection the watched process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Accepted: reads requests, writes responses.
    Server,
    /// Connected: writes requests, reads responses.
    Client,
}

/// Direction of bytes, seen from the watched process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Both directions, in `Direction::index` order.
const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

impl Direction {
    fn other(self) -> Self {
        match self {
            Direction::Ingress => Direction::Egress,
            Direction::Egress => Direction::Ingress,
        }
    }

    /// 0 for ingress, 1 for egress: the slot of per-direction arrays.
    pub(crate) fn index(self) -> usize {
        match self {
            Direction::Ingress => 0,
            Direction::Egress => 1,
        }
    }
}

impl Role {
    fn side_of(self, dir: Direction) -> Side {
        match (self, dir) {
            (Role::Server, Direction::Ingress) | (Role::Client, Direction::Egress) => Side::Request,
            _ => Side::Response,
        }
    }

    /// The role of the process when bytes in `dir` start a request.
    fn requesting_in(dir: Direction) -> Self {
        match dir {
            Direction::Ingress => Role::Server,
            Direction::Egress => Role::Client,
        }
    }
}

/// Connection key: (tgid, fd) on the syscall path, the socket cookie on the cgroup path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConnKey {
    Fd { tgid: u32, fd: u32 },
    Socket(u64),
}

/// How many pieces of a connection seen mid-way may pass before the probe stops looking for a
/// request start in it.
const MIDSTREAM_ATTEMPTS: u32 = 64;

/// Default bound of the connection table (memory: a few hundred bytes per idle connection,
/// plus reassembly buffers, each bounded by `tcp::Limits`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 100_000;

#[derive(Debug)]
enum Proto {
    /// Nothing decided yet; for connections seen mid-way, counts pieces tried.
    Unknown { tried: u32 },
    /// A protocol the probe decodes.
    Decoding(Box<dyn Decoder>),
    /// Not a protocol the probe parses; its bytes are ignored.
    Other,
}

/// What a connection's decoder has seen per side, to estimate requests lost in a gap.
#[derive(Clone, Copy, Debug, Default)]
struct SideHistory {
    bytes: u64,
    pieces: u64,
}

/// A connection's identity, as events carry it.
#[derive(Debug)]
struct Meta {
    tgid: u32,
    /// Unknown until a SYN or the first request bytes show it (cgroup path, mid-stream).
    role: Option<Role>,
    cohort: u32,
    peer: Option<SocketAddr>,
    /// Seen mid-way: adopted from its data rather than opened while watched.
    midstream: bool,
    /// Pieces kept for a recording of this connection's cohort (see `ConnTable::tap`).
    tap: Option<Vec<Tapped>>,
    /// Open when the recording started: its session state, given with its first piece.
    tap_state: Vec<(String, String)>,
}

/// A piece of a connection's stream kept for a recording: the bytes the decoders see (TLS
/// plaintext, not ciphertext), in stream order per direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tapped {
    pub dir: Direction,
    pub ts: u64,
    /// Exact bytes; `prefix.len() < len` when the capture cut the piece.
    pub len: u64,
    pub prefix: Vec<u8>,
    /// A gap of `len` bytes (0: unknown) instead of data.
    pub gap: bool,
}

/// What a recording receives: pieces with their connection's identity, and closes.
#[derive(Clone, Debug)]
pub enum TapEvent {
    Piece {
        key: ConnKey,
        tgid: u32,
        role: Option<Role>,
        peer: Option<SocketAddr>,
        midstream: bool,
        piece: Tapped,
        /// With a connection's first piece when it was open before the recording started:
        /// what a replay needs from before (Postgres startup parameters, `SET`s, prepared
        /// statements), as the decoder kept it.
        state: Vec<(String, String)>,
    },
    Close {
        key: ConnKey,
    },
}

/// The decoding state of a connection.
#[derive(Debug)]
struct StreamDecoder {
    proto: Proto,
    history: [SideHistory; 2],
    exchanges: u64,
    /// TLS records seen on the wire: the bytes are ciphertext, not decoded.
    encrypted: bool,
    /// Decoding the plaintext the TLS uprobes report; the wire's bytes are ignored.
    plaintext: bool,
    /// Bytes on the wire per direction (ingress, egress), and the first and last piece's
    /// time: a connection no decoder understood is still reported, as one connection event.
    wire: [u64; 2],
    first_ts: u64,
    last_ts: u64,
}

/// One tracked connection.
#[derive(Debug)]
pub struct Conn {
    meta: Meta,
    decoder: StreamDecoder,
    /// Syscall path: last per-socket record number.
    last_seq: u32,
    /// Cgroup path: one reassembler per direction.
    streams: Option<Box<[Reassembler; 2]>>,
}

/// A complete exchange with the connection it happened on.
#[derive(Clone, Debug)]
pub struct ConnExchange {
    pub tgid: u32,
    pub cohort: u32,
    pub role: Role,
    pub peer: Option<SocketAddr>,
    pub call: Call,
}

/// Counters of what did not become an event, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnStats {
    pub connections: u64,
    /// Connections first seen by their data (their open record was lost, or they were open
    /// before the probe started): tracked from there, resynchronised at a message start.
    pub connections_adopted: u64,
    /// Connections not tracked because the table was full (`max_connections`).
    pub connections_over_limit: u64,
    pub non_http_connections: u64,
    pub requests_dropped_desync: u64,
    pub desync_head_truncated: u64,
    pub desync_malformed: u64,
    pub desync_chunk_truncated: u64,
    pub desync_events_lost: u64,
    pub unmatched_responses: u64,
    /// Messages whose body framing fell into uncaptured bytes; their end came from turn-taking.
    pub messages_ended_at_turn: u64,
    pub unanswered_requests: u64,
    /// Gaps in a connection's byte stream (lost records, or TCP holes never filled).
    pub stream_gaps: u64,
    /// Estimate of requests lost in gaps: requests in flight given up, plus whole requests the
    /// missing bytes (or records) held, from the connection's average request size.
    pub requests_lost_estimate: u64,
    /// Requests pending on connections that sampling (the CPU budget) cut off.
    pub requests_sampled_out: u64,
    /// Connections no decoder understood (unknown protocol, TLS without plaintext), reported
    /// as one `tcp` or `tls` event each at close.
    pub connection_events: u64,
    /// TLS connections decoded from the plaintext the uprobes report.
    pub tls_connections: u64,
    /// TLS connections closed without any plaintext seen (a TLS library without uprobes:
    /// Go's crypto/tls, rustls, a stripped binary; or a process not attached yet).
    pub tls_undecoded: u64,
    /// TCP reassembly (cgroup path), summed over connections (`ConnTable::stats` adds the open
    /// ones; the field holds the closed ones).
    pub reassembly: ReassemblyStats,
}

/// All tracked connections.
#[derive(Debug)]
pub struct ConnTable {
    conns: HashMap<ConnKey, Conn>,
    max_connections: usize,
    limits: Limits,
    /// Listening sockets (cookies that received a SYN).
    listeners: std::collections::HashSet<u64>,
    /// Data that reached a listener: the segment that completed a handshake whose last ACK was
    /// lost goes through the listener's filter, not the new socket's. Kept by peer until the
    /// accepted socket shows up (bounded, oldest dropped).
    handoff: VecDeque<(SocketAddr, u64, OwnedSegment)>,
    stats: ConnStats,
    /// The cohort being recorded, and what its connections produced since `take_tapped`.
    tap_cohort: Option<u32>,
    tapped: Vec<TapEvent>,
}

/// A segment kept for later (see `ConnTable::handoff`).
#[derive(Clone, Debug)]
struct OwnedSegment {
    tgid: u32,
    ts: u64,
    seq: u32,
    len: u32,
    prefix: Vec<u8>,
    fin: bool,
}

/// Segments kept for accepted sockets not seen yet.
const HANDOFF_MAX: usize = 256;

impl Default for ConnTable {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_CONNECTIONS)
    }
}

/// A request the connection closed (or was reset) on before its response completed: a call
/// with its `error` set.
pub type Unanswered = ConnExchange;

/// A TCP segment record of the cgroup path, as the table needs it.
#[derive(Clone, Copy, Debug)]
pub struct SegmentRecord<'a> {
    pub tgid: u32,
    pub cohort: u32,
    pub dir: Direction,
    pub ts: u64,
    pub seq: u32,
    pub len: u32,
    pub prefix: &'a [u8],
    pub syn: bool,
    pub ack: bool,
    /// The acknowledgment number (meaningful with `ack`).
    pub ack_seq: u32,
    pub fin: bool,
    pub rst: bool,
    pub peer: SocketAddr,
    pub local_port: u16,
}

/// Linux's default ephemeral port range (`net.ipv4.ip_local_port_range`).
const EPHEMERAL: std::ops::RangeInclusive<u16> = 32768..=60999;

/// The role of a connection seen mid-way, from its ports: a server's own port lies below the
/// ephemeral range and its client's in it (and the reverse for a client); else unknown, and
/// the first request bytes decide.
fn role_from_ports(local: u16, remote: u16) -> Option<Role> {
    match (EPHEMERAL.contains(&local), EPHEMERAL.contains(&remote)) {
        (false, true) => Some(Role::Server),
        (true, false) => Some(Role::Client),
        _ => None,
    }
}

/// The decoder for a detected protocol.
fn decoder_for(protocol: Detected, midstream: bool) -> Option<Box<dyn Decoder>> {
    match protocol {
        Detected::Http1 => Some(Box::new(Http1Exchange::new())),
        Detected::Http2 => Some(Box::new(Http2Exchange::new(midstream))),
        Detected::Postgres => Some(Box::new(PostgresExchange::new(midstream))),
    }
}

impl StreamDecoder {
    fn new() -> Self {
        Self {
            proto: Proto::Unknown { tried: 0 },
            history: [SideHistory::default(); 2],
            exchanges: 0,
            encrypted: false,
            plaintext: false,
            wire: [0; 2],
            first_ts: 0,
            last_ts: 0,
        }
    }

    /// The connection as one event, when no decoder understood it (an unknown protocol, or TLS
    /// whose plaintext was not seen): bytes both ways, first to last byte, `tcp` or `tls`.
    fn connection_call(&self, role: Role) -> Option<Call> {
        let decoded = matches!(self.proto, Proto::Decoding(_)) || self.plaintext;
        if decoded || self.wire == [0, 0] {
            return None;
        }
        let (request, response) = match role {
            Role::Server => (self.wire[0], self.wire[1]),
            Role::Client => (self.wire[1], self.wire[0]),
        };
        Some(Call {
            protocol: if self.encrypted { "tls" } else { "tcp" },
            method: String::new(),
            path: String::new(),
            status: None,
            grpc_status: None,
            error: None,
            start_ts: self.first_ts,
            end_ts: self.last_ts,
            request_bytes: request,
            response_bytes: response,
            request_id: None,
            traceparent: None,
            user_agent: None,
            attributes: Vec::new(),
        })
    }

    /// One piece of the bytes on the wire in `dir`. A TLS connection's are ciphertext: they
    /// only mark it encrypted (its plaintext, when the uprobes see it, comes by `decode`).
    fn feed(
        &mut self,
        meta: &mut Meta,
        dir: Direction,
        piece: Piece<'_>,
        stats: &mut ConnStats,
        done: &mut Vec<Call>,
    ) {
        match piece {
            Piece::Data { ts, len, .. } => {
                self.wire[dir.index()] += len;
                if self.first_ts == 0 {
                    self.first_ts = ts;
                }
                self.last_ts = ts;
            }
            Piece::Gap { bytes } => self.wire[dir.index()] += bytes.unwrap_or(0),
        }
        if self.plaintext || self.encrypted {
            return;
        }
        if let (Proto::Unknown { .. }, Piece::Data { prefix, .. }) = (&self.proto, piece)
            && tls::starts_tls_record(prefix)
        {
            self.encrypted = true;
            return;
        }
        self.decode(meta, dir, piece, stats, done);
    }

    /// Decodes one piece of the stream in `dir`.
    fn decode(
        &mut self,
        meta: &mut Meta,
        dir: Direction,
        piece: Piece<'_>,
        stats: &mut ConnStats,
        done: &mut Vec<Call>,
    ) {
        if let Some(tap) = &mut meta.tap {
            tap.push(match piece {
                Piece::Gap { bytes } => Tapped {
                    dir,
                    ts: 0,
                    len: bytes.unwrap_or(0),
                    prefix: Vec::new(),
                    gap: true,
                },
                Piece::Data { ts, len, prefix } => Tapped {
                    dir,
                    ts,
                    len,
                    prefix: prefix.to_vec(),
                    gap: false,
                },
            });
        }
        match piece {
            Piece::Gap { bytes } => self.gap(meta, dir, bytes, None, stats),
            Piece::Data { ts, len, prefix } => {
                if let Proto::Unknown { tried } = &mut self.proto {
                    let found = match meta.role {
                        None => {
                            // Role unknown (seen mid-way, no SYN): the side that starts a request
                            // is the client, the side that starts a response the server.
                            if let Some(p) = detect(prefix) {
                                meta.role = Some(Role::requesting_in(dir));
                                Some((p, false))
                            } else if prefix.len() >= 7 && starts_message(Side::Response, prefix) {
                                meta.role = Some(Role::requesting_in(dir.other()));
                                Some((Detected::Http1, false))
                            } else if let Some(p) = detect_midstream_request(prefix) {
                                meta.role = Some(Role::requesting_in(dir));
                                Some((p, true))
                            } else {
                                None
                            }
                        }
                        Some(role) if role.side_of(dir) == Side::Request && !prefix.is_empty() => {
                            // At a message start the decoder starts in step, else it finds
                            // its framing itself (joined mid-way).
                            detect(prefix).map(|p| (p, false)).or_else(|| {
                                meta.midstream
                                    .then(|| detect_midstream(prefix))
                                    .flatten()
                                    .map(|p| (p, true))
                            })
                        }
                        Some(role) if role.side_of(dir) == Side::Request && len > 0 => {
                            // The client's first bytes were not captured: decide later, as for
                            // a connection joined mid-way.
                            meta.midstream = true;
                            None
                        }
                        Some(_) => None,
                    };
                    match found.map(|(p, midstream)| decoder_for(p, midstream)) {
                        Some(Some(decoder)) => self.proto = Proto::Decoding(decoder),
                        Some(None) => {
                            // A protocol the probe recognises but does not decode yet.
                            self.proto = Proto::Other;
                            stats.non_http_connections += 1;
                            return;
                        }
                        None => {
                            let request_side =
                                meta.role.map(|r| r.side_of(dir)) == Some(Side::Request);
                            // Opened while watched, the client's first bytes decide. A server
                            // may speak first (an HTTP/2 server sends its SETTINGS at once;
                            // SMTP, MySQL greet): that alone decides nothing.
                            let give_up = if meta.midstream || !request_side {
                                !prefix.is_empty() && {
                                    *tried += 1;
                                    *tried >= MIDSTREAM_ATTEMPTS
                                }
                            } else {
                                meta.role.is_some() && !prefix.is_empty()
                            };
                            if give_up {
                                self.proto = Proto::Other;
                                stats.non_http_connections += 1;
                            }
                            return;
                        }
                    }
                }
                let (Proto::Decoding(decoder), Some(role)) = (&mut self.proto, meta.role) else {
                    return;
                };
                let side = role.side_of(dir);
                let h = &mut self.history[side_index(side)];
                h.bytes += len;
                h.pieces += 1;
                let mut anomalies = Vec::new();
                let before = done.len();
                decoder.on_bytes(side, ts, prefix, len, done, &mut anomalies);
                self.exchanges += (done.len() - before) as u64;
                count(stats, &anomalies);
            }
        }
    }

    /// Part of the stream in `dir` is missing: `bytes` when known, else `records` lost.
    fn gap(
        &mut self,
        meta: &Meta,
        dir: Direction,
        bytes: Option<u64>,
        records: Option<u64>,
        stats: &mut ConnStats,
    ) {
        stats.stream_gaps += 1;
        let Proto::Decoding(decoder) = &mut self.proto else {
            // Not decoding yet: the next request start is found as for a connection seen
            // mid-way.
            return;
        };
        let mut anomalies = Vec::new();
        match (records, meta.role) {
            // Lost records may have been of either side.
            (Some(_), _) | (None, None) => {
                decoder.gap(Side::Request, &mut anomalies);
                decoder.gap(Side::Response, &mut anomalies);
            }
            (None, Some(role)) => decoder.gap(role.side_of(dir), &mut anomalies),
        }
        count(stats, &anomalies);
        // Whole requests inside a request-side gap (or a run of lost records, which may be of
        // either side), from this connection's averages.
        if records.is_some() || meta.role.map(|r| r.side_of(dir)) == Some(Side::Request) {
            let h = self.history[side_index(Side::Request)];
            let per_request = |total: u64| total as f64 / self.exchanges.max(1) as f64;
            let estimate = match (bytes, records) {
                (Some(b), _) if self.exchanges > 0 && h.bytes > 0 => {
                    (b as f64 / per_request(h.bytes)).round() as u64
                }
                // Record numbers count both directions' records.
                (None, Some(r)) if self.exchanges > 0 => {
                    let pieces: u64 = self.history.iter().map(|h| h.pieces).sum();
                    (r as f64 / per_request(pieces.max(1))).round() as u64
                }
                _ => 1,
            };
            stats.requests_lost_estimate += estimate;
        }
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Request => 0,
        Side::Response => 1,
    }
}

fn count(stats: &mut ConnStats, anomalies: &[Anomaly]) {
    for a in anomalies {
        match a {
            Anomaly::Desync {
                reason, dropped, ..
            } => {
                use crate::protocol::http1::DesyncReason as R;
                stats.requests_dropped_desync += *dropped as u64;
                stats.requests_lost_estimate += *dropped as u64;
                *match reason {
                    R::HeadTruncated => &mut stats.desync_head_truncated,
                    R::Malformed => &mut stats.desync_malformed,
                    R::ChunkTruncated => &mut stats.desync_chunk_truncated,
                    R::EventsLost => &mut stats.desync_events_lost,
                } += 1;
            }
            Anomaly::UnmatchedResponse => stats.unmatched_responses += 1,
            Anomaly::EndedAtTurn(_) => stats.messages_ended_at_turn += 1,
        }
    }
}

impl Conn {
    fn labelled(meta: &Meta, calls: Vec<Call>, done: &mut Vec<ConnExchange>) {
        let Some(role) = meta.role else { return };
        done.extend(calls.into_iter().map(|call| ConnExchange {
            tgid: meta.tgid,
            cohort: meta.cohort,
            role,
            peer: meta.peer,
            call,
        }));
    }
}

impl ConnTable {
    pub fn new(max_connections: usize) -> Self {
        Self {
            conns: HashMap::new(),
            max_connections,
            limits: Limits::default(),
            listeners: Default::default(),
            handoff: VecDeque::new(),
            stats: ConnStats::default(),
            tap_cohort: None,
            tapped: Vec::new(),
        }
    }

    /// Records the connections of `cohort` from now on (`None`: stop), the ones already open
    /// included (a capture covers sessions open when it starts).
    pub fn tap(&mut self, cohort: Option<u32>) {
        self.tap_cohort = cohort;
        for conn in self.conns.values_mut() {
            conn.meta.tap = (Some(conn.meta.cohort) == cohort).then(Vec::new);
            conn.meta.tap_state = match (&conn.meta.tap, &conn.decoder.proto) {
                (Some(_), Proto::Decoding(d)) => d.session_state(),
                _ => Vec::new(),
            };
        }
        if cohort.is_none() {
            self.tapped.clear();
        }
    }

    /// What the recorded connections produced since the last call.
    pub fn take_tapped(&mut self) -> Vec<TapEvent> {
        std::mem::take(&mut self.tapped)
    }

    /// Moves a connection's kept pieces to `tapped`.
    fn drain_tap(tapped: &mut Vec<TapEvent>, key: ConnKey, meta: &mut Meta) {
        let Some(tap) = meta.tap.as_mut() else { return };
        for piece in tap.drain(..) {
            tapped.push(TapEvent::Piece {
                key,
                tgid: meta.tgid,
                role: meta.role,
                peer: meta.peer,
                midstream: meta.midstream,
                piece,
                state: std::mem::take(&mut meta.tap_state),
            });
        }
    }

    /// After an operation on `key`: its kept pieces go to `tapped`.
    fn drain_tap_of(&mut self, key: ConnKey) {
        if self.tap_cohort.is_none() {
            return;
        }
        if let Some(conn) = self.conns.get_mut(&key) {
            Self::drain_tap(&mut self.tapped, key, &mut conn.meta);
        }
    }

    pub fn contains(&self, key: ConnKey) -> bool {
        self.conns.contains_key(&key)
    }

    /// Counters, the open connections' reassembly included. Read once a second or at exit,
    /// so the per-segment path never copies counters.
    pub fn stats(&self) -> ConnStats {
        let mut stats = self.stats.clone();
        for streams in self.conns.values().filter_map(|c| c.streams.as_ref()) {
            for r in streams.iter() {
                add_reassembly(&mut stats.reassembly, r.stats());
            }
        }
        stats
    }

    /// Estimated requests lost in gaps so far (cheap: for the per-second gauge).
    pub fn requests_lost_estimate(&self) -> u64 {
        self.stats.requests_lost_estimate
    }

    /// Tracked connections.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// A socket was accepted or connected (or found mid-way, `midstream`). A previous
    /// connection under the same key is closed first (its close record may have been lost).
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        &mut self,
        key: ConnKey,
        tgid: u32,
        role: Option<Role>,
        cohort: u32,
        peer: Option<SocketAddr>,
        midstream: bool,
        done: &mut Vec<ConnExchange>,
    ) -> Vec<Unanswered> {
        let unanswered = self.close(key, false, done);
        if self.conns.len() >= self.max_connections {
            self.stats.connections_over_limit += 1;
            return unanswered;
        }
        self.stats.connections += 1;
        // On the cgroup path every accepted connection starts at its first data (the
        // handshake belongs to the listener): only the syscall path's adoptions are news.
        if midstream && matches!(key, ConnKey::Fd { .. }) {
            self.stats.connections_adopted += 1;
        }
        let streams = matches!(key, ConnKey::Socket(_)).then(|| {
            Box::new([
                Reassembler::new(self.limits.clone()),
                Reassembler::new(self.limits.clone()),
            ])
        });
        self.conns.insert(
            key,
            Conn {
                meta: Meta {
                    tgid,
                    role,
                    cohort,
                    peer,
                    midstream,
                    tap: (self.tap_cohort == Some(cohort)).then(Vec::new),
                    tap_state: Vec::new(),
                },
                decoder: StreamDecoder::new(),
                last_seq: 0,
                streams,
            },
        );
        unanswered
    }

    /// Bytes moved by one read or write (syscall path). `seq` is the kernel's per-socket record
    /// number: a jump means records were lost.
    #[allow(clippy::too_many_arguments)]
    pub fn data(
        &mut self,
        key: ConnKey,
        ts: u64,
        dir: Direction,
        seq: u32,
        data: &[u8],
        len: u64,
        done: &mut Vec<ConnExchange>,
    ) {
        let Self { conns, stats, .. } = self;
        let Some(conn) = conns.get_mut(&key) else {
            return;
        };
        let lost = if conn.last_seq != 0 {
            seq.wrapping_sub(conn.last_seq).wrapping_sub(1)
        } else {
            0
        };
        conn.last_seq = seq;
        if lost != 0 && lost < u32::MAX / 2 {
            conn.decoder
                .gap(&conn.meta, dir, None, Some(u64::from(lost)), stats);
        }
        let mut exchanges = Vec::new();
        conn.decoder.feed(
            &mut conn.meta,
            dir,
            Piece::Data {
                ts,
                len,
                prefix: data,
            },
            stats,
            &mut exchanges,
        );
        Conn::labelled(&conn.meta, exchanges, done);
        self.drain_tap_of(key);
    }

    /// One TCP segment (cgroup path). A connection not yet known is adopted; its role comes from
    /// the SYN when one was seen, else from which side sends a request. A reset closes it.
    pub fn segment(
        &mut self,
        key: ConnKey,
        seg: &SegmentRecord<'_>,
        done: &mut Vec<ConnExchange>,
    ) -> Vec<Unanswered> {
        if !self.conns.contains_key(&key) {
            // A SYN reaching a listener, or a SYN-ACK leaving it, belongs to the listening
            // socket: the accepted socket is a new one, first seen at its data.
            let handshake_of_listener = seg.syn && (seg.dir == Direction::Ingress) != seg.ack;
            if let ConnKey::Socket(cookie) = key {
                if seg.syn && seg.dir == Direction::Ingress && !seg.ack {
                    if self.listeners.len() < HANDOFF_MAX * 16 {
                        self.listeners.insert(cookie);
                    }
                } else if seg.len > 0 && self.listeners.contains(&cookie) {
                    self.keep_for_handoff(seg);
                    return Vec::new();
                }
            }
            if seg.rst || (seg.len == 0 && !seg.syn) || handshake_of_listener {
                return Vec::new();
            }
            // Our SYN leaving, or the peer's SYN-ACK arriving: we connected. Joined mid-way,
            // the ports may tell (a server's port below the ephemeral range, its peer's in it).
            let role = if seg.syn {
                Some(Role::Client)
            } else {
                role_from_ports(seg.local_port, seg.peer.port())
            };
            let unanswered = self.open(
                key,
                seg.tgid,
                role,
                seg.cohort,
                Some(seg.peer),
                !seg.syn,
                done,
            );
            if !self.conns.contains_key(&key) {
                return unanswered;
            }
            // Its first data may have gone through the listener (see `handoff`).
            if let Some(i) = self
                .handoff
                .iter()
                .position(|(peer, _, _)| *peer == seg.peer)
                && let Some((_, cohort, first)) = self.handoff.remove(i)
            {
                let record = SegmentRecord {
                    tgid: first.tgid,
                    cohort: cohort as u32,
                    dir: Direction::Ingress,
                    ts: first.ts,
                    seq: first.seq,
                    len: first.len,
                    prefix: &first.prefix,
                    syn: false,
                    ack: false,
                    ack_seq: 0,
                    fin: first.fin,
                    rst: false,
                    peer: seg.peer,
                    local_port: seg.local_port,
                };
                let mut more = self.segment(key, &record, done);
                more.extend(unanswered);
                more.extend(self.segment(key, seg, done));
                return more;
            }
        }
        let Self { conns, stats, .. } = self;
        let Some(conn) = conns.get_mut(&key) else {
            return Vec::new();
        };
        if conn.meta.tgid == 0 && seg.tgid != 0 {
            conn.meta.tgid = seg.tgid;
        }
        let Conn {
            meta,
            decoder,
            streams,
            ..
        } = conn;
        let Some(streams) = streams.as_mut() else {
            return Vec::new();
        };
        let mut exchanges = Vec::new();
        if seg.ack {
            // What this segment's sender acknowledged of the other direction exists: holes
            // below it there are the probe's losses, given up now.
            let other_dir = seg.dir.other();
            let other = &mut streams[other_dir.index()];
            other.acknowledged(seg.ack_seq, &mut |piece| {
                decoder.feed(meta, other_dir, piece, stats, &mut exchanges)
            });
        }
        if seg.len > 0 {
            // Data this way at `ts` means the other way's older holes will never fill (without
            // pipelining, each side waits for the other): give them up before feeding this, so
            // the decoder sees both directions in the order they happened.
            let other_dir = seg.dir.other();
            let other = &mut streams[other_dir.index()];
            other.give_up_holes_before(seg.ts, &mut |piece| {
                decoder.feed(meta, other_dir, piece, stats, &mut exchanges)
            });
        }
        let reassembler = &mut streams[seg.dir.index()];
        reassembler.push(
            &Segment {
                seq: seg.seq,
                len: seg.len,
                prefix: seg.prefix,
                ts: seg.ts,
                syn: seg.syn,
                fin: seg.fin,
                rst: seg.rst,
            },
            &mut |piece| decoder.feed(meta, seg.dir, piece, stats, &mut exchanges),
        );
        Conn::labelled(meta, exchanges, done);
        self.drain_tap_of(key);
        if seg.rst {
            return self.close(key, true, done);
        }
        Vec::new()
    }

    /// Keeps a data segment that reached a listener until its accepted socket shows up.
    fn keep_for_handoff(&mut self, seg: &SegmentRecord<'_>) {
        if self.handoff.len() >= HANDOFF_MAX {
            self.handoff.pop_front();
        }
        self.handoff.push_back((
            seg.peer,
            u64::from(seg.cohort),
            OwnedSegment {
                tgid: seg.tgid,
                ts: seg.ts,
                seq: seg.seq,
                len: seg.len,
                prefix: seg.prefix.to_vec(),
                fin: seg.fin,
            },
        ));
    }

    /// Plaintext a TLS library call of the connection's process read (`Ingress`) or wrote
    /// (`Egress`). From the first one on, the connection is decoded from its plaintext only.
    #[allow(clippy::too_many_arguments)]
    pub fn plaintext(
        &mut self,
        key: ConnKey,
        ts: u64,
        dir: Direction,
        prefix: &[u8],
        len: u64,
        done: &mut Vec<ConnExchange>,
    ) {
        let Self { conns, stats, .. } = self;
        let Some(conn) = conns.get_mut(&key) else {
            return;
        };
        let decoder = &mut conn.decoder;
        if !decoder.plaintext {
            decoder.plaintext = true;
            stats.tls_connections += 1;
            if matches!(decoder.proto, Proto::Other) {
                // Given up on as ciphertext before the plaintext showed.
                decoder.proto = Proto::Unknown { tried: 0 };
                stats.non_http_connections = stats.non_http_connections.saturating_sub(1);
            }
        }
        let mut exchanges = Vec::new();
        decoder.decode(
            &mut conn.meta,
            dir,
            Piece::Data { ts, len, prefix },
            stats,
            &mut exchanges,
        );
        Conn::labelled(&conn.meta, exchanges, done);
        self.drain_tap_of(key);
    }

    /// Gives up on TCP holes older than the reassembly timeout (called periodically).
    pub fn expire(&mut self, now: u64, done: &mut Vec<ConnExchange>) {
        let Self {
            conns,
            stats,
            tapped,
            ..
        } = self;
        for (key, conn) in conns.iter_mut() {
            let Conn {
                meta,
                decoder,
                streams,
                ..
            } = conn;
            let Some(streams) = streams.as_mut() else {
                continue;
            };
            let mut exchanges = Vec::new();
            for (dir, r) in BOTH.into_iter().zip(streams.iter_mut()) {
                if r.buffered_bytes() == 0 {
                    continue;
                }
                r.expire(now, &mut |piece| {
                    decoder.feed(meta, dir, piece, stats, &mut exchanges)
                });
            }
            Conn::labelled(meta, exchanges, done);
            Self::drain_tap(tapped, *key, meta);
        }
    }

    /// The socket was closed (or reset): finish what the close completes and return requests
    /// left unanswered.
    pub fn close(
        &mut self,
        key: ConnKey,
        reset: bool,
        done: &mut Vec<ConnExchange>,
    ) -> Vec<Unanswered> {
        let Some(mut conn) = self.conns.remove(&key) else {
            return Vec::new();
        };
        let Conn {
            meta,
            decoder,
            streams,
            ..
        } = &mut conn;
        let mut exchanges = Vec::new();
        if let Some(streams) = streams.as_mut() {
            for (dir, r) in BOTH.into_iter().zip(streams.iter_mut()) {
                r.finish(&mut |piece| {
                    decoder.feed(meta, dir, piece, &mut self.stats, &mut exchanges)
                });
                add_reassembly(&mut self.stats.reassembly, r.stats());
            }
        }
        if decoder.encrypted && !decoder.plaintext {
            self.stats.tls_undecoded += 1;
        }
        if meta.tap.is_some() {
            Self::drain_tap(&mut self.tapped, key, meta);
            self.tapped.push(TapEvent::Close { key });
        }
        // Role unknown (no request ever recognised): the process is taken as the server.
        if let Some(call) = decoder.connection_call(meta.role.unwrap_or(Role::Server)) {
            self.stats.connection_events += 1;
            meta.role.get_or_insert(Role::Server);
            exchanges.push(call);
        }
        let Proto::Decoding(dec) = &mut decoder.proto else {
            Conn::labelled(meta, exchanges, done);
            return Vec::new();
        };
        let left = dec.close(reset, &mut exchanges);
        Conn::labelled(meta, exchanges, done);
        self.stats.unanswered_requests += left.len() as u64;
        let mut unanswered = Vec::new();
        Conn::labelled(meta, left, &mut unanswered);
        unanswered
    }

    /// Forgets a connection that sampling cut off: exchanges it completes count, requests it had
    /// pending are counted as sampled out, not reported unanswered.
    pub fn forget(&mut self, key: ConnKey, done: &mut Vec<ConnExchange>) {
        let unanswered = self.close(key, false, done);
        self.stats.unanswered_requests -= unanswered.len() as u64;
        self.stats.requests_sampled_out += unanswered.len() as u64;
    }

    /// The fds of a process's tracked (tgid, fd) connections.
    pub fn fds_of(&self, tgid: u32) -> Vec<u32> {
        self.conns
            .keys()
            .filter_map(|k| match k {
                ConnKey::Fd { tgid: t, fd } if *t == tgid => Some(*fd),
                _ => None,
            })
            .collect()
    }

    /// A process exited: its (tgid, fd) connections are gone (the kernel closes them without a
    /// close call).
    pub fn close_process(&mut self, tgid: u32, done: &mut Vec<ConnExchange>) -> Vec<Unanswered> {
        let keys: Vec<ConnKey> = self
            .conns
            .keys()
            .filter(|k| matches!(k, ConnKey::Fd { tgid: t, .. } if *t == tgid))
            .copied()
            .collect();
        keys.into_iter()
            .flat_map(|k| self.close(k, false, done))
            .collect()
    }

    /// Requests still waiting for a response on open connections (reported at shutdown).
    pub fn in_flight(&self) -> usize {
        self.conns
            .values()
            .map(|c| match &c.decoder.proto {
                Proto::Decoding(d) => d.in_flight(),
                _ => 0,
            })
            .sum()
    }
}

/// Adds one reassembler's counts to `total`.
fn add_reassembly(total: &mut ReassemblyStats, r: &ReassemblyStats) {
    total.segments += r.segments;
    total.duplicates += r.duplicates;
    total.overlaps_trimmed += r.overlaps_trimmed;
    total.out_of_order += r.out_of_order;
    total.gaps += r.gaps;
    total.gap_bytes += r.gap_bytes;
    total.buffer_overflows += r.buffer_overflows;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table_with(key: ConnKey) -> ConnTable {
        let mut t = ConnTable::default();
        let mut done = Vec::new();
        t.open(key, 7, Some(Role::Server), 1, None, false, &mut done);
        t
    }

    #[test]
    fn an_unknown_protocol_is_one_connection_event() {
        let key = ConnKey::Fd { tgid: 7, fd: 3 };
        let mut t = table_with(key);
        let mut done = Vec::new();
        t.data(
            key,
            100,
            Direction::Ingress,
            1,
            b"SSH-2.0-OpenSSH_9.2\r\n",
            21,
            &mut done,
        );
        t.data(
            key,
            150,
            Direction::Egress,
            2,
            b"SSH-2.0-x\r\n",
            11,
            &mut done,
        );
        t.data(key, 180, Direction::Ingress, 3, b"\0\0\x01", 300, &mut done);
        assert!(done.is_empty());
        let left = t.close(key, false, &mut done);
        assert!(left.is_empty());
        assert_eq!(done.len(), 1);
        let c = &done[0].call;
        assert_eq!(c.protocol, "tcp");
        assert_eq!((c.request_bytes, c.response_bytes), (321, 11));
        assert_eq!((c.start_ts, c.end_ts), (100, 180));
        assert_eq!(t.stats().connection_events, 1);
    }

    #[test]
    fn tls_without_plaintext_is_a_tls_connection_event_and_decoded_ones_are_not() {
        let key = ConnKey::Fd { tgid: 7, fd: 4 };
        let mut t = table_with(key);
        let mut done = Vec::new();
        t.data(
            key,
            100,
            Direction::Ingress,
            1,
            &[22, 3, 1, 0, 5],
            517,
            &mut done,
        );
        t.close(key, false, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].call.protocol, "tls");
        assert_eq!(t.stats().tls_undecoded, 1);
        // An HTTP connection gives its requests, never a connection event.
        let key = ConnKey::Fd { tgid: 7, fd: 5 };
        let mut t = table_with(key);
        let mut done = Vec::new();
        let req = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        t.data(
            key,
            1,
            Direction::Ingress,
            1,
            req,
            req.len() as u64,
            &mut done,
        );
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
        t.data(
            key,
            2,
            Direction::Egress,
            2,
            resp,
            resp.len() as u64,
            &mut done,
        );
        t.close(key, false, &mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].call.protocol, "http1");
    }
}

//! The connection table: per (tgid, fd) state, fed by kernel socket and data events in order,
//! producing complete exchanges.

use std::{collections::HashMap, net::SocketAddr};

use crate::protocol::{
    Exchange, Http1Exchange,
    exchange::Anomaly,
    http1::{Head, Side, starts_message},
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

impl Role {
    fn side_of(self, dir: Direction) -> Side {
        match (self, dir) {
            (Role::Server, Direction::Ingress) | (Role::Client, Direction::Egress) => Side::Request,
            _ => Side::Response,
        }
    }
}

/// Connection key: the kernel tracks sockets per (tgid, fd).
pub type ConnKey = (u32, u32);

/// How many segments of a connection seen mid-way (seeded from /proc) may pass before the probe
/// stops looking for a request start in it.
const SEEDED_ATTEMPTS: u32 = 64;

#[derive(Debug)]
enum Proto {
    /// Nothing decided yet; for seeded connections, counts segments tried.
    Unknown {
        tried: u32,
    },
    Http1(Box<Http1Exchange>),
    /// Not a protocol the probe parses; its bytes are ignored.
    Other,
}

/// One tracked connection.
#[derive(Debug)]
pub struct Conn {
    pub role: Role,
    pub cohort: u32,
    pub peer: Option<SocketAddr>,
    /// Seen mid-way: found in /proc at start rather than accepted or connected while watched.
    pub seeded: bool,
    last_seq: u32,
    proto: Proto,
}

impl Conn {
    /// An exchange of this connection, with the connection's identity attached.
    fn labelled(&self, key: ConnKey, exchange: Exchange) -> ConnExchange {
        ConnExchange {
            tgid: key.0,
            fd: key.1,
            cohort: self.cohort,
            role: self.role,
            peer: self.peer,
            exchange,
        }
    }
}

/// A complete exchange with the connection it happened on.
#[derive(Clone, Debug)]
pub struct ConnExchange {
    pub tgid: u32,
    pub fd: u32,
    pub cohort: u32,
    pub role: Role,
    pub peer: Option<SocketAddr>,
    pub exchange: Exchange,
}

/// Counters of what did not become an event, by reason.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ConnStats {
    pub connections: u64,
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
    pub data_on_unknown_socket: u64,
}

/// All tracked connections.
#[derive(Debug, Default)]
pub struct ConnTable {
    conns: HashMap<ConnKey, Conn>,
    pub stats: ConnStats,
}

/// A request the connection closed on before its response completed.
#[derive(Clone, Debug)]
pub struct Unanswered {
    pub tgid: u32,
    pub cohort: u32,
    pub role: Role,
    pub peer: Option<SocketAddr>,
    pub request: Head,
    pub start_ts: u64,
}

impl ConnTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// A socket was accepted or connected (or found at start, `seeded`). A previous connection on
    /// the same fd is closed first (its close event may have been lost).
    pub fn open(
        &mut self,
        key: ConnKey,
        role: Role,
        cohort: u32,
        peer: Option<SocketAddr>,
        seeded: bool,
        done: &mut Vec<ConnExchange>,
    ) -> Vec<Unanswered> {
        let unanswered = self.close(key, done);
        self.stats.connections += 1;
        self.conns.insert(
            key,
            Conn {
                role,
                cohort,
                peer,
                seeded,
                last_seq: 0,
                proto: Proto::Unknown { tried: 0 },
            },
        );
        unanswered
    }

    /// Bytes moved on a tracked socket. `seq` is the kernel's per-socket event number.
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
        let Some(conn) = self.conns.get_mut(&key) else {
            self.stats.data_on_unknown_socket += 1;
            return;
        };
        let mut anomalies = Vec::new();
        let lost = conn.last_seq != 0 && seq != conn.last_seq.wrapping_add(1);
        conn.last_seq = seq;
        let side = conn.role.side_of(dir);
        if let Proto::Unknown { tried } = &mut conn.proto {
            if side == Side::Request && !data.is_empty() {
                if starts_message(Side::Request, data) {
                    conn.proto = Proto::Http1(Box::default());
                } else if !conn.seeded || *tried >= SEEDED_ATTEMPTS {
                    conn.proto = Proto::Other;
                    self.stats.non_http_connections += 1;
                } else {
                    *tried += 1;
                }
            } else if side == Side::Response && !conn.seeded {
                // The server spoke first: not HTTP/1 (Postgres, SMTP, ...).
                conn.proto = Proto::Other;
                self.stats.non_http_connections += 1;
            }
        }
        let Proto::Http1(http) = &mut conn.proto else {
            return;
        };
        if lost {
            http.events_lost(&mut anomalies);
        }
        let mut exchanges = Vec::new();
        match side {
            Side::Request => http.on_request_bytes(ts, data, len, &mut exchanges, &mut anomalies),
            Side::Response => http.on_response_bytes(ts, data, len, &mut exchanges, &mut anomalies),
        }
        done.extend(exchanges.into_iter().map(|x| conn.labelled(key, x)));
        self.count(&anomalies);
    }

    fn count(&mut self, anomalies: &[Anomaly]) {
        for a in anomalies {
            match a {
                Anomaly::Desync {
                    reason, dropped, ..
                } => {
                    use crate::protocol::http1::DesyncReason as R;
                    self.stats.requests_dropped_desync += *dropped as u64;
                    *match reason {
                        R::HeadTruncated => &mut self.stats.desync_head_truncated,
                        R::Malformed => &mut self.stats.desync_malformed,
                        R::ChunkTruncated => &mut self.stats.desync_chunk_truncated,
                        R::EventsLost => &mut self.stats.desync_events_lost,
                    } += 1;
                }
                Anomaly::UnmatchedResponse => self.stats.unmatched_responses += 1,
                Anomaly::EndedAtTurn(_) => self.stats.messages_ended_at_turn += 1,
            }
        }
    }

    /// The socket was closed: finish what the close completes and return requests left
    /// unanswered.
    pub fn close(&mut self, key: ConnKey, done: &mut Vec<ConnExchange>) -> Vec<Unanswered> {
        let Some(mut conn) = self.conns.remove(&key) else {
            return Vec::new();
        };
        let Proto::Http1(http) = &mut conn.proto else {
            return Vec::new();
        };
        let mut exchanges = Vec::new();
        let unanswered = http.close(&mut exchanges);
        done.extend(exchanges.into_iter().map(|x| conn.labelled(key, x)));
        self.stats.unanswered_requests += unanswered.len() as u64;
        unanswered
            .into_iter()
            .map(|(request, start_ts)| Unanswered {
                tgid: key.0,
                cohort: conn.cohort,
                role: conn.role,
                peer: conn.peer,
                request,
                start_ts,
            })
            .collect()
    }

    /// A process exited: its connections are gone (the kernel closes them without a close call).
    pub fn close_process(&mut self, tgid: u32, done: &mut Vec<ConnExchange>) -> Vec<Unanswered> {
        let keys: Vec<ConnKey> = self.conns.keys().filter(|k| k.0 == tgid).copied().collect();
        keys.into_iter().flat_map(|k| self.close(k, done)).collect()
    }

    /// Requests still waiting for a response on open connections (reported at shutdown).
    pub fn in_flight(&self) -> usize {
        self.conns
            .values()
            .map(|c| match &c.proto {
                Proto::Http1(h) => h.in_flight(),
                _ => 0,
            })
            .sum()
    }
}

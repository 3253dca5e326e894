//! Pairs HTTP/1.x requests with their responses on one connection, in order (HTTP/1.1 answers
//! pipelined requests in the order they were sent).

use std::collections::VecDeque;

use super::http1::{DesyncReason, Head, MessageParser, Output, RequestContext, Side};

/// One request and its response, with the timing and sizes the event needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exchange {
    pub request: Head,
    pub response: Head,
    /// Time of the first request byte (kernel monotonic ns).
    pub start_ts: u64,
    /// Time of the last response byte.
    pub end_ts: u64,
    /// All bytes of the request message (head and body), exact even beyond the captured prefix.
    pub request_bytes: u64,
    /// All bytes of the response message.
    pub response_bytes: u64,
}

/// What happened on a connection besides complete exchanges; the probe counts these.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anomaly {
    /// Framing lost on one side; `dropped` requests in flight were given up.
    Desync {
        side: Side,
        reason: DesyncReason,
        dropped: usize,
    },
    /// A response arrived with no request waiting for it (e.g. a connection seen mid-way).
    UnmatchedResponse,
    /// A message's body framing was lost; its end was taken from request/response turn-taking.
    EndedAtTurn(DesyncReason),
}

#[derive(Debug)]
struct Pending {
    head: Head,
    start_ts: u64,
    request_bytes: u64,
    response: Option<Head>,
}

/// HTTP/1.x state of one connection.
#[derive(Debug)]
pub struct Http1Exchange {
    requests: MessageParser,
    responses: MessageParser,
    pending: VecDeque<Pending>,
    /// The next response head answers a request the probe never saw: parse it, do not pair it.
    orphan_response: bool,
}

impl Default for Http1Exchange {
    fn default() -> Self {
        Self::new()
    }
}

impl Http1Exchange {
    pub fn new() -> Self {
        Self {
            requests: MessageParser::new(Side::Request),
            responses: MessageParser::new(Side::Response),
            pending: VecDeque::new(),
            orphan_response: false,
        }
    }

    /// Requests seen whose response is not complete yet.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Request-side bytes (read by a server, written by a client).
    pub fn on_request_bytes(
        &mut self,
        ts: u64,
        data: &[u8],
        len: u64,
        done: &mut Vec<Exchange>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let mut out = Vec::new();
        // A response whose framing was lost ends when the next request begins.
        let mut ended = Vec::new();
        self.responses.end_turn(&mut ended);
        self.on_response_outputs(ended, done, anomalies);
        self.requests
            .feed(ts, data, len, &mut RequestContext::default, &mut out);
        for o in out {
            match o {
                Output::Head { head, start_ts } => self.pending.push_back(Pending {
                    head,
                    start_ts,
                    request_bytes: 0,
                    response: None,
                }),
                Output::End { bytes, .. } => {
                    if let Some(p) = self.pending.back_mut() {
                        p.request_bytes = bytes;
                    }
                }
                Output::Desync(reason) => self.desync(Side::Request, reason, anomalies),
                Output::EndsAtTurn(reason) => anomalies.push(Anomaly::EndedAtTurn(reason)),
            }
        }
    }

    /// Response-side bytes.
    pub fn on_response_bytes(
        &mut self,
        ts: u64,
        data: &[u8],
        len: u64,
        done: &mut Vec<Exchange>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        let mut out = Vec::new();
        // A request whose framing was lost ends when the response begins.
        let mut ended = Vec::new();
        self.requests.end_turn(&mut ended);
        for o in ended {
            if let (Output::End { bytes, .. }, Some(p)) = (o, self.pending.back_mut()) {
                p.request_bytes = bytes;
            }
        }
        let front = self.pending.iter().find(|p| p.response.is_none());
        let ctx = front.map_or(RequestContext::default(), |p| RequestContext {
            head: p.head.method == "HEAD",
            connect: p.head.method == "CONNECT",
        });
        self.responses.feed(ts, data, len, &mut || ctx, &mut out);
        self.on_response_outputs(out, done, anomalies);
    }

    fn on_response_outputs(
        &mut self,
        out: Vec<Output>,
        done: &mut Vec<Exchange>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        for o in out {
            match o {
                Output::Head { head, .. } => match self.pending.front_mut() {
                    Some(p) if p.response.is_none() => p.response = Some(head),
                    _ => {
                        self.orphan_response = true;
                        anomalies.push(Anomaly::UnmatchedResponse);
                    }
                },
                Output::End { end_ts, bytes } => {
                    if std::mem::take(&mut self.orphan_response) {
                        continue;
                    }
                    if let Some(p) = self.pending.pop_front() {
                        done.push(Exchange {
                            request: p.head,
                            response: p.response.unwrap_or_default(),
                            start_ts: p.start_ts,
                            end_ts,
                            request_bytes: p.request_bytes,
                            response_bytes: bytes,
                        });
                    }
                }
                Output::Desync(reason) => self.desync(Side::Response, reason, anomalies),
                Output::EndsAtTurn(reason) => anomalies.push(Anomaly::EndedAtTurn(reason)),
            }
        }
    }

    /// The kernel lost events of this connection: nothing in flight can be trusted.
    pub fn events_lost(&mut self, anomalies: &mut Vec<Anomaly>) {
        self.requests.reset_lost();
        self.desync(Side::Request, DesyncReason::EventsLost, anomalies);
    }

    /// Framing lost on one side: requests in flight cannot be paired reliably any more, so both
    /// sides restart at their next message boundary.
    fn desync(&mut self, side: Side, reason: DesyncReason, anomalies: &mut Vec<Anomaly>) {
        let dropped = self.pending.len();
        self.pending.clear();
        self.orphan_response = false;
        match side {
            Side::Request => self.responses.reset_lost(),
            Side::Response => self.requests.reset_lost(),
        }
        anomalies.push(Anomaly::Desync {
            side,
            reason,
            dropped,
        });
    }

    /// The connection closed: a close-delimited response completes; requests still waiting are
    /// returned unanswered.
    pub fn close(&mut self, done: &mut Vec<Exchange>) -> Vec<(Head, u64)> {
        let mut out = Vec::new();
        if self.responses.close(&mut out) {
            self.on_response_outputs(out, done, &mut Vec::new());
        }
        self.pending
            .drain(..)
            .map(|p| (p.head, p.start_ts))
            .collect()
    }
}

//! Pairs HTTP/1.x requests with their responses on one connection, in order (HTTP/1.1 answers
//! pipelined requests in the order they were sent).

use std::collections::VecDeque;

use super::{
    call::{Call, Decoder},
    http1::{DesyncReason, Head, MessageParser, Output, RequestContext, Side},
};

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
    /// The request message ended (its byte count is known).
    complete: bool,
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
    /// A second request came before the first one's response while the stream was whole: the
    /// client pipelines, so after a gap nothing in flight can be paired any more.
    pipelined: bool,
    /// Gaps seen in either direction.
    gaps: u64,
    /// After an accepted `Upgrade: h2c`: the connection speaks HTTP/2 from there on.
    h2: Option<Box<crate::http2::Http2Exchange>>,
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
            pipelined: false,
            gaps: 0,
            h2: None,
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
                Output::Head { head, start_ts } => {
                    if !self.pending.is_empty() {
                        if self.gaps == 0 {
                            self.pipelined = true;
                        } else if !self.pipelined {
                            // One request at a time: one still waiting lost its response in a
                            // gap. A response in progress answers it: its end is not paired.
                            if self.pending.iter().any(|p| p.response.is_some()) {
                                self.orphan_response = true;
                            }
                            self.drop_pending(self.pending.len(), Side::Response, anomalies);
                        }
                    }
                    self.pending.push_back(Pending {
                        head,
                        start_ts,
                        request_bytes: 0,
                        complete: false,
                        response: None,
                    });
                }
                Output::End { bytes, .. } => {
                    if let Some(p) = self.pending.back_mut() {
                        p.request_bytes = bytes;
                        p.complete = true;
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
                p.complete = true;
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
                Output::Head { head, .. } => {
                    // After a gap, without pipelining, a response answers the newest request:
                    // the older ones were answered in the gap.
                    if self.gaps > 0 && !self.pipelined && self.pending.len() > 1 {
                        self.drop_pending(self.pending.len() - 1, Side::Response, anomalies);
                    }
                    match self.pending.front_mut() {
                        Some(p) if p.response.is_none() => p.response = Some(head),
                        _ => {
                            self.orphan_response = true;
                            anomalies.push(Anomaly::UnmatchedResponse);
                        }
                    }
                }
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

    /// Bytes of one side are missing (lost records, a TCP hole never filled). That side's parser
    /// restarts at its next message start. Without pipelining, requests in flight stay paired
    /// (a response after the gap answers the newest request), except the message the gap cut
    /// into; a pipelining client loses everything in flight.
    pub fn side_gap(&mut self, side: Side, anomalies: &mut Vec<Anomaly>) {
        self.gaps += 1;
        if self.pipelined {
            self.events_lost(anomalies);
            return;
        }
        let dropped = match side {
            Side::Request => {
                self.requests.reset_lost();
                // A request the gap cut into has no exact size any more.
                usize::from(self.pending.back().is_some_and(|p| !p.complete))
            }
            Side::Response => {
                self.responses.reset_lost();
                self.orphan_response = false;
                // A response the gap cut into: its request gets no event.
                usize::from(self.pending.front().is_some_and(|p| p.response.is_some()))
            }
        };
        match side {
            Side::Request => {
                self.pending.truncate(self.pending.len() - dropped);
            }
            Side::Response => {
                self.pending.drain(..dropped);
            }
        }
        anomalies.push(Anomaly::Desync {
            side,
            reason: DesyncReason::EventsLost,
            dropped,
        });
    }

    /// Drops the `n` oldest requests in flight (their responses were lost).
    fn drop_pending(&mut self, n: usize, side: Side, anomalies: &mut Vec<Anomaly>) {
        let n = n.min(self.pending.len());
        self.pending.drain(..n);
        anomalies.push(Anomaly::Desync {
            side,
            reason: DesyncReason::EventsLost,
            dropped: n,
        });
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
    pub fn finish(&mut self, done: &mut Vec<Exchange>) -> Vec<(Head, u64)> {
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

impl From<Exchange> for Call {
    fn from(x: Exchange) -> Self {
        Call {
            protocol: "http1",
            method: x.request.method,
            path: x.request.path,
            status: Some(x.response.status),
            start_ts: x.start_ts,
            end_ts: x.end_ts,
            request_bytes: x.request_bytes,
            response_bytes: x.response_bytes,
            request_id: x.request.request_id,
            traceparent: x.request.traceparent,
            user_agent: x.request.user_agent,
            ..Call::default()
        }
    }
}

/// A request that got no response, as a call with an error.
pub fn unanswered(head: Head, start_ts: u64, protocol: &'static str, reset: bool) -> Call {
    Call {
        protocol,
        method: head.method,
        path: head.path,
        error: Some(
            if reset {
                "connection reset before the response"
            } else {
                "connection closed before the response"
            }
            .to_string(),
        ),
        start_ts,
        request_id: head.request_id,
        traceparent: head.traceparent,
        user_agent: head.user_agent,
        ..Call::default()
    }
}

impl Decoder for Http1Exchange {
    fn on_bytes(
        &mut self,
        side: Side,
        ts: u64,
        prefix: &[u8],
        len: u64,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    ) {
        if let Some(h2) = &mut self.h2 {
            return h2.on_bytes(side, ts, prefix, len, done, anomalies);
        }
        let mut exchanges = Vec::new();
        match side {
            Side::Request => self.on_request_bytes(ts, prefix, len, &mut exchanges, anomalies),
            Side::Response => self.on_response_bytes(ts, prefix, len, &mut exchanges, anomalies),
        }
        // An accepted `Upgrade: h2c`: the request's answer comes as HTTP/2 stream 1.
        if let Some(i) = exchanges
            .iter()
            .position(|e| e.response.status == 101 && e.request.h2c)
        {
            let e = exchanges.remove(i);
            self.h2 = Some(Box::new(crate::http2::Http2Exchange::upgraded(
                &e.request,
                e.start_ts,
                e.request_bytes,
            )));
        }
        done.extend(exchanges.into_iter().map(Call::from));
    }

    fn gap(&mut self, side: Side, anomalies: &mut Vec<Anomaly>) {
        match &mut self.h2 {
            Some(h2) => h2.gap(side, anomalies),
            None => self.side_gap(side, anomalies),
        }
    }

    fn close(&mut self, reset: bool, done: &mut Vec<Call>) -> Vec<Call> {
        let mut exchanges = Vec::new();
        let left = self.finish(&mut exchanges);
        done.extend(exchanges.into_iter().map(Call::from));
        let mut left: Vec<Call> = left
            .into_iter()
            .map(|(head, ts)| unanswered(head, ts, "http1", reset))
            .collect();
        if let Some(h2) = &mut self.h2 {
            left.extend(h2.close(reset, done));
        }
        left
    }

    fn in_flight(&self) -> usize {
        self.pending.len() + self.h2.as_ref().map_or(0, |h2| h2.in_flight())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = len.to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[ty, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// curl's `--http2` over `http://`: an HTTP/1.1 request with `Upgrade: h2c`, answered 101,
    /// then HTTP/2 both ways; the upgrade request's answer is stream 1.
    #[test]
    fn an_h2c_upgrade_continues_as_http2() {
        let mut x = Http1Exchange::new();
        let (mut done, mut anomalies) = (Vec::new(), Vec::new());
        let mut feed = |x: &mut Http1Exchange, side, ts, b: &[u8], done: &mut Vec<Call>| {
            x.on_bytes(side, ts, b, b.len() as u64, done, &mut anomalies)
        };
        let upgrade = b"GET /first HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUser-Agent: curl/7.88.1\r\n\
            Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
            HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\nx-request-id: up-1\r\n\r\n";
        feed(&mut x, Side::Request, 10, upgrade, &mut done);
        feed(
            &mut x,
            Side::Response,
            20,
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            &mut done,
        );
        assert!(done.is_empty(), "the 101 is not the answer: {done:?}");
        feed(
            &mut x,
            Side::Response,
            21,
            &frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]),
            &mut done,
        );
        let mut preface = crate::detect::HTTP2_PREFACE.to_vec();
        preface.extend(frame(4, 0, 0, &[]));
        feed(&mut x, Side::Request, 30, &preface, &mut done);
        // Stream 1's answer: :status 200 (static 8), then DATA with END_STREAM.
        let mut answer = frame(1, 4, 1, &[0x88]);
        answer.extend(frame(0, 1, 1, b"hello"));
        feed(&mut x, Side::Response, 40, &answer, &mut done);
        // A second request on stream 3: GET (2), http (6), / (4), :authority literal.
        let mut block = vec![0x82, 0x86, 0x84, 0x41, 3];
        block.extend_from_slice(b"a:1");
        feed(
            &mut x,
            Side::Request,
            50,
            &frame(1, 5, 3, &block),
            &mut done,
        );
        let mut answer = frame(1, 4, 3, &[0x8d]); // :status 404 (static 13)
        answer.extend(frame(0, 1, 3, b"no"));
        feed(&mut x, Side::Response, 60, &answer, &mut done);
        assert_eq!(done.len(), 2, "{done:?}");
        let first = &done[0];
        assert_eq!(
            (
                first.protocol,
                first.method.as_str(),
                first.path.as_str(),
                first.status
            ),
            ("http2", "GET", "/first", Some(200))
        );
        assert_eq!((first.start_ts, first.end_ts), (10, 40));
        assert_eq!(first.request_bytes, upgrade.len() as u64);
        assert_eq!(first.request_id.as_deref(), Some("up-1"));
        let second = &done[1];
        assert_eq!(
            (second.method.as_str(), second.path.as_str(), second.status),
            ("GET", "/", Some(404))
        );
        assert_eq!(x.in_flight(), 0);
    }

    /// An `Upgrade` other than h2c (a WebSocket) keeps the old behaviour: the 101 is the
    /// answer, and nothing after it is parsed.
    #[test]
    fn other_upgrades_end_at_the_101() {
        let mut x = Http1Exchange::new();
        let (mut done, mut anomalies) = (Vec::new(), Vec::new());
        let req =
            b"GET /ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n";
        x.on_bytes(
            Side::Request,
            1,
            req,
            req.len() as u64,
            &mut done,
            &mut anomalies,
        );
        let resp = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n";
        x.on_bytes(
            Side::Response,
            2,
            resp,
            resp.len() as u64,
            &mut done,
            &mut anomalies,
        );
        x.on_bytes(
            Side::Request,
            3,
            &[0x81, 0x85, 1, 2, 3, 4, 5],
            7,
            &mut done,
            &mut anomalies,
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].status, Some(101));
    }

    /// One request/response pair as bytes, with what the exchange must report.
    #[derive(Clone, Debug)]
    struct Pair {
        request: Vec<u8>,
        response: Vec<u8>,
        method: String,
        path: String,
        status: u16,
    }

    fn body_bytes(len: usize) -> Vec<u8> {
        (0..len).map(|i| b'a' + (i % 26) as u8).collect()
    }

    fn chunked(body: &[u8], size: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in body.chunks(size.max(1)) {
            out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
            out.extend_from_slice(c);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"0\r\n\r\n");
        out
    }

    fn pair(kind: u8, n: usize, req_body: usize, resp_body: usize, chunk: usize) -> Pair {
        let path = format!("/r/{n}?q={kind}");
        let (method, mut request) = match kind % 3 {
            0 => (
                "GET",
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nx-request-id: id-{n}\r\n\r\n")
                    .into_bytes(),
            ),
            1 => {
                let mut r = format!("POST {path} HTTP/1.1\r\nContent-Length: {req_body}\r\n\r\n")
                    .into_bytes();
                r.extend(body_bytes(req_body));
                ("POST", r)
            }
            _ => {
                let mut r = format!("PUT {path} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
                    .into_bytes();
                r.extend(chunked(&body_bytes(req_body), chunk));
                ("PUT", r)
            }
        };
        let status = [200u16, 201, 404, 500, 204][n % 5];
        let mut response = match (status, kind % 2) {
            (204, _) => b"HTTP/1.1 204 No Content\r\nServer: t\r\n\r\n".to_vec(),
            (s, 0) => {
                let mut r =
                    format!("HTTP/1.1 {s} X\r\nContent-Length: {resp_body}\r\n\r\n").into_bytes();
                r.extend(body_bytes(resp_body));
                r
            }
            (s, _) => {
                let mut r =
                    format!("HTTP/1.1 {s} X\r\nTransfer-Encoding: chunked\r\n\r\n").into_bytes();
                r.extend(chunked(&body_bytes(resp_body), chunk));
                r
            }
        };
        if kind == 7 {
            // An interim 100 Continue before the final response.
            let mut r = b"HTTP/1.1 100 Continue\r\n\r\n".to_vec();
            r.append(&mut response);
            response = r;
        }
        request.shrink_to_fit();
        Pair {
            request,
            response,
            method: method.into(),
            path,
            status,
        }
    }

    /// Splits `bytes` at the given cut fractions.
    fn split<'a>(bytes: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
        let mut points: Vec<usize> = cuts
            .iter()
            .map(|c| *c as usize * bytes.len() / 1000)
            .collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        points.dedup();
        points
            .windows(2)
            .map(|w| &bytes[w[0]..w[1]])
            .filter(|s| !s.is_empty())
            .collect()
    }

    fn check(
        pairs: &[Pair],
        exchanges: &[Exchange],
        anomalies: &[Anomaly],
    ) -> Result<(), TestCaseError> {
        prop_assert!(anomalies.is_empty(), "anomalies: {anomalies:?}");
        prop_assert_eq!(exchanges.len(), pairs.len());
        for (p, x) in pairs.iter().zip(exchanges) {
            prop_assert_eq!(&x.request.method, &p.method);
            prop_assert_eq!(&x.request.path, &p.path);
            prop_assert_eq!(x.response.status, p.status);
            prop_assert_eq!(x.request_bytes, p.request.len() as u64);
            prop_assert_eq!(x.response_bytes, p.response.len() as u64);
        }
        Ok(())
    }

    fn pairs_strategy() -> impl Strategy<Value = Vec<Pair>> {
        prop::collection::vec((0u8..8, 0usize..3000, 0usize..5000, 1usize..900), 1..6).prop_map(
            |v| {
                v.into_iter()
                    .enumerate()
                    .map(|(n, (k, a, b, c))| pair(k, n, a, b, c))
                    .collect()
            },
        )
    }

    /// Found by fuzzing (fuzz/regressions/http1/response-of-dropped-request): after a gap, a
    /// request dropped while its close-delimited response was in progress left that response
    /// to be paired with the next request, which then ended before it started.
    #[test]
    fn a_response_in_progress_of_a_dropped_request_is_not_paired_with_the_next() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.side_gap(Side::Response, &mut an);
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n";
        x.on_request_bytes(10, get, get.len() as u64, &mut done, &mut an);
        // No length: delimited by the close.
        let resp = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nbody";
        x.on_response_bytes(20, resp, resp.len() as u64, &mut done, &mut an);
        let post = b"POST /b HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        x.on_request_bytes(30, post, post.len() as u64, &mut done, &mut an);
        let unanswered = x.finish(&mut done);
        assert!(done.iter().all(|e| e.end_ts >= e.start_ts), "{done:?}");
        assert!(done.iter().all(|e| e.request.path != "/b"), "{done:?}");
        assert_eq!(unanswered.len(), 1);
        assert_eq!(unanswered[0].0.path, "/b");
    }

    proptest! {
        /// Any split of request and response streams into reads gives the same exchanges,
        /// one request at a time (keep-alive).
    #[test]
        fn any_split_gives_the_same_exchanges(
            pairs in pairs_strategy(),
            cuts in prop::collection::vec(prop::collection::vec(0u16..1000, 0..8), 12),
        ) {
            let mut x = Http1Exchange::new();
            let (mut done, mut anomalies) = (Vec::new(), Vec::new());
            let mut ts = 1;
            for (i, p) in pairs.iter().enumerate() {
                for seg in split(&p.request, &cuts[(2 * i) % 12]) {
                    ts += 1;
                    x.on_request_bytes(ts, seg, seg.len() as u64, &mut done, &mut anomalies);
                }
                for seg in split(&p.response, &cuts[(2 * i + 1) % 12]) {
                    ts += 1;
                    x.on_response_bytes(ts, seg, seg.len() as u64, &mut done, &mut anomalies);
                }
            }
            check(&pairs, &done, &anomalies)?;
            prop_assert_eq!(x.in_flight(), 0);
        }

        /// Pipelined: every request first (in arbitrary reads), then every response.
        #[test]
        fn pipelined_streams_pair_in_order(
            pairs in pairs_strategy(),
            req_cuts in prop::collection::vec(0u16..1000, 0..16),
            resp_cuts in prop::collection::vec(0u16..1000, 0..16),
        ) {
            let requests: Vec<u8> = pairs.iter().flat_map(|p| p.request.clone()).collect();
            let responses: Vec<u8> = pairs.iter().flat_map(|p| p.response.clone()).collect();
            let mut x = Http1Exchange::new();
            let (mut done, mut anomalies) = (Vec::new(), Vec::new());
            for seg in split(&requests, &req_cuts) {
                x.on_request_bytes(1, seg, seg.len() as u64, &mut done, &mut anomalies);
            }
            for seg in split(&responses, &resp_cuts) {
                x.on_response_bytes(2, seg, seg.len() as u64, &mut done, &mut anomalies);
            }
            check(&pairs, &done, &anomalies)?;
        }

        /// Random bytes and gaps, on either side, never panic (a fuzz-style property).
        #[test]
        fn garbage_is_survived(
            chunks in prop::collection::vec((any::<bool>(), prop::collection::vec(any::<u8>(), 0..200), 0u64..500), 0..30)
        ) {
            let mut x = Http1Exchange::new();
            let (mut done, mut anomalies) = (Vec::new(), Vec::new());
            for (req, bytes, extra) in chunks {
                let len = bytes.len() as u64 + extra;
                if req {
                    x.on_request_bytes(1, &bytes, len, &mut done, &mut anomalies);
                } else {
                    x.on_response_bytes(2, &bytes, len, &mut done, &mut anomalies);
                }
            }
            let _ = x.finish(&mut done);
        }
    }

    /// Feeds one "syscall" whose captured prefix is at most `prefix` bytes.
    fn feed_capped(
        x: &mut Http1Exchange,
        req: bool,
        ts: u64,
        bytes: &[u8],
        prefix: usize,
        done: &mut Vec<Exchange>,
        an: &mut Vec<Anomaly>,
    ) {
        let cap = &bytes[..bytes.len().min(prefix)];
        if req {
            x.on_request_bytes(ts, cap, bytes.len() as u64, done, an);
        } else {
            x.on_response_bytes(ts, cap, bytes.len() as u64, done, an);
        }
    }

    #[test]
    fn bodies_beyond_the_prefix_keep_exact_counts_and_times() {
        let p = pair(4, 0, 10_000, 50_000, 100); // POST, Content-Length both ways
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        // The request in one read, the response head and body in separate writes.
        feed_capped(&mut x, true, 10, &p.request, 256, &mut done, &mut an);
        let head_len = p
            .response
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
            + 4;
        feed_capped(
            &mut x,
            false,
            20,
            &p.response[..head_len],
            256,
            &mut done,
            &mut an,
        );
        feed_capped(
            &mut x,
            false,
            35,
            &p.response[head_len..],
            256,
            &mut done,
            &mut an,
        );
        assert!(an.is_empty(), "{an:?}");
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_bytes, p.request.len() as u64);
        assert_eq!(done[0].response_bytes, p.response.len() as u64);
        assert_eq!((done[0].start_ts, done[0].end_ts), (10, 35));
    }

    #[test]
    fn chunk_lines_lost_in_a_gap_end_the_message_at_the_turn() {
        // A chunked request body sent in one write far beyond the prefix: its chunk-size lines
        // are not captured, so its end comes from the response starting.
        let p = pair(2, 1, 5000, 10, 300);
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        feed_capped(&mut x, true, 1, &p.request, 256, &mut done, &mut an);
        feed_capped(&mut x, false, 9, &p.response, 256, &mut done, &mut an);
        assert_eq!(an, vec![Anomaly::EndedAtTurn(DesyncReason::ChunkTruncated)]);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request_bytes, p.request.len() as u64);
        assert_eq!(done[0].response.status, p.status);
    }

    #[test]
    fn a_head_beyond_the_prefix_is_counted_not_guessed() {
        let mut request = b"GET /x HTTP/1.1\r\nCookie: ".to_vec();
        request.extend(body_bytes(600));
        request.extend_from_slice(b"\r\n\r\n");
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        feed_capped(&mut x, true, 1, &request, 256, &mut done, &mut an);
        feed_capped(
            &mut x,
            false,
            2,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            256,
            &mut done,
            &mut an,
        );
        assert!(done.is_empty());
        assert!(
            matches!(
                an[0],
                Anomaly::Desync {
                    reason: DesyncReason::HeadTruncated,
                    ..
                }
            ),
            "{an:?}"
        );
        // The next request on the connection is seen again.
        let p = pair(0, 2, 0, 5, 1);
        feed_capped(&mut x, true, 3, &p.request, 256, &mut done, &mut an);
        feed_capped(&mut x, false, 4, &p.response, 256, &mut done, &mut an);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request.path, p.path);
    }

    #[test]
    fn head_requests_have_no_response_body_and_close_ends_unframed_responses() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.on_request_bytes(1, b"HEAD / HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        let resp = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n";
        x.on_response_bytes(2, resp, resp.len() as u64, &mut done, &mut an);
        assert_eq!(done.len(), 1);
        x.on_request_bytes(3, b"GET /old HTTP/1.0\r\n\r\n", 21, &mut done, &mut an);
        let resp = b"HTTP/1.0 200 OK\r\n\r\nbody until close";
        x.on_response_bytes(4, resp, resp.len() as u64, &mut done, &mut an);
        assert_eq!(done.len(), 1);
        let unanswered = x.finish(&mut done);
        assert!(unanswered.is_empty());
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].response_bytes, resp.len() as u64);
        assert_eq!(done[1].end_ts, 4);
    }

    #[test]
    fn close_before_the_response_reports_the_request() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.on_request_bytes(5, b"GET /crash HTTP/1.1\r\n\r\n", 23, &mut done, &mut an);
        let unanswered = x.finish(&mut done);
        assert_eq!(unanswered.len(), 1);
        assert_eq!(unanswered[0].0.path, "/crash");
        assert_eq!(unanswered[0].1, 5);
    }

    #[test]
    fn lost_events_resynchronise_at_the_next_request() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.on_request_bytes(1, b"GET /a HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        x.events_lost(&mut an);
        // The rest of /a's response arrives after the loss: ignored.
        x.on_response_bytes(2, b"tail of a body", 14, &mut done, &mut an);
        x.on_request_bytes(3, b"GET /b HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        x.on_response_bytes(
            4,
            b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
            38,
            &mut done,
            &mut an,
        );
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].request.path, "/b");
    }

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

    #[test]
    fn without_pipelining_a_response_after_a_gap_answers_the_newest_request() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.on_request_bytes(1, b"GET /a HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        x.on_response_bytes(2, OK, OK.len() as u64, &mut done, &mut an);
        // /b's response is lost in a gap; /c is sent after it.
        x.on_request_bytes(3, b"GET /b HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        x.side_gap(Side::Response, &mut an);
        x.on_request_bytes(5, b"GET /c HTTP/1.1\r\n\r\n", 19, &mut done, &mut an);
        x.on_response_bytes(6, OK, OK.len() as u64, &mut done, &mut an);
        let paths: Vec<&str> = done.iter().map(|d| d.request.path.as_str()).collect();
        assert_eq!(paths, ["/a", "/c"]);
        assert_eq!(done[1].start_ts, 5);
        assert_eq!(done[1].end_ts, 6);
        let dropped: usize = an
            .iter()
            .map(|a| match a {
                Anomaly::Desync { dropped, .. } => *dropped,
                _ => 0,
            })
            .sum();
        assert_eq!(dropped, 1, "{an:?}");
    }

    #[test]
    fn a_gap_inside_a_request_drops_only_that_request() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        let head = b"POST /up HTTP/1.1\r\nContent-Length: 100\r\n\r\n";
        x.on_request_bytes(1, head, head.len() as u64 + 10, &mut done, &mut an);
        x.side_gap(Side::Request, &mut an);
        x.on_response_bytes(2, OK, OK.len() as u64, &mut done, &mut an);
        x.on_request_bytes(3, b"GET /next HTTP/1.1\r\n\r\n", 22, &mut done, &mut an);
        x.on_response_bytes(4, OK, OK.len() as u64, &mut done, &mut an);
        let paths: Vec<&str> = done.iter().map(|d| d.request.path.as_str()).collect();
        assert_eq!(paths, ["/next"]);
        assert_eq!(done[0].request_bytes, 22);
    }

    #[test]
    fn a_pipelining_client_loses_what_is_in_flight_at_a_gap() {
        let mut x = Http1Exchange::new();
        let (mut done, mut an) = (Vec::new(), Vec::new());
        x.on_request_bytes(
            1,
            b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n",
            38,
            &mut done,
            &mut an,
        );
        x.side_gap(Side::Response, &mut an);
        x.on_response_bytes(2, OK, OK.len() as u64, &mut done, &mut an);
        assert!(done.is_empty(), "{done:?}");
    }
}

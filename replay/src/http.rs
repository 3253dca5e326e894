//! Sending sessions to a target over HTTP/1 and measuring what comes back.

use std::{
    collections::VecDeque,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::{
    noise::Noise,
    response::dechunk,
    session::{Session, chunked_len, framing},
};

/// Methods that change state: not replayed unless writes are allowed.
pub const WRITE_METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];

/// Largest response head or body a replay reads.
const MAX_RESPONSE: usize = 64 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// The only address contacted.
    pub target: SocketAddr,
    /// Sessions replayed at once.
    pub concurrency: usize,
    pub allow_writes: bool,
    /// Connect, read and write timeout (a request that exceeds it is an error outcome).
    pub timeout: Duration,
    pub timing: Timing,
    /// What responses are compared without (`Noise::default()`: `Date` and the framing
    /// headers).
    pub noise: Noise,
}

/// When requests are sent.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Timing {
    /// Each session as fast as its responses allow (closed loop): the target's capacity.
    #[default]
    AsFast,
    /// Open loop: each request at its recorded arrival time, divided by `speed` (2.0 = twice as
    /// fast), counted from the capture's first request: latency under the recorded load. A
    /// session's order is still kept: a request whose previous response is late goes late, and
    /// how late is reported (`Outcome::late_ns`), as when no worker was free (raise
    /// `concurrency` to the capture's concurrent sessions).
    Recorded { speed: f64 },
}

/// What one replayed request got. Hashes and excerpts are of the normalized response (declared
/// noise left out or masked, JSON canonical), so equal means "the same answer".
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Outcome {
    /// The captured connection the request came from, and its position in it.
    pub session: u64,
    pub index: usize,
    pub method: String,
    pub path: String,
    pub status: Option<u16>,
    /// From the request's first byte written to the response's last byte read.
    pub latency_ns: u64,
    /// CRC-32 of the normalized response body (de-chunked).
    pub body_hash: u32,
    /// The body's size as received (before normalization).
    pub body_bytes: u64,
    pub error: Option<String>,
    /// With recorded timing: how long after its scheduled time the request was sent (0 when
    /// on time); a replayer that cannot keep the schedule says so instead of measuring less load.
    pub late_ns: u64,
    /// CRC-32 of the normalized headers (`name: value` lines, sorted, noise left out).
    #[serde(default)]
    pub headers_hash: u32,
    /// The normalized headers, to name the one that differs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<(String, String)>,
    /// Per body field, a hash of its values (`noise::Normalized::fields`): what a calibration
    /// needs to tell a noisy field from a changed one. Not printed.
    #[serde(default, skip_serializing)]
    pub body_fields: Vec<(String, u32)>,
    /// The normalized body's first bytes, to show a difference.
    #[serde(default)]
    pub body_excerpt: String,
}

/// A replay's results.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Replayed {
    pub outcomes: Vec<Outcome>,
    pub sessions: usize,
    /// Requests not sent because they would change state (`allow_writes` off).
    pub skipped_writes: u64,
    /// Captured bytes no request could be framed from (lost pieces, other protocols).
    pub unframed_bytes: u64,
}

/// Replays `sessions` against `options.target`.
pub fn replay(sessions: Vec<Session>, options: &ReplayOptions) -> Replayed {
    replay_each(sessions, options, &[options.target])
        .pop()
        .unwrap_or_default()
}

/// Replays `sessions` against each of `targets` at once, interleaved request by request (each
/// request goes to every target before the next, the first target drawn per request), so A,
/// B and A2 see the same moments of the replaying host and of the network: a replay on a busy
/// machine does not make one version look slower for having run later. One result per target,
/// in their order; `options.target` is not used.
pub fn replay_each(
    mut sessions: Vec<Session>,
    options: &ReplayOptions,
    targets: &[SocketAddr],
) -> Vec<Replayed> {
    let count = sessions.len();
    let unframed = sessions.iter().map(|s| s.unframed_bytes).sum();
    // With recorded timing, sessions start in the order they started in the capture.
    sessions.sort_by_key(|s| s.requests.first().map_or(u64::MAX, |r| r.ts_unix_ns));
    let schedule = Schedule::new(
        sessions
            .iter()
            .filter_map(|s| s.requests.first())
            .map(|r| r.ts_unix_ns)
            .min()
            .unwrap_or(0),
    );
    let mut out: Vec<Replayed> = targets
        .iter()
        .map(|_| Replayed {
            sessions: count,
            unframed_bytes: unframed,
            ..Replayed::default()
        })
        .collect();
    for (sides, skipped) in in_parallel(sessions, options.concurrency, |session| {
        run_session(&session, options, targets, &schedule)
    }) {
        for (r, side) in out.iter_mut().zip(sides) {
            r.outcomes.extend(side);
            r.skipped_writes += skipped;
        }
    }
    for r in &mut out {
        r.outcomes.sort_by_key(|o| (o.session, o.index));
    }
    out
}

fn connect(target: &SocketAddr, timeout: Duration) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Runs `work` on every session, `concurrency` sessions at once, taken in their order (the
/// HTTP and the Postgres replays share it); the results in no particular order.
pub(crate) fn in_parallel<S: Send, R: Send>(
    sessions: Vec<S>,
    concurrency: usize,
    work: impl Fn(S) -> R + Sync,
) -> Vec<R> {
    let queue = Mutex::new(sessions.into_iter().collect::<VecDeque<_>>());
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..concurrency.max(1) {
            scope.spawn(|| {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.pop_front());
                    let Some(session) = next else { break };
                    let r = work(session);
                    if let Ok(mut out) = results.lock() {
                        out.push(r);
                    }
                }
            });
        }
    });
    results.into_inner().unwrap_or_default()
}

/// The replay's clock for recorded timing.
pub(crate) struct Schedule {
    started: Instant,
    /// The capture's first request time (Unix ns).
    first_ns: u64,
}

impl Schedule {
    /// A clock started now, at the capture's first request time `first_ns`.
    pub(crate) fn new(first_ns: u64) -> Self {
        Self {
            started: Instant::now(),
            first_ns,
        }
    }

    /// When a request recorded at `ts_unix_ns` is due, or `None` when sent as fast as possible.
    fn due(&self, timing: Timing, ts_unix_ns: u64) -> Option<Instant> {
        match timing {
            Timing::AsFast => None,
            Timing::Recorded { speed } => {
                let offset = ts_unix_ns.saturating_sub(self.first_ns) as f64 / speed.max(1e-6);
                Some(self.started + Duration::from_nanos(offset.min(u64::MAX as f64) as u64))
            }
        }
    }

    /// Sleeps until a request recorded at `ts_unix_ns` is due; returns how late it is (ns, 0
    /// when on time or sent as fast as possible).
    pub(crate) fn wait(&self, timing: Timing, ts_unix_ns: u64) -> u64 {
        let Some(due) = self.due(timing, ts_unix_ns) else {
            return 0;
        };
        let now = Instant::now();
        match due.checked_duration_since(now) {
            Some(wait) => {
                std::thread::sleep(wait);
                0
            }
            None => now.duration_since(due).as_nanos() as u64,
        }
    }
}

/// One session, in order, on one connection per target (a new one after a close or an
/// error); each request to every target, the first drawn per request. Per target, its outcomes.
fn run_session(
    session: &Session,
    options: &ReplayOptions,
    targets: &[SocketAddr],
    schedule: &Schedule,
) -> (Vec<Vec<Outcome>>, u64) {
    let mut out: Vec<Vec<Outcome>> = targets.iter().map(|_| Vec::new()).collect();
    let mut skipped = 0;
    let mut conns: Vec<Option<TcpStream>> = targets.iter().map(|_| None).collect();
    for (index, req) in session.requests.iter().enumerate() {
        if !options.allow_writes && WRITE_METHODS.contains(&req.method.as_str()) {
            skipped += 1;
            continue;
        }
        let late_ns = schedule.wait(options.timing, req.ts_unix_ns);
        let first = (crate::postgres::mix(session.conn, index as u64) % targets.len().max(1) as u64)
            as usize;
        for k in 0..targets.len() {
            let t = (first + k) % targets.len();
            let mut outcome = Outcome::new(session.conn, index, &req.method, &req.path);
            outcome.late_ns = late_ns;
            let (outcome, keep) = send(
                conns[t].take(),
                &targets[t],
                options.timeout,
                &options.noise,
                outcome,
                &req.bytes,
            );
            conns[t] = keep;
            out[t].push(outcome);
        }
    }
    (out, skipped)
}

impl Outcome {
    /// The outcome of request `index` of session `session`, nothing measured yet.
    pub fn new(session: u64, index: usize, method: &str, path: &str) -> Self {
        Self {
            session,
            index,
            method: method.to_string(),
            path: path.to_string(),
            status: None,
            latency_ns: 0,
            body_hash: 0,
            body_bytes: 0,
            error: None,
            late_ns: 0,
            headers_hash: 0,
            headers: Vec::new(),
            body_fields: Vec::new(),
            body_excerpt: String::new(),
        }
    }

    /// Takes in an answer, normalized by `noise`: the same normalization whether the response
    /// was read from a socket or framed from a capture, so both compare.
    pub fn answered(
        &mut self,
        noise: &Noise,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) {
        self.status = Some(status);
        self.body_bytes = body.len() as u64;
        let n = noise.normalize(
            status,
            headers.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
            body,
        );
        self.body_hash = n.body_hash();
        self.headers_hash = n.headers_hash();
        self.body_excerpt = n.excerpt();
        self.headers = n.headers;
        self.body_fields = n.fields;
    }
}

/// Sends one request (`bytes`, exactly) to `target` on `conn`, or on a new connection when
/// there is none, and reads and measures its response (`latency_ns`: the request's first byte
/// written to the response's last byte read, by this client). Returns `outcome` filled in (an
/// `error` when it failed) and the connection when it stays open, for the next request.
pub fn send(
    conn: Option<TcpStream>,
    target: &SocketAddr,
    timeout: Duration,
    noise: &Noise,
    mut outcome: Outcome,
    bytes: &[u8],
) -> (Outcome, Option<TcpStream>) {
    let stream = match conn.map_or_else(|| connect(target, timeout), Ok) {
        Ok(s) => s,
        Err(e) => {
            outcome.error = Some(format!("connect: {e}"));
            return (outcome, None);
        }
    };
    let started = Instant::now();
    match exchange(stream, bytes, outcome.method == "HEAD") {
        Ok((response, keep)) => {
            outcome.latency_ns = started.elapsed().as_nanos() as u64;
            outcome.answered(noise, response.status, &response.headers, &response.body);
            (outcome, keep)
        }
        Err(e) => {
            outcome.latency_ns = started.elapsed().as_nanos() as u64;
            outcome.error = Some(e);
            (outcome, None)
        }
    }
}

struct Response {
    status: u16,
    headers: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
}

/// Sends one request and reads its response; returns the connection if it stays open.
fn exchange(
    mut stream: TcpStream,
    request: &[u8],
    head_only: bool,
) -> Result<(Response, Option<TcpStream>), String> {
    stream
        .write_all(request)
        .map_err(|e| format!("write: {e}"))?;
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Head.
        let mut headers = [httparse::EMPTY_HEADER; 96];
        let mut resp = httparse::Response::new(&mut headers);
        let parsed = resp.parse(&buf).map_err(|e| format!("bad response: {e}"))?;
        if let httparse::Status::Complete(head) = parsed {
            let status = resp.code.unwrap_or(0);
            if (100..200).contains(&status) && status != 101 {
                // Interim: the final response follows.
                buf.drain(..head);
                continue;
            }
            let (length, chunked) = framing(resp.headers);
            let close = resp.headers.iter().any(|h| {
                h.name.eq_ignore_ascii_case("connection")
                    && String::from_utf8_lossy(h.value)
                        .to_ascii_lowercase()
                        .contains("close")
            });
            let headers = resp
                .headers
                .iter()
                .map(|h| (h.name.to_string(), h.value.to_vec()))
                .collect();
            let no_body = head_only || status == 204 || status == 304;
            let body = read_body(
                &mut stream,
                &mut buf,
                head,
                length,
                chunked,
                no_body,
                &mut chunk,
            )?;
            let keep = (!close && (no_body || length.is_some() || chunked)).then_some(stream);
            return Ok((
                Response {
                    status,
                    headers,
                    body,
                },
                keep,
            ));
        }
        if buf.len() > MAX_RESPONSE {
            return Err("response head too large".into());
        }
        let n = stream.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed before a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[allow(clippy::too_many_arguments)]
fn read_body(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    head: usize,
    length: Option<usize>,
    chunked: bool,
    no_body: bool,
    chunk: &mut [u8],
) -> Result<Vec<u8>, String> {
    if no_body {
        return Ok(Vec::new());
    }
    loop {
        let have = &buf[head..];
        if chunked {
            if let Some(n) = chunked_len(have) {
                return Ok(dechunk(&have[..n]));
            }
        } else if let Some(len) = length
            && have.len() >= len
        {
            return Ok(have[..len].to_vec());
        }
        if buf.len() > MAX_RESPONSE {
            return Err("response too large".into());
        }
        let n = stream.read(chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            if length.is_none() && !chunked {
                // Delimited by the close.
                return Ok(buf[head..].to_vec());
            }
            return Err("connection closed inside a response".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk(b"3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}

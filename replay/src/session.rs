//! Sessions of a capture: the request side of each recorded connection, split into HTTP/1
//! requests (head and body, by `Content-Length` or chunked framing). A request whose bytes the
//! capture lost is dropped with the rest of its session's stream after it (what follows cannot
//! be framed), and counted.

use std::collections::BTreeMap;

use bakeoff_capture::{ConnInfo, Direction, Kind, Record};

/// One request as recorded: its exact bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub bytes: Vec<u8>,
    /// When the recorded process read it (Unix ns).
    pub ts_unix_ns: u64,
}

/// The requests of one recorded connection, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Session {
    pub conn: u64,
    pub requests: Vec<Request>,
    /// Recorded bytes that could not be framed as requests (lost pieces, unknown protocol).
    pub unframed_bytes: u64,
    /// The capture recorded losses on this connection's request side.
    pub lossy: bool,
}

/// Per connection: request-side bytes, with the time each piece was recorded, and losses.
/// Shared by the HTTP and the Postgres framers.
#[derive(Default)]
pub(crate) struct Stream {
    pub(crate) server: Option<bool>,
    /// What the `Open` record said (Postgres sessions joined mid-way take their state from it).
    pub(crate) info: Option<ConnInfo>,
    pub(crate) bytes: Vec<u8>,
    /// (offset in `bytes`, ts) of each piece.
    pub(crate) times: Vec<(usize, u64)>,
    /// Offset of the first loss: nothing after it is framed.
    pub(crate) lost_at: Option<usize>,
}

impl Stream {
    /// When the piece holding byte `at` was recorded.
    pub(crate) fn ts_at(&self, at: usize) -> u64 {
        self.times
            .iter()
            .take_while(|(off, _)| *off <= at)
            .last()
            .map_or(0, |(_, t)| *t)
    }
}

/// The sessions of a capture's records (HTTP/1 requests of connections the recorded process
/// served, or made when it was the client).
pub fn sessions(records: impl IntoIterator<Item = Record>) -> Vec<Session> {
    request_streams(records)
        .into_iter()
        .map(|(conn, s)| frame(conn, s))
        .filter(|s| !s.requests.is_empty() || s.unframed_bytes > 0)
        .collect()
}

/// Per connection, in connection order: its request side (what a server read, or what a
/// client wrote), with the pieces' times and the first loss.
pub(crate) fn request_streams(records: impl IntoIterator<Item = Record>) -> BTreeMap<u64, Stream> {
    let mut streams: BTreeMap<u64, Stream> = BTreeMap::new();
    for r in records {
        let s = streams.entry(r.conn).or_default();
        match r.kind {
            Kind::Open => {
                if let Ok(info) = r.conn_info() {
                    s.server = match info.role.as_str() {
                        "server" => Some(true),
                        "client" => Some(false),
                        _ => None,
                    };
                    s.info = Some(info);
                }
            }
            Kind::Data | Kind::Loss => {
                // The request side: what a server read, or what a client wrote.
                let request_side = match s.server {
                    Some(true) | None => r.direction == Direction::Ingress,
                    Some(false) => r.direction == Direction::Egress,
                };
                if !request_side {
                    continue;
                }
                if r.kind == Kind::Loss {
                    s.lost_at.get_or_insert(s.bytes.len());
                } else {
                    s.times.push((s.bytes.len(), r.ts_unix_ns));
                    s.bytes.extend_from_slice(&r.body);
                }
            }
            Kind::Close => {}
        }
    }
    streams
}

fn frame(conn: u64, s: Stream) -> Session {
    let end = s.lost_at.unwrap_or(s.bytes.len());
    let bytes = &s.bytes[..end];
    let mut session = Session {
        conn,
        lossy: s.lost_at.is_some(),
        ..Session::default()
    };
    let mut at = 0;
    while at < bytes.len() {
        match request_len(&bytes[at..]) {
            Some((len, method, path)) => {
                session.requests.push(Request {
                    method,
                    path,
                    bytes: bytes[at..at + len].to_vec(),
                    ts_unix_ns: s.ts_at(at),
                });
                at += len;
            }
            None => break,
        }
    }
    session.unframed_bytes = (s.bytes.len() - at) as u64;
    session
}

/// The length of the complete HTTP/1 request at the start of `b`, with its method and target.
pub fn request_len(b: &[u8]) -> Option<(usize, String, String)> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(b).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let method = req.method?.to_string();
    let path = req.path?.to_string();
    let (length, chunked) = framing(req.headers);
    let body = if chunked {
        chunked_len(&b[head..])?
    } else {
        length.unwrap_or(0)
    };
    let len = head.checked_add(body)?;
    (len <= b.len()).then_some((len, method, path))
}

/// `Content-Length` and whether the body is chunked.
pub fn framing(headers: &[httparse::Header<'_>]) -> (Option<usize>, bool) {
    let mut length = None;
    let mut chunked = false;
    for h in headers {
        if h.name.eq_ignore_ascii_case("content-length") {
            length = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok());
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = String::from_utf8_lossy(h.value)
                .to_ascii_lowercase()
                .split(',')
                .any(|t| t.trim() == "chunked");
        }
    }
    (length, chunked)
}

/// Bytes of a complete chunked body (through its last chunk and trailers) at the start of `b`.
pub fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = at + b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&b[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers, up to an empty line.
            loop {
                let end = at + b.get(at..)?.windows(2).position(|w| w == b"\r\n")?;
                let empty = end == at;
                at = end + 2;
                if empty {
                    return Some(at);
                }
            }
        }
        at = at.checked_add(size)?.checked_add(2)?;
        if at > b.len() {
            return None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bakeoff_capture::{ConnInfo, Loss};

    fn open(conn: u64) -> Record {
        Record::open(
            conn,
            1,
            &ConnInfo {
                role: "server".into(),
                ..ConnInfo::default()
            },
        )
    }

    #[test]
    fn requests_are_framed_across_pieces() {
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let post = b"POST /b HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello".to_vec();
        let chunked =
            b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec();
        let mut all = [get.clone(), post.clone(), chunked.clone()].concat();
        let tail = all.split_off(20);
        let records = vec![
            open(1),
            Record::data(1, Direction::Ingress, 10, all),
            Record::data(
                1,
                Direction::Egress,
                11,
                b"HTTP/1.1 200 OK\r\n\r\n".to_vec(),
            ),
            Record::data(1, Direction::Ingress, 12, tail),
            Record::close(1, 13),
        ];
        let s = sessions(records);
        assert_eq!(s.len(), 1);
        let r = &s[0].requests;
        assert_eq!(r.len(), 3);
        assert_eq!((r[0].method.as_str(), r[0].path.as_str()), ("GET", "/a"));
        assert_eq!(r[1].bytes, post);
        assert_eq!(r[2].bytes, chunked);
        assert_eq!((r[0].ts_unix_ns, r[1].ts_unix_ns), (10, 12));
        assert_eq!(s[0].unframed_bytes, 0);
    }

    #[test]
    fn nothing_after_a_loss_is_framed() {
        let get = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
        let records = vec![
            open(2),
            Record::data(2, Direction::Ingress, 10, get.clone()),
            Record::loss(
                2,
                Direction::Ingress,
                11,
                &Loss {
                    bytes: 100,
                    reason: "payload_truncated".into(),
                },
            ),
            Record::data(2, Direction::Ingress, 12, get),
        ];
        let s = sessions(records);
        assert_eq!(s[0].requests.len(), 1);
        assert!(s[0].lossy);
        assert_eq!(s[0].unframed_bytes, 28);
    }
}

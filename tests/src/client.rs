//! A blocking HTTP/1.1 client that knows the exact size of every request it sends and every
//! response it reads, so tests can compare the probe's byte counts with the truth.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// A request to send.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub request_id: String,
    pub body: Vec<u8>,
    /// Send the body with `Transfer-Encoding: chunked` in chunks of this size.
    pub chunked: Option<usize>,
    /// More header lines, e.g. `traceparent`.
    pub headers: Vec<(String, String)>,
    /// `User-Agent` (default `bakeoff-testkit`).
    pub user_agent: Option<String>,
}

impl Request {
    pub fn get(path: &str, request_id: &str) -> Self {
        Self {
            method: "GET".into(),
            path: path.into(),
            request_id: request_id.into(),
            body: Vec::new(),
            chunked: None,
            headers: Vec::new(),
            user_agent: None,
        }
    }

    pub fn post(path: &str, request_id: &str, body: Vec<u8>) -> Self {
        Self {
            method: "POST".into(),
            body,
            ..Self::get(path, request_id)
        }
    }

    /// The exact bytes on the wire.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!(
            "{} {} HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: {}\r\nx-request-id: {}\r\n",
            self.method,
            self.path,
            self.user_agent.as_deref().unwrap_or("bakeoff-testkit"),
            self.request_id
        )
        .into_bytes();
        for (name, value) in &self.headers {
            out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
        }
        match self.chunked {
            Some(size) if !self.body.is_empty() => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                for chunk in self.body.chunks(size.max(1)) {
                    out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    out.extend_from_slice(chunk);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\n\r\n");
            }
            _ => {
                if !self.body.is_empty() || self.method == "POST" {
                    out.extend_from_slice(
                        format!("Content-Length: {}\r\n", self.body.len()).as_bytes(),
                    );
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&self.body);
            }
        }
        out
    }
}

/// What came back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Bytes of the whole response message (head and body) as received.
    pub bytes: u64,
    pub body_len: u64,
}

/// One keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn connect(port: u16) -> Result<Self> {
        Self::connect_to(std::net::SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// A connection to any address (a test's network namespace, say).
    pub fn connect_to(addr: std::net::SocketAddr) -> Result<Self> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads its response.
    pub fn request(&mut self, req: &Request) -> Result<Response> {
        Ok(self.pipeline(std::slice::from_ref(req))?.remove(0))
    }

    /// Sends all requests in one write (pipelining), then reads the responses in order.
    pub fn pipeline(&mut self, reqs: &[Request]) -> Result<Vec<Response>> {
        let bytes: Vec<u8> = reqs.iter().flat_map(Request::to_bytes).collect();
        self.stream.write_all(&bytes)?;
        reqs.iter()
            .map(|r| self.read_response(r.method == "HEAD"))
            .collect()
    }

    fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 16384];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            )
            .into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    /// Takes bytes up to and including the next CRLF.
    fn line(&mut self) -> Result<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                return Ok(self.buf.drain(..i + 2).collect());
            }
            self.fill()?;
        }
    }

    fn take(&mut self, n: usize) -> Result<()> {
        while self.buf.len() < n {
            self.fill()?;
        }
        self.buf.drain(..n);
        Ok(())
    }

    fn read_response(&mut self, head_request: bool) -> Result<Response> {
        let (status, head_len, length, chunked) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(n) = resp.parse(&self.buf)? {
                let status = resp.code.unwrap_or(0);
                let mut length = None;
                let mut chunked = false;
                for h in resp.headers.iter() {
                    if h.name.eq_ignore_ascii_case("content-length") {
                        length = std::str::from_utf8(h.value)?.trim().parse::<u64>().ok();
                    }
                    if h.name.eq_ignore_ascii_case("transfer-encoding") {
                        chunked = std::str::from_utf8(h.value)?.contains("chunked");
                    }
                }
                break (status, n, length, chunked);
            }
            self.fill()?;
        };
        self.buf.drain(..head_len);
        let mut bytes = head_len as u64;
        let mut body_len = 0u64;
        if head_request || status == 204 || status == 304 || (100..200).contains(&status) {
        } else if chunked {
            loop {
                let line = self.line()?;
                bytes += line.len() as u64;
                let text = std::str::from_utf8(&line)?.trim();
                let size = u64::from_str_radix(text.split(';').next().unwrap_or(""), 16)
                    .with_context(|| format!("bad chunk size line {text:?}"))?;
                if size == 0 {
                    let end = self.line()?;
                    bytes += end.len() as u64;
                    break;
                }
                self.take(size as usize + 2)?;
                bytes += size + 2;
                body_len += size;
            }
        } else if let Some(n) = length {
            self.take(n as usize)?;
            bytes += n;
            body_len = n;
        } else {
            bail!("response without length on a keep-alive connection");
        }
        Ok(Response {
            status,
            bytes,
            body_len,
        })
    }
}

/// A keep-alive connection that survives the server resetting or closing it: the request that
/// got no response is counted (not retried), and the next request opens a new connection.
pub struct Reconnecting {
    port: u16,
    conn: Option<Conn>,
    /// Requests answered with a TCP reset (`ECONNRESET`).
    pub resets: u64,
    /// Requests whose connection was closed (EOF) before the response.
    pub closed: u64,
    /// Connections opened.
    pub connects: u64,
}

impl Reconnecting {
    pub fn connect(port: u16) -> Result<Self> {
        Ok(Self {
            port,
            conn: Some(Conn::connect(port)?),
            resets: 0,
            closed: 0,
            connects: 1,
        })
    }

    /// Sends one request: `Ok(None)` when the connection was reset or closed before the
    /// response; any other failure is an error.
    pub fn request(&mut self, req: &Request) -> Result<Option<Response>> {
        let conn = match &mut self.conn {
            Some(c) => c,
            None => {
                self.connects += 1;
                self.conn.insert(Conn::connect(self.port)?)
            }
        };
        match conn.request(req) {
            Ok(r) => Ok(Some(r)),
            Err(e) => {
                let kind = e.downcast_ref::<std::io::Error>().map(std::io::Error::kind);
                match kind {
                    Some(std::io::ErrorKind::ConnectionReset) => self.resets += 1,
                    Some(std::io::ErrorKind::UnexpectedEof) => self.closed += 1,
                    _ => return Err(e.context(format!("request {} failed", req.request_id))),
                }
                self.conn = None;
                Ok(None)
            }
        }
    }
}

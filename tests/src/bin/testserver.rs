//! bakeoff-testserver: a small HTTP/1.1 server with injectable latency and errors, used by the
//! tests, the demo and the benchmarks. Thread per connection; keep-alive and pipelining.
//!
//! Routes: `/bytes/N` (N-byte body, Content-Length), `/chunked/N/C` (N bytes in C-byte chunks),
//! `/status/CODE`, `POST /echo` (reads a Content-Length or chunked body, answers its size),
//! `/api/NAME/ID` (a JSON document generated at each request: its `generated_at` fields and
//! `Date` header differ on every answer, as a real service's timestamps do), anything else
//! `ok`. `--reset-every N` answers every Nth request with a TCP reset instead;
//! `--change-body-path P` makes the bodies under P those of a "new version" (another price in
//! the JSON documents, `ok changed` for the rest).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;

#[derive(Debug, Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: std::net::IpAddr,
    /// Delay added to every response, in milliseconds.
    #[arg(long, default_value_t = 0)]
    delay_ms: u64,
    /// Extra delay for requests whose path starts with `--slow-path`.
    #[arg(long, default_value_t = 0)]
    slow_ms: u64,
    #[arg(long)]
    slow_path: Option<String>,
    /// Only slow down requests carrying this `user-agent` substring (with --slow-path).
    #[arg(long)]
    slow_agent: Option<String>,
    /// Answer every Nth request with 500 (0: never).
    #[arg(long, default_value_t = 0)]
    error_every: u64,
    /// Reset the connection on every Nth request (0: never): the request is read, then the
    /// socket is closed with SO_LINGER 0, so the client gets an RST and no response.
    #[arg(long, default_value_t = 0)]
    reset_every: u64,
    /// Answer requests whose path starts with this with a changed body (a new version's).
    #[arg(long)]
    change_body_path: Option<String>,
}

static REQUESTS: AtomicU64 = AtomicU64::new(0);

fn main() -> Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind((args.host, args.port))
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let args = args.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, &args);
        });
    }
    Ok(())
}

fn serve(stream: TcpStream, args: &Args) -> Result<()> {
    stream.set_nodelay(true)?;
    // One fd for both directions (no try_clone): the probe tracks sockets per (pid, fd).
    let mut writer = &stream;
    let mut reader = BufReader::new(&stream);
    loop {
        // Read the head line by line (the BufReader keeps pipelined bytes for the next round).
        let mut head = Vec::new();
        loop {
            let n = reader.read_until(b'\n', &mut head)?;
            if n == 0 {
                return Ok(());
            }
            if head.ends_with(b"\r\n\r\n") || head == b"\r\n" {
                break;
            }
            if head.len() > 65536 {
                bail!("head too long");
            }
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        req.parse(&head)?;
        let method = req.method.unwrap_or("").to_string();
        let path = req.path.unwrap_or("/").to_string();
        let mut length = 0usize;
        let mut chunked = false;
        let mut agent = String::new();
        for h in req.headers.iter() {
            let v = String::from_utf8_lossy(h.value);
            if h.name.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(0);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = v.contains("chunked");
            } else if h.name.eq_ignore_ascii_case("user-agent") {
                agent = v.into_owned();
            }
        }
        let body_len = if chunked {
            read_chunked(&mut reader)?
        } else {
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            length
        };
        let n = REQUESTS.fetch_add(1, Ordering::Relaxed) + 1;
        let mut delay = args.delay_ms;
        if let Some(prefix) = &args.slow_path
            && path.starts_with(prefix.as_str())
            && args
                .slow_agent
                .as_ref()
                .is_none_or(|a| agent.contains(a.as_str()))
        {
            delay += args.slow_ms;
        }
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        if args.reset_every > 0 && n.is_multiple_of(args.reset_every) {
            reset(&stream)?;
            return Ok(());
        }
        if args.error_every > 0 && n.is_multiple_of(args.error_every) {
            respond(writer, 500, b"injected error\n")?;
            continue;
        }
        let changed = args
            .change_body_path
            .as_ref()
            .is_some_and(|p| path.starts_with(p.as_str()));
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            (_, ["bytes", n]) => {
                let body = vec![b'x'; n.parse().unwrap_or(0)];
                // Head and body in separate writes, as many servers do.
                writer.write_all(
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).as_bytes(),
                )?;
                writer.write_all(&body)?;
            }
            (_, ["chunked", n, c]) => {
                let total: usize = n.parse().unwrap_or(0);
                let size: usize = c.parse::<usize>().unwrap_or(1).max(1);
                writer.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")?;
                let mut left = total;
                while left > 0 {
                    let k = left.min(size);
                    let mut chunk = format!("{k:x}\r\n").into_bytes();
                    chunk.extend(std::iter::repeat_n(b'y', k));
                    chunk.extend_from_slice(b"\r\n");
                    writer.write_all(&chunk)?;
                    left -= k;
                }
                writer.write_all(b"0\r\n\r\n")?;
            }
            (_, ["status", code]) => {
                respond(writer, code.parse().unwrap_or(500), b"status\n")?;
            }
            ("POST", ["echo"]) => {
                respond(writer, 200, format!("{body_len}\n").as_bytes())?;
            }
            (_, ["api", name, id]) => {
                let body = document(name, id, changed);
                let mut out = format!(
                    "HTTP/1.1 200 OK\r\nDate: {}\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n",
                    http_date(std::time::SystemTime::now()),
                    body.len()
                )
                .into_bytes();
                out.extend_from_slice(body.as_bytes());
                writer.write_all(&out)?;
            }
            _ if changed => respond(writer, 200, b"ok changed\n")?,
            _ => respond(writer, 200, b"ok\n")?,
        }
    }
}

/// `/api/NAME/ID`'s JSON: the same for the same request but for its timestamps (now, in
/// nanoseconds, at the top and in every item); `changed`: the items' prices differ.
fn document(name: &str, id: &str, changed: bool) -> String {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    };
    let id: u64 = id.parse().unwrap_or(0);
    let items: Vec<String> = (1..=3)
        .map(|i| {
            let price = id * 10 + i + if changed { 1 } else { 0 };
            format!(
                r#"{{"sku":"{name}-{id}-{i}","price":{price},"generated_at":"{}"}}"#,
                now()
            )
        })
        .collect();
    format!(
        r#"{{"id":{id},"name":"{name}","generated_at":"{}","items":[{}]}}"#,
        now(),
        items.join(",")
    )
}

/// An HTTP `Date` (IMF-fixdate), e.g. `Sun, 06 Nov 1994 08:49:37 GMT`.
fn http_date(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        WEEKDAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// SO_LINGER with a zero timeout: the close that follows (when the caller drops the stream)
/// sends an RST instead of a FIN.
fn reset(stream: &TcpStream) -> Result<()> {
    use std::os::fd::AsRawFd as _;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a socket we own, with a correctly sized `linger`.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_LINGER: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn respond(mut w: &TcpStream, status: u16, body: &[u8]) -> Result<()> {
    let mut out = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    w.write_all(&out)?;
    Ok(())
}

fn read_chunked(r: &mut BufReader<&TcpStream>) -> Result<usize> {
    let mut total = 0;
    loop {
        let mut line = String::new();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)?;
        if size == 0 {
            let mut end = String::new();
            r.read_line(&mut end)?;
            return Ok(total);
        }
        let mut chunk = vec![0u8; size + 2];
        r.read_exact(&mut chunk)?;
        total += size;
    }
}

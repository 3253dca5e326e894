//! A webhook receiver for tests: accepts HTTP/1.1 POSTs on loopback, answers 200, keeps the
//! bodies.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    sync::{Arc, Mutex},
};

use anyhow::Result;

pub struct WebhookReceiver {
    pub port: u16,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl WebhookReceiver {
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let kept = bodies.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // Read the head, then Content-Length bytes of body (bounded at 1 MiB).
                let body = loop {
                    let Ok(n) = stream.read(&mut chunk) else {
                        break None;
                    };
                    if n == 0 || buf.len() > 1 << 20 {
                        break None;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let mut headers = [httparse::EMPTY_HEADER; 32];
                    let mut req = httparse::Request::new(&mut headers);
                    if let Ok(httparse::Status::Complete(head)) = req.parse(&buf) {
                        let len = req
                            .headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                            .and_then(|h| std::str::from_utf8(h.value).ok()?.trim().parse().ok())
                            .unwrap_or(0usize);
                        if buf.len() >= head + len {
                            break Some(
                                String::from_utf8_lossy(&buf[head..head + len]).into_owned(),
                            );
                        }
                    }
                };
                if let Some(b) = body {
                    if let Ok(mut v) = kept.lock() {
                        v.push(b);
                    }
                    let _ = stream.write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    );
                }
            }
        });
        Ok(Self { port, bodies })
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Bodies received so far.
    pub fn bodies(&self) -> Vec<String> {
        self.bodies.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

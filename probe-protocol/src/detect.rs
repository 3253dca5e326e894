//! Which protocol a connection speaks, from its first request-side bytes (never from its port).

use super::http1::{Side, starts_message};

/// A protocol the probe decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    /// The HTTP/2 client preface (prior knowledge, or after an `h2c` upgrade).
    Http2,
    /// A Postgres StartupMessage, SSLRequest, GSSENCRequest or CancelRequest.
    Postgres,
}

/// The HTTP/2 client connection preface (RFC 9113 section 3.4).
pub const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first request-side bytes say: `Some` when they identify a protocol, `None` when
/// they are not (or not yet enough) one the probe decodes.
pub fn detect(first: &[u8]) -> Option<Detected> {
    if first.is_empty() {
        return None;
    }
    let n = first.len().min(HTTP2_PREFACE.len());
    if first.len() >= 4 && first[..n] == HTTP2_PREFACE[..n] {
        return Some(Detected::Http2);
    }
    if postgres_start(first) {
        return Some(Detected::Postgres);
    }
    if starts_message(Side::Request, first) && first.len() >= 4 {
        return Some(Detected::Http1);
    }
    None
}

/// For a connection joined mid-way (or whose first bytes were not captured): whether the
/// client's bytes start with a plausible HTTP/2 frame of the kinds a client sends first or
/// often (SETTINGS, WINDOW_UPDATE, HEADERS on a client stream), or a Postgres frontend message
/// that starts a request (Query, Parse, Bind). The decoder then finds its framing itself and
/// reports what it cannot know (table entries, statements prepared before) as unknown.
pub fn detect_midstream(first: &[u8]) -> Option<Detected> {
    if postgres_request(first) {
        return Some(Detected::Postgres);
    }
    if first.len() < 9 {
        return None;
    }
    let len = u32::from_be_bytes([0, first[0], first[1], first[2]]);
    let stream = u32::from_be_bytes([first[5], first[6], first[7], first[8]]) & 0x7fff_ffff;
    let plausible = match first[3] {
        // SETTINGS on stream 0, six bytes per setting.
        4 => stream == 0 && len.is_multiple_of(6) && len <= 60,
        // WINDOW_UPDATE: four bytes.
        8 => len == 4,
        // HEADERS on a client-initiated (odd) stream.
        1 => !stream.is_multiple_of(2) && len <= 16_384,
        _ => false,
    };
    plausible.then_some(Detected::Http2)
}

/// Postgres' first frontend message: length, then protocol 3.x or a special request code.
fn postgres_start(b: &[u8]) -> bool {
    const SSL_REQUEST: u32 = 80_877_103;
    const GSSENC_REQUEST: u32 = 80_877_104;
    const CANCEL_REQUEST: u32 = 80_877_102;
    let (Some(len), Some(code)) = (be32(b, 0), be32(b, 4)) else {
        return false;
    };
    match code {
        SSL_REQUEST | GSSENC_REQUEST => len == 8,
        CANCEL_REQUEST => len == 16,
        // StartupMessage, protocol 3.x: parameters follow, the whole message is small.
        c if c >> 16 == 3 => (9..=10_000).contains(&len),
        _ => false,
    }
}

/// Like [`detect_midstream`], for a connection whose client end is not known either: only
/// bytes that can come from a client alone. A Postgres request message, or an HTTP/2 HEADERS
/// frame on a client stream whose header block holds a request pseudo-header (`:method`,
/// `:path`, `:scheme`, `:authority`) and no `:status`, read with an HPACK decoder that knows
/// only the static table (`:method POST` and `GET` are static entries every encoder uses).
pub fn detect_midstream_request(first: &[u8]) -> Option<Detected> {
    if postgres_request(first) {
        return Some(Detected::Postgres);
    }
    if first.len() < 10 || first[3] != 1 {
        return None;
    }
    let len = u32::from_be_bytes([0, first[0], first[1], first[2]]) as usize;
    let stream = u32::from_be_bytes([first[5], first[6], first[7], first[8]]) & 0x7fff_ffff;
    if stream.is_multiple_of(2) || len > 16_384 {
        return None;
    }
    let flags = first[4];
    let padded = flags & 0x08 != 0;
    let pad = if padded { usize::from(first[9]) } else { 0 };
    // PADDED: one pad-length byte; PRIORITY: five bytes before the block.
    let at = 9 + usize::from(padded) + if flags & 0x20 != 0 { 5 } else { 0 };
    let end = (9 + len).saturating_sub(pad).min(first.len());
    let block = first.get(at..end)?;
    let (mut request, mut response) = (false, false);
    crate::hpack::HpackDecoder::new(false).decode_truncated(block, |name, _| match name {
        Some(b":method" | b":path" | b":scheme" | b":authority") => request = true,
        Some(b":status") => response = true,
        _ => {}
    });
    (request && !response).then_some(Detected::Http2)
}

/// A Postgres frontend message that starts a request, checked strictly (its strings are
/// NUL-terminated text where the capture shows them), since nothing else identifies the
/// protocol mid-way: `Q` (simple query), `P` (Parse: name, query), `B` (Bind: portal, name).
fn postgres_request(b: &[u8]) -> bool {
    let Some(len) = be32(b, 1) else {
        return false;
    };
    if !(5..=1 << 24).contains(&len) {
        return false;
    }
    // The message's body as far as captured, and whether all of it was.
    let end = (1 + len as usize).min(b.len());
    let body = &b[5..end];
    let whole = end == 1 + len as usize;
    let text = |s: &[u8]| {
        s.iter()
            .all(|&c| c >= 0x20 || c == b'\t' || c == b'\n' || c == b'\r')
    };
    // The first `n` NUL-terminated strings of the body: text, terminated unless cut by the
    // capture; `max` bounds the length of names.
    let strings = |n: usize, max: usize| {
        let mut rest = body;
        for i in 0..n {
            match rest.iter().position(|&c| c == 0) {
                Some(at) => {
                    if !text(&rest[..at]) || (i + 1 < n && at > max) {
                        return false;
                    }
                    rest = &rest[at + 1..];
                }
                None => return !whole && text(rest) && (i + 1 == n || rest.len() <= max),
            }
        }
        true
    };
    match b[0] {
        b'Q' => body.len() > 1 && strings(1, usize::MAX) && (!whole || body.last() == Some(&0)),
        b'P' => body.len() > 1 && strings(2, 63),
        b'B' => body.len() >= 2 && strings(2, 63),
        _ => false,
    }
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    let bytes: [u8; 4] = b.get(at..at + 4)?.try_into().ok()?;
    Some(u32::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_by_first_bytes() {
        assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(Detected::Http1));
        assert_eq!(detect(HTTP2_PREFACE), Some(Detected::Http2));
        // A preface cut by the capture still counts once its first bytes are unambiguous.
        assert_eq!(detect(&HTTP2_PREFACE[..6]), Some(Detected::Http2));
        let mut startup = Vec::new();
        startup.extend_from_slice(&23u32.to_be_bytes());
        startup.extend_from_slice(&196_608u32.to_be_bytes());
        startup.extend_from_slice(b"user\0bob\0\0");
        assert_eq!(detect(&startup), Some(Detected::Postgres));
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(detect(&ssl), Some(Detected::Postgres));
        assert_eq!(detect(b"\x16\x03\x01\x02\x00"), None, "TLS ClientHello");
        assert_eq!(detect(b"SSH-2.0-OpenSSH"), None);
        assert_eq!(detect(b""), None);
        assert_eq!(detect(&[0, 0, 0, 8]), None, "too short to tell");
    }

    #[test]
    fn detects_http2_frames_mid_stream() {
        // SETTINGS with two settings, on stream 0.
        let settings = [0, 0, 12, 4, 0, 0, 0, 0, 0];
        assert_eq!(detect_midstream(&settings), Some(Detected::Http2));
        // HEADERS on stream 3.
        assert_eq!(
            detect_midstream(&[0, 0, 40, 1, 4, 0, 0, 0, 3]),
            Some(Detected::Http2)
        );
        // HEADERS on an even stream, SETTINGS off stream 0, HTTP/1 text: no.
        assert_eq!(detect_midstream(&[0, 0, 40, 1, 4, 0, 0, 0, 2]), None);
        assert_eq!(detect_midstream(&[0, 0, 12, 4, 0, 0, 0, 0, 1]), None);
        assert_eq!(detect_midstream(b"GET / HTTP/1.1\r\n"), None);
    }

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn tells_request_headers_from_response_headers() {
        // HEADERS on stream 1 starting with :method POST (static 3), with :status 200 (8).
        assert_eq!(
            detect_midstream_request(&[0, 0, 5, 1, 4, 0, 0, 0, 1, 0x83]),
            Some(Detected::Http2)
        );
        assert_eq!(
            detect_midstream_request(&[0, 0, 5, 1, 4, 0, 0, 0, 1, 0x88]),
            None
        );
        // PADDED and PRIORITY: the block starts after them; a literal :path (name index 4).
        assert_eq!(
            detect_midstream_request(&[
                0, 0, 11, 1, 0x28, 0, 0, 0, 3, 1, 0, 0, 0, 0, 9, 0x44, 1, b'/', 0
            ]),
            Some(Detected::Http2)
        );
        // Dynamic-table indices first, then :method POST (static 3): a request.
        assert_eq!(
            detect_midstream_request(&[0, 0, 3, 1, 4, 0, 0, 0, 1, 0xbe, 0xbf, 0x83]),
            Some(Detected::Http2)
        );
        // SETTINGS (either side sends them), only dynamic-table indices: not told.
        assert_eq!(
            detect_midstream_request(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0]),
            None
        );
        assert_eq!(
            detect_midstream_request(&[0, 0, 1, 1, 4, 0, 0, 0, 1, 0xbe]),
            None
        );
        let q = message(b'Q', b"SELECT 1\0");
        assert_eq!(detect_midstream_request(&q), Some(Detected::Postgres));
    }

    #[test]
    fn detects_postgres_requests_mid_stream() {
        let q = message(b'Q', b"SELECT 1\0");
        assert_eq!(detect_midstream(&q), Some(Detected::Postgres));
        // Cut by the capture: still text so far.
        assert_eq!(detect_midstream(&q[..8]), Some(Detected::Postgres));
        let parse = message(b'P', b"s1\0SELECT $1\0\0\0");
        assert_eq!(detect_midstream(&parse), Some(Detected::Postgres));
        let bind = message(b'B', b"\0s1\0\0\0\0\0\0\0");
        assert_eq!(detect_midstream(&bind), Some(Detected::Postgres));
        // Binary where text must be, a query without its NUL, a bad length, other tags.
        assert_eq!(detect_midstream(&message(b'Q', b"\x01\x02\0")), None);
        assert_eq!(detect_midstream(&message(b'Q', b"SELECT 1")), None);
        assert_eq!(detect_midstream(&[b'Q', 0, 0, 0, 2, b'x']), None);
        assert_eq!(detect_midstream(&message(b'X', b"")), None);
        assert_eq!(detect_midstream(&message(b'B', b"\x7f\x01\x02")), None);
    }
}

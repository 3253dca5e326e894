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
/// often (SETTINGS, WINDOW_UPDATE, HEADERS on a client stream). The HTTP/2 decoder then finds
/// its framing itself and reports what it cannot know as unknown.
pub fn detect_midstream(first: &[u8]) -> Option<Detected> {
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
}

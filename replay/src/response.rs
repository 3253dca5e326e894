//! HTTP/1 responses framed from recorded bytes (a server's egress, as a capture holds it), the
//! counterpart of `session::request_len`: live shadowing pairs each captured request with the
//! response the live service gave, without a socket to read from.

use crate::session::{chunked_len, framing};

/// One response as recorded, body de-chunked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

/// The length of the complete HTTP/1 response at the start of `b`, and its status. A response
/// to `HEAD`, a 1xx, 204 or 304 has no body whatever its headers say. `None` when `b` holds
/// less than a whole response, or a response delimited by the connection's close (no length,
/// not chunked): its end is only known at the close (`response_at_close`).
pub fn response_len(b: &[u8], head_request: bool) -> Option<(usize, u16)> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(b).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = resp.code?;
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Some((head, status));
    }
    let (length, chunked) = framing(resp.headers);
    let body = if chunked {
        chunked_len(&b[head..])?
    } else {
        length?
    };
    let len = head.checked_add(body)?;
    (len <= b.len()).then_some((len, status))
}

/// The response that `b` holds once its connection closed: framed as by `response_len`, or,
/// with neither a length nor chunks, everything up to the close.
pub fn response_at_close(b: &[u8], head_request: bool) -> Option<(usize, u16)> {
    if let Some(framed) = response_len(b, head_request) {
        return Some(framed);
    }
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(b).ok()? {
        httparse::Status::Complete(_) => {}
        httparse::Status::Partial => return None,
    }
    let status = resp.code?;
    let (length, chunked) = framing(resp.headers);
    (length.is_none() && !chunked).then_some((b.len(), status))
}

/// The complete response `b` holds (as framed by `response_len` or `response_at_close`),
/// parsed: status, headers and the de-chunked body.
pub fn parse(b: &[u8], head_request: bool) -> Option<Response> {
    let mut headers = [httparse::EMPTY_HEADER; 96];
    let mut resp = httparse::Response::new(&mut headers);
    let head = match resp.parse(b).ok()? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return None,
    };
    let status = resp.code?;
    let (_, chunked) = framing(resp.headers);
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        Vec::new()
    } else if chunked {
        dechunk(&b[head..])
    } else {
        b[head..].to_vec()
    };
    Some(Response {
        status,
        headers: resp
            .headers
            .iter()
            .map(|h| (h.name.to_string(), h.value.to_vec()))
            .collect(),
        body,
    })
}

/// The data of a complete chunked body.
pub(crate) fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..line])
            .ok()
            .and_then(|t| usize::from_str_radix(t.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || line + 2 + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[line + 2..line + 2 + size]);
        b = &b[(line + 4 + size).min(b.len())..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXED: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";

    #[test]
    fn a_content_length_response_ends_at_its_body() {
        let two = [
            FIXED,
            b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        ]
        .concat();
        assert_eq!(response_len(&two, false), Some((FIXED.len(), 200)));
        assert_eq!(
            response_len(&two[FIXED.len()..], false),
            Some((two.len() - FIXED.len(), 404))
        );
        let r = parse(FIXED, false).expect("a response");
        assert_eq!((r.status, r.body.as_slice()), (200, &b"hello"[..]));
        assert_eq!(r.headers[1], ("X-A".to_string(), b"1".to_vec()));
    }

    #[test]
    fn a_chunked_response_ends_after_its_last_chunk_and_is_dechunked() {
        let mut b = CHUNKED.to_vec();
        b.extend_from_slice(b"HTTP/1.1 200 OK\r\n");
        assert_eq!(response_len(&b, false), Some((CHUNKED.len(), 200)));
        assert_eq!(
            parse(CHUNKED, false).map(|r| r.body),
            Some(b"abcde".to_vec())
        );
    }

    #[test]
    fn no_body_after_204_304_1xx_or_a_head_request() {
        for (bytes, status) in [
            (
                &b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"[..],
                204,
            ),
            (
                b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n",
                304,
            ),
            (b"HTTP/1.1 100 Continue\r\n\r\n", 100),
        ] {
            assert_eq!(response_len(bytes, false), Some((bytes.len(), status)));
        }
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(response_len(head, true), Some((head.len(), 200)));
        assert_eq!(response_len(head, false), None);
        assert_eq!(parse(head, true).map(|r| r.body), Some(Vec::new()));
    }

    #[test]
    fn partial_input_is_not_a_response() {
        for cut in [0, 10, FIXED.len() - 1] {
            assert_eq!(response_len(&FIXED[..cut], false), None, "cut at {cut}");
        }
        for cut in [CHUNKED.len() - 2, CHUNKED.len() - 7] {
            assert_eq!(response_len(&CHUNKED[..cut], false), None, "cut at {cut}");
        }
        assert_eq!(response_len(b"not http at all\r\n\r\n", false), None);
    }

    #[test]
    fn a_response_without_length_ends_at_the_close() {
        let b = b"HTTP/1.0 200 OK\r\n\r\nuntil the end";
        assert_eq!(response_len(b, false), None);
        assert_eq!(response_at_close(b, false), Some((b.len(), 200)));
        assert_eq!(response_at_close(&FIXED[..FIXED.len() - 1], false), None);
    }
}

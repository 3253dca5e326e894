//! Redaction of recorded payloads, applied on the host before anything leaves it.
//!
//! Secrets are masked in place with bytes of the same length (`*`), never removed: the
//! messages keep their framing (`Content-Length`, chunk sizes, Postgres message lengths), so a
//! replay sends well-formed requests, and a masked value is visibly masked. Only the secret's
//! length leaks.
//!
//! On by default: the `Authorization`, `Proxy-Authorization`, `Cookie` and `Set-Cookie`
//! headers, and Postgres password messages (cleartext, MD5, SASL). User rules add header names,
//! JSON fields (the string or number value of `"name": ...` anywhere in a body) and regular
//! expressions (every match).

use regex::bytes::Regex;

/// Headers masked by default.
pub const DEFAULT_HEADERS: [&str; 4] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

/// The mask byte.
const MASK: u8 = b'*';

/// User redaction rules, as configured.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rules {
    /// More header names (case-insensitive).
    #[serde(default)]
    pub headers: Vec<String>,
    /// JSON field names whose values are masked.
    #[serde(default)]
    pub json_fields: Vec<String>,
    /// Regular expressions; every match is masked.
    #[serde(default)]
    pub regexes: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("redaction rule `{rule}` is not a valid regular expression: {source}")]
pub struct RuleError {
    rule: String,
    source: regex::Error,
}

/// Compiled rules.
#[derive(Clone, Debug)]
pub struct Redactor {
    headers: Vec<String>,
    json: Option<Regex>,
    regexes: Vec<Regex>,
    names: Vec<String>,
}

impl Default for Redactor {
    fn default() -> Self {
        // The defaults alone always compile.
        Self::new(&Rules::default()).unwrap_or_else(|_| Self {
            headers: DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect(),
            json: None,
            regexes: Vec::new(),
            names: Vec::new(),
        })
    }
}

/// What a redaction pass masked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Masked {
    pub fields: u32,
    pub bytes: u64,
}

impl Masked {
    fn add(&mut self, n: usize) {
        self.fields += 1;
        self.bytes += n as u64;
    }
}

fn mask(b: &mut [u8], masked: &mut Masked) {
    b.fill(MASK);
    masked.add(b.len());
}

impl Redactor {
    pub fn new(rules: &Rules) -> Result<Self, RuleError> {
        let mut headers: Vec<String> = DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect();
        headers.extend(rules.headers.iter().map(|h| h.trim().to_ascii_lowercase()));
        let json = if rules.json_fields.is_empty() {
            None
        } else {
            let names: Vec<String> = rules.json_fields.iter().map(|f| regex::escape(f)).collect();
            // "name" : "value" (escapes allowed) or a bare number/literal.
            let rule = format!(
                r#""(?:{})"\s*:\s*("(?:[^"\\]|\\.)*"|[-0-9.eE+a-z]+)"#,
                names.join("|")
            );
            Some(Regex::new(&rule).map_err(|source| RuleError { rule, source })?)
        };
        let regexes = rules
            .regexes
            .iter()
            .map(|r| {
                Regex::new(r).map_err(|source| RuleError {
                    rule: r.clone(),
                    source,
                })
            })
            .collect::<Result<_, _>>()?;
        let mut names: Vec<String> = headers.iter().map(|h| format!("header:{h}")).collect();
        names.push("postgres:password".into());
        names.extend(rules.json_fields.iter().map(|f| format!("json:{f}")));
        names.extend(rules.regexes.iter().map(|r| format!("regex:{r}")));
        Ok(Self {
            headers,
            json,
            regexes,
            names,
        })
    }

    /// The rules in force, named (recorded in the capture's metadata and the audit log).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Masks secrets in HTTP/1 bytes (one message or several, head and body as captured):
    /// the configured headers' values in every head found, then JSON fields and regexes
    /// anywhere.
    pub fn http1(&self, bytes: &mut [u8]) -> Masked {
        let mut masked = Masked::default();
        self.http1_headers(bytes, &mut masked);
        self.bodies(bytes, &mut masked);
        masked
    }

    /// Header lines `Name: value` whose name is configured, wherever a line starts (a head
    /// cut by the capture, pipelined messages): line-based, so it needs no complete head.
    fn http1_headers(&self, bytes: &mut [u8], masked: &mut Masked) {
        let mut start = 0;
        while start < bytes.len() {
            let end = bytes[start..]
                .iter()
                .position(|&c| c == b'\n')
                .map_or(bytes.len(), |i| start + i);
            let line = &bytes[start..end];
            if let Some(colon) = line.iter().position(|&c| c == b':') {
                let name = &line[..colon];
                if !name.is_empty()
                    && name.iter().all(|c| c.is_ascii_graphic())
                    && self
                        .headers
                        .iter()
                        .any(|h| h.as_bytes().eq_ignore_ascii_case(name))
                {
                    let mut v0 = start + colon + 1;
                    while v0 < end && bytes[v0] == b' ' {
                        v0 += 1;
                    }
                    let mut v1 = end;
                    if v1 > v0 && bytes[v1 - 1] == b'\r' {
                        v1 -= 1;
                    }
                    if v1 > v0 {
                        mask(&mut bytes[v0..v1], masked);
                    }
                }
            }
            start = end + 1;
        }
    }

    /// JSON fields and regexes, anywhere in `bytes`.
    pub fn bodies(&self, bytes: &mut [u8], masked: &mut Masked) {
        if let Some(json) = &self.json {
            let spans: Vec<(usize, usize)> = json
                .captures_iter(bytes)
                .filter_map(|c| c.get(1))
                .map(|m| {
                    // Keep a string's quotes: the JSON stays valid.
                    let quoted = bytes[m.start()] == b'"';
                    let q = usize::from(quoted);
                    (m.start() + q, m.end() - q)
                })
                .collect();
            for (a, b) in spans {
                if b > a {
                    mask(&mut bytes[a..b], masked);
                }
            }
        }
        for re in &self.regexes {
            let spans: Vec<(usize, usize)> =
                re.find_iter(bytes).map(|m| (m.start(), m.end())).collect();
            for (a, b) in spans {
                if b > a {
                    mask(&mut bytes[a..b], masked);
                }
            }
        }
    }

    /// Masks a Postgres frontend (client) byte stream: the body of every password message
    /// (`p`: cleartext or MD5 password, SASLInitialResponse, SASLResponse), then user rules in
    /// the rest. `bytes` must start at a message boundary; a message cut by the end of `bytes`
    /// is masked as far as it goes. The startup message (no tag) is skipped when `startup`.
    pub fn postgres_frontend(&self, bytes: &mut [u8], startup: bool) -> Masked {
        let mut masked = Masked::default();
        let mut at = 0;
        if startup && bytes.len() >= 4 {
            let len = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
            at = len.max(4);
        }
        while at + 5 <= bytes.len() {
            let tag = bytes[at];
            let len =
                u32::from_be_bytes([bytes[at + 1], bytes[at + 2], bytes[at + 3], bytes[at + 4]])
                    as usize;
            if len < 4 {
                // Not a message boundary: mask nothing more by position (rules still apply).
                break;
            }
            let body = at + 5;
            let end = (at + 1 + len).min(bytes.len());
            if tag == b'p' && end > body {
                mask(&mut bytes[body..end], &mut masked);
            }
            at += 1 + len;
        }
        self.bodies(bytes, &mut masked);
        masked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_headers_are_masked_in_place() {
        let r = Redactor::default();
        let mut req = b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer s3cr3t\r\nCookie: sid=abc; x=1\r\n\r\nGET /b HTTP/1.1\r\nhost: a\r\nauthorization:Basic Zm9v\r\n\r\n".to_vec();
        let before = req.len();
        let m = r.http1(&mut req);
        let text = String::from_utf8(req.clone()).unwrap();
        assert_eq!(req.len(), before);
        assert_eq!(m.fields, 3);
        assert!(!text.contains("s3cr3t") && !text.contains("sid=abc") && !text.contains("Zm9v"));
        assert!(text.contains("Authorization: *************\r\n"), "{text}");
        assert!(text.contains("Host: a"));
        let mut resp =
            b"HTTP/1.1 200 OK\r\nSet-Cookie: session=42; HttpOnly\r\nContent-Length: 2\r\n\r\nok"
                .to_vec();
        r.http1(&mut resp);
        let text = String::from_utf8(resp).unwrap();
        assert!(!text.contains("session=42") && text.ends_with("Content-Length: 2\r\n\r\nok"));
    }

    #[test]
    fn user_rules_mask_headers_json_fields_and_regexes() {
        let r = Redactor::new(&Rules {
            headers: vec!["X-Api-Key".into()],
            json_fields: vec!["password".into(), "card".into()],
            regexes: vec![r"\b\d{3}-\d{2}-\d{4}\b".into()],
        })
        .unwrap();
        let mut msg = br#"POST /login HTTP/1.1
x-api-key: k-123
Content-Length: 70

{"user":"bob","password":"p\"w","card": 4111111111111111,"ssn":"123-45-6789"}"#
            .to_vec();
        let m = r.http1(&mut msg);
        let text = String::from_utf8(msg).unwrap();
        assert_eq!(m.fields, 4, "{text}");
        assert!(text.contains(r#""password":"****""#), "{text}");
        assert!(text.contains(r#""card": ****************,"#), "{text}");
        assert!(text.contains(r#""ssn":"***********""#), "{text}");
        assert!(text.contains("x-api-key: *****"), "{text}");
        assert!(text.contains(r#""user":"bob""#));
        assert!(r.names().iter().any(|n| n == "json:password"));
        assert!(
            Redactor::new(&Rules {
                regexes: vec!["(".into()],
                ..Rules::default()
            })
            .is_err()
        );
    }

    #[test]
    fn postgres_password_messages_are_masked() {
        let r = Redactor::default();
        let mut startup = Vec::new();
        let params = b"\0\x03\0\0user\0bob\0database\0db\0\0";
        startup.extend_from_slice(&((params.len() + 4) as u32).to_be_bytes());
        startup.extend_from_slice(params);
        let mut stream = startup.clone();
        let secret = b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=clientnonce-secret-value";
        stream.push(b'p');
        stream.extend_from_slice(&((secret.len() + 4) as u32).to_be_bytes());
        stream.extend_from_slice(secret);
        stream.extend_from_slice(b"Q\0\0\0\rSELECT 1;\0");
        let m = r.postgres_frontend(&mut stream, true);
        assert_eq!(m.fields, 1);
        assert_eq!(m.bytes, secret.len() as u64);
        assert!(!stream.windows(6).any(|w| w == b"secret"));
        assert!(stream.ends_with(b"Q\0\0\0\rSELECT 1;\0"));
        assert_eq!(&stream[..startup.len()], &startup[..]);
        // A message cut by the capture: masked as far as it goes.
        let mut cut = b"p\0\0\0\x20hunter2".to_vec();
        r.postgres_frontend(&mut cut, false);
        assert_eq!(&cut[5..], b"*******");
    }
}

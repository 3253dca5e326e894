//! Who may call the query API: bearer tokens from a file (`bakeoff serve --api-tokens FILE`, a
//! Kubernetes Secret mounted as a file) with two scopes, and verified client certificates when
//! the HTTP API uses mutual TLS.
//!
//! The file has one token per line, `SCOPE TOKEN [NAME]`; blank lines and lines starting with
//! `#` are skipped:
//!
//! ```text
//! # Argo Rollouts' analysis and the report link
//! read 6f1c0e...
//! # people debugging a rollout
//! full 9a77d2... alice
//! ```
//!
//! NAME is who holds the token, as the audit log records callers (`Caller`); without it a
//! token's holder is named `token:` and the first 8 hex digits of the token's SHA-256 (enough to
//! tell tokens apart in a log, too few to help guess one). A verified client certificate is
//! named `cert:` and its subject's common name (else its first subject alternative name).
//!
//! `read` is what verdict consumers need (verdicts, experiments, the report, Flagger's webhook);
//! `full` adds raw events, which carry paths, peers and user agents. Tokens are kept as SHA-256
//! digests and compared in constant time, so neither a token nor its length leaks through timing.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use subtle::{ConditionallySelectable as _, ConstantTimeEq as _};

/// What a caller may read. `Read < Full`: a `full` token may call every `read` route.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Scope {
    /// Verdicts, experiments, the report, Flagger's webhook.
    Read,
    /// Everything, raw events included.
    Full,
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Full => "full",
        })
    }
}

/// Shorter tokens are refused: a guessable token is no protection.
pub const MIN_TOKEN_LEN: usize = 16;

/// Who is calling and what they may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub scope: Scope,
    /// The token's NAME, `token:<8 hex>`, `cert:<name>`, or `anonymous` on an open API.
    pub name: String,
}

impl Caller {
    fn anonymous() -> Self {
        Self {
            scope: Scope::Full,
            name: "anonymous".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read the API tokens file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{path}: no tokens (expected lines `read TOKEN [NAME]` or `full TOKEN [NAME]`)")]
    Empty { path: PathBuf },
}

/// The accepted tokens, as digests, with their scopes and holders' names.
#[derive(Clone)]
pub struct Tokens {
    entries: Vec<([u8; 32], Scope)>,
    /// `names[i]` is who holds `entries[i]`.
    names: Vec<String>,
}

impl fmt::Debug for Tokens {
    /// Never prints the digests: they identify the tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokens")
            .field("count", &self.entries.len())
            .finish()
    }
}

fn digest(token: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, token);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

impl Tokens {
    /// Reads and parses the tokens file; every problem names the file (and the line).
    pub fn load(path: &Path) -> Result<Self, TokensError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, TokensError> {
        let mut entries: Vec<([u8; 32], Scope)> = Vec::new();
        let mut names: Vec<String> = Vec::new();
        let mut first_line: Vec<usize> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |reason: String| TokensError::Line {
                path: path.to_path_buf(),
                line,
                reason,
            };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = trimmed.split_whitespace().collect();
            let (scope, token, name) = match fields.as_slice() {
                [scope, token] => (*scope, *token, None),
                [scope, token, name] => (*scope, *token, Some(*name)),
                [_] => return Err(bad("expected `SCOPE TOKEN [NAME]`, found one field".into())),
                _ => {
                    return Err(bad(format!(
                        "expected `SCOPE TOKEN [NAME]`, found {} fields (tokens and names cannot contain spaces)",
                        fields.len()
                    )));
                }
            };
            let scope = match scope {
                "read" => Scope::Read,
                "full" => Scope::Full,
                other => return Err(bad(format!("unknown scope `{other}` (read or full)"))),
            };
            if !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(bad("the token must be printable ASCII".into()));
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "the token is {} characters, at least {MIN_TOKEN_LEN} are needed (e.g. `openssl rand -hex 32`)",
                    token.len()
                )));
            }
            let d = digest(token.as_bytes());
            if let Some(j) = entries.iter().position(|(e, _)| *e == d) {
                return Err(bad(format!(
                    "the same token is already on line {}",
                    first_line[j]
                )));
            }
            let name = match name {
                // The derived names' prefixes are reserved: a token cannot pass for another
                // token or for a certificate in the audit log.
                Some(n) if n.starts_with("token:") || n.starts_with("cert:") => {
                    return Err(bad(format!(
                        "the name `{n}` starts with a reserved prefix (`token:`, `cert:`)"
                    )));
                }
                Some(n) if n.chars().any(char::is_control) => {
                    return Err(bad("the name has control characters".into()));
                }
                Some(n) => n.to_string(),
                None => format!("token:{}", hex8(&d)),
            };
            entries.push((d, scope));
            names.push(name);
            first_line.push(line);
        }
        if entries.is_empty() {
            return Err(TokensError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(Self { entries, names })
    }

    /// How many tokens of each scope: (read, full).
    pub fn counts(&self) -> (usize, usize) {
        let full = self
            .entries
            .iter()
            .filter(|(_, s)| *s == Scope::Full)
            .count();
        (self.entries.len() - full, full)
    }

    /// The scope of `token`, if it is one of ours. Every entry is compared, without early exit.
    pub fn scope_of(&self, token: &[u8]) -> Option<Scope> {
        self.caller_of(token).map(|c| c.scope)
    }

    /// Who holds `token` and its scope, if it is one of ours. Every entry is compared, without
    /// early exit (the index found is selected in constant time).
    pub fn caller_of(&self, token: &[u8]) -> Option<Caller> {
        let d = digest(token);
        let mut found = 0u64;
        for (i, (e, _)) in self.entries.iter().enumerate() {
            found = u64::conditional_select(&found, &(i as u64 + 1), e.ct_eq(&d));
        }
        let i = usize::try_from(found).ok()?.checked_sub(1)?;
        let scope = self.entries.get(i)?.1;
        Some(Caller {
            scope,
            name: self.names.get(i)?.clone(),
        })
    }
}

/// The first 8 hex digits of a digest.
fn hex8(d: &[u8; 32]) -> String {
    d[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a call is refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("authentication required: send `Authorization: Bearer TOKEN`{}", cert_hint(.client_certs))]
    Missing { client_certs: bool },
    #[error("the Authorization header is not `Bearer TOKEN`")]
    Malformed,
    #[error("unknown token")]
    UnknownToken,
    #[error("this needs a token of scope `{needed}`; the token given has scope `{had}`")]
    Scope { needed: Scope, had: Scope },
}

fn cert_hint(client_certs: &bool) -> &'static str {
    if *client_certs {
        " or a client certificate"
    } else {
        ""
    }
}

impl Denied {
    /// 401 (who are you?) rather than 403 (you may not).
    pub fn is_unauthenticated(&self) -> bool {
        !matches!(self, Denied::Scope { .. })
    }
}

/// The API's access rule: open (no tokens, no client CA), or tokens and/or client certificates.
#[derive(Clone, Debug, Default)]
pub struct Access {
    tokens: Option<Tokens>,
    client_certs: bool,
}

impl Access {
    /// Everyone may call everything (no `--api-tokens`, no `--http-client-ca`).
    pub fn open() -> Self {
        Self::default()
    }

    /// `tokens` from `--api-tokens`; `client_certs` when the HTTP API verifies client
    /// certificates (each verified certificate counts as `full`).
    pub fn new(tokens: Option<Tokens>, client_certs: bool) -> Self {
        Self {
            tokens,
            client_certs,
        }
    }

    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && !self.client_certs
    }

    pub fn has_tokens(&self) -> bool {
        self.tokens.is_some()
    }

    /// Decides a call needing `needed`: `authorization` is the raw header value,
    /// `client_cert` whether the connection presented a certificate the TLS layer verified.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        client_cert: bool,
        needed: Scope,
    ) -> Result<Scope, Denied> {
        self.caller(authorization, client_cert.then_some(""), needed)
            .map(|c| c.scope)
    }

    /// As `check`, naming the caller: `client_cert` is the name of the certificate the TLS layer
    /// verified (`tls::cert_name`), if the connection presented one.
    pub fn caller(
        &self,
        authorization: Option<&[u8]>,
        client_cert: Option<&str>,
        needed: Scope,
    ) -> Result<Caller, Denied> {
        if self.is_open() {
            return Ok(Caller::anonymous());
        }
        if let (true, Some(name)) = (self.client_certs, client_cert) {
            return Ok(Caller {
                scope: Scope::Full,
                name: format!("cert:{name}"),
            });
        }
        let Some(header) = authorization else {
            return Err(Denied::Missing {
                client_certs: self.client_certs,
            });
        };
        let token = bearer(header).ok_or(Denied::Malformed)?;
        self.caller_token(token, needed)
    }

    /// Decides a call needing `needed` from a bare token (no header around it).
    pub fn check_token(&self, token: &[u8], needed: Scope) -> Result<Scope, Denied> {
        self.caller_token(token, needed).map(|c| c.scope)
    }

    /// As `check_token`, naming the caller.
    pub fn caller_token(&self, token: &[u8], needed: Scope) -> Result<Caller, Denied> {
        if self.is_open() {
            return Ok(Caller::anonymous());
        }
        let caller = self
            .tokens
            .as_ref()
            .and_then(|t| t.caller_of(token))
            .ok_or(Denied::UnknownToken)?;
        if caller.scope < needed {
            return Err(Denied::Scope {
                needed,
                had: caller.scope,
            });
        }
        Ok(caller)
    }
}

/// The token of `Bearer TOKEN` (the scheme is case-insensitive, RFC 7235).
fn bearer(header: &[u8]) -> Option<&[u8]> {
    let header = header.trim_ascii();
    let (scheme, rest) = header.split_at_checked(6)?;
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    // At least one space between scheme and token.
    if token.is_empty() || !rest.first().is_some_and(u8::is_ascii_whitespace) {
        return None;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    const READ: &str = "r-0123456789abcdef";
    const FULL: &str = "f-0123456789abcdef";

    fn parse(text: &str) -> Result<Tokens, TokensError> {
        Tokens::parse(text, Path::new("/etc/bakeoff/api-tokens/tokens"))
    }

    fn err(text: &str) -> String {
        match parse(text) {
            Ok(t) => panic!("parsed {t:?} from {text:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_scopes_comments_blank_lines_and_crlf() {
        let t = parse(&format!(
            "# tokens\n\n  read {READ}  \r\n\t# another\nfull\t{FULL}\r\n"
        ))
        .expect("valid");
        assert_eq!(t.counts(), (1, 1));
        assert_eq!(t.scope_of(READ.as_bytes()), Some(Scope::Read));
        assert_eq!(t.scope_of(FULL.as_bytes()), Some(Scope::Full));
        assert_eq!(t.scope_of(b"r-0123456789abcdeX"), None);
        assert_eq!(t.scope_of(b"r-0123456789abcde"), None);
        assert_eq!(t.scope_of(b""), None);
    }

    #[test]
    fn bad_lines_are_named_with_file_and_line() {
        assert_eq!(
            err(&format!("read {READ}\n\nwrite {FULL}\n")),
            "/etc/bakeoff/api-tokens/tokens:3: unknown scope `write` (read or full)"
        );
        assert_eq!(
            err(&format!("# c\n{READ}\n")),
            "/etc/bakeoff/api-tokens/tokens:2: expected `SCOPE TOKEN [NAME]`, found one field"
        );
        assert_eq!(
            err(&format!("read {READ} alice extra\n")),
            "/etc/bakeoff/api-tokens/tokens:1: expected `SCOPE TOKEN [NAME]`, found 4 fields (tokens and names cannot contain spaces)"
        );
        assert_eq!(
            err(&format!("read {READ} cert:alice\n")),
            "/etc/bakeoff/api-tokens/tokens:1: the name `cert:alice` starts with a reserved prefix (`token:`, `cert:`)"
        );
        assert!(err(&format!("read {READ} token:1234abcd\n")).contains(":1: the name `token:"));
        assert_eq!(
            err("full short\n"),
            "/etc/bakeoff/api-tokens/tokens:1: the token is 5 characters, at least 16 are needed (e.g. `openssl rand -hex 32`)"
        );
        assert_eq!(
            err(&format!("read {READ}\nfull {READ}\n")),
            "/etc/bakeoff/api-tokens/tokens:2: the same token is already on line 1"
        );
        assert_eq!(
            err("read r-0123456789abcdé\n"),
            "/etc/bakeoff/api-tokens/tokens:1: the token must be printable ASCII"
        );
        // The scope is case-sensitive, like every other keyword of the file.
        assert!(err(&format!("Read {READ}\n")).contains(":1: unknown scope `Read`"));
    }

    #[test]
    fn an_empty_or_missing_file_is_an_error_naming_it() {
        assert_eq!(
            err("# only comments\n\n   \n"),
            "/etc/bakeoff/api-tokens/tokens: no tokens (expected lines `read TOKEN [NAME]` or `full TOKEN [NAME]`)"
        );
        assert_eq!(
            err(""),
            "/etc/bakeoff/api-tokens/tokens: no tokens (expected lines `read TOKEN [NAME]` or `full TOKEN [NAME]`)"
        );
        let missing = Path::new("/nonexistent/bakeoff-tokens");
        let e = Tokens::load(missing).expect_err("missing file");
        assert!(
            e.to_string()
                .starts_with("cannot read the API tokens file /nonexistent/bakeoff-tokens: "),
            "{e}"
        );
    }

    #[test]
    fn callers_are_named_by_the_third_column_or_their_token_digest() {
        let t = parse(&format!("read {READ}\nfull {FULL} alice@example.com\n")).expect("valid");
        assert_eq!(
            t.caller_of(FULL.as_bytes()),
            Some(Caller {
                scope: Scope::Full,
                name: "alice@example.com".into()
            })
        );
        // Two columns: `token:` and the first 8 hex digits of the token's SHA-256.
        let d = ring::digest::digest(&ring::digest::SHA256, READ.as_bytes());
        let want: String = d.as_ref()[..4].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(want.len(), 8);
        assert_eq!(
            t.caller_of(READ.as_bytes()),
            Some(Caller {
                scope: Scope::Read,
                name: format!("token:{want}")
            })
        );
        assert_eq!(t.caller_of(b"r-0123456789abcdeX"), None);
        let a = Access::new(Some(t.clone()), true);
        let h = |tok: &str| format!("Bearer {tok}");
        assert_eq!(
            a.caller(Some(h(FULL).as_bytes()), None, Scope::Full)
                .map(|c| c.name),
            Ok("alice@example.com".into())
        );
        assert_eq!(
            a.caller_token(READ.as_bytes(), Scope::Full),
            Err(Denied::Scope {
                needed: Scope::Full,
                had: Scope::Read
            })
        );
        // A verified certificate wins over a token, and is named after itself.
        assert_eq!(
            a.caller(
                Some(h(READ).as_bytes()),
                Some("probe-7.example"),
                Scope::Full
            ),
            Ok(Caller {
                scope: Scope::Full,
                name: "cert:probe-7.example".into()
            })
        );
        // Without a client CA a certificate's name counts for nothing.
        assert_eq!(
            Access::new(Some(t), false).caller(None, Some("x"), Scope::Read),
            Err(Denied::Missing {
                client_certs: false
            })
        );
        assert_eq!(
            Access::open().caller(None, None, Scope::Full),
            Ok(Caller {
                scope: Scope::Full,
                name: "anonymous".into()
            })
        );
    }

    #[test]
    fn access_decides_by_scope_header_and_certificate() {
        let tokens = parse(&format!("read {READ}\nfull {FULL}\n")).expect("valid");
        let a = Access::new(Some(tokens.clone()), false);
        let h = |t: &str| format!("Bearer {t}");
        assert_eq!(
            a.check(None, false, Scope::Read),
            Err(Denied::Missing {
                client_certs: false
            })
        );
        // Without a client CA, a certificate flag counts for nothing.
        assert!(a.check(None, true, Scope::Read).is_err());
        assert_eq!(
            a.check(Some(h(READ).as_bytes()), false, Scope::Read),
            Ok(Scope::Read)
        );
        assert_eq!(
            a.check(Some(h(READ).as_bytes()), false, Scope::Full),
            Err(Denied::Scope {
                needed: Scope::Full,
                had: Scope::Read
            })
        );
        assert_eq!(
            a.check(
                Some(format!("bearer  {FULL} ").as_bytes()),
                false,
                Scope::Full
            ),
            Ok(Scope::Full)
        );
        assert_eq!(
            a.check(Some(b"Bearer nope-nope-nope-nope"), false, Scope::Read),
            Err(Denied::UnknownToken)
        );
        for malformed in [
            format!("Basic {READ}"),
            format!("Bearer{READ}"),
            "Bearer ".into(),
            READ.into(),
        ] {
            assert_eq!(
                a.check(Some(malformed.as_bytes()), false, Scope::Read),
                Err(Denied::Malformed),
                "{malformed}"
            );
        }
        let certs = Access::new(Some(tokens), true);
        assert_eq!(certs.check(None, true, Scope::Full), Ok(Scope::Full));
        assert_eq!(
            certs.check(Some(h(READ).as_bytes()), false, Scope::Full),
            Err(Denied::Scope {
                needed: Scope::Full,
                had: Scope::Read
            })
        );
        let certs_only = Access::new(None, true);
        assert!(!certs_only.is_open());
        assert_eq!(
            certs_only.check(Some(h(FULL).as_bytes()), false, Scope::Read),
            Err(Denied::UnknownToken)
        );
        assert_eq!(
            Access::open().check(None, false, Scope::Full),
            Ok(Scope::Full)
        );
    }
}

//! Noise: the parts of a response that differ from one answer to the next without the service
//! having changed (a `Date` header, a timestamp or random id in a body). A replay compares
//! normalized responses, in which declared noise is left out (headers) or replaced by a fixed
//! marker (JSON fields, regex matches), so only real differences remain.
//!
//! Always noise: `Date`, and the headers that describe the body's length or the transport
//! (`Content-Length`, `Transfer-Encoding`, `Connection`, `Keep-Alive`): the body itself is
//! compared instead. User rules add header names (case-insensitive), JSON fields (a name, or a
//! dotted path such as `items.updated_at`, matched wherever it occurs, arrays included; a
//! leading `$.` anchors the path at the body's root) and regular expressions (every match in a
//! body).
//!
//! JSON bodies are compared as values (object key order does not matter): they are written
//! back canonically (keys sorted, no whitespace) before hashing. Other bodies are compared byte
//! by byte after the regexes' matches are replaced.

use std::collections::BTreeMap;

use regex::bytes::{NoExpand, Regex};
use serde_json::Value;

/// Headers that are always noise, lowercase.
pub const DEFAULT_HEADERS: [&str; 5] = [
    "date",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

/// What a noisy value is replaced by.
pub const MARKER: &str = "<noise>";

/// How much of a normalized body an outcome keeps to show a difference.
pub const EXCERPT_BYTES: usize = 200;

/// Distinct body fields hashed separately per response (the rest share one hash): bounds the
/// memory a replay keeps per request whatever the body's shape.
const MAX_FIELDS: usize = 32;

/// The field name of a body that is not JSON (compared whole).
pub const WHOLE_BODY: &str = "(body)";

/// The field name of the body fields beyond `MAX_FIELDS`.
const OTHER_FIELDS: &str = "(other fields)";

/// User noise rules, as given on the command line.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NoiseRules {
    /// Header names (case-insensitive), left out of the comparison.
    #[serde(default)]
    pub headers: Vec<String>,
    /// JSON field names or dotted paths whose values are replaced by the marker.
    #[serde(default)]
    pub json_fields: Vec<String>,
    /// Regular expressions; every match in a body is replaced by the marker.
    #[serde(default)]
    pub regexes: Vec<String>,
}

/// A rule that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NoiseError {
    #[error("noise rule `{rule}` is not a valid regular expression: {source}")]
    Regex {
        rule: String,
        #[source]
        source: Box<regex::Error>,
    },
    #[error("noise rule `{0}`: a JSON field name or dotted path needs a non-empty name per dot")]
    JsonPath(String),
}

/// Compiled noise rules.
#[derive(Clone, Debug)]
pub struct Noise {
    /// Lowercase names, the defaults included.
    headers: Vec<String>,
    json: Vec<JsonRule>,
    regexes: Vec<Regex>,
    names: Vec<String>,
}

/// A JSON field rule: the last keys of a field's path (array positions not counted).
#[derive(Clone, Debug)]
struct JsonRule {
    keys: Vec<String>,
    /// `$.a.b`: the whole path from the root, not only its end.
    anchored: bool,
}

impl JsonRule {
    fn matches(&self, path: &[&str]) -> bool {
        if self.anchored {
            path.len() == self.keys.len() && path.iter().zip(&self.keys).all(|(p, k)| p == k)
        } else {
            path.len() >= self.keys.len()
                && path[path.len() - self.keys.len()..]
                    .iter()
                    .zip(&self.keys)
                    .all(|(p, k)| p == k)
        }
    }
}

impl Default for Noise {
    fn default() -> Self {
        let headers: Vec<String> = DEFAULT_HEADERS.iter().map(|h| h.to_string()).collect();
        Self {
            names: headers.iter().map(|h| format!("header:{h}")).collect(),
            headers,
            json: Vec::new(),
            regexes: Vec::new(),
        }
    }
}

/// Checks one regex rule (for a command line's parser, so a bad rule is a usage error).
pub fn check_regex(rule: &str) -> Result<(), NoiseError> {
    compile(rule).map(|_| ())
}

fn compile(rule: &str) -> Result<Regex, NoiseError> {
    Regex::new(rule).map_err(|source| NoiseError::Regex {
        rule: rule.to_string(),
        source: Box::new(source),
    })
}

impl Noise {
    /// The defaults plus `rules`.
    pub fn new(rules: &NoiseRules) -> Result<Self, NoiseError> {
        let mut noise = Self::default();
        for h in &rules.headers {
            let h = h.trim().to_ascii_lowercase();
            if !h.is_empty() && !noise.headers.contains(&h) {
                noise.names.push(format!("header:{h}"));
                noise.headers.push(h);
            }
        }
        for f in &rules.json_fields {
            let (anchored, path) = match f.strip_prefix("$.") {
                Some(rest) => (true, rest),
                None => (false, f.as_str()),
            };
            let keys: Vec<String> = path.split('.').map(str::to_string).collect();
            if keys.iter().any(String::is_empty) {
                return Err(NoiseError::JsonPath(f.clone()));
            }
            noise.json.push(JsonRule { keys, anchored });
            noise.names.push(format!("json:{f}"));
        }
        for r in &rules.regexes {
            noise.regexes.push(compile(r)?);
            noise.names.push(format!("regex:{r}"));
        }
        Ok(noise)
    }

    /// The rules in force, named (`header:date`, `json:generated_at`, `regex:...`), for the
    /// replay's output.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether the header `name` is left out of comparisons.
    pub fn is_noisy_header(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h.eq_ignore_ascii_case(name))
    }

    /// The response as compared: noisy headers left out, the others sorted with lowercase names;
    /// noisy body values replaced by the marker.
    pub fn normalize<'a>(
        &self,
        status: u16,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
        body: &[u8],
    ) -> Normalized {
        let mut kept = Vec::new();
        let mut json_type = false;
        for (name, value) in headers {
            let value = String::from_utf8_lossy(value).trim().to_string();
            if name.eq_ignore_ascii_case("content-type") {
                json_type = value.to_ascii_lowercase().contains("json");
            }
            if !self.is_noisy_header(name) {
                kept.push((name.to_ascii_lowercase(), value));
            }
        }
        kept.sort();
        let looks_json = matches!(
            body.iter().find(|b| !b.is_ascii_whitespace()),
            Some(b'{' | b'[')
        );
        let parsed = (json_type || looks_json)
            .then(|| serde_json::from_slice::<Value>(body).ok())
            .flatten();
        let (body, fields) = match parsed {
            Some(mut value) => {
                self.mask_json(&mut value, &mut Vec::new());
                let mut canonical = Vec::with_capacity(body.len());
                write_canonical(&value, &mut canonical);
                let canonical = self.mask_regexes(canonical);
                // Per field: the regexes' matches replaced in each value too.
                let mut fields = BTreeMap::new();
                collect_fields(&value, &mut String::new(), &mut fields, &|v| {
                    self.mask_regexes(v)
                });
                (canonical, fold_fields(fields))
            }
            None => {
                let body = self.mask_regexes(body.to_vec());
                let hash = crc32fast::hash(&body);
                (body, vec![(WHOLE_BODY.to_string(), hash)])
            }
        };
        Normalized {
            status,
            headers: kept,
            body,
            fields,
        }
    }

    fn mask_regexes(&self, mut body: Vec<u8>) -> Vec<u8> {
        for re in &self.regexes {
            if let std::borrow::Cow::Owned(b) = re.replace_all(&body, NoExpand(MARKER.as_bytes())) {
                body = b;
            }
        }
        body
    }

    /// Replaces the values of matching fields, at any depth.
    fn mask_json(&self, value: &mut Value, path: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (key, v) in map.iter_mut() {
                    path.push(key.clone());
                    let keys: Vec<&str> = path.iter().map(String::as_str).collect();
                    if self.json.iter().any(|r| r.matches(&keys)) {
                        *v = Value::String(MARKER.to_string());
                    } else {
                        self.mask_json(v, path);
                    }
                    path.pop();
                }
            }
            Value::Array(items) => {
                for v in items {
                    self.mask_json(v, path);
                }
            }
            _ => {}
        }
    }
}

/// A response as compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Normalized {
    pub status: u16,
    /// Lowercase names, sorted, noise left out.
    pub headers: Vec<(String, String)>,
    /// Canonical JSON (keys sorted) or the bytes, noise replaced by the marker.
    pub body: Vec<u8>,
    /// Per field of a JSON body (`items[].price`; arrays' positions folded together), a hash
    /// of its values; one field, `(body)`, for other bodies. Lets a calibration tell which
    /// fields are noisy, so a real change next to a timestamp is still seen.
    pub fields: Vec<(String, u32)>,
}

impl Normalized {
    pub fn headers_hash(&self) -> u32 {
        let mut h = crc32fast::Hasher::new();
        for (name, value) in &self.headers {
            h.update(name.as_bytes());
            h.update(b": ");
            h.update(value.as_bytes());
            h.update(b"\n");
        }
        h.finalize()
    }

    pub fn body_hash(&self) -> u32 {
        crc32fast::hash(&self.body)
    }

    /// The body's first `EXCERPT_BYTES` bytes (cut at a character boundary), as text.
    pub fn excerpt(&self) -> String {
        let text = String::from_utf8_lossy(&self.body[..self.body.len().min(EXCERPT_BYTES * 2)]);
        let mut end = text.len().min(EXCERPT_BYTES);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text[..end].to_string()
    }
}

/// JSON without whitespace, object keys sorted: equal values give equal bytes whatever the
/// order the service wrote the keys in.
fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(&Value::String(k.clone()), out);
                out.push(b':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        scalar => write_scalar(scalar, out),
    }
}

fn write_scalar(value: &Value, out: &mut Vec<u8>) {
    // Writing a scalar into a Vec cannot fail; `null` stands in if it ever did.
    if serde_json::to_writer(&mut *out, value).is_err() {
        out.extend_from_slice(b"null");
    }
}

/// The hashes of a JSON value's leaves, per path (`a.b`, `items[].c`; `$` for a scalar body).
fn collect_fields(
    value: &Value,
    path: &mut String,
    fields: &mut BTreeMap<String, crc32fast::Hasher>,
    mask: &dyn Fn(Vec<u8>) -> Vec<u8>,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for k in keys {
                let len = path.len();
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
                if let Some(v) = map.get(k) {
                    collect_fields(v, path, fields, mask);
                }
                path.truncate(len);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let len = path.len();
            path.push_str("[]");
            // The array's length counts too: one element more changes the field.
            fields
                .entry(path.clone())
                .or_default()
                .update(&(items.len() as u64).to_le_bytes());
            for v in items {
                collect_fields(v, path, fields, mask);
            }
            path.truncate(len);
        }
        leaf => {
            let mut bytes = Vec::new();
            write_canonical(leaf, &mut bytes);
            let name = if path.is_empty() { "$" } else { path.as_str() };
            let h = fields.entry(name.to_string()).or_default();
            h.update(&mask(bytes));
            h.update(b"\x00");
        }
    }
}

/// The first `MAX_FIELDS - 1` fields by name, the rest folded into one.
fn fold_fields(fields: BTreeMap<String, crc32fast::Hasher>) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    let mut other: Option<crc32fast::Hasher> = None;
    for (i, (name, h)) in fields.into_iter().enumerate() {
        let hash = h.finalize();
        if i + 1 < MAX_FIELDS {
            out.push((name, hash));
        } else {
            let o = other.get_or_insert_with(crc32fast::Hasher::new);
            o.update(name.as_bytes());
            o.update(&hash.to_le_bytes());
        }
    }
    if let Some(o) = other {
        out.push((OTHER_FIELDS.to_string(), o.finalize()));
    }
    out
}

/// The names of the fields whose hashes differ between two normalized bodies (present in one
/// only included), sorted.
pub fn differing_fields<'a>(a: &'a [(String, u32)], b: &'a [(String, u32)]) -> Vec<&'a str> {
    let (ma, mb): (BTreeMap<_, _>, BTreeMap<_, _>) = (
        a.iter().map(|(n, h)| (n.as_str(), *h)).collect(),
        b.iter().map(|(n, h)| (n.as_str(), *h)).collect(),
    );
    let mut out: Vec<&str> = ma
        .iter()
        .filter(|(n, h)| mb.get(*n) != Some(*h))
        .map(|(n, _)| *n)
        .chain(mb.keys().filter(|n| !ma.contains_key(*n)).copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// The names of the headers whose values differ (present in one only included), sorted.
pub fn differing_headers<'a>(a: &'a [(String, String)], b: &'a [(String, String)]) -> Vec<&'a str> {
    let values = |hs: &'a [(String, String)]| {
        let mut m: BTreeMap<&'a str, Vec<&'a str>> = BTreeMap::new();
        for (n, v) in hs {
            m.entry(n.as_str()).or_default().push(v.as_str());
        }
        m
    };
    let (ma, mb) = (values(a), values(b));
    let mut out: Vec<&str> = ma
        .iter()
        .filter(|(n, v)| mb.get(*n) != Some(*v))
        .map(|(n, _)| *n)
        .chain(mb.keys().filter(|n| !ma.contains_key(*n)).copied())
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(headers: &[&str], json: &[&str], regexes: &[&str]) -> Noise {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        match Noise::new(&NoiseRules {
            headers: s(headers),
            json_fields: s(json),
            regexes: s(regexes),
        }) {
            Ok(n) => n,
            Err(e) => panic!("{e}"),
        }
    }

    fn body(n: &Noise, b: &str) -> Normalized {
        n.normalize(
            200,
            [("Content-Type", &b"application/json"[..])],
            b.as_bytes(),
        )
    }

    #[test]
    fn a_json_field_is_masked_at_any_depth_and_in_arrays() {
        let n = rules(&[], &["generated_at"], &[]);
        let x = body(
            &n,
            r#"{"id":1,"generated_at":"111","items":[{"sku":"a","generated_at":"112"}],
                "meta":{"deep":{"generated_at":113}}}"#,
        );
        let y = body(
            &n,
            r#"{"id":1,"generated_at":"999","items":[{"sku":"a","generated_at":"998"}],
                "meta":{"deep":{"generated_at":997}}}"#,
        );
        assert_eq!(x.body, y.body);
        assert_eq!(x.body_hash(), y.body_hash());
        assert_eq!(
            String::from_utf8_lossy(&x.body),
            r#"{"generated_at":"<noise>","id":1,"items":[{"generated_at":"<noise>","sku":"a"}],"meta":{"deep":{"generated_at":"<noise>"}}}"#
        );
        // A real change next to the noise is still a difference, and named.
        let z = body(
            &n,
            r#"{"id":1,"generated_at":"5","items":[{"sku":"b","generated_at":"6"}],"meta":{"deep":{"generated_at":7}}}"#,
        );
        assert_ne!(x.body_hash(), z.body_hash());
        assert_eq!(differing_fields(&x.fields, &z.fields), vec!["items[].sku"]);
    }

    #[test]
    fn a_dotted_path_masks_only_that_field_and_dollar_anchors_it() {
        let n = rules(&[], &["items.ts"], &[]);
        let x = body(&n, r#"{"ts":1,"items":[{"ts":2}],"other":{"ts":3}}"#);
        assert_eq!(
            String::from_utf8_lossy(&x.body),
            r#"{"items":[{"ts":"<noise>"}],"other":{"ts":3},"ts":1}"#
        );
        let n = rules(&[], &["$.ts"], &[]);
        let x = body(&n, r#"{"ts":1,"a":{"ts":2}}"#);
        assert_eq!(
            String::from_utf8_lossy(&x.body),
            r#"{"a":{"ts":2},"ts":"<noise>"}"#
        );
        assert!(matches!(
            Noise::new(&NoiseRules {
                json_fields: vec!["a..b".into()],
                ..NoiseRules::default()
            }),
            Err(NoiseError::JsonPath(_))
        ));
    }

    #[test]
    fn json_key_order_and_whitespace_do_not_matter_but_array_order_does() {
        let n = Noise::default();
        let x = body(&n, r#"{"a":1,"b":{"c":[1,2],"d":"x"}}"#);
        let y = body(&n, "{ \"b\" : {\"d\":\"x\", \"c\":[1, 2]},\n \"a\":1 }");
        assert_eq!((x.body_hash(), &x.fields), (y.body_hash(), &y.fields));
        let z = body(&n, r#"{"a":1,"b":{"c":[2,1],"d":"x"}}"#);
        assert_ne!(x.body_hash(), z.body_hash());
        assert_eq!(differing_fields(&x.fields, &z.fields), vec!["b.c[]"]);
        // JSON detected without a content type too; invalid JSON compared as bytes.
        let untyped = n.normalize(200, [], br#"{"b":{"d":"x","c":[1,2]},"a":1}"#);
        assert_eq!(untyped.body, x.body);
        let broken = n.normalize(200, [], b"{not json");
        assert_eq!(
            (broken.body.as_slice(), broken.fields.len()),
            (&b"{not json"[..], 1)
        );
    }

    #[test]
    fn regexes_replace_matches_in_text_and_json_bodies() {
        let n = rules(&[], &[], &[r"req-[0-9a-f]{8}"]);
        let x = n.normalize(200, [], b"done by req-0badf00d at noon");
        let y = n.normalize(200, [], b"done by req-12345678 at noon");
        assert_eq!(x.body, b"done by <noise> at noon");
        assert_eq!(x.body_hash(), y.body_hash());
        let j1 = body(&n, r#"{"trace":"req-0badf00d","n":1}"#);
        let j2 = body(&n, r#"{"n":1,"trace":"req-deadbeef"}"#);
        assert_eq!(
            (String::from_utf8_lossy(&j1.body), &j1.fields),
            (String::from_utf8_lossy(&j2.body), &j2.fields)
        );
        assert!(matches!(
            Noise::new(&NoiseRules {
                regexes: vec!["(unclosed".into()],
                ..NoiseRules::default()
            }),
            Err(NoiseError::Regex { .. })
        ));
        assert!(check_regex("(unclosed").is_err() && check_regex("a+").is_ok());
    }

    #[test]
    fn headers_are_case_insensitive_sorted_and_the_defaults_left_out() {
        let n = rules(&["X-Request-Id"], &[], &[]);
        let x = n.normalize(
            200,
            [
                ("Server", &b"s"[..]),
                ("DATE", b"Mon, 01 Jan 2024 00:00:00 GMT"),
                ("x-request-id", b"1"),
                ("Content-Length", b"5"),
                ("Connection", b"keep-alive"),
                ("Content-Type", b"text/plain"),
            ],
            b"hello",
        );
        assert_eq!(
            x.headers,
            vec![
                ("content-type".to_string(), "text/plain".to_string()),
                ("server".to_string(), "s".to_string()),
            ]
        );
        let y = n.normalize(
            200,
            [
                ("content-type", &b"text/plain"[..]),
                ("X-REQUEST-ID", b"2"),
                ("Transfer-Encoding", b"chunked"),
                ("server", b"s"),
            ],
            b"hello",
        );
        assert_eq!(x.headers_hash(), y.headers_hash());
        let z = n.normalize(200, [("Server", &b"t"[..])], b"hello");
        assert_eq!(
            differing_headers(&x.headers, &z.headers),
            vec!["content-type", "server"]
        );
        assert_eq!(
            n.names(),
            [
                "header:date",
                "header:content-length",
                "header:transfer-encoding",
                "header:connection",
                "header:keep-alive",
                "header:x-request-id"
            ]
        );
    }

    #[test]
    fn the_excerpt_is_cut_at_a_character_boundary() {
        let n = Noise::default();
        let text = "é".repeat(150);
        let x = n.normalize(200, [], text.as_bytes());
        assert_eq!(x.excerpt(), "é".repeat(100));
        assert_eq!(n.normalize(200, [], b"short").excerpt(), "short");
    }
}

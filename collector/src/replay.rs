//! `bakeoff replay`: a capture's sessions replayed against a target (A) and, with `--against`,
//! a second one (B), compared per endpoint: latency with the judge's quantile bounds, responses
//! (status, headers and body, normalized: see `bakeoff_replay::noise`) request by request. With
//! `--calibrate A2`, a second instance of A's version, differences also seen between A and A2
//! are noise (a timestamp, a random id) and are not reported, Diffy-style: per endpoint, the
//! headers and JSON body fields that differ between A and A2 anywhere on it are noisy there, so
//! a changed field next to a noisy one is still found (a body that is not JSON is one field).

use std::collections::{BTreeMap, BTreeSet};

use bakeoff_replay::{
    Outcome, Replayed,
    noise::{WHOLE_BODY, differing_fields, differing_headers},
};

use crate::stats::{confseq::quantile_bounds, hist::LogHist};

/// One endpoint's comparison.
#[derive(Clone, Debug, serde::Serialize)]
pub struct EndpointComparison {
    /// `METHOD /path` (query string left out).
    pub endpoint: String,
    pub requests: usize,
    /// Median latency bounds (ns) on A and on B.
    pub a_p50: (Option<f64>, Option<f64>),
    pub b_p50: (Option<f64>, Option<f64>),
    /// `slower`, `faster`, or `no difference shown` (within tolerance, or too few requests).
    pub latency: &'static str,
    /// Requests whose status, headers or body differ between A and B (noise left out); a
    /// request with another status is counted there only, one with both its headers and its
    /// body changed in both.
    pub status_diffs: usize,
    pub header_diffs: usize,
    pub body_diffs: usize,
    /// Requests answered differently only in what is noise (differences also seen between A
    /// and A2): not counted above.
    pub noisy: usize,
    /// Requests that failed (connect, timeout) on A or on B.
    pub errors: usize,
    /// The first request answered differently, to look at.
    pub example: Option<Difference>,
}

/// One request that B answered differently from A.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Difference {
    /// The request's path as replayed (query included).
    pub path: String,
    /// `status`, `body` or `headers`.
    pub kind: &'static str,
    /// What differs: header names, or body fields (JSON paths such as `items[].price`,
    /// `(body)` for a body that is not JSON); empty for a status.
    pub fields: Vec<String>,
    /// A's and B's side: the statuses, the differing headers (`name: value`), or the
    /// normalized bodies' excerpts from a little before where they part.
    pub a: String,
    pub b: String,
}

/// The comparison of two replays.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    pub endpoints: Vec<EndpointComparison>,
    pub alpha: f64,
    pub tolerance: f64,
}

impl Comparison {
    /// Whether B is worse anywhere: slower, or answering differently.
    pub fn regressed(&self) -> bool {
        self.endpoints.iter().any(|e| {
            e.latency == "slower" || e.status_diffs > 0 || e.header_diffs > 0 || e.body_diffs > 0
        })
    }
}

/// `METHOD /route`: the query string left out, and path segments that are identifiers
/// (numbers, UUIDs, long hex) replaced by `:id`, so `/item/17` and `/item/18` are one endpoint
/// with enough requests to compare.
fn endpoint(o: &Outcome) -> String {
    // A Postgres unit's path is its normalized query already: `?` and `/` are SQL there.
    if o.method == "SQL" {
        return format!("SQL {}", o.path);
    }
    let path = o.path.split('?').next().unwrap_or_default();
    let route: Vec<&str> = path
        .split('/')
        .map(|seg| {
            let id = !seg.is_empty()
                && (seg.bytes().all(|b| b.is_ascii_digit())
                    || (seg.len() >= 8 && seg.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')));
            if id { ":id" } else { seg }
        })
        .collect();
    format!("{} {}", o.method, route.join("/"))
}

fn key(o: &Outcome) -> (u64, usize) {
    (o.session, o.index)
}

/// What differs between two answers to one request.
#[derive(Default)]
struct Diffs<'a> {
    status: bool,
    headers: Vec<&'a str>,
    fields: Vec<&'a str>,
}

impl<'a> Diffs<'a> {
    fn of(x: &'a Outcome, y: &'a Outcome) -> Self {
        let mut fields = Vec::new();
        if x.body_hash != y.body_hash {
            fields = differing_fields(&x.body_fields, &y.body_fields);
            if fields.is_empty() {
                // Hashes differ where the fields do not (a regex spanning fields): the body.
                fields.push(WHOLE_BODY);
            }
        }
        Self {
            status: x.status != y.status,
            headers: if x.headers_hash != y.headers_hash {
                differing_headers(&x.headers, &y.headers)
            } else {
                Vec::new()
            },
            fields,
        }
    }

    fn any(&self) -> bool {
        self.status || !self.headers.is_empty() || !self.fields.is_empty()
    }
}

/// What differs between A and A2 on one endpoint: noise there.
#[derive(Default)]
struct Noisy<'a> {
    /// Requests whose status differs between A and A2.
    status: BTreeSet<(u64, usize)>,
    headers: BTreeSet<&'a str>,
    fields: BTreeSet<&'a str>,
}

/// `a` and `b` from a little before their first difference (both are excerpts).
fn parting(a: &str, b: &str) -> (String, String) {
    const BEFORE: usize = 40;
    let same = a
        .char_indices()
        .zip(b.chars())
        .find(|((_, ca), cb)| ca != cb)
        .map_or(a.len().min(b.len()), |((i, _), _)| i);
    if same <= BEFORE {
        return (a.to_string(), b.to_string());
    }
    let mut start = same - BEFORE;
    while !a.is_char_boundary(start) {
        start -= 1;
    }
    (format!("…{}", &a[start..]), format!("…{}", &b[start..]))
}

/// The differing headers' lines on one side (`name: (absent)` when it has none).
fn header_lines(o: &Outcome, names: &[&str]) -> String {
    names
        .iter()
        .map(|n| {
            let values: Vec<&str> = o
                .headers
                .iter()
                .filter(|(h, _)| h == n)
                .map(|(_, v)| v.as_str())
                .collect();
            if values.is_empty() {
                format!("{n}: (absent)")
            } else {
                format!("{n}: {}", values.join(", "))
            }
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Compares B with A (per endpoint), at level `alpha` over all endpoints; latency differences
/// within `tolerance` (relative) are not reported.
pub fn compare(
    a: &Replayed,
    b: &Replayed,
    calibration: Option<&Replayed>,
    alpha: f64,
    tolerance: f64,
) -> Comparison {
    let by_key = |r: &Replayed| -> BTreeMap<(u64, usize), Outcome> {
        r.outcomes.iter().map(|o| (key(o), o.clone())).collect()
    };
    let (a_map, b_map) = (by_key(a), by_key(b));
    let c_map = calibration.map(by_key);
    let mut groups: BTreeMap<String, Vec<(Outcome, Option<Outcome>)>> = BTreeMap::new();
    for (k, o) in &a_map {
        groups
            .entry(endpoint(o))
            .or_default()
            .push((o.clone(), b_map.get(k).cloned()));
    }
    let n = groups.len().max(1) as f64;
    // Two medians per endpoint, both sides: the level split over all of them.
    let level = alpha / (2.0 * n);
    let endpoints = groups
        .into_iter()
        .map(|(endpoint, pairs)| {
            let (mut ha, mut hb) = (LogHist::default(), LogHist::default());
            let mut out = EndpointComparison {
                endpoint,
                requests: pairs.len(),
                a_p50: (None, None),
                b_p50: (None, None),
                latency: "no difference shown",
                status_diffs: 0,
                header_diffs: 0,
                body_diffs: 0,
                noisy: 0,
                errors: 0,
                example: None,
            };
            // What A and A2 disagree on here (both answered).
            let mut noisy = Noisy::default();
            if let Some(c) = &c_map {
                for (x, _) in &pairs {
                    if let Some(z) = c.get(&key(x))
                        && x.error.is_none()
                        && z.error.is_none()
                    {
                        let d = Diffs::of(x, z);
                        if d.status {
                            noisy.status.insert(key(x));
                        }
                        noisy.headers.extend(d.headers);
                        noisy.fields.extend(d.fields);
                    }
                }
            }
            for (x, y) in &pairs {
                let Some(y) = y else {
                    out.errors += 1;
                    continue;
                };
                if x.error.is_some() || y.error.is_some() {
                    out.errors += 1;
                    continue;
                }
                ha.record(x.latency_ns);
                hb.record(y.latency_ns);
                let d = Diffs::of(x, y);
                if !d.any() {
                    continue;
                }
                let mut example = None;
                if d.status {
                    // Another status changes the rest too: counted as a status only.
                    if noisy.status.contains(&key(x)) {
                        out.noisy += 1;
                    } else {
                        out.status_diffs += 1;
                        example = Some(Difference {
                            path: x.path.clone(),
                            kind: "status",
                            fields: Vec::new(),
                            a: x.status.map_or("-".into(), |s| s.to_string()),
                            b: y.status.map_or("-".into(), |s| s.to_string()),
                        });
                    }
                } else {
                    let headers: Vec<&str> = d
                        .headers
                        .iter()
                        .filter(|h| !noisy.headers.contains(*h))
                        .copied()
                        .collect();
                    let fields: Vec<&str> = d
                        .fields
                        .iter()
                        .filter(|f| !noisy.fields.contains(*f))
                        .copied()
                        .collect();
                    if !headers.is_empty() {
                        out.header_diffs += 1;
                        example = Some(Difference {
                            path: x.path.clone(),
                            kind: "headers",
                            a: header_lines(x, &headers),
                            b: header_lines(y, &headers),
                            fields: headers.iter().map(|h| h.to_string()).collect(),
                        });
                    }
                    if !fields.is_empty() {
                        out.body_diffs += 1;
                        let (a, b) = parting(&x.body_excerpt, &y.body_excerpt);
                        example = Some(Difference {
                            path: x.path.clone(),
                            kind: "body",
                            fields: fields.iter().map(|f| f.to_string()).collect(),
                            a,
                            b,
                        });
                    }
                    if headers.is_empty() && fields.is_empty() {
                        out.noisy += 1;
                    }
                }
                if out.example.is_none() {
                    out.example = example;
                }
            }
            out.a_p50 = quantile_bounds(&ha, 0.5, level);
            out.b_p50 = quantile_bounds(&hb, 0.5, level);
            out.latency = match (out.a_p50, out.b_p50) {
                ((Some(a_lo), Some(a_hi)), (Some(b_lo), Some(b_hi))) => {
                    if b_lo > a_hi * (1.0 + tolerance) {
                        "slower"
                    } else if b_hi * (1.0 + tolerance) < a_lo {
                        "faster"
                    } else {
                        "no difference shown"
                    }
                }
                _ => "no difference shown",
            };
            out
        })
        .collect();
    Comparison {
        endpoints,
        alpha,
        tolerance,
    }
}

/// The comparison as a terminal table.
pub fn table(c: &Comparison, a: &str, b: &str) -> String {
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.2}", x / 1e6));
    let mut s = format!(
        "{:<40} {:>8} {:>17} {:>17} {:>20} {:>7} {:>7} {:>6} {:>6} {:>6}\n",
        "endpoint",
        "requests",
        "A p50 ms",
        "B p50 ms",
        "latency",
        "status",
        "headers",
        "body",
        "noise",
        "errors"
    );
    for e in &c.endpoints {
        s.push_str(&format!(
            "{:<40} {:>8} {:>17} {:>17} {:>20} {:>7} {:>7} {:>6} {:>6} {:>6}\n",
            e.endpoint,
            e.requests,
            format!("{}..{}", ms(e.a_p50.0), ms(e.a_p50.1)),
            format!("{}..{}", ms(e.b_p50.0), ms(e.b_p50.1)),
            e.latency,
            e.status_diffs,
            e.header_diffs,
            e.body_diffs,
            e.noisy,
            e.errors
        ));
    }
    for e in &c.endpoints {
        if let Some(x) = &e.example {
            let what = if x.fields.is_empty() {
                x.kind.to_string()
            } else {
                format!("{} ({})", x.kind, x.fields.join(", "))
            };
            s.push_str(&format!(
                "\n{}: {what} differs, e.g. {}\n  A: {}\n  B: {}\n",
                e.endpoint, x.path, x.a, x.b
            ));
        }
    }
    s.push_str(&format!(
        "\nA = {a}, B = {b}. p50 ms: bounds on the median latency (level {} over all endpoints); \
         latency: B's median beyond A's by more than {:.0}%, or not shown. status, headers, \
         body: requests answered differently, declared noise left out (noise: differences also \
         seen between A and its calibration twin).\n",
        c.alpha,
        c.tolerance * 100.0
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(session: u64, index: usize, path: &str, ms: u64, hash: u32) -> Outcome {
        Outcome {
            session,
            index,
            method: "GET".into(),
            path: path.into(),
            status: Some(200),
            latency_ns: ms * 1_000_000,
            body_hash: hash,
            body_bytes: 1,
            error: None,
            late_ns: 0,
            headers_hash: 0,
            headers: Vec::new(),
            body_fields: vec![(WHOLE_BODY.into(), hash)],
            body_excerpt: String::new(),
        }
    }

    /// An outcome with a real response, normalized as a replay does (no noise declared).
    fn answered(
        session: u64,
        path: &str,
        status: u16,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Outcome {
        let n = bakeoff_replay::Noise::default().normalize(
            status,
            headers.iter().map(|(k, v)| (*k, v.as_bytes())),
            body.as_bytes(),
        );
        Outcome {
            status: Some(status),
            body_hash: n.body_hash(),
            headers_hash: n.headers_hash(),
            body_excerpt: n.excerpt(),
            headers: n.headers,
            body_fields: n.fields,
            ..outcome(session, 0, path, 1, 0)
        }
    }

    fn replayed(f: impl Fn(usize) -> Vec<Outcome>) -> Replayed {
        Replayed {
            outcomes: (0..200).flat_map(f).collect(),
            ..Replayed::default()
        }
    }

    #[test]
    fn a_slower_endpoint_and_real_differences_are_found_noise_is_not() {
        let a = replayed(|i| {
            vec![
                outcome(i as u64, 0, "/fast?x=1", 1 + (i % 3) as u64, 7),
                outcome(i as u64, 1, "/slow", 2 + (i % 3) as u64, i as u32),
            ]
        });
        // B: /slow 10x slower; /fast answers differently on 5 requests.
        let b = replayed(|i| {
            vec![
                outcome(
                    i as u64,
                    0,
                    "/fast",
                    1 + (i % 3) as u64,
                    if i < 5 { 8 } else { 7 },
                ),
                outcome(i as u64, 1, "/slow", 20 + (i % 3) as u64, i as u32 + 1000),
            ]
        });
        // A2: /slow's body differs from A's too (a timestamp in it): noise.
        let a2 = replayed(|i| {
            vec![
                outcome(i as u64, 0, "/fast", 1, 7),
                outcome(i as u64, 1, "/slow", 2, i as u32 + 5000),
            ]
        });
        let c = compare(&a, &b, Some(&a2), 0.05, 0.1);
        let fast = &c.endpoints[0];
        let slow = &c.endpoints[1];
        assert_eq!(fast.endpoint, "GET /fast");
        assert_eq!(
            (fast.latency, fast.body_diffs, fast.noisy),
            ("no difference shown", 5, 0)
        );
        assert_eq!(
            (slow.latency, slow.body_diffs, slow.noisy),
            ("slower", 0, 200)
        );
        assert!(c.regressed());
        let same = compare(&a, &a, None, 0.05, 0.1);
        assert!(!same.regressed());
        assert!(table(&c, "a", "b").contains("GET /slow"));
        let mut o = outcome(1, 0, "/item/17/part/9f86d081884c7d65?x=1", 1, 0);
        assert_eq!(endpoint(&o), "GET /item/:id/part/:id");
        o.path = "/v2/items".into();
        assert_eq!(endpoint(&o), "GET /v2/items");
    }

    /// Calibration learns which JSON fields and headers are noisy per endpoint: a changed field
    /// next to a timestamp is still a difference; headers and statuses are compared too.
    #[test]
    fn calibration_subtracts_noisy_fields_not_changed_ones() {
        let json = [("Content-Type", "application/json")];
        let body = |i: usize, ts: &str, price: usize| {
            format!(r#"{{"id":{i},"ts":"{ts}","items":[{{"price":{price}}}]}}"#)
        };
        let side = |ts: &str, change: bool| Replayed {
            outcomes: (0..20)
                .map(|i| {
                    let s = i as u64;
                    match i % 4 {
                        // B changes the price of request 0 (and 4, 8...).
                        0 => answered(
                            s,
                            &format!("/item/{i}"),
                            200,
                            &json,
                            &body(i, ts, if change { 2 } else { 1 }),
                        ),
                        1 => answered(s, &format!("/item/{i}"), 200, &json, &body(i, ts, 1)),
                        // B adds a header on /h.
                        2 => {
                            let h: &[(&str, &str)] = if change {
                                &[("X-Version", "2"), ("Date", ts)]
                            } else {
                                &[("Date", ts)]
                            };
                            answered(s, "/h", 200, h, "same")
                        }
                        // B answers /s with 503 (its body differs too: counted as a status).
                        _ => answered(
                            s,
                            "/s",
                            if change { 503 } else { 200 },
                            &[],
                            if change { "down" } else { "up" },
                        ),
                    }
                })
                .collect(),
            ..Replayed::default()
        };
        let (a, a2, b) = (side("t1", false), side("t2", false), side("t3", true));
        let c = compare(&a, &b, Some(&a2), 0.05, 0.1);
        let by = |name: &str| c.endpoints.iter().find(|e| e.endpoint == name).cloned();
        let item = by("GET /item/:id").expect("item");
        // 10 requests: 5 with the price changed (real), 5 with only the timestamp (noise).
        assert_eq!((item.body_diffs, item.noisy, item.header_diffs), (5, 5, 0));
        let ex = item.example.expect("example");
        assert_eq!(
            (ex.path.as_str(), ex.kind, ex.fields.clone()),
            ("/item/0", "body", vec!["items[].price".to_string()])
        );
        assert!(
            ex.a.contains(r#""price":1"#) && ex.b.contains(r#""price":2"#),
            "{ex:?}"
        );
        let h = by("GET /h").expect("h");
        assert_eq!((h.header_diffs, h.body_diffs, h.noisy), (5, 0, 0));
        let ex = h.example.expect("example");
        assert_eq!(
            (ex.kind, ex.a.as_str(), ex.b.as_str()),
            ("headers", "x-version: (absent)", "x-version: 2")
        );
        let st = by("GET /s").expect("s");
        assert_eq!((st.status_diffs, st.body_diffs), (5, 0));
        assert_eq!(
            st.example.map(|e| (e.a, e.b)),
            Some(("200".into(), "503".into()))
        );
        assert!(c.regressed());
        // Without calibration the timestamp is a difference on every /item request.
        let raw = compare(&a, &b, None, 0.05, 0.1);
        let item = raw
            .endpoints
            .iter()
            .find(|e| e.endpoint == "GET /item/:id")
            .expect("item");
        assert_eq!((item.body_diffs, item.noisy), (10, 0));
        // A against A2: only noise, nothing regressed; the table shows no example.
        let same = compare(&a, &a2, Some(&a2), 0.05, 0.1);
        assert!(!same.regressed());
        assert!(same.endpoints.iter().all(|e| e.example.is_none()));
        assert!(table(&c, "a", "b").contains("GET /h: headers (x-version) differs, e.g. /h"));
    }

    #[test]
    fn parting_shows_where_excerpts_differ() {
        let a = format!("{}abc", "x".repeat(100));
        let b = format!("{}abd", "x".repeat(100));
        let (pa, pb) = parting(&a, &b);
        // 40 characters before the first that differs.
        assert_eq!(pa, format!("…{}abc", "x".repeat(38)));
        assert_eq!(pb, format!("…{}abd", "x".repeat(38)));
        assert_eq!(parting("ab", "ac"), ("ab".into(), "ac".into()));
    }
}

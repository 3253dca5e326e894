//! `bakeoff replay`: a capture's sessions replayed against a target (A) and, with `--against`,
//! a second one (B), compared per endpoint: latency with the judge's quantile bounds, responses
//! (status and body) request by request. With `--calibrate A2`, a second instance of A's
//! version, differences also seen between A and A2 are noise (a timestamp, a random id) and are
//! not reported, Diffy-style.

use std::collections::BTreeMap;

use bakeoff_replay::{Outcome, Replayed};

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
    /// Requests whose status or body differ between A and B (noise left out).
    pub status_diffs: usize,
    pub body_diffs: usize,
    /// Differences also seen between A and A2: not counted above.
    pub noisy: usize,
    /// Requests that failed (connect, timeout) on A or on B.
    pub errors: usize,
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
        self.endpoints
            .iter()
            .any(|e| e.latency == "slower" || e.status_diffs > 0 || e.body_diffs > 0)
    }
}

/// `METHOD /route`: the query string left out, and path segments that are identifiers
/// (numbers, UUIDs, long hex) replaced by `:id`, so `/item/17` and `/item/18` are one endpoint
/// with enough requests to compare.
fn endpoint(o: &Outcome) -> String {
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
                body_diffs: 0,
                noisy: 0,
                errors: 0,
            };
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
                let differs = x.status != y.status || x.body_hash != y.body_hash;
                if !differs {
                    continue;
                }
                let noise = c_map
                    .as_ref()
                    .and_then(|c| c.get(&key(x)))
                    .is_some_and(|z| z.status != x.status || z.body_hash != x.body_hash);
                if noise {
                    out.noisy += 1;
                } else if x.status != y.status {
                    out.status_diffs += 1;
                } else {
                    out.body_diffs += 1;
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
        "{:<40} {:>8} {:>17} {:>17} {:>20} {:>7} {:>6} {:>6} {:>6}\n",
        "endpoint",
        "requests",
        "A p50 ms",
        "B p50 ms",
        "latency",
        "status",
        "body",
        "noise",
        "errors"
    );
    for e in &c.endpoints {
        s.push_str(&format!(
            "{:<40} {:>8} {:>17} {:>17} {:>20} {:>7} {:>6} {:>6} {:>6}\n",
            e.endpoint,
            e.requests,
            format!("{}..{}", ms(e.a_p50.0), ms(e.a_p50.1)),
            format!("{}..{}", ms(e.b_p50.0), ms(e.b_p50.1)),
            e.latency,
            e.status_diffs,
            e.body_diffs,
            e.noisy,
            e.errors
        ));
    }
    s.push_str(&format!(
        "\nA = {a}, B = {b}. p50 ms: bounds on the median latency (level {} over all endpoints); \
         latency: B's median beyond A's by more than {:.0}%, or not shown. status, body: \
         requests answered differently (noise: also different between A and its calibration \
         twin).\n",
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
}

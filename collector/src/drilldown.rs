//! Drill-down, in the manner of Honeycomb's BubbleUp: for a failing metric, which dimension
//! values (endpoint, status, client address, node, pod, executable, attributes such as
//! `user_agent`) are over-represented among the canary's bad requests compared with all of the
//! canary's requests?
//!
//! A canary request is *bad* for a tail metric `pNN` when it is slower than the baseline's pNN on
//! the same endpoint (which clients, routes or pods hold the slow tail), for `latency` when it is
//! slower than the baseline's p90, for `errors` when it has no response or a 5xx. For each value v of each dimension:
//! `bad_share` = share of the bad canary requests that have v, minus the share of all canary
//! requests that have v, is the score (BubbleUp's selection against the rest of the same data):
//! a value that explains the regression scores high, and a value every canary request has (its
//! pod, its executable, which differ from the baseline's by construction) scores 0.
//! `baseline_share`, the share of baseline requests with v, is reported alongside.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::{series::Outcome, store::SampleRow};

/// One ranked dimension value.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DrillRow {
    pub dimension: String,
    pub value: String,
    /// Bad canary requests with this value, and all canary / baseline requests with it.
    pub canary_bad: u64,
    pub canary: u64,
    pub baseline: u64,
    /// Share of all bad canary requests that have this value.
    pub bad_share: f64,
    /// Share of all canary requests that have this value (what `bad_share` is compared with).
    #[serde(default)]
    pub canary_share: f64,
    /// Share of all baseline requests that have this value.
    pub baseline_share: f64,
    /// bad_share - the share of all canary requests with this value.
    pub score: f64,
    /// Share of this value's canary requests that are bad.
    pub canary_bad_rate: f64,
}

/// Dimension values of one request.
fn dimensions(r: &SampleRow, endpoint: &str) -> Vec<(String, String)> {
    let mut d = vec![
        ("endpoint".to_string(), endpoint.to_string()),
        (
            "status".to_string(),
            r.status.map_or("none".to_string(), |s| s.to_string()),
        ),
    ];
    if let Some(peer) = &r.peer {
        // The port is ephemeral: the client is its address.
        let ip = peer.rsplit_once(':').map_or(peer.as_str(), |(ip, _)| ip);
        d.push(("client".into(), ip.trim_matches(['[', ']']).to_string()));
    }
    for (name, v) in [("node", &r.node), ("pod", &r.pod), ("exe", &r.exe)] {
        if let Some(v) = v {
            d.push((name.into(), v.clone()));
        }
    }
    if let Some(a) = &r.attributes
        && let Ok(serde_json::Value::Object(m)) = serde_json::from_str(a)
    {
        for (k, v) in m {
            let v = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            d.push((k, v));
        }
    }
    d
}

/// Smallest share difference worth showing.
const MIN_SCORE: f64 = 0.01;

fn quantile(v: &mut [u64], q: f64) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[((v.len() - 1) as f64 * q).round() as usize])
}

/// The baseline quantile a latency metric calls slow: `p99` -> 0.99, `latency` -> 0.9.
fn slow_quantile(metric: &str) -> f64 {
    crate::stats::quantile_from_name(metric).unwrap_or(0.9)
}

/// Ranks dimension values for `metric` (`latency`, `pNN` or `errors`) of `canary` against `baseline`,
/// on one endpoint (`METHOD path`) or all (`None` or `*`). Best explanations first.
pub fn drilldown(
    rows: &[SampleRow],
    baseline: &str,
    canary: &str,
    metric: &str,
    endpoint: Option<&str>,
    limit: usize,
) -> Vec<DrillRow> {
    let endpoint = endpoint.filter(|e| *e != "*");
    let rows: Vec<(&SampleRow, String)> = rows
        .iter()
        .filter(|r| r.cohort == baseline || r.cohort == canary)
        .map(|r| (r, r.endpoint()))
        .filter(|(_, e)| endpoint.is_none_or(|want| want == e))
        .collect();
    // A baseline quantile per endpoint: "slow" is relative to what the same endpoint usually
    // takes.
    let q = slow_quantile(metric);
    let mut durations: HashMap<&str, Vec<u64>> = HashMap::new();
    for (r, e) in &rows {
        // Requests without a response have no latency.
        if r.cohort == baseline && r.outcome() != Outcome::Unanswered {
            durations.entry(e.as_str()).or_default().push(r.duration_ns);
        }
    }
    let limits: HashMap<&str, u64> = durations
        .iter_mut()
        .filter_map(|(e, v)| Some((*e, quantile(v, q)?)))
        .collect();
    let bad = |r: &SampleRow, e: &str| match metric {
        "errors" => r.outcome() != Outcome::Ok,
        _ => limits.get(e).is_some_and(|&l| r.duration_ns > l),
    };
    #[derive(Default)]
    struct Counts {
        canary_bad: u64,
        canary: u64,
        baseline: u64,
    }
    let mut counts: BTreeMap<(String, String), Counts> = BTreeMap::new();
    let (mut bad_total, mut canary_total, mut baseline_total) = (0u64, 0u64, 0u64);
    for (r, e) in &rows {
        let is_canary = r.cohort == canary;
        let is_bad = is_canary && bad(r, e);
        bad_total += u64::from(is_bad);
        canary_total += u64::from(is_canary);
        baseline_total += u64::from(!is_canary);
        for key in dimensions(r, e) {
            if endpoint.is_some() && key.0 == "endpoint" {
                continue;
            }
            let c = counts.entry(key).or_default();
            if is_canary {
                c.canary += 1;
                c.canary_bad += u64::from(is_bad);
            } else {
                c.baseline += 1;
            }
        }
    }
    let share = |n: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            n as f64 / total as f64
        }
    };
    let mut out: Vec<DrillRow> = counts
        .into_iter()
        .filter(|(_, c)| c.canary_bad > 0)
        .map(|((dimension, value), c)| {
            let bad_share = share(c.canary_bad, bad_total);
            let canary_share = share(c.canary, canary_total);
            DrillRow {
                dimension,
                value,
                canary_bad: c.canary_bad,
                canary: c.canary,
                baseline: c.baseline,
                bad_share,
                canary_share,
                baseline_share: share(c.baseline, baseline_total),
                score: bad_share - canary_share,
                canary_bad_rate: share(c.canary_bad, c.canary),
            }
        })
        .collect();
    // A value as common among the canary's bad requests as among all its requests explains
    // nothing: that also leaves out what only names the cohort (its pods, its executable).
    out.retain(|r| r.score > MIN_SCORE);
    out.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.canary_bad.cmp(&a.canary_bad))
            .then(a.dimension.cmp(&b.dimension))
            .then(a.value.cmp(&b.value))
    });
    out.truncate(limit);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(cohort: &str, path: &str, ms: u64, agent: &str, status: i64) -> SampleRow {
        SampleRow {
            cohort: cohort.into(),
            method: "GET".into(),
            path: path.into(),
            start_unix_ns: 0,
            duration_ns: ms * 1_000_000,
            status: Some(status),
            grpc_status: None,
            error: None,
            peer: Some("10.0.0.7:41000".into()),
            node: Some("n1".into()),
            // Pods differ between cohorts by construction.
            pod: Some(format!("{cohort}-7f9c")),
            exe: Some("/app".into()),
            attributes: Some(format!(r#"{{"user_agent":"{agent}"}}"#)),
        }
    }

    #[test]
    fn the_slow_client_kind_ranks_first() {
        let mut rows = Vec::new();
        for i in 0..200u64 {
            let agent = if i % 2 == 0 { "mobile" } else { "desktop" };
            rows.push(row("baseline", "/checkout", 10 + i % 5, agent, 200));
            rows.push(row("baseline", "/", 5 + i % 3, agent, 200));
            // The canary is slow on /checkout for mobile clients only.
            let slow = if agent == "mobile" { 40 } else { 0 };
            rows.push(row("canary", "/checkout", 10 + i % 5 + slow, agent, 200));
            rows.push(row("canary", "/", 5 + i % 3, agent, 200));
        }
        let all = drilldown(&rows, "baseline", "canary", "latency", None, 10);
        let top: Vec<(&str, &str)> = all
            .iter()
            .take(2)
            .map(|r| (r.dimension.as_str(), r.value.as_str()))
            .collect();
        assert!(top.contains(&("user_agent", "mobile")), "{all:#?}");
        assert!(top.contains(&("endpoint", "GET /checkout")), "{all:#?}");
        let mobile = all.iter().find(|r| r.value == "mobile").unwrap();
        assert_eq!(mobile.canary_bad, 100);
        assert!((mobile.bad_share - 1.0).abs() < 1e-9);
        assert!((mobile.baseline_share - 0.5).abs() < 1e-9);
        // Values common to both cohorts explain nothing and are left out, and so do values
        // every canary request has (its pod).
        assert!(all.iter().all(|r| r.dimension != "node"), "{all:#?}");
        assert!(all.iter().all(|r| r.dimension != "pod"), "{all:#?}");
        // On one endpoint, the endpoint dimension is left out.
        let one = drilldown(
            &rows,
            "baseline",
            "canary",
            "latency",
            Some("GET /checkout"),
            10,
        );
        assert_eq!(one[0].value, "mobile");
        assert!(one.iter().all(|r| r.dimension != "endpoint"));
    }

    #[test]
    fn tail_metrics_call_slow_what_exceeds_the_baselines_quantile() {
        assert_eq!(slow_quantile("p99"), 0.99);
        assert_eq!(slow_quantile("p90"), 0.9);
        assert_eq!(slow_quantile("p999"), 0.999);
        assert_eq!(slow_quantile("latency"), 0.9);
        let mut rows = Vec::new();
        for i in 0..1000u64 {
            let agent = if i % 10 == 0 { "old-sdk" } else { "web" };
            rows.push(row("baseline", "/", 10 + i % 7, agent, 200));
            // The canary's slow tail is the old SDK's 10% of requests.
            let slow = if agent == "old-sdk" { 50 } else { 0 };
            rows.push(row("canary", "/", 10 + i % 7 + slow, agent, 200));
        }
        let top = drilldown(&rows, "baseline", "canary", "p99", None, 3);
        assert_eq!(top[0].value, "old-sdk", "{top:#?}");
        assert_eq!(top[0].canary_bad, 100);
    }

    #[test]
    fn errors_rank_their_status_and_nothing_bad_gives_nothing() {
        let mut rows = Vec::new();
        for i in 0..100 {
            rows.push(row("baseline", "/", 5, "a", 200));
            rows.push(row(
                "canary",
                "/",
                5,
                "a",
                if i % 10 == 0 { 503 } else { 200 },
            ));
        }
        let errs = drilldown(&rows, "baseline", "canary", "errors", None, 5);
        assert_eq!(
            (errs[0].dimension.as_str(), errs[0].value.as_str()),
            ("status", "503")
        );
        assert_eq!(errs[0].canary_bad, 10);
        let same: Vec<SampleRow> = rows
            .iter()
            .filter(|r| r.status == Some(200))
            .cloned()
            .collect();
        assert!(drilldown(&same, "baseline", "canary", "errors", None, 5).is_empty());
    }
}

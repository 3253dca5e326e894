//! The verdict: is the canary worse than the baseline, where? Pure functions over time-ordered
//! samples, so the same code serves the API, the CLI and the simulation bench.
//!
//! Construction (STATISTICS.md, extended): within each endpoint, requests are cut into disjoint
//! groups of neighbours in arrival order; a group closes once it holds both cohorts and at least
//! `group_size` requests (at most 16 of each cohort are kept, the most recent). Every request is in
//! at most one group and the cut depends on arrival order only, never on values, so groups are
//! independent. Per group: latency X = the share of its (canary, baseline) pairs where
//! canary > (1 + tau) * baseline, errors Y = canary error rate - baseline error rate in the group;
//! E[X] is P(canary > (1 + tau) baseline), as for single pairs, with less variance (a canary is
//! compared with several baselines). Per metric (latency and errors, per endpoint and overall) two
//! betting e-processes: one for harm (E[X] > 1/2, E[Y] > delta) and one for its absence
//! (E[X] < 1/2, E[Y] < delta). The error budget alpha is split over a number of metrics fixed in
//! advance (`max_endpoints`), so reading the verdict after every batch, on every metric, keeps the
//! false-fail probability at most alpha.
//!
//! - fail: some harm test crossed K/alpha (at any time so far);
//! - pass: no fail, at least `min_groups` groups, and every judged metric has crossed its
//!   no-harm threshold (endpoints with fewer than `min_groups` groups are not required to);
//! - otherwise inconclusive.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    drilldown::{DrillRow, drilldown},
    stats::{
        eprocess::{Direction, MeanTest},
        rank::{self, Classification},
    },
    store::SampleRow,
};

/// `METHOD path` with the query string left out (routes are low-cardinality, queries are not).
pub fn endpoint_of(row: &SampleRow) -> String {
    let path = row
        .path
        .split_once('?')
        .map_or(row.path.as_str(), |(p, _)| p);
    format!("{} {path}", row.method)
}

/// Judges `canary` against `baseline` over stored rows (oldest first); other cohorts are ignored.
pub fn judge_rows(
    rows: &[SampleRow],
    baseline: &str,
    canary: &str,
    config: &JudgeConfig,
) -> Verdict {
    let mut judge = Judge::new(config.clone());
    for r in rows {
        let is_canary = r.cohort == canary;
        if !is_canary && r.cohort != baseline {
            continue;
        }
        judge.observe(Sample {
            canary: is_canary,
            endpoint: r.endpoint(),
            duration_ns: r.duration_ns,
            error: r.status.is_none_or(|s| s >= 500),
        });
    }
    let mut verdict = judge.verdict();
    // Where and for whom: rank dimension values for each failing metric.
    for m in verdict
        .metrics
        .iter_mut()
        .filter(|m| m.decision == Decision::Fail)
    {
        m.drilldown = drilldown(rows, baseline, canary, &m.metric, Some(&m.endpoint), 5);
    }
    verdict
}

/// What is judged and how strictly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// Probability of failing an identical canary, for the whole experiment.
    pub alpha: f64,
    /// Latency: a canary request slower than (1 + tolerance) x its baseline pair counts as worse;
    /// harm is "worse more often than not".
    pub latency_tolerance: f64,
    /// Errors: harm is an error rate higher than the baseline's by more than this (0.005 = half
    /// a percentage point).
    pub error_tolerance: f64,
    /// Groups needed before a pass (and before an endpoint is required to pass).
    pub min_groups: u64,
    /// Requests a comparison group needs (with both cohorts) before it closes.
    pub group_size: usize,
    /// Endpoints judged on their own (the busiest first); the rest count in "overall" only. Fixed
    /// in advance because alpha is split over 2 x (max_endpoints + 1) metrics.
    pub max_endpoints: usize,
    /// Fixed-horizon (Kayenta) tolerance band as a fraction of the baseline median.
    pub kayenta_fraction: f64,
    /// Confidence of the Hodges-Lehmann interval reported with each latency metric.
    pub kayenta_confidence: f64,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            latency_tolerance: 0.05,
            error_tolerance: 0.005,
            min_groups: 500,
            group_size: 8,
            max_endpoints: 10,
            kayenta_fraction: 0.25,
            kayenta_confidence: 0.98,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum JudgeConfigError {
    #[error("alpha must be in (0, 1), not {0}")]
    Alpha(f64),
    #[error("latency_tolerance must be in [0, 10), not {0}")]
    LatencyTolerance(f64),
    #[error("error_tolerance must be in [0, 1), not {0}")]
    ErrorTolerance(f64),
    #[error("max_endpoints must be at least 1")]
    MaxEndpoints,
}

impl JudgeConfig {
    pub fn validate(&self) -> Result<(), JudgeConfigError> {
        if !(self.alpha > 0.0 && self.alpha < 1.0) {
            return Err(JudgeConfigError::Alpha(self.alpha));
        }
        if !(0.0..10.0).contains(&self.latency_tolerance) {
            return Err(JudgeConfigError::LatencyTolerance(self.latency_tolerance));
        }
        if !(0.0..1.0).contains(&self.error_tolerance) {
            return Err(JudgeConfigError::ErrorTolerance(self.error_tolerance));
        }
        if self.max_endpoints == 0 {
            return Err(JudgeConfigError::MaxEndpoints);
        }
        Ok(())
    }

    /// The defaults with the settings a request gives (API, gRPC, Flagger metadata), validated.
    pub fn with_overrides(
        alpha: Option<f64>,
        latency_tolerance: Option<f64>,
        error_tolerance: Option<f64>,
        min_groups: Option<u64>,
        max_endpoints: Option<usize>,
    ) -> Result<Self, JudgeConfigError> {
        let d = Self::default();
        let c = Self {
            alpha: alpha.unwrap_or(d.alpha),
            latency_tolerance: latency_tolerance.unwrap_or(d.latency_tolerance),
            error_tolerance: error_tolerance.unwrap_or(d.error_tolerance),
            min_groups: min_groups.unwrap_or(d.min_groups),
            max_endpoints: max_endpoints.unwrap_or(d.max_endpoints),
            ..d
        };
        c.validate()?;
        Ok(c)
    }

    /// Metrics alpha is split over.
    pub fn metrics(&self) -> usize {
        2 * (self.max_endpoints + 1)
    }

    /// E-value a single metric's test must reach.
    pub fn threshold(&self) -> f64 {
        self.metrics() as f64 / self.alpha
    }
}

/// One request, as the judge needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub canary: bool,
    pub endpoint: String,
    pub duration_ns: u64,
    pub error: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Pass,
    Fail,
    Inconclusive,
}

/// The tests of one metric pair (latency, errors) on one endpoint or overall.
#[derive(Clone, Debug)]
struct Metrics {
    groups: u64,
    canary_requests: u64,
    baseline_requests: u64,
    latency_harm: MeanTest,
    latency_safe: MeanTest,
    error_harm: MeanTest,
    error_safe: MeanTest,
    canary_errors: u64,
    baseline_errors: u64,
    canary_ns: Vec<f64>,
    baseline_ns: Vec<f64>,
}

impl Metrics {
    fn new(c: &JudgeConfig) -> Self {
        Self {
            groups: 0,
            canary_requests: 0,
            baseline_requests: 0,
            latency_harm: MeanTest::new(0.5, 0.0, 1.0, Direction::Above),
            latency_safe: MeanTest::new(0.5, 0.0, 1.0, Direction::Below),
            error_harm: MeanTest::new(c.error_tolerance, -1.0, 1.0, Direction::Above),
            error_safe: MeanTest::new(c.error_tolerance, -1.0, 1.0, Direction::Below),
            canary_errors: 0,
            baseline_errors: 0,
            canary_ns: Vec::new(),
            baseline_ns: Vec::new(),
        }
    }

    /// Adds one closed group (both slices non-empty).
    fn add(&mut self, c: &JudgeConfig, canary: &[Sample], baseline: &[Sample]) {
        self.groups += 1;
        let mut worse = 0usize;
        for x in canary {
            for b in baseline {
                worse += usize::from(
                    x.duration_ns as f64 > (1.0 + c.latency_tolerance) * b.duration_ns as f64,
                );
            }
        }
        let x = worse as f64 / (canary.len() * baseline.len()) as f64;
        self.latency_harm.observe(x);
        self.latency_safe.observe(x);
        let errors = |v: &[Sample]| v.iter().filter(|s| s.error).count() as u64;
        let (ce, be) = (errors(canary), errors(baseline));
        let y = ce as f64 / canary.len() as f64 - be as f64 / baseline.len() as f64;
        self.error_harm.observe(y);
        self.error_safe.observe(y);
        self.canary_errors += ce;
        self.baseline_errors += be;
        self.canary_requests += canary.len() as u64;
        self.baseline_requests += baseline.len() as u64;
        self.canary_ns
            .extend(canary.iter().map(|s| s.duration_ns as f64));
        self.baseline_ns
            .extend(baseline.iter().map(|s| s.duration_ns as f64));
    }
}

/// Most requests of one cohort a group keeps (the most recent).
const GROUP_CAP: usize = 16;

/// An open comparison group of one endpoint.
#[derive(Clone, Debug, Default)]
struct Group {
    canary: Vec<Sample>,
    baseline: Vec<Sample>,
}

/// A streaming judge for one canary against the baseline.
#[derive(Clone, Debug)]
pub struct Judge {
    config: JudgeConfig,
    overall: Metrics,
    endpoints: BTreeMap<String, Metrics>,
    /// The open group of each endpoint.
    open: BTreeMap<String, Group>,
    /// Requests seen per cohort: (canary, baseline).
    seen: (u64, u64),
    /// Requests per endpoint: (canary, baseline), for the throughput shares.
    traffic: BTreeMap<String, (u64, u64)>,
}

impl Judge {
    pub fn new(config: JudgeConfig) -> Self {
        Self {
            overall: Metrics::new(&config),
            config,
            endpoints: BTreeMap::new(),
            open: BTreeMap::new(),
            seen: (0, 0),
            traffic: BTreeMap::new(),
        }
    }

    /// Adds the next request in arrival order.
    pub fn observe(&mut self, s: Sample) {
        let traffic = self.traffic.entry(s.endpoint.clone()).or_default();
        if s.canary {
            self.seen.0 += 1;
            traffic.0 += 1;
        } else {
            self.seen.1 += 1;
            traffic.1 += 1;
        }
        let group = self.open.entry(s.endpoint.clone()).or_default();
        let side = if s.canary {
            &mut group.canary
        } else {
            &mut group.baseline
        };
        if side.len() == GROUP_CAP {
            side.remove(0);
        }
        let endpoint = s.endpoint.clone();
        side.push(s);
        if group.canary.is_empty()
            || group.baseline.is_empty()
            || group.canary.len() + group.baseline.len() < self.config.group_size
        {
            return;
        }
        let g = std::mem::take(group);
        self.overall.add(&self.config, &g.canary, &g.baseline);
        let config = &self.config;
        self.endpoints
            .entry(endpoint)
            .or_insert_with(|| Metrics::new(config))
            .add(config, &g.canary, &g.baseline);
    }

    /// Comparison groups closed so far.
    pub fn groups(&self) -> u64 {
        self.overall.groups
    }

    /// Endpoints judged on their own: the busiest `max_endpoints` (by groups, then name).
    fn judged(&self) -> Vec<(&String, &Metrics)> {
        let mut v: Vec<(&String, &Metrics)> = self.endpoints.iter().collect();
        v.sort_by(|a, b| b.1.groups.cmp(&a.1.groups).then(a.0.cmp(b.0)));
        v.truncate(self.config.max_endpoints);
        v
    }

    /// The decision only, cheap enough to read after every batch.
    pub fn decision(&self) -> Decision {
        let alpha = 1.0 / self.config.threshold();
        let harm = |m: &Metrics| m.latency_harm.rejected(alpha) || m.error_harm.rejected(alpha);
        let safe = |m: &Metrics| m.latency_safe.rejected(alpha) && m.error_safe.rejected(alpha);
        let judged = self.judged();
        if harm(&self.overall) || judged.iter().any(|(_, m)| harm(m)) {
            return Decision::Fail;
        }
        let enough = self.overall.groups >= self.config.min_groups;
        if enough
            && safe(&self.overall)
            && judged
                .iter()
                .filter(|(_, m)| m.groups >= self.config.min_groups)
                .all(|(_, m)| safe(m))
        {
            Decision::Pass
        } else {
            Decision::Inconclusive
        }
    }

    /// The full verdict with per-metric reasons.
    pub fn verdict(&self) -> Verdict {
        let threshold = self.config.threshold();
        let alpha = 1.0 / threshold;
        let mut metrics = Vec::new();
        let judged = self.judged();
        for (endpoint, m) in std::iter::once((&"*".to_string(), &self.overall))
            .chain(judged.iter().map(|(e, m)| (*e, *m)))
        {
            metrics.push(self.latency_report(endpoint, m, alpha));
            metrics.push(self.error_report(endpoint, m, alpha));
        }
        let decision = self.decision();
        let judged_metrics: Vec<&MetricVerdict> = metrics
            .iter()
            .filter(|m| m.endpoint == "*" || m.groups >= self.config.min_groups)
            .collect();
        let passing = judged_metrics
            .iter()
            .filter(|m| m.decision == Decision::Pass)
            .count();
        let score = match decision {
            Decision::Fail => 0.0,
            _ if judged_metrics.is_empty() => 0.0,
            _ => 100.0 * passing as f64 / judged_metrics.len() as f64,
        };
        let mut reasons: Vec<String> = metrics
            .iter()
            .filter(|m| m.decision == Decision::Fail)
            .map(|m| m.summary.clone())
            .collect();
        if reasons.is_empty() {
            reasons = match decision {
                Decision::Pass => vec![format!(
                    "no harmful shift on any judged metric ({} groups)",
                    self.overall.groups
                )],
                _ if self.overall.groups < self.config.min_groups => vec![format!(
                    "{} of the {} comparison groups needed",
                    self.overall.groups, self.config.min_groups
                )],
                _ => metrics
                    .iter()
                    .filter(|m| {
                        m.decision == Decision::Inconclusive && m.groups >= self.config.min_groups
                    })
                    .map(|m| format!("{}: not yet shown harmless", m.name()))
                    .collect(),
            };
        }
        Verdict {
            decision,
            score,
            groups: self.overall.groups,
            throughput: self.throughput(),
            requests: Requests {
                canary: self.seen.0,
                baseline: self.seen.1,
            },
            alpha: self.config.alpha,
            threshold,
            reasons,
            metrics,
        }
    }

    /// The canary's share of each endpoint's requests against its share overall, largest
    /// departures first: an endpoint the canary serves much less (or more) than its weight
    /// says where traffic goes elsewhere (errors retried, clients giving up, routing).
    fn throughput(&self) -> Vec<ThroughputShare> {
        let share = |c: u64, b: u64| {
            if c + b == 0 {
                0.0
            } else {
                c as f64 / (c + b) as f64
            }
        };
        let overall = share(self.seen.0, self.seen.1);
        let mut v: Vec<ThroughputShare> = self
            .traffic
            .iter()
            .map(|(endpoint, &(c, b))| ThroughputShare {
                endpoint: endpoint.clone(),
                canary_requests: c,
                baseline_requests: b,
                canary_share: share(c, b),
                overall_share: overall,
            })
            .collect();
        v.sort_by(|a, b| {
            (b.canary_share - b.overall_share)
                .abs()
                .total_cmp(&(a.canary_share - a.overall_share).abs())
                .then(a.endpoint.cmp(&b.endpoint))
        });
        v.truncate(self.config.max_endpoints);
        v
    }

    fn decision_of(harm: &MeanTest, safe: &MeanTest, alpha: f64) -> Decision {
        if harm.rejected(alpha) {
            Decision::Fail
        } else if safe.rejected(alpha) {
            Decision::Pass
        } else {
            Decision::Inconclusive
        }
    }

    fn latency_report(&self, endpoint: &str, m: &Metrics, alpha: f64) -> MetricVerdict {
        let c = &self.config;
        let decision = Self::decision_of(&m.latency_harm, &m.latency_safe, alpha);
        let canary_p50 = median(&m.canary_ns);
        let baseline_p50 = median(&m.baseline_ns);
        let worse = m.latency_harm.mean();
        let shift = rank::hodges_lehmann(&m.canary_ns, &m.baseline_ns, c.kayenta_confidence);
        let kayenta = shift
            .zip(baseline_p50)
            .map(|(s, b)| rank::classify(&s, b, c.kayenta_fraction));
        let to_ms = |v: f64| v / 1e6;
        let summary = format!(
            "latency {endpoint}: canary slower than (1+{tol})x baseline in {share} of comparisons ({groups} groups); p50 {cp} vs {bp} ms (e-value {e:.1}, threshold {t:.0})",
            tol = c.latency_tolerance,
            share = worse.map_or("-".into(), |w| format!("{:.1}%", 100.0 * w)),
            groups = m.groups,
            cp = canary_p50.map_or("-".into(), |v| format!("{:.3}", to_ms(v))),
            bp = baseline_p50.map_or("-".into(), |v| format!("{:.3}", to_ms(v))),
            e = m.latency_harm.max_e_value(),
            t = c.threshold(),
        );
        MetricVerdict {
            metric: "latency".into(),
            endpoint: endpoint.to_string(),
            decision,
            groups: m.groups,
            canary: canary_p50.map(to_ms),
            baseline: baseline_p50.map(to_ms),
            effect: worse,
            effect_name:
                "share of canary/baseline comparisons where the canary is slower beyond tolerance"
                    .into(),
            e_value_harm: m.latency_harm.max_e_value(),
            e_value_safe: m.latency_safe.max_e_value(),
            shift_ms: shift.map(|s| Interval {
                estimate: to_ms(s.estimate),
                lower: to_ms(s.lower),
                upper: to_ms(s.upper),
            }),
            kayenta,
            summary,
            drilldown: Vec::new(),
        }
    }

    fn error_report(&self, endpoint: &str, m: &Metrics, alpha: f64) -> MetricVerdict {
        let c = &self.config;
        let decision = Self::decision_of(&m.error_harm, &m.error_safe, alpha);
        let rate = |e: u64, n: u64| (n > 0).then(|| e as f64 / n as f64);
        let (cr, br) = (
            rate(m.canary_errors, m.canary_requests),
            rate(m.baseline_errors, m.baseline_requests),
        );
        let summary = format!(
            "errors {endpoint}: canary {c} vs baseline {b} ({groups} groups; tolerance +{tol} points, e-value {e:.1}, threshold {t:.0})",
            c = cr.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            b = br.map_or("-".into(), |v| format!("{:.2}%", 100.0 * v)),
            groups = m.groups,
            tol = 100.0 * c.error_tolerance,
            e = m.error_harm.max_e_value(),
            t = c.threshold(),
        );
        MetricVerdict {
            metric: "errors".into(),
            endpoint: endpoint.to_string(),
            decision,
            groups: m.groups,
            canary: cr,
            baseline: br,
            effect: m.error_harm.mean(),
            effect_name: "error-rate difference (canary - baseline)".into(),
            e_value_harm: m.error_harm.max_e_value(),
            e_value_safe: m.error_safe.max_e_value(),
            shift_ms: None,
            kayenta: None,
            summary,
            drilldown: Vec::new(),
        }
    }
}

fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Interval {
    pub estimate: f64,
    pub lower: f64,
    pub upper: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Requests {
    pub canary: u64,
    pub baseline: u64,
}

/// One judged metric.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricVerdict {
    /// `latency` or `errors`.
    pub metric: String,
    /// `METHOD path`, or `*` for all endpoints together.
    pub endpoint: String,
    pub decision: Decision,
    /// Comparison groups (neighbours in time with both cohorts).
    pub groups: u64,
    /// Latency: p50 in ms of the compared requests; errors: error rate.
    pub canary: Option<f64>,
    pub baseline: Option<f64>,
    pub effect: Option<f64>,
    pub effect_name: String,
    /// Largest e-value so far of the harm test and of the no-harm test.
    pub e_value_harm: f64,
    pub e_value_safe: f64,
    /// Hodges-Lehmann shift of canary over baseline latency, ms, with its interval.
    pub shift_ms: Option<Interval>,
    /// The fixed-horizon (Kayenta) classification of the same data, for reference only: it is not
    /// valid under repeated looks.
    pub kayenta: Option<Classification>,
    pub summary: String,
    /// For a failing metric: the dimension values that best explain it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drilldown: Vec<DrillRow>,
}

impl MetricVerdict {
    pub fn name(&self) -> String {
        format!("{} {}", self.metric, self.endpoint)
    }
}

/// The answer for one canary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    /// Share of judged metrics already shown harmless, 0..100 (0 on fail).
    pub score: f64,
    /// Comparison groups closed (neighbours in time holding both cohorts).
    pub groups: u64,
    pub requests: Requests,
    pub alpha: f64,
    /// E-value each metric's test must reach (metrics / alpha).
    pub threshold: f64,
    pub reasons: Vec<String>,
    pub metrics: Vec<MetricVerdict>,
    /// Throughput share per endpoint (informational: not part of the decision).
    #[serde(default)]
    pub throughput: Vec<ThroughputShare>,
}

/// How much of an endpoint's traffic the canary served.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ThroughputShare {
    pub endpoint: String,
    pub canary_requests: u64,
    pub baseline_requests: u64,
    /// Canary requests / all requests of the endpoint.
    pub canary_share: f64,
    /// The same over all endpoints.
    pub overall_share: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stats::sim::{Rng, Shape};

    fn run(shift: f64, slow_endpoint: &str, extra_error: f64, n: usize, seed: u64) -> Judge {
        let mut rng = Rng::new(seed);
        let mut j = Judge::new(JudgeConfig::default());
        for i in 0..n {
            let endpoint = ["GET /", "GET /checkout", "GET /search"][i % 3];
            let canary = rng.uniform() < 0.3;
            let slow = canary && endpoint == slow_endpoint;
            let d = Shape::LogNormal.sample(&mut rng, 20.0) * if slow { 1.0 + shift } else { 1.0 };
            let p_err = 0.01 + if canary { extra_error } else { 0.0 };
            j.observe(Sample {
                canary,
                endpoint: endpoint.into(),
                duration_ns: d as u64,
                error: rng.uniform() < p_err,
            });
        }
        j
    }

    #[test]
    fn a_slow_endpoint_fails_and_is_named() {
        let j = run(0.5, "GET /checkout", 0.0, 20_000, 3);
        let v = j.verdict();
        assert_eq!(v.decision, Decision::Fail, "{v:#?}");
        let failing: Vec<&str> = v
            .metrics
            .iter()
            .filter(|m| m.decision == Decision::Fail)
            .map(|m| m.endpoint.as_str())
            .collect();
        assert!(failing.contains(&"GET /checkout"), "{failing:?}");
        assert!(!failing.contains(&"GET /search"), "{failing:?}");
        assert!(v.reasons.iter().any(|r| r.contains("GET /checkout")));
        let m = v
            .metrics
            .iter()
            .find(|m| m.metric == "latency" && m.endpoint == "GET /checkout")
            .unwrap();
        assert_eq!(m.kayenta, Some(Classification::High));
        assert!(m.shift_ms.unwrap().estimate > 5.0, "{m:?}");
    }

    #[test]
    fn more_errors_fail_and_an_identical_canary_passes() {
        let v = run(0.0, "", 0.05, 20_000, 4).verdict();
        assert_eq!(v.decision, Decision::Fail, "{:?}", v.reasons);
        assert!(
            v.reasons.iter().any(|r| r.starts_with("errors")),
            "{:?}",
            v.reasons
        );
        let v = run(0.0, "", 0.0, 200_000, 5).verdict();
        assert_eq!(v.decision, Decision::Pass, "{:?}", v.reasons);
        assert!(v.score > 99.0);
    }

    #[test]
    fn too_little_data_is_inconclusive_never_pass() {
        let v = run(0.0, "", 0.0, 300, 6).verdict();
        assert_eq!(v.decision, Decision::Inconclusive);
        assert!(v.reasons[0].contains("groups needed"), "{:?}", v.reasons);
        let empty = Judge::new(JudgeConfig::default()).verdict();
        assert_eq!(empty.decision, Decision::Inconclusive);
        assert_eq!(empty.groups, 0);
    }

    #[test]
    fn groups_are_disjoint_neighbours_holding_both_cohorts() {
        let mut j = Judge::new(JudgeConfig {
            group_size: 3,
            ..JudgeConfig::default()
        });
        let s = |canary, ms: u64| Sample {
            canary,
            endpoint: "GET /".into(),
            duration_ns: ms * 1_000_000,
            error: false,
        };
        // b b c | c c c b | b: two groups closed, the last baseline waits.
        for (c, ms) in [
            (false, 1),
            (false, 2),
            (true, 3),
            (true, 4),
            (true, 5),
            (true, 6),
            (false, 7),
            (false, 8),
        ] {
            j.observe(s(c, ms));
        }
        assert_eq!(j.groups(), 2);
        let v = j.verdict();
        assert_eq!(
            v.requests,
            Requests {
                canary: 4,
                baseline: 4
            }
        );
        let latency = &v.metrics[0];
        // Group 1: canary 3 vs baselines 1, 2: slower in 2 of 2. Group 2: 4, 5, 6 vs 7: 0 of 3.
        assert_eq!(latency.effect, Some(0.5));
    }

    #[test]
    fn throughput_shares_show_where_the_canary_serves_less() {
        let mut j = Judge::new(JudgeConfig::default());
        for i in 0..1_000u64 {
            // The canary gets a third of /a but half of /b.
            let (endpoint, canary) = if i % 2 == 0 {
                ("GET /a", i % 6 == 0)
            } else {
                ("GET /b", i % 4 == 1)
            };
            j.observe(Sample {
                canary,
                endpoint: endpoint.into(),
                duration_ns: 1,
                error: false,
            });
        }
        let t = j.verdict().throughput;
        assert_eq!(t.len(), 2);
        let a = t.iter().find(|s| s.endpoint == "GET /a").unwrap();
        assert!((a.canary_share - 1.0 / 3.0).abs() < 0.01, "{a:?}");
        assert!(
            (a.overall_share - (167.0 + 250.0) / 1000.0).abs() < 0.01,
            "{a:?}"
        );
    }

    #[test]
    fn bad_configs_are_refused() {
        let bad = |f: fn(&mut JudgeConfig)| {
            let mut c = JudgeConfig::default();
            f(&mut c);
            c.validate()
        };
        assert_eq!(bad(|c| c.alpha = 0.0), Err(JudgeConfigError::Alpha(0.0)));
        assert!(bad(|c| c.error_tolerance = 1.5).is_err());
        assert!(bad(|c| c.max_endpoints = 0).is_err());
        assert!(JudgeConfig::default().validate().is_ok());
    }
}

//! The verdict: is the canary worse than the baseline, where? A pure function over the per-second
//! cells of `series` (never over raw events), so the API, the periodic judge, the CLI and the
//! simulation bench share it, and its cost grows with seconds x endpoints, not requests.
//!
//! Judged per endpoint (the busiest `max_endpoints`) and overall, each under its share of alpha
//! (STATISTICS.md; K metrics fixed in advance, so reading after every batch keeps the false-fail
//! probability of the whole experiment at most alpha):
//!
//! - `latency` (location): per second, the share of (canary, baseline) pairs where the canary is
//!   slower than (1 + tau) x the baseline; an e-process on its mean against 1/2
//!   (`SuperiorityTest`). Harm: most requests slower.
//! - `pNN` (tails, p90 and p99 by default): time-uniform confidence sequences for each cohort's
//!   quantile (`confseq`); fail when canary's lower bound > (1 + tau_q) x baseline's upper bound,
//!   pass when canary's upper bound <= (1 + tau_q) x baseline's lower bound. Harm in a minority
//!   of requests (a slow path, one client type) moves these and not the location.
//! - `errors`: requests without a response or with a 5xx / non-zero gRPC status. Fail: each
//!   error belongs to the canary with probability <= theta0 under "canary rate <= (1 + delta) x
//!   baseline rate", theta0 from that second's traffic split (`ShareTest`, counts as evidence).
//!   Pass: the canary's rate bound <= (1 + delta) x the baseline's + an absolute slack.
//! - `volume`: the canary's share of the requests against the configured split, or the share
//!   learned in a warm-up the test does not reuse; fail when it is lower beyond tolerance (a
//!   canary refusing, shedding or too slow to take its traffic).
//!
//! PASS only when every judged metric excludes harm beyond its tolerance, overall and on every
//! endpoint with `min_requests` per cohort; FAIL as soon as any metric shows harm; otherwise
//! INCONCLUSIVE.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{
    drilldown::DrillRow,
    series::{Cell, Snapshot},
    stats::{
        confseq,
        eprocess::{Direction, ShareTest, SuperiorityTest},
        hist::{DenseHist, LogHist, Ranked, Side},
    },
    store::SampleRow,
};

/// A tail quantile and how much slower the canary's may be.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QuantileTolerance {
    /// In (0, 1), e.g. 0.99.
    pub quantile: f64,
    /// Harm is a canary quantile above (1 + tolerance) x the baseline's.
    pub tolerance: f64,
}

impl QuantileTolerance {
    /// `p90`, `p99`, `p999`, `p5`.
    pub fn name(&self) -> String {
        let pct = self.quantile * 100.0;
        if (pct - pct.round()).abs() < 1e-9 {
            format!("p{}", pct.round())
        } else {
            // 99.9 -> p999, 99.95 -> p9995.
            let s = format!("{pct}");
            format!("p{}", s.replace('.', ""))
        }
    }

    /// Parses `p90=0.1,p99=0.2` (or `0.9=0.1`).
    pub fn parse_list(s: &str) -> Result<Vec<Self>, JudgeConfigError> {
        let bad = || JudgeConfigError::Quantiles(s.to_string());
        s.split(',')
            .filter(|p| !p.trim().is_empty())
            .map(|part| {
                let (q, t) = part.trim().split_once(['=', ':']).ok_or_else(bad)?;
                let q = match crate::stats::quantile_from_name(q) {
                    Some(q) => q,
                    None => q.parse::<f64>().map_err(|_| bad())?,
                };
                let tolerance = t.parse::<f64>().map_err(|_| bad())?;
                Ok(Self {
                    quantile: q,
                    tolerance,
                })
            })
            .collect()
    }
}

/// What is judged and how strictly. Every field has a default a user need not tune.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JudgeConfig {
    /// Probability of failing an identical canary, for the whole experiment.
    pub alpha: f64,
    /// Location: a canary request slower than (1 + tolerance) x a baseline request counts as
    /// worse; harm is "worse more often than not".
    pub latency_tolerance: f64,
    /// Tail quantiles judged, each with its tolerance.
    pub quantiles: Vec<QuantileTolerance>,
    /// Errors: harm is a canary error rate above (1 + this) x the baseline's.
    pub error_ratio_tolerance: f64,
    /// Errors: absolute slack (0.005 = half a percentage point) a PASS allows on top of the
    /// ratio, so an error-free service can pass.
    pub error_tolerance: f64,
    /// Volume: harm is a canary share of the requests lower than the expected one by more than
    /// this, in odds (0.1: 10% fewer requests than its split gives it).
    pub volume_tolerance: f64,
    /// The canary's expected share of canary + baseline requests (e.g. 0.1 for a 10% canary
    /// weight). Unset: learned from the first `volume_warmup` requests.
    pub split: Option<f64>,
    /// Requests (both cohorts) whose split is learned when `split` is unset.
    pub volume_warmup: u64,
    /// Requests each cohort needs before a PASS (and before an endpoint is required to pass).
    pub min_requests: u64,
    /// Endpoints judged on their own (the busiest first); the rest count in "overall" only.
    /// Fixed in advance because alpha is split over every metric of every judged endpoint.
    pub max_endpoints: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            alpha: 0.05,
            latency_tolerance: 0.05,
            quantiles: vec![
                QuantileTolerance {
                    quantile: 0.9,
                    tolerance: 0.1,
                },
                QuantileTolerance {
                    // Real tails are noisy (scheduling, GC): a quarter.
                    quantile: 0.99,
                    tolerance: 0.25,
                },
            ],
            error_ratio_tolerance: 0.25,
            error_tolerance: 0.005,
            volume_tolerance: 0.1,
            split: None,
            volume_warmup: 2000,
            min_requests: 1000,
            max_endpoints: 10,
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
    #[error("error_ratio_tolerance must be in [0, 100), not {0}")]
    ErrorRatioTolerance(f64),
    #[error("volume_tolerance must be in [0, 1), not {0}")]
    VolumeTolerance(f64),
    #[error("split must be in (0, 1), not {0}")]
    Split(f64),
    #[error(
        "quantiles `{0}`: expected a list like p90=0.1,p99=0.2 (quantile in (0, 1), tolerance in [0, 10))"
    )]
    Quantiles(String),
    #[error("max_endpoints must be at least 1")]
    MaxEndpoints,
}

/// Settings a request may override (API, gRPC, CLI, Flagger metadata); unset keeps the default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JudgeOverrides {
    pub alpha: Option<f64>,
    pub latency_tolerance: Option<f64>,
    /// `p90=0.1,p99=0.2`.
    pub quantiles: Option<String>,
    pub error_ratio_tolerance: Option<f64>,
    pub error_tolerance: Option<f64>,
    pub volume_tolerance: Option<f64>,
    pub split: Option<f64>,
    pub min_requests: Option<u64>,
    pub max_endpoints: Option<usize>,
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
        if !(0.0..100.0).contains(&self.error_ratio_tolerance) {
            return Err(JudgeConfigError::ErrorRatioTolerance(
                self.error_ratio_tolerance,
            ));
        }
        if !(0.0..1.0).contains(&self.volume_tolerance) {
            return Err(JudgeConfigError::VolumeTolerance(self.volume_tolerance));
        }
        if let Some(s) = self.split
            && !(s > 0.0 && s < 1.0)
        {
            return Err(JudgeConfigError::Split(s));
        }
        for q in &self.quantiles {
            if !(q.quantile > 0.0 && q.quantile < 1.0 && (0.0..10.0).contains(&q.tolerance)) {
                return Err(JudgeConfigError::Quantiles(format!(
                    "{}={}",
                    q.quantile, q.tolerance
                )));
            }
        }
        if self.max_endpoints == 0 {
            return Err(JudgeConfigError::MaxEndpoints);
        }
        Ok(())
    }

    /// This configuration with a request's overrides, validated.
    pub fn with(&self, o: &JudgeOverrides) -> Result<Self, JudgeConfigError> {
        let mut c = self.clone();
        c.alpha = o.alpha.unwrap_or(c.alpha);
        c.latency_tolerance = o.latency_tolerance.unwrap_or(c.latency_tolerance);
        if let Some(q) = &o.quantiles {
            c.quantiles = QuantileTolerance::parse_list(q)?;
        }
        c.error_ratio_tolerance = o.error_ratio_tolerance.unwrap_or(c.error_ratio_tolerance);
        c.error_tolerance = o.error_tolerance.unwrap_or(c.error_tolerance);
        c.volume_tolerance = o.volume_tolerance.unwrap_or(c.volume_tolerance);
        c.split = o.split.or(c.split);
        c.min_requests = o.min_requests.unwrap_or(c.min_requests);
        c.max_endpoints = o.max_endpoints.unwrap_or(c.max_endpoints);
        c.validate()?;
        Ok(c)
    }

    /// Metrics per judged scope (overall and each endpoint).
    fn metrics_per_scope(&self) -> usize {
        3 + self.quantiles.len()
    }

    /// Metrics alpha is split over.
    pub fn metrics(&self) -> usize {
        self.metrics_per_scope() * (self.max_endpoints + 1)
    }

    /// E-value a single metric's test must reach.
    pub fn threshold(&self) -> f64 {
        self.metrics() as f64 / self.alpha
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Pass,
    Fail,
    Inconclusive,
}

/// Lower and upper bound, each absent while nothing on that side is excluded yet.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Bounds {
    pub lower: Option<f64>,
    pub upper: Option<f64>,
}

impl Bounds {
    fn of((lower, upper): (Option<f64>, Option<f64>)) -> Self {
        Self { lower, upper }
    }

    fn scaled(self, f: f64) -> Self {
        Self {
            lower: self.lower.map(|v| v * f),
            upper: self.upper.map(|v| v * f),
        }
    }
}

/// A tail quantile's bounds at one time (ms).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TimePoint {
    /// End of the last second judged, Unix seconds.
    pub unix_s: u64,
    pub canary_requests: u64,
    pub baseline_requests: u64,
    pub canary: Bounds,
    pub baseline: Bounds,
}

/// One judged metric.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MetricVerdict {
    /// `latency`, `p90`, `p99` (the configured quantiles), `errors` or `volume`.
    pub metric: String,
    /// `METHOD path`, or `*` for all endpoints together.
    pub endpoint: String,
    pub decision: Decision,
    /// Whether the verdict needs this metric to pass (enough requests in both cohorts).
    pub required: bool,
    pub canary_requests: u64,
    pub baseline_requests: u64,
    /// latency: p50 ms; pNN: the quantile in ms; errors: error rate; volume: canary share.
    pub canary: Option<f64>,
    pub baseline: Option<f64>,
    /// Time-uniform bounds on `canary` and `baseline` (pNN: ms; errors: rate), when judged by them.
    #[serde(default)]
    pub canary_bounds: Option<Bounds>,
    #[serde(default)]
    pub baseline_bounds: Option<Bounds>,
    /// pNN: bounds on canary / baseline; errors: on the canary's rate over (1 + ratio
    /// tolerance) x the baseline's plus slack.
    #[serde(default)]
    pub ratio_bounds: Option<Bounds>,
    /// Where harm starts: a ratio (latency, pNN, errors: 1 + tolerance) or, for volume, the
    /// lowest canary share tolerated.
    pub limit: f64,
    /// For a failing metric: the end of the second (Unix seconds) whose data first showed harm.
    #[serde(default)]
    pub failed_at: Option<u64>,
    pub effect: Option<f64>,
    pub effect_name: String,
    /// Largest e-value so far of the harm test and of the no-harm test (e-process metrics).
    pub e_value_harm: Option<f64>,
    pub e_value_safe: Option<f64>,
    pub summary: String,
    /// pNN: the bounds over time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<TimePoint>,
    /// For a failing metric: the dimension values that best explain it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drilldown: Vec<DrillRow>,
}

impl MetricVerdict {
    pub fn name(&self) -> String {
        format!("{} {}", self.metric, self.endpoint)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Requests {
    pub canary: u64,
    pub baseline: u64,
}

/// The canary's share of the traffic against what it should get.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct VolumeShare {
    /// Expected canary share of canary + baseline requests.
    pub expected: Option<f64>,
    /// `configured` (the split) or `learned` (the warm-up), or `warming up`.
    pub source: String,
    pub observed: f64,
    /// Observed share per minute of data: (Unix seconds, share).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub timeline: Vec<(u64, f64)>,
}

/// The answer for one canary.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Verdict {
    pub decision: Decision,
    /// Share of required metrics already shown harmless, 0..100 (0 on fail).
    pub score: f64,
    pub requests: Requests,
    /// Seconds of traffic judged.
    pub seconds: u64,
    pub alpha: f64,
    /// Metrics alpha is split over, and the e-value each metric's test must reach.
    pub metrics_judged: usize,
    pub threshold: f64,
    pub reasons: Vec<String>,
    pub metrics: Vec<MetricVerdict>,
    pub volume: VolumeShare,
    /// Throughput share per endpoint (informational).
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

/// Scales a share by `factor` in odds: the share of events a side with `factor` x its rate gets.
fn odds_scale(share: f64, factor: f64) -> f64 {
    share * factor / (share * factor + 1.0 - share)
}

#[derive(Clone, Copy, Debug, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    unanswered: u64,
}

impl Totals {
    fn add(&mut self, c: &Cell) {
        self.requests += c.requests;
        self.errors += c.errors;
        self.unanswered += c.unanswered;
    }
}

#[derive(Clone, Debug)]
struct QuantileState {
    failed: Option<(Bounds, Bounds, u64)>,
    canary: Bounds,
    baseline: Bounds,
    checked_at: u64,
    timeline: Vec<TimePoint>,
}

#[derive(Clone, Debug)]
struct Volume {
    warm: (u64, u64),
    theta0: Option<f64>,
    expected: Option<f64>,
    learned: bool,
    after: (u64, u64),
    harm: ShareTest,
    safe: ShareTest,
}

/// The tests of one scope (an endpoint, or overall).
#[derive(Clone, Debug)]
struct Scope {
    canary: Totals,
    baseline: Totals,
    canary_hist: DenseHist,
    baseline_hist: DenseHist,
    location_harm: SuperiorityTest,
    location_safe: SuperiorityTest,
    error_harm: ShareTest,
    quantiles: Vec<QuantileState>,
    volume: Volume,
    /// This second's location pairs (sum k x_lo, sum k x_hi, sum k) and requests.
    second_location: (f64, f64, f64),
    second_requests: (u64, u64),
    /// Canary share per minute, for the report.
    share_timeline: Vec<(u64, f64)>,
    /// When the location, error and volume tests first crossed their threshold.
    failed_at: [Option<u64>; 3],
    minute: Option<(u64, u64, u64)>,
}

impl Scope {
    fn new(c: &JudgeConfig) -> Self {
        let theta0 = c.split.map(|s| odds_scale(s, 1.0 - c.volume_tolerance));
        Self {
            canary: Totals::default(),
            baseline: Totals::default(),
            canary_hist: DenseHist::default(),
            baseline_hist: DenseHist::default(),
            location_harm: SuperiorityTest::new(Direction::Above),
            location_safe: SuperiorityTest::new(Direction::Below),
            error_harm: ShareTest::new(Direction::Above),
            quantiles: c
                .quantiles
                .iter()
                .map(|_| QuantileState {
                    failed: None,
                    canary: Bounds::default(),
                    baseline: Bounds::default(),
                    checked_at: 0,
                    timeline: Vec::new(),
                })
                .collect(),
            volume: Volume {
                warm: (0, 0),
                theta0,
                expected: c.split,
                learned: false,
                after: (0, 0),
                harm: ShareTest::new(Direction::Below),
                safe: ShareTest::new(Direction::Above),
            },
            second_location: (0.0, 0.0, 0.0),
            second_requests: (0, 0),
            share_timeline: Vec::new(),
            failed_at: [None; 3],
            minute: None,
        }
    }

    /// One endpoint's cells of one second (either may be absent).
    fn add_cells(&mut self, c: &JudgeConfig, canary: Option<&Cell>, baseline: Option<&Cell>) {
        if let (Some(cc), Some(bc)) = (canary, baseline)
            && cc.requests > 0
            && bc.requests > 0
        {
            // Pairs of answered requests only (no latency without a response).
            let k = cc.latency.total().min(bc.latency.total()) as f64;
            if k > 0.0 {
                let tau = c.latency_tolerance;
                let lo = LogHist::share_slower(&cc.latency, &bc.latency, tau, Side::Lower);
                let hi = LogHist::share_slower(&cc.latency, &bc.latency, tau, Side::Upper);
                self.second_location.0 += k * lo;
                self.second_location.1 += k * hi;
                self.second_location.2 += k;
            }
            // Errors, conditioned on this second's split of this endpoint's traffic; the
            // alternative comes from earlier seconds only.
            let rho = cc.requests as f64 / (cc.requests + bc.requests) as f64;
            let theta0 = odds_scale(rho, 1.0 + c.error_ratio_tolerance);
            let rate = |t: &Totals| (t.errors as f64 + 0.5) / (t.requests as f64 + 1.0);
            let ratio = rate(&self.canary) / rate(&self.baseline);
            self.error_harm
                .observe(cc.errors, bc.errors, theta0, odds_scale(rho, ratio));
        }
        if let Some(cc) = canary {
            self.second_requests.0 += cc.requests;
            self.canary_hist.add(&cc.latency);
        }
        if let Some(bc) = baseline {
            self.second_requests.1 += bc.requests;
            self.baseline_hist.add(&bc.latency);
        }
        // Totals (the error-ratio estimate) move only after the whole second: see `end_second`.
    }

    /// Closes a second: the tests that take one observation per second, and the totals.
    fn end_second(
        &mut self,
        c: &JudgeConfig,
        alpha_m: f64,
        second: u64,
        cells: &[(Option<&Cell>, Option<&Cell>)],
    ) {
        let (sum_lo, sum_hi, k) = std::mem::take(&mut self.second_location);
        if k > 0.0 {
            self.location_harm.observe(sum_lo / k, k);
            self.location_safe.observe(sum_hi / k, k);
        }
        for (cc, bc) in cells {
            if let Some(cc) = cc {
                self.canary.add(cc);
            }
            if let Some(bc) = bc {
                self.baseline.add(bc);
            }
        }
        let (nc, nb) = std::mem::take(&mut self.second_requests);
        self.volume_second(c, alpha_m, nc, nb);
        let minute = second / 60;
        match &mut self.minute {
            Some((m, a, b)) if *m == minute => {
                *a += nc;
                *b += nb;
            }
            other => {
                if let Some((m, a, b)) = other.take()
                    && a + b > 0
                {
                    self.share_timeline
                        .push((m * 60 + 60, a as f64 / (a + b) as f64));
                }
                *other = Some((minute, nc, nb));
            }
        }
        self.check_quantiles(c, alpha_m, second + 1, false);
        let alpha_v = if self.volume.learned {
            alpha_m / 2.0
        } else {
            alpha_m
        };
        let crossed = [
            self.location_harm.rejected(alpha_m),
            self.error_harm.rejected(alpha_m),
            self.volume.harm.rejected(alpha_v),
        ];
        for (at, crossed) in self.failed_at.iter_mut().zip(crossed) {
            if at.is_none() && crossed {
                *at = Some(second + 1);
            }
        }
    }

    fn volume_second(&mut self, c: &JudgeConfig, alpha_m: f64, nc: u64, nb: u64) {
        let v = &mut self.volume;
        let Some(theta0) = v.theta0 else {
            v.warm.0 += nc;
            v.warm.1 += nb;
            let n = v.warm.0 + v.warm.1;
            if n >= c.volume_warmup.max(1) {
                // Half the metric's alpha pays for the learned share being too high.
                // (Only its lower end: this runs every second while it is 0, as for an
                // endpoint the canary does not serve.)
                let lower = confseq::proportion_lower(v.warm.0, n, alpha_m / 2.0);
                v.expected = Some(v.warm.0 as f64 / n as f64);
                v.learned = true;
                if lower > 0.0 {
                    v.theta0 = Some(odds_scale(lower, 1.0 - c.volume_tolerance));
                }
            }
            return;
        };
        let (ac, ab) = v.after;
        let estimate = (ac as f64 + 10.0 * theta0) / ((ac + ab) as f64 + 10.0);
        v.harm.observe(nc, nb, theta0, estimate);
        v.safe.observe(nc, nb, theta0, estimate);
        v.after = (ac + nc, ab + nb);
    }

    /// Quantile bounds, at every 5% growth of the data (time-uniform bounds may be read at any
    /// times; reading them at all is what costs) and at the end.
    fn check_quantiles(&mut self, c: &JudgeConfig, alpha_m: f64, unix_s: u64, last: bool) {
        let n = self.canary_hist.total().min(self.baseline_hist.total());
        for (q, state) in c.quantiles.iter().zip(self.quantiles.iter_mut()) {
            if n == 0 || (!last && (n as f64) < state.checked_at as f64 * 1.05 + 10.0) {
                continue;
            }
            state.checked_at = n;
            let canary = Bounds::of(confseq::quantile_bounds(
                &self.canary_hist,
                q.quantile,
                alpha_m / 2.0,
            ));
            let baseline = Bounds::of(confseq::quantile_bounds(
                &self.baseline_hist,
                q.quantile,
                alpha_m / 2.0,
            ));
            if state.failed.is_none()
                && let (Some(cl), Some(bu)) = (canary.lower, baseline.upper)
                && cl > (1.0 + q.tolerance) * bu
            {
                state.failed = Some((canary, baseline, unix_s));
            }
            state.canary = canary;
            state.baseline = baseline;
            state.timeline.push(TimePoint {
                unix_s,
                canary_requests: self.canary_hist.total(),
                baseline_requests: self.baseline_hist.total(),
                canary: canary.scaled(1e-6),
                baseline: baseline.scaled(1e-6),
            });
            if state.timeline.len() > 240 {
                // Keep the first, then every other point: bounded size, whole span.
                let mut i = 0;
                state.timeline.retain(|_| {
                    i += 1;
                    i % 2 == 1
                });
            }
        }
    }
}

/// Judges `canary` against `baseline` over the closed cells of `snapshot`.
pub fn judge(snapshot: &Snapshot, baseline: &str, canary: &str, config: &JudgeConfig) -> Verdict {
    let empty = BTreeMap::new();
    let canary_cells = snapshot.cohorts.get(canary).unwrap_or(&empty);
    let baseline_cells = snapshot.cohorts.get(baseline).unwrap_or(&empty);
    // Endpoints, busiest first; the first `max_endpoints` are judged on their own.
    let mut endpoints: BTreeMap<&str, u64> = BTreeMap::new();
    for cells in [canary_cells, baseline_cells] {
        for (e, chunks) in cells {
            *endpoints.entry(e.as_str()).or_default() += chunks
                .iter()
                .flat_map(|c| c.iter())
                .filter(|(s, _)| *s >= snapshot.from_second)
                .map(|(_, c)| c.requests)
                .sum::<u64>();
        }
    }
    let mut ranked: Vec<(&str, u64)> = endpoints.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let judged = ranked.len().min(config.max_endpoints);
    let index: BTreeMap<&str, usize> = ranked
        .iter()
        .enumerate()
        .map(|(i, (e, _))| (*e, i))
        .collect();
    // Every cell in time order: (second, endpoint index, is_canary).
    let mut cells: Vec<(u64, usize, bool, &Cell)> = Vec::new();
    for (is_canary, map) in [(true, canary_cells), (false, baseline_cells)] {
        for (e, chunks) in map {
            let i = index[e.as_str()];
            for (second, cell) in chunks.iter().flat_map(|c| c.iter()) {
                if *second >= snapshot.from_second {
                    cells.push((*second, i, is_canary, cell));
                }
            }
        }
    }
    cells.sort_by_key(|&(s, i, c, _)| (s, i, !c));

    let alpha_m = config.alpha / config.metrics() as f64;
    let mut overall = Scope::new(config);
    let mut scopes: Vec<Scope> = (0..judged).map(|_| Scope::new(config)).collect();
    let mut seconds = 0u64;
    let mut last_second = 0u64;
    let mut i = 0;
    while i < cells.len() {
        let second = cells[i].0;
        let mut pairs: Vec<(usize, Option<&Cell>, Option<&Cell>)> = Vec::new();
        while i < cells.len() && cells[i].0 == second {
            let (_, e, is_canary, cell) = cells[i];
            match pairs.last_mut() {
                Some(p) if p.0 == e => {
                    if is_canary {
                        p.1 = Some(cell)
                    } else {
                        p.2 = Some(cell)
                    }
                }
                _ => pairs.push(if is_canary {
                    (e, Some(cell), None)
                } else {
                    (e, None, Some(cell))
                }),
            }
            i += 1;
        }
        for &(e, cc, bc) in &pairs {
            overall.add_cells(config, cc, bc);
            if let Some(scope) = scopes.get_mut(e) {
                scope.add_cells(config, cc, bc);
                scope.end_second(config, alpha_m, second, &[(cc, bc)]);
            }
        }
        let all: Vec<(Option<&Cell>, Option<&Cell>)> =
            pairs.iter().map(|&(_, c, b)| (c, b)).collect();
        overall.end_second(config, alpha_m, second, &all);
        seconds += 1;
        last_second = second;
    }
    overall.check_quantiles(config, alpha_m, last_second + 1, true);
    for s in &mut scopes {
        s.check_quantiles(config, alpha_m, last_second + 1, true);
    }

    let mut metrics = Vec::new();
    for (name, scope) in std::iter::once(("*", &overall)).chain(
        ranked
            .iter()
            .take(judged)
            .map(|(e, _)| *e)
            .zip(scopes.iter()),
    ) {
        metrics.extend(report(config, alpha_m, name, scope));
    }
    let decision = if metrics.iter().any(|m| m.decision == Decision::Fail) {
        Decision::Fail
    } else if overall.canary.requests >= config.min_requests
        && overall.baseline.requests >= config.min_requests
        && metrics
            .iter()
            .filter(|m| m.required)
            .all(|m| m.decision == Decision::Pass)
    {
        Decision::Pass
    } else {
        Decision::Inconclusive
    };
    let required: Vec<&MetricVerdict> = metrics.iter().filter(|m| m.required).collect();
    let score = match decision {
        Decision::Fail => 0.0,
        _ if required.is_empty() => 0.0,
        _ => {
            100.0
                * required
                    .iter()
                    .filter(|m| m.decision == Decision::Pass)
                    .count() as f64
                / required.len() as f64
        }
    };
    let mut reasons: Vec<String> = metrics
        .iter()
        .filter(|m| m.decision == Decision::Fail)
        .map(|m| m.summary.clone())
        .collect();
    if reasons.is_empty() {
        reasons = match decision {
            Decision::Pass => vec![format!(
                "no harm beyond tolerance on any of the {} required metrics ({} canary / {} baseline requests)",
                required.len(),
                overall.canary.requests,
                overall.baseline.requests
            )],
            _ if overall.canary.requests < config.min_requests
                || overall.baseline.requests < config.min_requests =>
            {
                vec![format!(
                    "{} canary and {} baseline requests of the {} each needed",
                    overall.canary.requests, overall.baseline.requests, config.min_requests
                )]
            }
            _ => required
                .iter()
                .filter(|m| m.decision == Decision::Inconclusive)
                .map(|m| format!("{}: not yet shown harmless", m.name()))
                .collect(),
        };
    }
    let v = &overall.volume;
    let observed = share(overall.canary.requests, overall.baseline.requests);
    let mut share_timeline = overall.share_timeline.clone();
    if let Some((m, a, b)) = overall.minute
        && a + b > 0
    {
        share_timeline.push((m * 60 + 60, a as f64 / (a + b) as f64));
    }
    Verdict {
        decision,
        score,
        requests: Requests {
            canary: overall.canary.requests,
            baseline: overall.baseline.requests,
        },
        seconds,
        alpha: config.alpha,
        metrics_judged: config.metrics(),
        threshold: config.threshold(),
        reasons,
        metrics,
        volume: VolumeShare {
            expected: v.expected,
            source: if config.split.is_some() {
                "configured".into()
            } else if v.learned {
                "learned".into()
            } else {
                "warming up".into()
            },
            observed,
            timeline: share_timeline,
        },
        throughput: throughput(
            canary_cells,
            baseline_cells,
            snapshot.from_second,
            config.max_endpoints,
        ),
    }
}

fn share(c: u64, b: u64) -> f64 {
    if c + b == 0 {
        0.0
    } else {
        c as f64 / (c + b) as f64
    }
}

fn throughput(
    canary: &BTreeMap<String, crate::series::Cells>,
    baseline: &BTreeMap<String, crate::series::Cells>,
    from_second: u64,
    max: usize,
) -> Vec<ThroughputShare> {
    let count = |m: &BTreeMap<String, crate::series::Cells>, e: &str| -> u64 {
        m.get(e).map_or(0, |chunks| {
            chunks
                .iter()
                .flat_map(|c| c.iter())
                .filter(|(s, _)| *s >= from_second)
                .map(|(_, c)| c.requests)
                .sum()
        })
    };
    let endpoints: std::collections::BTreeSet<&String> =
        canary.keys().chain(baseline.keys()).collect();
    let rows: Vec<(String, u64, u64)> = endpoints
        .into_iter()
        .map(|e| (e.clone(), count(canary, e), count(baseline, e)))
        .collect();
    let (tc, tb) = rows.iter().fold((0, 0), |(a, b), r| (a + r.1, b + r.2));
    let overall = share(tc, tb);
    let mut v: Vec<ThroughputShare> = rows
        .into_iter()
        .map(|(endpoint, c, b)| ThroughputShare {
            endpoint,
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
    v.truncate(max);
    v
}

fn ms(ns: f64) -> f64 {
    ns / 1e6
}

fn fmt_opt(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".into(), f)
}

fn e_text(e: f64) -> String {
    if e >= 1e4 {
        format!("{e:.2e}")
    } else {
        format!("{e:.1}")
    }
}

/// The metrics of one scope.
fn report(c: &JudgeConfig, alpha_m: f64, endpoint: &str, s: &Scope) -> Vec<MetricVerdict> {
    let required = s.canary.requests >= c.min_requests && s.baseline.requests >= c.min_requests;
    let base = |metric: &str| MetricVerdict {
        metric: metric.to_string(),
        endpoint: endpoint.to_string(),
        decision: Decision::Inconclusive,
        required,
        canary_requests: s.canary.requests,
        baseline_requests: s.baseline.requests,
        canary: None,
        baseline: None,
        canary_bounds: None,
        baseline_bounds: None,
        ratio_bounds: None,
        limit: 1.0,
        failed_at: None,
        effect: None,
        effect_name: String::new(),
        e_value_harm: None,
        e_value_safe: None,
        summary: String::new(),
        timeline: Vec::new(),
        drilldown: Vec::new(),
    };
    let threshold = 1.0 / alpha_m;
    let mut out = Vec::new();

    // Location.
    let mut m = base("latency");
    m.decision = if s.location_harm.rejected(alpha_m) {
        Decision::Fail
    } else if s.location_safe.rejected(alpha_m) {
        Decision::Pass
    } else {
        Decision::Inconclusive
    };
    m.canary = s.canary_hist.quantile(0.5).map(ms);
    m.baseline = s.baseline_hist.quantile(0.5).map(ms);
    m.limit = 1.0 + c.latency_tolerance;
    m.failed_at = s.failed_at[0];
    m.effect = s.location_harm.mean();
    m.effect_name =
        "share of canary/baseline pairs (same second) where the canary is slower beyond tolerance"
            .into();
    m.e_value_harm = Some(s.location_harm.max_e_value());
    m.e_value_safe = Some(s.location_safe.max_e_value());
    m.summary = format!(
        "latency {endpoint}: canary slower than {limit}x baseline in {share} of pairs; p50 {cp} vs {bp} ms (e-value {e}, threshold {t:.0})",
        limit = m.limit,
        share = fmt_opt(m.effect, |w| format!("{:.1}%", 100.0 * w)),
        cp = fmt_opt(m.canary, |v| format!("{v:.3}")),
        bp = fmt_opt(m.baseline, |v| format!("{v:.3}")),
        e = e_text(s.location_harm.max_e_value()),
        t = threshold,
    );
    out.push(m);

    // Tails.
    for (q, state) in c.quantiles.iter().zip(&s.quantiles) {
        let mut m = base(&q.name());
        let limit = 1.0 + q.tolerance;
        let (cb, bb, failed_at) = match state.failed {
            Some((c, b, at)) => (c, b, Some(at)),
            None => (state.canary, state.baseline, None),
        };
        m.failed_at = failed_at;
        let ratio = Bounds {
            lower: cb.lower.zip(bb.upper).map(|(c, b)| c / b),
            upper: cb.upper.zip(bb.lower).map(|(c, b)| c / b),
        };
        let passed = state.failed.is_none()
            && state
                .canary
                .upper
                .zip(state.baseline.lower)
                .is_some_and(|(c, b)| c <= limit * b);
        m.decision = if state.failed.is_some() {
            Decision::Fail
        } else if passed {
            Decision::Pass
        } else {
            Decision::Inconclusive
        };
        m.canary = s.canary_hist.quantile(q.quantile).map(ms);
        m.baseline = s.baseline_hist.quantile(q.quantile).map(ms);
        m.canary_bounds = Some(cb.scaled(1e-6));
        m.baseline_bounds = Some(bb.scaled(1e-6));
        m.ratio_bounds = Some(ratio);
        m.limit = limit;
        m.effect = m.canary.zip(m.baseline).map(|(a, b)| a / b);
        m.effect_name = format!("canary {} / baseline {}", q.name(), q.name());
        let values = format!(
            "canary {} ms vs baseline {} ms",
            fmt_opt(m.canary, |v| format!("{v:.1}")),
            fmt_opt(m.baseline, |v| format!("{v:.1}"))
        );
        let x = |v: Option<f64>| fmt_opt(v, |v| format!("x{v:.2}"));
        m.summary = match m.decision {
            Decision::Fail => format!(
                "{} {endpoint}: {values}, lower bound {} > {limit}",
                q.name(),
                x(ratio.lower)
            ),
            Decision::Pass => format!(
                "{} {endpoint}: {values}, upper bound {} <= {limit}",
                q.name(),
                x(ratio.upper)
            ),
            Decision::Inconclusive => format!(
                "{} {endpoint}: {values}, ratio between {} and {} (limit {limit})",
                q.name(),
                x(ratio.lower),
                x(ratio.upper)
            ),
        };
        m.timeline = state.timeline.clone();
        out.push(m);
    }

    // Errors.
    let mut m = base("errors");
    let (cr, br) = (s.canary, s.baseline);
    let rate = |t: Totals| (t.requests > 0).then(|| t.errors as f64 / t.requests as f64);
    let cb = Bounds::of({
        let (l, u) = confseq::proportion_bounds(cr.errors, cr.requests, alpha_m / 2.0);
        (Some(l), Some(u))
    });
    let bb = Bounds::of({
        let (l, u) = confseq::proportion_bounds(br.errors, br.requests, alpha_m / 2.0);
        (Some(l), Some(u))
    });
    let limit = 1.0 + c.error_ratio_tolerance;
    let allowed = bb.lower.map(|b| limit * b + c.error_tolerance);
    let passed =
        cr.requests > 0 && br.requests > 0 && cb.upper.zip(allowed).is_some_and(|(u, a)| u <= a);
    m.decision = if s.error_harm.rejected(alpha_m) {
        Decision::Fail
    } else if passed {
        Decision::Pass
    } else {
        Decision::Inconclusive
    };
    m.canary = rate(cr);
    m.baseline = rate(br);
    m.canary_bounds = Some(cb);
    m.baseline_bounds = Some(bb);
    m.limit = limit;
    m.failed_at = s.failed_at[1];
    m.effect = m.canary.zip(m.baseline).map(|(a, b)| a - b);
    m.effect_name = "error-rate difference (canary - baseline)".into();
    m.e_value_harm = Some(s.error_harm.max_e_value());
    let pct = |v: Option<f64>| fmt_opt(v, |v| format!("{:.2}%", 100.0 * v));
    m.summary = format!(
        "errors {endpoint}: canary {} ({} of {}, {} without response) vs baseline {} ({} of {}); harm beyond x{limit} (e-value {}, threshold {:.0}); pass needs the canary's bound {} <= {}",
        pct(m.canary),
        cr.errors,
        cr.requests,
        cr.unanswered,
        pct(m.baseline),
        br.errors,
        br.requests,
        e_text(s.error_harm.max_e_value()),
        threshold,
        pct(cb.upper),
        pct(allowed),
    );
    out.push(m);

    // Volume.
    let mut m = base("volume");
    let v = &s.volume;
    let alpha_v = if v.learned { alpha_m / 2.0 } else { alpha_m };
    m.decision = if v.harm.rejected(alpha_v) {
        Decision::Fail
    } else if v.safe.rejected(alpha_v) {
        Decision::Pass
    } else {
        Decision::Inconclusive
    };
    m.canary = Some(share(s.canary.requests, s.baseline.requests));
    m.baseline = v.expected;
    m.limit = v.theta0.unwrap_or(0.0);
    m.failed_at = s.failed_at[2];
    m.effect = m.canary;
    m.effect_name = "canary share of canary + baseline requests".into();
    m.e_value_harm = Some(v.harm.max_e_value());
    m.e_value_safe = Some(v.safe.max_e_value());
    m.summary = format!(
        "volume {endpoint}: canary {} of requests vs {} expected ({}), lowest tolerated {} (e-value {}, threshold {:.0})",
        pct(m.canary),
        pct(v.expected),
        if c.split.is_some() {
            "configured split"
        } else if v.learned {
            "learned in the warm-up"
        } else {
            "warm-up not over"
        },
        pct(v.theta0),
        e_text(v.harm.max_e_value()),
        1.0 / alpha_v,
    );
    out.push(m);
    out
}

/// Judges stored rows (oldest first) without the live state: the CLI's offline report and tests.
pub fn judge_rows(
    rows: &[SampleRow],
    baseline: &str,
    canary: &str,
    config: &JudgeConfig,
) -> Verdict {
    let snapshot = Snapshot::from_requests(
        rows.iter()
            .filter(|r| r.cohort == baseline || r.cohort == canary)
            .map(|r| {
                (
                    r.cohort.as_str(),
                    r.endpoint(),
                    r.start_unix_ns,
                    r.duration_ns,
                    r.outcome(),
                )
            }),
    );
    let mut v = judge(&snapshot, baseline, canary, config);
    attach_drilldown(&mut v, rows, baseline, canary);
    v
}

/// Where and for whom: ranks dimension values for every failing metric but volume.
pub fn attach_drilldown(v: &mut Verdict, rows: &[SampleRow], baseline: &str, canary: &str) {
    for m in v
        .metrics
        .iter_mut()
        .filter(|m| m.decision == Decision::Fail && m.metric != "volume")
    {
        m.drilldown =
            crate::drilldown::drilldown(rows, baseline, canary, &m.metric, Some(&m.endpoint), 5);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::{
        series::Outcome,
        stats::sim::{Rng, Shape},
    };

    /// Simulated traffic at 1000 requests/s over three endpoints.
    struct Traffic {
        canary_share: f64,
        /// Canary latency factor on /checkout.
        slow: f64,
        /// Share of canary requests (all endpoints) that get `tail_factor` x slower.
        tail: f64,
        tail_factor: f64,
        extra_errors: f64,
        unanswered: f64,
    }

    impl Default for Traffic {
        fn default() -> Self {
            Self {
                canary_share: 0.3,
                slow: 1.0,
                tail: 0.0,
                tail_factor: 1.0,
                extra_errors: 0.0,
                unanswered: 0.0,
            }
        }
    }

    fn snapshot(t: &Traffic, n: usize, seed: u64) -> Snapshot {
        let mut rng = Rng::new(seed);
        let mut reqs = Vec::new();
        for i in 0..n {
            let e = ["GET /", "GET /checkout", "GET /search"][i % 3];
            let canary = rng.uniform() < t.canary_share;
            let mut d = Shape::LogNormal.sample(&mut rng, 20.0);
            if canary && e == "GET /checkout" {
                d *= t.slow;
            }
            if canary && rng.uniform() < t.tail {
                d *= t.tail_factor;
            }
            let p_err = 0.01 + if canary { t.extra_errors } else { 0.0 };
            let outcome = if canary && rng.uniform() < t.unanswered {
                Outcome::Unanswered
            } else if rng.uniform() < p_err {
                Outcome::Error
            } else {
                Outcome::Ok
            };
            reqs.push((
                if canary { "canary" } else { "baseline" },
                e.to_string(),
                i as u64 * 1_000_000,
                d as u64,
                outcome,
            ));
        }
        Snapshot::from_requests(reqs)
    }

    fn failing(v: &Verdict) -> Vec<String> {
        v.metrics
            .iter()
            .filter(|m| m.decision == Decision::Fail)
            .map(|m| m.name())
            .collect()
    }

    #[test]
    fn a_slow_endpoint_fails_and_is_named() {
        let s = snapshot(
            &Traffic {
                slow: 1.5,
                ..Default::default()
            },
            30_000,
            3,
        );
        let v = judge(&s, "baseline", "canary", &JudgeConfig::default());
        assert_eq!(v.decision, Decision::Fail, "{:#?}", v.reasons);
        let f = failing(&v);
        assert!(f.contains(&"latency GET /checkout".to_string()), "{f:?}");
        assert!(!f.iter().any(|m| m.ends_with("GET /search")), "{f:?}");
        assert!(v.reasons.iter().any(|r| r.contains("GET /checkout")));
    }

    #[test]
    fn a_slow_tail_fails_on_the_tail_metric_with_its_bound_named() {
        // 8% of canary requests 4x slower: the median barely moves, p99 does.
        let t = Traffic {
            tail: 0.08,
            tail_factor: 4.0,
            ..Default::default()
        };
        let v = judge(
            &snapshot(&t, 60_000, 4),
            "baseline",
            "canary",
            &JudgeConfig::default(),
        );
        assert_eq!(v.decision, Decision::Fail, "{:#?}", v.reasons);
        let f = failing(&v);
        assert!(f.contains(&"p99 *".to_string()), "{f:?}");
        let latency = v.metrics.iter().find(|m| m.name() == "latency *").unwrap();
        assert_ne!(latency.decision, Decision::Fail, "{}", latency.summary);
        let p99 = v.metrics.iter().find(|m| m.name() == "p99 *").unwrap();
        assert!(p99.summary.contains("lower bound x"), "{}", p99.summary);
        assert!(p99.ratio_bounds.unwrap().lower.unwrap() > 1.2);
        assert!(!p99.timeline.is_empty());
    }

    #[test]
    fn more_errors_and_unanswered_requests_fail_on_errors() {
        let mut last = None;
        for (seed, t) in [
            Traffic {
                extra_errors: 0.01,
                ..Default::default()
            },
            Traffic {
                unanswered: 0.02,
                ..Default::default()
            },
        ]
        .into_iter()
        .enumerate()
        {
            let v = judge(
                &snapshot(&t, 60_000, 5 + seed as u64),
                "baseline",
                "canary",
                &JudgeConfig::default(),
            );
            let f = failing(&v);
            assert!(f.contains(&"errors *".to_string()), "{:#?}", v.reasons);
            last = Some(v);
        }
        let v = last.unwrap();
        let m = v.metrics.iter().find(|m| m.name() == "errors *").unwrap();
        assert!(m.summary.contains("without response"), "{}", m.summary);
    }

    #[test]
    fn a_canary_short_of_its_split_fails_on_volume() {
        // Configured 30%, gets 24% (20% less).
        let s = snapshot(
            &Traffic {
                canary_share: 0.24,
                ..Default::default()
            },
            60_000,
            7,
        );
        let c = JudgeConfig {
            split: Some(0.3),
            ..JudgeConfig::default()
        };
        let v = judge(&s, "baseline", "canary", &c);
        assert!(
            failing(&v).contains(&"volume *".to_string()),
            "{:#?}",
            v.reasons
        );
        assert_eq!(v.volume.source, "configured");
        // The same traffic with the right split passes volume.
        let c = JudgeConfig {
            split: Some(0.24),
            ..JudgeConfig::default()
        };
        let v = judge(&s, "baseline", "canary", &c);
        let m = v.metrics.iter().find(|m| m.name() == "volume *").unwrap();
        assert_eq!(m.decision, Decision::Pass, "{}", m.summary);
    }

    #[test]
    fn an_identical_canary_passes_and_too_little_data_is_inconclusive() {
        let v = judge(
            &snapshot(&Traffic::default(), 300_000, 8),
            "baseline",
            "canary",
            &JudgeConfig::default(),
        );
        assert_eq!(v.decision, Decision::Pass, "{:#?}", v.reasons);
        assert!(v.score > 99.0);
        assert_eq!(v.volume.source, "learned");
        let v = judge(
            &snapshot(&Traffic::default(), 300, 9),
            "baseline",
            "canary",
            &JudgeConfig::default(),
        );
        assert_eq!(v.decision, Decision::Inconclusive);
        assert!(v.reasons[0].contains("needed"), "{:?}", v.reasons);
        let empty = judge(
            &Snapshot::default(),
            "baseline",
            "canary",
            &JudgeConfig::default(),
        );
        assert_eq!(empty.decision, Decision::Inconclusive);
        assert_eq!(empty.requests.canary, 0);
    }

    #[test]
    fn configs_parse_and_bad_ones_are_refused() {
        let q = QuantileTolerance::parse_list("p90=0.1,p99:0.3,0.999=1,p5=0.5").unwrap();
        assert_eq!(
            q.iter().map(QuantileTolerance::name).collect::<Vec<_>>(),
            ["p90", "p99", "p999", "p5"]
        );
        assert_eq!(q[1].tolerance, 0.3);
        assert!(QuantileTolerance::parse_list("p90").is_err());
        let d = JudgeConfig::default();
        assert!(
            d.with(&JudgeOverrides {
                alpha: Some(0.0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            d.with(&JudgeOverrides {
                split: Some(1.0),
                ..Default::default()
            })
            .is_err()
        );
        assert!(
            d.with(&JudgeOverrides {
                quantiles: Some("p100=0.1".into()),
                ..Default::default()
            })
            .is_err()
        );
        let c = d
            .with(&JudgeOverrides {
                quantiles: Some("p50=0.1".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.metrics(), 4 * 11);
        assert_eq!(d.metrics(), 5 * 11);
        assert!(d.validate().is_ok());
    }
}

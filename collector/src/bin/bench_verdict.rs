//! `cargo xtask bench verdict`: how the sequential judge behaves, side by side with the
//! fixed-horizon (Kayenta-style) judge at the same alpha, on seeded simulated traffic.
//!
//! - A/A (identical canary), four latency shapes: the share of runs that ever FAIL while the
//!   verdict is read after every batch (must stay below alpha), and how soon a PASS comes;
//! - A/B: canary 10% slower on one endpoint of three; canary error rate +1 point:
//!   power (share of runs that FAIL within the horizon) and median requests to the FAIL.
//!
//! The fixed-horizon judge looks once, at the horizon, with Mann-Whitney (canary against
//! (1 + tolerance) x baseline) and a two-proportion z-test per metric, Bonferroni over the same
//! metrics; "fixed, peeked" is the same test read every 10% of the horizon, the trap
//! STATISTICS.md warns about.

use std::collections::BTreeMap;

use bakeoff_collector::{
    stats::{
        rank,
        sim::{Rng, Shape},
    },
    verdict::{Decision, Judge, JudgeConfig, Sample},
};
use clap::Parser;
use statrs::distribution::{ContinuousCDF, Normal};

#[derive(Parser)]
struct Args {
    /// Runs per A/A row.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Runs per A/B row.
    #[arg(long, default_value_t = 200)]
    power_runs: usize,
    /// Requests per run (both cohorts).
    #[arg(long, default_value_t = 200_000)]
    horizon: usize,
    /// Requests between two reads of the verdict.
    #[arg(long, default_value_t = 500)]
    batch: usize,
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    /// Share of requests that go to the canary.
    #[arg(long, default_value_t = 0.1)]
    canary_share: f64,
}

const ENDPOINTS: [(&str, f64, f64); 3] = [
    // endpoint, traffic share, median ms
    ("GET /", 0.5, 10.0),
    ("GET /checkout", 0.3, 40.0),
    ("GET /search", 0.2, 25.0),
];
const BASE_ERROR: f64 = 0.01;

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    shape: Shape,
    /// Latency factor of the canary on /checkout.
    slow: f64,
    /// Extra error probability of the canary, everywhere.
    errors: f64,
}

#[derive(Default)]
struct Outcome {
    /// Requests at the first FAIL / PASS of the sequential judge, if any.
    seq_fail: Option<usize>,
    seq_pass: Option<usize>,
    fixed_fail: bool,
    peeked_fail: bool,
}

/// Unpaired samples per endpoint and cohort, for the fixed-horizon judge.
#[derive(Default)]
struct Cohorts {
    canary: Vec<f64>,
    baseline: Vec<f64>,
    canary_errors: u64,
    baseline_errors: u64,
}

fn fixed_fails(data: &BTreeMap<&str, Cohorts>, c: &JudgeConfig) -> bool {
    let alpha = 1.0 / c.threshold();
    let normal = Normal::standard();
    let mut overall = Cohorts::default();
    let mut groups: Vec<&Cohorts> = data.values().collect();
    for g in data.values() {
        overall.canary.extend(&g.canary);
        overall.baseline.extend(&g.baseline);
        overall.canary_errors += g.canary_errors;
        overall.baseline_errors += g.baseline_errors;
    }
    groups.push(&overall);
    groups.iter().any(|g| {
        let scaled: Vec<f64> = g
            .baseline
            .iter()
            .map(|b| b * (1.0 + c.latency_tolerance))
            .collect();
        let latency = rank::mann_whitney(&g.canary, &scaled).is_some_and(|m| m.p_greater < alpha);
        let (nc, nb) = (g.canary.len() as f64, g.baseline.len() as f64);
        let errors = nc > 0.0 && nb > 0.0 && {
            let (pc, pb) = (g.canary_errors as f64 / nc, g.baseline_errors as f64 / nb);
            let se = (pc * (1.0 - pc) / nc + pb * (1.0 - pb) / nb)
                .sqrt()
                .max(1e-12);
            normal.sf((pc - pb - c.error_tolerance) / se) < alpha
        };
        latency || errors
    })
}

fn run_once(s: Scenario, args: &Args, config: &JudgeConfig, seed: u64, peek: bool) -> Outcome {
    let mut rng = Rng::new(seed);
    let mut judge = Judge::new(config.clone());
    let mut data: BTreeMap<&str, Cohorts> = BTreeMap::new();
    let mut out = Outcome::default();
    let peek_every = (args.horizon / 10).max(1);
    for i in 1..=args.horizon {
        let r = rng.uniform();
        let mut acc = 0.0;
        let &(endpoint, _, median) = ENDPOINTS
            .iter()
            .find(|(_, share, _)| {
                acc += share;
                r < acc
            })
            .unwrap_or(&ENDPOINTS[0]);
        let canary = rng.uniform() < args.canary_share;
        let mut d = s.shape.sample(&mut rng, median);
        if canary && endpoint == "GET /checkout" {
            d *= s.slow;
        }
        let error = rng.uniform() < BASE_ERROR + if canary { s.errors } else { 0.0 };
        let g = data.entry(endpoint).or_default();
        if canary {
            g.canary.push(d);
            g.canary_errors += u64::from(error);
        } else {
            g.baseline.push(d);
            g.baseline_errors += u64::from(error);
        }
        judge.observe(Sample {
            canary,
            endpoint: endpoint.to_string(),
            duration_ns: d as u64,
            error,
        });
        if i % args.batch == 0 {
            match judge.decision() {
                Decision::Fail if out.seq_fail.is_none() => out.seq_fail = Some(i),
                Decision::Pass if out.seq_pass.is_none() => out.seq_pass = Some(i),
                _ => {}
            }
        }
        if peek && i % peek_every == 0 && !out.peeked_fail {
            out.peeked_fail = fixed_fails(&data, config);
        }
    }
    out.fixed_fail = fixed_fails(&data, config);
    out
}

fn median(mut v: Vec<usize>) -> Option<usize> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn row(s: Scenario, runs: usize, args: &Args, config: &JudgeConfig, seed0: u64, peek: bool) {
    // Two threads: the machine's cores, each on half of the runs.
    let outcomes: Vec<Outcome> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..2)
            .map(|t| {
                scope.spawn(move || {
                    (0..runs)
                        .filter(|r| r % 2 == t)
                        .map(|r| run_once(s, args, config, seed0 + r as u64, peek))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let n = outcomes.len().max(1) as f64;
    let pct = |k: usize| format!("{:.1}%", 100.0 * k as f64 / n);
    let seq_fail = outcomes.iter().filter(|o| o.seq_fail.is_some()).count();
    let seq_pass = outcomes.iter().filter(|o| o.seq_pass.is_some()).count();
    let fixed = outcomes.iter().filter(|o| o.fixed_fail).count();
    let peeked = outcomes.iter().filter(|o| o.peeked_fail).count();
    let to_fail = median(outcomes.iter().filter_map(|o| o.seq_fail).collect());
    let to_pass = median(outcomes.iter().filter_map(|o| o.seq_pass).collect());
    let k = |v: Option<usize>| v.map_or("-".into(), |v| format!("{:.0}k", v as f64 / 1000.0));
    println!(
        "{:<22} {:<12} {:>6} {:>9} {:>9} {:>11} {:>9} {:>11} {:>10} {:>8}",
        s.name,
        s.shape.name(),
        runs,
        pct(seq_fail),
        k(to_fail),
        pct(seq_pass),
        k(to_pass),
        pct(fixed),
        format!("{:.0}k", args.horizon as f64 / 1000.0),
        if peek { pct(peeked) } else { "-".into() },
    );
}

fn main() {
    let args = Args::parse();
    let config = JudgeConfig {
        alpha: args.alpha,
        ..JudgeConfig::default()
    };
    println!(
        "bakeoff verdict bench: seeded simulation; {} requests per run, {:.0}% to the canary, \
         3 endpoints (50/30/20% of traffic), base error rate {:.0}%;\n\
         verdict read after every {} requests; alpha {} for the whole experiment; tolerances: \
         latency {:.0}%, errors {:.1} points; {} metrics judged.\n",
        args.horizon,
        100.0 * args.canary_share,
        100.0 * BASE_ERROR,
        args.batch,
        config.alpha,
        100.0 * config.latency_tolerance,
        100.0 * config.error_tolerance,
        config.metrics()
    );
    println!(
        "{:<22} {:<12} {:>6} {:>9} {:>9} {:>11} {:>9} {:>11} {:>10} {:>8}",
        "scenario",
        "shape",
        "runs",
        "seq_fail",
        "to_fail",
        "seq_pass",
        "to_pass",
        "fixed_fail",
        "fixed_at",
        "peeked"
    );
    for (i, shape) in Shape::ALL.into_iter().enumerate() {
        let s = Scenario {
            name: "A/A identical",
            shape,
            slow: 1.0,
            errors: 0.0,
        };
        row(
            s,
            args.runs,
            &args,
            &config,
            1_000_000 * (i as u64 + 1),
            shape == Shape::LogNormal,
        );
    }
    for (i, shape) in [Shape::LogNormal, Shape::HeavyTail].into_iter().enumerate() {
        let s = Scenario {
            name: "/checkout 10% slower",
            shape,
            slow: 1.1,
            errors: 0.0,
        };
        row(
            s,
            args.power_runs,
            &args,
            &config,
            9_000_000 + 100_000 * i as u64,
            false,
        );
    }
    let s = Scenario {
        name: "errors +1 point",
        shape: Shape::LogNormal,
        slow: 1.0,
        errors: 0.01,
    };
    row(s, args.power_runs, &args, &config, 12_000_000, false);
    println!(
        "\nseq_fail / seq_pass: runs the sequential judge ever judged FAIL / PASS (read after every batch);\n\
         to_fail / to_pass: median requests until then; fixed_fail: runs the fixed-horizon judge fails at\n\
         one look at fixed_at; peeked: the same fixed test read at every 10% of the horizon.\n\
         For A/A rows fail% is the false-fail rate (target: at most alpha); for A/B rows it is the power."
    );
}

//! `cargo xtask bench verdict`: how the sequential judge behaves, side by side with a
//! fixed-horizon (Kayenta-style) judge at the same alpha, on seeded simulated traffic.
//!
//! Scenarios: A/A on four latency shapes (identical canary; the fail column is the false-fail
//! rate), and harms: 10% slower bulk on one endpoint, a slow tail (a few percent of requests
//! several times slower), a minority of clients slower, +1 point of errors at a 1% base rate,
//! requests without a response (resets), and a canary that gets 20% less traffic than its split.
//!
//! The sequential judge is the collector's own (`verdict::judge` over `series` cells). Its fail
//! column counts runs that FAIL at any second of the horizon (every metric's e-process or bound,
//! at every second): a superset of what any reading cadence would see, so the printed false-fail
//! rate bounds the one of a verdict read after every batch. PASS is read at every 10% of the
//! horizon. The fixed-horizon judge looks once, at the horizon, with Mann-Whitney (location),
//! a one-sided z-test of the canary's exceedances of the baseline's (1 + tau) x quantile
//! (tails), a two-proportion z-test (errors) and a z-test of the canary's share (volume),
//! Bonferroni over the same metrics; "peeked" is that test read at every 10% of the horizon.

use std::{collections::BTreeMap, sync::Arc};

use bakeoff_collector::{
    series::{Cell, Outcome, Snapshot},
    stats::{
        rank,
        sim::{Rng, Shape},
    },
    verdict::{Decision, JudgeConfig, judge},
};
use clap::Parser;
use statrs::distribution::{ContinuousCDF, Normal};

#[derive(Parser)]
struct Args {
    /// Runs per A/A row.
    #[arg(long, default_value_t = 1000)]
    runs: usize,
    /// Runs per harm row.
    #[arg(long, default_value_t = 200)]
    power_runs: usize,
    /// Requests per run (both cohorts), at `rate` requests per second.
    #[arg(long, default_value_t = 300_000)]
    horizon: usize,
    #[arg(long, default_value_t = 1000)]
    rate: usize,
    #[arg(long, default_value_t = 0.05)]
    alpha: f64,
    /// Share of requests that go to the canary (its configured split).
    #[arg(long, default_value_t = 0.2)]
    canary_share: f64,
    /// Only scenarios whose name contains this.
    #[arg(long)]
    only: Option<String>,
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
    /// Canary latency factor on /checkout.
    checkout: f64,
    /// Share of canary requests (every endpoint) `tail_factor` x slower.
    tail: f64,
    tail_factor: f64,
    /// Extra canary error probability.
    errors: f64,
    /// Share of canary requests without a response.
    resets: f64,
    /// The canary's traffic relative to its split (0.8: 20% less).
    volume: f64,
    /// Whether the judge is told the split (else it learns it).
    split_known: bool,
    harm: bool,
}

const A_A: Scenario = Scenario {
    name: "A/A identical",
    shape: Shape::LogNormal,
    checkout: 1.0,
    tail: 0.0,
    tail_factor: 1.0,
    errors: 0.0,
    resets: 0.0,
    volume: 1.0,
    split_known: true,
    harm: false,
};

#[derive(Default)]
struct RunOutcome {
    /// Seconds to the first FAIL of the sequential judge (any metric), if any.
    seq_fail: Option<u64>,
    /// Which metric failed first.
    first_metric: Option<String>,
    /// Seconds to the first PASS read (every 10% of the horizon).
    seq_pass: Option<u64>,
    fixed_fail: bool,
    peeked_fail: bool,
}

/// Raw samples per endpoint and cohort, for the fixed-horizon judge.
#[derive(Default, Clone)]
struct Raw {
    canary: Vec<f64>,
    baseline: Vec<f64>,
    canary_errors: u64,
    baseline_errors: u64,
}

fn z_sf(z: f64) -> f64 {
    Normal::standard().sf(z)
}

fn fixed_fails(data: &BTreeMap<&str, Raw>, c: &JudgeConfig, split: f64) -> bool {
    let alpha = 1.0 / c.threshold();
    let mut overall = Raw::default();
    for g in data.values() {
        overall.canary.extend(&g.canary);
        overall.baseline.extend(&g.baseline);
        overall.canary_errors += g.canary_errors;
        overall.baseline_errors += g.baseline_errors;
    }
    let mut groups: Vec<&Raw> = data.values().collect();
    groups.push(&overall);
    groups.iter().any(|g| {
        let (nc, nb) = (g.canary.len() as f64, g.baseline.len() as f64);
        if nc == 0.0 || nb == 0.0 {
            return false;
        }
        let scaled: Vec<f64> = g
            .baseline
            .iter()
            .map(|b| b * (1.0 + c.latency_tolerance))
            .collect();
        let location = rank::mann_whitney(&g.canary, &scaled).is_some_and(|m| m.p_greater < alpha);
        let mut sorted = g.baseline.clone();
        sorted.sort_unstable_by(f64::total_cmp);
        let tails = c.quantiles.iter().any(|q| {
            let bq = sorted[((nb - 1.0) * q.quantile).round() as usize] * (1.0 + q.tolerance);
            let above = g.canary.iter().filter(|&&x| x > bq).count() as f64;
            let p0 = 1.0 - q.quantile;
            z_sf((above / nc - p0) / (p0 * (1.0 - p0) / nc).sqrt()) < alpha
        });
        let (pc, pb) = (g.canary_errors as f64 / nc, g.baseline_errors as f64 / nb);
        let se = (pc * (1.0 - pc) / nc + pb * (1.0 - pb) / nb)
            .sqrt()
            .max(1e-12);
        let errors = z_sf((pc - (1.0 + c.error_ratio_tolerance) * pb) / se) < alpha;
        let share = nc / (nc + nb);
        let expected = split * (1.0 - c.volume_tolerance);
        let volume =
            z_sf((expected - share) / (expected * (1.0 - expected) / (nc + nb)).sqrt()) < alpha;
        location || tails || errors || volume
    })
}

/// The judge's snapshot of the first `seconds` seconds.
fn snapshot(cells: &BTreeMap<(bool, usize), Vec<(u64, Cell)>>, seconds: u64) -> Snapshot {
    let mut s = Snapshot::default();
    for ((canary, e), v) in cells {
        let upto: Vec<(u64, Cell)> = v.iter().filter(|(t, _)| *t < seconds).cloned().collect();
        s.cohorts
            .entry(if *canary { "canary" } else { "baseline" }.to_string())
            .or_default()
            .insert(ENDPOINTS[*e].0.to_string(), vec![Arc::new(upto)]);
    }
    s
}

fn run_once(s: Scenario, args: &Args, config: &JudgeConfig, seed: u64, peek: bool) -> RunOutcome {
    let mut rng = Rng::new(seed);
    let mut raw: BTreeMap<&str, Raw> = BTreeMap::new();
    let mut cells: BTreeMap<(bool, usize), Vec<(u64, Cell)>> = BTreeMap::new();
    let mut out = RunOutcome::default();
    let peek_every = (args.horizon / 10).max(1);
    // The canary's share after the volume harm: its request rate x `volume`.
    let share =
        args.canary_share * s.volume / (args.canary_share * s.volume + 1.0 - args.canary_share);
    let seconds = (args.horizon / args.rate) as u64;
    for i in 1..=args.horizon {
        let r = rng.uniform();
        let mut acc = 0.0;
        let e = ENDPOINTS
            .iter()
            .position(|(_, share, _)| {
                acc += share;
                r < acc
            })
            .unwrap_or(0);
        let (endpoint, _, median) = ENDPOINTS[e];
        let canary = rng.uniform() < share;
        let mut d = s.shape.sample(&mut rng, median);
        if canary && endpoint == "GET /checkout" {
            d *= s.checkout;
        }
        if canary && s.tail > 0.0 && rng.uniform() < s.tail {
            d *= s.tail_factor;
        }
        let outcome = if canary && s.resets > 0.0 && rng.uniform() < s.resets {
            Outcome::Unanswered
        } else if rng.uniform() < BASE_ERROR + if canary { s.errors } else { 0.0 } {
            Outcome::Error
        } else {
            Outcome::Ok
        };
        let error = outcome != Outcome::Ok;
        let g = raw.entry(endpoint).or_default();
        if canary {
            g.canary.push(d);
            g.canary_errors += u64::from(error);
        } else {
            g.baseline.push(d);
            g.baseline_errors += u64::from(error);
        }
        let second = (i / args.rate) as u64;
        let series = cells.entry((canary, e)).or_default();
        if series.last().is_none_or(|(t, _)| *t != second) {
            series.push((second, Cell::default()));
        }
        if let Some((_, cell)) = series.last_mut() {
            cell.add(d as u64, outcome);
        }
        if peek && i % peek_every == 0 && !out.peeked_fail {
            out.peeked_fail = fixed_fails(&raw, config, args.canary_share);
        }
    }
    out.fixed_fail = fixed_fails(&raw, config, args.canary_share);
    // FAIL at any second: the judge keeps each metric's first crossing.
    let v = judge(&snapshot(&cells, seconds + 1), "baseline", "canary", config);
    let first = v
        .metrics
        .iter()
        .filter_map(|m| m.failed_at.map(|at| (at, m.name())))
        .min();
    if let Some((at, name)) = first {
        out.seq_fail = Some(at);
        out.first_metric = Some(name);
    }
    for k in 1..=10u64 {
        let upto = seconds * k / 10;
        if judge(&snapshot(&cells, upto), "baseline", "canary", config).decision == Decision::Pass {
            out.seq_pass = Some(upto);
            break;
        }
    }
    out
}

fn median(mut v: Vec<u64>) -> Option<u64> {
    v.sort_unstable();
    v.get(v.len() / 2).copied()
}

fn row(s: Scenario, runs: usize, args: &Args, seed0: u64, peek: bool) {
    let config = JudgeConfig {
        alpha: args.alpha,
        split: s.split_known.then_some(args.canary_share),
        ..JudgeConfig::default()
    };
    let config = &config;
    // Two threads: the machine's cores, each on half of the runs.
    let outcomes: Vec<RunOutcome> = std::thread::scope(|scope| {
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
    let mut firsts: BTreeMap<&str, usize> = BTreeMap::new();
    for o in &outcomes {
        if let Some(m) = &o.first_metric {
            *firsts.entry(m.as_str()).or_default() += 1;
        }
    }
    let top = firsts
        .iter()
        .max_by_key(|(_, n)| **n)
        .map_or("-".to_string(), |(m, _)| m.to_string());
    let secs = |v: Option<u64>| v.map_or("-".into(), |v| format!("{v}s"));
    let requests = |v: Option<u64>| {
        v.map_or("-".into(), |v| {
            format!("{:.0}k", (v as usize * args.rate) as f64 / 1000.0)
        })
    };
    println!(
        "{:<26} {:<11} {:>5} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:<18}",
        s.name,
        s.shape.name(),
        runs,
        pct(seq_fail),
        secs(to_fail),
        requests(to_fail),
        pct(seq_pass),
        secs(to_pass),
        pct(fixed),
        if peek { pct(peeked) } else { "-".into() },
        if s.harm { top } else { String::new() },
    );
}

fn main() {
    let args = Args::parse();
    let config = JudgeConfig {
        alpha: args.alpha,
        ..JudgeConfig::default()
    };
    let q: Vec<String> = config
        .quantiles
        .iter()
        .map(|q| format!("{} {:.0}%", q.name(), 100.0 * q.tolerance))
        .collect();
    println!(
        "bakeoff verdict bench: seeded simulation; {} requests per run at {} requests/s ({} s), \
         {:.0}% to the canary, 3 endpoints (50/30/20% of traffic), base error rate {:.0}%;\n\
         alpha {} for the whole experiment over {} metrics; tolerances: location {:.0}%, {}, errors x{:.2} \
         (+{:.1} points to pass), volume {:.0}%; {} requests per cohort before a PASS.\n",
        args.horizon,
        args.rate,
        args.horizon / args.rate,
        100.0 * args.canary_share,
        100.0 * BASE_ERROR,
        config.alpha,
        config.metrics(),
        100.0 * config.latency_tolerance,
        q.join(", "),
        1.0 + config.error_ratio_tolerance,
        100.0 * config.error_tolerance,
        100.0 * config.volume_tolerance,
        config.min_requests,
    );
    println!(
        "{:<26} {:<11} {:>5} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>7} {:<18}",
        "scenario",
        "shape",
        "runs",
        "seq_fail",
        "to_fail",
        "(req)",
        "seq_pass",
        "to_pass",
        "fixed",
        "peeked",
        "first failing"
    );
    let wanted = |s: &Scenario| {
        args.only
            .as_ref()
            .is_none_or(|o| s.name.contains(o.as_str()))
    };
    let mut seed = 1_000_000u64;
    for shape in Shape::ALL {
        let s = Scenario { shape, ..A_A };
        if wanted(&s) {
            row(s, args.runs, &args, seed, shape == Shape::LogNormal);
        }
        seed += 1_000_000;
    }
    let learned = Scenario {
        name: "A/A, split learned",
        split_known: false,
        ..A_A
    };
    let harms = [
        Scenario {
            name: "/checkout 10% slower",
            checkout: 1.1,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "/checkout 10% slower",
            shape: Shape::HeavyTail,
            checkout: 1.1,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "tail: 5% of requests x5",
            tail: 0.05,
            tail_factor: 5.0,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "tail: 10% of requests x3",
            shape: Shape::Bimodal,
            tail: 0.10,
            tail_factor: 3.0,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "20% of clients x2 slower",
            tail: 0.20,
            tail_factor: 2.0,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "errors +1 point (1% base)",
            errors: 0.01,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "2% without response",
            resets: 0.02,
            harm: true,
            ..A_A
        },
        Scenario {
            name: "volume -20% vs split",
            volume: 0.8,
            harm: true,
            ..A_A
        },
    ];
    for s in std::iter::once(learned).chain(harms) {
        if wanted(&s) {
            row(
                s,
                if s.harm { args.power_runs } else { args.runs },
                &args,
                seed,
                false,
            );
        }
        seed += 1_000_000;
    }
    println!(
        "\nseq_fail: runs the sequential judge FAILs at some second of the horizon (any metric, as a \
         verdict read after every second would); to_fail: median time (and requests) to that FAIL;\n\
         seq_pass / to_pass: runs judged PASS at a read every 10% of the horizon, median time to it; \
         fixed: the fixed-horizon judge at one look at the horizon; peeked: the same read every 10%.\n\
         A/A rows: seq_fail is the false-fail rate (must stay at most alpha). Harm rows: seq_fail is \
         the power; first failing: the metric that most often failed first."
    );
}

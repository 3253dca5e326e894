//! Per-cohort summary of request events (count, errors, latency quantiles), printed at exit.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use crate::event::RequestEvent;

#[derive(Debug)]
struct CohortSummary {
    requests: u64,
    errors: u64,
    bytes_out: u64,
    latency_us: Histogram<u64>,
}

/// Accumulates events by cohort.
#[derive(Debug, Default)]
pub struct Summary {
    cohorts: BTreeMap<String, CohortSummary>,
}

/// A request counts as an error when it has no response or a 5xx one.
pub fn is_error(e: &RequestEvent) -> bool {
    e.status.is_none_or(|s| s >= 500)
}

impl Summary {
    pub fn add(&mut self, e: &RequestEvent) {
        let c = self
            .cohorts
            .entry(e.cohort.clone())
            .or_insert_with(|| CohortSummary {
                requests: 0,
                errors: 0,
                bytes_out: 0,
                // 1 us .. 1 h, 3 significant digits.
                latency_us: Histogram::new_with_bounds(1, 3_600_000_000, 3)
                    .expect("static histogram bounds are valid"),
            });
        c.requests += 1;
        c.errors += u64::from(is_error(e));
        c.bytes_out += e.bytes_out;
        let us = (e.duration_ns / 1000).clamp(1, 3_600_000_000);
        let _ = c.latency_us.record(us);
    }

    /// A fixed-width table, one row per cohort.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<12} {:>9} {:>8} {:>10} {:>10} {:>10} {:>12}\n",
            "cohort", "requests", "errors", "p50_ms", "p90_ms", "p99_ms", "bytes_out"
        );
        for (name, c) in &self.cohorts {
            let q = |q: f64| c.latency_us.value_at_quantile(q) as f64 / 1000.0;
            s += &format!(
                "{:<12} {:>9} {:>8} {:>10.3} {:>10.3} {:>10.3} {:>12}\n",
                name,
                c.requests,
                c.errors,
                q(0.5),
                q(0.9),
                q(0.99),
                c.bytes_out
            );
        }
        s
    }
}

//! The live judge: the `series` rollup kept current from the store, and verdicts read from it.
//! Shared by the HTTP and gRPC APIs and the configured experiments, so all of them give the same
//! answer for the same question.
//!
//! A task closes each second once the event-time watermark is `lag` past its end (the slowest
//! probe still sending, or the wall clock) and reads its cells from the store (`Store::cells`,
//! aggregated by the store). On start the first read covers everything
//! stored, which rebuilds the state after a restart; with ClickHouse it covers what every
//! collector writing the same database stored.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    query::Filter,
    series::{MAX_DURATION_NS, Rollup, SECOND_NS},
    store::{Store, StoreError},
    verdict::{Decision, JudgeConfig, JudgeConfigError, JudgeOverrides, Verdict, judge},
};

/// Most raw events read for the drill-down of failing metrics (the most recent).
pub const DRILLDOWN_EVENTS: usize = 200_000;

/// Which comparison a verdict request asks for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VerdictRequest {
    pub experiment: String,
    pub baseline: String,
    pub canary: String,
    /// Only requests that started at or after this time (Unix ns), e.g. the rollout's start.
    pub since_unix_ns: Option<u64>,
    pub overrides: JudgeOverrides,
}

#[derive(Debug, thiserror::Error)]
pub enum VerdictError {
    /// No such experiment or cohort: names what exists, since a typo must not look like a
    /// rollout waiting for data.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Config(#[from] JudgeConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Live {
    pub rollup: Arc<Rollup>,
    pub store: Arc<dyn Store>,
    /// How long after a second's end its events are still waited for.
    pub lag: Duration,
    /// Per probe: the latest request end it sent, and when it last sent a batch.
    frontiers: Mutex<HashMap<String, (u64, Instant)>>,
    /// Per probe: batches received and not yet stored or failed. A probe with one is never
    /// idle: its stream may wait for room in the store's queue for longer than `PROBE_IDLE`.
    in_flight: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    /// With no probe of ours sending: the store's latest request end, and since when it is.
    stored_frontier: Mutex<Option<(u64, Instant)>>,
    started: Instant,
}

/// A batch received and not yet stored (see `Live::receiving`).
#[derive(Debug)]
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A probe that sent nothing (batch or health report; health comes every 2 s) for this long no
/// longer holds back closing, unless a batch of it is still on its way into the store.
const PROBE_IDLE: Duration = Duration::from_secs(5);
/// With no probe of ours sending, the wall clock closes seconds once the store's latest request
/// has not moved for this long (time for probes to reconnect after a restart and replay their
/// spools; their backoff is at most 10 s).
const STORE_IDLE: Duration = Duration::from_secs(15);
/// How far behind its report a drained probe's requests may still be (its batches flush every
/// 200 ms at most).
const DRAINED_SLACK_NS: u64 = 1_000_000_000;

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

impl Live {
    pub fn new(store: Arc<dyn Store>, lag: Duration) -> Self {
        Self {
            rollup: Arc::new(Rollup::new()),
            store,
            lag,
            frontiers: Mutex::default(),
            in_flight: Mutex::default(),
            stored_frontier: Mutex::default(),
            started: Instant::now(),
        }
    }

    /// Records what a probe's stored batch reached (called by the ingest).
    pub fn stored(&self, probe: &str, latest_end_ns: u64) {
        if let Ok(mut f) = self.frontiers.lock() {
            let e = f
                .entry(probe.to_string())
                .or_insert((latest_end_ns, Instant::now()));
            e.0 = e.0.max(latest_end_ns);
            e.1 = Instant::now();
        }
    }

    /// A probe's batch was received and is on its way into the store, its earliest request
    /// ending at `earliest_end_ns`: a probe not seen before holds closing back from there until
    /// its batches are stored (the store may commit them a second later), and a probe sending
    /// is not idle even while its acks wait for a group commit.
    /// The returned guard marks the batch in flight until it is dropped (stored, failed or
    /// abandoned with its stream).
    pub fn receiving(&self, probe: &str, earliest_end_ns: u64) -> InFlight {
        if let Ok(mut f) = self.frontiers.lock() {
            let e = f
                .entry(probe.to_string())
                .or_insert((earliest_end_ns, Instant::now()));
            e.1 = Instant::now();
        }
        let count = self
            .in_flight
            .lock()
            .map(|mut m| m.entry(probe.to_string()).or_default().clone())
            .unwrap_or_default();
        count.fetch_add(1, Ordering::Relaxed);
        InFlight(count)
    }

    /// A probe reported nothing queued: it has sent every request that ended before about now.
    pub fn drained(&self, probe: &str) {
        let frontier = now_ns().saturating_sub(DRAINED_SLACK_NS);
        if let Ok(mut f) = self.frontiers.lock() {
            let e = f
                .entry(probe.to_string())
                .or_insert((frontier, Instant::now()));
            e.0 = e.0.max(frontier);
            e.1 = Instant::now();
        }
    }

    /// The time (ns) before which seconds may close: event time, not arrival time, so a probe
    /// replaying its spool after an outage, or a backfill, is judged instead of arriving late.
    /// The slowest of our probes still sending holds it back. With none (a restart, or other
    /// collectors writing the same ClickHouse): the latest request end in the store, and the wall
    /// clock once that has not moved for `STORE_IDLE`, so the last seconds of an experiment
    /// close too. Never past the wall clock.
    fn watermark(&self) -> Result<u64, StoreError> {
        let now = now_ns();
        let busy: Vec<String> = self
            .in_flight
            .lock()
            .map(|m| {
                m.iter()
                    .filter(|(_, n)| n.load(Ordering::Relaxed) > 0)
                    .map(|(p, _)| p.clone())
                    .collect()
            })
            .unwrap_or_default();
        let slowest = self.frontiers.lock().ok().and_then(|mut f| {
            f.retain(|p, (_, seen)| seen.elapsed() < PROBE_IDLE || busy.contains(p));
            f.values().map(|(end, _)| *end).min()
        });
        let frontier = match slowest {
            Some(f) => {
                // The store's idleness is measured afresh next time no probe sends.
                if let Ok(mut seen) = self.stored_frontier.lock() {
                    *seen = None;
                }
                f
            }
            None => {
                let since = self
                    .rollup
                    .closed_before()
                    .saturating_mul(SECOND_NS)
                    .saturating_sub(MAX_DURATION_NS);
                let latest = self.store.latest_end(since)?;
                let mut seen = self
                    .stored_frontier
                    .lock()
                    .map_err(|_| StoreError::Poisoned)?;
                match (latest, *seen) {
                    (Some(l), Some((old, _))) if l == old => {}
                    (Some(l), _) => *seen = Some((l, Instant::now())),
                    (None, _) => {}
                }
                match *seen {
                    Some((_, since)) if since.elapsed() >= STORE_IDLE => now,
                    Some((l, _)) => l,
                    // Nothing stored yet: nothing to close until the store has been idle.
                    None if self.started.elapsed() >= STORE_IDLE => now,
                    None => 0,
                }
            }
        };
        Ok(frontier.min(now).saturating_sub(self.lag.as_nanos() as u64))
    }

    /// Reads every second that is due to close from the store and closes it; returns how many
    /// requests were folded in. Blocking.
    pub fn close_due(&self) -> Result<u64, StoreError> {
        let due = self.watermark()? / SECOND_NS;
        let from = self.rollup.closed_before();
        if due <= from {
            return Ok(0);
        }
        let rows = self.store.cells(
            from.saturating_mul(SECOND_NS),
            due.saturating_mul(SECOND_NS),
        )?;
        self.rollup.fold_cells(&rows);
        self.rollup.close_before(due);
        Ok(rows.iter().map(|r| r.requests).sum())
    }

    /// Keeps the rollup current, forever.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let live = self.clone();
            match tokio::task::spawn_blocking(move || live.close_due()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot read the judge's cells from the store")
                }
                Err(e) => tracing::error!(error = %e, "the judge's reader task failed"),
            }
        }
    }

    /// The verdict for a request, from the rollup (no raw events are read unless a metric fails:
    /// then the most recent `DRILLDOWN_EVENTS` for the drill-down). Blocking.
    pub fn verdict(
        &self,
        base: &JudgeConfig,
        req: &VerdictRequest,
    ) -> Result<Verdict, VerdictError> {
        let config = base.with(&req.overrides)?;
        let Some(mut snapshot) = self.rollup.snapshot(&req.experiment) else {
            return self.not_judged_yet(base, req);
        };
        if [&req.baseline, &req.canary]
            .iter()
            .any(|c| !snapshot.cohorts.contains_key(c.as_str()))
        {
            // Not judged yet, or not there at all: the store tells which.
            return self.not_judged_yet(base, req);
        }
        if let Some(since) = req.since_unix_ns {
            snapshot.from_second = since.div_ceil(SECOND_NS);
        }
        let mut v = judge(&snapshot, &req.baseline, &req.canary, &config);
        if v.metrics
            .iter()
            .any(|m| m.decision == Decision::Fail && m.metric != "volume")
        {
            let rows = self.store.samples(
                &Filter::experiment(&req.experiment, req.since_unix_ns),
                Some(DRILLDOWN_EVENTS),
            )?;
            crate::verdict::attach_drilldown(&mut v, &rows, &req.baseline, &req.canary);
        }
        Ok(v)
    }

    /// An experiment or cohort the rollup does not know: not found (naming what exists), unless
    /// its events are in the store and only waiting for their second to close. Only requests
    /// that can still land in an open second are looked for (everything older is in the
    /// rollup already), so this never scans the experiment's history.
    fn not_judged_yet(
        &self,
        base: &JudgeConfig,
        req: &VerdictRequest,
    ) -> Result<Verdict, VerdictError> {
        let open_since = self
            .rollup
            .closed_before()
            .saturating_mul(SECOND_NS)
            .saturating_sub(MAX_DURATION_NS);
        let stored = self.store.group(
            &Filter::experiment(&req.experiment, Some(open_since)),
            &["cohort".to_string()],
        )?;
        let closed = self
            .rollup
            .known()
            .remove(&req.experiment)
            .unwrap_or_default();
        if stored.is_empty() && closed.is_empty() {
            let known: BTreeMap<String, Vec<String>> = self.rollup.known();
            let list = if known.is_empty() {
                "no experiment has events yet".to_string()
            } else {
                let items: Vec<String> = known
                    .iter()
                    .map(|(e, c)| format!("{e} ({})", c.join(", ")))
                    .collect();
                format!("experiments with events: {}", items.join("; "))
            };
            return Err(VerdictError::NotFound(format!(
                "no events for experiment `{}`; {list}",
                req.experiment
            )));
        }
        let mut cohorts: Vec<String> = stored
            .iter()
            .filter_map(|g| g.key.first().cloned().flatten())
            .chain(closed)
            .collect();
        cohorts.sort();
        cohorts.dedup();
        for cohort in [&req.baseline, &req.canary] {
            if !cohorts.contains(cohort) {
                return Err(VerdictError::NotFound(format!(
                    "experiment `{}` has no cohort `{cohort}`; its cohorts: {}",
                    req.experiment,
                    cohorts.join(", ")
                )));
            }
        }
        let config = base.with(&req.overrides)?;
        let mut v = judge(&Default::default(), &req.baseline, &req.canary, &config);
        v.reasons = vec![format!(
            "events stored, waiting for their first second to close ({:?} after its end)",
            self.lag
        )];
        Ok(v)
    }
}

/// A verdict as the APIs serve it: what was compared, and the verdict.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct VerdictResponse {
    pub experiment: String,
    pub baseline: String,
    pub canary: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::duckdb::DuckDbStore;
    use bakeoff_proto::v1::RequestEvent;

    /// A probe whose batch waits for the store longer than `PROBE_IDLE` (backpressure) still
    /// holds closing back: else its requests would land in seconds already read, neither
    /// judged nor counted late.
    #[test]
    fn a_probe_with_a_batch_in_flight_is_not_idle() {
        let path = std::env::temp_dir().join(format!("bakeoff-live-{}.duckdb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let store = Arc::new(DuckDbStore::open(&path).unwrap());
        let now = now_ns();
        let (t0, t1) = (now - 10 * SECOND_NS, now - 5 * SECOND_NS);
        // Another probe's request, stored: the store's latest end.
        let event = RequestEvent {
            experiment: "e".into(),
            cohort: "c".into(),
            method: "GET".into(),
            path: "/".into(),
            start_unix_ns: t1 - 1_000,
            duration_ns: 1_000,
            ..RequestEvent::default()
        };
        store.append("other", 1, &[event]).unwrap();
        let live = Live::new(store, Duration::from_secs(1));
        live.stored("p", t0);
        let batch = live.receiving("p", t0 + 1);
        std::thread::sleep(PROBE_IDLE + Duration::from_millis(300));
        assert_eq!(
            live.watermark().unwrap(),
            t0 - SECOND_NS,
            "held by the batch in flight"
        );
        drop(batch);
        assert_eq!(
            live.watermark().unwrap(),
            t1 - SECOND_NS,
            "idle without a batch: the store's latest request"
        );
        drop(live);
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("duckdb.wal"));
    }
}

//! The judge's incremental state: per experiment, cohort and endpoint, one cell per second of
//! request *end* time (a request is reported when it ends, so a slow request arrives with its
//! second, not long after it closed) (requests, errors, requests without a response, a latency histogram).
//! Reading a verdict never re-scans raw events: its cost grows with seconds x endpoints, not
//! with requests.
//!
//! A second is *closed* once the wall clock is a lag past its end: the collector then reads
//! that second's cells from the store, aggregated by the store itself (`Store::cells`), once.
//! Reading from the store rather than folding at ingest means several collectors writing one
//! ClickHouse all judge every collector's events, and a restarted collector rebuilds its state
//! with one query. The judge reads closed seconds only, so what it has read never changes
//! afterwards (a later read extends the same e-processes instead of rewriting them). An event
//! arriving for a closed second is counted as late and left out of the judge (it is still
//! stored raw). Closed cells are frozen in shared chunks: a reader clones a few `Arc`s under the
//! lock and judges without holding it, so a verdict read never stalls ingest.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::stats::hist::LogHist;

pub const SECOND_NS: u64 = 1_000_000_000;

/// Requests longer than this are left out of the judge (counted at ingest): a store query for
/// the seconds that just closed only looks this far back in start time.
pub const MAX_DURATION_NS: u64 = 300 * SECOND_NS;

/// Closed cells kept in one shared chunk.
const CHUNK: usize = 64;

/// One second of one cohort's requests to one endpoint.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Cell {
    pub requests: u64,
    /// Requests without a response, or with a 5xx status, or a non-zero gRPC status.
    pub errors: u64,
    /// Requests that got no response at all (reset, closed mid-request), also in `errors`.
    pub unanswered: u64,
    pub latency: LogHist,
}

impl Cell {
    /// A request without a response has no latency (its duration is when the connection
    /// closed, often 0): it counts as an error only, so failing fast never looks fast.
    pub fn add(&mut self, duration_ns: u64, outcome: Outcome) {
        self.requests += 1;
        self.errors += u64::from(outcome != Outcome::Ok);
        if outcome == Outcome::Unanswered {
            self.unanswered += 1;
        } else {
            self.latency.record(duration_ns);
        }
    }

    pub fn merge(&mut self, other: &Cell) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.unanswered += other.unanswered;
        self.latency.merge(&other.latency);
    }
}

/// How a request ended, as the judge counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Error,
    Unanswered,
}

impl Outcome {
    /// `error`: the probe reported one (no response, a reset, a SQL error); a request with
    /// neither status nor error is a success of a protocol without statuses (Postgres).
    pub fn of(
        status: Option<u32>,
        grpc_status: Option<i32>,
        error: bool,
        duration_ns: u64,
    ) -> Self {
        match status {
            None if error && duration_ns == 0 => Outcome::Unanswered,
            None if error => Outcome::Error,
            Some(s) if s >= 500 => Outcome::Error,
            _ if error || grpc_status.is_some_and(|g| g != 0) => Outcome::Error,
            _ => Outcome::Ok,
        }
    }
}

/// `METHOD path` with the query string left out (routes are low-cardinality, queries are not).
pub fn endpoint(method: &str, route_or_path: &str) -> String {
    let path = route_or_path
        .split_once('?')
        .map_or(route_or_path, |(p, _)| p);
    format!("{method} {path}")
}

/// The closed cells of one (cohort, endpoint), oldest first.
pub type Cells = Vec<Arc<Vec<(u64, Cell)>>>;

/// Cells of one (cohort, endpoint).
#[derive(Clone, Debug, Default)]
struct Series {
    frozen: Cells,
    tail: Vec<(u64, Cell)>,
    open: BTreeMap<u64, Cell>,
}

impl Series {
    fn close_before(&mut self, second: u64) {
        while let Some(entry) = self.open.first_entry() {
            if *entry.key() >= second {
                break;
            }
            let (s, c) = entry.remove_entry();
            self.tail.push((s, c));
            if self.tail.len() >= CHUNK {
                self.frozen.push(Arc::new(std::mem::take(&mut self.tail)));
            }
        }
    }

    fn closed(&self) -> Cells {
        let mut v = self.frozen.clone();
        if !self.tail.is_empty() {
            v.push(Arc::new(self.tail.clone()));
        }
        v
    }
}

/// One experiment's cells.
#[derive(Debug, Default)]
struct ExperimentCells {
    series: BTreeMap<(String, String), Series>,
    /// Seconds before this one are closed.
    closed_before: u64,
}

impl ExperimentCells {
    fn close_before(&mut self, second: u64) {
        if second <= self.closed_before {
            return;
        }
        self.closed_before = second;
        for s in self.series.values_mut() {
            s.close_before(second);
        }
    }
}

/// What the judge reads of one experiment: closed cells per cohort and endpoint.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// cohort -> endpoint -> cells.
    pub cohorts: BTreeMap<String, BTreeMap<String, Cells>>,
    /// Seconds before this one are left out (a verdict `since` the rollout's start).
    pub from_second: u64,
}

impl Snapshot {
    /// A snapshot of requests given directly (tests, the bench, offline judging), every
    /// second closed.
    pub fn from_requests<'a>(
        requests: impl IntoIterator<Item = (&'a str, String, u64, u64, Outcome)>,
    ) -> Self {
        let cells = Rollup::new();
        for (cohort, endpoint, start_ns, duration_ns, outcome) in requests {
            cells.fold_one("", cohort, &endpoint, start_ns, duration_ns, outcome);
        }
        cells.close_before(u64::MAX);
        cells.snapshot("").unwrap_or_default()
    }

    pub fn requests(&self, cohort: &str) -> u64 {
        self.cohorts.get(cohort).map_or(0, |eps| {
            eps.values()
                .flat_map(|c| c.iter())
                .flat_map(|chunk| chunk.iter())
                .map(|(_, c)| c.requests)
                .sum()
        })
    }
}

/// Cells of every experiment.
#[derive(Debug, Default)]
pub struct Rollup {
    experiments: Mutex<HashMap<String, Arc<Mutex<ExperimentCells>>>>,
    /// Seconds before this one are closed (read from the store, final).
    closed_before: AtomicU64,
    /// Requests folded in.
    pub folded: AtomicU64,
}

impl Rollup {
    pub fn new() -> Self {
        Self::default()
    }

    fn experiment(&self, name: &str) -> Option<Arc<Mutex<ExperimentCells>>> {
        let mut m = self.experiments.lock().ok()?;
        Some(m.entry(name.to_string()).or_default().clone())
    }

    /// Seconds before this one are closed: an event that starts earlier and arrives now is late.
    pub fn closed_before(&self) -> u64 {
        self.closed_before.load(Ordering::Relaxed)
    }

    /// Adds one request to its (open) second.
    pub fn fold_one(
        &self,
        experiment: &str,
        cohort: &str,
        endpoint: &str,
        start_ns: u64,
        duration_ns: u64,
        outcome: Outcome,
    ) {
        let end_ns = start_ns.saturating_add(duration_ns);
        let Some(e) = self.experiment(experiment) else {
            return;
        };
        let Ok(mut e) = e.lock() else { return };
        e.series
            .entry((cohort.to_string(), endpoint.to_string()))
            .or_default()
            .open
            .entry(end_ns / SECOND_NS)
            .or_default()
            .add(duration_ns, outcome);
        self.folded.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds pre-aggregated cells (read from the store: one row per latency bucket). The rows of
    /// one cell that come one after the other are added with one lookup.
    pub fn fold_cells(&self, rows: &[CellRow]) {
        let same_cell = |a: &CellRow, b: &CellRow| {
            a.second == b.second
                && a.endpoint == b.endpoint
                && a.cohort == b.cohort
                && a.experiment == b.experiment
        };
        for cell_rows in rows.chunk_by(same_cell) {
            let Some(r) = cell_rows.first() else { continue };
            let Some(e) = self.experiment(&r.experiment) else {
                continue;
            };
            let Ok(mut e) = e.lock() else { continue };
            let cell = e
                .series
                .entry((r.cohort.to_string(), r.endpoint.to_string()))
                .or_default()
                .open
                .entry(r.second)
                .or_default();
            for r in cell_rows {
                cell.requests += r.requests;
                cell.errors += r.errors;
                cell.unanswered += r.unanswered;
                // The store puts unanswered requests in a bucket of their own (`NO_LATENCY`).
                cell.latency
                    .add_bucket(r.bucket, r.requests.saturating_sub(r.unanswered));
                self.folded.fetch_add(r.requests, Ordering::Relaxed);
            }
        }
    }

    /// Closes every second before `second`, in every experiment.
    pub fn close_before(&self, second: u64) {
        self.closed_before.fetch_max(second, Ordering::Relaxed);
        let Ok(m) = self.experiments.lock() else {
            return;
        };
        for e in m.values() {
            if let Ok(mut e) = e.lock() {
                e.close_before(second);
            }
        }
    }

    /// The closed cells of an experiment (None when it has none).
    pub fn snapshot(&self, experiment: &str) -> Option<Snapshot> {
        let e = self.experiments.lock().ok()?.get(experiment)?.clone();
        let e = e.lock().ok()?;
        let mut snap = Snapshot::default();
        for ((cohort, endpoint), s) in &e.series {
            let cells = s.closed();
            if cells.is_empty() {
                continue;
            }
            snap.cohorts
                .entry(cohort.clone())
                .or_default()
                .insert(endpoint.clone(), cells);
        }
        (!snap.cohorts.is_empty()).then_some(snap)
    }

    /// Experiments and their cohorts with closed cells, for "no such experiment" errors.
    pub fn known(&self) -> BTreeMap<String, Vec<String>> {
        let Ok(m) = self.experiments.lock() else {
            return BTreeMap::new();
        };
        m.iter()
            .filter_map(|(name, e)| {
                let e = e.lock().ok()?;
                let mut cohorts: Vec<String> = e
                    .series
                    .iter()
                    .filter(|(_, s)| !s.frozen.is_empty() || !s.tail.is_empty())
                    .map(|((c, _), _)| c.clone())
                    .collect();
                cohorts.dedup();
                (!cohorts.is_empty()).then(|| (name.clone(), cohorts))
            })
            .collect()
    }
}

/// The bucket the store gives requests without a response (they have no latency).
pub const NO_LATENCY: i32 = i32::MIN;

/// One row of a rebuild from the store: requests of one latency bucket in one cell. The names
/// are shared by the rows of one cell (a cell has a row per bucket).
#[derive(Clone, Debug, PartialEq)]
pub struct CellRow {
    pub experiment: Arc<str>,
    pub cohort: Arc<str>,
    pub endpoint: Arc<str>,
    pub second: u64,
    pub bucket: i32,
    pub requests: u64,
    pub errors: u64,
    pub unanswered: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_closed_seconds_are_read() {
        let r = Rollup::new();
        let s = SECOND_NS;
        r.fold_one("e", "canary", "GET /", 10 * s, 5, Outcome::Ok);
        r.fold_one("e", "canary", "GET /", 11 * s, 5, Outcome::Unanswered);
        assert!(r.snapshot("e").is_none());
        r.close_before(11);
        assert_eq!(r.closed_before(), 11);
        let snap = r.snapshot("e").unwrap();
        let cells = &snap.cohorts["canary"]["GET /"];
        let all: Vec<u64> = cells
            .iter()
            .flat_map(|c| c.iter().map(|(s, _)| *s))
            .collect();
        assert_eq!(all, vec![10]);
        r.close_before(u64::MAX);
        let snap = r.snapshot("e").unwrap();
        assert_eq!(snap.requests("canary"), 2);
        let cell11 = &snap.cohorts["canary"]["GET /"]
            .last()
            .unwrap()
            .last()
            .unwrap()
            .1;
        assert_eq!((cell11.errors, cell11.unanswered), (1, 1));
        assert!(r.snapshot("nope").is_none());
        assert_eq!(r.known()["e"], vec!["canary".to_string()]);
    }

    #[test]
    fn rebuilt_cells_equal_folded_requests() {
        let (a, b) = (Rollup::new(), Rollup::new());
        let mut rows = Vec::new();
        for i in 0..500u64 {
            let d = 1_000 + i * 37;
            let outcome = if i % 50 == 0 {
                Outcome::Error
            } else {
                Outcome::Ok
            };
            a.fold_one("e", "b", "GET /x", i * 10_000_000, d, outcome);
            rows.push(CellRow {
                experiment: "e".into(),
                cohort: "b".into(),
                endpoint: "GET /x".into(),
                second: i * 10_000_000 / SECOND_NS,
                bucket: crate::stats::hist::bucket_of(d),
                requests: 1,
                errors: u64::from(outcome != Outcome::Ok),
                unanswered: 0,
            });
        }
        b.fold_cells(&rows);
        a.close_before(u64::MAX);
        b.close_before(u64::MAX);
        let (sa, sb) = (a.snapshot("e").unwrap(), b.snapshot("e").unwrap());
        let flat = |s: &Snapshot| -> Vec<(u64, Cell)> {
            s.cohorts["b"]["GET /x"]
                .iter()
                .flat_map(|c| c.iter().cloned())
                .collect()
        };
        assert_eq!(flat(&sa), flat(&sb));
        assert_eq!(flat(&sa).len(), 5);
    }

    #[test]
    fn chunks_freeze_and_snapshots_see_every_closed_second() {
        let r = Rollup::new();
        for sec in 0..200u64 {
            r.fold_one("e", "b", "GET /x", sec * SECOND_NS, 1000, Outcome::Ok);
        }
        r.close_before(1000);
        let snap = r.snapshot("e").unwrap();
        let cells = &snap.cohorts["b"]["GET /x"];
        assert!(cells.len() >= 3);
        let seconds: Vec<u64> = cells
            .iter()
            .flat_map(|c| c.iter().map(|(s, _)| *s))
            .collect();
        assert_eq!(seconds, (0..200).collect::<Vec<_>>());
    }

    #[test]
    fn outcomes() {
        assert_eq!(Outcome::of(None, None, true, 0), Outcome::Unanswered);
        assert_eq!(Outcome::of(Some(503), None, false, 5), Outcome::Error);
        assert_eq!(Outcome::of(Some(200), Some(14), false, 5), Outcome::Error);
        assert_eq!(Outcome::of(Some(404), None, false, 5), Outcome::Ok);
        // Postgres: no status; a SQL error has a latency, a success has neither.
        assert_eq!(Outcome::of(None, None, true, 5), Outcome::Error);
        assert_eq!(Outcome::of(None, None, false, 5), Outcome::Ok);
        // HTTP/2: a RST_STREAM after the response headers.
        assert_eq!(Outcome::of(Some(200), None, true, 5), Outcome::Error);
        assert_eq!(endpoint("GET", "/a?b=c"), "GET /a");
    }
}

//! The judge's cells of what a DuckDB store committed since it was opened, folded as batches are
//! committed: the judge then reads each newly closed second from memory instead of scanning and
//! grouping its events again in DuckDB (a quarter of the collector's CPU at full ingest rate).
//!
//! Each batch is folded into cells where it is encoded (the ingest's threads, `BatchCells`); the
//! writer adds them to the store's `Fold` once their transaction has committed, before anyone
//! hears the batch is stored, so the fold never holds less, nor more, than the table. A range
//! the fold does not hold completely (events stored before the store was opened, or a range read
//! before) is read from the table instead: the answer is the same either way.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use bakeoff_proto::v1::RequestEvent;

use crate::{
    series::{CellRow, MAX_DURATION_NS, NO_LATENCY, SECOND_NS, endpoint},
    stats::hist::bucket_of,
    store::CONNECTION_PROTOCOLS,
};

type Hasher = foldhash::fast::RandomState;

/// Requests of one latency bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Counts {
    requests: u64,
    errors: u64,
    unanswered: u64,
}

impl Counts {
    fn add(&mut self, other: Counts) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.unanswered += other.unanswered;
    }
}

/// Where a cell's requests come from: their source (experiment, cohort, ...) and endpoint.
type GroupKey = (u32, String);
/// Requests per latency bucket, in the order the buckets came.
type Buckets = Vec<(i32, Counts)>;
/// A source's experiment and cohort.
type Names = (Arc<str>, Arc<str>);

/// The cells of one batch: per (second, source, endpoint), requests per latency bucket.
#[derive(Debug, Default)]
pub(super) struct BatchCells(Vec<(u64, GroupKey, Buckets)>);

impl BatchCells {
    /// Folds one batch; `sources[i]` is the source id of `events[i]`. The same rules as the
    /// table's cell query (`DuckDbStore::cells`): requests longer than `MAX_DURATION_NS` and
    /// connection-level events left out, unanswered requests in the `NO_LATENCY` bucket.
    pub(super) fn of(sources: &[u32], events: &[RequestEvent]) -> Self {
        let mut groups: HashMap<(u64, u32, &str, &str), Buckets, Hasher> = HashMap::default();
        for (e, &source) in events.iter().zip(sources) {
            if e.duration_ns > MAX_DURATION_NS
                || CONNECTION_PROTOCOLS.contains(&e.protocol.as_str())
            {
                continue;
            }
            let second = e.start_unix_ns.saturating_add(e.duration_ns) / SECOND_NS;
            let route_or_path = if e.route.is_empty() {
                &e.path
            } else {
                &e.route
            };
            let error = !e.error.is_empty();
            let unanswered = e.status.is_none() && error && e.duration_ns == 0;
            let errored = error
                || e.status.is_some_and(|s| s >= 500)
                || e.grpc_status.is_some_and(|g| g != 0);
            let bucket = if unanswered {
                NO_LATENCY
            } else {
                bucket_of(e.duration_ns)
            };
            let counts = Counts {
                requests: 1,
                errors: u64::from(errored),
                unanswered: u64::from(unanswered),
            };
            let buckets = groups
                .entry((second, source, &e.method, route_or_path))
                .or_default();
            match buckets.iter_mut().find(|(b, _)| *b == bucket) {
                Some((_, c)) => c.add(counts),
                None => buckets.push((bucket, counts)),
            }
        }
        Self(
            groups
                .into_iter()
                .map(|((second, source, method, path), buckets)| {
                    (second, (source, endpoint(method, path)), buckets)
                })
                .collect(),
        )
    }
}

/// Cells of one second: per (source, endpoint), requests per latency bucket.
type Second = HashMap<GroupKey, HashMap<i32, Counts, Hasher>, Hasher>;

/// Most (second, source, endpoint, bucket) cells held; beyond, the fold is given up up to the
/// latest second it has seen (those seconds are read from the table) and starts again after it.
/// Only a judge that stops reading, or events far in the future, get there.
const MAX_CELLS: usize = 4_000_000;

/// Cells of the batches committed since the store was opened, for the seconds not read yet.
#[derive(Debug)]
pub(super) struct Fold {
    /// Every stored request that ends in this second or later was committed since the store was
    /// opened and is in `seconds` (until the judge reads its second).
    floor: u64,
    seconds: BTreeMap<u64, Second>,
    cells: usize,
    /// The latest second folded (where the fold starts again if it is given up).
    latest: u64,
}

impl Fold {
    /// `latest_end_ns`: the latest request end stored when the store was opened.
    pub(super) fn new(latest_end_ns: Option<u64>) -> Self {
        let floor = latest_end_ns.map_or(0, |end| end / SECOND_NS + 1);
        Self {
            floor,
            seconds: BTreeMap::new(),
            cells: 0,
            latest: floor,
        }
    }

    /// Adds a committed batch's cells.
    pub(super) fn add(&mut self, batch: BatchCells) {
        for (second, key, buckets) in batch.0 {
            if second < self.floor {
                // Its second was read already (a late request), or is read from the table.
                continue;
            }
            self.latest = self.latest.max(second);
            let group = self
                .seconds
                .entry(second)
                .or_default()
                .entry(key)
                .or_default();
            for (bucket, counts) in buckets {
                let cell = group.entry(bucket).or_insert_with(|| {
                    self.cells += 1;
                    Counts::default()
                });
                cell.add(counts);
            }
        }
        if self.cells > MAX_CELLS {
            tracing::warn!(
                cells = self.cells,
                "the judge's cells folded at ingest exceed their bound: seconds up to the \
                 latest one stored are read from the table"
            );
            self.forget_before(self.latest.saturating_add(1));
        }
    }

    /// Seconds `[from, to)` (Unix seconds) with `source(id)` giving a source's experiment and
    /// cohort, taken out of the fold; `None` when the fold does not hold that range completely
    /// (then it is read from the table). Seconds before `to` are never answered from the fold
    /// again: the judge reads each second once, in order.
    pub(super) fn take(
        &mut self,
        from: u64,
        to: u64,
        source: impl Fn(u32) -> Option<(String, String)>,
    ) -> Option<Vec<CellRow>> {
        let held = from >= self.floor;
        let rest = self.seconds.split_off(&to);
        let taken = std::mem::replace(&mut self.seconds, rest);
        self.floor = self.floor.max(to);
        let mut rows = Vec::new();
        let mut names: HashMap<u32, Option<Names>, Hasher> = HashMap::default();
        let mut complete = true;
        for (second, groups) in taken {
            for ((id, endpoint), buckets) in groups {
                self.cells = self.cells.saturating_sub(buckets.len());
                if !held || second < from {
                    continue;
                }
                let Some((experiment, cohort)) = names
                    .entry(id)
                    .or_insert_with(|| source(id).map(|(e, c)| (e.into(), c.into())))
                else {
                    // Every committed source is known; were one missing, the table answers.
                    complete = false;
                    continue;
                };
                let endpoint: Arc<str> = endpoint.into();
                rows.extend(buckets.into_iter().map(|(bucket, c)| CellRow {
                    experiment: experiment.clone(),
                    cohort: cohort.clone(),
                    endpoint: endpoint.clone(),
                    second,
                    bucket,
                    requests: c.requests,
                    errors: c.errors,
                    unanswered: c.unanswered,
                }));
            }
        }
        (held && complete).then_some(rows)
    }

    #[cfg(test)]
    pub(super) fn is_empty(&self) -> bool {
        self.seconds.is_empty() && self.cells == 0
    }

    /// Forgets the seconds before `second`: from then on they are read from the table (events
    /// deleted from it, or the fold given up).
    pub(super) fn forget_before(&mut self, second: u64) {
        let rest = self.seconds.split_off(&second);
        for groups in std::mem::replace(&mut self.seconds, rest).into_values() {
            self.cells = self
                .cells
                .saturating_sub(groups.values().map(HashMap::len).sum());
        }
        self.floor = self.floor.max(second);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_protocols_match_their_sql() {
        let listed: Vec<String> = CONNECTION_PROTOCOLS
            .iter()
            .map(|p| format!("'{p}'"))
            .collect();
        assert_eq!(
            crate::store::CONNECTION_PROTOCOLS_SQL,
            format!("({})", listed.join(", "))
        );
    }

    #[test]
    fn given_up_seconds_are_left_to_the_table() {
        let events: Vec<RequestEvent> = (0..10u64)
            .map(|i| RequestEvent {
                method: "GET".into(),
                path: "/".into(),
                status: Some(200),
                start_unix_ns: i * SECOND_NS,
                duration_ns: 1_000,
                ..RequestEvent::default()
            })
            .collect();
        let mut fold = Fold::new(None);
        fold.add(BatchCells::of(&[0; 10], &events));
        let name = |_| Some(("e".to_string(), "c".to_string()));
        let rows = fold.take(0, 5, name).unwrap();
        assert_eq!(rows.iter().map(|r| r.requests).sum::<u64>(), 5);
        fold.forget_before(8);
        assert_eq!(
            fold.take(5, 8, name),
            None,
            "forgotten: read from the table"
        );
        assert_eq!(fold.take(8, 10, name).unwrap().len(), 2);
        assert_eq!(fold.take(3, 10, name), None, "read already: from the table");
        assert!(fold.is_empty());
    }
}

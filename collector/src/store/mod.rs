//! Raw event storage. One trait, so the ingest and the API do not care which backend holds
//! the events.

pub mod clickhouse;
#[cfg(test)]
mod conformance;
pub mod duckdb;
mod fold;

use bakeoff_proto::v1::RequestEvent;

use crate::{
    query::{Filter, GroupRow, QueryError},
    series::CellRow,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("DuckDB: {0}")]
    DuckDb(#[from] ::duckdb::Error),
    #[error("ClickHouse: {0}")]
    ClickHouse(String),
    #[error(transparent)]
    Query(#[from] QueryError),
    #[error("storage lock poisoned by an earlier panic")]
    Poisoned,
    /// A batch the store cannot hold as it is (e.g. a status beyond INTEGER).
    #[error("invalid batch: {0}")]
    Invalid(String),
    #[error("the storage writer stopped")]
    WriterStopped,
    /// A database file this version cannot use as it is.
    #[error("{0}")]
    Layout(String),
}

/// The outcome of a batch handed to `Store::submit`: a future that resolves once the batch and
/// its sequence are durable (or failed).
pub struct Pending(PendingInner);

enum PendingInner {
    Ready(Option<Result<(), StoreError>>),
    Waiting(tokio::sync::oneshot::Receiver<Result<(), StoreError>>),
}

impl Pending {
    pub fn ready(outcome: Result<(), StoreError>) -> Self {
        Self(PendingInner::Ready(Some(outcome)))
    }

    pub(crate) fn waiting(rx: tokio::sync::oneshot::Receiver<Result<(), StoreError>>) -> Self {
        Self(PendingInner::Waiting(rx))
    }

    /// Blocks until the outcome is known; not from an async context.
    pub fn wait(self) -> Result<(), StoreError> {
        match self.0 {
            PendingInner::Ready(r) => r.unwrap_or(Err(StoreError::WriterStopped)),
            PendingInner::Waiting(rx) => {
                rx.blocking_recv().unwrap_or(Err(StoreError::WriterStopped))
            }
        }
    }
}

impl std::future::Future for Pending {
    type Output = Result<(), StoreError>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match &mut self.0 {
            PendingInner::Ready(r) => {
                std::task::Poll::Ready(r.take().unwrap_or(Err(StoreError::WriterStopped)))
            }
            PendingInner::Waiting(rx) => std::pin::Pin::new(rx)
                .poll(cx)
                .map(|r| r.unwrap_or(Err(StoreError::WriterStopped))),
        }
    }
}

/// Columns returned for raw events, in this order, by every backend.
pub const EVENT_COLUMNS: &[&str] = &[
    "probe_id",
    "experiment",
    "cohort",
    "node",
    "pod",
    "container",
    "pid",
    "exe",
    "role",
    "protocol",
    "method",
    "route",
    "path",
    "status",
    "grpc_status",
    "error",
    "start_unix_ns",
    "duration_ns",
    "bytes_in",
    "bytes_out",
    "peer",
    "request_id",
    "traceparent",
    "attributes",
];

/// An empty string is stored as NULL, so "not known" reads the same in every backend.
pub(crate) fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// A stored event as queries return it.
pub type StoredEvent = serde_json::Map<String, serde_json::Value>;

pub trait Store: Send + Sync + 'static {
    /// Highest batch sequence stored for a probe (0 if none).
    fn last_sequence(&self, probe_id: &str) -> Result<u64, StoreError>;
    /// Stores a batch and its sequence atomically: after a crash either both are there or
    /// neither, so a resent batch is stored exactly once.
    fn append(
        &self,
        probe_id: &str,
        sequence: u64,
        events: &[RequestEvent],
    ) -> Result<(), StoreError>;
    /// Hands a batch to the store without waiting for it to be durable; the returned `Pending`
    /// resolves when it is (same guarantee as `append`). Batches of one probe submitted one after
    /// the other are stored in that order, and once one fails, the later ones of its probe fail
    /// too until one at or below the failed sequence (a resend) comes: a stored sequence always
    /// covers every batch before it. Blocking (encodes the batch, and waits while the store's
    /// queue is full). By default the batch is stored before this returns.
    fn submit(
        &self,
        probe_id: &str,
        sequence: u64,
        events: &[RequestEvent],
    ) -> Result<Pending, StoreError> {
        Ok(Pending::ready(self.append(probe_id, sequence, events)))
    }
    /// Raw events matching `filter`, newest first.
    fn events(&self, filter: &Filter, limit: usize) -> Result<Vec<StoredEvent>, StoreError>;
    /// Group-by `by` with counts, errors and latency quantiles, largest groups first.
    fn group(&self, filter: &Filter, by: &[String]) -> Result<Vec<GroupRow>, StoreError>;
    /// Deletes events that started before `unix_ns`; returns how many.
    fn delete_before(&self, unix_ns: u64) -> Result<u64, StoreError>;
    /// What the drill-down and the report need of each request matching `filter`, oldest
    /// first; at most the `limit` most recent.
    fn samples(&self, filter: &Filter, limit: Option<usize>) -> Result<Vec<SampleRow>, StoreError>;
    /// The judge's cells (`series`) of the requests that ended in `[from_ns, to_ns)` and took
    /// at most `series::MAX_DURATION_NS`, every experiment, aggregated by the store: one row per
    /// (experiment, cohort, endpoint, second of the end, latency bucket).
    fn cells(&self, from_ns: u64, to_ns: u64) -> Result<Vec<CellRow>, StoreError>;
    /// The latest request end stored among requests that started at or after `since_ns`
    /// (what every collector writing this store has received so far).
    fn latest_end(&self, since_ns: u64) -> Result<Option<u64>, StoreError>;
}

/// Protocols of connection events (a connection no decoder understood, reported whole):
/// stored and queryable, never judged (their duration is a connection's life, not a request's).
pub(crate) const CONNECTION_PROTOCOLS: [&str; 2] = ["tcp", "tls"];
/// `CONNECTION_PROTOCOLS` as an SQL list.
pub(crate) const CONNECTION_PROTOCOLS_SQL: &str = "('tcp', 'tls')";

/// Errors as the judge counts them (`series::Outcome`), valid SQL for both backends: an error
/// reported by the probe (no response, a reset, a SQL error), a 5xx, a non-zero gRPC status.
/// Protocols without a status (Postgres) succeed with neither.
pub(crate) const ERROR_SQL: &str =
    "error IS NOT NULL OR status >= 500 OR (grpc_status IS NOT NULL AND grpc_status <> 0)";

/// Requests that got no response at all (no latency to judge), valid SQL for both backends.
pub(crate) const UNANSWERED_SQL: &str = "status IS NULL AND error IS NOT NULL AND duration_ns = 0";

/// One request as the verdict reads it.
#[derive(Clone, Debug, PartialEq, serde::Deserialize)]
pub struct SampleRow {
    pub cohort: String,
    pub method: String,
    /// Route template when known, else the path.
    #[serde(rename = "sample_path")]
    pub path: String,
    pub start_unix_ns: u64,
    pub duration_ns: u64,
    pub status: Option<i64>,
    #[serde(default)]
    pub grpc_status: Option<i32>,
    #[serde(default)]
    pub error: Option<String>,
    /// Drill-down dimensions.
    pub peer: Option<String>,
    pub node: Option<String>,
    pub pod: Option<String>,
    pub exe: Option<String>,
    /// Free-form attributes as a JSON object (e.g. `user_agent`).
    pub attributes: Option<String>,
}

impl SampleRow {
    /// `METHOD path` with the query string left out (routes are low-cardinality, queries not).
    pub fn endpoint(&self) -> String {
        crate::series::endpoint(&self.method, &self.path)
    }

    /// How the judge counts this request.
    pub fn outcome(&self) -> crate::series::Outcome {
        crate::series::Outcome::of(
            self.status.map(|s| s.clamp(0, i64::from(u32::MAX)) as u32),
            self.grpc_status,
            self.error.is_some(),
            self.duration_ns,
        )
    }
}

/// Columns of `SampleRow`, in order, valid SQL for both backends.
pub(crate) const SAMPLE_COLUMNS: &str = "cohort, method, coalesce(route, path) AS sample_path, start_unix_ns, duration_ns, status, \
     grpc_status, error, peer, node, pod, exe, attributes";

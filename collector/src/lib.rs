//! bakeoff's collector. Data moves one way: `ingest` (gRPC from probes) -> `store` (raw events,
//! DuckDB) -> `query` (read-time filters and group-bys) -> `api` (HTTP JSON) and the CLI.

pub mod api;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod stats;
pub mod store;
pub mod verdict;

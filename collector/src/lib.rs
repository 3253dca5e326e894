//! bakeoff's collector. Data moves one way: `ingest` (gRPC from probes) -> `store` (raw events,
//! DuckDB or ClickHouse) -> `query` (read-time filters and group-bys), `stats` (pure statistics)
//! -> `drilldown` -> `verdict` -> `report` (HTML) -> `api` (HTTP JSON, gRPC) and the CLI.

pub mod api;
pub mod drilldown;
pub mod experiments;
pub mod ingest;
pub mod metrics;
pub mod query;
pub mod report;
pub mod stats;
pub mod store;
pub mod verdict;

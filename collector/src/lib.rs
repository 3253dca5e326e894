//! bakeoff's collector. Data moves one way: `ingest` (gRPC from probes) -> `store` (raw events,
//! DuckDB or ClickHouse) -> `query` (read-time filters and group-bys) and `series` (the judge's
//! per-second cells, read from the store by `live`), `stats` (pure statistics) -> `drilldown`
//! -> `verdict` -> `report` (HTML) -> `api` (HTTP JSON, gRPC) and the CLI.

pub mod api;
pub mod audit;
pub mod capture;
pub mod drilldown;
pub mod experiments;
pub mod ingest;
pub mod live;
pub mod metrics;
pub mod query;
pub mod replay;
pub mod report;
pub mod series;
pub mod stats;
pub mod store;
pub mod verdict;

//! Test kit shared by the integration tests, the demo and the benchmarks: a blocking HTTP/1.1
//! client that counts exact bytes, cgroup v2 helpers, and process helpers for the probe and
//! servers. Everything talks to loopback only and every loop is bounded.

pub mod cgroup;
pub mod clickhouse;
pub mod client;
pub mod collector;
pub mod kubeapi;
pub mod metrics;
pub mod netns;
pub mod otlp;
pub mod postgres;
pub mod probe;
pub mod process;
pub mod tls;
pub mod webhook;

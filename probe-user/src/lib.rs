//! bakeoff-probe: the node agent. Data moves one way through these modules:
//! `kernel` (load, attach, ring buffer) -> `conn` (per-connection state) -> `stream` (each
//! direction's ordered bytes, TCP reassembly) -> `protocol` (framing, pairing) -> `event`
//! (request events) -> `output`.
//! `cohort` decides which processes are watched; `config` reads the rules.

pub mod clock;
pub mod cohort;
pub mod config;
pub mod conn;
pub mod event;
pub mod export;
pub mod kernel;
pub mod kubernetes;
pub mod metrics;
pub mod output;
pub mod pipeline;
pub mod preflight;
pub mod recording;
pub mod remote_capture;
pub mod summary;
pub mod tls;

/// The decoders live in their own crate (`probe-protocol`) so they build, fuzz and benchmark
/// without the kernel programs; re-exported under their old paths.
pub use bakeoff_protocol::{self as protocol, stream};

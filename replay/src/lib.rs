//! Replaying a capture: its recorded HTTP/1 sessions (one per captured connection) sent again to
//! a target, each on a connection of its own, requests in their recorded order; sessions run
//! concurrently up to a limit, each as fast as its responses allow or (open loop) at its
//! recorded arrival times, scaled. Every response is read
//! completely and measured: status, latency (last request byte written to last response byte
//! read), and hashes of its headers and body after declared noise is left out or masked
//! (`noise`).
//!
//! Safety valves: only the given target is ever contacted; requests with methods that change
//! state (`POST`, `PUT`, `PATCH`, `DELETE`) are skipped and counted unless writes are allowed;
//! every read and write has a timeout.
//!
//! Postgres sessions (`postgres`) are replayed the same way, unit by unit (a simple Query, or
//! an extended-protocol group up to its Sync), with statements that may change data refused
//! unless writes are allowed, and compared per normalized query.

pub mod http;
pub mod noise;
pub mod postgres;
pub mod response;
pub mod session;

pub use http::{Outcome, ReplayOptions, Replayed, Timing, replay, replay_each, send};
pub use noise::{Noise, NoiseRules};
pub use session::{Request, Session, sessions};

/// Why a replay could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("capture: {0}")]
    Capture(#[from] bakeoff_capture::CaptureError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

//! The one interface between kernel records and protocol decoders: per connection and
//! direction, an ordered byte stream with exact lengths, captured prefixes and gaps.
//!
//! Two kernel paths produce it:
//! - syscall path (tracepoints on the read/write families): one piece per syscall, in the
//!   order the process moved the bytes; `ts` is the syscall's exit (request bytes: when the
//!   server read them; response bytes: when it finished writing them). A lost record is a
//!   `Gap` of unknown size.
//! - cgroup path (`cgroup_skb` on the cohort's cgroups): one piece per TCP segment, put in order
//!   by sequence number (`tcp`); `ts` is packet time (request bytes: when they reached the
//!   socket; response bytes: when they left it). Holes never filled are `Gap`s of known size.
//!
//! Either way an exchange lasts from its first request byte in to its last response byte out.

pub mod tcp;

/// One piece of a connection's byte stream in one direction, in stream order. What every
/// protocol decoder consumes, whichever kernel path the bytes came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece<'a> {
    /// `len` bytes moved (exact), of which the first `prefix.len()` were captured; `ts` is when
    /// they were seen (CLOCK_MONOTONIC ns).
    Data { ts: u64, len: u64, prefix: &'a [u8] },
    /// Bytes missing from the stream: `Some(n)` when the count is known (TCP sequence numbers),
    /// `None` when it is not (kernel records lost).
    Gap { bytes: Option<u64> },
}

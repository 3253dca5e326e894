//! What the probe decodes from observed bytes, with no kernel or runtime dependency (so the
//! decoders can be fuzzed and benchmarked alone): `stream`, each direction's ordered bytes with
//! gaps (TCP reassembly); application protocols (framing parsers, pure functions over bytes) and
//! request/response pairing per connection.

pub mod stream;

pub mod call;
pub mod detect;
pub mod exchange;
/// Fuzz harnesses shared by `fuzz/` and the corpus replay test.
pub mod harness;
pub mod hpack;
pub mod http1;
pub mod http2;
pub mod postgres;
pub mod sql;

pub use call::{Call, Decoder};
pub use exchange::{Exchange, Http1Exchange};

//! Application protocols: framing parsers (pure functions over bytes) and request/response
//! pairing per connection.

pub mod exchange;
pub mod http1;

pub use exchange::{Exchange, Http1Exchange};

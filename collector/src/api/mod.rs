//! What the collector serves to people and tools.

pub mod grpc;
pub mod http;

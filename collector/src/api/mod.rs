//! What the collector serves to people and tools, and who may call it.

pub mod auth;
pub mod captures;
pub mod control;
pub mod grpc;
pub mod http;
pub mod tls;

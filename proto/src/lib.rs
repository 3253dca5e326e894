//! The `bakeoff.v1` protocol between probes and the collector. See `proto/bakeoff/v1/*.proto`
//! for the meaning of every field.

/// Version of the protocol this build speaks; sent in `ProbeHello.protocol_version`.
pub const PROTOCOL_VERSION: u32 = 1;

pub mod v1 {
    tonic::include_proto!("bakeoff.v1");
}

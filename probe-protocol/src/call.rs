//! What every protocol decoder produces and the interface it offers the connection table, so
//! HTTP/1, HTTP/2 + gRPC and Postgres are fed and drained the same way.

use super::{exchange::Anomaly, http1::Side};

/// One request and what answered it, whatever the protocol.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Call {
    /// `http1`, `http2`, `grpc` or `postgres`.
    pub protocol: &'static str,
    /// HTTP method (`POST` for gRPC); `SQL` for Postgres.
    pub method: String,
    /// HTTP `:path` (for gRPC `/pkg.Service/Method`); for Postgres the normalized statement.
    pub path: String,
    /// HTTP status (`:status`); none for Postgres or when no response came.
    pub status: Option<u16>,
    /// `grpc-status` (trailers or Trailers-Only); non-zero is an error.
    pub grpc_status: Option<i32>,
    /// Why the call failed without a status, or with a protocol error (RST_STREAM code,
    /// `SQLSTATE message`, connection reset).
    pub error: Option<String>,
    /// First request byte in (kernel monotonic ns).
    pub start_ts: u64,
    /// Last response byte out; 0 when unanswered.
    pub end_ts: u64,
    /// Exact bytes of the request (HTTP/2: its frames, headers and data) and of the response.
    pub request_bytes: u64,
    pub response_bytes: u64,
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    pub user_agent: Option<String>,
    /// Protocol-specific fields, with OpenTelemetry-style names: `rpc.service`, `rpc.method`,
    /// `db.name`, `db.user`, `db.rows`, `db.sqlstate`, `http2.stream`, and `decoded` (which of
    /// method, path, status the decoder really read, e.g. `method,path` when a header came from
    /// a table entry added before the probe attached).
    pub attributes: Vec<(String, String)>,
}

/// A protocol decoder of one connection. Request side: what the client sends; response side:
/// what the server sends (the connection table maps directions to sides by the role).
pub trait Decoder: std::fmt::Debug + Send {
    /// Bytes of one side, in stream order: `prefix` is what was captured of `len` exact bytes.
    fn on_bytes(
        &mut self,
        side: Side,
        ts: u64,
        prefix: &[u8],
        len: u64,
        done: &mut Vec<Call>,
        anomalies: &mut Vec<Anomaly>,
    );

    /// Bytes of one side are missing: resynchronise at the next message boundary.
    fn gap(&mut self, side: Side, anomalies: &mut Vec<Anomaly>);

    /// The connection ended (`reset`: by an RST). Returns the calls still waiting for an answer,
    /// with `error` set (and completes what the close completes into `done`).
    fn close(&mut self, reset: bool, done: &mut Vec<Call>) -> Vec<Call>;

    /// Requests waiting for an answer.
    fn in_flight(&self) -> usize;

    /// What a replay of this session needs from before a capture started (Postgres: startup
    /// parameters, session `SET`s, prepared statements), as `key = value` attributes.
    fn session_state(&self) -> Vec<(String, String)> {
        Vec::new()
    }
}

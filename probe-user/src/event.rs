//! The request event: one per request, the unit everything downstream counts and compares.

use serde::Serialize;

/// One request, as JSON lines print it. Times are wall-clock; durations are from the kernel's
/// monotonic clock.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct RequestEvent {
    /// Experiment the cohort belongs to.
    pub experiment: String,
    /// Cohort name (e.g. `baseline`, `canary`).
    pub cohort: String,
    /// Host the probe runs on.
    pub node: String,
    pub pid: u32,
    /// Kubernetes namespace, pod and container of the process, when the node's pods are watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// Executable path of the process.
    pub exe: String,
    /// `server` when the process answered the request, `client` when it sent it.
    pub role: String,
    pub protocol: String,
    pub method: String,
    /// Request target as sent, query string included.
    pub path: String,
    /// Response status; absent when the connection closed before a response.
    pub status: Option<u16>,
    /// Why the request has no status, when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Wall-clock time of the first request byte, RFC 3339 with nanoseconds.
    pub start_time: String,
    /// Same instant, Unix nanoseconds.
    pub start_unix_ns: u64,
    /// First request byte to last response byte, in nanoseconds.
    pub duration_ns: u64,
    /// Bytes the watched process received for this request (request bytes for a server).
    pub bytes_in: u64,
    /// Bytes the watched process sent (response bytes for a server).
    pub bytes_out: u64,
    /// Remote address of the connection, when known.
    pub peer: Option<String>,
    pub request_id: Option<String>,
    pub traceparent: Option<String>,
    /// The request's `user-agent`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
    /// `grpc-status` of a gRPC call (non-zero: an error).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<i32>,
    /// Protocol-specific fields (`rpc.service`, `db.rows`, `db.sqlstate`, `decoded`, ...).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub attributes: std::collections::BTreeMap<String, String>,
}

//! Where request events leave the probe: JSON lines (`output`) and the collector (`grpc`), and
//! the collector's commands reach it (`control`).

pub mod control;
pub mod grpc;
pub mod otlp;
pub mod spool;
pub mod tls;

use bakeoff_proto::v1;

use crate::event::RequestEvent;

/// The attribute carrying an event's Kubernetes namespace (the wire format has fields for the
/// pod and container, not the namespace).
pub const NAMESPACE_ATTRIBUTE: &str = "k8s.namespace";

/// The wire form of an event.
pub fn to_proto(e: &RequestEvent) -> v1::RequestEvent {
    v1::RequestEvent {
        experiment: e.experiment.clone(),
        cohort: e.cohort.clone(),
        node: e.node.clone(),
        pod: e.pod.clone().unwrap_or_default(),
        container: e.container.clone().unwrap_or_default(),
        pid: e.pid,
        exe: e.exe.clone(),
        role: e.role.clone(),
        protocol: e.protocol.clone(),
        method: e.method.clone(),
        path: e.path.clone(),
        status: e.status.map(u32::from),
        grpc_status: e.grpc_status,
        error: e.error.clone().unwrap_or_default(),
        start_unix_ns: e.start_unix_ns,
        duration_ns: e.duration_ns,
        bytes_in: e.bytes_in,
        bytes_out: e.bytes_out,
        peer: e.peer.clone().unwrap_or_default(),
        request_id: e.request_id.clone().unwrap_or_default(),
        traceparent: e.traceparent.clone().unwrap_or_default(),
        attributes: e
            .user_agent
            .iter()
            .map(|ua| ("user_agent".to_string(), ua.clone()))
            .chain(
                e.namespace
                    .iter()
                    .map(|ns| (NAMESPACE_ATTRIBUTE.to_string(), ns.clone())),
            )
            .chain(e.attributes.iter().map(|(k, v)| (k.clone(), v.clone())))
            .collect(),
        ..v1::RequestEvent::default()
    }
}

//! `bakeoff.v1.Control/Channel`: the stream each probe opens and keeps open, through which the
//! collector sends capture commands and receives capture status and data (`capture`).
//!
//! Who is on the other end: with `--tls-client-ca` the gRPC port only completes handshakes with
//! probes holding a certificate from that CA, and each channel is named by its certificate's
//! SHA-256 fingerprint (kept in the capture's status and the audit log); a probe takes commands
//! only from the collector whose certificate it verified (`collector.tls`).

use std::sync::Arc;

use bakeoff_proto::{
    PROTOCOL_VERSION,
    v1::{Command, ProbeMessage, control_server::Control, probe_message::Message},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::capture::Captures;

pub struct ControlService {
    captures: Arc<Captures>,
}

impl ControlService {
    pub fn new(captures: Arc<Captures>) -> Self {
        Self { captures }
    }
}

/// `cert-sha256:<first 16 hex digits>` of the peer's verified certificate, if it sent one.
fn identity<T>(request: &Request<T>) -> Option<String> {
    let certs = request.peer_certs()?;
    let cert = certs.first()?;
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
    Some(format!("cert-sha256:{hex}"))
}

#[tonic::async_trait]
impl Control for ControlService {
    type ChannelStream = ReceiverStream<Result<Command, Status>>;

    async fn channel(
        &self,
        request: Request<Streaming<ProbeMessage>>,
    ) -> Result<Response<Self::ChannelStream>, Status> {
        let identity = identity(&request);
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await? {
            Some(ProbeMessage {
                message: Some(Message::Hello(h)),
            }) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of a control channel must be ProbeHello",
                ));
            }
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "probe speaks bakeoff.v1 protocol version {}, this collector speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            )));
        }
        tracing::info!(
            probe = hello.probe_id,
            node = hello.node,
            identity = identity.as_deref().unwrap_or("none"),
            captures = hello.captures,
            "control channel open"
        );
        let (tx, rx) = mpsc::channel(16);
        let probe = hello.probe_id.clone();
        let link = self.captures.connect(hello, identity, tx);
        let captures = self.captures.clone();
        tokio::spawn(async move {
            loop {
                match inbound.message().await {
                    Ok(Some(ProbeMessage {
                        message: Some(Message::CaptureStatus(s)),
                    })) => captures.status(link, s),
                    Ok(Some(ProbeMessage {
                        message: Some(Message::CaptureData(d)),
                    })) => {
                        // File writes (zstd blocks) off the async threads.
                        let c = captures.clone();
                        if tokio::task::spawn_blocking(move || c.data(link, d))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(probe, error = %e, "control channel broke");
                        break;
                    }
                }
            }
            tracing::info!(probe, "control channel closed");
            captures.disconnect(link);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

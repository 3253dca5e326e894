//! The control channel: a `bakeoff.v1.Control/Channel` stream the probe opens to its collector
//! and keeps open (reconnecting with backoff), so the collector can command probes it could not
//! dial. Commands arrive on `commands`; capture status and data go back through a bounded queue
//! that never blocks the probe's loop: what does not fit is a counted drop.
//!
//! When the channel breaks, `Disconnected` is delivered: the probe ends its captures then (the
//! collector has marked them failed on its side), rather than recording into the void.

use std::{
    collections::BTreeSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bakeoff_capture::Record;
use bakeoff_proto::v1::{
    CaptureData, CaptureRecord, Command, ProbeHello, ProbeMessage, control_client::ControlClient,
    probe_message::Message,
};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::ClientTlsConfig;

use super::grpc::{BACKOFF_MAX, BACKOFF_MIN, channel, jittered};

/// Messages queued towards the collector (status every second, data chunks of
/// `CHUNK_BYTES`): about 64 MiB of capture data at most.
const QUEUE_MESSAGES: usize = 256;
/// Record bytes per data message.
pub const CHUNK_BYTES: usize = 256 * 1024;

/// What the collector said, or that it is gone.
#[derive(Debug)]
pub enum FromCollector {
    Command(Command),
    /// The channel broke (or was never up for a command in flight): captures end.
    Disconnected,
}

/// Counters of the channel.
#[derive(Debug, Default)]
pub struct ControlStats {
    pub connected: AtomicBool,
    pub commands: AtomicU64,
    pub reconnects: AtomicU64,
    /// Messages the queue towards the collector could not take, or that were queued when the
    /// channel broke.
    pub messages_dropped: AtomicU64,
}

/// Handle held by the probe's loop.
pub struct Control {
    pub commands: mpsc::Receiver<FromCollector>,
    out: mpsc::Sender<ProbeMessage>,
    pub stats: Arc<ControlStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Control {
    /// Starts the channel's task on the current tokio runtime.
    pub fn start(endpoint: String, tls: Option<ClientTlsConfig>, hello: ProbeHello) -> Self {
        let (cmd_tx, commands) = mpsc::channel(16);
        let (out, out_rx) = mpsc::channel(QUEUE_MESSAGES);
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(ControlStats::default());
        let task = tokio::spawn(run(
            endpoint,
            tls,
            hello,
            cmd_tx,
            out_rx,
            stop_rx,
            stats.clone(),
        ));
        Self {
            commands,
            out,
            stats,
            stop: Some(stop_tx),
            task,
        }
    }

    /// A sender for messages to the collector (for a capture's sink).
    pub fn sender(&self) -> mpsc::Sender<ProbeMessage> {
        self.out.clone()
    }

    /// Queues a message; never waits. False (and counted) if the queue is full.
    pub fn send(&self, message: Message) -> bool {
        let ok = self
            .out
            .try_send(ProbeMessage {
                message: Some(message),
            })
            .is_ok();
        if !ok {
            self.stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
        }
        ok
    }

    /// Sends what is queued (for at most `timeout`), then closes the channel.
    pub async fn shutdown(mut self, timeout: Duration) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        drop(self.out);
        let _ = tokio::time::timeout(timeout, &mut self.task).await;
        self.task.abort();
    }
}

/// A capture's records on their way to the collector: gathered into chunks of
/// `CHUNK_BYTES`, numbered, queued without waiting. A chunk the queue cannot take is dropped
/// and counted, and each connection it held gets a `Loss` record in the next chunk, so the
/// capture says where it has holes.
pub struct ChannelSink {
    capture_id: String,
    out: mpsc::Sender<ProbeMessage>,
    pending: Vec<CaptureRecord>,
    pending_bytes: usize,
    sequence: u64,
    bytes: u64,
    records_dropped: u64,
    /// Connections whose records were dropped since the last chunk that went out.
    holes: BTreeSet<u64>,
}

impl ChannelSink {
    pub fn new(capture_id: String, out: mpsc::Sender<ProbeMessage>) -> Self {
        Self {
            capture_id,
            out,
            pending: Vec::new(),
            pending_bytes: 0,
            sequence: 0,
            bytes: 0,
            records_dropped: 0,
            holes: BTreeSet::new(),
        }
    }

    pub fn write(&mut self, r: &Record) {
        let size = bakeoff_capture::RECORD_HEADER + r.body.len();
        self.bytes += size as u64;
        self.pending_bytes += size;
        self.pending.push(CaptureRecord {
            kind: u32::from(r.kind as u8),
            direction: u32::from(r.direction as u8),
            conn: r.conn,
            ts_unix_ns: r.ts_unix_ns,
            body: r.body.clone(),
        });
        if self.pending_bytes >= CHUNK_BYTES {
            self.flush();
        }
    }

    /// Record bytes produced so far (sent or not).
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    pub fn records_dropped(&self) -> u64 {
        self.records_dropped
    }

    /// Queues what is gathered as one chunk.
    pub fn flush(&mut self) {
        if self.pending.is_empty() && self.holes.is_empty() {
            return;
        }
        let mut records = Vec::with_capacity(self.holes.len() + self.pending.len());
        let now = self.pending.first().map_or(0, |r| r.ts_unix_ns);
        for &conn in &self.holes {
            let loss = bakeoff_capture::Loss {
                bytes: 0,
                reason: "collector_channel_full".into(),
            };
            let r = Record::loss(conn, bakeoff_capture::Direction::None, now, &loss);
            records.push(CaptureRecord {
                kind: u32::from(r.kind as u8),
                direction: u32::from(r.direction as u8),
                conn,
                ts_unix_ns: now,
                body: r.body,
            });
        }
        records.append(&mut self.pending);
        self.pending_bytes = 0;
        let message = ProbeMessage {
            message: Some(Message::CaptureData(CaptureData {
                capture_id: self.capture_id.clone(),
                sequence: self.sequence + 1,
                records,
            })),
        };
        match self.out.try_send(message) {
            Ok(()) => {
                self.sequence += 1;
                self.holes.clear();
            }
            Err(mpsc::error::TrySendError::Full(m) | mpsc::error::TrySendError::Closed(m)) => {
                if let Some(Message::CaptureData(d)) = m.message {
                    for r in &d.records {
                        // Loss records re-made next time are not counted as dropped.
                        if r.kind != bakeoff_capture::Kind::Loss as u32
                            || !self.holes.contains(&r.conn)
                        {
                            self.records_dropped += 1;
                        }
                        self.holes.insert(r.conn);
                    }
                }
            }
        }
    }
}

async fn connect(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
    hello: &ProbeHello,
) -> Result<(mpsc::Sender<ProbeMessage>, tonic::Streaming<Command>), String> {
    let mut client = ControlClient::new(channel(endpoint, tls).await?);
    let (tx, rx) = mpsc::channel(16);
    tx.send(ProbeMessage {
        message: Some(Message::Hello(hello.clone())),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let commands = client
        .channel(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            format!(
                "collector refused the control channel: {} ({:?})",
                s.message(),
                s.code()
            )
        })?
        .into_inner();
    Ok((tx, commands))
}

async fn run(
    endpoint: String,
    tls: Option<ClientTlsConfig>,
    hello: ProbeHello,
    commands: mpsc::Sender<FromCollector>,
    mut out: mpsc::Receiver<ProbeMessage>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<ControlStats>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut stopping = false;
    loop {
        let (tx, mut inbound) = match connect(&endpoint, tls.as_ref(), &hello).await {
            Ok(c) => c,
            Err(e) => {
                if stopping {
                    return;
                }
                tracing::debug!(error = e, retry_in = ?backoff, "control channel: collector unreachable");
                // What was queued meanwhile has nowhere to go.
                while out.try_recv().is_ok() {
                    stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                }
                tokio::select! {
                    _ = tokio::time::sleep_until(Instant::now() + jittered(backoff)) => {}
                    _ = &mut stop => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(endpoint, "control channel open");
        stats.connected.store(true, Ordering::Relaxed);
        stats.reconnects.fetch_add(1, Ordering::Relaxed);
        backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                command = inbound.message(), if !stopping => match command {
                    Ok(Some(c)) => {
                        stats.commands.fetch_add(1, Ordering::Relaxed);
                        if commands.send(FromCollector::Command(c)).await.is_err() {
                            return;
                        }
                    }
                    other => {
                        if let Err(status) = other {
                            tracing::warn!(code = ?status.code(), message = status.message(), "control channel ended");
                        }
                        break;
                    }
                },
                message = out.recv() => match message {
                    Some(m) => {
                        if tx.send(m).await.is_err() {
                            stats.messages_dropped.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                    }
                    // The probe is stopping and everything queued went out.
                    None => return,
                },
                _ = &mut stop, if !stopping => stopping = true,
            }
        }
        stats.connected.store(false, Ordering::Relaxed);
        if stopping || commands.send(FromCollector::Disconnected).await.is_err() {
            return;
        }
    }
}

//! Streams request events to the collector over `bakeoff.v1.Ingest/Stream`.
//!
//! One task owns everything: it batches events by size and time, numbers the batches, keeps them
//! in the spool until the collector acknowledges them, reconnects with jittered exponential
//! backoff, and resends what was not acknowledged. Nothing here blocks the kernel reader: events
//! arrive through a bounded channel and a full channel is a counted drop.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use bakeoff_proto::v1::{
    EventBatch, IngestAck, IngestRequest, ProbeHealth, ProbeHello, RequestEvent,
    ingest_client::IngestClient, ingest_request::Message,
};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::{
    sync::{mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{codec::Streaming, transport::ClientTlsConfig};

use super::spool::{Spool, SpoolError};

/// How the exporter batches, buffers and retries.
#[derive(Clone, Debug)]
pub struct ExportConfig {
    /// `http://host:port` of the collector's gRPC ingest.
    pub endpoint: String,
    pub batch_size: usize,
    pub batch_interval: Duration,
    /// Batches kept in memory before spilling to the spool directory.
    pub queue_batches: usize,
    pub spool_dir: Option<PathBuf>,
    pub spool_bytes: u64,
    /// At shutdown, how long to wait for the collector to acknowledge what is pending.
    pub drain_timeout: Duration,
    /// TLS (and mutual TLS) towards the collector.
    pub tls: Option<ClientTlsConfig>,
}

/// Counters shared with the rest of the probe (metrics, health, the stats file).
#[derive(Debug)]
pub struct ExportStats {
    pub events_in: AtomicU64,
    pub batches_sent: AtomicU64,
    pub acked_sequence: AtomicU64,
    pub dropped_channel_full: AtomicU64,
    pub dropped_spool_full: AtomicU64,
    pub queued_batches: AtomicU64,
    /// Events in unacknowledged batches (memory and spool).
    pub pending_events: AtomicU64,
    pub spool_bytes: AtomicU64,
    pub connected: AtomicBool,
    pub reconnects: AtomicU64,
    /// Written by the kernel reader; reported in health messages.
    pub ringbuf_drops: AtomicU64,
    /// Seconds from sending a batch to its acknowledgement (stored durably).
    pub ack_seconds: Histogram,
}

impl Default for ExportStats {
    fn default() -> Self {
        Self {
            events_in: AtomicU64::default(),
            batches_sent: AtomicU64::default(),
            acked_sequence: AtomicU64::default(),
            dropped_channel_full: AtomicU64::default(),
            dropped_spool_full: AtomicU64::default(),
            queued_batches: AtomicU64::default(),
            pending_events: AtomicU64::default(),
            spool_bytes: AtomicU64::default(),
            connected: AtomicBool::default(),
            reconnects: AtomicU64::default(),
            ringbuf_drops: AtomicU64::default(),
            ack_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 16)),
        }
    }
}

impl ExportStats {
    pub fn to_json(&self) -> serde_json::Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        serde_json::json!({
            "events_in": g(&self.events_in),
            "batches_sent": g(&self.batches_sent),
            "acked_sequence": g(&self.acked_sequence),
            "dropped_channel_full": g(&self.dropped_channel_full),
            "dropped_spool_full": g(&self.dropped_spool_full),
            "queued_batches": g(&self.queued_batches),
            "pending_events": g(&self.pending_events),
            "spool_bytes": g(&self.spool_bytes),
            "connected": self.connected.load(Ordering::Relaxed),
            "reconnects": g(&self.reconnects),
        })
    }
}

/// Handle held by the probe's main loop.
pub struct Exporter {
    tx: mpsc::Sender<RequestEvent>,
    pub stats: Arc<ExportStats>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

const CHANNEL_EVENTS: usize = 65_536;
pub(crate) const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl Exporter {
    /// Starts the exporter task on the current tokio runtime.
    pub fn start(config: ExportConfig, hello: ProbeHello) -> Result<Self, SpoolError> {
        let spool = Spool::new(
            config.queue_batches,
            config.spool_dir.clone(),
            config.spool_bytes,
        )?;
        let (tx, rx) = mpsc::channel(CHANNEL_EVENTS);
        let (stop_tx, stop_rx) = oneshot::channel();
        let stats = Arc::new(ExportStats::default());
        let task = tokio::spawn(run(config, hello, spool, rx, stop_rx, stats.clone()));
        Ok(Self {
            tx,
            stats,
            stop: Some(stop_tx),
            task,
        })
    }

    /// Queues one event; never waits. A full channel is counted.
    pub fn send(&self, event: RequestEvent) {
        self.stats.events_in.fetch_add(1, Ordering::Relaxed);
        if self.tx.try_send(event).is_err() {
            self.stats
                .dropped_channel_full
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Flushes, waits (bounded) for acknowledgements, and stops.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = self.task.await;
    }
}

struct Stream {
    tx: mpsc::Sender<IngestRequest>,
    acks: Streaming<IngestAck>,
    sent_upto: u64,
}

/// A connection to the collector's gRPC port (TLS if configured).
pub(crate) async fn channel(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
) -> Result<tonic::transport::Channel, String> {
    let mut ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|e| format!("bad collector endpoint {endpoint}: {e}"))?
        .connect_timeout(Duration::from_secs(2));
    if let Some(tls) = tls {
        ep = ep
            .tls_config(tls.clone())
            .map_err(|e| format!("bad TLS settings for {endpoint}: {e}"))?;
    }
    ep.connect()
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))
}

async fn connect(
    endpoint: &str,
    tls: Option<&ClientTlsConfig>,
    hello: &ProbeHello,
) -> Result<(mpsc::Sender<IngestRequest>, Streaming<IngestAck>), String> {
    let mut client = IngestClient::new(channel(endpoint, tls).await?);
    let (tx, rx) = mpsc::channel(16);
    tx.send(IngestRequest {
        message: Some(Message::Hello(hello.clone())),
    })
    .await
    .map_err(|_| "stream closed".to_string())?;
    let acks = client
        .stream(ReceiverStream::new(rx))
        .await
        .map_err(|s| {
            format!(
                "collector refused the stream: {} ({:?})",
                s.message(),
                s.code()
            )
        })?
        .into_inner();
    Ok((tx, acks))
}

/// Backoff with up to 50% random jitter, so probes do not reconnect in lockstep.
pub(crate) fn jittered(d: Duration) -> Duration {
    let nanos = Instant::now().elapsed().subsec_nanos() ^ std::process::id().rotate_left(13);
    let frac = f64::from(nanos % 1000) / 1000.0;
    d.mul_f64(0.5 + frac * 0.5)
}

async fn run(
    config: ExportConfig,
    hello: ProbeHello,
    mut spool: Spool,
    mut events: mpsc::Receiver<RequestEvent>,
    mut stop: oneshot::Receiver<()>,
    stats: Arc<ExportStats>,
) {
    let mut next_seq = spool.max_sequence() + 1;
    let mut current: Vec<RequestEvent> = Vec::with_capacity(config.batch_size);
    let mut stream: Option<Stream> = None;
    let mut backoff = BACKOFF_MIN;
    let mut retry_at = Instant::now();
    let mut flush = tokio::time::interval(config.batch_interval);
    let mut health = tokio::time::interval(Duration::from_secs(2));
    let mut draining: Option<Instant> = None;
    // Send time of each batch in flight, oldest first, for the ack latency histogram.
    let mut in_flight: std::collections::VecDeque<(u64, Instant)> = Default::default();

    let seal = |current: &mut Vec<RequestEvent>, spool: &mut Spool, next_seq: &mut u64| {
        if current.is_empty() {
            return;
        }
        spool.push(EventBatch {
            sequence: *next_seq,
            events: std::mem::take(current),
        });
        *next_seq += 1;
    };

    loop {
        stats
            .queued_batches
            .store(spool.memory_batches() as u64, Ordering::Relaxed);
        stats
            .pending_events
            .store(spool.pending_events(), Ordering::Relaxed);
        stats
            .spool_bytes
            .store(spool.disk_bytes(), Ordering::Relaxed);
        stats
            .dropped_spool_full
            .store(spool.dropped_events, Ordering::Relaxed);
        stats.acked_sequence.store(spool.acked(), Ordering::Relaxed);
        stats.connected.store(stream.is_some(), Ordering::Relaxed);
        if let Some(deadline) = draining
            && (spool.pending_batches() == 0 || Instant::now() >= deadline)
        {
            if spool.pending_batches() > 0 {
                tracing::warn!(
                    batches = spool.pending_batches(),
                    "collector did not acknowledge everything before shutdown; spooled batches are resent at the next start"
                );
            }
            return;
        }
        // Only whether there is something to send; the batch is fetched once a slot is free.
        let unsent = stream
            .as_ref()
            .is_some_and(|s| spool.has_after(s.sent_upto));
        let connected = stream.is_some();
        let (tx, acks) = match &mut stream {
            Some(s) => (Some(s.tx.clone()), Some(&mut s.acks)),
            None => (None, None),
        };
        tokio::select! {
            event = events.recv(), if draining.is_none() => match event {
                Some(e) => {
                    current.push(e);
                    if current.len() >= config.batch_size {
                        seal(&mut current, &mut spool, &mut next_seq);
                    }
                }
                None => draining = Some(Instant::now() + config.drain_timeout),
            },
            _ = flush.tick() => seal(&mut current, &mut spool, &mut next_seq),
            permit = async {
                match &tx {
                    Some(tx) if unsent => tx.reserve().await.ok(),
                    _ => std::future::pending().await,
                }
            } => {
                if let (Some(permit), Some(s)) = (permit, stream.as_mut())
                    && let Some(batch) = spool.next_after(s.sent_upto)
                {
                    s.sent_upto = batch.sequence;
                    in_flight.push_back((batch.sequence, Instant::now()));
                    permit.send(IngestRequest { message: Some(Message::Batch(batch)) });
                    stats.batches_sent.fetch_add(1, Ordering::Relaxed);
                }
            },
            ack = async {
                match acks {
                    Some(a) => a.message().await,
                    None => std::future::pending().await,
                }
            } => match ack {
                Ok(Some(ack)) => {
                    while let Some(&(seq, sent)) = in_flight.front() && seq <= ack.stored_sequence {
                        stats.ack_seconds.observe(sent.elapsed().as_secs_f64());
                        in_flight.pop_front();
                    }
                    spool.ack(ack.stored_sequence);
                }
                other => {
                    if let Err(status) = other {
                        tracing::warn!(code = ?status.code(), message = status.message(), "collector stream ended");
                    } else {
                        tracing::warn!("collector closed the stream");
                    }
                    stream = None;
                    in_flight.clear();
                    retry_at = Instant::now() + jittered(backoff);
                }
            },
            _ = tokio::time::sleep_until(retry_at), if !connected => {
                match connect(&config.endpoint, config.tls.as_ref(), &hello).await {
                    Ok((tx, acks)) => {
                        tracing::info!(endpoint = config.endpoint, resend_from = spool.acked() + 1, "connected to the collector");
                        stats.reconnects.fetch_add(1, Ordering::Relaxed);
                        backoff = BACKOFF_MIN;
                        stream = Some(Stream { tx, acks, sent_upto: spool.acked() });
                    }
                    Err(e) => {
                        tracing::warn!(error = e, retry_in = ?backoff, "collector unreachable");
                        retry_at = Instant::now() + jittered(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            },
            _ = health.tick() => {
                if let Some(tx) = &tx {
                    let mut dropped = std::collections::HashMap::new();
                    dropped.insert("channel_full".to_string(), stats.dropped_channel_full.load(Ordering::Relaxed));
                    dropped.insert("spool_full".to_string(), spool.dropped_events);
                    let _ = tx.try_send(IngestRequest { message: Some(Message::Health(ProbeHealth {
                        ringbuf_drops: stats.ringbuf_drops.load(Ordering::Relaxed),
                        queued_batches: spool.pending_batches() as u64,
                        spool_bytes: spool.disk_bytes(),
                        dropped_events: dropped,
                    }))});
                }
            },
            _ = &mut stop, if draining.is_none() => {
                // Take what is already queued, then wait for acks.
                while let Ok(e) = events.try_recv() {
                    current.push(e);
                    if current.len() >= config.batch_size {
                        seal(&mut current, &mut spool, &mut next_seq);
                    }
                }
                seal(&mut current, &mut spool, &mut next_seq);
                draining = Some(Instant::now() + config.drain_timeout);
            },
        }
    }
}

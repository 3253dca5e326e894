//! `bakeoff.v1.Ingest`: many probes at once, one stream each. Every stored batch is
//! acknowledged with its sequence; a batch at or below the last stored sequence of its probe is
//! a resend and is acknowledged without being stored again.
//!
//! Each stream hands its batches to the store in order (`Store::submit`) without waiting for
//! each to be durable, and acknowledges them in order as the store commits them: DuckDB commits
//! the batches of every stream in large groups. A store that stores each batch before taking the
//! next (ClickHouse) still overlaps receiving and decoding the next batch with storing one.

use std::{
    collections::{HashMap, VecDeque},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bakeoff_proto::{
    PROTOCOL_VERSION,
    v1::{
        IngestAck, IngestRequest, ProbeHealth, RequestEvent, ingest_request::Message,
        ingest_server::Ingest,
    },
};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

use crate::{
    live::Live,
    series::{MAX_DURATION_NS, SECOND_NS},
    store::{Pending, Store, StoreError},
};

/// Most events one batch may carry.
pub const MAX_BATCH_EVENTS: usize = 100_000;
/// Largest message accepted, in bytes (tonic answers RESOURCE_EXHAUSTED above it).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// Counters of the ingest, for the API, `/metrics` and logs.
#[derive(Debug)]
pub struct IngestStats {
    pub events_stored: AtomicU64,
    pub batches_stored: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub streams_refused: AtomicU64,
    /// Events stored after the judge had read their second, or longer than the judge takes
    /// (stored, not judged).
    pub events_late: AtomicU64,
    /// Latest health report per probe id.
    pub health: Mutex<HashMap<String, ProbeHealth>>,
    /// Seconds to store one batch (append + sequence, durably).
    pub store_seconds: Histogram,
}

impl Default for IngestStats {
    fn default() -> Self {
        Self {
            events_stored: AtomicU64::default(),
            batches_stored: AtomicU64::default(),
            batches_duplicate: AtomicU64::default(),
            streams_refused: AtomicU64::default(),
            events_late: AtomicU64::default(),
            health: Mutex::default(),
            store_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
        }
    }
}

pub struct IngestService {
    store: Arc<dyn Store>,
    pub stats: Arc<IngestStats>,
    /// The judge's state: which seconds it has already read (later events for them are late),
    /// and how far each probe's events have come.
    live: Arc<Live>,
}

impl IngestService {
    pub fn new(store: Arc<dyn Store>, stats: Arc<IngestStats>, live: Arc<Live>) -> Self {
        Self { store, stats, live }
    }
}

type AckStream = Pin<Box<dyn Stream<Item = Result<IngestAck, Status>> + Send>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, Status> {
    storage_status(tokio::task::spawn_blocking(f).await)
}

fn storage_status<T>(
    r: Result<Result<T, crate::store::StoreError>, tokio::task::JoinError>,
) -> Result<T, Status> {
    r.map_err(|e| Status::internal(format!("storage task failed: {e}")))?
        .map_err(|e| Status::unavailable(format!("storage failed: {e}")))
}

/// A batch of a stream on its way into the store.
struct Storing {
    sequence: u64,
    events: u64,
    late: u64,
    latest: Option<u64>,
    started: std::time::Instant,
    /// Holds the judge back while the batch is on its way (dropped with the batch).
    _in_flight: Option<crate::live::InFlight>,
}

/// A stream's batches between the probe and the store, in sequence order: at most one decoded
/// batch waiting for its turn, one being handed to the store (`Store::submit` encodes it, and
/// waits while the store's queue is full), and the ones handed over whose outcome is not known
/// yet. The store commits those in the order they were handed over, so acks go out in order.
struct Pipeline {
    store: Arc<dyn Store>,
    probe: String,
    next: Option<(Storing, Vec<RequestEvent>)>,
    submitting: Option<(
        Storing,
        tokio::task::JoinHandle<Result<Pending, StoreError>>,
    )>,
    waiting: VecDeque<(Storing, Pending)>,
}

impl Pipeline {
    fn new(store: Arc<dyn Store>, probe: String) -> Self {
        Self {
            store,
            probe,
            next: None,
            submitting: None,
            waiting: VecDeque::new(),
        }
    }

    /// Whether it takes another batch now (else the probe's next message waits).
    fn has_room(&self) -> bool {
        self.next.is_none()
    }

    fn is_empty(&self) -> bool {
        self.next.is_none() && self.submitting.is_none() && self.waiting.is_empty()
    }

    fn push(&mut self, batch: Storing, events: Vec<RequestEvent>) {
        self.next = Some((batch, events));
        self.hand_over();
    }

    /// Hands the next batch to the store, if none is being handed over.
    fn hand_over(&mut self) {
        if self.submitting.is_some() {
            return;
        }
        let Some((batch, events)) = self.next.take() else {
            return;
        };
        let (store, probe, sequence) = (self.store.clone(), self.probe.clone(), batch.sequence);
        let task = tokio::task::spawn_blocking(move || store.submit(&probe, sequence, &events));
        self.submitting = Some((batch, task));
    }

    /// Waits for the next batch whose outcome is known (oldest first, `Some`), or for a batch to
    /// be handed over (`None`: there may be room for another now); never returns while the
    /// pipeline is empty. Cancel-safe.
    async fn step(&mut self) -> Option<(Storing, Result<(), Status>)> {
        {
            let Self {
                submitting,
                waiting,
                ..
            } = self;
            tokio::select! {
                biased;
                outcome = async {
                    match waiting.front_mut() {
                        Some((_, pending)) => pending.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((batch, _)) = waiting.pop_front() {
                        return Some((batch, outcome.map_err(|e| Status::unavailable(format!("storage failed: {e}")))));
                    }
                }
                handed = async {
                    match submitting {
                        Some((_, task)) => task.await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let Some((batch, _)) = submitting.take() {
                        // A batch that could not be handed over fails in its turn.
                        let pending = match handed {
                            Ok(Ok(pending)) => pending,
                            Ok(Err(e)) => Pending::ready(Err(e)),
                            Err(e) => Pending::ready(Err(StoreError::Invalid(format!("storage task failed: {e}")))),
                        };
                        waiting.push_back((batch, pending));
                    }
                }
            }
        }
        self.hand_over();
        None
    }

    /// Every batch in the pipeline with its outcome, in order.
    async fn drain(&mut self) -> Vec<(Storing, Result<(), Status>)> {
        let mut out = Vec::new();
        while !self.is_empty() {
            out.extend(self.step().await);
        }
        out
    }
}

/// What a stream waits for: a batch's outcome, or the probe's next message.
enum Next {
    Stored(Storing, Result<(), Status>),
    Message(Result<Option<IngestRequest>, Status>),
}

#[tonic::async_trait]
impl Ingest for IngestService {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        request: Request<Streaming<IngestRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let mut inbound = request.into_inner();
        let refuse = |status: Status| {
            self.stats.streams_refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(code = ?status.code(), message = status.message(), "ingest stream refused");
            status
        };
        let hello = match inbound.message().await? {
            Some(IngestRequest {
                message: Some(Message::Hello(h)),
            }) => h,
            Some(_) => {
                return Err(refuse(Status::invalid_argument(
                    "the first message of a stream must be ProbeHello",
                )));
            }
            None => return Err(refuse(Status::invalid_argument("empty stream"))),
        };
        if hello.protocol_version != PROTOCOL_VERSION {
            return Err(refuse(Status::failed_precondition(format!(
                "probe speaks bakeoff.v1 protocol version {}, this collector speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ))));
        }
        if hello.probe_id.is_empty() {
            return Err(refuse(Status::invalid_argument(
                "ProbeHello.probe_id is empty",
            )));
        }
        let probe = hello.probe_id.clone();
        let mut last = {
            let (store, probe) = (self.store.clone(), probe.clone());
            blocking(move || store.last_sequence(&probe)).await?
        };
        tracing::info!(
            probe,
            node = hello.node,
            version = hello.probe_version,
            resume_after = last,
            "probe connected"
        );
        let (tx, rx) = mpsc::channel(64);
        let _ = tx.try_send(Ok(IngestAck {
            stored_sequence: last,
        }));
        let store = self.store.clone();
        let stats = self.stats.clone();
        let live = self.live.clone();
        tokio::spawn(async move {
            // The stream's batches in the store's hands, in sequence order.
            let mut pipeline = Pipeline::new(store, probe.clone());
            // Highest sequence handed to the store (stored or being stored).
            let mut submitted = last;
            // Counts and acknowledges a stored batch; a failure ends the stream (the probe
            // resends).
            let finish = |s: Storing, outcome: Result<(), Status>, last: &mut u64| match outcome {
                Ok(()) => {
                    stats
                        .store_seconds
                        .observe(s.started.elapsed().as_secs_f64());
                    *last = s.sequence;
                    stats.batches_stored.fetch_add(1, Ordering::Relaxed);
                    stats.events_stored.fetch_add(s.events, Ordering::Relaxed);
                    stats.events_late.fetch_add(s.late, Ordering::Relaxed);
                    if let Some(latest) = s.latest {
                        live.stored(&probe, latest);
                    }
                    // Acks are cumulative: if the probe is slow to read them, skipping one
                    // loses nothing.
                    let _ = tx.try_send(Ok(IngestAck {
                        stored_sequence: *last,
                    }));
                    Ok(())
                }
                Err(status) => {
                    tracing::error!(probe, error = status.message(), "cannot store a batch");
                    Err(status)
                }
            };
            let outcome = 'stream: loop {
                let next = tokio::select! {
                    // Acknowledge a stored batch before reading on.
                    biased;
                    stored = pipeline.step() => match stored {
                        Some((s, outcome)) => Next::Stored(s, outcome),
                        None => continue,
                    },
                    msg = inbound.message(), if pipeline.has_room() => Next::Message(msg),
                };
                let msg = match next {
                    Next::Stored(s, outcome) => {
                        if let Err(status) = finish(s, outcome, &mut last) {
                            break Err(status);
                        }
                        continue;
                    }
                    Next::Message(Ok(Some(m))) => m,
                    Next::Message(Ok(None)) => break Ok(()),
                    Next::Message(Err(status)) => {
                        // Oversized or undecodable messages land here: tell the probe why.
                        tracing::warn!(probe, code = ?status.code(), message = status.message(), "probe stream failed");
                        break Err(status);
                    }
                };
                match msg.message {
                    Some(Message::Batch(batch)) => {
                        if batch.sequence <= submitted {
                            stats.batches_duplicate.fetch_add(1, Ordering::Relaxed);
                            let _ = tx.try_send(Ok(IngestAck {
                                stored_sequence: last,
                            }));
                        } else if batch.events.len() > MAX_BATCH_EVENTS {
                            break Err(Status::invalid_argument(format!(
                                "batch {} has {} events, more than {MAX_BATCH_EVENTS}",
                                batch.sequence,
                                batch.events.len()
                            )));
                        } else {
                            let closed = live.rollup.closed_before().saturating_mul(SECOND_NS);
                            let mut late = 0;
                            let mut latest = None;
                            let mut earliest = u64::MAX;
                            for e in &batch.events {
                                let end = e.start_unix_ns.saturating_add(e.duration_ns);
                                late += u64::from(end < closed || e.duration_ns > MAX_DURATION_NS);
                                latest = latest.max(Some(end));
                                earliest = earliest.min(end);
                            }
                            let in_flight =
                                latest.is_some().then(|| live.receiving(&probe, earliest));
                            submitted = batch.sequence;
                            pipeline.push(
                                Storing {
                                    sequence: batch.sequence,
                                    events: batch.events.len() as u64,
                                    late,
                                    latest,
                                    started: std::time::Instant::now(),
                                    _in_flight: in_flight,
                                },
                                batch.events,
                            );
                        }
                    }
                    Some(Message::Health(h)) => {
                        // Nothing queued: everything that ended before about now was sent, and
                        // is stored once the batches in the pipeline are.
                        if h.queued_batches == 0 && h.spool_bytes == 0 {
                            for (s, outcome) in pipeline.drain().await {
                                if let Err(status) = finish(s, outcome, &mut last) {
                                    break 'stream Err(status);
                                }
                            }
                            live.drained(&probe);
                        }
                        if let Ok(mut m) = stats.health.lock() {
                            m.insert(probe.clone(), h);
                        }
                    }
                    Some(Message::Hello(_)) | None => {
                        break Err(Status::invalid_argument("ProbeHello may only come first"));
                    }
                }
            };
            // The batches in the pipeline still are stored; their acks (or the first failure)
            // go out before the end.
            let mut outcome = outcome;
            for (s, stored) in pipeline.drain().await {
                if let Err(status) = finish(s, stored, &mut last)
                    && outcome.is_ok()
                {
                    outcome = Err(status);
                }
            }
            if let Err(status) = outcome {
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

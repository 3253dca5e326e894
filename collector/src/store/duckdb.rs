//! The default backend: one embedded DuckDB file, no server.
//!
//! Layout: what is constant per process (probe, experiment, cohort, node, pod, container, pid,
//! exe, role, protocol) is one row of `sources`, and each request is one row of `requests`
//! that carries its source's small integer id and only its own fields; the `events` view joins
//! them, so every query reads the events as one table. DuckDB's ingest cost is mostly per string
//! value (statistics, hashing, dictionary and FSST compression), and this leaves a request with
//! 4 to 8 strings instead of 15.
//!
//! Appends are columnar: each batch becomes an Arrow record batch in the caller's thread (in
//! parallel across probe streams), then goes to one writer thread through a bounded queue. The
//! writer commits batches in groups of up to `COMMIT_EVENTS` (one DuckDB row group: a
//! transaction that large is written to the file directly, compressed, instead of through the
//! WAL and a later checkpoint; commits of 2,000 events cost 3x more CPU per event here). Under
//! sustained load a group waits up to `WriterConfig::max_wait` (1 s) to fill; under light load
//! it is committed once nothing arrives for `idle_wait` (20 ms), so acks stay prompt when
//! throughput does not matter. One transaction holds a group's batches, the
//! sources they name and their probes' last sequences, so a batch and its sequence are durable
//! together or not at all. Reads use a connection of their own.
//!
//! The judge's cells (`Store::cells`) of what was committed since the store was opened are
//! folded at ingest (`fold`), so the judge does not read its events back.

use std::{
    collections::HashMap,
    hash::BuildHasher,
    path::Path,
    sync::{Arc, Condvar, Mutex, OnceLock, mpsc},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use bakeoff_proto::v1::RequestEvent;
use duckdb::{
    Connection,
    arrow::{
        array::{ArrayRef, Int32Array, StringBuilder, UInt32Array, UInt64Array},
        datatypes::{DataType, Field, Schema, SchemaRef},
        record_batch::RecordBatch,
    },
    params,
};

use super::fold::{BatchCells, Fold};
use super::{
    CONNECTION_PROTOCOLS_SQL, ERROR_SQL, EVENT_COLUMNS, Pending, SAMPLE_COLUMNS, SampleRow, Store,
    StoreError, StoredEvent, UNANSWERED_SQL, opt,
};
use crate::query::{FIELDS, Filter, GroupRow, group_fields};
use crate::series::{CellRow, MAX_DURATION_NS, NO_LATENCY, SECOND_NS};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS sources (
    source_id UINTEGER PRIMARY KEY, probe_id VARCHAR,
    experiment VARCHAR, cohort VARCHAR, node VARCHAR, pod VARCHAR, container VARCHAR,
    pid UINTEGER, exe VARCHAR, role VARCHAR, protocol VARCHAR
);
CREATE TABLE IF NOT EXISTS requests (
    source_id UINTEGER, sequence UBIGINT,
    method VARCHAR, route VARCHAR, path VARCHAR, status INTEGER, grpc_status INTEGER,
    error VARCHAR, start_unix_ns UBIGINT, duration_ns UBIGINT, end_unix_ns UBIGINT,
    bytes_in UBIGINT, bytes_out UBIGINT, peer VARCHAR, request_id VARCHAR, traceparent VARCHAR,
    attributes VARCHAR
);
CREATE TABLE IF NOT EXISTS probes (
    probe_id VARCHAR PRIMARY KEY, last_sequence UBIGINT NOT NULL
);
";

/// Every query reads the events through this view.
const VIEW: &str = "
CREATE VIEW IF NOT EXISTS events AS SELECT
    s.probe_id, r.sequence, s.experiment, s.cohort, s.node, s.pod, s.container, s.pid, s.exe,
    s.role, s.protocol, r.method, r.route, r.path, r.status, r.grpc_status, r.error,
    r.start_unix_ns, r.duration_ns, r.bytes_in, r.bytes_out, r.peer, r.request_id,
    r.traceparent, r.attributes
FROM requests r JOIN sources s ON r.source_id = s.source_id;
";

/// The layout before `sources` and `requests` (one `events` table, every field on every row),
/// moved over on open in one transaction. Sources are numbered in the order they first
/// appear; requests keep the order they arrived in (zone maps on `start_unix_ns` stay useful).
const MIGRATE: &str = "
CREATE TEMP TABLE old_sources AS
    SELECT probe_id, experiment, cohort, node, pod, container, pid, exe, role, protocol,
        min(rowid) AS first
    FROM events GROUP BY ALL;
INSERT INTO sources SELECT (row_number() OVER (ORDER BY first) - 1)::UINTEGER,
    probe_id, experiment, cohort, node, pod, container, pid, exe, role, protocol
    FROM old_sources;
INSERT INTO requests SELECT s.source_id, e.sequence, e.method, e.route, e.path, e.status,
    e.grpc_status, e.error, e.start_unix_ns, e.duration_ns,
    CASE WHEN e.start_unix_ns + e.duration_ns::HUGEINT > 18446744073709551615
        THEN 18446744073709551615::UBIGINT ELSE e.start_unix_ns + e.duration_ns END,
    e.bytes_in, e.bytes_out, e.peer,
    e.request_id, e.traceparent, e.attributes
FROM events e JOIN sources s
    ON e.probe_id IS NOT DISTINCT FROM s.probe_id
    AND e.experiment IS NOT DISTINCT FROM s.experiment
    AND e.cohort IS NOT DISTINCT FROM s.cohort AND e.node IS NOT DISTINCT FROM s.node
    AND e.pod IS NOT DISTINCT FROM s.pod AND e.container IS NOT DISTINCT FROM s.container
    AND e.pid IS NOT DISTINCT FROM s.pid AND e.exe IS NOT DISTINCT FROM s.exe
    AND e.role IS NOT DISTINCT FROM s.role AND e.protocol IS NOT DISTINCT FROM s.protocol
ORDER BY e.rowid;
DROP TABLE old_sources;
";

// An UPDATE (and an INSERT for a new probe) takes ~0.3 ms here; `INSERT .. ON CONFLICT DO
// UPDATE` ~1.5 ms, re-planned on every execution. Only the writer connection writes `probes`,
// so nothing can insert the row between the two.
const UPDATE_SEQUENCE: &str = "UPDATE probes SET last_sequence = ? WHERE probe_id = ?";
const INSERT_SEQUENCE: &str = "INSERT INTO probes VALUES (?, ?)";
const INSERT_SOURCE: &str = "INSERT INTO sources VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// How the writer groups batches into transactions.
#[derive(Clone, Copy, Debug)]
pub struct WriterConfig {
    /// A group is committed once it holds this many events (DuckDB's row group size: a
    /// transaction of at least one row group is written to the file directly).
    pub commit_events: usize,
    /// The longest a batch waits for its group to fill (bounds the probe's ack latency).
    pub max_wait: Duration,
    /// Under light load (less than a quarter of `commit_events` per `max_wait` arriving), a
    /// group is committed early when no batch arrives for this long.
    pub idle_wait: Duration,
    /// Events queued for the writer at most; `submit` waits beyond (bounds memory).
    pub max_queued_events: usize,
}

/// DuckDB's row group size.
pub const COMMIT_EVENTS: usize = 122_880;

impl Default for WriterConfig {
    fn default() -> Self {
        Self {
            commit_events: COMMIT_EVENTS,
            max_wait: Duration::from_secs(1),
            idle_wait: Duration::from_millis(20),
            max_queued_events: 4 * COMMIT_EVENTS,
        }
    }
}

/// The `requests` table as Arrow fields, in column order.
fn request_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            use DataType::{Int32, UInt32, UInt64, Utf8};
            let f = |name: &str, t: DataType| Field::new(name, t, true);
            Arc::new(Schema::new(vec![
                f("source_id", UInt32),
                f("sequence", UInt64),
                f("method", Utf8),
                f("route", Utf8),
                f("path", Utf8),
                f("status", Int32),
                f("grpc_status", Int32),
                f("error", Utf8),
                f("start_unix_ns", UInt64),
                f("duration_ns", UInt64),
                f("end_unix_ns", UInt64),
                f("bytes_in", UInt64),
                f("bytes_out", UInt64),
                f("peer", Utf8),
                f("request_id", Utf8),
                f("traceparent", Utf8),
                f("attributes", Utf8),
            ]))
        })
        .clone()
}

/// One row of `sources`: what is constant per process.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Source {
    probe_id: String,
    experiment: String,
    cohort: String,
    node: String,
    pod: Option<String>,
    container: Option<String>,
    pid: u32,
    exe: String,
    role: String,
    protocol: String,
}

impl Source {
    fn of(probe_id: &str, e: &RequestEvent) -> Self {
        Self {
            probe_id: probe_id.to_string(),
            experiment: e.experiment.clone(),
            cohort: e.cohort.clone(),
            node: e.node.clone(),
            pod: opt(&e.pod).map(str::to_string),
            container: opt(&e.container).map(str::to_string),
            pid: e.pid,
            exe: e.exe.clone(),
            role: e.role.clone(),
            protocol: e.protocol.clone(),
        }
    }

    fn is(&self, probe_id: &str, e: &RequestEvent) -> bool {
        self.pid == e.pid
            && self.cohort == e.cohort
            && self.experiment == e.experiment
            && self.node == e.node
            && self.pod.as_deref() == opt(&e.pod)
            && self.container.as_deref() == opt(&e.container)
            && self.exe == e.exe
            && self.role == e.role
            && self.protocol == e.protocol
            && self.probe_id == probe_id
    }
}

/// Whether two events come from the same source.
fn same_source(a: &RequestEvent, b: &RequestEvent) -> bool {
    a.pid == b.pid
        && a.cohort == b.cohort
        && a.experiment == b.experiment
        && a.node == b.node
        && a.pod == b.pod
        && a.container == b.container
        && a.exe == b.exe
        && a.role == b.role
        && a.protocol == b.protocol
}

/// Every source known, by hash, and those not yet committed.
#[derive(Default)]
struct Sources {
    hasher: std::hash::RandomState,
    by_hash: HashMap<u64, Vec<(u32, Arc<Source>)>>,
    by_id: HashMap<u32, Arc<Source>>,
    next_id: u32,
    /// Numbered but not yet in the `sources` table: the writer inserts them with the next
    /// group (every batch naming them was numbered before it was queued).
    unsaved: Vec<(u32, Arc<Source>)>,
}

impl Sources {
    fn hash(&self, probe_id: &str, e: &RequestEvent) -> u64 {
        self.hasher.hash_one((
            probe_id,
            &e.experiment,
            &e.cohort,
            &e.node,
            opt(&e.pod),
            opt(&e.container),
            e.pid,
            &e.exe,
            &e.role,
            &e.protocol,
        ))
    }

    fn insert(&mut self, id: u32, source: Source) {
        let h = self.hash_source(&source);
        self.next_id = self.next_id.max(id.saturating_add(1));
        let source = Arc::new(source);
        self.by_id.insert(id, source.clone());
        self.by_hash.entry(h).or_default().push((id, source));
    }

    fn hash_source(&self, s: &Source) -> u64 {
        self.hasher.hash_one((
            s.probe_id.as_str(),
            &s.experiment,
            &s.cohort,
            &s.node,
            s.pod.as_deref(),
            s.container.as_deref(),
            s.pid,
            &s.exe,
            &s.role,
            &s.protocol,
        ))
    }

    /// The id of the event's source, numbered now if new.
    fn id(&mut self, probe_id: &str, e: &RequestEvent) -> Result<u32, StoreError> {
        let h = self.hash(probe_id, e);
        if let Some(known) = self.by_hash.get(&h)
            && let Some((id, _)) = known.iter().find(|(_, s)| s.is(probe_id, e))
        {
            return Ok(*id);
        }
        let id = self.next_id;
        self.next_id = id
            .checked_add(1)
            .ok_or_else(|| StoreError::Invalid("more than 2^32 sources".into()))?;
        let source = Arc::new(Source::of(probe_id, e));
        self.by_id.insert(id, source.clone());
        self.by_hash
            .entry(h)
            .or_default()
            .push((id, source.clone()));
        self.unsaved.push((id, source));
        Ok(id)
    }
}

/// Numbers each event's source and builds the batch's `requests` columns (no per-row boxing,
/// strings copied once into Arrow buffers) and its cells for the judge.
fn record_batch(
    sources: &Mutex<Sources>,
    probe_id: &str,
    sequence: u64,
    events: &[RequestEvent],
) -> Result<(RecordBatch, BatchCells), StoreError> {
    let n = events.len();
    let mut ids = Vec::with_capacity(n);
    {
        let mut sources = sources.lock().map_err(|_| StoreError::Poisoned)?;
        let mut previous: Option<(&RequestEvent, u32)> = None;
        for e in events {
            let id = match previous {
                Some((p, id)) if same_source(p, e) => id,
                _ => sources.id(probe_id, e)?,
            };
            previous = Some((e, id));
            ids.push(id);
        }
    }
    let cells = BatchCells::of(&ids, events);
    let mut status = Vec::with_capacity(n);
    for e in events {
        status.push(match e.status {
            Some(s) => Some(i32::try_from(s).map_err(|_| {
                StoreError::Invalid(format!("status {s} is beyond a 32-bit signed integer"))
            })?),
            None => None,
        });
    }
    // `nullable`: an empty string is stored as NULL.
    let strings = |get: fn(&RequestEvent) -> &str, nullable: bool| -> ArrayRef {
        let bytes = events.iter().map(|e| get(e).len()).sum();
        let mut b = StringBuilder::with_capacity(n, bytes);
        for e in events {
            if nullable {
                b.append_option(opt(get(e)));
            } else {
                b.append_value(get(e));
            }
        }
        Arc::new(b.finish())
    };
    let u64s = |get: fn(&RequestEvent) -> u64| -> ArrayRef {
        Arc::new(UInt64Array::from_iter_values(events.iter().map(get)))
    };
    let mut attributes = StringBuilder::with_capacity(n, 0);
    let mut json = Vec::new();
    for e in events {
        if e.attributes.is_empty() {
            attributes.append_null();
        } else {
            json.clear();
            match serde_json::to_writer(&mut json, &e.attributes) {
                Ok(()) => attributes.append_value(String::from_utf8_lossy(&json)),
                Err(_) => attributes.append_null(),
            }
        }
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from(ids)),
        Arc::new(UInt64Array::from_value(sequence, n)),
        strings(|e| &e.method, false),
        strings(|e| &e.route, true),
        strings(|e| &e.path, false),
        Arc::new(Int32Array::from(status)),
        Arc::new(Int32Array::from_iter(events.iter().map(|e| e.grpc_status))),
        strings(|e| &e.error, true),
        u64s(|e| e.start_unix_ns),
        u64s(|e| e.duration_ns),
        u64s(|e| e.start_unix_ns.saturating_add(e.duration_ns)),
        u64s(|e| e.bytes_in),
        u64s(|e| e.bytes_out),
        strings(|e| &e.peer, true),
        strings(|e| &e.request_id, true),
        strings(|e| &e.traceparent, true),
        Arc::new(attributes.finish()),
    ];
    let batch = RecordBatch::try_new(request_schema(), columns)
        .map_err(|e| StoreError::DuckDb(duckdb::Error::ToSqlConversionFailure(Box::new(e))))?;
    Ok((batch, cells))
}

/// A batch waiting for the writer, and where its outcome goes.
struct Queued {
    probe_id: String,
    sequence: u64,
    batch: RecordBatch,
    /// The batch's cells, added to the fold once it is committed.
    cells: BatchCells,
    outcome: tokio::sync::oneshot::Sender<Result<(), StoreError>>,
    /// Tests: DuckDB refuses this batch.
    #[cfg(test)]
    refuse: bool,
}

enum ToWriter {
    Batch(Queued),
    /// Commit what is queued now, then answer.
    Flush(mpsc::Sender<()>),
}

/// What the store's callers and its writer share.
struct Shared {
    sources: Mutex<Sources>,
    /// The judge's cells of what was committed since the store was opened.
    fold: Mutex<Fold>,
    /// Events queued for the writer (handed over, outcome not yet sent).
    queued: Mutex<usize>,
    room: Condvar,
    config: WriterConfig,
}

impl Shared {
    fn release(&self, events: usize) {
        if let Ok(mut q) = self.queued.lock() {
            *q = q.saturating_sub(events);
        }
        self.room.notify_all();
    }
}

pub struct DuckDbStore {
    /// Reads. A connection of its own, so a long query does not hold up the ingest (DuckDB's
    /// MVCC: reads see committed batches, commits do not wait for reads).
    conn: Mutex<Connection>,
    shared: Arc<Shared>,
    to_writer: Option<mpsc::Sender<ToWriter>>,
    writer: Option<JoinHandle<()>>,
}

impl DuckDbStore {
    /// Opens (or creates) the database file and its schema; a file of the earlier layout is
    /// moved over first.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, WriterConfig::default())
    }

    pub fn open_with(path: &Path, config: WriterConfig) -> Result<Self, StoreError> {
        let mut conn = Connection::open(path)?;
        let events: Option<String> = conn
            .query_row(
                "SELECT table_type FROM information_schema.tables \
                 WHERE table_schema = 'main' AND table_name = 'events'",
                [],
                |r| r.get(0),
            )
            .map(Some)
            .or_else(|e| match e {
                duckdb::Error::QueryReturnedNoRows => Ok(None),
                e => Err(e),
            })?;
        if events.as_deref() == Some("BASE TABLE") {
            migrate(&mut conn).map_err(|e| {
                StoreError::Layout(format!(
                    "{} holds events in the layout of bakeoff before the `sources` table, and \
                     moving them over failed ({e}); nothing was changed: open it with the \
                     earlier bakeoff to export the events, or move the file away to start a \
                     new one",
                    path.display()
                ))
            })?;
        } else {
            conn.execute_batch(SCHEMA)?;
            conn.execute_batch(VIEW)?;
        }
        let mut sources = Sources::default();
        {
            let mut stmt = conn.prepare(
                "SELECT source_id, probe_id, experiment, cohort, node, pod, container, pid, exe, \
                 role, protocol FROM sources",
            )?;
            let mut rows = stmt.query([])?;
            while let Some(r) = rows.next()? {
                let text = |i: usize| -> Result<String, duckdb::Error> {
                    Ok(r.get::<_, Option<String>>(i)?.unwrap_or_default())
                };
                let source = Source {
                    probe_id: text(1)?,
                    experiment: text(2)?,
                    cohort: text(3)?,
                    node: text(4)?,
                    pod: r.get(5)?,
                    container: r.get(6)?,
                    pid: r.get::<_, Option<u32>>(7)?.unwrap_or_default(),
                    exe: text(8)?,
                    role: text(9)?,
                    protocol: text(10)?,
                };
                sources.insert(r.get(0)?, source);
            }
        }
        let latest_end: Option<u64> =
            conn.query_row("SELECT max(end_unix_ns) FROM requests", [], |r| r.get(0))?;
        let shared = Arc::new(Shared {
            sources: Mutex::new(sources),
            fold: Mutex::new(Fold::new(latest_end)),
            queued: Mutex::new(0),
            room: Condvar::new(),
            config,
        });
        let writer_conn = conn.try_clone()?;
        let (tx, rx) = mpsc::channel();
        let writer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("duckdb-writer".into())
                .spawn(move || Writer::new(writer_conn, shared).run(rx))
                .map_err(|e| StoreError::Layout(format!("cannot start the writer thread: {e}")))?
        };
        Ok(Self {
            conn: Mutex::new(conn),
            shared,
            to_writer: Some(tx),
            writer: Some(writer),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    fn send(&self, msg: ToWriter) -> Result<(), StoreError> {
        self.to_writer
            .as_ref()
            .ok_or(StoreError::WriterStopped)?
            .send(msg)
            .map_err(|_| StoreError::WriterStopped)
    }

    /// Queues a built batch for the writer, waiting while the queue is full.
    fn queue(
        &self,
        probe_id: &str,
        sequence: u64,
        (batch, cells): (RecordBatch, BatchCells),
        #[cfg(test)] refuse: bool,
    ) -> Result<Pending, StoreError> {
        let n = batch.num_rows();
        {
            let mut queued = self
                .shared
                .queued
                .lock()
                .map_err(|_| StoreError::Poisoned)?;
            while *queued > 0 && *queued + n > self.shared.config.max_queued_events {
                queued = self
                    .shared
                    .room
                    .wait(queued)
                    .map_err(|_| StoreError::Poisoned)?;
            }
            *queued += n;
        }
        let (outcome, rx) = tokio::sync::oneshot::channel();
        let sent = self.send(ToWriter::Batch(Queued {
            probe_id: probe_id.to_string(),
            sequence,
            batch,
            cells,
            outcome,
            #[cfg(test)]
            refuse,
        }));
        if let Err(e) = sent {
            self.shared.release(n);
            return Err(e);
        }
        Ok(Pending::waiting(rx))
    }

    /// Waits until everything queued so far is committed (or failed).
    fn flush(&self) -> Result<(), StoreError> {
        let (tx, rx) = mpsc::channel();
        self.send(ToWriter::Flush(tx))?;
        rx.recv().map_err(|_| StoreError::WriterStopped)
    }
}

impl Drop for DuckDbStore {
    /// Commits what is queued and stops the writer (so the file can be opened again).
    fn drop(&mut self) {
        self.to_writer = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// Moves a file of the earlier layout over, in one transaction.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let started = Instant::now();
    let tx = conn.transaction()?;
    let before: u64 = tx.query_row("SELECT count(*) FROM events", [], |r| r.get(0))?;
    tracing::info!(
        events = before,
        "moving the database over to the sources/requests layout"
    );
    tx.execute_batch(SCHEMA)?;
    tx.execute_batch(MIGRATE)?;
    let after: u64 = tx.query_row("SELECT count(*) FROM requests", [], |r| r.get(0))?;
    if after != before {
        return Err(StoreError::Layout(format!(
            "{after} of {before} events moved"
        )));
    }
    tx.execute_batch("DROP TABLE events;")?;
    tx.execute_batch(VIEW)?;
    tx.commit()?;
    tracing::info!(
        events = before,
        seconds = started.elapsed().as_secs_f64(),
        "database moved over to the sources/requests layout"
    );
    Ok(())
}

/// The writer thread: commits queued batches in groups.
struct Writer {
    conn: Connection,
    shared: Arc<Shared>,
    /// Per probe, a sequence that failed: later batches of the probe fail too, until a batch at
    /// or below it (the probe's resend) comes.
    failed: HashMap<String, u64>,
    /// Events arriving per second, smoothed over the last groups.
    rate: f64,
}

impl Writer {
    fn new(conn: Connection, shared: Arc<Shared>) -> Self {
        Self {
            conn,
            shared,
            failed: HashMap::new(),
            rate: 0.0,
        }
    }

    /// Whether enough arrives that a group is worth waiting for.
    fn sustained(&self) -> bool {
        let c = self.shared.config;
        self.rate * c.max_wait.as_secs_f64() >= c.commit_events as f64 / 4.0
    }

    fn run(mut self, rx: mpsc::Receiver<ToWriter>) {
        let config = self.shared.config;
        let mut open = true;
        // Start of the current cycle (waiting for a group, collecting it, committing it).
        let mut cycle = Instant::now();
        while open {
            let Ok(first) = rx.recv() else { break };
            let (mut group, mut flushes) = (Vec::new(), Vec::new());
            let mut events = 0;
            let take = |msg: ToWriter,
                        group: &mut Vec<Queued>,
                        flushes: &mut Vec<mpsc::Sender<()>>,
                        events: &mut usize| match msg {
                ToWriter::Batch(q) => {
                    *events += q.batch.num_rows();
                    group.push(q);
                }
                ToWriter::Flush(done) => flushes.push(done),
            };
            take(first, &mut group, &mut flushes, &mut events);
            let started = Instant::now();
            let mut last = started;
            let sustained = self.sustained();
            while events < config.commit_events && flushes.is_empty() {
                let now = Instant::now();
                let mut until = started + config.max_wait;
                if !sustained {
                    until = until.min(last + config.idle_wait);
                }
                let Some(wait) = until.checked_duration_since(now).filter(|w| !w.is_zero()) else {
                    break;
                };
                match rx.recv_timeout(wait) {
                    Ok(msg) => {
                        take(msg, &mut group, &mut flushes, &mut events);
                        last = Instant::now();
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => break,
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            tracing::debug!(
                events,
                batches = group.len(),
                waited_ms = started.elapsed().as_millis() as u64,
                sustained,
                "committing a group"
            );
            self.commit_group(group);
            let now = Instant::now();
            let seconds = now.duration_since(cycle).as_secs_f64().max(1e-3);
            self.rate = 0.5 * self.rate + 0.5 * events as f64 / seconds;
            cycle = now;
            for done in flushes {
                let _ = done.send(());
            }
        }
    }

    /// Commits `group` in one transaction and sends each batch its outcome.
    fn commit_group(&mut self, group: Vec<Queued>) {
        // Batches of a probe after one of its failures fail without being tried.
        let (mut doomed, group): (Vec<Queued>, Vec<Queued>) = group.into_iter().partition(|q| {
            self.failed
                .get(&q.probe_id)
                .is_some_and(|f| q.sequence > *f)
        });
        for q in &group {
            if self
                .failed
                .get(&q.probe_id)
                .is_some_and(|f| q.sequence <= *f)
            {
                self.failed.remove(&q.probe_id);
            }
        }
        let mut outcomes: Vec<(Queued, Result<(), StoreError>)> = Vec::new();
        match self.commit(&group) {
            Ok(()) => outcomes.extend(group.into_iter().map(|q| (q, Ok(())))),
            // One bad batch must not fail the others: each alone, in order.
            Err(e) if group.len() == 1 => {
                if let Some(q) = group.into_iter().next() {
                    outcomes.push((q, Err(e)));
                }
            }
            Err(_) => {
                for q in group {
                    let r = match self.failed.get(&q.probe_id) {
                        Some(f) if q.sequence > *f => Err(after_failure(*f)),
                        _ => self.commit(std::slice::from_ref(&q)),
                    };
                    if r.is_err() {
                        self.failed.entry(q.probe_id.clone()).or_insert(q.sequence);
                    }
                    outcomes.push((q, r));
                }
            }
        }
        for (q, r) in &outcomes {
            if r.is_err() {
                self.failed.entry(q.probe_id.clone()).or_insert(q.sequence);
            }
        }
        for q in doomed.drain(..) {
            let f = self.failed.get(&q.probe_id).copied().unwrap_or_default();
            outcomes.push((q, Err(after_failure(f))));
        }
        // Into the judge's fold before anyone hears a batch is stored.
        if let Ok(mut fold) = self.shared.fold.lock() {
            for (q, r) in &mut outcomes {
                if r.is_ok() {
                    fold.add(std::mem::take(&mut q.cells));
                }
            }
        }
        let mut released = 0;
        for (q, r) in outcomes {
            released += q.batch.num_rows();
            let _ = q.outcome.send(r);
        }
        self.shared.release(released);
    }

    /// Appends `group`, the sources not yet saved and each probe's highest sequence in the
    /// group in one transaction.
    fn commit(&mut self, group: &[Queued]) -> Result<(), StoreError> {
        if group.is_empty() {
            return Ok(());
        }
        // Every batch in the group was numbered before it was queued: its new sources are here.
        let unsaved: Vec<(u32, Arc<Source>)> = self
            .shared
            .sources
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .unsaved
            .clone();
        let tx = self.conn.transaction()?;
        {
            let mut insert = tx.prepare_cached(INSERT_SOURCE)?;
            for (id, s) in &unsaved {
                insert.execute(params![
                    id,
                    s.probe_id,
                    s.experiment,
                    s.cohort,
                    s.node,
                    s.pod,
                    s.container,
                    s.pid,
                    s.exe,
                    s.role,
                    s.protocol
                ])?;
            }
        }
        {
            let mut app = tx.appender("requests")?;
            for q in group.iter().filter(|q| q.batch.num_rows() > 0) {
                #[cfg(test)]
                if q.refuse {
                    return Err(StoreError::Invalid("refused by the test".into()));
                }
                app.append_record_batch(q.batch.clone())?;
            }
            app.flush()?;
        }
        let mut last: Vec<(&str, u64)> = Vec::new();
        for q in group {
            match last.iter_mut().find(|(p, _)| *p == q.probe_id) {
                Some((_, s)) => *s = (*s).max(q.sequence),
                None => last.push((&q.probe_id, q.sequence)),
            }
        }
        for (probe_id, sequence) in last {
            if tx
                .prepare_cached(UPDATE_SEQUENCE)?
                .execute(params![sequence, probe_id])?
                == 0
            {
                tx.prepare_cached(INSERT_SEQUENCE)?
                    .execute(params![probe_id, sequence])?;
            }
        }
        tx.commit()?;
        if !unsaved.is_empty() {
            let mut sources = self
                .shared
                .sources
                .lock()
                .map_err(|_| StoreError::Poisoned)?;
            sources
                .unsaved
                .retain(|(id, _)| !unsaved.iter().any(|(saved, _)| saved == id));
        }
        Ok(())
    }
}

fn after_failure(sequence: u64) -> StoreError {
    StoreError::Invalid(format!(
        "batch {sequence} of this probe failed before: later batches wait for its resend"
    ))
}

impl Store for DuckDbStore {
    fn last_sequence(&self, probe_id: &str) -> Result<u64, StoreError> {
        // Batches already handed to the store count (a probe reconnecting while its last batch
        // is being stored must not send it again).
        self.flush()?;
        let conn = self.conn()?;
        let mut stmt = conn.prepare("SELECT last_sequence FROM probes WHERE probe_id = ?")?;
        let mut rows = stmt.query(params![probe_id])?;
        Ok(match rows.next()? {
            Some(row) => row.get(0)?,
            None => 0,
        })
    }

    fn append(
        &self,
        probe_id: &str,
        sequence: u64,
        events: &[RequestEvent],
    ) -> Result<(), StoreError> {
        self.submit(probe_id, sequence, events)?.wait()
    }

    fn submit(
        &self,
        probe_id: &str,
        sequence: u64,
        events: &[RequestEvent],
    ) -> Result<Pending, StoreError> {
        let batch = record_batch(&self.shared.sources, probe_id, sequence, events)?;
        self.queue(
            probe_id,
            sequence,
            batch,
            #[cfg(test)]
            false,
        )
    }

    fn events(&self, filter: &Filter, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let (clause, values) = filter.to_sql()?;
        let cols: Vec<String> = EVENT_COLUMNS
            .iter()
            .map(|c| {
                if FIELDS.contains(c) || *c == "attributes" {
                    format!("CAST({c} AS VARCHAR)")
                } else {
                    c.to_string()
                }
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM events WHERE {clause} ORDER BY start_unix_ns DESC LIMIT {limit}",
            cols.join(", ")
        );
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(duckdb::params_from_iter(values.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let mut m = StoredEvent::new();
            for (i, c) in EVENT_COLUMNS.iter().enumerate() {
                let v = if FIELDS.contains(c) || *c == "attributes" {
                    match row.get::<_, Option<String>>(i)? {
                        Some(s) if matches!(*c, "pid" | "status" | "grpc_status") => s
                            .parse::<i64>()
                            .map(Into::into)
                            .unwrap_or(serde_json::Value::Null),
                        Some(s) if *c == "attributes" => {
                            serde_json::from_str(&s).unwrap_or(serde_json::Value::Null)
                        }
                        Some(s) => s.into(),
                        None => serde_json::Value::Null,
                    }
                } else {
                    row.get::<_, u64>(i)?.into()
                };
                m.insert(c.to_string(), v);
            }
            out.push(m);
        }
        Ok(out)
    }

    fn group(&self, filter: &Filter, by: &[String]) -> Result<Vec<GroupRow>, StoreError> {
        let fields = group_fields(by)?;
        let (clause, values) = filter.to_sql()?;
        let keys: Vec<String> = fields
            .iter()
            .map(|f| format!("CAST({f} AS VARCHAR)"))
            .collect();
        let key_sql = if keys.is_empty() {
            "NULL".to_string()
        } else {
            keys.join(", ")
        };
        let group_sql = if keys.is_empty() {
            String::new()
        } else {
            format!("GROUP BY {}", keys.join(", "))
        };
        let sql = format!(
            "SELECT {key_sql}, count(*), count(*) FILTER (WHERE {ERROR_SQL}), \
             quantile_cont(duration_ns, 0.5) / 1e6, quantile_cont(duration_ns, 0.9) / 1e6, \
             quantile_cont(duration_ns, 0.99) / 1e6, coalesce(sum(bytes_out), 0)::UBIGINT \
             FROM events WHERE {clause} {group_sql} ORDER BY count(*) DESC"
        );
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(duckdb::params_from_iter(values.iter()))?;
        let n = keys.len().max(1);
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let requests: u64 = row.get(n)?;
            if requests == 0 {
                continue;
            }
            out.push(GroupRow {
                key: (0..keys.len())
                    .map(|i| row.get::<_, Option<String>>(i))
                    .collect::<Result<_, _>>()?,
                requests,
                errors: row.get(n + 1)?,
                p50_ms: row.get::<_, Option<f64>>(n + 2)?.unwrap_or(f64::NAN),
                p90_ms: row.get::<_, Option<f64>>(n + 3)?.unwrap_or(f64::NAN),
                p99_ms: row.get::<_, Option<f64>>(n + 4)?.unwrap_or(f64::NAN),
                bytes_out: row.get(n + 5)?,
            });
        }
        Ok(out)
    }

    fn delete_before(&self, unix_ns: u64) -> Result<u64, StoreError> {
        // Requests that started before `unix_ns` and are judged end before this second.
        self.shared
            .fold
            .lock()
            .map_err(|_| StoreError::Poisoned)?
            .forget_before(unix_ns.saturating_add(MAX_DURATION_NS) / SECOND_NS + 1);
        let conn = self.conn()?;
        let n = conn.execute(
            "DELETE FROM requests WHERE start_unix_ns < ?",
            params![unix_ns],
        )?;
        Ok(n as u64)
    }

    fn samples(&self, filter: &Filter, limit: Option<usize>) -> Result<Vec<SampleRow>, StoreError> {
        let (clause, values) = filter.to_sql()?;
        // The most recent `limit`, returned oldest first.
        let sql = match limit {
            Some(n) => format!(
                "SELECT * FROM (SELECT {SAMPLE_COLUMNS} FROM events WHERE {clause} ORDER BY start_unix_ns DESC LIMIT {n}) ORDER BY start_unix_ns"
            ),
            None => {
                format!("SELECT {SAMPLE_COLUMNS} FROM events WHERE {clause} ORDER BY start_unix_ns")
            }
        };
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query(duckdb::params_from_iter(values.iter()))?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            out.push(SampleRow {
                cohort: row.get(0)?,
                method: row.get(1)?,
                path: row.get(2)?,
                start_unix_ns: row.get(3)?,
                duration_ns: row.get(4)?,
                status: row.get(5)?,
                grpc_status: row.get(6)?,
                error: row.get(7)?,
                peer: row.get(8)?,
                node: row.get(9)?,
                pod: row.get(10)?,
                exe: row.get(11)?,
                attributes: row.get(12)?,
            });
        }
        Ok(out)
    }

    fn latest_end(&self, since_ns: u64) -> Result<Option<u64>, StoreError> {
        let conn = self.conn()?;
        let mut stmt =
            conn.prepare("SELECT max(end_unix_ns) FROM requests WHERE start_unix_ns >= ?")?;
        let mut rows = stmt.query(params![since_ns])?;
        Ok(match rows.next()? {
            Some(row) => row.get(0)?,
            None => None,
        })
    }

    fn cells(&self, from_ns: u64, to_ns: u64) -> Result<Vec<CellRow>, StoreError> {
        if from_ns.is_multiple_of(SECOND_NS) && to_ns.is_multiple_of(SECOND_NS) {
            let mut fold = self.shared.fold.lock().map_err(|_| StoreError::Poisoned)?;
            let sources = self
                .shared
                .sources
                .lock()
                .map_err(|_| StoreError::Poisoned)?;
            let taken = fold.take(from_ns / SECOND_NS, to_ns / SECOND_NS, |id| {
                let s = sources.by_id.get(&id)?;
                Some((s.experiment.clone(), s.cohort.clone()))
            });
            if let Some(rows) = taken {
                return Ok(rows);
            }
        }
        self.cells_from_table(from_ns, to_ns)
    }
}

impl DuckDbStore {
    /// The judge's cells read from the `requests` table (what the fold holds, for any range).
    fn cells_from_table(&self, from_ns: u64, to_ns: u64) -> Result<Vec<CellRow>, StoreError> {
        let sql = format!(
            // Aggregated per source first (a small integer), then per experiment and cohort.
            "SELECT s.experiment, s.cohort, c.method, c.ep, c.second, c.bucket, \
             sum(c.n)::UBIGINT, sum(c.errors)::UBIGINT, sum(c.unanswered)::UBIGINT FROM ( \
             SELECT source_id, method, split_part(coalesce(route, path), '?', 1) AS ep, \
             end_unix_ns // 1000000000 AS second, \
             CASE WHEN {UNANSWERED_SQL} THEN {NO_LATENCY} \
             ELSE CAST(floor(log2(greatest(duration_ns, 1)::DOUBLE) * 128) AS INTEGER) END AS bucket, \
             count(*) AS n, count(*) FILTER (WHERE {ERROR_SQL}) AS errors, \
             count(*) FILTER (WHERE {UNANSWERED_SQL}) AS unanswered \
             FROM requests WHERE end_unix_ns >= ? AND end_unix_ns < ? AND duration_ns <= ? \
             GROUP BY source_id, method, ep, second, bucket) c \
             JOIN sources s ON c.source_id = s.source_id \
             WHERE s.protocol NOT IN {CONNECTION_PROTOCOLS_SQL} \
             GROUP BY s.experiment, s.cohort, c.method, c.ep, c.second, c.bucket"
        );
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&sql)?;
        // Rows arrive about in the order requests end: zone maps on `end_unix_ns` let DuckDB
        // read only the row groups of these seconds.
        let mut rows = stmt.query(params![from_ns, to_ns, MAX_DURATION_NS])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let method: String = row.get(2)?;
            let path: String = row.get(3)?;
            out.push(CellRow {
                experiment: row.get::<_, String>(0)?.into(),
                cohort: row.get::<_, String>(1)?.into(),
                endpoint: crate::series::endpoint(&method, &path).into(),
                second: row.get(4)?,
                bucket: row.get(5)?,
                requests: row.get(6)?,
                errors: row.get(7)?,
                unanswered: row.get(8)?,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A new database file; removed (with its WAL) when dropped.
    struct TempDb(std::path::PathBuf);

    impl TempDb {
        fn new(name: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("bakeoff-{name}-{}.duckdb", std::process::id()));
            let db = Self(path);
            db.remove();
            db
        }

        fn remove(&self) {
            let _ = std::fs::remove_file(&self.0);
            let _ = std::fs::remove_file(self.0.with_extension("duckdb.wal"));
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            self.remove();
        }
    }

    #[test]
    fn conforms() {
        let db = TempDb::new("store");
        let store = DuckDbStore::open(&db.0).unwrap();
        super::super::conformance::check(&store);
        drop(store);
        // Reopening keeps everything and the sequences.
        let store = DuckDbStore::open(&db.0).unwrap();
        super::super::conformance::check_reopened(&store);
    }

    /// Events shaped like `bakeoff-bench`'s synthetic probe traffic.
    fn synthetic(n: usize) -> Vec<RequestEvent> {
        (0..n)
            .map(|k| RequestEvent {
                experiment: "bench".into(),
                cohort: if k % 10 == 0 { "canary" } else { "baseline" }.into(),
                node: "node-0".into(),
                pid: 1000,
                exe: "/usr/bin/service".into(),
                role: "server".into(),
                protocol: "http1".into(),
                method: "GET".into(),
                path: format!("/api/items/{}", k % 50),
                status: Some(if k % 97 == 0 { 503 } else { 200 }),
                start_unix_ns: 1_700_000_000_000_000_000 + k as u64 * 100,
                duration_ns: 1_000_000 + (k as u64 * 7919) % 5_000_000,
                bytes_in: 120,
                bytes_out: 2048,
                peer: "10.0.0.1:40000".into(),
                request_id: format!("0-{k}"),
                attributes: if k % 4 == 0 {
                    [("user_agent".to_string(), "curl/8.5".to_string())].into()
                } else {
                    Default::default()
                },
                ..RequestEvent::default()
            })
            .collect()
    }

    fn count(store: &DuckDbStore, probe_id: &str) -> u64 {
        let conn = store.conn().unwrap();
        conn.query_row(
            "SELECT count(*) FROM events WHERE probe_id = ?",
            params![probe_id],
            |r| r.get(0),
        )
        .unwrap()
    }

    /// Events of every kind the cell rules tell apart, over `seconds` seconds.
    fn varied(n: usize, seconds: u64, seed: u64) -> Vec<RequestEvent> {
        let mut x = seed;
        let mut next = |m: u64| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 11) % m
        };
        (0..n)
            .map(|_| {
                let protocol = ["http1", "http1", "grpc", "tcp", "tls"][next(5) as usize];
                let status = [None, Some(200), Some(404), Some(503)][next(4) as usize];
                let error = ["", "", "connection reset"][next(3) as usize];
                let duration_ns = match next(6) {
                    0 => 0,
                    1 => MAX_DURATION_NS + 1,
                    _ => 1 + next(50_000_000),
                };
                RequestEvent {
                    experiment: ["a", "b"][next(2) as usize].into(),
                    cohort: ["baseline", "canary"][next(2) as usize].into(),
                    node: "n".into(),
                    pid: 10 + next(3) as u32,
                    protocol: protocol.into(),
                    method: ["GET", "POST"][next(2) as usize].into(),
                    route: ["", "/users/:id"][next(2) as usize].into(),
                    path: format!("/users/{}?q={}", next(3), next(100)),
                    status,
                    grpc_status: [None, Some(0), Some(14)][next(3) as usize],
                    error: error.into(),
                    start_unix_ns: 1_700_000_000 * SECOND_NS + next(seconds * SECOND_NS),
                    duration_ns,
                    ..RequestEvent::default()
                }
            })
            .collect()
    }

    /// (experiment, cohort, endpoint, second, bucket) and its requests, errors, unanswered.
    type SummedCell = (Arc<str>, Arc<str>, Arc<str>, u64, i32, [u64; 3]);

    /// Cells summed per (experiment, cohort, endpoint, second, bucket), in order.
    fn summed(rows: Vec<CellRow>) -> Vec<SummedCell> {
        let mut m: std::collections::BTreeMap<_, [u64; 3]> = Default::default();
        for r in rows {
            let c = m
                .entry((r.experiment, r.cohort, r.endpoint, r.second, r.bucket))
                .or_default();
            c[0] += r.requests;
            c[1] += r.errors;
            c[2] += r.unanswered;
        }
        m.into_iter()
            .map(|((e, c, p, s, b), n)| (e, c, p, s, b, n))
            .collect()
    }

    #[test]
    fn cells_folded_at_ingest_are_the_tables() {
        let db = TempDb::new("fold");
        let store = DuckDbStore::open(&db.0).unwrap();
        for seq in 1..=6 {
            store.append("p", seq, &varied(2_000, 10, seq)).unwrap();
        }
        let s0 = 1_700_000_000;
        let range = |a: u64, b: u64| ((s0 + a) * SECOND_NS, (s0 + b) * SECOND_NS);
        // Every second, in three reads as the judge makes them, folded against the table.
        for (a, b) in [(0, 3), (3, 4), (4, 12)] {
            let (from, to) = range(a, b);
            let table = summed(store.cells_from_table(from, to).unwrap());
            assert!(table.len() > 50, "{}", table.len());
            assert_eq!(
                summed(store.cells(from, to).unwrap()),
                table,
                "seconds {a}..{b}"
            );
        }
        // A late request for a second read already is in the table, not counted twice.
        store.append("p", 7, &varied(100, 3, 99)).unwrap();
        let (from, to) = range(0, 3);
        assert_eq!(
            summed(store.cells(from, to).unwrap()),
            summed(store.cells_from_table(from, to).unwrap())
        );
        // After a reopen, what was stored before is read from the table, later seconds folded.
        drop(store);
        let store = DuckDbStore::open(&db.0).unwrap();
        let later: Vec<RequestEvent> = varied(1_000, 5, 7)
            .into_iter()
            .map(|mut e| {
                e.start_unix_ns += 20 * SECOND_NS;
                e
            })
            .collect();
        store.append("p", 8, &later).unwrap();
        for (a, b) in [(0, 20), (20, 30)] {
            let (from, to) = range(a, b);
            assert_eq!(
                summed(store.cells(from, to).unwrap()),
                summed(store.cells_from_table(from, to).unwrap()),
                "seconds {a}..{b} after a reopen"
            );
        }
        let held = store.shared.fold.lock().unwrap();
        assert!(held.is_empty(), "{held:?}");
    }

    #[test]
    fn concurrent_appends_keep_every_batch_and_sequence() {
        let db = TempDb::new("group-commit");
        let store = DuckDbStore::open(&db.0).unwrap();
        let batch = synthetic(100);
        std::thread::scope(|scope| {
            for t in 0..4 {
                let (store, batch) = (&store, &batch);
                scope.spawn(move || {
                    for seq in 1..=25 {
                        store.append(&format!("p{t}"), seq, batch).unwrap();
                    }
                });
            }
        });
        for t in 0..4 {
            let probe = format!("p{t}");
            assert_eq!(store.last_sequence(&probe).unwrap(), 25);
            assert_eq!(count(&store, &probe), 2_500);
        }
        // Columns land where they belong.
        let conn = store.conn().unwrap();
        let (sequence, path, status, pod, attributes): (u64, String, i64, Option<String>, String) =
            conn.query_row(
                "SELECT sequence, path, status, pod, attributes FROM events \
                 WHERE probe_id = 'p2' AND sequence = 7 AND request_id = '0-0'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
            )
            .unwrap();
        assert_eq!((sequence, path.as_str(), status), (7, "/api/items/0", 503));
        assert_eq!(pod, None);
        assert_eq!(attributes, r#"{"user_agent":"curl/8.5"}"#);
    }

    #[test]
    fn a_bad_batch_fails_alone_in_its_group() {
        let db = TempDb::new("bad-batch");
        // One group for everything queued below.
        let store = DuckDbStore::open_with(
            &db.0,
            WriterConfig {
                idle_wait: Duration::from_millis(500),
                max_wait: Duration::from_secs(2),
                ..WriterConfig::default()
            },
        )
        .unwrap();
        let queue = |probe: &str, seq: u64, events: &[RequestEvent], refuse: bool| {
            let batch = record_batch(&store.shared.sources, probe, seq, events).unwrap();
            store.queue(probe, seq, batch, refuse).unwrap()
        };
        let outcomes = [
            queue("good", 1, &synthetic(3), false),
            queue("bad", 1, &synthetic(3), true),
            queue("bad", 2, &synthetic(3), false),
            queue("other", 1, &synthetic(2), false),
        ]
        .map(|p| p.wait().is_ok());
        // The batch after the refused one of its probe fails too: its sequence must not cover
        // the refused one.
        assert_eq!(outcomes, [true, false, false, true]);
        assert_eq!(
            ["good", "bad", "other"].map(|p| (store.last_sequence(p).unwrap(), count(&store, p))),
            [(1, 3), (0, 0), (1, 2)]
        );
        // The probe's resend is stored.
        store.append("bad", 1, &synthetic(3)).unwrap();
        store.append("bad", 2, &synthetic(3)).unwrap();
        assert_eq!(
            (store.last_sequence("bad").unwrap(), count(&store, "bad")),
            (2, 6)
        );
        // A status beyond INTEGER is refused before it is queued.
        let mut bad = synthetic(3);
        bad[1].status = Some(u32::MAX);
        assert!(matches!(
            store.append("bad", 3, &bad),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn sources_are_numbered_once_and_survive_a_reopen() {
        let db = TempDb::new("sources");
        let store = DuckDbStore::open(&db.0).unwrap();
        let mut events = synthetic(10);
        events[3].pod = "pod-a".into();
        events[7].pid = 7;
        store.append("p", 1, &events).unwrap();
        store.append("p", 2, &events).unwrap();
        store.append("q", 1, &events).unwrap();
        let sources = |store: &DuckDbStore| -> u64 {
            store
                .conn()
                .unwrap()
                .query_row("SELECT count(*) FROM sources", [], |r| r.get(0))
                .unwrap()
        };
        // Per probe: baseline and canary, one with a pod, one with another pid.
        assert_eq!(sources(&store), 8);
        drop(store);
        let store = DuckDbStore::open(&db.0).unwrap();
        store.append("p", 3, &events).unwrap();
        assert_eq!(sources(&store), 8);
        let conn = store.conn().unwrap();
        let (pod, pid): (Option<String>, u32) = conn
            .query_row(
                "SELECT pod, pid FROM events WHERE sequence = 3 AND request_id = '0-3'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((pod.as_deref(), pid), (Some("pod-a"), 1000));
    }

    /// The layout before `sources`: one `events` table.
    const OLD_SCHEMA: &str = "
CREATE TABLE events (
    probe_id VARCHAR, sequence UBIGINT,
    experiment VARCHAR, cohort VARCHAR, node VARCHAR, pod VARCHAR, container VARCHAR,
    pid UINTEGER, exe VARCHAR, role VARCHAR, protocol VARCHAR, method VARCHAR, route VARCHAR,
    path VARCHAR, status INTEGER, grpc_status INTEGER, error VARCHAR,
    start_unix_ns UBIGINT, duration_ns UBIGINT, bytes_in UBIGINT, bytes_out UBIGINT,
    peer VARCHAR, request_id VARCHAR, traceparent VARCHAR, attributes VARCHAR
);
CREATE TABLE probes (probe_id VARCHAR PRIMARY KEY, last_sequence UBIGINT NOT NULL);
INSERT INTO probes VALUES ('p', 2), ('q', 7);
";

    #[test]
    fn a_file_of_the_old_layout_is_moved_over() {
        let db = TempDb::new("migrate");
        {
            let conn = Connection::open(&db.0).unwrap();
            conn.execute_batch(OLD_SCHEMA).unwrap();
            conn.execute_batch(
                "INSERT INTO events VALUES
                 ('p', 1, 'e', 'baseline', 'n', NULL, NULL, 1, 'x', 'server', 'http1', 'GET', NULL, '/a', 200, NULL, NULL, 1000, 5, 1, 2, 'peer', 'r1', NULL, '{\"client\":\"mobile\"}'),
                 ('p', 2, 'e', 'canary', 'n', 'pod', NULL, 2, 'x', 'server', 'http1', 'GET', NULL, '/b', 500, NULL, NULL, 2000, 5, 1, 2, NULL, 'r2', NULL, NULL),
                 ('p', 2, 'e', 'baseline', 'n', NULL, NULL, 1, 'x', 'server', 'http1', 'POST', '/c/{id}', '/c/1', NULL, NULL, 'reset', 3000, 0, 1, 0, NULL, 'r3', NULL, NULL),
                 ('q', 7, 'e', 'baseline', 'm', NULL, NULL, 1, 'x', 'server', 'http1', 'GET', NULL, '/a', 200, NULL, NULL, 4000, 5, 1, 2, NULL, 'r4', NULL, NULL)",
            )
            .unwrap();
        }
        let store = DuckDbStore::open(&db.0).unwrap();
        assert_eq!(store.last_sequence("p").unwrap(), 2);
        assert_eq!(store.last_sequence("q").unwrap(), 7);
        let rows = store.events(&Filter::default(), 10).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[3]["request_id"], "r1");
        assert_eq!(rows[3]["attributes"]["client"], "mobile");
        assert_eq!(rows[2]["pod"], "pod");
        assert_eq!(rows[1]["route"], "/c/{id}");
        assert_eq!(rows[1]["error"], "reset");
        assert_eq!(rows[0]["node"], "m");
        let sources: u64 = store
            .conn()
            .unwrap()
            .query_row("SELECT count(*) FROM sources", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sources, 3);
        // Request ends are computed for the judge's cells.
        let cells = store.cells(0, 1_000_000_000).unwrap();
        assert_eq!(cells.iter().map(|c| c.requests).sum::<u64>(), 4);
        assert_eq!(cells.iter().map(|c| c.unanswered).sum::<u64>(), 1);
        assert_eq!(store.latest_end(0).unwrap(), Some(4005));
        // And it ingests on.
        store.append("p", 3, &synthetic(5)).unwrap();
        assert_eq!(count(&store, "p"), 8);
        drop(store);
        let store = DuckDbStore::open(&db.0).unwrap();
        assert_eq!(store.events(&Filter::default(), 100).unwrap().len(), 9);
    }

    #[test]
    fn a_file_that_cannot_be_moved_over_is_refused_unchanged() {
        let db = TempDb::new("migrate-bad");
        {
            let conn = Connection::open(&db.0).unwrap();
            conn.execute_batch("CREATE TABLE events (probe_id VARCHAR, start_unix_ns UBIGINT)")
                .unwrap();
            conn.execute_batch("INSERT INTO events VALUES ('p', 1)")
                .unwrap();
        }
        let Err(e) = DuckDbStore::open(&db.0) else {
            panic!("opened a file it cannot read")
        };
        let message = e.to_string();
        assert!(message.contains("move the file away"), "{message}");
        let conn = Connection::open(&db.0).unwrap();
        let n: u64 = conn
            .query_row("SELECT count(*) FROM events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 1);
    }

    /// Store-only ingest rate: BAKEOFF_APPEND_EVENTS events (1M) in batches of
    /// BAKEOFF_APPEND_BATCH (2000, as `cargo xtask bench collector` sends) from
    /// BAKEOFF_APPEND_THREADS threads (1), each keeping its batches in flight as the ingest does
    /// (submitted in order, outcomes awaited later); the writer commits groups of up to
    /// BAKEOFF_COMMIT_EVENTS (one row group, 122880):
    /// `cargo test --release -p bakeoff store::duckdb::tests::append_rate -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark"]
    fn append_rate() {
        let env = |name: &str, default: usize| {
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default)
        };
        let (total, threads, batch_len, commit) = (
            env("BAKEOFF_APPEND_EVENTS", 1_000_000),
            env("BAKEOFF_APPEND_THREADS", 1),
            env("BAKEOFF_APPEND_BATCH", 2000),
            env("BAKEOFF_COMMIT_EVENTS", COMMIT_EVENTS),
        );
        let db = TempDb::new("append-rate");
        let store = DuckDbStore::open_with(
            &db.0,
            WriterConfig {
                commit_events: commit,
                max_queued_events: 4 * commit.max(batch_len),
                ..WriterConfig::default()
            },
        )
        .unwrap();
        let batch = synthetic(batch_len);
        let batches = total.div_ceil(batch_len * threads);
        // User + system CPU seconds of this process (USER_HZ is 100 on Linux).
        let cpu = || {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
            let f: Vec<&str> = stat
                .rsplit_once(')')
                .unwrap()
                .1
                .split_whitespace()
                .collect();
            (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
        };
        let (started, cpu_before) = (std::time::Instant::now(), cpu());
        std::thread::scope(|scope| {
            for t in 0..threads {
                let (store, batch) = (&store, &batch);
                scope.spawn(move || {
                    let mut pending = std::collections::VecDeque::new();
                    for seq in 1..=batches {
                        pending.push_back(
                            store
                                .submit(&format!("bench-{t}"), seq as u64, batch)
                                .unwrap(),
                        );
                        // Outcomes known by now are taken (as the ingest acks them).
                        while pending.len() > 4 * commit / batch_len + 1 {
                            pending.pop_front().unwrap().wait().unwrap();
                        }
                    }
                    for p in pending {
                        p.wait().unwrap();
                    }
                });
            }
        });
        let (s, cpu_s) = (started.elapsed().as_secs_f64(), cpu() - cpu_before);
        let n = batches * batch_len * threads;
        println!(
            "append_rate: {n} events in {s:.2} s = {:.0} events/s, {:.0} events per CPU-second \
             ({threads} threads, batches of {batch_len}, commits of up to {commit})",
            n as f64 / s,
            n as f64 / cpu_s
        );
        for t in 0..threads {
            assert_eq!(
                store.last_sequence(&format!("bench-{t}")).unwrap(),
                batches as u64
            );
        }
        drop(store);
        println!(
            "append_rate: file {} bytes ({:.1} per event)",
            std::fs::metadata(&db.0).unwrap().len(),
            std::fs::metadata(&db.0).unwrap().len() as f64 / n as f64
        );
    }
}

//! The default backend: one embedded DuckDB file, no server.
//!
//! Appends are columnar: each batch becomes an Arrow record batch in the caller's thread (in
//! parallel across probe streams, no lock held), then goes to DuckDB's appender as data chunks.
//! Batches that arrive while another is being committed are committed together (group commit):
//! one transaction holds every waiting batch and the probes' last sequences, so a batch and its
//! sequence are still durable together or not at all, and the fixed cost of a commit (WAL write
//! and sync, sequence update) is shared. Reads use a connection of their own.

use std::{
    path::Path,
    sync::{Arc, Mutex, OnceLock},
};

use bakeoff_proto::v1::RequestEvent;
use duckdb::{
    Connection,
    arrow::{
        array::{ArrayRef, Int32Array, Int64Array, StringBuilder, UInt32Array, UInt64Array},
        datatypes::{DataType, Field, Schema, SchemaRef},
        record_batch::RecordBatch,
    },
    params,
};

use super::{
    ERROR_SQL, EVENT_COLUMNS, SAMPLE_COLUMNS, SampleRow, Store, StoreError, StoredEvent,
    UNANSWERED_SQL, opt,
};
use crate::query::{FIELDS, Filter, GroupRow, group_fields};
use crate::series::{CellRow, MAX_DURATION_NS, NO_LATENCY};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    probe_id VARCHAR, sequence UBIGINT,
    experiment VARCHAR, cohort VARCHAR, node VARCHAR, pod VARCHAR, container VARCHAR,
    pid UINTEGER, exe VARCHAR, role VARCHAR, protocol VARCHAR, method VARCHAR, route VARCHAR,
    path VARCHAR, status INTEGER, grpc_status INTEGER, error VARCHAR,
    start_unix_ns UBIGINT, duration_ns UBIGINT, bytes_in UBIGINT, bytes_out UBIGINT,
    peer VARCHAR, request_id VARCHAR, traceparent VARCHAR, attributes VARCHAR
);
CREATE TABLE IF NOT EXISTS probes (
    probe_id VARCHAR PRIMARY KEY, last_sequence UBIGINT NOT NULL
);
";

// An UPDATE (and an INSERT for a new probe) takes ~0.3 ms here; `INSERT .. ON CONFLICT DO
// UPDATE` ~1.5 ms, re-planned on every execution. Only the writer connection writes `probes`,
// so nothing can insert the row between the two.
const UPDATE_SEQUENCE: &str = "UPDATE probes SET last_sequence = ? WHERE probe_id = ?";
const INSERT_SEQUENCE: &str = "INSERT INTO probes VALUES (?, ?)";

/// A group commit stops taking waiting batches at this many events (bounds a transaction's
/// memory and the wait of the batches in it).
const GROUP_MAX_EVENTS: usize = 200_000;

/// The `events` table as Arrow fields, in column order. `status` is Int64 (the proto's uint32
/// does not fit INTEGER): DuckDB casts it, and refuses the batch if a value is out of range.
fn event_schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            use DataType::{Int32, Int64, UInt32, UInt64, Utf8};
            let f = |name: &str, t: DataType| Field::new(name, t, true);
            Arc::new(Schema::new(vec![
                f("probe_id", Utf8),
                f("sequence", UInt64),
                f("experiment", Utf8),
                f("cohort", Utf8),
                f("node", Utf8),
                f("pod", Utf8),
                f("container", Utf8),
                f("pid", UInt32),
                f("exe", Utf8),
                f("role", Utf8),
                f("protocol", Utf8),
                f("method", Utf8),
                f("route", Utf8),
                f("path", Utf8),
                f("status", Int64),
                f("grpc_status", Int32),
                f("error", Utf8),
                f("start_unix_ns", UInt64),
                f("duration_ns", UInt64),
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

/// One batch as DuckDB columns: no per-row boxing, strings copied once into Arrow buffers.
fn record_batch(
    probe_id: &str,
    sequence: u64,
    events: &[RequestEvent],
) -> Result<RecordBatch, StoreError> {
    let n = events.len();
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
    let mut probe = StringBuilder::with_capacity(n, n * probe_id.len());
    probe.append_value_n(probe_id, n);
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
        Arc::new(probe.finish()),
        Arc::new(UInt64Array::from_value(sequence, n)),
        strings(|e| &e.experiment, false),
        strings(|e| &e.cohort, false),
        strings(|e| &e.node, false),
        strings(|e| &e.pod, true),
        strings(|e| &e.container, true),
        Arc::new(UInt32Array::from_iter_values(events.iter().map(|e| e.pid))),
        strings(|e| &e.exe, false),
        strings(|e| &e.role, false),
        strings(|e| &e.protocol, false),
        strings(|e| &e.method, false),
        strings(|e| &e.route, true),
        strings(|e| &e.path, false),
        Arc::new(Int64Array::from_iter(
            events.iter().map(|e| e.status.map(i64::from)),
        )),
        Arc::new(Int32Array::from_iter(events.iter().map(|e| e.grpc_status))),
        strings(|e| &e.error, true),
        u64s(|e| e.start_unix_ns),
        u64s(|e| e.duration_ns),
        u64s(|e| e.bytes_in),
        u64s(|e| e.bytes_out),
        strings(|e| &e.peer, true),
        strings(|e| &e.request_id, true),
        strings(|e| &e.traceparent, true),
        Arc::new(attributes.finish()),
    ];
    RecordBatch::try_new(event_schema(), columns)
        .map_err(|e| StoreError::DuckDb(duckdb::Error::ToSqlConversionFailure(Box::new(e))))
}

/// A batch waiting for a group commit, and where its outcome goes.
struct Queued {
    probe_id: String,
    sequence: u64,
    batch: RecordBatch,
    outcome: Arc<Mutex<Option<Result<(), StoreError>>>>,
}

pub struct DuckDbStore {
    /// Reads. A connection of its own, so a long query does not hold up the ingest (DuckDB's
    /// MVCC: reads see committed batches, commits do not wait for reads).
    conn: Mutex<Connection>,
    /// Appends and the probes' sequences.
    writer: Mutex<Connection>,
    /// Batches waiting for the writer; whoever holds it next commits all of them.
    queue: Mutex<Vec<Queued>>,
}

impl DuckDbStore {
    /// Opens (or creates) the database file and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        let writer = conn.try_clone()?;
        Ok(Self {
            conn: Mutex::new(conn),
            writer: Mutex::new(writer),
            queue: Mutex::default(),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }

    fn writer(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.writer.lock().map_err(|_| StoreError::Poisoned)
    }

    fn queue(&self) -> Result<std::sync::MutexGuard<'_, Vec<Queued>>, StoreError> {
        self.queue.lock().map_err(|_| StoreError::Poisoned)
    }

    /// Commits the oldest waiting batches, up to GROUP_MAX_EVENTS, in one transaction and hands
    /// out their outcomes; false if none were waiting. `conn` is the writer.
    fn commit_queued(&self, conn: &mut Connection) -> Result<bool, StoreError> {
        let group: Vec<Queued> = {
            let mut queue = self.queue()?;
            let mut events = 0;
            let take = queue
                .iter()
                .position(|q| {
                    events += q.batch.num_rows();
                    events > GROUP_MAX_EVENTS
                })
                .map_or(queue.len(), |i| i.max(1));
            queue.drain(..take).collect()
        };
        if group.is_empty() {
            return Ok(false);
        }
        let results: Vec<Result<(), StoreError>> = match commit(conn, &group) {
            Ok(()) => group.iter().map(|_| Ok(())).collect(),
            Err(e) if group.len() == 1 => vec![Err(e)],
            // One bad batch must not fail the others: each alone.
            Err(_) => group
                .iter()
                .map(|q| commit(conn, std::slice::from_ref(q)))
                .collect(),
        };
        for (q, r) in group.into_iter().zip(results) {
            *q.outcome.lock().map_err(|_| StoreError::Poisoned)? = Some(r);
        }
        Ok(true)
    }
}

/// Appends `group` and each probe's highest sequence in it in one transaction.
fn commit(conn: &mut Connection, group: &[Queued]) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    {
        let mut app = tx.appender("events")?;
        for q in group.iter().filter(|q| q.batch.num_rows() > 0) {
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
    Ok(())
}

impl Store for DuckDbStore {
    fn last_sequence(&self, probe_id: &str) -> Result<u64, StoreError> {
        // Batches already handed to the store count (a probe reconnecting while its last batch
        // is being stored must not send it again).
        let mut conn = self.writer()?;
        while self.commit_queued(&mut conn)? {}
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
        let batch = record_batch(probe_id, sequence, events)?;
        let outcome = Arc::new(Mutex::new(None));
        self.queue()?.push(Queued {
            probe_id: probe_id.to_string(),
            sequence,
            batch,
            outcome: outcome.clone(),
        });
        let mut conn = self.writer()?;
        // Whoever holds the writer commits waiting batches and hands out their outcomes before
        // letting go: this batch is either done or still queued.
        loop {
            if let Some(done) = outcome.lock().map_err(|_| StoreError::Poisoned)?.take() {
                return done;
            }
            if !self.commit_queued(&mut conn)? {
                // Only if an earlier holder panicked between taking batches and answering them.
                return Err(StoreError::Poisoned);
            }
        }
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
        let conn = self.conn()?;
        let n = conn.execute(
            "DELETE FROM events WHERE start_unix_ns < ?",
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
        let mut stmt = conn.prepare(
            "SELECT max(start_unix_ns + duration_ns) FROM events WHERE start_unix_ns >= ?",
        )?;
        let mut rows = stmt.query(params![since_ns])?;
        Ok(match rows.next()? {
            Some(row) => row.get(0)?,
            None => None,
        })
    }

    fn cells(&self, from_ns: u64, to_ns: u64) -> Result<Vec<CellRow>, StoreError> {
        let sql = format!(
            "SELECT experiment, cohort, method, split_part(coalesce(route, path), '?', 1) AS ep, \
             (start_unix_ns + duration_ns) // 1000000000 AS second, \
             CASE WHEN {UNANSWERED_SQL} THEN {NO_LATENCY} \
             ELSE CAST(floor(log2(greatest(duration_ns, 1)::DOUBLE) * 128) AS INTEGER) END AS bucket, \
             count(*), count(*) FILTER (WHERE {ERROR_SQL}), count(*) FILTER (WHERE {UNANSWERED_SQL}) \
             FROM events WHERE start_unix_ns >= ? AND start_unix_ns < ? \
             AND start_unix_ns + duration_ns >= ? AND start_unix_ns + duration_ns < ? \
             AND duration_ns <= ? \
             GROUP BY experiment, cohort, method, ep, second, bucket"
        );
        let conn = self.conn()?;
        let mut stmt = conn.prepare(&sql)?;
        // The start bound lets DuckDB skip old row groups (zone maps on arrival-ordered data).
        let mut rows = stmt.query(params![
            from_ns.saturating_sub(MAX_DURATION_NS),
            to_ns,
            from_ns,
            to_ns,
            MAX_DURATION_NS
        ])?;
        let mut out = Vec::new();
        while let Some(row) = rows.next()? {
            let method: String = row.get(2)?;
            let path: String = row.get(3)?;
            out.push(CellRow {
                experiment: row.get(0)?,
                cohort: row.get(1)?,
                endpoint: crate::series::endpoint(&method, &path),
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
        let store = DuckDbStore::open(&db.0).unwrap();
        let mut bad = synthetic(3);
        // Does not fit the INTEGER column: DuckDB refuses the batch.
        bad[1].status = Some(u32::MAX);
        let queue = |probe: &str, events: &[RequestEvent]| {
            let outcome = Arc::new(Mutex::new(None));
            store.queue().unwrap().push(Queued {
                probe_id: probe.into(),
                sequence: 1,
                batch: record_batch(probe, 1, events).unwrap(),
                outcome: outcome.clone(),
            });
            outcome
        };
        let (first, second, third) = (
            queue("good", &synthetic(3)),
            queue("bad", &bad),
            queue("other", &synthetic(2)),
        );
        assert!(store.commit_queued(&mut store.writer().unwrap()).unwrap());
        let taken = |o: &Arc<Mutex<Option<Result<(), StoreError>>>>| o.lock().unwrap().take();
        assert!(matches!(taken(&first), Some(Ok(()))));
        assert!(matches!(taken(&second), Some(Err(_))));
        assert!(matches!(taken(&third), Some(Ok(()))));
        assert_eq!(
            ["good", "bad", "other"].map(|p| (store.last_sequence(p).unwrap(), count(&store, p))),
            [(1, 3), (0, 0), (1, 2)]
        );
    }

    /// Store-only ingest rate in batches (commits) of BAKEOFF_APPEND_BATCH events (2000, as
    /// `cargo xtask bench collector` sends), from
    /// BAKEOFF_APPEND_THREADS threads (1) appending BAKEOFF_APPEND_EVENTS events (1M) in all:
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
        let (total, threads, batch_len) = (
            env("BAKEOFF_APPEND_EVENTS", 1_000_000),
            env("BAKEOFF_APPEND_THREADS", 1),
            env("BAKEOFF_APPEND_BATCH", 2000),
        );
        let db = TempDb::new("append-rate");
        let store = DuckDbStore::open(&db.0).unwrap();
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
                    for seq in 1..=batches {
                        store
                            .append(&format!("bench-{t}"), seq as u64, batch)
                            .unwrap();
                    }
                });
            }
        });
        let (s, cpu_s) = (started.elapsed().as_secs_f64(), cpu() - cpu_before);
        let n = batches * batch_len * threads;
        println!(
            "append_rate: {n} events in {s:.2} s = {:.0} events/s, {:.0} events per CPU-second \
             ({threads} threads, batches of {batch_len})",
            n as f64 / s,
            n as f64 / cpu_s
        );
        for t in 0..threads {
            assert_eq!(
                store.last_sequence(&format!("bench-{t}")).unwrap(),
                batches as u64
            );
        }
    }
}

//! The default backend: one embedded DuckDB file, no server. Appends go through DuckDB's
//! appender inside a transaction that also records the probe's last sequence.

use std::{path::Path, sync::Mutex};

use bakeoff_proto::v1::RequestEvent;
use duckdb::{Connection, params};

use super::{
    ERROR_SQL, EVENT_COLUMNS, SAMPLE_COLUMNS, SampleRow, Store, StoreError, StoredEvent, opt,
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

pub struct DuckDbStore {
    conn: Mutex<Connection>,
}

impl DuckDbStore {
    /// Opens (or creates) the database file and its schema.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, StoreError> {
        self.conn.lock().map_err(|_| StoreError::Poisoned)
    }
}

impl Store for DuckDbStore {
    fn last_sequence(&self, probe_id: &str) -> Result<u64, StoreError> {
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
        let mut conn = self.conn()?;
        let tx = conn.transaction()?;
        {
            let mut app = tx.appender("events")?;
            for e in events {
                let attributes = if e.attributes.is_empty() {
                    None
                } else {
                    serde_json::to_string(&e.attributes).ok()
                };
                app.append_row(params![
                    probe_id,
                    sequence,
                    e.experiment,
                    e.cohort,
                    e.node,
                    opt(&e.pod),
                    opt(&e.container),
                    e.pid,
                    e.exe,
                    e.role,
                    e.protocol,
                    e.method,
                    opt(&e.route),
                    e.path,
                    e.status.map(i64::from),
                    e.grpc_status,
                    opt(&e.error),
                    e.start_unix_ns,
                    e.duration_ns,
                    e.bytes_in,
                    e.bytes_out,
                    opt(&e.peer),
                    opt(&e.request_id),
                    opt(&e.traceparent),
                    attributes,
                ])?;
            }
            app.flush()?;
        }
        tx.execute(
            "INSERT INTO probes VALUES (?, ?) ON CONFLICT (probe_id) DO UPDATE SET last_sequence = excluded.last_sequence",
            params![probe_id, sequence],
        )?;
        tx.commit()?;
        Ok(())
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
            "SELECT {key_sql}, count(*), count(*) FILTER (WHERE status IS NULL OR status >= 500), \
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
                peer: row.get(6)?,
                node: row.get(7)?,
                pod: row.get(8)?,
                exe: row.get(9)?,
                attributes: row.get(10)?,
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
             CASE WHEN status IS NULL THEN {NO_LATENCY} \
             ELSE CAST(floor(log2(greatest(duration_ns, 1)::DOUBLE) * 128) AS INTEGER) END AS bucket, \
             count(*), count(*) FILTER (WHERE {ERROR_SQL}), count(*) FILTER (WHERE status IS NULL) \
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

    #[test]
    fn conforms() {
        let path =
            std::env::temp_dir().join(format!("bakeoff-store-{}.duckdb", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("duckdb.wal"));
        let store = DuckDbStore::open(&path).unwrap();
        super::super::conformance::check(&store);
        drop(store);
        // Reopening keeps everything and the sequences.
        let store = DuckDbStore::open(&path).unwrap();
        super::super::conformance::check_reopened(&store);
        let _ = std::fs::remove_file(&path);
    }
}

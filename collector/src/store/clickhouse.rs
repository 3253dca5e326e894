//! The multi-machine backend: a ClickHouse server over its HTTP interface (port 8123), which
//! every ClickHouse since 1.1 speaks, Debian's 18.16 included.
//!
//! Exactly-once storage without transactions: each batch is one INSERT of one block (batches are
//! far below `max_insert_block_size`), and a block insert is atomic in MergeTree; every row
//! carries its batch sequence, so the last stored sequence of a probe is `max(sequence)`.
//! Quantiles use the same linear interpolation as DuckDB's `quantile_cont`, so both backends
//! answer the same query with the same numbers.

use std::{fmt::Write as _, time::Duration};

use bakeoff_proto::v1::RequestEvent;

use super::{
    CONNECTION_PROTOCOLS_SQL, ERROR_SQL, EVENT_COLUMNS, SAMPLE_COLUMNS, SampleRow, Store,
    StoreError, StoredEvent, UNANSWERED_SQL, opt,
};
use crate::query::{Filter, GroupRow, clickhouse_quote, group_fields};
use crate::series::{CellRow, MAX_DURATION_NS, NO_LATENCY};

fn schema(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
    probe_id String, sequence UInt64,
    experiment String, cohort String, node String, pod Nullable(String),
    container Nullable(String), pid UInt32, exe String, role String, protocol String,
    method String, route Nullable(String), path String, status Nullable(Int32),
    grpc_status Nullable(Int32), error Nullable(String),
    start_unix_ns UInt64, duration_ns UInt64, bytes_in UInt64, bytes_out UInt64,
    peer Nullable(String), request_id Nullable(String), traceparent Nullable(String),
    attributes Nullable(String)
) ENGINE = MergeTree
PARTITION BY toDate(intDiv(start_unix_ns, 1000000000))
ORDER BY (experiment, cohort, start_unix_ns)"
    )
}

pub struct ClickHouseStore {
    agent: ureq::Agent,
    url: String,
    table: String,
}

impl ClickHouseStore {
    /// Connects to `url` (e.g. `http://127.0.0.1:8123`), creates `database.events` if needed.
    pub fn open(url: &str, database: &str) -> Result<Self, StoreError> {
        if database.is_empty()
            || !database
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(StoreError::ClickHouse(format!(
                "database name `{database}` must be letters, digits and underscores"
            )));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(300)))
            .build()
            .into();
        let store = Self {
            agent,
            url: url.trim_end_matches('/').to_string(),
            table: format!("{database}.events"),
        };
        store.execute(&format!("CREATE DATABASE IF NOT EXISTS {database}"), "")?;
        store.execute(&schema(&store.table), "")?;
        Ok(store)
    }

    /// Runs `sql` with `body` as its data (for INSERTs); returns the answer's text.
    fn execute(&self, sql: &str, body: &str) -> Result<String, StoreError> {
        let mut resp = self
            .agent
            .post(&self.url)
            .query("query", sql)
            // 64-bit integers as JSON numbers, not strings.
            .query("output_format_json_quote_64bit_integers", "0")
            .send(body)
            .map_err(|e| StoreError::ClickHouse(format!("cannot reach {}: {e}", self.url)))?;
        let text = resp
            .body_mut()
            .with_config()
            .limit(1 << 30)
            .read_to_string()
            .map_err(|e| StoreError::ClickHouse(format!("cannot read the answer: {e}")))?;
        if !resp.status().is_success() {
            return Err(StoreError::ClickHouse(format!(
                "{}: {}",
                resp.status(),
                text.trim()
            )));
        }
        Ok(text)
    }

    fn json_rows(&self, sql: &str) -> Result<Vec<serde_json::Value>, StoreError> {
        self.execute(&format!("{sql} FORMAT JSONEachRow"), "")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| StoreError::ClickHouse(format!("bad JSON row `{l}`: {e}")))
            })
            .collect()
    }
}

/// SQL for DuckDB's `quantile_cont(x, q)`: interpolate between the order statistics around
/// (n - 1) * q of the sorted array `s` of length `n`.
fn quantile_cont(q: f64) -> String {
    let h = format!("((n - 1) * {q})");
    let lo = format!("toUInt64(floor({h}))");
    let hi = format!("least({lo} + 1, toUInt64(n - 1))");
    format!(
        "if(n = 0, nan, toFloat64(s[{lo} + 1]) + ({h} - floor({h})) * \
         (toFloat64(s[{hi} + 1]) - toFloat64(s[{lo} + 1])))"
    )
}

impl Store for ClickHouseStore {
    fn last_sequence(&self, probe_id: &str) -> Result<u64, StoreError> {
        let rows = self.json_rows(&format!(
            "SELECT max(sequence) AS s FROM {} WHERE probe_id = {}",
            self.table,
            clickhouse_quote(probe_id)
        ))?;
        Ok(rows
            .first()
            .and_then(|r| r["s"].as_u64())
            .unwrap_or_default())
    }

    fn append(
        &self,
        probe_id: &str,
        sequence: u64,
        events: &[RequestEvent],
    ) -> Result<(), StoreError> {
        if events.is_empty() {
            return Ok(());
        }
        let mut body = String::with_capacity(events.len() * 400);
        for e in events {
            let attributes = if e.attributes.is_empty() {
                None
            } else {
                serde_json::to_string(&e.attributes).ok()
            };
            let row = serde_json::json!({
                "probe_id": probe_id,
                "sequence": sequence,
                "experiment": e.experiment,
                "cohort": e.cohort,
                "node": e.node,
                "pod": opt(&e.pod),
                "container": opt(&e.container),
                "pid": e.pid,
                "exe": e.exe,
                "role": e.role,
                "protocol": e.protocol,
                "method": e.method,
                "route": opt(&e.route),
                "path": e.path,
                "status": e.status,
                "grpc_status": e.grpc_status,
                "error": opt(&e.error),
                "start_unix_ns": e.start_unix_ns,
                "duration_ns": e.duration_ns,
                "bytes_in": e.bytes_in,
                "bytes_out": e.bytes_out,
                "peer": opt(&e.peer),
                "request_id": opt(&e.request_id),
                "traceparent": opt(&e.traceparent),
                "attributes": attributes,
            });
            let _ = writeln!(body, "{row}");
        }
        self.execute(
            &format!("INSERT INTO {} FORMAT JSONEachRow", self.table),
            &body,
        )?;
        Ok(())
    }

    fn events(&self, filter: &Filter, limit: usize) -> Result<Vec<StoredEvent>, StoreError> {
        let clause = filter.to_clickhouse_sql()?;
        let rows = self.json_rows(&format!(
            "SELECT {} FROM {} WHERE {clause} ORDER BY start_unix_ns DESC LIMIT {limit}",
            EVENT_COLUMNS.join(", "),
            self.table
        ))?;
        Ok(rows
            .into_iter()
            .filter_map(|r| match r {
                serde_json::Value::Object(mut m) => {
                    if let Some(serde_json::Value::String(a)) = m.get("attributes") {
                        let parsed = serde_json::from_str(a).unwrap_or(serde_json::Value::Null);
                        m.insert("attributes".into(), parsed);
                    }
                    Some(m)
                }
                _ => None,
            })
            .collect())
    }

    fn group(&self, filter: &Filter, by: &[String]) -> Result<Vec<GroupRow>, StoreError> {
        let fields = group_fields(by)?;
        let clause = filter.to_clickhouse_sql()?;
        let keys: Vec<String> = fields
            .iter()
            .enumerate()
            .map(|(i, f)| format!("toString({f}) AS k{i}"))
            .collect();
        let key_sql = if keys.is_empty() {
            String::new()
        } else {
            format!("{}, ", keys.join(", "))
        };
        let group_sql = if keys.is_empty() {
            String::new()
        } else {
            format!(
                "GROUP BY {}",
                (0..keys.len())
                    .map(|i| format!("k{i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let sql = format!(
            "SELECT {key_sql}count() AS requests, countIf({ERROR_SQL}) AS errors, \
             arraySort(groupArray(duration_ns)) AS s, length(s) AS n, \
             {} / 1e6 AS p50, {} / 1e6 AS p90, {} / 1e6 AS p99, sum(bytes_out) AS bytes_out \
             FROM {} WHERE {clause} {group_sql} ORDER BY requests DESC",
            quantile_cont(0.5),
            quantile_cont(0.9),
            quantile_cont(0.99),
            self.table
        );
        // `s` is only a step; leave it out of the answer.
        let outer: Vec<String> = (0..keys.len())
            .map(|i| format!("k{i}"))
            .chain(["requests", "errors", "p50", "p90", "p99", "bytes_out"].map(String::from))
            .collect();
        let sql = format!("SELECT {} FROM ({sql})", outer.join(", "));
        let rows = self.json_rows(&sql)?;
        let f = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        Ok(rows
            .iter()
            .filter(|r| r["requests"].as_u64().unwrap_or(0) > 0)
            .map(|r| GroupRow {
                key: (0..keys.len())
                    .map(|i| r[format!("k{i}")].as_str().map(str::to_string))
                    .collect(),
                requests: r["requests"].as_u64().unwrap_or(0),
                errors: r["errors"].as_u64().unwrap_or(0),
                p50_ms: f(r, "p50"),
                p90_ms: f(r, "p90"),
                p99_ms: f(r, "p99"),
                bytes_out: r["bytes_out"].as_u64().unwrap_or(0),
            })
            .collect())
    }

    fn delete_before(&self, unix_ns: u64) -> Result<u64, StoreError> {
        let rows = self.json_rows(&format!(
            "SELECT count() AS n FROM {} WHERE start_unix_ns < {unix_ns}",
            self.table
        ))?;
        let n = rows.first().and_then(|r| r["n"].as_u64()).unwrap_or(0);
        if n > 0 {
            // A mutation: ClickHouse rewrites the affected parts in the background.
            self.execute(
                &format!(
                    "ALTER TABLE {} DELETE WHERE start_unix_ns < {unix_ns}",
                    self.table
                ),
                "",
            )?;
        }
        Ok(n)
    }

    fn samples(&self, filter: &Filter, limit: Option<usize>) -> Result<Vec<SampleRow>, StoreError> {
        let clause = filter.to_clickhouse_sql()?;
        // The most recent `limit`, returned oldest first.
        let sql = match limit {
            Some(n) => format!(
                "SELECT * FROM (SELECT {SAMPLE_COLUMNS} FROM {} WHERE {clause} ORDER BY start_unix_ns DESC LIMIT {n}) ORDER BY start_unix_ns FORMAT JSONEachRow",
                self.table
            ),
            None => format!(
                "SELECT {SAMPLE_COLUMNS} FROM {} WHERE {clause} ORDER BY start_unix_ns FORMAT JSONEachRow",
                self.table
            ),
        };
        self.execute(&sql, "")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                serde_json::from_str(l)
                    .map_err(|e| StoreError::ClickHouse(format!("bad sample row `{l}`: {e}")))
            })
            .collect()
    }

    fn latest_end(&self, since_ns: u64) -> Result<Option<u64>, StoreError> {
        // count() tells an empty range from a max of 0.
        let rows = self.json_rows(&format!(
            "SELECT count() AS n, max(start_unix_ns + duration_ns) AS latest FROM {} \
             WHERE start_unix_ns >= {since_ns}",
            self.table
        ))?;
        let row = rows.first();
        let n = row.and_then(|r| r["n"].as_u64()).unwrap_or(0);
        Ok(row.and_then(|r| r["latest"].as_u64()).filter(|_| n > 0))
    }

    fn cells(&self, from_ns: u64, to_ns: u64) -> Result<Vec<CellRow>, StoreError> {
        let start_from = from_ns.saturating_sub(MAX_DURATION_NS);
        let sql = format!(
            "SELECT experiment, cohort, method, splitByChar('?', coalesce(route, path))[1] AS ep, \
             intDiv(start_unix_ns + duration_ns, 1000000000) AS second, \
             if({UNANSWERED_SQL}, toInt32({NO_LATENCY}), \
                toInt32(floor(log2(toFloat64(greatest(duration_ns, 1))) * 128))) AS bucket, \
             count() AS requests, countIf({ERROR_SQL}) AS errors, \
             countIf({UNANSWERED_SQL}) AS unanswered \
             FROM {} WHERE start_unix_ns >= {start_from} AND start_unix_ns < {to_ns} \
             AND start_unix_ns + duration_ns >= {from_ns} AND start_unix_ns + duration_ns < {to_ns} \
             AND duration_ns <= {MAX_DURATION_NS} AND protocol NOT IN {CONNECTION_PROTOCOLS_SQL} \
             GROUP BY experiment, cohort, method, ep, second, bucket FORMAT JSONEachRow",
            self.table
        );
        #[derive(serde::Deserialize)]
        struct Row {
            experiment: String,
            cohort: String,
            method: String,
            ep: String,
            second: u64,
            bucket: i32,
            requests: u64,
            errors: u64,
            unanswered: u64,
        }
        self.execute(&sql, "")?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let r: Row = serde_json::from_str(l)
                    .map_err(|e| StoreError::ClickHouse(format!("bad cell row `{l}`: {e}")))?;
                Ok(CellRow {
                    experiment: r.experiment.into(),
                    cohort: r.cohort.into(),
                    endpoint: crate::series::endpoint(&r.method, &r.ep).into(),
                    second: r.second,
                    bucket: r.bucket,
                    requests: r.requests,
                    errors: r.errors,
                    unanswered: r.unanswered,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conforms_against_a_real_server() {
        let dir = std::env::temp_dir().join(format!("bakeoff-ch-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = bakeoff_testkit::clickhouse::ClickHouse::start(&dir).unwrap();
        let store = ClickHouseStore::open(&server.url(), "conformance").unwrap();
        super::super::conformance::check(&store);
        drop(store);
        let store = ClickHouseStore::open(&server.url(), "conformance").unwrap();
        super::super::conformance::check_reopened(&store);
        // A wrong URL is a clear error, not a hang or a panic.
        let err = ClickHouseStore::open("http://127.0.0.1:1", "x")
            .err()
            .unwrap();
        assert!(err.to_string().contains("cannot reach"), "{err}");
        drop(server);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

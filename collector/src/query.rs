//! Read-time queries over raw events: filters on any field, group-by any field with counts,
//! error counts and latency quantiles. Field names come from a fixed list (never from SQL text);
//! values are bound as parameters.

use serde::{Deserialize, Serialize};

/// Every queryable field of a stored event.
pub const FIELDS: &[&str] = &[
    "probe_id",
    "experiment",
    "cohort",
    "node",
    "pod",
    "container",
    "pid",
    "exe",
    "role",
    "protocol",
    "method",
    "route",
    "path",
    "status",
    "grpc_status",
    "error",
    "peer",
    "request_id",
    "traceparent",
];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    #[error("unknown field `{0}` (known: {list})", list = FIELDS.join(", "))]
    UnknownField(String),
    #[error("filter `{0}` is not FIELD=VALUE")]
    BadFilter(String),
    #[error("{0}={1}: expected a time in Unix nanoseconds")]
    BadTime(String, String),
}

/// Equality filters, ANDed, plus an optional time range on the request start.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Filter {
    pub equals: Vec<(String, String)>,
    pub since_unix_ns: Option<u64>,
    pub until_unix_ns: Option<u64>,
}

fn field(name: &str) -> Result<&'static str, QueryError> {
    FIELDS
        .iter()
        .find(|f| **f == name)
        .copied()
        .ok_or_else(|| QueryError::UnknownField(name.to_string()))
}

impl Filter {
    /// One experiment's events, from `since_unix_ns` on.
    pub fn experiment(name: &str, since_unix_ns: Option<u64>) -> Self {
        Self {
            equals: vec![("experiment".to_string(), name.to_string())],
            since_unix_ns,
            until_unix_ns: None,
        }
    }

    /// Parses `FIELD=VALUE` strings.
    pub fn parse(items: &[String]) -> Result<Self, QueryError> {
        let mut f = Filter::default();
        for item in items {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| QueryError::BadFilter(item.clone()))?;
            f.add(k, v)?;
        }
        Ok(f)
    }

    /// Adds one equality (also `since`/`until` in Unix ns).
    pub fn add(&mut self, key: &str, value: &str) -> Result<(), QueryError> {
        match key {
            "since" | "until" => {
                let ns = value
                    .parse()
                    .map_err(|_| QueryError::BadTime(key.to_string(), value.to_string()))?;
                if key == "since" {
                    self.since_unix_ns = Some(ns);
                } else {
                    self.until_unix_ns = Some(ns);
                }
            }
            _ => self
                .equals
                .push((field(key)?.to_string(), value.to_string())),
        }
        Ok(())
    }

    /// A WHERE clause with `?` placeholders, and the values to bind in order (DuckDB).
    pub fn to_sql(&self) -> Result<(String, Vec<String>), QueryError> {
        let mut values = Vec::new();
        let clause = self.where_clause(|column, value| {
            values.push(value.to_string());
            format!("CAST({column} AS VARCHAR) = ?")
        })?;
        Ok((clause, values))
    }

    /// A WHERE clause with the values inlined as escaped literals, for ClickHouse's HTTP
    /// interface (18.x has no bound parameters).
    pub fn to_clickhouse_sql(&self) -> Result<String, QueryError> {
        self.where_clause(|column, value| {
            format!("toString({column}) = {}", clickhouse_quote(value))
        })
    }

    /// Field names come from `FIELDS`; `equals` renders one comparison of a column's text.
    fn where_clause(
        &self,
        mut equals: impl FnMut(&str, &str) -> String,
    ) -> Result<String, QueryError> {
        let mut clauses = vec!["1 = 1".to_string()];
        for (k, v) in &self.equals {
            clauses.push(equals(field(k)?, v));
        }
        if let Some(s) = self.since_unix_ns {
            clauses.push(format!("start_unix_ns >= {s}"));
        }
        if let Some(u) = self.until_unix_ns {
            clauses.push(format!("start_unix_ns < {u}"));
        }
        Ok(clauses.join(" AND "))
    }
}

/// A ClickHouse string literal: backslash and quote escaped, so any value is data, never SQL.
pub fn clickhouse_quote(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Group-by fields, validated.
pub fn group_fields(by: &[String]) -> Result<Vec<&'static str>, QueryError> {
    by.iter().map(|b| field(b.trim())).collect()
}

/// One row of a group-by: the key values, then the aggregates.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GroupRow {
    pub key: Vec<Option<String>>,
    pub requests: u64,
    /// Requests with no response or a 5xx status.
    pub errors: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub bytes_out: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_bind_values_and_refuse_unknown_fields() {
        let f = Filter::parse(&["cohort=canary".into(), "status=500".into()]).unwrap();
        let (sql, values) = f.to_sql().unwrap();
        assert_eq!(
            sql,
            "1 = 1 AND CAST(cohort AS VARCHAR) = ? AND CAST(status AS VARCHAR) = ?"
        );
        assert_eq!(values, vec!["canary", "500"]);
        assert_eq!(
            Filter::parse(&["cohort; drop table events=1".into()]).unwrap_err(),
            QueryError::UnknownField("cohort; drop table events".into())
        );
        assert!(matches!(
            Filter::parse(&["cohort".into()]),
            Err(QueryError::BadFilter(_))
        ));
        assert!(group_fields(&["path".into(), "nope".into()]).is_err());
        let f = Filter::parse(&[r"path=/a'b\c".into()]).unwrap();
        assert_eq!(
            f.to_clickhouse_sql().unwrap(),
            r"1 = 1 AND toString(path) = '/a\'b\\c'"
        );
    }
}

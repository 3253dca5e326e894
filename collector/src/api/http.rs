//! HTTP JSON API: experiments, raw events filtered by any field, group-bys with quantiles.
//!
//! - `GET /api/v1/experiments`: experiments and cohorts with request counts
//! - `GET /api/v1/endpoints?FIELD=VALUE...`: experiment, cohort, method, path with counts
//! - `GET /api/v1/events?FIELD=VALUE&...&limit=N`: raw events, newest first
//! - `GET /api/v1/groups?by=FIELD,FIELD&FIELD=VALUE...`: counts, errors, p50/p90/p99
//! - `GET /api/v1/ingest`: ingest counters and each probe's last health report
//! - `GET /metrics`: Prometheus (OpenMetrics text)
//! - `GET /healthz`

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering};

use axum::{
    Json, Router,
    extract::{Query, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::get,
};

use crate::{
    ingest::IngestStats,
    query::Filter,
    store::{Store, StoreError},
};

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub stats: Arc<IngestStats>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
}

pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/experiments", get(experiments))
        .route("/api/v1/endpoints", get(endpoints))
        .route("/api/v1/events", get(events))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/ingest", get(ingest))
        .with_state(state)
}

struct ApiError(StatusCode, String);

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Query(q) => ApiError(StatusCode::BAD_REQUEST, q.to_string()),
            other => ApiError(StatusCode::INTERNAL_SERVER_ERROR, other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// Splits query parameters into a filter and the named options.
fn filter(params: &HashMap<String, String>, options: &[&str]) -> Result<Filter, ApiError> {
    let mut f = Filter::default();
    for (k, v) in params {
        if !options.contains(&k.as_str()) {
            f.add(k, v)
                .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
        }
    }
    Ok(f)
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(ApiError::from)
}

async fn experiments(State(s): State<ApiState>) -> Result<impl IntoResponse, ApiError> {
    let rows = run(move || {
        s.store
            .group(&Filter::default(), &["experiment".into(), "cohort".into()])
    })
    .await?;
    Ok(Json(rows))
}

/// Endpoints (method, path) per experiment and cohort, with counts and quantiles; filters as
/// for `groups` (e.g. `?experiment=checkout`).
async fn endpoints(
    State(s): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let f = filter(&params, &[])?;
    let by = ["experiment", "cohort", "method", "path"].map(String::from);
    Ok(Json(run(move || s.store.group(&f, &by)).await?))
}

async fn events(
    State(s): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let f = filter(&params, &["limit"])?;
    let limit = params
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(100usize)
        .min(100_000);
    Ok(Json(run(move || s.store.events(&f, limit)).await?))
}

async fn groups(
    State(s): State<ApiState>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<impl IntoResponse, ApiError> {
    let f = filter(&params, &["by"])?;
    let by: Vec<String> = params
        .get("by")
        .map(|b| {
            b.split(',')
                .map(str::to_string)
                .filter(|s| !s.is_empty())
                .collect()
        })
        .unwrap_or_default();
    Ok(Json(run(move || s.store.group(&f, &by)).await?))
}

async fn ingest(State(s): State<ApiState>) -> impl IntoResponse {
    let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    let health: serde_json::Map<String, serde_json::Value> = s
        .stats
        .health
        .lock()
        .map(|m| {
            m.iter()
                .map(|(probe, h)| {
                    (
                        probe.clone(),
                        serde_json::json!({
                            "ringbuf_drops": h.ringbuf_drops,
                            "queued_batches": h.queued_batches,
                            "spool_bytes": h.spool_bytes,
                            "dropped_events": h.dropped_events,
                        }),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    Json(serde_json::json!({
        "events_stored": g(&s.stats.events_stored),
        "batches_stored": g(&s.stats.batches_stored),
        "batches_duplicate": g(&s.stats.batches_duplicate),
        "streams_refused": g(&s.stats.streams_refused),
        "probes": health,
    }))
}

async fn metrics(State(s): State<ApiState>) -> Response {
    match crate::metrics::render(&s.metrics) {
        Ok(text) => (
            [(
                axum::http::header::CONTENT_TYPE,
                crate::metrics::CONTENT_TYPE,
            )],
            text,
        )
            .into_response(),
        Err(_) => ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode metrics".into(),
        )
        .into_response(),
    }
}

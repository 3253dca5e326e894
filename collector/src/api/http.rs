//! HTTP JSON API: experiments, raw events filtered by any field, group-bys with quantiles.
//!
//! - `GET /api/v1/experiments`: experiments and cohorts with request counts
//! - `GET /api/v1/endpoints?FIELD=VALUE...`: experiment, cohort, method, path with counts
//! - `GET /api/v1/events?FIELD=VALUE&...&limit=N`: raw events, newest first
//! - `GET /api/v1/groups?by=FIELD,FIELD&FIELD=VALUE...`: counts, errors, p50/p90/p99
//! - `GET /api/v1/ingest`: ingest counters and each probe's last health report
//! - `GET /api/v1/verdict?experiment=E&baseline=B&canary=C[&alpha=..]`: the verdict (Argo
//!   Rollouts `web` metric provider)
//! - `GET /api/v1/experiments/verdicts`: latest verdicts of the configured experiments
//! - `POST /api/v1/flagger`: Flagger webhook (2xx unless the canary fails)
//! - `GET /api/v1/drilldown?experiment=E&metric=latency|errors&endpoint=GET%20/x`: dimension
//!   values ranked by how much they explain the canary's bad requests
//! - `GET /report?experiment=E&baseline=B&canary=C`: the self-contained HTML report
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
    store::SampleRow,
    store::{Store, StoreError},
    verdict::{Decision, JudgeConfig, Verdict, judge_rows},
};

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    pub stats: Arc<IngestStats>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Latest verdicts of the experiments configured with `--experiments`.
    pub verdicts: Arc<crate::experiments::Verdicts>,
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
        .route("/api/v1/verdict", get(verdict))
        .route("/api/v1/experiments/verdicts", get(configured_verdicts))
        .route("/api/v1/drilldown", get(drill))
        .route("/report", get(report))
        .route("/api/v1/flagger", axum::routing::post(flagger))
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

/// Which comparison a verdict request asks for.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct VerdictQuery {
    pub experiment: String,
    #[serde(default = "default_baseline")]
    pub baseline: String,
    #[serde(default = "default_canary")]
    pub canary: String,
    /// Only requests that started at or after this time (Unix ns), e.g. the rollout's start.
    pub since: Option<u64>,
    pub alpha: Option<f64>,
    pub latency_tolerance: Option<f64>,
    pub error_tolerance: Option<f64>,
    pub min_groups: Option<u64>,
    pub max_endpoints: Option<usize>,
}

fn default_baseline() -> String {
    "baseline".into()
}
fn default_canary() -> String {
    "canary".into()
}

impl VerdictQuery {
    fn config(&self) -> Result<JudgeConfig, ApiError> {
        JudgeConfig::with_overrides(
            self.alpha,
            self.latency_tolerance,
            self.error_tolerance,
            self.min_groups,
            self.max_endpoints,
        )
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))
    }
}

/// The verdict and the rows it was computed from.
async fn judged(
    store: Arc<dyn Store>,
    q: &VerdictQuery,
) -> Result<(Verdict, Vec<SampleRow>), ApiError> {
    let config = q.config()?;
    let f = Filter::experiment(&q.experiment, q.since);
    let rows = run(move || store.samples(&f)).await?;
    let v = judge_rows(&rows, &q.baseline, &q.canary, &config);
    Ok((v, rows))
}

/// Judges and returns the verdict as JSON, with what was compared.
async fn judge(
    store: Arc<dyn Store>,
    q: VerdictQuery,
) -> Result<(Decision, serde_json::Value), ApiError> {
    let (v, _) = judged(store, &q).await?;
    let decision = v.decision;
    let mut json = serde_json::to_value(&v)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    if let Some(m) = json.as_object_mut() {
        m.insert("experiment".into(), q.experiment.into());
        m.insert("baseline".into(), q.baseline.into());
        m.insert("canary".into(), q.canary.into());
    }
    Ok((decision, json))
}

async fn verdict(
    State(s): State<ApiState>,
    Query(q): Query<VerdictQuery>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(judge(s.store.clone(), q).await?.1))
}

/// Flagger's webhook payload; the comparison comes from `metadata`.
#[derive(Debug, serde::Deserialize)]
struct FlaggerHook {
    #[serde(default)]
    name: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

/// 200 while the canary is not shown worse (pass, or inconclusive unless `strict: "true"`);
/// 412 when it fails, so Flagger counts a failed check and rolls back at its threshold.
async fn flagger(
    State(s): State<ApiState>,
    Json(hook): Json<FlaggerHook>,
) -> Result<Response, ApiError> {
    let m = &hook.metadata;
    let get = |k: &str| m.get(k).cloned();
    let parse = |k: &str| -> Result<Option<f64>, ApiError> {
        get(k)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError(
                        StatusCode::BAD_REQUEST,
                        format!("metadata.{k}: not a number: {v}"),
                    )
                })
            })
            .transpose()
    };
    let q = VerdictQuery {
        experiment: get("experiment").unwrap_or_else(|| hook.name.clone()),
        baseline: get("baseline").unwrap_or_else(default_baseline),
        canary: get("canary").unwrap_or_else(default_canary),
        since: parse("since")?.map(|v| v as u64),
        alpha: parse("alpha")?,
        latency_tolerance: parse("latency_tolerance")?,
        error_tolerance: parse("error_tolerance")?,
        min_groups: parse("min_groups")?.map(|v| v as u64),
        max_endpoints: parse("max_endpoints")?.map(|v| v as usize),
    };
    let strict = get("strict").is_some_and(|v| v == "true");
    let (decision, json) = judge(s.store.clone(), q).await?;
    let status = match decision {
        Decision::Fail => StatusCode::PRECONDITION_FAILED,
        Decision::Inconclusive if strict => StatusCode::PRECONDITION_FAILED,
        _ => StatusCode::OK,
    };
    Ok((status, Json(json)).into_response())
}

#[derive(Debug, serde::Deserialize)]
struct DrillQuery {
    experiment: String,
    #[serde(default = "default_baseline")]
    baseline: String,
    #[serde(default = "default_canary")]
    canary: String,
    #[serde(default = "default_metric")]
    metric: String,
    /// `METHOD path`, or absent for all endpoints.
    endpoint: Option<String>,
    since: Option<u64>,
    limit: Option<usize>,
}

fn default_metric() -> String {
    "latency".into()
}

async fn drill(
    State(s): State<ApiState>,
    Query(q): Query<DrillQuery>,
) -> Result<impl IntoResponse, ApiError> {
    if q.metric != "latency" && q.metric != "errors" {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("metric `{}`: latency or errors", q.metric),
        ));
    }
    let f = Filter::experiment(&q.experiment, q.since);
    let store = s.store.clone();
    let rows = run(move || store.samples(&f)).await?;
    Ok(Json(crate::drilldown::drilldown(
        &rows,
        &q.baseline,
        &q.canary,
        &q.metric,
        q.endpoint.as_deref(),
        q.limit.unwrap_or(20).min(1000),
    )))
}

async fn report(
    State(s): State<ApiState>,
    Query(q): Query<VerdictQuery>,
) -> Result<Response, ApiError> {
    let (v, rows) = judged(s.store.clone(), &q).await?;
    let html = crate::report::render(&q.experiment, &q.baseline, &q.canary, &v, &rows);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response())
}

async fn configured_verdicts(State(s): State<ApiState>) -> impl IntoResponse {
    let verdicts: Vec<serde_json::Value> = s
        .verdicts
        .latest
        .lock()
        .map(|m| {
            m.iter()
                .map(|((experiment, canary), v)| {
                    let mut j = serde_json::to_value(v).unwrap_or_default();
                    if let Some(o) = j.as_object_mut() {
                        o.insert("experiment".into(), experiment.clone().into());
                        o.insert("canary".into(), canary.clone().into());
                    }
                    j
                })
                .collect()
        })
        .unwrap_or_default();
    Json(serde_json::json!({
        "verdicts": verdicts,
        "webhooks_sent": s.verdicts.webhooks_sent.load(Ordering::Relaxed),
        "webhooks_failed": s.verdicts.webhooks_failed.load(Ordering::Relaxed),
    }))
}

//! HTTP JSON API: experiments, raw events filtered by any field, group-bys with quantiles.
//!
//! - `GET /api/v1/experiments`: experiments and cohorts with request counts
//! - `GET /api/v1/endpoints?FIELD=VALUE...`: experiment, cohort, method, path with counts
//! - `GET /api/v1/events?FIELD=VALUE&...&limit=N`: raw events, newest first
//! - `GET /api/v1/groups?by=FIELD,FIELD&FIELD=VALUE...`: counts, errors, p50/p90/p99
//! - `GET /api/v1/ingest`: ingest counters and each probe's last health report
//! - `GET /api/v1/verdict?experiment=E&baseline=B&canary=C[&alpha=..]`: the verdict (Argo
//!   Rollouts `web` metric provider); 404 naming what exists for an unknown experiment or
//!   cohort, 400 for a bad or unknown parameter
//! - `GET /api/v1/experiments/verdicts`: latest verdicts of the configured experiments
//! - `POST /api/v1/flagger`: Flagger webhook (2xx unless the canary fails)
//! - `GET /api/v1/drilldown?experiment=E&metric=latency|errors|p99&endpoint=GET%20/x`: dimension
//!   values ranked by how much they explain the canary's bad requests
//! - `GET /report?experiment=E&baseline=B&canary=C`: the self-contained HTML report
//! - `GET /metrics`: Prometheus (OpenMetrics text)
//! - `GET /healthz`
//!
//! Access (`auth`): with `--api-tokens` or `--http-client-ca`, the verdict routes (verdict,
//! experiments, configured verdicts, report, Flagger's webhook) need a `read` or `full` token
//! and everything else under `/api/v1` (raw events, groups, endpoints, drilldown, ingest) a
//! `full` one; a verified client certificate counts as `full`. `/healthz` and `/metrics` stay
//! open: they carry no events (counters only) and their callers, kubelet probes and Prometheus,
//! hold no tokens. Flagger cannot send headers, so its webhook may carry the token in its
//! metadata instead (`token: ...`).

use std::{collections::HashMap, sync::Arc, sync::atomic::Ordering};

use axum::{
    Extension, Json, Router,
    extract::{ConnectInfo, Query, Request, State, rejection::QueryRejection},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
    routing::{get, post},
};

use crate::{
    api::{
        auth::{Access, Denied, Scope},
        tls::TlsPeer,
    },
    ingest::IngestStats,
    live::{Live, VerdictError, VerdictRequest, VerdictResponse},
    query::Filter,
    store::{Store, StoreError},
    verdict::{Decision, JudgeConfig, JudgeOverrides},
};

#[derive(Clone)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    /// The judge's live state.
    pub live: Arc<Live>,
    pub stats: Arc<IngestStats>,
    pub metrics: Arc<prometheus_client::registry::Registry>,
    /// Latest verdicts of the experiments configured with `--experiments`.
    pub verdicts: Arc<crate::experiments::Verdicts>,
    /// Who may call what (`Access::open()` without `--api-tokens` and `--http-client-ca`).
    pub access: Arc<Access>,
    /// Captures on demand and the probes' control channels.
    pub captures: Arc<crate::capture::Captures>,
    /// Where capture commands are recorded.
    pub audit: Option<Arc<std::sync::Mutex<crate::audit::AuditLog>>>,
}

pub fn router(state: ApiState) -> Router {
    let guard = |needed, token_in_body| {
        axum::middleware::from_fn_with_state(
            Guard {
                access: state.access.clone(),
                needed,
                token_in_body,
            },
            require,
        )
    };
    let read = Router::new()
        .route("/api/v1/experiments", get(experiments))
        .route("/api/v1/verdict", get(verdict))
        .route("/api/v1/experiments/verdicts", get(configured_verdicts))
        .route("/report", get(report))
        .route_layer(guard(Scope::Read, false));
    let flagger = Router::new()
        .route("/api/v1/flagger", post(flagger))
        .route_layer(guard(Scope::Read, true));
    let full = Router::new()
        .route("/api/v1/endpoints", get(endpoints))
        .route("/api/v1/events", get(events))
        .route("/api/v1/groups", get(groups))
        .route("/api/v1/ingest", get(ingest))
        .route("/api/v1/drilldown", get(drill))
        .merge(crate::api::captures::routes())
        .route_layer(guard(Scope::Full, false));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .merge(read)
        .merge(flagger)
        .merge(full)
        .with_state(state)
}

/// The access rule of a group of routes.
#[derive(Clone)]
struct Guard {
    access: Arc<Access>,
    needed: Scope,
    /// Without an Authorization header, let the handler look for the token in the body.
    token_in_body: bool,
}

/// Marks a request whose token is to be found in its body (Flagger's webhook).
#[derive(Clone, Copy)]
struct TokenInBody;

/// Lets the request through if its bearer token or client certificate allows `needed`.
/// The caller (`auth::Caller`) goes on the request's extensions, for handlers that record who
/// called (the audit log).
async fn require(State(g): State<Guard>, mut req: Request, next: Next) -> Response {
    let client_cert = req
        .extensions()
        .get::<ConnectInfo<TlsPeer>>()
        .and_then(|c| c.0.client_name.clone());
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match g
        .access
        .caller(authorization, client_cert.as_deref(), g.needed)
    {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(Denied::Missing { .. }) if g.token_in_body => {
            req.extensions_mut().insert(TokenInBody);
            next.run(req).await
        }
        Err(d) => denied(d),
    }
}

/// 401 with a Bearer challenge (RFC 6750) when the caller is unknown, 403 naming the scope
/// needed when the token's scope is too narrow.
fn denied(d: Denied) -> Response {
    let (status, challenge) = match &d {
        Denied::Missing { .. } => (StatusCode::UNAUTHORIZED, r#"Bearer realm="bakeoff""#.into()),
        Denied::Malformed | Denied::UnknownToken => (
            StatusCode::UNAUTHORIZED,
            r#"Bearer realm="bakeoff", error="invalid_token""#.into(),
        ),
        Denied::Scope { needed, .. } => (
            StatusCode::FORBIDDEN,
            format!(r#"Bearer realm="bakeoff", error="insufficient_scope", scope="{needed}""#),
        ),
    };
    (
        status,
        [(header::WWW_AUTHENTICATE, challenge)],
        Json(serde_json::json!({ "error": d.to_string() })),
    )
        .into_response()
}

pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

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
        .map(|l| {
            l.parse::<usize>()
                .map_err(|_| ApiError(StatusCode::BAD_REQUEST, format!("limit={l}: not a number")))
        })
        .transpose()?;
    let limit = bounded(limit, 100, 100_000, "limit")?;
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
        "events_late": g(&s.stats.events_late),
        "judge_closed_before_unix_s": s.live.rollup.closed_before(),
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

/// Which comparison a verdict request asks for; unknown parameters are refused (a misspelt
/// tolerance must not be silently ignored).
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
    /// `p90=0.1,p99=0.2`.
    pub quantiles: Option<String>,
    pub error_ratio_tolerance: Option<f64>,
    pub error_tolerance: Option<f64>,
    pub volume_tolerance: Option<f64>,
    pub split: Option<f64>,
    pub min_requests: Option<u64>,
    pub max_endpoints: Option<usize>,
}

fn default_baseline() -> String {
    "baseline".into()
}
fn default_canary() -> String {
    "canary".into()
}

impl VerdictQuery {
    fn request(self) -> VerdictRequest {
        VerdictRequest {
            experiment: self.experiment,
            baseline: self.baseline,
            canary: self.canary,
            since_unix_ns: self.since,
            overrides: JudgeOverrides {
                alpha: self.alpha,
                latency_tolerance: self.latency_tolerance,
                quantiles: self.quantiles,
                error_ratio_tolerance: self.error_ratio_tolerance,
                error_tolerance: self.error_tolerance,
                volume_tolerance: self.volume_tolerance,
                split: self.split,
                min_requests: self.min_requests,
                max_endpoints: self.max_endpoints,
            },
        }
    }
}

impl From<VerdictError> for ApiError {
    fn from(e: VerdictError) -> Self {
        match e {
            VerdictError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            VerdictError::Config(c) => ApiError(StatusCode::BAD_REQUEST, c.to_string()),
            VerdictError::Store(s) => s.into(),
        }
    }
}

/// Query parameters, or 400 with the reason (`since=abc`, an unknown parameter).
fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(v)| v)
        .map_err(|r| ApiError(StatusCode::BAD_REQUEST, r.body_text()))
}

/// Judges from the live rollup; the answer names what was compared.
async fn judge(live: Arc<Live>, request: VerdictRequest) -> Result<VerdictResponse, ApiError> {
    let r = request.clone();
    let verdict = tokio::task::spawn_blocking(move || live.verdict(&JudgeConfig::default(), &r))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(VerdictResponse {
        experiment: request.experiment,
        baseline: request.baseline,
        canary: request.canary,
        verdict,
    })
}

async fn verdict(
    State(s): State<ApiState>,
    q: Result<Query<VerdictQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(judge(s.live.clone(), query(q)?.request()).await?))
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
    token_in_body: Option<Extension<TokenInBody>>,
    Json(hook): Json<FlaggerHook>,
) -> Result<Response, ApiError> {
    let mut m = hook.metadata;
    // Flagger cannot send headers: its token comes in the metadata (never judged as a setting).
    let token = m.remove("token");
    if token_in_body.is_some() {
        let checked = match &token {
            Some(t) => s.access.check_token(t.as_bytes(), Scope::Read),
            None => Err(Denied::Missing {
                client_certs: false,
            }),
        };
        if let Err(d) = checked {
            return Ok(denied(d));
        }
    }
    let strict = m.remove("strict").is_some_and(|v| v == "true");
    m.entry("experiment".into()).or_insert(hook.name);
    // The same parameters as the verdict's query string, checked the same way.
    let encoded = m
        .iter()
        .map(|(k, v)| format!("{}={}", urlencode(k), urlencode(v)))
        .collect::<Vec<_>>()
        .join("&");
    let q: VerdictQuery = serde_urlencoded_from(&encoded)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("metadata: {e}")))?;
    let answer = judge(s.live.clone(), q.request()).await?;
    let status = match answer.verdict.decision {
        Decision::Fail => StatusCode::PRECONDITION_FAILED,
        Decision::Inconclusive if strict => StatusCode::PRECONDITION_FAILED,
        _ => StatusCode::OK,
    };
    Ok((status, Json(answer)).into_response())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Decodes a query string with the same rules as axum's `Query` (serde_urlencoded).
fn serde_urlencoded_from<T: serde::de::DeserializeOwned>(s: &str) -> Result<T, String> {
    let uri: axum::http::Uri = format!("/?{s}")
        .parse()
        .map_err(|e: axum::http::uri::InvalidUri| e.to_string())?;
    Query::<T>::try_from_uri(&uri)
        .map(|Query(v)| v)
        .map_err(|r| r.body_text())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
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
    q: Result<Query<DrillQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let q = query(q)?;
    let tail = crate::stats::quantile_from_name(&q.metric).is_some();
    if q.metric != "latency" && q.metric != "errors" && !tail {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("metric `{}`: latency, errors or pNN (e.g. p99)", q.metric),
        ));
    }
    let limit = bounded(q.limit, 20, 1000, "limit")?;
    let f = Filter::experiment(&q.experiment, q.since);
    let store = s.store.clone();
    let rows = run(move || store.samples(&f, Some(crate::live::DRILLDOWN_EVENTS))).await?;
    Ok(Json(crate::drilldown::drilldown(
        &rows,
        &q.baseline,
        &q.canary,
        &q.metric,
        q.endpoint.as_deref(),
        limit,
    )))
}

/// A count parameter: `default` when absent, 400 outside 1..=max.
fn bounded(v: Option<usize>, default: usize, max: usize, name: &str) -> Result<usize, ApiError> {
    match v {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("{name}={n}: must be between 1 and {max}"),
        )),
    }
}

async fn report(
    State(s): State<ApiState>,
    q: Result<Query<VerdictQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let answer = judge(s.live.clone(), query(q)?.request()).await?;
    let f = Filter::experiment(&answer.experiment, None);
    let store = s.store.clone();
    let rows = run(move || store.samples(&f, Some(crate::live::DRILLDOWN_EVENTS))).await?;
    let html = crate::report::render(&answer, &rows);
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

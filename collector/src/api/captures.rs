//! Capture routes of the HTTP API (`full` scope: a capture holds request and response bodies):
//!
//! - `POST /api/v1/captures` (a JSON `CaptureSpec`): starts a capture on the probes watching
//!   the cohort; 409 naming the connected probes when none does
//! - `GET /api/v1/captures`: captures, newest first, and the connected probes
//! - `GET /api/v1/captures/{id}`: one capture's status, per probe, losses included
//! - `POST /api/v1/captures/{id}/stop`
//! - `GET /api/v1/captures/{id}/file`: the capture file, once complete
//! - `GET /api/v1/captures/{id}/stream`: a running capture's records as they arrive (chunked,
//!   each in the capture file's record framing, connections renumbered as in the file), until
//!   it completes; what `bakeoff shadow` reads. A reader that falls behind loses records,
//!   counted in the capture's `losses["stream_dropped"]`, rather than slow the capture. 409 once
//!   complete
//!
//! Each start, stop and download is written to the audit log first: a command that cannot be
//! recorded is refused (503).

use axum::{
    Json, Router,
    body::Body,
    extract::{Path, Request, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use tokio_stream::StreamExt as _;

use crate::{
    api::http::{ApiError, ApiState},
    audit::Entry,
    capture::{CaptureError, CaptureInfo, CaptureSpec, encode_records},
};

/// Batches of records a stream reader may have waiting before newer ones are dropped.
const STREAM_QUEUE: usize = 1024;

pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/captures", post(start).get(list))
        .route("/api/v1/captures/{id}", get(status))
        .route("/api/v1/captures/{id}/stop", post(stop))
        .route("/api/v1/captures/{id}/file", get(file))
        .route("/api/v1/captures/{id}/stream", get(stream))
}

impl From<CaptureError> for ApiError {
    fn from(e: CaptureError) -> Self {
        let code = match &e {
            CaptureError::NoProbe { .. } | CaptureError::NotDone(_) | CaptureError::Complete(_) => {
                StatusCode::CONFLICT
            }
            CaptureError::NotFound(_) => StatusCode::NOT_FOUND,
            CaptureError::Bad(_) => StatusCode::BAD_REQUEST,
            CaptureError::File(_) | CaptureError::Io(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(code, e.to_string())
    }
}

/// Who called, for the audit log: the caller the access guard put on the request (its token's
/// name, its certificate's, or `anonymous` on an open API).
fn actor(req: &Request) -> String {
    req.extensions()
        .get::<crate::api::auth::Caller>()
        .map_or_else(|| "anonymous".to_string(), |c| c.name.clone())
}

/// Writes the audit entry of a capture command; no log configured means nothing to write.
fn audit(s: &ApiState, entry: Entry) -> Result<(), ApiError> {
    let Some(log) = &s.audit else { return Ok(()) };
    let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
    log.append(entry).map(|_| ()).map_err(|e| {
        tracing::error!(error = %e, "audit log write failed: command refused");
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the audit log cannot be written ({e}): command refused"),
        )
    })
}

fn entry(action: &str, actor: String, info: &CaptureInfo) -> Entry {
    let mut details = serde_json::Map::new();
    details.insert("capture".into(), info.id.clone().into());
    details.insert("state".into(), info.state.clone().into());
    details.insert(
        "probes".into(),
        info.probes
            .iter()
            .map(|p| {
                serde_json::Value::from(format!(
                    "{}{}",
                    p.probe_id,
                    p.identity
                        .as_ref()
                        .map(|i| format!(" ({i})"))
                        .unwrap_or_default()
                ))
            })
            .collect::<Vec<_>>()
            .into(),
    );
    details.insert("requests".into(), info.requests.into());
    if !info.spec.protocol.is_empty() {
        details.insert("protocol".into(), info.spec.protocol.clone().into());
    }
    let mut redaction: Vec<String> = info
        .probes
        .iter()
        .flat_map(|p| p.redaction.iter().cloned())
        .collect();
    for (kind, rules) in [
        ("header", &info.spec.redact_headers),
        ("json", &info.spec.redact_json),
        ("regex", &info.spec.redact_regex),
    ] {
        redaction.extend(rules.iter().map(|r| format!("{kind}:{r}")));
    }
    redaction.sort();
    redaction.dedup();
    Entry {
        actor,
        action: action.into(),
        experiment: Some(info.spec.experiment.clone()),
        cohort: Some(info.spec.cohort.clone()),
        target: None,
        bytes: Some(info.file_bytes),
        redaction,
        details,
    }
}

async fn start(State(s): State<ApiState>, req: Request) -> Result<Response, ApiError> {
    let actor = actor(&req);
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.to_string()))?;
    let spec: CaptureSpec = serde_json::from_slice(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("bad capture request: {e}")))?;
    // The command is recorded before it is carried out.
    let planned = CaptureInfo {
        id: "(starting)".into(),
        spec: spec.clone(),
        ..CaptureInfo::default()
    };
    audit(&s, entry("capture.start", actor.clone(), &planned))?;
    let info = s.captures.start(spec, &actor)?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(s): State<ApiState>) -> impl IntoResponse {
    Json(serde_json::json!({
        "captures": s.captures.list(),
        "probes": s.captures.probes(),
    }))
}

async fn status(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> Result<Json<CaptureInfo>, ApiError> {
    Ok(Json(s.captures.info(&id)?))
}

async fn stop(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Json<CaptureInfo>, ApiError> {
    let info = s.captures.info(&id)?;
    audit(&s, entry("capture.stop", actor(&req), &info))?;
    Ok(Json(s.captures.stop(&id)?))
}

async fn file(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let (info, path) = s.captures.file(&id)?;
    audit(&s, entry("capture.get", actor(&req), &info))?;
    let f = tokio::fs::File::open(&path).await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}", path.display()),
        )
    })?;
    let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{id}.bkcap\""),
            ),
        ],
        body,
    )
        .into_response())
}

async fn stream(
    State(s): State<ApiState>,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let info = s.captures.info(&id)?;
    if info.state != "recording" && info.state != "stopping" {
        return Err(CaptureError::Complete(id).into());
    }
    // Payloads leave the collector: recorded like a download.
    audit(&s, entry("capture.stream", actor(&req), &info))?;
    let rx = s.captures.subscribe(&id, STREAM_QUEUE)?;
    let body = Body::from_stream(
        tokio_stream::wrappers::ReceiverStream::new(rx).map(|records| {
            Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(encode_records(&records)))
        }),
    );
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response())
}

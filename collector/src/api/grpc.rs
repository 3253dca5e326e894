//! `bakeoff.v1.Query`: the HTTP JSON API's queries over gRPC, from the same store calls.
//!
//! With `--api-tokens`, each call needs `authorization: Bearer TOKEN` metadata: Verdict and
//! Experiments a `read` (or `full`) token, Events and Groups a `full` one, as over HTTP. Client
//! certificates do not count here: the gRPC port's client CA is the probes' (ingest), and a
//! probe has no business reading other nodes' events.

use std::sync::Arc;

use bakeoff_proto::v1::{
    self as pb, EventsReply, EventsRequest, ExperimentsRequest, Group, GroupKey, GroupsReply,
    GroupsRequest, RequestEvent, Selection, StoredEvent as ProtoStoredEvent, VerdictReply,
    VerdictRequest, query_server::Query,
};
use tonic::{Request, Response, Status};

use crate::{
    api::auth::{Access, Caller, Denied, Scope},
    live::{self, Live, VerdictError},
    query::{Filter, GroupRow},
    store::{Store, StoreError, StoredEvent},
    verdict::{Bounds, Decision, JudgeConfig, JudgeOverrides, Verdict},
};

fn decision(d: Decision) -> i32 {
    let d = match d {
        Decision::Pass => pb::Decision::Pass,
        Decision::Fail => pb::Decision::Fail,
        Decision::Inconclusive => pb::Decision::Inconclusive,
    };
    d as i32
}

fn bounds(b: Bounds) -> pb::Bounds {
    pb::Bounds {
        lower: b.lower,
        upper: b.upper,
    }
}

/// The wire form of a verdict.
pub fn verdict_to_proto(v: &Verdict) -> VerdictReply {
    VerdictReply {
        decision: decision(v.decision),
        score: v.score,
        seconds: v.seconds,
        alpha: v.alpha,
        threshold: v.threshold,
        canary_requests: v.requests.canary,
        baseline_requests: v.requests.baseline,
        reasons: v.reasons.clone(),
        metrics: v
            .metrics
            .iter()
            .map(|m| pb::MetricVerdict {
                metric: m.metric.clone(),
                endpoint: m.endpoint.clone(),
                decision: decision(m.decision),
                required: m.required,
                canary_requests: m.canary_requests,
                baseline_requests: m.baseline_requests,
                canary_bounds: m.canary_bounds.map(bounds),
                baseline_bounds: m.baseline_bounds.map(bounds),
                ratio_bounds: m.ratio_bounds.map(bounds),
                limit: m.limit,
                canary: m.canary,
                baseline: m.baseline,
                effect: m.effect,
                e_value_harm: m.e_value_harm,
                e_value_safe: m.e_value_safe,
                summary: m.summary.clone(),
                drilldown: m
                    .drilldown
                    .iter()
                    .map(|r| pb::DrillDownRow {
                        dimension: r.dimension.clone(),
                        value: r.value.clone(),
                        canary_bad: r.canary_bad,
                        bad_share: r.bad_share,
                        baseline_share: r.baseline_share,
                        canary_share: r.canary_share,
                        score: r.score,
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub struct QueryService {
    store: Arc<dyn Store>,
    live: Arc<Live>,
    access: Arc<Access>,
}

impl QueryService {
    /// Open to every caller; see `with_access`.
    pub fn new(store: Arc<dyn Store>, live: Arc<Live>) -> Self {
        Self {
            store,
            live,
            access: Arc::new(Access::open()),
        }
    }

    /// Checks each call's bearer token against `access` (the HTTP API's tokens).
    pub fn with_access(mut self, access: Arc<Access>) -> Self {
        self.access = access;
        self
    }

    /// Who calls, if the call's token allows `needed`, or the status saying why not.
    fn allow<T>(&self, request: &Request<T>, needed: Scope) -> Result<Caller, Status> {
        let authorization = request
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes());
        match self.access.caller(authorization, None, needed) {
            Ok(caller) => Ok(caller),
            Err(d @ Denied::Scope { .. }) => Err(Status::permission_denied(d.to_string())),
            Err(_) if !self.access.has_tokens() => Err(Status::unauthenticated(
                "the Query service needs a bearer token and the collector has none \
                 (--api-tokens); client certificates count on the HTTP API only",
            )),
            Err(Denied::Missing { .. }) => Err(Status::unauthenticated(
                "authentication required: send `authorization: Bearer TOKEN` metadata",
            )),
            Err(d) => Err(Status::unauthenticated(d.to_string())),
        }
    }
}

fn filter(selection: Option<Selection>) -> Result<Filter, Status> {
    let s = selection.unwrap_or_default();
    let mut f = Filter {
        since_unix_ns: s.since_unix_ns,
        until_unix_ns: s.until_unix_ns,
        ..Filter::default()
    };
    for e in s.equals {
        f.add(&e.field, &e.value)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
    }
    Ok(f)
}

async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| match e {
            StoreError::Query(q) => Status::invalid_argument(q.to_string()),
            other => Status::unavailable(other.to_string()),
        })
}

fn groups(rows: Vec<GroupRow>) -> GroupsReply {
    GroupsReply {
        groups: rows
            .into_iter()
            .map(|r| Group {
                key: r.key.into_iter().map(|value| GroupKey { value }).collect(),
                requests: r.requests,
                errors: r.errors,
                p50_ms: r.p50_ms,
                p90_ms: r.p90_ms,
                p99_ms: r.p99_ms,
                bytes_out: r.bytes_out,
            })
            .collect(),
    }
}

/// The wire form of a stored row (the JSON map every backend returns).
pub fn to_proto(row: &StoredEvent) -> ProtoStoredEvent {
    let s = |k: &str| {
        row.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let u = |k: &str| row.get(k).and_then(|v| v.as_u64()).unwrap_or_default();
    let i = |k: &str| row.get(k).and_then(|v| v.as_i64());
    ProtoStoredEvent {
        probe_id: s("probe_id"),
        event: Some(RequestEvent {
            experiment: s("experiment"),
            cohort: s("cohort"),
            node: s("node"),
            pod: s("pod"),
            container: s("container"),
            pid: u("pid") as u32,
            exe: s("exe"),
            role: s("role"),
            protocol: s("protocol"),
            method: s("method"),
            route: s("route"),
            path: s("path"),
            status: i("status").and_then(|v| u32::try_from(v).ok()),
            grpc_status: i("grpc_status").and_then(|v| i32::try_from(v).ok()),
            error: s("error"),
            start_unix_ns: u("start_unix_ns"),
            duration_ns: u("duration_ns"),
            bytes_in: u("bytes_in"),
            bytes_out: u("bytes_out"),
            peer: s("peer"),
            request_id: s("request_id"),
            traceparent: s("traceparent"),
            attributes: row
                .get("attributes")
                .and_then(|a| a.as_object())
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default(),
        }),
    }
}

#[tonic::async_trait]
impl Query for QueryService {
    async fn experiments(
        &self,
        request: Request<ExperimentsRequest>,
    ) -> Result<Response<GroupsReply>, Status> {
        self.allow(&request, Scope::Read)?;
        let store = self.store.clone();
        let rows =
            run(move || store.group(&Filter::default(), &["experiment".into(), "cohort".into()]))
                .await?;
        Ok(Response::new(groups(rows)))
    }

    async fn events(
        &self,
        request: Request<EventsRequest>,
    ) -> Result<Response<EventsReply>, Status> {
        self.allow(&request, Scope::Full)?;
        let r = request.into_inner();
        let f = filter(r.selection)?;
        let limit = match r.limit {
            0 => 100,
            n => (n as usize).min(100_000),
        };
        let store = self.store.clone();
        let rows = run(move || store.events(&f, limit)).await?;
        Ok(Response::new(EventsReply {
            events: rows.iter().map(to_proto).collect(),
        }))
    }

    async fn verdict(
        &self,
        request: Request<VerdictRequest>,
    ) -> Result<Response<VerdictReply>, Status> {
        self.allow(&request, Scope::Read)?;
        let r = request.into_inner();
        let or = |s: String, d: &str| if s.is_empty() { d.to_string() } else { s };
        let req = live::VerdictRequest {
            experiment: r.experiment,
            baseline: or(r.baseline, "baseline"),
            canary: or(r.canary, "canary"),
            since_unix_ns: r.since_unix_ns,
            overrides: JudgeOverrides {
                alpha: r.alpha,
                latency_tolerance: r.latency_tolerance,
                quantiles: r.quantiles,
                error_ratio_tolerance: r.error_ratio_tolerance,
                error_tolerance: r.error_tolerance,
                volume_tolerance: r.volume_tolerance,
                split: r.split,
                min_requests: r.min_requests,
                max_endpoints: r.max_endpoints.map(|n| n as usize),
            },
        };
        let live = self.live.clone();
        let v = tokio::task::spawn_blocking(move || live.verdict(&JudgeConfig::default(), &req))
            .await
            .map_err(|e| Status::internal(format!("judge task failed: {e}")))?
            .map_err(|e| match e {
                VerdictError::NotFound(m) => Status::not_found(m),
                VerdictError::Config(c) => Status::invalid_argument(c.to_string()),
                VerdictError::Store(s) => Status::unavailable(format!("storage failed: {s}")),
            })?;
        Ok(Response::new(verdict_to_proto(&v)))
    }

    async fn groups(
        &self,
        request: Request<GroupsRequest>,
    ) -> Result<Response<GroupsReply>, Status> {
        self.allow(&request, Scope::Full)?;
        let r = request.into_inner();
        let f = filter(r.selection)?;
        let store = self.store.clone();
        let rows = run(move || store.group(&f, &r.by)).await?;
        Ok(Response::new(groups(rows)))
    }
}

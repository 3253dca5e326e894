//! Prometheus `/metrics` of the probe: requests seen, events sent and acknowledged, drops by
//! reason (kernel ring buffer, maps, queue, spool, OTLP), queue and spool sizes, batch
//! acknowledgement latency. Read from the probe's counters at scrape time, so the event path
//! only bumps atomics.

use std::{
    fmt,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::export::{grpc::ExportStats, otlp::OtlpStats};

/// Counters the main loop updates (once per ring-buffer drain or per second).
#[derive(Debug, Default)]
pub struct ProbeCounters {
    /// Request events produced by the pipeline.
    pub events: AtomicU64,
    /// Kernel-side drops, indexed by `probe_common::drop_reason`.
    pub kernel_drops: [AtomicU64; probe_common::drop_reason::COUNT as usize],
    /// Connections sampled in, out of `probe_common::SAMPLE_SCALE` (the CPU budget's doing).
    pub sample: AtomicU64,
    /// Connections tracked now.
    pub connections: AtomicU64,
    /// Estimated requests lost in stream gaps.
    pub requests_lost_estimate: AtomicU64,
    /// Processes per cohort, in cohort id order (index 0: cohort 1).
    pub cohort_members: std::sync::Mutex<Vec<(String, u64)>>,
    /// The probe's own CPU use over the last second, in thousandths of a core.
    pub cpu_millicores: AtomicU64,
}

/// Names of the kernel drop reasons, in `probe_common::drop_reason` order.
pub const KERNEL_DROP_REASONS: [&str; probe_common::drop_reason::COUNT as usize] = [
    "ringbuf_full",
    "sockets_full",
    "calls_full",
    "read_user",
    "sampled_out_segment",
    "segment_unparsed",
    "sampled_out_connection",
    "tls_calls_full",
];

/// Everything `/metrics` reports.
#[derive(Debug)]
struct ProbeCollector {
    counters: Arc<ProbeCounters>,
    export: Option<Arc<ExportStats>>,
    otlp: Option<Arc<OtlpStats>>,
}

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstGauge::new(v as i64).encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for ProbeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "events",
            "Request events produced from cohort traffic",
            g(&self.counters.events),
        )?;
        let mut drops = enc.encode_descriptor(
            "kernel_drops",
            "Kernel-side losses, by reason (ring buffer full, maps full, unreadable user memory)",
            None,
            MetricType::Counter,
        )?;
        for (reason, n) in KERNEL_DROP_REASONS.iter().zip(&self.counters.kernel_drops) {
            ConstCounter::new(g(n)).encode(drops.encode_family(&[("reason", *reason)])?)?;
        }
        let c = &self.counters;
        gauge(
            &mut enc,
            "sampling_ratio_per_1024",
            "Connections decoded, out of 1024: below 1024 the probe is over its --max-cpu budget \
             and samples whole connections, equally in every cohort",
            g(&c.sample),
        )?;
        gauge(
            &mut enc,
            "connections",
            "Connections tracked",
            g(&c.connections),
        )?;
        counter(
            &mut enc,
            "requests_lost_estimate",
            "Estimated requests lost in stream gaps (lost records, TCP holes never filled)",
            g(&c.requests_lost_estimate),
        )?;
        gauge(
            &mut enc,
            "cpu_millicores",
            "The probe's CPU use over the last second, thousandths of a core",
            g(&c.cpu_millicores),
        )?;
        if let Ok(members) = c.cohort_members.lock() {
            let mut family = enc.encode_descriptor(
                "cohort_members",
                "Processes known per cohort (0 for a rule that matches nothing)",
                None,
                MetricType::Gauge,
            )?;
            for (cohort, n) in members.iter() {
                ConstGauge::new(*n as i64)
                    .encode(family.encode_family(&[("cohort", cohort.as_str())])?)?;
            }
        }
        if let Some(s) = &self.export {
            counter(
                &mut enc,
                "export_events",
                "Events handed to the collector exporter",
                g(&s.events_in),
            )?;
            counter(
                &mut enc,
                "export_batches_sent",
                "Batches sent to the collector (resends included)",
                g(&s.batches_sent),
            )?;
            gauge(
                &mut enc,
                "export_acked_sequence",
                "Last batch sequence the collector stored",
                g(&s.acked_sequence),
            )?;
            let mut dropped = enc.encode_descriptor(
                "export_dropped_events",
                "Events the collector exporter dropped, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [
                ("channel_full", g(&s.dropped_channel_full)),
                ("spool_full", g(&s.dropped_spool_full)),
            ] {
                ConstCounter::new(n).encode(dropped.encode_family(&[("reason", reason)])?)?;
            }
            gauge(
                &mut enc,
                "export_queued_batches",
                "Batches in the memory queue",
                g(&s.queued_batches),
            )?;
            gauge(
                &mut enc,
                "export_pending_events",
                "Events not yet acknowledged (memory and spool)",
                g(&s.pending_events),
            )?;
            gauge(
                &mut enc,
                "export_spool_bytes",
                "Bytes in the on-disk spool",
                g(&s.spool_bytes),
            )?;
            gauge(
                &mut enc,
                "export_connected",
                "1 while a stream to the collector is open",
                u64::from(s.connected.load(Ordering::Relaxed)),
            )?;
            counter(
                &mut enc,
                "export_connects",
                "Streams opened to the collector",
                g(&s.reconnects),
            )?;
        }
        if let Some(s) = &self.otlp {
            counter(
                &mut enc,
                "otlp_spans_exported",
                "Spans the OTLP receiver accepted",
                g(&s.spans_exported),
            )?;
            let mut dropped = enc.encode_descriptor(
                "otlp_dropped_spans",
                "Spans not delivered to the OTLP receiver, by reason",
                None,
                MetricType::Counter,
            )?;
            for (reason, n) in [
                ("queue_full", g(&s.dropped_queue_full)),
                ("export_failed", g(&s.dropped_export_failed)),
            ] {
                ConstCounter::new(n).encode(dropped.encode_family(&[("reason", reason)])?)?;
            }
            counter(
                &mut enc,
                "otlp_export_errors",
                "Failed OTLP export attempts",
                g(&s.export_errors),
            )?;
        }
        Ok(())
    }
}

/// The probe's registry.
pub fn registry(
    counters: Arc<ProbeCounters>,
    export: Option<Arc<ExportStats>>,
    otlp: Option<Arc<OtlpStats>>,
) -> Registry {
    let mut registry = Registry::with_prefix("bakeoff_probe");
    if let Some(s) = &export {
        registry.register(
            "export_ack_seconds",
            "Time from sending a batch to the collector's acknowledgement that it is stored",
            s.ack_seconds.clone(),
        );
    }
    registry.register_collector(Box::new(ProbeCollector {
        counters,
        export,
        otlp,
    }));
    registry
}

/// Content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `GET /metrics` (and `/healthz`) until the runtime stops.
pub async fn serve(addr: SocketAddr, registry: Registry) -> std::io::Result<()> {
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let registry = registry.clone();
                async move {
                    let mut body = String::new();
                    match prometheus_client::encoding::text::encode(&mut body, &registry) {
                        Ok(()) => (
                            axum::http::StatusCode::OK,
                            [(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)],
                            body,
                        ),
                        Err(_) => (
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                            [(axum::http::header::CONTENT_TYPE, "text/plain")],
                            "cannot encode metrics\n".to_string(),
                        ),
                    }
                }
            }),
        )
        .route("/healthz", axum::routing::get(|| async { "ok\n" }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    axum::serve(listener, app).await
}

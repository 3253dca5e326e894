//! Prometheus `/metrics` of the collector: what it received, stored and refused, and what each
//! probe last reported about its own losses. Read from the ingest counters at scrape time, so the
//! ingest path only bumps atomics.

use std::{
    fmt,
    sync::{Arc, atomic::Ordering},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::ingest::IngestStats;

/// The collector's registry: the ingest counters plus the batch store-latency histogram.
pub fn registry(stats: Arc<IngestStats>) -> Registry {
    let mut registry = Registry::with_prefix("bakeoff_collector");
    registry.register(
        "store_batch_seconds",
        "Time to store one batch durably",
        stats.store_seconds.clone(),
    );
    registry.register_collector(Box::new(IngestCollector(stats)));
    registry
}

/// Renders the registry in the OpenMetrics text format.
pub fn render(registry: &Registry) -> Result<String, fmt::Error> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)?;
    Ok(out)
}

/// Content type of `render`'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Debug)]
struct IngestCollector(Arc<IngestStats>);

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> fmt::Result {
    ConstCounter::new(v).encode(enc.encode_descriptor(name, help, None, MetricType::Counter)?)
}

impl Collector for IngestCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let s = &self.0;
        let g = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut enc,
            "events_stored",
            "Events stored",
            g(&s.events_stored),
        )?;
        counter(
            &mut enc,
            "batches_stored",
            "Batches stored",
            g(&s.batches_stored),
        )?;
        counter(
            &mut enc,
            "batches_duplicate",
            "Resent batches already stored (acknowledged, not stored again)",
            g(&s.batches_duplicate),
        )?;
        counter(
            &mut enc,
            "streams_refused",
            "Ingest streams refused (no hello, wrong version, bad message)",
            g(&s.streams_refused),
        )?;
        counter(
            &mut enc,
            "events_late",
            "Events stored after the judge had read their second (stored, not judged)",
            g(&s.events_late),
        )?;
        let Ok(health) = s.health.lock() else {
            return Ok(());
        };
        let per_probe = |enc: &mut DescriptorEncoder,
                         name: &str,
                         help: &str,
                         kind: MetricType,
                         value: &dyn Fn(&bakeoff_proto::v1::ProbeHealth) -> u64|
         -> fmt::Result {
            let mut family = enc.encode_descriptor(name, help, None, kind)?;
            for (probe, h) in health.iter() {
                let labels = [("probe", probe.as_str())];
                let m = family.encode_family(&labels)?;
                match kind {
                    MetricType::Counter => ConstCounter::new(value(h)).encode(m)?,
                    _ => ConstGauge::new(value(h) as i64).encode(m)?,
                }
            }
            Ok(())
        };
        per_probe(
            &mut enc,
            "probe_ringbuf_drops",
            "Events the probe's kernel side could not write (ring buffer full), as last reported",
            MetricType::Counter,
            &|h| h.ringbuf_drops,
        )?;
        per_probe(
            &mut enc,
            "probe_queued_batches",
            "Batches waiting in the probe's memory queue, as last reported",
            MetricType::Gauge,
            &|h| h.queued_batches,
        )?;
        per_probe(
            &mut enc,
            "probe_spool_bytes",
            "Bytes in the probe's on-disk spool, as last reported",
            MetricType::Gauge,
            &|h| h.spool_bytes,
        )?;
        let mut family = enc.encode_descriptor(
            "probe_dropped_events",
            "Events the probe dropped, by reason, as last reported",
            None,
            MetricType::Counter,
        )?;
        for (probe, h) in health.iter() {
            for (reason, n) in &h.dropped_events {
                let labels = [("probe", probe.as_str()), ("reason", reason.as_str())];
                ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

//! `bakeoff-probe`: watches the sockets of cohort processes from the kernel and prints one event
//! per HTTP/1.x request.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use bakeoff_probe::{
    cohort::{CgroupMatch, Cohorts, cgroup2_root},
    config::{CohortRule, CollectorConfig, Config, OtlpConfig, TlsConfig},
    export::{
        grpc::{ExportConfig, Exporter},
        otlp::{OtlpExportConfig, OtlpExporter},
        tls::client_tls,
        to_proto,
    },
    kernel::Kernel,
    metrics::{self, ProbeCounters},
    output::JsonLines,
    pipeline::Pipeline,
    summary::Summary,
};
use clap::Parser;
use tokio::io::unix::AsyncFd;

/// Watch baseline and canary processes and print one JSON event per request.
#[derive(Debug, Parser)]
#[command(name = "bakeoff-probe", version)]
struct Cli {
    /// YAML configuration file.
    #[arg(short, long, env = "BAKEOFF_CONFIG")]
    config: Option<PathBuf>,
    /// Cohort rule NAME=KIND:VALUE[,KIND:VALUE...], KIND one of cgroup, pid, exe, env
    /// (e.g. `canary=env:BAKEOFF_COHORT=canary`). Repeatable; added to the file's rules.
    #[arg(long = "cohort", value_name = "RULE")]
    cohorts: Vec<String>,
    /// Experiment name carried by every event.
    #[arg(long, env = "BAKEOFF_EXPERIMENT")]
    experiment: Option<String>,
    /// Node name carried by every event (default: host name).
    #[arg(long, env = "BAKEOFF_NODE")]
    node: Option<String>,
    /// Payload bytes captured per syscall (at most 4096).
    #[arg(long, env = "BAKEOFF_PAYLOAD_PREFIX")]
    payload_prefix: Option<u32>,
    /// Ring buffer size in bytes (power of two).
    #[arg(long, env = "BAKEOFF_RING_BUFFER_BYTES")]
    ring_buffer_bytes: Option<u32>,
    /// Keep the per-syscall hooks attached even while no cohort has a member.
    #[arg(long)]
    always_attach: bool,
    /// JSON lines: `-` (stdout), `none`, or a file. Default: stdout unless --collector is set.
    #[arg(short, long, env = "BAKEOFF_OUTPUT")]
    output: Option<String>,
    /// Stream events to this collector (`http://host:port`, its gRPC ingest).
    #[arg(long, env = "BAKEOFF_COLLECTOR")]
    collector: Option<String>,
    /// Directory where unacknowledged batches overflow (bounded; survives restarts).
    #[arg(long, env = "BAKEOFF_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Memory queue of unacknowledged batches, before the spool.
    #[arg(long)]
    queue_batches: Option<usize>,
    /// Bound of the spool directory in bytes.
    #[arg(long)]
    spool_bytes: Option<u64>,
    /// Events per batch sent to the collector.
    #[arg(long)]
    batch_size: Option<usize>,
    /// CA certificate (PEM) of the collector's TLS certificate; implies TLS.
    #[arg(long, env = "BAKEOFF_COLLECTOR_CA")]
    collector_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS with the collector.
    #[arg(long, env = "BAKEOFF_COLLECTOR_CERT", requires = "collector_key")]
    collector_cert: Option<PathBuf>,
    #[arg(long, env = "BAKEOFF_COLLECTOR_KEY", requires = "collector_cert")]
    collector_key: Option<PathBuf>,
    /// Name the collector's certificate must carry (default: the endpoint's host).
    #[arg(long, env = "BAKEOFF_COLLECTOR_DOMAIN")]
    collector_domain: Option<String>,
    /// Also export every request as an OTLP/gRPC server span to this receiver.
    #[arg(long, env = "BAKEOFF_OTLP_ENDPOINT")]
    otlp: Option<String>,
    /// Serve Prometheus /metrics on this address.
    #[arg(long, env = "BAKEOFF_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Create this file once the probe is watching (hooks attached, connections seeded).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Print a per-cohort summary table to stderr at exit.
    #[arg(long)]
    summary: bool,
    /// Write the probe's counters (events, drops by reason) as JSON to this file at exit.
    #[arg(long)]
    stats_file: Option<PathBuf>,
}

impl Cli {
    /// File, then environment and flags on top.
    fn config(&self) -> Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        for flag in &self.cohorts {
            config.cohorts.push(CohortRule::parse_flag(flag)?);
        }
        if let Some(v) = &self.experiment {
            config.experiment = v.clone();
        }
        if let Some(v) = &self.node {
            config.node = Some(v.clone());
        }
        if let Some(v) = self.payload_prefix {
            config.payload_prefix = v;
        }
        if let Some(v) = self.ring_buffer_bytes {
            config.ring_buffer_bytes = v;
        }
        if self.always_attach {
            config.on_demand_hooks = false;
        }
        if let Some(v) = &self.output {
            config.output.path = Some(v.clone());
        }
        if let Some(v) = &self.collector {
            config.collector = Some(CollectorConfig::new(v.clone()));
        }
        if let Some(c) = config.collector.as_mut() {
            if let Some(v) = &self.spool_dir {
                c.spool_dir = Some(v.clone());
            }
            if let Some(v) = self.queue_batches {
                c.queue_batches = v;
            }
            if let Some(v) = self.spool_bytes {
                c.spool_bytes = v;
            }
            if let Some(v) = self.batch_size {
                c.batch_size = v;
            }
            if self.collector_ca.is_some()
                || self.collector_cert.is_some()
                || self.collector_domain.is_some()
            {
                let tls = c.tls.get_or_insert_with(TlsConfig::default);
                if let Some(v) = &self.collector_ca {
                    tls.ca = Some(v.clone());
                }
                if let Some(v) = &self.collector_cert {
                    tls.cert = Some(v.clone());
                }
                if let Some(v) = &self.collector_key {
                    tls.key = Some(v.clone());
                }
                if let Some(v) = &self.collector_domain {
                    tls.domain = Some(v.clone());
                }
            }
        }
        if let Some(v) = &self.otlp {
            config.otlp = Some(OtlpConfig::new(v.clone()));
        }
        if let Some(v) = self.metrics_listen {
            config.metrics_listen = Some(v);
        }
        config.validate("command line")?;
        if config.cohorts.is_empty() {
            bail!("no cohort rules: give --cohort NAME=KIND:VALUE or a config file with `cohorts`");
        }
        Ok(config)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn main() {
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("BAKEOFF_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("bakeoff-probe: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = cli.config()?;
    let cohorts = Cohorts::new(&config.cohorts, cgroup2_root())?;
    let mut kernel = Kernel::load(config.payload_prefix, config.ring_buffer_bytes)?;
    let ring = kernel.ring()?;
    let node = config.node.clone().unwrap_or_else(hostname);
    let mut pipeline = Pipeline::new(cohorts, config.experiment.clone(), node);
    let mut out = match config.json_output() {
        Some(path) => {
            Some(JsonLines::open(path).with_context(|| format!("cannot open output {path}"))?)
        }
        None => None,
    };

    let mut cgroups = pipeline.cohorts().cgroups();
    kernel.set_cgroups(&ids(&cgroups))?;
    pipeline.scan(&mut kernel, &cgroups);
    let mut hooks = HookControl::new(!config.on_demand_hooks);
    hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
    tracing::info!(
        cohorts = ?pipeline.cohorts().names(),
        processes = pipeline.process_count(),
        cgroups = cgroups.len(),
        data_hooks = kernel.data_hooks_attached(),
        prefix = config.payload_prefix,
        "probe ready"
    );
    if let Some(path) = &cli.ready_file {
        std::fs::write(path, b"ready\n")
            .with_context(|| format!("cannot write ready file {}", path.display()))?;
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut summary = Summary::default();
    let counters = Arc::new(ProbeCounters::default());
    let (exporter_stats, otlp_stats) = runtime.block_on(async {
        let exporter = match &config.collector {
            Some(c) => Some(
                Exporter::start(
                    ExportConfig {
                        endpoint: c.endpoint.clone(),
                        batch_size: c.batch_size,
                        batch_interval: Duration::from_millis(c.batch_interval_ms),
                        queue_batches: c.queue_batches,
                        spool_dir: c.spool_dir.clone(),
                        spool_bytes: c.spool_bytes,
                        drain_timeout: Duration::from_secs(5),
                        tls: client_tls(&c.endpoint, c.tls.as_ref())
                            .context("collector TLS settings")?,
                    },
                    hello(&config, &pipeline),
                )
                .context("cannot start the collector exporter")?,
            ),
            None => None,
        };
        let otlp = match &config.otlp {
            Some(o) => Some(OtlpExporter::start(OtlpExportConfig {
                endpoint: o.endpoint.clone(),
                batch_size: o.batch_size,
                queue_spans: o.queue_spans,
                service_name: o.service_name.clone(),
                tls: client_tls(&o.endpoint, None).context("OTLP TLS settings")?,
            })),
            None => None,
        };
        if let Some(addr) = config.metrics_listen {
            let registry = metrics::registry(
                counters.clone(),
                exporter.as_ref().map(|e| e.stats.clone()),
                otlp.as_ref().map(|o| o.stats.clone()),
            );
            // Bind now so a taken port is a start-up error, not a silent absence of metrics.
            let listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("cannot listen on {addr} for /metrics"))?;
            drop(listener);
            tokio::spawn(async move {
                if let Err(e) = metrics::serve(addr, registry).await {
                    tracing::error!(%addr, error = %e, "metrics server stopped");
                }
            });
            tracing::info!(%addr, "serving /metrics");
        }
        let mut sink = Sink {
            json: out.as_mut(),
            exporter: exporter.as_ref(),
            otlp: otlp.as_ref(),
            counters: &counters,
            summary: &mut summary,
        };
        // SAFETY: the ring buffer owns its fd and keeps it open until the AsyncFd is dropped.
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("cannot poll the ring buffer: {e}"))?;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let deadline = cli.duration.map(Duration::from_secs_f64);
        let stop = async {
            match deadline {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(stop);
        let mut events = Vec::new();
        let mut last_drops = [0u64; probe_common::drop_reason::COUNT as usize];
        loop {
            tokio::select! {
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("ring buffer poll failed")?;
                    drain(guard.get_inner_mut(), &mut pipeline, &mut kernel, &mut events);
                    guard.clear_ready();
                    sink.write(&mut events)?;
                    hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
                }
                _ = tick.tick() => {
                    // New cgroups (pods started since) join their cohort.
                    let now = pipeline.cohorts().cgroups();
                    if now != cgroups {
                        kernel.set_cgroups(&ids(&now))?;
                        cgroups = now;
                        hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
                    }
                    let drops = kernel.drops();
                    for (c, d) in counters.kernel_drops.iter().zip(drops) {
                        c.store(d, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Some(e) = sink.exporter {
                        e.stats.ringbuf_drops.store(drops[0], std::sync::atomic::Ordering::Relaxed);
                    }
                    if drops != last_drops {
                        tracing::warn!(?drops, "kernel-side drops (ringbuf_full, sockets_full, calls_full, read_user)");
                        last_drops = drops;
                    }
                }
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = &mut stop => break,
            }
        }
        drain(ring.get_mut(), &mut pipeline, &mut kernel, &mut events);
        sink.write(&mut events)?;
        let otlp_stats = match otlp {
            Some(o) => {
                let stats = o.stats.clone();
                o.shutdown().await;
                Some(stats.to_json())
            }
            None => None,
        };
        let stats = match exporter {
            Some(e) => {
                let stats = e.stats.clone();
                e.shutdown().await;
                Some(stats.to_json())
            }
            None => None,
        };
        anyhow::Ok((stats, otlp_stats))
    })?;

    let programs: serde_json::Map<String, serde_json::Value> = kernel
        .program_stats()
        .into_iter()
        .map(|(name, (ns, count))| {
            (
                name,
                serde_json::json!({"run_time_ns": ns, "run_count": count}),
            )
        })
        .collect();
    let stats = serde_json::json!({
        "programs": programs,
        "pipeline": pipeline.stats,
        "connections": pipeline.conn_stats(),
        "in_flight_at_exit": pipeline.in_flight(),
        "export": exporter_stats,
        "otlp": otlp_stats,
        "kernel_drops": {
            "ringbuf_full": kernel.drops()[0],
            "sockets_full": kernel.drops()[1],
            "calls_full": kernel.drops()[2],
            "read_user": kernel.drops()[3],
        },
    });
    tracing::info!(%stats, "probe stopped");
    if let Some(path) = &cli.stats_file {
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("cannot write stats file {}", path.display()))?;
    }
    if cli.summary {
        eprint!("{}", summary.table());
    }
    Ok(())
}

fn ids(cgroups: &[CgroupMatch]) -> Vec<(u64, u32)> {
    cgroups.iter().map(|g| (g.id, g.cohort)).collect()
}

/// Reads every record waiting in the ring buffer.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline,
    kernel: &mut Kernel,
    events: &mut Vec<bakeoff_probe::event::RequestEvent>,
) {
    while let Some(item) = ring.next() {
        pipeline.handle(&item, kernel, events);
    }
}

/// Everywhere finished events go.
struct Sink<'a> {
    json: Option<&'a mut JsonLines>,
    exporter: Option<&'a Exporter>,
    otlp: Option<&'a OtlpExporter>,
    counters: &'a ProbeCounters,
    summary: &'a mut Summary,
}

impl Sink<'_> {
    fn write(&mut self, events: &mut Vec<bakeoff_probe::event::RequestEvent>) -> Result<()> {
        self.counters
            .events
            .fetch_add(events.len() as u64, std::sync::atomic::Ordering::Relaxed);
        for e in events.drain(..) {
            self.summary.add(&e);
            match (self.exporter, self.otlp) {
                (Some(x), Some(o)) => {
                    let p = to_proto(&e);
                    o.send(p.clone());
                    x.send(p);
                }
                (Some(x), None) => x.send(to_proto(&e)),
                (None, Some(o)) => o.send(to_proto(&e)),
                (None, None) => {}
            }
            if let Some(out) = self.json.as_deref_mut() {
                out.write(&e).context("cannot write event")?;
            }
        }
        if let Some(out) = self.json.as_deref_mut() {
            out.flush().context("cannot flush events")?;
        }
        Ok(())
    }
}

/// What the probe tells the collector about itself. The id is new for every start unless
/// spooled batches of an earlier run are resent (their sequence numbers continue).
fn hello(config: &Config, pipeline: &Pipeline) -> bakeoff_proto::v1::ProbeHello {
    let node = config.node.clone().unwrap_or_else(hostname);
    let spool_id = config
        .collector
        .as_ref()
        .and_then(|c| c.spool_dir.as_ref())
        .map(|d| d.join("probe_id"));
    let fresh = || {
        let mut bytes = [0u8; 8];
        let _ = std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes));
        format!("{node}-{:016x}", u64::from_le_bytes(bytes))
    };
    // Sequence numbers restart at 1 with an empty spool, so only a spool that still holds
    // batches may keep the earlier identity (else the collector would discard them as repeats).
    let has_batches = |dir: &std::path::Path| {
        std::fs::read_dir(dir).is_ok_and(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(".batch"))
        })
    };
    let probe_id = match &spool_id {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(id) if !id.trim().is_empty() && path.parent().is_some_and(has_batches) => {
                id.trim().to_string()
            }
            _ => {
                let id = fresh();
                if let Some(dir) = path.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                let _ = std::fs::write(path, &id);
                id
            }
        },
        None => fresh(),
    };
    bakeoff_proto::v1::ProbeHello {
        probe_id,
        protocol_version: bakeoff_proto::PROTOCOL_VERSION,
        node,
        probe_version: env!("CARGO_PKG_VERSION").to_string(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        cohorts: pipeline.cohorts().names().to_vec(),
    }
}

/// Attaches the per-syscall hooks while some cohort has a member, detaches them otherwise.
struct HookControl {
    always: bool,
}

impl HookControl {
    fn new(always: bool) -> Self {
        Self { always }
    }

    fn update(
        &mut self,
        kernel: &mut Kernel,
        pipeline: &mut Pipeline,
        cgroups: bool,
    ) -> Result<()> {
        let wanted = self.always || cgroups || pipeline.process_count() > 0;
        if wanted && !kernel.data_hooks_attached() {
            kernel.attach_data_hooks()?;
            pipeline.seed_all(kernel);
            tracing::info!(processes = pipeline.process_count(), "data hooks attached");
        } else if !wanted && kernel.data_hooks_attached() {
            kernel.detach_data_hooks();
            tracing::info!("no cohort members: data hooks detached");
        }
        Ok(())
    }
}

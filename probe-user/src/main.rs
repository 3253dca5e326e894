//! `bakeoff-probe`: watches the sockets of cohort processes from the kernel and prints one event
//! per HTTP/1.x request.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use bakeoff_probe::{
    cohort::{CgroupMatch, Cohorts, cgroup_plan, cgroup2_root},
    config::{CohortRule, CollectorConfig, Config, DataPath, OtlpConfig, TlsConfig},
    export::{
        control::{Control, FromCollector},
        grpc::{ExportConfig, Exporter},
        otlp::{OtlpExportConfig, OtlpExporter},
        tls::client_tls,
        to_proto,
    },
    kernel::Kernel,
    metrics::{self, ProbeCounters},
    output::JsonLines,
    pipeline::Pipeline,
    remote_capture::RemoteCaptures,
    summary::Summary,
    tls::TlsWatch,
};
use clap::Parser;
use tokio::io::unix::AsyncFd;

/// Subcommands; without one, the probe runs.
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Preflight: print what this host allows (kernel, BTF, cgroup v2, tracefs, uprobes,
    /// capabilities, the kernel programs loading) and which data path and how many members
    /// each configured cohort has. Exit 0 if all is well, 2 with warnings, 1 if the probe cannot
    /// work here.
    Check,
}

/// Watch baseline and canary processes and print one JSON event per request.
#[derive(Debug, Parser)]
#[command(name = "bakeoff-probe", version)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// YAML configuration file.
    #[arg(short, long, env = "BAKEOFF_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Cohort rule NAME=KIND:VALUE[,KIND:VALUE...], KIND one of cgroup, pid, exe, env
    /// (e.g. `canary=env:BAKEOFF_COHORT=canary`). Repeatable; added to the file's rules.
    #[arg(long = "cohort", value_name = "RULE", global = true)]
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
    /// Kernel hooks for cohorts named by cgroup: `auto` (cgroup_skb on the cohort cgroups;
    /// nothing else on the host pays) or `syscall` (syscall tracepoints, as for pid, exe and
    /// env rules).
    #[arg(long, env = "BAKEOFF_DATA_PATH", value_enum, global = true)]
    data_path: Option<DataPath>,
    /// CPU budget as a share of one core (default 1.0). Above it the probe samples whole
    /// connections, equally in every cohort, and reports the ratio, instead of slowing services.
    #[arg(long, env = "BAKEOFF_MAX_CPU")]
    max_cpu: Option<f64>,
    /// Memory bound: connections tracked at most (default 100000).
    #[arg(long, env = "BAKEOFF_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
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
    /// Decode TLS: uprobes on OpenSSL's SSL_read/SSL_write in each cohort process that maps
    /// libssl. Off by default: each call then costs the service a few microseconds more (on
    /// the development VM, HTTPS with keep-alive used 7x the CPU per request).
    #[arg(long, env = "BAKEOFF_TLS_PLAINTEXT")]
    tls_plaintext: bool,
    /// Record this cohort's traffic (TLS plaintext included, redacted) into `--capture-file`,
    /// for `bakeoff replay`.
    #[arg(long, requires = "capture_file", value_name = "COHORT")]
    capture_cohort: Option<String>,
    /// The capture file to write (bakeoff capture format, zstd).
    #[arg(long, requires = "capture_cohort")]
    capture_file: Option<PathBuf>,
    /// Stop recording once the file holds this many bytes (default 1 GiB); later records are
    /// counted, not written.
    #[arg(long, default_value_t = 1 << 30)]
    capture_max_bytes: u64,
    /// More headers to mask in the capture (Authorization, Proxy-Authorization, Cookie and
    /// Set-Cookie always are). Repeatable.
    #[arg(long = "redact-header", value_name = "NAME")]
    redact_headers: Vec<String>,
    /// JSON fields whose values are masked in the capture. Repeatable.
    #[arg(long = "redact-json", value_name = "FIELD")]
    redact_json: Vec<String>,
    /// Regular expressions whose matches are masked in the capture. Repeatable.
    #[arg(long = "redact-regex", value_name = "REGEX")]
    redact_regex: Vec<String>,
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
        } else if self.capture_cohort.is_some()
            && config.payload_prefix == probe_common::DEFAULT_PREFIX
        {
            // A capture wants whole payloads: the largest prefix unless one was chosen.
            config.payload_prefix = probe_common::MAX_PREFIX as u32;
        }
        if let Some(v) = self.ring_buffer_bytes {
            config.ring_buffer_bytes = v;
        }
        if self.always_attach {
            config.on_demand_hooks = false;
        }
        if let Some(v) = self.data_path {
            config.data_path = v;
        }
        if let Some(v) = self.max_cpu {
            config.max_cpu = v;
        }
        if let Some(v) = self.max_connections {
            config.max_connections = v;
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

/// `check` with a `kubernetes` section: lists this node's pods once (and the rollouts the rules
/// name) and gives them to the cohort rules, so the cohort lines below show what they take.
fn kubernetes_check(
    k: &bakeoff_probe::config::KubernetesConfig,
    node: &str,
    cohorts: &mut Cohorts,
) -> bakeoff_probe::preflight::Finding {
    use bakeoff_probe::{
        kubernetes::{View, watch},
        preflight::{Finding, Level},
    };
    let listed = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))
        .and_then(|rt| {
            rt.block_on(async {
                let client = watch::client(k).await?;
                Ok(watch::list_once(client, node, cohorts.needs_rollouts()).await?)
            })
        });
    match listed {
        Ok(snapshot) => {
            let detail = format!(
                "{} pods on node {node}, {} Argo Rollouts listed",
                snapshot.pods.len(),
                snapshot.rollouts.len()
            );
            let view = View::new(k.labels.clone(), cgroup2_root());
            if let Ok(mut s) = view.snapshot.write() {
                *s = snapshot;
            }
            cohorts.set_kubernetes(Arc::new(view));
            Finding {
                what: "kubernetes".into(),
                level: Level::Ok,
                detail,
            }
        }
        Err(e) => Finding {
            what: "kubernetes".into(),
            level: Level::Fail,
            detail: format!("cannot list this node's pods ({node}): {e}"),
        },
    }
}

fn run(cli: Cli) -> Result<()> {
    let config = cli.config()?;
    if matches!(cli.command, Some(Command::Check)) {
        let mut findings =
            bakeoff_probe::preflight::host(config.payload_prefix, config.ring_buffer_bytes);
        findings.extend(bakeoff_probe::preflight::capabilities(
            &config.cohorts,
            config.data_path,
            cli.tls_plaintext,
        ));
        match Cohorts::new(&config.cohorts, cgroup2_root()) {
            Ok(mut cohorts) => {
                if let Some(k) = &config.kubernetes {
                    let node = config.node.clone().unwrap_or_else(hostname);
                    findings.push(kubernetes_check(k, &node, &mut cohorts));
                }
                findings.extend(bakeoff_probe::preflight::cohorts(
                    &cohorts,
                    &config.cohorts,
                    config.data_path,
                ))
            }
            Err(e) => findings.push(bakeoff_probe::preflight::Finding {
                what: "cohorts".into(),
                level: bakeoff_probe::preflight::Level::Fail,
                detail: e.to_string(),
            }),
        }
        let (text, code) = bakeoff_probe::preflight::report(&findings);
        print!("{text}");
        std::process::exit(code);
    }
    let mut cohorts = Cohorts::new(&config.cohorts, cgroup2_root())?;
    // The node's pods, kept current by watches started with the async runtime below.
    let kube_view = config.kubernetes.as_ref().map(|k| {
        Arc::new(bakeoff_probe::kubernetes::View::new(
            k.labels.clone(),
            cgroup2_root(),
        ))
    });
    if let Some(view) = &kube_view {
        cohorts.set_kubernetes(view.clone());
    }
    let needs_rollouts = cohorts.needs_rollouts();
    let mut kernel = Kernel::load(config.payload_prefix, config.ring_buffer_bytes)?;
    let ring = kernel.ring()?;
    let node = config.node.clone().unwrap_or_else(hostname);
    let mut pipeline = Pipeline::new(cohorts, config.experiment.clone(), node.clone());
    let mut out = match config.json_output() {
        Some(path) => {
            Some(JsonLines::open(path).with_context(|| format!("cannot open output {path}"))?)
        }
        None => None,
    };

    pipeline.set_max_connections(config.max_connections);
    // Wake the reader well before the ring buffer can fill between two timer polls.
    kernel.set_wake_bytes(WAKE_BYTES.min(config.ring_buffer_bytes / 8))?;
    let via_cgroup = config.data_path == DataPath::Auto;
    let mut cgroups = pipeline.cohorts().cgroups();
    apply_cgroups(&mut kernel, &mut pipeline, &cgroups, via_cgroup)?;
    pipeline.scan(&mut kernel, &cgroups, via_cgroup);
    let mut hooks = HookControl::new(!config.on_demand_hooks, via_cgroup);
    hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
    let mut tls = TlsWatch::new(cli.tls_plaintext);
    follow_membership(&mut tls, &mut kernel, &mut pipeline);
    let mut empty = EmptyCohorts::default();
    empty.check(&pipeline, &config.cohorts);
    if let (Some(cohort), Some(path)) = (&cli.capture_cohort, &cli.capture_file) {
        let id = pipeline
            .cohorts()
            .names()
            .iter()
            .position(|n| n == cohort)
            .with_context(|| {
                format!(
                    "--capture-cohort {cohort}: no such cohort (cohorts: {:?})",
                    pipeline.cohorts().names()
                )
            })? as u32
            + 1;
        let redactor = bakeoff_capture::redact::Redactor::new(&bakeoff_capture::redact::Rules {
            headers: cli.redact_headers.clone(),
            json_fields: cli.redact_json.clone(),
            regexes: cli.redact_regex.clone(),
        })?;
        let meta = bakeoff_capture::Meta {
            experiment: config.experiment.clone(),
            cohort: cohort.clone(),
            started_unix_ns: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64),
            ..Default::default()
        };
        let recording = bakeoff_probe::recording::Recording::create(
            path,
            id,
            meta,
            redactor,
            cli.capture_max_bytes,
        )
        .with_context(|| format!("cannot create capture file {}", path.display()))?;
        pipeline.start_recording(recording);
        tracing::info!(cohort, file = %path.display(), "recording");
    }
    let mut budget = Budget::new(config.max_cpu);
    tracing::info!(
        cohorts = ?pipeline.cohorts().names(),
        processes = pipeline.process_count(),
        cgroups = cgroups.len(),
        cgroup_path = kernel.cgroup_path_dirs(),
        syscall_hooks = kernel.data_hooks_attached(),
        prefix = config.payload_prefix,
        max_cpu = config.max_cpu,
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
        if let (Some(k), Some(view)) = (&config.kubernetes, &kube_view) {
            use bakeoff_probe::kubernetes::watch;
            let client = watch::client(k)
                .await
                .context("cannot use the Kubernetes API (the `kubernetes` section)")?;
            let stats = Arc::new(watch::WatchStats::default());
            tokio::spawn(watch::pods(
                client.clone(),
                node.clone(),
                view.clone(),
                stats.clone(),
            ));
            if needs_rollouts {
                tokio::spawn(watch::rollouts(client, view.clone(), stats));
            }
            tracing::info!(node = %node, rollouts = needs_rollouts, "watching this node's pods");
        }
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
        // The control channel beside the event stream: captures on demand.
        let mut control = match &config.collector {
            Some(c) => {
                if c.tls.is_none() && c.captures {
                    tracing::warn!(
                        endpoint = c.endpoint,
                        "the control channel has no TLS: capture commands are taken from whoever \
                         answers at the collector's address (collector.tls, or captures: false)"
                    );
                }
                Some(Control::start(
                    c.endpoint.clone(),
                    client_tls(&c.endpoint, c.tls.as_ref()).context("collector TLS settings")?,
                    hello(&config, &pipeline),
                ))
            }
            None => None,
        };
        let mut remote = RemoteCaptures::new(
            config.collector.as_ref().is_some_and(|c| c.captures),
            config.experiment.clone(),
            bakeoff_capture::redact::Rules {
                headers: cli.redact_headers.clone(),
                json_fields: cli.redact_json.clone(),
                regexes: cli.redact_regex.clone(),
            },
        );
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
        // Records below the kernel's wake-up threshold are collected by this timer.
        let mut poll = tokio::time::interval(POLL_INTERVAL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        // Both signal streams exist for the whole run: a signal that arrives while a drain is
        // under way is kept for the next turn of the loop, never lost.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("cannot handle SIGTERM")?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .context("cannot handle SIGINT")?;
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
                // Signals first: a loaded probe still stops at once.
                biased;
                _ = int.recv() => {
                    tracing::info!("SIGINT: stopping");
                    break;
                }
                _ = term.recv() => {
                    tracing::info!("SIGTERM: stopping");
                    break;
                }
                _ = &mut stop => break,
                command = async {
                    match control.as_mut() {
                        Some(c) => c.commands.recv().await,
                        None => std::future::pending().await,
                    }
                } => match (command, &control) {
                    (Some(FromCollector::Command(command)), Some(c)) => {
                        remote.command(command, &mut pipeline, c);
                    }
                    (Some(FromCollector::Disconnected), _) => remote.disconnected(&mut pipeline),
                    // The channel's task ended: no more commands.
                    _ => control = None,
                },
                guard = ring.readable_mut() => {
                    let mut guard = guard.context("ring buffer poll failed")?;
                    // Bounded: under a flood the loop still turns (signals, timers, export).
                    if !drain(guard.get_inner_mut(), &mut pipeline, &mut kernel, &mut events, DRAIN_BATCH) {
                        guard.clear_ready();
                    }
                    if let Some(c) = &control && remote.is_active() {
                        remote.count(&events);
                        remote.tick(&mut pipeline, c, false);
                    }
                    sink.write(&mut events)?;
                    hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
                    follow_membership(&mut tls, &mut kernel, &mut pipeline);
                }
                _ = poll.tick() => {
                    drain(ring.get_mut(), &mut pipeline, &mut kernel, &mut events, DRAIN_BATCH);
                    if let Some(c) = &control && remote.is_active() {
                        remote.count(&events);
                        remote.tick(&mut pipeline, c, false);
                    }
                    sink.write(&mut events)?;
                    hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
                    follow_membership(&mut tls, &mut kernel, &mut pipeline);
                    tls.recheck(&mut kernel);
                }
                _ = tick.tick() => {
                    // New cgroups (pods started since) join their cohort.
                    let now = pipeline.cohorts().cgroups();
                    if now != cgroups {
                        apply_cgroups(&mut kernel, &mut pipeline, &now, via_cgroup)?;
                        cgroups = now;
                        hooks.update(&mut kernel, &mut pipeline, !cgroups.is_empty())?;
                    }
                    if via_cgroup {
                        pipeline.refresh_cgroup_processes(&cgroups);
                        follow_membership(&mut tls, &mut kernel, &mut pipeline);
                    }
                    pipeline.expire(&mut events);
                    if let Some(c) = &control {
                        remote.count(&events);
                        remote.tick(&mut pipeline, c, true);
                    }
                    sink.write(&mut events)?;
                    if let Some(sample) = budget.update() {
                        kernel.set_sample(sample)?;
                        pipeline.set_sample(sample);
                    }
                    let relaxed = std::sync::atomic::Ordering::Relaxed;
                    counters.sample.store(u64::from(budget.sample), relaxed);
                    counters.cpu_millicores.store((budget.last_share * 1000.0) as u64, relaxed);
                    counters.connections.store(pipeline.connections() as u64, relaxed);
                    counters
                        .requests_lost_estimate
                        .store(pipeline.requests_lost_estimate(), relaxed);
                    if let Ok(mut m) = counters.cohort_members.lock() {
                        *m = pipeline.cohort_members();
                    }
                    empty.check(&pipeline, &config.cohorts);
                    let drops = kernel.drops();
                    for (c, d) in counters.kernel_drops.iter().zip(drops) {
                        c.store(d, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Some(e) = sink.exporter {
                        e.stats.ringbuf_drops.store(drops[0], std::sync::atomic::Ordering::Relaxed);
                    }
                    if drops != last_drops {
                        let named: Vec<String> = bakeoff_probe::metrics::KERNEL_DROP_REASONS
                            .iter()
                            .zip(drops.iter().zip(last_drops.iter()))
                            .filter(|(_, (now, before))| now != before)
                            .map(|(name, (now, _))| format!("{name}={now}"))
                            .collect();
                        tracing::warn!(drops = %named.join(" "), "kernel-side drops");
                        last_drops = drops;
                    }
                }
            }
        }
        // Stopping competes with the services for the CPU (they keep running, maybe at full
        // load): a higher priority for these last moments keeps it prompt (best effort: needs
        // CAP_SYS_NICE). Detaching the tracepoints below waits on the kernel once per hook.
        // SAFETY: plain syscall on this process.
        unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -10) };
        // What is in the ring buffer, for at most STOP_DRAIN: the services keep writing while
        // we stop, and a pod has 30 s in all.
        let stop_at = std::time::Instant::now() + STOP_DRAIN;
        while std::time::Instant::now() < stop_at
            && drain(ring.get_mut(), &mut pipeline, &mut kernel, &mut events, 4096)
        {}
        tracing::debug!("stop: ring buffer drained");
        pipeline.flush(&mut events);
        sink.write(&mut events)?;
        tracing::debug!("stop: events written");
        if let Some(c) = control {
            remote.count(&events);
            remote.finish(&mut pipeline, &c, "the probe stopped".into());
            c.shutdown(Duration::from_secs(2)).await;
        }
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
    let drops = kernel.drops();
    let kernel_drops: serde_json::Map<String, serde_json::Value> =
        bakeoff_probe::metrics::KERNEL_DROP_REASONS
            .iter()
            .zip(drops)
            .map(|(name, n)| (name.to_string(), n.into()))
            .collect();
    let stats = serde_json::json!({
        "sample_per_1024": budget.sample,
        "programs": programs,
        "pipeline": pipeline.stats,
        "connections": pipeline.conn_stats(),
        "in_flight_at_exit": pipeline.in_flight(),
        "tls": pipeline.tls_stats(),
        "recording": pipeline.finish_recording(),
        "tls_watch": tls.stats,
        "export": exporter_stats,
        "otlp": otlp_stats,
        "kernel_drops": kernel_drops,
    });
    tracing::info!(%stats, "probe stopped");
    if let Some(path) = &cli.stats_file {
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("cannot write stats file {}", path.display()))?;
    }
    if cli.summary {
        eprint!("{}", summary.table());
    }
    // The cgroup programs go now (quick), so a probe started next can attach at once.
    kernel.detach_cgroup_path();
    exit_leaving_teardown_to_a_child()
}

/// Exits at once and leaves the release of the kernel objects to a child process.
///
/// Each tracepoint's teardown waits for RCU grace periods, one after another under the
/// kernel's event lock: under load, 0.2-0.6 s per tracepoint, several seconds for the syscall
/// path's 25, which would make stopping slow (a pod has 30 s, and users expect seconds). A
/// child sharing our file descriptors closes them while we exit: our exit only drops
/// references. If the fork fails, the exit does the teardown itself (slowly).
fn exit_leaving_teardown_to_a_child() -> ! {
    use std::io::Write as _;
    let fds: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|fd| *fd > 2)
                .collect()
        })
        .unwrap_or_default();
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: after fork the child only makes raw syscalls (close, _exit), which is safe in a
    // child of a multi-threaded process; the parent exits without running destructors (every
    // output was written and flushed above).
    unsafe {
        let parent = libc::getpid();
        if libc::fork() == 0 {
            // Wait until the parent is gone (we are re-parented once its exit dropped its file
            // references), so that the last reference, and the slow release, is ours. Bounded:
            // at worst the releases race with the parent's exit.
            for _ in 0..2000 {
                if libc::getppid() != parent {
                    break;
                }
                libc::usleep(1000);
            }
            for fd in fds {
                libc::close(fd);
            }
            libc::_exit(0);
        }
        libc::_exit(0)
    }
}

/// Ring-buffer bytes that wake the probe at once; fewer wait for `POLL_INTERVAL`.
const WAKE_BYTES: u32 = 256 << 10;
/// How often the ring buffer is read when no wake-up came.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// Records handled per turn of the main loop.
const DRAIN_BATCH: usize = 32_768;
/// Longest time spent reading the ring buffer at stop.
const STOP_DRAIN: Duration = Duration::from_millis(300);

/// Puts the matched cgroups on their data path: the cgroup hooks (and the socket-cgroup ->
/// cohort map) or, with `--data-path syscall`, the syscall hooks' cgroup map.
fn apply_cgroups(
    kernel: &mut Kernel,
    pipeline: &mut Pipeline,
    cgroups: &[CgroupMatch],
    via_cgroup: bool,
) -> Result<()> {
    if via_cgroup {
        let plan = cgroup_plan(cgroups);
        kernel.set_cgroup_path(&plan.attach)?;
        pipeline.set_cgroup_cohorts(plan.ids);
    } else {
        let ids: Vec<(u64, u32)> = cgroups.iter().map(|g| (g.id, g.cohort)).collect();
        kernel.set_cgroups(&ids)?;
    }
    Ok(())
}

/// Cohorts without a member: a typo in a rule would otherwise look like a quiet canary.
/// Warned at start and every `EMPTY_WARN_EVERY` while it lasts (and `/metrics` shows
/// `bakeoff_probe_cohort_members` at 0).
#[derive(Default)]
struct EmptyCohorts {
    last: std::collections::HashMap<String, std::time::Instant>,
}

const EMPTY_WARN_EVERY: Duration = Duration::from_secs(60);

impl EmptyCohorts {
    fn check(&mut self, pipeline: &Pipeline, rules: &[CohortRule]) {
        let cgroups = pipeline.cohorts().cgroups();
        for (name, members) in pipeline.cohort_members() {
            if members > 0 {
                if self.last.remove(&name).is_some() {
                    tracing::info!(cohort = %name, members, "cohort has members now");
                }
                continue;
            }
            if self
                .last
                .get(&name)
                .is_some_and(|t| t.elapsed() < EMPTY_WARN_EVERY)
            {
                continue;
            }
            self.last.insert(name.clone(), std::time::Instant::now());
            let why: Vec<String> = rules
                .iter()
                .filter(|r| r.name == name)
                .map(|r| match &r.cgroup {
                    Some(g)
                        if !cgroups
                            .iter()
                            .any(|m| pipeline.cohorts().name(m.cohort) == name) =>
                    {
                        format!("cgroup `{g}` matches no directory")
                    }
                    _ => {
                        let parts: Vec<String> = [
                            r.cgroup.as_ref().map(|v| format!("cgroup:{v}")),
                            r.pid.map(|v| format!("pid:{v}")),
                            r.exe.as_ref().map(|v| format!("exe:{v}")),
                            r.env.as_ref().map(|v| format!("env:{v}")),
                        ]
                        .into_iter()
                        .flatten()
                        .collect();
                        format!("`{}` matches no running process", parts.join(","))
                    }
                })
                .collect();
            tracing::warn!(
                cohort = %name,
                reasons = %why.join("; "),
                "cohort has no member: nothing of it is watched"
            );
        }
    }
}

/// Per-process hooks follow cohort membership: TLS uprobes for processes that joined (or ran a
/// new program), detached from those that left.
fn follow_membership(tls: &mut TlsWatch, kernel: &mut Kernel, pipeline: &mut Pipeline) {
    let (joined, left) = pipeline.take_membership_changes();
    for pid in left {
        tls.left(kernel, pid);
    }
    for pid in joined {
        tls.joined(kernel, pid);
    }
}

/// Reads up to `max` records waiting in the ring buffer; true if it stopped at `max`.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline,
    kernel: &mut Kernel,
    events: &mut Vec<bakeoff_probe::event::RequestEvent>,
    max: usize,
) -> bool {
    for _ in 0..max {
        match ring.next() {
            Some(item) => pipeline.handle(&item, kernel, events),
            None => return false,
        }
    }
    true
}

/// The CPU budget: measures the probe's own CPU once a second and sets how many connections
/// (out of `SAMPLE_SCALE`) are decoded. Whole connections are sampled, by a hash of the socket,
/// so every cohort keeps the same share.
struct Budget {
    max_share: f64,
    sample: u32,
    last_cpu_s: f64,
    last_at: std::time::Instant,
    last_share: f64,
}

impl Budget {
    fn new(max_share: f64) -> Self {
        Self {
            max_share,
            sample: probe_common::SAMPLE_SCALE,
            last_cpu_s: own_cpu_seconds(),
            last_at: std::time::Instant::now(),
            last_share: 0.0,
        }
    }

    /// The new sampling, if it changed.
    fn update(&mut self) -> Option<u32> {
        let (cpu, now) = (own_cpu_seconds(), std::time::Instant::now());
        let wall = now.duration_since(self.last_at).as_secs_f64();
        if wall < 0.5 {
            return None;
        }
        let share = (cpu - self.last_cpu_s) / wall;
        (self.last_cpu_s, self.last_at, self.last_share) = (cpu, now, share);
        let scale = probe_common::SAMPLE_SCALE;
        let next = if share > self.max_share {
            ((f64::from(self.sample) * self.max_share / share * 0.9) as u32).max(1)
        } else if share < 0.6 * self.max_share && self.sample < scale {
            ((f64::from(self.sample) * 1.5) as u32)
                .max(self.sample + 1)
                .min(scale)
        } else {
            self.sample
        };
        if next == self.sample {
            return None;
        }
        if next < scale {
            tracing::warn!(
                cpu_share = format!("{share:.2}"),
                max_cpu = self.max_share,
                sampled_per_1024 = next,
                "over the CPU budget: decoding a sample of connections"
            );
        } else {
            tracing::info!("back under the CPU budget: decoding every connection");
        }
        self.sample = next;
        Some(next)
    }
}

/// User + system CPU seconds of this process.
fn own_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
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
        experiment: config.experiment.clone(),
        captures: config.collector.as_ref().is_some_and(|c| c.captures),
    }
}

/// Attaches the per-syscall hooks while some syscall-path cohort has a member, detaches them
/// otherwise (cgroup cohorts on the cgroup path never need them).
struct HookControl {
    always: bool,
    via_cgroup: bool,
}

impl HookControl {
    fn new(always: bool, via_cgroup: bool) -> Self {
        Self { always, via_cgroup }
    }

    fn update(
        &mut self,
        kernel: &mut Kernel,
        pipeline: &mut Pipeline,
        cgroups: bool,
    ) -> Result<()> {
        let wanted =
            self.always || (cgroups && !self.via_cgroup) || pipeline.syscall_process_count() > 0;
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

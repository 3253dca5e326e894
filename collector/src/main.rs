//! `bakeoff`: the collector (`serve`) and its terminal client (`events`).

mod capture_cli;
mod shadow_cli;

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use bakeoff_collector::{
    api::{
        auth::Access,
        grpc::QueryService,
        http::{ApiState, router},
        tls::{TlsListener, TlsPeer},
    },
    audit::{self, AuditLog},
    experiments::{Experiment, ExperimentsFile, Verdicts},
    ingest::{IngestService, IngestStats, MAX_MESSAGE_BYTES},
    live::{Live, VerdictResponse},
    query::{Filter, GroupRow},
    store::{Store, clickhouse::ClickHouseStore, duckdb::DuckDbStore},
    verdict::{Decision, MetricVerdict},
};
use bakeoff_proto::v1::{ingest_server::IngestServer, query_server::QueryServer};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "bakeoff",
    version,
    about = "bakeoff collector: stores request events from probes and answers queries"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Receive events from probes (gRPC) and serve queries (HTTP JSON).
    Serve {
        /// gRPC ingest address.
        #[arg(long, env = "BAKEOFF_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
        grpc_listen: SocketAddr,
        /// HTTP API address.
        #[arg(long, env = "BAKEOFF_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
        http_listen: SocketAddr,
        /// DuckDB file holding the raw events (the default backend).
        #[arg(long, env = "BAKEOFF_DB", default_value = "bakeoff.duckdb")]
        db: PathBuf,
        /// Store in ClickHouse instead, at this HTTP URL (e.g. http://127.0.0.1:8123).
        #[arg(long, env = "BAKEOFF_CLICKHOUSE_URL")]
        clickhouse: Option<String>,
        /// ClickHouse database for the `events` table (created if missing).
        #[arg(long, env = "BAKEOFF_CLICKHOUSE_DATABASE", default_value = "bakeoff")]
        clickhouse_database: String,
        /// TLS certificate and key (PEM) for the gRPC ingest.
        #[arg(long, env = "BAKEOFF_TLS_CERT", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        #[arg(long, env = "BAKEOFF_TLS_KEY", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
        /// Require probes to present a certificate signed by this CA (mutual TLS).
        #[arg(long, env = "BAKEOFF_TLS_CLIENT_CA", requires = "tls_cert")]
        tls_client_ca: Option<PathBuf>,
        /// Experiments to judge continuously (YAML: name, baseline, canaries, webhook, judge).
        #[arg(long, env = "BAKEOFF_EXPERIMENTS")]
        experiments: Option<PathBuf>,
        /// Seconds the judge waits after a second of traffic ends (in event time: the slowest
        /// probe still sending) before reading it; events of that second arriving later are
        /// stored but not judged, and counted as late.
        #[arg(long, env = "BAKEOFF_JUDGE_LAG", default_value_t = 2.0)]
        judge_lag: f64,
        /// Seconds between two judgements of the configured experiments.
        #[arg(long, default_value_t = 15.0)]
        evaluate_every: f64,
        /// Delete events older than this many hours (0 keeps everything).
        #[arg(long, env = "BAKEOFF_RETENTION_HOURS", default_value_t = 168)]
        retention_hours: u64,
        /// Where captures asked of probes are written (default: `captures/` beside --db).
        #[arg(long, env = "BAKEOFF_CAPTURE_DIR")]
        capture_dir: Option<PathBuf>,
        /// The audit log of capture commands (default: `audit.log` beside --db). A command it
        /// cannot record is refused.
        #[arg(long = "audit-log", env = "BAKEOFF_AUDIT_LOG")]
        serve_audit_log: Option<PathBuf>,
        #[command(flatten)]
        api_security: ApiSecurityArgs,
    },
    /// Is the canary worse than the baseline? Exit code 0 pass, 1 fail, 2 inconclusive, 3 error.
    Verdict {
        /// Experiment name.
        experiment: String,
        #[arg(long, default_value = "baseline")]
        baseline: String,
        #[arg(long, default_value = "canary")]
        canary: String,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        judge: JudgeArgs,
        /// Refresh every this many seconds until the verdict is pass or fail.
        #[arg(long, value_name = "SECS")]
        watch: Option<f64>,
        /// Give up watching after this many seconds (exit 2).
        #[arg(long, value_name = "SECS", default_value_t = 3600.0)]
        timeout: f64,
        /// Print the verdict as JSON.
        #[arg(long)]
        json: bool,
        /// Show every metric, also endpoints with too few requests to be judged yet.
        #[arg(long)]
        all: bool,
    },
    /// Write the experiment's HTML report (one self-contained file) from the collector.
    Report {
        experiment: String,
        /// Output file.
        #[arg(short, long, default_value = "report.html")]
        output: PathBuf,
        #[arg(long, default_value = "baseline")]
        baseline: String,
        #[arg(long, default_value = "canary")]
        canary: String,
        #[command(flatten)]
        api: ApiArgs,
        #[command(flatten)]
        judge: JudgeArgs,
    },
    /// Replay a capture's HTTP or Postgres sessions against a target and, with --against, a
    /// second one; compare latency per endpoint (per normalized query for Postgres) and
    /// responses request by request. Exit 1 when B is slower or answers differently (noise left
    /// out with --calibrate).
    Replay {
        /// The capture file (`bakeoff-probe --capture-file`).
        file: PathBuf,
        /// A: the address replayed first (the old version). Nothing else is contacted.
        #[arg(long)]
        target: SocketAddr,
        /// B: the new version, compared with A.
        #[arg(long)]
        against: Option<SocketAddr>,
        /// A2: a second instance of A's version; differences between A and A2 are noise.
        #[arg(long)]
        calibrate: Option<SocketAddr>,
        /// The audit log the replay is recorded in before it starts (it refuses to start when
        /// it cannot be). Default: $BAKEOFF_AUDIT_LOG, else $XDG_STATE_HOME/bakeoff/audit.log,
        /// else ~/.local/state/bakeoff/audit.log.
        #[arg(long, value_name = "PATH")]
        audit_log: Option<PathBuf>,
        /// Sessions replayed at once (each keeps its requests in order).
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Also replay requests that change state (POST, PUT, PATCH, DELETE).
        #[arg(long)]
        allow_writes: bool,
        /// Per request (connect, write, read).
        #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
        /// Send each request at its recorded arrival time divided by SPEED (open loop: latency
        /// under the recorded load; 2 = twice as fast). Default: each session as fast as its
        /// responses allow.
        #[arg(long, value_name = "SPEED")]
        recorded_timing: Option<f64>,
        /// Latency differences within this share are not reported.
        #[arg(long, default_value_t = 0.05)]
        tolerance: f64,
        #[arg(long, default_value_t = 0.05)]
        alpha: f64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// A response header left out of the comparison (repeatable; case-insensitive). Always
        /// left out: Date, Content-Length, Transfer-Encoding, Connection, Keep-Alive.
        #[arg(long, value_name = "NAME")]
        noise_header: Vec<String>,
        /// A JSON body field whose value is not compared (repeatable): a name, matched at any
        /// depth, or a dotted path (`items.updated_at`; `$.` anchors it at the root).
        #[arg(long, value_name = "FIELD")]
        noise_json: Vec<String>,
        /// A regular expression whose matches in bodies are not compared (repeatable).
        #[arg(long, value_name = "RE", value_parser = noise_regex)]
        noise_regex: Vec<String>,
        /// Also write the comparison as a self-contained HTML page.
        #[arg(long, value_name = "FILE")]
        html: Option<PathBuf>,
        #[command(flatten)]
        pg: PgArgs,
    },
    /// Query events: raw (newest first) or grouped, as a table or JSON.
    Events {
        #[command(flatten)]
        api: ApiArgs,
        /// FIELD=VALUE filters (repeatable), e.g. `cohort=canary`.
        #[arg(long = "where", value_name = "FIELD=VALUE")]
        filters: Vec<String>,
        /// Group by these fields (comma-separated), with counts and latency quantiles.
        #[arg(long)]
        group_by: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Capture a cohort's traffic through its probes (redacted on the probes): start, ls,
    /// status, stop, get.
    Capture {
        #[command(subcommand)]
        action: capture_cli::CaptureCmd,
    },
    /// Tee a cohort's idempotent requests, as they happen, to a shadow instance and compare
    /// its answers and latency with the live ones.
    ///
    /// Through a capture of the cohort: GET, HEAD and OPTIONS are sent to the shadow, writes
    /// never. Latencies are measured at different places: live = server time seen by the probe
    /// (no network), shadow = measured by this client (adds a round trip), so a
    /// sub-millisecond route looks slower on the shadow by about one round trip. Ctrl-C stops
    /// the capture and prints the comparison. Exit 1 when the shadow is slower or answers
    /// differently.
    Shadow(shadow_cli::ShadowArgs),
    /// Show the audit log of capture, replay and shadow commands and verify its hash chain.
    /// Exit 1 when it is damaged (the entries before the damage are shown).
    Audit {
        /// Default: $BAKEOFF_AUDIT_LOG, else $XDG_STATE_HOME/bakeoff/audit.log, else
        /// ~/.local/state/bakeoff/audit.log.
        #[arg(long, value_name = "PATH")]
        log: Option<PathBuf>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Only the verdict on the chain, not the entries.
        #[arg(long)]
        verify_only: bool,
    },
}

/// Who may call the query API (HTTP and gRPC Query), and the HTTP API's TLS.
#[derive(clap::Args, Debug, Default)]
struct ApiSecurityArgs {
    /// Serve the HTTP API over TLS with this certificate (PEM chain) and --http-tls-key.
    #[arg(long, env = "BAKEOFF_HTTP_TLS_CERT", requires = "http_tls_key")]
    http_tls_cert: Option<PathBuf>,
    /// The HTTP API certificate's private key (PEM).
    #[arg(long, env = "BAKEOFF_HTTP_TLS_KEY", requires = "http_tls_cert")]
    http_tls_key: Option<PathBuf>,
    /// Mutual TLS on the HTTP API: a client certificate signed by this CA counts as a `full`
    /// token. Optional for clients (tokens still work; /healthz and /metrics need neither).
    #[arg(long, env = "BAKEOFF_HTTP_CLIENT_CA", requires = "http_tls_cert")]
    http_client_ca: Option<PathBuf>,
    /// Bearer tokens of the HTTP API and the gRPC Query service: lines `read TOKEN` (verdicts,
    /// experiments, report, Flagger) or `full TOKEN` (also raw events); `#` comments.
    #[arg(long, env = "BAKEOFF_API_TOKENS", value_name = "FILE")]
    api_tokens: Option<PathBuf>,
}

/// How the CLI reaches the collector's HTTP API.
#[derive(clap::Args, Debug)]
struct ApiArgs {
    /// The collector's HTTP API (https://... when it serves TLS).
    #[arg(long, env = "BAKEOFF_API", default_value = "http://127.0.0.1:8080")]
    api: String,
    /// File holding the bearer token sent to the collector (the token alone, e.g. a mounted
    /// Secret key).
    #[arg(long, env = "BAKEOFF_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// CA certificate(s) (PEM) to trust for the collector's certificate, instead of the
    /// built-in public roots.
    #[arg(long, env = "BAKEOFF_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
}

impl ApiArgs {
    /// A client with the token and trusted CAs loaded; file problems are said before any request.
    fn client(&self) -> Result<ApiClient> {
        let token = match &self.token_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the token file {}", path.display()))?;
                let token = text.trim();
                if token.is_empty() {
                    bail!("the token file {} is empty", path.display());
                }
                if token.contains(char::is_whitespace) {
                    bail!(
                        "the token file {} must hold the token alone (it has spaces or several lines)",
                        path.display()
                    );
                }
                Some(format!("Bearer {token}"))
            }
        };
        let mut config = ureq::Agent::config_builder();
        if let Some(path) = &self.ca {
            let pem = std::fs::read(path)
                .with_context(|| format!("cannot read the CA file {}", path.display()))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                if let ureq::tls::PemItem::Certificate(c) =
                    item.with_context(|| format!("bad PEM in {}", path.display()))?
                {
                    certs.push(c);
                }
            }
            if certs.is_empty() {
                bail!("no certificate in the CA file {}", path.display());
            }
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&certs))
                    .build(),
            );
        }
        Ok(ApiClient {
            agent: config.build().new_agent(),
            base: self.api.trim_end_matches('/').to_string(),
            authorization: token,
        })
    }
}

/// The CLI's HTTP client of the collector.
struct ApiClient {
    agent: ureq::Agent,
    base: String,
    /// `Bearer TOKEN`.
    authorization: Option<String>,
}

impl ApiClient {
    /// A GET of `path` (from `/`), with the token if there is one.
    fn get(&self, path: &str) -> ureq::RequestBuilder<ureq::typestate::WithoutBody> {
        let req = self.agent.get(format!("{}{path}", self.base));
        match &self.authorization {
            Some(a) => req.header("Authorization", a),
            None => req,
        }
    }
}

/// Sends `req`; a non-2xx answer is an error carrying the collector's reason (its JSON
/// `error`), e.g. the scope a route needs.
fn send(
    req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    what: &str,
    api: &str,
) -> Result<ureq::http::Response<ureq::Body>> {
    let mut resp = req
        .config()
        .http_status_as_error(false)
        .build()
        .call()
        .with_context(|| format!("cannot get {what} from {api}"))?;
    let status = resp.status();
    if !status.is_success() {
        let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
        bail!(
            "the collector answered {status}: {}",
            body["error"].as_str().unwrap_or("(no reason given)")
        );
    }
    Ok(resp)
}

/// How a Postgres replay starts its sessions (the capture's own startup parameters otherwise;
/// passwords are never in a capture). Plain-text connections only (sslmode=disable).
#[derive(clap::Args, Clone, Debug)]
struct PgArgs {
    /// Postgres: start every session as this user instead of the captured one (and a session
    /// recorded mid-way without its startup parameters).
    #[arg(long, value_name = "USER")]
    pg_user: Option<String>,
    /// Postgres: connect every session to this database instead of the captured one.
    #[arg(long, value_name = "DB")]
    pg_database: Option<String>,
    /// Postgres: the password for cleartext, MD5 or SCRAM-SHA-256 authentication.
    #[arg(long, env = "PGPASSWORD", hide_env_values = true)]
    pg_password: Option<String>,
    /// Postgres: each replay connection's lock_timeout (its statement_timeout is --timeout).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    lock_timeout: std::time::Duration,
}

/// The addresses of a replay.
struct ReplayTargets {
    a: SocketAddr,
    b: Option<SocketAddr>,
    a2: Option<SocketAddr>,
}

/// `--recorded-timing SPEED`: open loop at the recorded times divided by SPEED, else as fast as
/// each session allows.
fn replay_timing(speed: Option<f64>) -> Result<bakeoff_replay::Timing> {
    match speed {
        Some(speed) if speed.is_finite() && speed > 0.0 => {
            Ok(bakeoff_replay::Timing::Recorded { speed })
        }
        Some(speed) => bail!("--recorded-timing {speed}: the speed must be a positive number"),
        None => Ok(bakeoff_replay::Timing::AsFast),
    }
}

/// `--noise-regex RE`: checked while parsing, so an invalid one is a usage error (exit 2).
fn noise_regex(rule: &str) -> Result<String, String> {
    bakeoff_replay::noise::check_regex(rule)
        .map(|()| rule.to_string())
        .map_err(|e| e.to_string())
}

/// `bakeoff replay`: reads the capture (up to any damage, said), replays (Postgres when the
/// capture says so or its connections speak it, else HTTP), compares.
#[allow(clippy::too_many_arguments)]
fn replay(
    file: &std::path::Path,
    targets: ReplayTargets,
    audit_log: Option<&std::path::Path>,
    options: bakeoff_replay::ReplayOptions,
    pg: PgArgs,
    tolerance: f64,
    alpha: f64,
    (json, html): (bool, Option<PathBuf>),
) -> Result<()> {
    let reader = bakeoff_capture::CaptureReader::new(
        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
    )
    .with_context(|| format!("cannot read capture {}", file.display()))?;
    let meta = reader.meta().clone();
    let mut records = Vec::new();
    for r in reader {
        match r {
            Ok(r) => records.push(r),
            Err(e) => {
                eprintln!("warning: {e}; replaying what was read before it");
                break;
            }
        }
    }
    let postgres =
        meta.protocol == "postgres" || bakeoff_replay::postgres::capture_is_postgres(&records);
    let addrs: Vec<SocketAddr> = std::iter::once(targets.a)
        .chain(targets.b)
        .chain(targets.a2)
        .collect();
    // Per target (A, then B and A2 when given): its replay, and the Postgres sessions that
    // could not start there (their statements are error outcomes too).
    type Results = Vec<(
        bakeoff_replay::Replayed,
        Vec<bakeoff_replay::postgres::SessionError>,
    )>;
    let (counts, run): (_, Box<dyn FnOnce() -> Results>) = if postgres {
        let sessions = bakeoff_replay::postgres::sessions(records);
        let units = sessions.iter().flat_map(|s| &s.units);
        let counts = (
            sessions.len(),
            units.clone().count(),
            units.filter(|u| u.write).count(),
        );
        let options = bakeoff_replay::postgres::PgOptions {
            replay: options.clone(),
            user: pg.pg_user,
            database: pg.pg_database,
            password: pg.pg_password,
            lock_timeout: pg.lock_timeout,
        };
        let addrs = addrs.clone();
        // Interleaved, unit by unit: A, B and A2 see the same moments of this host.
        let run = move || {
            bakeoff_replay::postgres::replay_each(&sessions, &options, &addrs)
                .into_iter()
                .map(|r| (r.replayed, r.session_errors))
                .collect()
        };
        (counts, Box::new(run))
    } else {
        let sessions = bakeoff_replay::sessions(records);
        let requests = sessions.iter().flat_map(|s| &s.requests);
        let counts = (
            sessions.len(),
            requests.clone().count(),
            requests
                .filter(|r| bakeoff_replay::http::WRITE_METHODS.contains(&r.method.as_str()))
                .count(),
        );
        let options = options.clone();
        let addrs = addrs.clone();
        // Interleaved request by request: A, B and A2 see the same moments of this host.
        let run = move || {
            bakeoff_replay::replay_each(sessions, &options, &addrs)
                .into_iter()
                .map(|r| (r, Vec::new()))
                .collect()
        };
        (counts, Box::new(run))
    };
    // Before any request is sent: a replay the audit log cannot record does not run.
    audit_replay(audit_log, file, &meta, &targets, &options, counts)?;
    let noise = options.noise.names().to_vec();
    let results = run();
    let session_errors: Vec<(SocketAddr, &bakeoff_replay::postgres::SessionError)> = addrs
        .iter()
        .zip(&results)
        .flat_map(|(addr, (_, errors))| errors.iter().map(|e| (*addr, e)))
        .collect();
    let mut replays = results.iter().map(|(r, _)| r);
    let a = replays.next().cloned().unwrap_or_default();
    let b = targets.b.and_then(|_| replays.next());
    let a2 = targets.a2.and_then(|_| replays.next());
    let comparison = b.map(|b| bakeoff_collector::replay::compare(&a, b, a2, alpha, tolerance));
    // With recorded timing: requests that could not be sent on time (more than 1 ms late).
    let late = a.outcomes.iter().filter(|o| o.late_ns > 1_000_000).count();
    let max_late_ms = a.outcomes.iter().map(|o| o.late_ns).max().unwrap_or(0) as f64 / 1e6;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "capture": { "experiment": meta.experiment, "cohort": meta.cohort,
                             "redaction": meta.redaction },
                "sessions": a.sessions,
                "requests": a.outcomes.len(),
                "skipped_writes": a.skipped_writes,
                "unframed_bytes": a.unframed_bytes,
                "errors": a.outcomes.iter().filter(|o| o.error.is_some()).count(),
                "late": late,
                "max_late_ms": max_late_ms,
                "noise": noise,
                "protocol": if postgres { "postgres" } else { "http1" },
                "session_errors": session_errors.iter().map(|(addr, e)| serde_json::json!({
                    "target": addr.to_string(), "session": e.session, "error": e.error,
                })).collect::<Vec<_>>(),
                "comparison": comparison,
                "outcomes": if comparison.is_none() { Some(&a.outcomes) } else { None },
            })
        );
    } else {
        println!(
            "{} sessions, {} requests replayed against {} ({} writes skipped, {} failed, {} bytes unframed)",
            a.sessions,
            a.outcomes.len(),
            targets.a,
            a.skipped_writes,
            a.outcomes.iter().filter(|o| o.error.is_some()).count(),
            a.unframed_bytes
        );
        for (addr, e) in &session_errors {
            println!("session {} not replayed on {addr}: {}", e.session, e.error);
        }
        if late > 0 {
            println!(
                "{late} requests sent behind their recorded time (at most {max_late_ms:.1} ms): \
                 raise --concurrency, or the target answers slower than recorded"
            );
        }
        if let (Some(c), Some(b)) = (&comparison, targets.b) {
            println!("noise (not compared): {}", noise.join(", "));
            print!(
                "{}",
                bakeoff_collector::replay::table(c, &targets.a.to_string(), &b.to_string())
            );
        }
    }
    if let Some(path) = &html {
        let c = comparison
            .as_ref()
            .context("--html needs --against: there is nothing to compare")?;
        let page = bakeoff_collector::report::replay_page(
            c,
            &bakeoff_collector::report::ReplayHeader {
                file: &file.display().to_string(),
                experiment: &meta.experiment,
                cohort: &meta.cohort,
                protocol: if postgres { "Postgres" } else { "HTTP/1" },
                a: targets.a.to_string(),
                b: targets.b.map(|b| b.to_string()).unwrap_or_default(),
                a2: targets.a2.map(|a| a.to_string()),
                sessions: a.sessions,
                requests: a.outcomes.len(),
                skipped_writes: a.skipped_writes,
                errors: a.outcomes.iter().filter(|o| o.error.is_some()).count(),
                late,
                noise: &noise,
            },
        );
        std::fs::write(path, page).with_context(|| format!("cannot write {}", path.display()))?;
        if !json {
            println!("report: {}", path.display());
        }
    }
    if comparison.as_ref().is_some_and(|c| c.regressed()) {
        std::process::exit(1);
    }
    Ok(())
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
    let result = match Cli::parse().command {
        Cmd::Serve {
            grpc_listen,
            http_listen,
            db,
            clickhouse,
            clickhouse_database,
            tls_cert,
            tls_key,
            tls_client_ca,
            experiments,
            judge_lag,
            evaluate_every,
            retention_hours,
            capture_dir,
            serve_audit_log,
            api_security,
        } => {
            let beside_db = db
                .parent()
                .map(std::path::Path::to_path_buf)
                .unwrap_or_default();
            let capture_paths = (
                capture_dir.unwrap_or_else(|| beside_db.join("captures")),
                serve_audit_log.unwrap_or_else(|| beside_db.join("audit.log")),
            );
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert,
                    key,
                    client_ca: tls_client_ca,
                }),
                _ => None,
            };
            let backend = match clickhouse {
                Some(url) => Backend::ClickHouse {
                    url,
                    database: clickhouse_database,
                },
                None => Backend::DuckDb(db),
            };
            let experiments = match experiments {
                Some(path) => match ExperimentsFile::load(&path) {
                    Ok(f) => f.experiments,
                    Err(e) => {
                        eprintln!("bakeoff: error: {e}");
                        std::process::exit(1);
                    }
                },
                None => Vec::new(),
            };
            serve(
                grpc_listen,
                http_listen,
                backend,
                Security {
                    grpc_tls: tls,
                    api: &api_security,
                },
                (
                    experiments,
                    Duration::from_secs_f64(evaluate_every.max(0.5)),
                ),
                Duration::from_secs_f64(judge_lag.clamp(0.0, 3600.0)),
                retention_hours,
                capture_paths,
            )
        }
        Cmd::Verdict {
            experiment,
            baseline,
            canary,
            api,
            judge,
            watch,
            timeout,
            json,
            all,
        } => {
            let mut query = vec![
                ("experiment", experiment),
                ("baseline", baseline),
                ("canary", canary),
            ];
            query.extend(judge.query());
            match api
                .client()
                .and_then(|client| verdict(&client, &query, watch, timeout, json, all))
            {
                Ok(code) => std::process::exit(code),
                Err(e) => {
                    eprintln!("bakeoff: error: {e:#}");
                    std::process::exit(3);
                }
            }
        }
        Cmd::Report {
            experiment,
            output,
            baseline,
            canary,
            api,
            judge,
        } => api
            .client()
            .and_then(|client| report(&client, &experiment, &baseline, &canary, &judge, &output)),
        Cmd::Replay {
            file,
            target,
            against,
            calibrate,
            audit_log,
            concurrency,
            allow_writes,
            timeout,
            recorded_timing,
            tolerance,
            alpha,
            json,
            noise_header,
            noise_json,
            noise_regex,
            html,
            pg,
        } => replay_timing(recorded_timing).and_then(|timing| {
            let noise = match bakeoff_replay::Noise::new(&bakeoff_replay::NoiseRules {
                headers: noise_header,
                json_fields: noise_json,
                regexes: noise_regex,
            }) {
                Ok(noise) => noise,
                Err(e) => {
                    // A rule that cannot be used is a usage error, as clap's are.
                    eprintln!("bakeoff: error: {e}");
                    std::process::exit(2);
                }
            };
            replay(
                &file,
                ReplayTargets {
                    a: target,
                    b: against,
                    a2: calibrate,
                },
                audit_log.as_deref(),
                bakeoff_replay::ReplayOptions {
                    target,
                    concurrency,
                    allow_writes,
                    timeout,
                    timing,
                    noise,
                },
                pg,
                tolerance,
                alpha,
                (json, html),
            )
        }),
        Cmd::Events {
            api,
            filters,
            group_by,
            limit,
            json,
        } => api
            .client()
            .and_then(|client| events(&client, &filters, group_by.as_deref(), limit, json)),
        Cmd::Capture { action } => match capture_cli::run(action) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Cmd::Shadow(args) => match shadow_cli::run(args) {
            Ok(0) => Ok(()),
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        Cmd::Audit {
            log,
            json,
            verify_only,
        } => match audit_cmd(log, json, verify_only) {
            Ok(true) => Ok(()),
            Ok(false) => std::process::exit(1),
            Err(e) => Err(e),
        },
    };
    if let Err(e) = result {
        eprintln!("bakeoff: error: {e:#}");
        std::process::exit(1);
    }
}

/// Judge settings a verdict request may override (unset: the collector's defaults).
#[derive(clap::Args, Debug, Default)]
struct JudgeArgs {
    /// Probability of failing an identical canary (whole experiment, any number of looks).
    #[arg(long)]
    alpha: Option<f64>,
    /// Location tolerance (0.05: a canary request up to 5% slower than a baseline one is fine).
    #[arg(long)]
    latency_tolerance: Option<f64>,
    /// Tail quantiles and their tolerances, e.g. `p90=0.1,p99=0.25,p999=0.5`.
    #[arg(long)]
    quantiles: Option<String>,
    /// Errors: harm is a canary error rate above (1 + this) x the baseline's.
    #[arg(long)]
    error_ratio_tolerance: Option<f64>,
    /// Errors: absolute slack a pass allows (0.005: half a percentage point).
    #[arg(long)]
    error_tolerance: Option<f64>,
    /// Volume: how much less than its share the canary may get (0.1: 10%).
    #[arg(long)]
    volume_tolerance: Option<f64>,
    /// The canary's expected share of canary + baseline requests (unset: learned).
    #[arg(long)]
    split: Option<f64>,
    /// Requests per cohort needed before a pass.
    #[arg(long)]
    min_requests: Option<u64>,
    /// Endpoints judged on their own.
    #[arg(long)]
    max_endpoints: Option<usize>,
}

impl JudgeArgs {
    /// The settings given, as query parameters.
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                q.push((k, v));
            }
        };
        put("alpha", self.alpha.map(|v| v.to_string()));
        put(
            "latency_tolerance",
            self.latency_tolerance.map(|v| v.to_string()),
        );
        put("quantiles", self.quantiles.clone());
        put(
            "error_ratio_tolerance",
            self.error_ratio_tolerance.map(|v| v.to_string()),
        );
        put(
            "error_tolerance",
            self.error_tolerance.map(|v| v.to_string()),
        );
        put(
            "volume_tolerance",
            self.volume_tolerance.map(|v| v.to_string()),
        );
        put("split", self.split.map(|v| v.to_string()));
        put("min_requests", self.min_requests.map(|v| v.to_string()));
        put("max_endpoints", self.max_endpoints.map(|v| v.to_string()));
        q
    }
}

/// Where events are stored.
enum Backend {
    DuckDb(PathBuf),
    ClickHouse { url: String, database: String },
}

impl Backend {
    fn open(&self) -> Result<Arc<dyn Store>> {
        Ok(match self {
            Backend::DuckDb(db) => Arc::new(
                DuckDbStore::open(db)
                    .with_context(|| format!("cannot open database {}", db.display()))?,
            ),
            Backend::ClickHouse { url, database } => Arc::new(
                ClickHouseStore::open(url, database)
                    .with_context(|| format!("cannot use ClickHouse at {url}"))?,
            ),
        })
    }

    fn describe(&self) -> String {
        match self {
            Backend::DuckDb(db) => format!("duckdb:{}", db.display()),
            Backend::ClickHouse { url, database } => format!("clickhouse:{url}/{database}"),
        }
    }
}

/// PEM files of the ingest's TLS.
struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

impl TlsFiles {
    fn server_config(&self) -> Result<tonic::transport::ServerTlsConfig> {
        let read =
            |p: &PathBuf| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
        let mut c = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(&self.cert)?, read(&self.key)?),
        );
        if let Some(ca) = &self.client_ca {
            c = c.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(c)
    }
}

/// The TLS and access settings of `serve`.
struct Security<'a> {
    /// The gRPC port's (ingest and Query).
    grpc_tls: Option<TlsFiles>,
    /// The HTTP API's TLS and the tokens of both APIs.
    api: &'a ApiSecurityArgs,
}

#[allow(clippy::too_many_arguments)] // One call site, each argument a distinct setting.
fn serve(
    grpc: SocketAddr,
    http: SocketAddr,
    backend: Backend,
    Security {
        grpc_tls: tls,
        api: security,
    }: Security<'_>,
    (experiments, evaluate_every): (Vec<Experiment>, Duration),
    judge_lag: Duration,
    retention_hours: u64,
    (capture_dir, audit_log): (PathBuf, PathBuf),
) -> Result<()> {
    // Settings first: a bad tokens file or certificate stops the start before any store work.
    let captures = Arc::new(
        bakeoff_collector::capture::Captures::open(&capture_dir).with_context(|| {
            format!("cannot use the capture directory {}", capture_dir.display())
        })?,
    );
    let audit = Arc::new(std::sync::Mutex::new(
        AuditLog::open(&audit_log)
            .with_context(|| format!("cannot use the audit log {}", audit_log.display()))?,
    ));
    let tokens = security
        .api_tokens
        .as_deref()
        .map(bakeoff_collector::api::auth::Tokens::load)
        .transpose()?;
    let http_tls = match (&security.http_tls_cert, &security.http_tls_key) {
        (Some(cert), Some(key)) => Some(
            bakeoff_collector::api::tls::server_config(
                cert,
                key,
                security.http_client_ca.as_deref(),
            )
            .context("bad TLS settings for the HTTP API")?,
        ),
        _ => None,
    };
    let access = Arc::new(Access::new(
        tokens.clone(),
        security.http_client_ca.is_some(),
    ));
    if access.is_open() {
        tracing::warn!(
            %http,
            %grpc,
            "the query API (HTTP and gRPC Query) is unauthenticated: anyone who can reach it \
             reads raw events (paths, peers, user agents); protect it with --api-tokens FILE \
             and/or --http-tls-cert/--http-tls-key/--http-client-ca"
        );
    } else {
        let (read, full) = tokens.as_ref().map(|t| t.counts()).unwrap_or_default();
        tracing::info!(
            read_tokens = read,
            full_tokens = full,
            client_certificates = security.http_client_ca.is_some(),
            "query API authentication on (/healthz and /metrics stay open)"
        );
        if tokens.is_some() && http_tls.is_none() {
            tracing::warn!(%http, "API tokens travel in clear text: the HTTP API has no TLS (--http-tls-cert)");
        }
        if tokens.is_some() && tls.is_none() {
            tracing::warn!(%grpc, "API tokens travel in clear text to the gRPC Query service: the gRPC port has no TLS (--tls-cert)");
        }
    }
    let store = backend.open()?;
    let live = Arc::new(Live::new(store.clone(), judge_lag));
    // Rebuild the judge's state from what is stored before taking new events.
    let started = std::time::Instant::now();
    let folded = live
        .close_due()
        .context("cannot read the judge's state from the store")?;
    tracing::info!(
        requests = folded,
        seconds = started.elapsed().as_secs_f64(),
        "judge state rebuilt from the store"
    );
    let verdicts = Arc::new(Verdicts::default());
    let mut grpc_builder = tonic::transport::Server::builder();
    if let Some(t) = &tls {
        grpc_builder = grpc_builder
            .tls_config(t.server_config()?)
            .context("bad TLS settings for the gRPC ingest")?;
    }
    let stats = Arc::new(IngestStats::default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let http_listener = tokio::net::TcpListener::bind(http)
            .await
            .with_context(|| format!("cannot listen on {http}"))?;
        let grpc_listener = tokio::net::TcpListener::bind(grpc)
            .await
            .with_context(|| format!("cannot listen on {grpc}"))?;
        tokio::spawn(live.clone().run());
        let app = router(ApiState {
            store: store.clone(),
            live: live.clone(),
            stats: stats.clone(),
            metrics: Arc::new(bakeoff_collector::metrics::registry(stats.clone())),
            verdicts: verdicts.clone(),
            access: access.clone(),
            captures: captures.clone(),
            audit: Some(audit),
        });
        {
            let captures = captures.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    captures.expire();
                }
            });
        }
        if !experiments.is_empty() {
            tracing::info!(
                experiments = experiments.len(),
                every = ?evaluate_every,
                "judging configured experiments"
            );
            tokio::spawn(bakeoff_collector::experiments::run(
                live.clone(),
                Arc::new(experiments),
                verdicts.clone(),
                evaluate_every,
            ));
        }
        let ingest = IngestServer::new(IngestService::new(
            store.clone(),
            stats.clone(),
            live.clone(),
        ))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
        tracing::info!(
            %grpc,
            %http,
            store = backend.describe(),
            tls = tls.is_some(),
            mutual_tls = tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
            http_tls = http_tls.is_some(),
            http_mutual_tls = http_tls.is_some() && security.http_client_ca.is_some(),
            "collector ready"
        );
        if retention_hours > 0 {
            let store = store.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tick.tick().await;
                    let cutoff = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0)
                        .saturating_sub(retention_hours * 3_600_000_000_000);
                    let store = store.clone();
                    match tokio::task::spawn_blocking(move || store.delete_before(cutoff)).await {
                        Ok(Ok(n)) if n > 0 => tracing::info!(deleted = n, "retention"),
                        Ok(Err(e)) => tracing::warn!(error = %e, "retention failed"),
                        _ => {}
                    }
                }
            });
        }
        let grpc_server = grpc_builder
            .add_service(ingest)
            .add_service(
                bakeoff_proto::v1::control_server::ControlServer::new(
                    bakeoff_collector::api::control::ControlService::new(captures.clone()),
                )
                .max_decoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(QueryServer::new(
                QueryService::new(store.clone(), live.clone()).with_access(access.clone()),
            ))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(grpc_listener),
                shutdown(),
            );
        let http_server = async move {
            match http_tls {
                Some(config) => {
                    let listener = TlsListener::new(http_listener, config)
                        .context("cannot start the HTTP API's TLS listener")?;
                    axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<TlsPeer>(),
                    )
                    .with_graceful_shutdown(shutdown())
                    .await
                }
                None => {
                    axum::serve(http_listener, app)
                        .with_graceful_shutdown(shutdown())
                        .await
                }
            }
            .context("HTTP server failed")
        };
        tokio::try_join!(
            async { grpc_server.await.context("gRPC server failed") },
            http_server,
        )?;
        tracing::info!("collector stopped");
        anyhow::Ok(())
    })
}

async fn shutdown() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(t) => t,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn events(
    api: &ApiClient,
    filters: &[String],
    group_by: Option<&str>,
    limit: usize,
    json: bool,
) -> Result<()> {
    Filter::parse(filters)?; // clear error before any request
    let path = if group_by.is_some() {
        "groups"
    } else {
        "events"
    };
    let mut req = api.get(&format!("/api/v1/{path}"));
    for f in filters {
        if let Some((k, v)) = f.split_once('=') {
            req = req.query(k, v);
        }
    }
    if let Some(by) = group_by {
        req = req.query("by", by);
    } else {
        req = req.query("limit", limit.to_string());
    }
    let mut resp = send(req, "events", &api.base)?;
    let body: serde_json::Value = resp
        .body_mut()
        .read_json()
        .context("bad JSON from the collector")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    match group_by {
        Some(by) => {
            let rows: Vec<GroupRow> = serde_json::from_value(body)?;
            print!("{}", group_table(by, &rows));
        }
        None => {
            let Some(rows) = body.as_array() else {
                bail!("unexpected answer: {body}");
            };
            println!(
                "{:<10} {:<8} {:<6} {:<40} {:>6} {:>10} {:>9}",
                "cohort", "pid", "method", "path", "status", "ms", "bytes_out"
            );
            for r in rows {
                let s = |k: &str| {
                    r[k].as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| r[k].to_string())
                };
                println!(
                    "{:<10} {:<8} {:<6} {:<40} {:>6} {:>10.3} {:>9}",
                    s("cohort"),
                    s("pid"),
                    s("method"),
                    s("path"),
                    s("status"),
                    r["duration_ns"].as_f64().unwrap_or(0.0) / 1e6,
                    s("bytes_out")
                );
            }
        }
    }
    Ok(())
}

/// A fixed-width table of group-by rows.
fn group_table(by: &str, rows: &[GroupRow]) -> String {
    let names: Vec<&str> = by.split(',').collect();
    let mut out = String::new();
    for n in &names {
        out += &format!("{n:<16} ");
    }
    out += &format!(
        "{:>9} {:>7} {:>9} {:>9} {:>9}\n",
        "requests", "errors", "p50_ms", "p90_ms", "p99_ms"
    );
    for r in rows {
        for k in &r.key {
            out += &format!("{:<16} ", k.as_deref().unwrap_or("-"));
        }
        out += &format!(
            "{:>9} {:>7} {:>9.3} {:>9.3} {:>9.3}\n",
            r.requests, r.errors, r.p50_ms, r.p90_ms, r.p99_ms
        );
    }
    out
}

/// Fetches (and with `watch`, re-fetches) the verdict; returns the exit code.
fn verdict(
    api: &ApiClient,
    query: &[(&str, String)],
    watch: Option<f64>,
    timeout: f64,
    json: bool,
    all: bool,
) -> Result<i32> {
    let deadline = std::time::Instant::now() + Duration::from_secs_f64(timeout.max(0.0));
    loop {
        let mut req = api.get("/api/v1/verdict");
        for (k, v) in query {
            req = req.query(*k, v);
        }
        let v = fetch_verdict(req, &api.base)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            print!("{}", verdict_table(&v, all));
        }
        let code = match v.verdict.decision {
            Decision::Pass => 0,
            Decision::Fail => 1,
            Decision::Inconclusive => 2,
        };
        match watch {
            Some(every) if code == 2 && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_secs_f64(every.max(0.1)));
                if !json {
                    println!();
                }
            }
            _ => return Ok(code),
        }
    }
}

/// One verdict request: the typed answer, or an error carrying the collector's reason (an
/// unknown experiment is a 404 naming the ones that exist).
fn fetch_verdict(
    req: ureq::RequestBuilder<ureq::typestate::WithoutBody>,
    api: &str,
) -> Result<VerdictResponse> {
    send(req, "the verdict", api)?
        .body_mut()
        .read_json()
        .context("the collector's verdict is not the JSON this client expects")
}

/// E-values grow geometrically: beyond a million, the exponent is what matters.
fn e_value(v: Option<f64>) -> String {
    match v {
        Some(x) if x >= 1e6 => format!("{x:.2e}"),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

/// At most `n` characters, with an ellipsis when cut.
fn fit(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let cut: String = s.chars().take(n.saturating_sub(1)).collect();
        format!("{cut}…")
    }
}

/// A metric's values as the table shows them: ms for latency metrics, % for rates and shares.
fn value(m: &MetricVerdict, v: Option<f64>) -> String {
    match (m.metric.as_str(), v) {
        (_, None) => "-".into(),
        ("errors" | "volume", Some(x)) => format!("{:.2}%", 100.0 * x),
        (_, Some(x)) => format!("{x:.3}"),
    }
}

/// Bounds as `lo..hi`.
fn bounds(m: &MetricVerdict) -> String {
    let b = match m.metric.as_str() {
        "errors" => m.canary_bounds,
        _ => m.ratio_bounds,
    };
    let Some(b) = b else { return "-".into() };
    let f = |v: Option<f64>| match (m.metric.as_str(), v) {
        (_, None) => "?".to_string(),
        ("errors", Some(x)) => format!("{:.2}%", 100.0 * x),
        (_, Some(x)) => format!("x{x:.2}"),
    };
    format!("{}..{}", f(b.lower), f(b.upper))
}

/// The verdict for a terminal: the decision and why, then one line per judged metric.
fn verdict_table(r: &VerdictResponse, all: bool) -> String {
    let v = &r.verdict;
    let decision = match v.decision {
        Decision::Pass => "PASS",
        Decision::Fail => "FAIL",
        Decision::Inconclusive => "INCONCLUSIVE",
    };
    let mut out = format!(
        "{} canary `{}` vs baseline `{}`: {decision} (score {:.0}, {} canary / {} baseline requests over {} s, alpha {} over {} metrics)\n",
        r.experiment,
        r.canary,
        r.baseline,
        v.score,
        v.requests.canary,
        v.requests.baseline,
        v.seconds,
        v.alpha,
        v.metrics_judged,
    );
    for reason in &v.reasons {
        out += &format!("  - {reason}\n");
    }
    if let Some(expected) = v.volume.expected {
        out += &format!(
            "  volume: canary {:.1}% of requests, {:.1}% expected ({})\n",
            100.0 * v.volume.observed,
            100.0 * expected,
            v.volume.source
        );
    }
    out += &format!(
        "\n{:<8} {:<28} {:<12} {:>8} {:>10} {:>10} {:>8} {:>18} {:>10} {:>10}\n",
        "metric",
        "endpoint",
        "decision",
        "canary_n",
        "canary",
        "baseline",
        "limit",
        "bounds",
        "e_harm",
        "e_safe"
    );
    let shown =
        |m: &&MetricVerdict| all || m.endpoint == "*" || m.required || m.decision == Decision::Fail;
    for m in v.metrics.iter().filter(shown) {
        let limit = if m.metric == "volume" {
            format!("{:.1}%", 100.0 * m.limit)
        } else {
            format!("x{:.2}", m.limit)
        };
        let decision = match m.decision {
            Decision::Pass => "pass",
            Decision::Fail => "fail",
            Decision::Inconclusive if m.required => "inconclusive",
            Decision::Inconclusive => "(too few)",
        };
        out += &format!(
            "{:<8} {:<28} {:<12} {:>8} {:>10} {:>10} {:>8} {:>18} {:>10} {:>10}\n",
            m.metric,
            fit(&m.endpoint, 28),
            decision,
            m.canary_requests,
            value(m, m.canary),
            value(m, m.baseline),
            limit,
            bounds(m),
            e_value(m.e_value_harm),
            e_value(m.e_value_safe),
        );
    }
    let hidden = v.metrics.iter().filter(|m| !shown(m)).count();
    if hidden > 0 {
        out += &format!(
            "({hidden} more metrics of endpoints with fewer than the requests needed to judge them: --all)\n"
        );
    }
    for m in &v.metrics {
        if m.drilldown.is_empty() {
            continue;
        }
        out += &format!(
            "\nwhere {} {} fails, the canary's bad requests are mostly:\n{:<14} {:<36} {:>8} {:>10} {:>13} {:>15} {:>6}\n",
            m.metric,
            m.endpoint,
            "dimension",
            "value",
            "bad",
            "bad_share",
            "canary_share",
            "baseline_share",
            "score"
        );
        for d in &m.drilldown {
            out += &format!(
                "{:<14} {:<36} {:>8} {:>9.1}% {:>12.1}% {:>14.1}% {:>6.2}\n",
                fit(&d.dimension, 14),
                fit(&d.value, 36),
                d.canary_bad,
                100.0 * d.bad_share,
                100.0 * d.canary_share,
                100.0 * d.baseline_share,
                d.score,
            );
        }
    }
    out += "(latency: p50 ms, e-values of the pairwise test; pNN: ms, bounds on canary/baseline; errors: rate, bounds on the canary's rate; volume: canary share, expected share, lowest tolerated; (too few): fewer than min_requests per cohort, not required to pass)\n";
    out
}

/// Fetches the report page and writes it to `output`.
fn report(
    api: &ApiClient,
    experiment: &str,
    baseline: &str,
    canary: &str,
    judge: &JudgeArgs,
    output: &std::path::Path,
) -> Result<()> {
    let mut req = api
        .get("/report")
        .query("experiment", experiment)
        .query("baseline", baseline)
        .query("canary", canary);
    for (k, v) in judge.query() {
        req = req.query(k, v);
    }
    let html = send(req, "the report", &api.base)?
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .context("cannot read the report")?;
    std::fs::write(output, html).with_context(|| format!("cannot write {}", output.display()))?;
    println!("report written to {}", output.display());
    Ok(())
}

/// Records a replay in the audit log (who, the capture and its redaction rules, the targets,
/// the requests to replay). Any failure stops the replay before it sends anything: an audit log
/// that silently misses commands is worthless.
fn audit_replay(
    log: Option<&std::path::Path>,
    file: &std::path::Path,
    meta: &bakeoff_capture::Meta,
    targets: &ReplayTargets,
    options: &bakeoff_replay::ReplayOptions,
    (sessions, requests, writes): (usize, usize, usize),
) -> Result<()> {
    let refused = "not replaying: the replay cannot be recorded in the audit log (--audit-log)";
    let path = match log {
        Some(p) => p.to_path_buf(),
        None => audit::default_path().context(refused)?,
    };
    let mut log = AuditLog::open(&path).context(refused)?;
    let replayed = if options.allow_writes {
        requests
    } else {
        requests - writes
    };
    let addrs: Vec<String> = std::iter::once(targets.a)
        .chain(targets.b)
        .chain(targets.a2)
        .map(|a| a.to_string())
        .collect();
    let capture = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    let details = serde_json::json!({
        "capture": capture.display().to_string(),
        "capture_protocol": meta.protocol,
        "capture_started_unix_ns": meta.started_unix_ns,
        "sessions": sessions,
        "requests": replayed,
        "writes_skipped": if options.allow_writes { 0 } else { writes },
        "allow_writes": options.allow_writes,
        "against": targets.b.map(|b| b.to_string()),
        "calibrate": targets.a2.map(|a| a.to_string()),
        "uid": audit::local_uid(),
    });
    let nonempty = |s: &str| (!s.is_empty()).then(|| s.to_string());
    log.append(audit::Entry {
        actor: audit::local_actor(),
        action: "replay".into(),
        experiment: nonempty(&meta.experiment),
        cohort: nonempty(&meta.cohort),
        target: Some(addrs.join(",")),
        bytes: std::fs::metadata(file).map(|m| m.len()).ok(),
        redaction: meta.redaction.clone(),
        details: match details {
            serde_json::Value::Object(m) => m,
            _ => serde_json::Map::new(),
        },
    })
    .context(refused)?;
    Ok(())
}

/// `bakeoff audit`: prints the log's entries up to any damage and the verdict on its chain;
/// `Ok(false)` when it is damaged.
fn audit_cmd(log: Option<PathBuf>, json: bool, verify_only: bool) -> Result<bool> {
    let path = match log {
        Some(p) => p,
        None => audit::default_path()?,
    };
    let chain = audit::read(&path)?;
    let summary = audit::summary(&chain.entries);
    let damage = chain
        .damage
        .as_ref()
        .map(|(line, reason)| serde_json::json!({ "line": line, "reason": reason.to_string() }));
    if json {
        let mut out = serde_json::json!({
            "log": path.display().to_string(),
            "verified": chain.damage.is_none(),
            "count": summary.entries,
            "first_time": summary.first_time,
            "last_time": summary.last_time,
            "last_hash": summary.last_hash,
            "damage": damage,
        });
        if !verify_only {
            out["entries"] = serde_json::to_value(&chain.entries)?;
        }
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if !verify_only && !chain.entries.is_empty() {
            print!("{}", audit_table(&chain.entries));
        }
        match &chain.damage {
            Some((line, reason)) => println!("audit log damaged at line {line}: {reason}"),
            None => match (&summary.first_time, &summary.last_time) {
                (Some(first), Some(last)) => println!(
                    "chain verified: {} entries, from {first} to {last}",
                    summary.entries
                ),
                _ => println!("chain verified: 0 entries"),
            },
        }
    }
    Ok(chain.damage.is_none())
}

/// One line per entry: seq, time (to the second), actor, action, experiment/cohort, target,
/// bytes.
fn audit_table(entries: &[audit::Recorded]) -> String {
    let mut out = format!(
        "{:>5} {:<20} {:<24} {:<14} {:<28} {:<24} {:>12}\n",
        "seq", "time", "actor", "action", "experiment/cohort", "target", "bytes"
    );
    for e in entries {
        let time = match (e.time.split_once('.'), e.time.ends_with('Z')) {
            (Some((seconds, _)), true) => format!("{seconds}Z"),
            _ => e.time.clone(),
        };
        let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
        out += &format!(
            "{:>5} {:<20} {:<24} {:<14} {:<28} {:<24} {:>12}\n",
            e.seq,
            time,
            fit(&e.actor, 24),
            fit(&e.action, 14),
            fit(&format!("{}/{}", dash(&e.experiment), dash(&e.cohort)), 28),
            fit(&dash(&e.target), 24),
            e.bytes.map_or_else(|| "-".into(), |b| b.to_string()),
        );
    }
    out
}

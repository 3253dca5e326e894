//! bakeoff-bench (run by `cargo xtask bench probe`): what the probe costs, side by side in one run, in interleaved
//! rounds (this host is noisy): no probe; probe running with nginx untagged; nginx tagged.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    process::{Guard, free_port, wait_for, wait_for_port},
};
use clap::Parser;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    NoProbe,
    Untagged,
    Tagged,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::NoProbe => "no probe",
            Setup::Untagged => "probe, untagged",
            Setup::Tagged => "probe, tagged",
        }
    }
}

/// One configuration's measurements in one round.
#[derive(Clone, Debug, Default)]
struct Row {
    getppid_ns: f64,
    write_ns: f64,
    max_rps: f64,
    max_p50_us: f64,
    max_p99_us: f64,
    fixed_p50_us: f64,
    fixed_p99_us: f64,
    requests: u64,
    probe_cpu_us: f64,
    probe_rss_kb: f64,
    events: f64,
    drops: f64,
    bpf_ns: f64,
    seconds: f64,
}

const FIXED_RATE: u64 = 2000;
const LOAD_SECONDS: u64 = 3;

#[derive(Parser)]
struct Args {
    /// Which benchmark: `probe` or `collector`.
    #[arg(default_value = "probe")]
    which: String,
    /// Interleaved rounds per configuration.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events ingested by the collector benchmark (the group-by runs over all of them).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.which.as_str() {
        "probe" => probe(&bakeoff_testkit::process::target_bin_dir(), args.rounds),
        "collector" => collector(args.events),
        other => bail!("unknown benchmark `{other}` (available: probe, collector)"),
    }
}

fn probe(bins: &Path, rounds: usize) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark loads eBPF programs: run it as root"
    );
    let dir = PathBuf::from("/tmp/bakeoff-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let _parent = Cgroup::create("bakeoff-bench")?;
    let watched = Cgroup::create("bakeoff-bench/watched")?;
    let unwatched = Cgroup::create("bakeoff-bench/unwatched")?;
    let stats_before =
        std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_default();
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enable bpf stats")?;

    let port = free_port();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off; master_process on; worker_processes 2; user root; pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn; events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; keepalive_requests 100000;\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"hello\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    let _nginx = Guard::shell(
        "nginx",
        &format!(
            "{}/usr/sbin/nginx -c {}/nginx.conf -p {}",
            unwatched.exec_prefix(),
            dir.display(),
            dir.display()
        ),
        &[],
    )?;
    wait_for_port(port, Duration::from_secs(10))?;

    let setups = [Setup::NoProbe, Setup::Untagged, Setup::Tagged];
    let mut rows: Vec<(Setup, Row)> = Vec::new();
    for round in 0..rounds {
        for &setup in &setups {
            let target = if setup == Setup::Tagged {
                &watched
            } else {
                &unwatched
            };
            move_nginx(&dir, target.path())?;
            let row = measure(bins, &dir, &watched, setup, port)?;
            eprintln!(
                "round {}/{rounds} {:<16} getppid {:.0} ns, write {:.0} ns, {:.0} req/s",
                round + 1,
                setup.name(),
                row.getppid_ns,
                row.write_ns,
                row.max_rps
            );
            rows.push((setup, row));
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    report(&rows);
    Ok(())
}

fn move_nginx(dir: &Path, cgroup: &Path) -> Result<()> {
    let master: u32 = std::fs::read_to_string(dir.join("nginx.pid"))?
        .trim()
        .parse()?;
    for pid in std::iter::once(master).chain(bakeoff_probe::cohort::proc::children_of(master)) {
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string())
            .with_context(|| format!("move {pid} to {}", cgroup.display()))?;
    }
    Ok(())
}

fn measure(bins: &Path, dir: &Path, watched: &Cgroup, setup: Setup, port: u16) -> Result<Row> {
    let stats = dir.join("stats.json");
    let ready = dir.join("ready");
    let _ = std::fs::remove_file(&stats);
    let _ = std::fs::remove_file(&ready);
    let mut probe = match setup {
        Setup::NoProbe => None,
        _ => {
            let p = Guard::spawn(
                "bakeoff-probe",
                Command::new(bins.join("bakeoff-probe"))
                    .arg("--cohort")
                    .arg(format!("canary=cgroup:{}", watched.path().display()))
                    .arg("--output")
                    .arg(dir.join("events.jsonl"))
                    .arg("--ready-file")
                    .arg(&ready)
                    .arg("--stats-file")
                    .arg(&stats)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;
            Some(p)
        }
    };
    let started = Instant::now();
    let mut row = Row {
        getppid_ns: syscall_ns(|| unsafe {
            libc::getppid();
        }),
        ..Row::default()
    };
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    row.write_ns = syscall_ns(|| unsafe {
        libc::write(fd, b"x".as_ptr().cast(), 1);
    });
    let (rps, p50, p99, n) = wrk(port)?;
    row.max_rps = rps;
    row.max_p50_us = p50;
    row.max_p99_us = p99;
    let (fp50, fp99, fixed_n) = fixed_rate(port)?;
    row.fixed_p50_us = fp50;
    row.fixed_p99_us = fp99;
    row.requests = n + fixed_n;
    row.seconds = started.elapsed().as_secs_f64();
    if let Some(p) = probe.as_mut() {
        let (cpu_ticks, rss_kb) = proc_usage(p.pid())?;
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        p.stop(Duration::from_secs(30))?;
        let s: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
        row.probe_cpu_us = cpu_ticks as f64 / hz * 1e6 / row.requests.max(1) as f64;
        row.probe_rss_kb = rss_kb as f64;
        row.events = s["pipeline"]["events"].as_f64().unwrap_or(0.0);
        row.drops = s["kernel_drops"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_f64()).sum())
            .unwrap_or(0.0);
        let bpf_total: f64 = s["programs"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v["run_time_ns"].as_f64()).sum())
            .unwrap_or(0.0);
        row.bpf_ns = bpf_total / row.requests.max(1) as f64;
    }
    Ok(row)
}

/// Best of five runs of 200 000 calls, in ns per call.
fn syscall_ns(mut f: impl FnMut()) -> f64 {
    const N: u32 = 200_000;
    (0..5)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..N {
                f();
            }
            t.elapsed().as_nanos() as f64 / f64::from(N)
        })
        .fold(f64::INFINITY, f64::min)
}

/// wrk at the maximum rate: (requests/s, p50 us, p99 us, requests).
fn wrk(port: u16) -> Result<(f64, f64, f64, u64)> {
    let out = Command::new("wrk")
        .args(["-t1", "-c8", &format!("-d{LOAD_SECONDS}s"), "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .context("cannot run wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()))
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}"))?;
    let p50 = field("50%")
        .and_then(|v| duration_us(&v))
        .unwrap_or(f64::NAN);
    let p99 = field("99%")
        .and_then(|v| duration_us(&v))
        .unwrap_or(f64::NAN);
    let n = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((rps, p50, p99, n))
}

/// `123.45us`, `1.2ms`, `2.00s` in microseconds.
fn duration_us(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (num, unit) = v.split_at(split);
    let num: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => num,
        "ms" => num * 1e3,
        "s" => num * 1e6,
        _ => return None,
    })
}

/// A fixed offered rate over four keep-alive connections; latency is measured from each
/// request's scheduled time, so a stall is not hidden (no coordinated omission).
fn fixed_rate(port: u16) -> Result<(f64, f64, u64)> {
    const CONNS: u64 = 4;
    let per_conn = FIXED_RATE / CONNS;
    let interval = Duration::from_nanos(1_000_000_000 / per_conn);
    let total = per_conn * LOAD_SECONDS;
    let threads: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || -> Result<Vec<u64>> {
                let mut conn = Conn::connect(port)?;
                let start = Instant::now();
                let mut lat = Vec::with_capacity(total as usize);
                for i in 0..total {
                    let due = start + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    conn.request(&Request::get("/", &format!("bench-{c}-{i}")))?;
                    lat.push(due.elapsed().as_micros() as u64);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in threads {
        all.extend(
            t.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??,
        );
    }
    if all.is_empty() {
        bail!("no requests completed");
    }
    all.sort_unstable();
    let q = |q: f64| all[((all.len() - 1) as f64 * q) as usize] as f64;
    Ok((q(0.5), q(0.99), all.len() as u64))
}

/// CPU ticks (user + system) and RSS in kB of a process.
fn proc_usage(pid: u32) -> Result<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((ticks, rss))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn report(rows: &[(Setup, Row)]) {
    let of = |s: Setup, f: fn(&Row) -> f64| {
        median(
            rows.iter()
                .filter(|(x, _)| *x == s)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    let setups = [Setup::NoProbe, Setup::Untagged, Setup::Tagged];
    println!(
        "\nbakeoff probe benchmark: medians of {} interleaved rounds, {} cores\n",
        rows.len() / 3,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "{:<17} {:>11} {:>9} {:>10} {:>9} {:>9} {:>10} {:>10}",
        "setup", "getppid_ns", "write_ns", "max_rps", "max_p50", "max_p99", "2k/s_p50", "2k/s_p99"
    );
    for s in setups {
        println!(
            "{:<17} {:>11.0} {:>9.0} {:>10.0} {:>7.0}us {:>7.0}us {:>8.0}us {:>8.0}us",
            s.name(),
            of(s, |r| r.getppid_ns),
            of(s, |r| r.write_ns),
            of(s, |r| r.max_rps),
            of(s, |r| r.max_p50_us),
            of(s, |r| r.max_p99_us),
            of(s, |r| r.fixed_p50_us),
            of(s, |r| r.fixed_p99_us),
        );
    }
    println!(
        "\n{:<17} {:>14} {:>9} {:>10} {:>7} {:>15}",
        "setup", "probe_cpu_us/req", "rss_MiB", "events/s", "drops", "bpf_ns/request"
    );
    for s in [Setup::Untagged, Setup::Tagged] {
        println!(
            "{:<17} {:>16.2} {:>9.1} {:>10.0} {:>7.0} {:>15.0}",
            s.name(),
            of(s, |r| r.probe_cpu_us),
            of(s, |r| r.probe_rss_kb) / 1024.0,
            of(s, |r| r.events / r.seconds),
            of(s, |r| r.drops),
            of(s, |r| r.bpf_ns),
        );
    }
    let base = |f: fn(&Row) -> f64| of(Setup::NoProbe, f);
    println!("\nadded by the probe (vs no probe):");
    for s in [Setup::Untagged, Setup::Tagged] {
        println!(
            "  {:<16} getppid {:+.0} ns, write(/dev/null) {:+.0} ns per call (unwatched process); \
             max throughput x{:.3}; p50 {:+.0} us, p99 {:+.0} us at 2000 req/s",
            s.name(),
            of(s, |r| r.getppid_ns) - base(|r| r.getppid_ns),
            of(s, |r| r.write_ns) - base(|r| r.write_ns),
            of(s, |r| r.max_rps) / base(|r| r.max_rps),
            of(s, |r| r.fixed_p50_us) - base(|r| r.fixed_p50_us),
            of(s, |r| r.fixed_p99_us) - base(|r| r.fixed_p99_us),
        );
    }
}

/// An hour before the benchmark started, in Unix ns.
fn bench_epoch() -> u64 {
    static EPOCH: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
            .saturating_sub(3_600_000_000_000)
    })
}

/// Synthetic events shaped like the probe's: 2 cohorts, 50 paths, realistic durations.
fn synthetic_batch(seq: u64, n: usize, stream: usize) -> bakeoff_proto::v1::IngestRequest {
    use bakeoff_proto::v1::{EventBatch, IngestRequest, RequestEvent, ingest_request::Message};
    let events = (0..n)
        .map(|i| {
            let k = seq as usize * n + i;
            RequestEvent {
                experiment: "bench".into(),
                cohort: if k.is_multiple_of(10) {
                    "canary"
                } else {
                    "baseline"
                }
                .into(),
                node: format!("node-{stream}"),
                pid: 1000 + stream as u32,
                exe: "/usr/bin/service".into(),
                role: "server".into(),
                protocol: "http1".into(),
                method: "GET".into(),
                path: format!("/api/items/{}", k % 50),
                status: Some(if k.is_multiple_of(97) { 503 } else { 200 }),
                // Spread over the last hour (a realistic number of the judge's one-second
                // cells), in order per stream as a probe sends them.
                start_unix_ns: bench_epoch() + k as u64 * SPACING_NS,
                duration_ns: 1_000_000 + (k as u64 * 7919) % 5_000_000,
                bytes_in: 120,
                bytes_out: 2048,
                peer: "10.0.0.1:40000".into(),
                request_id: format!("{stream}-{k}"),
                ..RequestEvent::default()
            }
        })
        .collect();
    IngestRequest {
        message: Some(Message::Batch(EventBatch {
            sequence: seq,
            events,
        })),
    }
}

const STREAMS: usize = 4;
const BATCH: usize = 2000;
/// Start-time spacing of one stream's events: 10M events over 4 streams span an hour.
const SPACING_NS: u64 = 1_440_000;

/// Ingest rate from concurrent probe streams, then a group-by with quantiles over everything,
/// into DuckDB and into ClickHouse (a real server started here), side by side.
fn collector(total: u64) -> Result<()> {
    let dir = PathBuf::from("/tmp/bakeoff-bench-collector");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let duck = {
        let collector = bakeoff_testkit::collector::Collector::start(&dir)?;
        collector_run(&collector, None, total)?
    };
    let click = {
        let server = bakeoff_testkit::clickhouse::ClickHouse::start(&dir)?;
        let collector = bakeoff_testkit::collector::Collector::start_with(
            &dir,
            bakeoff_testkit::process::free_port(),
            bakeoff_testkit::process::free_port(),
            &["--clickhouse".into(), server.url()],
        )?;
        collector_run(&collector, Some(server.guard.pid()), total)?
    };
    println!(
        "\nbakeoff collector benchmark ({cores} cores shared by load generator, collector and store; \
         {STREAMS} concurrent probe streams, batches of {BATCH})\n"
    );
    println!(
        "{:<12} {:>10} {:>9} {:>11} {:>15} {:>8} {:>12} {:>11} {:>7} {:>14} {:>16} {:>12}",
        "store",
        "events",
        "ingest_s",
        "events/s",
        "events/s/core",
        "cpu_s",
        "events/cpu_s",
        "group_by_s",
        "groups",
        "verdict_read_s",
        "during_ingest_s",
        "judged_events"
    );
    for (name, r) in [("duckdb", duck), ("clickhouse", click)] {
        println!(
            "{:<12} {:>10} {:>9.1} {:>11.0} {:>15.0} {:>8.1} {:>12.0} {:>11.2} {:>7} {:>14.3} {:>16} {:>12}",
            name,
            r.events,
            r.ingest_s,
            r.events as f64 / r.ingest_s,
            r.events as f64 / r.ingest_s / cores as f64,
            r.cpu_s,
            r.events as f64 / r.cpu_s,
            r.group_s,
            r.groups,
            r.verdict_s,
            format!("{:.3}/{:.3}", r.during_median_s, r.during_max_s),
            r.judged
        );
    }
    println!(
        "\nevents/s/core: events/s over all cores, load generator included. cpu_s: CPU seconds (user +\n\
         system) of the collector, and of clickhouse-server, while ingesting; events/cpu_s: the\n\
         ingest rate per core they fully use (the load generator's CPU left out).\n\
         group_by_s: GET /api/v1/groups?by=cohort,path (count, errors, p50/p90/p99) over all events.\n\
         verdict_read_s: GET /api/v1/verdict once the judge covers every event (median of 5), over\n\
         judged_events spread over an hour (50 endpoints, 10% canary); during_ingest_s: median/max\n\
         of verdict reads every 250 ms while ingesting (ingest_s includes them)."
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct CollectorRun {
    events: u64,
    ingest_s: f64,
    cpu_s: f64,
    group_s: f64,
    groups: usize,
    verdict_s: f64,
    during_median_s: f64,
    during_max_s: f64,
    judged: u64,
}

fn median_max(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN),
        v.last().copied().unwrap_or(f64::NAN),
    )
}

/// CPU seconds (user + system) used so far by the collector and, if given, its store's server.
fn store_cpu_s(
    collector: &bakeoff_testkit::collector::Collector,
    server: Option<u32>,
) -> Result<f64> {
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut ticks = proc_usage(collector.guard.pid())?.0;
    if let Some(pid) = server {
        ticks += proc_usage(pid)?.0;
    }
    Ok(ticks as f64 / hz)
}

fn collector_run(
    collector: &bakeoff_testkit::collector::Collector,
    server: Option<u32>,
    total: u64,
) -> Result<CollectorRun> {
    use bakeoff_proto::v1::{
        IngestRequest, ProbeHello, ingest_client::IngestClient, ingest_request::Message,
    };
    let endpoint = collector.endpoint();
    let batches_per_stream = (total as usize).div_ceil(BATCH * STREAMS) as u64;
    let events = batches_per_stream * (BATCH * STREAMS) as u64;
    let rt = tokio::runtime::Runtime::new()?;
    let cpu_before = store_cpu_s(collector, server)?;
    let started = Instant::now();
    // Verdict reads while ingesting: how long each takes (they must not stall the ingest).
    let ingesting = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let reader = {
        let (ingesting, url) = (
            ingesting.clone(),
            "/api/v1/verdict?experiment=bench".to_string(),
        );
        let port = collector.http_port;
        std::thread::spawn(move || {
            let mut took = Vec::new();
            while ingesting.load(std::sync::atomic::Ordering::Relaxed) && took.len() < 100_000 {
                let t = Instant::now();
                // 404 until the first second closes: still a read to time.
                let _ = ureq::get(&format!("http://127.0.0.1:{port}{url}"))
                    .config()
                    .http_status_as_error(false)
                    .build()
                    .call();
                took.push(t.elapsed().as_secs_f64());
                std::thread::sleep(Duration::from_millis(250));
            }
            took
        })
    };
    rt.block_on(async {
        let mut tasks = Vec::new();
        for stream in 0..STREAMS {
            let endpoint = endpoint.clone();
            tasks.push(tokio::spawn(async move {
                let mut client = IngestClient::connect(endpoint).await?;
                let (tx, rx) = tokio::sync::mpsc::channel::<IngestRequest>(4);
                tx.send(IngestRequest {
                    message: Some(Message::Hello(ProbeHello {
                        probe_id: format!("bench-{stream}"),
                        protocol_version: bakeoff_proto::PROTOCOL_VERSION,
                        ..ProbeHello::default()
                    })),
                })
                .await?;
                let mut acks = client
                    .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await?
                    .into_inner();
                let sender = tokio::spawn(async move {
                    for seq in 1..=batches_per_stream {
                        if tx.send(synthetic_batch(seq, BATCH, stream)).await.is_err() {
                            break;
                        }
                    }
                    // Keep the stream open until the acks are in.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                });
                while let Some(ack) = acks.message().await? {
                    if ack.stored_sequence >= batches_per_stream {
                        break;
                    }
                }
                sender.abort();
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        anyhow::Ok(())
    })?;
    let ingest_s = started.elapsed().as_secs_f64();
    let cpu_s = store_cpu_s(collector, server)? - cpu_before;
    ingesting.store(false, std::sync::atomic::Ordering::Relaxed);
    let (during_median_s, during_max_s) = median_max(
        reader
            .join()
            .map_err(|_| anyhow::anyhow!("reader panicked"))?,
    );
    // The judge covers every event once the last second closed (the probes went idle: the
    // wall clock closes the rest).
    let mut judged = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(v) = collector.get("/api/v1/verdict?experiment=bench") {
            judged = v["requests"]["canary"].as_u64().unwrap_or(0)
                + v["requests"]["baseline"].as_u64().unwrap_or(0);
            if judged == events {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut reads = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        collector.get("/api/v1/verdict?experiment=bench")?;
        reads.push(t.elapsed().as_secs_f64());
    }
    let (verdict_s, _) = median_max(reads);
    let t = Instant::now();
    let groups = collector.get("/api/v1/groups?by=cohort,path")?;
    let group_s = t.elapsed().as_secs_f64();
    let stored: u64 = groups
        .as_array()
        .map(|g| g.iter().filter_map(|r| r["requests"].as_u64()).sum())
        .unwrap_or(0);
    ensure!(stored == events, "stored {stored} of {events} events");
    Ok(CollectorRun {
        events,
        ingest_s,
        cpu_s,
        group_s,
        groups: groups.as_array().map_or(0, Vec::len),
        verdict_s,
        during_median_s,
        during_max_s,
        judged,
    })
}

//! bakeoff-bench (run by `cargo xtask bench probe`): what the probe costs, side by side in one
//! run, in interleaved rounds (this host is noisy): no probe; the probe idle; the cgroup data
//! path and the per-process (syscall) data path, each with the loaded nginx untagged and tagged.
//! `bakeoff-bench collector`: the collector's ingest rate and query times.

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
    Idle,
    CgroupUntagged,
    CgroupTagged,
    SyscallUntagged,
    SyscallTagged,
    /// HTTPS (nginx, libssl), no probe: the base of the TLS rows.
    TlsNoProbe,
    /// HTTPS on the cgroup path with the TLS uprobes.
    TlsTagged,
    /// The cgroup path, tagged, recording the cohort into a capture file (whole payloads).
    CgroupRecording,
}

const SETUPS: [Setup; 9] = [
    Setup::NoProbe,
    Setup::Idle,
    Setup::CgroupUntagged,
    Setup::CgroupTagged,
    Setup::SyscallUntagged,
    Setup::SyscallTagged,
    Setup::TlsNoProbe,
    Setup::TlsTagged,
    Setup::CgroupRecording,
];

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::NoProbe => "no probe",
            Setup::Idle => "probe idle",
            Setup::CgroupUntagged => "cgroup path, untagged",
            Setup::CgroupTagged => "cgroup path, tagged",
            Setup::SyscallUntagged => "syscall path, untagged",
            Setup::SyscallTagged => "syscall path, tagged",
            Setup::TlsNoProbe => "https, no probe",
            Setup::TlsTagged => "https, cgroup path, tagged",
            Setup::CgroupRecording => "cgroup path, recording",
        }
    }

    fn tls(self) -> bool {
        matches!(self, Setup::TlsNoProbe | Setup::TlsTagged)
    }

    /// What its Δ and x columns compare with.
    fn base(self) -> Setup {
        if self.tls() {
            Setup::TlsNoProbe
        } else {
            Setup::NoProbe
        }
    }
}

/// One setup's measurements in one round.
#[derive(Clone, Debug, Default)]
struct Row {
    getppid_ns: f64,
    write_ns: f64,
    /// Whole-machine CPU per request during the `ab` run, in us.
    cpu_us: f64,
    /// Of which used by none of ab, nginx, the probe or this benchmark (host noise), in us.
    other_us: f64,
    max_rps: f64,
    fixed_p50_us: f64,
    fixed_p99_us: f64,
    /// The probe's own CPU per request during the `ab` run, in us.
    probe_cpu_us: f64,
    probe_rss_kb: f64,
    events_per_request: f64,
    drops: f64,
    bpf_ns: f64,
    bpf_runs: f64,
}

/// Requests per second and duration of the fixed-rate latency load.
const FIXED_RATE: u64 = 2000;
const FIXED_SECONDS: u64 = 3;
/// Concurrent keep-alive connections of `ab`, and its time limit.
const AB_CONCURRENCY: u32 = 16;
const AB_TIME_LIMIT_S: u64 = 120;
/// Body of nginx's responses.
const BODY_BYTES: u64 = 1024;
/// Bytes of each write(2) to /dev/null in the syscall loop.
const WRITE_BYTES: usize = 64;
/// A measurement during which other processes used more than this share of the CPU (or after
/// which another bakeoff-probe runs) is taken again, at most ATTEMPTS times in all (the one with
/// the least foreign CPU is kept).
const NOISE_SHARE: f64 = 0.05;
const ATTEMPTS: usize = 3;
/// Longest wait for a quiet host (see `wait_quiet`) before each measurement.
const QUIET_WAIT: Duration = Duration::from_secs(120);

#[derive(Parser)]
struct Args {
    /// Which benchmark: `probe` or `collector`.
    #[arg(default_value = "probe")]
    which: String,
    /// Interleaved rounds per configuration.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Requests of each `ab` run (whole-machine CPU per request, maximum throughput).
    #[arg(long, default_value_t = 200_000)]
    requests: u64,
    /// Events ingested by the collector benchmark (the group-by runs over all of them).
    #[arg(long, default_value_t = 10_000_000)]
    events: u64,
    /// Only these setups of the probe benchmark (names as printed, `;`-separated), e.g.
    /// `no probe;cgroup path, tagged;cgroup path, recording`. Default: all.
    #[arg(long, value_delimiter = ';')]
    setups: Vec<String>,
    /// Stores the collector benchmark ingests into, comma-separated: duckdb, clickhouse.
    #[arg(long, default_value = "duckdb,clickhouse", value_delimiter = ',')]
    stores: Vec<String>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    match args.which.as_str() {
        "probe" => probe(
            &bakeoff_testkit::process::target_bin_dir(),
            args.rounds,
            args.requests,
            &args.setups,
        ),
        "collector" => collector(args.events, &args.stores),
        other => bail!("unknown benchmark `{other}` (available: probe, collector)"),
    }
}

/// What every round shares: two nginx instances (one in the watched cgroup, one in another) and
/// a member of the watched cgroup, all started once.
struct Bench {
    bins: PathBuf,
    dir: PathBuf,
    requests: u64,
    /// A cgroup with no process: the idle probe's only rule.
    idle_cgroup: PathBuf,
    watched_cgroup: PathBuf,
    /// Where the two nginx run (their CPU is read from `cpu.stat`).
    nginx_cgroups: [PathBuf; 2],
    /// A `sleep` in the watched cgroup.
    member_pid: u32,
    watched_port: u16,
    unwatched_port: u16,
    unwatched_master: u32,
    /// The watched nginx's HTTPS port.
    tls_port: u16,
}

impl Bench {
    /// The probe's cohort rule, none without a probe.
    fn rule(&self, setup: Setup) -> Option<String> {
        let cgroup = |p: &Path| format!("canary=cgroup:{}", p.display());
        match setup {
            Setup::NoProbe | Setup::TlsNoProbe => None,
            Setup::Idle => Some(cgroup(&self.idle_cgroup)),
            Setup::CgroupUntagged
            | Setup::CgroupTagged
            | Setup::TlsTagged
            | Setup::CgroupRecording => Some(cgroup(&self.watched_cgroup)),
            Setup::SyscallUntagged => Some(format!("canary=pid:{}", self.member_pid)),
            Setup::SyscallTagged => Some(format!("canary=pid:{}", self.unwatched_master)),
        }
    }

    /// The nginx loaded: the one in the watched cgroup only for the tagged cgroup path.
    fn port(&self, setup: Setup) -> u16 {
        match setup {
            Setup::CgroupTagged | Setup::CgroupRecording => self.watched_port,
            Setup::TlsNoProbe | Setup::TlsTagged => self.tls_port,
            _ => self.unwatched_port,
        }
    }
}

fn probe(bins: &Path, rounds: usize, requests: u64, only: &[String]) -> Result<()> {
    for name in only {
        ensure!(
            SETUPS.iter().any(|s| s.name() == name),
            "unknown setup {name:?} (setups: {:?})",
            SETUPS.map(Setup::name)
        );
    }
    // A setup's base is always measured with it: its Δ and x columns need it.
    let chosen: Vec<Setup> = SETUPS
        .into_iter()
        .filter(|s| {
            only.is_empty()
                || only.iter().any(|n| {
                    n == s.name() || SETUPS.iter().any(|o| o.name() == n && o.base() == *s)
                })
        })
        .collect();
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "the benchmark loads eBPF programs: run it as root"
    );
    ensure!(rounds > 0 && requests > 0, "needs rounds and requests");
    ensure!(
        Command::new("ab")
            .arg("-V")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success()),
        "`ab` not found: install apache2-utils (`cargo xtask bootstrap` does)"
    );
    let started = Instant::now();
    let dir = PathBuf::from("/tmp/bakeoff-bench");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // Declared before the processes in them: removed after those are killed.
    let _parent = Cgroup::create("bakeoff-bench")?;
    let idle = Cgroup::create("bakeoff-bench/idle")?;
    let watched = Cgroup::create("bakeoff-bench/watched")?;
    let unwatched = Cgroup::create("bakeoff-bench/unwatched")?;
    let _bpf_stats = BpfStats::off()?;

    let member = Guard::shell(
        "sleep",
        &format!("{}sleep 86400", watched.exec_prefix()),
        &[],
    )?;
    wait_for(
        "sleep in the watched cgroup",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(watched.path().join("cgroup.procs"))
                .is_ok_and(|p| p.lines().any(|l| l.trim() == member.pid().to_string()))
        },
    )?;
    // A socket belongs to the cgroup its creator was in: each nginx starts in its cgroup.
    let (_nginx_watched, watched_port, tls_port) = nginx(&dir.join("watched"), &watched, true)?;
    let (nginx_unwatched, unwatched_port, _) = nginx(&dir.join("unwatched"), &unwatched, false)?;
    let bench = Bench {
        bins: bins.to_path_buf(),
        dir: dir.clone(),
        requests,
        idle_cgroup: idle.path().to_path_buf(),
        watched_cgroup: watched.path().to_path_buf(),
        nginx_cgroups: [watched.path().to_path_buf(), unwatched.path().to_path_buf()],
        member_pid: member.pid(),
        watched_port,
        unwatched_port,
        unwatched_master: nginx_unwatched.pid(),
        tls_port,
    };

    // Unmeasured: the first load of a fresh nginx is slower.
    for (port, tls) in [
        (watched_port, false),
        (unwatched_port, false),
        (tls_port, true),
    ] {
        ab(&dir, port, tls, requests)?;
    }

    let mut rows: Vec<(Setup, Row)> = Vec::new();
    let mut repeated = 0;
    for round in 0..rounds {
        for setup in chosen.iter().copied() {
            let mut best: Option<Row> = None;
            for attempt in 1..=ATTEMPTS {
                if !wait_quiet()? {
                    eprintln!("host still busy after {QUIET_WAIT:?}: measuring anyway");
                }
                let row = measure(&bench, setup)
                    .with_context(|| format!("round {}, {}", round + 1, setup.name()))?;
                let others = other_probes();
                let noisy = row.other_us > NOISE_SHARE * row.cpu_us || others > 0;
                if noisy && attempt < ATTEMPTS {
                    repeated += 1;
                    eprintln!(
                        "round {}/{rounds} {:<23} other processes used {:.2} of {:.2} us/req, \
                         {others} other bakeoff-probe running: again",
                        round + 1,
                        setup.name(),
                        row.other_us,
                        row.cpu_us
                    );
                }
                if best.as_ref().is_none_or(|b| row.other_us < b.other_us) {
                    best = Some(row);
                }
                if !noisy {
                    break;
                }
            }
            let row = best.context("no measurement")?;
            eprintln!(
                "round {}/{rounds} {:<23} getppid {:.0} ns, write {:.0} ns, {:.2} us/req \
                 (other {:.2}), {:.0} req/s, p99 {:.0} us at {FIXED_RATE}/s, {:.2} events/req",
                round + 1,
                setup.name(),
                row.getppid_ns,
                row.write_ns,
                row.cpu_us,
                row.other_us,
                row.max_rps,
                row.fixed_p99_us,
                row.events_per_request,
            );
            rows.push((setup, row));
        }
    }
    report(&rows, rounds, requests, repeated, started.elapsed());
    Ok(())
}

/// nginx (master and two workers) answering every request with a BODY_BYTES body, started in
/// `cgroup`, also over HTTPS (a throw-away certificate) with `tls`; returns once it answered one
/// request, with its HTTP and HTTPS ports.
fn nginx(dir: &Path, cgroup: &Cgroup, tls: bool) -> Result<(Guard, u16, u16)> {
    std::fs::create_dir_all(dir)?;
    let port = free_port();
    let tls_port = free_port();
    let body = "x".repeat(BODY_BYTES as usize - 1);
    let https = if tls {
        let pki = bakeoff_testkit::tls::Pki::create(dir)?;
        format!(
            "server {{ listen 127.0.0.1:{tls_port} ssl; ssl_certificate {}; \
             ssl_certificate_key {}; location / {{ return 200 \"{body}\\n\"; }} }}\n",
            pki.server_cert.display(),
            pki.server_key.display()
        )
    } else {
        String::new()
    };
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "daemon off; master_process on; worker_processes 2; user root; pid {d}/nginx.pid;\n\
             error_log {d}/error.log warn; events {{ worker_connections 1024; }}\n\
             http {{ access_log off; client_body_temp_path {d}/body; keepalive_requests 1000000;\n\
             default_type text/plain;\n\
             server {{ listen 127.0.0.1:{port}; location / {{ return 200 \"{body}\\n\"; }} }}\n\
             {https} }}\n",
            d = dir.display(),
        ),
    )?;
    let guard = Guard::shell(
        "nginx",
        &format!(
            "{}/usr/sbin/nginx -c {d}/nginx.conf -p {d}",
            cgroup.exec_prefix(),
            d = dir.display()
        ),
        &[],
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    let response = Conn::connect(port)?.request(&Request::get("/", "bench-check"))?;
    ensure!(
        response.status == 200 && response.body_len == BODY_BYTES,
        "nginx answered {response:?}"
    );
    Ok((guard, port, tls_port))
}

/// `kernel.bpf_stats_enabled`: off (it adds two clock reads to every BPF program run) except
/// while the probe's BPF time is measured; restored on drop.
struct BpfStats {
    before: String,
}

impl BpfStats {
    const SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn off() -> Result<Self> {
        let before = std::fs::read_to_string(Self::SYSCTL).context("read bpf_stats_enabled")?;
        Self::set(false)?;
        Ok(Self { before })
    }

    fn set(on: bool) -> Result<()> {
        std::fs::write(Self::SYSCTL, if on { "1" } else { "0" }).context("set bpf_stats_enabled")
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::SYSCTL, self.before.trim());
    }
}

fn measure(b: &Bench, setup: Setup) -> Result<Row> {
    let stats = b.dir.join("stats.json");
    let ready = b.dir.join("ready");
    let events = b.dir.join("events.jsonl");
    for f in [&stats, &ready, &events] {
        let _ = std::fs::remove_file(f);
    }
    let mut probe = match b.rule(setup) {
        None => None,
        Some(rule) => {
            let mut p = Guard::spawn(
                "bakeoff-probe",
                Command::new(b.bins.join("bakeoff-probe"))
                    .arg("--cohort")
                    .arg(rule)
                    .args(if setup == Setup::TlsTagged {
                        &["--tls-plaintext"][..]
                    } else {
                        &[]
                    })
                    .args(if setup == Setup::CgroupRecording {
                        vec![
                            "--capture-cohort".to_string(),
                            "canary".to_string(),
                            "--capture-file".to_string(),
                            b.dir.join("bench.bkcap").display().to_string(),
                        ]
                    } else {
                        Vec::new()
                    })
                    .arg("--output")
                    .arg(&events)
                    .arg("--ready-file")
                    .arg(&ready)
                    .arg("--stats-file")
                    .arg(&stats)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null()),
            )?;
            wait_for("probe ready", Duration::from_secs(60), || {
                ready.exists() || !matches!(p.child.try_wait(), Ok(None))
            })?;
            ensure!(
                matches!(p.child.try_wait(), Ok(None)),
                "the probe exited before it was ready"
            );
            Some(p)
        }
    };
    let probe_pid = probe.as_ref().map(Guard::pid);

    let mut row = Row {
        getppid_ns: syscall_ns(|| unsafe {
            libc::getppid();
        }),
        ..Row::default()
    };
    let devnull = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&devnull);
    let buf = [b'x'; WRITE_BYTES];
    row.write_ns = syscall_ns(|| unsafe {
        libc::write(fd, buf.as_ptr().cast(), WRITE_BYTES);
    });

    let port = b.port(setup);
    let n = b.requests as f64;
    let before = CpuSnapshot::take(&b.nginx_cgroups, probe_pid)?;
    row.max_rps = ab(&b.dir, port, setup.tls(), b.requests)?;
    let after = CpuSnapshot::take(&b.nginx_cgroups, probe_pid)?;
    row.cpu_us = (after.machine_us - before.machine_us) / n;
    let known = after.known_us() - before.known_us();
    row.other_us = (after.machine_us - before.machine_us - known) / n;
    row.probe_cpu_us = (after.probe_us - before.probe_us) / n;

    // The fixed-rate client speaks plain HTTP only: HTTPS rows have no latency columns.
    BpfStats::set(true)?;
    let fixed = if setup.tls() {
        Ok((f64::NAN, f64::NAN, 0))
    } else {
        fixed_rate(port)
    };
    BpfStats::set(false)?;
    let (p50, p99, fixed_n) = fixed?;
    row.fixed_p50_us = p50;
    row.fixed_p99_us = p99;

    if let Some(p) = probe.as_mut() {
        row.probe_rss_kb = proc_usage(p.pid())?.1 as f64;
        p.stop(Duration::from_secs(30))?;
        let s: serde_json::Value = serde_json::from_slice(
            &std::fs::read(&stats).context("the probe wrote no stats file")?,
        )?;
        row.events_per_request =
            s["pipeline"]["events"].as_f64().unwrap_or(0.0) / (n + fixed_n as f64);
        row.drops = s["kernel_drops"]
            .as_object()
            .map(|o| o.values().filter_map(|v| v.as_f64()).sum())
            .unwrap_or(0.0);
        // Counted only while the fixed-rate load ran (bpf_stats_enabled).
        let programs = |field: &str| -> f64 {
            s["programs"]
                .as_object()
                .map(|o| o.values().filter_map(|v| v[field].as_f64()).sum())
                .unwrap_or(0.0)
                / fixed_n.max(1) as f64
        };
        row.bpf_ns = programs("run_time_ns");
        row.bpf_runs = programs("run_count");
    }
    let _ = std::fs::remove_file(&events);
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

/// CPU used so far, in us: the whole machine, and the processes of the load.
struct CpuSnapshot {
    /// user + nice + system + irq + softirq of /proc/stat's `cpu` line.
    machine_us: f64,
    /// Both nginx (their cgroups' `cpu.stat`).
    nginx_us: f64,
    /// This benchmark and its exited children (`ab`), from getrusage.
    bench_us: f64,
    probe_us: f64,
}

impl CpuSnapshot {
    fn take(nginx_cgroups: &[PathBuf], probe: Option<u32>) -> Result<Self> {
        let machine_us = machine_us()?;
        let mut nginx_us = 0.0;
        for cgroup in nginx_cgroups {
            let stat = std::fs::read_to_string(cgroup.join("cpu.stat"))?;
            nginx_us += stat
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .context("no usage_usec in cpu.stat")?;
        }
        let rusage_us = |who| {
            let mut r: libc::rusage = unsafe { std::mem::zeroed() };
            unsafe { libc::getrusage(who, &mut r) };
            let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
            us(r.ru_utime) + us(r.ru_stime)
        };
        Ok(Self {
            machine_us,
            nginx_us,
            bench_us: rusage_us(libc::RUSAGE_SELF) + rusage_us(libc::RUSAGE_CHILDREN),
            probe_us: probe.map_or(Ok(0.0), task_cpu_us)?,
        })
    }

    fn known_us(&self) -> f64 {
        self.nginx_us + self.bench_us + self.probe_us
    }
}

/// Busy CPU of the whole machine so far, in us: user + nice + system + irq + softirq of
/// /proc/stat's `cpu` line (in USER_HZ ticks).
fn machine_us() -> Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let jiffies: Vec<u64> = stat
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("cpu "))
        .context("no cpu line in /proc/stat")?
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect();
    ensure!(jiffies.len() >= 7, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq ...
    let busy: u64 = [0, 1, 2, 5, 6].iter().map(|&i| jiffies[i]).sum();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(busy as f64 * 1e6 / hz)
}

/// Waits (bounded) until the host is quiet: no other bakeoff-probe running (its hooks would
/// tax every process), under a tenth of a core busy over half a second. Returns whether it was.
fn wait_quiet() -> Result<bool> {
    let deadline = Instant::now() + QUIET_WAIT;
    loop {
        let before = machine_us()?;
        std::thread::sleep(Duration::from_millis(500));
        if machine_us()? - before < 0.1 * 500_000.0 && other_probes() == 0 {
            return Ok(true);
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// bakeoff-probe processes running (this benchmark's own is stopped when this is asked).
fn other_probes() -> usize {
    std::fs::read_dir("/proc").map_or(0, |d| {
        d.filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm"))
                    .is_ok_and(|c| c.trim() == "bakeoff-probe")
            })
            .count()
    })
}

/// CPU time of a running process's threads, in us (schedstat: ns, not 10 ms ticks).
fn task_cpu_us(pid: u32) -> Result<f64> {
    let mut ns = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let stat = std::fs::read_to_string(task?.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    }
    Ok(ns / 1e3)
}

/// `ab -k -c 16 -n <requests>` against nginx, bounded in time; checks every request completed
/// over keep-alive with a BODY_BYTES body; returns requests per second.
fn ab(dir: &Path, port: u16, tls: bool, requests: u64) -> Result<f64> {
    let (out, err) = (dir.join("ab.out"), dir.join("ab.err"));
    let mut guard = Guard::spawn(
        "ab",
        Command::new("ab")
            // -t before -n: -t alone implies 50 000 requests.
            .args(["-q", "-k", "-s", "10", "-t", &AB_TIME_LIMIT_S.to_string()])
            .args([
                "-c",
                &AB_CONCURRENCY.to_string(),
                "-n",
                &requests.to_string(),
            ])
            .arg(format!(
                "{}://127.0.0.1:{port}/",
                if tls { "https" } else { "http" }
            ))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out)?)
            .stderr(std::fs::File::create(&err)?),
    )?;
    let deadline = Instant::now() + Duration::from_secs(AB_TIME_LIMIT_S + 30);
    let status = loop {
        if let Some(status) = guard.child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("ab did not finish within {} s", AB_TIME_LIMIT_S + 30);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let text = std::fs::read_to_string(&out)? + &std::fs::read_to_string(&err)?;
    ensure!(status.success(), "ab failed ({status}):\n{text}");
    let num = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
    };
    let n = requests as f64;
    let complete = num("Complete requests:").unwrap_or(0.0);
    let failed = num("Failed requests:").unwrap_or(f64::NAN);
    let not_2xx = num("Non-2xx responses:").unwrap_or(0.0);
    ensure!(
        complete == n && failed == 0.0 && not_2xx == 0.0,
        "ab: {complete} of {n} requests complete, {failed} failed, {not_2xx} not 2xx \
         (time limit {AB_TIME_LIMIT_S} s):\n{text}"
    );
    ensure!(
        num("Keep-Alive requests:") == Some(n),
        "ab: not every request used keep-alive:\n{text}"
    );
    ensure!(
        num("Document Length:") == Some(BODY_BYTES as f64),
        "ab: unexpected body length:\n{text}"
    );
    num("Requests per second:").with_context(|| format!("no Requests per second from ab:\n{text}"))
}

/// A fixed offered rate over four keep-alive connections; latency is measured from each
/// request's scheduled time, so a stall is not hidden (no coordinated omission). Returns
/// (p50 us, p99 us, requests).
fn fixed_rate(port: u16) -> Result<(f64, f64, u64)> {
    const CONNS: u64 = 4;
    let per_conn = FIXED_RATE / CONNS;
    let interval = Duration::from_nanos(1_000_000_000 / per_conn);
    let total = per_conn * FIXED_SECONDS;
    let time_limit = Duration::from_secs(FIXED_SECONDS * 5);
    let threads: Vec<_> = (0..CONNS)
        .map(|c| {
            std::thread::spawn(move || -> Result<Vec<u64>> {
                let mut conn = Conn::connect(port)?;
                let start = Instant::now();
                let mut lat = Vec::with_capacity(total as usize);
                for i in 0..total {
                    if start.elapsed() > time_limit {
                        bail!("fixed-rate load still running after {time_limit:?}");
                    }
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

fn report(rows: &[(Setup, Row)], rounds: usize, requests: u64, repeated: usize, took: Duration) {
    let of = |s: Setup, f: fn(&Row) -> f64| {
        median(
            rows.iter()
                .filter(|(x, _)| *x == s)
                .map(|(_, r)| f(r))
                .collect(),
        )
    };
    println!(
        "\nbakeoff probe benchmark: medians of {rounds} interleaved rounds, {} cores, {:.0} s\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        took.as_secs_f64()
    );
    println!(
        "{:<23} {:>10} {:>8} {:>10} {:>8} {:>6} {:>8} {:>6} {:>8} {:>8}",
        "setup",
        "getppid_ns",
        "write_ns",
        "cpu_us/req",
        "Δcpu_us",
        "cpu_x",
        "max_rps",
        "rps_x",
        "2k_p50us",
        "2k_p99us"
    );
    let measured = |s: &Setup| rows.iter().any(|(x, _)| x == s);
    for s in SETUPS.into_iter().filter(measured) {
        let (base_cpu, base_rps) = (of(s.base(), |r| r.cpu_us), of(s.base(), |r| r.max_rps));
        let (cpu, rps) = (of(s, |r| r.cpu_us), of(s, |r| r.max_rps));
        println!(
            "{:<23} {:>10.0} {:>8.0} {:>10.2} {:>+8.2} {:>6.2} {:>8.0} {:>6.2} {:>8.0} {:>8.0}",
            s.name(),
            of(s, |r| r.getppid_ns),
            of(s, |r| r.write_ns),
            cpu,
            cpu - base_cpu,
            cpu / base_cpu,
            rps,
            rps / base_rps,
            of(s, |r| r.fixed_p50_us),
            of(s, |r| r.fixed_p99_us),
        );
    }
    println!(
        "\n{:<23} {:>16} {:>7} {:>10} {:>6} {:>10} {:>12}",
        "setup", "probe_cpu_us/req", "rss_MiB", "events/req", "drops", "bpf_ns/req", "bpf_runs/req"
    );
    for s in SETUPS
        .into_iter()
        .filter(|s| *s != s.base())
        .filter(measured)
    {
        println!(
            "{:<23} {:>16.2} {:>7.1} {:>10.2} {:>6.0} {:>10.0} {:>12.1}",
            s.name(),
            of(s, |r| r.probe_cpu_us),
            of(s, |r| r.probe_rss_kb) / 1024.0,
            of(s, |r| r.events_per_request),
            of(s, |r| r.drops),
            of(s, |r| r.bpf_ns),
            of(s, |r| r.bpf_runs),
        );
    }
    let other: Vec<f64> = rows.iter().map(|(_, r)| r.other_us).collect();
    let other_max = other.iter().copied().fold(f64::NAN, f64::max);
    let legend = [
        "setups: idle: --cohort canary=cgroup:<empty cgroup>. cgroup path: canary=cgroup:<cgroup of a \
         sleep and an\n  nginx>; tagged loads that nginx, untagged another one started in an unwatched \
         cgroup. syscall path:\n  canary=pid:<the sleep> (untagged) or pid:<the other nginx's master> \
         (tagged), loading the other nginx.\n  https: the cgroup path's nginx over TLS (libssl), \
         no probe or canary=cgroup:<its cgroup> (TLS uprobes);\n  its Δ and x are against https, no probe."
            .to_string(),
        format!(
            "getppid_ns, write_ns: per call in this (never watched) process, best of 5 x 200k calls \
             (write: {WRITE_BYTES} B\n  to /dev/null). cpu_us/req: whole-machine CPU (/proc/stat \
             user+nice+system+irq+softirq: ab, nginx,\n  kernel, probe) per request over \
             `ab -k -c {AB_CONCURRENCY} -n {requests}` (nginx: 2 workers, {BODY_BYTES} B bodies); \
             max_rps: its\n  rate; Δ, x: vs no probe. 2k_p50us, 2k_p99us: latency at {FIXED_RATE} \
             req/s over 4 keep-alive connections\n  for {FIXED_SECONDS} s, from each request's \
             scheduled time."
        ),
        "probe_cpu_us/req: the probe's threads over the ab run. events/req, drops: over both loads. \
         bpf_ns/req,\n  bpf_runs/req: its programs during the fixed-rate load (bpf_stats_enabled \
         only then)."
            .to_string(),
        format!(
            "foreign CPU (not ab, nginx, probe, bench) during the ab runs: median {:.2}, max {:.2} us/req \
             (included\n  above); {repeated} measurements with more than {:.0}% of it or another \
             bakeoff-probe running taken again.",
            median(other),
            other_max,
            NOISE_SHARE * 100.0
        ),
    ];
    println!("\n{}", legend.join("\n"));
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
fn collector(total: u64, stores: &[String]) -> Result<()> {
    let dir = PathBuf::from("/tmp/bakeoff-bench-collector");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut runs = Vec::new();
    for store in stores {
        let run = match store.as_str() {
            "duckdb" => {
                let collector = bakeoff_testkit::collector::Collector::start(&dir)?;
                collector_run(&collector, None, total)?
            }
            "clickhouse" => {
                let server = bakeoff_testkit::clickhouse::ClickHouse::start(&dir)?;
                let collector = bakeoff_testkit::collector::Collector::start_with(
                    &dir,
                    bakeoff_testkit::process::free_port(),
                    bakeoff_testkit::process::free_port(),
                    &["--clickhouse".into(), server.url()],
                )?;
                collector_run(&collector, Some(server.guard.pid()), total)?
            }
            other => bail!("unknown store `{other}` (available: duckdb, clickhouse)"),
        };
        runs.push((store.as_str(), run));
    }
    println!(
        "\nbakeoff collector benchmark ({cores} cores shared by load generator, collector and store; \
         {STREAMS} concurrent probe streams, batches of {BATCH})\n"
    );
    println!(
        "{:<12} {:>10} {:>9} {:>11} {:>15} {:>8} {:>12} {:>11} {:>7} {:>14} {:>16} {:>12} {:>6}",
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
        "judged_events",
        "late"
    );
    for (name, r) in runs {
        println!(
            "{:<12} {:>10} {:>9.1} {:>11.0} {:>15.0} {:>8.1} {:>12.0} {:>11} {:>7} {:>14.3} {:>16} {:>12} {:>6}",
            name,
            r.events,
            r.ingest_s,
            r.events as f64 / r.ingest_s,
            r.events as f64 / r.ingest_s / cores as f64,
            r.cpu_s,
            r.events as f64 / r.cpu_s,
            format!("{:.2}/{:.2}", r.group_s, r.group_again_s),
            r.groups,
            r.verdict_s,
            format!("{:.3}/{:.3}", r.during_median_s, r.during_max_s),
            r.judged,
            r.late
        );
    }
    println!(
        "\nevents/s/core: events/s over all cores, load generator included. cpu_s: CPU seconds (user +\n\
         system) of the collector, and of clickhouse-server, while ingesting; events/cpu_s: the\n\
         ingest rate per core they fully use (the load generator's CPU left out).\n\
         group_by_s: GET /api/v1/groups?by=cohort,path (count, errors, p50/p90/p99) over all events,\n\
         first/second read.\n\
         verdict_read_s: GET /api/v1/verdict once the judge covers every event (median of 5), over\n\
         judged_events spread over an hour (50 endpoints, 10% canary); during_ingest_s: median/max\n\
         of verdict reads every 250 ms while ingesting (ingest_s includes them). late: events stored\n\
         after the judge had read their second (left out of the verdict)."
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct CollectorRun {
    events: u64,
    ingest_s: f64,
    cpu_s: f64,
    group_s: f64,
    group_again_s: f64,
    groups: usize,
    verdict_s: f64,
    during_median_s: f64,
    during_max_s: f64,
    judged: u64,
    late: u64,
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
    // Stored after the judge had read their second: left out of the verdict.
    let late = collector.get("/api/v1/ingest")?["events_late"]
        .as_u64()
        .unwrap_or(0);
    let t = Instant::now();
    let groups = collector.get("/api/v1/groups?by=cohort,path")?;
    let group_s = t.elapsed().as_secs_f64();
    // Again: the first read decompresses the columns from the file, the second finds them in
    // DuckDB's buffer pool.
    let t = Instant::now();
    collector.get("/api/v1/groups?by=cohort,path")?;
    let group_again_s = t.elapsed().as_secs_f64();
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
        group_again_s,
        groups: groups.as_array().map_or(0, Vec::len),
        verdict_s,
        during_median_s,
        during_max_s,
        judged,
        late,
    })
}

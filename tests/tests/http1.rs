//! End to end on the real kernel: two cohorts (nginx from Debian as baseline, the test server
//! with injected latency as canary) and an untagged server; a known set of requests with unique
//! ids; every request must yield exactly one event with the right fields and exact byte counts.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_probe::event::RequestEvent;
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request, Response},
    process::{Guard, bin, free_port, wait_for, wait_for_port},
};

/// What one request should become.
#[derive(Debug)]
struct Sent {
    cohort: Option<&'static str>,
    request: Request,
    response: Response,
}

const CANARY_DELAY_MS: u64 = 40;
/// Above four pipelined requests (~340 bytes), below every body (3 to 20 KB) and chunk (700).
const PREFIX: u32 = 512;

fn nginx_conf(dir: &Path, port: u16) -> String {
    format!(
        r#"daemon off;
master_process on;
worker_processes 2;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    sendfile on;
    keepalive_requests 1000;
    server {{
        listen 127.0.0.1:{port};
        root {dir}/www;
        location = / {{ return 200 "hello\n"; }}
        location = /status/404 {{ return 404; }}
        location = /echo {{ client_body_buffer_size 64k; return 200 "echo\n"; }}
    }}
}}
"#,
        dir = dir.display()
    )
}

/// The request plan for one server: keep-alive, fresh connections, pipelining, a large body,
/// request bodies (plain and chunked), chunked responses where the server makes them.
fn exercise(
    port: u16,
    id: &str,
    cohort: Option<&'static str>,
    big_path: &str,
    chunked_path: Option<&str>,
    sent: &mut Vec<Sent>,
) -> Result<()> {
    let mut n = 0;
    let mut next_id = || {
        n += 1;
        format!("{id}-{n}")
    };
    let mut record = |request: Request, response: Response| {
        sent.push(Sent {
            cohort,
            request,
            response,
        })
    };
    // Keep-alive: ten requests and a 404 on one connection.
    let mut conn = Conn::connect(port)?;
    for _ in 0..10 {
        let r = Request::get("/", &next_id());
        let resp = conn.request(&r)?;
        record(r, resp);
    }
    let r = Request::get("/status/404", &next_id());
    let resp = conn.request(&r)?;
    record(r, resp);
    // Fresh connections.
    for _ in 0..5 {
        let r = Request::get("/", &next_id());
        let resp = Conn::connect(port)?.request(&r)?;
        record(r, resp);
    }
    // Pipelined: four requests in one write.
    let reqs: Vec<Request> = (0..4).map(|_| Request::get("/", &next_id())).collect();
    let resps = Conn::connect(port)?.pipeline(&reqs)?;
    for (r, resp) in reqs.into_iter().zip(resps) {
        record(r, resp);
    }
    // Bodies larger than the payload prefix, both ways.
    let mut conn = Conn::connect(port)?;
    for _ in 0..2 {
        let r = Request::get(big_path, &next_id());
        let resp = conn.request(&r)?;
        record(r, resp);
    }
    if let Some(path) = chunked_path {
        for _ in 0..2 {
            let r = Request::get(path, &next_id());
            let resp = conn.request(&r)?;
            record(r, resp);
        }
    }
    let r = Request::post("/echo", &next_id(), vec![b'p'; 3000]);
    let resp = conn.request(&r)?;
    record(r, resp);
    let mut r = Request::post("/echo", &next_id(), vec![b'q'; 3000]);
    r.chunked = Some(500);
    let resp = conn.request(&r)?;
    record(r, resp);
    Ok(())
}

fn read_events(path: &Path) -> Result<Vec<RequestEvent>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad event line {l}")))
        .collect()
}

fn log_has_pid(log: &Path, pid: u32) -> bool {
    std::fs::read_to_string(log)
        .map(|t| t.contains(&format!("pid={pid} ")))
        .unwrap_or(false)
}

fn children(pid: u32) -> Vec<u32> {
    bakeoff_probe::cohort::proc::children_of(pid)
}

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v[v.len() / 2]
}

/// The canary (named by cgroup) on the cgroup_skb path, the baseline (named by environment) on
/// the syscall path: both in one probe.
#[test]
fn every_request_becomes_one_exact_event_cgroup_path() -> Result<()> {
    every_request_of_both_cohorts_becomes_one_exact_event("auto")
}

/// Every cohort on the syscall path: the same expectations.
#[test]
fn every_request_becomes_one_exact_event_syscall_path() -> Result<()> {
    every_request_of_both_cohorts_becomes_one_exact_event("syscall")
}

fn every_request_of_both_cohorts_becomes_one_exact_event(data_path: &str) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    let dir = PathBuf::from(format!(
        "/tmp/bakeoff-it-{data_path}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("www"))?;
    std::fs::write(dir.join("www/big.bin"), vec![b'z'; 20_000])?;
    let canary_cg = Cgroup::create(&format!("bakeoff-it-{data_path}-{}", std::process::id()))?;

    // Canary: started before the probe, in the canary cgroup.
    let canary_port = free_port();
    let server = bin("bakeoff-testserver")?;
    let _canary = Guard::shell(
        "canary test server",
        &format!(
            "{}{} --port {canary_port} --delay-ms {CANARY_DELAY_MS}",
            canary_cg.exec_prefix(),
            server.display()
        ),
        &[],
    )?;
    // Untagged: same binary, no cohort.
    let untagged_port = free_port();
    let _untagged = Guard::spawn(
        "untagged test server",
        Command::new(&server).args(["--port", &untagged_port.to_string()]),
    )?;
    wait_for_port(canary_port, Duration::from_secs(10))?;
    wait_for_port(untagged_port, Duration::from_secs(10))?;
    // A keep-alive connection opened before the probe: its first request is unseen (no event),
    // later ones must be seen through the connection seeded from /proc.
    let mut sent = Vec::new();
    let mut early = Conn::connect(canary_port)?;
    let r = Request::get("/", "early-0");
    let resp = early.request(&r)?;
    sent.push(Sent {
        cohort: None,
        request: r,
        response: resp,
    });

    // The probe.
    let out = dir.join("events.jsonl");
    let log = dir.join("probe.log");
    let ready = dir.join("ready");
    let stats = dir.join("stats.json");
    let mut probe = Guard::spawn(
        "bakeoff-probe",
        Command::new(bin("bakeoff-probe")?)
            .args(["--experiment", "it", "--data-path", data_path])
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", canary_cg.path().display()))
            // Unique per test: the two tests run at once, each probe must see only its nginx.
            .arg("--cohort")
            .arg(format!("baseline=env:BAKEOFF_COHORT=baseline-{data_path}"))
            .args(["--payload-prefix", &PREFIX.to_string()])
            .arg("--output")
            .arg(&out)
            .arg("--ready-file")
            .arg(&ready)
            .arg("--stats-file")
            .arg(&stats)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;

    // Baseline: nginx started after the probe, matched by its environment at exec; its workers
    // join by fork inheritance (nginx clears their environment).
    let nginx_port = free_port();
    std::fs::write(dir.join("nginx.conf"), nginx_conf(&dir, nginx_port))?;
    let _nginx = Guard::spawn(
        "nginx",
        Command::new("/usr/sbin/nginx")
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(&dir)
            .env("BAKEOFF_COHORT", format!("baseline-{data_path}"))
            .stdout(Stdio::null()),
    )?;
    wait_for_port(nginx_port, Duration::from_secs(10))?;
    // nginx listens before it writes its pid file.
    let pid_file = dir.join("nginx.pid");
    wait_for("nginx's pid file", Duration::from_secs(10), || {
        std::fs::read_to_string(&pid_file).is_ok_and(|t| t.trim().parse::<u32>().is_ok())
    })?;
    let master: u32 = std::fs::read_to_string(&pid_file)?.trim().parse()?;
    wait_for("two nginx workers", Duration::from_secs(10), || {
        children(master).len() >= 2
    })?;
    let workers = children(master);
    for pid in std::iter::once(master).chain(workers.iter().copied()) {
        wait_for(
            &format!("probe to watch nginx pid {pid}"),
            Duration::from_secs(10),
            || log_has_pid(&log, pid),
        )?;
    }

    let mut sent = Vec::new();
    exercise(
        nginx_port,
        "b",
        Some("baseline"),
        "/big.bin",
        None,
        &mut sent,
    )?;
    exercise(
        canary_port,
        "c",
        Some("canary"),
        "/bytes/20000",
        Some("/chunked/5000/700"),
        &mut sent,
    )?;
    exercise(untagged_port, "u", None, "/bytes/20000", None, &mut sent)?;

    // Let the last events through, then stop the probe cleanly.
    std::thread::sleep(Duration::from_millis(500));
    let status = probe.stop(Duration::from_secs(20))?;
    ensure!(
        status.success(),
        "probe exited with {status}: {}",
        std::fs::read_to_string(&log)?
    );

    let events = read_events(&out)?;
    let mut by_id: HashMap<String, Vec<&RequestEvent>> = HashMap::new();
    for e in &events {
        by_id
            .entry(e.request_id.clone().unwrap_or_default())
            .or_default()
            .push(e);
    }
    let mut expected = 0;
    for s in &sent {
        let id = &s.request.request_id;
        let got = by_id.remove(id).unwrap_or_default();
        let Some(cohort) = s.cohort else {
            ensure!(
                got.is_empty(),
                "untagged request {id} produced events: {got:?}"
            );
            continue;
        };
        expected += 1;
        ensure!(
            got.len() == 1,
            "request {id} produced {} events: {got:?}",
            got.len()
        );
        let e = got[0];
        ensure!(e.cohort == cohort, "{id}: cohort {} != {cohort}", e.cohort);
        ensure!(
            e.experiment == "it" && e.role == "server" && e.protocol == "http1",
            "{id}: {e:?}"
        );
        ensure!(e.method == s.request.method, "{id}: method {e:?}");
        ensure!(e.path == s.request.path, "{id}: path {e:?}");
        ensure!(
            e.status == Some(s.response.status),
            "{id}: status {e:?} vs {:?}",
            s.response
        );
        let sent_bytes = s.request.to_bytes().len() as u64;
        ensure!(
            e.bytes_in == sent_bytes,
            "{id}: bytes_in {} != {sent_bytes}",
            e.bytes_in
        );
        ensure!(
            e.bytes_out == s.response.bytes,
            "{id}: bytes_out {} != {}",
            e.bytes_out,
            s.response.bytes
        );
        ensure!(
            e.peer
                .as_deref()
                .is_some_and(|p| p.starts_with("127.0.0.1:")),
            "{id}: peer {e:?}"
        );
        if cohort == "baseline" {
            ensure!(
                workers.contains(&e.pid),
                "{id}: pid {} is not an nginx worker {workers:?}",
                e.pid
            );
            ensure!(e.exe.ends_with("nginx"), "{id}: exe {}", e.exe);
        } else {
            ensure!(e.exe.ends_with("bakeoff-testserver"), "{id}: exe {}", e.exe);
            ensure!(
                e.duration_ns >= CANARY_DELAY_MS * 1_000_000,
                "{id}: canary duration {} ns below the injected {CANARY_DELAY_MS} ms",
                e.duration_ns
            );
        }
    }
    ensure!(
        by_id.is_empty(),
        "events for requests never sent: {by_id:?}"
    );
    ensure!(
        events.len() == expected,
        "{} events for {expected} requests",
        events.len()
    );

    let base: Vec<u64> = events
        .iter()
        .filter(|e| e.cohort == "baseline")
        .map(|e| e.duration_ns)
        .collect();
    ensure!(
        median(base.clone()) < CANARY_DELAY_MS * 1_000_000 / 2,
        "baseline median {} ns is not well below the canary's injected delay",
        median(base)
    );
    let stats: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats)?)?;
    ensure!(
        stats["kernel_drops"]["ringbuf_full"] == 0,
        "ring buffer drops: {stats}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

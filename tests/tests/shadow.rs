//! Live shadowing on the real kernel: `bakeoff shadow` tees the requests of a cohort watched
//! by the probe (the live test server in a cgroup), through a capture streamed by the
//! collector, to a shadow test server, one of whose routes is slower and another of whose
//! bodies changed, and compares the answers with the live ones.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    collector::Collector,
    probe::ProbeRun,
    process::{bin, scratch_dir, wait_output},
};

/// Both servers add this to every answer, so that a route's own time dominates the round trip
/// that only the shadow's latency includes (the live one is the probe's server-side view).
const BASE_DELAY_MS: &str = "10";

#[test]
fn a_shadow_gets_the_cohorts_reads_as_they_happen_and_its_differences_are_found() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    let dir = scratch_dir("shadow")?;
    let collector_dir = dir.join("collector");
    std::fs::create_dir_all(&collector_dir)?;
    let cg = Cgroup::create(&format!("bakeoff-shadow-{}", std::process::id()))?;
    let (_live, live_port) = cg.spawn_test_server(&format!("--delay-ms {BASE_DELAY_MS}"))?;
    let (_shadow, shadow_port) = bakeoff_testkit::process::spawn_test_server(&[
        "--delay-ms",
        BASE_DELAY_MS,
        "--slow-path",
        "/bytes/",
        "--slow-ms",
        "20",
        "--change-body-path",
        "/api/catalog/",
    ])?;
    let collector = Collector::start(&collector_dir)?;
    let api = format!("http://127.0.0.1:{}", collector.http_port);
    let probe = ProbeRun::start(
        &dir,
        &[
            "--experiment".into(),
            "shadow".into(),
            "--cohort".into(),
            format!("live=cgroup:{}", cg.path().display()),
            "--collector".into(),
            collector.endpoint(),
            "--payload-prefix".into(),
            "4096".into(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = collector.get("/api/v1/captures")?;
        if list["probes"].as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        ensure!(Instant::now() < deadline, "no control channel: {list}");
        std::thread::sleep(Duration::from_millis(200));
    }

    let audit_log = dir.join("audit.log");
    let shadow = Command::new(bin("bakeoff")?)
        .args([
            "shadow",
            "--api",
            &api,
            "--experiment",
            "shadow",
            "--cohort",
        ])
        .args(["live", "--target", &format!("127.0.0.1:{shadow_port}")])
        .args(["--max-requests", "200", "--concurrency", "4", "--json"])
        .args(["--noise-json", "generated_at", "--audit-log"])
        .arg(&audit_log)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The probe confirmed the capture, and the shadow reads its stream (the collector records
    // the stream's reader in its audit log as it subscribes).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let list = collector.get("/api/v1/captures")?;
        let streaming = std::fs::read_to_string(collector_dir.join("audit.log"))
            .is_ok_and(|t| t.contains("capture.stream"));
        if list["captures"][0]["probes"][0]["confirmed"] == true && streaming {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "the capture was never confirmed and streamed: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(200));

    // Traffic on four keep-alive connections, round robin, until the shadow has seen its 200
    // requests and ends (bounded): 1 POST in 8.
    let mut conns = (0..4)
        .map(|_| Conn::connect(live_port))
        .collect::<Result<Vec<_>>>()?;
    let mut shadow = Some(shadow);
    let (mut sent, mut posts) = (0u64, 0u64);
    let started = Instant::now();
    while sent < 2000 && started.elapsed() < Duration::from_secs(30) {
        if let Some(child) = shadow.as_mut()
            && child.try_wait()?.is_some()
        {
            break;
        }
        let n = sent;
        let req = match n % 8 {
            0 | 3 => Request::get("/bytes/100", &format!("r{n}")),
            1 | 4 => Request::get(&format!("/api/catalog/{}", n % 5 + 1), &format!("r{n}")),
            7 => {
                posts += 1;
                Request::post("/status/200", &format!("r{n}"), b"{}".to_vec())
            }
            _ => Request::get("/status/200", &format!("r{n}")),
        };
        let resp = conns[(n % 4) as usize].request(&req)?;
        ensure!(
            resp.status == 200,
            "the live service answered {}",
            resp.status
        );
        sent += 1;
    }
    drop(conns);
    let out = wait_output(
        shadow.take().ok_or_else(|| anyhow::anyhow!("no shadow"))?,
        Duration::from_secs(60),
    )?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| {
        anyhow::anyhow!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let what = format!(
        "sent {sent} ({posts} POST), exit {:?}: {json:#}\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    let count = |k: &str| json["counts"][k].as_u64().unwrap_or(u64::MAX);
    let (requests, teed, writes, overload) = (
        count("requests"),
        count("teed"),
        count("writes_skipped"),
        count("overload_skipped"),
    );
    // Every captured request accounted for, and what was captured was sent.
    ensure!(
        requests == teed + writes + overload && (180..=sent).contains(&requests),
        "{what}"
    );
    // Teeing works: most requests reached the shadow and were paired with their live answer.
    ensure!(
        teed >= 150 && json["compared"].as_u64() == Some(teed - count("unpaired")),
        "{what}"
    );
    ensure!(
        json["compared"].as_u64().is_some_and(|c| c >= 150),
        "{what}"
    );
    ensure!(writes > 0 && writes <= posts, "{what}");
    let endpoints = json["comparison"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let endpoint = |name: &str| endpoints.iter().find(|e| e["endpoint"] == name).cloned();
    ensure!(
        endpoints.iter().all(|e| e["endpoint"]
            .as_str()
            .is_some_and(|n| n.starts_with("GET "))),
        "a write was compared: {what}"
    );
    let bytes = endpoint("GET /bytes/:id").unwrap_or_default();
    ensure!(
        bytes["latency"] == "slower" && bytes["body_diffs"] == 0 && bytes["errors"] == 0,
        "/bytes: {what}"
    );
    let catalog = endpoint("GET /api/catalog/:id").unwrap_or_default();
    ensure!(
        catalog["body_diffs"].as_u64().is_some_and(|n| n > 0)
            && catalog["example"]["fields"]
                .as_array()
                .is_some_and(|f| f.iter().all(|f| f.as_str() != Some("generated_at"))),
        "/api/catalog: {what}"
    );
    let status = endpoint("GET /status/:id").unwrap_or_default();
    ensure!(
        status["latency"] == "no difference shown"
            && status["requests"].as_u64().is_some_and(|n| n > 0)
            && status["status_diffs"] == 0
            && status["header_diffs"] == 0
            && status["body_diffs"] == 0
            && status["errors"] == 0,
        "/status: {what}"
    );
    ensure!(out.status.code() == Some(1), "{what}");
    // Recorded before it started.
    let audit = Command::new(bin("bakeoff")?)
        .args(["audit", "--json", "--log"])
        .arg(&audit_log)
        .output()?;
    let audit_text = String::from_utf8_lossy(&audit.stdout);
    ensure!(
        audit.status.success() && audit_text.contains("shadow.start"),
        "audit: {audit_text}{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    drop(probe.stop()?);
    drop(collector);
    Ok(())
}

//! Harm the location metric does not see, judged end to end on the real kernel. Four copies of
//! the test server in four cgroups, one experiment, one probe, one collector, default judge:
//!
//! - `baseline`: ~1 ms per request;
//! - `tail`: the same, but the 10% of requests sent by `legacy-sdk/1.0` take 22 ms more. The
//!   median does not move; p99 does. It must FAIL on a tail metric (`p99 *`), and the drill-down
//!   of that metric must put `user_agent=legacy-sdk/1.0` first;
//! - `resets`: the same, but every 50th request (2%) is answered with a TCP reset (SO_LINGER 0,
//!   close) and no response. The client reconnects and goes on. It must FAIL on `errors`, with
//!   exactly as many canary errors as resets the client saw, stored as requests without a status;
//! - `same`: identical to the baseline. No metric may FAIL.
//!
//! The collector judges closed seconds only (`--judge-lag` after a second ends), so each verdict
//! is polled (bounded) until it covers every stored request of its two cohorts before the
//! assertions.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Reconnecting, Request},
    collector::Collector,
    process::{Guard, bin, free_port, wait_for, wait_for_port},
};
use serde_json::Value;

const EXPERIMENT: &str = "harm-it";
/// Requests per cohort.
const N: usize = 3000;
/// Every RESET_EVERY-th request to the `resets` server is reset.
const RESET_EVERY: usize = 50;
const LEGACY: &str = "legacy-sdk/1.0";

/// Requests stored per cohort (the group-by API).
fn stored(collector: &Collector) -> Result<BTreeMap<String, u64>> {
    let groups = collector.get(&format!("/api/v1/groups?experiment={EXPERIMENT}&by=cohort"))?;
    let mut out = BTreeMap::new();
    for g in groups.as_array().context("groups")? {
        let cohort = g["key"][0].as_str().context("cohort key")?.to_string();
        out.insert(cohort, g["requests"].as_u64().context("requests")?);
    }
    Ok(out)
}

/// The verdict for `canary`, once it covers every stored request of both cohorts (30 s at most).
fn settled_verdict(collector: &Collector, canary: &str, want: u64) -> Result<Value> {
    let url = format!("/api/v1/verdict?experiment={EXPERIMENT}&baseline=baseline&canary={canary}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = collector.get(&url)?;
        let judged = v["requests"]["canary"].as_u64().unwrap_or(0)
            + v["requests"]["baseline"].as_u64().unwrap_or(0);
        if judged == want {
            return Ok(v);
        }
        if Instant::now() > deadline {
            let ingest = collector.get("/api/v1/ingest").unwrap_or_default();
            bail!(
                "the verdict for `{canary}` covers {judged} of {want} stored requests after 30 s \
                 (ingest: {ingest}); decision {}, reasons {}",
                v["decision"],
                v["reasons"]
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn metrics(v: &Value) -> Result<&Vec<Value>> {
    v["metrics"].as_array().context("metrics")
}

/// `metric endpoint` of every failing metric.
fn failing(v: &Value) -> Result<Vec<String>> {
    Ok(metrics(v)?
        .iter()
        .filter(|m| m["decision"] == "fail")
        .map(|m| {
            format!(
                "{} {}",
                m["metric"].as_str().unwrap_or(""),
                m["endpoint"].as_str().unwrap_or("")
            )
        })
        .collect())
}

fn metric<'a>(v: &'a Value, name: &str, endpoint: &str) -> Result<&'a Value> {
    metrics(v)?
        .iter()
        .find(|m| m["metric"] == name && m["endpoint"] == endpoint)
        .with_context(|| format!("no metric `{name} {endpoint}` in {v:#}"))
}

fn show(canary: &str, v: &Value) {
    println!(
        "verdict {canary}: {} (score {}, requests {}, {} s)",
        v["decision"], v["score"], v["requests"], v["seconds"]
    );
    for r in v["reasons"].as_array().into_iter().flatten() {
        println!("  reason: {}", r.as_str().unwrap_or(""));
    }
    for m in v["metrics"].as_array().into_iter().flatten() {
        if m["endpoint"] == "*" || m["decision"] == "fail" {
            println!(
                "  [{}] {}",
                m["decision"].as_str().unwrap_or(""),
                m["summary"].as_str().unwrap_or("")
            );
            for d in m["drilldown"].as_array().into_iter().flatten() {
                println!(
                    "      drill {}={} bad_share {:.3} baseline_share {:.3} score {:.3} ({} bad)",
                    d["dimension"].as_str().unwrap_or(""),
                    d["value"].as_str().unwrap_or(""),
                    d["bad_share"].as_f64().unwrap_or(f64::NAN),
                    d["baseline_share"].as_f64().unwrap_or(f64::NAN),
                    d["score"].as_f64().unwrap_or(f64::NAN),
                    d["canary_bad"]
                );
            }
        }
    }
}

/// `server` (a copy of bakeoff-testserver) with `args` on a free port in `cg`, once it listens.
fn spawn_server(cg: &Cgroup, server: &Path, args: &str) -> Result<(Guard, u16)> {
    let port = free_port();
    let guard = Guard::shell(
        "test server",
        &format!(
            "{}{} --port {port} {args}",
            cg.exec_prefix(),
            server.display()
        ),
        &[],
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((guard, port))
}

fn status_of(collector: &Collector, path: &str) -> Result<u16> {
    let resp = ureq::get(&format!("http://127.0.0.1:{}{path}", collector.http_port))
        .config()
        .http_status_as_error(false)
        .build()
        .call()?;
    Ok(resp.status().as_u16())
}

#[test]
fn tail_latency_and_resets_fail_and_an_identical_canary_does_not() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let started = Instant::now();
    let pid = std::process::id();
    let dir = PathBuf::from(format!("/tmp/bakeoff-harm-{pid}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let names = ["baseline", "tail", "resets", "same"];
    let cgs = names
        .iter()
        .map(|n| Cgroup::create(&format!("bakeoff-harm-{n}-{pid}")))
        .collect::<Result<Vec<_>>>()?;
    // One copy of the server binary for all four: a concurrent rebuild replacing the original
    // between two starts would give the cohorts different `exe` values ("... (deleted)"), a
    // dimension the drill-down would then rank first.
    let server = dir.join("bakeoff-testserver");
    std::fs::copy(bin("bakeoff-testserver")?, &server)?;
    let (_b, bport) = spawn_server(&cgs[0], &server, "--delay-ms 1")?;
    // Slower by 22 ms for one client kind only, on every route.
    let (_t, tport) = spawn_server(
        &cgs[1],
        &server,
        &format!("--delay-ms 1 --slow-path / --slow-ms 22 --slow-agent {LEGACY}"),
    )?;
    let (_r, rport) = spawn_server(
        &cgs[2],
        &server,
        &format!("--delay-ms 1 --reset-every {RESET_EVERY}"),
    )?;
    let (_s, sport) = spawn_server(&cgs[3], &server, "--delay-ms 1")?;

    let collector = Collector::start_with(&dir, free_port(), free_port(), &[])?;
    let ready = dir.join("ready");
    let mut cmd = Command::new(bin("bakeoff-probe")?);
    cmd.args(["--experiment", EXPERIMENT, "--output", "none"]);
    for (name, cg) in names.iter().zip(&cgs) {
        cmd.arg("--cohort")
            .arg(format!("{name}=cgroup:{}", cg.path().display()));
    }
    let mut probe = Guard::spawn(
        "bakeoff-probe",
        cmd.args(["--collector", &collector.endpoint()])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;
    let setup = started.elapsed();

    // Interleaved load, bounded in count (N rounds, one request per server) and time (90 s).
    let mut conns = [
        Conn::connect(bport)?,
        Conn::connect(tport)?,
        Conn::connect(sport)?,
    ];
    let mut resets = Reconnecting::connect(rport)?;
    let mut legacy_sent = 0u64;
    let load = Instant::now();
    for i in 0..N {
        ensure!(
            load.elapsed() < Duration::from_secs(90),
            "load too slow: {i} of {N} rounds in 90 s"
        );
        let path = ["/", "/checkout", "/search?q=x"][i % 3];
        // One request in ten comes from the legacy SDK, on every route and to every cohort.
        let legacy = i % 10 == 0;
        legacy_sent += u64::from(legacy);
        let agent = if legacy { LEGACY } else { "web-app/2.4" };
        for (k, conn) in conns.iter_mut().enumerate() {
            let mut req = Request::get(path, &format!("h{k}-{i}"));
            req.user_agent = Some(agent.into());
            let resp = conn.request(&req)?;
            ensure!(resp.status == 200, "status {} from cohort {k}", resp.status);
        }
        let mut req = Request::get(path, &format!("hr-{i}"));
        req.user_agent = Some(agent.into());
        resets.request(&req)?;
    }
    let load_time = load.elapsed();
    let client_resets = resets.resets + resets.closed;
    println!(
        "load: {N} rounds in {load_time:.1?}; {legacy_sent} legacy requests per cohort; \
         resets cohort: {} resets, {} closed, {} connections",
        resets.resets, resets.closed, resets.connects
    );
    ensure!(
        client_resets == (N / RESET_EVERY) as u64,
        "the client saw {client_resets} resets for {N} requests, every {RESET_EVERY}th reset"
    );
    ensure!(
        resets.closed == 0,
        "{} requests ended with a FIN, not an RST",
        resets.closed
    );

    wait_for("events stored", Duration::from_secs(30), || {
        stored(&collector).is_ok_and(|s| names.iter().all(|n| s.get(*n).copied() == Some(N as u64)))
    })?;
    probe.stop(Duration::from_secs(30))?;
    let counts = stored(&collector)?;

    // Unknown names are 404s, not a verdict waiting for data.
    ensure!(
        status_of(
            &collector,
            "/api/v1/verdict?experiment=nope&baseline=baseline&canary=tail"
        )? == 404
    );
    ensure!(
        status_of(
            &collector,
            &format!("/api/v1/verdict?experiment={EXPERIMENT}&baseline=baseline&canary=nope")
        )? == 404
    );

    let verdicts: BTreeMap<&str, Value> = ["tail", "resets", "same"]
        .into_iter()
        .map(|c| {
            Ok((
                c,
                settled_verdict(&collector, c, counts[c] + counts["baseline"])?,
            ))
        })
        .collect::<Result<_>>()?;
    for (c, v) in &verdicts {
        show(c, v);
    }

    // 1. A slow tail: FAIL on p99 overall; the drill-down names the legacy SDK.
    let v = &verdicts["tail"];
    let failed = failing(v)?;
    ensure!(v["decision"] == "fail", "tail: {failed:?}\n{v:#}");
    ensure!(
        failed.iter().any(|f| f == "p99 *"),
        "tail: a tail metric (p99 *) must fail; failing: {failed:?}"
    );
    ensure!(
        !failed
            .iter()
            .any(|f| f.starts_with("errors") || f.starts_with("volume")),
        "tail: failing {failed:?}"
    );
    let p99 = metric(v, "p99", "*")?;
    let lower = p99["ratio_bounds"]["lower"].as_f64().unwrap_or(0.0);
    ensure!(lower > p99["limit"].as_f64().unwrap_or(f64::MAX), "{p99:#}");
    ensure!(p99["failed_at"].as_u64().is_some(), "{p99:#}");
    let top = &p99["drilldown"][0];
    ensure!(
        top["dimension"] == "user_agent"
            && top["value"] == LEGACY
            && top["bad_share"].as_f64().unwrap_or(0.0) > 0.8,
        "p99 drill-down: {:#}",
        p99["drilldown"]
    );
    // How early: the p99 bounds' timeline at the second that first showed harm.
    let at = p99["failed_at"].as_u64();
    let timeline = p99["timeline"].as_array().context("p99 timeline")?;
    if let Some(point) = timeline.iter().find(|p| p["unix_s"].as_u64() == at) {
        println!(
            "tail: p99 * failed after {} canary / {} baseline requests ({} s into the run)",
            point["canary_requests"],
            point["baseline_requests"],
            at.unwrap_or(0)
                .saturating_sub(timeline[0]["unix_s"].as_u64().unwrap_or(0))
        );
    }
    let latency = metric(v, "latency", "*")?;
    println!(
        "tail: failing {failed:?}; latency * is {} ({})",
        latency["decision"], latency["summary"]
    );

    // 2. Resets: FAIL on errors; each reset is one canary error, stored without a status.
    let v = &verdicts["resets"];
    let failed = failing(v)?;
    ensure!(v["decision"] == "fail", "resets: {failed:?}\n{v:#}");
    ensure!(
        failed.iter().any(|f| f == "errors *"),
        "resets: errors * must fail; failing: {failed:?}"
    );
    ensure!(
        failed.iter().all(|f| f.starts_with("errors")),
        "resets: only errors may fail; failing: {failed:?}"
    );
    let errors = metric(v, "errors", "*")?;
    let canary_errors = (errors["canary"].as_f64().context("canary error rate")?
        * errors["canary_requests"]
            .as_f64()
            .context("canary requests")?)
    .round() as u64;
    let baseline_rate = errors["baseline"].as_f64().context("baseline error rate")?;
    // Exact: the verdict covers every stored request (polled above) and every reset request
    // reached the server, so the probe saw it read and then the socket closed unanswered.
    ensure!(
        canary_errors == client_resets && baseline_rate == 0.0,
        "canary errors {canary_errors} (baseline rate {baseline_rate}) for {client_resets} resets: {errors:#}"
    );
    ensure!(
        errors["summary"]
            .as_str()
            .unwrap_or("")
            .contains(&format!("{client_resets} without response")),
        "{}",
        errors["summary"]
    );
    let top = &errors["drilldown"][0];
    ensure!(
        top["dimension"] == "status" && top["value"] == "none" && top["bad_share"] == 1.0,
        "errors drill-down: {:#}",
        errors["drilldown"]
    );
    // The raw events: requests without a response (status null), one per reset.
    let by_status = collector.get(&format!(
        "/api/v1/groups?experiment={EXPERIMENT}&by=cohort,status"
    ))?;
    let unanswered: BTreeMap<String, u64> = by_status
        .as_array()
        .context("groups")?
        .iter()
        .filter(|g| g["key"][1].is_null())
        .map(|g| {
            (
                g["key"][0].as_str().unwrap_or("").to_string(),
                g["requests"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        unanswered.get("resets") == Some(&client_resets) && unanswered.len() == 1,
        "requests without a status per cohort: {unanswered:?}"
    );
    let events = collector.get(&format!(
        "/api/v1/events?experiment={EXPERIMENT}&cohort=resets\
         &error=connection%20closed%20before%20the%20response&limit=1000"
    ))?;
    let events = events.as_array().context("events")?;
    ensure!(
        events.len() as u64 == client_resets && events.iter().all(|e| e["status"].is_null()),
        "{} unanswered events: {:?}",
        events.len(),
        events.first()
    );

    // 3. The identical canary: no metric fails.
    let v = &verdicts["same"];
    let failed = failing(v)?;
    ensure!(
        v["decision"] != "fail" && failed.is_empty(),
        "identical canary: {} failing {failed:?}\n{:#}",
        v["decision"],
        v["reasons"]
    );

    println!(
        "runtime: setup {setup:.1?}, load {load_time:.1?}, total {:.1?}",
        started.elapsed()
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! The verdict end to end on the real kernel: three copies of the test server in three cgroups
//! (baseline; a canary 5 ms slower on /checkout only; an identical canary), watched by the probe,
//! stored by the collector. The slow canary must FAIL naming /checkout, through the CLI (exit
//! code 1), the Argo-shaped JSON and the Flagger webhook (412); the identical one must not fail.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    collector::Collector,
    process::{Guard, bin, free_port, wait_for},
    webhook::WebhookReceiver,
};

fn cli_verdict(
    collector: &Collector,
    canary: &str,
    alpha: f64,
) -> Result<(i32, serde_json::Value)> {
    let out = Command::new(bin("bakeoff")?)
        .args(["verdict", "verdict-it", "--canary", canary, "--json"])
        .args(["--alpha", &alpha.to_string()])
        .args([
            "--api",
            &format!("http://127.0.0.1:{}", collector.http_port),
        ])
        .output()?;
    let code = out.status.code().context("killed")?;
    let json = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "bakeoff verdict printed no JSON: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((code, json))
}

fn flagger(collector: &Collector, canary: &str, alpha: f64) -> Result<u16> {
    let body = serde_json::json!({
        "name": "checkout",
        "namespace": "shop",
        "phase": "Progressing",
        "metadata": {
            "experiment": "verdict-it",
            "canary": canary,
            "alpha": alpha.to_string(),
        }
    });
    let resp = ureq::post(&format!(
        "http://127.0.0.1:{}/api/v1/flagger",
        collector.http_port
    ))
    .config()
    .http_status_as_error(false)
    .build()
    .send_json(&body)?;
    Ok(resp.status().as_u16())
}

#[test]
fn a_slow_route_fails_and_an_identical_canary_does_not() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let dir = PathBuf::from(format!("/tmp/bakeoff-verdict-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let pid = std::process::id();
    let cgs = [
        Cgroup::create(&format!("bakeoff-verdict-b-{pid}"))?,
        Cgroup::create(&format!("bakeoff-verdict-c-{pid}"))?,
        Cgroup::create(&format!("bakeoff-verdict-s-{pid}"))?,
    ];
    let (_b, bport) = cgs[0].spawn_test_server("--delay-ms 1")?;
    // Slower on /checkout, and only for "mobile" clients.
    let (_c, cport) = cgs[1]
        .spawn_test_server("--delay-ms 1 --slow-path /checkout --slow-ms 5 --slow-agent mobile")?;
    let (_s, sport) = cgs[2].spawn_test_server("--delay-ms 1")?;
    // The collector also judges the experiment on its own and calls a webhook on failure.
    let hook = WebhookReceiver::start()?;
    let experiments = dir.join("experiments.yaml");
    std::fs::write(
        &experiments,
        format!(
            "experiments:\n  - name: verdict-it\n    canaries: [canary, same]\n    webhook: {}\n    judge: {{ alpha: 0.001 }}\n",
            hook.url()
        ),
    )?;
    let collector = Collector::start_with(
        &dir,
        free_port(),
        free_port(),
        &[
            "--experiments".into(),
            experiments.display().to_string(),
            "--evaluate-every".into(),
            "1".into(),
        ],
    )?;
    let ready = dir.join("ready");
    let mut probe = Guard::spawn(
        "bakeoff-probe",
        Command::new(bin("bakeoff-probe")?)
            .args(["--experiment", "verdict-it", "--output", "none"])
            .arg("--cohort")
            .arg(format!("baseline=cgroup:{}", cgs[0].path().display()))
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", cgs[1].path().display()))
            .arg("--cohort")
            .arg(format!("same=cgroup:{}", cgs[2].path().display()))
            .args(["--collector", &collector.endpoint()])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;

    // Interleaved load, bounded: 3 x 1200 requests on three routes.
    let mut conns = [
        Conn::connect(bport)?,
        Conn::connect(cport)?,
        Conn::connect(sport)?,
    ];
    let n = 1200;
    for i in 0..n {
        let path = ["/", "/checkout", "/search?q=x"][i % 3];
        for (k, conn) in conns.iter_mut().enumerate() {
            let mut req = Request::get(path, &format!("v{k}-{i}"));
            // Two clients in three are mobile, on every route.
            let mobile = (i / 3) % 3 != 0;
            req.user_agent = Some(
                if mobile {
                    "mobile-app/3.1"
                } else {
                    "desktop-web/9"
                }
                .into(),
            );
            conn.request(&req)?;
        }
    }
    wait_for("events stored", Duration::from_secs(30), || {
        collector
            .get("/api/v1/groups?experiment=verdict-it")
            .is_ok_and(|g| g[0]["requests"].as_u64() == Some(3 * n as u64))
    })?;
    probe.stop(Duration::from_secs(30))?;
    // The judge reads each second once it is closed (`--judge-lag` after its end): wait until
    // the verdict covers every request.
    wait_for(
        "the verdict to cover every request",
        Duration::from_secs(30),
        || {
            collector
                .get("/api/v1/verdict?experiment=verdict-it&canary=same")
                .is_ok_and(|v| {
                    v["requests"]["canary"].as_u64() == Some(n as u64)
                        && v["requests"]["baseline"].as_u64() == Some(n as u64)
                })
        },
    )?;

    // A typo is an error naming what exists, not a rollout waiting for data.
    let typo = collector.get_status("/api/v1/verdict?experiment=verdict-itt")?;
    ensure!(
        typo.0 == 404 && typo.1.contains("verdict-it (baseline, canary, same)"),
        "{typo:?}"
    );
    let typo = collector.get_status("/api/v1/verdict?experiment=verdict-it&canary=canery")?;
    ensure!(
        typo.0 == 404 && typo.1.contains("its cohorts: baseline, canary, same"),
        "{typo:?}"
    );
    for bad in ["since=abc", "alpha=2", "aplha=0.01", "quantiles=p100%3D0.1"] {
        let r = collector.get_status(&format!("/api/v1/verdict?experiment=verdict-it&{bad}"))?;
        ensure!(r.0 == 400, "{bad}: {r:?}");
    }
    let r = collector.get_status("/api/v1/events?limit=0")?;
    ensure!(r.0 == 400 && r.1.contains("limit=0"), "{r:?}");
    let out = Command::new(bin("bakeoff")?)
        .args(["verdict", "verdict-itt"])
        .args([
            "--api",
            &format!("http://127.0.0.1:{}", collector.http_port),
        ])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(3) && stderr.contains("404") && stderr.contains("verdict-it"),
        "exit {:?}: {stderr}",
        out.status.code()
    );

    // The slow canary: FAIL, on /checkout latency only.
    let (code, v) = cli_verdict(&collector, "canary", 0.01)?;
    ensure!(code == 1 && v["decision"] == "fail", "exit {code}: {v:#}");
    let failing: Vec<String> = v["metrics"]
        .as_array()
        .context("metrics")?
        .iter()
        .filter(|m| m["decision"] == "fail")
        .map(|m| {
            format!(
                "{} {}",
                m["metric"].as_str().unwrap_or(""),
                m["endpoint"].as_str().unwrap_or("")
            )
        })
        .collect();
    ensure!(
        failing.iter().any(|f| f == "latency GET /checkout"),
        "failing: {failing:?}"
    );
    ensure!(
        !failing
            .iter()
            .any(|f| f.contains("GET /search") || f == "latency GET /" || f.starts_with("errors")),
        "failing: {failing:?}"
    );
    let checkout = v["metrics"]
        .as_array()
        .context("metrics")?
        .iter()
        .find(|m| m["metric"] == "latency" && m["endpoint"] == "GET /checkout")
        .context("checkout metric")?;
    // Two requests in three are 5 ms slower: the canary's median moves by about 5 ms.
    let shift =
        checkout["canary"].as_f64().unwrap_or(0.0) - checkout["baseline"].as_f64().unwrap_or(0.0);
    ensure!(
        (4.0..8.0).contains(&shift),
        "p50 shift {shift} ms for an injected 5 ms: {checkout}"
    );
    ensure!(flagger(&collector, "canary", 0.01)? == 412);

    // The identical canary: no FAIL (pass needs more data than this short run).
    let (code, v) = cli_verdict(&collector, "same", 0.001)?;
    ensure!(code != 1 && v["decision"] != "fail", "exit {code}: {v:#}");
    ensure!(v["requests"]["canary"].as_u64() == Some(n as u64), "{v:#}");
    ensure!(
        v["metrics"]
            .as_array()
            .is_some_and(|m| m.iter().all(|m| m["decision"] != "fail")),
        "{v:#}"
    );
    ensure!(flagger(&collector, "same", 0.001)? == 200);

    // Over gRPC, the same verdict.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let reply = rt.block_on(async {
        let mut q =
            bakeoff_proto::v1::query_client::QueryClient::connect(collector.endpoint()).await?;
        anyhow::Ok(
            q.verdict(bakeoff_proto::v1::VerdictRequest {
                experiment: "verdict-it".into(),
                canary: "canary".into(),
                alpha: Some(0.01),
                ..Default::default()
            })
            .await?
            .into_inner(),
        )
    })?;
    ensure!(
        reply.decision == bakeoff_proto::v1::Decision::Fail as i32
            && reply.canary_requests == n as u64
            && reply.metrics.iter().any(|m| m.endpoint == "GET /checkout"
                && m.decision == bakeoff_proto::v1::Decision::Fail as i32
                && m.drilldown
                    .first()
                    .is_some_and(|d| d.value == "mobile-app/3.1")),
        "gRPC verdict: {reply:?}"
    );

    // The configured experiment: the webhook got exactly one notice, for the slow canary.
    wait_for("the failure webhook", Duration::from_secs(30), || {
        !hook.bodies().is_empty()
    })?;
    std::thread::sleep(Duration::from_millis(2_500));
    let bodies = hook.bodies();
    ensure!(
        bodies.len() == 1,
        "{} webhook calls: {bodies:?}",
        bodies.len()
    );
    let notice: serde_json::Value = serde_json::from_str(&bodies[0])?;
    ensure!(
        notice["canary"] == "canary"
            && notice["decision"] == "fail"
            && notice["experiment"] == "verdict-it",
        "{notice}"
    );
    let configured = collector.get("/api/v1/experiments/verdicts")?;
    let same = configured["verdicts"]
        .as_array()
        .context("verdicts")?
        .iter()
        .find(|v| v["canary"] == "same")
        .context("no verdict for the identical canary")?;
    ensure!(same["decision"] != "fail", "{same}");
    ensure!(configured["webhooks_sent"] == 1, "{configured}");

    // The Argo-shaped JSON is the same verdict.
    let argo = collector.get("/api/v1/verdict?experiment=verdict-it&canary=canary&alpha=0.01")?;
    ensure!(argo["decision"] == "fail");
    let bad = collector.get("/api/v1/verdict?experiment=verdict-it&alpha=2");
    ensure!(bad.is_err(), "alpha 2 accepted");

    // The HTML report, rendered by a real headless Chromium: no console message, a screenshot,
    // and the numbers on the page equal the API's.
    let report = dir.join("report.html");
    let out = Command::new(bin("bakeoff")?)
        .args([
            "report",
            "verdict-it",
            "--canary",
            "canary",
            "--alpha",
            "0.01",
        ])
        .args([
            "--api",
            &format!("http://127.0.0.1:{}", collector.http_port),
        ])
        .arg("-o")
        .arg(&report)
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_report_in_chromium(&report, &argo, &dir)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Renders the report headless, takes a screenshot, and compares the page's numbers with `api`.
fn check_report_in_chromium(
    report: &std::path::Path,
    api: &serde_json::Value,
    dir: &std::path::Path,
) -> Result<()> {
    const CHROMIUM: &str = "/usr/bin/chromium";
    ensure!(
        std::path::Path::new(CHROMIUM).exists(),
        "{CHROMIUM} is missing: run `cargo xtask bootstrap` (Debian package chromium)"
    );
    let url = format!("file://{}", report.display());
    let chromium = |args: &[&str]| {
        Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--enable-logging=stderr",
                "--v=0",
            ])
            .arg(format!(
                "--user-data-dir={}",
                dir.join("chromium").display()
            ))
            .args(args)
            .arg(&url)
            .output()
    };
    let shot = std::env::temp_dir().join("bakeoff-report.png");
    let _ = std::fs::remove_file(&shot);
    let s = chromium(&[
        &format!("--screenshot={}", shot.display()),
        "--window-size=1200,2600",
    ])?;
    ensure!(
        shot.metadata().is_ok_and(|m| m.len() > 10_000),
        "no screenshot: {}",
        String::from_utf8_lossy(&s.stderr)
    );
    let dom = chromium(&["--dump-dom"])?;
    let stderr = String::from_utf8_lossy(&dom.stderr);
    ensure!(!stderr.contains("CONSOLE"), "console messages: {stderr}");
    let dom = String::from_utf8_lossy(&dom.stdout);
    ensure!(dom.contains("<svg"), "no charts rendered");
    let attr = |needle: &str| -> Option<String> {
        let start = dom.find(needle)? + needle.len();
        let rest = &dom[start..];
        Some(rest[..rest.find('"')?].to_string())
    };
    ensure!(
        attr("id=\"decision\" data-decision=\"").as_deref() == api["decision"].as_str(),
        "decision on the page differs from the API's {}",
        api["decision"]
    );
    ensure!(
        attr("id=\"seconds\" data-seconds=\"") == Some(api["seconds"].to_string()),
        "seconds on the page differ from the API's {}",
        api["seconds"]
    );
    for m in api["metrics"].as_array().context("metrics")? {
        let row = format!(
            "data-metric=\"{}\" data-endpoint=\"{}\" data-decision=\"{}\" data-canary-requests=\"{}\"",
            m["metric"].as_str().unwrap_or(""),
            m["endpoint"].as_str().unwrap_or(""),
            m["decision"].as_str().unwrap_or(""),
            m["canary_requests"]
        );
        ensure!(dom.contains(&row), "the page has no row {row}");
    }
    ensure!(
        dom.contains("data-value=\"mobile-app/3.1\""),
        "no drill-down row on the page"
    );
    Ok(())
}

//! bakeoff-demo (run by `cargo xtask demo`): the whole story. A baseline and a canary of a demo
//! service, each in its own cgroup, under load from mobile and desktop clients; the probe watches
//! both, the collector stores every request, and the load runs until the verdict is decided.
//! By default the canary is 20 ms slower on /checkout for mobile clients only: the demo ends with
//! FAIL naming that route and that client. With `--good` the canary is identical: PASS.
//!
//! With `--replay`: capture and replay instead of the live verdict. `bakeoff capture start`
//! records the baseline's traffic through the probe (redacted there, streamed to the
//! collector), then `bakeoff replay` sends the captured sessions to the baseline, a second
//! baseline instance (calibration) and the canary, and compares them per endpoint.

use std::{
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use bakeoff_probe::{event::RequestEvent, summary::Summary};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    process::{Guard, free_port, wait_for, wait_for_port},
};
use clap::Parser;

/// Routes the demo clients request, in turn.
const ROUTES: &[&str] = &["/", "/checkout", "/bytes/2048", "/search?q=socks"];
const MOBILE: &str = "shop-mobile/5.2 (Android 14)";
const DESKTOP: &str = "Mozilla/5.0 (X11; Linux x86_64) Firefox/128.0";

#[derive(Parser)]
struct Args {
    /// Longest load, in seconds; the load stops as soon as the verdict is decided.
    #[arg(long, default_value_t = 180)]
    seconds: u64,
    /// An identical canary (the demo should end with PASS).
    #[arg(long)]
    good: bool,
    /// Concurrent clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Capture the baseline's traffic and replay it against the canary.
    #[arg(long)]
    replay: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let bins = bakeoff_testkit::process::target_bin_dir();
    let bins = bins.as_path();
    let dir = Path::new("/tmp/bakeoff-demo");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let _parent = Cgroup::create("bakeoff-demo")?;
    let baseline_cg = Cgroup::create("bakeoff-demo/baseline")?;
    let canary_cg = Cgroup::create("bakeoff-demo/canary")?;
    let server = bins.join("bakeoff-testserver");
    let (bport, cport) = (free_port(), free_port());
    let _baseline = Guard::shell(
        "baseline",
        &format!(
            "{}{} --port {bport} --delay-ms 2",
            baseline_cg.exec_prefix(),
            server.display()
        ),
        &[],
    )?;
    let regression = if args.good {
        String::new()
    } else {
        "--slow-path /checkout --slow-ms 20 --slow-agent shop-mobile".to_string()
    };
    let _canary = Guard::shell(
        "canary",
        &format!(
            "{}{} --port {cport} --delay-ms 2 {regression}",
            canary_cg.exec_prefix(),
            server.display()
        ),
        &[],
    )?;
    wait_for_port(bport, Duration::from_secs(10))?;
    wait_for_port(cport, Duration::from_secs(10))?;

    let collector = bakeoff_testkit::collector::Collector::start(dir)?;
    let api = format!("http://127.0.0.1:{}", collector.http_port);
    let events = dir.join("events.jsonl");
    let ready = dir.join("ready");
    let mut probe = Guard::spawn(
        "bakeoff-probe",
        Command::new(bins.join("bakeoff-probe"))
            .args(["--experiment", "demo"])
            .arg("--cohort")
            .arg(format!("baseline=cgroup:{}", baseline_cg.path().display()))
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", canary_cg.path().display()))
            .arg("--output")
            .arg(&events)
            .args(["--collector", &collector.endpoint()])
            // A capture wants whole payloads (the /bytes responses are 2 KiB).
            .args([
                "--payload-prefix",
                if args.replay { "4096" } else { "1024" },
            ])
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;
    println!(
        "demo: baseline on 127.0.0.1:{bport}, canary on 127.0.0.1:{cport} ({}); \
         {} clients (2 in 3 mobile), until the verdict is decided or {}s",
        if args.good {
            "identical"
        } else {
            "20 ms slower on /checkout for mobile clients"
        },
        args.clients,
        args.seconds
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..args.clients)
        .map(|c| {
            let (stop, sent) = (stop.clone(), sent.clone());
            std::thread::spawn(move || load(c, bport, cport, &stop, &sent))
        })
        .collect();
    if args.replay {
        let result = capture_and_replay(bins, dir, &api, bport, cport, &baseline_cg);
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            c.join()
                .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
        }
        probe.stop(Duration::from_secs(20))?;
        return result;
    }
    let deadline = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut decision = "inconclusive".to_string();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        if let Ok(v) =
            bakeoff_testkit::collector::get_json(&format!("{api}/api/v1/verdict?experiment=demo"))
        {
            decision = v["decision"].as_str().unwrap_or("inconclusive").to_string();
            println!(
                "  {:>5.1}s  {:>7} requests sent  {:>7} judged  verdict: {decision}",
                started.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                v["requests"]["canary"].as_u64().unwrap_or(0)
                    + v["requests"]["baseline"].as_u64().unwrap_or(0),
            );
            if decision != "inconclusive" {
                break;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    std::thread::sleep(Duration::from_millis(300));
    probe.stop(Duration::from_secs(20))?;

    let text = std::fs::read_to_string(&events).context("no events file")?;
    let parsed: Vec<RequestEvent> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    println!(
        "\nfirst events ({} written to {}):",
        parsed.len(),
        events.display()
    );
    for line in text.lines().take(2) {
        println!("{line}");
    }
    let mut summary = Summary::default();
    for e in &parsed {
        summary.add(e);
    }
    println!(
        "\n{} requests sent; per cohort, as the probe saw them:\n",
        sent.load(Ordering::Relaxed)
    );
    print!("{}", summary.table());
    println!(
        "\nper cohort and endpoint, from the collector \
         (bakeoff events --api {api} --where experiment=demo --group-by cohort,path):\n"
    );
    let status = Command::new(bins.join("bakeoff"))
        .args(["events", "--api", &api])
        .args(["--where", "experiment=demo", "--group-by", "cohort,path"])
        .status()
        .context("cannot run bakeoff events")?;
    anyhow::ensure!(status.success(), "bakeoff events failed");
    println!("\nthe verdict (bakeoff verdict demo --api {api}):\n");
    let status = Command::new(bins.join("bakeoff"))
        .args(["verdict", "demo", "--api", &api])
        .status()
        .context("cannot run bakeoff verdict")?;
    let report = dir.join("report.html");
    let out = Command::new(bins.join("bakeoff"))
        .args(["report", "demo", "--api", &api, "-o"])
        .arg(&report)
        .output()
        .context("cannot run bakeoff report")?;
    anyhow::ensure!(
        out.status.success(),
        "bakeoff report failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "\nverdict: {} (bakeoff verdict exit code {}); report: {}",
        decision.to_uppercase(),
        status.code().unwrap_or(-1),
        report.display()
    );
    Ok(())
}

/// `--replay`: the baseline's traffic captured through the collector, then replayed against the
/// baseline, a second baseline (calibration) and the canary.
fn capture_and_replay(
    bins: &Path,
    dir: &Path,
    api: &str,
    bport: u16,
    cport: u16,
    baseline_cg: &Cgroup,
) -> Result<()> {
    let bakeoff = bins.join("bakeoff");
    // The probe's control channel first.
    wait_for(
        "the probe's control channel",
        Duration::from_secs(20),
        || {
            bakeoff_testkit::collector::get_json(&format!("{api}/api/v1/captures"))
                .is_ok_and(|l| l["probes"].as_array().is_some_and(|p| !p.is_empty()))
        },
    )?;
    let file = dir.join("baseline.bkcap");
    println!(
        "\ncapturing the baseline (bakeoff capture start --api {api} --experiment demo \
         --cohort baseline --max-requests 2000 -o {}):\n",
        file.display()
    );
    let status = Command::new(&bakeoff)
        .args(["capture", "start", "--api", api, "--experiment", "demo"])
        .args(["--cohort", "baseline", "--max-requests", "2000", "-o"])
        .arg(&file)
        .status()
        .context("cannot run bakeoff capture")?;
    anyhow::ensure!(status.success(), "bakeoff capture failed");
    // A second instance of the baseline's version: what differs between the two is noise.
    let a2 = free_port();
    let _a2 = Guard::shell(
        "baseline 2",
        &format!(
            "{}{} --port {a2} --delay-ms 2",
            baseline_cg.exec_prefix(),
            bins.join("bakeoff-testserver").display()
        ),
        &[],
    )?;
    wait_for_port(a2, Duration::from_secs(10))?;
    println!(
        "\nreplaying it (bakeoff replay {} --target 127.0.0.1:{bport} --against \
         127.0.0.1:{cport} --calibrate 127.0.0.1:{a2}):\n",
        file.display()
    );
    let status = Command::new(&bakeoff)
        .arg("replay")
        .arg(&file)
        .args(["--target", &format!("127.0.0.1:{bport}")])
        .args(["--against", &format!("127.0.0.1:{cport}")])
        .args(["--calibrate", &format!("127.0.0.1:{a2}")])
        .args(["--concurrency", "4"])
        .arg("--audit-log")
        .arg(dir.join("audit.log"))
        .status()
        .context("cannot run bakeoff replay")?;
    println!(
        "\nreplay: {} (bakeoff replay exit code {}); audit log: bakeoff audit --log {}",
        if status.code() == Some(1) {
            "the canary is worse"
        } else {
            "no regression shown"
        },
        status.code().unwrap_or(-1),
        dir.join("audit.log").display()
    );
    Ok(())
}

/// Keep-alive requests to both cohorts, the same request to each in turn, until told to stop
/// (at most 2 000 000 per client).
fn load(client: usize, bport: u16, cport: u16, stop: &AtomicBool, sent: &AtomicU64) -> Result<()> {
    let mut conns = [Conn::connect(bport)?, Conn::connect(cport)?];
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) && n < 2_000_000 {
        let route = ROUTES[n % ROUTES.len()];
        let agent = if (n / ROUTES.len() + client).is_multiple_of(3) {
            DESKTOP
        } else {
            MOBILE
        };
        // Alternate which cohort goes first, so neither is always second.
        for k in 0..2 {
            let conn = &mut conns[(k + n) % 2];
            let mut req = Request::get(route, &format!("demo-{client}-{n}-{k}"));
            req.user_agent = Some(agent.into());
            conn.request(&req)?;
        }
        sent.fetch_add(2, Ordering::Relaxed);
        n += 1;
    }
    Ok(())
}

//! bakeoff-demo (run by `cargo xtask demo`): a baseline and a canary of a demo service, each in its own cgroup, under
//! load from two clients; the probe watches both and the demo prints events and a summary.

use std::{
    path::Path,
    process::{Command, Stdio},
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

#[derive(Parser)]
struct Args {
    /// Seconds of load.
    #[arg(long, default_value_t = 8)]
    seconds: u64,
}

fn main() -> Result<()> {
    let Args { seconds } = Args::parse();
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
    // The canary: slower on /checkout, and one request in 40 fails.
    let _canary = Guard::shell(
        "canary",
        &format!(
            "{}{} --port {cport} --delay-ms 2 --slow-path /checkout --slow-ms 20 --error-every 40",
            canary_cg.exec_prefix(),
            server.display()
        ),
        &[],
    )?;
    wait_for_port(bport, Duration::from_secs(10))?;
    wait_for_port(cport, Duration::from_secs(10))?;

    let collector = bakeoff_testkit::collector::Collector::start(dir)?;
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
            .arg("--ready-file")
            .arg(&ready)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;
    println!(
        "demo: baseline on 127.0.0.1:{bport}, canary on 127.0.0.1:{cport}; {seconds}s of load"
    );

    let deadline = Instant::now() + Duration::from_secs(seconds);
    let clients: Vec<_> = [bport, cport]
        .into_iter()
        .map(|port| std::thread::spawn(move || load(port, deadline)))
        .collect();
    let mut sent = 0;
    for c in clients {
        sent += c
            .join()
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
    for line in text.lines().take(3) {
        println!("{line}");
    }
    let mut summary = Summary::default();
    for e in &parsed {
        summary.add(e);
    }
    println!("\n{sent} requests sent; per cohort, as the probe saw them:\n");
    print!("{}", summary.table());
    println!(
        "\nper cohort and endpoint, from the collector \
         (bakeoff events --api http://127.0.0.1:{} --where experiment=demo --group-by cohort,path):\n",
        collector.http_port
    );
    let status = Command::new(bins.join("bakeoff"))
        .args([
            "events",
            "--api",
            &format!("http://127.0.0.1:{}", collector.http_port),
        ])
        .args(["--where", "experiment=demo", "--group-by", "cohort,path"])
        .status()
        .context("cannot run bakeoff events")?;
    anyhow::ensure!(status.success(), "bakeoff events failed");
    Ok(())
}

/// Keep-alive requests until the deadline (at most 200 000).
fn load(port: u16, deadline: Instant) -> Result<u64> {
    let mut conn = Conn::connect(port)?;
    let mut n = 0u64;
    while Instant::now() < deadline && n < 200_000 {
        let route = ROUTES[n as usize % ROUTES.len()];
        conn.request(&Request::get(route, &format!("demo-{port}-{n}")))?;
        n += 1;
    }
    Ok(n)
}

//! gRPC from a third-party implementation (grpcio, from PyPI: its own HTTP/2, HPACK with the
//! dynamic table and Huffman coding) watched from the kernel on both data paths: one event per
//! call, named `/bench.Echo/<Method>`, with `grpc-status` (errors from a failing method),
//! unary and server-streaming calls, request ids from the metadata.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bakeoff_probe::event::RequestEvent;
use bakeoff_testkit::{
    cgroup::Cgroup,
    probe::ProbeRun,
    process::{Guard, free_port, scratch_dir, wait_for_port},
};

fn scripts() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/grpc"))
}

/// Calls per method, in the order the client makes them.
const PLAN: [(&str, usize); 4] = [("Fast", 40), ("Slow", 10), ("Fail", 5), ("Stream", 5)];

#[test]
fn every_grpc_call_becomes_one_exact_event() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    for path in ["auto", "syscall"] {
        let path_name = path;
        let dir = scratch_dir(&format!("grpc-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-grpc-{path}-{}", std::process::id()))?;
        let port = free_port();
        let _server = Guard::shell(
            "grpcio server",
            &format!(
                "{}python3 {}/echo_server.py {port} 2",
                cg.exec_prefix(),
                scripts().display()
            ),
            &[],
        )?;
        wait_for_port(port, Duration::from_secs(20))?;
        let probe = ProbeRun::start(
            &dir,
            &[
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
            ],
        )?;
        let tag = format!("g{path}");
        let out = Command::new("python3")
            .arg(scripts().join("echo_client.py"))
            .arg(port.to_string())
            .arg(&tag)
            .args(PLAN.map(|(m, n)| format!("{m}={n}")))
            .output()
            .context("cannot run the grpcio client")?;
        let said = String::from_utf8_lossy(&out.stdout);
        ensure!(
            out.status.success(),
            "client failed: {said}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ensure!(
            said.contains("Fail 5 0 5") && said.contains("Fast 40 40 0"),
            "client outcomes: {said}"
        );
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;
        let what = format!("grpc, {path} path");
        let mut by_method: BTreeMap<&str, Vec<&RequestEvent>> = BTreeMap::new();
        for e in &result.events {
            by_method.entry(e.path.as_str()).or_default().push(e);
        }
        let summary: Vec<String> = by_method
            .iter()
            .map(|(p, v)| format!("{} x {p}", v.len()))
            .collect();
        for (method, n) in PLAN {
            let path = format!("/bench.Echo/{method}");
            let calls = by_method
                .get(path.as_str())
                .map(Vec::as_slice)
                .unwrap_or_default();
            // The syscall path reads each read's buffer after the syscall; when the kernel
            // cannot (counted as `read_user`: here grpcio's first read of the connection, with
            // the preface and the first call), the decoder joins at the next frame and that
            // call is lost, counted. The cgroup path reads packets and loses nothing.
            let unreadable = result.counter(&["kernel_drops", "read_user"]) as usize;
            let allowed = if path_name == "syscall" {
                unreadable
            } else {
                0
            };
            ensure!(
                calls.len() <= n && calls.len() + allowed >= n,
                "{what}: {} events for {n} calls of {path} ({unreadable} unreadable reads); \
                 all: {summary:?}",
                calls.len()
            );
            let mut ids: Vec<String> = calls.iter().filter_map(|e| e.request_id.clone()).collect();
            ids.sort();
            ids.dedup();
            let want: Vec<String> = (0..n).map(|i| format!("{tag}-{method}-{i}")).collect();
            ensure!(
                ids.len() == calls.len() && ids.iter().all(|id| want.contains(id)),
                "{what}: request ids of {path}: {ids:?}"
            );
            for e in calls {
                let failing = method == "Fail";
                ensure!(
                    e.protocol == "grpc"
                        && e.method == "POST"
                        && e.status == Some(200)
                        // Joined after a lost read (syscall path), the server's HPACK table
                        // entries from before are unknown: a status may be unknown, never wrong.
                        && (e.grpc_status == Some(if failing { 14 } else { 0 })
                            || (allowed > 0 && e.grpc_status.is_none()))
                        && (e.error.is_some() == failing || e.grpc_status.is_none())
                        && e.attributes.get("rpc.service").map(String::as_str)
                            == Some("bench.Echo")
                        && e.attributes.get("rpc.method").map(String::as_str) == Some(method)
                        && e.cohort == "canary"
                        && e.bytes_in > 0
                        && e.bytes_out > 0,
                    "{what}: {e:?}"
                );
            }
        }
        let slow = &by_method["/bench.Echo/Slow"];
        ensure!(
            slow.iter().all(|e| e.duration_ns >= 2_000_000),
            "{what}: Slow calls shorter than the server's 2 ms: {slow:?}"
        );
        let unreadable = result.counter(&["kernel_drops", "read_user"]) as usize;
        let calls: usize = PLAN.iter().map(|(_, n)| n).sum();
        let allowed = if path_name == "syscall" {
            unreadable
        } else {
            0
        };
        ensure!(
            result.events.len() <= calls && result.events.len() + allowed >= calls,
            "{what}: {} events in all ({unreadable} unreadable reads): {summary:?}",
            result.events.len()
        );
    }
    Ok(())
}

/// Baseline and canary grpcio servers; the canary's `Slow` method takes 15 ms more. The verdict
/// must FAIL and name `POST /bench.Echo/Slow`.
#[test]
fn a_grpc_canary_with_one_slower_method_fails_named() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    const EXPERIMENT: &str = "grpc-it";
    let dir = scratch_dir("grpc-verdict")?;
    let pid = std::process::id();
    let mut ports = Vec::new();
    let mut guards = Vec::new();
    let mut cgs = Vec::new();
    for (name, slow_ms) in [("baseline", 1), ("canary", 16)] {
        let cg = Cgroup::create(&format!("bakeoff-grpc-{name}-{pid}"))?;
        let port = free_port();
        guards.push(Guard::shell(
            "grpcio server",
            &format!(
                "{}python3 {}/echo_server.py {port} {slow_ms}",
                cg.exec_prefix(),
                scripts().display()
            ),
            &[],
        )?);
        wait_for_port(port, Duration::from_secs(20))?;
        ports.push(port);
        cgs.push((name, cg));
    }
    let collector = bakeoff_testkit::collector::Collector::start(&dir)?;
    let mut args = vec![
        "--experiment".to_string(),
        EXPERIMENT.to_string(),
        "--collector".to_string(),
        format!("http://127.0.0.1:{}", collector.grpc_port),
    ];
    for (name, cg) in &cgs {
        args.push("--cohort".into());
        args.push(format!("{name}=cgroup:{}", cg.path().display()));
    }
    let probe = ProbeRun::start(&dir, &args)?;
    std::thread::scope(|s| -> Result<()> {
        let runs: Vec<_> = ports
            .iter()
            .map(|&port| {
                s.spawn(move || {
                    Command::new("python3")
                        .arg(scripts().join("echo_client.py"))
                        .arg(port.to_string())
                        .arg("v")
                        .args(["Fast=1500", "Slow=400"])
                        .output()
                })
            })
            .collect();
        for r in runs {
            let out = r
                .join()
                .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
            ensure!(out.status.success(), "client: {out:?}");
        }
        Ok(())
    })?;
    let url = format!("/api/v1/verdict?experiment={EXPERIMENT}&baseline=baseline&canary=canary");
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    let slow = "POST /bench.Echo/Slow";
    let verdict = loop {
        let v = collector.get(&url)?;
        let judged = v["requests"]["canary"].as_u64().unwrap_or(0)
            + v["requests"]["baseline"].as_u64().unwrap_or(0);
        if judged >= 2 * 1900 || std::time::Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    drop(probe);
    let failing: Vec<String> = verdict["metrics"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|m| m["decision"] == "fail")
        .map(|m| {
            format!(
                "{} {}",
                m["metric"].as_str().unwrap_or(""),
                m["endpoint"].as_str().unwrap_or("")
            )
        })
        .collect();
    println!("verdict: {} {failing:?}", verdict["decision"]);
    ensure!(
        verdict["decision"] == "fail",
        "the slower canary passed: {verdict:#}"
    );
    ensure!(
        failing.iter().any(|f| f.ends_with(slow)),
        "no failing metric names `{slow}`: {failing:?}"
    );
    ensure!(
        verdict["reasons"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|r| r.as_str().is_some_and(|r| r.contains(slow))),
        "the reasons do not name `{slow}`: {}",
        verdict["reasons"]
    );
    Ok(())
}

/// The probe attached to a gRPC connection that has been busy for a while: both HPACK tables
/// already hold entries (`:path` of the warmed-up methods, `x-request-id`, the server's
/// statuses) that the probe never saw. Every call after the attach is an event, and no field
/// is wrong: a field from an unseen table entry is reported unknown (`decoded` says which were
/// read), never guessed.
#[test]
fn attached_to_an_open_grpc_connection_no_field_is_wrong() -> Result<()> {
    use std::io::{BufRead as _, BufReader, Write as _};
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    // Fast and Fail are known to the tables before the attach; Slow and Stream are not.
    let plan = [("Fast", 20), ("Fail", 5), ("Slow", 5), ("Stream", 5)];
    for path in ["auto", "syscall"] {
        let what = format!("attach mid-connection, {path} path");
        let dir = scratch_dir(&format!("grpc-attach-{path}"))?;
        let cg = Cgroup::create(&format!(
            "bakeoff-grpc-attach-{path}-{}",
            std::process::id()
        ))?;
        let port = free_port();
        let _server = Guard::shell(
            "grpcio server",
            &format!(
                "{}python3 {}/echo_server.py {port} 2",
                cg.exec_prefix(),
                scripts().display()
            ),
            &[],
        )?;
        wait_for_port(port, Duration::from_secs(20))?;
        let tag = format!("a{path}");
        let mut client = Command::new("python3")
            .arg(scripts().join("echo_client.py"))
            .arg(port.to_string())
            .arg(&tag)
            .args(plan.map(|(m, n)| format!("{m}={n}")))
            .env("ECHO_WARMUP", "Fast=10,Fail=3")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("cannot run the grpcio client")?;
        let mut stdout = BufReader::new(client.stdout.take().context("client stdout")?);
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        ensure!(line.trim() == "paused", "{what}: client said {line:?}");
        let probe = ProbeRun::start(
            &dir,
            &[
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
            ],
        )?;
        client
            .stdin
            .take()
            .context("client stdin")?
            .write_all(b"go\n")?;
        let mut said = String::new();
        for _ in 0..plan.len() {
            line.clear();
            stdout.read_line(&mut line)?;
            said.push_str(&line);
        }
        let status = client.wait()?;
        ensure!(status.success(), "{what}: client failed: {said}");
        ensure!(said.contains("Fast 20 20 0"), "{what}: {said}");
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;
        let unreadable = result.counter(&["kernel_drops", "read_user"]) as usize;
        let calls: usize = plan.iter().map(|(_, n)| n).sum();
        ensure!(
            result.events.len() <= calls && result.events.len() + unreadable >= calls,
            "{what}: {} events for {calls} calls ({unreadable} unreadable reads): {:#?}",
            result.events.len(),
            result.events
        );
        let mut known_paths = 0;
        for e in &result.events {
            let decoded = e.attributes.get("decoded").cloned().unwrap_or_default();
            let decoded: Vec<&str> = decoded.split(',').collect();
            // The method, from the request id (a literal value under an indexed name).
            let id = e.request_id.as_deref().unwrap_or_default();
            let method = plan
                .iter()
                .map(|(m, _)| *m)
                .find(|m| id.starts_with(&format!("{tag}-{m}-")))
                .with_context(|| format!("{what}: request id {id:?} is not one sent: {e:?}"))?;
            // `grpc` needs the content-type, which may be an unseen table entry: then `http2`.
            ensure!(
                (e.protocol == "grpc" || e.protocol == "http2") && e.cohort == "canary",
                "{what}: {e:?}"
            );
            if decoded.contains(&"method") {
                ensure!(e.method == "POST", "{what}: {e:?}");
            }
            if decoded.contains(&"path") {
                known_paths += 1;
                ensure!(e.path == format!("/bench.Echo/{method}"), "{what}: {e:?}");
            } else {
                ensure!(
                    !e.path.contains("/bench.Echo/"),
                    "{what}: a path guessed: {e:?}"
                );
            }
            if decoded.contains(&"status") {
                ensure!(e.status == Some(200), "{what}: {e:?}");
            }
            if let Some(code) = e.grpc_status {
                ensure!(
                    code == if method == "Fail" { 14 } else { 0 },
                    "{what}: grpc-status of {method}: {e:?}"
                );
            }
        }
        // Methods first called after the attach carry their path in full.
        ensure!(
            known_paths >= 10,
            "{what}: only {known_paths} paths decoded: {:#?}",
            result.events
        );
    }
    Ok(())
}

/// tonic on both ends (hyper's h2 and HPACK: Huffman strings, the dynamic table): the
/// collector's own gRPC query service, run in a cohort cgroup, called by a tonic client. One
/// event per call, named `/bakeoff.v1.Query/<Method>`, with `grpc-status` (NOT_FOUND for a
/// verdict of an unknown experiment, INVALID_ARGUMENT for a bad group-by).
#[test]
fn tonic_calls_become_exact_events() -> Result<()> {
    use bakeoff_proto::v1::{
        ExperimentsRequest, GroupsRequest, VerdictRequest, query_client::QueryClient,
    };
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    let plan = [("Experiments", 20, 0), ("Verdict", 5, 5), ("Groups", 5, 3)];
    for path in ["auto", "syscall"] {
        let what = format!("tonic, {path} path");
        let dir = scratch_dir(&format!("grpc-tonic-{path}"))?;
        let cg = Cgroup::create(&format!("bakeoff-grpc-tonic-{path}-{}", std::process::id()))?;
        let (grpc_port, http_port) = (free_port(), free_port());
        let _server = Guard::shell(
            "bakeoff serve (tonic)",
            &format!(
                "{}{} serve --grpc-listen 127.0.0.1:{grpc_port} --http-listen 127.0.0.1:{http_port} \
                 --db {}/events.duckdb 2>{}/collector.log",
                cg.exec_prefix(),
                bakeoff_testkit::process::bin("bakeoff")?.display(),
                dir.display(),
                dir.display()
            ),
            &[],
        )?;
        wait_for_port(grpc_port, Duration::from_secs(30))?;
        let probe = ProbeRun::start(
            &dir,
            &[
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
            ],
        )?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let outcomes = runtime.block_on(async {
            let mut client = QueryClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
            let mut outcomes: Vec<(&str, i32)> = Vec::new();
            for &(method, n, _) in &plan {
                for _ in 0..n {
                    let code = match method {
                        "Experiments" => {
                            client.experiments(ExperimentsRequest {}).await.map(|_| ())
                        }
                        "Verdict" => client
                            .verdict(VerdictRequest {
                                experiment: "no-such-experiment".into(),
                                ..Default::default()
                            })
                            .await
                            .map(|_| ()),
                        _ => client
                            .groups(GroupsRequest {
                                by: vec!["no_such_field".into()],
                                ..Default::default()
                            })
                            .await
                            .map(|_| ()),
                    }
                    .map_or_else(|s| s.code() as i32, |()| 0);
                    outcomes.push((method, code));
                }
            }
            anyhow::Ok(outcomes)
        })?;
        for &(method, _, code) in &plan {
            ensure!(
                outcomes
                    .iter()
                    .filter(|(m, _)| *m == method)
                    .all(|(_, c)| *c == code),
                "{what}: the client got {outcomes:?}"
            );
        }
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;
        let unreadable = result.counter(&["kernel_drops", "read_user"]) as usize;
        let allowed = if path == "syscall" { unreadable } else { 0 };
        for &(method, n, code) in &plan {
            let name = format!("/bakeoff.v1.Query/{method}");
            let calls: Vec<&RequestEvent> =
                result.events.iter().filter(|e| e.path == name).collect();
            ensure!(
                calls.len() <= n && calls.len() + allowed >= n,
                "{what}: {} events for {n} calls of {name}: {:#?}",
                calls.len(),
                result.events
            );
            for e in calls {
                ensure!(
                    e.protocol == "grpc"
                        && e.method == "POST"
                        && e.status == Some(200)
                        && e.grpc_status == Some(code)
                        && e.error.is_some() == (code != 0)
                        && e.attributes.get("rpc.service").map(String::as_str)
                            == Some("bakeoff.v1.Query")
                        && e.attributes.get("rpc.method").map(String::as_str) == Some(method)
                        && e.role == "server"
                        && e.bytes_in > 0
                        && e.bytes_out > 0,
                    "{what}: {e:?}"
                );
            }
        }
        let calls: usize = plan.iter().map(|(_, n, _)| n).sum();
        ensure!(
            result.events.len() <= calls && result.events.len() + allowed >= calls,
            "{what}: {} events for {calls} calls",
            result.events.len()
        );
    }
    Ok(())
}

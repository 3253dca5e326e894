//! Replaying captured sessions against real servers: the test server (latency injected on one
//! path) from a capture written here, with the framing cases a capture holds (keep-alive,
//! bodies, chunked responses, a session cut by a loss), and writes refused unless allowed.

use std::time::Duration;

use anyhow::{Result, ensure};
use bakeoff_capture::{ConnInfo, Direction, Loss, Record};
use bakeoff_replay::{ReplayOptions, Timing, replay, sessions};
use bakeoff_testkit::process::{Guard, bin, free_port, wait_for_port};

fn open(conn: u64) -> Record {
    Record::open(
        conn,
        1,
        &ConnInfo {
            role: "server".into(),
            protocol: "http1".into(),
            ..ConnInfo::default()
        },
    )
}

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes()
}

fn records() -> Vec<Record> {
    let mut keepalive = Vec::new();
    for _ in 0..5 {
        keepalive.extend(get("/bytes/100"));
    }
    let post = b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world".to_vec();
    vec![
        open(1),
        // Split mid-request: the pieces are joined before framing.
        Record::data(1, Direction::Ingress, 10, keepalive[..50].to_vec()),
        Record::data(1, Direction::Ingress, 11, keepalive[50..].to_vec()),
        Record::close(1, 12),
        open(2),
        Record::data(2, Direction::Ingress, 20, get("/status/404")),
        Record::data(2, Direction::Ingress, 21, post),
        Record::data(2, Direction::Ingress, 22, get("/chunked/300/100")),
        Record::data(2, Direction::Ingress, 23, get("/slow/a")),
        open(3),
        Record::data(3, Direction::Ingress, 30, get("/bytes/10")),
        Record::loss(
            3,
            Direction::Ingress,
            31,
            &Loss {
                bytes: 500,
                reason: "payload_truncated".into(),
            },
        ),
        Record::data(3, Direction::Ingress, 32, get("/bytes/10")),
    ]
}

#[test]
fn captured_sessions_replay_in_order_with_writes_refused_unless_allowed() -> Result<()> {
    let port = free_port();
    let _server = Guard::spawn(
        "test server",
        std::process::Command::new(bin("bakeoff-testserver")?).args([
            "--port",
            &port.to_string(),
            "--slow-path",
            "/slow",
            "--slow-ms",
            "40",
        ]),
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    let options = ReplayOptions {
        target: format!("127.0.0.1:{port}").parse()?,
        concurrency: 2,
        allow_writes: false,
        timeout: Duration::from_secs(10),
        timing: Timing::AsFast,
        noise: Default::default(),
    };
    let s = sessions(records());
    ensure!(s.len() == 3, "{s:?}");
    let r = replay(s.clone(), &options);
    ensure!(r.skipped_writes == 1, "{r:?}");
    let got: Vec<(u64, &str, Option<u16>, u64)> = r
        .outcomes
        .iter()
        .map(|o| (o.session, o.path.as_str(), o.status, o.body_bytes))
        .collect();
    let mut want = vec![(1, "/bytes/100", Some(200), 100); 5];
    want.extend([
        (2, "/status/404", Some(404), 7),
        (2, "/chunked/300/100", Some(200), 300),
        (2, "/slow/a", Some(200), 3),
        (3, "/bytes/10", Some(200), 10),
    ]);
    ensure!(got == want, "{got:?}");
    ensure!(r.outcomes.iter().all(|o| o.error.is_none()), "{r:?}");
    // The bytes after the loss in session 3 are not replayed: they cannot be framed.
    ensure!(r.unframed_bytes == get("/bytes/10").len() as u64, "{r:?}");
    let slow = &r.outcomes[7];
    ensure!(slow.latency_ns >= 40_000_000, "{slow:?}");
    ensure!(
        r.outcomes[..5].iter().all(|o| o.latency_ns < 40_000_000),
        "{:?}",
        &r.outcomes[..5]
    );
    // Same bodies, same hashes.
    ensure!(
        r.outcomes[..5]
            .windows(2)
            .all(|w| w[0].body_hash == w[1].body_hash),
        "{r:?}"
    );
    let allowed = replay(
        s,
        &ReplayOptions {
            allow_writes: true,
            ..options.clone()
        },
    );
    ensure!(allowed.skipped_writes == 0, "{allowed:?}");
    let post = allowed
        .outcomes
        .iter()
        .find(|o| o.method == "POST")
        .ok_or_else(|| anyhow::anyhow!("no POST replayed: {allowed:?}"))?;
    ensure!(post.status == Some(200) && post.path == "/echo", "{post:?}");
    // Nothing listens here: every request is an error outcome, none is lost.
    let dead = replay(
        sessions(records()),
        &ReplayOptions {
            target: format!("127.0.0.1:{}", free_port()).parse()?,
            ..options
        },
    );
    ensure!(
        dead.outcomes.len() == 9 && dead.outcomes.iter().all(|o| o.error.is_some()),
        "{dead:?}"
    );
    Ok(())
}

/// A capture of `sessions` connections, each sending GETs of the paths `paths(conn)` gives.
fn write_gets(
    file: &std::path::Path,
    sessions: u64,
    paths: impl Fn(u64) -> Vec<String>,
) -> Result<()> {
    let mut w = bakeoff_capture::CaptureWriter::new(
        std::fs::File::create(file)?,
        &bakeoff_capture::Meta {
            cohort: "canary".into(),
            ..Default::default()
        },
    )?;
    for conn in 0..sessions {
        w.write(&open(conn))?;
        for path in paths(conn) {
            w.write(&Record::data(conn, Direction::Ingress, 10, get(&path)))?;
        }
    }
    w.finish()?;
    Ok(())
}

/// `bakeoff replay FILE --target A --against B`: B (the test server with 30 ms more on
/// `/bytes/`) is slower on that endpoint only, exit 1; the same server against itself passes.
#[test]
fn bakeoff_replay_names_the_slower_endpoint() -> Result<()> {
    let dir = bakeoff_testkit::process::scratch_dir("replay-cli")?;
    let file = dir.join("capture.bkcap");
    // 60 sessions of 5 requests each: enough for the median bounds to separate.
    write_gets(&file, 60, |_| {
        (0..5)
            .map(|i| {
                if i % 2 == 0 {
                    "/bytes/100"
                } else {
                    "/status/200"
                }
                .to_string()
            })
            .collect()
    })?;
    let server = bakeoff_testkit::process::spawn_test_server;
    let (_a, a) = server(&[])?;
    let (_b, b) = server(&["--slow-path", "/bytes/", "--slow-ms", "30"])?;
    let run = |against: u16| -> Result<(i32, serde_json::Value)> {
        let out = std::process::Command::new(bin("bakeoff")?)
            .arg("replay")
            .arg(&file)
            .env("BAKEOFF_AUDIT_LOG", dir.join("audit.log"))
            .args(["--target", &format!("127.0.0.1:{a}")])
            .args(["--against", &format!("127.0.0.1:{against}")])
            .args(["--calibrate", &format!("127.0.0.1:{a}")])
            .args(["--concurrency", "4", "--json", "--html"])
            .arg(dir.join(format!("replay-{against}.html")))
            .output()?;
        let json = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok((out.status.code().unwrap_or(-1), json))
    };
    let (code, json) = run(b)?;
    let endpoints = json["comparison"]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let latency = |name: &str| {
        endpoints
            .iter()
            .find(|e| e["endpoint"] == name)
            .map(|e| e["latency"].as_str().unwrap_or_default().to_string())
    };
    ensure!(
        code == 1
            && latency("GET /bytes/:id").as_deref() == Some("slower")
            && latency("GET /status/:id").as_deref() == Some("no difference shown")
            && json["requests"] == 300,
        "exit {code}: {json}"
    );
    ensure!(
        endpoints
            .iter()
            .all(|e| e["status_diffs"] == 0 && e["body_diffs"] == 0),
        "{json}"
    );
    // The HTML page says the same: the slower endpoint marked, the verdict badge.
    let page = std::fs::read_to_string(dir.join(format!("replay-{b}.html")))?;
    ensure!(
        page.contains(r#"data-endpoint="GET /bytes/:id" data-latency="slower""#)
            && page
                .contains(r#"data-endpoint="GET /status/:id" data-latency="no difference shown""#)
            && page.contains(r#"data-decision="fail""#)
            && page.contains(r#"data-requests="300""#),
        "{page}"
    );
    let (code, json) = run(a)?;
    ensure!(code == 0, "A against itself: exit {code}: {json}");
    let page = std::fs::read_to_string(dir.join(format!("replay-{a}.html")))?;
    ensure!(page.contains(r#"data-decision="pass""#), "{page}");
    Ok(())
}

/// `bakeoff replay` compares responses after normalization: B (the test server as a "new
/// version") changed the prices in `/api/catalog/`'s documents and got slower on `/bytes/`; A2 is
/// a second instance of A. Every document carries timestamps (`generated_at`, at the top and in
/// every item, and a `Date` header) that differ on every answer: declared noisy they are not
/// reported; undeclared they are (the test can fail), unless `--calibrate A2` learns them as
/// noise, and the changed prices are still found next to them.
#[test]
fn bakeoff_replay_finds_a_changed_body_and_not_declared_noise() -> Result<()> {
    let dir = bakeoff_testkit::process::scratch_dir("replay-noise")?;
    let file = dir.join("capture.bkcap");
    // 60 sessions of 8 requests: 120 per endpoint, enough for the median bounds to separate.
    write_gets(&file, 60, |conn| {
        let routes = [
            format!("/api/catalog/{conn}"),
            format!("/api/offers/{conn}"),
            "/bytes/100".to_string(),
            "/status/200".to_string(),
        ];
        routes.iter().chain(routes.iter()).cloned().collect()
    })?;
    let server = bakeoff_testkit::process::spawn_test_server;
    let (_a, a) = server(&[])?;
    let (_a2, a2) = server(&[])?;
    let (_b, b) = server(&[
        "--change-body-path",
        "/api/catalog/",
        "--slow-path",
        "/bytes/",
        "--slow-ms",
        "30",
    ])?;
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let run = |against: u16, extra: &[&str]| -> Result<(i32, serde_json::Value)> {
        let out = std::process::Command::new(bin("bakeoff")?)
            .arg("replay")
            .arg(&file)
            .env("BAKEOFF_AUDIT_LOG", dir.join("audit.log"))
            .args(["--target", &addr(a), "--against", &addr(against)])
            // The unchanged routes' medians are microseconds, which a shared machine moves by
            // several times (B's workers wake cold after the slowed route); the slowed route is
            // 30 ms, hundreds of times A's: only a difference beyond 6x is a latency finding.
            .args(["--tolerance", "5", "--concurrency", "4", "--json"])
            .args(extra)
            .output()?;
        let json = serde_json::from_slice(&out.stdout)
            .map_err(|e| anyhow::anyhow!("{e}: {}", String::from_utf8_lossy(&out.stderr)))?;
        Ok((out.status.code().unwrap_or(-1), json))
    };
    let endpoint = |json: &serde_json::Value, name: &str| -> Result<serde_json::Value> {
        json["comparison"]["endpoints"]
            .as_array()
            .and_then(|es| es.iter().find(|e| e["endpoint"] == name))
            .cloned()
            .ok_or_else(|| anyhow::anyhow!("no endpoint {name}: {json}"))
    };
    // (latency, status, headers, body, noisy diffs) of one endpoint.
    let summary = |json: &serde_json::Value, name: &str| -> Result<(String, u64, u64, u64, u64)> {
        let e = endpoint(json, name)?;
        let n = |k: &str| e[k].as_u64().unwrap_or(u64::MAX);
        Ok((
            e["latency"].as_str().unwrap_or_default().to_string(),
            n("status_diffs"),
            n("header_diffs"),
            n("body_diffs"),
            n("noisy"),
        ))
    };
    // Nothing to report: no difference, and not slower (B can also look faster on the routes
    // it did not change: closed loop, its workers wait on the slowed route, the CPU is free).
    let nothing =
        |s: (String, u64, u64, u64, u64)| s.0 != "slower" && (s.1, s.2, s.3, s.4) == (0, 0, 0, 0);
    let (catalog, offers, bytes, status) = (
        "GET /api/catalog/:id",
        "GET /api/offers/:id",
        "GET /bytes/:id",
        "GET /status/:id",
    );

    // Declared noise, calibrated: the changed route and the slower one, nothing else.
    let declared = ["--noise-json", "generated_at"];
    let (code, json) = run(b, &[&declared[..], &["--calibrate", &addr(a2)]].concat())?;
    ensure!(code == 1 && json["requests"] == 480, "exit {code}: {json}");
    let (_, st, hd, body, noisy) = summary(&json, catalog)?;
    ensure!((st, hd, body, noisy) == (0, 0, 120, 0), "{json}");
    let example = &endpoint(&json, catalog)?["example"];
    ensure!(
        example["kind"] == "body"
            && example["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/api/catalog/"))
            && example["fields"] == serde_json::json!(["items[].price"]),
        "{example}"
    );
    ensure!(
        summary(&json, bytes)? == ("slower".to_string(), 0, 0, 0, 0),
        "{json}"
    );
    ensure!(nothing(summary(&json, offers)?), "{json}");
    ensure!(nothing(summary(&json, status)?), "{json}");
    let rules: Vec<&str> = json["noise"]
        .as_array()
        .map(|r| r.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    ensure!(
        rules.contains(&"json:generated_at") && rules.contains(&"header:date"),
        "{json}"
    );

    // Not declared, not calibrated: every timestamped answer differs (the test can fail).
    let (code, json) = run(b, &[])?;
    ensure!(code == 1, "exit {code}: {json}");
    let (_, _, hd, body, noisy) = summary(&json, offers)?;
    ensure!((hd, body, noisy) == (0, 120, 0), "{json}");
    ensure!(
        endpoint(&json, offers)?["example"]["fields"]
            .as_array()
            .is_some_and(|f| f.contains(&serde_json::json!("generated_at"))),
        "{json}"
    );

    // Not declared, calibrated: the timestamps differ between A and A2 too, so they are noise;
    // the changed prices next to them are still differences.
    let (code, json) = run(b, &["--calibrate", &addr(a2)])?;
    ensure!(code == 1, "exit {code}: {json}");
    let (latency, st, hd, body, noisy) = summary(&json, offers)?;
    ensure!(
        latency != "slower" && (st, hd, body, noisy) == (0, 0, 0, 120),
        "{json}"
    );
    let (_, _, _, body, noisy) = summary(&json, catalog)?;
    ensure!((body, noisy) == (120, 0), "{json}");

    // A against A2, the timestamps declared noisy (a field, or a regex): the same service.
    let (code, json) = run(a2, &declared)?;
    ensure!(code == 0, "A against A2: exit {code}: {json}");
    let (code, json) = run(a2, &["--noise-regex", "[0-9]{19}"])?;
    ensure!(code == 0, "A against A2, regex: exit {code}: {json}");

    // An invalid rule is a usage error, named.
    let out = std::process::Command::new(bin("bakeoff")?)
        .arg("replay")
        .arg(&file)
        .env("BAKEOFF_AUDIT_LOG", dir.join("audit.log"))
        .args(["--target", &addr(a), "--noise-regex", "(unclosed"])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.code() == Some(2) && stderr.contains("(unclosed"),
        "exit {:?}: {stderr}",
        out.status.code()
    );
    Ok(())
}

/// Open-loop timing: each request goes out at its recorded arrival time (scaled), whatever the
/// previous sessions' responses took, and the replay says when it could not keep the schedule.
#[test]
fn recorded_timing_sends_requests_at_their_recorded_times() -> Result<()> {
    let port = free_port();
    let _server = Guard::spawn(
        "test server",
        std::process::Command::new(bin("bakeoff-testserver")?).args([
            "--port",
            &port.to_string(),
            "--slow-path",
            "/slow",
            "--slow-ms",
            "300",
        ]),
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    let ms = 1_000_000u64;
    let t0 = 1_700_000_000_000_000_000u64;
    // Session 1 at 0 and 400 ms; session 2 at 200 ms; session 3 at 100 ms, slow (300 ms), then
    // at 150 ms: its second request cannot be on time (its first response comes at ~400 ms).
    let records = vec![
        open(1),
        Record::data(1, Direction::Ingress, t0, get("/bytes/1")),
        Record::data(1, Direction::Ingress, t0 + 400 * ms, get("/bytes/2")),
        open(2),
        Record::data(2, Direction::Ingress, t0 + 200 * ms, get("/bytes/3")),
        open(3),
        Record::data(3, Direction::Ingress, t0 + 100 * ms, get("/slow/x")),
        Record::data(3, Direction::Ingress, t0 + 150 * ms, get("/bytes/4")),
    ];
    let options = |timing| ReplayOptions {
        target: format!("127.0.0.1:{port}").parse().expect("address"),
        concurrency: 4,
        allow_writes: false,
        timeout: Duration::from_secs(10),
        timing,
        noise: Default::default(),
    };
    let started = std::time::Instant::now();
    let r = replay(
        sessions(records.clone()),
        &options(Timing::Recorded { speed: 1.0 }),
    );
    let took = started.elapsed();
    ensure!(
        r.outcomes.len() == 5 && r.outcomes.iter().all(|o| o.error.is_none()),
        "{r:?}"
    );
    // The last request is due at 400 ms: the replay cannot end before.
    ensure!(took >= Duration::from_millis(400), "{took:?}");
    let late = |path: &str| {
        r.outcomes
            .iter()
            .find(|o| o.path == path)
            .map(|o| o.late_ns)
            .unwrap_or(0)
    };
    // Sent after the slow response (~400 ms) although due at 150 ms: at least 200 ms late.
    ensure!(late("/bytes/4") >= 200 * ms, "{r:?}");
    // Twice as fast: the slow request is due at 50 ms, the next one at 75 ms, sent after the
    // slow response (>= 350 ms): at least 250 ms late.
    let fast = replay(
        sessions(records.clone()),
        &options(Timing::Recorded { speed: 2.0 }),
    );
    let late_fast = fast
        .outcomes
        .iter()
        .find(|o| o.path == "/bytes/4")
        .map_or(0, |o| o.late_ns);
    ensure!(
        fast.outcomes.len() == 5 && late_fast >= 250 * ms,
        "{fast:?}"
    );
    // As fast as possible: nobody waits for a schedule, nothing is late.
    let r = replay(sessions(records), &options(Timing::AsFast));
    ensure!(r.outcomes.iter().all(|o| o.late_ns == 0), "{r:?}");
    Ok(())
}

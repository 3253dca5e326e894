//! Recording a cohort's traffic (`--capture-cohort`) on the real kernel, both data paths:
//! nginx over HTTP and HTTPS (TLS plaintext from the uprobes), driven by curl with secrets in
//! headers and a JSON body. The capture file must hold every request and response, per
//! connection and direction, and none of the secrets.

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bakeoff_capture::{CaptureReader, Direction, Kind};
use bakeoff_testkit::{
    cgroup::Cgroup,
    probe::ProbeRun,
    process::{Guard, free_port, scratch_dir, wait_for_port},
    tls::Pki,
};

const SECRETS: [&str; 5] = [
    "TOPSECRET-AUTH",
    "TOPSECRET-COOKIE",
    "TOPSECRET-KEY",
    "TOPSECRET-PW",
    "TOPSECRET-SET",
];

fn nginx_conf(dir: &Path, port: u16, tls_port: u16, pki: &Pki) -> String {
    format!(
        r#"daemon off;
master_process on;
worker_processes 1;
user root;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        location /r/ {{
            add_header Set-Cookie "session=TOPSECRET-SET";
            return 200 "captured ok\n";
        }}
    }}
}}
"#,
        dir = dir.display(),
        cert = pki.server_cert.display(),
        key = pki.server_key.display(),
    )
}

/// nginx in `cg` serving the capture routes over HTTP and HTTPS; its guard and both ports.
fn start_nginx(dir: &Path, cg: &Cgroup, pki: &Pki) -> Result<(Guard, u16, u16)> {
    let (port, tls_port) = (free_port(), free_port());
    std::fs::write(dir.join("nginx.conf"), nginx_conf(dir, port, tls_port, pki))?;
    let nginx = Guard::shell(
        "nginx",
        &format!(
            "{}/usr/sbin/nginx -c {d}/nginx.conf -p {d}",
            cg.exec_prefix(),
            d = dir.display()
        ),
        &[],
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    wait_for_port(tls_port, Duration::from_secs(10))?;
    Ok((nginx, port, tls_port))
}

fn curl(url: &str, ca: &Path, post: bool) -> Result<()> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--http1.1", "-o", "/dev/null", "--cacert"])
        .arg(ca)
        .args(["-H", "Authorization: Bearer TOPSECRET-AUTH"])
        .args(["-H", "Cookie: sid=TOPSECRET-COOKIE"])
        .args(["-H", "X-Api-Key: TOPSECRET-KEY"]);
    if post {
        cmd.args(["-H", "Content-Type: application/json", "--data"])
            .arg(r#"{"user":"bob","password":"TOPSECRET-PW","n":1}"#);
    }
    let out = cmd.arg(url).output().context("cannot run curl")?;
    ensure!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[test]
fn a_recorded_cohort_is_complete_and_redacted() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    for path in ["auto", "syscall"] {
        let what = format!("capture, {path} path");
        let dir = scratch_dir(&format!("capture-{path}"))?;
        let pki = Pki::create(&dir)?;
        let cg = Cgroup::create(&format!("bakeoff-capture-{path}-{}", std::process::id()))?;
        let (_nginx, port, tls_port) = start_nginx(&dir, &cg, &pki)?;
        let file = dir.join("canary.bkcap");
        let probe = ProbeRun::start(
            &dir,
            &[
                "--experiment".into(),
                "cap".into(),
                "--data-path".into(),
                path.into(),
                "--cohort".into(),
                format!("canary=cgroup:{}", cg.path().display()),
                "--capture-cohort".into(),
                "canary".into(),
                "--capture-file".into(),
                file.display().to_string(),
                "--redact-header".into(),
                "X-Api-Key".into(),
                "--redact-json".into(),
                "password".into(),
                "--tls-plaintext".into(),
            ],
        )?;
        // Four connections: GET and POST, over HTTP and HTTPS.
        let mut sent = Vec::new();
        for (scheme, p) in [("http", port), ("https", tls_port)] {
            for post in [false, true] {
                let target = format!("/r/{scheme}-{}", if post { "post" } else { "get" });
                curl(&format!("{scheme}://localhost:{p}{target}"), &pki.ca, post)?;
                sent.push(format!(
                    "{} {target} HTTP/1.1",
                    if post { "POST" } else { "GET" }
                ));
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let result = probe.stop()?;

        let reader = CaptureReader::new(std::fs::File::open(&file)?)
            .with_context(|| format!("{what}: {}", file.display()))?;
        ensure!(
            reader.meta().cohort == "canary" && reader.meta().experiment == "cap",
            "{what}: {:?}",
            reader.meta()
        );
        ensure!(
            reader
                .meta()
                .redaction
                .iter()
                .any(|r| r == "header:x-api-key")
                && reader.meta().redaction.iter().any(|r| r == "json:password"),
            "{what}: rules in force {:?}",
            reader.meta().redaction
        );
        let mut opens = 0;
        let mut closes = 0;
        // Per connection and direction, the recorded bytes in order.
        let mut streams: BTreeMap<(u64, u8), Vec<u8>> = BTreeMap::new();
        for r in reader {
            let r = r.with_context(|| format!("{what}: reading the capture"))?;
            match r.kind {
                Kind::Open => {
                    opens += 1;
                    let info = r.conn_info()?;
                    // The cgroup path learns the pid from the first response segment.
                    ensure!(
                        info.role == "server" && (path == "auto" || info.pid > 0),
                        "{what}: {info:?}"
                    );
                }
                Kind::Close => closes += 1,
                Kind::Data => streams
                    .entry((r.conn, r.direction as u8))
                    .or_default()
                    .extend_from_slice(&r.body),
                Kind::Loss => anyhow::bail!("{what}: a loss was recorded: {:?}", r.loss_info()),
            }
        }
        ensure!(
            opens == 4 && closes == 4,
            "{what}: {opens} opens, {closes} closes"
        );
        let requests: Vec<String> = streams
            .iter()
            .filter(|((_, d), _)| *d == Direction::Ingress as u8)
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        let responses: Vec<String> = streams
            .iter()
            .filter(|((_, d), _)| *d == Direction::Egress as u8)
            .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
            .collect();
        ensure!(
            requests.len() == 4 && responses.len() == 4,
            "{what}: {streams:?}"
        );
        for line in &sent {
            ensure!(
                requests
                    .iter()
                    .filter(|r| r.starts_with(line.as_str()))
                    .count()
                    == 1,
                "{what}: `{line}` recorded {} times: {requests:#?}",
                requests
                    .iter()
                    .filter(|r| r.starts_with(line.as_str()))
                    .count()
            );
        }
        for r in &requests {
            ensure!(
                r.contains("Authorization: ********")
                    && r.contains("Cookie: ****")
                    && r.contains("X-Api-Key: ****")
                    && r.contains("Host: localhost"),
                "{what}: request not recorded as sent (masked): {r}"
            );
        }
        ensure!(
            requests
                .iter()
                .filter(|r| r.contains(r#""password":"************""#) && r.contains("bob"))
                .count()
                == 2,
            "{what}: JSON bodies: {requests:#?}"
        );
        for r in &responses {
            ensure!(
                r.starts_with("HTTP/1.1 200 OK") && r.ends_with("captured ok\n"),
                "{what}: {r}"
            );
        }
        for bytes in streams.values() {
            let text = String::from_utf8_lossy(bytes);
            for s in SECRETS {
                ensure!(!text.contains(s), "{what}: the capture holds {s}: {text}");
            }
        }
        // Replayed against the same nginx: every recorded request answered as it was.
        let replayed = bakeoff_replay::replay(
            bakeoff_replay::sessions(
                CaptureReader::new(std::fs::File::open(&file)?)?.collect::<Result<Vec<_>, _>>()?,
            )
            .into_iter()
            // The plain-HTTP port's sessions (the HTTPS ones need TLS to be replayed).
            .filter(|s| s.requests.iter().all(|r| r.path.starts_with("/r/http-")))
            .collect(),
            &bakeoff_replay::ReplayOptions {
                target: format!("127.0.0.1:{port}").parse()?,
                concurrency: 2,
                allow_writes: true,
                timeout: Duration::from_secs(10),
                timing: bakeoff_replay::Timing::AsFast,
                noise: Default::default(),
            },
        );
        ensure!(
            replayed.outcomes.len() == 2
                && replayed
                    .outcomes
                    .iter()
                    .all(|o| o.status == Some(200) && o.body_bytes == 12 && o.error.is_none()),
            "{what}: replay: {replayed:?}"
        );
        ensure!(
            result.counter(&["recording", "bytes_lost"]) == 0
                && result.counter(&["recording", "connections"]) == 4
                && result.counter(&["recording", "fields_masked"]) >= 4 * 3 + 2 + 4,
            "{what}: {}",
            result.stats["recording"]
        );
    }
    Ok(())
}

/// Every file under `dir` (recursively), as bytes.
fn files(dir: &Path) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)?.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files(&p)?);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
    Ok(out)
}

/// `bakeoff capture start` through the collector: the probe (mutual TLS, control channel)
/// records the cohort's next requests, redacts them, streams them to the collector, which
/// writes the capture; the CLI follows it to its end and downloads it. Secrets never reach the
/// collector: not in the capture, not in its database, logs or audit log. The audit log names
/// the commands and the probe's certificate; a cohort no probe watches is refused by name.
#[test]
fn a_capture_asked_of_the_collector_is_recorded_by_the_probe_and_never_holds_secrets() -> Result<()>
{
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "this test loads eBPF programs: run it as root (cargo xtask test)"
    );
    let dir = scratch_dir("capture-remote")?;
    let collector_dir = dir.join("collector");
    std::fs::create_dir_all(&collector_dir)?;
    let pki = Pki::create(&dir)?;
    let cg = Cgroup::create(&format!("bakeoff-capture-remote-{}", std::process::id()))?;
    let (_nginx, port, tls_port) = start_nginx(&dir, &cg, &pki)?;
    let p = |f: &Path| f.display().to_string();
    let collector = bakeoff_testkit::collector::Collector::start_with(
        &collector_dir,
        free_port(),
        free_port(),
        &[
            "--tls-cert".into(),
            p(&pki.server_cert),
            "--tls-key".into(),
            p(&pki.server_key),
            "--tls-client-ca".into(),
            p(&pki.ca),
        ],
    )?;
    let api = format!("http://127.0.0.1:{}", collector.http_port);
    let probe = ProbeRun::start(
        &dir,
        &[
            "--experiment".into(),
            "shop".into(),
            "--cohort".into(),
            format!("canary=cgroup:{}", cg.path().display()),
            "--collector".into(),
            format!("https://localhost:{}", collector.grpc_port),
            "--collector-ca".into(),
            p(&pki.ca),
            "--collector-cert".into(),
            p(&pki.client_cert),
            "--collector-key".into(),
            p(&pki.client_key),
            "--redact-header".into(),
            "X-Api-Key".into(),
            "--payload-prefix".into(),
            "4096".into(),
            "--tls-plaintext".into(),
        ],
    )?;
    // The probe's control channel is up when the collector lists it.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = collector.get("/api/v1/captures")?;
        if list["probes"].as_array().is_some_and(|p| !p.is_empty()) {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "no control channel: {list}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let bakeoff = bakeoff_testkit::process::bin("bakeoff")?;
    // A cohort no probe watches: refused, naming what is connected.
    let out = Command::new(&bakeoff)
        .args(["capture", "start", "--api", &api, "--experiment", "shop"])
        .args(["--cohort", "nobody", "--max-requests", "1"])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && err.contains("409") && err.contains("cohorts [\"canary\"]"),
        "unwatched cohort: {err}"
    );

    let file = dir.join("remote.bkcap");
    let cli = Command::new(&bakeoff)
        .args(["capture", "start", "--api", &api, "--experiment", "shop"])
        .args(["--cohort", "canary", "--max-requests", "8"])
        .args(["--redact-json", "password", "--json", "-o"])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // The probe confirms the capture, then traffic: 8 requests on 8 connections.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let list = collector.get("/api/v1/captures")?;
        if list["captures"][0]["probes"][0]["confirmed"] == true {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "the probe never confirmed the capture: {list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sent = Vec::new();
    for round in 0..2 {
        for (scheme, p) in [("http", port), ("https", tls_port)] {
            for post in [false, true] {
                let target = format!("/r/{scheme}-{}-{round}", if post { "post" } else { "get" });
                curl(&format!("{scheme}://localhost:{p}{target}"), &pki.ca, post)?;
                sent.push(target);
            }
        }
    }
    let out = bakeoff_testkit::process::wait_output(cli, Duration::from_secs(60))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "capture start: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_str(&stdout)?;
    ensure!(
        info["state"] == "done"
            && info["requests"].as_u64() == Some(8)
            && info["probes"][0]["state"] == "done"
            && info["probes"][0]["identity"]
                .as_str()
                .is_some_and(|i| i.starts_with("cert-sha256:"))
            && info["losses"]
                .as_object()
                .is_some_and(|l| l.values().all(|v| v == 0)),
        "{info:#}"
    );
    // The downloaded capture: every request and response, redacted.
    let reader = CaptureReader::new(std::fs::File::open(&file)?)?;
    ensure!(
        reader.meta().cohort == "canary" && reader.meta().experiment == "shop",
        "{:?}",
        reader.meta()
    );
    let mut streams: BTreeMap<(u64, u8), Vec<u8>> = BTreeMap::new();
    for r in reader {
        let r = r?;
        if r.kind == Kind::Data {
            streams
                .entry((r.conn, r.direction as u8))
                .or_default()
                .extend_from_slice(&r.body);
        }
    }
    let requests: Vec<String> = streams
        .iter()
        .filter(|((_, d), _)| *d == Direction::Ingress as u8)
        .map(|(_, b)| String::from_utf8_lossy(b).into_owned())
        .collect();
    for target in &sent {
        ensure!(
            requests
                .iter()
                .filter(|r| r.contains(target.as_str()))
                .count()
                == 1,
            "{target} not recorded once: {requests:#?}"
        );
    }
    ensure!(
        requests
            .iter()
            .filter(|r| r.contains(r#""password":"************""#))
            .count()
            == 4
            && requests.iter().all(|r| r.contains("X-Api-Key: ****")),
        "{requests:#?}"
    );
    // `capture ls` lists it.
    let ls = Command::new(&bakeoff)
        .args(["capture", "ls", "--api", &api])
        .output()?;
    let ls = String::from_utf8_lossy(&ls.stdout);
    ensure!(
        ls.contains(info["id"].as_str().unwrap_or("?")) && ls.contains("done"),
        "{ls}"
    );
    // A capture without limits runs until stopped: `--detach` gives its id, `capture stop`
    // ends it (the probe's last status says why), `capture status` shows it.
    let out = Command::new(&bakeoff)
        .args(["capture", "start", "--api", &api, "--experiment", "shop"])
        .args(["--cohort", "canary", "--protocol", "http1", "--detach"])
        .output()?;
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    ensure!(
        out.status.success() && id.starts_with("cap-"),
        "detach: {id}"
    );
    curl(
        &format!("http://localhost:{port}/r/after-detach"),
        &pki.ca,
        false,
    )?;
    let out = Command::new(&bakeoff)
        .args(["capture", "stop", "--api", &api, &id])
        .output()?;
    ensure!(
        out.status.success(),
        "stop: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(&bakeoff)
        .args(["capture", "status", "--json", "--api", &api, &id])
        .output()?;
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        stopped["state"] == "done"
            && stopped["probes"][0]["reason"] == "stopped"
            && stopped["spec"]["protocol"] == "http1"
            && stopped["requests"].as_u64().is_some_and(|n| n >= 1),
        "{stopped:#}"
    );
    probe.stop()?;
    drop(collector);
    // Nothing the collector holds carries a secret: capture, database, logs, audit log.
    let held = files(&collector_dir)?;
    ensure!(
        held.len() >= 4,
        "collector files: {:?}",
        held.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (path, bytes) in &held {
        let text = String::from_utf8_lossy(bytes);
        for s in SECRETS {
            ensure!(!text.contains(s), "{} holds {s}", path.display());
        }
        // Compressed captures are checked decompressed.
        if path.extension().is_some_and(|e| e == "bkcap") {
            for r in CaptureReader::new(std::fs::File::open(path)?)? {
                let body = String::from_utf8_lossy(&r?.body).into_owned();
                for s in SECRETS {
                    ensure!(!body.contains(s), "{} holds {s}", path.display());
                }
            }
        }
    }
    // The audit log: the start and the download, by the API's caller, with the probe named
    // by its certificate.
    let audit = Command::new(&bakeoff)
        .args(["audit", "--json", "--log"])
        .arg(collector_dir.join("audit.log"))
        .output()?;
    let audit_text = String::from_utf8_lossy(&audit.stdout);
    ensure!(
        audit.status.success()
            && audit_text.contains("capture.start")
            && audit_text.contains("capture.get")
            && audit_text.contains("cert-sha256:"),
        "audit: {audit_text}{}",
        String::from_utf8_lossy(&audit.stderr)
    );
    Ok(())
}

//! The query API protected: a real collector serving its HTTP API over mutual TLS with bearer
//! tokens from a file, and the same tokens on the gRPC Query service. Raw events need a `full`
//! token or a client certificate from the client CA; a `read` token gets verdicts only;
//! `/healthz` stays open; plain HTTP to the TLS port gets nothing; the CLI works with
//! `--token-file` and `--ca`. A bad tokens file stops the start, naming the file and line.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};
use bakeoff_proto::v1::{
    EventBatch, EventsRequest, FieldEquals, IngestRequest, ProbeHello, RequestEvent, Selection,
    VerdictRequest, ingest_client::IngestClient, ingest_request::Message,
    query_client::QueryClient,
};
use bakeoff_testkit::{
    collector::Collector,
    process::{bin, free_port, scratch_dir, wait_for},
    tls::Pki,
};

const READ: &str = "read-token-5f0c3a9d1e7b4c28";
const FULL: &str = "full-token-b81e6d02a4f97c35";
const EXPERIMENT: &str = "auth-it";
/// Requests per cohort.
const N: usize = 150;

/// Status, `WWW-Authenticate` and body of a GET (whatever the status).
fn get(
    agent: &ureq::Agent,
    url: &str,
    token: Option<&str>,
) -> Result<(u16, Option<String>, String)> {
    let mut req = agent.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let mut resp = req.call().with_context(|| format!("GET {url}"))?;
    let challenge = resp
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((
        resp.status().as_u16(),
        challenge,
        resp.body_mut().read_to_string()?,
    ))
}

/// Baseline and canary requests of one experiment, a few seconds old, and one request of
/// another experiment half a second old: the probe's event time, so the judge closes the
/// experiment's seconds at once.
fn ingest(grpc_port: u16) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let mut events: Vec<RequestEvent> = (0..2 * N)
        .map(|i| RequestEvent {
            experiment: EXPERIMENT.into(),
            cohort: ["baseline", "canary"][i % 2].into(),
            method: "GET".into(),
            path: "/checkout".into(),
            status: Some(200),
            start_unix_ns: now - 3_000_000_000 + i as u64 * 1_000_000,
            duration_ns: 2_000_000 + (i as u64 % 7) * 100_000,
            request_id: format!("r{i}"),
            ..RequestEvent::default()
        })
        .collect();
    events.push(RequestEvent {
        experiment: "auth-it-clock".into(),
        cohort: "baseline".into(),
        start_unix_ns: now - 500_000_000,
        ..RequestEvent::default()
    });
    let msgs = vec![
        IngestRequest {
            message: Some(Message::Hello(ProbeHello {
                probe_id: "auth-it".into(),
                protocol_version: bakeoff_proto::PROTOCOL_VERSION,
                ..ProbeHello::default()
            })),
        },
        IngestRequest {
            message: Some(Message::Batch(EventBatch {
                sequence: 1,
                events,
            })),
        },
    ];
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut client = IngestClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
        let mut acks = client.stream(tokio_stream::iter(msgs)).await?.into_inner();
        // The resume point, then the batch.
        while let Some(a) = acks.message().await? {
            if a.stored_sequence == 1 {
                return Ok(());
            }
        }
        anyhow::bail!("the collector closed the stream before acknowledging the batch")
    })
}

/// The gRPC Query calls: Events without a token, with a read token and with a full one;
/// Verdict with a read token.
fn grpc_checks(grpc_port: u16) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let mut q = QueryClient::connect(format!("http://127.0.0.1:{grpc_port}")).await?;
        let events = |token: Option<&str>| {
            let mut r = tonic::Request::new(EventsRequest {
                selection: Some(Selection {
                    equals: vec![FieldEquals {
                        field: "experiment".into(),
                        value: EXPERIMENT.into(),
                    }],
                    ..Selection::default()
                }),
                limit: 10_000,
            });
            if let Some(t) = token {
                r.metadata_mut().insert(
                    "authorization",
                    format!("Bearer {t}").parse().expect("ASCII token"),
                );
            }
            r
        };
        let refused = q.events(events(None)).await.expect_err("no token");
        ensure!(
            refused.code() == tonic::Code::Unauthenticated,
            "without a token: {refused:?}"
        );
        let refused = q.events(events(Some(READ))).await.expect_err("read token");
        ensure!(
            refused.code() == tonic::Code::PermissionDenied && refused.message().contains("`full`"),
            "with a read token: {refused:?}"
        );
        let got = q.events(events(Some(FULL))).await?.into_inner().events;
        ensure!(got.len() == 2 * N, "{} events over gRPC", got.len());
        let mut v = tonic::Request::new(VerdictRequest {
            experiment: EXPERIMENT.into(),
            ..VerdictRequest::default()
        });
        v.metadata_mut()
            .insert("authorization", format!("Bearer {READ}").parse()?);
        let verdict = q.verdict(v).await?.into_inner();
        ensure!(
            verdict.canary_requests == N as u64 && verdict.baseline_requests == N as u64,
            "{verdict:?}"
        );
        anyhow::Ok(())
    })
}

/// The start of a long body, for failure messages.
fn short(s: &str) -> String {
    s.chars().take(300).collect()
}

fn run(cmd: &mut Command) -> Result<(i32, String, String)> {
    let out = cmd.output()?;
    Ok((
        out.status.code().context("killed by a signal")?,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[test]
fn the_query_api_needs_tls_and_a_token_of_the_right_scope() -> Result<()> {
    let dir = scratch_dir("api-auth")?;
    let pki = Pki::create(&dir)?;
    let tokens = dir.join("tokens");
    std::fs::write(
        &tokens,
        format!("# verdict consumers\nread {READ}\n\n# people\nfull {FULL}\n"),
    )?;
    let path = |p: &Path| p.display().to_string();
    let collector = Collector::start_with(
        &dir,
        free_port(),
        free_port(),
        &[
            "--http-tls-cert".into(),
            path(&pki.server_cert),
            "--http-tls-key".into(),
            path(&pki.server_key),
            "--http-client-ca".into(),
            path(&pki.ca),
            "--api-tokens".into(),
            path(&tokens),
            "--judge-lag".into(),
            "0".into(),
        ],
    )?;
    let api = format!("https://127.0.0.1:{}", collector.http_port);
    let events_url = format!("{api}/api/v1/events?experiment={EXPERIMENT}&limit=1000");
    let verdict_url = format!("{api}/api/v1/verdict?experiment={EXPERIMENT}");
    let agent = pki.agent(None)?;

    // Probes and kubelet need no token.
    let (status, _, body) = get(&agent, &format!("{api}/healthz"), None)?;
    ensure!(
        status == 200 && body == "ok\n",
        "/healthz: {status} {}",
        short(&body)
    );
    let (status, _, body) = get(&agent, &format!("{api}/metrics"), None)?;
    ensure!(
        status == 200 && body.contains("bakeoff_collector"),
        "/metrics: {status}"
    );

    ingest(collector.grpc_port)?;

    // No token, an unknown token: 401 with a Bearer challenge.
    let (status, challenge, body) = get(&agent, &events_url, None)?;
    ensure!(
        status == 401
            && challenge.as_deref() == Some(r#"Bearer realm="bakeoff""#)
            && body.contains("authentication required"),
        "no token: {status} {challenge:?} {}",
        short(&body)
    );
    let (status, challenge, _) = get(&agent, &events_url, Some("not-a-token-0123456789"))?;
    ensure!(
        status == 401
            && challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer") && c.contains("invalid_token")),
        "unknown token: {status} {challenge:?}"
    );

    // A full token reads the raw events.
    let mut stored = Vec::new();
    wait_for("events stored", Duration::from_secs(30), || {
        stored = get(&agent, &events_url, Some(FULL))
            .ok()
            .filter(|(s, _, _)| *s == 200)
            .and_then(|(_, _, b)| serde_json::from_str::<Vec<serde_json::Value>>(&b).ok())
            .unwrap_or_default();
        stored.len() == 2 * N
    })?;
    ensure!(
        stored
            .iter()
            .all(|e| e["experiment"] == EXPERIMENT && e["path"] == "/checkout"),
        "{:?}",
        stored.first()
    );

    // A read token: the verdict yes (once the judge has closed the experiment's seconds), raw
    // events no (403 naming the scope needed).
    let mut last = (0, String::new());
    wait_for("the verdict", Duration::from_secs(30), || {
        if let Ok((status, _, body)) = get(&agent, &verdict_url, Some(READ)) {
            last = (status, body);
        }
        serde_json::from_str::<serde_json::Value>(&last.1).is_ok_and(|v| {
            v["experiment"] == EXPERIMENT
                && v["requests"]["canary"] == N as u64
                && v["requests"]["baseline"] == N as u64
        })
    })
    .with_context(|| format!("verdict with a read token: {} {}", last.0, short(&last.1)))?;
    ensure!(last.0 == 200, "verdict: {}", last.0);
    let (status, challenge, body) = get(&agent, &events_url, Some(READ))?;
    ensure!(
        status == 403
            && body.contains("scope `full`")
            && challenge
                .as_deref()
                .is_some_and(|c| c.contains(r#"error="insufficient_scope", scope="full""#)),
        "events with a read token: {status} {challenge:?} {}",
        short(&body)
    );
    let (status, _, _) = get(
        &agent,
        &format!("{api}/api/v1/groups?by=cohort"),
        Some(READ),
    )?;
    ensure!(status == 403, "groups with a read token: {status}");

    // Flagger sends no headers: its token comes in the metadata.
    let flagger = |metadata: serde_json::Value| -> Result<u16> {
        let resp = agent
            .post(&format!("{api}/api/v1/flagger"))
            .send_json(serde_json::json!({ "name": EXPERIMENT, "metadata": metadata }))?;
        Ok(resp.status().as_u16())
    };
    let with_token = flagger(serde_json::json!({ "token": READ }))?;
    ensure!(
        with_token == 200 || with_token == 412,
        "flagger with a token: {with_token}"
    );
    let without = flagger(serde_json::json!({}))?;
    ensure!(without == 401, "flagger without a token: {without}");

    // A client certificate from the client CA counts as full; one from another CA fails the
    // handshake.
    let (status, _, body) = get(
        &pki.agent(Some((&pki.client_cert, &pki.client_key)))?,
        &events_url,
        None,
    )?;
    let n = serde_json::from_str::<Vec<serde_json::Value>>(&body).map_or(0, |v| v.len());
    ensure!(
        status == 200 && n == 2 * N,
        "client certificate: {status}, {n} events"
    );
    let rogue = get(
        &pki.agent(Some((&pki.rogue_cert, &pki.rogue_key)))?,
        &events_url,
        None,
    );
    ensure!(rogue.is_err(), "a rogue certificate got {rogue:?}");

    // Plain HTTP to the TLS port gets no answer at all.
    let plain = get(
        &ureq::agent(),
        &format!("http://127.0.0.1:{}/healthz", collector.http_port),
        None,
    );
    ensure!(plain.is_err(), "plain HTTP got {plain:?}");

    grpc_checks(collector.grpc_port)?;

    // The CLI with --token-file and --ca.
    let read_file = dir.join("read-token");
    std::fs::write(&read_file, format!("{READ}\n"))?;
    let cli = |args: &[&str]| {
        let mut c = Command::new(bin("bakeoff").expect("bakeoff built"));
        c.args(args)
            .args(["--api", &api, "--ca", &path(&pki.ca)])
            .env_remove("BAKEOFF_TOKEN_FILE");
        c
    };
    let (code, stdout, stderr) =
        run(cli(&["verdict", EXPERIMENT, "--json"]).args(["--token-file", &path(&read_file)]))?;
    let json: serde_json::Value = serde_json::from_str(&stdout)
        .with_context(|| format!("exit {code}: {} {stderr}", short(&stdout)))?;
    ensure!(
        (0..=2).contains(&code)
            && json["experiment"] == EXPERIMENT
            && json["requests"]["baseline"] == N as u64,
        "bakeoff verdict --token-file: exit {code}: {} {stderr}",
        short(&stdout)
    );
    let (code, _, stderr) = run(&mut cli(&["verdict", EXPERIMENT]))?;
    ensure!(
        code == 3 && stderr.contains("401") && stderr.contains("authentication required"),
        "bakeoff verdict without a token: exit {code}: {stderr}"
    );
    let (code, _, stderr) = run(
        cli(&["events", "--where", &format!("experiment={EXPERIMENT}")])
            .env("BAKEOFF_TOKEN_FILE", &read_file),
    )?;
    ensure!(
        code == 1 && stderr.contains("403") && stderr.contains("scope `full`"),
        "bakeoff events with a read token: exit {code}: {stderr}"
    );
    let full_file = dir.join("full-token");
    std::fs::write(&full_file, FULL)?;
    let (code, stdout, stderr) = run(cli(&[
        "events",
        "--where",
        &format!("experiment={EXPERIMENT}"),
        "--json",
        "--limit",
        "1000",
    ])
    .args(["--token-file", &path(&full_file)]))?;
    let n = serde_json::from_str::<Vec<serde_json::Value>>(&stdout).map_or(0, |v| v.len());
    ensure!(
        code == 0 && n == 2 * N,
        "bakeoff events with a full token: exit {code}, {n} events: {stderr}"
    );

    drop(collector);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A tokens file the collector cannot use stops the start, naming the file and the line.
#[test]
fn a_bad_tokens_file_stops_the_start() -> Result<()> {
    let dir = scratch_dir("api-auth-bad")?;
    let serve = |tokens: &Path| -> Result<(i32, String)> {
        let (code, _, stderr) = run(Command::new(bin("bakeoff")?)
            .args(["serve", "--grpc-listen", "127.0.0.1:0"])
            .args(["--http-listen", "127.0.0.1:0"])
            .arg("--db")
            .arg(dir.join("x.duckdb"))
            .arg("--api-tokens")
            .arg(tokens))?;
        Ok((code, stderr))
    };
    let bad = dir.join("bad-tokens");
    std::fs::write(&bad, format!("read {READ}\n# ok so far\nadmin {FULL}\n"))?;
    let (code, stderr) = serve(&bad)?;
    let expected = format!("{}:3: unknown scope `admin` (read or full)", bad.display());
    ensure!(
        code == 1 && stderr.contains(&expected),
        "exit {code}: {stderr}"
    );
    let empty = dir.join("empty-tokens");
    std::fs::write(&empty, "# nothing yet\n")?;
    let (code, stderr) = serve(&empty)?;
    ensure!(
        code == 1 && stderr.contains(&format!("{}: no tokens", empty.display())),
        "exit {code}: {stderr}"
    );
    let missing = dir.join("missing-tokens");
    let (code, stderr) = serve(&missing)?;
    ensure!(
        code == 1
            && stderr.contains(&format!(
                "cannot read the API tokens file {}",
                missing.display()
            )),
        "exit {code}: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! kernel -> probe -> collector over loopback, on the real kernel and a real DuckDB file:
//! every request stored once with the probe's fields, across a collector SIGKILL and restart;
//! drops counted exactly when the collector is away too long; bad streams refused clearly.

use std::{
    collections::HashMap,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_proto::v1::{
    EventBatch, IngestRequest, ProbeHello, RequestEvent, ingest_client::IngestClient,
    ingest_request::Message,
};
use bakeoff_testkit::{
    cgroup::Cgroup,
    clickhouse::ClickHouse,
    client::{Conn, Request},
    collector::Collector,
    metrics::{sample, scrape},
    process::{Guard, bin, free_port, scratch_dir, wait_for},
};

fn probe(dir: &Path, cg: &Cgroup, extra: &[&str]) -> Result<Guard> {
    let ready = dir.join("ready");
    let g = Guard::spawn(
        "bakeoff-probe",
        Command::new(bin("bakeoff-probe")?)
            .args(["--experiment", "collector-it"])
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", cg.path().display()))
            .arg("--stats-file")
            .arg(dir.join("probe-stats.json"))
            .arg("--ready-file")
            .arg(&ready)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;
    Ok(g)
}

fn send(port: u16, prefix: &str, range: std::ops::Range<usize>) -> Result<Vec<String>> {
    let mut conn = Conn::connect(port)?;
    range
        .map(|i| {
            let id = format!("{prefix}-{i}");
            let path = ["/", "/bytes/100", "/status/503"][i % 3];
            conn.request(&Request::get(path, &id))?;
            Ok(id)
        })
        .collect()
}

fn stats(dir: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(
        dir.join("probe-stats.json"),
    )?)?)
}

#[test]
fn events_survive_a_collector_kill_and_are_stored_exactly_once() -> Result<()> {
    survive_a_kill("coll-e2e", false)
}

#[test]
fn events_survive_a_collector_kill_with_clickhouse_storage() -> Result<()> {
    survive_a_kill("coll-e2e-ch", true)
}

/// The same run against either backend; with ClickHouse the server keeps running while the
/// collector in front of it is killed and restarted.
fn survive_a_kill(name: &str, clickhouse: bool) -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let dir = scratch_dir(name)?;
    let cg = Cgroup::create(&format!("bakeoff-{name}-{}", std::process::id()))?;
    let (_server, port) = cg.spawn_test_server("")?;
    let ch = if clickhouse {
        Some(ClickHouse::start(&dir)?)
    } else {
        None
    };
    let args: Vec<String> = match &ch {
        Some(ch) => vec!["--clickhouse".into(), ch.url()],
        None => vec![],
    };
    let mut collector = Collector::start_with(&dir, free_port(), free_port(), &args)?;
    let jsonl = dir.join("events.jsonl");
    let mut probe = probe(
        &dir,
        &cg,
        &[
            "--collector",
            &collector.endpoint(),
            "--batch-size",
            "7",
            "--spool-dir",
            dir.join("spool").to_str().context("path")?,
            "--output",
            jsonl.to_str().context("path")?,
        ],
    )?;
    let mut ids = send(port, "k", 0..40)?;
    // Give the first batches time to be acknowledged, then kill the collector mid-stream.
    std::thread::sleep(Duration::from_millis(800));
    collector.kill()?;
    ids.extend(send(port, "k", 40..70)?);
    std::thread::sleep(Duration::from_millis(500));
    let collector = collector.restart(&dir)?;
    ids.extend(send(port, "k", 70..100)?);
    std::thread::sleep(Duration::from_millis(500));
    let status = probe.stop(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "probe failed: {}",
        std::fs::read_to_string(dir.join("probe.log"))?
    );

    let stored = collector.get("/api/v1/events?experiment=collector-it&limit=10000")?;
    let stored = stored.as_array().context("events array")?;
    let mut by_id: HashMap<&str, Vec<&serde_json::Value>> = HashMap::new();
    for e in stored {
        by_id
            .entry(e["request_id"].as_str().unwrap_or(""))
            .or_default()
            .push(e);
    }
    let local: Vec<serde_json::Value> = std::fs::read_to_string(&jsonl)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    ensure!(
        local.len() == ids.len(),
        "probe wrote {} events for {} requests",
        local.len(),
        ids.len()
    );
    for e in &local {
        let id = e["request_id"].as_str().context("request id")?;
        let got = by_id.get(id).map(Vec::as_slice).unwrap_or_default();
        ensure!(got.len() == 1, "request {id} stored {} times", got.len());
        let s = got[0];
        for field in [
            "cohort",
            "method",
            "path",
            "status",
            "duration_ns",
            "bytes_in",
            "bytes_out",
            "pid",
            "exe",
            "peer",
            "start_unix_ns",
        ] {
            ensure!(
                s[field] == e[field],
                "{id}: stored {field} {} != probe's {}",
                s[field],
                e[field]
            );
        }
    }
    ensure!(
        stored.len() == ids.len(),
        "{} stored for {} requests",
        stored.len(),
        ids.len()
    );

    // Group-by from the query API agrees with what was sent.
    let groups = collector.get("/api/v1/groups?by=cohort,path&experiment=collector-it")?;
    let errors: u64 = groups
        .as_array()
        .context("groups")?
        .iter()
        .filter(|g| g["key"][1] == "/status/503")
        .map(|g| g["errors"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        errors == 33,
        "503s counted as errors: {errors} (groups: {groups})"
    );
    // Endpoints per cohort: 3 paths, each hit by a third of the requests.
    let endpoints = collector.get("/api/v1/endpoints?experiment=collector-it")?;
    let endpoints = endpoints.as_array().context("endpoints")?;
    ensure!(
        endpoints.len() == 3
            && endpoints.iter().all(|e| e["key"][1] == "canary"
                && e["key"][2] == "GET"
                && e["requests"].as_u64().is_some_and(|n| n >= 33)),
        "{endpoints:?}"
    );

    // The gRPC query service answers the same as the HTTP API.
    check_grpc_queries(&collector, stored, &groups)?;

    let s = stats(&dir)?;
    ensure!(
        s["export"]["dropped_spool_full"] == 0 && s["export"]["dropped_channel_full"] == 0,
        "{s}"
    );
    ensure!(s["export"]["reconnects"].as_u64() >= Some(2), "{s}");
    drop(collector);
    drop(ch);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn check_grpc_queries(
    collector: &Collector,
    http_events: &[serde_json::Value],
    http_groups: &serde_json::Value,
) -> Result<()> {
    use bakeoff_proto::v1::{
        EventsRequest, ExperimentsRequest, FieldEquals, GroupsRequest, Selection,
        query_client::QueryClient,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut q = QueryClient::connect(collector.endpoint()).await?;
        let selection = Some(Selection {
            equals: vec![FieldEquals {
                field: "experiment".into(),
                value: "collector-it".into(),
            }],
            ..Selection::default()
        });
        let events = q
            .events(EventsRequest {
                selection: selection.clone(),
                limit: 10_000,
            })
            .await?
            .into_inner()
            .events;
        ensure!(
            events.len() == http_events.len(),
            "gRPC {} events, HTTP {}",
            events.len(),
            http_events.len()
        );
        let by_id: HashMap<String, &bakeoff_proto::v1::RequestEvent> = events
            .iter()
            .filter_map(|e| e.event.as_ref().map(|ev| (ev.request_id.clone(), ev)))
            .collect();
        for h in http_events {
            let id = h["request_id"].as_str().context("id")?;
            let g = by_id
                .get(id)
                .with_context(|| format!("{id} missing over gRPC"))?;
            ensure!(
                g.path == h["path"]
                    && u64::from(g.status.unwrap_or(0)) == h["status"].as_u64().unwrap_or(0)
                    && g.duration_ns == h["duration_ns"]
                    && g.bytes_out == h["bytes_out"]
                    && g.cohort == h["cohort"],
                "{id}: gRPC {g:?} != HTTP {h}"
            );
        }
        let groups = q
            .groups(GroupsRequest {
                selection,
                by: vec!["cohort".into(), "path".into()],
            })
            .await?
            .into_inner()
            .groups;
        let http_groups = http_groups.as_array().context("groups")?;
        ensure!(
            groups.len() == http_groups.len(),
            "{groups:?} vs {http_groups:?}"
        );
        for (g, h) in groups.iter().zip(http_groups) {
            let key: Vec<Option<String>> = g.key.iter().map(|k| k.value.clone()).collect();
            let hkey: Vec<Option<String>> = serde_json::from_value(h["key"].clone())?;
            ensure!(
                key == hkey
                    && g.requests == h["requests"]
                    && g.errors == h["errors"]
                    && (g.p99_ms - h["p99_ms"].as_f64().unwrap_or(f64::NAN)).abs() < 1e-9,
                "gRPC {g:?} != HTTP {h}"
            );
        }
        let experiments = q
            .experiments(ExperimentsRequest {})
            .await?
            .into_inner()
            .groups;
        ensure!(
            experiments
                .iter()
                .any(
                    |g| g.key.first().and_then(|k| k.value.as_deref()) == Some("collector-it")
                        && g.requests == http_events.len() as u64
                ),
            "{experiments:?}"
        );
        // A bad field is INVALID_ARGUMENT, with the field named.
        let bad = q
            .groups(GroupsRequest {
                selection: None,
                by: vec!["nope".into()],
            })
            .await
            .err()
            .context("a bad field was accepted")?;
        ensure!(
            bad.code() == tonic::Code::InvalidArgument && bad.message().contains("nope"),
            "{bad:?}"
        );
        Ok(())
    })
}

#[test]
fn a_collector_away_too_long_costs_an_exactly_counted_number_of_events() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let dir = scratch_dir("coll-drop")?;
    let cg = Cgroup::create(&format!("bakeoff-coll-drop-{}", std::process::id()))?;
    let (_server, port) = cg.spawn_test_server("")?;
    let (grpc_port, http_port) = (free_port(), free_port());
    // No collector yet; memory for two batches of five, no spool.
    let metrics_port = free_port();
    let mut probe = probe(
        &dir,
        &cg,
        &[
            "--collector",
            &format!("http://127.0.0.1:{grpc_port}"),
            "--batch-size",
            "5",
            "--queue-batches",
            "2",
            "--metrics-listen",
            &format!("127.0.0.1:{metrics_port}"),
        ],
    )?;
    let sent = send(port, "d", 0..60)?.len() as u64;
    std::thread::sleep(Duration::from_millis(600));
    let collector = Collector::start_on(&dir, grpc_port, http_port)?;
    // The probe reconnects (backoff is at most 10 s), delivers what it kept, and reports health.
    wait_for("health from the probe", Duration::from_secs(30), || {
        collector
            .get("/api/v1/ingest")
            .is_ok_and(|v| v["probes"].as_object().is_some_and(|p| !p.is_empty()))
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let probe_metrics = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"))?;
    probe.stop(Duration::from_secs(30))?;
    let s = stats(&dir)?;
    let dropped = s["export"]["dropped_spool_full"]
        .as_u64()
        .context("dropped")?;
    let stored = collector.get("/api/v1/events?experiment=collector-it&limit=10000")?;
    let stored = stored.as_array().context("events")?.len() as u64;
    ensure!(dropped > 0, "nothing dropped: {s}");
    ensure!(
        stored + dropped == sent,
        "stored {stored} + dropped {dropped} != sent {sent}"
    );
    let ingest = collector.get("/api/v1/ingest")?;
    let health = ingest["probes"]
        .as_object()
        .context("probes")?
        .values()
        .next()
        .context("one probe")?;
    ensure!(
        health["dropped_events"]["spool_full"].as_u64() == Some(dropped),
        "health says {} dropped, the probe {dropped}",
        health["dropped_events"]
    );
    // The same exact count on both /metrics pages.
    let series = "bakeoff_probe_export_dropped_events_total{reason=\"spool_full\"}";
    ensure!(sample(&probe_metrics, series)? == dropped as f64);
    let collector_metrics = scrape(&format!("http://127.0.0.1:{}/metrics", collector.http_port))?;
    let probe_id = ingest["probes"]
        .as_object()
        .and_then(|p| p.keys().next().cloned())
        .context("probe id")?;
    let series = format!(
        "bakeoff_collector_probe_dropped_events_total{{probe=\"{probe_id}\",reason=\"spool_full\"}}"
    );
    ensure!(sample(&collector_metrics, &series)? == dropped as f64);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn hello(id: &str, version: u32) -> IngestRequest {
    IngestRequest {
        message: Some(Message::Hello(ProbeHello {
            probe_id: id.into(),
            protocol_version: version,
            ..ProbeHello::default()
        })),
    }
}

fn batch(seq: u64, n: usize, path_len: usize) -> IngestRequest {
    IngestRequest {
        message: Some(Message::Batch(EventBatch {
            sequence: seq,
            events: (0..n)
                .map(|i| RequestEvent {
                    experiment: "raw".into(),
                    cohort: "canary".into(),
                    path: format!("/{i}{}", "x".repeat(path_len)),
                    status: Some(200),
                    // Now, so the collector's retention keeps them.
                    start_unix_ns: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_nanos() as u64)
                        .unwrap_or(0),
                    ..RequestEvent::default()
                })
                .collect(),
        })),
    }
}

#[test]
fn bad_streams_get_clear_statuses_and_do_not_disturb_others() -> Result<()> {
    let dir = scratch_dir("coll-bad")?;
    let collector = Collector::start(&dir)?;
    let endpoint = collector.endpoint();
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async move {
        let mut good = IngestClient::connect(endpoint.clone()).await?;
        let (good_tx, rx) = tokio::sync::mpsc::channel(8);
        good_tx.send(hello("good", 1)).await?;
        good_tx.send(batch(1, 3, 0)).await?;
        let mut acks = good
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        // Acks: the resume point (0), then 1.
        ensure!(acks.message().await?.map(|a| a.stored_sequence) == Some(0));
        ensure!(acks.message().await?.map(|a| a.stored_sequence) == Some(1));

        let call = |msgs: Vec<IngestRequest>| {
            let endpoint = endpoint.clone();
            async move {
                let mut c = IngestClient::connect(endpoint)
                    .await?
                    .max_encoding_message_size(64 << 20);
                let result = match c.stream(tokio_stream::iter(msgs)).await {
                    Err(status) => Err(status),
                    Ok(resp) => {
                        let mut s = resp.into_inner();
                        loop {
                            match s.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => break Ok(()),
                                Err(status) => break Err(status),
                            }
                        }
                    }
                };
                anyhow::Ok(result)
            }
        };
        let no_hello = call(vec![batch(1, 1, 0)]).await?.unwrap_err();
        ensure!(
            no_hello.code() == tonic::Code::InvalidArgument,
            "{no_hello:?}"
        );
        ensure!(no_hello.message().contains("ProbeHello"), "{no_hello:?}");
        let version = call(vec![hello("v99", 99)]).await?.unwrap_err();
        ensure!(
            version.code() == tonic::Code::FailedPrecondition,
            "{version:?}"
        );
        ensure!(version.message().contains("version 99"), "{version:?}");
        let oversized = call(vec![hello("big", 1), batch(1, 20, 1 << 20)])
            .await?
            .unwrap_err();
        // tonic reports a message above the limit as OUT_OF_RANGE ("... length too large").
        ensure!(
            matches!(
                oversized.code(),
                tonic::Code::OutOfRange | tonic::Code::ResourceExhausted
            ) && oversized.message().contains("too large"),
            "{oversized:?}"
        );

        // The good stream still works, and a resent batch is not stored twice.
        good_tx.send(batch(2, 2, 0)).await?;
        ensure!(acks.message().await?.map(|a| a.stored_sequence) == Some(2));
        good_tx.send(batch(2, 2, 0)).await?;
        ensure!(acks.message().await?.map(|a| a.stored_sequence) == Some(2));
        anyhow::Ok(())
    })?;
    let stored = collector.get("/api/v1/events?probe_id=good&limit=100")?;
    ensure!(stored.as_array().map(Vec::len) == Some(5), "{stored}");
    let none = collector.get("/api/v1/events?probe_id=big&limit=100")?;
    ensure!(none.as_array().map(Vec::len) == Some(0), "{none}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// SIGKILL lands while batches are being appended (several times, at different moments); every
/// restart must open the DuckDB file, and it must hold exactly the batches up to the sequence it
/// acknowledges, each once, including every batch acknowledged before the kill.
#[test]
fn the_duckdb_file_opens_intact_after_kills_while_writing() -> Result<()> {
    let dir = scratch_dir("coll-kill-write")?;
    let mut collector = Collector::start(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    const EVENTS: usize = 4_000;
    let mut acked_before_kill = 0;
    for (round, kill_after_ms) in [150u64, 400, 50, 700].into_iter().enumerate() {
        // Resume where the collector says it is, then stream batches until the kill.
        let acked = rt.block_on(async {
            let mut client = IngestClient::connect(collector.endpoint()).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tx.send(hello("writer", bakeoff_proto::PROTOCOL_VERSION))
                .await?;
            let mut acks = client
                .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let resume = acks.message().await?.context("first ack")?.stored_sequence;
            ensure!(
                resume >= acked_before_kill,
                "round {round}: collector resumes at {resume}, but {acked_before_kill} was acknowledged before the kill"
            );
            if round > 0 {
                let stored = collector.get("/api/v1/groups?experiment=raw")?;
                let stored = stored[0]["requests"].as_u64().unwrap_or(0);
                ensure!(
                    stored == resume * EVENTS as u64,
                    "round {round}: {stored} events stored for {resume} acknowledged batches"
                );
            }
            let sender = tokio::spawn(async move {
                for seq in resume + 1..resume + 200 {
                    if tx.send(batch(seq, EVENTS, 40)).await.is_err() {
                        break;
                    }
                }
            });
            let mut last = resume;
            let deadline = tokio::time::sleep(Duration::from_millis(kill_after_ms));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    a = acks.message() => match a {
                        Ok(Some(a)) => last = last.max(a.stored_sequence),
                        _ => break,
                    },
                    _ = &mut deadline => break,
                }
            }
            sender.abort();
            anyhow::Ok(last)
        })?;
        eprintln!(
            "round {round}: {acked} batches acknowledged before the kill at {kill_after_ms} ms"
        );
        acked_before_kill = acked;
        collector.kill()?;
        collector = collector.restart(&dir)?;
    }
    // Distinct paths per batch: no event stored twice.
    let groups = collector.get("/api/v1/groups?experiment=raw&by=path")?;
    let groups = groups.as_array().context("groups")?;
    ensure!(
        groups
            .iter()
            .all(|g| g["requests"].as_u64() == groups[0]["requests"].as_u64()),
        "uneven batches: {groups:?}"
    );
    ensure!(
        acked_before_kill > 0,
        "nothing was acknowledged in the last round"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One probe's events of one cohort, sent to a collector: `n` requests that ended in the last
/// seconds, `slow` times the baseline's latency.
fn ingest_cohort(endpoint: String, probe: &str, cohort: &str, n: usize, slow: f64) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let events: Vec<RequestEvent> = (0..n)
        .map(|i| {
            // Deterministic spread of durations around 10 ms (4 to 16 ms).
            let ms = 4.0 + 12.0 * ((i * 7919) % 1000) as f64 / 1000.0;
            let duration_ns = (ms * slow * 1e6) as u64;
            RequestEvent {
                experiment: "shared".into(),
                cohort: cohort.into(),
                method: "GET".into(),
                path: ["/a", "/b"][i % 2].into(),
                status: Some(200),
                // Spread over the 4 seconds before now, ending then.
                start_unix_ns: now - 4_000_000_000 + (i as u64 * 4_000_000_000 / n as u64)
                    - duration_ns,
                duration_ns,
                ..RequestEvent::default()
            }
        })
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let probe = probe.to_string();
    rt.block_on(async move {
        let mut client = IngestClient::connect(endpoint).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(hello(&probe, bakeoff_proto::PROTOCOL_VERSION))
            .await?;
        let mut acks = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let batches: Vec<Vec<RequestEvent>> = events.chunks(500).map(<[_]>::to_vec).collect();
        let last = batches.len() as u64;
        for (i, events) in batches.into_iter().enumerate() {
            tx.send(IngestRequest {
                message: Some(Message::Batch(EventBatch {
                    sequence: i as u64 + 1,
                    events,
                })),
            })
            .await?;
        }
        while let Some(ack) = acks.message().await? {
            if ack.stored_sequence == last {
                return anyhow::Ok(());
            }
        }
        anyhow::bail!("the stream ended before batch {last} was acknowledged")
    })
}

/// Two collectors write one ClickHouse; one receives only the baseline's events, the other only
/// the canary's (the worst case: neither could judge alone). The verdict read from either covers
/// every event of both, and both say the same.
#[test]
fn two_collectors_on_one_clickhouse_judge_every_event() -> Result<()> {
    let dir = scratch_dir("coll-shared-ch")?;
    let server = ClickHouse::start(&dir)?;
    let args = [
        "--clickhouse".to_string(),
        server.url(),
        "--judge-lag".into(),
        "1".into(),
    ];
    let (da, db) = (dir.join("a"), dir.join("b"));
    std::fs::create_dir_all(&da)?;
    std::fs::create_dir_all(&db)?;
    let a = Collector::start_with(&da, free_port(), free_port(), &args)?;
    let b = Collector::start_with(&db, free_port(), free_port(), &args)?;
    let n = 3000;
    let (ea, eb) = (a.endpoint(), b.endpoint());
    let baseline = std::thread::spawn(move || ingest_cohort(ea, "probe-a", "baseline", n, 1.0));
    let canary = std::thread::spawn(move || ingest_cohort(eb, "probe-b", "canary", n, 2.0));
    baseline
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    canary
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    let path = "/api/v1/verdict?experiment=shared";
    let mut verdicts = Vec::new();
    for c in [&a, &b] {
        // Each collector closes a second once its probes moved past it, or once the store's
        // latest request has not moved for a while: bounded wait.
        wait_for(
            "the verdict to cover both collectors' events",
            Duration::from_secs(90),
            || {
                c.get(path).is_ok_and(|v| {
                    v["requests"]["canary"].as_u64() == Some(n as u64)
                        && v["requests"]["baseline"].as_u64() == Some(n as u64)
                })
            },
        )?;
        verdicts.push(c.get(path)?);
    }
    let summary = |v: &serde_json::Value| -> Vec<(String, String)> {
        v["metrics"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|m| (m["metric"].to_string(), m["decision"].to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    ensure!(
        verdicts[0]["decision"] == "fail" && verdicts[1]["decision"] == "fail",
        "a canary twice as slow: {:#}",
        verdicts[0]
    );
    ensure!(
        summary(&verdicts[0]) == summary(&verdicts[1]),
        "the collectors disagree: {:?} vs {:?}",
        summary(&verdicts[0]),
        summary(&verdicts[1])
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

//! The probe's exports over real channels: the collector behind mutual TLS, OTLP spans to a
//! receiver built on the official OTLP types, both at once, and `/metrics` of probe and
//! collector agreeing with what was sent.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_proto::v1::{IngestRequest, ingest_client::IngestClient, ingest_request::Message};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    collector::Collector,
    metrics::{sample, scrape},
    otlp::OtlpReceiver,
    process::{Guard, bin, free_port, scratch_dir, wait_for},
    tls::Pki,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;

/// Opens an ingest stream over TLS with the given client identity; Ok if the collector took it.
async fn try_stream(
    port: u16,
    pki: &Pki,
    identity: Option<(&PathBuf, &PathBuf)>,
) -> Result<(), String> {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&pki.ca).map_err(|e| e.to_string())?,
        ))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert).map_err(|e| e.to_string())?,
            std::fs::read(key).map_err(|e| e.to_string())?,
        ));
    }
    let channel = tonic::transport::Endpoint::from_shared(format!("https://localhost:{port}"))
        .map_err(|e| e.to_string())?
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let hello = IngestRequest {
        message: Some(Message::Hello(bakeoff_proto::v1::ProbeHello {
            probe_id: "tls-check".into(),
            protocol_version: bakeoff_proto::PROTOCOL_VERSION,
            ..Default::default()
        })),
    };
    let mut acks = IngestClient::new(channel)
        .stream(tokio_stream::iter(vec![hello]))
        .await
        .map_err(|s| format!("stream: {s}"))?
        .into_inner();
    acks.message()
        .await
        .map(|_| ())
        .map_err(|s| format!("ack: {s}"))
}

#[test]
fn mutual_tls_otlp_and_metrics_agree_with_what_was_sent() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let dir = scratch_dir("export")?;
    let pki = Pki::create(&dir)?;
    let cg = Cgroup::create(&format!("bakeoff-export-{}", std::process::id()))?;
    let (_server, port) = cg.spawn_test_server("")?;
    let path = |p: &PathBuf| p.display().to_string();
    let collector = Collector::start_with(
        &dir,
        free_port(),
        free_port(),
        &[
            "--tls-cert".into(),
            path(&pki.server_cert),
            "--tls-key".into(),
            path(&pki.server_key),
            "--tls-client-ca".into(),
            path(&pki.ca),
        ],
    )?;
    let receiver = OtlpReceiver::start()?;
    let metrics_port = free_port();
    let ready = dir.join("ready");
    let mut probe = Guard::spawn(
        "bakeoff-probe",
        Command::new(bin("bakeoff-probe")?)
            .args(["--experiment", "export-it", "--output", "none"])
            .arg("--cohort")
            .arg(format!("canary=cgroup:{}", cg.path().display()))
            .args([
                "--collector",
                &format!("https://localhost:{}", collector.grpc_port),
            ])
            .args(["--collector-ca", &path(&pki.ca)])
            .args(["--collector-cert", &path(&pki.client_cert)])
            .args(["--collector-key", &path(&pki.client_key)])
            .args(["--otlp", &receiver.endpoint()])
            .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
            .args(["--batch-size", "8"])
            .arg("--ready-file")
            .arg(&ready)
            .arg("--stats-file")
            .arg(dir.join("probe-stats.json"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("probe.log"))?),
    )?;
    wait_for("probe ready", Duration::from_secs(60), || ready.exists())?;

    // 30 requests; every third carries a W3C traceparent whose trace the span must join.
    let n = 30;
    let mut traceparents = HashMap::new();
    let mut conn = Conn::connect(port)?;
    for i in 0..n {
        let id = format!("x-{i}");
        let mut req = Request::get(["/", "/status/503"][i % 2], &id);
        if i % 3 == 0 {
            let tp = format!("00-{:032x}-{:016x}-01", 0xabc000 + i, 0xdef000 + i);
            req.headers.push(("traceparent".into(), tp.clone()));
            traceparents.insert(id.clone(), tp);
        }
        conn.request(&req)?;
    }

    wait_for(
        "events stored behind mutual TLS",
        Duration::from_secs(30),
        || {
            collector
                .get("/api/v1/events?experiment=export-it&limit=1000")
                .is_ok_and(|v| v.as_array().is_some_and(|a| a.len() >= n))
        },
    )?;
    wait_for(
        "spans at the OTLP receiver",
        Duration::from_secs(30),
        || receiver.spans().len() >= n,
    )?;
    let probe_metrics = scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"))?;
    let collector_metrics = scrape(&format!("http://127.0.0.1:{}/metrics", collector.http_port))?;
    let status = probe.stop(Duration::from_secs(30))?;
    ensure!(
        status.success(),
        "probe failed: {}",
        std::fs::read_to_string(dir.join("probe.log"))?
    );

    // Stored once each, through TLS.
    let stored = collector.get("/api/v1/events?experiment=export-it&limit=1000")?;
    let stored = stored.as_array().context("events")?;
    ensure!(
        stored.len() == n,
        "{} stored for {n} requests",
        stored.len()
    );

    // One span per request, equal to the request.
    let spans = receiver.spans();
    ensure!(spans.len() == n, "{} spans for {n} requests", spans.len());
    let attr = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue], key: &str| {
        attrs
            .iter()
            .find(|a| a.key == key)
            .and_then(|a| a.value.as_ref()?.value.clone())
    };
    let mut seen = 0;
    for r in &spans {
        let Some(Value::StringValue(id)) = attr(&r.span.attributes, "bakeoff.request_id") else {
            anyhow::bail!("span without request id: {:?}", r.span);
        };
        let i: usize = id.trim_start_matches("x-").parse()?;
        let (path, code) = [("/", 200), ("/status/503", 503)][i % 2];
        ensure!(r.span.name == "GET", "span name {}", r.span.name);
        ensure!(
            attr(&r.span.attributes, "url.path") == Some(Value::StringValue(path.into())),
            "{id}: {:?}",
            r.span.attributes
        );
        ensure!(
            attr(&r.span.attributes, "http.response.status_code") == Some(Value::IntValue(code)),
            "{id}: {:?}",
            r.span.attributes
        );
        ensure!(
            attr(&r.resource, "bakeoff.cohort") == Some(Value::StringValue("canary".into())),
            "{:?}",
            r.resource
        );
        ensure!(r.span.end_time_unix_nano > r.span.start_time_unix_nano);
        let error = r.span.status.as_ref().map(|s| s.code) == Some(2);
        ensure!(error == (code == 503), "{id}: status {:?}", r.span.status);
        if let Some(tp) = traceparents.get(&id) {
            let parts: Vec<&str> = tp.split('-').collect();
            ensure!(
                hex(&r.span.trace_id) == parts[1] && hex(&r.span.parent_span_id) == parts[2],
                "{id}: trace {} parent {} for traceparent {tp}",
                hex(&r.span.trace_id),
                hex(&r.span.parent_span_id)
            );
            seen += 1;
        } else {
            ensure!(r.span.parent_span_id.is_empty() && r.span.trace_id.len() == 16);
        }
    }
    ensure!(seen == traceparents.len(), "{seen} traced spans");

    // The metrics say the same.
    let m = sample;
    ensure!(m(&probe_metrics, "bakeoff_probe_events_total")? == n as f64);
    ensure!(m(&probe_metrics, "bakeoff_probe_export_events_total")? == n as f64);
    ensure!(m(&probe_metrics, "bakeoff_probe_otlp_spans_exported_total")? == n as f64);
    ensure!(
        m(
            &probe_metrics,
            "bakeoff_probe_export_dropped_events_total{reason=\"spool_full\"}"
        )? == 0.0
    );
    ensure!(m(&probe_metrics, "bakeoff_probe_export_ack_seconds_count")? >= 1.0);
    ensure!(
        m(
            &probe_metrics,
            "bakeoff_probe_kernel_drops_total{reason=\"ringbuf_full\"}"
        )? == 0.0
    );
    ensure!(m(&collector_metrics, "bakeoff_collector_events_stored_total")? == n as f64);
    ensure!(
        m(
            &collector_metrics,
            "bakeoff_collector_store_batch_seconds_count"
        )? >= 1.0
    );

    // Without a client certificate, or with one from another CA, the collector refuses.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let good = rt.block_on(try_stream(
        collector.grpc_port,
        &pki,
        Some((&pki.client_cert, &pki.client_key)),
    ));
    ensure!(good.is_ok(), "the trusted client was refused: {good:?}");
    let anonymous = rt.block_on(try_stream(collector.grpc_port, &pki, None));
    ensure!(anonymous.is_err(), "a client without certificate got in");
    let rogue = rt.block_on(try_stream(
        collector.grpc_port,
        &pki,
        Some((&pki.rogue_cert, &pki.rogue_key)),
    ));
    ensure!(rogue.is_err(), "a client from another CA got in");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

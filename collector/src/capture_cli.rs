//! `bakeoff capture start|ls|status|stop|get`: the terminal client of the collector's capture
//! routes (part of the `bakeoff` binary, not the library).

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use bakeoff_collector::capture::{CaptureInfo, CaptureSpec};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use crate::{ApiArgs, ApiClient};

#[derive(Subcommand)]
pub enum CaptureCmd {
    /// Start recording a cohort's traffic on the probes that watch it (redacted there) and
    /// follow it to its end with a progress bar; Ctrl-C stops it. With --output, download it.
    Start {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        experiment: String,
        #[arg(long)]
        cohort: String,
        /// Only connections of this protocol: http1, http2 (or grpc), postgres.
        #[arg(long)]
        protocol: Option<String>,
        /// Stop after this long (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// Stop once this many requests of the cohort were recorded (on each probe).
        #[arg(long)]
        max_requests: Option<u64>,
        /// Stop once this many bytes were recorded (on each probe).
        #[arg(long)]
        max_bytes: Option<u64>,
        /// More headers to mask, on top of the probes' rules. Repeatable.
        #[arg(long)]
        redact_header: Vec<String>,
        /// JSON fields whose values are masked. Repeatable.
        #[arg(long)]
        redact_json: Vec<String>,
        /// Regular expressions whose matches are masked. Repeatable.
        #[arg(long)]
        redact_regex: Vec<String>,
        /// Return once started instead of following the capture.
        #[arg(long)]
        detach: bool,
        /// Write the completed capture here.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Print the final status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List captures (newest first) and the probes connected for captures.
    Ls {
        #[command(flatten)]
        api: ApiArgs,
        #[arg(long)]
        json: bool,
    },
    /// One capture's status, per probe, losses included.
    Status {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Stop a capture (the probes send what they hold, then the file is completed).
    Stop {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
    },
    /// Download a completed capture.
    Get {
        #[command(flatten)]
        api: ApiArgs,
        id: String,
        #[arg(long, short)]
        output: PathBuf,
    },
}

impl ApiClient {
    pub(crate) fn post_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<T> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let mut resp = req
            .config()
            .http_status_as_error(false)
            .build()
            .send_json(body)
            .with_context(|| format!("cannot {what} at {}", self.base))?;
        let status = resp.status();
        if !status.is_success() {
            let body: serde_json::Value = resp.body_mut().read_json().unwrap_or_default();
            bail!(
                "the collector answered {status}: {}",
                body["error"].as_str().unwrap_or("(no reason given)")
            );
        }
        resp.body_mut()
            .read_json()
            .context("the collector's answer is not the JSON this client expects")
    }

    pub(crate) fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        what: &str,
    ) -> Result<T> {
        crate::send(self.get(path), what, &self.base)?
            .body_mut()
            .read_json()
            .context("the collector's answer is not the JSON this client expects")
    }
}

/// Bytes for people: B, KiB, MiB or GiB.
fn mib(b: u64) -> String {
    let mut v = b as f64;
    for unit in ["B", "KiB", "MiB"] {
        if v < 1024.0 {
            return if unit == "B" {
                format!("{b} B")
            } else {
                format!("{v:.1} {unit}")
            };
        }
        v /= 1024.0;
    }
    format!("{v:.1} GiB")
}

fn losses(info: &CaptureInfo) -> String {
    let named: Vec<String> = info
        .losses
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    if named.is_empty() {
        "no loss".into()
    } else {
        named.join(", ")
    }
}

fn print_status(info: &CaptureInfo) {
    println!(
        "capture {}: {} (experiment {}, cohort {}{}), by {}",
        info.id,
        info.state,
        info.spec.experiment,
        info.spec.cohort,
        if info.spec.protocol.is_empty() {
            String::new()
        } else {
            format!(", {}", info.spec.protocol)
        },
        info.actor
    );
    if !info.reason.is_empty() {
        println!("  {}", info.reason);
    }
    println!(
        "  {} requests, {} records, file {} ({}), {}",
        info.requests,
        info.records,
        info.file.display(),
        mib(info.file_bytes),
        losses(info)
    );
    for p in &info.probes {
        println!(
            "  probe {} on {}{}: {} {}: {} requests, {} connections, {} payload, {} fields masked",
            p.probe_id,
            p.node,
            p.identity
                .as_ref()
                .map(|i| format!(" ({i})"))
                .unwrap_or_default(),
            p.state,
            p.reason,
            p.requests,
            p.connections,
            mib(p.bytes),
            p.fields_masked
        );
    }
}

/// Ctrl-C, seen by the follow loop (the CLI is synchronous: a small runtime waits for it).
fn interrupted() -> Arc<AtomicBool> {
    let flag = Arc::new(AtomicBool::new(false));
    let set = flag.clone();
    std::thread::spawn(move || {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                loop {
                    if tokio::signal::ctrl_c().await.is_err() {
                        return;
                    }
                    set.store(true, Ordering::Relaxed);
                }
            });
        }
    });
    flag
}

fn done(state: &str) -> bool {
    state == "done" || state == "failed"
}

/// Follows a capture to its end with a progress bar.
fn follow(client: &ApiClient, mut info: CaptureInfo) -> Result<CaptureInfo> {
    let spec = info.spec.clone();
    let bar = match (spec.max_requests, spec.duration_ms) {
        (n, _) if n > 0 => ProgressBar::new(n),
        (0, ms) if ms > 0 => ProgressBar::new(ms / 1000),
        _ => ProgressBar::new_spinner(),
    };
    let unit = if spec.max_requests > 0 {
        "requests"
    } else {
        "s"
    };
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let stop = interrupted();
    let mut stop_sent = false;
    let started = std::time::Instant::now();
    while !done(&info.state) {
        if stop.load(Ordering::Relaxed) && !stop_sent {
            bar.println("stopping (Ctrl-C): the probes send what they hold");
            let _: CaptureInfo = client.post_json(
                &format!("/api/v1/captures/{}/stop", info.id),
                &serde_json::json!({}),
                "stop the capture",
            )?;
            stop_sent = true;
        }
        std::thread::sleep(Duration::from_millis(500));
        info = client.get_json(&format!("/api/v1/captures/{}", info.id), "the capture")?;
        if spec.max_requests > 0 {
            bar.set_position(info.requests.min(spec.max_requests));
        } else if spec.duration_ms > 0 {
            bar.set_position(started.elapsed().as_secs().min(spec.duration_ms / 1000));
        } else {
            bar.tick();
        }
        let confirmed = info.probes.iter().filter(|p| p.confirmed).count();
        bar.set_message(format!(
            "{confirmed}/{} probes recording, {} requests, {} records, {}, {}",
            info.probes.len(),
            info.requests,
            info.records,
            mib(info.file_bytes),
            losses(&info)
        ));
    }
    bar.finish_and_clear();
    Ok(info)
}

/// Downloads a completed capture into `output` (written beside it, then renamed: a cut
/// download never looks like a capture).
fn download(client: &ApiClient, id: &str, output: &Path) -> Result<u64> {
    let mut resp = crate::send(
        client.get(&format!("/api/v1/captures/{id}/file")),
        "the capture file",
        &client.base,
    )?;
    let len: u64 = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let partial = output.with_extension("part");
    let mut file = std::fs::File::create(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut reader = resp.body_mut().with_config().limit(u64::MAX).reader();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = std::io::Read::read(&mut reader, &mut buf).context("download cut")?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n])
            .with_context(|| format!("cannot write {}", partial.display()))?;
        total += n as u64;
        bar.set_position(total);
    }
    bar.finish_and_clear();
    if len > 0 && total != len {
        bail!("download cut at {total} of {len} bytes");
    }
    file.sync_all()?;
    std::fs::rename(&partial, output).with_context(|| {
        format!(
            "cannot rename {} to {}",
            partial.display(),
            output.display()
        )
    })?;
    // A downloaded capture is read back to the end: damage is said now, not at replay time.
    let reader = bakeoff_capture::CaptureReader::new(std::fs::File::open(output)?)?;
    let mut records = 0u64;
    for r in reader {
        r.with_context(|| format!("{} is damaged", output.display()))?;
        records += 1;
    }
    Ok(records)
}

/// Runs a `bakeoff capture` command; the exit code (1 when a capture failed).
pub fn run(cmd: CaptureCmd) -> Result<i32> {
    match cmd {
        CaptureCmd::Start {
            api,
            experiment,
            cohort,
            protocol,
            duration,
            max_requests,
            max_bytes,
            redact_header,
            redact_json,
            redact_regex,
            detach,
            output,
            json,
        } => {
            let client = api.client()?;
            let spec = CaptureSpec {
                experiment,
                cohort,
                protocol: protocol.unwrap_or_default(),
                max_requests: max_requests.unwrap_or(0),
                max_bytes: max_bytes.unwrap_or(0),
                duration_ms: duration.map_or(0, |d| d.as_millis() as u64),
                redact_headers: redact_header,
                redact_json,
                redact_regex,
            };
            let info: CaptureInfo = client.post_json(
                "/api/v1/captures",
                &serde_json::to_value(&spec)?,
                "start the capture",
            )?;
            eprintln!(
                "capture {} started on {} probe(s)",
                info.id,
                info.probes.len()
            );
            if detach {
                println!("{}", info.id);
                return Ok(0);
            }
            let info = follow(&client, info)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_status(&info);
            }
            if info.state != "done" {
                return Ok(1);
            }
            if let Some(output) = output {
                let records = download(&client, &info.id, &output)?;
                eprintln!("wrote {} ({records} records)", output.display());
            }
            Ok(0)
        }
        CaptureCmd::Ls { api, json } => {
            let client = api.client()?;
            let list: serde_json::Value = client.get_json("/api/v1/captures", "the captures")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
                return Ok(0);
            }
            let captures: Vec<CaptureInfo> =
                serde_json::from_value(list["captures"].clone()).unwrap_or_default();
            println!(
                "{:<24} {:<10} {:<16} {:<12} {:>9} {:>10}  losses",
                "ID", "STATE", "EXPERIMENT", "COHORT", "REQUESTS", "SIZE"
            );
            for c in &captures {
                println!(
                    "{:<24} {:<10} {:<16} {:<12} {:>9} {:>10}  {}",
                    c.id,
                    c.state,
                    crate::fit(&c.spec.experiment, 16),
                    crate::fit(&c.spec.cohort, 12),
                    c.requests,
                    mib(c.file_bytes),
                    losses(c)
                );
            }
            let probes = list["probes"].as_array().cloned().unwrap_or_default();
            println!("{} probe(s) connected for captures", probes.len());
            for p in probes {
                println!("  {}", p.as_str().unwrap_or_default());
            }
            Ok(0)
        }
        CaptureCmd::Status { api, id, json } => {
            let client = api.client()?;
            let info: CaptureInfo =
                client.get_json(&format!("/api/v1/captures/{id}"), "the capture")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&info)?);
            } else {
                print_status(&info);
            }
            Ok(if info.state == "failed" { 1 } else { 0 })
        }
        CaptureCmd::Stop { api, id } => {
            let client = api.client()?;
            let info: CaptureInfo = client.post_json(
                &format!("/api/v1/captures/{id}/stop"),
                &serde_json::json!({}),
                "stop the capture",
            )?;
            let info = follow(&client, info)?;
            print_status(&info);
            Ok(if info.state == "done" { 0 } else { 1 })
        }
        CaptureCmd::Get { api, id, output } => {
            let client = api.client()?;
            let records = download(&client, &id, &output)?;
            eprintln!("wrote {} ({records} records)", output.display());
            Ok(0)
        }
    }
}

//! Runs `bakeoff-probe` for a test: JSON-lines output, a ready file, a stats file and a log in
//! the test's directory; stopping returns the events and the counters.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_probe::event::RequestEvent;

use crate::process::{Guard, bin, wait_for};

/// A running probe.
pub struct ProbeRun {
    guard: Guard,
    pub out: PathBuf,
    pub log: PathBuf,
    pub stats: PathBuf,
}

/// What a stopped probe left: its events and its counters (the `--stats-file` JSON).
pub struct ProbeResult {
    pub events: Vec<RequestEvent>,
    pub stats: serde_json::Value,
    /// How long the probe took to exit after the signal.
    pub stop_time: Duration,
}

impl ProbeRun {
    /// Starts the probe with `args` (cohort rules, data path...) writing into `dir`, and waits
    /// until it is watching.
    pub fn start(dir: &Path, args: &[String]) -> Result<Self> {
        Self::start_wrapped(dir, &[], args)
    }

    /// Like [`ProbeRun::start`], with the probe run by `wrapper` (e.g. `setpriv --reuid ...`,
    /// which execs it: the pid stays the probe's). A probe that exits before it is ready is an
    /// error carrying its log.
    pub fn start_wrapped(dir: &Path, wrapper: &[String], args: &[String]) -> Result<Self> {
        let (out, log, stats, ready) = (
            dir.join("events.jsonl"),
            dir.join("probe.log"),
            dir.join("stats.json"),
            dir.join("ready"),
        );
        for f in [&out, &stats, &ready] {
            let _ = std::fs::remove_file(f);
        }
        let probe = bin("bakeoff-probe")?;
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(&probe);
                c
            }
            None => Command::new(&probe),
        };
        let mut guard = Guard::spawn(
            "bakeoff-probe",
            cmd.args(args)
                .arg("--output")
                .arg(&out)
                .arg("--ready-file")
                .arg(&ready)
                .arg("--stats-file")
                .arg(&stats)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log)?),
        )?;
        let mut exited = None;
        wait_for("probe ready", Duration::from_secs(60), || {
            exited = guard.child.try_wait().ok().flatten();
            ready.exists() || exited.is_some()
        })?;
        if let Some(status) = exited
            && !ready.exists()
        {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            anyhow::bail!("the probe exited with {status} before it was ready: {text}");
        }
        Ok(Self {
            guard,
            out,
            log,
            stats,
        })
    }

    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Sends `signal` (SIGTERM, SIGINT), waits for a clean exit (at most `timeout`), and reads
    /// what the probe left.
    pub fn stop_with(mut self, signal: i32, timeout: Duration) -> Result<ProbeResult> {
        let started = Instant::now();
        let status = self.guard.stop_with(signal, timeout)?;
        let stop_time = started.elapsed();
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        ensure!(status.success(), "probe exited with {status}: {log}");
        let stats = serde_json::from_slice(
            &std::fs::read(&self.stats).with_context(|| format!("no stats file; log: {log}"))?,
        )?;
        Ok(ProbeResult {
            events: read_events(&self.out)?,
            stats,
            stop_time,
        })
    }

    /// SIGTERM, then the result.
    pub fn stop(self) -> Result<ProbeResult> {
        self.stop_with(libc::SIGTERM, Duration::from_secs(20))
    }
}

/// Events of a JSON-lines file.
pub fn read_events(path: &Path) -> Result<Vec<RequestEvent>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("bad event line {l}")))
        .collect()
}

impl ProbeResult {
    /// A counter of the stats file by its JSON path (`["connections", "stream_gaps"]`), 0 if
    /// absent.
    pub fn counter(&self, path: &[&str]) -> u64 {
        path.iter()
            .fold(&self.stats, |v, k| &v[*k])
            .as_u64()
            .unwrap_or(0)
    }
}

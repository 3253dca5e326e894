//! `cargo xtask fuzz`: libFuzzer campaigns on the decoders (`fuzz/`, one target per decoder,
//! the harnesses in `probe-protocol/src/harness.rs`).
//!
//! Bootstraps cargo-fuzz (it needs the nightly toolchain), builds the targets once, runs each
//! for a time and/or a number of executions on its committed corpus (`fuzz/corpus/<target>`,
//! where new finds are added) and regression inputs (`fuzz/regressions/<target>`, read only),
//! then prints executions and crashes per target from libFuzzer's final stats. Exits non-zero
//! on any crash, naming the input libFuzzer wrote.
//!
//! Targets are built without a sanitizer: probe-protocol has no `unsafe`, so AddressSanitizer
//! would only slow the runs; debug assertions and overflow checks stay on (cargo-fuzz's
//! default), so an arithmetic overflow is a crash.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// The targets, in `fuzz/Cargo.toml` and `bakeoff_protocol::harness::TARGETS`.
pub const TARGETS: [&str; 7] = [
    "http1", "http2", "hpack", "postgres", "sql", "detect", "tcp",
];

/// Where the fuzz crate is built (its own: other flags than the workspace's).
const TARGET_DIR: &str = "/var/tmp/bakeoff-fuzz-target";

pub struct Options {
    /// Seconds per target (libFuzzer `-max_total_time`); `None` with `runs`: no time limit.
    pub seconds: Option<u64>,
    /// Executions per target (libFuzzer `-runs`).
    pub runs: Option<u64>,
    /// Only these targets (all when empty).
    pub targets: Vec<String>,
    /// Minimize each corpus afterwards (`cargo fuzz cmin`).
    pub minimize: bool,
}

/// One target's campaign.
struct Outcome {
    target: String,
    executions: u64,
    seconds: f64,
    crash: Option<String>,
    log: PathBuf,
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| ".".into())
}

/// `cargo +nightly fuzz ...`, from the repository root (cargo-fuzz finds `fuzz/` there).
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.args(["+nightly", "fuzz"]).current_dir(root());
    // The workspace's cargo sets these for xtask; the nightly cargo must pick its own.
    for var in ["CARGO", "RUSTC", "RUSTDOC", "RUSTUP_TOOLCHAIN"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Installs cargo-fuzz when missing; idempotent and quiet when present.
fn bootstrap() -> Result<()> {
    let nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !nightly.is_ok_and(|s| s.success()) {
        bail!(
            "cargo xtask fuzz needs the nightly toolchain (libFuzzer instrumentation): \
             `rustup toolchain install nightly --profile minimal`"
        );
    }
    let present = cargo_fuzz()
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    eprintln!("xtask fuzz: installing cargo-fuzz (cargo install cargo-fuzz --locked)");
    let status = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--locked"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!(
            "could not install cargo-fuzz ({status}); install it by hand with \
             `cargo install cargo-fuzz --locked` (crates.io must be reachable)"
        );
    }
    Ok(())
}

/// Common flags of `cargo fuzz build/run/cmin`.
fn flags(cmd: &mut Command) -> &mut Command {
    cmd.args(["--sanitizer", "none", "--target-dir", TARGET_DIR])
}

pub fn fuzz(opts: Options) -> Result<()> {
    let targets: Vec<String> = if opts.targets.is_empty() {
        TARGETS.iter().map(|t| t.to_string()).collect()
    } else {
        for t in &opts.targets {
            if !TARGETS.contains(&t.as_str()) {
                bail!("unknown fuzz target {t}; targets: {}", TARGETS.join(", "));
            }
        }
        opts.targets.clone()
    };
    let seconds = match (opts.seconds, opts.runs) {
        (None, None) => Some(60),
        (s, _) => s,
    };
    bootstrap()?;
    crate::run(flags(cargo_fuzz().arg("build")))?;
    let mut outcomes = Vec::new();
    for target in &targets {
        let outcome = campaign(target, seconds, opts.runs)?;
        if opts.minimize && outcome.crash.is_none() {
            minimize(target)?;
        }
        outcomes.push(outcome);
    }
    println!(
        "\n{:<10} {:>12} {:>9} {:>10} {:>8}",
        "target", "executions", "seconds", "execs/s", "crashes"
    );
    for o in &outcomes {
        println!(
            "{:<10} {:>12} {:>9.0} {:>10.0} {:>8}",
            o.target,
            o.executions,
            o.seconds,
            o.executions as f64 / o.seconds.max(1e-9),
            u8::from(o.crash.is_some())
        );
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    for o in &crashed {
        eprintln!(
            "crash in {}: {} (log: {}); reproduce with `cargo +nightly fuzz run -s none {} {}`, \
             then keep it in fuzz/regressions/{}/",
            o.target,
            o.crash.as_deref().unwrap_or("?"),
            o.log.display(),
            o.target,
            o.crash.as_deref().unwrap_or("?"),
            o.target
        );
    }
    if !crashed.is_empty() {
        bail!("{} fuzz target(s) crashed", crashed.len());
    }
    Ok(())
}

/// Runs one target; its libFuzzer output goes to `fuzz/artifacts/<target>.log`.
fn campaign(target: &str, seconds: Option<u64>, runs: Option<u64>) -> Result<Outcome> {
    let fuzz = root().join("fuzz");
    let corpus = fuzz.join("corpus").join(target);
    let regressions = fuzz.join("regressions").join(target);
    let artifacts = fuzz.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    std::fs::create_dir_all(&corpus)?;
    let log = fuzz.join("artifacts").join(format!("{target}.log"));
    let mut cmd = cargo_fuzz();
    flags(cmd.arg("run"))
        .arg(target)
        .arg(&corpus)
        .arg(&regressions)
        .arg("--")
        .args([
            // One process (no -jobs/-workers): the machine is shared.
            "-print_final_stats=1",
            // Inputs of at most 4 KiB keep the corpora small; decoder scripts reach long
            // streams through uncaptured lengths and splits.
            "-max_len=4096",
            // A decoder taking 10 s on one input is a hang.
            "-timeout=10",
            // Decoders must never allocate by a length they read.
            "-rss_limit_mb=2048",
            "-malloc_limit_mb=256",
        ])
        .arg(format!("-artifact_prefix={}/", artifacts.display()));
    if let Some(s) = seconds {
        cmd.arg(format!("-max_total_time={s}"));
    }
    if let Some(r) = runs {
        cmd.arg(format!("-runs={r}"));
    }
    let file = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
    eprintln!(
        "xtask fuzz: {target} ({}{}), log {}",
        seconds.map_or(String::new(), |s| format!("{s} s")),
        runs.map_or(String::new(), |r| format!(" {r} runs")),
        log.display()
    );
    let started = Instant::now();
    let status = cmd
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .context("cannot run cargo fuzz")?;
    let wall = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let stat = |name: &str| -> Option<u64> {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
    };
    let executions = stat("stat::number_of_executed_units:").unwrap_or(0);
    // "Done 2000000 runs in 363 second(s)": libFuzzer's own time, without build and startup.
    let seconds_run = text
        .lines()
        .rev()
        .find_map(|l| {
            let rest = l.strip_prefix("Done ")?;
            let (_, after) = rest.split_once(" runs in ")?;
            after.split_whitespace().next()?.parse::<f64>().ok()
        })
        .unwrap_or(wall);
    let crash = text.lines().rev().find_map(|l| {
        let (_, path) = l.split_once("Test unit written to ")?;
        Some(path.trim().to_string())
    });
    if crash.is_none() && !status.success() {
        bail!(
            "cargo fuzz run {target} failed ({status}) without a crash input; see {}",
            log.display()
        );
    }
    if crash.is_none() && executions == 0 {
        bail!(
            "no final stats from libFuzzer for {target}; see {}",
            log.display()
        );
    }
    Ok(Outcome {
        target: target.to_string(),
        executions,
        seconds: seconds_run.max(1.0),
        crash,
        log,
    })
}

/// Keeps a small subset of a corpus with the same features (`cargo fuzz cmin`; libFuzzer's
/// set-cover merge keeps about half the files its default merge keeps).
fn minimize(target: &str) -> Result<()> {
    let corpus = root().join("fuzz").join("corpus").join(target);
    crate::run(
        flags(cargo_fuzz().arg("cmin"))
            .arg(target)
            .arg(&corpus)
            .args(["--", "-set_cover_merge=1"]),
    )
}

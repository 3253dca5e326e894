//! `cargo xtask`: toolchain bootstrap, builds, tests, the demo and benchmarks. Every command
//! that needs the toolchain bootstraps it first, so a fresh clone needs nothing else.

mod bootstrap;
mod fuzz;

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what the build and the tests need (idempotent, quiet when all is present).
    Bootstrap {
        /// Only these parts (repeatable; default: all), e.g. in a container image's build stage.
        #[arg(long, value_enum)]
        only: Vec<bootstrap::Part>,
    },
    /// Build the probe (kernel programs included), the collector and the test tools (release
    /// profile, the one tests, demo and benchmarks use).
    Build,
    /// Run every test: unit, property and real-kernel integration tests (needs root).
    Test,
    /// cargo fmt --check and clippy -D warnings over the workspace.
    Lint,
    /// A baseline and a canary service under load, watched by the probe.
    Demo {
        /// Longest load in seconds (the load stops once the verdict is decided).
        #[arg(long, default_value_t = 180)]
        seconds: u64,
        /// An identical canary: the demo ends with PASS instead of FAIL.
        #[arg(long)]
        good: bool,
        /// Capture the baseline's traffic through the probe and replay it against the canary.
        #[arg(long)]
        replay: bool,
    },
    /// Benchmarks: `probe` (cost of the probe on the host and on the watched service) or
    /// `collector` (ingest rate into DuckDB, group-by time over 10 million events).
    Bench {
        #[arg(default_value = "probe")]
        which: String,
        /// Events for the collector benchmark.
        #[arg(long, default_value_t = 10_000_000)]
        events: u64,
        /// Interleaved rounds per configuration.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Probe benchmark: only these setups (`;`-separated names as printed, e.g.
        /// "no probe;cgroup path, recording"); their bases are measured with them.
        #[arg(long)]
        setups: Option<String>,
    },
    /// libFuzzer campaigns on the decoders (fuzz/): executions and crashes per target.
    Fuzz {
        /// Seconds per target (default 60 unless --runs is given).
        #[arg(long)]
        seconds: Option<u64>,
        /// Executions per target.
        #[arg(long)]
        runs: Option<u64>,
        /// Only this target (repeatable): http1, http2, hpack, postgres, sql, detect, tcp.
        #[arg(long = "target")]
        targets: Vec<String>,
        /// Minimize each corpus afterwards (cargo fuzz cmin).
        #[arg(long)]
        minimize: bool,
    },
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs a command, failing with its name when it fails.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

/// Builds every binary (probe, collector, test tools) and the tests; returns the directory
/// holding the binaries.
pub fn build(release: bool) -> Result<std::path::PathBuf> {
    bootstrap::bootstrap()?;
    let mut cmd = cargo();
    // `--all-targets` unifies features as `cargo test` does (dev-dependencies included), so the
    // tests, the demo and the benchmarks share one build of DuckDB's C++: a different feature
    // set of any of libduckdb-sys's build-dependencies (cc, flate2, serde_json, tar, ureq, ...)
    // would rebuild it, which takes about half an hour on 2 cores.
    cmd.args(["build", "--all-targets"]);
    if release {
        cmd.arg("--release");
    }
    run(&mut cmd)?;
    Ok(target_dir().join(if release { "release" } else { "debug" }))
}

/// The cargo target directory (see `.cargo/config.toml`).
pub fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| "/var/tmp/bakeoff-target".into())
}

/// Runs `cargo test`, echoing its output, and ends with one plain total line
/// (`N passed, N failed`) summed over every test binary.
fn test(bins: &std::path::Path) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cargo()
        .args(["test", "--release", "--no-fail-fast"])
        .env("BAKEOFF_BIN_DIR", bins)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("cannot run cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line?;
            println!("{line}");
            if let Some(rest) = line.strip_prefix("test result: ") {
                // "ok. 23 passed; 0 failed; 0 ignored; ..."
                let count = |word: &str| {
                    rest.split(';')
                        .find_map(|part| {
                            let mut it = part.split_whitespace().rev();
                            (it.next()? == word).then_some(())?;
                            it.next()?.parse::<u64>().ok()
                        })
                        .unwrap_or(0)
                };
                passed += count("passed");
                failed += count("failed");
            }
        }
    }
    let status = child.wait()?;
    println!("\nxtask test: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        bail!("tests failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Bootstrap { only } if only.is_empty() => bootstrap::bootstrap(),
        Cmd::Bootstrap { only } => bootstrap::bootstrap_parts(&only),
        Cmd::Build => build(true).map(|_| ()),
        Cmd::Test => {
            // One profile for tests, demo and benchmarks: DuckDB's C++ is then built once.
            let bins = build(true)?;
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } != 0 {
                bail!("the integration tests load eBPF programs: run `cargo xtask test` as root");
            }
            test(&bins)
        }
        Cmd::Lint => {
            run(cargo().args(["fmt", "--all", "--", "--check"]))?;
            // clippy runs the build scripts: the probe's needs bpf-linker, the collector libduckdb.
            bootstrap::bootstrap()?;
            run(cargo().args([
                "clippy",
                "--release",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        }
        Cmd::Demo {
            seconds,
            good,
            replay,
        } => {
            let bins = build(true)?;
            let mut demo = Command::new(bins.join("bakeoff-demo"));
            demo.args(["--seconds", &seconds.to_string()]);
            if good {
                demo.arg("--good");
            }
            if replay {
                demo.arg("--replay");
            }
            run(&mut demo)
        }
        Cmd::Bench {
            which,
            rounds,
            events,
            setups,
        } => {
            let bins = build(true)?;
            if which == "verdict" {
                return run(&mut Command::new(bins.join("bakeoff-bench-verdict")));
            }
            if which == "parsers" {
                return run(&mut Command::new(bins.join("bakeoff-bench-parsers")));
            }
            let mut bench = Command::new(bins.join("bakeoff-bench"));
            bench
                .arg(which)
                .args(["--rounds", &rounds.to_string()])
                .args(["--events", &events.to_string()]);
            if let Some(s) = setups {
                bench.args(["--setups", &s]);
            }
            run(&mut bench)
        }
        Cmd::Fuzz {
            seconds,
            runs,
            targets,
            minimize,
        } => fuzz::fuzz(fuzz::Options {
            seconds,
            runs,
            targets,
            minimize,
        }),
    }
}

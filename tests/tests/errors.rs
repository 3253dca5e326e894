//! Refusals of the probe and the collector are clear messages and a non-zero exit, never a panic.

use std::{os::unix::process::CommandExt as _, process::Command};

use anyhow::{Result, ensure};
use bakeoff_testkit::process::bin;

fn run(cmd: &mut Command) -> Result<(i32, String)> {
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    ensure!(!stderr.contains("panicked"), "the probe panicked: {stderr}");
    Ok((out.status.code().unwrap_or(-1), stderr))
}

#[test]
fn bad_config_names_file_line_and_problem() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bakeoff-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("probe.yaml");
    std::fs::write(
        &file,
        "experiment: x\ncohorts:\n  - name: canary\n    exec: /bin/true\n",
    )?;
    let (code, stderr) = run(Command::new(bin("bakeoff-probe")?)
        .arg("--config")
        .arg(&file))?;
    ensure!(code == 1, "exit code {code}");
    let want = format!(
        "{}: line 4, column 5: cohorts[0]: unknown field `exec`",
        file.display()
    );
    ensure!(
        stderr.contains(&format!("{}: line 4, column 5: ", file.display()))
            && stderr.contains("unknown field `exec`"),
        "expected something like `{want}` in:\n{stderr}"
    );
    let (code, stderr) =
        run(Command::new(bin("bakeoff-probe")?).args(["--cohort", "canary=port:80"]))?;
    ensure!(
        code == 1 && stderr.contains("unknown selector kind `port`"),
        "{code}: {stderr}"
    );
    let (code, stderr) = run(&mut Command::new(bin("bakeoff-probe")?))?;
    ensure!(
        code == 1 && stderr.contains("no cohort rules"),
        "{code}: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn missing_privileges_name_the_capability() -> Result<()> {
    // As `nobody`, with no capabilities.
    let (code, stderr) = run(Command::new(bin("bakeoff-probe")?)
        .args(["--cohort", "canary=pid:1"])
        .uid(65534)
        .gid(65534))?;
    ensure!(code == 1, "exit code {code}: {stderr}");
    ensure!(
        stderr.contains("missing privileges") && stderr.contains("CAP_BPF"),
        "{stderr}"
    );
    Ok(())
}

/// The collector's refusals: a bad experiments file names the entry, a collector that is down
/// gives `bakeoff verdict` exit code 3 (not 1, which means FAIL) and a clear message.
#[test]
fn collector_refusals_are_clear() -> Result<()> {
    let dir = std::env::temp_dir().join(format!("bakeoff-coll-err-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("experiments.yaml");
    std::fs::write(
        &file,
        "experiments:\n  - name: checkout\n    canaries: [canary]\n    judge: { alpha: 7 }\n",
    )?;
    let (code, stderr) = run(Command::new(bin("bakeoff")?)
        .arg("serve")
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--db")
        .arg(dir.join("x.duckdb"))
        .arg("--experiments")
        .arg(&file))?;
    ensure!(
        code == 1 && stderr.contains("experiments[0] (checkout): alpha must be in (0, 1)"),
        "exit {code}: {stderr}"
    );
    let port = bakeoff_testkit::process::free_port();
    let (code, stderr) = run(Command::new(bin("bakeoff")?).args([
        "verdict",
        "checkout",
        "--api",
        &format!("http://127.0.0.1:{port}"),
    ]))?;
    ensure!(
        code == 3 && stderr.contains("cannot get the verdict from"),
        "exit {code}: {stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A cohort rule that matches nothing is said, not silent: a typo would otherwise look like a
/// quiet canary.
#[test]
fn a_cohort_that_matches_nothing_is_warned_about() -> Result<()> {
    let (code, stderr) = run(Command::new(bin("bakeoff-probe")?).args([
        "--cohort",
        "canary=cgroup:/sys/fs/cgroup/bakeoff-no-such-cgroup",
        "--cohort",
        "baseline=exe:/no/such/exe",
        "--output",
        "none",
        "--duration",
        "1",
    ]))?;
    ensure!(code == 0, "exit {code}: {stderr}");
    ensure!(
        stderr.contains("cohort has no member")
            && stderr
                .contains("cgroup `/sys/fs/cgroup/bakeoff-no-such-cgroup` matches no directory")
            && stderr.contains("`exe:/no/such/exe` matches no running process"),
        "{stderr}"
    );
    // A cgroup that is not text in the YAML file: refused, with where.
    let dir = std::env::temp_dir().join(format!("bakeoff-cfg-int-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("probe.yaml");
    std::fs::write(&file, "cohorts:\n  - name: canary\n    cgroup: [5]\n")?;
    let (code, stderr) = run(Command::new(bin("bakeoff-probe")?)
        .arg("--config")
        .arg(&file))?;
    ensure!(
        code == 1 && stderr.contains("line 3"),
        "exit {code}: {stderr}"
    );
    Ok(())
}

/// `bakeoff-probe check`: the host's abilities, the programs loaded for real, each cohort's
/// data path and members; exit 0 / 2 (warnings) / 1 (cannot work here).
#[test]
fn check_reports_the_host_and_the_cohorts() -> Result<()> {
    let me = std::process::id().to_string();
    let out = Command::new(bin("bakeoff-probe")?)
        .arg("check")
        .args([
            "--cohort",
            "canary=cgroup:/sys/fs/cgroup/bakeoff-no-such-cgroup",
            "--cohort",
            &format!("self=pid:{me}"),
        ])
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.code() == Some(2), "{:?}: {stdout}", out.status);
    for line in [
        "ok    kernel",
        "ok    cgroup v2",
        "ok    capabilities",
        "ok    programs       every kernel program loads",
        "WARN  cohort canary  cgroup path, no member: its cgroup rule matches no directory",
        "ok    cohort self    syscall path, 1 processes",
    ] {
        ensure!(stdout.contains(line), "no `{line}` in:\n{stdout}");
    }
    // Without privileges: the capabilities and the programs fail, exit 1.
    let out = Command::new(bin("bakeoff-probe")?)
        .args(["check", "--cohort", &format!("self=pid:{me}")])
        .uid(65534)
        .gid(65534)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(1)
            && stdout.contains("FAIL  capabilities")
            && stdout.contains("FAIL  programs"),
        "{:?}: {stdout}",
        out.status
    );
    Ok(())
}

//! The probe's refusals are clear messages and a non-zero exit, never a panic.

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

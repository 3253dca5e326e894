//! The audit log end to end: `bakeoff replay` records who replayed which capture (cohort,
//! redaction rules) against what, `bakeoff audit` shows and verifies it, a tampered log is named
//! at its line (exit 1) and a replay refuses to extend it.

use std::{path::Path, process::Output};

use anyhow::{Result, ensure};
use bakeoff_capture::{ConnInfo, Direction, Record};
use bakeoff_testkit::process::{bin, scratch_dir};

fn get(path: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").into_bytes()
}

/// A capture of 3 sessions: 5 GETs and one POST (a write, not replayed).
fn write_capture(file: &Path) -> Result<()> {
    let mut w = bakeoff_capture::CaptureWriter::new(
        std::fs::File::create(file)?,
        &bakeoff_capture::Meta {
            experiment: "checkout".into(),
            cohort: "canary".into(),
            redaction: vec!["header:authorization".into(), "header:cookie".into()],
            ..Default::default()
        },
    )?;
    for conn in 0..3u64 {
        w.write(&Record::open(
            conn,
            1,
            &ConnInfo {
                role: "server".into(),
                protocol: "http1".into(),
                ..ConnInfo::default()
            },
        ))?;
        w.write(&Record::data(
            conn,
            Direction::Ingress,
            10,
            get("/bytes/10"),
        ))?;
    }
    w.write(&Record::data(0, Direction::Ingress, 11, get("/status/200")))?;
    w.write(&Record::data(1, Direction::Ingress, 12, get("/bytes/20")))?;
    w.write(&Record::data(
        2,
        Direction::Ingress,
        13,
        b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi".to_vec(),
    ))?;
    w.finish()?;
    Ok(())
}

fn bakeoff(args: &[&str]) -> Result<Output> {
    Ok(std::process::Command::new(bin("bakeoff")?)
        .args(args)
        .env("USER", "audit-tester")
        .env_remove("BAKEOFF_AUDIT_LOG")
        .output()?)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn replays_are_audited_and_a_tampered_log_is_named_and_refused() -> Result<()> {
    let dir = scratch_dir("audit-cli")?;
    let capture = dir.join("capture.bkcap");
    write_capture(&capture)?;
    // A directory that does not exist yet: the log creates it.
    let log = dir.join("state/bakeoff/audit.log");
    let (_server, port) = bakeoff_testkit::process::spawn_test_server(&[])?;
    let target = format!("127.0.0.1:{port}");
    let (capture_s, log_s) = (
        capture.to_string_lossy().into_owned(),
        log.to_string_lossy().into_owned(),
    );
    let replay = || {
        bakeoff(&[
            "replay",
            &capture_s,
            "--target",
            &target,
            "--audit-log",
            &log_s,
            "--json",
        ])
    };
    let out = replay()?;
    ensure!(out.status.success(), "replay: {}", text(&out.stderr));
    let replayed: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(replayed["requests"] == 5, "{replayed}");

    let out = bakeoff(&["audit", "--log", &log_s, "--json"])?;
    ensure!(out.status.success(), "audit: {}", text(&out.stderr));
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(audit["verified"] == true && audit["count"] == 1, "{audit}");
    let e = &audit["entries"][0];
    ensure!(e["seq"] == 1 && e["action"] == "replay", "{e}");
    let actor = e["actor"].as_str().unwrap_or_default();
    ensure!(
        actor.starts_with("audit-tester@") && actor.len() > 13,
        "{e}"
    );
    ensure!(
        e["experiment"] == "checkout" && e["cohort"] == "canary",
        "{e}"
    );
    ensure!(e["target"] == target.as_str(), "{e}");
    ensure!(
        e["redaction"] == serde_json::json!(["header:authorization", "header:cookie"]),
        "{e}"
    );
    ensure!(e["bytes"] == std::fs::metadata(&capture)?.len(), "{e}");
    ensure!(
        e["details"]["requests"] == 5
            && e["details"]["writes_skipped"] == 1
            && e["details"]["sessions"] == 3,
        "{e}"
    );
    ensure!(
        e["details"]["capture"] == std::fs::canonicalize(&capture)?.to_string_lossy().as_ref(),
        "{e}"
    );
    ensure!(
        e["prev"] == "0".repeat(64) && e["hash"].as_str().is_some_and(|h| h.len() == 64),
        "{e}"
    );

    // A second replay chains onto the first.
    let out = replay()?;
    ensure!(out.status.success(), "replay: {}", text(&out.stderr));
    let out = bakeoff(&["audit", "--log", &log_s])?;
    let table = text(&out.stdout);
    ensure!(out.status.success(), "{table}{}", text(&out.stderr));
    ensure!(
        table.lines().filter(|l| l.contains("replay")).count() == 2
            && table.contains("checkout/canary")
            && table.contains("audit-tester@"),
        "{table}"
    );
    let last = table.lines().last().unwrap_or_default();
    ensure!(
        last.starts_with("chain verified: 2 entries, from ") && last.contains(" to "),
        "{table}"
    );
    let out = bakeoff(&["audit", "--log", &log_s, "--verify-only"])?;
    ensure!(
        out.status.success() && text(&out.stdout).lines().count() == 1,
        "{}",
        text(&out.stdout)
    );

    // Tamper with the second entry: the first is still shown, the second named, exit 1.
    let original = std::fs::read_to_string(&log)?;
    let mut lines: Vec<String> = original.lines().map(str::to_string).collect();
    ensure!(lines.len() == 2 && lines[1].contains("\"cohort\":\"canary\""));
    lines[1] = lines[1].replace("\"cohort\":\"canary\"", "\"cohort\":\"baseline\"");
    std::fs::write(&log, lines.join("\n") + "\n")?;
    let out = bakeoff(&["audit", "--log", &log_s])?;
    let table = text(&out.stdout);
    ensure!(out.status.code() == Some(1), "{table}");
    ensure!(
        table.contains("audit log damaged at line 2: hash mismatch")
            && table.lines().filter(|l| l.contains("replay")).count() == 1,
        "{table}"
    );
    let out = bakeoff(&["audit", "--log", &log_s, "--json"])?;
    let audit: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        out.status.code() == Some(1)
            && audit["verified"] == false
            && audit["damage"]["line"] == 2
            && audit["entries"].as_array().map(Vec::len) == Some(1),
        "{audit}"
    );

    // A replay does not extend a tampered log, and does not run.
    let out = replay()?;
    let stderr = text(&out.stderr);
    ensure!(out.status.code() == Some(1), "{stderr}");
    ensure!(
        stderr.contains("not replaying") && stderr.contains("damaged at line 2"),
        "{stderr}"
    );
    ensure!(out.stdout.is_empty(), "{}", text(&out.stdout));
    ensure!(std::fs::read_to_string(&log)? == lines.join("\n") + "\n");

    // Nor where no log can be written.
    let blocked = dir.join("file");
    std::fs::write(&blocked, "")?;
    let out = bakeoff(&[
        "replay",
        &capture_s,
        "--target",
        &target,
        "--audit-log",
        &blocked.join("audit.log").to_string_lossy(),
    ])?;
    let stderr = text(&out.stderr);
    ensure!(
        out.status.code() == Some(1) && stderr.contains("not replaying"),
        "{stderr}"
    );

    // Deleting a line is named too.
    std::fs::write(&log, &original)?;
    let out = replay()?;
    ensure!(out.status.success(), "{}", text(&out.stderr));
    let content = std::fs::read_to_string(&log)?;
    let mut lines: Vec<&str> = content.lines().collect();
    ensure!(lines.len() == 3, "{content}");
    lines.remove(1);
    std::fs::write(&log, lines.join("\n") + "\n")?;
    let out = bakeoff(&["audit", "--log", &log_s, "--verify-only"])?;
    let stdout = text(&out.stdout);
    ensure!(
        out.status.code() == Some(1)
            && stdout.trim()
                == "audit log damaged at line 2: sequence gap: expected seq 2, found 3 (entries removed or inserted)",
        "{stdout}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

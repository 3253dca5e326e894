//! tracefs: syscall tracepoints are attached through it, and some hosts do not mount it.

use std::path::Path;

const TRACEFS: &str = "/sys/kernel/tracing";

/// Makes sure tracefs is mounted (at /sys/kernel/tracing or under debugfs), mounting it if
/// needed. Returns why not on failure.
pub fn ensure_mounted() -> Result<(), String> {
    let mounted = |p: &str| Path::new(p).join("events").is_dir();
    if mounted(TRACEFS) || mounted("/sys/kernel/debug/tracing") {
        return Ok(());
    }
    let status = std::process::Command::new("mount")
        .args(["-t", "tracefs", "nodev", TRACEFS])
        .stderr(std::process::Stdio::piped())
        .output()
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if status.status.success() && mounted(TRACEFS) {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&status.stderr).trim().to_string())
    }
}

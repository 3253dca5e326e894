//! Child processes that are killed when dropped, and the probe binary's location.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A child killed (SIGTERM, then SIGKILL) on drop.
pub struct Guard {
    pub child: Child,
    pub name: String,
}

impl Guard {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        Ok(Self {
            child,
            name: name.to_string(),
        })
    }

    /// Runs `sh -c` with `script` (for cgroup placement before exec).
    pub fn shell(name: &str, script: &str, env: &[(&str, &str)]) -> Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(script).stdin(Stdio::null());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(name, &mut cmd)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns whether it exited cleanly.
    pub fn stop(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        self.stop_with(libc::SIGTERM, timeout)
    }

    /// Sends `signal` and waits (bounded) for the exit.
    pub fn stop_with(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus> {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("{} did not stop within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            for _ in 0..50 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Waits until `cond` holds, polling every 20 ms, for at most `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !cond() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Waits until a TCP port on loopback accepts connections.
/// Starts `bakeoff-testserver` with `args` on a free port (in the test's own cgroup; see
/// `Cgroup::spawn_test_server` for a watched one); returns once it listens.
pub fn spawn_test_server(args: &[&str]) -> Result<(Guard, u16)> {
    let port = free_port();
    let guard = Guard::spawn(
        "test server",
        Command::new(bin("bakeoff-testserver")?)
            .args(["--port", &port.to_string()])
            .args(args),
    )?;
    wait_for_port(port, Duration::from_secs(10))?;
    Ok((guard, port))
}

/// Waits for `child` to exit (killed after `timeout`, an error) and returns its output.
pub fn wait_output(
    mut child: std::process::Child,
    timeout: Duration,
) -> Result<std::process::Output> {
    let deadline = std::time::Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "still running after {timeout:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child.wait_with_output()?)
}

pub fn wait_for_port(port: u16, timeout: Duration) -> Result<()> {
    wait_for(&format!("127.0.0.1:{port}"), timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// The directory of the binaries built by cargo (the test executable lives in `deps/` below).
pub fn target_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BAKEOFF_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().unwrap_or(Path::new("."));
    if dir.ends_with("deps") {
        dir.parent().unwrap_or(dir).to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// Path of a workspace binary (`bakeoff-probe`, `bakeoff-testserver`), checked to exist.
pub fn bin(name: &str) -> Result<PathBuf> {
    let path = target_bin_dir().join(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (`cargo xtask test` does)",
            path.display()
        );
    }
    Ok(path)
}

/// A free loopback port (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A fresh `/tmp/bakeoff-<name>-<pid>` directory for one test.
pub fn scratch_dir(name: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(format!("/tmp/bakeoff-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

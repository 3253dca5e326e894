//! cgroup v2 directories created for a test and removed after it.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::process::{Guard, bin, free_port, wait_for_port};

/// A cgroup v2 directory that is removed (after its processes are gone) on drop.
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<cgroup2 root>/<name>`.
    pub fn create(name: &str) -> Result<Self> {
        let path = bakeoff_probe::cohort::cgroup2_root().join(name);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create cgroup {} (are we root?)", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A shell prefix that moves the shell into this cgroup and then execs the command.
    pub fn exec_prefix(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && exec ", self.path.display())
    }

    /// Starts `bakeoff-testserver` (with `args`, e.g. `--delay-ms 1`) on a free port in this
    /// cgroup; returns once it listens.
    pub fn spawn_test_server(&self, args: &str) -> Result<(Guard, u16)> {
        let port = free_port();
        let guard = Guard::shell(
            "test server",
            &format!(
                "{}{} --port {port} {args}",
                self.exec_prefix(),
                bin("bakeoff-testserver")?.display()
            ),
            &[],
        )?;
        wait_for_port(port, std::time::Duration::from_secs(10))?;
        Ok((guard, port))
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.path).is_ok() || !self.path.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

//! A Postgres server (Debian's postgresql-15) started by a test inside a cgroup, on a loopback
//! port, as the `postgres` user, with its data in the test's directory; and `psql`/`pgbench`
//! against it.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};

use crate::{
    cgroup::Cgroup,
    process::{Guard, free_port, wait_for_port},
};

const BIN: &str = "/usr/lib/postgresql/15/bin";

pub struct Postgres {
    _guard: Guard,
    pub port: u16,
    pub dir: PathBuf,
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Postgres {
    /// initdb in `dir/<name>`, then the server in `cg` (its backends stay there: they are
    /// forks of the postmaster).
    pub fn start(dir: &Path, name: &str, cg: &Cgroup) -> Result<Self> {
        ensure!(
            Path::new(BIN).join("postgres").exists(),
            "Postgres 15 is not installed (Debian package postgresql-15; `cargo xtask test` installs it)"
        );
        let data = dir.join(name);
        let _ = std::fs::remove_dir_all(&data);
        std::fs::create_dir_all(&data)?;
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir))?;
        run(Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(format!("{BIN}/initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data))?;
        let port = free_port();
        let guard = Guard::shell(
            &format!("postgres {name}"),
            &format!(
                "{}runuser -u postgres -- {BIN}/postgres -D {} -p {port} -k {} \
                 -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
                 -c full_page_writes=off -c shared_buffers=32MB -c max_connections=20",
                cg.exec_prefix(),
                data.display(),
                data.display()
            ),
            &[],
        )?;
        wait_for_port(port, Duration::from_secs(30))?;
        Ok(Self {
            _guard: guard,
            port,
            dir: data,
        })
    }

    /// `psql -c sql` (simple query protocol, as psql sends it), as the `postgres` user.
    fn psql_command(&self, sql: &str) -> Command {
        let mut cmd = Command::new("psql");
        cmd.args([
            "-X",
            "-q",
            "-h",
            "127.0.0.1",
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args(["-p", &self.port.to_string(), "-c", sql]);
        cmd
    }

    /// `psql -c sql`, stopping at the first error; returns its output.
    pub fn psql(&self, sql: &str) -> Result<String> {
        run(self.psql_command(sql).args(["-v", "ON_ERROR_STOP=1"]))
    }

    /// `psql -c sql` expected to fail; returns its error output.
    pub fn psql_error(&self, sql: &str) -> Result<String> {
        let out = self.psql_command(sql).output()?;
        ensure!(!out.status.success(), "`{sql}` did not fail");
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// pgbench with a custom script: `mode` is simple, extended or prepared; `clients`
    /// connections; `limit` is `-t N` (transactions per client) or `-T S` (seconds).
    pub fn pgbench(
        &self,
        script: &Path,
        mode: &str,
        clients: u32,
        limit: &[&str],
    ) -> Result<String> {
        run(&mut self.pgbench_command(script, mode, clients, limit))
    }

    /// The pgbench command of [`Self::pgbench`], for a test that runs it in the background.
    pub fn pgbench_command(
        &self,
        script: &Path,
        mode: &str,
        clients: u32,
        limit: &[&str],
    ) -> Command {
        let mut cmd = Command::new(format!("{BIN}/pgbench"));
        cmd.args(["-n", "-h", "127.0.0.1", "-U", "postgres"])
            .args(["-p", &self.port.to_string(), "-M", mode])
            .args(["-c", &clients.to_string(), "-j", "1", "-f"])
            .arg(script)
            .args(limit)
            .arg("postgres");
        cmd
    }
}

//! A `bakeoff serve` collector started by a test on loopback ports, and its HTTP API.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result};

use crate::process::{Guard, bin, free_port, wait_for_port};

pub struct Collector {
    pub guard: Guard,
    pub grpc_port: u16,
    pub http_port: u16,
    /// Arguments choosing the store (and anything else), kept for restarts.
    pub args: Vec<String>,
}

impl Collector {
    /// Starts a collector on new ports with its database in `dir`.
    pub fn start(dir: &Path) -> Result<Self> {
        Self::start_on(dir, free_port(), free_port())
    }

    /// Starts (or restarts) a collector on given ports, DuckDB in `dir`.
    pub fn start_on(dir: &Path, grpc_port: u16, http_port: u16) -> Result<Self> {
        Self::start_with(dir, grpc_port, http_port, &[])
    }

    /// Starts the same collector again (same ports, same arguments) after `kill`.
    pub fn restart(&self, dir: &Path) -> Result<Self> {
        Self::start_with(dir, self.grpc_port, self.http_port, &self.args)
    }

    /// Starts a collector with extra arguments, e.g. `--clickhouse URL`.
    pub fn start_with(dir: &Path, grpc_port: u16, http_port: u16, args: &[String]) -> Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("collector.log"))?;
        let guard = Guard::spawn(
            "bakeoff serve",
            Command::new(bin("bakeoff")?)
                .arg("serve")
                .args(["--grpc-listen", &format!("127.0.0.1:{grpc_port}")])
                .args(["--http-listen", &format!("127.0.0.1:{http_port}")])
                .arg("--db")
                .arg(dir.join("events.duckdb"))
                .args(args)
                .stdout(std::process::Stdio::null())
                .stderr(log),
        )?;
        wait_for_port(http_port, Duration::from_secs(30))?;
        wait_for_port(grpc_port, Duration::from_secs(30))?;
        Ok(Self {
            guard,
            grpc_port,
            http_port,
            args: args.to_vec(),
        })
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.grpc_port)
    }

    /// GET a path of the HTTP API as JSON.
    pub fn get(&self, path_and_query: &str) -> Result<serde_json::Value> {
        get_json(&format!(
            "http://127.0.0.1:{}{path_and_query}",
            self.http_port
        ))
    }

    /// The status and body text of a GET, whatever the status.
    pub fn get_status(&self, path_and_query: &str) -> Result<(u16, String)> {
        let url = format!("http://127.0.0.1:{}{path_and_query}", self.http_port);
        let mut resp = ureq::get(&url)
            .config()
            .http_status_as_error(false)
            .build()
            .call()
            .with_context(|| format!("GET {url}"))?;
        let status = resp.status().as_u16();
        Ok((status, resp.body_mut().read_to_string()?))
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(&mut self) -> Result<()> {
        self.guard.child.kill()?;
        self.guard.child.wait()?;
        Ok(())
    }
}

pub fn get_json(url: &str) -> Result<serde_json::Value> {
    let mut resp = ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?;
    resp.body_mut()
        .read_json()
        .with_context(|| format!("bad JSON from {url}"))
}

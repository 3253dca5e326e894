//! A real `clickhouse-server` (Debian's package) started by a test: its own config, data
//! directory and loopback ports, stopped with the test.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, ensure};

use crate::process::{Guard, free_port, wait_for};

pub const SERVER: &str = "/usr/sbin/clickhouse-server";

pub struct ClickHouse {
    pub guard: Guard,
    pub http_port: u16,
}

impl ClickHouse {
    /// Starts a server with everything under `dir`; returns once it answers queries.
    pub fn start(dir: &Path) -> Result<Self> {
        ensure!(
            Path::new(SERVER).exists(),
            "{SERVER} is missing: run `cargo xtask bootstrap` (Debian package clickhouse-server)"
        );
        let root = dir.join("clickhouse");
        std::fs::create_dir_all(&root)?;
        let (http_port, tcp_port) = (free_port(), free_port());
        let d = root.display();
        let config = format!(
            "<yandex>
  <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/err.log</errorlog></logger>
  <http_port>{http_port}</http_port>
  <tcp_port>{tcp_port}</tcp_port>
  <listen_host>127.0.0.1</listen_host>
  <path>{d}/data/</path>
  <tmp_path>{d}/tmp/</tmp_path>
  <user_files_path>{d}/user_files/</user_files_path>
  <format_schema_path>{d}/format_schemas/</format_schema_path>
  <users_config>/etc/clickhouse-server/users.xml</users_config>
  <default_profile>default</default_profile>
  <default_database>default</default_database>
  <mark_cache_size>268435456</mark_cache_size>
</yandex>
"
        );
        let config_path = root.join("config.xml");
        std::fs::write(&config_path, config)?;
        let guard = Guard::spawn(
            "clickhouse-server",
            Command::new(SERVER)
                .arg(format!("--config-file={}", config_path.display()))
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(root.join("stderr.log"))?),
        )?;
        let server = Self { guard, http_port };
        wait_for("clickhouse-server", Duration::from_secs(60), || {
            server.query("SELECT 1").is_ok_and(|r| r.trim() == "1")
        })
        .with_context(|| {
            format!(
                "clickhouse-server did not answer; its log: {}",
                std::fs::read_to_string(root.join("err.log")).unwrap_or_default()
            )
        })?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Runs one query, returns its text answer.
    pub fn query(&self, sql: &str) -> Result<String> {
        let mut resp = ureq::post(&self.url())
            .query("query", sql)
            .send("")
            .with_context(|| format!("ClickHouse query {sql}"))?;
        Ok(resp.body_mut().read_to_string()?)
    }
}

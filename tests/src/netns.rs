//! A network namespace joined to the host by a veth pair, for tests that need a real link
//! (packet loss and reordering by an nftables rule) without touching the host's own traffic.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, ensure};

/// `bk-<tag>`: host side `10.213.<n>.1`, namespace side `10.213.<n>.2`.
pub struct Netns {
    name: String,
    pub host_ip: Ipv4Addr,
    pub ns_ip: Ipv4Addr,
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Netns {
    /// Creates the namespace and the link; `n` picks the subnet (tests running at once use
    /// different ones).
    pub fn create(tag: &str, n: u8) -> Result<Self> {
        let name = format!("bk-{tag}");
        let (host_if, ns_if) = (format!("bkh-{tag}"), format!("bkn-{tag}"));
        ensure!(host_if.len() <= 15, "interface name {host_if} too long");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let netns = Self {
            name: name.clone(),
            host_ip: Ipv4Addr::new(10, 213, n, 1),
            ns_ip: Ipv4Addr::new(10, 213, n, 2),
        };
        run(Command::new("ip").args(["netns", "add", &name]))?;
        run(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]))?;
        run(Command::new("ip").args(["link", "set", &ns_if, "netns", &name]))?;
        run(Command::new("ip").args([
            "addr",
            "add",
            &format!("{}/24", netns.host_ip),
            "dev",
            &host_if,
        ]))?;
        run(Command::new("ip").args(["link", "set", &host_if, "up"]))?;
        let in_ns = |args: &[&str]| {
            run(Command::new("ip")
                .args(["netns", "exec", &name, "ip"])
                .args(args))
        };
        in_ns(&["addr", "add", &format!("{}/24", netns.ns_ip), "dev", &ns_if])?;
        in_ns(&["link", "set", &ns_if, "up"])?;
        in_ns(&["link", "set", "lo", "up"])?;
        Ok(netns)
    }

    /// A shell prefix that runs a command inside the namespace.
    pub fn exec_prefix(&self) -> String {
        format!("ip netns exec {} ", self.name)
    }

    /// Loads an nftables ruleset inside the namespace (`nft -f -`).
    pub fn nft(&self, ruleset: &str) -> Result<()> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.name, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot run nft (package nftables)")?;
        child
            .stdin
            .take()
            .context("nft stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "nft refused the ruleset: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it the host's.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

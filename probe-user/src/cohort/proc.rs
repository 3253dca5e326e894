//! Reading processes and their sockets from `/proc`. Every read may fail (the process may exit
//! at any moment); failures mean "unknown", never a panic.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// A process whose `/proc` entries are read on first use and remembered.
pub struct LazyProcess {
    pid: u32,
    exe: Option<Option<String>>,
    environ: Option<Option<Vec<u8>>>,
    cgroup: Option<Option<String>>,
}

impl LazyProcess {
    pub fn new(pid: u32) -> Self {
        Self {
            pid,
            exe: None,
            environ: None,
            cgroup: None,
        }
    }

    pub fn exe(&mut self) -> Option<&str> {
        let pid = self.pid;
        self.exe.get_or_insert_with(|| exe_of(pid)).as_deref()
    }

    /// Value of an environment variable of the process.
    pub fn env(&mut self, name: &str) -> Option<String> {
        let pid = self.pid;
        let environ = self
            .environ
            .get_or_insert_with(|| std::fs::read(format!("/proc/{pid}/environ")).ok())
            .as_deref()?;
        environ.split(|&b| b == 0).find_map(|entry| {
            let (k, v) = entry.split_at(entry.iter().position(|&b| b == b'=')?);
            (k == name.as_bytes()).then(|| String::from_utf8_lossy(&v[1..]).into_owned())
        })
    }

    /// The process's cgroup v2 path (relative to the cgroup v2 root, starting with `/`).
    pub fn cgroup2(&mut self) -> Option<&str> {
        let pid = self.pid;
        self.cgroup
            .get_or_insert_with(|| {
                let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
                text.lines()
                    .find_map(|l| l.strip_prefix("0::"))
                    .map(str::to_string)
            })
            .as_deref()
    }
}

/// `/proc/<pid>/exe`, or `None` for kernel threads and vanished processes.
pub fn exe_of(pid: u32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Thread-group id of a task (a thread's tgid differs from its id).
pub fn tgid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Child processes of a process (from every thread's `children` list).
pub fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// All process ids currently in `/proc`.
pub fn all_pids() -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect()
}

/// Process ids in a cgroup v2 directory.
pub fn pids_in_cgroup(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .map(|t| t.lines().filter_map(|l| l.trim().parse().ok()).collect())
        .unwrap_or_default()
}

/// An established TCP connection of a process, found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeedSocket {
    pub fd: u32,
    /// True when the local port is one the process's network namespace listens on.
    pub server: bool,
    pub peer: SocketAddr,
}

#[derive(Debug)]
struct TcpEntry {
    local: SocketAddr,
    remote: SocketAddr,
    state: u8,
}

const TCP_ESTABLISHED: u8 = 0x01;
const TCP_LISTEN: u8 = 0x0A;

/// Established TCP sockets of a process, with the side it plays on each.
pub fn established_sockets(pid: u32) -> Vec<SeedSocket> {
    let mut by_inode: HashMap<u64, TcpEntry> = HashMap::new();
    for file in ["tcp", "tcp6"] {
        if let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")) {
            by_inode.extend(parse_proc_net_tcp(&text));
        }
    }
    let listening: Vec<u16> = by_inode
        .values()
        .filter(|e| e.state == TCP_LISTEN)
        .map(|e| e.local.port())
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for fd in fds.flatten() {
        let Some(fd_num) = fd.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        let Some(inode) = target
            .strip_prefix("socket:[")
            .and_then(|s| s.strip_suffix(']'))
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if let Some(e) = by_inode.get(&inode)
            && e.state == TCP_ESTABLISHED
        {
            out.push(SeedSocket {
                fd: fd_num,
                server: listening.contains(&e.local.port()),
                peer: e.remote,
            });
        }
    }
    out
}

/// Peer address of one socket fd of a process (for accepts whose address the kernel program
/// did not see).
pub fn peer_of(pid: u32, fd: u32) -> Option<SocketAddr> {
    let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).ok()?;
    let target = target.to_string_lossy();
    let inode: u64 = target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()?;
    ["tcp", "tcp6"].iter().find_map(|file| {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{file}")).ok()?;
        parse_proc_net_tcp(&text)
            .into_iter()
            .find(|(i, _)| *i == inode)
            .map(|(_, e)| e.remote)
    })
}

/// Parses `/proc/net/tcp` or `tcp6` into inode -> entry.
fn parse_proc_net_tcp(text: &str) -> Vec<(u64, TcpEntry)> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local = parse_addr(f.get(1)?)?;
            let remote = parse_addr(f.get(2)?)?;
            let state = u8::from_str_radix(f.get(3)?, 16).ok()?;
            let inode = f.get(9)?.parse().ok()?;
            Some((
                inode,
                TcpEntry {
                    local,
                    remote,
                    state,
                },
            ))
        })
        .collect()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6); words are in host byte order.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(
            u32::from_str_radix(ip, 16).ok()?.swap_bytes(),
        )),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_net_tcp_lines() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000 100 0 0 10 0\n   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0000000000000000 100 0 0 10 0\n";
        let entries = parse_proc_net_tcp(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].0, 12345);
        assert_eq!(entries[0].1.local, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(entries[1].1.remote, "127.0.0.1:50000".parse().unwrap());
        assert_eq!(entries[1].1.state, TCP_ESTABLISHED);
        assert_eq!(
            parse_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
    }

    #[test]
    fn finds_own_established_socket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        let socks = established_sockets(std::process::id());
        use std::os::fd::AsRawFd;
        let s = socks
            .iter()
            .find(|s| s.fd == server.as_raw_fd() as u32)
            .unwrap();
        assert!(s.server);
        assert_eq!(s.peer, client.local_addr().unwrap());
        let c = socks
            .iter()
            .find(|s| s.fd == client.as_raw_fd() as u32)
            .unwrap();
        assert!(!c.server);
    }
}

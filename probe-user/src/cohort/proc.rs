//! Reading processes and their sockets from `/proc`. Every read may fail (the process may exit
//! at any moment); failures mean "unknown", never a panic.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

use crate::kernel::privileges::{Cap, first_missing, is_denied, warn_denied};

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
            .get_or_insert_with(|| {
                std::fs::read(format!("/proc/{pid}/environ"))
                    .inspect_err(|e| {
                        if is_denied(e) {
                            warn_denied(
                                first_missing(&[Cap::DacReadSearch, Cap::SysPtrace]),
                                "reading /proc/<pid>/environ of",
                                &format!("pid {pid}"),
                                "env rules do not match processes of other users",
                                e,
                            );
                        }
                    })
                    .ok()
            })
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
        .inspect_err(|e| {
            if is_denied(e) {
                warn_denied(
                    Cap::SysPtrace,
                    "reading /proc/<pid>/exe of",
                    &format!("pid {pid}"),
                    "events of processes of other users carry no exe, and exe rules do not \
                     match them",
                    e,
                );
            }
        })
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
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        Err(e) => {
            if is_denied(&e) {
                warn_denied(
                    first_missing(&[Cap::DacReadSearch, Cap::SysPtrace]),
                    "listing /proc/<pid>/fd of",
                    &format!("pid {pid}"),
                    "connections that processes of other users opened before the probe \
                     started are not seen",
                    &e,
                );
            }
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    for fd in fds.flatten() {
        let Some(fd_num) = fd.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let target = match std::fs::read_link(fd.path()) {
            Ok(t) => t,
            Err(e) => {
                if is_denied(&e) {
                    warn_denied(
                        Cap::SysPtrace,
                        "reading /proc/<pid>/fd links of",
                        &format!("pid {pid}"),
                        "connections that processes of other users opened before the probe \
                         started are not seen",
                        &e,
                    );
                }
                continue;
            }
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
/// did not see, and connections adopted from their data). O(1): the socket is borrowed with
/// `pidfd_getfd` and asked with `getpeername`, never found by scanning `/proc/<pid>/net/tcp`
/// (which grows with every TIME_WAIT socket on the host).
pub fn peer_of(pid: u32, fd: u32) -> Option<SocketAddr> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain syscalls; each returned fd is owned and closed on drop.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
    if pidfd < 0 {
        return None;
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let sock = unsafe {
        libc::syscall(
            libc::SYS_pidfd_getfd,
            pidfd.as_raw_fd(),
            fd as libc::c_int,
            0,
        )
    };
    if sock < 0 {
        let e = std::io::Error::last_os_error();
        if is_denied(&e) {
            warn_denied(
                Cap::SysPtrace,
                "borrowing a socket with pidfd_getfd from",
                &format!("pid {pid}"),
                "peers of connections of other users' processes found mid-stream are unknown",
                &e,
            );
        }
        return None;
    }
    let sock = unsafe { OwnedFd::from_raw_fd(sock as i32) };
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: storage is large enough for any address; len tells the kernel its size.
    let ret = unsafe {
        libc::getpeername(
            sock.as_raw_fd(),
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return None;
    }
    sockaddr_to_std(&storage)
}

/// A `sockaddr_storage` holding an IPv4 or IPv6 address, as a `SocketAddr` (IPv4-mapped IPv6
/// addresses as IPv4).
fn sockaddr_to_std(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    use std::net::{IpAddr, Ipv6Addr};
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: libc::sockaddr_in =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            Some(SocketAddr::new(
                IpAddr::V4(u32::from_be(a.sin_addr.s_addr).into()),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: libc::sockaddr_in6 =
                unsafe { std::ptr::read((storage as *const libc::sockaddr_storage).cast()) };
            let v6 = Ipv6Addr::from(a.sin6_addr.s6_addr);
            let ip = match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6(v6),
            };
            Some(SocketAddr::new(ip, u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
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
        // The peer of one fd, without scanning the socket tables.
        assert_eq!(
            peer_of(std::process::id(), server.as_raw_fd() as u32),
            Some(client.local_addr().unwrap())
        );
        assert_eq!(
            peer_of(std::process::id(), client.as_raw_fd() as u32),
            Some(listener.local_addr().unwrap())
        );
        assert_eq!(peer_of(std::process::id(), 1_000_000), None);
    }
}

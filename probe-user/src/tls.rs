//! Which cohort processes get TLS uprobes, and on which library.
//!
//! A process's TLS library is found in its memory map: a mapped `libssl.so*` (OpenSSL, and
//! BoringSSL builds that keep its names), or the executable itself when it exports `SSL_write`
//! (Node.js links OpenSSL statically). The dynamic loader maps libraries after `exec`, and
//! interpreters load them on import: a process without one yet is looked at again, backing off
//! to every `RECHECK_MAX`.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::kernel::{
    Kernel,
    privileges::{Cap, first_missing, is_denied, warn_denied},
};

/// Backoff of the re-checks of a process whose TLS library is not mapped (yet).
const RECHECK_FIRST: Duration = Duration::from_millis(100);
const RECHECK_MAX: Duration = Duration::from_secs(10);

/// Counters, for the stats and `/metrics`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct TlsWatchStats {
    /// Processes with TLS uprobes attached now.
    pub processes_attached: u64,
    /// Attachments that failed (the error is logged once per process).
    pub attach_errors: u64,
}

#[derive(Debug)]
struct Pending {
    next: Instant,
    wait: Duration,
}

/// The TLS uprobes' owner in user space.
#[derive(Debug, Default)]
pub struct TlsWatch {
    /// Off by default: a uprobe hit costs the watched process microseconds (see the README).
    enabled: bool,
    /// Attached processes and the library they were attached to.
    attached: HashMap<u32, PathBuf>,
    /// Members whose library was not found yet.
    pending: HashMap<u32, Pending>,
    /// Executables already checked for static TLS symbols, by path.
    static_exes: HashMap<PathBuf, bool>,
    pub stats: TlsWatchStats,
}

impl TlsWatch {
    /// A watch that attaches nothing unless `enabled` (`--tls-plaintext`).
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// A process joined a cohort (or exec'd a new program): attach now if it maps a TLS
    /// library, else look again later.
    pub fn joined(&mut self, kernel: &mut Kernel, pid: u32) {
        if !self.enabled {
            return;
        }
        self.attached.remove(&pid);
        kernel.detach_tls(pid);
        self.pending.insert(
            pid,
            Pending {
                next: Instant::now(),
                wait: RECHECK_FIRST,
            },
        );
        self.check(kernel, pid);
    }

    /// A process left (exited): its uprobes go.
    pub fn left(&mut self, kernel: &mut Kernel, pid: u32) {
        self.pending.remove(&pid);
        if self.attached.remove(&pid).is_some() {
            kernel.detach_tls(pid);
        }
        self.stats.processes_attached = self.attached.len() as u64;
    }

    /// Looks again at processes due for a re-check (call periodically).
    pub fn recheck(&mut self, kernel: &mut Kernel) {
        let now = Instant::now();
        let due: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, p)| p.next <= now)
            .map(|(pid, _)| *pid)
            .collect();
        for pid in due {
            self.check(kernel, pid);
        }
    }

    fn check(&mut self, kernel: &mut Kernel, pid: u32) {
        let maps = match std::fs::read_to_string(format!("/proc/{pid}/maps")) {
            Ok(maps) => maps,
            Err(e) => {
                // Gone, or not ours to read.
                if is_denied(&e) {
                    self.stats.attach_errors += 1;
                    warn_denied(
                        first_missing(&[Cap::Perfmon, Cap::SysPtrace]),
                        "reading /proc/<pid>/maps of",
                        &format!("pid {pid}"),
                        "TLS plaintext of processes of other users is not decoded",
                        &e,
                    );
                }
                self.pending.remove(&pid);
                return;
            }
        };
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let library = tls_library(&maps, exe.as_deref(), &mut self.static_exes);
        let Some(library) = library else {
            if let Some(p) = self.pending.get_mut(&pid) {
                p.next = Instant::now() + p.wait;
                p.wait = (p.wait * 2).min(RECHECK_MAX);
            }
            return;
        };
        self.pending.remove(&pid);
        // The path as the process sees it, reached through its root (containers).
        let path = Path::new("/proc")
            .join(pid.to_string())
            .join("root")
            .join(library.strip_prefix("/").unwrap_or(&library));
        match kernel.attach_tls(pid, &path) {
            Ok(functions) => {
                tracing::info!(pid, library = %library.display(), functions, "TLS uprobes attached");
                self.attached.insert(pid, library);
            }
            Err(e) => {
                self.stats.attach_errors += 1;
                tracing::warn!(pid, error = %e, "TLS plaintext of this process will not be seen");
            }
        }
        self.stats.processes_attached = self.attached.len() as u64;
    }
}

/// The TLS library a process maps, from its `/proc/<pid>/maps` text: a `libssl.so*` file, or
/// the executable when it carries OpenSSL's symbols itself.
pub fn tls_library(
    maps: &str,
    exe: Option<&Path>,
    static_exes: &mut HashMap<PathBuf, bool>,
) -> Option<PathBuf> {
    let mut exe_mapped = false;
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let path = Path::new(path);
        if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("libssl.so"))
        {
            return Some(path.to_path_buf());
        }
        exe_mapped |= Some(path) == exe;
    }
    let exe = exe.filter(|_| exe_mapped)?;
    let has = *static_exes
        .entry(exe.to_path_buf())
        .or_insert_with(|| exports_ssl_write(exe));
    has.then(|| exe.to_path_buf())
}

/// Whether an executable exports `SSL_write` (a statically linked OpenSSL that kept its
/// dynamic symbols, as Node.js does). Reads the file's dynamic symbol table only.
fn exports_ssl_write(exe: &Path) -> bool {
    use object::{Object, ObjectSymbol};
    let Ok(file) = std::fs::File::open(exe) else {
        return false;
    };
    // Reads only the parts of the file the symbol lookup needs (an executable with a static
    // OpenSSL is large: Node's is ~100 MB).
    let cache = object::ReadCache::new(file);
    let Ok(obj) = object::File::parse(&cache) else {
        return false;
    };
    obj.dynamic_symbols()
        .any(|s| s.name() == Ok("SSL_write") && s.is_definition())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_libssl_in_a_memory_map() {
        let maps = "\
55d0c0a00000-55d0c0a2c000 r--p 00000000 fd:01 1234 /usr/sbin/nginx
7f1c2a000000-7f1c2a09b000 r-xp 00000000 fd:01 99 /usr/lib/x86_64-linux-gnu/libssl.so.3
7f1c2b000000-7f1c2b021000 rw-p 00000000 00:00 0
7ffd6b1f0000-7ffd6b211000 rw-p 00000000 00:00 0 [stack]";
        let mut cache = HashMap::new();
        assert_eq!(
            tls_library(maps, Some(Path::new("/usr/sbin/nginx")), &mut cache),
            Some(PathBuf::from("/usr/lib/x86_64-linux-gnu/libssl.so.3"))
        );
        let plain = "55d0c0a00000-55d0c0a2c000 r--p 00000000 fd:01 1234 /usr/bin/true";
        assert_eq!(
            tls_library(plain, Some(Path::new("/usr/bin/true")), &mut cache),
            None
        );
        assert_eq!(cache.get(Path::new("/usr/bin/true")), Some(&false));
    }
}

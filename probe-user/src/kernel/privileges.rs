//! Linux capabilities: which ones the probe needs for what, per data path, and the errors and
//! warnings that name the missing one instead of a bare "Operation not permitted".
//!
//! Measured as uid 65534 with nothing but the listed capabilities, on Linux 6.18 with
//! `kernel.unprivileged_bpf_disabled=2` and `kernel.perf_event_paranoid=2`
//! (`tests/tests/privilege.rs` runs each set and each set minus one):
//!
//! | capability | why | without it |
//! | --- | --- | --- |
//! | `CAP_BPF` | `bpf()`: the maps, the programs | the probe does not start |
//! | `CAP_PERFMON` | loading the tracepoint programs (scheduler hooks, syscall hooks), `perf_event_open` on tracepoints CPU-wide | the probe does not start |
//! | `CAP_DAC_READ_SEARCH` | tracefs (`/sys/kernel/tracing`, mode 0700 root): the tracepoint ids; `/proc/<pid>/fd` and `/proc/<pid>/environ` of other users | the probe does not start |
//! | `CAP_NET_ADMIN` | cgroup path: loading the `cgroup/sock` program, attaching the programs to the cohort cgroups (`BPF_LINK_CREATE`) | the cgroup path refuses to attach |
//! | `CAP_SYS_PTRACE` | `/proc/<pid>/exe`, `/proc/<pid>/root`, `/proc/<pid>/fd` links, `pidfd_getfd` of processes of other users | events carry no `exe`; syscall path: connections open at start unseen, peers found mid-stream unknown, exe/env rules blind to other users |
//! | `CAP_SYS_ADMIN` | TLS uprobes (`perf_event_open` of a uprobe needs it since Linux 6.16 and the stable kernels of July 2025, commit ba677dbe77af; `CAP_PERFMON` before) | TLS plaintext is not decoded |
//!
//! `CAP_SYS_ADMIN` also passes every `CAP_BPF`, `CAP_PERFMON` and `CAP_NET_ADMIN` check of
//! `bpf()` and `perf_event_open`. `CAP_PERFMON` alone already opens `/proc/<pid>/maps` of other
//! users (observed). `CAP_SYS_RESOURCE` matters only before Linux 5.11, which charged BPF maps
//! to `RLIMIT_MEMLOCK` (not measured: the development host's bounding set lacks it).

use std::{collections::HashSet, io, sync::Mutex};

/// The capabilities the probe may need.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cap {
    DacOverride,
    DacReadSearch,
    NetAdmin,
    SysPtrace,
    SysAdmin,
    SysResource,
    Perfmon,
    Bpf,
}

impl Cap {
    /// The capability's number (`linux/capability.h`).
    pub const fn number(self) -> u32 {
        match self {
            Cap::DacOverride => 1,
            Cap::DacReadSearch => 2,
            Cap::NetAdmin => 12,
            Cap::SysPtrace => 19,
            Cap::SysAdmin => 21,
            Cap::SysResource => 24,
            Cap::Perfmon => 38,
            Cap::Bpf => 39,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Cap::DacOverride => "CAP_DAC_OVERRIDE",
            Cap::DacReadSearch => "CAP_DAC_READ_SEARCH",
            Cap::NetAdmin => "CAP_NET_ADMIN",
            Cap::SysPtrace => "CAP_SYS_PTRACE",
            Cap::SysAdmin => "CAP_SYS_ADMIN",
            Cap::SysResource => "CAP_SYS_RESOURCE",
            Cap::Perfmon => "CAP_PERFMON",
            Cap::Bpf => "CAP_BPF",
        }
    }
}

/// A capability set (the effective set of this process, usually).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    /// The effective set of this process (`CapEff` in `/proc/self/status`); `None` if unknown.
    pub fn effective() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        Self::parse_status(&status)
    }

    fn parse_status(status: &str) -> Option<Self> {
        let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
        u64::from_str_radix(hex.trim(), 16).ok().map(Self)
    }

    /// Whether `cap` itself is in the set.
    pub fn contains(self, cap: Cap) -> bool {
        self.0 & (1 << cap.number()) != 0
    }

    /// Whether the kernel's checks for `cap` pass: `CAP_SYS_ADMIN` passes those of `bpf()` and
    /// `perf_event_open` (`bpf_capable`, `perfmon_capable`, `bpf_net_capable`),
    /// `CAP_DAC_OVERRIDE` the read permission checks.
    pub fn grants(self, cap: Cap) -> bool {
        self.contains(cap)
            || match cap {
                Cap::Bpf | Cap::Perfmon | Cap::NetAdmin => self.contains(Cap::SysAdmin),
                Cap::DacReadSearch => self.contains(Cap::DacOverride),
                _ => false,
            }
    }

    /// Names of the capabilities of [`Cap`] in the set.
    pub fn names(self) -> Vec<&'static str> {
        ALL.iter()
            .filter(|c| self.contains(**c))
            .map(|c| c.name())
            .collect()
    }
}

const ALL: [Cap; 8] = [
    Cap::Bpf,
    Cap::Perfmon,
    Cap::NetAdmin,
    Cap::DacReadSearch,
    Cap::SysPtrace,
    Cap::SysAdmin,
    Cap::SysResource,
    Cap::DacOverride,
];

/// The parts of the probe that need their own capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// cgroup_skb and cgroup/sock programs on the cohort cgroups (cgroup rules, `--data-path
    /// auto`).
    CgroupPath,
    /// Syscall tracepoints (pid, exe and env rules, or `--data-path syscall`).
    SyscallPath,
    /// OpenSSL uprobes (`--tls-plaintext`).
    Tls,
}

impl Feature {
    pub const fn name(self) -> &'static str {
        match self {
            Feature::CgroupPath => "cgroup",
            Feature::SyscallPath => "syscall",
            Feature::Tls => "tls",
        }
    }
}

/// What a feature loses without a capability.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Without {
    /// The probe stops with an error naming the capability.
    Fails,
    /// The probe runs; this is lost (a warning names the capability when it happens).
    Degrades(&'static str),
}

/// One capability a feature needs, and why.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub cap: Cap,
    pub why: &'static str,
    pub without: Without,
}

const BPF: Need = Need {
    cap: Cap::Bpf,
    why: "bpf(): creating the maps and loading the programs",
    without: Without::Fails,
};
const PERFMON: Need = Need {
    cap: Cap::Perfmon,
    why: "loading the tracepoint programs and perf_event_open on tracepoints (CPU-wide)",
    without: Without::Fails,
};
const TRACEFS: Need = Need {
    cap: Cap::DacReadSearch,
    why: "reading tracepoint ids in tracefs (/sys/kernel/tracing is mode 0700 root), \
          /proc/<pid>/fd and /proc/<pid>/environ of other users' processes",
    without: Without::Fails,
};
const NET_ADMIN: Need = Need {
    cap: Cap::NetAdmin,
    why: "loading the cgroup/sock program and attaching the programs to the cohort cgroups",
    without: Without::Fails,
};
const PTRACE_EXE: Need = Need {
    cap: Cap::SysPtrace,
    why: "reading /proc/<pid>/exe of other users' processes",
    without: Without::Degrades("events of other users' processes carry no exe"),
};
const PTRACE_SYSCALL: Need = Need {
    cap: Cap::SysPtrace,
    why: "/proc/<pid>/exe, /proc/<pid>/environ and /proc/<pid>/fd links of other users' \
          processes, pidfd_getfd",
    without: Without::Degrades(
        "exe and env rules do not match other users' processes, their events carry no exe, \
         connections open before the probe started and peers of connections found mid-stream \
         are not known",
    ),
};
const SYS_ADMIN_TLS: Need = Need {
    cap: Cap::SysAdmin,
    why: "perf_event_open of uprobes (CAP_SYS_ADMIN since Linux 6.16 and the July 2025 stable \
          kernels; CAP_PERFMON before)",
    without: Without::Degrades("TLS plaintext is not decoded"),
};
const PTRACE_TLS: Need = Need {
    cap: Cap::SysPtrace,
    why: "opening the TLS library through /proc/<pid>/root of other users' processes",
    without: Without::Degrades("TLS plaintext is not decoded"),
};

/// The capabilities a feature needs (for the cgroup and syscall paths: all of what the probe
/// needs with that path alone).
pub fn needs(feature: Feature) -> &'static [Need] {
    match feature {
        Feature::CgroupPath => &[BPF, PERFMON, TRACEFS, NET_ADMIN, PTRACE_EXE],
        Feature::SyscallPath => &[BPF, PERFMON, TRACEFS, PTRACE_SYSCALL],
        Feature::Tls => &[SYS_ADMIN_TLS, PTRACE_TLS],
    }
}

/// Makes the permitted capabilities effective. A non-root container gets no ambient
/// capabilities (Kubernetes' `capabilities.add` only fills the bounding set for a non-root user):
/// the image gives the binary file capabilities, and `+p` (permitted, without the effective
/// bit) lets one image carry the largest set while each pod's bounding set trims it (with the
/// effective bit, `exec` fails with EPERM when the bounding set lacks one of them). Only this
/// thread's set changes, and threads started later inherit it: call it first thing.
pub fn raise_permitted() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget with a v3 header and the two data words v3 expects.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if data.iter().all(|d| d.effective == d.permitted) {
        return Ok(());
    }
    for d in &mut data {
        d.effective = d.permitted;
    }
    // SAFETY: capset with the header and data capget filled; effective is within permitted.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the running kernel is older than `major.minor` (false if unknown).
pub fn kernel_before(major: u32, minor: u32) -> bool {
    let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") else {
        return false;
    };
    let mut parts = release
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(a), Some(b)) => (a, b) < (major, minor),
        _ => false,
    }
}

/// `EPERM`, `EACCES`... for an error message.
pub fn errno_name(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM".into(),
        Some(libc::EACCES) => "EACCES".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EBUSY) => "EBUSY".into(),
        _ => e.to_string(),
    }
}

/// Whether an error is the kernel refusing for lack of privilege.
pub fn is_denied(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}

/// The text after "`what` needs `CAP_X`": the errno, and a remark when this process has the
/// capability and was refused all the same.
pub fn detail(cap: Cap, errno: &io::Error) -> String {
    let errno = errno_name(errno);
    match CapSet::effective() {
        Some(caps) if caps.grants(cap) => format!(
            " ({errno}, although this process has {}: a security module, seccomp profile or \
             user namespace may refuse it)",
            cap.name()
        ),
        _ => format!(" ({errno})"),
    }
}

/// The first of `caps` whose checks this process does not pass (the last one if it passes them
/// all and was refused anyway): the one to name.
pub fn first_missing(caps: &[Cap]) -> Cap {
    let effective = CapSet::effective();
    caps.iter()
        .copied()
        .find(|c| effective.is_some_and(|e| !e.grants(*c)))
        .or_else(|| caps.last().copied())
        .unwrap_or(Cap::SysPtrace)
}

static WARNED: Mutex<Option<HashSet<(Cap, &'static str)>>> = Mutex::new(None);

/// Logs once per capability and purpose that the kernel refused something for lack of `cap`,
/// and what the probe loses: "reading /proc/<pid>/exe of pid 42 needs CAP_SYS_PTRACE (EACCES):
/// events of other users' processes carry no exe". Later refusals of the same kind are logged
/// at debug level.
pub fn warn_denied(cap: Cap, what: &'static str, subject: &str, lost: &str, errno: &io::Error) {
    let first = WARNED
        .lock()
        .map(|mut w| w.get_or_insert_with(HashSet::new).insert((cap, what)))
        .unwrap_or(true);
    let errno = errno_name(errno);
    if first {
        tracing::warn!(
            "missing privileges: {what} {subject} needs {} ({errno}): {lost}",
            cap.name()
        );
    } else {
        tracing::debug!(cap = cap.name(), what, subject, %errno, "refused again");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_effective_set_and_counts_sys_admin_for_bpf() {
        let status = "Name:\tx\nCapInh:\t0000000000000000\nCapEff:\t0000008000201000\n";
        let caps = CapSet::parse_status(status).expect("CapEff");
        assert_eq!(caps.names(), ["CAP_BPF", "CAP_NET_ADMIN", "CAP_SYS_ADMIN"]);
        assert!(
            caps.grants(Cap::Perfmon),
            "CAP_SYS_ADMIN passes perfmon_capable()"
        );
        assert!(!caps.contains(Cap::Perfmon));
        assert!(!caps.grants(Cap::SysPtrace));
        assert!(!caps.grants(Cap::DacReadSearch));
        let dac = CapSet(1 << Cap::DacOverride.number());
        assert!(dac.grants(Cap::DacReadSearch));
    }

    #[test]
    fn each_path_needs_bpf_perfmon_and_tracefs_and_only_cgroups_need_net_admin() {
        for f in [Feature::CgroupPath, Feature::SyscallPath] {
            let caps: Vec<Cap> = needs(f).iter().map(|n| n.cap).collect();
            for c in [Cap::Bpf, Cap::Perfmon, Cap::DacReadSearch, Cap::SysPtrace] {
                assert!(caps.contains(&c), "{f:?} {c:?}");
            }
            assert_eq!(caps.contains(&Cap::NetAdmin), f == Feature::CgroupPath);
        }
        assert!(
            needs(Feature::Tls)
                .iter()
                .all(|n| matches!(n.without, Without::Degrades(_)))
        );
    }
}

//! Loading, attaching and talking to the kernel programs.

pub mod privileges;
pub mod record;
pub mod tracefs;

use std::{collections::HashMap, io};

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSock, ProgramError, TracePoint,
        UProbe, cgroup_skb::CgroupSkbLinkId, cgroup_sock::CgroupSockLinkId,
        trace_point::TracePointLinkId, uprobe::UProbeLinkId, uprobe::UProbeScope,
    },
};
use privileges::{Cap, CapSet};
use probe_common::{SockInfo, SockKey, drop_reason, setting};

/// The compiled kernel programs, built by `build.rs` from `probe-ebpf`.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"));

/// Hooks that are always attached: cheap (they fire per process start or exit, not per syscall)
/// and needed to follow cohort membership.
const SCHED_HOOKS: &[(&str, &str, &str)] = &[
    ("sched_process_exec", "sched", "sched_process_exec"),
    ("sched_process_fork", "sched", "sched_process_fork"),
    ("sched_process_exit", "sched", "sched_process_exit"),
    ("task_newtask", "task", "task_newtask"),
];

/// Hooks that fire on syscalls of every process on the host: attached only while a cohort has
/// members (see DESIGN.md's cost model).
const SOCKET_HOOKS: &[(&str, &str, &str)] = &[
    ("sys_enter_accept", "syscalls", "sys_enter_accept"),
    ("sys_enter_accept", "syscalls", "sys_enter_accept4"),
    ("sys_enter_connect", "syscalls", "sys_enter_connect"),
    ("sys_exit_socket", "syscalls", "sys_exit_accept"),
    ("sys_exit_socket", "syscalls", "sys_exit_accept4"),
    ("sys_exit_socket", "syscalls", "sys_exit_connect"),
    ("sys_enter_close", "syscalls", "sys_enter_close"),
    ("sys_enter_read", "syscalls", "sys_enter_read"),
    ("sys_enter_recvfrom", "syscalls", "sys_enter_recvfrom"),
    ("sys_enter_write", "syscalls", "sys_enter_write"),
    ("sys_enter_write", "syscalls", "sys_enter_sendto"),
    ("sys_enter_readv", "syscalls", "sys_enter_readv"),
    ("sys_enter_writev", "syscalls", "sys_enter_writev"),
    ("sys_enter_recvmsg", "syscalls", "sys_enter_recvmsg"),
    ("sys_enter_sendmsg", "syscalls", "sys_enter_sendmsg"),
    ("sys_enter_sendfile64", "syscalls", "sys_enter_sendfile64"),
    ("sys_exit_data", "syscalls", "sys_exit_read"),
    ("sys_exit_data", "syscalls", "sys_exit_recvfrom"),
    ("sys_exit_data", "syscalls", "sys_exit_write"),
    ("sys_exit_data", "syscalls", "sys_exit_sendto"),
    ("sys_exit_data", "syscalls", "sys_exit_readv"),
    ("sys_exit_data", "syscalls", "sys_exit_writev"),
    ("sys_exit_data", "syscalls", "sys_exit_recvmsg"),
    ("sys_exit_data", "syscalls", "sys_exit_sendmsg"),
    ("sys_exit_data", "syscalls", "sys_exit_sendfile64"),
];

/// TLS library functions and the entry programs attached to them; `ssl_return` is attached to
/// the return of each. The first two are required, the others attached where present.
const TLS_FUNCTIONS: &[(&str, &str)] = &[
    ("SSL_read", "ssl_read_enter"),
    ("SSL_write", "ssl_write_enter"),
    ("SSL_read_ex", "ssl_read_ex_enter"),
    ("SSL_write_ex", "ssl_write_ex_enter"),
    ("SSL_do_handshake", "ssl_handshake_enter"),
];
const TLS_RETURN: &str = "ssl_return";

/// Lines of the verifier log shown when a program is rejected.
const VERIFIER_TAIL: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel refused for lack of a capability: what was refused, the capability, the errno.
    #[error(
        "missing privileges: {what} needs {caps}{detail}; `bakeoff-probe check` lists the \
         capabilities of each data path"
    )]
    Privilege {
        what: String,
        caps: String,
        detail: String,
    },
    #[error(
        "tracefs is not available at /sys/kernel/tracing and could not be mounted ({0}); \
         mount it with `mount -t tracefs nodev /sys/kernel/tracing`"
    )]
    Tracefs(String),
    #[error(
        "the kernel verifier rejected program `{program}` ({errno}); last lines of its log:\n{log_tail}"
    )]
    Verifier {
        program: String,
        errno: io::Error,
        log_tail: String,
    },
    #[error("cannot attach `{program}` to tracepoint {category}/{name}: {source}")]
    Attach {
        program: String,
        category: String,
        name: String,
        source: Box<ProgramError>,
    },
    #[error("cannot load the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program or map `{0}` is missing from the eBPF object")]
    Missing(&'static str),
    #[error("cannot load program `{program}`: {source}")]
    Program {
        program: String,
        source: Box<ProgramError>,
    },
    #[error("cannot attach the cgroup data path to {cgroup}: {source}{hint}")]
    AttachCgroup {
        cgroup: String,
        source: Box<ProgramError>,
        hint: &'static str,
    },
    #[error("cannot open cohort cgroup {cgroup}: {source}")]
    CgroupOpen { cgroup: String, source: io::Error },
    #[error("cannot attach TLS uprobes to {function} in {library} for pid {pid}: {source}")]
    AttachTls {
        function: &'static str,
        library: String,
        pid: u32,
        source: Box<ProgramError>,
    },
    #[error("map operation on `{map}` failed: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
}

/// Loaded programs and the handles user space needs.
pub struct Kernel {
    ebpf: Ebpf,
    tgids: BpfHashMap<MapData, u32, u32>,
    cgroups: BpfHashMap<MapData, u64, u32>,
    sockets: BpfHashMap<MapData, SockKey, SockInfo>,
    drops: PerCpuArray<MapData, u64>,
    settings: Array<MapData, u32>,
    data_links: Vec<(String, TracePointLinkId)>,
    /// Cohort cgroup directories with the cgroup data path attached.
    cgroup_links: HashMap<PathBuf, CgroupLinks>,
    /// Why the cgroup/sock program could not be loaded (a missing CAP_NET_ADMIN): the cgroup
    /// path cannot be attached.
    cgroup_refused: Option<String>,
    /// TLS uprobes per process: (program, link).
    tls_links: HashMap<u32, Vec<(&'static str, UProbeLinkId)>>,
}

/// The programs attached to one cohort cgroup.
struct CgroupLinks {
    ingress: CgroupSkbLinkId,
    egress: CgroupSkbLinkId,
    release: CgroupSockLinkId,
}

/// Programs of the cgroup data path.
const SEGMENT_INGRESS: &str = "segment_ingress";
const SEGMENT_EGRESS: &str = "segment_egress";
const SOCKET_RELEASE: &str = "socket_release";

fn map_err(map: &'static str) -> impl Fn(aya::maps::MapError) -> KernelError {
    move |source| KernelError::Map { map, source }
}

impl Kernel {
    /// Loads every program (so a verifier rejection shows at start) and attaches the scheduler
    /// hooks. `prefix` is the payload prefix; `ring_bytes` the ring buffer size.
    ///
    /// Without CAP_NET_ADMIN the cgroup/sock program cannot be loaded: the probe still starts
    /// (the syscall path does not need it), and attaching the cgroup path fails naming it.
    pub fn load(prefix: u32, ring_bytes: u32) -> Result<Self, KernelError> {
        if let Err(e) = privileges::raise_permitted() {
            tracing::debug!(error = %e, "could not make the permitted capabilities effective");
        }
        check_privileges()?;
        tracefs::ensure_mounted()?;
        let memlock_raised = raise_memlock();
        let mut ebpf = EbpfLoader::new()
            .override_global("PREFIX_LEN", &prefix, true)
            .map_max_entries("EVENTS", ring_bytes)
            .load(PROGRAMS)
            .map_err(|e| match &e {
                aya::EbpfError::MapError(aya::maps::MapError::CreateError { io_error, .. })
                    if privileges::is_denied(io_error) =>
                {
                    map_create_denied(io_error, memlock_raised)
                }
                _ => KernelError::Load(e),
            })?;
        let mut cgroup_refused = None;
        let names: Vec<String> = ebpf.programs().map(|(n, _)| n.to_string()).collect();
        for name in names {
            let program_err = |source| KernelError::Program {
                program: name.clone(),
                source: Box::new(source),
            };
            let prog = ebpf
                .program_mut(&name)
                .ok_or(KernelError::Missing("program"))?;
            let (loaded, cap) = match name.as_str() {
                SEGMENT_INGRESS | SEGMENT_EGRESS => {
                    let p: &mut CgroupSkb = prog.try_into().map_err(program_err)?;
                    (p.load(), Cap::Bpf)
                }
                SOCKET_RELEASE => {
                    let p: &mut CgroupSock = prog.try_into().map_err(program_err)?;
                    (p.load(), Cap::NetAdmin)
                }
                n if n.starts_with("ssl_") => {
                    let p: &mut UProbe = prog.try_into().map_err(program_err)?;
                    (p.load(), Cap::Perfmon)
                }
                _ => {
                    let p: &mut TracePoint = prog.try_into().map_err(program_err)?;
                    (p.load(), Cap::Perfmon)
                }
            };
            match loaded.map_err(|source| load_error(&name, cap, source)) {
                Ok(()) => {}
                // Only the cgroup path needs it: refused when that path is attached.
                Err(KernelError::Privilege { what, caps, detail }) if name == SOCKET_RELEASE => {
                    tracing::debug!(%what, %caps, %detail, "cgroup path unavailable");
                    cgroup_refused = Some(detail);
                }
                Err(e) => return Err(e),
            }
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(KernelError::Missing(name))
        };
        let tgids = BpfHashMap::try_from(take(&mut ebpf, "COHORT_TGIDS")?)
            .map_err(map_err("COHORT_TGIDS"))?;
        let cgroups = BpfHashMap::try_from(take(&mut ebpf, "COHORT_CGROUPS")?)
            .map_err(map_err("COHORT_CGROUPS"))?;
        let sockets =
            BpfHashMap::try_from(take(&mut ebpf, "SOCKETS")?).map_err(map_err("SOCKETS"))?;
        let drops = PerCpuArray::try_from(take(&mut ebpf, "DROPS")?).map_err(map_err("DROPS"))?;
        let settings =
            Array::try_from(take(&mut ebpf, "SETTINGS")?).map_err(map_err("SETTINGS"))?;
        let mut kernel = Self {
            ebpf,
            tgids,
            cgroups,
            sockets,
            drops,
            settings,
            data_links: Vec::new(),
            cgroup_links: HashMap::new(),
            cgroup_refused,
            tls_links: HashMap::new(),
        };
        for hook in SCHED_HOOKS {
            kernel.attach(hook)?;
        }
        Ok(kernel)
    }

    /// The ring buffer the programs write events to. Call once.
    pub fn ring(&mut self) -> Result<RingBuf<MapData>, KernelError> {
        let map = self
            .ebpf
            .take_map("EVENTS")
            .ok_or(KernelError::Missing("EVENTS"))?;
        RingBuf::try_from(map).map_err(map_err("EVENTS"))
    }

    fn attach(
        &mut self,
        &(program, category, name): &(&str, &str, &str),
    ) -> Result<TracePointLinkId, KernelError> {
        let attach_err = |source: ProgramError| {
            if let Some(denied) = denied_io(&source) {
                // The id file in tracefs, or the perf event (CPU-wide, so CAP_PERFMON).
                let (what, cap) = match &source {
                    ProgramError::TracePointError(_) => (
                        format!("reading the id of tracepoint {category}/{name} in tracefs"),
                        Cap::DacReadSearch,
                    ),
                    _ => (
                        format!("opening a CPU-wide perf event on tracepoint {category}/{name}"),
                        Cap::Perfmon,
                    ),
                };
                return KernelError::Privilege {
                    what,
                    caps: cap.name().into(),
                    detail: privileges::detail(cap, denied),
                };
            }
            KernelError::Attach {
                program: program.to_string(),
                category: category.to_string(),
                name: name.to_string(),
                source: Box::new(source),
            }
        };
        let prog: &mut TracePoint = self
            .ebpf
            .program_mut(program)
            .ok_or(KernelError::Missing("program"))?
            .try_into()
            .map_err(attach_err)?;
        prog.attach(category, name).map_err(attach_err)
    }

    /// Whether the per-syscall hooks are attached.
    pub fn data_hooks_attached(&self) -> bool {
        !self.data_links.is_empty()
    }

    /// Attaches the socket and data hooks (idempotent).
    pub fn attach_data_hooks(&mut self) -> Result<(), KernelError> {
        if self.data_hooks_attached() {
            return Ok(());
        }
        for hook in SOCKET_HOOKS {
            match self.attach(hook) {
                Ok(link) => self.data_links.push((hook.0.to_string(), link)),
                Err(e) => {
                    self.detach_data_hooks();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Detaches the socket and data hooks: the host stops paying for them. Each tracepoint's
    /// detach waits for an RCU grace period (hundreds of ms under load): they are dropped from
    /// one thread each so the waits overlap, which keeps stopping prompt.
    pub fn detach_data_hooks(&mut self) {
        let mut owned = Vec::new();
        for (program, link) in self.data_links.drain(..) {
            let Some(prog) = self.ebpf.program_mut(&program) else {
                continue;
            };
            let prog: Result<&mut TracePoint, _> = prog.try_into();
            match prog.map(|p| p.take_link(link)) {
                Ok(Ok(link)) => owned.push(link),
                Ok(Err(e)) | Err(e) => tracing::warn!(program, error = %e, "detach failed"),
            }
        }
        std::thread::scope(|scope| {
            for link in owned {
                scope.spawn(move || drop(link));
            }
        });
    }

    /// Makes the cgroup data path cover exactly `dirs`: attaches its programs to new ones,
    /// detaches them from those no longer wanted. Attach to the top-most matched directories
    /// only (a cgroup's programs also run for its descendants' sockets).
    pub fn set_cgroup_path(&mut self, dirs: &[PathBuf]) -> Result<(), KernelError> {
        let stale: Vec<PathBuf> = self
            .cgroup_links
            .keys()
            .filter(|d| !dirs.contains(d))
            .cloned()
            .collect();
        for dir in stale {
            self.detach_cgroup(&dir);
        }
        for dir in dirs {
            if !self.cgroup_links.contains_key(dir) {
                self.attach_cgroup(dir)?;
            }
        }
        Ok(())
    }

    /// Detaches the cgroup data path from every cohort cgroup.
    pub fn detach_cgroup_path(&mut self) {
        let dirs: Vec<PathBuf> = self.cgroup_links.keys().cloned().collect();
        for dir in dirs {
            self.detach_cgroup(&dir);
        }
    }

    /// Why the cgroup data path cannot be attached (its cgroup/sock program was refused for
    /// lack of CAP_NET_ADMIN), if so.
    pub fn cgroup_path_refused(&self) -> Option<&str> {
        self.cgroup_refused.as_deref()
    }

    /// Cohort cgroups the cgroup data path is attached to.
    pub fn cgroup_path_dirs(&self) -> usize {
        self.cgroup_links.len()
    }

    fn attach_cgroup(&mut self, dir: &Path) -> Result<(), KernelError> {
        if let Some(detail) = &self.cgroup_refused {
            return Err(KernelError::Privilege {
                what: format!(
                    "the cgroup data path on {} (loading its cgroup/sock program `{SOCKET_RELEASE}`)",
                    dir.display()
                ),
                caps: Cap::NetAdmin.name().into(),
                detail: format!(
                    "{detail}; or watch these cohorts through syscall tracepoints \
                     (`--data-path syscall`)"
                ),
            });
        }
        let attach_err = |source: ProgramError| {
            let lacks_net_admin =
                CapSet::effective().is_some_and(|caps| !caps.grants(Cap::NetAdmin));
            if let Some(denied) = denied_io(&source)
                && lacks_net_admin
            {
                return KernelError::Privilege {
                    what: format!("attaching the cgroup programs to {}", dir.display()),
                    caps: Cap::NetAdmin.name().into(),
                    detail: privileges::detail(Cap::NetAdmin, denied),
                };
            }
            let busy = matches!(&source, ProgramError::SyscallError(e)
                if matches!(e.io_error.raw_os_error(), Some(libc::EEXIST | libc::EPERM | libc::EBUSY)));
            KernelError::AttachCgroup {
                cgroup: dir.display().to_string(),
                source: Box::new(source),
                hint: if busy {
                    " (another program may hold this cgroup's hook in exclusive mode; \
                     `--data-path syscall` watches it through syscall tracepoints instead)"
                } else {
                    ""
                },
            }
        };
        let file = std::fs::File::open(dir).map_err(|source| KernelError::CgroupOpen {
            cgroup: dir.display().to_string(),
            source,
        })?;
        let skb = |ebpf: &mut Ebpf, name: &str, kind| -> Result<CgroupSkbLinkId, ProgramError> {
            let prog: &mut CgroupSkb = ebpf
                .program_mut(name)
                .ok_or(ProgramError::NotLoaded)?
                .try_into()?;
            prog.attach(&file, kind, CgroupAttachMode::Single)
        };
        let ingress = skb(
            &mut self.ebpf,
            SEGMENT_INGRESS,
            CgroupSkbAttachType::Ingress,
        )
        .map_err(attach_err)?;
        let egress = match skb(&mut self.ebpf, SEGMENT_EGRESS, CgroupSkbAttachType::Egress) {
            Ok(l) => l,
            Err(e) => {
                self.detach_skb(SEGMENT_INGRESS, ingress);
                return Err(attach_err(e));
            }
        };
        let release = (|| -> Result<CgroupSockLinkId, ProgramError> {
            let prog: &mut CgroupSock = self
                .ebpf
                .program_mut(SOCKET_RELEASE)
                .ok_or(ProgramError::NotLoaded)?
                .try_into()?;
            prog.attach(&file, CgroupAttachMode::Single)
        })();
        let release = match release {
            Ok(l) => l,
            Err(e) => {
                self.detach_skb(SEGMENT_INGRESS, ingress);
                self.detach_skb(SEGMENT_EGRESS, egress);
                return Err(attach_err(e));
            }
        };
        tracing::info!(cgroup = %dir.display(), "cgroup data path attached");
        self.cgroup_links.insert(
            dir.to_path_buf(),
            CgroupLinks {
                ingress,
                egress,
                release,
            },
        );
        Ok(())
    }

    fn detach_skb(&mut self, name: &str, link: CgroupSkbLinkId) {
        if let Some(prog) = self.ebpf.program_mut(name) {
            let prog: Result<&mut CgroupSkb, _> = prog.try_into();
            if let Ok(prog) = prog {
                // A cgroup that was removed took its programs with it: nothing to report.
                let _ = prog.detach(link);
            }
        }
    }

    fn detach_cgroup(&mut self, dir: &Path) {
        let Some(links) = self.cgroup_links.remove(dir) else {
            return;
        };
        self.detach_skb(SEGMENT_INGRESS, links.ingress);
        self.detach_skb(SEGMENT_EGRESS, links.egress);
        if let Some(prog) = self.ebpf.program_mut(SOCKET_RELEASE) {
            let prog: Result<&mut CgroupSock, _> = prog.try_into();
            if let Ok(prog) = prog {
                let _ = prog.detach(links.release);
            }
        }
        tracing::info!(cgroup = %dir.display(), "cgroup data path detached");
    }

    /// Attaches the TLS uprobes to `library` (a path as this process sees it) for process `pid`
    /// only: the kernel places the breakpoints in that process's memory alone, so other users of
    /// the library pay nothing. Replaces what `pid` had. Returns the functions attached.
    pub fn attach_tls(&mut self, pid: u32, library: &Path) -> Result<usize, KernelError> {
        self.detach_tls(pid);
        let Some(scope) = std::num::NonZeroU32::new(pid).map(UProbeScope::OneProcess) else {
            return Ok(0);
        };
        // Reached through /proc/<pid>/root: a process of another user needs CAP_SYS_PTRACE.
        if let Err(e) = std::fs::File::open(library)
            && privileges::is_denied(&e)
        {
            return Err(KernelError::Privilege {
                what: format!(
                    "opening the TLS library {} of pid {pid} (through /proc/<pid>/root)",
                    library.display()
                ),
                caps: Cap::SysPtrace.name().into(),
                detail: privileges::detail(Cap::SysPtrace, &e),
            });
        }
        let mut links = Vec::new();
        let mut result = Ok(());
        for (i, &(function, entry)) in TLS_FUNCTIONS.iter().enumerate() {
            let attached = [entry, TLS_RETURN].into_iter().try_for_each(|program| {
                let prog: &mut UProbe = self
                    .ebpf
                    .program_mut(program)
                    .ok_or(ProgramError::NotLoaded)?
                    .try_into()?;
                links.push((program, prog.attach(function, library, scope)?));
                Ok::<(), ProgramError>(())
            });
            if let Err(source) = attached {
                // The `_ex` forms and the handshake are optional (older libraries lack them).
                if let Some(denied) = denied_io(&source) {
                    result = Err(uprobe_denied(function, library, pid, denied));
                    break;
                }
                if i < 2 {
                    result = Err(KernelError::AttachTls {
                        function,
                        library: library.display().to_string(),
                        pid,
                        source: Box::new(source),
                    });
                    break;
                }
                tracing::debug!(function, pid, error = %source, "TLS function not attached");
            }
        }
        let attached = links.iter().filter(|(p, _)| *p != TLS_RETURN).count();
        self.tls_links.insert(pid, links);
        if let Err(e) = result {
            self.detach_tls(pid);
            return Err(e);
        }
        self.settings
            .set(setting::TLS, 1, 0)
            .map_err(map_err("SETTINGS"))?;
        Ok(attached)
    }

    /// Detaches the TLS uprobes of `pid` (it exited or exec'd another program).
    pub fn detach_tls(&mut self, pid: u32) {
        let Some(links) = self.tls_links.remove(&pid) else {
            return;
        };
        for (program, link) in links {
            if let Some(prog) = self.ebpf.program_mut(program) {
                let prog: Result<&mut UProbe, _> = prog.try_into();
                if let Ok(prog) = prog {
                    let _ = prog.detach(link);
                }
            }
        }
        if self.tls_links.is_empty() {
            let _ = self.settings.set(setting::TLS, 0, 0);
        }
    }

    /// Processes with TLS uprobes attached.
    pub fn tls_processes(&self) -> usize {
        self.tls_links.len()
    }

    /// Connections sampled in, out of `probe_common::SAMPLE_SCALE` (at least 1).
    pub fn set_sample(&mut self, sample: u32) -> Result<(), KernelError> {
        self.settings
            .set(setting::SAMPLE, sample.max(1), 0)
            .map_err(map_err("SETTINGS"))
    }

    /// Ring-buffer bytes waiting before a record wakes the reader.
    pub fn set_wake_bytes(&mut self, bytes: u32) -> Result<(), KernelError> {
        self.settings
            .set(setting::WAKE_BYTES, bytes.max(1), 0)
            .map_err(map_err("SETTINGS"))
    }

    pub fn set_tgid(&mut self, tgid: u32, cohort: u32) -> Result<(), KernelError> {
        self.tgids
            .insert(tgid, cohort, 0)
            .map_err(map_err("COHORT_TGIDS"))
    }

    pub fn remove_tgid(&mut self, tgid: u32) {
        let _ = self.tgids.remove(&tgid);
    }

    /// Replaces the cgroup-id cohort map with `ids`.
    pub fn set_cgroups(&mut self, ids: &[(u64, u32)]) -> Result<(), KernelError> {
        let stale: Vec<u64> = self
            .cgroups
            .keys()
            .flatten()
            .filter(|k| !ids.iter().any(|(id, _)| id == k))
            .collect();
        for k in stale {
            let _ = self.cgroups.remove(&k);
        }
        for &(id, cohort) in ids {
            self.cgroups
                .insert(id, cohort, 0)
                .map_err(map_err("COHORT_CGROUPS"))?;
        }
        Ok(())
    }

    /// Tracks a connection found at start, as if the kernel had seen it accepted.
    pub fn track_socket(&mut self, key: SockKey, info: SockInfo) -> Result<(), KernelError> {
        self.sockets
            .insert(key, info, 0)
            .map_err(map_err("SOCKETS"))
    }

    /// Forgets tracked sockets of a process that exited (the ones user space knew of; the
    /// others age out of the LRU map). One map operation per socket, never a scan of the map.
    pub fn untrack_sockets(&mut self, tgid: u32, fds: &[u32]) {
        for &fd in fds {
            let _ = self.sockets.remove(&SockKey { tgid, fd });
        }
    }

    /// Kernel-side drops summed over CPUs, indexed by `probe_common::drop_reason`.
    pub fn drops(&self) -> [u64; drop_reason::COUNT as usize] {
        let mut out = [0u64; drop_reason::COUNT as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.drops.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }

    /// Per-program run time and count (needs `kernel.bpf_stats_enabled=1`), for the benchmark.
    pub fn program_stats(&self) -> HashMap<String, (u64, u64)> {
        let mut out = HashMap::new();
        for (name, prog) in self.ebpf.programs() {
            if let Ok(info) = prog.info() {
                out.insert(
                    name.to_string(),
                    (info.run_time().as_nanos() as u64, info.run_count()),
                );
            }
        }
        out
    }
}

/// Turns a load failure into a clear error: the capability the program type needs (`cap`), or
/// the verifier's own words.
fn load_error(program: &str, cap: Cap, source: ProgramError) -> KernelError {
    match source {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            if privileges::is_denied(&io_error) && verifier_log.to_string().trim().is_empty() {
                let kind = match cap {
                    Cap::NetAdmin => "cgroup/sock program",
                    Cap::Perfmon => "tracing program",
                    _ => "program",
                };
                // Without CAP_BPF nothing loads: name it rather than the program type's own.
                let cap = match CapSet::effective() {
                    Some(caps) if !caps.grants(Cap::Bpf) => Cap::Bpf,
                    _ => cap,
                };
                return KernelError::Privilege {
                    what: format!("loading the {kind} `{program}`"),
                    caps: cap.name().into(),
                    detail: privileges::detail(cap, &io_error),
                };
            }
            KernelError::Verifier {
                program: program.to_string(),
                errno: io_error,
                log_tail: log_tail(&verifier_log.to_string(), VERIFIER_TAIL),
            }
        }
        source => KernelError::Program {
            program: program.to_string(),
            source: Box::new(source),
        },
    }
}

/// The errno of a refusal (EPERM, EACCES) somewhere in an aya error, if that is what it is.
fn denied_io(e: &ProgramError) -> Option<&io::Error> {
    if let ProgramError::LoadError { io_error, .. } = e {
        return privileges::is_denied(io_error).then_some(io_error);
    }
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<io::Error>() {
            return privileges::is_denied(io).then_some(io);
        }
        if let Some(sys) = err.downcast_ref::<aya::sys::SyscallError>() {
            return privileges::is_denied(&sys.io_error).then_some(&sys.io_error);
        }
        cur = err.source();
    }
    None
}

/// A uprobe the kernel refused: `perf_event_open` of a uprobe needs CAP_SYS_ADMIN (Linux 6.16
/// and the stable kernels of July 2025 on; CAP_PERFMON before).
fn uprobe_denied(function: &str, library: &Path, pid: u32, errno: &io::Error) -> KernelError {
    KernelError::Privilege {
        what: format!(
            "attaching a uprobe to {function} in {} for pid {pid} (perf_event_open of a uprobe)",
            library.display()
        ),
        caps: Cap::SysAdmin.name().into(),
        detail: format!(
            "{} on Linux 6.16 and later, and the stable kernels since July 2025 (CAP_PERFMON \
             before); TLS plaintext of this process will not be decoded",
            privileges::detail(Cap::SysAdmin, errno)
        ),
    }
}

/// The last `n` non-empty lines of a verifier log.
pub fn log_tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The effective capability set of this process (`CapEff` in `/proc/self/status`).
pub fn effective_caps() -> Option<u64> {
    CapSet::effective().map(|c| c.0)
}

/// Before anything is loaded: CAP_BPF and CAP_PERFMON, which every configuration needs (the
/// scheduler hooks are tracepoints), named with what they are for.
fn check_privileges() -> Result<(), KernelError> {
    let Some(caps) = CapSet::effective() else {
        return Ok(()); // unknown: let the kernel decide
    };
    let missing: Vec<(Cap, &str)> = [
        (Cap::Bpf, "bpf(): the maps and programs"),
        (
            Cap::Perfmon,
            "the tracepoint programs and their CPU-wide perf events",
        ),
    ]
    .into_iter()
    .filter(|(c, _)| !caps.grants(*c))
    .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<String> = missing
        .iter()
        .map(|(c, why)| format!("{} ({why})", c.name()))
        .collect();
    let has = caps.names();
    Err(KernelError::Privilege {
        what: "loading the kernel programs".into(),
        caps: names.join(" and "),
        detail: format!(
            ": this process lacks {}; it has {}",
            missing
                .iter()
                .map(|(c, _)| c.name())
                .collect::<Vec<_>>()
                .join(" and "),
            if has.is_empty() {
                "none of them".to_string()
            } else {
                has.join(" ")
            }
        ),
    })
}

/// A map the kernel would not create: CAP_BPF, or before Linux 5.11 (which charged maps to
/// RLIMIT_MEMLOCK) the limit that could not be raised without CAP_SYS_RESOURCE.
fn map_create_denied(io_error: &io::Error, memlock_raised: bool) -> KernelError {
    let caps = CapSet::effective();
    let cap = if !memlock_raised
        && privileges::kernel_before(5, 11)
        && caps.is_some_and(|c| c.grants(Cap::Bpf))
    {
        Cap::SysResource
    } else {
        Cap::Bpf
    };
    KernelError::Privilege {
        what: if cap == Cap::SysResource {
            "creating the BPF maps (kernels before 5.11 charge them to RLIMIT_MEMLOCK, which \
             could not be raised)"
                .into()
        } else {
            "creating the BPF maps".into()
        },
        caps: cap.name().into(),
        detail: privileges::detail(cap, io_error),
    }
}

/// Older kernels charge BPF maps to RLIMIT_MEMLOCK; newer ones ignore it. Whether the limit is
/// unlimited now (raising it needs CAP_SYS_RESOURCE unless the hard limit allows it).
fn raise_memlock() -> bool {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } == 0 {
        return true;
    }
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    let unlimited = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut now) } == 0
        && now.rlim_cur == libc::RLIM_INFINITY;
    if !unlimited {
        tracing::debug!(
            "could not raise RLIMIT_MEMLOCK (needs CAP_SYS_RESOURCE; only kernels before 5.11 \
             use it for BPF maps)"
        );
    }
    unlimited
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_error_shows_the_log_tail() {
        let log = (1..=40)
            .map(|i| format!("line {i}"))
            .collect::<Vec<_>>()
            .join("\n");
        let err = load_error(
            "sys_exit_data",
            Cap::Perfmon,
            ProgramError::LoadError {
                io_error: io::Error::from_raw_os_error(libc::EACCES),
                verifier_log: aya_obj::VerifierLog::new(log + "\n\n"),
            },
        );
        let text = err.to_string();
        assert!(
            text.starts_with("the kernel verifier rejected program `sys_exit_data`"),
            "{text}"
        );
        assert!(text.ends_with("line 16\nline 17\nline 18\nline 19\nline 20\nline 21\nline 22\nline 23\nline 24\nline 25\nline 26\nline 27\nline 28\nline 29\nline 30\nline 31\nline 32\nline 33\nline 34\nline 35\nline 36\nline 37\nline 38\nline 39\nline 40"), "{text}");
        assert!(!text.contains("line 15\n"));
    }
}

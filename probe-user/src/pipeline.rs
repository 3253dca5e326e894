//! Turns decoded kernel records into request events: follows cohort membership, feeds the
//! connection table, and labels each exchange with its process and cohort.

use std::collections::HashMap;

use probe_common::{COHORT_NONE, EventKind, SockInfo, SockKey, conn_role, data_dir};

use crate::{
    clock::{Clock, rfc3339},
    cohort::{CgroupMatch, Cohorts, proc},
    conn::{ConnExchange, ConnKey, ConnTable, Direction, Role, Unanswered},
    event::RequestEvent,
    kernel::{Kernel, KernelError, record},
};

/// What the pipeline changes in the kernel (implemented by `Kernel`); a seam for tests.
pub trait Membership {
    fn set_tgid(&mut self, tgid: u32, cohort: u32) -> Result<(), KernelError>;
    fn remove_tgid(&mut self, tgid: u32);
    fn track_socket(&mut self, key: SockKey, info: SockInfo) -> Result<(), KernelError>;
    fn untrack_process(&mut self, tgid: u32);
}

impl Membership for Kernel {
    fn set_tgid(&mut self, tgid: u32, cohort: u32) -> Result<(), KernelError> {
        Kernel::set_tgid(self, tgid, cohort)
    }
    fn remove_tgid(&mut self, tgid: u32) {
        Kernel::remove_tgid(self, tgid)
    }
    fn track_socket(&mut self, key: SockKey, info: SockInfo) -> Result<(), KernelError> {
        Kernel::track_socket(self, key, info)
    }
    fn untrack_process(&mut self, tgid: u32) {
        Kernel::untrack_process(self, tgid)
    }
}

/// A watched process.
#[derive(Clone, Debug)]
struct Process {
    cohort: u32,
    exe: String,
}

/// Counters of the pipeline itself.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PipelineStats {
    pub records: u64,
    pub bad_records: u64,
    pub events: u64,
    pub processes_adopted: u64,
    pub connections_seeded: u64,
}

pub struct Pipeline {
    cohorts: Cohorts,
    table: ConnTable,
    procs: HashMap<u32, Process>,
    clock: Clock,
    experiment: String,
    node: String,
    pub stats: PipelineStats,
}

impl Pipeline {
    pub fn new(cohorts: Cohorts, experiment: String, node: String) -> Self {
        Self {
            cohorts,
            table: ConnTable::new(),
            procs: HashMap::new(),
            clock: Clock::new(),
            experiment,
            node,
            stats: PipelineStats::default(),
        }
    }

    pub fn cohorts(&self) -> &Cohorts {
        &self.cohorts
    }

    pub fn conn_stats(&self) -> &crate::conn::ConnStats {
        &self.table.stats
    }

    /// Processes currently known to be in a cohort.
    pub fn process_count(&self) -> usize {
        self.procs.len()
    }

    /// Requests seen whose response has not completed.
    pub fn in_flight(&self) -> usize {
        self.table.in_flight()
    }

    /// Finds the processes that belong to a cohort at start: by the per-process rules over all
    /// of `/proc`, and by membership of the cohort cgroups. Later ones arrive by exec and fork.
    pub fn scan(&mut self, m: &mut dyn Membership, cgroups: &[CgroupMatch]) {
        if self.cohorts.needs_process_rules() {
            for pid in proc::all_pids() {
                if !self.procs.contains_key(&pid)
                    && let Some(cohort) = self.cohorts.match_process(pid)
                {
                    self.adopt(pid, cohort, m);
                }
            }
        }
        for g in cgroups {
            for pid in proc::pids_in_cgroup(&g.dir) {
                if !self.procs.contains_key(&pid) {
                    self.register(pid, g.cohort);
                }
            }
        }
    }

    /// Seeds the established connections of every known cohort process (after the data hooks
    /// were attached, so nothing falls between the scan and the hooks).
    pub fn seed_all(&mut self, m: &mut dyn Membership) {
        let procs: Vec<(u32, u32)> = self.procs.iter().map(|(p, i)| (*p, i.cohort)).collect();
        for (pid, cohort) in procs {
            self.seed(pid, cohort, m);
        }
    }

    fn register(&mut self, tgid: u32, cohort: u32) {
        let exe = proc::exe_of(tgid).unwrap_or_default();
        self.procs.insert(tgid, Process { cohort, exe });
    }

    /// Puts a process in a cohort (kernel map + registry).
    fn adopt(&mut self, tgid: u32, cohort: u32, m: &mut dyn Membership) {
        if let Err(e) = m.set_tgid(tgid, cohort) {
            tracing::warn!(tgid, error = %e, "cannot add process to its cohort");
            return;
        }
        self.stats.processes_adopted += 1;
        self.register(tgid, cohort);
        tracing::info!(
            pid = tgid,
            cohort = self.cohorts.name(cohort),
            exe = self.procs.get(&tgid).map(|p| p.exe.as_str()),
            "watching process"
        );
        // Children forked before the exec event reached us (a server's workers, often) did not
        // inherit the cohort in the kernel: adopt them too.
        for child in proc::children_of(tgid) {
            if !self.procs.contains_key(&child) {
                self.adopt(child, cohort, m);
            }
        }
    }

    /// Tracks connections that existed before the probe saw the process.
    fn seed(&mut self, tgid: u32, cohort: u32, m: &mut dyn Membership) {
        let mut done = Vec::new();
        for s in proc::established_sockets(tgid) {
            let role = if s.server { Role::Server } else { Role::Client };
            let info = SockInfo {
                cohort,
                role: if s.server {
                    conn_role::SERVER
                } else {
                    conn_role::CLIENT
                },
                seq: 0,
                _pad: 0,
            };
            if m.track_socket(SockKey { tgid, fd: s.fd }, info).is_ok() {
                self.table
                    .open((tgid, s.fd), role, cohort, Some(s.peer), true, &mut done);
                self.stats.connections_seeded += 1;
            }
        }
    }

    /// Handles one ring-buffer record, appending finished request events to `out`.
    pub fn handle(&mut self, bytes: &[u8], m: &mut dyn Membership, out: &mut Vec<RequestEvent>) {
        self.stats.records += 1;
        let rec = match record::decode(bytes) {
            Ok(r) => r,
            Err(e) => {
                self.stats.bad_records += 1;
                tracing::debug!(error = %e, "bad ring buffer record");
                return;
            }
        };
        let mut done = Vec::new();
        let mut unanswered = Vec::new();
        match rec {
            record::Record::Proc(EventKind::Exec, e) => {
                let tgid = e.header.tgid;
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.exe = proc::exe_of(tgid).unwrap_or_default();
                } else if self.cohorts.needs_process_rules()
                    && let Some(cohort) = self.cohorts.match_process(tgid)
                {
                    self.adopt(tgid, cohort, m);
                }
            }
            record::Record::Proc(EventKind::Fork, e) => {
                // The kernel already put the child in the cohort; threads share the parent's
                // entry, so their own is dropped.
                if proc::tgid_of(e.pid).is_some_and(|t| t != e.pid) {
                    m.remove_tgid(e.pid);
                } else {
                    let exe = self
                        .procs
                        .get(&e.header.tgid)
                        .map(|p| p.exe.clone())
                        .unwrap_or_default();
                    tracing::info!(
                        pid = e.pid,
                        parent = e.header.tgid,
                        cohort = self.cohorts.name(e.cohort),
                        "watching forked process"
                    );
                    self.procs.insert(
                        e.pid,
                        Process {
                            cohort: e.cohort,
                            exe,
                        },
                    );
                }
            }
            record::Record::Proc(_, e) => {
                let tgid = e.header.tgid;
                self.procs.remove(&tgid);
                m.untrack_process(tgid);
                unanswered = self.table.close_process(tgid, &mut done);
            }
            record::Record::Conn(e) => {
                let tgid = e.header.tgid;
                if !self.procs.contains_key(&tgid) && e.cohort != COHORT_NONE {
                    self.register(tgid, e.cohort);
                }
                let role = if e.role == conn_role::SERVER {
                    Role::Server
                } else {
                    Role::Client
                };
                let peer = record::peer(&e).or_else(|| proc::peer_of(tgid, e.fd));
                unanswered = self
                    .table
                    .open((tgid, e.fd), role, e.cohort, peer, false, &mut done);
            }
            record::Record::Close(e) => {
                unanswered = self.table.close((e.header.tgid, e.fd), &mut done);
            }
            record::Record::Data(h, payload) => {
                let key: ConnKey = (h.header.tgid, h.fd);
                let dir = if h.direction == data_dir::INGRESS {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                self.table
                    .data(key, h.header.ts_ns, dir, h.seq, payload, h.len, &mut done);
            }
        }
        self.stats.events += (done.len() + unanswered.len()) as u64;
        for d in done {
            out.push(self.event(d));
        }
        for u in unanswered {
            out.push(self.unanswered_event(u));
        }
    }

    fn base_event(
        &self,
        tgid: u32,
        cohort: u32,
        role: Role,
        peer: Option<std::net::SocketAddr>,
    ) -> RequestEvent {
        RequestEvent {
            experiment: self.experiment.clone(),
            cohort: self.cohorts.name(cohort).to_string(),
            node: self.node.clone(),
            pid: tgid,
            exe: self
                .procs
                .get(&tgid)
                .map(|p| p.exe.clone())
                .unwrap_or_default(),
            role: match role {
                Role::Server => "server",
                Role::Client => "client",
            }
            .to_string(),
            protocol: "http1".to_string(),
            method: String::new(),
            path: String::new(),
            status: None,
            error: None,
            start_time: String::new(),
            start_unix_ns: 0,
            duration_ns: 0,
            bytes_in: 0,
            bytes_out: 0,
            peer: peer.map(|p| p.to_string()),
            request_id: None,
            traceparent: None,
            user_agent: None,
        }
    }

    fn event(&self, d: ConnExchange) -> RequestEvent {
        let x = d.exchange;
        let start = self.clock.unix_ns(x.start_ts);
        let (bytes_in, bytes_out) = match d.role {
            Role::Server => (x.request_bytes, x.response_bytes),
            Role::Client => (x.response_bytes, x.request_bytes),
        };
        RequestEvent {
            method: x.request.method,
            path: x.request.path,
            status: Some(x.response.status),
            start_time: rfc3339(start),
            start_unix_ns: start,
            duration_ns: x.end_ts.saturating_sub(x.start_ts),
            bytes_in,
            bytes_out,
            request_id: x.request.request_id,
            traceparent: x.request.traceparent,
            user_agent: x.request.user_agent,
            ..self.base_event(d.tgid, d.cohort, d.role, d.peer)
        }
    }

    fn unanswered_event(&self, u: Unanswered) -> RequestEvent {
        let start = self.clock.unix_ns(u.start_ts);
        RequestEvent {
            method: u.request.method,
            path: u.request.path,
            error: Some("connection closed before the response".to_string()),
            start_time: rfc3339(start),
            start_unix_ns: start,
            request_id: u.request.request_id,
            traceparent: u.request.traceparent,
            user_agent: u.request.user_agent,
            ..self.base_event(u.tgid, u.cohort, u.role, u.peer)
        }
    }
}

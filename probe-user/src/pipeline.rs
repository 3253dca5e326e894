//! Turns decoded kernel records into request events: follows cohort membership, feeds the
//! connection table, and labels each exchange with its process and cohort.

use std::collections::HashMap;

use probe_common::{
    COHORT_NONE, EventKind, SockInfo, SockKey, conn_role, data_dir, tcp_flag, tls_conn,
};

use crate::{
    clock::{Clock, rfc3339},
    cohort::{CgroupMatch, Cohorts, proc},
    conn::{
        ConnExchange, ConnKey, ConnTable, Direction, Role, SegmentRecord,
        tls::{HeldPiece, Sessions, TlsStats},
    },
    event::RequestEvent,
    kernel::{Kernel, KernelError, record},
};

/// What the pipeline changes in the kernel (implemented by `Kernel`); a seam for tests.
pub trait Membership {
    fn set_tgid(&mut self, tgid: u32, cohort: u32) -> Result<(), KernelError>;
    fn remove_tgid(&mut self, tgid: u32);
    fn track_socket(&mut self, key: SockKey, info: SockInfo) -> Result<(), KernelError>;
    fn untrack_sockets(&mut self, tgid: u32, fds: &[u32]);
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
    fn untrack_sockets(&mut self, tgid: u32, fds: &[u32]) {
        Kernel::untrack_sockets(self, tgid, fds)
    }
}

/// A watched process.
#[derive(Clone, Debug)]
struct Process {
    cohort: u32,
    exe: String,
    /// The Kubernetes pod it runs in, when the node's pods are watched.
    pod: Option<crate::kubernetes::PodMeta>,
    /// Watched through its cgroup's socket hooks (cgroup path), not the syscall tracepoints.
    via_cgroup: bool,
}

/// Counters of the pipeline itself.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PipelineStats {
    pub records: u64,
    pub bad_records: u64,
    pub events: u64,
    pub processes_adopted: u64,
    pub connections_seeded: u64,
    /// Segments of a socket whose cgroup no cohort rule names (any more): not decoded.
    pub segments_unknown_cgroup: u64,
}

pub struct Pipeline {
    cohorts: Cohorts,
    table: ConnTable,
    procs: HashMap<u32, Process>,
    /// cgroup id -> cohort for the cgroup path: the matched directories and their descendants.
    cgroup_cohorts: HashMap<u64, u32>,
    /// Connections sampled in, out of `SAMPLE_SCALE` (see `set_sample`).
    sample: u32,
    clock: Clock,
    experiment: String,
    node: String,
    /// TLS sessions and their connections.
    sessions: Sessions,
    /// Processes that joined a cohort (or exec'd) and left it since `take_membership_changes`.
    joined: Vec<u32>,
    left: Vec<u32>,
    /// A cohort being recorded (`--capture-cohort`).
    recording: Option<crate::recording::Recording>,
    recording_error: Option<String>,
    pub stats: PipelineStats,
}

impl Pipeline {
    pub fn new(cohorts: Cohorts, experiment: String, node: String) -> Self {
        Self {
            cohorts,
            table: ConnTable::default(),
            procs: HashMap::new(),
            cgroup_cohorts: HashMap::new(),
            sample: probe_common::SAMPLE_SCALE,
            clock: Clock::new(),
            experiment,
            node,
            sessions: Sessions::default(),
            joined: Vec::new(),
            left: Vec::new(),
            recording: None,
            recording_error: None,
            stats: PipelineStats::default(),
        }
    }

    /// Starts recording a cohort's connections (the open ones included).
    pub fn start_recording(&mut self, recording: crate::recording::Recording) {
        self.table.tap(Some(recording.cohort()));
        self.recording = Some(recording);
    }

    /// Writes what the recorded connections produced; a write error ends the recording (logged
    /// and reported in the stats), never the probe.
    fn record(&mut self) {
        let Some(rec) = self.recording.as_mut() else {
            return;
        };
        let tapped = self.table.take_tapped();
        if tapped.is_empty() {
            return;
        }
        if let Err(e) = rec.record(tapped) {
            tracing::error!(error = %e, "capture write failed: recording stopped");
            self.recording_error = Some(e.to_string());
            self.recording = None;
            self.table.tap(None);
        }
    }

    /// The recording in progress, if any.
    pub fn recording(&self) -> Option<&crate::recording::Recording> {
        self.recording.as_ref()
    }

    /// Stops recording and hands the recording over (what was tapped written first), for its
    /// owner to finish.
    pub fn take_recording(&mut self) -> Option<crate::recording::Recording> {
        self.record();
        self.table.tap(None);
        self.recording.take()
    }

    /// Ends the recording, if any: the capture file is completed. Its counters, as JSON.
    pub fn finish_recording(&mut self) -> serde_json::Value {
        self.record();
        self.table.tap(None);
        match self.recording.take().map(|r| r.finish()) {
            Some(Ok(stats)) => serde_json::to_value(stats).unwrap_or_default(),
            Some(Err(e)) => serde_json::json!({ "error": e.to_string() }),
            None => match &self.recording_error {
                Some(e) => serde_json::json!({ "error": e }),
                None => serde_json::Value::Null,
            },
        }
    }

    /// Processes that joined a cohort (or ran a new program) and processes that left, since
    /// the last call: what per-process hooks (TLS uprobes) follow.
    pub fn take_membership_changes(&mut self) -> (Vec<u32>, Vec<u32>) {
        (
            std::mem::take(&mut self.joined),
            std::mem::take(&mut self.left),
        )
    }

    pub fn tls_stats(&self) -> &TlsStats {
        &self.sessions.stats
    }

    pub fn cohorts(&self) -> &Cohorts {
        &self.cohorts
    }

    pub fn conn_stats(&self) -> crate::conn::ConnStats {
        self.table.stats()
    }

    /// Estimated requests lost in stream gaps so far.
    pub fn requests_lost_estimate(&self) -> u64 {
        self.table.requests_lost_estimate()
    }

    /// Processes currently known to be in a cohort.
    pub fn process_count(&self) -> usize {
        self.procs.len()
    }

    /// Processes watched through the syscall tracepoints (they need those hooks attached).
    pub fn syscall_process_count(&self) -> usize {
        self.procs.values().filter(|p| !p.via_cgroup).count()
    }

    /// Bounds the connection table (memory budget).
    pub fn set_max_connections(&mut self, max: usize) {
        self.table = ConnTable::new(max);
    }

    /// Connections tracked now.
    pub fn connections(&self) -> usize {
        self.table.len()
    }

    /// The cgroup ids (with their cohorts) whose sockets the cgroup path decodes.
    pub fn set_cgroup_cohorts(&mut self, ids: HashMap<u64, u32>) {
        self.cgroup_cohorts = ids;
    }

    /// The kernel's current connection sampling (out of `SAMPLE_SCALE`): a connection of the
    /// cgroup path that sampling cut off ends without error events for its pending requests.
    pub fn set_sample(&mut self, sample: u32) {
        self.sample = sample;
    }

    /// Follows the processes of the cgroup-path cohorts: registers new ones, forgets those that
    /// exited (the syscall path learns both from the scheduler hooks). Call about once a second.
    pub fn refresh_cgroup_processes(&mut self, cgroups: &[CgroupMatch]) {
        let left = &mut self.left;
        self.procs.retain(|pid, p| {
            let keep = !p.via_cgroup || std::path::Path::new(&format!("/proc/{pid}")).exists();
            if !keep {
                left.push(*pid);
            }
            keep
        });
        // A matched directory's processes and its descendants' (a pod's are in its
        // containers' cgroups).
        let mut found = Vec::new();
        for g in cgroups {
            crate::cohort::walk_cgroup_tree(&g.dir, |dir| {
                found.extend(proc::pids_in_cgroup(dir).into_iter().map(|p| (p, g.cohort)));
            });
        }
        for (pid, cohort) in found {
            if !self.procs.contains_key(&pid) {
                self.register(pid, cohort, true);
            }
        }
    }

    /// The executable most of a cohort's known processes run (a server's forked workers).
    fn cohort_exe(&self, cohort: u32) -> Option<String> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for p in self.procs.values() {
            if p.cohort == cohort && !p.exe.is_empty() {
                *counts.entry(p.exe.as_str()).or_default() += 1;
            }
        }
        counts
            .into_iter()
            .max_by_key(|(exe, n)| (*n, std::cmp::Reverse(*exe)))
            .map(|(exe, _)| exe.to_string())
    }

    /// Processes per cohort, every cohort listed (0 for a rule that matches nothing).
    pub fn cohort_members(&self) -> Vec<(String, u64)> {
        self.cohorts
            .names()
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let id = i as u32 + 1;
                let n = self.procs.values().filter(|p| p.cohort == id).count() as u64;
                (name.clone(), n)
            })
            .collect()
    }

    /// Gives up on TCP holes that waited too long (call about once a second).
    pub fn expire(&mut self, out: &mut Vec<RequestEvent>) {
        self.expire_at(self.clock.monotonic_now(), out);
    }

    /// At stop: what waits behind a TCP hole is delivered now (the hole as a gap).
    pub fn flush(&mut self, out: &mut Vec<RequestEvent>) {
        self.expire_at(u64::MAX, out);
    }

    fn expire_at(&mut self, now: u64, out: &mut Vec<RequestEvent>) {
        let mut done = Vec::new();
        self.table.expire(now, &mut done);
        self.record();
        if let Some(rec) = self.recording.as_mut()
            && let Err(e) = rec.flush()
        {
            tracing::warn!(error = %e, "capture flush failed");
        }
        self.stats.events += done.len() as u64;
        for d in done {
            out.push(self.event(d));
        }
    }

    /// Requests seen whose response has not completed.
    pub fn in_flight(&self) -> usize {
        self.table.in_flight()
    }

    /// Finds the processes that belong to a cohort at start: by the per-process rules over all
    /// of `/proc`, and by membership of the cohort cgroups. Later ones arrive by exec and fork.
    pub fn scan(&mut self, m: &mut dyn Membership, cgroups: &[CgroupMatch], via_cgroup: bool) {
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
                    self.register(pid, g.cohort, via_cgroup);
                }
            }
        }
    }

    /// Seeds the established connections of every known cohort process (after the data hooks
    /// were attached, so nothing falls between the scan and the hooks).
    pub fn seed_all(&mut self, m: &mut dyn Membership) {
        let procs: Vec<(u32, u32)> = self
            .procs
            .iter()
            .filter(|(_, i)| !i.via_cgroup)
            .map(|(p, i)| (*p, i.cohort))
            .collect();
        for (pid, cohort) in procs {
            self.seed(pid, cohort, m);
        }
    }

    fn register(&mut self, tgid: u32, cohort: u32, via_cgroup: bool) {
        // A short-lived process (a Postgres backend of one psql command) may be gone before its
        // first record is read: then it most likely ran what most of its cohort runs.
        let exe = proc::exe_of(tgid).unwrap_or_else(|| self.cohort_exe(cohort).unwrap_or_default());
        let pod = self.cohorts.pod_of(tgid);
        self.procs.insert(
            tgid,
            Process {
                cohort,
                exe,
                pod,
                via_cgroup,
            },
        );
        self.joined.push(tgid);
    }

    /// Puts a process in a cohort (kernel map + registry).
    fn adopt(&mut self, tgid: u32, cohort: u32, m: &mut dyn Membership) {
        if let Err(e) = m.set_tgid(tgid, cohort) {
            tracing::warn!(tgid, error = %e, "cannot add process to its cohort");
            return;
        }
        self.stats.processes_adopted += 1;
        self.register(tgid, cohort, false);
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
                flags: 0,
            };
            if m.track_socket(SockKey { tgid, fd: s.fd }, info).is_ok() {
                self.table.open(
                    ConnKey::Fd { tgid, fd: s.fd },
                    tgid,
                    Some(role),
                    cohort,
                    Some(s.peer),
                    true,
                    &mut done,
                );
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
                    self.joined.push(tgid);
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
                    // A forked child runs in its parent's pod.
                    let pod = self.procs.get(&e.header.tgid).and_then(|p| p.pod.clone());
                    self.procs.insert(
                        e.pid,
                        Process {
                            cohort: e.cohort,
                            exe,
                            pod,
                            via_cgroup: false,
                        },
                    );
                    self.joined.push(e.pid);
                }
            }
            record::Record::Proc(_, e) => {
                let tgid = e.header.tgid;
                if self.procs.remove(&tgid).is_some() {
                    self.left.push(tgid);
                }
                self.sessions.forget_process(tgid);
                m.untrack_sockets(tgid, &self.table.fds_of(tgid));
                unanswered = self.table.close_process(tgid, &mut done);
            }
            record::Record::Conn(e) => {
                let tgid = e.header.tgid;
                if !self.procs.contains_key(&tgid) && e.cohort != COHORT_NONE {
                    self.register(tgid, e.cohort, false);
                }
                let peer = record::peer(&e).or_else(|| proc::peer_of(tgid, e.fd));
                unanswered = self.table.open(
                    ConnKey::Fd { tgid, fd: e.fd },
                    tgid,
                    Some(role_of(e.role)),
                    e.cohort,
                    peer,
                    false,
                    &mut done,
                );
            }
            record::Record::Close(e) => {
                let key = ConnKey::Fd {
                    tgid: e.header.tgid,
                    fd: e.fd,
                };
                unanswered = self.table.close(key, false, &mut done);
            }
            record::Record::Data(h, payload) => {
                let tgid = h.header.tgid;
                let key = ConnKey::Fd { tgid, fd: h.fd };
                if !self.table.contains(key) {
                    // Its open record was lost (or it predates the hooks): adopt it from here;
                    // the decoder finds the next message start.
                    if !self.procs.contains_key(&tgid) && h.cohort != COHORT_NONE {
                        self.register(tgid, h.cohort, false);
                    }
                    let peer = proc::peer_of(tgid, h.fd);
                    unanswered = self.table.open(
                        key,
                        tgid,
                        Some(role_of(u32::from(h.role))),
                        h.cohort,
                        peer,
                        true,
                        &mut done,
                    );
                }
                let dir = if h.direction == data_dir::INGRESS {
                    Direction::Ingress
                } else {
                    Direction::Egress
                };
                self.table
                    .data(key, h.header.ts_ns, dir, h.seq, payload, h.len, &mut done);
            }
            record::Record::Segment(h, payload) => {
                let Some(&cohort) = self.cgroup_cohorts.get(&h.cgroup) else {
                    self.stats.segments_unknown_cgroup += 1;
                    return;
                };
                let tgid = h.header.tgid;
                if tgid != 0 && !self.procs.contains_key(&tgid) {
                    self.register(tgid, cohort, true);
                }
                let (local, remote) = record::segment_addrs(&h);
                let seg = SegmentRecord {
                    tgid,
                    cohort,
                    dir: if h.direction == data_dir::INGRESS {
                        Direction::Ingress
                    } else {
                        Direction::Egress
                    },
                    ts: h.header.ts_ns,
                    seq: h.seq,
                    len: h.len,
                    prefix: payload,
                    syn: h.flags & tcp_flag::SYN != 0,
                    ack: h.flags & tcp_flag::ACK != 0,
                    ack_seq: h.ack,
                    fin: h.flags & tcp_flag::FIN != 0,
                    rst: h.flags & tcp_flag::RST != 0,
                    peer: remote,
                    local_port: local.port(),
                };
                unanswered = self
                    .table
                    .segment(ConnKey::Socket(h.cookie), &seg, &mut done);
            }
            record::Record::Tls(h, payload) => {
                self.tls(&h, payload, &mut done, &mut unanswered);
            }
            record::Record::Release(e) => {
                let key = ConnKey::Socket(e.cookie);
                if probe_common::sampled_in(e.cookie, self.sample) {
                    unanswered = self.table.close(key, false, &mut done);
                } else {
                    // Sampling cut this connection off: what it had pending is not an error.
                    self.table.forget(key, &mut done);
                }
            }
        }
        if self.recording.is_some() {
            self.record();
        }
        self.stats.events += (done.len() + unanswered.len()) as u64;
        for d in done {
            out.push(self.event(d));
        }
        for u in unanswered {
            out.push(self.event(u));
        }
    }

    /// Plaintext of a TLS call: to its session's connection, once the session is tied to one.
    fn tls(
        &mut self,
        h: &probe_common::TlsHeader,
        payload: &[u8],
        done: &mut Vec<ConnExchange>,
        unanswered: &mut Vec<ConnExchange>,
    ) {
        let tgid = h.header.tgid;
        let session = (tgid, h.ssl);
        let dir = if h.direction == data_dir::INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        };
        if h.len > 0 {
            self.sessions.stats.records += 1;
        }
        let bound = match h.conn_kind {
            tls_conn::FD => Some(ConnKey::Fd {
                tgid,
                fd: h.conn as u32,
            }),
            tls_conn::COOKIE => Some(ConnKey::Socket(h.conn)),
            _ => None,
        };
        let mut held = Default::default();
        if let Some(key) = bound {
            if self.sessions.conn(session) != Some(key) {
                self.sessions.prune(|k| self.table.contains(k));
            }
            held = self.sessions.bind(session, key);
        }
        let Some(key) = self.sessions.conn(session) else {
            if h.len > 0 {
                self.sessions.hold(
                    session,
                    HeldPiece {
                        ts: h.header.ts_ns,
                        dir,
                        len: h.len,
                        prefix: payload.to_vec(),
                    },
                );
            }
            return;
        };
        if !self.table.contains(key) {
            // A connection not seen opening (open before the probe, or its record lost).
            let cohort = self.procs.get(&tgid).map_or(COHORT_NONE, |p| p.cohort);
            let peer = match key {
                ConnKey::Fd { fd, .. } => proc::peer_of(tgid, fd),
                ConnKey::Socket(_) => None,
            };
            unanswered.extend(self.table.open(key, tgid, None, cohort, peer, true, done));
        }
        for p in held {
            self.table
                .plaintext(key, p.ts, p.dir, &p.prefix, p.len, done);
        }
        if h.len > 0 {
            self.table
                .plaintext(key, h.header.ts_ns, dir, payload, h.len, done);
        }
    }

    fn base_event(
        &self,
        tgid: u32,
        cohort: u32,
        role: Role,
        peer: Option<std::net::SocketAddr>,
    ) -> RequestEvent {
        let process = self.procs.get(&tgid);
        let pod = process.and_then(|p| p.pod.as_ref());
        RequestEvent {
            namespace: pod.map(|p| p.namespace.clone()),
            pod: pod.map(|p| p.pod.clone()),
            container: pod.and_then(|p| p.container.clone()),
            experiment: self.experiment.clone(),
            cohort: self.cohorts.name(cohort).to_string(),
            node: self.node.clone(),
            pid: tgid,
            exe: process.map(|p| p.exe.clone()).unwrap_or_default(),
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
            grpc_status: None,
            attributes: pod
                .map(|p| {
                    p.labels
                        .iter()
                        .map(|(k, v)| (format!("k8s.label.{k}"), v.clone()))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn event(&self, d: ConnExchange) -> RequestEvent {
        let x = d.call;
        let start = self.clock.unix_ns(x.start_ts);
        let (bytes_in, bytes_out) = match d.role {
            Role::Server => (x.request_bytes, x.response_bytes),
            Role::Client => (x.response_bytes, x.request_bytes),
        };
        let mut event = RequestEvent {
            protocol: x.protocol.to_string(),
            method: x.method,
            path: x.path,
            status: x.status,
            error: x.error,
            start_time: rfc3339(start),
            start_unix_ns: start,
            duration_ns: if x.end_ts == 0 {
                0
            } else {
                x.end_ts.saturating_sub(x.start_ts)
            },
            bytes_in,
            bytes_out,
            request_id: x.request_id,
            traceparent: x.traceparent,
            user_agent: x.user_agent,
            grpc_status: x.grpc_status,
            ..self.base_event(d.tgid, d.cohort, d.role, d.peer)
        };
        // The pod's labels (from `base_event`) and the protocol's fields.
        event.attributes.extend(x.attributes);
        event
    }
}

fn role_of(role: u32) -> Role {
    if role == conn_role::SERVER {
        Role::Server
    } else {
        Role::Client
    }
}

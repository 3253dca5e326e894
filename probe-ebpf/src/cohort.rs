//! Cohort membership: the first check of every socket hook, and inheritance across fork.

use aya_ebpf::{
    helpers::{bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    programs::TracePointContext,
};
use probe_common::{COHORT_NONE, EventHeader, EventKind, ProcEvent, SockInfo, SockKey};

use crate::maps::{COHORT_CGROUPS, COHORT_TGIDS, LAST_ACCEPT, SOCKETS, emit, emit_now};

/// Offsets in the `sched_*` tracepoint records (see `/sys/kernel/tracing/events/sched/*/format`).
const FORK_CHILD_PID: usize = 20;
const EXEC_PID: usize = 12;
const EXIT_GROUP_DEAD: usize = 32;

#[inline(always)]
pub fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

/// The cohort of the current process: the tgid map first (one lookup), then the cgroup map.
#[inline(always)]
pub fn current_cohort(tgid: u32) -> u32 {
    // SAFETY: the value is a plain u32 copied out at once.
    if let Some(cohort) = unsafe { COHORT_TGIDS.get(tgid) } {
        return *cohort;
    }
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    match unsafe { COHORT_CGROUPS.get(cgroup) } {
        Some(cohort) => *cohort,
        None => COHORT_NONE,
    }
}

fn proc_event(kind: EventKind, tgid: u32, pid: u32, cohort: u32) -> ProcEvent {
    ProcEvent {
        header: EventHeader {
            kind: kind as u32,
            tgid,
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        pid,
        cohort,
    }
}

/// Every exec is reported: user space matches executable and environment rules against it.
/// Execs are rare, so this costs the host little.
pub fn on_exec(ctx: &TracePointContext) {
    let Ok(pid) = (unsafe { ctx.read_at::<i32>(EXEC_PID) }) else {
        return;
    };
    emit_now(&proc_event(
        EventKind::Exec,
        pid as u32,
        pid as u32,
        COHORT_NONE,
    ));
}

/// A child of a tgid-cohort process joins its parent's cohort before it runs. The tracepoint also
/// fires for new threads; their entries are harmless and removed at their exit.
/// (cgroup cohorts need nothing: children start in their parent's cgroup.)
pub fn on_fork(ctx: &TracePointContext) {
    let parent = current_tgid();
    let by_tgid = (unsafe { COHORT_TGIDS.get(parent) }).copied();
    let cohort = match by_tgid {
        Some(c) => c,
        None => current_cohort(parent),
    };
    if cohort == COHORT_NONE {
        return;
    }
    let Ok(child) = (unsafe { ctx.read_at::<i32>(FORK_CHILD_PID) }) else {
        return;
    };
    let child = child as u32;
    if by_tgid.is_none() {
        // A cgroup cohort: the child starts in its parent's cgroup, nothing else to do.
        return;
    }
    if COHORT_TGIDS.insert(child, cohort, 0).is_err() {
        crate::maps::count_drop(probe_common::drop_reason::SOCKETS_FULL);
    }
    emit_now(&proc_event(EventKind::Fork, parent, child, cohort));
}

/// Offsets in `task/task_newtask` (see its `format` in tracefs).
const NEWTASK_PID: usize = 8;
const NEWTASK_CLONE_FLAGS: usize = 32;
const CLONE_THREAD: u64 = 0x0001_0000;

/// A new process (not a thread: threads share their process's sockets already) of a process
/// that holds a connection it just accepted inherits it. One lookup for every new task.
pub fn on_new_task(ctx: &TracePointContext) {
    let Ok(flags) = (unsafe { ctx.read_at::<u64>(NEWTASK_CLONE_FLAGS) }) else {
        return;
    };
    if flags & CLONE_THREAD != 0 {
        return;
    }
    let Ok(child) = (unsafe { ctx.read_at::<i32>(NEWTASK_PID) }) else {
        return;
    };
    inherit_last_accept(current_tgid(), child as u32);
}

/// A prefork server's child answers on the connection its parent accepted just before the
/// fork: it gets its own socket entry (the parent then closes its copy) and user space a
/// connection record with the peer.
fn inherit_last_accept(parent: u32, child: u32) {
    // SAFETY: copied out at once.
    let Some(mut conn) = (unsafe { LAST_ACCEPT.get(parent) }).copied() else {
        return;
    };
    let key = SockKey {
        tgid: parent,
        fd: conn.fd,
    };
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { SOCKETS.get(key) }).copied() else {
        return;
    };
    let own = SockInfo { seq: 0, ..info };
    if SOCKETS
        .insert(
            SockKey {
                tgid: child,
                fd: conn.fd,
            },
            own,
            0,
        )
        .is_err()
    {
        crate::maps::count_drop(probe_common::drop_reason::SOCKETS_FULL);
        return;
    }
    conn.header.tgid = child;
    conn.header.ts_ns = unsafe { bpf_ktime_get_ns() };
    emit(&conn);
}

/// Forgets an exiting thread's inherited entry, and the whole process when its last thread exits.
pub fn on_exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let pid = pid_tgid as u32;
    crate::sockets::forget_thread(pid_tgid);
    if pid != tgid {
        let _ = COHORT_TGIDS.remove(pid);
    }
    let group_dead = unsafe { ctx.read_at::<u8>(EXIT_GROUP_DEAD) }.unwrap_or(0);
    if group_dead == 0 {
        return;
    }
    let cohort = current_cohort(tgid);
    if cohort == COHORT_NONE {
        return;
    }
    let _ = COHORT_TGIDS.remove(tgid);
    let _ = LAST_ACCEPT.remove(tgid);
    emit_now(&proc_event(EventKind::Exit, tgid, tgid, cohort));
}

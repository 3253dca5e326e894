//! Socket lifecycle of cohort processes: accept and connect start tracking a (tgid, fd), close
//! ends it.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    programs::TracePointContext,
};
use probe_common::{
    COHORT_NONE, CallArgs, ConnEvent, EventHeader, EventKind, SockInfo, SockKey, conn_role,
    drop_reason, sampled_in, syscall,
};

use crate::{
    cohort::{current_cohort, current_tgid},
    maps::{CALLS, LAST_ACCEPT, SOCKETS, count_drop, emit, sample},
};

/// Offsets of the first arguments and of the return value in `syscalls/sys_{enter,exit}_*`.
pub const ARG0: usize = 16;
pub const ARG1: usize = 24;
pub const ARG2: usize = 32;
pub const ARG3: usize = 40;
pub const RET: usize = 16;
/// `__syscall_nr` in every `syscalls/*` record.
const SYSCALL_NR: usize = 8;
/// x86_64 syscall numbers of accept and accept4.
const NR_ACCEPT: i32 = 43;
const NR_ACCEPT4: i32 = 288;

const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const EINPROGRESS: i64 = 115;

/// Saves a call's arguments for its exit. A thread's entry is overwritten in place and only
/// marked taken at exit (`syscall` 0), not deleted: a hash-map insert and delete per syscall
/// would cost more than the rest of the hook. Entries go when their thread exits.
#[inline(always)]
pub fn save_call(args: CallArgs) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: map value of this thread; only this thread writes it.
        unsafe { *slot = args };
    } else if CALLS.insert(pid_tgid, args, 0).is_err() {
        count_drop(drop_reason::CALLS_FULL);
    }
}

/// The arguments saved by this thread's pending enter, if any, marking them taken.
#[inline(always)]
pub fn take_call(pid_tgid: u64) -> Option<CallArgs> {
    let slot = CALLS.get_ptr_mut(pid_tgid)?;
    // SAFETY: map value of this thread; only this thread writes it.
    unsafe {
        if (*slot).syscall == 0 {
            return None;
        }
        let args = *slot;
        (*slot).syscall = 0;
        Some(args)
    }
}

/// Forgets an exiting thread's saved-arguments slot.
#[inline(always)]
pub fn forget_thread(pid_tgid: u64) {
    let _ = CALLS.remove(pid_tgid);
}

#[inline(always)]
fn save(syscall: u8, fd: u32, ptr: u64, role: u32) {
    let tgid = current_tgid();
    let cohort = current_cohort(tgid);
    if cohort == COHORT_NONE {
        return;
    }
    save_call(CallArgs {
        ptr,
        iovcnt: 0,
        fd,
        cohort,
        role,
        syscall,
        _pad: [0; 3],
    });
}

/// `accept(fd, upeer_sockaddr, upeer_addrlen)` and `accept4(..., flags)`.
pub fn enter_accept(ctx: &TracePointContext) {
    let Ok(addr) = (unsafe { ctx.read_at::<u64>(ARG1) }) else {
        return;
    };
    save(syscall::ACCEPT, 0, addr, conn_role::SERVER);
}

/// `connect(fd, uservaddr, addrlen)`.
pub fn enter_connect(ctx: &TracePointContext) {
    let (Ok(fd), Ok(addr)) = (unsafe { ctx.read_at::<u64>(ARG0) }, unsafe {
        ctx.read_at::<u64>(ARG1)
    }) else {
        return;
    };
    save(syscall::CONNECT, fd as u32, addr, conn_role::CLIENT);
}

/// Exit of accept, accept4 and connect: on success, track the socket and tell user space.
pub fn exit_accept_or_connect(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return;
    };
    let args = match take_call(pid_tgid) {
        Some(args) => args,
        // An accept that was already blocking when the hooks were attached: its enter was
        // missed, but the new fd is in the return value. The peer address is left to user space.
        None => match unsafe { ctx.read_at::<i32>(SYSCALL_NR) } {
            Ok(NR_ACCEPT | NR_ACCEPT4) if ret >= 0 => {
                let cohort = current_cohort((pid_tgid >> 32) as u32);
                if cohort == COHORT_NONE {
                    return;
                }
                CallArgs {
                    cohort,
                    role: conn_role::SERVER,
                    syscall: syscall::ACCEPT,
                    ..CallArgs::default()
                }
            }
            _ => return,
        },
    };
    let fd = match args.syscall {
        syscall::ACCEPT if ret >= 0 => ret as u32,
        syscall::CONNECT if ret == 0 || ret == -EINPROGRESS => args.fd,
        _ => return,
    };
    let tgid = (pid_tgid >> 32) as u32;
    let ts_ns = unsafe { bpf_ktime_get_ns() };
    // Over the CPU budget, whole connections are left out (counted), never parts of one.
    if !sampled_in(ts_ns ^ u64::from(fd), sample()) {
        count_drop(drop_reason::CONN_SAMPLED_OUT);
        return;
    }
    let mut event = ConnEvent {
        header: EventHeader {
            kind: EventKind::Conn as u32,
            tgid,
            ts_ns,
        },
        fd,
        cohort: args.cohort,
        role: args.role,
        family: 0,
        port: 0,
        addr: [0; 16],
    };
    if args.ptr != 0 {
        let sockaddr = args.ptr as *const u8;
        let family = unsafe { bpf_probe_read_user(sockaddr as *const u16) }.unwrap_or(0);
        match family {
            AF_INET => {
                if let Ok(a) = unsafe { bpf_probe_read_user(sockaddr.add(4) as *const [u8; 4]) } {
                    event.addr[..4].copy_from_slice(&a);
                }
            }
            AF_INET6 => {
                if let Ok(a) = unsafe { bpf_probe_read_user(sockaddr.add(8) as *const [u8; 16]) } {
                    event.addr = a;
                }
            }
            // Unix-domain and other families are not tracked.
            _ => return,
        }
        event.family = family;
        let port = unsafe { bpf_probe_read_user(sockaddr.add(2) as *const u16) }.unwrap_or(0);
        event.port = u16::from_be(port);
    }
    let info = SockInfo {
        cohort: args.cohort,
        role: args.role,
        seq: 0,
        flags: 0,
    };
    if SOCKETS.insert(SockKey { tgid, fd }, info, 0).is_err() {
        count_drop(drop_reason::SOCKETS_FULL);
        return;
    }
    if args.role == conn_role::SERVER {
        let _ = LAST_ACCEPT.insert(tgid, event, 0);
    }
    emit(&event);
}

/// `close(fd)`: one lookup for everyone; tracked sockets are forgotten and reported.
pub fn enter_close(ctx: &TracePointContext) {
    let Ok(fd) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return;
    };
    let tgid = current_tgid();
    let key = SockKey {
        tgid,
        fd: fd as u32,
    };
    // SAFETY: copied out before the entry is removed.
    let Some(info) = (unsafe { SOCKETS.get(key) }).copied() else {
        return;
    };
    let _ = SOCKETS.remove(key);
    if unsafe { LAST_ACCEPT.get(tgid) }.is_some_and(|a| a.fd == key.fd) {
        let _ = LAST_ACCEPT.remove(tgid);
    }
    emit(&ConnEvent {
        header: EventHeader {
            kind: EventKind::Close as u32,
            tgid,
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        fd: fd as u32,
        cohort: info.cohort,
        role: info.role,
        family: 0,
        port: 0,
        addr: [0; 16],
    });
}

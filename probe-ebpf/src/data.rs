//! The read and write families on tracked sockets: exact byte counts plus a payload prefix.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::{
        bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user,
        generated::bpf_probe_read_user as probe_read_user_raw,
    },
    programs::TracePointContext,
};
use probe_common::{
    CallArgs, DataHeader, EventHeader, EventKind, MAX_IOV, MAX_PREFIX, SockKey, data_dir,
    drop_reason, setting, syscall, tls_conn,
};

use crate::{
    cohort::current_tgid,
    maps::{PREFIX_LEN, SCRATCH, SOCKETS, count_drop, emit_bytes, setting},
    sockets::{ARG0, ARG1, ARG2, ARG3, RET},
    sockets::{save_call, take_call},
};

/// `struct user_msghdr`: `msg_iov` and `msg_iovlen` offsets.
const MSG_IOV: usize = 16;
const MSG_IOVLEN: usize = 24;

/// Saves the call's arguments if `fd` is a tracked socket of this process. For every other
/// process and fd this is the single lookup the hook costs.
#[inline(always)]
fn save_if_tracked(fd: u64, ptr: u64, iovcnt: u64, syscall: u8) {
    let key = SockKey {
        tgid: current_tgid(),
        fd: fd as u32,
    };
    // SAFETY: copied out at once.
    let Some(info) = (unsafe { SOCKETS.get(key) }).copied() else {
        return;
    };
    save_call(CallArgs {
        ptr,
        iovcnt,
        fd: fd as u32,
        cohort: info.cohort,
        role: info.role,
        syscall,
        _pad: [0; 3],
    });
}

/// `read`/`recvfrom`/`write`/`sendto`: (fd, buf, count, ...).
pub fn enter_buf(ctx: &TracePointContext, syscall: u8) {
    let (Ok(fd), Ok(buf)) = (unsafe { ctx.read_at::<u64>(ARG0) }, unsafe {
        ctx.read_at::<u64>(ARG1)
    }) else {
        return;
    };
    save_if_tracked(fd, buf, 0, syscall);
}

/// `MSG_PEEK`: the bytes stay in the socket and will be read again.
const MSG_PEEK: u64 = 2;

/// `recvfrom(fd, buf, len, flags, ...)`: as `read`, except that a peek moves nothing (nginx
/// peeks one byte of every connection to a TLS port; counting it would duplicate it).
pub fn enter_recvfrom(ctx: &TracePointContext) {
    let (Ok(fd), Ok(buf), Ok(flags)) = (
        unsafe { ctx.read_at::<u64>(ARG0) },
        unsafe { ctx.read_at::<u64>(ARG1) },
        unsafe { ctx.read_at::<u64>(ARG3) },
    ) else {
        return;
    };
    if flags & MSG_PEEK != 0 {
        return;
    }
    save_if_tracked(fd, buf, 0, syscall::RECVFROM);
}

/// `readv`/`writev`: (fd, iov, iovcnt).
pub fn enter_iov(ctx: &TracePointContext, syscall: u8) {
    let (Ok(fd), Ok(iov), Ok(cnt)) = (
        unsafe { ctx.read_at::<u64>(ARG0) },
        unsafe { ctx.read_at::<u64>(ARG1) },
        unsafe { ctx.read_at::<u64>(ARG2) },
    ) else {
        return;
    };
    save_if_tracked(fd, iov, cnt, syscall);
}

/// `recvmsg`/`sendmsg`: (fd, msghdr, flags); the iovecs are read from the msghdr, and only for
/// tracked sockets.
pub fn enter_msg(ctx: &TracePointContext, syscall: u8) {
    let (Ok(fd), Ok(msg), Ok(flags)) = (
        unsafe { ctx.read_at::<u64>(ARG0) },
        unsafe { ctx.read_at::<u64>(ARG1) },
        unsafe { ctx.read_at::<u64>(ARG2) },
    ) else {
        return;
    };
    if syscall == syscall::RECVMSG && flags & MSG_PEEK != 0 {
        return;
    }
    let key = SockKey {
        tgid: current_tgid(),
        fd: fd as u32,
    };
    if unsafe { SOCKETS.get(key) }.is_none() {
        return;
    }
    let msg = msg as *const u8;
    let (Ok(iov), Ok(cnt)) = (
        unsafe { bpf_probe_read_user(msg.add(MSG_IOV) as *const u64) },
        unsafe { bpf_probe_read_user(msg.add(MSG_IOVLEN) as *const u64) },
    ) else {
        return;
    };
    if cnt == 0 {
        return; // a message without iovecs moves no bytes
    }
    save_if_tracked(fd, iov, cnt, syscall);
}

/// `sendfile64(out_fd, in_fd, offset, count)`: bytes are counted; the payload comes from a file
/// and is not captured.
pub fn enter_sendfile(ctx: &TracePointContext) {
    let Ok(out_fd) = (unsafe { ctx.read_at::<u64>(ARG0) }) else {
        return;
    };
    save_if_tracked(out_fd, 0, 0, syscall::SENDFILE);
}

fn direction(syscall: u8) -> Option<u8> {
    match syscall {
        syscall::READ | syscall::READV | syscall::RECVFROM | syscall::RECVMSG => {
            Some(data_dir::INGRESS)
        }
        syscall::WRITE
        | syscall::WRITEV
        | syscall::SENDTO
        | syscall::SENDMSG
        | syscall::SENDFILE => Some(data_dir::EGRESS),
        _ => None,
    }
}

/// Copies up to `want` bytes from user memory into `dst` (2 * MAX_PREFIX long) at `off`;
/// returns the bytes copied. The masks keep every access provably in bounds for the verifier.
#[inline(always)]
pub fn copy_user(dst: *mut u8, off: usize, src: u64, want: usize) -> usize {
    let off = off & (MAX_PREFIX - 1);
    let mut n = want;
    if n > MAX_PREFIX {
        n = MAX_PREFIX;
    }
    let ret =
        unsafe { probe_read_user_raw(dst.add(off) as *mut c_void, n as u32, src as *const c_void) };
    if ret < 0 { 0 } else { n }
}

/// Exit of every data syscall: build the record in scratch memory and send header + prefix.
pub fn exit(ctx: &TracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(args) = take_call(pid_tgid) else {
        return;
    };
    let Some(dir) = direction(args.syscall) else {
        return;
    };
    let Ok(ret) = (unsafe { ctx.read_at::<i64>(RET) }) else {
        return;
    };
    if ret <= 0 {
        return;
    }
    // The TLS library's own socket I/O: its ciphertext says nothing, its fd ties the call's
    // plaintext to this connection.
    if setting(setting::TLS, 0) != 0
        && crate::tls::note_conn(pid_tgid, tls_conn::FD, args.fd as u64)
    {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    let Some(info) = SOCKETS.get_ptr_mut(SockKey { tgid, fd: args.fd }) else {
        return; // closed by another thread meanwhile
    };
    // SAFETY: map value pointer; a racing writer can only make a sequence number repeat, which
    // user space treats as a gap.
    let seq = unsafe {
        (*info).seq = (*info).seq.wrapping_add(1);
        (*info).seq
    };
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let mut prefix = PREFIX_LEN.load() as usize;
    if prefix > MAX_PREFIX {
        prefix = MAX_PREFIX;
    }
    let len = ret as u64;
    let want = if (len as usize) < prefix {
        len as usize
    } else {
        prefix
    };
    // SAFETY: per-CPU scratch, used only by this program on this CPU.
    let data = unsafe { (*scratch).data.as_mut_ptr() };
    let mut captured: usize = 0;
    if args.syscall == syscall::SENDFILE || want == 0 {
        // nothing to copy
    } else if args.iovcnt == 0 {
        captured = copy_user(data, 0, args.ptr, want);
    } else {
        let iov = args.ptr as *const u64;
        for i in 0..MAX_IOV {
            if i as u64 >= args.iovcnt || captured >= want {
                break;
            }
            let (Ok(base), Ok(iov_len)) =
                (unsafe { bpf_probe_read_user(iov.add(2 * i)) }, unsafe {
                    bpf_probe_read_user(iov.add(2 * i + 1))
                })
            else {
                break;
            };
            let rest = want - captured;
            let n = if (iov_len as usize) < rest {
                iov_len as usize
            } else {
                rest
            };
            let got = copy_user(data, captured, base, n);
            if got != n {
                captured += got;
                break;
            }
            captured += got;
        }
    }
    if captured < want && args.syscall != syscall::SENDFILE {
        count_drop(drop_reason::READ_USER);
    }
    if captured > MAX_PREFIX {
        captured = MAX_PREFIX;
    }
    unsafe {
        (*scratch).header = DataHeader {
            header: EventHeader {
                kind: EventKind::Data as u32,
                tgid,
                ts_ns: bpf_ktime_get_ns(),
            },
            fd: args.fd,
            cohort: args.cohort,
            len,
            captured: captured as u32,
            seq,
            direction: dir,
            syscall: args.syscall,
            role: args.role as u8,
            _pad: [0; 5],
        };
    }
    let size = core::mem::size_of::<DataHeader>() + captured;
    emit_bytes(scratch as *mut c_void, size as u64);
}

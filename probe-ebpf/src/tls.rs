//! TLS plaintext: uprobes on the TLS library's read and write functions (OpenSSL's `SSL_read`,
//! `SSL_write`, their `_ex` forms, and `SSL_do_handshake`), attached by user space to each
//! cohort process that maps the library, so other users of the library pay nothing.
//!
//! The entry probe saves the call; the data hooks (`sys_exit_*` on the syscall path, the egress
//! segment hook on the cgroup path) note which connection the library's own socket I/O went to
//! during the call and keep its ciphertext out of the ring buffer; the return probe sends the
//! plaintext with that connection. A call without socket I/O (a read served from the library's
//! buffer) carries only the `SSL *`, which user space ties to the connection seen before.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_user},
    programs::{ProbeContext, RetProbeContext},
};
use probe_common::{
    EventHeader, EventKind, MAX_PREFIX, TlsCall, TlsHeader, data_dir, drop_reason, tls_call,
    tls_conn,
};

use crate::{
    data::copy_user,
    maps::{PREFIX_LEN, TLS_CALLS, TLS_SCRATCH, count_drop, emit_bytes},
};

/// Entry of a TLS function: saves its arguments (the outermost call of this thread wins).
#[inline(always)]
pub fn enter(ctx: &ProbeContext, call: u8) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if let Some(slot) = TLS_CALLS.get_ptr_mut(pid_tgid) {
        // SAFETY: this thread's slot; only this thread writes it.
        unsafe {
            if (*slot).call != 0 {
                (*slot).depth = (*slot).depth.saturating_add(1);
                return;
            }
        }
    }
    let ssl: u64 = ctx.arg(0).unwrap_or(0);
    let (buf, count_ptr) = match call {
        tls_call::HANDSHAKE => (0, 0),
        tls_call::READ_EX | tls_call::WRITE_EX => {
            (ctx.arg(1).unwrap_or(0), ctx.arg::<u64>(3).unwrap_or(0))
        }
        _ => (ctx.arg(1).unwrap_or(0), 0),
    };
    let saved = TlsCall {
        ssl,
        buf,
        count_ptr,
        conn: 0,
        call,
        conn_kind: tls_conn::NONE,
        depth: 0,
        _pad: [0; 5],
    };
    if TLS_CALLS.insert(pid_tgid, saved, 0).is_err() {
        count_drop(drop_reason::TLS_CALLS_FULL);
    }
}

/// The data hooks' side: the calling thread is inside a TLS call, so the socket I/O it does
/// now is the library's ciphertext for that call's connection. Records the connection (the
/// first one seen in the call) and returns true: the caller then leaves the ciphertext out.
#[inline(always)]
pub fn note_conn(pid_tgid: u64, kind: u8, conn: u64) -> bool {
    let Some(slot) = TLS_CALLS.get_ptr_mut(pid_tgid) else {
        return false;
    };
    // SAFETY: this thread's slot; only this thread writes it.
    unsafe {
        if (*slot).call == 0 {
            return false;
        }
        if (*slot).conn_kind == tls_conn::NONE {
            (*slot).conn_kind = kind;
            (*slot).conn = conn;
        }
    }
    true
}

/// Return of a TLS function: sends the plaintext it moved, with the connection if known.
#[inline(always)]
pub fn exit(ctx: &RetProbeContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(slot) = TLS_CALLS.get_ptr_mut(pid_tgid) else {
        return;
    };
    // SAFETY: this thread's slot; only this thread writes it.
    let saved = unsafe {
        if (*slot).depth > 0 {
            (*slot).depth -= 1;
            return;
        }
        let saved = *slot;
        (*slot).call = 0;
        saved
    };
    let _ = TLS_CALLS.remove(pid_tgid);
    let ret: i64 = ctx.ret::<i32>() as i64;
    let (len, direction) = match saved.call {
        tls_call::READ | tls_call::WRITE => (
            if ret > 0 { ret as u64 } else { 0 },
            if saved.call == tls_call::READ {
                data_dir::INGRESS
            } else {
                data_dir::EGRESS
            },
        ),
        tls_call::READ_EX | tls_call::WRITE_EX => {
            let n = if ret == 1 && saved.count_ptr != 0 {
                // SAFETY: a user pointer the library writes the count to; a failed read is 0.
                unsafe { bpf_probe_read_user(saved.count_ptr as *const u64) }.unwrap_or(0)
            } else {
                0
            };
            (
                n,
                if saved.call == tls_call::READ_EX {
                    data_dir::INGRESS
                } else {
                    data_dir::EGRESS
                },
            )
        }
        _ => (0, 0),
    };
    // A handshake or a failed call says something only when it tied the `SSL` to a socket.
    if len == 0 && saved.conn_kind == tls_conn::NONE {
        return;
    }
    let Some(scratch) = TLS_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    let mut prefix = PREFIX_LEN.load() as usize;
    if prefix > MAX_PREFIX {
        prefix = MAX_PREFIX;
    }
    let want = if (len as usize) < prefix {
        len as usize
    } else {
        prefix
    };
    // SAFETY: per-CPU scratch, used only by this program on this CPU.
    let data = unsafe { (*scratch).data.as_mut_ptr() };
    let mut captured = if want > 0 {
        copy_user(data, 0, saved.buf, want)
    } else {
        0
    };
    if captured < want {
        count_drop(drop_reason::READ_USER);
    }
    if captured > MAX_PREFIX {
        captured = MAX_PREFIX;
    }
    // SAFETY: per-CPU scratch as above.
    unsafe {
        (*scratch).header = TlsHeader {
            header: EventHeader {
                kind: EventKind::Tls as u32,
                tgid: (pid_tgid >> 32) as u32,
                ts_ns: bpf_ktime_get_ns(),
            },
            ssl: saved.ssl,
            conn: saved.conn,
            len,
            captured: captured as u32,
            pid: pid_tgid as u32,
            direction,
            conn_kind: saved.conn_kind,
            call: saved.call,
            _pad: [0; 5],
        };
    }
    let size = core::mem::size_of::<TlsHeader>() + captured;
    emit_bytes(scratch as *mut core::ffi::c_void, size as u64);
}

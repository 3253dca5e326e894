//! The cgroup data path: TCP segments of sockets created in a cohort's cgroup, seen by
//! `cgroup_skb` ingress and egress programs attached to that cgroup only. Other processes pay
//! nothing (the kernel runs a cgroup's programs only for its own sockets).
//!
//! Each record carries the segment's TCP sequence number, exact payload length and a payload
//! prefix; user space rebuilds each direction's byte stream from them (ingress runs before TCP's
//! own sequence processing, so duplicates and out-of-order segments reach it).

use core::ffi::c_void;

use aya_ebpf::{
    bindings::__sk_buff,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_get_socket_cookie,
        bpf_ktime_get_ns, bpf_skb_cgroup_id, generated::bpf_skb_load_bytes,
    },
    programs::{SkBuffContext, SockContext},
};
use probe_common::{
    EventHeader, EventKind, MAX_PREFIX, ReleaseEvent, SegmentHeader, data_dir, drop_reason,
    sampled_in, setting, tcp_flag, tls_conn,
};

use crate::maps::{PREFIX_LEN, SEGMENT_SCRATCH, count_drop, emit, emit_bytes, sample, setting};

/// `skb->protocol` values as the context presents them (network byte order in a u32).
const ETH_P_IP_BE: u32 = 0x0008;
const ETH_P_IPV6_BE: u32 = 0xDD86;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
const IPV6_HEADER: u32 = 40;
const SOCK_STREAM: u32 = 1;

/// The first 20 bytes of a TCP header.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHeader {
    ports: [u8; 4],
    seq: [u8; 4],
    ack: [u8; 4],
    /// Data offset in the high nibble.
    offset: u8,
    flags: u8,
    window: [u8; 2],
    check: [u8; 2],
    urgent: [u8; 2],
}

#[inline(always)]
fn load<T: Copy>(skb: *mut __sk_buff, offset: u32) -> Option<T> {
    let mut out = core::mem::MaybeUninit::<T>::uninit();
    // SAFETY: the helper writes exactly size_of::<T>() bytes or fails.
    let ret = unsafe {
        bpf_skb_load_bytes(
            skb as *const c_void,
            offset,
            out.as_mut_ptr() as *mut c_void,
            core::mem::size_of::<T>() as u32,
        )
    };
    if ret == 0 {
        // SAFETY: fully written by the helper.
        Some(unsafe { out.assume_init() })
    } else {
        None
    }
}

/// Reports one segment of a cohort socket; always lets the packet through.
pub fn on_segment(ctx: &SkBuffContext, direction: u8) {
    let skb = ctx.skb.skb;
    // SAFETY: context fields readable by cgroup_skb programs.
    let (protocol, skb_len) = unsafe { ((*skb).protocol, (*skb).len) };
    let ip_len = match protocol {
        ETH_P_IP_BE => {
            let Some(first) = load::<[u8; 10]>(skb, 0) else {
                count_drop(drop_reason::SEGMENT_UNPARSED);
                return;
            };
            if first[9] != IPPROTO_TCP {
                return;
            }
            u32::from(first[0] & 0x0f) * 4
        }
        ETH_P_IPV6_BE => {
            let Some(first) = load::<[u8; 8]>(skb, 0) else {
                count_drop(drop_reason::SEGMENT_UNPARSED);
                return;
            };
            if first[6] != IPPROTO_TCP {
                // Extension headers before TCP are rare on service traffic: counted, not parsed.
                count_drop(drop_reason::SEGMENT_UNPARSED);
                return;
            }
            IPV6_HEADER
        }
        _ => return,
    };
    let Some(tcp) = load::<TcpHeader>(skb, ip_len) else {
        count_drop(drop_reason::SEGMENT_UNPARSED);
        return;
    };
    let tcp_len = u32::from(tcp.offset >> 4) * 4;
    let payload_at = ip_len + tcp_len;
    let len = skb_len.saturating_sub(payload_at);
    let flags = tcp.flags & (tcp_flag::FIN | tcp_flag::SYN | tcp_flag::RST | tcp_flag::ACK);
    // Pure ACKs carry nothing the decoders need.
    if len == 0 && flags & (tcp_flag::FIN | tcp_flag::SYN | tcp_flag::RST) == 0 {
        return;
    }
    // SAFETY: helper valid for cgroup_skb.
    let cookie = unsafe { bpf_get_socket_cookie(skb as *mut c_void) };
    if !sampled_in(cookie, sample()) {
        count_drop(drop_reason::SAMPLED_OUT);
        return;
    }
    let Some(scratch) = SEGMENT_SCRATCH.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: helper valid for cgroup_skb.
    let cgroup = unsafe { bpf_skb_cgroup_id(skb) };
    // The writer on egress, when it runs in the socket's cgroup (not softirq work on behalf of
    // another task); never on ingress, where the current task is the sender or whoever the
    // softirq interrupted.
    let writer =
        if direction == data_dir::EGRESS && unsafe { bpf_get_current_cgroup_id() } == cgroup {
            bpf_get_current_pid_tgid()
        } else {
            0
        };
    let tgid = (writer >> 32) as u32;
    let mut prefix = PREFIX_LEN.load();
    if prefix > MAX_PREFIX as u32 {
        prefix = MAX_PREFIX as u32;
    }
    // Sent by a TLS library call of the writer: the segment ties the call's plaintext to this
    // socket, and its ciphertext is left out (the sequence numbers still go to user space).
    if writer != 0
        && setting(setting::TLS, 0) != 0
        && crate::tls::note_conn(writer, tls_conn::COOKIE, cookie)
    {
        prefix = 0;
    }
    let want = if len < prefix { len } else { prefix };
    let mut captured: u32 = 0;
    // SAFETY: per-CPU scratch, used only by this program on this CPU.
    let data = unsafe { (*scratch).data.as_mut_ptr() };
    if want > 0 {
        // In [1, MAX_PREFIX] in a form the verifier can follow.
        let n = ((want - 1) & (MAX_PREFIX as u32 - 1)) + 1;
        // SAFETY: `data` has MAX_PREFIX bytes; n <= MAX_PREFIX.
        let ret =
            unsafe { bpf_skb_load_bytes(skb as *const c_void, payload_at, data as *mut c_void, n) };
        if ret == 0 {
            captured = n;
        }
    }
    // SAFETY: context fields readable by cgroup_skb programs; per-CPU scratch as above.
    unsafe {
        let h = &mut (*scratch).header;
        h.header = EventHeader {
            kind: EventKind::Segment as u32,
            tgid,
            ts_ns: bpf_ktime_get_ns(),
        };
        h.cookie = cookie;
        h.cgroup = cgroup;
        h.seq = u32::from_be_bytes(tcp.seq);
        h.len = len;
        h.captured = captured;
        h.flags = flags;
        h.direction = direction;
        h.ack = u32::from_be_bytes(tcp.ack);
        h.local_port = (*skb).local_port as u16;
        // remote_port holds the port in network byte order, in the upper half on little-endian
        // kernels (shifted by the context rewrite) and the lower half on others.
        let rp = (*skb).remote_port;
        h.remote_port = u16::from_be(if rp > 0xffff {
            (rp >> 16) as u16
        } else {
            rp as u16
        });
        if (*skb).family == u32::from(AF_INET6) {
            h.family = AF_INET6;
            let (l, r) = ((*skb).local_ip6, (*skb).remote_ip6);
            for i in 0..4 {
                h.local_addr[i * 4..i * 4 + 4].copy_from_slice(&l[i].to_ne_bytes());
                h.remote_addr[i * 4..i * 4 + 4].copy_from_slice(&r[i].to_ne_bytes());
            }
        } else {
            h.family = AF_INET;
            h.local_addr = [0; 16];
            h.remote_addr = [0; 16];
            h.local_addr[..4].copy_from_slice(&(*skb).local_ip4.to_ne_bytes());
            h.remote_addr[..4].copy_from_slice(&(*skb).remote_ip4.to_ne_bytes());
        }
    }
    let captured = if captured > MAX_PREFIX as u32 {
        MAX_PREFIX as u32
    } else {
        captured
    };
    let size = core::mem::size_of::<SegmentHeader>() as u64 + u64::from(captured);
    emit_bytes(scratch as *mut c_void, size);
}

/// A TCP socket of a cohort cgroup is released: user space finishes its connection.
pub fn on_release(ctx: &SockContext) {
    // SAFETY: bpf_sock fields readable by cgroup/sock_release programs.
    let (ty, protocol) = unsafe { ((*ctx.sock).type_, (*ctx.sock).protocol) };
    if ty != SOCK_STREAM || protocol != u32::from(IPPROTO_TCP) {
        return;
    }
    // SAFETY: helper valid for cgroup sock programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.sock as *mut c_void) };
    emit(&ReleaseEvent {
        header: EventHeader {
            kind: EventKind::Release as u32,
            tgid: 0,
            ts_ns: unsafe { bpf_ktime_get_ns() },
        },
        cookie,
    });
}

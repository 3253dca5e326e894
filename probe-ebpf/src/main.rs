//! bakeoff's kernel programs. Entry points only; the logic lives in the modules.
//!
//! The tracepoints fire for every process on the host, so each one starts with the cheapest
//! possible check (one hash lookup) and returns at once for processes outside the cohorts. The
//! cgroup programs run only for sockets of the cohort cgroups they are attached to.
#![no_std]
#![no_main]

mod cohort;
mod data;
mod maps;
mod segments;
mod sockets;
mod tls;

use aya_ebpf::{
    macros::{cgroup_skb, cgroup_sock, tracepoint, uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext, SkBuffContext, SockContext, TracePointContext},
};
use probe_common::{data_dir, syscall, tls_call};

// --- the cgroup data path: attached to cohort cgroups only ---

/// Segments received by sockets of a cohort cgroup. Returns 1: the packet always passes.
#[cgroup_skb(ingress)]
pub fn segment_ingress(ctx: SkBuffContext) -> i32 {
    segments::on_segment(&ctx, data_dir::INGRESS);
    1
}

/// Segments sent by sockets of a cohort cgroup.
#[cgroup_skb(egress)]
pub fn segment_egress(ctx: SkBuffContext) -> i32 {
    segments::on_segment(&ctx, data_dir::EGRESS);
    1
}

/// A socket of a cohort cgroup is released. Returns 1: never refuses anything.
#[cgroup_sock(sock_release)]
pub fn socket_release(ctx: SockContext) -> i32 {
    segments::on_release(&ctx);
    1
}

// --- scheduler: cohort membership ---

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    cohort::on_exec(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_fork")]
pub fn sched_process_fork(ctx: TracePointContext) -> u32 {
    cohort::on_fork(&ctx);
    0
}

#[tracepoint(category = "task", name = "task_newtask")]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    cohort::on_new_task(&ctx);
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    cohort::on_exit(&ctx);
    0
}

// --- sockets: accept, connect, close ---

/// Attached to `sys_enter_accept` and `sys_enter_accept4` (same argument layout).
#[tracepoint(category = "syscalls", name = "sys_enter_accept")]
pub fn sys_enter_accept(ctx: TracePointContext) -> u32 {
    sockets::enter_accept(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_connect")]
pub fn sys_enter_connect(ctx: TracePointContext) -> u32 {
    sockets::enter_connect(&ctx);
    0
}

/// Attached to the exits of `accept`, `accept4` and `connect`.
#[tracepoint(category = "syscalls", name = "sys_exit_socket")]
pub fn sys_exit_socket(ctx: TracePointContext) -> u32 {
    sockets::exit_accept_or_connect(&ctx);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_close")]
pub fn sys_enter_close(ctx: TracePointContext) -> u32 {
    sockets::enter_close(&ctx);
    0
}

// --- data: the read and write families ---

#[tracepoint(category = "syscalls", name = "sys_enter_read")]
pub fn sys_enter_read(ctx: TracePointContext) -> u32 {
    data::enter_buf(&ctx, syscall::READ);
    0
}

/// `recvfrom`: as `read`, but a `MSG_PEEK` is not data.
#[tracepoint(category = "syscalls", name = "sys_enter_recvfrom")]
pub fn sys_enter_recvfrom(ctx: TracePointContext) -> u32 {
    data::enter_recvfrom(&ctx);
    0
}

/// Attached to `sys_enter_write` and `sys_enter_sendto` (fd, buf, count first).
#[tracepoint(category = "syscalls", name = "sys_enter_write")]
pub fn sys_enter_write(ctx: TracePointContext) -> u32 {
    data::enter_buf(&ctx, syscall::WRITE);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_readv")]
pub fn sys_enter_readv(ctx: TracePointContext) -> u32 {
    data::enter_iov(&ctx, syscall::READV);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_writev")]
pub fn sys_enter_writev(ctx: TracePointContext) -> u32 {
    data::enter_iov(&ctx, syscall::WRITEV);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_recvmsg")]
pub fn sys_enter_recvmsg(ctx: TracePointContext) -> u32 {
    data::enter_msg(&ctx, syscall::RECVMSG);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendmsg")]
pub fn sys_enter_sendmsg(ctx: TracePointContext) -> u32 {
    data::enter_msg(&ctx, syscall::SENDMSG);
    0
}

#[tracepoint(category = "syscalls", name = "sys_enter_sendfile64")]
pub fn sys_enter_sendfile64(ctx: TracePointContext) -> u32 {
    data::enter_sendfile(&ctx);
    0
}

/// One exit program serves the whole family: the saved arguments say which call it was.
#[tracepoint(category = "syscalls", name = "sys_exit_data")]
pub fn sys_exit_data(ctx: TracePointContext) -> u32 {
    data::exit(&ctx);
    0
}

// --- TLS plaintext: uprobes attached per cohort process that maps the library ---

#[uprobe]
pub fn ssl_read_enter(ctx: ProbeContext) -> u32 {
    tls::enter(&ctx, tls_call::READ);
    0
}

#[uprobe]
pub fn ssl_write_enter(ctx: ProbeContext) -> u32 {
    tls::enter(&ctx, tls_call::WRITE);
    0
}

#[uprobe]
pub fn ssl_read_ex_enter(ctx: ProbeContext) -> u32 {
    tls::enter(&ctx, tls_call::READ_EX);
    0
}

#[uprobe]
pub fn ssl_write_ex_enter(ctx: ProbeContext) -> u32 {
    tls::enter(&ctx, tls_call::WRITE_EX);
    0
}

#[uprobe]
pub fn ssl_handshake_enter(ctx: ProbeContext) -> u32 {
    tls::enter(&ctx, tls_call::HANDSHAKE);
    0
}

/// One return probe for every TLS function: the saved call says which it was.
#[uretprobe]
pub fn ssl_return(ctx: RetProbeContext) -> u32 {
    tls::exit(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

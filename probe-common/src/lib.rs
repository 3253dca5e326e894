//! Types shared by the kernel programs (`probe-ebpf`) and the node agent (`bakeoff-probe`).
//!
//! Everything here is `#[repr(C)]` plain data: the kernel writes these records into the ring
//! buffer and the maps, user space reads them back byte for byte. Changing a layout means
//! rebuilding both sides, which the build does together.
#![no_std]

/// Upper bound of the payload prefix a data event carries. A power of two: the kernel programs
/// mask offsets with `MAX_PREFIX - 1` so the verifier can bound every copy.
pub const MAX_PREFIX: usize = 4096;

/// Default payload prefix (bytes per syscall) when the configuration does not set one.
pub const DEFAULT_PREFIX: u32 = 1024;

/// At most this many iovecs of a `readv`/`writev`/`recvmsg`/`sendmsg` are copied.
pub const MAX_IOV: usize = 8;

/// Cohort id 0 means "no cohort"; user space numbers real cohorts from 1.
pub const COHORT_NONE: u32 = 0;

/// Index of each per-CPU drop counter in the `DROPS` map.
pub mod drop_reason {
    /// The ring buffer was full; the event was not written.
    pub const RINGBUF_FULL: u32 = 0;
    /// The socket table was full; a connection was not tracked.
    pub const SOCKETS_FULL: u32 = 1;
    /// The in-flight syscall table was full; one read or write was missed.
    pub const CALLS_FULL: u32 = 2;
    /// Reading user memory failed; the event carries no payload but its length is exact.
    pub const READ_USER: u32 = 3;
    /// A segment of a connection left out by sampling (the probe is over its CPU budget).
    pub const SAMPLED_OUT: u32 = 4;
    /// A packet the segment hooks could not parse (IPv6 extension headers, short headers).
    pub const SEGMENT_UNPARSED: u32 = 5;
    /// A connection (accept or connect) left out by sampling, on the syscall path.
    pub const CONN_SAMPLED_OUT: u32 = 6;
    /// The in-flight TLS call table was full; one `SSL_read`/`SSL_write` was missed.
    pub const TLS_CALLS_FULL: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}

/// What a ring-buffer record is. Every record starts with an [`EventHeader`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A process called `execve` (any process: user space evaluates the cohort rules).
    Exec = 1,
    /// A cohort process forked; the child inherited the cohort.
    Fork = 2,
    /// A cohort process (thread-group leader) exited.
    Exit = 3,
    /// A cohort process accepted or connected a socket.
    Conn = 4,
    /// A tracked socket was closed.
    Close = 5,
    /// Bytes read from or written to a tracked socket.
    Data = 6,
    /// A TCP segment of a socket in a cohort cgroup (the cgroup data path).
    Segment = 7,
    /// A socket of a cohort cgroup was released (the cgroup data path).
    Release = 8,
    /// Plaintext read or written by a TLS library call of a cohort process (uprobes).
    Tls = 9,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Exec,
            2 => Self::Fork,
            3 => Self::Exit,
            4 => Self::Conn,
            5 => Self::Close,
            6 => Self::Data,
            7 => Self::Segment,
            8 => Self::Release,
            9 => Self::Tls,
            _ => return None,
        })
    }
}

/// First bytes of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct EventHeader {
    /// An [`EventKind`] as `u32`.
    pub kind: u32,
    /// Thread-group id (the process id user space sees).
    pub tgid: u32,
    /// `bpf_ktime_get_ns()` when the event happened (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}

/// `Exec`, `Fork`, `Exit`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcEvent {
    pub header: EventHeader,
    /// Fork: the child's pid (a thread id when the parent spawned a thread). Exec/Exit: the tgid.
    pub pid: u32,
    /// Cohort of the process (Fork, Exit), or `COHORT_NONE` (Exec).
    pub cohort: u32,
}

/// Direction of a connection, seen from the watched process.
pub mod conn_role {
    /// The process accepted it: it serves requests (reads requests, writes responses).
    pub const SERVER: u32 = 1;
    /// The process connected: it sends requests (writes requests, reads responses).
    pub const CLIENT: u32 = 2;
}

/// `Conn` (accept or connect) and `Close`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ConnEvent {
    pub header: EventHeader,
    pub fd: u32,
    pub cohort: u32,
    /// A [`conn_role`] value.
    pub role: u32,
    /// `AF_INET`, `AF_INET6`, or 0 when the process did not ask for the peer address.
    pub family: u16,
    /// Peer port, host byte order.
    pub port: u16,
    /// Peer address: 4 bytes for IPv4, 16 for IPv6, network byte order.
    pub addr: [u8; 16],
}

/// Direction of a data event.
pub mod data_dir {
    /// The process read bytes from the socket.
    pub const INGRESS: u8 = 1;
    /// The process wrote bytes to the socket.
    pub const EGRESS: u8 = 2;
}

/// Header of a `Data` record; `captured` payload bytes follow it in the same record.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct DataHeader {
    pub header: EventHeader,
    pub fd: u32,
    pub cohort: u32,
    /// Exact number of bytes the syscall moved (its return value).
    pub len: u64,
    /// Payload bytes that follow this header: `min(len, prefix)`, fewer if user memory was
    /// unreadable.
    pub captured: u32,
    /// Per-socket sequence number of data events, from 1. A gap means events of this socket were
    /// lost (ring buffer full), so user space resynchronises instead of misparsing.
    pub seq: u32,
    /// A [`data_dir`] value.
    pub direction: u8,
    /// The syscall, as a [`syscall`] value, for diagnostics.
    pub syscall: u8,
    /// The socket's [`conn_role`] value (as `u8`), so user space can adopt a connection whose
    /// `Conn` record was lost.
    pub role: u8,
    pub _pad: [u8; 5],
}

/// TCP flags of a [`SegmentHeader`] (the TCP header's flag byte).
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// Header of a `Segment` record (cgroup data path): one TCP segment with payload (or SYN, FIN,
/// RST) of a socket created in a cohort cgroup; `captured` payload bytes follow it.
/// `header.tgid` is the sending process on egress when it runs in the socket's cgroup, else 0
/// (ingress runs in softirq or in the sender's context).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SegmentHeader {
    pub header: EventHeader,
    /// `bpf_get_socket_cookie`: the connection's identity, unique while the host runs.
    pub cookie: u64,
    /// cgroup v2 id of the socket (the cgroup its creator was in).
    pub cgroup: u64,
    /// TCP sequence number of the first payload byte (of the SYN, for a SYN).
    pub seq: u32,
    /// Exact payload bytes (one GSO/GRO super-segment may carry up to 64 KB).
    pub len: u32,
    /// Payload bytes that follow this header: `min(len, prefix)`.
    pub captured: u32,
    /// [`tcp_flag`] bits.
    pub flags: u8,
    /// A [`data_dir`] value: ingress (received by the socket) or egress (sent).
    pub direction: u8,
    /// `AF_INET` or `AF_INET6` (of the socket; IPv4-mapped addresses for v4 on a v6 socket).
    pub family: u16,
    /// Host byte order.
    pub local_port: u16,
    pub remote_port: u16,
    /// TCP acknowledgment number (valid with the ACK flag): the other direction's bytes before
    /// it reached this segment's sender, so any still missing were lost by the probe.
    pub ack: u32,
    /// Network byte order; IPv4 in the first 4 bytes.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// A segment record as the kernel assembles it in per-CPU scratch memory; only
/// `size_of::<SegmentHeader>() + captured` bytes are sent.
#[repr(C)]
pub struct SegmentScratch {
    pub header: SegmentHeader,
    pub data: [u8; MAX_PREFIX],
}

/// `Release` record: a socket of a cohort cgroup is gone (cgroup data path).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ReleaseEvent {
    pub header: EventHeader,
    pub cookie: u64,
}

/// The TLS library function a [`TlsHeader`] comes from.
pub mod tls_call {
    /// `SSL_read(ssl, buf, num)`: returns the bytes read.
    pub const READ: u8 = 1;
    /// `SSL_write(ssl, buf, num)`: returns the bytes written.
    pub const WRITE: u8 = 2;
    /// `SSL_read_ex(ssl, buf, num, *readbytes)`: returns 1, the count is in `*readbytes`.
    pub const READ_EX: u8 = 3;
    /// `SSL_write_ex(ssl, buf, num, *written)`.
    pub const WRITE_EX: u8 = 4;
    /// `SSL_do_handshake(ssl)`: no plaintext; its socket I/O ties the `SSL` to a connection.
    pub const HANDSHAKE: u8 = 5;
}

/// What [`TlsHeader::conn`] holds: the connection the TLS library's own socket I/O went to
/// during the call, seen by the data hooks on the same thread.
pub mod tls_conn {
    /// No socket I/O in the call (data served from the library's buffer, or a read on the
    /// cgroup path, where received segments are not seen in the reader's context).
    pub const NONE: u8 = 0;
    /// A file descriptor of the process (syscall path).
    pub const FD: u8 = 1;
    /// A socket cookie (cgroup path, from an egress segment sent by the calling thread).
    pub const COOKIE: u8 = 2;
}

/// A TLS call in flight, saved by the entry uprobe for the return uprobe (key: pid_tgid).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsCall {
    /// The `SSL *`: identifies the TLS session (a connection) within the process.
    pub ssl: u64,
    pub buf: u64,
    /// `_ex` forms: where the library stores the byte count.
    pub count_ptr: u64,
    /// Filled by the data hooks when the call moves bytes on a socket (see [`tls_conn`]).
    pub conn: u64,
    /// A [`tls_call`] value.
    pub call: u8,
    /// A [`tls_conn`] value.
    pub conn_kind: u8,
    /// Nested calls of the same thread (one TLS function calling another): only the
    /// outermost return reports.
    pub depth: u8,
    pub _pad: [u8; 5],
}

/// Header of a `Tls` record; `captured` plaintext bytes follow it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsHeader {
    pub header: EventHeader,
    pub ssl: u64,
    /// See [`tls_conn`].
    pub conn: u64,
    /// Exact plaintext bytes the call moved (0 for a handshake).
    pub len: u64,
    pub captured: u32,
    /// Thread id, for diagnostics.
    pub pid: u32,
    /// A [`data_dir`] value.
    pub direction: u8,
    /// A [`tls_conn`] value.
    pub conn_kind: u8,
    /// A [`tls_call`] value.
    pub call: u8,
    pub _pad: [u8; 5],
}

/// A TLS record as the kernel assembles it in per-CPU scratch memory (twice `MAX_PREFIX`, as
/// [`DataScratch`]).
#[repr(C)]
pub struct TlsScratch {
    pub header: TlsHeader,
    pub data: [u8; 2 * MAX_PREFIX],
}

/// Slots of the `SETTINGS` array map, which user space may change while the programs run.
pub mod setting {
    /// Connections sampled in, out of [`SAMPLE_SCALE`](super::SAMPLE_SCALE) (a hash of the
    /// socket decides, so whole connections are in or out).
    pub const SAMPLE: u32 = 0;
    /// Ring-buffer bytes waiting before a record wakes the reader (below: the reader's timer
    /// picks them up).
    pub const WAKE_BYTES: u32 = 1;
    /// Non-zero while TLS uprobes are attached anywhere: only then do the data hooks look up
    /// the TLS call table (an array read instead of a hash lookup per record otherwise).
    pub const TLS: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// Sampling scale: `SAMPLE` = `SAMPLE_SCALE` keeps every connection.
pub const SAMPLE_SCALE: u32 = 1024;

/// Whether a connection is sampled in, from a value that identifies it (socket cookie, or
/// tgid and fd). Shared so that user space can tell which connections the kernel skips.
#[inline(always)]
pub fn sampled_in(identity: u64, sample: u32) -> bool {
    sample >= SAMPLE_SCALE || ((identity.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32) < sample
}

/// A data record as the kernel assembles it in per-CPU scratch memory. Twice `MAX_PREFIX` long so
/// that a masked offset plus a bounded length always stays in bounds for the verifier; only
/// `size_of::<DataHeader>() + captured` bytes are sent.
#[repr(C)]
pub struct DataScratch {
    pub header: DataHeader,
    pub data: [u8; 2 * MAX_PREFIX],
}

/// Syscalls whose data the programs capture.
pub mod syscall {
    pub const READ: u8 = 1;
    pub const WRITE: u8 = 2;
    pub const READV: u8 = 3;
    pub const WRITEV: u8 = 4;
    pub const RECVFROM: u8 = 5;
    pub const SENDTO: u8 = 6;
    pub const RECVMSG: u8 = 7;
    pub const SENDMSG: u8 = 8;
    pub const SENDFILE: u8 = 9;
    pub const ACCEPT: u8 = 10;
    pub const CONNECT: u8 = 11;
}

/// Key of the tracked-socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the tracked-socket map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockInfo {
    pub cohort: u32,
    /// A [`conn_role`] value.
    pub role: u32,
    /// Last data-event sequence number given out for this socket.
    pub seq: u32,
    /// Reserved, 0.
    pub flags: u32,
}

/// Arguments a `sys_enter_*` program saves for its `sys_exit_*` program, keyed by pid_tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct CallArgs {
    /// Buffer (read/write family), iovec array (readv/writev/recvmsg/sendmsg) or sockaddr
    /// (accept/connect).
    pub ptr: u64,
    /// Number of iovecs, or 0.
    pub iovcnt: u64,
    pub fd: u32,
    pub cohort: u32,
    pub role: u32,
    /// A [`syscall`] value.
    pub syscall: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]` with only integer fields and explicit padding.
    unsafe impl aya::Pod for super::SockKey {}
    unsafe impl aya::Pod for super::SockInfo {}
    unsafe impl aya::Pod for super::CallArgs {}
}

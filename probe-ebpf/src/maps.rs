//! Maps shared by the programs. User space finds them by these names.

use core::ffi::c_void;

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::generated::{bpf_ringbuf_output, bpf_ringbuf_query},
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use probe_common::{
    CallArgs, ConnEvent, DataScratch, SAMPLE_SCALE, SegmentScratch, SockInfo, SockKey, TlsCall,
    TlsScratch, drop_reason, setting,
};

/// tgid -> cohort. Written by user space (rules) and by `sched_process_fork` (inheritance).
#[map]
pub static COHORT_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// cgroup v2 id -> cohort. Written by user space from cgroup-path rules.
#[map]
pub static COHORT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Tracked sockets of cohort processes. Also the data hooks' only filter: a miss here is all
/// a non-cohort process pays. LRU: an entry whose close was never seen (a process killed, an
/// fd inherited and dropped) ages out instead of filling the map.
#[map]
pub static SOCKETS: LruHashMap<SockKey, SockInfo> = LruHashMap::with_max_entries(65536, 0);

/// tgid -> the connection it accepted last, while it holds it: a prefork server (Postgres,
/// Apache prefork) forks a child right after each accept, and the child answers on it; the
/// fork hook gives the child its own entry, with the peer.
#[map]
pub static LAST_ACCEPT: HashMap<u32, ConnEvent> = HashMap::with_max_entries(16384, 0);

/// Arguments saved between `sys_enter_*` and `sys_exit_*` of one thread (key: pid_tgid).
#[map]
pub static CALLS: HashMap<u64, CallArgs> = HashMap::with_max_entries(16384, 0);

/// TLS calls in flight (key: pid_tgid), from the entry uprobe to the return uprobe. LRU: a
/// thread killed inside a call leaves an entry that ages out.
#[map]
pub static TLS_CALLS: LruHashMap<u64, TlsCall> = LruHashMap::with_max_entries(16384, 0);

/// Per-CPU scratch space for TLS plaintext records.
#[map]
pub static TLS_SCRATCH: PerCpuArray<TlsScratch> = PerCpuArray::with_max_entries(1, 0);

/// Events to user space. Resized by the loader from the configuration.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 23, 0);

/// Per-CPU drop counters, indexed by `probe_common::drop_reason`.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Per-CPU scratch space where a data record is assembled before it is copied to `EVENTS`.
#[map]
pub static SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

/// Per-CPU scratch space for segment records (cgroup data path).
#[map]
pub static SEGMENT_SCRATCH: PerCpuArray<SegmentScratch> = PerCpuArray::with_max_entries(1, 0);

/// Settings user space changes at run time, indexed by `probe_common::setting`.
#[map]
pub static SETTINGS: Array<u32> = Array::with_max_entries(setting::COUNT, 0);

/// Payload prefix in bytes, set by the loader (at most `MAX_PREFIX`).
#[unsafe(no_mangle)]
pub static PREFIX_LEN: Global<u32> = Global::new(probe_common::DEFAULT_PREFIX);

/// Counts one drop; never fails (a missing slot is impossible for an in-range index).
#[inline(always)]
pub fn count_drop(reason: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(reason) {
        // SAFETY: per-CPU slot, only this CPU writes it while this program runs.
        unsafe { *counter += 1 };
    }
}

/// A setting, or `default` before user space wrote it (0 means unset).
#[inline(always)]
pub fn setting(slot: u32, default: u32) -> u32 {
    match SETTINGS.get(slot).copied().unwrap_or(0) {
        0 => default,
        v => v,
    }
}

/// Connections sampled in, out of `SAMPLE_SCALE`.
#[inline(always)]
pub fn sample() -> u32 {
    setting(setting::SAMPLE, SAMPLE_SCALE)
}

/// Wake-up flag for a record: the reader is woken only once enough bytes wait (its timer
/// collects the rest), so a busy service does not pay one wake-up and context switch per
/// record.
#[inline(always)]
fn wake_flag() -> u64 {
    let threshold = setting(setting::WAKE_BYTES, 1) as u64;
    // SAFETY: query of our own ring buffer map.
    let waiting = unsafe {
        bpf_ringbuf_query(
            core::ptr::addr_of!(EVENTS) as *mut c_void,
            BPF_RB_AVAIL_DATA as u64,
        )
    };
    if waiting >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

/// Sends a process record (exec, fork, exit) and wakes the reader at once: an exec must be
/// matched against the cohort rules while the new program's environment is still intact
/// (nginx, for one, overwrites it with its process title).
#[inline(always)]
pub fn emit_now<T: 'static>(record: &T) {
    if EVENTS
        .output::<T>(record, BPF_RB_FORCE_WAKEUP as u64)
        .is_err()
    {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

/// Sends a fixed-size record; counts a drop when the ring buffer is full.
#[inline(always)]
pub fn emit<T: 'static>(record: &T) {
    if EVENTS.output::<T>(record, wake_flag()).is_err() {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

/// Sends the first `size` bytes at `record` (a scratch buffer); counts a drop when full.
#[inline(always)]
pub fn emit_bytes(record: *mut c_void, size: u64) {
    // SAFETY: `record` points into a map value at least `size` bytes long (callers bound it).
    let ret = unsafe {
        bpf_ringbuf_output(
            core::ptr::addr_of!(EVENTS) as *mut c_void,
            record,
            size,
            wake_flag(),
        )
    };
    if ret < 0 {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

//! Maps shared by the programs. User space finds them by these names.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, PerCpuArray, RingBuf},
};
use probe_common::{CallArgs, DataScratch, SockInfo, SockKey, drop_reason};

/// tgid -> cohort. Written by user space (rules) and by `sched_process_fork` (inheritance).
#[map]
pub static COHORT_TGIDS: HashMap<u32, u32> = HashMap::with_max_entries(65536, 0);

/// cgroup v2 id -> cohort. Written by user space from cgroup-path rules.
#[map]
pub static COHORT_CGROUPS: HashMap<u64, u32> = HashMap::with_max_entries(4096, 0);

/// Tracked sockets of cohort processes. Also the data hooks' only filter: a miss here is all
/// a non-cohort process pays.
#[map]
pub static SOCKETS: HashMap<SockKey, SockInfo> = HashMap::with_max_entries(65536, 0);

/// Arguments saved between `sys_enter_*` and `sys_exit_*` of one thread (key: pid_tgid).
#[map]
pub static CALLS: HashMap<u64, CallArgs> = HashMap::with_max_entries(16384, 0);

/// Events to user space. Resized by the loader from the configuration.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 23, 0);

/// Per-CPU drop counters, indexed by `probe_common::drop_reason`.
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_reason::COUNT, 0);

/// Per-CPU scratch space where a data record is assembled before it is copied to `EVENTS`.
#[map]
pub static SCRATCH: PerCpuArray<DataScratch> = PerCpuArray::with_max_entries(1, 0);

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

/// Sends a fixed-size record; counts a drop when the ring buffer is full.
#[inline(always)]
pub fn emit<T: 'static>(record: &T) {
    if EVENTS.output::<T>(record, 0).is_err() {
        count_drop(drop_reason::RINGBUF_FULL);
    }
}

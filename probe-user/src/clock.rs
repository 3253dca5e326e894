//! Kernel timestamps are CLOCK_MONOTONIC nanoseconds; events carry wall-clock times.

/// Converts monotonic nanoseconds to Unix nanoseconds with an offset taken once at start.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer; these clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

impl Clock {
    pub fn new() -> Self {
        Self {
            offset_ns: now_ns(libc::CLOCK_REALTIME) - now_ns(libc::CLOCK_MONOTONIC),
        }
    }

    /// Current monotonic time, on the kernel's clock.
    pub fn monotonic_now(&self) -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }

    pub fn unix_ns(&self, monotonic_ns: u64) -> u64 {
        (i128::from(monotonic_ns) + self.offset_ns).max(0) as u64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// RFC 3339 UTC with nanoseconds, e.g. `2026-11-23T09:30:00.123456789Z`.
pub fn rfc3339(unix_ns: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_nanos(unix_ns);
    humantime::format_rfc3339_nanos(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_795_426_200_123_456_789),
            "2026-11-23T09:30:00.123456789Z"
        );
    }

    #[test]
    fn converts_monotonic_to_wall_clock() {
        let c = Clock::new();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let ours = c.unix_ns(c.monotonic_now()) as i128;
        assert!((ours - wall).abs() < 1_000_000_000, "{ours} vs {wall}");
    }
}

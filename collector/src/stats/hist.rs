//! A mergeable log-bucketed latency histogram: the judge's state per (cohort, endpoint, second)
//! instead of raw events. Bucket `b` holds values in `[2^(b/128), 2^((b+1)/128))` ns, so any value
//! is known to within 0.54% of its bucket's edges. Bounds computed from it use the edge on the
//! safe side (a lower bound takes the lower edge, an upper bound the upper edge): the binning
//! error is folded into the bounds instead of ignored.

use serde::{Deserialize, Serialize};

/// Buckets per doubling.
pub const BUCKETS_PER_OCTAVE: f64 = 128.0;

/// The bucket of a duration in ns (0 ns counts as 1 ns).
pub fn bucket_of(ns: u64) -> i32 {
    ((ns.max(1) as f64).log2() * BUCKETS_PER_OCTAVE).floor() as i32
}

/// 2^(i/128) for i in 0..128: edges are a power of two times one of these (the judge reads
/// edges for every bucket of every second, so no `exp2` per call).
static FRACTIONS: std::sync::LazyLock<[f64; 128]> =
    std::sync::LazyLock::new(|| std::array::from_fn(|i| (i as f64 / BUCKETS_PER_OCTAVE).exp2()));

/// Smallest value of a bucket, ns.
pub fn lower_edge(b: i32) -> f64 {
    // 2^octave from its bits (normal range; buckets of real durations are far inside it).
    let octave = i64::from(b.div_euclid(128)).clamp(-1022, 1023);
    let power = f64::from_bits(((octave + 1023) as u64) << 52);
    FRACTIONS[b.rem_euclid(128) as usize] * power
}

/// Value just above a bucket's largest, ns.
pub fn upper_edge(b: i32) -> f64 {
    lower_edge(b + 1)
}

/// Sorted (bucket, count) pairs, no zero counts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogHist {
    bins: Vec<(i32, u64)>,
    total: u64,
}

impl LogHist {
    pub fn record(&mut self, ns: u64) {
        self.add_bucket(bucket_of(ns), 1);
    }

    /// Adds `count` values to bucket `b`.
    pub fn add_bucket(&mut self, b: i32, count: u64) {
        if count == 0 {
            return;
        }
        self.total += count;
        match self.bins.binary_search_by_key(&b, |&(k, _)| k) {
            Ok(i) => self.bins[i].1 += count,
            Err(i) => self.bins.insert(i, (b, count)),
        }
    }

    pub fn merge(&mut self, other: &LogHist) {
        if other.bins.is_empty() {
            return;
        }
        if self.bins.is_empty() {
            self.clone_from(other);
            return;
        }
        let mut out = Vec::with_capacity(self.bins.len() + other.bins.len());
        let (mut i, mut j) = (0, 0);
        let (a, b) = (&self.bins, &other.bins);
        while i < a.len() || j < b.len() {
            match (a.get(i), b.get(j)) {
                (Some(&x), Some(&y)) if x.0 == y.0 => {
                    out.push((x.0, x.1 + y.1));
                    i += 1;
                    j += 1;
                }
                (Some(&x), Some(&y)) if x.0 < y.0 => {
                    out.push(x);
                    i += 1;
                }
                (Some(_), Some(&y)) => {
                    out.push(y);
                    j += 1;
                }
                (Some(&x), None) => {
                    out.push(x);
                    i += 1;
                }
                (None, Some(&y)) => {
                    out.push(y);
                    j += 1;
                }
                (None, None) => break,
            }
        }
        self.bins = out;
        self.total += other.total;
    }

    pub fn total(&self) -> u64 {
        self.total
    }

    pub fn bins(&self) -> &[(i32, u64)] {
        &self.bins
    }

    /// The bucket holding the k-th smallest value (1-based); None outside 1..=total.
    pub fn bucket_of_rank(&self, k: u64) -> Option<i32> {
        if k == 0 || k > self.total {
            return None;
        }
        let mut seen = 0;
        for &(b, c) in &self.bins {
            seen += c;
            if seen >= k {
                return Some(b);
            }
        }
        None
    }

    /// Share of (canary, baseline) pairs with canary > (1 + tau) x baseline, bounded from below
    /// (`Side::Lower`: a pair counts only when it is sure whatever the values inside their
    /// buckets) or from above (`Side::Upper`: a pair counts when it could be).
    pub fn share_slower(canary: &LogHist, baseline: &LogHist, tau: f64, side: Side) -> f64 {
        if canary.total == 0 || baseline.total == 0 {
            return 0.5;
        }
        let factor = 1.0 + tau;
        // Baseline buckets in ascending order; for each canary bucket (ascending), count the
        // baseline values whose relevant edge times (1 + tau) lies below the canary's edge.
        let mut j = 0;
        let mut below = 0u64;
        let mut pairs = 0u128;
        for &(cb, cc) in &canary.bins {
            let c_edge = match side {
                Side::Lower => lower_edge(cb),
                Side::Upper => upper_edge(cb),
            };
            while j < baseline.bins.len() {
                let (bb, bc) = baseline.bins[j];
                let b_edge = match side {
                    Side::Lower => upper_edge(bb),
                    Side::Upper => lower_edge(bb),
                };
                let counts = match side {
                    // Sure: c >= lower(c) >= (1 + tau) upper(b) > (1 + tau) b.
                    Side::Lower => factor * b_edge <= c_edge,
                    // Possible: some c < upper(c) and b >= lower(b) have c > (1 + tau) b.
                    Side::Upper => factor * b_edge < c_edge,
                };
                if counts {
                    below += bc;
                    j += 1;
                } else {
                    break;
                }
            }
            pairs += u128::from(cc) * u128::from(below);
        }
        pairs as f64 / (canary.total as f64 * baseline.total as f64)
    }
}

/// Counts by rank, for bounds on quantiles: both histogram layouts answer it.
pub trait Ranked {
    fn total(&self) -> u64;
    /// The bucket holding the k-th smallest value (1-based); None outside 1..=total.
    fn bucket_of_rank(&self, k: u64) -> Option<i32>;

    /// The q-quantile's bucket midpoint in ns (for display; bounds use the edges).
    fn quantile(&self, q: f64) -> Option<f64> {
        let k = ((q * self.total() as f64).ceil() as u64).max(1);
        self.bucket_of_rank(k)
            .map(|b| (lower_edge(b) * upper_edge(b)).sqrt())
    }
}

impl Ranked for LogHist {
    fn total(&self) -> u64 {
        self.total
    }

    fn bucket_of_rank(&self, k: u64) -> Option<i32> {
        LogHist::bucket_of_rank(self, k)
    }
}

/// A cumulative histogram: dense counts over the buckets seen, so adding a second's sparse
/// `LogHist` costs the size of that second, not of everything so far.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DenseHist {
    offset: i32,
    counts: Vec<u64>,
    total: u64,
}

impl DenseHist {
    pub fn add(&mut self, h: &LogHist) {
        let (Some(&(first, _)), Some(&(last, _))) = (h.bins.first(), h.bins.last()) else {
            return;
        };
        if self.counts.is_empty() {
            self.offset = first;
        }
        if first < self.offset {
            let grow = (self.offset - first) as usize;
            self.counts.splice(0..0, std::iter::repeat_n(0, grow));
            self.offset = first;
        }
        let end = (last - self.offset) as usize + 1;
        if end > self.counts.len() {
            self.counts.resize(end, 0);
        }
        for &(b, c) in &h.bins {
            self.counts[(b - self.offset) as usize] += c;
        }
        self.total += h.total;
    }
}

impl Ranked for DenseHist {
    fn total(&self) -> u64 {
        self.total
    }

    fn bucket_of_rank(&self, k: u64) -> Option<i32> {
        if k == 0 || k > self.total {
            return None;
        }
        let mut seen = 0;
        for (i, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= k {
                return Some(self.offset + i as i32);
            }
        }
        None
    }
}

/// Which side of the binning error a figure is taken on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Lower,
    Upper,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges_are_exact_powers() {
        for b in [-300, -1, 0, 1, 127, 128, 129, 3000, 5000] {
            let exact = (f64::from(b) / BUCKETS_PER_OCTAVE).exp2();
            assert!((lower_edge(b) / exact - 1.0).abs() < 1e-12, "{b}");
        }
    }

    #[test]
    fn buckets_hold_their_values_within_half_a_percent() {
        for ns in [1u64, 2, 999, 1_000_000, 123_456_789, 60_000_000_000] {
            let b = bucket_of(ns);
            assert!(lower_edge(b) <= ns as f64 + 1e-6, "{ns}");
            assert!((ns as f64) < upper_edge(b) + 1e-6, "{ns}");
            assert!(upper_edge(b) / lower_edge(b) < 1.0055);
        }
        assert_eq!(bucket_of(0), bucket_of(1));
    }

    #[test]
    fn merge_equals_recording_everything() {
        let (mut a, mut b, mut all) = (LogHist::default(), LogHist::default(), LogHist::default());
        for i in 0..1000u64 {
            let v = (i * 7919) % 10_000 + 1;
            if i % 3 == 0 { &mut a } else { &mut b }.record(v);
            all.record(v);
        }
        let mut dense = DenseHist::default();
        dense.add(&b);
        dense.add(&a);
        a.merge(&b);
        assert_eq!(a, all);
        for k in [1, 2, 500, 999, 1000] {
            assert_eq!(dense.bucket_of_rank(k), all.bucket_of_rank(k), "{k}");
        }
        assert_eq!(dense.bucket_of_rank(1001), None);
        assert_eq!(a.total(), 1000);
        let median = all.quantile(0.5).unwrap();
        assert!((median / 5_000.0 - 1.0).abs() < 0.02, "{median}");
    }

    #[test]
    fn share_slower_brackets_the_exact_share() {
        let c: Vec<u64> = (1..=200).map(|i| i * 1000).collect();
        let b: Vec<u64> = (1..=100).map(|i| i * 1500).collect();
        let tau = 0.1;
        let exact = c
            .iter()
            .map(|&x| b.iter().filter(|&&y| x as f64 > 1.1 * y as f64).count())
            .sum::<usize>() as f64
            / (c.len() * b.len()) as f64;
        let (mut hc, mut hb) = (LogHist::default(), LogHist::default());
        c.iter().for_each(|&v| hc.record(v));
        b.iter().for_each(|&v| hb.record(v));
        let lo = LogHist::share_slower(&hc, &hb, tau, Side::Lower);
        let hi = LogHist::share_slower(&hc, &hb, tau, Side::Upper);
        assert!(lo <= exact && exact <= hi, "{lo} {exact} {hi}");
        assert!(hi - lo < 0.02, "{lo} {hi}");
    }
}

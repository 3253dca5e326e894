//! Time-uniform confidence sequences from a beta-binomial mixture (Howard & Ramdas, "Sequential
//! estimation of quantiles", Bernoulli 2022; the boundary of gostevehoward/confseq's
//! `beta_binomial_mixture_bound`). For S successes in n Bernoulli(p) trials,
//! M_n(p) = B(S + cp, n - S + c(1-p)) / B(cp, c(1-p)) / (p^S (1-p)^(n-S)) is a nonnegative
//! martingale with M_0 = 1, so P(exists n: M_n(p) >= 1/alpha) <= alpha (Ville). Hence:
//!
//! - a proportion: {p : M_n(p) < 1/alpha} holds the true p at every n with probability 1 - alpha;
//! - a quantile q_p: N = #{X_i <= q_p} is Binomial(n, p), so with probability 1 - alpha,
//!   s_lo(n) < N < s_hi(n) at every n, which brackets q_p between two order statistics.
//!
//! Bounds depend only on counts (mergeable state), and may be read after every batch.

use statrs::function::gamma::ln_gamma;

use super::hist::{Ranked, lower_edge, upper_edge};

fn ln_beta(a: f64, b: f64) -> f64 {
    ln_gamma(a) + ln_gamma(b) - ln_gamma(a + b)
}

/// Prior concentration: the mixture is tightest where the intrinsic time n p (1 - p) is near
/// 20, a compromise between early decisions and narrow late bounds.
fn concentration(p: f64) -> f64 {
    (20.0 / (p * (1.0 - p))).clamp(4.0, 1e8)
}

/// ln M_n(p) for `s` successes in `n` trials.
pub fn log_mixture(s: f64, n: f64, p: f64) -> f64 {
    let c = concentration(p);
    let (a, b) = (c * p, c * (1.0 - p));
    ln_beta(s + a, n - s + b) - ln_beta(a, b) - s * p.ln() - (n - s) * (1.0 - p).ln()
}

/// Bisection for the point in `[lo, hi]` where `f` crosses `target`, `f(lo) >= target > f(hi)`
/// or the reverse; to a relative precision of about 1e-12 of the bracket.
fn crossing(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64, target: f64) -> f64 {
    let rising = f(hi) >= f(lo);
    for _ in 0..40 {
        let mid = 0.5 * (lo + hi);
        if (f(mid) >= target) == rising {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    0.5 * (lo + hi)
}

/// The range of success counts consistent with p after n trials: (s_lo, s_hi), each None when
/// no count on that side is excluded yet.
pub fn count_bounds(n: u64, p: f64, alpha: f64) -> (Option<f64>, Option<f64>) {
    let n = n as f64;
    let t = (1.0 / alpha).ln();
    let f = |s: f64| log_mixture(s, n, p);
    let mid = n * p;
    // A bracket a few times wider than the normal approximation of the boundary: bisection
    // then needs few steps (this runs for every bound the judge reads).
    let width = 4.0 * (2.0 * (n + concentration(p)) * p * (1.0 - p) * (t + 10.0)).sqrt() + 10.0;
    let (near_lo, near_hi) = ((mid - width).max(0.0), (mid + width).min(n));
    let lo = if f(near_lo) >= t {
        Some(crossing(f, near_lo, mid, t))
    } else {
        (f(0.0) >= t).then(|| crossing(f, 0.0, near_lo, t))
    };
    let hi = if f(near_hi) >= t {
        Some(crossing(f, mid, near_hi, t))
    } else {
        (f(n) >= t).then(|| crossing(f, near_hi, n, t))
    };
    (lo, hi)
}

/// Time-uniform bounds (ns) on the p-quantile of the distribution a histogram samples, at level
/// `alpha` for both sides together; the bucket edges on the safe side fold the binning error in.
pub fn quantile_bounds(h: &impl Ranked, p: f64, alpha: f64) -> (Option<f64>, Option<f64>) {
    let n = h.total();
    if n == 0 {
        return (None, None);
    }
    let (s_lo, s_hi) = count_bounds(n, p, alpha);
    // N > s_lo: at least floor(s_lo) + 1 values are <= q_p, so X_(floor(s_lo)+1) <= q_p.
    let lower = s_lo
        .and_then(|s| h.bucket_of_rank(s.floor() as u64 + 1))
        .map(lower_edge);
    // N < s_hi: at most ceil(s_hi) - 1 values are <= q_p, so X_(ceil(s_hi)) > q_p.
    let upper = s_hi
        .and_then(|s| h.bucket_of_rank((s.ceil() as u64).max(1)))
        .map(upper_edge);
    (lower, upper)
}

/// Time-uniform confidence interval for a proportion after `s` successes in `n` trials.
pub fn proportion_bounds(s: u64, n: u64, alpha: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let (sf, nf) = (s as f64, n as f64);
    let t = (1.0 / alpha).ln();
    let hat = (sf / nf).clamp(1e-12, 1.0 - 1e-12);
    let f = |p: f64| log_mixture(sf, nf, p);
    let upper = if s == n || f(1.0 - 1e-12) < t {
        1.0
    } else {
        crossing(f, hat, 1.0 - 1e-12, t)
    };
    (proportion_lower(s, n, alpha), upper)
}

/// The lower end of `proportion_bounds` alone (half the root finding).
pub fn proportion_lower(s: u64, n: u64, alpha: f64) -> f64 {
    if n == 0 || s == 0 {
        return 0.0;
    }
    let (sf, nf) = (s as f64, n as f64);
    let t = (1.0 / alpha).ln();
    let hat = (sf / nf).clamp(1e-12, 1.0 - 1e-12);
    let f = |p: f64| log_mixture(sf, nf, p);
    if f(1e-12) < t {
        0.0
    } else {
        crossing(f, 1e-12, hat, t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{
        hist::LogHist,
        sim::{Rng, Shape},
    };

    #[test]
    fn the_mixture_is_one_at_the_start_and_small_near_the_truth() {
        assert!(log_mixture(0.0, 0.0, 0.3).abs() < 1e-9);
        assert!(log_mixture(300.0, 1000.0, 0.3) < 0.0);
        assert!(log_mixture(500.0, 1000.0, 0.3) > 20.0);
    }

    #[test]
    fn proportion_bounds_cover_and_shrink() {
        let (lo, hi) = proportion_bounds(100, 10_000, 0.01);
        assert!(lo < 0.01 && 0.01 < hi, "{lo} {hi}");
        assert!(hi - lo < 0.01, "{lo} {hi}");
        let (lo, hi) = proportion_bounds(0, 10_000, 0.01);
        assert_eq!(lo, 0.0);
        assert!(hi < 0.002, "{hi}");
        let (lo, hi) = proportion_bounds(0, 0, 0.01);
        assert_eq!((lo, hi), (0.0, 1.0));
    }

    /// Watched after every value, the p99 bounds of a stream hold the true p99 at every time in
    /// (nearly) all runs: the guarantee is time-uniform, not per look.
    #[test]
    fn quantile_bounds_hold_at_every_look() {
        let mut rng = Rng::new(9);
        let p = 0.9;
        // Log-normal(0, 0.5) around 10 ms: true p90 = 10 ms * exp(0.5 * 1.2816).
        let truth = 10e6 * (0.5f64 * 1.281_551_565_545).exp();
        let mut misses = 0;
        for _ in 0..100 {
            let mut h = LogHist::default();
            let mut missed = false;
            for i in 0..5_000 {
                h.record(Shape::LogNormal.sample(&mut rng, 10.0) as u64);
                if i % 50 == 0 {
                    let (lo, hi) = quantile_bounds(&h, p, 0.05);
                    missed |= lo.is_some_and(|l| l > truth) || hi.is_some_and(|u| u < truth);
                }
            }
            misses += usize::from(missed);
            let (lo, hi) = quantile_bounds(&h, p, 0.05);
            let (lo, hi) = (lo.unwrap(), hi.unwrap());
            assert!(hi / lo < 1.25, "{lo} {hi}");
        }
        assert!(misses <= 6, "{misses} of 100 runs left the bounds");
    }
}

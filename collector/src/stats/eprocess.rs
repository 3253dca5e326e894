//! Anytime-valid tests by betting (Waudby-Smith & Ramdas 2023; STATISTICS.md): a wealth process
//! E_t = prod (1 + lambda_i (x_i - m)) that is a non-negative supermartingale under the null, so
//! by Ville's inequality P(sup_t E_t >= 1/alpha) <= alpha: the verdict may be read after every
//! observation without inflating false alarms.

/// Which way the evidence must point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Evidence that the mean is above `m` (null: mean <= m).
    Above,
    /// Evidence that the mean is below `m` (null: mean >= m).
    Below,
}

/// A betting e-process for the mean of bounded observations in `[lo, hi]`, with the bet size
/// chosen by aGRAPA (approximate growth-rate adaptive) from past observations only.
#[derive(Clone, Debug)]
pub struct MeanTest {
    m: f64,
    lo: f64,
    hi: f64,
    direction: Direction,
    n: u64,
    sum: f64,
    sum_sq: f64,
    log_wealth: f64,
    max_log_wealth: f64,
}

/// Largest fraction of the ruin-free bet ever placed; below 1 so one observation can never
/// take the wealth to zero.
const MAX_BET: f64 = 0.5;

/// ln(1e300): larger e-values are reported as 1e300 (the decision uses the exact log).
const MAX_LOG_E: f64 = 690.775_527_898_213_7;

impl MeanTest {
    /// Tests the mean of observations in `[lo, hi]` against `m` (lo < m < hi).
    pub fn new(m: f64, lo: f64, hi: f64, direction: Direction) -> Self {
        Self {
            m,
            lo,
            hi,
            direction,
            n: 0,
            sum: 0.0,
            sum_sq: 0.0,
            log_wealth: 0.0,
            max_log_wealth: 0.0,
        }
    }

    /// Signed payoff of one observation: positive when it supports the alternative.
    fn payoff(&self, x: f64) -> f64 {
        match self.direction {
            Direction::Above => x - self.m,
            Direction::Below => self.m - x,
        }
    }

    /// Bet for the next observation, from the past only (predictable).
    fn bet(&self) -> f64 {
        let n = self.n as f64;
        // Estimates shrunk towards the null so the first bets are small.
        let mean = (self.sum + self.m) / (n + 1.0);
        let var = ((self.sum_sq + self.m * self.m) / (n + 1.0) - mean * mean).max(1e-6);
        let edge = match self.direction {
            Direction::Above => mean - self.m,
            Direction::Below => self.m - mean,
        };
        // Worst loss per unit bet: how far an observation can go against the alternative.
        let worst = match self.direction {
            Direction::Above => self.m - self.lo,
            Direction::Below => self.hi - self.m,
        };
        (edge / (var + edge * edge)).clamp(0.0, MAX_BET / worst)
    }

    /// Adds one observation (clamped to the bounds; NaN ignored).
    pub fn observe(&mut self, x: f64) {
        if x.is_nan() {
            return;
        }
        let x = x.clamp(self.lo, self.hi);
        let lambda = self.bet();
        self.log_wealth += (1.0 + lambda * self.payoff(x)).ln();
        self.max_log_wealth = self.max_log_wealth.max(self.log_wealth);
        self.n += 1;
        self.sum += x;
        self.sum_sq += x * x;
    }

    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }

    /// The current e-value (capped at 1e300 so it stays a finite number in JSON).
    pub fn e_value(&self) -> f64 {
        self.log_wealth.min(MAX_LOG_E).exp()
    }

    /// The largest e-value so far: crossing 1/alpha at any time is the (valid) rejection.
    pub fn max_e_value(&self) -> f64 {
        self.max_log_wealth.min(MAX_LOG_E).exp()
    }

    /// Whether the null has been rejected at level `alpha` at some time so far.
    pub fn rejected(&self, alpha: f64) -> bool {
        self.max_log_wealth >= (1.0 / alpha).ln()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stats::sim::Rng;

    #[test]
    fn a_fair_coin_rarely_crosses_and_a_biased_one_does() {
        let alpha = 0.05;
        let mut false_rejections = 0;
        let mut rng = Rng::new(1);
        for _ in 0..400 {
            let mut t = MeanTest::new(0.5, 0.0, 1.0, Direction::Above);
            for _ in 0..2_000 {
                t.observe(f64::from(u8::from(rng.uniform() < 0.5)));
            }
            false_rejections += usize::from(t.rejected(alpha));
        }
        // Ville: at most alpha (20 of 400) in expectation, whatever the stopping; allow noise.
        assert!(false_rejections <= 32, "{false_rejections} of 400");
        let mut t = MeanTest::new(0.5, 0.0, 1.0, Direction::Above);
        let mut at = None;
        for i in 0..5_000 {
            t.observe(f64::from(u8::from(rng.uniform() < 0.6)));
            if at.is_none() && t.rejected(alpha) {
                at = Some(i);
            }
        }
        assert!(at.is_some_and(|i| i < 1_500), "{at:?}");
        // The other direction never finds evidence for a mean below 0.5.
        let mut below = MeanTest::new(0.5, 0.0, 1.0, Direction::Below);
        for _ in 0..5_000 {
            below.observe(f64::from(u8::from(rng.uniform() < 0.6)));
        }
        assert!(!below.rejected(alpha), "{}", below.max_e_value());
    }

    #[test]
    fn wealth_never_goes_negative_at_the_bounds() {
        let mut t = MeanTest::new(0.01, -1.0, 1.0, Direction::Above);
        for i in 0..1_000 {
            t.observe(if i % 2 == 0 { 1.0 } else { -1.0 });
            assert!(t.e_value().is_finite() && t.e_value() > 0.0);
        }
        // Out-of-range input is clamped, never a NaN.
        t.observe(f64::INFINITY);
        t.observe(-7.0);
        t.observe(f64::NAN);
        assert!(t.e_value().is_finite());
        // Overwhelming evidence stays a finite number.
        let mut sure = MeanTest::new(0.5, 0.0, 1.0, Direction::Above);
        for _ in 0..100_000 {
            sure.observe(1.0);
        }
        assert!(sure.max_e_value().is_finite() && sure.max_e_value() >= 1e299);
    }
}

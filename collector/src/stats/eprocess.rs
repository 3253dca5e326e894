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

/// ln(1e300): larger e-values are reported as 1e300 (the decision uses the exact log).
const MAX_LOG_E: f64 = 690.775_527_898_213_7;

/// The log-wealth of a test and its running maximum: crossing 1/alpha at any time so far is the
/// (valid) rejection.
#[derive(Clone, Debug, Default)]
struct Wealth {
    log: f64,
    max_log: f64,
}

impl Wealth {
    fn gain(&mut self, log_factor: f64) {
        self.log += log_factor;
        self.max_log = self.max_log.max(self.log);
    }

    /// The largest e-value so far (capped at 1e300 so it stays a finite number in JSON).
    fn max_e_value(&self) -> f64 {
        self.max_log.min(MAX_LOG_E).exp()
    }

    fn rejected(&self, alpha: f64) -> bool {
        self.max_log >= (1.0 / alpha).ln()
    }
}

/// Counted events (errors, requests) split between canary and baseline: under the null each one
/// is the canary's with probability at most `theta0` (`Direction::Above`: harm is a larger
/// share) or at least `theta0` (`Direction::Below`). Lindon, Sanden & Shirikian (KDD 2022) test
/// errors this way, conditioning on the total count, which keeps the power at low base rates.
/// `theta0` may change from batch to batch (the canary's share of the traffic in that second),
/// so drift in the split does not look like harm. Each batch multiplies the wealth by the
/// likelihood ratio of a predictable alternative `theta1` against `theta0`:
/// E[theta1/theta0 if canary else (1-theta1)/(1-theta0)] <= 1 under the null.
#[derive(Clone, Debug)]
pub struct ShareTest {
    direction: Direction,
    wealth: Wealth,
}

impl ShareTest {
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            wealth: Wealth::default(),
        }
    }

    /// Adds `canary` and `baseline` events counted under `theta0`, betting on `theta1` (chosen
    /// from earlier batches only). A `theta1` on the null's side of `theta0` bets nothing.
    pub fn observe(&mut self, canary: u64, baseline: u64, theta0: f64, theta1: f64) {
        if canary + baseline == 0 || !(theta0 > 0.0 && theta0 < 1.0) || theta1.is_nan() {
            return;
        }
        let theta1 = match self.direction {
            Direction::Above => theta1.clamp(theta0, 1.0 - 1e-9),
            Direction::Below => theta1.clamp(1e-9, theta0),
        };
        // Half way to the estimate: a wrong early estimate costs little.
        let theta1 = 0.5 * (theta0 + theta1);
        self.wealth.gain(
            canary as f64 * (theta1 / theta0).ln()
                + baseline as f64 * ((1.0 - theta1) / (1.0 - theta0)).ln(),
        );
    }

    pub fn max_e_value(&self) -> f64 {
        self.wealth.max_e_value()
    }

    pub fn rejected(&self, alpha: f64) -> bool {
        self.wealth.rejected(alpha)
    }
}

/// The probability of superiority per second: X_t in [0, 1] is the share of that second's
/// (canary, baseline) pairs where the canary is slower beyond tolerance, a two-sample U-statistic
/// whose mean is P(canary > (1 + tau) baseline). Hoeffding (1963): X_t - E[X_t] is sub-Gaussian
/// with variance factor 1/(4k), k = min(canary, baseline requests) of the second, so
/// exp(lambda (X_t - 1/2) - lambda^2 / (8k)) is an e-value when E[X_t] <= 1/2 (`Above`) and the
/// product over seconds, with lambda chosen from earlier seconds, an e-process. A busy second
/// counts for as much evidence as it holds, not as one observation.
#[derive(Clone, Debug)]
pub struct SuperiorityTest {
    direction: Direction,
    wealth: Wealth,
    /// Sum over past seconds of k (X - 1/2), and of k.
    weighted_edge: f64,
    weight: f64,
}

/// Pseudo-pairs of the null (edge 0) the edge estimate starts from.
const EDGE_PRIOR: f64 = 50.0;

impl SuperiorityTest {
    pub fn new(direction: Direction) -> Self {
        Self {
            direction,
            wealth: Wealth::default(),
            weighted_edge: 0.0,
            weight: 0.0,
        }
    }

    /// Adds one second: `x` the share of slower pairs, `k` min(canary, baseline) requests.
    pub fn observe(&mut self, x: f64, k: f64) {
        if x.is_nan() || k < 1.0 {
            return;
        }
        let x = x.clamp(0.0, 1.0);
        let sign = match self.direction {
            Direction::Above => 1.0,
            Direction::Below => -1.0,
        };
        let edge = (sign * self.weighted_edge / (self.weight + EDGE_PRIOR)).clamp(0.0, 0.5);
        // The growth-optimal lambda for an edge e at variance factor 1/(4k) is 4 k e.
        let lambda = 4.0 * k * edge;
        self.wealth
            .gain(lambda * sign * (x - 0.5) - lambda * lambda / (8.0 * k));
        self.weighted_edge += k * (x - 0.5);
        self.weight += k;
    }

    /// Weighted mean of X so far.
    pub fn mean(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| 0.5 + self.weighted_edge / self.weight)
    }

    pub fn max_e_value(&self) -> f64 {
        self.wealth.max_e_value()
    }

    pub fn rejected(&self, alpha: f64) -> bool {
        self.wealth.rejected(alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::stats::sim::Rng;

    #[test]
    fn share_test_holds_alpha_under_drift_and_finds_a_doubled_rate() {
        let mut rng = Rng::new(7);
        let alpha = 0.05;
        let mut false_rejections = 0;
        for _ in 0..300 {
            let mut t = ShareTest::new(Direction::Above);
            let (mut ce, mut cn, mut be, mut bn) = (0u64, 0u64, 0u64, 0u64);
            for second in 0..200 {
                // The canary's share drifts between 10% and 40%; same error rate (2%).
                let share = 0.1 + 0.3 * f64::from(second % 50) / 50.0;
                let (mut c, mut b, mut nc) = (0, 0, 0);
                for _ in 0..100 {
                    let canary = rng.uniform() < share;
                    nc += u64::from(canary);
                    if rng.uniform() < 0.02 {
                        if canary { c += 1 } else { b += 1 }
                    }
                }
                let rho = nc as f64 / 100.0;
                let theta0 = rho / (rho + (1.0 - rho));
                let ratio = ((ce as f64 + 0.5) / (cn as f64 + 1.0))
                    / ((be as f64 + 0.5) / (bn as f64 + 1.0));
                let theta1 = rho * ratio / (rho * ratio + 1.0 - rho);
                t.observe(c, b, theta0, theta1);
                ce += c;
                be += b;
                cn += nc;
                bn += 100 - nc;
            }
            false_rejections += usize::from(t.rejected(alpha));
        }
        assert!(false_rejections <= 27, "{false_rejections} of 300");
        // All errors from the canary at a fixed 50% share: rejected after a dozen.
        let mut t = ShareTest::new(Direction::Above);
        let mut at = None;
        for i in 0..100 {
            t.observe(1, 0, 0.5, 0.9);
            if at.is_none() && t.rejected(alpha) {
                at = Some(i);
            }
        }
        assert!(at.is_some_and(|i| i < 20), "{at:?}");
    }

    #[test]
    fn superiority_test_is_valid_at_any_second_size_and_finds_a_shift() {
        let mut rng = Rng::new(11);
        let alpha = 0.05;
        let mut false_rejections = 0;
        for _ in 0..300 {
            let mut t = SuperiorityTest::new(Direction::Above);
            for second in 0..100 {
                let k = [2usize, 20, 200][second % 3];
                // A/A: the exact share of pairs with c > b.
                let c: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
                let b: Vec<f64> = (0..k).map(|_| rng.normal()).collect();
                let x = c
                    .iter()
                    .map(|x| b.iter().filter(|y| x > *y).count())
                    .sum::<usize>() as f64
                    / (k * k) as f64;
                t.observe(x, k as f64);
            }
            false_rejections += usize::from(t.rejected(alpha));
        }
        assert!(false_rejections <= 27, "{false_rejections} of 300");
        let mut t = SuperiorityTest::new(Direction::Above);
        for _ in 0..50 {
            t.observe(0.6, 100.0);
        }
        assert!(t.rejected(alpha), "{}", t.max_e_value());
        assert!(!SuperiorityTest::new(Direction::Below).rejected(alpha));
    }

    #[test]
    fn overwhelming_evidence_stays_a_finite_e_value() {
        let mut t = ShareTest::new(Direction::Above);
        for _ in 0..100_000 {
            t.observe(1, 0, 0.5, 0.99);
        }
        assert!(t.max_e_value().is_finite() && t.max_e_value() >= 1e299);
        assert!(t.rejected(1e-12));
    }
}

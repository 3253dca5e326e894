//! Seeded random numbers and latency shapes for the statistics' tests and the verdict bench
//! (`cargo xtask bench verdict`): deterministic, so every figure can be reproduced.

/// SplitMix64: small, fast, and good enough for simulation (not for secrets).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }
}

/// Latency distributions seen in practice.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    /// Log-normal around a median, sigma 0.5.
    LogNormal,
    /// 90% fast (cache hits), 10% ten times slower.
    Bimodal,
    /// Pareto tail (alpha 1.5): rare requests hundreds of times the median.
    HeavyTail,
    /// Log-normal rounded to whole milliseconds: many ties.
    Tied,
}

impl Shape {
    pub const ALL: [Shape; 4] = [
        Shape::LogNormal,
        Shape::Bimodal,
        Shape::HeavyTail,
        Shape::Tied,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Shape::LogNormal => "log-normal",
            Shape::Bimodal => "bimodal",
            Shape::HeavyTail => "heavy tail",
            Shape::Tied => "tied (1 ms)",
        }
    }

    /// One latency in nanoseconds around `median_ms`.
    pub fn sample(self, rng: &mut Rng, median_ms: f64) -> f64 {
        let ms = match self {
            Shape::LogNormal => median_ms * (0.5 * rng.normal()).exp(),
            Shape::Bimodal => {
                let base = median_ms * (0.3 * rng.normal()).exp();
                if rng.uniform() < 0.1 {
                    base * 10.0
                } else {
                    base
                }
            }
            Shape::HeavyTail => median_ms * 0.63 / (1.0 - rng.uniform()).powf(1.0 / 1.5),
            Shape::Tied => (median_ms * (0.5 * rng.normal()).exp()).round().max(1.0),
        };
        ms * 1e6
    }
}

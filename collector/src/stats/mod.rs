//! Statistics as pure functions over numbers, each with its own tests: `hist` (the mergeable
//! latency histogram the judge keeps instead of raw events), `confseq` (time-uniform confidence
//! sequences for quantiles and proportions), `eprocess` (anytime-valid tests by betting, safe
//! to read after every batch) and `rank` (fixed-horizon Mann-Whitney U and Hodges-Lehmann,
//! Kayenta-compatible, for reference). `verdict` combines them per experiment.

pub mod confseq;
pub mod eprocess;
pub mod hist;
pub mod rank;
pub mod sim;

/// The quantile a name like `p50`, `p99`, `p999` (99.9%) or `p5` (5%) stands for.
pub fn quantile_from_name(name: &str) -> Option<f64> {
    let digits = name.strip_prefix('p')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: f64 = digits.parse().ok()?;
    let q = if digits.len() <= 2 {
        n / 100.0
    } else if digits.starts_with("99") {
        n / 10f64.powi(digits.len() as i32)
    } else {
        return None;
    };
    (q > 0.0 && q < 1.0).then_some(q)
}

#[cfg(test)]
mod tests {
    #[test]
    fn quantile_names() {
        let q = super::quantile_from_name;
        assert_eq!(q("p50"), Some(0.5));
        assert_eq!(q("p99"), Some(0.99));
        assert_eq!(q("p999"), Some(0.999));
        assert_eq!(q("p5"), Some(0.05));
        assert_eq!(q("p100"), None);
        assert_eq!(q("p0"), None);
        assert_eq!(q("latency"), None);
        assert_eq!(q("p9x"), None);
    }
}

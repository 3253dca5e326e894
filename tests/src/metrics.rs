//! Reading Prometheus text expositions in tests.

use anyhow::{Context as _, Result};

/// GET a `/metrics` page.
pub fn scrape(url: &str) -> Result<String> {
    Ok(ureq::get(url)
        .call()
        .with_context(|| format!("GET {url}"))?
        .body_mut()
        .read_to_string()?)
}

/// The value of one series (`name{labels}` exactly as exposed), or an error showing the page.
pub fn sample(text: &str, series: &str) -> Result<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .with_context(|| format!("no {series} in:\n{text}"))
}

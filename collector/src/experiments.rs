//! Experiments configured in the collector (`bakeoff serve --experiments FILE`): each names a
//! baseline and one or more canaries with their judge settings. The collector re-judges them
//! periodically, keeps the latest verdicts (`GET /api/v1/experiments/verdicts`), and POSTs the
//! verdict to the experiment's webhook the first time a canary fails.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::{Deserialize, Serialize};

use crate::{
    live::{Live, VerdictError, VerdictRequest},
    verdict::{Decision, JudgeConfig, Verdict},
};

/// One experiment.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Experiment {
    pub name: String,
    #[serde(default = "default_baseline")]
    pub baseline: String,
    pub canaries: Vec<String>,
    /// POSTed the verdict (JSON) when a canary first fails.
    #[serde(default)]
    pub webhook: Option<String>,
    /// Only requests that started at or after this time (Unix ns).
    #[serde(default)]
    pub since_unix_ns: Option<u64>,
    #[serde(default)]
    pub judge: JudgeConfig,
}

fn default_baseline() -> String {
    "baseline".into()
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExperimentsFile {
    pub experiments: Vec<Experiment>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl ExperimentsFile {
    /// Reads and validates a YAML file.
    pub fn load(path: &Path) -> Result<Self, ExperimentsError> {
        let text = std::fs::read_to_string(path).map_err(|source| ExperimentsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let invalid = |message: String| ExperimentsError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let file: Self = serde_yaml_ng::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        for (i, e) in file.experiments.iter().enumerate() {
            let at = |m: String| invalid(format!("experiments[{i}] ({}): {m}", e.name));
            if e.name.is_empty() {
                return Err(at("name is empty".into()));
            }
            if e.canaries.is_empty() {
                return Err(at("no canaries".into()));
            }
            if e.canaries.contains(&e.baseline) {
                return Err(at(format!("`{}` is both baseline and canary", e.baseline)));
            }
            if let Some(w) = &e.webhook
                && !(w.starts_with("http://") || w.starts_with("https://"))
            {
                return Err(at(format!("webhook `{w}` must be an http(s) URL")));
            }
            e.judge.validate().map_err(|err| at(err.to_string()))?;
        }
        Ok(file)
    }
}

/// The latest verdict of each (experiment, canary), and webhook counters.
#[derive(Debug, Default)]
pub struct Verdicts {
    pub latest: Mutex<BTreeMap<(String, String), Verdict>>,
    pub webhooks_sent: AtomicU64,
    pub webhooks_failed: AtomicU64,
}

/// The body POSTed to a webhook.
#[derive(Debug, Serialize)]
struct Notice<'a> {
    experiment: &'a str,
    baseline: &'a str,
    canary: &'a str,
    #[serde(flatten)]
    verdict: &'a Verdict,
}

/// POSTs `body` with up to 3 tries; true when the receiver answered 2xx.
fn post(url: &str, body: &serde_json::Value) -> bool {
    for attempt in 0..3u32 {
        let ok = ureq::post(url)
            .config()
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .send_json(body)
            .is_ok();
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200 << attempt));
    }
    false
}

/// Judges every configured experiment once; notifies new failures. Blocking (the drill-down of
/// a failing canary reads raw events).
pub fn evaluate(
    live: &Live,
    experiments: &[Experiment],
    verdicts: &Verdicts,
) -> Result<(), VerdictError> {
    for e in experiments {
        for canary in &e.canaries {
            let request = VerdictRequest {
                experiment: e.name.clone(),
                baseline: e.baseline.clone(),
                canary: canary.clone(),
                since_unix_ns: e.since_unix_ns,
                overrides: Default::default(),
            };
            let v = match live.verdict(&e.judge, &request) {
                Ok(v) => v,
                Err(VerdictError::NotFound(why)) => {
                    tracing::debug!(experiment = e.name, canary, why, "nothing to judge yet");
                    continue;
                }
                Err(other) => return Err(other),
            };
            let key = (e.name.clone(), canary.clone());
            let was_failing = verdicts
                .latest
                .lock()
                .ok()
                .and_then(|m| m.get(&key).map(|old| old.decision == Decision::Fail))
                .unwrap_or(false);
            if v.decision == Decision::Fail && !was_failing {
                tracing::warn!(experiment = e.name, canary, reasons = ?v.reasons, "canary FAILS");
                if let Some(url) = &e.webhook {
                    let notice = Notice {
                        experiment: &e.name,
                        baseline: &e.baseline,
                        canary,
                        verdict: &v,
                    };
                    let body = serde_json::to_value(&notice).unwrap_or_default();
                    let counter = if post(url, &body) {
                        &verdicts.webhooks_sent
                    } else {
                        tracing::error!(url, "webhook unreachable after 3 tries");
                        &verdicts.webhooks_failed
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            if let Ok(mut m) = verdicts.latest.lock() {
                m.insert(key, v);
            }
        }
    }
    Ok(())
}

/// Re-judges every `every` until the runtime stops.
pub async fn run(
    live: Arc<Live>,
    experiments: Arc<Vec<Experiment>>,
    verdicts: Arc<Verdicts>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let (live, experiments, verdicts) = (live.clone(), experiments.clone(), verdicts.clone());
        match tokio::task::spawn_blocking(move || evaluate(&live, &experiments, &verdicts)).await {
            Ok(Err(e)) => tracing::warn!(error = %e, "experiment evaluation failed"),
            Err(e) => tracing::warn!(error = %e, "experiment evaluation panicked"),
            Ok(Ok(())) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<ExperimentsFile, ExperimentsError> {
        let path = std::env::temp_dir().join(format!(
            "bakeoff-experiments-{}-{}.yaml",
            std::process::id(),
            text.len()
        ));
        std::fs::write(&path, text).unwrap();
        let r = ExperimentsFile::load(&path);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn a_file_loads_with_defaults_and_bad_ones_are_named() {
        let f = load(
            "experiments:\n  - name: checkout\n    canaries: [canary, canary-eu]\n    webhook: http://hooks/x\n    judge: { alpha: 0.01 }\n",
        )
        .unwrap();
        let e = &f.experiments[0];
        assert_eq!(e.baseline, "baseline");
        assert_eq!(e.canaries, ["canary", "canary-eu"]);
        assert_eq!(e.judge.alpha, 0.01);
        assert_eq!(e.judge.min_requests, JudgeConfig::default().min_requests);
        let f = load(
            "experiments:\n  - name: c\n    canaries: [canary]\n    judge:\n      split: 0.1\n      quantiles: [{ quantile: 0.999, tolerance: 0.5 }]\n",
        )
        .unwrap();
        let j = &f.experiments[0].judge;
        assert_eq!(j.split, Some(0.1));
        assert_eq!(j.quantiles.len(), 1);
        assert_eq!(j.quantiles[0].name(), "p999");
        for (bad, needle) in [
            (
                "experiments:\n  - name: x\n    canaries: []\n",
                "no canaries",
            ),
            (
                "experiments:\n  - name: x\n    canaries: [baseline]\n",
                "both baseline and canary",
            ),
            (
                "experiments:\n  - name: x\n    canaries: [c]\n    judge: { alpha: 3 }\n",
                "alpha",
            ),
            (
                "experiments:\n  - name: x\n    canaries: [c]\n    webhook: ftp://x\n",
                "webhook",
            ),
            (
                "experiments:\n  - name: x\n    canaries: [c]\n    judge: { split: 1.5 }\n",
                "split",
            ),
            (
                "experiments:\n  - name: x\n    canaries: [c]\n    judge: { quantiles: [{ quantile: 2, tolerance: 0.1 }] }\n",
                "quantiles",
            ),
            (
                "experiments:\n  - name: x\n    canary: [c]\n",
                "unknown field",
            ),
        ] {
            let err = load(bad).unwrap_err().to_string();
            assert!(err.contains(needle), "{bad:?}: {err}");
        }
    }
}

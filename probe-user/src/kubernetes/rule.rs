//! Which pods a Kubernetes cohort rule takes: pure functions over what the API says of a pod,
//! so they are tested without an API server.

use std::collections::{BTreeMap, HashMap};

use crate::config::KubeSelector;

/// The label a pod can carry to name its cohort itself.
pub const COHORT_LABEL: &str = "bakeoff.io/cohort";
/// The label Argo Rollouts puts on a rollout's pods: the hash of their pod template.
pub const ROLLOUT_HASH_LABEL: &str = "rollouts-pod-template-hash";
/// The label Deployments put on their pods.
pub const POD_TEMPLATE_HASH_LABEL: &str = "pod-template-hash";

/// What the probe needs to know of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The ReplicaSet that owns the pod, if one does.
    pub replica_set: Option<String>,
    /// (container name, runtime container id without the `containerd://` scheme).
    pub containers: Vec<(String, String)>,
}

/// What an Argo Rollout's status says of its pod template hashes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RolloutHashes {
    /// `status.stableRS`.
    pub stable: Option<String>,
    /// `status.currentPodHash`.
    pub current: Option<String>,
}

/// Rollouts by (namespace, name).
pub type Rollouts = HashMap<(String, String), RolloutHashes>;

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    Absent(String),
}

impl Requirement {
    fn holds(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::Absent(k) => !labels.contains_key(k),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Matcher {
    Labels(Vec<Requirement>),
    Rollout { name: String, canary: bool },
    Flagger { name: String, primary: bool },
    CohortLabel(String),
}

/// A compiled `kubernetes:` cohort rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRule {
    namespace: Option<String>,
    matcher: Matcher,
}

/// Parses an equality-based label selector (`a=b,c!=d,e,!f`).
fn parse_selector(selector: &str) -> Result<Vec<Requirement>, String> {
    let key = |k: &str| -> Result<String, String> {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(format!("bad label key `{k}` in selector `{selector}`"));
        }
        Ok(k.to_string())
    };
    selector
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|part| {
            if let Some((k, v)) = part.split_once("!=") {
                Ok(Requirement::NotEquals(key(k)?, v.trim().to_string()))
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                Ok(Requirement::Equals(key(k)?, v.trim().to_string()))
            } else if let Some(k) = part.strip_prefix('!') {
                Ok(Requirement::Absent(key(k)?))
            } else if part.contains(" in ") || part.contains(" notin ") {
                Err(format!(
                    "set-based selectors (`{part}`) are not supported: use `=`, `!=`, `key` or `!key`"
                ))
            } else {
                Ok(Requirement::Exists(key(part)?))
            }
        })
        .collect()
}

impl PodRule {
    /// Compiles the rule of cohort `cohort`; the error says what is wrong with it.
    pub fn new(k: &KubeSelector, cohort: &str) -> Result<Self, String> {
        let role = k.role.as_deref();
        let chosen = [
            k.selector.is_some(),
            k.argo_rollout.is_some(),
            k.flagger.is_some(),
        ]
        .iter()
        .filter(|c| **c)
        .count();
        if chosen > 1 {
            return Err("give one of selector, argo_rollout, flagger".into());
        }
        let matcher = if let Some(s) = &k.selector {
            if role.is_some() {
                return Err("role goes with argo_rollout or flagger".into());
            }
            let reqs = parse_selector(s)?;
            if reqs.is_empty() {
                return Err(format!("selector `{s}` selects every pod"));
            }
            Matcher::Labels(reqs)
        } else if let Some(name) = &k.argo_rollout {
            let canary = match role {
                Some("canary") => true,
                Some("stable") => false,
                other => {
                    return Err(format!(
                        "argo_rollout needs role: stable or canary (got {other:?})"
                    ));
                }
            };
            Matcher::Rollout {
                name: name.clone(),
                canary,
            }
        } else if let Some(name) = &k.flagger {
            let primary = match role {
                Some("primary") => true,
                Some("canary") => false,
                other => {
                    return Err(format!(
                        "flagger needs role: primary or canary (got {other:?})"
                    ));
                }
            };
            Matcher::Flagger {
                name: name.clone(),
                primary,
            }
        } else {
            if role.is_some() {
                return Err("role goes with argo_rollout or flagger".into());
            }
            Matcher::CohortLabel(cohort.to_string())
        };
        Ok(Self {
            namespace: k.namespace.clone(),
            matcher,
        })
    }

    /// Whether this rule needs the Argo Rollouts API.
    pub fn needs_rollouts(&self) -> bool {
        matches!(self.matcher, Matcher::Rollout { .. })
    }

    pub fn matches(&self, pod: &PodFacts, rollouts: &Rollouts) -> bool {
        if self.namespace.as_ref().is_some_and(|n| *n != pod.namespace) {
            return false;
        }
        match &self.matcher {
            Matcher::Labels(reqs) => reqs.iter().all(|r| r.holds(&pod.labels)),
            Matcher::CohortLabel(cohort) => pod.labels.get(COHORT_LABEL) == Some(cohort),
            Matcher::Rollout { name, canary } => {
                let Some(hash) = pod.labels.get(ROLLOUT_HASH_LABEL) else {
                    return false;
                };
                // A rollout's ReplicaSets are named `<rollout>-<pod template hash>`.
                if pod.replica_set.as_deref() != Some(format!("{name}-{hash}").as_str()) {
                    return false;
                }
                let Some(status) = rollouts.get(&(pod.namespace.clone(), name.clone())) else {
                    return false;
                };
                let stable = status.stable.as_ref() == Some(hash);
                if *canary {
                    !stable && status.current.as_ref() == Some(hash)
                } else {
                    stable
                }
            }
            Matcher::Flagger { name, primary } => {
                let Some(deployment) = deployment_of(pod) else {
                    return false;
                };
                if *primary {
                    deployment == format!("{name}-primary")
                } else {
                    deployment == *name
                }
            }
        }
    }
}

/// The Deployment owning a pod, from its ReplicaSet's name (`<deployment>-<pod-template-hash>`).
fn deployment_of(pod: &PodFacts) -> Option<&str> {
    let rs = pod.replica_set.as_deref()?;
    let hash = pod.labels.get(POD_TEMPLATE_HASH_LABEL)?;
    rs.strip_suffix(hash.as_str())?.strip_suffix('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, labels: &[(&str, &str)], rs: Option<&str>) -> PodFacts {
        PodFacts {
            uid: "u".into(),
            namespace: ns.into(),
            name: "p".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            replica_set: rs.map(str::to_string),
            containers: vec![],
        }
    }

    fn rule(yaml: &str, cohort: &str) -> Result<PodRule, String> {
        let k: KubeSelector = serde_yaml_ng::from_str(yaml).unwrap();
        PodRule::new(&k, cohort)
    }

    #[test]
    fn label_selectors() {
        let r = rule("{selector: 'app=checkout,version!=v1,tier,!debug'}", "c").unwrap();
        let none = Rollouts::new();
        let yes = pod(
            "shop",
            &[("app", "checkout"), ("version", "v2"), ("tier", "web")],
            None,
        );
        assert!(r.matches(&yes, &none));
        let mut v1 = yes.clone();
        v1.labels.insert("version".into(), "v1".into());
        assert!(!r.matches(&v1, &none));
        let mut debug = yes.clone();
        debug.labels.insert("debug".into(), "1".into());
        assert!(!r.matches(&debug, &none));
        let r = rule("{namespace: other, selector: 'app=checkout'}", "c").unwrap();
        assert!(!r.matches(&yes, &none), "another namespace");
        assert!(rule("{selector: 'app in (a, b)'}", "c").is_err());
        assert!(rule("{selector: ' , '}", "c").is_err());
        assert!(rule("{selector: 'a=b', role: canary}", "c").is_err());
    }

    #[test]
    fn argo_rollout_roles_follow_its_status() {
        let stable = rule("{argo_rollout: checkout, role: stable}", "b").unwrap();
        let canary = rule("{argo_rollout: checkout, role: canary}", "c").unwrap();
        let old = pod("shop", &[(ROLLOUT_HASH_LABEL, "aaa")], Some("checkout-aaa"));
        let new = pod("shop", &[(ROLLOUT_HASH_LABEL, "bbb")], Some("checkout-bbb"));
        let mut rollouts = Rollouts::new();
        rollouts.insert(
            ("shop".into(), "checkout".into()),
            RolloutHashes {
                stable: Some("aaa".into()),
                current: Some("bbb".into()),
            },
        );
        assert!(stable.matches(&old, &rollouts) && !canary.matches(&old, &rollouts));
        assert!(canary.matches(&new, &rollouts) && !stable.matches(&new, &rollouts));
        // Promoted: the new hash is stable, no canary left.
        rollouts.insert(
            ("shop".into(), "checkout".into()),
            RolloutHashes {
                stable: Some("bbb".into()),
                current: Some("bbb".into()),
            },
        );
        assert!(stable.matches(&new, &rollouts) && !canary.matches(&new, &rollouts));
        assert!(!stable.matches(&old, &rollouts) && !canary.matches(&old, &rollouts));
        // Another rollout's pod with the same hash, or no status: not taken.
        let other = pod("shop", &[(ROLLOUT_HASH_LABEL, "bbb")], Some("cart-bbb"));
        assert!(!stable.matches(&other, &rollouts));
        assert!(!stable.matches(&new, &Rollouts::new()));
        assert!(rule("{argo_rollout: checkout}", "c").is_err());
    }

    #[test]
    fn flagger_primary_and_canary_workloads() {
        let primary = rule("{flagger: podinfo, role: primary}", "b").unwrap();
        let canary = rule("{flagger: podinfo, role: canary}", "c").unwrap();
        let none = Rollouts::new();
        let p = pod(
            "test",
            &[(POD_TEMPLATE_HASH_LABEL, "7d9f")],
            Some("podinfo-primary-7d9f"),
        );
        let c = pod(
            "test",
            &[(POD_TEMPLATE_HASH_LABEL, "55aa")],
            Some("podinfo-55aa"),
        );
        assert!(primary.matches(&p, &none) && !canary.matches(&p, &none));
        assert!(canary.matches(&c, &none) && !primary.matches(&c, &none));
        let unrelated = pod(
            "test",
            &[(POD_TEMPLATE_HASH_LABEL, "55aa")],
            Some("podinfo-db-55aa"),
        );
        assert!(!canary.matches(&unrelated, &none));
    }

    #[test]
    fn a_pod_may_name_its_cohort() {
        let r = rule("{namespace: shop}", "canary").unwrap();
        let none = Rollouts::new();
        assert!(r.matches(&pod("shop", &[(COHORT_LABEL, "canary")], None), &none));
        assert!(!r.matches(&pod("shop", &[(COHORT_LABEL, "baseline")], None), &none));
        assert!(!r.matches(&pod("shop", &[], None), &none));
    }
}

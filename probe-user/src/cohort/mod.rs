//! Which processes are watched: cohort rules compiled from the configuration and evaluated
//! against `/proc` and the cgroup v2 tree.

pub mod proc;

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use globset::{Glob, GlobMatcher};

use crate::{
    config::{CohortRule, ConfigError},
    kubernetes::{PodMeta, PodRule, SharedView},
};

/// Where cgroup v2 is mounted on hybrid hosts; `/sys/fs/cgroup` on unified ones.
pub fn cgroup2_root() -> PathBuf {
    let hybrid = Path::new("/sys/fs/cgroup/unified");
    if hybrid.join("cgroup.controllers").exists() || hybrid.join("cgroup.procs").exists() {
        hybrid.to_path_buf()
    } else {
        PathBuf::from("/sys/fs/cgroup")
    }
}

#[derive(Debug)]
struct CompiledRule {
    cohort: u32,
    cgroup: Option<GlobMatcher>,
    pid: Option<u32>,
    exe: Option<GlobMatcher>,
    env: Option<(String, Option<String>)>,
    cgroup_only: bool,
}

/// A cgroup v2 directory whose processes form (part of) a cohort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupMatch {
    pub id: u64,
    pub cohort: u32,
    pub dir: PathBuf,
}

/// The compiled cohort rules. Cohort ids are 1-based indexes into `names`.
#[derive(Debug)]
pub struct Cohorts {
    names: Vec<String>,
    rules: Vec<CompiledRule>,
    root: PathBuf,
    /// Rules by Kubernetes objects, with their cohort.
    kube_rules: Vec<(u32, PodRule)>,
    /// The node's pods (when the `kubernetes` section is configured).
    kube: Option<SharedView>,
}

impl Cohorts {
    pub fn new(rules: &[CohortRule], root: PathBuf) -> Result<Self, ConfigError> {
        let mut names: Vec<String> = Vec::new();
        let mut compiled = Vec::new();
        let glob = |pattern: &str, origin: &str| {
            Glob::new(pattern)
                .map(|g| g.compile_matcher())
                .map_err(|e| ConfigError::Invalid {
                    origin: origin.to_string(),
                    message: format!("bad glob `{pattern}`: {e}"),
                })
        };
        let mut kube_rules = Vec::new();
        for rule in rules {
            let cohort = match names.iter().position(|n| *n == rule.name) {
                Some(i) => i as u32 + 1,
                None => {
                    names.push(rule.name.clone());
                    names.len() as u32
                }
            };
            let origin = format!("cohort {}", rule.name);
            if let Some(k) = &rule.kubernetes {
                let compiled =
                    PodRule::new(k, &rule.name).map_err(|message| ConfigError::Invalid {
                        origin: origin.clone(),
                        message,
                    })?;
                kube_rules.push((cohort, compiled));
                continue;
            }
            let cgroup = match &rule.cgroup {
                Some(p) => {
                    let abs = if p.starts_with('/') {
                        PathBuf::from(p)
                    } else {
                        root.join(p)
                    };
                    let abs = abs.to_string_lossy().trim_end_matches('/').to_string();
                    Some(glob(&abs, &origin)?)
                }
                None => None,
            };
            let exe = rule.exe.as_deref().map(|e| glob(e, &origin)).transpose()?;
            let env = rule.env.as_ref().map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (e.clone(), None),
            });
            compiled.push(CompiledRule {
                cohort,
                cgroup,
                pid: rule.pid,
                exe,
                env,
                cgroup_only: rule.is_cgroup_only(),
            });
        }
        Ok(Self {
            names,
            rules: compiled,
            root,
            kube_rules,
            kube: None,
        })
    }

    /// Whether some rule chooses pods by Kubernetes objects.
    pub fn has_kubernetes_rules(&self) -> bool {
        !self.kube_rules.is_empty()
    }

    /// Whether some rule needs the Argo Rollouts API.
    pub fn needs_rollouts(&self) -> bool {
        self.kube_rules.iter().any(|(_, r)| r.needs_rollouts())
    }

    /// The node's pods, kept current by the Kubernetes watches.
    pub fn set_kubernetes(&mut self, view: SharedView) {
        self.kube = Some(view);
    }

    /// The pod a process runs in, when the node's pods are watched.
    pub fn pod_of(&self, pid: u32) -> Option<PodMeta> {
        self.kube.as_ref()?.meta_of_process(pid)
    }

    /// Cohort name for an id.
    pub fn name(&self, cohort: u32) -> &str {
        self.names
            .get((cohort as usize).wrapping_sub(1))
            .map_or("unknown", String::as_str)
    }

    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Whether some rule needs per-process evaluation (anything but a bare cgroup).
    pub fn needs_process_rules(&self) -> bool {
        self.rules.iter().any(|r| !r.cgroup_only)
    }

    /// cgroup v2 directories matched by cgroup-only rules. The cgroup id the kernel reports is
    /// the directory's inode number.
    pub fn cgroups(&self) -> Vec<CgroupMatch> {
        let mut out = Vec::new();
        walk_cgroup_tree(&self.root, |dir| {
            let path = dir.to_string_lossy();
            let path = path.trim_end_matches('/');
            if let Some(rule) = self
                .rules
                .iter()
                .find(|r| r.cgroup_only && r.cgroup.as_ref().is_some_and(|g| g.is_match(path)))
                && let Ok(meta) = std::fs::metadata(dir)
            {
                out.push(CgroupMatch {
                    id: meta.ino(),
                    cohort: rule.cohort,
                    dir: dir.to_path_buf(),
                });
            }
        });
        if let Some(view) = &self.kube {
            for (dir, cohort) in view.cgroups(&self.kube_rules) {
                if let Ok(meta) = std::fs::metadata(&dir)
                    && !out.iter().any(|m| m.id == meta.ino())
                {
                    out.push(CgroupMatch {
                        id: meta.ino(),
                        cohort,
                        dir,
                    });
                }
            }
        }
        out
    }

    /// The cohort of a process by the per-process rules (pid, exe, env, cgroup combined with
    /// others), or `None`. Reads `/proc` only for what the rules ask.
    pub fn match_process(&self, pid: u32) -> Option<u32> {
        let mut info = proc::LazyProcess::new(pid);
        self.rules
            .iter()
            .filter(|r| !r.cgroup_only)
            .find(|rule| {
                rule.pid.is_none_or(|p| p == pid)
                    && rule
                        .exe
                        .as_ref()
                        .is_none_or(|g| info.exe().is_some_and(|e| g.is_match(e)))
                    && rule.env.as_ref().is_none_or(|(k, v)| {
                        info.env(k)
                            .is_some_and(|found| v.as_ref().is_none_or(|v| *v == found))
                    })
                    && rule.cgroup.as_ref().is_none_or(|g| {
                        info.cgroup2()
                            .is_some_and(|c| g.is_match(self.root.join(c.trim_start_matches('/'))))
                    })
            })
            .map(|r| r.cohort)
    }
}

/// Where the cgroup data path attaches and which socket cgroups it decodes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupPlan {
    /// Top-most matched directories: a cgroup's programs also run for its descendants'
    /// sockets, so nested matches need no attachment of their own.
    pub attach: Vec<PathBuf>,
    /// cgroup id -> cohort for every matched directory and its descendants (a pod's containers
    /// are sub-cgroups of the pod's directory).
    pub ids: std::collections::HashMap<u64, u32>,
}

/// Calls `visit` for `root` and every directory below it, 16 levels deep at most (the
/// cgroup tree is shallow; the bound keeps a loop of bind mounts harmless).
pub fn walk_cgroup_tree(root: &Path, mut visit: impl FnMut(&Path)) {
    let mut stack = vec![(root.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = stack.pop() {
        visit(&dir);
        if depth >= 16 {
            continue;
        }
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
}

/// The plan for `matches` (from [`Cohorts::cgroups`]).
pub fn cgroup_plan(matches: &[CgroupMatch]) -> CgroupPlan {
    let mut plan = CgroupPlan::default();
    for m in matches {
        if !matches
            .iter()
            .any(|o| o.dir != m.dir && m.dir.starts_with(&o.dir))
        {
            plan.attach.push(m.dir.clone());
        }
    }
    plan.attach.sort();
    // Deeper matches name their own cohort; walk shallow ones first so deeper ones win.
    let mut ordered: Vec<&CgroupMatch> = matches.iter().collect();
    ordered.sort_by_key(|m| m.dir.components().count());
    for m in ordered {
        walk_cgroup_tree(&m.dir, |dir| {
            if let Ok(meta) = std::fs::metadata(dir) {
                plan.ids.insert(meta.ino(), m.cohort);
            }
        });
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(name: &str) -> CohortRule {
        CohortRule {
            name: name.into(),
            ..CohortRule::default()
        }
    }

    #[test]
    fn cgroup_plan_attaches_top_most_and_maps_descendants() {
        let root = std::env::temp_dir().join(format!("bakeoff-plan-{}", std::process::id()));
        let pod = root.join("pod");
        std::fs::create_dir_all(pod.join("container-a")).unwrap();
        std::fs::create_dir_all(root.join("other")).unwrap();
        let id = |p: &Path| std::fs::metadata(p).unwrap().ino();
        let matches = vec![
            CgroupMatch {
                id: id(&pod),
                cohort: 1,
                dir: pod.clone(),
            },
            CgroupMatch {
                id: id(&pod.join("container-a")),
                cohort: 2,
                dir: pod.join("container-a"),
            },
            CgroupMatch {
                id: id(&root.join("other")),
                cohort: 3,
                dir: root.join("other"),
            },
        ];
        let plan = cgroup_plan(&matches);
        assert_eq!(plan.attach, vec![root.join("other"), pod.clone()]);
        assert_eq!(plan.ids.get(&id(&pod)), Some(&1));
        assert_eq!(plan.ids.get(&id(&pod.join("container-a"))), Some(&2));
        assert_eq!(plan.ids.get(&id(&root.join("other"))), Some(&3));
        assert_eq!(plan.ids.len(), 3);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn ids_and_names() {
        let rules = vec![
            CohortRule {
                pid: Some(1),
                ..rule("baseline")
            },
            CohortRule {
                pid: Some(2),
                ..rule("canary")
            },
            CohortRule {
                pid: Some(3),
                ..rule("baseline")
            },
        ];
        let c = Cohorts::new(&rules, PathBuf::from("/nonexistent")).unwrap();
        assert_eq!(c.names(), ["baseline", "canary"]);
        assert_eq!(c.name(1), "baseline");
        assert_eq!(c.name(2), "canary");
        assert_eq!(c.name(0), "unknown");
    }

    #[test]
    fn matches_own_process_by_pid_exe_env() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let rules = vec![
            CohortRule {
                pid: Some(me),
                exe: Some("/definitely/not/*".into()),
                ..rule("a")
            },
            CohortRule {
                exe: Some(exe.to_string_lossy().into_owned()),
                env: Some("PATH".into()),
                ..rule("b")
            },
        ];
        let c = Cohorts::new(&rules, cgroup2_root()).unwrap();
        assert_eq!(c.match_process(me), Some(2));
        let rules = vec![CohortRule {
            env: Some("BAKEOFF_SURELY_UNSET_VARIABLE=1".into()),
            ..rule("a")
        }];
        let c = Cohorts::new(&rules, cgroup2_root()).unwrap();
        assert_eq!(c.match_process(me), None);
    }
}

//! Cohorts from Kubernetes objects and pod metadata on events.
//!
//! The probe watches the pods of its own node (and, when a rule names one, Argo Rollouts) and
//! keeps the latest state in a `View`. The cohort rules (`rule`) say which pods form which
//! cohort; each pod is found in the cgroup v2 tree by its uid (`cgroup`), and from then on it is
//! watched like a cgroup cohort: in the kernel, by cgroup id. Pods that come or go during a
//! rollout join or leave their cohort at the next membership check (every second), without a
//! restart. Events of processes in a pod carry its namespace, name, container and the labels
//! the configuration selects.

pub mod cgroup;
pub mod rule;
pub mod watch;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
};

pub use rule::{PodFacts, PodRule, RolloutHashes, Rollouts};

/// What the probe knows of the node's pods and rollouts, as the watches last reported.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Pods by uid.
    pub pods: HashMap<String, PodFacts>,
    pub rollouts: Rollouts,
    /// The first complete list of pods has arrived.
    pub synced: bool,
}

/// The pod a process runs in, as events carry it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub pod: String,
    pub container: Option<String>,
    /// The selected labels the pod has.
    pub labels: Vec<(String, String)>,
}

/// The shared state: written by the watches, read by the cohort checks and the pipeline.
#[derive(Debug)]
pub struct View {
    pub snapshot: RwLock<Snapshot>,
    /// Labels copied onto events.
    labels: Vec<String>,
    /// The cgroup v2 root the pods are searched under.
    root: PathBuf,
    /// Pod uid -> its cgroup directory, once found.
    dirs: Mutex<HashMap<String, PathBuf>>,
}

impl View {
    pub fn new(labels: Vec<String>, root: PathBuf) -> Self {
        Self {
            snapshot: RwLock::default(),
            labels,
            root,
            dirs: Mutex::default(),
        }
    }

    /// The cgroup directory of every pod a rule takes, with the cohort of the first rule that
    /// takes it. Pods whose directory is not there (yet) are left out until it is.
    pub fn cgroups(&self, rules: &[(u32, PodRule)]) -> Vec<(PathBuf, u32)> {
        let Ok(snap) = self.snapshot.read() else {
            return Vec::new();
        };
        let chosen: Vec<(&str, u32)> = snap
            .pods
            .values()
            .filter_map(|pod| {
                rules
                    .iter()
                    .find(|(_, r)| r.matches(pod, &snap.rollouts))
                    .map(|(cohort, _)| (pod.uid.as_str(), *cohort))
            })
            .collect();
        let Ok(mut dirs) = self.dirs.lock() else {
            return Vec::new();
        };
        dirs.retain(|uid, dir| snap.pods.contains_key(uid) && dir.is_dir());
        let missing: Vec<&str> = chosen
            .iter()
            .map(|(uid, _)| *uid)
            .filter(|uid| !dirs.contains_key(*uid))
            .collect();
        for (uid, dir) in cgroup::find_pod_dirs(&self.root, &missing) {
            dirs.insert(uid, dir);
        }
        let mut out: Vec<(PathBuf, u32)> = chosen
            .iter()
            .filter_map(|(uid, cohort)| dirs.get(*uid).map(|d| (d.clone(), *cohort)))
            .collect();
        // In a stable order: the membership check compares it with the last one.
        out.sort();
        out
    }

    /// The pod (and container) of a process in cgroup `cgroup` (a path below the cgroup v2
    /// root, as `/proc/<pid>/cgroup` gives it).
    pub fn meta_of_cgroup(&self, cgroup: &Path) -> Option<PodMeta> {
        let path = self.root.join(cgroup.strip_prefix("/").unwrap_or(cgroup));
        let snap = self.snapshot.read().ok()?;
        let mut dirs = self.dirs.lock().ok()?;
        let find = |dirs: &HashMap<String, PathBuf>| {
            dirs.iter()
                .find(|(_, d)| path.starts_with(d))
                .map(|(u, d)| (u.clone(), d.clone()))
        };
        let (uid, dir) = match find(&dirs) {
            Some(found) => found,
            None => {
                // A pod no rule took: found by the uid in the path.
                let uid = snap.pods.keys().find(|uid| {
                    path.components()
                        .any(|c| cgroup::is_pod_dir(&c.as_os_str().to_string_lossy(), uid.as_str()))
                })?;
                let dir = path.ancestors().find(|a| {
                    a.file_name()
                        .is_some_and(|n| cgroup::is_pod_dir(&n.to_string_lossy(), uid))
                })?;
                dirs.insert(uid.clone(), dir.to_path_buf());
                (uid.clone(), dir.to_path_buf())
            }
        };
        let pod = snap.pods.get(&uid)?;
        let container = path
            .strip_prefix(&dir)
            .ok()
            .and_then(|rest| rest.components().next())
            .and_then(|c| {
                cgroup::container_of(&c.as_os_str().to_string_lossy(), &pod.containers)
                    .map(str::to_string)
            });
        Some(PodMeta {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            container,
            labels: self
                .labels
                .iter()
                .filter_map(|l| pod.labels.get(l).map(|v| (l.clone(), v.clone())))
                .collect(),
        })
    }

    /// The pod of a running process, from `/proc/<pid>/cgroup`.
    pub fn meta_of_process(&self, pid: u32) -> Option<PodMeta> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        // cgroup v2: the `0::<path>` line.
        let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
        self.meta_of_cgroup(Path::new(path.trim()))
    }
}

/// Shared handle.
pub type SharedView = Arc<View>;

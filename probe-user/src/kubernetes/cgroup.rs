//! Where the kubelet puts a pod in the cgroup v2 tree. Its directory is named after the pod's
//! uid under both cgroup drivers and every QoS class:
//!
//! - systemd: `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`
//!   (guaranteed: `kubepods.slice/kubepods-pod<uid_>.slice`), dashes of the uid as underscores;
//! - cgroupfs: `kubepods/burstable/pod<uid>` (guaranteed: `kubepods/pod<uid>`).
//!
//! Containers are directories below it named after the runtime's container id:
//! `cri-containerd-<id>.scope` (containerd, systemd), `crio-<id>.scope` (CRI-O, next to its
//! `crio-conmon-<id>.scope`), `docker-<id>.scope`, or `<id>` (cgroupfs). The tree is searched
//! rather than the path built, so a kubelet with another `--cgroup-root` (kind, k3s nest it
//! under the runtime's own cgroup) is found too.

use std::path::{Path, PathBuf};

/// How deep the kubelet's pod directories may be below the cgroup v2 root.
const MAX_DEPTH: usize = 8;

/// Whether `name` is the cgroup directory of the pod with this uid.
pub fn is_pod_dir(name: &str, uid: &str) -> bool {
    let systemd = uid.replace('-', "_");
    name.strip_prefix("pod") == Some(uid)
        || name
            .strip_suffix(".slice")
            .and_then(|n| n.strip_suffix(systemd.as_str()))
            .is_some_and(|n| n.ends_with("-pod"))
}

/// The directory of each pod in `uids` found below `root` (one walk for all of them).
pub fn find_pod_dirs(root: &Path, uids: &[&str]) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    if uids.is_empty() {
        return found;
    }
    let mut stack = vec![(root.to_path_buf(), 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if let Some(uid) = uids.iter().find(|u| is_pod_dir(&name, u)) {
                found.push((uid.to_string(), entry.path()));
                if found.len() == uids.len() {
                    return found;
                }
            } else if depth < MAX_DEPTH {
                stack.push((entry.path(), depth + 1));
            }
        }
    }
    found
}

/// The container (by name) whose cgroup directory `name` is, given the pod's (name, id) list.
pub fn container_of<'a>(name: &str, containers: &'a [(String, String)]) -> Option<&'a str> {
    containers
        .iter()
        .find(|(_, id)| !id.is_empty() && name.contains(id.as_str()) && !name.contains("conmon"))
        .map(|(n, _)| n.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "7f3c2a1e-0b4d-4c5e-9a8b-112233445566";

    #[test]
    fn pod_directories_of_both_drivers() {
        let u = UID.replace('-', "_");
        for name in [
            format!("kubepods-burstable-pod{u}.slice"),
            format!("kubepods-besteffort-pod{u}.slice"),
            format!("kubepods-pod{u}.slice"),
            format!("pod{UID}"),
        ] {
            assert!(is_pod_dir(&name, UID), "{name}");
        }
        for name in [
            "kubepods-burstable.slice".to_string(),
            format!("pod{UID}x"),
            format!("cri-containerd-{u}.scope"),
            format!("kubepods-burstable-pod{u}_1.slice"),
        ] {
            assert!(!is_pod_dir(&name, UID), "{name}");
        }
    }

    #[test]
    fn found_in_a_tree_laid_out_as_the_kubelet_does() {
        let root = std::env::temp_dir().join(format!("bakeoff-kube-cgroup-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let u = UID.replace('-', "_");
        let pod = root
            .join("kubepods.slice/kubepods-burstable.slice")
            .join(format!("kubepods-burstable-pod{u}.slice"));
        std::fs::create_dir_all(pod.join("cri-containerd-abc123.scope")).unwrap();
        let other = root.join("kubepods/besteffort/pod0000-1111");
        std::fs::create_dir_all(other.join("def456")).unwrap();
        let found = find_pod_dirs(&root, &[UID, "0000-1111", "missing"]);
        assert!(found.contains(&(UID.to_string(), pod.clone())), "{found:?}");
        assert!(
            found.contains(&("0000-1111".to_string(), other)),
            "{found:?}"
        );
        assert_eq!(found.len(), 2);
        let containers = vec![
            ("app".to_string(), "abc123".to_string()),
            ("sidecar".to_string(), "def456".to_string()),
        ];
        assert_eq!(
            container_of("cri-containerd-abc123.scope", &containers),
            Some("app")
        );
        assert_eq!(container_of("crio-conmon-abc123.scope", &containers), None);
        assert_eq!(container_of("def456", &containers), Some("sidecar"));
        let _ = std::fs::remove_dir_all(&root);
    }
}

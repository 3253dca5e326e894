//! `bakeoff-probe check`: what this host allows and what the configured cohorts will get,
//! before the DaemonSet is rolled out. Exit 0 when all is well, 2 with warnings only, 1 when
//! the probe cannot work here.

use std::path::Path;

use crate::{
    cohort::{Cohorts, cgroup2_root, proc},
    config::{CohortRule, DataPath},
    kernel::{
        Kernel,
        privileges::{Cap, CapSet, Feature, Without, needs},
        tracefs::{self, Tracefs},
    },
};

/// How a finding weighs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Clone, Debug)]
pub struct Finding {
    pub what: String,
    pub level: Level,
    pub detail: String,
}

fn finding(what: impl Into<String>, level: Level, detail: impl Into<String>) -> Finding {
    Finding {
        what: what.into(),
        level,
        detail: detail.into(),
    }
}

/// The kernel release, e.g. `6.18.44`, and whether it is at least `major.minor`.
fn release() -> Option<(String, (u32, u32))> {
    let text = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let text = text.trim().to_string();
    let mut parts = text.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((text, (major, minor)))
}

/// What this host allows, the programs loaded for real (the verifier's verdict included).
pub fn host(prefix: u32, ring_bytes: u32) -> Vec<Finding> {
    // As the probe will (file capabilities `+p`): the effective set below is what it gets.
    let _ = crate::kernel::privileges::raise_permitted();
    let mut out = Vec::new();
    match release() {
        Some((text, v)) if v >= (5, 8) => out.push(finding("kernel", Level::Ok, text)),
        Some((text, _)) => out.push(finding(
            "kernel",
            Level::Fail,
            format!("{text}: the ring buffer needs 5.8 or later"),
        )),
        None => out.push(finding("kernel", Level::Warn, "release unknown")),
    }
    out.push(if Path::new("/sys/kernel/btf/vmlinux").exists() {
        finding("BTF", Level::Ok, "/sys/kernel/btf/vmlinux")
    } else {
        finding(
            "BTF",
            Level::Warn,
            "no /sys/kernel/btf/vmlinux (not needed today)",
        )
    });
    let root = cgroup2_root();
    out.push(if root.join("cgroup.controllers").exists() {
        finding("cgroup v2", Level::Ok, root.display().to_string())
    } else {
        finding(
            "cgroup v2",
            Level::Fail,
            "no cgroup2 mount: cgroup rules and the cgroup data path cannot work",
        )
    });
    out.push(match tracefs::find() {
        Tracefs::Readable(p) => finding("tracefs", Level::Ok, p),
        Tracefs::Denied {
            path,
            error,
            mode,
            uid,
            gid,
        } => finding(
            "tracefs",
            Level::Fail,
            tracefs::denied_error(path, &error, mode, uid, gid).to_string(),
        ),
        Tracefs::Unmounted => finding(
            "tracefs",
            Level::Warn,
            "not mounted: the probe will try to mount it (which needs CAP_SYS_ADMIN)",
        ),
    });
    out.push(
        if Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
            finding("uprobes", Level::Ok, "available (--tls-plaintext)")
        } else {
            finding("uprobes", Level::Warn, "unavailable: TLS cannot be decoded")
        },
    );
    out.push(match CapSet::effective() {
        Some(caps) => {
            // Every configuration loads programs and attaches the scheduler tracepoints.
            let missing: Vec<&str> = [Cap::Bpf, Cap::Perfmon]
                .into_iter()
                .filter(|c| !caps.grants(*c))
                .map(Cap::name)
                .collect();
            let has = match caps.names() {
                n if n.is_empty() => "none of those the probe uses".to_string(),
                n => n.join(" "),
            };
            // SAFETY: getuid cannot fail.
            let uid = unsafe { libc::getuid() };
            if missing.is_empty() {
                finding(
                    "capabilities",
                    Level::Ok,
                    format!("uid {uid}, effective: {has}"),
                )
            } else {
                finding(
                    "capabilities",
                    Level::Fail,
                    format!(
                        "uid {uid}, effective: {has}; missing {} (every data path needs them)",
                        missing.join(" ")
                    ),
                )
            }
        }
        None => finding("capabilities", Level::Warn, "unknown"),
    });
    out.push(match Kernel::load(prefix, ring_bytes) {
        Ok(kernel) => match kernel.cgroup_path_refused() {
            None => finding(
                "programs",
                Level::Ok,
                "every kernel program loads (verifier passed)",
            ),
            Some(why) => finding(
                "programs",
                Level::Ok,
                format!(
                    "every kernel program loads (verifier passed) except the cgroup path's \
                     cgroup/sock program: needs CAP_NET_ADMIN{why}"
                ),
            ),
        },
        Err(e) => finding("programs", Level::Fail, e.to_string()),
    });
    out
}

/// The capabilities each data path (and the TLS uprobes) needs, which this process lacks and
/// what that costs. A path the cohorts do not use is listed for information (ok): `used` are
/// the paths the configuration needs.
pub fn capabilities(rules: &[CohortRule], data_path: DataPath, tls: bool) -> Vec<Finding> {
    let cgroup = data_path == DataPath::Auto && rules.iter().any(|r| r.is_cgroup_only());
    let syscall = data_path == DataPath::Syscall || rules.iter().any(|r| !r.is_cgroup_only());
    let caps = CapSet::effective();
    [
        (Feature::CgroupPath, cgroup),
        (Feature::SyscallPath, syscall),
        (Feature::Tls, tls),
    ]
    .into_iter()
    .map(|(feature, used)| capability_finding(feature, used, caps))
    .collect()
}

fn capability_finding(feature: Feature, used: bool, caps: Option<CapSet>) -> Finding {
    let all = needs(feature);
    let names: Vec<&str> = all.iter().map(|n| n.cap.name()).collect();
    let mut text = format!("needs {}", names.join(" "));
    let Some(caps) = caps else {
        return finding(
            format!("caps {}", feature.name()),
            Level::Warn,
            text + "; this process's are unknown",
        );
    };
    let missing: Vec<_> = all.iter().filter(|n| !caps.grants(n.cap)).collect();
    let mut level = Level::Ok;
    for n in &missing {
        let (weight, cost) = match n.without {
            Without::Fails => (Level::Fail, "this path cannot work".to_string()),
            Without::Degrades(lost) => (Level::Warn, lost.to_string()),
        };
        if used {
            level = level.max(weight);
        }
        text.push_str(&format!("; missing {} ({}): {cost}", n.cap.name(), n.why));
    }
    if missing.is_empty() {
        text.push_str(", all present");
    }
    if !used {
        text.push_str(" [not used by this configuration]");
    }
    finding(format!("caps {}", feature.name()), level, text)
}

/// Which data path each configured cohort will use and how many processes it has now.
pub fn cohorts(cohorts: &Cohorts, rules: &[CohortRule], data_path: DataPath) -> Vec<Finding> {
    let matches = cohorts.cgroups();
    let mut out = Vec::new();
    for (i, name) in cohorts.names().iter().enumerate() {
        let id = i as u32 + 1;
        let own: Vec<&CohortRule> = rules.iter().filter(|r| &r.name == name).collect();
        let cgroup_only = own.iter().all(|r| r.is_cgroup_only());
        let path = if cgroup_only && data_path == DataPath::Auto {
            "cgroup path"
        } else {
            "syscall path"
        };
        let dirs: Vec<_> = matches.iter().filter(|m| m.cohort == id).collect();
        // A directory's processes and its descendants' (a pod's are in its containers').
        let mut members: usize = 0;
        for m in &dirs {
            crate::cohort::walk_cgroup_tree(&m.dir, |d| {
                members += proc::pids_in_cgroup(d).len();
            });
        }
        if !cgroup_only {
            members += proc::all_pids()
                .into_iter()
                .filter(|p| cohorts.match_process(*p) == Some(id))
                .count();
        }
        let cgroup_rules = own.iter().any(|r| r.cgroup.is_some());
        let (level, detail) = if members > 0 {
            (
                Level::Ok,
                format!("{path}, {members} processes, {} cgroups", dirs.len()),
            )
        } else if cgroup_rules && dirs.is_empty() {
            (
                Level::Warn,
                format!("{path}, no member: its cgroup rule matches no directory"),
            )
        } else {
            (
                Level::Warn,
                format!("{path}, no member: its rules match no process"),
            )
        };
        out.push(finding(format!("cohort {name}"), level, detail));
    }
    out
}

/// The findings as lines, and the exit code they call for.
pub fn report(findings: &[Finding]) -> (String, i32) {
    let mut text = String::new();
    for f in findings {
        let mark = match f.level {
            Level::Ok => "ok  ",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        };
        text.push_str(&format!("{mark}  {:<14} {}\n", f.what, f.detail));
    }
    let code = match findings.iter().map(|f| f.level).max() {
        Some(Level::Fail) => 1,
        Some(Level::Warn) => 2,
        _ => 0,
    };
    (text, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_capability_fails_only_a_path_in_use() {
        let bit = |c: Cap| 1u64 << c.number();
        // Everything the syscall path needs, no CAP_NET_ADMIN.
        let caps = CapSet(
            bit(Cap::Bpf) | bit(Cap::Perfmon) | bit(Cap::DacReadSearch) | bit(Cap::SysPtrace),
        );
        let used = capability_finding(Feature::CgroupPath, true, Some(caps));
        assert_eq!(used.level, Level::Fail, "{}", used.detail);
        assert!(
            used.detail.contains("missing CAP_NET_ADMIN"),
            "{}",
            used.detail
        );
        let unused = capability_finding(Feature::CgroupPath, false, Some(caps));
        assert_eq!(unused.level, Level::Ok);
        assert!(unused.detail.contains("not used"), "{}", unused.detail);
        let syscall = capability_finding(Feature::SyscallPath, true, Some(caps));
        assert_eq!(syscall.level, Level::Ok, "{}", syscall.detail);
        let tls = capability_finding(Feature::Tls, true, Some(caps));
        assert_eq!(tls.level, Level::Warn, "{}", tls.detail);
        assert!(
            tls.detail.contains("missing CAP_SYS_ADMIN"),
            "{}",
            tls.detail
        );
        // CAP_SYS_ADMIN passes the bpf() checks of CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN.
        let admin = CapSet(bit(Cap::SysAdmin) | bit(Cap::DacReadSearch) | bit(Cap::SysPtrace));
        for f in [Feature::CgroupPath, Feature::SyscallPath, Feature::Tls] {
            let found = capability_finding(f, true, Some(admin));
            assert_eq!(found.level, Level::Ok, "{f:?}: {}", found.detail);
        }
    }

    #[test]
    fn the_worst_finding_sets_the_exit_code() {
        let ok = finding("a", Level::Ok, "x");
        let warn = finding("b", Level::Warn, "y");
        let fail = finding("c", Level::Fail, "z");
        assert_eq!(report(std::slice::from_ref(&ok)).1, 0);
        assert_eq!(report(&[ok.clone(), warn.clone()]).1, 2);
        let (text, code) = report(&[ok, warn, fail]);
        assert_eq!(code, 1);
        assert!(text.contains("FAIL  c"), "{text}");
    }
}

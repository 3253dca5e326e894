//! `bakeoff-probe check`: what this host allows and what the configured cohorts will get,
//! before the DaemonSet is rolled out. Exit 0 when all is well, 2 with warnings only, 1 when
//! the probe cannot work here.

use std::path::Path;

use crate::{
    cohort::{Cohorts, cgroup2_root, proc},
    config::{CohortRule, DataPath},
    kernel::{Kernel, effective_caps},
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
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|p| Path::new(p).join("events").is_dir());
    out.push(match tracefs {
        Some(p) => finding("tracefs", Level::Ok, p),
        None => finding(
            "tracefs",
            Level::Warn,
            "not mounted: the probe will try to mount it",
        ),
    });
    out.push(
        if Path::new("/sys/bus/event_source/devices/uprobe/type").exists() {
            finding("uprobes", Level::Ok, "available (--tls-plaintext)")
        } else {
            finding("uprobes", Level::Warn, "unavailable: TLS cannot be decoded")
        },
    );
    match effective_caps() {
        Some(caps) => {
            let names = [
                (21, "CAP_SYS_ADMIN"),
                (38, "CAP_PERFMON"),
                (39, "CAP_BPF"),
                (12, "CAP_NET_ADMIN"),
                (19, "CAP_SYS_PTRACE"),
                (2, "CAP_DAC_READ_SEARCH"),
            ];
            let has: Vec<&str> = names
                .iter()
                .filter(|(c, _)| caps & (1 << c) != 0)
                .map(|(_, n)| *n)
                .collect();
            let enough = caps & (1 << 21) != 0 || (caps & (1 << 38) != 0 && caps & (1 << 39) != 0);
            out.push(finding(
                "capabilities",
                if enough { Level::Ok } else { Level::Fail },
                if has.is_empty() {
                    "none of CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN".to_string()
                } else {
                    has.join(" ")
                },
            ));
        }
        None => out.push(finding("capabilities", Level::Warn, "unknown")),
    }
    out.push(match Kernel::load(prefix, ring_bytes) {
        Ok(_) => finding(
            "programs",
            Level::Ok,
            "every kernel program loads (verifier passed)",
        ),
        Err(e) => finding("programs", Level::Fail, e.to_string()),
    });
    out
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
        let mut members: usize = dirs
            .iter()
            .map(|m| proc::pids_in_cgroup(&m.dir).len())
            .sum();
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

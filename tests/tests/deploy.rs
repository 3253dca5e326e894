//! The Kubernetes manifests and container images under deploy/ cannot rot silently:
//!
//! - every manifest validates strictly (deploy/kubernetes/validate.py: kubernetes-validate's
//!   schemas for the core kinds, the Argo Rollouts and Flagger CRDs' own schemas for theirs),
//!   and the validator does reject wrong fields;
//! - every flag the manifests and images pass exists in the binaries' `--help`;
//! - the Containerfiles build binaries, packages and paths the workspace really has;
//! - the probe works as the DaemonSet runs it: uid 65532, the image's file capabilities, the
//!   DaemonSet's capability set as bounding set, and the kernel programs load;
//! - the Argo Rollouts web metric and the Flagger webhook, as written in the examples, read a
//!   real collector's verdict and decide on its real field names.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use bakeoff_proto::v1::{
    EventBatch, IngestRequest, ProbeHello, RequestEvent, ingest_client::IngestClient,
    ingest_request::Message,
};
use bakeoff_testkit::{
    collector::Collector,
    process::{bin, free_port, scratch_dir, wait_for},
};
use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_path_buf()
}

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// Runs validate.py on `paths` (none: its own directory) and returns its exit status and report.
fn validate(paths: &[&Path]) -> Result<(std::process::ExitStatus, Value)> {
    let out = Command::new("python3")
        .arg(kube_dir().join("validate.py"))
        .arg("--json")
        .args(paths)
        .output()
        .context("cannot run python3 (kubernetes-validate comes from `cargo xtask bootstrap`)")?;
    let report = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "validate.py printed no JSON report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    Ok((out.status, report))
}

fn yaml_files(dir: &Path, skip: &Path, out: &mut BTreeSet<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path != skip {
                yaml_files(&path, skip, out)?;
            }
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.insert(path);
        }
    }
    Ok(())
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_manifest_validates_strictly() -> Result<()> {
    let (status, report) = validate(&[])?;
    let objects = report["objects"].as_array().context("objects")?;
    let failed: Vec<&Value> = objects
        .iter()
        .filter(|o| o["errors"].as_array().is_none_or(|e| !e.is_empty()))
        .collect();
    ensure!(
        failed.is_empty(),
        "objects that do not validate: {failed:#?}"
    );
    ensure!(
        status.success() && report["errors"] == 0,
        "{status}: {report:#}"
    );
    ensure!(report["kubernetes_validate"] == "1.37.0", "{report:#}");
    ensure!(
        strings(&report["kubernetes_versions"]) == ["1.33.0", "1.37.0"],
        "{report:#}"
    );

    // Every manifest was read (found independently of the script), none empty.
    let mut expected = BTreeSet::new();
    yaml_files(&kube_dir(), &kube_dir().join("crds"), &mut expected)?;
    let files: BTreeMap<PathBuf, u64> = report["files"]
        .as_array()
        .context("files")?
        .iter()
        .map(|f| {
            (
                PathBuf::from(f["path"].as_str().unwrap_or_default()),
                f["objects"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    ensure!(
        files.keys().cloned().collect::<BTreeSet<_>>() == expected,
        "validated {:?}, on disk {expected:?}",
        files.keys()
    );
    ensure!(
        files.values().all(|&n| n > 0),
        "an empty manifest: {files:?}"
    );

    // Each kind as many times as shipped, each checked against the right schema.
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for o in objects {
        let kind = o["kind"].as_str().unwrap_or_default().to_string();
        let schema = o["schema"].as_str().unwrap_or_default();
        let expected_schema = match kind.as_str() {
            "Kustomization" => "kustomization",
            "AnalysisTemplate" => "crd argo-rollouts/analysis-template-crd.yaml",
            "Rollout" => "crd argo-rollouts/rollout-crd.yaml",
            "Canary" => "crd flagger/crd.yaml",
            _ => "kubernetes",
        };
        ensure!(schema == expected_schema, "{kind} checked by `{schema}`");
        *kinds.entry(kind).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = [
        ("AnalysisTemplate", 1),
        ("Canary", 1),
        ("ClusterRole", 1),
        ("ClusterRoleBinding", 1),
        ("ConfigMap", 1),
        ("DaemonSet", 1),
        ("Deployment", 1),
        ("Kustomization", 5),
        ("Namespace", 1),
        ("NetworkPolicy", 2),
        ("Rollout", 1),
        ("Secret", 2),
        ("Service", 1),
        ("ServiceAccount", 1),
        ("StatefulSet", 1),
    ]
    .into_iter()
    .map(|(k, n)| (k.to_string(), n))
    .collect();
    ensure!(kinds == want, "kinds {kinds:?}, expected {want:?}");

    // The two collector variants: same base, DuckDB StatefulSet or ClickHouse Deployment.
    let rendered = |dir: &str| -> Result<Vec<String>> {
        let path = kube_dir().join(dir).join("kustomization.yaml");
        report["kustomizations"]
            .as_array()
            .context("kustomizations")?
            .iter()
            .find(|k| k["path"].as_str() == path.to_str())
            .map(|k| strings(&k["objects"]))
            .with_context(|| format!("no kustomization {}", path.display()))
    };
    let duckdb = rendered("")?;
    let clickhouse = rendered("clickhouse")?;
    ensure!(duckdb.len() == 11 && clickhouse.len() == 11, "{duckdb:?}");
    ensure!(duckdb.contains(&"StatefulSet/bakeoff/bakeoff-collector".to_string()));
    ensure!(clickhouse.contains(&"Deployment/bakeoff/bakeoff-collector".to_string()));
    ensure!(!clickhouse.iter().any(|o| o.starts_with("StatefulSet/")));
    for o in [
        "DaemonSet/bakeoff/bakeoff-probe",
        "ClusterRole//bakeoff-probe",
        "NetworkPolicy/bakeoff/bakeoff-collector",
        "Secret/bakeoff/bakeoff-api-tokens",
    ] {
        ensure!(
            duckdb.contains(&o.to_string()) && clickhouse.contains(&o.to_string()),
            "{o} missing: {duckdb:?} / {clickhouse:?}"
        );
    }
    Ok(())
}

/// Copies of shipped manifests with one mistake each, next to a correct one: exactly the
/// mistakes are reported, in both Kubernetes versions.
#[test]
fn the_validator_rejects_wrong_fields() -> Result<()> {
    let dir = scratch_dir("deploy-negative")?;
    let read = |p: &str| std::fs::read_to_string(kube_dir().join(p));
    let replace = |text: String, from: &str, to: &str| -> Result<String> {
        ensure!(text.contains(from), "`{from}` not found");
        Ok(text.replacen(from, to, 1))
    };
    std::fs::write(
        dir.join("statefulset.yaml"),
        replace(
            read("collector-duckdb.yaml")?,
            "replicas: 1",
            "replicas: \"one\"",
        )?,
    )?;
    std::fs::write(
        dir.join("analysis-template.yaml"),
        replace(
            read("examples/argo-rollouts/analysis-template.yaml")?,
            "successCondition:",
            "sucessCondition:",
        )?,
    )?;
    std::fs::write(
        dir.join("canary.yaml"),
        replace(
            read("examples/flagger/canary.yaml")?,
            "type: rollout",
            "type: during-rollout",
        )?,
    )?;
    std::fs::write(
        dir.join("unknown.yaml"),
        "apiVersion: example.com/v1\nkind: Frobnicator\nmetadata:\n  name: x\n",
    )?;
    std::fs::write(
        dir.join("service.yaml"),
        read("base/collector-service.yaml")?,
    )?;
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - \
         statefulset.yaml\n  - analysis-template.yaml\n  - canary.yaml\n  - unknown.yaml\n  - \
         service.yaml\n",
    )?;
    std::fs::write(dir.join("forgotten.yaml"), read("base/namespace.yaml")?)?;

    let (status, report) = validate(&[&dir])?;
    ensure!(!status.success(), "validate.py passed broken manifests");
    let errors = |file: &str| -> Vec<String> {
        report["objects"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|o| o["file"].as_str() == dir.join(file).to_str())
            .flat_map(|o| strings(&o["errors"]))
            .collect()
    };
    let both = |e: &str| {
        vec![
            format!("kubernetes 1.33.0: {e}"),
            format!("kubernetes 1.37.0: {e}"),
        ]
    };
    let cases = [
        (
            "statefulset.yaml",
            both("spec.replicas: 'one' is not of type 'integer', 'null'"),
        ),
        (
            "analysis-template.yaml",
            both(
                "spec.metrics.0: Additional properties are not allowed ('sucessCondition' was unexpected)",
            ),
        ),
        (
            "canary.yaml",
            both(
                "spec.analysis.webhooks.0.type: 'during-rollout' is not one of ['', 'confirm-rollout', 'pre-rollout', 'rollout', 'confirm-promotion', 'post-rollout', 'event', 'rollback', 'confirm-traffic-increase']",
            ),
        ),
        (
            "unknown.yaml",
            vec![
                "kubernetes 1.33.0: Couldn't find schema for kind Frobnicator with api version example.com/v1 for kubernetes version 1.33".to_string(),
                "kubernetes 1.37.0: Couldn't find schema for kind Frobnicator with api version example.com/v1 for kubernetes version 1.37".to_string(),
            ],
        ),
        ("service.yaml", vec![]),
        (
            "forgotten.yaml",
            vec!["listed by no kustomization.yaml".to_string()],
        ),
    ];
    for (file, want) in cases {
        let got = errors(file);
        ensure!(got == want, "{file}: {got:#?}, expected {want:#?}");
    }
    ensure!(report["errors"] == 9, "{report:#}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `--flag` words of a `--help` text.
fn help_flags(binary: &str, args: &[&str]) -> Result<BTreeSet<String>> {
    let out = Command::new(bin(binary)?)
        .args(args)
        .arg("--help")
        .output()?;
    ensure!(out.status.success(), "{binary} {args:?} --help: {out:?}");
    Ok(String::from_utf8(out.stdout)?
        .split_whitespace()
        .filter(|w| w.starts_with("--"))
        .map(|w| w.trim_end_matches([',', '.']).to_string())
        .collect())
}

/// Flags the manifests use that are being added to the collector right now (API
/// authentication): accepted while this build lacks them, checked like any other once it has
/// them.
const PENDING_FLAGS: &[&str] = &["--api-tokens"];

fn check_flags(what: &str, binary: &str, words: &[String]) -> Result<()> {
    let (sub, rest): (Vec<&str>, &[String]) = match words.first().map(String::as_str) {
        Some("serve") => (vec!["serve"], &words[1..]),
        _ => (vec![], words),
    };
    ensure!(
        binary != "bakeoff" || sub == ["serve"],
        "{what}: the collector image runs `bakeoff serve`, not {words:?}"
    );
    let known = help_flags(binary, &sub)?;
    let used: Vec<&String> = rest.iter().filter(|w| w.starts_with("--")).collect();
    ensure!(!used.is_empty(), "{what}: no flags in {words:?}");
    for flag in used {
        if !known.contains(flag.as_str()) {
            if PENDING_FLAGS.contains(&flag.as_str()) {
                eprintln!("{what}: {flag} is not in this build of {binary} yet (pending)");
                continue;
            }
            bail!("{what}: {binary} {sub:?} has no {flag} (it has {known:?})");
        }
    }
    Ok(())
}

/// Instructions of a Containerfile, continuation lines joined.
fn containerfile(name: &str) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(root().join("deploy/images").join(name))?;
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                if !current.trim().is_empty() {
                    out.push(current.trim().to_string());
                }
                current.clear();
            }
        }
    }
    Ok(out)
}

fn image_of(c: &Value) -> &str {
    c["image"].as_str().unwrap_or_default()
}

#[test]
fn manifest_and_image_flags_exist_in_the_binaries() -> Result<()> {
    let (_, report) = validate(&[])?;
    let mut checked = 0;
    for c in report["containers"].as_array().context("containers")? {
        let what = format!("{} container {}", c["object"], c["name"]);
        let binary = match image_of(c).split(':').next() {
            Some("localhost/bakeoff") => "bakeoff",
            Some("localhost/bakeoff-probe") => "bakeoff-probe",
            _ => continue, // the example application
        };
        let command = strings(&c["command"]);
        if !command.is_empty() {
            // The spool directory's one-shot chown, with the probe's user.
            let probe_user = report["containers"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == "probe")
                .and_then(|p| p["run_as_user"].as_u64())
                .context("the probe's runAsUser")?;
            ensure!(
                command
                    == [
                        "chown".to_string(),
                        format!("{probe_user}:{probe_user}"),
                        "/var/lib/bakeoff/spool".to_string()
                    ],
                "{what}: {command:?}"
            );
            continue;
        }
        check_flags(&what, binary, &strings(&c["args"]))?;
        checked += 1;
    }
    ensure!(checked == 3, "{checked} containers checked");
    for (file, binary) in [
        ("collector.Containerfile", "bakeoff"),
        ("probe.Containerfile", "bakeoff-probe"),
    ] {
        let cmd = containerfile(file)?
            .into_iter()
            .find_map(|i| i.strip_prefix("CMD ").map(String::from))
            .with_context(|| format!("{file}: no CMD"))?;
        let words: Vec<String> = serde_json::from_str(&cmd)?;
        check_flags(file, binary, &words)?;
    }
    Ok(())
}

/// Package name and binaries of each workspace member, from its Cargo.toml.
fn workspace_bins() -> Result<BTreeMap<String, Vec<String>>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root())? {
        let manifest = entry?.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let (mut section, mut package, mut bins) = (String::new(), None, Vec::new());
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_string();
            } else if let Some(v) = line.strip_prefix("name = ") {
                let v = v.trim_matches('"').to_string();
                match section.as_str() {
                    "[package]" => package = Some(v),
                    "[[bin]]" => bins.push(v),
                    _ => {}
                }
            }
        }
        if let Some(p) = package {
            out.insert(p, bins);
        }
    }
    Ok(out)
}

/// `KEY = "VALUE"` of .cargo/config.toml.
fn cargo_config(key: &str) -> Result<String> {
    let text = std::fs::read_to_string(root().join(".cargo/config.toml"))?;
    text.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{key} = ")))
        .map(|v| v.trim_matches('"').to_string())
        .with_context(|| format!(".cargo/config.toml has no {key}"))
}

#[test]
fn the_containerfiles_build_what_the_workspace_has() -> Result<()> {
    let bins = workspace_bins()?;
    let target = cargo_config("target-dir")?;
    let duckdb = cargo_config("DUCKDB_LIB_DIR")?;
    let workspace = std::fs::read_to_string(root().join("Cargo.toml"))?;
    let field = |name: &str| {
        workspace
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} = ")))
            .map(|v| v.trim_matches('"').to_string())
            .with_context(|| format!("workspace {name}"))
    };
    let (rust_version, version) = (field("rust-version")?, field("version")?);
    let parts = help_flags("xtask", &["bootstrap"]);
    let xtask_help = String::from_utf8(
        Command::new(bin("xtask")?)
            .args(["bootstrap", "--help"])
            .output()?
            .stdout,
    )?;
    ensure!(parts?.contains("--only"), "xtask bootstrap has no --only");
    let (_, report) = validate(&[])?;
    let images: BTreeSet<&str> = report["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .map(image_of)
        .filter(|i| i.starts_with("localhost/"))
        .collect();

    for (file, package, binary) in [
        ("collector.Containerfile", "bakeoff", "bakeoff"),
        ("probe.Containerfile", "probe-user", "bakeoff-probe"),
    ] {
        let text = std::fs::read_to_string(root().join("deploy/images").join(file))?;
        let lines = containerfile(file)?;
        let has = |s: &str| lines.iter().any(|l| l == s);
        // The Rust image is at least the workspace's rust-version, on the runtime's Debian.
        let rust = lines
            .iter()
            .find_map(|l| l.strip_prefix("ARG RUST_IMAGE=docker.io/library/rust:"))
            .with_context(|| format!("{file}: no RUST_IMAGE"))?;
        let minor = |v: &str| -> Result<u32> {
            Ok(v.split('.').nth(1).context("a minor version")?.parse()?)
        };
        ensure!(
            rust.ends_with("-bookworm")
                && minor(rust.trim_end_matches("-bookworm"))? >= minor(&rust_version)?,
            "{file}: rust image {rust}, workspace needs {rust_version}"
        );
        ensure!(
            bins.get(package)
                .is_some_and(|b| b.iter().any(|b| b == binary)),
            "{file}: no binary {binary} in package {package}: {bins:?}"
        );
        ensure!(
            has(&format!(
                "RUN cargo build --release -p {package} --bin {binary}"
            )),
            "{file}: no cargo build of {package}/{binary}"
        );
        let built = format!("{target}/release/{binary}");
        let copy = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("COPY --from=build {built} ")))
            .with_context(|| format!("{file}: does not copy {built}"))?;
        let entrypoint = format!("ENTRYPOINT [\"{copy}\"]");
        ensure!(has(&entrypoint), "{file}: no `{entrypoint}`");
        for only in lines
            .iter()
            .filter_map(|l| l.strip_prefix("RUN cargo xtask bootstrap --only "))
        {
            ensure!(
                xtask_help.contains(&format!("- {only}:")),
                "{file}: xtask bootstrap has no part {only}: {xtask_help}"
            );
        }
        // The manifests' image is what the build comment tags.
        let image = format!("{}:{version}", binary_image(binary));
        ensure!(images.contains(image.as_str()), "{image} not in {images:?}");
        ensure!(
            text.contains(&format!("-t {image} .")),
            "{file}: not tagged {image}"
        );
        ensure!(has("USER 65532:65532"), "{file}: not the non-root user");
    }

    // The collector finds libduckdb.so next to itself: the copy lands there, and the binary's
    // run path names $ORIGIN.
    let collector = containerfile("collector.Containerfile")?;
    ensure!(
        collector
            .iter()
            .any(|l| l
                == &format!("COPY --from=build {duckdb}/libduckdb.so /opt/bakeoff/libduckdb.so")),
        "collector.Containerfile: libduckdb.so from {duckdb} next to the binary"
    );
    ensure!(
        collector
            .iter()
            .any(|l| l == "ENTRYPOINT [\"/opt/bakeoff/bakeoff\"]")
    );
    let elf = std::fs::read(bin("bakeoff")?)?;
    ensure!(
        elf.windows(7).any(|w| w == b"$ORIGIN"),
        "the collector binary has no $ORIGIN run path"
    );
    // The probe's kernel programs are inside its binary: no eBPF object to ship.
    let kernel = std::fs::read_to_string(root().join("probe-user/src/kernel/mod.rs"))?;
    ensure!(
        kernel.contains(r#"include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-ebpf"))"#),
        "the probe no longer embeds its eBPF object: the image must ship it"
    );
    // The init container chowns with the runtime image's coreutils: a Debian base, not
    // distroless.
    ensure!(
        containerfile("probe.Containerfile")?
            .iter()
            .any(|l| l == "ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim")
    );
    Ok(())
}

fn binary_image(binary: &str) -> String {
    format!("localhost/{binary}")
}

/// The capabilities of the probe's image (setcap) and of its DaemonSet, as capability names.
fn probe_capabilities() -> Result<(BTreeSet<String>, BTreeSet<String>, u64)> {
    let image: BTreeSet<String> = containerfile("probe.Containerfile")?
        .iter()
        .find_map(|l| l.strip_prefix("ARG CAPABILITIES="))
        .context("probe.Containerfile: no CAPABILITIES")?
        .split(',')
        .map(|c| c.trim_start_matches("cap_").to_uppercase())
        .collect();
    let (_, report) = validate(&[])?;
    let probe = report["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .find(|c| c["name"] == "probe")
        .context("no probe container")?;
    let daemonset: BTreeSet<String> = strings(&probe["capabilities_add"]).into_iter().collect();
    let uid = probe["run_as_user"].as_u64().context("runAsUser")?;
    Ok((image, daemonset, uid))
}

/// As the DaemonSet runs it: a non-root user, the capabilities only as the binary's permitted
/// file capabilities (as the image sets them), the DaemonSet's list as bounding set. The
/// preflight must see every capability and load every kernel program; with one capability
/// fewer in the bounding set it must fail naming it.
#[test]
fn the_probe_runs_unprivileged_with_the_images_file_capabilities() -> Result<()> {
    ensure!(
        unsafe { libc::geteuid() } == 0,
        "run as root (cargo xtask test)"
    );
    let (image, daemonset, uid) = probe_capabilities()?;
    ensure!(
        daemonset.is_subset(&image),
        "the DaemonSet adds {daemonset:?}, beyond the image's file capabilities {image:?}"
    );
    ensure!(uid != 0, "the probe runs as root");
    let dir = scratch_dir("deploy-caps")?;
    let probe = dir.join("bakeoff-probe");
    std::fs::copy(bin("bakeoff-probe")?, &probe)?;
    let caps: Vec<String> = image
        .iter()
        .map(|c| format!("cap_{}", c.to_lowercase()))
        .collect();
    let status = Command::new("setcap")
        .arg(format!("{}=p", caps.join(",")))
        .arg(&probe)
        .status()
        .context("setcap (libcap2-bin)")?;
    ensure!(status.success(), "setcap: {status}");
    let run = |bounding: &BTreeSet<String>| -> Result<std::process::Output> {
        let set: Vec<String> = bounding
            .iter()
            .map(|c| format!("+{}", c.to_lowercase()))
            .collect();
        Ok(Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
                "--inh-caps=-all",
                &format!("--bounding-set=-all,{}", set.join(",")),
            ])
            .arg(&probe)
            .args(["check", "--cohort", "canary=pid:1"])
            .output()?)
    };
    let out = run(&daemonset)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(name))
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        out.status.success(),
        "bakeoff-probe check as uid {uid}: {out:?}"
    );
    let capabilities = line("capabilities");
    ensure!(
        capabilities.starts_with("ok ")
            && daemonset
                .iter()
                .all(|c| capabilities.contains(&format!("CAP_{c}"))),
        "{text}"
    );
    ensure!(line("programs").starts_with("ok "), "{text}");

    let mut fewer = daemonset.clone();
    let dropped = fewer.pop_first().context("no capability")?;
    let out = run(&fewer)?;
    ensure!(
        !out.status.success()
            && String::from_utf8_lossy(&out.stdout).contains(&format!("CAP_{dropped}")),
        "without {dropped} in the bounding set, check did not fail naming it: {out:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// `n` requests of one cohort of experiment `experiment` that ended in the last seconds, `slow`
/// times the baseline's latency, sent as one probe.
fn ingest(endpoint: String, experiment: &str, cohort: &str, n: usize, slow: f64) -> Result<()> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    let events: Vec<RequestEvent> = (0..n)
        .map(|i| {
            let ms = 4.0 + 12.0 * ((i * 7919) % 1000) as f64 / 1000.0;
            let duration_ns = (ms * slow * 1e6) as u64;
            RequestEvent {
                experiment: experiment.into(),
                cohort: cohort.into(),
                method: "GET".into(),
                path: ["/a", "/b"][i % 2].into(),
                status: Some(200),
                start_unix_ns: now - 4_000_000_000 + (i as u64 * 4_000_000_000 / n as u64)
                    - duration_ns,
                duration_ns,
                ..RequestEvent::default()
            }
        })
        .collect();
    let probe = format!("deploy-{cohort}");
    tokio::runtime::Runtime::new()?.block_on(async move {
        let mut client = IngestClient::connect(endpoint).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(IngestRequest {
            message: Some(Message::Hello(ProbeHello {
                probe_id: probe,
                protocol_version: bakeoff_proto::PROTOCOL_VERSION,
                ..ProbeHello::default()
            })),
        })
        .await?;
        let mut acks = client
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        let batches: Vec<Vec<RequestEvent>> = events.chunks(500).map(<[_]>::to_vec).collect();
        let last = batches.len() as u64;
        for (i, events) in batches.into_iter().enumerate() {
            tx.send(IngestRequest {
                message: Some(Message::Batch(EventBatch {
                    sequence: i as u64 + 1,
                    events,
                })),
            })
            .await?;
        }
        while let Some(ack) = acks.message().await? {
            if ack.stored_sequence == last {
                return anyhow::Ok(());
            }
        }
        bail!("the stream ended before batch {last} was acknowledged")
    })
}

/// `{{args.NAME}}` replaced by the values.
fn substitute(template: &str, args: &BTreeMap<String, String>) -> Result<String> {
    let mut out = template.to_string();
    for (k, v) in args {
        out = out.replace(&format!("{{{{args.{k}}}}}"), v);
    }
    ensure!(!out.contains("{{"), "unresolved argument in {out}");
    Ok(out)
}

/// `result.FIELD == 'VALUE'`, the only condition form used (Argo's expr language).
fn condition(expr: &str, result: &Value) -> Result<bool> {
    let (lhs, rhs) = expr
        .split_once(" == ")
        .with_context(|| format!("condition `{expr}`"))?;
    let field = lhs
        .strip_prefix("result.")
        .with_context(|| format!("condition `{expr}`"))?;
    let value = rhs
        .strip_prefix('\'')
        .and_then(|v| v.strip_suffix('\''))
        .with_context(|| format!("condition `{expr}`"))?;
    let actual = result.get(field).and_then(Value::as_str).with_context(|| {
        let fields: Vec<&String> = result
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .collect();
        format!("the verdict has no string field `{field}` (it has {fields:?})")
    })?;
    Ok(actual == value)
}

/// The examples' Argo web metric and Flagger webhook against a real collector judging a canary
/// three times slower: the metric's URL (arguments from the template and the Rollout), header
/// and conditions decide `fail` on the verdict's real JSON, the webhook's metadata is accepted
/// and answered 412. With API tokens (when this build has them), the same with the token.
#[test]
fn the_argo_metric_and_flagger_webhook_read_a_real_verdict() -> Result<()> {
    let (_, report) = validate(&[])?;
    let metrics = report["web_metrics"].as_array().context("web_metrics")?;
    ensure!(metrics.len() == 1, "{metrics:?}");
    let metric = &metrics[0];
    let analyses = report["rollout_analyses"].as_array().context("analyses")?;
    ensure!(
        analyses.len() == 1 && strings(&analyses[0]["templates"]) == ["bakeoff-verdict"],
        "{analyses:?}"
    );
    let webhooks = report["webhooks"].as_array().context("webhooks")?;
    ensure!(webhooks.len() == 1 && webhooks[0]["type"] == "rollout");
    let webhook = &webhooks[0];

    let dir = scratch_dir("deploy-verdict")?;
    let tokens = help_flags("bakeoff", &["serve"])?.contains("--api-tokens");
    let token = "0123456789abcdef0123456789abcdef";
    let mut args = vec!["--judge-lag".to_string(), "1".into()];
    if tokens {
        std::fs::write(dir.join("tokens"), format!("read {token}\n"))?;
        args.push("--api-tokens".into());
        args.push(dir.join("tokens").display().to_string());
    } else {
        eprintln!("this collector has no --api-tokens yet: the API is open, no token is sent");
    }
    let collector = Collector::start_with(&dir, free_port(), free_port(), &args)?;
    let http = format!("http://127.0.0.1:{}", collector.http_port);

    // The template's arguments: defaults, the Rollout's values, the token from the Secret.
    let mut values = BTreeMap::new();
    for a in metric["args"].as_array().context("args")? {
        if let Some(v) = a["value"].as_str() {
            values.insert(a["name"].as_str().unwrap_or_default().to_string(), v.into());
        } else if a["valueFrom"]["secretKeyRef"]["name"] == "bakeoff-api-token" {
            values.insert(
                a["name"].as_str().unwrap_or_default().to_string(),
                token.to_string(),
            );
        }
    }
    for (k, v) in analyses[0]["args"].as_object().context("args")? {
        values.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
    }
    let experiment = values.get("experiment").context("no experiment")?.clone();
    let url = substitute(metric["url"].as_str().context("url")?, &values)?.replacen(
        "http://bakeoff-collector.bakeoff.svc:8080",
        &http,
        1,
    );
    ensure!(url.starts_with(&http), "{url}");
    let headers: Vec<(String, String)> = metric["headers"]
        .as_array()
        .context("headers")?
        .iter()
        .map(|h| {
            Ok((
                h["key"].as_str().context("key")?.to_string(),
                substitute(h["value"].as_str().context("value")?, &values)?,
            ))
        })
        .collect::<Result<_>>()?;
    ensure!(
        headers == [("Authorization".to_string(), format!("Bearer {token}"))],
        "{headers:?}"
    );
    ensure!(metric["jsonPath"] == "{$}", "{metric}");
    let get = |url: &str, with_headers: bool| -> Result<(u16, String)> {
        let mut req = ureq::get(url);
        if with_headers {
            for (k, v) in &headers {
                req = req.header(k, v);
            }
        }
        let mut resp = req.config().http_status_as_error(false).build().call()?;
        Ok((resp.status().as_u16(), resp.body_mut().read_to_string()?))
    };
    // Before any traffic: 404 naming what exists, an Argo measurement error.
    let (code, body) = get(&url, true)?;
    ensure!(code == 404, "{code} {body}");

    let n = 3000;
    let endpoint = collector.endpoint();
    let (e1, e2) = (endpoint.clone(), experiment.clone());
    ingest(e1, &e2, "baseline", n, 1.0)?;
    ingest(endpoint, &experiment, "canary", n, 3.0)?;
    let mut verdict = Value::Null;
    wait_for("the verdict to fail", Duration::from_secs(90), || {
        if let Ok((200, body)) = get(&url, true)
            && let Ok(v) = serde_json::from_str::<Value>(&body)
        {
            let done = v["decision"] == "fail";
            verdict = v;
            return done;
        }
        false
    })
    .with_context(|| format!("last verdict: {verdict:#}"))?;
    let success = metric["successCondition"].as_str().context("success")?;
    let failure = metric["failureCondition"].as_str().context("failure")?;
    ensure!(
        condition(failure, &verdict)? && !condition(success, &verdict)?,
        "`{failure}` / `{success}` on {verdict:#}"
    );
    ensure!(
        verdict["experiment"] == experiment.as_str()
            && verdict["baseline"] == "baseline"
            && verdict["canary"] == "canary",
        "{verdict:#}"
    );
    if tokens {
        let (code, body) = get(&url, false)?;
        ensure!(code == 401, "without the token: {code} {body}");
    }

    // Flagger: the webhook's metadata as Flagger posts it.
    let mut metadata = webhook["metadata"].as_object().context("metadata")?.clone();
    if tokens {
        metadata.insert("token".into(), token.into());
    } else {
        ensure!(metadata.remove("token").is_some(), "{webhook}");
    }
    let hook_url = webhook["url"].as_str().context("url")?.replacen(
        "http://bakeoff-collector.bakeoff.svc:8080",
        &http,
        1,
    );
    let body = serde_json::json!({
        "name": "checkout",
        "namespace": "shop",
        "phase": "Progressing",
        "checksum": "0",
        "metadata": metadata,
    });
    let mut resp = ureq::post(&hook_url)
        .config()
        .http_status_as_error(false)
        .build()
        .send_json(&body)?;
    let code = resp.status().as_u16();
    let answer = resp.body_mut().read_to_string()?;
    ensure!(code == 412, "Flagger webhook: {code} {answer}");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

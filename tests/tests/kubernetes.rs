//! A rollout described only by Kubernetes objects, end to end through the kernel: an API server
//! speaking the real list/watch wire format (`testkit::kubeapi`; none can be installed here)
//! serves the pods of node `test-node` and an Argo Rollout whose status names the stable and
//! canary pod template hashes; the pods' cgroup directories are laid out as the kubelet's
//! systemd driver does, with a real server in each container's cgroup. The probe is given only
//! the Rollout's name: it must tag the stable pod's requests `baseline` and the canary's
//! `canary`, with namespace, pod, container and the selected labels; leave out a pod of another
//! app and a pod the API places on another node; survive a broken watch and a `410 Gone` (a
//! relist); take a canary replica that appears later, and drop it when it goes, without a
//! restart; and the collector must give a verdict for the experiment.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use bakeoff_testkit::{
    cgroup::Cgroup,
    client::{Conn, Request},
    collector::Collector,
    kubeapi::{FakeApi, Kind, pod, rollout},
    metrics::{sample, scrape},
    probe::ProbeRun,
    process::{free_port, scratch_dir, wait_for},
};

const EXPERIMENT: &str = "k8s-it";
const NODE: &str = "test-node";

/// A pod's cgroup directories as the kubelet (systemd driver, burstable QoS) and containerd
/// lay them out: the slice of the pod, then the scope of its container.
struct PodCgroups {
    container: Cgroup,
    _pod: Cgroup,
}

impl PodCgroups {
    fn create(top: &str, uid: &str, container_id: &str) -> Result<Self> {
        let pod = format!(
            "{top}/kubepods-burstable.slice/kubepods-burstable-pod{}.slice",
            uid.replace('-', "_")
        );
        let pod_cgroup = Cgroup::create(&pod)?;
        let container = Cgroup::create(&format!("{pod}/cri-containerd-{container_id}.scope"))?;
        Ok(Self {
            container,
            _pod: pod_cgroup,
        })
    }
}

fn send(port: u16, n: usize, tag: &str) -> Result<()> {
    let mut conn = Conn::connect(port)?;
    for i in 0..n {
        let r = conn.request(&Request::get(
            &format!("/checkout/{}", i % 4),
            &format!("{tag}-{i}"),
        ))?;
        ensure!(r.status == 200, "status {}", r.status);
    }
    Ok(())
}

fn members(metrics_port: u16, cohort: &str) -> f64 {
    scrape(&format!("http://127.0.0.1:{metrics_port}/metrics"))
        .and_then(|t| {
            sample(
                &t,
                &format!("bakeoff_probe_cohort_members{{cohort=\"{cohort}\"}}"),
            )
        })
        .unwrap_or(0.0)
}

#[test]
fn a_rollout_described_by_kubernetes_objects_is_judged_with_pod_metadata() -> Result<()> {
    let dir = scratch_dir("kubernetes")?;
    let api = FakeApi::start()?;
    let kubeconfig = dir.join("kubeconfig");
    api.write_kubeconfig(&kubeconfig)?;

    // Laid out as the kubelet does, under a slice of this test's own.
    let top = format!("bakeoff-it-kubepods-{}.slice", std::process::id());
    let _top = Cgroup::create(&top)?;
    let _burstable = Cgroup::create(&format!("{top}/kubepods-burstable.slice"))?;
    let uids = [
        ("stable", "0a1b2c3d-0000-4000-8000-000000000001", "c0ffee01"),
        ("canary", "0a1b2c3d-0000-4000-8000-000000000002", "c0ffee02"),
        ("cart", "0a1b2c3d-0000-4000-8000-000000000003", "c0ffee03"),
        (
            "elsewhere",
            "0a1b2c3d-0000-4000-8000-000000000004",
            "c0ffee04",
        ),
        (
            "canary2",
            "0a1b2c3d-0000-4000-8000-000000000005",
            "c0ffee05",
        ),
    ];
    let mut cgroups = BTreeMap::new();
    for (name, uid, cid) in uids {
        cgroups.insert(name, PodCgroups::create(&top, uid, cid)?);
    }
    let server = |name: &str, args: &str| cgroups[name].container.spawn_test_server(args);
    let (_s1, stable_port) = server("stable", "--delay-ms 1")?;
    let (_s2, canary_port) = server("canary", "--delay-ms 8")?;
    let (_s3, cart_port) = server("cart", "")?;
    let (_s4, elsewhere_port) = server("elsewhere", "")?;
    let (_s5, canary2_port) = server("canary2", "--delay-ms 8")?;

    let labels = |version: &str, hash: &str| {
        vec![
            ("app", "checkout"),
            ("version", version),
            ("rollouts-pod-template-hash", hash),
            ("team", "payments"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect::<Vec<_>>()
    };
    let add = |name: &str, node: &str, labels: &[(String, String)], rs: &str| {
        let (_, uid, cid) = uids
            .iter()
            .find(|(n, _, _)| *n == name)
            .copied()
            .unwrap_or_default();
        let labels: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        api.apply(
            Kind::Pods,
            pod("shop", &format!("{name}-pod"), uid, node, &labels, rs, cid),
        );
    };
    add("stable", NODE, &labels("v1", "aaa111"), "checkout-aaa111");
    add("canary", NODE, &labels("v2", "bbb222"), "checkout-bbb222");
    add(
        "cart",
        NODE,
        &[("app".into(), "cart".into())],
        "cart-ccc333",
    );
    // The canary's template on another node: the probe must not even be told of it.
    add(
        "elsewhere",
        "other-node",
        &labels("v2", "bbb222"),
        "checkout-bbb222",
    );
    api.apply(
        Kind::Rollouts,
        rollout("shop", "checkout", "aaa111", "bbb222"),
    );

    let collector = Collector::start_with(&dir, free_port(), free_port(), &[])?;
    let metrics_port = free_port();
    let config = dir.join("probe.yaml");
    std::fs::write(
        &config,
        format!(
            "experiment: {EXPERIMENT}\nnode: {NODE}\nkubernetes:\n  kubeconfig: {}\n  labels: [app, version]\n\
             cohorts:\n  - name: baseline\n    kubernetes: {{ namespace: shop, argo_rollout: checkout, role: stable }}\n\
             \x20 - name: canary\n    kubernetes: {{ namespace: shop, argo_rollout: checkout, role: canary }}\n\
             collector:\n  endpoint: {}\n  batch_interval_ms: 100\nmetrics_listen: 127.0.0.1:{metrics_port}\n",
            kubeconfig.display(),
            collector.endpoint()
        ),
    )?;
    let probe = ProbeRun::start(&dir, &["--config".into(), config.display().to_string()])?;
    let log = || std::fs::read_to_string(&probe.log).unwrap_or_default();
    wait_for(
        "both cohorts to have their pod",
        Duration::from_secs(20),
        || members(metrics_port, "baseline") >= 1.0 && members(metrics_port, "canary") >= 1.0,
    )
    .with_context(|| format!("probe log:\n{}", log()))?;

    // The preflight lists the same objects and shows what each cohort takes.
    let check = std::process::Command::new(bakeoff_testkit::process::bin("bakeoff-probe")?)
        .args(["check", "--config"])
        .arg(&config)
        .output()?;
    let text = String::from_utf8_lossy(&check.stdout);
    let line = |what: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(what))
            .unwrap_or_default()
            .to_string()
    };
    ensure!(
        line("kubernetes").starts_with("ok ")
            && line("kubernetes").contains("3 pods on node test-node, 1 Argo Rollouts"),
        "{text}"
    );
    for cohort in ["baseline", "canary"] {
        let l = text
            .lines()
            .find(|l| l.contains(&format!("cohort {cohort} ")))
            .unwrap_or_default();
        ensure!(l.starts_with("ok ") && l.contains("1 cgroups"), "{text}");
    }

    const N: usize = 400;
    send(stable_port, N, "stable")?;
    send(canary_port, N, "canary")?;
    send(cart_port, 50, "cart")?;
    send(elsewhere_port, 50, "elsewhere")?;

    // The API server restarts (watches break), then forgets its history: the probe resumes,
    // gets 410 Gone, lists again, and a canary replica that appears meanwhile joins.
    api.break_watches();
    std::thread::sleep(Duration::from_millis(500));
    api.compact();
    add("canary2", NODE, &labels("v2", "bbb222"), "checkout-bbb222");
    wait_for(
        "the new canary replica to join",
        Duration::from_secs(30),
        || members(metrics_port, "canary") >= 2.0,
    )
    .with_context(|| format!("probe log:\n{}", log()))?;
    send(canary2_port, 100, "canary2")?;

    // Everything sent is in the collector before the probe stops.
    let want = (N + N + 100) as u64;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let groups = collector.get(&format!("/api/v1/groups?experiment={EXPERIMENT}&by=cohort"))?;
        let stored: u64 = groups
            .as_array()
            .context("groups")?
            .iter()
            .filter_map(|g| g["requests"].as_u64())
            .sum();
        if stored >= want || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // The replica goes: its requests are no longer watched (the membership check runs every
    // second; three are waited for).
    api.delete(Kind::Pods, "shop", "canary2-pod");
    std::thread::sleep(Duration::from_secs(3));
    send(canary2_port, 20, "canary2-gone")?;
    std::thread::sleep(Duration::from_millis(500));
    let result = probe.stop()?;

    let mut by_pod: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for e in &result.events {
        by_pod
            .entry(e.pod.clone().unwrap_or_default())
            .or_default()
            .push(e);
    }
    let count = |pod: &str| by_pod.get(pod).map_or(0, Vec::len);
    assert_eq!(count("stable-pod"), N, "pods: {:?}", by_pod.keys());
    assert_eq!(count("canary-pod"), N);
    assert_eq!(
        count("canary2-pod"),
        100,
        "the replica's requests after it was deleted"
    );
    assert_eq!(count("cart-pod"), 0, "another app's pod is in no cohort");
    assert_eq!(count("elsewhere-pod"), 0, "a pod of another node");
    assert_eq!(result.events.len(), 2 * N + 100, "events outside the pods");
    for (pod, cohort, version) in [
        ("stable-pod", "baseline", "v1"),
        ("canary-pod", "canary", "v2"),
        ("canary2-pod", "canary", "v2"),
    ] {
        for e in &by_pod[pod] {
            assert_eq!(e.cohort, cohort, "{pod}");
            assert_eq!(e.namespace.as_deref(), Some("shop"));
            assert_eq!(e.container.as_deref(), Some("app"));
            assert_eq!(
                e.attributes.get("k8s.label.app").map(String::as_str),
                Some("checkout")
            );
            assert_eq!(
                e.attributes.get("k8s.label.version").map(String::as_str),
                Some(version)
            );
            assert!(
                !e.attributes.contains_key("k8s.label.team"),
                "only the selected labels"
            );
        }
    }

    // The probe asked only for this node's pods, and listed again after the 410.
    let requests = api.requests();
    let pod_requests: Vec<_> = requests.iter().filter(|r| r.0 == Kind::Pods).collect();
    assert!(
        pod_requests
            .iter()
            .all(|r| r.2.as_deref() == Some("spec.nodeName=test-node")),
        "{pod_requests:?}"
    );
    let lists = pod_requests.iter().filter(|r| r.1 == "list").count();
    assert!(lists >= 2, "no relist after 410 Gone: {pod_requests:?}");

    // The collector stored them with their pods and judges the experiment: the canary is 7 ms
    // slower on every request.
    let pods = collector.get(&format!(
        "/api/v1/groups?experiment={EXPERIMENT}&by=cohort,pod"
    ))?;
    let mut stored = BTreeMap::new();
    for g in pods.as_array().context("groups")? {
        stored.insert(
            (
                g["key"][0].as_str().unwrap_or_default().to_string(),
                g["key"][1].as_str().unwrap_or_default().to_string(),
            ),
            g["requests"].as_u64().unwrap_or(0),
        );
    }
    assert_eq!(
        stored.get(&("baseline".into(), "stable-pod".into())),
        Some(&(N as u64))
    );
    assert_eq!(
        stored.get(&("canary".into(), "canary-pod".into())),
        Some(&(N as u64))
    );
    let url = format!("/api/v1/verdict?experiment={EXPERIMENT}&baseline=baseline&canary=canary");
    let deadline = Instant::now() + Duration::from_secs(30);
    let verdict = loop {
        let v = collector.get(&url)?;
        let judged = v["requests"]["canary"].as_u64().unwrap_or(0)
            + v["requests"]["baseline"].as_u64().unwrap_or(0);
        if judged == want || Instant::now() > deadline {
            break v;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let (requests, reasons) = (&verdict["requests"], &verdict["reasons"]);
    assert_eq!(requests["baseline"].as_u64(), Some(N as u64), "{requests}");
    assert_eq!(
        requests["canary"].as_u64(),
        Some(N as u64 + 100),
        "{requests}"
    );
    assert_eq!(verdict["decision"], "fail", "{reasons}");
    Ok(())
}

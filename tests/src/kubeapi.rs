//! A Kubernetes API server for tests, speaking the real list/watch wire format over HTTP/1.1
//! for pods (`/api/v1/pods`) and Argo Rollouts (`/apis/argoproj.io/v1alpha1/rollouts`): lists
//! with a `resourceVersion`, chunked watch streams of `{"type":..,"object":..}` lines from a
//! version on, field selectors on `spec.nodeName`, and the failure modes a client must survive
//! (a watch that breaks, a version that is gone: `410 Expired` as a watch ERROR event). No
//! Kubernetes API server can be installed on these hosts; the objects are shaped as the real
//! API returns them.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{Value, json};

/// The resources served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Pods,
    Rollouts,
}

impl Kind {
    fn of_path(path: &str) -> Option<Self> {
        match path {
            "/api/v1/pods" => Some(Kind::Pods),
            "/apis/argoproj.io/v1alpha1/rollouts" => Some(Kind::Rollouts),
            _ => None,
        }
    }

    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Pods => ("PodList", "v1"),
            Kind::Rollouts => ("RolloutList", "argoproj.io/v1alpha1"),
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Current objects by (kind, namespace/name).
    objects: BTreeMap<(Kind, String), Value>,
    /// Every change: (resourceVersion, kind, type, object).
    log: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches from a version below this get `410 Expired`.
    expired_before: u64,
    /// Bumped to end every open watch (a broken connection).
    generation: u64,
    /// Requests served: (kind, "list" | "watch", field selector).
    requests: Vec<(Kind, &'static str, Option<String>)>,
}

/// The server; stops when dropped.
pub struct FakeApi {
    pub port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
}

fn key(o: &Value) -> String {
    format!(
        "{}/{}",
        o["metadata"]["namespace"].as_str().unwrap_or_default(),
        o["metadata"]["name"].as_str().unwrap_or_default()
    )
}

/// `field=value` of a field selector on `spec.nodeName` (the only one the probe uses).
fn selected(o: &Value, selector: Option<&str>) -> bool {
    match selector.and_then(|s| s.strip_prefix("spec.nodeName=")) {
        Some(node) => o["spec"]["nodeName"].as_str() == Some(node),
        None => true,
    }
}

fn query_value(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| percent_decode(v))
    })
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl FakeApi {
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the fake API")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            let (state, stop) = (state.clone(), stop.clone());
                            std::thread::spawn(move || {
                                let _ = serve(stream, &state, &stop);
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            });
        }
        Ok(Self { port, state, stop })
    }

    /// A kubeconfig pointing at this server, written to `path`.
    pub fn write_kubeconfig(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{}\nusers:\n- name: probe\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: probe\ncurrent-context: fake\n",
                self.port
            ),
        )?;
        Ok(())
    }

    /// Creates or replaces an object (ADDED or MODIFIED to watchers).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let Ok(mut s) = self.state.lock() else { return };
        s.rv += 1;
        let rv = s.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let k = (kind, key(&object));
        let kind_of_change = if s.objects.contains_key(&k) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(k, object.clone());
        s.log.push((rv, kind, kind_of_change, object));
    }

    /// Deletes an object by namespace/name (DELETED to watchers).
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let Ok(mut s) = self.state.lock() else { return };
        if let Some(mut object) = s.objects.remove(&(kind, format!("{namespace}/{name}"))) {
            s.rv += 1;
            let rv = s.rv;
            object["metadata"]["resourceVersion"] = json!(rv.to_string());
            s.log.push((rv, kind, "DELETED", object));
        }
    }

    /// Ends every open watch, as a restarting API server or a dropped connection does.
    pub fn break_watches(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.generation += 1;
        }
    }

    /// Forgets the history up to now: a watch resumed from an earlier version gets `410`.
    pub fn compact(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.expired_before = s.rv + 1;
            s.generation += 1;
        }
    }

    /// (kind, "list" | "watch", field selector) of every request served so far.
    pub fn requests(&self) -> Vec<(Kind, &'static str, Option<String>)> {
        self.state
            .lock()
            .map(|s| s.requests.clone())
            .unwrap_or_default()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn serve(stream: TcpStream, state: &Mutex<State>, stop: &AtomicBool) -> Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut out = stream;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        // Headers (no request the client sends here has a body).
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
                break;
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let Some(kind) = Kind::of_path(path) else {
            let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#;
            write!(
                out,
                "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        };
        let selector = query_value(query, "fieldSelector");
        if query_value(query, "watch").as_deref() == Some("true") {
            let from: u64 = query_value(query, "resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if let Ok(mut s) = state.lock() {
                s.requests.push((kind, "watch", selector.clone()));
            }
            watch(&mut out, state, stop, kind, from, selector.as_deref())?;
            // A watch ends its connection.
            return Ok(());
        }
        let body = {
            let mut s = state
                .lock()
                .map_err(|_| anyhow::anyhow!("fake API state poisoned"))?;
            s.requests.push((kind, "list", selector.clone()));
            let items: Vec<&Value> = s
                .objects
                .iter()
                .filter(|((k, _), o)| *k == kind && selected(o, selector.as_deref()))
                .map(|(_, o)| o)
                .collect();
            let (list_kind, api_version) = kind.list();
            json!({
                "kind": list_kind,
                "apiVersion": api_version,
                "metadata": {"resourceVersion": s.rv.to_string()},
                "items": items,
            })
            .to_string()
        };
        write!(
            out,
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

fn chunk(out: &mut TcpStream, line: &str) -> std::io::Result<()> {
    write!(out, "{:x}\r\n{line}\n\r\n", line.len() + 1)?;
    out.flush()
}

fn watch(
    out: &mut TcpStream,
    state: &Mutex<State>,
    stop: &AtomicBool,
    kind: Kind,
    from: u64,
    selector: Option<&str>,
) -> Result<()> {
    write!(
        out,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )?;
    let (generation, expired) = {
        let s = state
            .lock()
            .map_err(|_| anyhow::anyhow!("fake API state poisoned"))?;
        (s.generation, from < s.expired_before)
    };
    if expired {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from}"), "reason": "Expired", "code": 410}});
        chunk(out, &gone.to_string())?;
        write!(out, "0\r\n\r\n")?;
        return Ok(());
    }
    let mut sent = from;
    let started = Instant::now();
    while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
        let events: Vec<String> = {
            let s = state
                .lock()
                .map_err(|_| anyhow::anyhow!("fake API state poisoned"))?;
            if s.generation != generation {
                break;
            }
            let new: Vec<String> = s
                .log
                .iter()
                .filter(|(rv, k, _, o)| *rv > sent && *k == kind && selected(o, selector))
                .map(|(_, _, t, o)| json!({"type": t, "object": o}).to_string())
                .collect();
            sent = s.rv;
            new
        };
        for e in events {
            chunk(out, &e)?;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    write!(out, "0\r\n\r\n")?;
    Ok(())
}

/// A pod as the API returns it: on `node`, owned by ReplicaSet `replica_set`, with one
/// container `app` whose containerd id is `container_id`.
pub fn pod(
    namespace: &str,
    name: &str,
    uid: &str,
    node: &str,
    labels: &[(&str, &str)],
    replica_set: &str,
    container_id: &str,
) -> Value {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "labels": labels,
            "ownerReferences": [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set,
                "uid": format!("rs-{uid}"), "controller": true, "blockOwnerDeletion": true
            }]
        },
        "spec": {
            "nodeName": node,
            "containers": [{"name": "app", "image": "registry.example/app:1"}]
        },
        "status": {
            "phase": "Running",
            "qosClass": "Burstable",
            "containerStatuses": [{
                "name": "app", "ready": true, "restartCount": 0,
                "image": "registry.example/app:1", "imageID": "",
                "containerID": format!("containerd://{container_id}"),
                "state": {"running": {"startedAt": "2026-12-02T00:00:00Z"}}
            }]
        }
    })
}

/// An Argo Rollout whose status names its stable and current pod template hashes.
pub fn rollout(namespace: &str, name: &str, stable: &str, current: &str) -> Value {
    json!({
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Rollout",
        "metadata": {"name": name, "namespace": namespace, "uid": format!("ro-{name}")},
        "spec": {"strategy": {"canary": {"steps": [{"setWeight": 20}]}}},
        "status": {"stableRS": stable, "currentPodHash": current}
    })
}

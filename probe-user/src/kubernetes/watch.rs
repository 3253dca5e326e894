//! The watches that keep a `View` current: the pods of this node (field selector on
//! `spec.nodeName`) and, when a rule names one, Argo Rollouts. kube-runtime's watcher lists,
//! then watches from the list's resourceVersion, resumes a broken watch from the last version
//! it saw, and lists again when the API says that version is gone (410); errors are retried
//! with backoff, so an API server restart only delays updates.

use std::{
    collections::HashMap,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind},
    runtime::{WatchStreamExt, watcher},
};

use super::{PodFacts, RolloutHashes, View};
use crate::config::KubernetesConfig;

/// Why the Kubernetes API cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read kubeconfig {path}: {source}")]
    Kubeconfig {
        path: std::path::PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("no Kubernetes API configuration (in-cluster service account or KUBECONFIG): {0}")]
    Infer(#[from] kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// Counters of the watches, for logs and `/metrics`.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Errors of the API (each retried with backoff).
    pub errors: AtomicU64,
    /// Complete lists received (the first, then one after each `410 Gone` or restart).
    pub lists: AtomicU64,
}

/// A client for the configured API: a kubeconfig file, or in-cluster / `KUBECONFIG`.
pub async fn client(config: &KubernetesConfig) -> Result<Client, KubeError> {
    let c = match &config.kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|source| {
                KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                }
            })?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .map_err(|source| KubeError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?
        }
        None => kube::Config::infer().await?,
    };
    Ok(Client::try_from(c)?)
}

/// What the probe keeps of a pod.
pub fn facts_of(pod: &Pod) -> Option<PodFacts> {
    let meta = &pod.metadata;
    let replica_set = meta.owner_references.as_ref().and_then(|o| {
        o.iter()
            .find(|r| r.kind == "ReplicaSet")
            .map(|r| r.name.clone())
    });
    let containers = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .map(|statuses| {
            statuses
                .iter()
                .map(|c| {
                    let id = c.container_id.as_deref().unwrap_or_default();
                    // `containerd://<id>`, `cri-o://<id>`, `docker://<id>`.
                    let id = id.split_once("://").map_or(id, |(_, id)| id);
                    (c.name.clone(), id.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    Some(PodFacts {
        uid: meta.uid.clone()?,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        replica_set,
        containers,
    })
}

/// What the probe keeps of an Argo Rollout: (namespace, name) and its hashes.
pub fn rollout_of(o: &DynamicObject) -> Option<((String, String), RolloutHashes)> {
    let status = o.data.get("status");
    let text = |k: &str| {
        status
            .and_then(|s| s.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    Some((
        (
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone()?,
        ),
        RolloutHashes {
            stable: text("stableRS"),
            current: text("currentPodHash"),
        },
    ))
}

/// One list of this node's pods (and, with `rollouts`, of Argo Rollouts): what `check` shows.
pub async fn list_once(
    client: Client,
    node: &str,
    rollouts: bool,
) -> Result<super::Snapshot, KubeError> {
    let api: Api<Pod> = Api::all(client.clone());
    let pods = api
        .list(&kube::api::ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await?;
    let mut snap = super::Snapshot {
        pods: pods
            .items
            .iter()
            .filter_map(facts_of)
            .map(|f| (f.uid.clone(), f))
            .collect(),
        rollouts: HashMap::new(),
        synced: true,
    };
    if rollouts {
        let resource =
            ApiResource::from_gvk(&GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Rollout"));
        let api: Api<DynamicObject> = Api::all_with(client, &resource);
        snap.rollouts = api
            .list(&Default::default())
            .await?
            .items
            .iter()
            .filter_map(rollout_of)
            .collect();
    }
    Ok(snap)
}

/// Keeps `view`'s pods current, forever.
pub async fn pods(client: Client, node: String, view: Arc<View>, stats: Arc<WatchStats>) {
    let api: Api<Pod> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
    let mut listing: Option<HashMap<String, PodFacts>> = None;
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "watching this node's pods (retrying)");
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let (Some(l), Some(f)) = (listing.as_mut(), facts_of(&p)) {
                    l.insert(f.uid.clone(), f);
                }
            }
            watcher::Event::InitDone => {
                if let (Some(l), Ok(mut snap)) = (listing.take(), view.snapshot.write()) {
                    tracing::info!(pods = l.len(), node = %node, "pods of this node listed");
                    snap.pods = l;
                    snap.synced = true;
                }
                stats.lists.fetch_add(1, Ordering::Relaxed);
            }
            watcher::Event::Apply(p) => {
                if let (Some(f), Ok(mut snap)) = (facts_of(&p), view.snapshot.write()) {
                    snap.pods.insert(f.uid.clone(), f);
                }
            }
            watcher::Event::Delete(p) => {
                if let (Some(uid), Ok(mut snap)) = (p.metadata.uid.as_ref(), view.snapshot.write())
                {
                    snap.pods.remove(uid);
                }
            }
        }
    }
}

/// Keeps `view`'s Argo Rollouts current, forever.
pub async fn rollouts(client: Client, view: Arc<View>, stats: Arc<WatchStats>) {
    let resource =
        ApiResource::from_gvk(&GroupVersionKind::gvk("argoproj.io", "v1alpha1", "Rollout"));
    let api: Api<DynamicObject> = Api::all_with(client, &resource);
    let mut listing: Option<super::Rollouts> = None;
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                stats.errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "watching Argo Rollouts (retrying)");
                continue;
            }
        };
        match event {
            watcher::Event::Init => listing = Some(HashMap::new()),
            watcher::Event::InitApply(o) => {
                if let (Some(l), Some((k, v))) = (listing.as_mut(), rollout_of(&o)) {
                    l.insert(k, v);
                }
            }
            watcher::Event::InitDone => {
                if let (Some(l), Ok(mut snap)) = (listing.take(), view.snapshot.write()) {
                    snap.rollouts = l;
                }
                stats.lists.fetch_add(1, Ordering::Relaxed);
            }
            watcher::Event::Apply(o) => {
                if let (Some((k, v)), Ok(mut snap)) = (rollout_of(&o), view.snapshot.write()) {
                    snap.rollouts.insert(k, v);
                }
            }
            watcher::Event::Delete(o) => {
                if let (Some((k, _)), Ok(mut snap)) = (rollout_of(&o), view.snapshot.write()) {
                    snap.rollouts.remove(&k);
                }
            }
        }
    }
}

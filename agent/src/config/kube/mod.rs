//! The Kubernetes API as a config source: the same `Config` as the
//! directory source, published through the same [`ConfigWatcher`], so the
//! node agent does not care which source runs.
//!
//! One kube-runtime watcher per kind (Namespaces; this node's Pods by field
//! selector `spec.nodeName`; ServiceEntry, DestinationRule, WorkloadEntry,
//! AuthorizationPolicy, waypoint Gateways) feeds a reflector store. The
//! watchers relist on `410 Gone`, resume from bookmarks and back off on
//! errors. Whenever a store changes (debounced), or a periodic look finds a
//! pod's cgroup the kubelet has just created (or a changed mesh file),
//! every object is rendered to YAML and
//! parsed by the directory source's own parser ([`Snapshot::parse`]): one
//! parser, one set of validation rules; an invalid object rejects the whole
//! snapshot and the previous config stays in force, exactly as for a file.
//!
//! Nothing is published until every kind has been listed once, and a lost
//! API connection publishes nothing: the stores keep their last content, so
//! the last good config stays in force. The connection state is published on
//! [`ConfigWatcher::health`] (metrics, `shunt status`).

pub mod cgroup;
pub mod controller;
pub mod lease;
pub mod node_auth;
pub mod pods;

#[cfg(test)]
mod controller_tests;
/// The in-process fake API server; outside this crate's unit tests only
/// with the `fake-api` feature (the kernel test `tests/tests/kube_node.rs`).
#[cfg(any(test, feature = "fake-api"))]
pub mod fake;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashSet};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ::kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use ::kube::runtime::reflector::{self, store::Writer, Store};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::Client;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use serde_json::Value;
use tokio::sync::{watch, Notify};

use super::render::ServiceEntryStatus;
use super::watch::{ConfigWatcher, SourceHealth};
use super::{Config, ConfigError, ObjectKey, Parser, Problem, Snapshot, WAYPOINT_CLASS};
use crate::telemetry::LogLimit;

/// The Istio and Gateway API kinds read, as (group, version, kind, plural).
/// Istio's base chart and the Gateway API standard channel install their
/// CRDs; a kind whose CRD is missing (404) counts as having no objects.
pub const ISTIO_KINDS: [(&str, &str, &str, &str); 5] = [
    (
        "networking.istio.io",
        "v1",
        "ServiceEntry",
        "serviceentries",
    ),
    (
        "networking.istio.io",
        "v1",
        "DestinationRule",
        "destinationrules",
    ),
    (
        "networking.istio.io",
        "v1",
        "WorkloadEntry",
        "workloadentries",
    ),
    (
        "security.istio.io",
        "v1",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    ("gateway.networking.k8s.io", "v1", "Gateway", "gateways"),
];

#[derive(Clone, Debug)]
pub struct KubeOptions {
    /// This node's name (`spec.nodeName` of the pods it serves).
    pub node_name: String,
    /// Watch this node's Pods (the agent). The controller and waypoints
    /// serve no pods and do not.
    pub watch_pods: bool,
    /// MeshConfig (`trustDomain`, `outboundTrafficPolicy`, `shunt`), a file
    /// named `mesh.yaml`/`mesh.yml`, usually a ConfigMap volume; re-read on
    /// every rebuild. `None`: MeshConfig defaults.
    pub mesh_file: Option<PathBuf>,
    /// The kubelet's cgroup root as seen by the agent (the cgroup2 mount).
    pub kubelet_cgroup_root: PathBuf,
    /// How often pods' cgroups are looked for (and the mesh file re-read).
    /// Containers need no scan: the kernel enrolls everything below a
    /// pod's cgroup.
    pub rescan: Duration,
    /// Quiet time after a change before the config is rebuilt.
    pub debounce: Duration,
}

impl KubeOptions {
    pub fn new(node_name: String, kubelet_cgroup_root: PathBuf) -> Self {
        Self {
            node_name,
            watch_pods: true,
            mesh_file: None,
            kubelet_cgroup_root,
            rescan: Duration::from_millis(500),
            debounce: Duration::from_millis(100),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: ::kube::config::KubeconfigError,
    },
    #[error("no in-cluster config (KUBERNETES_SERVICE_HOST, service account token) and no kubeconfig: {0}")]
    Infer(#[from] ::kube::config::InferConfigError),
    #[error("Kubernetes client: {0}")]
    Client(#[from] ::kube::Error),
    #[error("mesh config {}: the file must be named mesh.yaml or mesh.yml", .0.display())]
    MeshName(PathBuf),
}

/// A client from `kubeconfig`, else the in-cluster service account (else
/// `$KUBECONFIG` / `~/.kube/config`).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, KubeError> {
    let cfg = match kubeconfig {
        Some(p) => {
            let err = |source| KubeError::Kubeconfig {
                path: p.to_path_buf(),
                source,
            };
            let kc = ::kube::config::Kubeconfig::read_from(p).map_err(err)?;
            ::kube::Config::from_custom_kubeconfig(kc, &Default::default())
                .await
                .map_err(err)?
        }
        None => ::kube::Config::infer().await?,
    };
    client_from(cfg)
}

/// The client shunt uses for `cfg`. kube's own retry of 429/503/504 (up to
/// 15 times, minutes apart) is off: the watchers back off themselves, and an
/// unavailable API server must show in the source's health at once.
pub fn client_from(mut cfg: ::kube::Config) -> Result<Client, KubeError> {
    cfg.default_retry = false;
    Ok(Client::try_from(cfg)?)
}

/// Starts the watchers and the rebuild task. Must be called inside a tokio
/// runtime; the returned watcher has no config until every kind is listed.
pub fn spawn(client: Client, opts: KubeOptions) -> Result<ConfigWatcher, KubeError> {
    if let Some(m) = &opts.mesh_file {
        let ok = m
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n == "mesh.yaml" || n == "mesh.yml");
        if !ok {
            return Err(KubeError::MeshName(m.clone()));
        }
    }
    let (cfg_tx, config) = watch::channel(None);
    let (rej_tx, rejected) = watch::channel(None);
    let (health_tx, health) = watch::channel(SourceHealth {
        source: "kubernetes",
        up: false,
        error: Some("not listed yet".into()),
        last_sync: None,
    });
    let shared = Arc::new(Shared {
        dirty: Notify::new(),
        kinds: Mutex::new(BTreeMap::new()),
        expected: ISTIO_KINDS.len() + 1 + usize::from(opts.watch_pods),
        health: health_tx,
    });
    let mut tasks = Vec::new();

    let ns_api: Api<Namespace> = Api::all(client.clone());
    let (namespaces, w) = reflector::store();
    tasks.push(tokio::spawn(run_kind(
        "Namespace",
        ns_api,
        watcher::Config::default(),
        w,
        shared.clone(),
    )));

    let (pods, w) = reflector::store();
    if opts.watch_pods {
        let pod_api: Api<Pod> = Api::all(client.clone());
        let sel = format!("spec.nodeName={}", opts.node_name);
        tasks.push(tokio::spawn(run_kind(
            "Pod",
            pod_api,
            watcher::Config::default().fields(&sel),
            w,
            shared.clone(),
        )));
    }

    let mut istio = Vec::new();
    for (group, version, kind, plural) in ISTIO_KINDS {
        let ar =
            ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
        let w = Writer::new(ar.clone());
        istio.push((ar, w.as_reader()));
        tasks.push(tokio::spawn(run_kind(
            kind,
            api,
            watcher::Config::default(),
            w,
            shared.clone(),
        )));
    }

    let stores = Stores {
        namespaces,
        pods,
        istio,
    };
    let task = tokio::spawn(async move {
        let _watchers = AbortAll(tasks);
        rebuild_loop(stores, opts, shared, cfg_tx, rej_tx).await
    });
    Ok(ConfigWatcher::from_parts(config, rejected, health, task))
}

/// Aborts the per-kind watcher tasks when the rebuild task ends.
struct AbortAll(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortAll {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// State shared by the watcher tasks and the rebuild task.
struct Shared {
    dirty: Notify,
    kinds: Mutex<BTreeMap<&'static str, KindHealth>>,
    /// How many kinds are watched.
    expected: usize,
    health: watch::Sender<SourceHealth>,
}

#[derive(Clone, Debug, Default)]
struct KindHealth {
    /// Listed completely at least once.
    synced: bool,
    /// The last request succeeded.
    up: bool,
    error: Option<String>,
}

impl Shared {
    fn update(&self, kind: &'static str, f: impl FnOnce(&mut KindHealth), synced_now: bool) {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        f(kinds.entry(kind).or_default());
        let all = kinds.len() == self.expected;
        let up = all && kinds.values().all(|k| k.synced && k.up);
        let error = kinds
            .iter()
            .find_map(|(k, h)| h.error.as_ref().map(|e| format!("{k}: {e}")))
            .or_else(|| {
                kinds
                    .iter()
                    .find(|(_, h)| !h.synced)
                    .map(|(k, _)| format!("{k}: not listed yet"))
            });
        self.health.send_if_modified(|h| {
            let mut changed = h.up != up || h.error != error;
            h.up = up;
            h.error = error;
            if up && synced_now {
                h.last_sync = Some(SystemTime::now());
                changed = true;
            }
            changed
        });
    }

    fn is_synced(&self, kind: &str) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.get(kind).is_some_and(|h| h.synced)
    }

    fn is_up(&self, kind: &str) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.get(kind).is_some_and(|h| h.up)
    }

    fn all_synced(&self) -> bool {
        let kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        kinds.len() == self.expected && kinds.values().all(|k| k.synced)
    }
}

/// Drives one kind's watcher into its store, recording its health.
async fn run_kind<K>(
    kind: &'static str,
    api: Api<K>,
    cfg: watcher::Config,
    writer: Writer<K>,
    shared: Arc<Shared>,
) where
    K: ::kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + Hash + Clone,
{
    shared.update(kind, |_| {}, false);
    let stream = reflector::reflector(writer, watcher(api.clone(), cfg).default_backoff());
    futures::pin_mut!(stream);
    // A watch that reconnects after an outage yields nothing until the next
    // change, so while down a one-item metadata list tells when it is back.
    // Not at once: before the first list the kind is "not up" too, and a
    // probe then would be a second list racing the watcher's own.
    let mut probe =
        tokio::time::interval_at(tokio::time::Instant::now() + PROBE_EVERY, PROBE_EVERY);
    probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let ev = tokio::select! {
            ev = stream.next() => match ev { Some(ev) => ev, None => return },
            _ = probe.tick() => {
                if !shared.is_up(kind) {
                    let lp = ::kube::api::ListParams::default().limit(1);
                    if api.list_metadata(&lp).await.is_ok() {
                        tracing::info!(kind, "Kubernetes API reachable again");
                        shared.update(kind, mark_up, false);
                    }
                }
                continue;
            }
        };
        match ev {
            Ok(watcher::Event::Init) | Ok(watcher::Event::InitApply(_)) => {
                shared.update(kind, mark_up, false);
            }
            Ok(watcher::Event::InitDone) => {
                shared.update(
                    kind,
                    |h| {
                        mark_up(h);
                        h.synced = true;
                    },
                    true,
                );
                shared.dirty.notify_one();
            }
            Ok(watcher::Event::Apply(_)) | Ok(watcher::Event::Delete(_)) => {
                shared.update(kind, mark_up, true);
                shared.dirty.notify_one();
            }
            Err(watcher::Error::InitialListFailed(::kube::Error::Api(s))) if s.is_not_found() => {
                // The kind's CRD is not installed: there are no such
                // objects. The watcher keeps retrying, so installing the CRD
                // later brings them in.
                if !shared.is_synced(kind) {
                    tracing::warn!(kind, "CRD not installed (404); counted as no objects");
                }
                shared.update(
                    kind,
                    |h| {
                        mark_up(h);
                        h.synced = true;
                    },
                    true,
                );
                shared.dirty.notify_one();
            }
            Err(watcher::Error::WatchError(e)) if e.code == 410 => {
                // Expired resourceVersion: the watcher relists; the store
                // keeps its content until the new list is complete.
                tracing::debug!(kind, "watch expired (410 Gone); relisting");
            }
            Err(e) => {
                if shared.is_up(kind) {
                    tracing::warn!(kind, error = %e, "Kubernetes API unreachable; the last good config stays in force");
                }
                shared.update(
                    kind,
                    |h| {
                        h.up = false;
                        h.error = Some(e.to_string());
                    },
                    false,
                );
            }
        }
    }
}

/// How often a kind that is down is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);

fn mark_up(h: &mut KindHealth) {
    h.up = true;
    h.error = None;
}

/// Readers of every store.
struct Stores {
    namespaces: Store<Namespace>,
    pods: Store<Pod>,
    istio: Vec<(ApiResource, Store<DynamicObject>)>,
}

async fn rebuild_loop(
    stores: Stores,
    opts: KubeOptions,
    shared: Arc<Shared>,
    cfg_tx: watch::Sender<Option<Arc<Config>>>,
    rej_tx: watch::Sender<Option<Arc<ConfigError>>>,
) {
    let mut tick = tokio::time::interval(opts.rescan);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_digest = None;
    // One pseudo file per object: an update re-parses only what changed.
    let mut parser = Parser::default();
    loop {
        tokio::select! {
            _ = shared.dirty.notified() => {
                // Coalesce a burst (a relist, kubectl apply of many files).
                tokio::time::sleep(opts.debounce).await;
            }
            _ = tick.tick() => {}
        }
        if !shared.all_synced() {
            continue;
        }
        let snap = match snapshot(&stores, &opts) {
            Ok(s) => s,
            Err(e) => {
                let d = Some(hash_str(&e.to_string()));
                if last_digest != d {
                    last_digest = d;
                    tracing::error!("config rejected, previous config stays in force: {e}");
                    rej_tx.send_replace(Some(Arc::new(e)));
                }
                continue;
            }
        };
        if last_digest == Some(snap.digest) {
            continue;
        }
        last_digest = Some(snap.digest);
        match parser.parse(Arc::new(snap)) {
            Ok(mut c) => {
                c.api_status = Some(api_status(&stores));
                tracing::info!(
                    source = "kubernetes",
                    service_entries = c.service_entries.len(),
                    workload_entries = c.workload_entries.len(),
                    gateways = c.gateways.len(),
                    authorization_policies = c.authorization_policies.len(),
                    destination_rules = c.destination_rules.len(),
                    "config loaded"
                );
                rej_tx.send_replace(None);
                if cfg_tx.send(Some(Arc::new(c))).is_err() {
                    return;
                }
            }
            Err(e) => {
                tracing::error!("config rejected, previous config stays in force: {e}");
                rej_tx.send_replace(Some(Arc::new(e)));
            }
        }
    }
}

/// Every object of the stores (and the mesh file) as a directory snapshot:
/// one pseudo file per object, named `<apiVersion>/<Kind>/<ns>/<name>`,
/// in that order.
fn snapshot(stores: &Stores, opts: &KubeOptions) -> Result<Snapshot, ConfigError> {
    let mut files: Vec<(PathBuf, Vec<u8>)> = Vec::new();
    let mut push = |path: String, v: &Value| {
        // Rendering a JSON value as YAML cannot fail; skip it if it did.
        if let Ok(y) = serde_yaml_ng::to_string(v) {
            files.push((PathBuf::from(path), y.into_bytes()));
        }
    };
    for ns in stores.namespaces.state() {
        let mut v = serde_json::to_value(&*ns).unwrap_or(Value::Null);
        tidy(&mut v, "v1", "Namespace");
        let name = ns.metadata.name.clone().unwrap_or_default();
        push(format!("v1/Namespace/{name}"), &v);
    }
    let mut real_workload_entries = HashSet::new();
    for (ar, store) in &stores.istio {
        for obj in store.state() {
            let mut v = serde_json::to_value(&*obj).unwrap_or(Value::Null);
            tidy(&mut v, &ar.api_version, &ar.kind);
            if ar.kind == "Gateway" && !is_waypoint(&v) {
                // Ingress and other Gateways are not shunt's to validate.
                continue;
            }
            if ar.kind == "Gateway" {
                status_addresses_to_spec(&mut v);
            }
            let ns = obj.metadata.namespace.clone().unwrap_or_default();
            let name = obj.metadata.name.clone().unwrap_or_default();
            if ar.kind == "WorkloadEntry" {
                real_workload_entries.insert((ns.clone(), name.clone()));
                drop_cgroup_annotations(&mut v, &ns, &name);
            }
            push(format!("{}/{}/{ns}/{name}", ar.api_version, ar.kind), &v);
        }
    }
    for pod in stores.pods.state() {
        match pods::workload_entry(&pod, &opts.node_name, &opts.kubelet_cgroup_root) {
            Ok(pods::PodWorkload { entry: v, .. }) => {
                let ns = pod.metadata.namespace.clone().unwrap_or_default();
                let name = pod.metadata.name.clone().unwrap_or_default();
                if real_workload_entries.contains(&(ns.clone(), name.clone())) {
                    tracing::debug!(pod = %format!("{ns}/{name}"), "a WorkloadEntry of the same name exists; the pod is not added");
                    continue;
                }
                push(format!("v1/Pod/{ns}/{name}"), &v);
            }
            Err(why) => tracing::trace!(pod = ?pod.metadata.name, ?why, "pod is not a workload"),
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(m) = &opts.mesh_file {
        match std::fs::read(m) {
            Ok(b) => files.insert(0, (m.clone(), b)),
            Err(e) => {
                return Err(ConfigError::Invalid(vec![Problem {
                    file: m.clone(),
                    doc: None,
                    object: None,
                    field: None,
                    message: format!("cannot read: {e}"),
                }]))
            }
        }
    }
    Ok(Snapshot::new(files))
}

/// Every ServiceEntry's `status` as the API server holds it (an
/// unreadable status counts as none: agents then give the entry no VIP).
fn api_status(stores: &Stores) -> BTreeMap<ObjectKey, ServiceEntryStatus> {
    let mut out = BTreeMap::new();
    for (ar, store) in &stores.istio {
        if ar.kind != "ServiceEntry" {
            continue;
        }
        for obj in store.state() {
            let Some(st) = obj.data.get("status") else {
                continue;
            };
            let Ok(st) = serde_json::from_value::<ServiceEntryStatus>(st.clone()) else {
                tracing::debug!(name = ?obj.metadata.name, "unreadable ServiceEntry status");
                continue;
            };
            let key = ObjectKey::new(
                obj.metadata.namespace.as_deref().unwrap_or(""),
                obj.metadata.name.as_deref().unwrap_or(""),
            );
            out.insert(key, st);
        }
    }
    out
}

/// Sets apiVersion/kind (list items may omit them) and drops
/// `metadata.managedFields` (server bookkeeping, often larger than the spec).
/// Only the entries this source makes of the node's pods name cgroups. A
/// WorkloadEntry from the API that did would let anyone who may create one
/// in some namespace enroll another namespace's pods, or the node's own
/// processes (the programs are attached at the node's cgroup root), as
/// their workload: its `shunt.io/cgroup*` annotations are dropped.
fn drop_cgroup_annotations(v: &mut Value, ns: &str, name: &str) {
    static DROPPED: LogLimit = LogLimit::new(Duration::from_secs(60));
    let Some(Value::Object(annotations)) = v.pointer_mut("/metadata/annotations") else {
        return;
    };
    let before = annotations.len();
    annotations.retain(|k, _| !k.starts_with(super::labels::CGROUP_ANNOTATION));
    if annotations.len() != before {
        if let Some(suppressed) = DROPPED.allow() {
            tracing::warn!(
                workload_entry = %format!("{ns}/{name}"),
                suppressed,
                "ignoring the cgroup annotations of a WorkloadEntry from the API: only this node's pods are enrolled by cgroup"
            );
        }
    }
}

fn tidy(v: &mut Value, api_version: &str, kind: &str) {
    if let Value::Object(m) = v {
        m.insert("apiVersion".into(), Value::String(api_version.into()));
        m.insert("kind".into(), Value::String(kind.into()));
        if let Some(Value::Object(md)) = m.get_mut("metadata") {
            md.remove("managedFields");
        }
    }
}

fn is_waypoint(v: &Value) -> bool {
    v.pointer("/spec/gatewayClassName").and_then(Value::as_str) == Some(WAYPOINT_CLASS)
}

/// In a cluster Istio writes a waypoint's address to `status.addresses`;
/// the directory format has it in `spec.addresses`. Copy when the spec has
/// none.
fn status_addresses_to_spec(v: &mut Value) {
    let has_spec = v
        .pointer("/spec/addresses")
        .and_then(Value::as_array)
        .is_some_and(|a| !a.is_empty());
    if has_spec {
        return;
    }
    let Some(addrs) = v.pointer("/status/addresses").cloned() else {
        return;
    };
    if let Some(Value::Object(spec)) = v.get_mut("spec") {
        spec.insert("addresses".into(), addrs);
    }
}

fn hash_str(s: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

//! The API source against the in-process fake API server (see `fake`).

use serde_json::json;

use super::fake::FakeApi;
use super::*;
use crate::config::{labels, Resource};

pub(super) fn seed_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/egress")
}

/// Every document of the seed's YAML files (not mesh.yaml), as JSON.
pub(super) fn seed_objects() -> Vec<Value> {
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(seed_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("mesh.yaml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc).unwrap();
            if !v.is_null() {
                out.push(v);
            }
        }
    }
    out
}

fn opts(node: &str, cgroups: &Path) -> KubeOptions {
    KubeOptions {
        mesh_file: Some(seed_dir().join("mesh.yaml")),
        rescan: Duration::from_millis(50),
        debounce: Duration::from_millis(20),
        ..KubeOptions::new(node.into(), cgroups.to_path_buf())
    }
}

/// Waits until the published config satisfies `f`.
async fn config_where(w: &mut ConfigWatcher, f: impl Fn(&Config) -> bool) -> Arc<Config> {
    let res = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(c) = w.config.borrow_and_update().clone() {
                if f(&c) {
                    return c;
                }
            }
            w.config.changed().await.unwrap();
        }
    })
    .await;
    res.expect("config not published in time")
}

async fn health_where(w: &mut ConfigWatcher, f: impl Fn(&SourceHealth) -> bool) -> SourceHealth {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let h = w.health.borrow_and_update().clone();
            if f(&h) {
                return h;
            }
            w.health.changed().await.unwrap();
        }
    })
    .await
    .unwrap_or_else(|_| panic!("health not reached in time: {:?}", w.health.borrow()))
}

/// What the rest of shunt reads from a Config, without where it came from
/// (file vs API path) and what the server adds (uid, resourceVersion,
/// creationTimestamp).
fn semantic(c: &Config) -> String {
    fn strip<S: Clone + std::fmt::Debug>(rs: &[std::sync::Arc<Resource<S>>]) -> Vec<String> {
        let mut v: Vec<String> = rs
            .iter()
            .map(|r| {
                let mut r = (**r).clone();
                r.origin = Default::default();
                r.created = None;
                r.metadata.other.clear();
                r.metadata.creation_timestamp = None;
                format!("{:?}/{:?}", r.metadata, r.spec)
            })
            .collect();
        v.sort();
        v
    }
    let ns: Vec<_> = c
        .namespaces
        .values()
        .map(|n| (n.name().to_string(), n.metadata.labels.clone()))
        .collect();
    format!(
        "mesh={:?}\nns={ns:?}\nse={:?}\ndr={:?}\ngw={:?}\nwe={:?}\nap={:?}",
        c.mesh,
        strip(&c.service_entries),
        strip(&c.destination_rules),
        strip(&c.gateways),
        strip(&c.workload_entries),
        strip(&c.authorization_policies),
    )
}

async fn seeded() -> (FakeApi, ConfigWatcher, tempfile::TempDir) {
    let fake = FakeApi::start().await;
    for o in seed_objects() {
        fake.apply(o);
    }
    let cg = tempfile::tempdir().unwrap();
    let w = spawn(fake.client(), opts("node-a", cg.path())).unwrap();
    (fake, w, cg)
}

fn se_port(c: &Config) -> Option<u16> {
    c.service_entries
        .iter()
        .find(|s| s.name() == "httpbin.org")
        .and_then(|s| s.spec.ports.first())
        .map(|p| p.number.0)
}

#[tokio::test]
async fn the_seed_through_the_api_gives_the_config_the_directory_gives() {
    let mut dir = Config::load_dir(&seed_dir()).unwrap();
    let (_fake, mut w, _cg) = seeded().await;
    let api = config_where(&mut w, |_| true).await;
    // But for the seed's cgroup annotations: from the API only pods enroll
    // by cgroup (`a_workload_entry_from_the_api_enrolls_no_cgroup`).
    for we in &mut dir.workload_entries {
        assert!(std::sync::Arc::make_mut(we)
            .metadata
            .annotations
            .remove(labels::CGROUP_ANNOTATION)
            .is_some());
    }
    assert_eq!(semantic(&api), semantic(&dir));
    assert!(!dir.service_entries.is_empty() && !dir.authorization_policies.is_empty());
    let h = health_where(&mut w, |h| h.up).await;
    assert_eq!(h.source, "kubernetes");
    assert!(h.last_sync.is_some());
}

#[tokio::test]
async fn an_edit_arriving_as_a_watch_event_is_published() {
    let (fake, mut w, _cg) = seeded().await;
    config_where(&mut w, |c| se_port(c) == Some(80)).await;
    let mut se = seed_objects()
        .into_iter()
        .find(|o| o["kind"] == "ServiceEntry")
        .unwrap();
    se["spec"]["ports"][0]["number"] = json!(8080);
    fake.apply(se);
    config_where(&mut w, |c| se_port(c) == Some(8080)).await;
    // A delete is an event too.
    fake.delete(
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "common-infrastructure",
        "httpbin",
    );
    config_where(&mut w, |c| c.authorization_policies.is_empty()).await;
    // Only the initial list per kind: everything else came by watch.
    assert_eq!(fake.lists("networking.istio.io/v1", "ServiceEntry"), 1);
}

#[tokio::test]
async fn with_the_api_down_the_last_good_config_stays_and_health_says_so() {
    let (fake, mut w, _cg) = seeded().await;
    let good = config_where(&mut w, |c| se_port(c) == Some(80)).await;
    health_where(&mut w, |h| h.up).await;
    fake.set_down(true);
    let h = health_where(&mut w, |h| !h.up).await;
    assert!(h.error.is_some(), "{h:?}");
    // Nothing was published while down: the config in force is the same.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Arc::ptr_eq(&w.current().unwrap(), &good));
    fake.set_down(false);
    health_where(&mut w, |h| h.up).await;
    let mut se = seed_objects()
        .into_iter()
        .find(|o| o["kind"] == "ServiceEntry")
        .unwrap();
    se["spec"]["ports"][0]["number"] = json!(81);
    fake.apply(se);
    config_where(&mut w, |c| se_port(c) == Some(81)).await;
}

#[tokio::test]
async fn a_410_gone_makes_the_watcher_relist_and_catch_up() {
    let (fake, mut w, _cg) = seeded().await;
    config_where(&mut w, |c| se_port(c) == Some(80)).await;
    let before = fake.lists("networking.istio.io/v1", "ServiceEntry");
    // An edit, then its history is compacted away and watches drop: the
    // resumed watch gets 410 and only a relist can see the edit's result.
    let mut se = seed_objects()
        .into_iter()
        .find(|o| o["kind"] == "ServiceEntry")
        .unwrap();
    se["spec"]["ports"][0]["number"] = json!(8443);
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "unrelated"}}));
    tokio::time::sleep(Duration::from_millis(200)).await;
    fake.compact();
    fake.apply(se);
    config_where(&mut w, |c| se_port(c) == Some(8443)).await;
    assert!(fake.lists("networking.istio.io/v1", "ServiceEntry") > before);
}

#[tokio::test]
async fn bookmarks_let_quiet_watches_resume_without_a_relist() {
    let (fake, mut w, _cg) = seeded().await;
    config_where(&mut w, |_| true).await;
    // Newer versions exist elsewhere; the Gateway watch has seen none.
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "busy"}}));
    config_where(&mut w, |c| c.namespace("busy").is_some()).await;
    let before = fake.lists("gateway.networking.k8s.io/v1", "Gateway");
    fake.bookmark();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.compact();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        fake.lists("gateway.networking.k8s.io/v1", "Gateway"),
        before,
        "the Gateway watch resumed from its bookmark"
    );
}

#[tokio::test]
async fn an_invalid_object_is_rejected_and_the_previous_config_stays() {
    let (fake, mut w, _cg) = seeded().await;
    let good = config_where(&mut w, |c| se_port(c) == Some(80)).await;
    fake.apply(json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"hosts": ["example.com"], "ports": [{"number": 0, "name": "x", "protocol": "TCP"}]}}));
    let rej = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(e) = w.rejected.borrow_and_update().clone() {
                return e;
            }
            w.rejected.changed().await.unwrap();
        }
    })
    .await
    .unwrap();
    assert!(
        rej.to_string()
            .contains("networking.istio.io/v1/ServiceEntry/default/bad"),
        "{rej}"
    );
    assert!(Arc::ptr_eq(&w.current().unwrap(), &good));
}

fn pod(name: &str, node: &str, uid: &str, host_network: bool, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": uid, "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": name, "hostNetwork": host_network,
                 "containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": "10.244.1.50", "podIPs": [{"ip": "10.244.1.50"}],
                   "qosClass": "Burstable"}})
}

#[tokio::test]
async fn pods_of_this_node_become_workloads_enrolled_by_their_pod_cgroup_once_it_exists() {
    const UID: &str = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee";
    let (fake, mut w, cg) = seeded().await;
    let su = UID.replace('-', "_");
    let pod_dir = cg.path().join(format!(
        "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{su}.slice"
    ));
    // Seen before the kubelet made its cgroup: a workload, not enrolled yet.
    fake.apply(pod("web", "node-a", UID, false, json!({"app": "web"})));
    fake.apply(pod(
        "elsewhere",
        "node-b",
        "bbbbbbbb-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        false,
        json!({}),
    ));
    fake.apply(pod(
        "hostnet",
        "node-a",
        "cccccccc-bbbb-4ccc-8ddd-eeeeeeeeeeee",
        true,
        json!({}),
    ));
    let c = config_where(&mut w, |c| {
        c.workload_entries.iter().any(|we| we.name() == "web")
    })
    .await;
    let web = c
        .workload_entries
        .iter()
        .find(|we| we.name() == "web")
        .unwrap();
    assert_eq!(web.spec.address, "10.244.1.50");
    assert_eq!(web.spec.service_account(), "web");
    assert_eq!(web.label("app"), Some("web"));
    let tree_of = |c: &Config| {
        c.workload_entries
            .iter()
            .find(|we| we.name() == "web")
            .and_then(|we| {
                we.metadata
                    .annotations
                    .get(labels::CGROUP_TREE_ANNOTATION)
                    .cloned()
            })
    };
    assert_eq!(tree_of(&c), None);
    for absent in ["elsewhere", "hostnet"] {
        assert!(
            !c.workload_entries.iter().any(|we| we.name() == absent),
            "{absent}"
        );
    }
    // The kubelet creates the pod's cgroup: the next look names it.
    std::fs::create_dir_all(pod_dir.join("cri-containerd-1.scope")).unwrap();
    let c = config_where(&mut w, |c| tree_of(c).is_some()).await;
    assert_eq!(tree_of(&c).as_deref(), pod_dir.to_str());
    // A container started later changes nothing here: the kernel enrolls
    // whatever runs below the pod's cgroup (tests/tests/kube_node.rs).
    std::fs::create_dir_all(pod_dir.join("cri-containerd-2.scope")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Arc::ptr_eq(&w.current().unwrap(), &c), "no new config");
    // The node's Pod list asked for this node only, once.
    assert_eq!(fake.lists("v1", "Pod"), 1);
}

#[tokio::test]
async fn a_workload_entry_from_the_api_enrolls_no_cgroup() {
    let (fake, mut w, _cg) = seeded().await;
    // "/": the node's root cgroup, every process on the node.
    fake.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
        "metadata": {"name": "vm", "namespace": "default", "annotations": {
            "shunt.io/cgroup": "/", "shunt.io/cgroup-tree": "/", "note": "kept"}},
        "spec": {"address": "10.0.0.7", "serviceAccount": "vm"}
    }));
    let c = config_where(&mut w, |c| {
        c.workload_entries.iter().any(|we| we.name() == "vm")
    })
    .await;
    let vm = c
        .workload_entries
        .iter()
        .find(|we| we.name() == "vm")
        .unwrap();
    let a = &vm.metadata.annotations;
    assert!(
        !a.keys().any(|k| k.starts_with(labels::CGROUP_ANNOTATION)),
        "{a:?}"
    );
    assert_eq!(a.get("note").map(String::as_str), Some("kept"), "{a:?}");
}

#[tokio::test]
async fn a_waypoint_address_from_gateway_status_is_used_and_other_gateways_are_ignored() {
    let (fake, mut w, _cg) = seeded().await;
    fake.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "wp2", "namespace": "default"},
        "spec": {"gatewayClassName": "istio-waypoint",
                 "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
        "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.42"}]}}),
    );
    fake.apply(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "ingress", "namespace": "default"},
        "spec": {"gatewayClassName": "istio", "listeners": [{"name": "https", "port": 443,
                 "protocol": "HTTPS", "tls": {"certificateRefs": [{"name": "cert"}]}}]}}),
    );
    let c = config_where(&mut w, |c| c.gateways.iter().any(|g| g.name() == "wp2")).await;
    let wp2 = c.gateways.iter().find(|g| g.name() == "wp2").unwrap();
    assert_eq!(wp2.spec.addresses[0].value, "10.96.0.42");
    assert!(!c.gateways.iter().any(|g| g.name() == "ingress"));
    assert!(w.rejected.borrow().is_none());
}

#[tokio::test]
async fn a_kind_whose_crd_is_not_installed_counts_as_empty_until_it_is() {
    let fake = FakeApi::start().await;
    for o in seed_objects() {
        fake.apply(o);
    }
    fake.uninstall("gateway.networking.k8s.io/v1", "Gateway");
    let cg = tempfile::tempdir().unwrap();
    let mut w = spawn(fake.client(), opts("node-a", cg.path())).unwrap();
    let c = config_where(&mut w, |_| true).await;
    assert!(c.gateways.is_empty());
    assert_eq!(c.service_entries.len(), 1);
    health_where(&mut w, |h| h.up).await;
    // Installed later: the watcher's retry finds it.
    fake.install("gateway.networking.k8s.io/v1", "Gateway");
    config_where(&mut w, |c| c.gateways.len() == 1).await;
}

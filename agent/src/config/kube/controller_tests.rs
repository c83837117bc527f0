//! The Lease election and the cluster allocator against the fake API.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use serde_json::{json, Value};

use super::controller::{self, ControllerOptions};
use super::fake::FakeApi;
use super::lease::{LeaseLock, LeaseSettings};
use super::tests::{seed_dir, seed_objects};

const NS: &str = "shunt-system";

fn lease(identity: &str) -> LeaseSettings {
    LeaseSettings {
        duration: Duration::from_secs(1),
        renew_deadline: Duration::from_millis(700),
        retry: Duration::from_millis(100),
        ..LeaseSettings::new(NS, "shunt-controller", identity)
    }
}

fn se(name: &str, host: &str, created: &str) -> Value {
    json!({"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
           "metadata": {"name": name, "namespace": "common-infrastructure",
                        "creationTimestamp": created},
           "spec": {"hosts": [host], "ports": [{"number": 443, "name": "tls", "protocol": "TLS"}],
                    "resolution": "DNS", "location": "MESH_EXTERNAL"}})
}

/// A controller replica as a task; aborting it is a crash (no release).
fn replica(fake: &FakeApi, identity: &str) -> tokio::task::JoinHandle<()> {
    let mut o = ControllerOptions::new(lease(identity));
    o.mesh_file = Some(seed_dir().join("mesh.yaml"));
    o.vip_grace = Duration::from_secs(600);
    let client = fake.client();
    tokio::spawn(async move {
        controller::run(client, o, std::future::pending())
            .await
            .unwrap();
    })
}

fn holder(fake: &FakeApi) -> Option<String> {
    fake.get("coordination.k8s.io/v1", "Lease", NS, "shunt-controller")
        .and_then(|l| l["spec"]["holderIdentity"].as_str().map(str::to_string))
}

/// host → addresses, from every ServiceEntry's status in the fake.
fn addresses(fake: &FakeApi, names: &[&str]) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for n in names {
        let Some(o) = fake.get(
            "networking.istio.io/v1",
            "ServiceEntry",
            "common-infrastructure",
            n,
        ) else {
            continue;
        };
        for a in o["status"]["addresses"].as_array().into_iter().flatten() {
            out.entry(a["host"].as_str().unwrap().to_string())
                .or_insert_with(Vec::new)
                .push(a["value"].as_str().unwrap().to_string());
        }
    }
    out
}

async fn until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    for _ in 0..200 {
        if let Some(v) = f() {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn of_two_candidates_racing_for_a_lease_exactly_one_leads() {
    let fake = FakeApi::start().await;
    let mut a = LeaseLock::new(fake.client(), lease("a"));
    let mut b = LeaseLock::new(fake.client(), lease("b"));
    let (ra, rb) = tokio::join!(a.try_acquire_or_renew(), b.try_acquire_or_renew());
    assert!(ra.unwrap() ^ rb.unwrap(), "exactly one wins the create");
    let (leader, mut other) = if a.is_leader() { (a, b) } else { (b, a) };
    // The holder renews; the other keeps seeing a live record.
    for _ in 0..5 {
        assert!(!other.try_acquire_or_renew().await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let transitions = |f: &FakeApi| {
        f.get("coordination.k8s.io/v1", "Lease", NS, "shunt-controller")
            .unwrap()["spec"]["leaseTransitions"]
            .as_i64()
    };
    assert_eq!(transitions(&fake), Some(0));
    // The leader stops renewing: after the lease duration by the other's
    // own clock, it takes over.
    drop(leader);
    let mut took = false;
    for _ in 0..30 {
        if other.try_acquire_or_renew().await.unwrap() {
            took = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(took && other.is_leader());
    assert_eq!(transitions(&fake), Some(1));
}

#[tokio::test]
async fn a_stale_resource_version_is_refused_with_409_conflict() {
    let fake = FakeApi::start().await;
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), NS);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "x", "namespace": NS}, "data": {"k": "1"}}))
    .unwrap();
    let first = api.create(&PostParams::default(), &cm).await.unwrap();
    let mut second = first.clone();
    second.data = Some(BTreeMap::from([("k".into(), "2".into())]));
    api.replace("x", &PostParams::default(), &second)
        .await
        .unwrap();
    // Writing again from the first version read loses.
    let err = api
        .replace("x", &PostParams::default(), &first)
        .await
        .unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err:?}"
    );
    let err = api.create(&PostParams::default(), &cm).await.unwrap_err();
    assert!(
        matches!(err, kube::Error::Api(ref e) if e.code == 409),
        "{err:?}"
    );
    let leases: Api<Lease> = Api::namespaced(fake.client(), NS);
    assert!(leases.get_opt("none").await.unwrap().is_none());
}

#[tokio::test]
async fn two_controllers_one_leader_and_the_successor_keeps_every_address() {
    let fake = FakeApi::start().await;
    for o in seed_objects() {
        fake.apply(o);
    }
    fake.apply(se("a", "a.example.com", "2026-01-01T00:00:01Z"));
    fake.apply(se("b", "b.example.com", "2026-01-01T00:00:02Z"));
    let names = ["httpbin.org", "a", "b", "c"];
    let mut replicas = BTreeMap::from([("r1", replica(&fake, "r1")), ("r2", replica(&fake, "r2"))]);

    let first = until("three hosts with addresses", || {
        let a = addresses(&fake, &names);
        (a.len() == 3).then_some(a)
    })
    .await;
    for (h, v) in &first {
        assert_eq!(v.len(), 2, "{h}: one IPv4 and one IPv6 address: {v:?}");
    }
    let se_status = fake
        .get(
            "networking.istio.io/v1",
            "ServiceEntry",
            "common-infrastructure",
            "httpbin.org",
        )
        .unwrap();
    let cond = &se_status["status"]["conditions"][0];
    assert_eq!(cond["type"], "istio.io/WaypointBound");
    assert_eq!(cond["status"], "True", "{cond}");
    assert!(cond["lastTransitionTime"].is_string());
    let leader = holder(&fake).expect("a holder");
    // The spec written by `kubectl apply` did not touch the status.
    let mut again = seed_objects()
        .into_iter()
        .find(|o| o["kind"] == "ServiceEntry")
        .unwrap();
    again["metadata"]["labels"] = json!({"team": "x"});
    fake.apply(again);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(addresses(&fake, &names), first);
    let patches = |f: &FakeApi| {
        f.writes()
            .iter()
            .filter(|(m, p)| m == "PATCH" && p.ends_with("/status"))
            .count()
    };
    let settled = patches(&fake);

    // The leader crashes; the other replica takes over after the lease
    // duration, with the same addresses and no status rewritten.
    replicas.remove(leader.as_str()).unwrap().abort();
    let next = until("a new holder", || holder(&fake).filter(|h| *h != leader)).await;
    assert!(replicas.contains_key(next.as_str()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(addresses(&fake, &names), first);
    assert_eq!(
        patches(&fake),
        settled,
        "the successor agrees with every status"
    );

    // The new leader: `b` is deleted (its addresses stay reserved), `c` is
    // new and gets fresh ones, none of `b`'s.
    fake.delete(
        "networking.istio.io/v1",
        "ServiceEntry",
        "common-infrastructure",
        "b",
    );
    fake.apply(se("c", "c.example.com", "2026-01-01T00:00:03Z"));
    let after = until("c allocated", || {
        let a = addresses(&fake, &names);
        a.contains_key("c.example.com").then_some(a)
    })
    .await;
    for h in ["httpbin.org", "a.example.com"] {
        assert_eq!(after[h], first[h], "{h} kept its addresses");
    }
    for ip in &after["c.example.com"] {
        assert!(
            !first["b.example.com"].contains(ip),
            "c got b's reserved {ip}"
        );
    }
    // The reservation is in the ConfigMap, where any successor finds it.
    let cm = fake
        .get("v1", "ConfigMap", NS, "shunt-vips")
        .expect("state ConfigMap");
    let state = cm["data"][controller::STATE_KEY].as_str().unwrap();
    assert!(
        state.contains("b.example.com") && state.contains("released"),
        "{state}"
    );

    // Both gone, a fresh replica (a restart) resumes from the ConfigMap.
    for (_, r) in replicas {
        r.abort();
    }
    let _r3 = replica(&fake, "r3");
    until("r3 leads", || holder(&fake).filter(|h| h == "r3")).await;
    fake.delete(
        "networking.istio.io/v1",
        "ServiceEntry",
        "common-infrastructure",
        "c",
    );
    fake.apply(se("b", "b.example.com", "2026-01-01T00:00:02Z"));
    let back = until("b back", || {
        let a = addresses(&fake, &names);
        a.contains_key("b.example.com").then_some(a)
    })
    .await;
    assert_eq!(
        back["b.example.com"], first["b.example.com"],
        "b back within its grace"
    );
}

#[tokio::test]
async fn an_agent_takes_its_vips_from_status_and_allocates_none_itself() {
    let fake = FakeApi::start().await;
    for o in seed_objects() {
        fake.apply(o);
    }
    let cg = tempfile::tempdir().unwrap();
    let mut o = super::KubeOptions::new("node-a".into(), cg.path().to_path_buf());
    o.mesh_file = Some(seed_dir().join("mesh.yaml"));
    o.debounce = Duration::from_millis(20);
    let mut w = super::spawn(fake.client(), o).unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut alloc = crate::alloc::Allocator::open(state.path())
        .unwrap()
        .following();
    let host = |a: &crate::alloc::Allocation| a.hosts.get("httpbin.org").cloned();
    let cfg = w
        .config
        .wait_for(Option::is_some)
        .await
        .unwrap()
        .clone()
        .unwrap();
    // No status yet: no VIP, though the entry is eligible.
    assert_eq!(host(alloc.allocate(&cfg).unwrap()), None);
    // The controller's patch arrives as a watch event.
    let mut se = fake
        .get(
            "networking.istio.io/v1",
            "ServiceEntry",
            "common-infrastructure",
            "httpbin.org",
        )
        .unwrap();
    se["status"] = json!({"addresses": [{"host": "httpbin.org", "value": "240.240.0.77"},
                                        {"host": "httpbin.org", "value": "2001:2::77"}]});
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        fake.client(),
        "common-infrastructure",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry"),
            "serviceentries",
        ),
    );
    api.patch_status(
        "httpbin.org",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(&json!({"status": se["status"]})),
    )
    .await
    .unwrap();
    let cfg = w
        .config
        .wait_for(|c| {
            c.as_ref()
                .is_some_and(|c| c.api_status.as_ref().is_some_and(|s| !s.is_empty()))
        })
        .await
        .unwrap()
        .clone()
        .unwrap();
    let a = host(alloc.allocate(&cfg).unwrap()).expect("addresses from status");
    assert_eq!(a.v4, Some("240.240.0.77".parse().unwrap()));
    assert_eq!(a.v6, Some("2001:2::77".parse().unwrap()));
}

#[tokio::test]
async fn token_review_names_the_pod_and_node_of_a_projected_token_and_refuses_others() {
    use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
    let fake = FakeApi::start().await;
    fake.add_pod_token("tok-a", NS, "shunt-agent", "shunt-agent-x1", "node-a");
    let api: Api<TokenReview> = Api::all(fake.client());
    let review = |t: &str| TokenReview {
        spec: TokenReviewSpec {
            token: Some(t.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let ok = api
        .create(&PostParams::default(), &review("tok-a"))
        .await
        .unwrap();
    let st = ok.status.unwrap();
    assert_eq!(st.authenticated, Some(true));
    let user = st.user.unwrap();
    assert_eq!(
        user.username.as_deref(),
        Some("system:serviceaccount:shunt-system:shunt-agent")
    );
    assert_eq!(
        user.extra.unwrap()["authentication.kubernetes.io/node-name"],
        vec!["node-a".to_string()]
    );
    let bad = api
        .create(&PostParams::default(), &review("forged"))
        .await
        .unwrap();
    assert_eq!(bad.status.unwrap().authenticated, Some(false));
}

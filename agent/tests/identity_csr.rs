//! Certificates without the CA key on the node: the controller's CSR
//! endpoint (Istio's IstioCertificateService over gRPC and TLS on a real
//! socket) authenticates callers by TokenReview and authorizes them by the
//! Pods of the in-process fake API server; an agent holding only the root
//! and its projected token gets a certificate for a pod on its node, uses it
//! for a real HBONE connection to a waypoint that got its own certificate
//! the same way, and is refused for a pod on another node.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shunt_agent::config::kube::{fake::FakeApi, node_auth};
use shunt_agent::identity::csr::CsrPolicy;
use shunt_agent::identity::csr_server::CsrServerSettings;
use shunt_agent::identity::{
    Ca, CaClient, CaClientSettings, IdentityConfig, IdentityError, IdentityManager, ROOT_CERT,
};
use shunt_testbed::hbone::*;

const TD: &str = "cluster.local";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";
const EGRESS: &str = "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway";

fn pod(ns: &str, name: &str, sa: &str, node: &str) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
           "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
           "status": {"phase": "Running"}})
}

struct Cluster {
    fake: FakeApi,
    dir: tempfile::TempDir,
    address: String,
    root: std::path::PathBuf,
}

impl Cluster {
    /// The fake API with an agent on node-a, curl on node-a, admin on
    /// node-b and the waypoint on node-b; the CSR endpoint on 127.0.0.1 with
    /// the CA key in a directory only it reads.
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = Arc::new(Ca::init(&ca_dir, TD, false).unwrap());
        // What a node holds: the root only.
        let root = dir.path().join("root-cert.pem");
        std::fs::copy(ca_dir.join(ROOT_CERT), &root).unwrap();

        let fake = FakeApi::start().await;
        for (ns, name, sa, node) in [
            ("shunt-system", "shunt-agent-a", "shunt-agent", "node-a"),
            ("default", "curl-1", "curl", "node-a"),
            ("default", "admin-1", "admin", "node-b"),
            (
                "common-infrastructure",
                "egress-gateway-0",
                "egress-gateway",
                "node-b",
            ),
        ] {
            fake.apply(pod(ns, name, sa, node));
        }
        fake.add_projected_token(
            "tok-agent-a",
            "istio-ca",
            "shunt-system",
            "shunt-agent",
            "shunt-agent-a",
            "node-a",
        );
        fake.add_projected_token(
            "tok-waypoint",
            "istio-ca",
            "common-infrastructure",
            "egress-gateway",
            "egress-gateway-0",
            "node-b",
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let policy = CsrPolicy {
            trust_domain: TD.into(),
            trusted_node_accounts: vec![("shunt-system".into(), "shunt-agent".into())],
            default_validity: Duration::from_secs(3600),
            max_validity: Duration::from_secs(3600),
        };
        tokio::spawn(node_auth::serve_csr(
            fake.client(),
            ca,
            policy,
            vec!["istio-ca".into()],
            listener,
            CsrServerSettings::new(vec!["localhost".into()]),
            std::future::pending(),
        ));
        Cluster {
            fake,
            address: format!("localhost:{port}"),
            root,
            dir,
        }
    }

    /// An identity manager holding `token` and the root, no CA key, asking
    /// for a day (the CA clamps it to its maximum, one hour).
    fn client(&self, token: &str, impersonate: bool) -> IdentityManager {
        self.client_for(token, impersonate, Duration::from_secs(24 * 3600))
    }

    fn client_for(&self, token: &str, impersonate: bool, lifetime: Duration) -> IdentityManager {
        let path = self.dir.path().join(format!("{token}.jwt"));
        std::fs::write(&path, format!("{token}\n")).unwrap();
        let mut s = CaClientSettings::new(self.address.clone());
        s.root_cert = self.root.clone();
        s.token = path;
        s.impersonate = impersonate;
        s.timeout = Duration::from_secs(10);
        let cfg = IdentityConfig {
            lifetime,
            ..Default::default()
        };
        IdentityManager::remote(Arc::new(CaClient::new(s).unwrap()), TD, cfg).unwrap()
    }
}

fn refusal(e: IdentityError) -> (String, String) {
    match e {
        IdentityError::Csr { code, message, .. } => (format!("{code:?}"), message),
        other => panic!("not a CA refusal: {other}"),
    }
}

#[tokio::test]
async fn an_agent_gets_a_certificate_for_a_pod_on_its_node_and_uses_it_for_hbone() {
    let cluster = Cluster::start().await;
    let agent = cluster.client("tok-agent-a", true);
    let waypoint = cluster.client("tok-waypoint", false);
    let (curl, egress) = (id(CURL), id(EGRESS));

    // The waypoint signs its own identity (no impersonation).
    let wp_slot = waypoint.obtain(&egress).await.unwrap();
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&waypoint, &egress, handler.clone()).await;

    // The agent's first connection for curl waits for curl's certificate.
    let tunnel = client(&agent)
        .connect(&request(&curl, addr, &egress))
        .await
        .unwrap();
    assert_eq!(tunnel.peer_identity(), &egress);
    let (mut app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    assert_eq!(
        roundtrip(&mut app, b"via the CSR API").await,
        b"via the CSR API"
    );
    drop(app);
    relay.await.unwrap();
    assert_eq!(
        handler.seen()[0].peer_identity,
        curl,
        "the waypoint saw curl"
    );

    // The chain is leaf + signing CA; the lifetime is the CA's maximum.
    let cert = agent.obtain(&curl).await.unwrap().current();
    assert_eq!(cert.issued.chain.len(), 2);
    let life = cert.issued.lifetime().as_secs();
    assert!(
        (3500..=3700).contains(&life),
        "lifetime {life} s, want the 1 h clamp"
    );
    assert!(wp_slot.current().issued.lifetime().as_secs() <= 3700);
}

#[tokio::test]
async fn an_agent_is_refused_pods_of_other_nodes_and_unknown_tokens_are_refused() {
    let cluster = Cluster::start().await;
    let agent = cluster.client("tok-agent-a", true);

    let (code, msg) = refusal(agent.obtain(&id(ADMIN)).await.unwrap_err());
    assert_eq!(code, "PermissionDenied");
    assert!(msg.contains("no pod on node \"node-a\""), "{msg}");
    // Refused fast afterwards (backoff), and never served to a connection.
    let e = agent.obtain(&id(ADMIN)).await.unwrap_err();
    assert!(matches!(e, IdentityError::Backoff { .. }), "{e}");
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let waypoint = cluster.client("tok-waypoint", false);
    waypoint.obtain(&id(EGRESS)).await.unwrap();
    let addr = start_waypoint(&waypoint, &id(EGRESS), handler.clone()).await;
    assert!(client(&agent)
        .connect(&request(&id(ADMIN), addr, &id(EGRESS)))
        .await
        .is_err());
    assert!(handler.seen().is_empty());

    // The waypoint's token is not a node agent's: its own identity only.
    let (code, msg) = refusal(waypoint.obtain(&id(CURL)).await.unwrap_err());
    assert!(
        code == "PermissionDenied" || msg.contains("egress-gateway"),
        "{code}: {msg}"
    );

    let forged = cluster.client("tok-forged", true);
    let (code, _) = refusal(forged.obtain(&id(CURL)).await.unwrap_err());
    assert_eq!(code, "Unauthenticated");
}

#[tokio::test]
async fn a_certificate_from_the_ca_is_renewed_by_the_ca_at_half_life() {
    let cluster = Cluster::start().await;
    // A 4 s certificate: renewed from the CA after about 2 s.
    let agent = cluster.client_for("tok-agent-a", true, Duration::from_secs(4));
    let slot = agent.obtain(&id(CURL)).await.unwrap();
    let first = slot.current().issued.chain[0].clone();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while slot.renewals() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never renewed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = slot.current();
    assert_ne!(renewed.issued.chain[0], first, "a new certificate");
    assert_eq!(
        shunt_agent::identity::peer_identity(Some(&renewed.issued.chain[..1])).unwrap(),
        id(CURL)
    );
}

#[tokio::test]
async fn a_pod_the_ca_sees_only_after_its_first_connection_started_still_gets_its_certificate() {
    let cluster = Cluster::start().await;
    let agent = cluster.client("tok-agent-a", true);
    // Warm up: the CA has listed its Pods.
    agent.obtain(&id(CURL)).await.unwrap();
    let late = id("spiffe://cluster.local/ns/default/sa/late");
    let request = agent.obtain(&late);
    let appear = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        cluster
            .fake
            .apply(pod("default", "late-1", "late", "node-a"));
    };
    let (slot, ()) = tokio::join!(request, appear);
    assert_eq!(slot.unwrap().id(), &late);
}

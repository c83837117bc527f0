//! The Kubernetes side of the CSR endpoint's authorization: TokenReview of
//! the caller's bearer token (as istiod's `kubeauth`), and an index of the
//! cluster's Pods by name and by (service account, node) (as istiod's node
//! authorizer), fed by a kube-runtime watcher.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use ::kube::api::{Api, PostParams};
use ::kube::runtime::{watcher, WatchStreamExt};
use ::kube::Client;
use futures::future::BoxFuture;
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use tokio::sync::watch;

use crate::identity::csr::{Caller, CsrPolicy, PodFacts, PodLookup, Refusal};
use crate::identity::csr_server::{self, Authenticate, CsrServerSettings, CsrService};
use crate::identity::{Ca, IdentityError};

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// TokenReview against the API server, requiring `audiences`.
pub struct TokenReviewer {
    api: Api<TokenReview>,
    audiences: Vec<String>,
}

impl TokenReviewer {
    pub fn new(client: Client, audiences: Vec<String>) -> Self {
        TokenReviewer {
            api: Api::all(client),
            audiences,
        }
    }

    pub async fn review(&self, token: &str) -> Result<Caller, Refusal> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Refusal::Unavailable(format!("TokenReview failed: {e}")))?;
        caller_of(answer, &self.audiences)
    }
}

impl Authenticate for TokenReviewer {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>> {
        Box::pin(self.review(token))
    }
}

/// The caller a TokenReview answer names: authenticated, for one of the
/// required audiences, a service account.
fn caller_of(review: TokenReview, audiences: &[String]) -> Result<Caller, Refusal> {
    let status = review.status.unwrap_or_default();
    if let Some(e) = status.error.filter(|e| !e.is_empty()) {
        return Err(Refusal::Unauthenticated(format!(
            "the token was not accepted by TokenReview: {e}"
        )));
    }
    if status.authenticated != Some(true) {
        return Err(Refusal::Unauthenticated(
            "the token was not accepted by TokenReview".into(),
        ));
    }
    // The API server answers the audiences the token is valid for among
    // those asked; none means it ignored the request's audiences.
    let granted = status.audiences.unwrap_or_default();
    if !granted.iter().any(|a| audiences.contains(a)) {
        return Err(Refusal::Unauthenticated(format!(
            "the token is not for audience {audiences:?} (use a projected token with that audience)"
        )));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let in_sa_group = user
        .groups
        .unwrap_or_default()
        .iter()
        .any(|g| g == "system:serviceaccounts");
    let parts: Vec<&str> = username.split(':').collect();
    let (namespace, service_account) = match parts.as_slice() {
        ["system", "serviceaccount", ns, sa] if in_sa_group && !ns.is_empty() && !sa.is_empty() => {
            (ns.to_string(), sa.to_string())
        }
        _ => {
            return Err(Refusal::Unauthenticated(format!(
                "the token is not a service account's (user {username:?})"
            )))
        }
    };
    let extra = user.extra.unwrap_or_default();
    let one = |k: &str| {
        extra
            .get(k)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    Ok(Caller {
        namespace,
        service_account,
        pod_name: one(POD_NAME),
        pod_uid: one(POD_UID),
        node_name: one(NODE_NAME),
    })
}

/// The cluster's running Pods, indexed for [`PodLookup`].
#[derive(Default)]
struct Index {
    by_name: HashMap<(String, String), PodFacts>,
    /// (namespace, service account, node) → number of pods.
    by_sa_node: HashMap<(String, String, String), usize>,
}

impl Index {
    fn add(&mut self, pod: &Pod) {
        // What was known of the pod goes first: one that has now finished
        // must no longer count for its node.
        if let Some(key) = key_of(pod) {
            self.remove(&key);
        }
        let Some((key, facts)) = facts(pod) else {
            return;
        };
        if !facts.node_name.is_empty() {
            *self
                .by_sa_node
                .entry((
                    key.0.clone(),
                    facts.service_account.clone(),
                    facts.node_name.clone(),
                ))
                .or_default() += 1;
        }
        self.by_name.insert(key, facts);
    }

    fn remove(&mut self, key: &(String, String)) {
        let Some(old) = self.by_name.remove(key) else {
            return;
        };
        let k = (key.0.clone(), old.service_account, old.node_name);
        if let Some(n) = self.by_sa_node.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.by_sa_node.remove(&k);
            }
        }
    }
}

/// (namespace, name) and facts of a pod that counts: not finished.
fn facts(pod: &Pod) -> Option<((String, String), PodFacts)> {
    let ns = pod.metadata.namespace.clone()?;
    let name = pod.metadata.name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Failed" | "Succeeded")) {
        return None;
    }
    let spec = pod.spec.as_ref()?;
    Some((
        (ns, name),
        PodFacts {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            service_account: spec
                .service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "default".into()),
            node_name: spec.node_name.clone().unwrap_or_default(),
        },
    ))
}

fn key_of(pod: &Pod) -> Option<(String, String)> {
    Some((pod.metadata.namespace.clone()?, pod.metadata.name.clone()?))
}

/// Every Pod of the cluster, kept current by a watcher. Until the first
/// list completes it knows no pod, and [`PodIndex::synced`] is false.
#[derive(Clone)]
pub struct PodIndex {
    index: Arc<RwLock<Index>>,
    synced: watch::Receiver<bool>,
}

impl PodIndex {
    /// Starts the watcher (inside a tokio runtime); it runs until the
    /// returned index and its clones are dropped.
    pub fn spawn(client: Client) -> PodIndex {
        let index = Arc::new(RwLock::new(Index::default()));
        let (tx, synced) = watch::channel(false);
        let api: Api<Pod> = Api::all(client);
        let weak = Arc::downgrade(&index);
        tokio::spawn(async move {
            // Istio's node authorizer drops Failed pods at the API.
            let cfg = watcher::Config::default().fields("status.phase!=Failed");
            let mut events = std::pin::pin!(watcher(api, cfg).default_backoff());
            let mut relist: Option<Index> = None;
            while let Some(ev) = events.next().await {
                let Some(index) = weak.upgrade() else { return };
                match ev {
                    Ok(watcher::Event::Init) => relist = Some(Index::default()),
                    Ok(watcher::Event::InitApply(p)) => {
                        if let Some(r) = relist.as_mut() {
                            r.add(&p);
                        }
                    }
                    Ok(watcher::Event::InitDone) => {
                        if let Some(r) = relist.take() {
                            *index.write().unwrap_or_else(|e| e.into_inner()) = r;
                        }
                        tx.send_replace(true);
                    }
                    Ok(watcher::Event::Apply(p)) => {
                        index.write().unwrap_or_else(|e| e.into_inner()).add(&p);
                    }
                    Ok(watcher::Event::Delete(p)) => {
                        if let Some(k) = key_of(&p) {
                            index.write().unwrap_or_else(|e| e.into_inner()).remove(&k);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watching Pods for the CSR endpoint"),
                }
            }
        });
        PodIndex { index, synced }
    }

    pub fn synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the first list completed.
    pub async fn wait_synced(&self) {
        let mut rx = self.synced.clone();
        let _ = rx.wait_for(|s| *s).await;
    }
}

impl PodLookup for PodIndex {
    fn ready(&self) -> bool {
        self.synced()
    }
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts> {
        let i = self.index.read().unwrap_or_else(|e| e.into_inner());
        i.by_name
            .get(&(namespace.to_string(), name.to_string()))
            .cloned()
    }
    fn runs_on(&self, namespace: &str, service_account: &str, node: &str) -> bool {
        let i = self.index.read().unwrap_or_else(|e| e.into_inner());
        i.by_sa_node.contains_key(&(
            namespace.to_string(),
            service_account.to_string(),
            node.to_string(),
        ))
    }
}

/// Runs the CSR endpoint on `listener` with TokenReview (for `audiences`)
/// and a Pod watcher on `client`, until `shutdown`.
pub async fn serve_csr(
    client: Client,
    ca: Arc<Ca>,
    policy: CsrPolicy,
    audiences: Vec<String>,
    listener: tokio::net::TcpListener,
    settings: CsrServerSettings,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), IdentityError> {
    let pods = PodIndex::spawn(client.clone());
    let authn = TokenReviewer::new(client, audiences);
    let service = Arc::new(CsrService::new(
        ca,
        policy,
        Arc::new(authn),
        Arc::new(pods),
        settings.max_inflight,
    ));
    csr_server::serve(listener, service, settings, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::kube::fake::FakeApi;
    use serde_json::json;

    fn pod(ns: &str, name: &str, sa: &str, node: &str, phase: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}")},
               "spec": {"serviceAccountName": sa, "nodeName": node, "containers": []},
               "status": {"phase": phase}})
    }

    #[tokio::test]
    async fn token_review_names_the_service_account_pod_and_node_for_the_istio_ca_audience_only() {
        let fake = FakeApi::start().await;
        fake.add_projected_token(
            "tok-a",
            "istio-ca",
            "shunt-system",
            "shunt-agent",
            "agent-a",
            "node-a",
        );
        fake.add_pod_token(
            "tok-api",
            "shunt-system",
            "shunt-agent",
            "agent-a",
            "node-a",
        );
        let r = TokenReviewer::new(fake.client(), vec!["istio-ca".into()]);
        let c = r.review("tok-a").await.unwrap();
        assert_eq!(
            c,
            Caller {
                namespace: "shunt-system".into(),
                service_account: "shunt-agent".into(),
                pod_name: Some("agent-a".into()),
                pod_uid: Some("uid-agent-a".into()),
                node_name: Some("node-a".into()),
            }
        );
        // A token for the API server's audience is not a CA credential.
        let e = r.review("tok-api").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
        let e = r.review("forged").await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e}");
    }

    #[tokio::test]
    async fn the_pod_index_follows_pods_by_node_and_service_account_and_forgets_finished_ones() {
        let fake = FakeApi::start().await;
        fake.apply(pod("default", "curl-1", "curl", "node-a", "Running"));
        fake.apply(pod("default", "job-1", "batch", "node-a", "Succeeded"));
        let idx = PodIndex::spawn(fake.client());
        tokio::time::timeout(std::time::Duration::from_secs(10), idx.wait_synced())
            .await
            .unwrap();
        assert!(idx.runs_on("default", "curl", "node-a"));
        assert!(!idx.runs_on("default", "curl", "node-b"));
        assert!(!idx.runs_on("default", "batch", "node-a"));
        assert_eq!(idx.pod("default", "curl-1").unwrap().uid, "uid-curl-1");
        fake.apply(pod("default", "curl-2", "curl", "node-b", "Pending"));
        fake.delete("v1", "Pod", "default", "curl-1");
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while idx.runs_on("default", "curl", "node-a") || !idx.runs_on("default", "curl", "node-b")
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "index did not follow the watch"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(idx.pod("default", "curl-1").is_none());
        // A pod that finishes stops counting at once (a Succeeded pod is
        // not filtered out by the watch).
        fake.apply(pod("default", "curl-2", "curl", "node-b", "Succeeded"));
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while idx.runs_on("default", "curl", "node-b") {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a finished pod still counts for its node"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(idx.pod("default", "curl-2").is_none());
    }
}

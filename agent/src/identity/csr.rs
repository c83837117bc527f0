//! Istio's certificate signing API (`istio.v1.auth.IstioCertificateService`,
//! istio/api `security/v1alpha1/ca.proto`) and the rules that decide which
//! identity a caller may have signed.
//!
//! The wire shape is Istio's, so that an agent pointed at istiod (or a
//! ztunnel pointed at shunt's controller) speaks the same protocol: one
//! unary `CreateCertificate(IstioCertificateRequest) returns
//! (IstioCertificateResponse)`, the caller's Kubernetes service-account
//! token as `authorization: Bearer …` metadata, and the identity a node
//! agent asks for on behalf of a pod in the request's metadata Struct under
//! `ImpersonatedIdentity`. The response is the chain as PEM strings, one
//! certificate each, leaf first and root last.
//!
//! The rules follow istiod's node authorization (`security/pkg/server/ca`):
//! without impersonation the certificate is for the caller's own service
//! account; with it the caller must be a trusted node account, its pod must
//! exist with the token's UID, and the requested service account must have
//! a pod on the caller's node. shunt adds what istiod leaves to the CA: the
//! CSR's SAN must be exactly the identity granted (istiod overwrites it),
//! and the validity is clamped.

use std::collections::BTreeMap;
use std::time::Duration;

use super::SpiffeId;

/// gRPC service and method, as in istio/api.
pub const SERVICE: &str = "istio.v1.auth.IstioCertificateService";
pub const CREATE_CERTIFICATE_PATH: &str =
    "/istio.v1.auth.IstioCertificateService/CreateCertificate";
/// Metadata key naming the identity a node agent requests for a pod.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
/// The audience Istio's CA requires of the projected token (TOKEN_AUDIENCES).
pub const TOKEN_AUDIENCE: &str = "istio-ca";
/// gRPC metadata istiod reads the caller's cluster from (`clusterid`).
pub const CLUSTER_ID_HEADER: &str = "clusterid";

/// `istio.v1.auth.IstioCertificateRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateRequest {
    /// PEM-encoded PKCS#10 request.
    #[prost(string, tag = "1")]
    pub csr: String,
    /// Requested validity in seconds (0: the CA's default).
    #[prost(int64, tag = "3")]
    pub validity_duration: i64,
    #[prost(message, optional, tag = "4")]
    pub metadata: Option<prost_types::Struct>,
}

/// `istio.v1.auth.IstioCertificateResponse`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct IstioCertificateResponse {
    /// PEM, one certificate per element: leaf first, root last.
    #[prost(string, repeated, tag = "1")]
    pub cert_chain: Vec<String>,
}

impl IstioCertificateRequest {
    /// The `ImpersonatedIdentity` metadata string, if any (empty counts as
    /// absent, as in istiod).
    pub fn impersonated_identity(&self) -> Option<&str> {
        let v = self.metadata.as_ref()?.fields.get(IMPERSONATED_IDENTITY)?;
        match &v.kind {
            Some(prost_types::value::Kind::StringValue(s)) if !s.is_empty() => Some(s),
            _ => None,
        }
    }

    /// Sets `ImpersonatedIdentity` to `id`.
    pub fn impersonate(&mut self, id: &SpiffeId) {
        let fields = BTreeMap::from([(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(id.uri())),
            },
        )]);
        self.metadata = Some(prost_types::Struct { fields });
    }
}

/// Who a bearer token belongs to, as TokenReview answers for a projected
/// service-account token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// `authentication.kubernetes.io/pod-name` (projected tokens only).
    pub pod_name: Option<String>,
    /// `authentication.kubernetes.io/pod-uid`.
    pub pod_uid: Option<String>,
    /// `authentication.kubernetes.io/node-name` (Kubernetes 1.32+).
    pub node_name: Option<String>,
}

/// What the CSR authorization needs to know about one Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub service_account: String,
    /// `spec.nodeName`; empty while unscheduled.
    pub node_name: String,
}

/// The cluster's Pods as the authorization sees them.
pub trait PodLookup: Send + Sync {
    /// False until the Pods have been listed: an empty index must not
    /// answer "no pod on your node".
    fn ready(&self) -> bool {
        true
    }
    /// The pod `namespace/name`, if it exists and is not finished.
    fn pod(&self, namespace: &str, name: &str) -> Option<PodFacts>;
    /// Whether a pod of service account `namespace/sa` runs on `node`.
    fn runs_on(&self, namespace: &str, service_account: &str, node: &str) -> bool;
}

/// The server's settings.
#[derive(Clone, Debug)]
pub struct CsrPolicy {
    pub trust_domain: String,
    /// Service accounts (`namespace`, `name`) that may request certificates
    /// for pods on their node (Istio's CA_TRUSTED_NODE_ACCOUNTS).
    pub trusted_node_accounts: Vec<(String, String)>,
    /// Validity when the request asks for none.
    pub default_validity: Duration,
    /// Longer requests are shortened to this.
    pub max_validity: Duration,
}

/// Why a request is refused. Each maps to one gRPC status code; the message
/// says which rule refused and is safe to send to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No or malformed `authorization` metadata, or TokenReview did not
    /// authenticate the token.
    #[error("{0}")]
    Unauthenticated(String),
    /// Authenticated, but not allowed this identity.
    #[error("{0}")]
    PermissionDenied(String),
    /// The CSR or the request itself is malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// The server cannot decide now (Pods not listed yet, API unreachable);
    /// the client retries.
    #[error("{0}")]
    Unavailable(String),
}

impl Refusal {
    pub fn code(&self) -> tonic::Code {
        match self {
            Refusal::Unauthenticated(_) => tonic::Code::Unauthenticated,
            Refusal::PermissionDenied(_) => tonic::Code::PermissionDenied,
            Refusal::InvalidArgument(_) => tonic::Code::InvalidArgument,
            Refusal::Unavailable(_) => tonic::Code::Unavailable,
        }
    }
    /// A short label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Unauthenticated(_) => "unauthenticated",
            Refusal::PermissionDenied(_) => "permission_denied",
            Refusal::InvalidArgument(_) => "invalid_argument",
            Refusal::Unavailable(_) => "unavailable",
        }
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        tonic::Status::new(r.code(), r.to_string())
    }
}

/// What a request is granted: the one identity its certificate carries and
/// for how long.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    pub identity: SpiffeId,
    pub validity: Duration,
}

/// The bearer token of an `authorization` metadata value.
pub fn bearer_token(authorization: Option<&str>) -> Result<&str, Refusal> {
    let v = authorization.ok_or_else(|| {
        Refusal::Unauthenticated(
            "no authorization metadata: send 'Bearer <service-account token>'".into(),
        )
    })?;
    match v.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(Refusal::Unauthenticated(
            "authorization metadata is not 'Bearer <token>'".into(),
        )),
    }
}

/// Decides which identity `caller` may have signed for `request`, and for
/// how long. The CSR itself (its SAN and signature) is checked against the
/// grant by [`super::Ca::sign_csr`].
pub fn authorize(
    policy: &CsrPolicy,
    caller: &Caller,
    request: &IstioCertificateRequest,
    pods: &dyn PodLookup,
) -> Result<Grant, Refusal> {
    let own = SpiffeId::new(
        policy.trust_domain.as_str(),
        caller.namespace.as_str(),
        caller.service_account.as_str(),
    )
    .map_err(|e| Refusal::Unauthenticated(format!("token names no usable service account: {e}")))?;
    let identity = match request.impersonated_identity() {
        None => own,
        Some(requested) => authorize_impersonation(policy, caller, &own, requested, pods)?,
    };
    Ok(Grant {
        identity,
        validity: validity(policy, request.validity_duration),
    })
}

fn authorize_impersonation(
    policy: &CsrPolicy,
    caller: &Caller,
    own: &SpiffeId,
    requested: &str,
    pods: &dyn PodLookup,
) -> Result<SpiffeId, Refusal> {
    let trusted = policy
        .trusted_node_accounts
        .iter()
        .any(|(ns, sa)| *ns == caller.namespace && *sa == caller.service_account);
    if !trusted {
        return Err(Refusal::PermissionDenied(format!(
            "{own} is not a node agent account: it may only request its own identity"
        )));
    }
    let id: SpiffeId = requested
        .parse()
        .map_err(|e| Refusal::InvalidArgument(format!("ImpersonatedIdentity: {e}")))?;
    if id.trust_domain() != policy.trust_domain {
        return Err(Refusal::PermissionDenied(format!(
            "{id} is not in trust domain {:?}",
            policy.trust_domain
        )));
    }
    if !pods.ready() {
        return Err(Refusal::Unavailable(
            "the CA has not listed the cluster's Pods yet; retry".into(),
        ));
    }
    // The caller's node is its pod's, as the API has it now: a token outlives
    // a deleted pod, and the node claim is absent before Kubernetes 1.32.
    let (Some(pod_name), Some(pod_uid)) = (&caller.pod_name, &caller.pod_uid) else {
        return Err(Refusal::PermissionDenied(format!(
            "the token of {own} is not bound to a pod (use a projected service-account token)"
        )));
    };
    let Some(pod) = pods.pod(&caller.namespace, pod_name) else {
        return Err(Refusal::PermissionDenied(format!(
            "the caller's pod {}/{pod_name} does not exist",
            caller.namespace
        )));
    };
    if pod.uid != *pod_uid || pod.service_account != caller.service_account {
        return Err(Refusal::PermissionDenied(format!(
            "the caller's pod {}/{pod_name} is not the one the token was issued to",
            caller.namespace
        )));
    }
    if pod.node_name.is_empty() {
        return Err(Refusal::PermissionDenied(format!(
            "the caller's pod {}/{pod_name} is not on a node",
            caller.namespace
        )));
    }
    if caller
        .node_name
        .as_ref()
        .is_some_and(|n| *n != pod.node_name)
    {
        return Err(Refusal::PermissionDenied(format!(
            "the token's node is not the node of pod {}/{pod_name}",
            caller.namespace
        )));
    }
    if !pods.runs_on(id.namespace(), id.service_account(), &pod.node_name) {
        return Err(Refusal::PermissionDenied(format!(
            "{id} has no pod on node {:?}",
            pod.node_name
        )));
    }
    Ok(id)
}

/// The requested validity, defaulted when absent or not positive and
/// clamped to the policy's maximum.
fn validity(policy: &CsrPolicy, requested_secs: i64) -> Duration {
    let asked = u64::try_from(requested_secs)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
        .unwrap_or(policy.default_validity);
    asked.min(policy.max_validity)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// A cluster as a map: (namespace, pod name) → facts.
    #[derive(Default)]
    struct Pods(HashMap<(String, String), PodFacts>);

    impl Pods {
        fn with(mut self, ns: &str, name: &str, sa: &str, node: &str) -> Self {
            self.0.insert(
                (ns.into(), name.into()),
                PodFacts {
                    uid: format!("uid-{name}"),
                    service_account: sa.into(),
                    node_name: node.into(),
                },
            );
            self
        }
    }

    impl PodLookup for Pods {
        fn pod(&self, ns: &str, name: &str) -> Option<PodFacts> {
            self.0.get(&(ns.to_string(), name.to_string())).cloned()
        }
        fn runs_on(&self, ns: &str, sa: &str, node: &str) -> bool {
            self.0
                .iter()
                .any(|((n, _), p)| n == ns && p.service_account == sa && p.node_name == node)
        }
    }

    fn policy() -> CsrPolicy {
        CsrPolicy {
            trust_domain: "cluster.local".into(),
            trusted_node_accounts: vec![("shunt-system".into(), "shunt-agent".into())],
            default_validity: Duration::from_secs(24 * 3600),
            max_validity: Duration::from_secs(24 * 3600),
        }
    }

    fn cluster() -> Pods {
        Pods::default()
            .with("shunt-system", "shunt-agent-a", "shunt-agent", "node-a")
            .with("shunt-system", "shunt-agent-b", "shunt-agent", "node-b")
            .with("default", "curl-1", "curl", "node-a")
            .with("default", "admin-1", "admin", "node-b")
    }

    fn agent_on(node: &str) -> Caller {
        Caller {
            namespace: "shunt-system".into(),
            service_account: "shunt-agent".into(),
            pod_name: Some(format!("shunt-agent-{}", &node[5..])),
            pod_uid: Some(format!("uid-shunt-agent-{}", &node[5..])),
            node_name: Some(node.into()),
        }
    }

    fn for_pod(id: &str) -> IstioCertificateRequest {
        let mut r = IstioCertificateRequest::default();
        r.impersonate(&id.parse().unwrap());
        r
    }

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn a_node_agent_gets_the_identity_of_a_pod_on_its_own_node() {
        let g = authorize(
            &policy(),
            &agent_on("node-a"),
            &for_pod("spiffe://cluster.local/ns/default/sa/curl"),
            &cluster(),
        )
        .unwrap();
        assert_eq!(g.identity, id("spiffe://cluster.local/ns/default/sa/curl"));
    }

    #[test]
    fn a_node_agent_is_refused_the_identity_of_a_pod_on_another_node() {
        let err = authorize(
            &policy(),
            &agent_on("node-a"),
            &for_pod("spiffe://cluster.local/ns/default/sa/admin"),
            &cluster(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.to_string().contains("no pod on node \"node-a\""),
            "{err}"
        );
        // ... and of an identity with no pod at all.
        let err = authorize(
            &policy(),
            &agent_on("node-a"),
            &for_pod("spiffe://cluster.local/ns/default/sa/nobody"),
            &cluster(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn without_impersonation_the_certificate_is_for_the_callers_own_service_account() {
        let caller = Caller {
            namespace: "common-infrastructure".into(),
            service_account: "egress-gateway".into(),
            pod_name: None,
            pod_uid: None,
            node_name: None,
        };
        let g = authorize(
            &policy(),
            &caller,
            &IstioCertificateRequest::default(),
            &cluster(),
        )
        .unwrap();
        assert_eq!(
            g.identity,
            id("spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway")
        );
        // The node agent asking for no one gets itself, never a pod's identity.
        let g = authorize(
            &policy(),
            &agent_on("node-a"),
            &IstioCertificateRequest::default(),
            &cluster(),
        )
        .unwrap();
        assert_eq!(
            g.identity,
            id("spiffe://cluster.local/ns/shunt-system/sa/shunt-agent")
        );
    }

    #[test]
    fn a_workload_that_is_not_a_node_agent_cannot_impersonate_even_a_pod_beside_it() {
        let caller = Caller {
            namespace: "default".into(),
            service_account: "curl".into(),
            pod_name: Some("curl-1".into()),
            pod_uid: Some("uid-curl-1".into()),
            node_name: Some("node-a".into()),
        };
        let mut cluster = cluster().with("default", "other-1", "other", "node-a");
        let err = authorize(
            &policy(),
            &caller,
            &for_pod("spiffe://cluster.local/ns/default/sa/other"),
            &cluster,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(err.to_string().contains("not a node agent"), "{err}");
        // Not even with a trusted account's name in another namespace.
        cluster = cluster.with("default", "shunt-agent-x", "shunt-agent", "node-a");
        let caller = Caller {
            service_account: "shunt-agent".into(),
            pod_name: Some("shunt-agent-x".into()),
            pod_uid: Some("uid-shunt-agent-x".into()),
            ..caller
        };
        let err = authorize(
            &policy(),
            &caller,
            &for_pod("spiffe://cluster.local/ns/default/sa/other"),
            &cluster,
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn a_token_of_a_deleted_or_replaced_agent_pod_is_refused() {
        let mut caller = agent_on("node-a");
        caller.pod_uid = Some("uid-of-an-older-pod".into());
        let req = for_pod("spiffe://cluster.local/ns/default/sa/curl");
        let err = authorize(&policy(), &caller, &req, &cluster()).unwrap_err();
        assert!(err.to_string().contains("not the one the token"), "{err}");
        let mut caller = agent_on("node-a");
        caller.pod_name = Some("shunt-agent-gone".into());
        let err = authorize(&policy(), &caller, &req, &cluster()).unwrap_err();
        assert!(err.to_string().contains("does not exist"), "{err}");
        // A legacy (unbound) token names no pod at all.
        let mut caller = agent_on("node-a");
        caller.pod_name = None;
        let err = authorize(&policy(), &caller, &req, &cluster()).unwrap_err();
        assert!(err.to_string().contains("not bound to a pod"), "{err}");
    }

    #[test]
    fn a_node_claim_that_disagrees_with_the_pods_node_is_refused() {
        let mut caller = agent_on("node-a");
        caller.node_name = Some("node-b".into());
        let err = authorize(
            &policy(),
            &caller,
            &for_pod("spiffe://cluster.local/ns/default/sa/curl"),
            &cluster(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
    }

    #[test]
    fn identities_of_another_trust_domain_or_malformed_are_refused() {
        let err = authorize(
            &policy(),
            &agent_on("node-a"),
            &for_pod("spiffe://other.td/ns/default/sa/curl"),
            &cluster(),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        let req = IstioCertificateRequest {
            metadata: Some(prost_types::Struct {
                fields: BTreeMap::from([(
                    IMPERSONATED_IDENTITY.to_string(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(
                            "spiffe://cluster.local/ns/default".into(),
                        )),
                    },
                )]),
            }),
            ..Default::default()
        };
        let err = authorize(&policy(), &agent_on("node-a"), &req, &cluster()).unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn nothing_is_impersonated_before_the_pods_are_listed() {
        struct NotListed(Pods);
        impl PodLookup for NotListed {
            fn ready(&self) -> bool {
                false
            }
            fn pod(&self, ns: &str, name: &str) -> Option<PodFacts> {
                self.0.pod(ns, name)
            }
            fn runs_on(&self, ns: &str, sa: &str, node: &str) -> bool {
                self.0.runs_on(ns, sa, node)
            }
        }
        let err = authorize(
            &policy(),
            &agent_on("node-a"),
            &for_pod("spiffe://cluster.local/ns/default/sa/curl"),
            &NotListed(cluster()),
        )
        .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn validity_is_defaulted_and_clamped_to_the_maximum() {
        let p = CsrPolicy {
            default_validity: Duration::from_secs(3600),
            max_validity: Duration::from_secs(7200),
            ..policy()
        };
        let v = |secs| {
            let mut r = for_pod("spiffe://cluster.local/ns/default/sa/curl");
            r.validity_duration = secs;
            authorize(&p, &agent_on("node-a"), &r, &cluster())
                .unwrap()
                .validity
        };
        assert_eq!(v(0), Duration::from_secs(3600));
        assert_eq!(v(-5), Duration::from_secs(3600));
        assert_eq!(v(600), Duration::from_secs(600));
        assert_eq!(v(90 * 24 * 3600), Duration::from_secs(7200));
        assert_eq!(v(i64::MAX), Duration::from_secs(7200));
    }

    #[test]
    fn the_bearer_token_is_taken_from_the_authorization_metadata_only_in_bearer_form() {
        assert_eq!(bearer_token(Some("Bearer abc.def")).unwrap(), "abc.def");
        assert_eq!(bearer_token(Some("bearer  abc ")).unwrap(), "abc");
        for bad in [
            None,
            Some(""),
            Some("Bearer "),
            Some("Basic abc"),
            Some("abc"),
        ] {
            assert_eq!(
                bearer_token(bad).unwrap_err().code(),
                tonic::Code::Unauthenticated,
                "{bad:?}"
            );
        }
    }
}

//! Waypoint authorization: Istio `AuthorizationPolicy` compiled once per
//! config into an immutable [`PolicySet`], evaluated per request or per
//! connection without allocation.
//!
//! Binding (what the waypoint enforces, as Istio does for waypoints):
//! - `targetRefs`/`targetRef` naming a ServiceEntry (group
//!   `networking.istio.io`; the policy's namespace unless the ref gives one):
//!   applies to that ServiceEntry's traffic through the waypoint;
//! - naming the waypoint's own Gateway (group `gateway.networking.k8s.io`):
//!   applies to all traffic through the waypoint;
//! - naming GatewayClass `istio-waypoint` from the root namespace: applies to
//!   every waypoint, hence to this one;
//! - a `selector`, or neither selector nor targetRefs (namespace-wide, or
//!   mesh-wide when in the root namespace): these select *workloads*, which
//!   Istio enforces in ztunnel/sidecars, never in a waypoint. shunt ignores
//!   them at the waypoint and reports a [`PolicyWarning`] for each.
//!
//! Evaluation: any matching DENY denies; else if no ALLOW policy applies the
//! request is allowed; else a matching ALLOW rule is needed. AUDIT never
//! changes the decision but the first matching AUDIT policy is reported.
//! CUSTOM is rejected when the policy is built. Policies annotated
//! `istio.io/dry-run: "true"` are evaluated on their own, as Envoy's shadow
//! rules, and only reported ([`Decision::shadow`]); they never decide.

mod compile;
mod eval;
mod explain;
mod matcher;
pub mod normalize;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use thiserror::Error;

pub use compile::{PolicySet, ServicePolicies};
pub use explain::{explain, Explanation};
pub use normalize::{
    check_framing, normalize_host, normalize_path, Framing, FramingError, PathError,
    PathNormalization,
};

/// The annotation that turns a policy into a shadow (dry-run) policy.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The root namespace of an Istio mesh unless configured otherwise.
pub use crate::model::mesh::DEFAULT_ROOT_NAMESPACE;

/// Build-time inputs besides the policies themselves.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    /// Istio's root namespace (`meshConfig.rootNamespace`).
    pub root_namespace: String,
    /// The waypoint's own Gateway; policies targeting it apply to all traffic
    /// through this waypoint. `None`: Gateway-bound policies are not applied.
    pub waypoint: Option<GatewayRef>,
    /// MeshConfig `pathNormalization.normalization`: how request paths are
    /// normalized before matching (and sent upstream).
    pub path_normalization: PathNormalization,
    /// `(namespace, name)` of every ServiceEntry → whether it has a TLS or
    /// HTTPS port, where `connection.sni` can be known. `None`: unknown
    /// (no such check).
    pub service_tls: Option<HashMap<(String, String), bool>>,
}

impl BuildOptions {
    /// The options a waypoint uses for `cfg`: the mesh's root namespace and
    /// path normalization, and its ServiceEntries' ports. One home, so that
    /// `shunt config check` and `shunt policy check` compile policies
    /// exactly as the waypoint does.
    pub fn for_config(cfg: &crate::config::Config, waypoint: Option<GatewayRef>) -> Self {
        let root_namespace = crate::model::Mesh::from_config(&cfg.mesh).root_namespace;
        // Only the entries a policy with a `connection.sni` condition names
        // are looked up (`sni_reachable`, the one reader): a map of every
        // entry cost 200,000 strings at 100,000 entries.
        let targeted: std::collections::HashSet<(&str, &str)> = cfg
            .authorization_policies
            .iter()
            .filter(|p| {
                p.spec
                    .rules
                    .iter()
                    .flatten()
                    .any(|r| r.when.iter().any(|c| c.key == compile::SNI_KEY))
            })
            .flat_map(|p| {
                let ns = p.namespace();
                p.spec
                    .target_ref
                    .iter()
                    .chain(&p.spec.target_refs)
                    .filter(|r| r.kind == "ServiceEntry")
                    .map(move |r| {
                        let target_ns = r.namespace.as_deref().filter(|n| !n.is_empty());
                        (target_ns.unwrap_or(ns), r.name.as_str())
                    })
            })
            .collect();
        // No such policy targets an entry (most configs): no walk of every
        // entry either (each one hashed cost ~25 ms at 100,000).
        let candidates = if targeted.is_empty() {
            &[][..]
        } else {
            &cfg.service_entries[..]
        };
        let service_tls = candidates
            .iter()
            .filter(|se| targeted.contains(&(se.namespace(), se.name())))
            .map(|se| {
                let tls = se.spec.ports.iter().any(|p| {
                    matches!(
                        p.protocol(),
                        crate::config::Protocol::Tls | crate::config::Protocol::Https
                    )
                });
                ((se.namespace().to_string(), se.name().to_string()), tls)
            })
            .collect();
        BuildOptions {
            root_namespace,
            waypoint,
            path_normalization: cfg.mesh.path_normalization.normalization,
            service_tls: Some(service_tls),
        }
    }
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            root_namespace: DEFAULT_ROOT_NAMESPACE.to_string(),
            waypoint: None,
            path_normalization: PathNormalization::default(),
            service_tls: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayRef {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Allow => "ALLOW",
            Action::Deny => "DENY",
            Action::Audit => "AUDIT",
        })
    }
}

/// A policy that is valid but not enforced at the waypoint, or a pattern
/// that does not mean what it may look like.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyWarning {
    /// `namespace/name`.
    pub policy: String,
    pub message: String,
}

impl fmt::Display for PolicyWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthorizationPolicy {}: {}", self.policy, self.message)
    }
}

#[derive(Debug, Error)]
pub enum PolicyError {
    #[error("AuthorizationPolicy {policy}: CUSTOM action is not supported by shunt")]
    CustomNotSupported { policy: String },
    #[error("AuthorizationPolicy {policy}: {field}: {message}")]
    Invalid {
        policy: String,
        field: String,
        message: String,
    },
    #[error("AuthorizationPolicy {policy} is defined twice")]
    Duplicate { policy: String },
    #[error("{} invalid AuthorizationPolicies:\n  {}", .0.len(), .0.iter().map(|e| e.to_string()).collect::<Vec<_>>().join("\n  "))]
    Many(Vec<PolicyError>),
}

/// Header access for `request.headers[...]` conditions, so the policy engine
/// does not depend on an HTTP library's types.
pub trait HeaderLookup {
    /// Calls `f` with every value of header `name` (given in lower case), in
    /// the order received.
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8]));
}

impl HeaderLookup for http::HeaderMap {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for v in self.get_all(name) {
            f(v.as_bytes())
        }
    }
}

/// A plain header list (tests, `shunt policy check`).
#[derive(Clone, Copy, Debug, Default)]
pub struct HeaderList<'a>(pub &'a [(&'a str, &'a str)]);

impl HeaderLookup for HeaderList<'_> {
    fn for_each_value(&self, name: &str, f: &mut dyn FnMut(&[u8])) {
        for (k, v) in self.0 {
            if k.eq_ignore_ascii_case(name) {
                f(v.as_bytes())
            }
        }
    }
}

static NO_HEADERS: HeaderList<'static> = HeaderList(&[]);

/// The HTTP part of a request, normalized on construction so that matching
/// can never see a raw path or Host.
pub struct HttpRequest<'a> {
    method: &'a str,
    path: Cow<'a, str>,
    host: Cow<'a, str>,
    headers: &'a dyn HeaderLookup,
}

impl<'a> HttpRequest<'a> {
    /// `method` as parsed (case-sensitive, like HTTP); `target` the request
    /// target (path, with query and fragment if any); `authority` the Host
    /// header or `:authority`; `mode` the mesh's path normalization
    /// ([`PolicySet::path_normalization`]). Fails (answer 400) on a path
    /// that cannot be normalized.
    pub fn new(
        method: &'a str,
        target: &'a str,
        authority: &'a str,
        headers: &'a dyn HeaderLookup,
        mode: PathNormalization,
    ) -> Result<Self, PathError> {
        Ok(HttpRequest {
            method,
            path: normalize_path(target, mode)?,
            host: normalize_host(authority),
            headers,
        })
    }

    /// Same, without headers.
    pub fn without_headers(
        method: &'a str,
        target: &'a str,
        authority: &'a str,
        mode: PathNormalization,
    ) -> Result<Self, PathError> {
        Self::new(method, target, authority, &NO_HEADERS, mode)
    }

    pub fn method(&self) -> &str {
        self.method
    }
    /// The normalized path (what policies match, and what should go upstream).
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The host as received, lower-cased (port and trailing dot kept).
    pub fn host(&self) -> &str {
        &self.host
    }
}

/// What a policy sees of one request (HTTP) or connection (TCP).
#[derive(Default)]
pub struct RequestContext<'a> {
    /// The peer's verified SPIFFE identity (`spiffe://td/ns/NS/sa/SA`, the
    /// prefix optional). `None` when the peer is not authenticated.
    pub principal: Option<&'a str>,
    /// `source.ip`/`ipBlocks`: the client address the waypoint believes
    /// (`Forwarded: for=` when it is a workload of the principal, else the
    /// TCP peer).
    pub source_ip: Option<IpAddr>,
    /// `remote.ip`/`remoteIpBlocks`; `None` means the same as `source_ip`
    /// (shunt trusts no X-Forwarded-For hops).
    pub remote_ip: Option<IpAddr>,
    /// `destination.ip`: the service address the client dialed (VIP).
    pub destination_ip: Option<IpAddr>,
    /// `ports`/`destination.port`: the ServiceEntry port dialed (VIP port).
    pub destination_port: u16,
    /// `connection.sni`, when the downstream connection had one.
    pub sni: Option<&'a str>,
    /// `Some` for an HTTP request, `None` for plain TCP.
    pub http: Option<HttpRequest<'a>>,
}

/// Why a decision was reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A DENY rule matched (`policy`, `rule` name it).
    DenyMatched,
    /// An ALLOW rule matched.
    AllowMatched,
    /// ALLOW policies apply and none matched.
    NoAllowMatched,
    /// No ALLOW policy applies (and no DENY matched).
    NoAllowPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy, when one decided.
    pub policy: Option<Arc<str>>,
    pub action: Option<Action>,
    /// Index of the deciding rule in that policy's `rules`.
    pub rule: Option<usize>,
    pub reason: Reason,
    /// The first matching AUDIT policy and rule (never changes `allowed`).
    pub audit: Option<(Arc<str>, usize)>,
    /// What the dry-run policies would have decided; `None` when no dry-run
    /// policy applies. Never changes `allowed`.
    pub shadow: Option<Shadow>,
}

/// The would-be decision of the dry-run (`istio.io/dry-run`) policies, each
/// action evaluated on its own as Envoy's shadow rules are: a matching
/// dry-run DENY would deny; else dry-run ALLOW policies, if any apply,
/// would allow only on a matching rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shadow {
    pub allowed: bool,
    /// The dry-run policy that decided, when one rule matched or when the
    /// dry-run ALLOW policies matched nothing (then the first of them).
    pub policy: Option<Arc<str>>,
    /// ALLOW or DENY: which shadow engine decided.
    pub action: Action,
    pub rule: Option<usize>,
}

impl fmt::Display for Shadow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        match (&self.policy, self.rule) {
            (Some(p), Some(r)) => write!(
                f,
                "shadow {verdict}: dry-run {} policy {p} rule {r} matched",
                self.action
            ),
            (Some(p), None) => write!(
                f,
                "shadow {verdict}: no rule of dry-run ALLOW policy {p} matched"
            ),
            (None, _) => write!(f, "shadow {verdict}"),
        }
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allowed { "allowed" } else { "denied" };
        match (self.reason, &self.policy, self.rule) {
            (Reason::DenyMatched, Some(p), Some(r)) => {
                write!(f, "{verdict}: DENY policy {p} rule {r} matched")?
            }
            (Reason::AllowMatched, Some(p), Some(r)) => {
                write!(f, "{verdict}: ALLOW policy {p} rule {r} matched")?
            }
            (Reason::NoAllowMatched, Some(p), _) => write!(
                f,
                "{verdict}: no rule of ALLOW policy {p} (or any other applicable ALLOW policy) matched"
            )?,
            (Reason::NoAllowMatched, None, _) => write!(
                f,
                "{verdict}: no rule of the applicable ALLOW policies matched"
            )?,
            _ => write!(f, "{verdict}: no ALLOW policy applies")?,
        }
        if let Some((p, r)) = &self.audit {
            write!(f, " (audited by AUDIT policy {p} rule {r})")?;
        }
        if let Some(s) = &self.shadow {
            write!(f, " ({s})")?;
        }
        Ok(())
    }
}

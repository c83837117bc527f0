//! Per-request evaluation. Comparisons only: no allocation, no locks.

use super::compile::{Check, CompiledPolicy, CompiledRule, Kind, ServicePolicies};
use super::matcher::{any_ip, any_str};
use super::{Action, Decision, Reason, RequestContext, Shadow};

/// The peer identity split once per evaluation.
pub(crate) struct Peer<'a> {
    /// Without `spiffe://`, as Istio compares principals.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub service_account: Option<&'a str>,
    /// Before the first `/` of the principal.
    pub trust_domain: Option<&'a str>,
}

impl<'a> Peer<'a> {
    pub(crate) fn new(principal: Option<&'a str>) -> Peer<'a> {
        let principal = principal
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p))
            .filter(|p| !p.is_empty());
        let (mut namespace, mut service_account) = (None, None);
        let trust_domain = principal
            .and_then(|p| p.split('/').next())
            .filter(|td| !td.is_empty());
        if let Some(p) = principal {
            // <trust domain>/ns/<namespace>/sa/<service account>
            let mut it = p.split('/');
            if let (Some(_td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
                it.next(),
            ) {
                if !ns.is_empty() && !sa.is_empty() {
                    namespace = Some(ns);
                    service_account = Some(sa);
                }
            }
        }
        Peer {
            principal,
            namespace,
            service_account,
            trust_domain,
        }
    }
}

impl Check {
    /// Whether this field matches. HTTP-only fields on a TCP connection count
    /// as matching: only DENY rules get here with them (fail closed); ALLOW
    /// and AUDIT rules using them are skipped before (see `rule_matches`).
    pub(crate) fn eval(&self, req: &RequestContext<'_>, peer: &Peer<'_>) -> bool {
        let http = req.http.as_ref();
        if http.is_none() && self.kind.http_only() {
            return true;
        }
        let any = match &self.kind {
            Kind::Principal(ms) => peer.principal.is_some_and(|p| any_str(ms, p)),
            Kind::Namespace(ms) => peer.namespace.is_some_and(|n| any_str(ms, n)),
            Kind::ServiceAccount(list) => match (peer.namespace, peer.service_account) {
                (Some(n), Some(s)) => list.iter().any(|(ln, ls)| **ln == *n && **ls == *s),
                _ => false,
            },
            Kind::TrustDomain(ms) => peer.trust_domain.is_some_and(|t| any_str(ms, t)),
            Kind::SourceIp(nets) => req.source_ip.is_some_and(|ip| any_ip(nets, ip)),
            Kind::RemoteIp(nets) => req
                .remote_ip
                .or(req.source_ip)
                .is_some_and(|ip| any_ip(nets, ip)),
            Kind::DestIp(nets) => req.destination_ip.is_some_and(|ip| any_ip(nets, ip)),
            Kind::Port(ports) => ports.contains(&req.destination_port),
            Kind::Sni(ms) => req.sni.is_some_and(|s| {
                // Pre-lower-cased patterns; SNI is case-insensitive. Avoid
                // allocating: compare lower-case only when needed.
                if s.len() > 255 {
                    false // longer than any DNS name
                } else if s.bytes().any(|c| c.is_ascii_uppercase()) {
                    let mut buf = [0u8; 255];
                    let n = s.len();
                    buf[..n].copy_from_slice(&s.as_bytes()[..n]);
                    buf[..n].make_ascii_lowercase();
                    ms.iter().any(|m| m.matches_bytes(&buf[..n]))
                } else {
                    any_str(ms, s)
                }
            }),
            Kind::Host(ms) => http.is_some_and(|h| any_str(ms, h.host())),
            Kind::Method(ms) => http.is_some_and(|h| any_str(ms, h.method())),
            Kind::Path(ms) => http.is_some_and(|h| any_str(ms, h.path())),
            Kind::Header(name, ms) => http.is_some_and(|h| {
                let values = |f: &mut dyn FnMut(&[u8])| h.headers.for_each_value(name, f);
                ms.iter().any(|m| m.matches_joined(&values))
            }),
            Kind::NoJwt => false,
        };
        any != self.negate
    }
}

/// Istio on TCP: an ALLOW (or AUDIT) rule with HTTP-only fields is dropped,
/// so it cannot match; in a DENY rule those fields are dropped, so they
/// match (see `Check::eval`).
pub(crate) fn rule_applies_on(
    rule: &CompiledRule,
    req: &RequestContext<'_>,
    action: Action,
) -> bool {
    !(req.http.is_none() && rule.http_only && action != Action::Deny)
}

pub(crate) fn rule_matches(
    rule: &CompiledRule,
    req: &RequestContext<'_>,
    peer: &Peer<'_>,
    action: Action,
) -> bool {
    rule_applies_on(rule, req, action)
        && (rule.from.is_empty()
            || rule
                .from
                .iter()
                .any(|s| s.iter().all(|c| c.eval(req, peer))))
        && (rule.to.is_empty() || rule.to.iter().any(|o| o.iter().all(|c| c.eval(req, peer))))
        && rule.when.iter().all(|c| c.eval(req, peer))
}

/// Index of the first matching rule.
pub(crate) fn policy_matches(
    p: &CompiledPolicy,
    req: &RequestContext<'_>,
    peer: &Peer<'_>,
) -> Option<usize> {
    p.rules
        .iter()
        .position(|r| rule_matches(r, req, peer, p.action))
}

impl ServicePolicies<'_> {
    /// Decides one HTTP request or TCP connection.
    pub fn evaluate(&self, req: &RequestContext<'_>) -> Decision {
        let peer = Peer::new(req.principal);
        let policies = &self.set.policies;
        let t = self.target;
        let mut audit = None;
        for &i in &t.audit {
            let p = &policies[i as usize];
            if let Some(r) = policy_matches(p, req, &peer) {
                audit = Some((p.name.clone(), r));
                break;
            }
        }
        let shadow = self.shadow(req, &peer);
        for &i in &t.deny {
            let p = &policies[i as usize];
            if let Some(r) = policy_matches(p, req, &peer) {
                return Decision {
                    allowed: false,
                    policy: Some(p.name.clone()),
                    action: Some(Action::Deny),
                    rule: Some(r),
                    reason: Reason::DenyMatched,
                    audit,
                    shadow,
                };
            }
        }
        if t.allow.is_empty() {
            return Decision {
                allowed: true,
                policy: None,
                action: None,
                rule: None,
                reason: Reason::NoAllowPolicy,
                audit,
                shadow,
            };
        }
        for &i in &t.allow {
            let p = &policies[i as usize];
            if let Some(r) = policy_matches(p, req, &peer) {
                return Decision {
                    allowed: true,
                    policy: Some(p.name.clone()),
                    action: Some(Action::Allow),
                    rule: Some(r),
                    reason: Reason::AllowMatched,
                    audit,
                    shadow,
                };
            }
        }
        // The ALLOW policies applied and none matched: they decided. Name
        // the first (the usual case is exactly one, as in the seed).
        Decision {
            allowed: false,
            policy: t.allow.first().map(|&i| policies[i as usize].name.clone()),
            action: Some(Action::Allow),
            rule: None,
            reason: Reason::NoAllowMatched,
            audit,
            shadow,
        }
    }

    /// The dry-run policies' decision, with the same rules as the enforced
    /// ones but on their own (Envoy's shadow engines).
    fn shadow(&self, req: &RequestContext<'_>, peer: &Peer<'_>) -> Option<Shadow> {
        let policies = &self.set.policies;
        let t = self.target;
        for &i in &t.shadow_deny {
            let p = &policies[i as usize];
            if let Some(r) = policy_matches(p, req, peer) {
                return Some(Shadow {
                    allowed: false,
                    policy: Some(p.name.clone()),
                    action: Action::Deny,
                    rule: Some(r),
                });
            }
        }
        for &i in &t.shadow_allow {
            let p = &policies[i as usize];
            if let Some(r) = policy_matches(p, req, peer) {
                return Some(Shadow {
                    allowed: true,
                    policy: Some(p.name.clone()),
                    action: Action::Allow,
                    rule: Some(r),
                });
            }
        }
        if let Some(&i) = t.shadow_allow.first() {
            return Some(Shadow {
                allowed: false,
                policy: Some(policies[i as usize].name.clone()),
                action: Action::Allow,
                rule: None,
            });
        }
        (!t.shadow_deny.is_empty()).then_some(Shadow {
            allowed: true,
            policy: None,
            action: Action::Deny,
            rule: None,
        })
    }
}

impl super::PolicySet {
    /// Shorthand for `for_service(namespace, name).evaluate(req)`.
    pub fn evaluate(&self, namespace: &str, name: &str, req: &RequestContext<'_>) -> Decision {
        self.for_service(namespace, name).evaluate(req)
    }
}

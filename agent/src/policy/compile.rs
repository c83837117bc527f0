//! From `(ObjectMeta, AuthorizationPolicySpec)` to the immutable, indexed
//! [`PolicySet`]. All validation and all parsing (CIDRs, ports, patterns,
//! lower-casing) happens here, once per config.

use std::collections::HashMap;
use std::sync::Arc;

use ipnet::IpNet;

use super::matcher::{parse_ip_block, StrMatch};
use super::{
    Action, BuildOptions, PathNormalization, PolicyError, PolicyWarning, DRY_RUN_ANNOTATION,
};
use crate::config::authz::{
    AuthorizationPolicySpec, Condition, Operation, PolicyTargetReference, Source,
};
use crate::config::meta::ObjectMeta;

const GROUP_NETWORKING: &str = "networking.istio.io";
const GROUP_GATEWAY: &str = "gateway.networking.k8s.io";
use crate::config::WAYPOINT_CLASS;
/// The condition key of the SNI match (`sni_reachable` needs the targets' ports).
pub(super) const SNI_KEY: &str = "connection.sni";

/// One request attribute and the compiled values it is compared with.
#[derive(Debug)]
pub(crate) enum Kind {
    Principal(Vec<StrMatch>),
    /// Namespace of the peer principal (`.../ns/NS/...`), as Istio derives it.
    Namespace(Vec<StrMatch>),
    /// `(namespace, serviceaccount)` of the peer principal; exact only.
    ServiceAccount(Vec<(Box<str>, Box<str>)>),
    /// Trust domain of the peer principal (before the first `/`).
    TrustDomain(Vec<StrMatch>),
    SourceIp(Vec<IpNet>),
    RemoteIp(Vec<IpNet>),
    DestIp(Vec<IpNet>),
    Port(Vec<u16>),
    Sni(Vec<StrMatch>),
    Host(Vec<StrMatch>),
    Method(Vec<StrMatch>),
    Path(Vec<StrMatch>),
    /// Lower-case header name.
    Header(Box<str>, Vec<StrMatch>),
    /// `requestPrincipals` and `request.auth.*`: shunt has no JWT
    /// authentication, so, as Istio without a JWT, these never match.
    NoJwt,
}

impl Kind {
    /// Fields that exist only for HTTP requests (Istio's "HTTP only").
    pub(crate) fn http_only(&self) -> bool {
        matches!(
            self,
            Kind::Host(_) | Kind::Method(_) | Kind::Path(_) | Kind::Header(..) | Kind::NoJwt
        )
    }
}

/// One field of a source/operation, or one half (`values` / `notValues`) of a
/// condition. `negate`: the `not*` form, which matches when no value matches.
#[derive(Debug)]
pub(crate) struct Check {
    /// The field as written, for explanations: `principals`,
    /// `when[request.headers[x-user]].notValues`, ...
    pub field: String,
    pub negate: bool,
    pub kind: Kind,
    /// The values as written, for explanations.
    pub raw: Vec<String>,
}

#[derive(Debug, Default)]
pub(crate) struct CompiledRule {
    /// OR of sources, each an AND of checks; empty: any source.
    pub from: Vec<Vec<Check>>,
    /// OR of operations, each an AND of checks; empty: any operation.
    pub to: Vec<Vec<Check>>,
    /// AND of conditions.
    pub when: Vec<Check>,
    /// Uses any HTTP-only field (see [`Kind::http_only`]).
    pub http_only: bool,
}

#[derive(Debug)]
pub(crate) struct CompiledPolicy {
    /// `namespace/name`.
    pub name: Arc<str>,
    pub action: Action,
    /// Empty: matches nothing.
    pub rules: Vec<CompiledRule>,
    /// How it is bound, for explanations (`ServiceEntry ns/name`, ...).
    pub bindings: Vec<String>,
    /// `istio.io/dry-run: "true"`: evaluated and reported, never enforced.
    pub dry_run: bool,
}

/// Indices (into `PolicySet::policies`) of the policies applying to one
/// ServiceEntry at this waypoint, split by action, in name order.
#[derive(Debug, Default, Clone)]
pub(crate) struct TargetPolicies {
    pub deny: Vec<u32>,
    pub allow: Vec<u32>,
    pub audit: Vec<u32>,
    /// Dry-run policies, per action (AUDIT has no dry-run form worth having:
    /// it never decides anyway, so it stays in `audit`).
    pub shadow_deny: Vec<u32>,
    pub shadow_allow: Vec<u32>,
    /// Some enforced rule uses HTTP-only fields. Dry-run policies do not
    /// count: they must never change how traffic is handled.
    pub needs_http: bool,
}

impl TargetPolicies {
    fn push(&mut self, idx: u32, p: &CompiledPolicy) {
        let list = match (p.action, p.dry_run) {
            (Action::Deny, false) => &mut self.deny,
            (Action::Allow, false) => &mut self.allow,
            (Action::Deny, true) => &mut self.shadow_deny,
            (Action::Allow, true) => &mut self.shadow_allow,
            (Action::Audit, _) => &mut self.audit,
        };
        if !list.contains(&idx) {
            list.push(idx);
        }
        if !p.dry_run {
            self.needs_http |= p.rules.iter().any(|r| r.http_only);
        }
    }

    fn sort(&mut self) {
        for l in [
            &mut self.deny,
            &mut self.allow,
            &mut self.audit,
            &mut self.shadow_deny,
            &mut self.shadow_allow,
        ] {
            l.sort_unstable();
        }
    }
}

/// The compiled, immutable policies of one config, indexed by target.
/// Build it once per config and share it (e.g. in an `Arc`); evaluation
/// takes `&self` and never locks.
#[derive(Debug)]
pub struct PolicySet {
    pub(crate) policies: Vec<CompiledPolicy>,
    /// Bound to the waypoint itself (Gateway or GatewayClass): for every
    /// ServiceEntry without policies of its own.
    pub(crate) gateway: TargetPolicies,
    /// namespace -> ServiceEntry name -> gateway policies + its own.
    pub(crate) services: HashMap<Box<str>, HashMap<Box<str>, TargetPolicies>>,
    pub(crate) warnings: Vec<PolicyWarning>,
    pub(crate) path_normalization: PathNormalization,
}

/// The policies that apply to one ServiceEntry's traffic at this waypoint.
/// Cheap to obtain and `Copy`; a connection handler may keep it for all the
/// requests of a connection.
#[derive(Clone, Copy, Debug)]
pub struct ServicePolicies<'a> {
    pub(crate) set: &'a PolicySet,
    pub(crate) target: &'a TargetPolicies,
}

impl ServicePolicies<'_> {
    /// No policy applies (not even a dry-run one): everything is allowed.
    pub fn is_empty(&self) -> bool {
        let t = self.target;
        t.deny.is_empty()
            && t.allow.is_empty()
            && t.audit.is_empty()
            && t.shadow_deny.is_empty()
            && t.shadow_allow.is_empty()
    }
    /// Some applicable rule uses HTTP-only fields: on a port not declared
    /// HTTP the waypoint may still want to parse HTTP to decide precisely.
    pub fn needs_http(&self) -> bool {
        self.target.needs_http
    }
}

enum Binding {
    ServiceEntry(String, String),
    Waypoint(String),
}

impl PolicySet {
    /// An empty set: every request is allowed.
    pub fn empty() -> PolicySet {
        PolicySet {
            policies: Vec::new(),
            gateway: TargetPolicies::default(),
            services: HashMap::new(),
            warnings: Vec::new(),
            path_normalization: PathNormalization::default(),
        }
    }

    /// Validates and compiles all policies. Every invalid policy is reported
    /// (one error lists them all); valid policies that the waypoint does not
    /// enforce are listed in [`PolicySet::warnings`].
    pub fn build<'p, I>(policies: I, opts: &BuildOptions) -> Result<PolicySet, PolicyError>
    where
        I: IntoIterator<Item = &'p (ObjectMeta, AuthorizationPolicySpec)>,
    {
        let mut items: Vec<&(ObjectMeta, AuthorizationPolicySpec)> = policies.into_iter().collect();
        items.sort_by(|a, b| (a.0.ns(), a.0.name.as_str()).cmp(&(b.0.ns(), b.0.name.as_str())));
        let mut errors = Vec::new();
        let mut warnings = Vec::new();
        let mut compiled: Vec<(CompiledPolicy, Vec<Binding>)> = Vec::new();
        let mut prev: Option<(&str, &str)> = None;
        for (meta, spec) in items {
            let key = (meta.ns(), meta.name.as_str());
            let pname = format!("{}/{}", meta.ns(), meta.name);
            if prev == Some(key) {
                errors.push(PolicyError::Duplicate { policy: pname });
                continue;
            }
            prev = Some(key);
            let mut b = Builder {
                policy: &pname,
                namespace: meta.ns(),
                errors: Vec::new(),
                warnings: &mut warnings,
                normalization: opts.path_normalization,
                sni_conditions: Vec::new(),
            };
            let bindings = b.bindings(meta, spec, opts);
            if !b.errors.is_empty() || bindings.is_empty() {
                errors.append(&mut b.errors);
                continue;
            }
            let result = b.policy(meta, spec, &bindings);
            b.sni_reachable(&bindings, opts);
            errors.append(&mut b.errors);
            if let Some(p) = result {
                compiled.push((p, bindings));
            }
        }
        match errors.len() {
            0 => {}
            1 => return Err(errors.remove(0)),
            _ => return Err(PolicyError::Many(errors)),
        }

        let mut set = PolicySet::empty();
        set.warnings = warnings;
        set.path_normalization = opts.path_normalization;
        let mut own: Vec<(String, String, u32)> = Vec::new();
        for (i, (p, bindings)) in compiled.into_iter().enumerate() {
            let idx = i as u32;
            for b in &bindings {
                match b {
                    Binding::Waypoint(_) => set.gateway.push(idx, &p),
                    Binding::ServiceEntry(ns, name) => own.push((ns.clone(), name.clone(), idx)),
                }
            }
            set.policies.push(p);
        }
        // Each ServiceEntry with policies of its own gets the waypoint-wide
        // ones too, so evaluation walks one list per action.
        for (ns, name, idx) in own {
            let t = set
                .services
                .entry(ns.into_boxed_str())
                .or_default()
                .entry(name.into_boxed_str())
                .or_insert_with(|| set.gateway.clone());
            t.push(idx, &set.policies[idx as usize]);
        }
        for ns in set.services.values_mut() {
            for t in ns.values_mut() {
                // Name order across waypoint-wide and own policies.
                t.sort();
            }
        }
        Ok(set)
    }

    /// Policies that are valid but ignored at the waypoint, and suspicious
    /// patterns; for logs and `shunt policy check`.
    pub fn warnings(&self) -> &[PolicyWarning] {
        &self.warnings
    }

    /// Number of policies enforced by this waypoint.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// How request paths are normalized before matching; the waypoint
    /// sends the normalized path upstream.
    pub fn path_normalization(&self) -> PathNormalization {
        self.path_normalization
    }

    /// The policies for traffic to ServiceEntry `namespace/name`.
    pub fn for_service(&self, namespace: &str, name: &str) -> ServicePolicies<'_> {
        let target = self
            .services
            .get(namespace)
            .and_then(|m| m.get(name))
            .unwrap_or(&self.gateway);
        ServicePolicies { set: self, target }
    }
}

struct Builder<'b> {
    policy: &'b str,
    /// The policy's namespace (`serviceAccounts` short form).
    namespace: &'b str,
    errors: Vec<PolicyError>,
    warnings: &'b mut Vec<PolicyWarning>,
    normalization: PathNormalization,
    /// `spec.rules[i].when[j]` of each `connection.sni` condition with
    /// `values` (it can match only where an SNI is known).
    sni_conditions: Vec<String>,
}

impl Builder<'_> {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(PolicyError::Invalid {
            policy: self.policy.to_string(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Refuses a `connection.sni` condition that can never match: the SNI
    /// is known only on TLS/HTTPS ports, and every ServiceEntry the policy
    /// targets has none (a DENY on it would silently never fire).
    fn sni_reachable(&mut self, bindings: &[Binding], opts: &BuildOptions) {
        let Some(tls) = &opts.service_tls else { return };
        if self.sni_conditions.is_empty() {
            return;
        }
        let mut targets = Vec::new();
        for b in bindings {
            match b {
                Binding::Waypoint(_) => return, // some service may be TLS
                Binding::ServiceEntry(ns, name) => {
                    match tls.get(&(ns.clone(), name.clone())) {
                        Some(false) => targets.push(format!("{ns}/{name}")),
                        _ => return, // TLS, or not (yet) in the config
                    }
                }
            }
        }
        for f in std::mem::take(&mut self.sni_conditions) {
            self.err(
                f,
                format!(
                    "connection.sni never matches here: the SNI is read only on TLS/HTTPS ports and ServiceEntry {} has none (declare the port protocol TLS or HTTPS)",
                    targets.join(", ")
                ),
            );
        }
    }

    fn warn(&mut self, message: impl Into<String>) {
        self.warnings.push(PolicyWarning {
            policy: self.policy.to_string(),
            message: message.into(),
        });
    }

    /// Where the policy applies at this waypoint; empty when it does not.
    fn bindings(
        &mut self,
        meta: &ObjectMeta,
        spec: &AuthorizationPolicySpec,
        opts: &BuildOptions,
    ) -> Vec<Binding> {
        let ns = meta.ns();
        if meta.name.is_empty() {
            self.err("metadata.name", "must not be empty");
        }
        let mut refs: Vec<(String, &PolicyTargetReference)> = Vec::new();
        if let Some(r) = &spec.target_ref {
            refs.push(("spec.targetRef".into(), r));
        }
        for (i, r) in spec.target_refs.iter().enumerate() {
            refs.push((format!("spec.targetRefs[{i}]"), r));
        }
        if spec.target_ref.is_some() && !spec.target_refs.is_empty() {
            self.err(
                "spec.targetRef",
                "only one of targetRef and targetRefs may be set",
            );
        }
        if spec.selector.is_some() && !refs.is_empty() {
            self.err(
                "spec.selector",
                "only one of selector and targetRefs may be set",
            );
        }
        if !self.errors.is_empty() {
            return Vec::new();
        }
        if refs.is_empty() {
            let msg = if spec.selector.is_some() {
                "selects workloads by label (spec.selector); it applies to workloads, not to the waypoint, and is ignored here (use targetRefs)".to_string()
            } else if ns == opts.root_namespace {
                format!(
                    "has no targetRefs in the root namespace {ns}: a mesh-wide policy for workloads (enforced by ztunnel, not waypoints); ignored at the waypoint"
                )
            } else {
                format!("has no targetRefs: a namespace-wide policy for the workloads of {ns}, not for the waypoint; ignored here")
            };
            self.warn(msg);
            return Vec::new();
        }
        let mut out = Vec::new();
        for (field, r) in refs {
            let target_ns = r
                .namespace
                .as_deref()
                .filter(|n| !n.is_empty())
                .unwrap_or(ns);
            if r.name.is_empty() {
                self.err(format!("{field}.name"), "must not be empty");
                continue;
            }
            match r.kind.as_str() {
                "ServiceEntry" => {
                    if r.group != GROUP_NETWORKING {
                        self.err(
                            format!("{field}.group"),
                            format!("kind ServiceEntry needs group {GROUP_NETWORKING}, got {:?}", r.group),
                        );
                        continue;
                    }
                    out.push(Binding::ServiceEntry(target_ns.to_string(), r.name.clone()));
                }
                "Gateway" => {
                    if r.group != GROUP_GATEWAY {
                        self.err(
                            format!("{field}.group"),
                            format!("kind Gateway needs group {GROUP_GATEWAY}, got {:?}", r.group),
                        );
                        continue;
                    }
                    match &opts.waypoint {
                        Some(w) if w.namespace == target_ns && w.name == r.name => {
                            out.push(Binding::Waypoint(format!("Gateway {target_ns}/{}", r.name)))
                        }
                        _ => self.warn(format!(
                            "{field} targets Gateway {target_ns}/{}, which is not this waypoint; not applied here",
                            r.name
                        )),
                    }
                }
                "GatewayClass" => {
                    if r.group != GROUP_GATEWAY {
                        self.err(
                            format!("{field}.group"),
                            format!("kind GatewayClass needs group {GROUP_GATEWAY}, got {:?}", r.group),
                        );
                        continue;
                    }
                    if r.name == WAYPOINT_CLASS && ns == opts.root_namespace {
                        out.push(Binding::Waypoint(format!("GatewayClass {WAYPOINT_CLASS} (all waypoints)")));
                    } else {
                        self.warn(format!(
                            "{field} targets GatewayClass {}; only GatewayClass {WAYPOINT_CLASS} from the root namespace {} applies to waypoints; not applied here",
                            r.name, opts.root_namespace
                        ));
                    }
                }
                other => self.warn(format!(
                    "{field} targets kind {other:?} {target_ns}/{}, which is not ServiceEntry traffic at this waypoint; not applied here",
                    r.name
                )),
            }
        }
        out
    }

    fn policy(
        &mut self,
        meta: &ObjectMeta,
        spec: &AuthorizationPolicySpec,
        bindings: &[Binding],
    ) -> Option<CompiledPolicy> {
        let action = match spec.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => {
                self.errors.push(PolicyError::CustomNotSupported {
                    policy: self.policy.to_string(),
                });
                return None;
            }
            other => {
                self.err(
                    "spec.action",
                    format!("unknown action {other:?} (expected ALLOW, DENY or AUDIT)"),
                );
                return None;
            }
        };
        if spec.provider.is_some() {
            self.err("spec.provider", "may only be set with action CUSTOM");
        }
        if action == Action::Deny && spec.rules.as_ref().is_none_or(|r| r.is_empty()) {
            // As Istio's validation: such a DENY would never fire.
            self.err(
                "spec.rules",
                "DENY action without rules is meaningless as it never matches; add an empty rule `{}` to deny every request",
            );
        }
        let dry_run = match meta.annotations.get(DRY_RUN_ANNOTATION) {
            None => false,
            // Go's strconv.ParseBool, which Istio uses.
            Some(v) => match v.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => true,
                "0" | "f" | "F" | "false" | "FALSE" | "False" => false,
                other => {
                    self.err(
                        format!("metadata.annotations[{DRY_RUN_ANNOTATION}]"),
                        format!("{other:?} is not a boolean (\"true\" or \"false\")"),
                    );
                    false
                }
            },
        };
        let mut rules = Vec::new();
        for (ri, rule) in spec.rules.iter().flatten().enumerate() {
            let base = format!("spec.rules[{ri}]");
            let mut cr = CompiledRule::default();
            for (fi, from) in rule.from.iter().enumerate() {
                let f = format!("{base}.from[{fi}].source");
                cr.from.push(self.source(&f, &from.source));
            }
            for (ti, to) in rule.to.iter().enumerate() {
                let f = format!("{base}.to[{ti}].operation");
                cr.to.push(self.operation(&f, &to.operation));
            }
            for (ci, cond) in rule.when.iter().enumerate() {
                let f = format!("{base}.when[{ci}]");
                self.condition(&f, cond, &mut cr.when);
            }
            cr.http_only = cr
                .from
                .iter()
                .chain(cr.to.iter())
                .flatten()
                .chain(cr.when.iter())
                .any(|c| c.kind.http_only());
            rules.push(cr);
        }
        if !self.errors.is_empty() {
            return None;
        }
        if let Some(why) = super::normalize::path_weakness(self.normalization) {
            let weak = |checks: &[Check], negate: bool| {
                checks
                    .iter()
                    .any(|c| matches!(c.kind, Kind::Path(_)) && c.negate == negate)
            };
            for (ri, r) in rules.iter().enumerate() {
                // A DENY on `paths`, or an ALLOW on `notPaths`, is what a
                // path spelled differently slips past.
                let negate = match action {
                    Action::Deny => false,
                    Action::Allow => true,
                    Action::Audit => continue,
                };
                if r.to.iter().any(|o| weak(o, negate)) {
                    let field = if negate { "notPaths" } else { "paths" };
                    self.warn(format!(
                        "spec.rules[{ri}]: {action} on {field} under pathNormalization {}: {why}; set mesh.yaml pathNormalization.normalization: DECODE_AND_MERGE_SLASHES",
                        self.normalization
                    ));
                }
            }
        }
        Some(CompiledPolicy {
            name: Arc::from(self.policy),
            action,
            dry_run,
            rules,
            bindings: bindings
                .iter()
                .map(|b| match b {
                    Binding::ServiceEntry(ns, n) => format!("ServiceEntry {ns}/{n}"),
                    Binding::Waypoint(d) => d.clone(),
                })
                .collect(),
        })
    }

    /// Common checks of a value list: no empty value.
    fn values_ok(&mut self, field: &str, vals: &[String]) -> bool {
        match vals.iter().position(|v| v.trim().is_empty()) {
            Some(i) => {
                self.err(format!("{field}[{i}]"), "empty value");
                false
            }
            None => true,
        }
    }

    fn strs(&mut self, field: &str, vals: &[String], lower: bool) -> Vec<StrMatch> {
        self.values_ok(field, vals);
        vals.iter().map(|v| StrMatch::new(v, lower)).collect()
    }

    fn ips(&mut self, field: &str, vals: &[String]) -> Vec<IpNet> {
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            match parse_ip_block(v) {
                Some(n) => out.push(n),
                None => self.err(
                    format!("{field}[{i}]"),
                    format!("{v:?} is not an IP address or CIDR block"),
                ),
            }
        }
        out
    }

    fn ports(&mut self, field: &str, vals: &[String]) -> Vec<u16> {
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            match v.trim().parse::<u16>() {
                Ok(p) => out.push(p),
                Err(_) => self.err(
                    format!("{field}[{i}]"),
                    format!("{v:?} is not a port number (0-65535)"),
                ),
            }
        }
        out
    }

    fn principals(&mut self, field: &str, vals: &[String]) -> Vec<StrMatch> {
        for v in vals {
            if v.starts_with("spiffe://") {
                self.warn(format!(
                    "{field}: {v:?} starts with spiffe://; principals are written without it and this value never matches (as in Istio)"
                ));
            }
        }
        self.strs(field, vals, false)
    }

    /// Istio's rules: `<namespace>/<serviceaccount>`, or `<serviceaccount>`
    /// in the policy's namespace; exact (no wildcard); at most 16 values of
    /// at most 320 characters.
    fn service_accounts(&mut self, field: &str, vals: &[String]) -> Vec<(Box<str>, Box<str>)> {
        if vals.len() > 16 {
            self.err(
                field,
                format!("may not have more than 16 values (has {})", vals.len()),
            );
        }
        let mut out = Vec::new();
        for (i, v) in vals.iter().enumerate() {
            let bad = |m: &str| format!("{v:?}: {m}");
            let f = format!("{field}[{i}]");
            if v.is_empty() {
                self.err(f, "empty value");
            } else if v.contains('*') {
                self.err(f, bad("wildcards are not allowed"));
            } else if v.len() > 320 {
                self.err(f, bad("longer than 320 characters"));
            } else {
                match v.split_once('/') {
                    None => out.push((self.namespace.into(), v.as_str().into())),
                    Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                        out.push((ns.into(), sa.into()))
                    }
                    Some(_) => self.err(
                        f,
                        bad("expected <serviceaccount> or <namespace>/<serviceaccount>"),
                    ),
                }
            }
        }
        out
    }

    /// Istio's rules: exact, `td*`, `*td` or `*`; no `/`.
    fn trust_domains(&mut self, field: &str, vals: &[String]) -> Vec<StrMatch> {
        for (i, v) in vals.iter().enumerate() {
            let stars = v.matches('*').count();
            let msg = if v.is_empty() {
                Some("empty value")
            } else if stars > 1 {
                Some("at most one wildcard is allowed")
            } else if stars == 1 && v != "*" && !v.starts_with('*') && !v.ends_with('*') {
                Some("a wildcard is only allowed at the start or end")
            } else if v.contains('/') {
                Some("a trust domain must not contain '/'")
            } else {
                None
            };
            if let Some(m) = msg {
                self.err(format!("{field}[{i}]"), format!("{v:?}: {m}"));
            }
        }
        vals.iter().map(|v| StrMatch::new(v, false)).collect()
    }

    /// Istio matches `hosts` against the `:authority` as received,
    /// case-insensitively: a port or trailing dot in the request is part of
    /// what is compared, so `httpbin.org` does not match `httpbin.org:80`.
    fn hosts(&mut self, field: &str, vals: &[String]) -> Vec<StrMatch> {
        self.strs(field, vals, true)
    }

    fn paths(&mut self, field: &str, vals: &[String]) -> Vec<StrMatch> {
        for (i, v) in vals.iter().enumerate() {
            if v.contains('{') || v.contains('}') {
                self.err(
                    format!("{field}[{i}]"),
                    format!("{v:?}: path templates ({{*}}, {{**}}) are not supported by shunt"),
                );
            }
        }
        self.strs(field, vals, false)
    }

    fn push(
        out: &mut Vec<Check>,
        field: &str,
        name: &str,
        negate: bool,
        raw: &[String],
        kind: Kind,
    ) {
        if raw.is_empty() {
            return;
        }
        out.push(Check {
            field: format!("{field}.{name}"),
            negate,
            kind,
            raw: raw.to_vec(),
        });
    }

    fn source(&mut self, f: &str, s: &Source) -> Vec<Check> {
        let mut c = Vec::new();
        let k = Kind::Principal(self.principals(&format!("{f}.principals"), &s.principals));
        Self::push(&mut c, f, "principals", false, &s.principals, k);
        let k = Kind::Principal(self.principals(&format!("{f}.notPrincipals"), &s.not_principals));
        Self::push(&mut c, f, "notPrincipals", true, &s.not_principals, k);
        let k = Kind::Namespace(self.strs(&format!("{f}.namespaces"), &s.namespaces, false));
        Self::push(&mut c, f, "namespaces", false, &s.namespaces, k);
        let k = Kind::Namespace(self.strs(&format!("{f}.notNamespaces"), &s.not_namespaces, false));
        Self::push(&mut c, f, "notNamespaces", true, &s.not_namespaces, k);
        let k = Kind::ServiceAccount(
            self.service_accounts(&format!("{f}.serviceAccounts"), &s.service_accounts),
        );
        Self::push(&mut c, f, "serviceAccounts", false, &s.service_accounts, k);
        let k = Kind::ServiceAccount(
            self.service_accounts(&format!("{f}.notServiceAccounts"), &s.not_service_accounts),
        );
        Self::push(
            &mut c,
            f,
            "notServiceAccounts",
            true,
            &s.not_service_accounts,
            k,
        );
        let k =
            Kind::TrustDomain(self.trust_domains(&format!("{f}.trustDomains"), &s.trust_domains));
        Self::push(&mut c, f, "trustDomains", false, &s.trust_domains, k);
        let k = Kind::TrustDomain(
            self.trust_domains(&format!("{f}.notTrustDomains"), &s.not_trust_domains),
        );
        Self::push(&mut c, f, "notTrustDomains", true, &s.not_trust_domains, k);
        if !(s.service_accounts.is_empty() && s.not_service_accounts.is_empty())
            && !(s.principals.is_empty()
                && s.not_principals.is_empty()
                && s.namespaces.is_empty()
                && s.not_namespaces.is_empty())
        {
            self.err(
                f,
                "cannot set serviceAccounts (or notServiceAccounts) with namespaces or principals (as Istio)",
            );
        }
        let k = Kind::SourceIp(self.ips(&format!("{f}.ipBlocks"), &s.ip_blocks));
        Self::push(&mut c, f, "ipBlocks", false, &s.ip_blocks, k);
        let k = Kind::SourceIp(self.ips(&format!("{f}.notIpBlocks"), &s.not_ip_blocks));
        Self::push(&mut c, f, "notIpBlocks", true, &s.not_ip_blocks, k);
        let k = Kind::RemoteIp(self.ips(&format!("{f}.remoteIpBlocks"), &s.remote_ip_blocks));
        Self::push(&mut c, f, "remoteIpBlocks", false, &s.remote_ip_blocks, k);
        let k =
            Kind::RemoteIp(self.ips(&format!("{f}.notRemoteIpBlocks"), &s.not_remote_ip_blocks));
        Self::push(
            &mut c,
            f,
            "notRemoteIpBlocks",
            true,
            &s.not_remote_ip_blocks,
            k,
        );
        self.values_ok(&format!("{f}.requestPrincipals"), &s.request_principals);
        Self::push(
            &mut c,
            f,
            "requestPrincipals",
            false,
            &s.request_principals,
            Kind::NoJwt,
        );
        self.values_ok(
            &format!("{f}.notRequestPrincipals"),
            &s.not_request_principals,
        );
        Self::push(
            &mut c,
            f,
            "notRequestPrincipals",
            true,
            &s.not_request_principals,
            Kind::NoJwt,
        );
        if c.is_empty() {
            self.err(f, "must not be empty (set at least one field)");
        }
        c
    }

    fn operation(&mut self, f: &str, o: &Operation) -> Vec<Check> {
        let mut c = Vec::new();
        let k = Kind::Host(self.hosts(&format!("{f}.hosts"), &o.hosts));
        Self::push(&mut c, f, "hosts", false, &o.hosts, k);
        let k = Kind::Host(self.hosts(&format!("{f}.notHosts"), &o.not_hosts));
        Self::push(&mut c, f, "notHosts", true, &o.not_hosts, k);
        let k = Kind::Port(self.ports(&format!("{f}.ports"), &o.ports));
        Self::push(&mut c, f, "ports", false, &o.ports, k);
        let k = Kind::Port(self.ports(&format!("{f}.notPorts"), &o.not_ports));
        Self::push(&mut c, f, "notPorts", true, &o.not_ports, k);
        let k = Kind::Method(self.strs(&format!("{f}.methods"), &o.methods, false));
        Self::push(&mut c, f, "methods", false, &o.methods, k);
        let k = Kind::Method(self.strs(&format!("{f}.notMethods"), &o.not_methods, false));
        Self::push(&mut c, f, "notMethods", true, &o.not_methods, k);
        let k = Kind::Path(self.paths(&format!("{f}.paths"), &o.paths));
        Self::push(&mut c, f, "paths", false, &o.paths, k);
        let k = Kind::Path(self.paths(&format!("{f}.notPaths"), &o.not_paths));
        Self::push(&mut c, f, "notPaths", true, &o.not_paths, k);
        if c.is_empty() {
            self.err(f, "must not be empty (set at least one field)");
        }
        c
    }

    fn condition(&mut self, f: &str, cond: &Condition, out: &mut Vec<Check>) {
        let key = cond.key.trim();
        if cond.values.is_empty() && cond.not_values.is_empty() {
            self.err(f, format!("condition {key:?} needs values or notValues"));
            return;
        }
        let compile = |this: &mut Self, vals: &[String], which: &str| -> Option<Kind> {
            let vf = format!("{f}.{which}");
            Some(match key {
                "source.ip" => Kind::SourceIp(this.ips(&vf, vals)),
                "remote.ip" => Kind::RemoteIp(this.ips(&vf, vals)),
                "destination.ip" => Kind::DestIp(this.ips(&vf, vals)),
                "source.principal" => Kind::Principal(this.principals(&vf, vals)),
                "source.namespace" => Kind::Namespace(this.strs(&vf, vals, false)),
                "source.serviceAccount" => Kind::ServiceAccount(this.service_accounts(&vf, vals)),
                "source.trustDomain" => Kind::TrustDomain(this.trust_domains(&vf, vals)),
                "destination.port" => Kind::Port(this.ports(&vf, vals)),
                SNI_KEY => Kind::Sni(this.strs(&vf, vals, true)),
                "request.auth.principal" | "request.auth.audiences" | "request.auth.presenter" => {
                    this.values_ok(&vf, vals);
                    Kind::NoJwt
                }
                k if k.starts_with("request.auth.claims[")
                    && k.ends_with(']')
                    && k.len() > "request.auth.claims[]".len() =>
                {
                    this.values_ok(&vf, vals);
                    Kind::NoJwt
                }
                k if k.starts_with("request.headers[") && k.ends_with(']') => {
                    let name = &k["request.headers[".len()..k.len() - 1];
                    if name.is_empty() || !name.bytes().all(|c| c.is_ascii_graphic() && c != b':') {
                        this.err(
                            format!("{f}.key"),
                            format!("invalid header name in {key:?}"),
                        );
                        return None;
                    }
                    Kind::Header(
                        name.to_ascii_lowercase().into(),
                        this.strs(&vf, vals, false),
                    )
                }
                _ => {
                    this.err(
                        format!("{f}.key"),
                        format!(
                            "unknown or unsupported condition key {key:?} (supported: source.ip, remote.ip, source.namespace, source.principal, source.serviceAccount, source.trustDomain, destination.ip, destination.port, connection.sni, request.headers[NAME], request.auth.*)"
                        ),
                    );
                    return None;
                }
            })
        };
        if key == "connection.sni" && !cond.values.is_empty() {
            self.sni_conditions.push(f.to_string());
        }
        if !cond.values.is_empty() {
            match compile(self, &cond.values, "values") {
                Some(kind) => out.push(Check {
                    field: format!("when[{key}].values"),
                    negate: false,
                    kind,
                    raw: cond.values.clone(),
                }),
                None => return,
            }
        }
        if !cond.not_values.is_empty() {
            if let Some(kind) = compile(self, &cond.not_values, "notValues") {
                out.push(Check {
                    field: format!("when[{key}].notValues"),
                    negate: true,
                    kind,
                    raw: cond.not_values.clone(),
                });
            }
        }
    }
}

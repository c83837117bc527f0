//! Evaluation table, bypass corpus, framing and build-error tests. Policies
//! are YAML parsed into `AuthorizationPolicySpec`, so the schema is
//! exercised too.

use super::*;
use crate::config::authz::AuthorizationPolicySpec;
use crate::config::meta::ObjectMeta;

const NS: &str = "common-infrastructure";
const SE: &str = "httpbin.org";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";
const PROD: &str = "spiffe://cluster.local/ns/prod/sa/web";

/// The seed's policy, verbatim (indentation restored).
const SEED: &str = r#"
targetRefs:
- kind: ServiceEntry
  group: networking.istio.io
  name: httpbin.org
action: ALLOW
rules:
# Our admin application can access anything
- from:
  - source:
      principals: ["cluster.local/ns/default/sa/admin"]
# Everything else is only allowed to access /get
- to:
  - operation:
      methods: ["GET"]
      paths: ["/get"]
"#;

const TO_SE: &str =
    "targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}]\n";

fn opts() -> BuildOptions {
    BuildOptions {
        root_namespace: "istio-system".into(),
        waypoint: Some(GatewayRef {
            namespace: NS.into(),
            name: "egress-gateway".into(),
        }),
        path_normalization: PathNormalization::default(),
        service_tls: None,
    }
}

fn parse(yaml: &str) -> AuthorizationPolicySpec {
    // Policies of the table without a binding are bound to the ServiceEntry.
    let y = if yaml.contains("targetRef") || yaml.contains("selector") || yaml.contains("#unbound")
    {
        yaml.to_string()
    } else {
        format!("{TO_SE}{yaml}")
    };
    serde_yaml_ng::from_str(&y).unwrap_or_else(|e| panic!("bad test YAML {y}: {e}"))
}

/// A policy whose YAML holds `#dry-run` is annotated `istio.io/dry-run: "true"`.
fn pol(ns: &str, name: &str, yaml: &str) -> (ObjectMeta, AuthorizationPolicySpec) {
    let mut meta = ObjectMeta {
        name: name.into(),
        namespace: Some(ns.into()),
        ..Default::default()
    };
    if yaml.contains("#dry-run") {
        meta.annotations
            .insert(DRY_RUN_ANNOTATION.into(), "true".into());
    }
    (meta, parse(yaml))
}

fn build(ps: &[(&str, &str, &str)], o: &BuildOptions) -> Result<PolicySet, PolicyError> {
    let list: Vec<_> = ps.iter().map(|(ns, n, y)| pol(ns, n, y)).collect();
    PolicySet::build(&list, o)
}

#[derive(Clone, Copy, Debug)]
struct R {
    p: Option<&'static str>,
    ip: &'static str,
    remote: Option<&'static str>,
    dst: Option<&'static str>,
    sni: Option<&'static str>,
    m: &'static str,
    path: &'static str,
    host: &'static str,
    port: u16,
    hdr: &'static [(&'static str, &'static str)],
    tcp: bool,
    svc: &'static str,
}

impl R {
    const fn http(p: Option<&'static str>, m: &'static str, path: &'static str) -> R {
        R {
            p,
            ip: "10.244.1.19",
            remote: None,
            dst: Some("240.240.0.1"),
            sni: None,
            m,
            path,
            host: "httpbin.org",
            port: 80,
            hdr: &[],
            tcp: false,
            svc: SE,
        }
    }
    const fn tcp(p: Option<&'static str>) -> R {
        let mut r = R::http(p, "", "/");
        r.tcp = true;
        r
    }
    const fn ip(mut self, ip: &'static str) -> R {
        self.ip = ip;
        self
    }
    const fn remote(mut self, ip: &'static str) -> R {
        self.remote = Some(ip);
        self
    }
    const fn host(mut self, h: &'static str) -> R {
        self.host = h;
        self
    }
    const fn port(mut self, p: u16) -> R {
        self.port = p;
        self
    }
    const fn hdr(mut self, h: &'static [(&'static str, &'static str)]) -> R {
        self.hdr = h;
        self
    }
    const fn svc(mut self, s: &'static str) -> R {
        self.svc = s;
        self
    }
    const fn sni(mut self, s: &'static str) -> R {
        self.sni = Some(s);
        self
    }
}

fn with_ctx<T>(r: &R, f: impl FnOnce(&RequestContext<'_>) -> T) -> T {
    with_ctx_mode(r, PathNormalization::default(), f)
}

fn with_ctx_mode<T>(r: &R, mode: PathNormalization, f: impl FnOnce(&RequestContext<'_>) -> T) -> T {
    let headers = HeaderList(r.hdr);
    let http = if r.tcp {
        None
    } else {
        Some(HttpRequest::new(r.m, r.path, r.host, &headers, mode).expect("normalizable test path"))
    };
    let ctx = RequestContext {
        principal: r.p,
        source_ip: Some(r.ip.parse().expect("test ip")),
        remote_ip: r.remote.map(|i| i.parse().expect("test ip")),
        destination_ip: r.dst.map(|i| i.parse().expect("test ip")),
        destination_port: r.port,
        sni: r.sni,
        http,
    };
    f(&ctx)
}

fn decide(set: &PolicySet, r: &R) -> Decision {
    with_ctx_mode(r, set.path_normalization(), |ctx| {
        set.evaluate(NS, r.svc, ctx)
    })
}

fn opts_norm(mode: PathNormalization) -> BuildOptions {
    BuildOptions {
        path_normalization: mode,
        ..opts()
    }
}

const GET: R = R::http(Some(CURL), "GET", "/get");
const POST: R = R::http(Some(CURL), "POST", "/post");

struct Case {
    name: &'static str,
    policies: &'static [(&'static str, &'static str, &'static str)],
    req: R,
    allowed: bool,
    /// Deciding policy (`ns/name`), or None when no single policy decided.
    by: Option<&'static str>,
}

macro_rules! case {
    ($name:expr, $pol:expr, $req:expr, $allowed:expr, $by:expr) => {
        Case {
            name: $name,
            policies: $pol,
            req: $req,
            allowed: $allowed,
            by: $by,
        }
    };
}

const A: bool = true;
const D: bool = false;
const SEEDP: &[(&str, &str, &str)] = &[(NS, "httpbin", SEED)];
const BY_SEED: Option<&str> = Some("common-infrastructure/httpbin");

fn table() -> Vec<Case> {
    vec![
        // --- the seed's policy ---
        case!("seed: curl GET /get", SEEDP, GET, A, BY_SEED),
        case!("seed: curl POST /post", SEEDP, POST, D, None),
        case!("seed: curl HEAD /get", SEEDP, R::http(Some(CURL), "HEAD", "/get"), D, None),
        case!("seed: curl GET /post", SEEDP, R::http(Some(CURL), "GET", "/post"), D, None),
        case!("seed: admin POST /post", SEEDP, R::http(Some(ADMIN), "POST", "/post"), A, BY_SEED),
        case!("seed: admin, principal without spiffe://", SEEDP,
            R::http(Some("cluster.local/ns/default/sa/admin"), "DELETE", "/anything"), A, BY_SEED),
        case!("seed: admin over TCP", SEEDP, R::tcp(Some(ADMIN)), A, BY_SEED),
        case!("seed: curl over TCP (HTTP-only ALLOW rule dropped)", SEEDP, R::tcp(Some(CURL)), D, None),
        case!("seed: unauthenticated GET /get", SEEDP, R::http(None, "GET", "/get"), A, BY_SEED),
        case!("seed: unauthenticated POST", SEEDP, R::http(None, "POST", "/post"), D, None),
        case!("seed: other ServiceEntry is not bound", SEEDP, POST.svc("example.com"), A, None),
        // --- binding ---
        case!("Gateway-bound DENY applies to every ServiceEntry", &[(NS, "gw", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress-gateway}]\naction: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]")],
            POST.svc("example.com"), D, Some("common-infrastructure/gw")),
        case!("Gateway-bound and SE-bound combine", &[(NS, "httpbin", SEED), (NS, "gw", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress-gateway}]\naction: DENY\nrules: [{from: [{source: {principals: [cluster.local/ns/default/sa/admin]}}], to: [{operation: {methods: [DELETE]}}]}]")],
            R::http(Some(ADMIN), "DELETE", "/x"), D, Some("common-infrastructure/gw")),
        case!("other Gateway is not this waypoint", &[(NS, "gw", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: other-waypoint}]\naction: DENY\nrules: [{}]")],
            GET, A, None),
        case!("selector policy ignored at the waypoint", &[(NS, "sel", "selector: {matchLabels: {app: httpbin}}\naction: DENY\nrules: [{}]")],
            GET, A, None),
        case!("root-namespace mesh-wide policy ignored at the waypoint", &[("istio-system", "mesh", "#unbound\naction: DENY\nrules: [{}]")],
            GET, A, None),
        case!("namespace-wide policy ignored at the waypoint", &[(NS, "nsw", "#unbound\n{}")], GET, A, None),
        case!("singular targetRef binds", &[(NS, "one", "targetRef: {kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}\naction: DENY\nrules: [{}]")],
            GET, D, Some("common-infrastructure/one")),
        case!("targetRefs namespace given", &[("team-a", "x", "targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org, namespace: common-infrastructure}]\naction: DENY\nrules: [{}]")],
            GET, D, Some("team-a/x")),
        case!("targetRefs default to the policy namespace", &[("team-a", "x", "targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}]\naction: DENY\nrules: [{}]")],
            GET, A, None),
        case!("GatewayClass istio-waypoint from the root namespace", &[("istio-system", "all", "targetRefs: [{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}]\naction: DENY\nrules: [{to: [{operation: {paths: [/admin*]}}]}]")],
            R::http(Some(ADMIN), "GET", "/admin/x"), D, Some("istio-system/all")),
        // --- actions and rule shapes ---
        case!("spec with no rules denies all", &[(NS, "none", "action: ALLOW")], GET, D, None),
        case!("rules: [{}] allows all", &[(NS, "all", "rules: [{}]")], POST, A, Some("common-infrastructure/all")),
        case!("DENY before ALLOW", &[(NS, "all", "rules: [{}]"), (NS, "zdeny", "action: DENY\nrules: [{}]")], GET, D, Some("common-infrastructure/zdeny")),
        case!("DENY not matching leaves ALLOW to decide", &[(NS, "httpbin", SEED), (NS, "d", "action: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]")], GET, A, BY_SEED),
        case!("AUDIT never changes the decision", &[(NS, "httpbin", SEED), (NS, "aud", "action: AUDIT\nrules: [{}]")], POST, D, None),
        // --- dry-run (istio.io/dry-run: "true"): never enforced ---
        case!("dry-run DENY matching does not deny", &[(NS, "d", "#dry-run\naction: DENY\nrules: [{}]")], GET, A, None),
        case!("dry-run ALLOW not matching does not deny", &[(NS, "a", "#dry-run\nrules: [{to: [{operation: {methods: [PUT]}}]}]")], GET, A, None),
        case!("dry-run ALLOW does not make ALLOW policies apply", &[(NS, "a", "#dry-run\nrules: [{}]"), (NS, "d", "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]")], GET, A, None),
        case!("dry-run ALLOW does not rescue a request the enforced ALLOW denies", &[(NS, "httpbin", SEED), (NS, "z", "#dry-run\nrules: [{}]")], POST, D, None),
        case!("enforced DENY still denies beside a dry-run ALLOW", &[(NS, "a", "#dry-run\nrules: [{}]"), (NS, "d", "action: DENY\nrules: [{}]")], GET, D, Some("common-infrastructure/d")),
        case!("dry-run DENY on TCP does not deny", &[(NS, "d", "#dry-run\naction: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]")], R::tcp(Some(CURL)), A, None),
        // --- source fields ---
        case!("notPrincipals: curl denied", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/admin]}}]}]")], GET, D, Some("common-infrastructure/d")),
        case!("notPrincipals: admin passes", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/default/sa/admin]}}]}]")], R::http(Some(ADMIN), "GET", "/"), A, None),
        case!("principals prefix", &[(NS, "a", "rules: [{from: [{source: {principals: [cluster.local/ns/default/*]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("principals suffix", &[(NS, "a", "rules: [{from: [{source: {principals: ['*/sa/admin']}}]}]")], GET, D, None),
        case!("principals presence rejects unauthenticated", &[(NS, "a", "rules: [{from: [{source: {principals: ['*']}}]}]")], R::http(None, "GET", "/get"), D, None),
        case!("principals presence accepts authenticated", &[(NS, "a", "rules: [{from: [{source: {principals: ['*']}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("namespaces", &[(NS, "a", "rules: [{from: [{source: {namespaces: [default]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("namespaces: other namespace", &[(NS, "a", "rules: [{from: [{source: {namespaces: [default]}}]}]")], R::http(Some(PROD), "GET", "/"), D, None),
        case!("namespaces prefix", &[(NS, "a", "rules: [{from: [{source: {namespaces: ['pr*']}}]}]")], R::http(Some(PROD), "GET", "/"), A, Some("common-infrastructure/a")),
        case!("notNamespaces", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notNamespaces: [default]}}]}]")], R::http(Some(PROD), "GET", "/"), D, Some("common-infrastructure/d")),
        case!("serviceAccounts: admin", &[(NS, "a", "rules: [{from: [{source: {serviceAccounts: [default/admin]}}]}]")], R::http(Some(ADMIN), "POST", "/"), A, Some("common-infrastructure/a")),
        case!("serviceAccounts: curl", &[(NS, "a", "rules: [{from: [{source: {serviceAccounts: [default/admin]}}]}]")], POST, D, None),
        case!("notServiceAccounts", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notServiceAccounts: [default/admin]}}]}]")], POST, D, Some("common-infrastructure/d")),
        case!("serviceAccounts short form: the policy's namespace", &[("default", "a", "targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org, namespace: common-infrastructure}]\nrules: [{from: [{source: {serviceAccounts: [admin]}}]}]")], R::http(Some(ADMIN), "POST", "/"), A, Some("default/a")),
        case!("serviceAccounts short form: same name in another namespace", &[(NS, "a", "rules: [{from: [{source: {serviceAccounts: [admin]}}]}]")], R::http(Some(ADMIN), "POST", "/"), D, None),
        case!("serviceAccounts: unauthenticated never matches", &[(NS, "a", "rules: [{from: [{source: {serviceAccounts: [default/curl]}}]}]")], R::http(None, "GET", "/"), D, None),
        case!("notServiceAccounts short form", &[("default", "d", "targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org, namespace: common-infrastructure}]\naction: DENY\nrules: [{from: [{source: {notServiceAccounts: [curl]}}]}]")], GET, A, None),
        case!("trustDomains exact", &[(NS, "a", "rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("trustDomains other domain", &[(NS, "a", "rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]")], R::http(Some("spiffe://other.example/ns/default/sa/curl"), "GET", "/"), D, None),
        case!("trustDomains is not a prefix of the domain", &[(NS, "a", "rules: [{from: [{source: {trustDomains: [cluster]}}]}]")], GET, D, None),
        case!("trustDomains prefix", &[(NS, "a", "rules: [{from: [{source: {trustDomains: ['cluster*']}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("trustDomains suffix", &[(NS, "a", "rules: [{from: [{source: {trustDomains: ['*.local']}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("trustDomains presence needs an identity", &[(NS, "a", "rules: [{from: [{source: {trustDomains: ['*']}}]}]")], R::http(None, "GET", "/"), D, None),
        case!("notTrustDomains DENY", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notTrustDomains: [cluster.local]}}]}]")], R::http(Some("spiffe://evil.example/ns/default/sa/curl"), "GET", "/"), D, Some("common-infrastructure/d")),
        case!("notTrustDomains DENY: own domain passes", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notTrustDomains: [cluster.local]}}]}]")], GET, A, None),
        case!("when source.trustDomain", &[(NS, "a", "rules: [{when: [{key: source.trustDomain, values: [cluster.local]}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("trustDomains on TCP", &[(NS, "a", "rules: [{from: [{source: {trustDomains: [cluster.local]}}]}]")], R::tcp(Some(CURL)), A, Some("common-infrastructure/a")),
        case!("ipBlocks CIDR", &[(NS, "a", "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("ipBlocks other address", &[(NS, "a", "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8]}}]}]")], GET.ip("192.168.1.1"), D, None),
        case!("ipBlocks single address, v4-mapped source", &[(NS, "a", "rules: [{from: [{source: {ipBlocks: [192.168.1.1]}}]}]")], GET.ip("::ffff:192.168.1.1"), A, Some("common-infrastructure/a")),
        case!("notIpBlocks", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notIpBlocks: [10.0.0.0/8]}}]}]")], GET.ip("192.168.1.1"), D, Some("common-infrastructure/d")),
        case!("remoteIpBlocks defaults to the source address", &[(NS, "a", "rules: [{from: [{source: {remoteIpBlocks: [10.244.0.0/16]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("remoteIpBlocks uses remote.ip when given", &[(NS, "a", "rules: [{from: [{source: {remoteIpBlocks: [10.244.0.0/16]}}]}]")], GET.remote("203.0.113.9"), D, None),
        case!("requestPrincipals never match without JWT", &[(NS, "a", "rules: [{from: [{source: {requestPrincipals: ['*']}}]}]")], GET, D, None),
        case!("notRequestPrincipals (require JWT) denies", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: ['*']}}]}]")], GET, D, Some("common-infrastructure/d")),
        case!("source fields AND: right principal, wrong IP", &[(NS, "a", "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/admin], ipBlocks: [10.0.0.0/8]}}]}]")], R::http(Some(ADMIN), "GET", "/").ip("192.168.1.1"), D, None),
        case!("from list OR", &[(NS, "a", "rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/admin]}}, {source: {ipBlocks: [10.0.0.0/8]}}]}]")], GET, A, Some("common-infrastructure/a")),
        // --- operation fields ---
        case!("hosts case-insensitive", &[(NS, "a", "rules: [{to: [{operation: {hosts: [httpbin.org]}}]}]")], GET.host("HTTPBIN.ORG"), A, Some("common-infrastructure/a")),
        case!("hosts: a port in the Host is significant", &[(NS, "a", "rules: [{to: [{operation: {hosts: [httpbin.org]}}]}]")], GET.host("httpbin.org:80"), D, None),
        case!("hosts: a trailing dot is significant", &[(NS, "a", "rules: [{to: [{operation: {hosts: [httpbin.org]}}]}]")], GET.host("httpbin.org."), D, None),
        case!("hosts: pattern with port matches that port", &[(NS, "a", "rules: [{to: [{operation: {hosts: ['httpbin.org:80']}}]}]")], GET.host("HttpBin.org:80"), A, Some("common-infrastructure/a")),
        case!("hosts: prefix pattern covers any port", &[(NS, "a", "rules: [{to: [{operation: {hosts: ['httpbin.org*']}}]}]")], GET.host("httpbin.org:8080"), A, Some("common-infrastructure/a")),
        case!("hosts: suffix pattern does not cover a port", &[(NS, "a", "rules: [{to: [{operation: {hosts: ['*.example.com']}}]}]")], GET.host("api.example.com:443"), D, None),
        case!("notHosts DENY: Host with port is not the allowed host (fails closed)", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notHosts: [httpbin.org]}}]}]")], GET.host("httpbin.org:80"), D, Some("common-infrastructure/d")),
        case!("notHosts DENY: Host with trailing dot is not the allowed host", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notHosts: [httpbin.org]}}]}]")], GET.host("httpbin.org."), D, Some("common-infrastructure/d")),
        case!("notHosts DENY: the exact host passes, any case", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notHosts: [httpbin.org]}}]}]")], GET.host("HTTPBIN.org"), A, None),
        case!("hosts: IPv6 literal with port", &[(NS, "a", "rules: [{to: [{operation: {hosts: ['[2001:db8::1]:80']}}]}]")], GET.host("[2001:DB8::1]:80"), A, Some("common-infrastructure/a")),
        case!("hosts pattern upper-case", &[(NS, "a", "rules: [{to: [{operation: {hosts: [HttpBin.Org]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("hosts suffix", &[(NS, "a", "rules: [{to: [{operation: {hosts: ['*.example.com']}}]}]")], GET.host("Api.Example.com"), A, Some("common-infrastructure/a")),
        case!("hosts no match", &[(NS, "a", "rules: [{to: [{operation: {hosts: [httpbin.org]}}]}]")], GET.host("evil.org"), D, None),
        case!("notHosts", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notHosts: [httpbin.org]}}]}]")], GET.host("evil.org"), D, Some("common-infrastructure/d")),
        case!("ports", &[(NS, "a", "rules: [{to: [{operation: {ports: ['80']}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("ports other", &[(NS, "a", "rules: [{to: [{operation: {ports: ['80']}}]}]")], GET.port(8080), D, None),
        case!("notPorts", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notPorts: ['80']}}]}]")], GET.port(8080), D, Some("common-infrastructure/d")),
        case!("methods case-sensitive (h2 'get')", SEEDP, R::http(Some(CURL), "get", "/get"), D, None),
        case!("notMethods", &[(NS, "a", "rules: [{to: [{operation: {notMethods: [DELETE]}}]}]")], R::http(Some(CURL), "DELETE", "/get"), D, None),
        case!("notMethods other method", &[(NS, "a", "rules: [{to: [{operation: {notMethods: [DELETE]}}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("paths prefix", &[(NS, "a", "rules: [{to: [{operation: {paths: [/api/*]}}]}]")], R::http(Some(CURL), "GET", "/api/v1"), A, Some("common-infrastructure/a")),
        case!("paths suffix", &[(NS, "a", "rules: [{to: [{operation: {paths: ['*.json']}}]}]")], R::http(Some(CURL), "GET", "/a/b.json"), A, Some("common-infrastructure/a")),
        case!("notPaths", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notPaths: [/get]}}]}]")], POST, D, Some("common-infrastructure/d")),
        // --- paths under Istio's default normalization (BASE) ---
        case!("BASE: dot segments resolved before matching", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], R::http(Some(CURL), "GET", "/x/../admin"), D, Some("common-infrastructure/d")),
        case!("BASE: escaped dots resolved", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], R::http(Some(CURL), "GET", "/x/%2e%2e/admin"), D, Some("common-infrastructure/d")),
        case!("BASE: unreserved escapes decoded", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], R::http(Some(CURL), "GET", "/%61dmin"), D, Some("common-infrastructure/d")),
        case!("BASE: backslash is a slash", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], R::http(Some(CURL), "GET", "\\admin"), D, Some("common-infrastructure/d")),
        case!("BASE: repeated slashes are kept (Istio's default; documented weakness)", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]")], R::http(Some(CURL), "GET", "//admin"), A, None),
        case!("BASE: escaped slash is kept", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {paths: ['/a/b']}}]}]")], R::http(Some(CURL), "GET", "/a%2Fb"), A, None),
        case!("BASE: the seed's /get with a repeated slash is another path", SEEDP, R::http(Some(CURL), "GET", "//get"), D, None),
        case!("operation fields AND", &[(NS, "a", "rules: [{to: [{operation: {methods: [GET], ports: ['443']}}]}]")], GET, D, None),
        case!("rule needs from AND to", &[(NS, "a", "rules: [{from: [{source: {namespaces: [prod]}}], to: [{operation: {methods: [GET]}}]}]")], GET, D, None),
        // --- when ---
        case!("when source.ip", &[(NS, "a", "rules: [{when: [{key: source.ip, values: [10.244.0.0/16]}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("when source.ip notValues", &[(NS, "a", "rules: [{when: [{key: source.ip, notValues: [10.244.0.0/16]}]}]")], GET, D, None),
        case!("when remote.ip", &[(NS, "a", "rules: [{when: [{key: remote.ip, values: [203.0.113.0/24]}]}]")], GET.remote("203.0.113.9"), A, Some("common-infrastructure/a")),
        case!("when source.namespace", &[(NS, "a", "rules: [{when: [{key: source.namespace, values: [default]}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("when source.principal", &[(NS, "a", "rules: [{when: [{key: source.principal, values: [cluster.local/ns/default/sa/admin]}]}]")], GET, D, None),
        case!("when request.headers present", &[(NS, "a", "rules: [{when: [{key: 'request.headers[X-User]', values: [alice]}]}]")], GET.hdr(&[("x-user", "alice")]), A, Some("common-infrastructure/a")),
        case!("when request.headers absent", &[(NS, "a", "rules: [{when: [{key: 'request.headers[X-User]', values: [alice]}]}]")], GET, D, None),
        case!("when request.headers repeated values are joined", &[(NS, "a", "rules: [{when: [{key: 'request.headers[x-user]', values: [alice]}]}]")], GET.hdr(&[("x-user", "alice"), ("X-User", "mallory")]), D, None),
        case!("when request.headers notValues", &[(NS, "d", "action: DENY\nrules: [{when: [{key: 'request.headers[user-agent]', notValues: ['curl/*']}]}]")], GET.hdr(&[("user-agent", "wget/1")]), D, Some("common-infrastructure/d")),
        case!("when destination.port", &[(NS, "a", "rules: [{when: [{key: destination.port, values: ['80']}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("when destination.ip", &[(NS, "a", "rules: [{when: [{key: destination.ip, values: [240.240.0.0/16]}]}]")], GET, A, Some("common-infrastructure/a")),
        case!("when connection.sni", &[(NS, "a", "rules: [{when: [{key: connection.sni, values: ['*.org']}]}]")], GET.sni("HTTPBIN.org"), A, Some("common-infrastructure/a")),
        case!("when connection.sni absent", &[(NS, "a", "rules: [{when: [{key: connection.sni, values: ['*.org']}]}]")], GET, D, None),
        case!("when request.auth.claims never match without JWT", &[(NS, "a", "rules: [{when: [{key: 'request.auth.claims[iss]', values: [https://accounts.google.com]}]}]")], GET, D, None),
        // --- L4: HTTP-only fields on TCP ---
        case!("TCP: DENY methods counts as match (fail closed)", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]")], R::tcp(Some(CURL)), D, Some("common-infrastructure/d")),
        case!("TCP: DENY notPaths counts as match", &[(NS, "d", "action: DENY\nrules: [{to: [{operation: {notPaths: [/get]}}]}]")], R::tcp(Some(CURL)), D, Some("common-infrastructure/d")),
        case!("TCP: DENY header condition counts as match", &[(NS, "d", "action: DENY\nrules: [{when: [{key: 'request.headers[x]', values: [y]}]}]")], R::tcp(Some(CURL)), D, Some("common-infrastructure/d")),
        case!("TCP: DENY non-HTTP fields still checked", &[(NS, "d", "action: DENY\nrules: [{from: [{source: {namespaces: [prod]}}], to: [{operation: {methods: [POST]}}]}]")], R::tcp(Some(CURL)), A, None),
        case!("TCP: ALLOW with methods does not match", &[(NS, "a", "rules: [{to: [{operation: {methods: [GET]}}]}]")], R::tcp(Some(CURL)), D, None),
        case!("TCP: ALLOW with ports matches", &[(NS, "a", "rules: [{to: [{operation: {ports: ['80']}}]}]")], R::tcp(Some(CURL)), A, Some("common-infrastructure/a")),
        case!("TCP: ALLOW requestPrincipals rule dropped", &[(NS, "a", "rules: [{from: [{source: {requestPrincipals: ['*']}}]}, {from: [{source: {namespaces: [default]}}]}]")], R::tcp(Some(CURL)), A, Some("common-infrastructure/a")),
    ]
}

#[test]
fn evaluation_table() {
    let cases = table();
    assert!(cases.len() >= 40, "the table has {} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let set = match build(c.policies, &opts()) {
            Ok(s) => s,
            Err(e) => {
                failures.push(format!("{}: build failed: {e}", c.name));
                continue;
            }
        };
        let d = decide(&set, &c.req);
        // As in the bypass corpus: `by` names the policy whose rule decided.
        let decided_by = match d.reason {
            Reason::NoAllowMatched => None,
            _ => d.policy.as_deref(),
        };
        if d.allowed != c.allowed || decided_by != c.by {
            failures.push(format!(
                "{}: expected allowed={} by {:?}, got {d:?}",
                c.name, c.allowed, c.by
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn decision_details() {
    let set = build(SEEDP, &opts()).unwrap();
    let d = decide(&set, &R::http(Some(ADMIN), "POST", "/post"));
    assert_eq!(d.action, Some(Action::Allow));
    assert_eq!(d.rule, Some(0));
    assert_eq!(d.reason, Reason::AllowMatched);
    let d = decide(&set, &GET);
    assert_eq!(d.rule, Some(1));
    let d = decide(&set, &POST);
    assert_eq!(d.reason, Reason::NoAllowMatched);
    assert_eq!(d.policy.as_deref(), Some("common-infrastructure/httpbin"));
    assert_eq!(
        d.to_string(),
        "denied: no rule of ALLOW policy common-infrastructure/httpbin (or any other applicable ALLOW policy) matched"
    );

    let set = build(
        &[
            (NS, "httpbin", SEED),
            (
                NS,
                "aud",
                "action: AUDIT\nrules: [{to: [{operation: {methods: [POST]}}]}]",
            ),
        ],
        &opts(),
    )
    .unwrap();
    let d = decide(&set, &POST);
    assert!(!d.allowed);
    assert_eq!(
        d.audit.as_ref().map(|(p, r)| (&**p, *r)),
        Some(("common-infrastructure/aud", 0))
    );
    assert!(decide(&set, &GET).audit.is_none());

    let set = build(&[(NS, "d", "action: DENY\nrules: [{to: [{operation: {methods: [PUT]}}]}, {to: [{operation: {methods: [POST]}}]}]")], &opts()).unwrap();
    let d = decide(&set, &POST);
    assert_eq!(
        (d.allowed, d.rule, d.reason),
        (false, Some(1), Reason::DenyMatched)
    );
    assert_eq!(
        d.to_string(),
        "denied: DENY policy common-infrastructure/d rule 1 matched"
    );
}

#[test]
fn warnings_for_ignored_policies() {
    let set = build(
        &[
            (NS, "sel", "selector: {matchLabels: {app: x}}\naction: DENY\nrules: [{}]"),
            ("istio-system", "mesh", "#unbound\naction: DENY\nrules: [{}]"),
            (NS, "nsw", "#unbound\naction: DENY\nrules: [{}]"),
            (NS, "svc", "targetRefs: [{kind: Service, group: '', name: httpbin}]\naction: DENY\nrules: [{}]"),
            (NS, "gw", "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress-gateway}]\naction: DENY\nrules: [{}]"),
            (NS, "h", "rules: [{to: [{operation: {hosts: ['httpbin.org:80']}}]}]"),
        ],
        &BuildOptions::default(), // no waypoint Gateway known
    )
    .unwrap();
    let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
    let has =
        |policy: &str, needle: &str| w.iter().any(|x| x.contains(policy) && x.contains(needle));
    assert!(
        has("common-infrastructure/sel", "selects workloads"),
        "{w:#?}"
    );
    assert!(has("istio-system/mesh", "root namespace"), "{w:#?}");
    assert!(has("common-infrastructure/nsw", "namespace-wide"), "{w:#?}");
    assert!(has("common-infrastructure/svc", "\"Service\""), "{w:#?}");
    assert!(
        has("common-infrastructure/gw", "not this waypoint"),
        "{w:#?}"
    );
    // A port in a host pattern is matched as written, as Istio does.
    assert!(
        !w.iter().any(|x| x.contains("common-infrastructure/h:")),
        "{w:#?}"
    );
    assert_eq!(set.len(), 1);
    assert!(decide(&set, &GET.host("httpbin.org:80")).allowed);
    assert!(!decide(&set, &GET.host("httpbin.org")).allowed);
    assert!(!decide(&set, &GET.host("other.org")).allowed);
}

fn build_err(yaml: &str) -> String {
    match build(&[(NS, "bad", yaml)], &opts()) {
        Ok(_) => panic!("policy should be rejected: {yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn build_errors_name_policy_and_field() {
    let e = build_err("action: CUSTOM\nprovider: {name: ext-authz}\nrules: [{}]");
    assert_eq!(
        e,
        "AuthorizationPolicy common-infrastructure/bad: CUSTOM action is not supported by shunt"
    );
    let e = build_err("rules: [{when: [{key: request.foo, values: [x]}]}]");
    assert!(
        e.contains("common-infrastructure/bad")
            && e.contains("spec.rules[0].when[0].key")
            && e.contains("\"request.foo\""),
        "{e}"
    );
    let e = build_err("rules: [{when: [{key: source.ip}]}]");
    assert!(e.contains("needs values or notValues"), "{e}");
    let e = build_err("rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]");
    assert!(
        e.contains("spec.rules[0].from[0].source.ipBlocks[0]") && e.contains("10.0.0.0/33"),
        "{e}"
    );
    let e = build_err("rules: [{to: [{operation: {ports: ['http']}}]}]");
    assert!(e.contains("spec.rules[0].to[0].operation.ports[0]"), "{e}");
    let e = build_err("rules: [{from: [{source: {}}]}]");
    assert!(
        e.contains("spec.rules[0].from[0].source") && e.contains("must not be empty"),
        "{e}"
    );
    let e = build_err("rules: [{to: [{operation: {paths: ['/a/{*}/b']}}]}]");
    assert!(e.contains("path templates"), "{e}");
    let e = build_err("rules: [{from: [{source: {serviceAccounts: [a/b/c]}}]}]");
    assert!(
        e.contains("spec.rules[0].from[0].source.serviceAccounts[0]")
            && e.contains("<namespace>/<serviceaccount>"),
        "{e}"
    );
    let e = build_err("rules: [{from: [{source: {serviceAccounts: ['default/*']}}]}]");
    assert!(e.contains("wildcards are not allowed"), "{e}");
    let e = build_err("rules: [{from: [{source: {serviceAccounts: [a, b, c, d, e, f, g, h, i, j, k, l, m, n, o, p, q]}}]}]");
    assert!(e.contains("more than 16 values"), "{e}");
    // Istio: serviceAccounts cannot be combined with principals or namespaces.
    for other in [
        "principals: [x]",
        "notPrincipals: [x]",
        "namespaces: [x]",
        "notNamespaces: [x]",
    ] {
        let e = build_err(&format!(
            "rules: [{{from: [{{source: {{serviceAccounts: [default/admin], {other}}}}}]}}]"
        ));
        assert!(
            e.contains("spec.rules[0].from[0].source") && e.contains("cannot set serviceAccounts"),
            "{other}: {e}"
        );
    }
    let e =
        build_err("rules: [{from: [{source: {notServiceAccounts: [admin], principals: [x]}}]}]");
    assert!(e.contains("cannot set serviceAccounts"), "{e}");
    for (td, why) in [
        ("'a*b'", "only allowed at the start or end"),
        ("'*a*'", "at most one wildcard"),
        ("'a/b'", "must not contain '/'"),
        ("''", "empty value"),
    ] {
        let e = build_err(&format!(
            "rules: [{{from: [{{source: {{trustDomains: [{td}]}}}}]}}]"
        ));
        assert!(
            e.contains("spec.rules[0].from[0].source.trustDomains[0]") && e.contains(why),
            "{td}: {e}"
        );
    }
    let e = build_err("rules: [{when: [{key: source.trustDomain, values: ['x/y']}]}]");
    assert!(e.contains("spec.rules[0].when[0].values[0]"), "{e}");
    // Istio refuses a DENY that can never fire.
    for y in ["action: DENY", "action: DENY\nrules: []"] {
        let e = build_err(y);
        assert!(
            e.contains("spec.rules") && e.contains("DENY action without rules"),
            "{e}"
        );
    }
    // istio.io/dry-run must be a boolean as Go's ParseBool reads it.
    let meta = ObjectMeta {
        name: "dr".into(),
        namespace: Some(NS.into()),
        annotations: [("istio.io/dry-run".to_string(), "yes".to_string())].into(),
        ..Default::default()
    };
    let e = PolicySet::build(&[(meta, parse("rules: [{}]"))], &opts())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("common-infrastructure/dr")
            && e.contains("metadata.annotations[istio.io/dry-run]")
            && e.contains("\"yes\" is not a boolean"),
        "{e}"
    );
    let e = build_err(
        "targetRefs: [{kind: ServiceEntry, group: networking.k8s.io, name: x}]\nrules: [{}]",
    );
    assert!(e.contains("spec.targetRefs[0].group"), "{e}");
    let e = build_err("targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}]\nselector: {matchLabels: {a: b}}");
    assert!(e.contains("only one of selector and targetRefs"), "{e}");
    let e = build_err("action: allow");
    assert!(e.contains("unknown action"), "{e}");
    let e = build_err("action: DENY\nprovider: {name: x}");
    assert!(e.contains("spec.provider"), "{e}");
    // Several invalid policies are all reported.
    let e = build(
        &[
            (NS, "a", "action: CUSTOM"),
            (NS, "b", "rules: [{to: [{operation: {ports: ['x']}}]}]"),
        ],
        &opts(),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(
        e.starts_with("2 invalid")
            && e.contains("common-infrastructure/a")
            && e.contains("common-infrastructure/b"),
        "{e}"
    );
    // Duplicates.
    let e = build(
        &[(NS, "a", "rules: [{}]"), (NS, "a", "rules: [{}]")],
        &opts(),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        e.as_deref(),
        Some("AuthorizationPolicy common-infrastructure/a is defined twice")
    );
    // The schema rejects unknown fields (a typo never widens a policy).
    let r: Result<AuthorizationPolicySpec, _> =
        serde_yaml_ng::from_str("rules: [{to: [{operation: {method: [GET]}}]}]");
    assert!(r.is_err());
    // An ignored (selector) CUSTOM policy is not an error.
    assert!(build(
        &[(
            NS,
            "c",
            "selector: {matchLabels: {a: b}}\naction: CUSTOM\nprovider: {name: x}"
        )],
        &opts()
    )
    .is_ok());
}

// ---------------------------------------------------------------------------
// Bypass corpus: each raw request must get the decision its normalized form
// gets. Policies: the seed (curl may only GET /get) plus a DENY on /admin* and
// an ALLOW for admin on the Host httpbin.org only.
const CORPUS_POLICIES: &[(&str, &str, &str)] = &[
    (NS, "httpbin", SEED),
    (
        NS,
        "no-admin-paths",
        "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*', '/post']}}]}]",
    ),
    (
        NS,
        "host-only",
        "action: DENY\nrules: [{to: [{operation: {notHosts: [httpbin.org]}}]}]",
    ),
];

#[test]
fn bypass_corpus() {
    let set = build(
        CORPUS_POLICIES,
        &opts_norm(PathNormalization::DecodeAndMergeSlashes),
    )
    .unwrap();
    let deny_paths = Some("common-infrastructure/no-admin-paths");
    let corpus: &[(R, bool, Option<&str>)] = &[
        (R::http(Some(CURL), "GET", "/get"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "//get"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "/get/"), D, None),
        (R::http(Some(CURL), "GET", "/%67et"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "/foo/../get"), A, BY_SEED),
        (
            R::http(Some(CURL), "GET", "/get%2F..%2Fpost"),
            D,
            deny_paths,
        ),
        (
            R::http(Some(CURL), "GET", "/get%2f..%2fpost"),
            D,
            deny_paths,
        ),
        (R::http(Some(CURL), "GET", "/get#x"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "/get?x=1"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "/get?x=/post#y"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "\\get"), A, BY_SEED),
        (R::http(Some(CURL), "GET", "/GET"), D, None),
        (R::http(Some(CURL), "get", "/get"), D, None),
        (
            R::http(Some(CURL), "GET", "/get").host("HTTPBIN.ORG"),
            A,
            BY_SEED,
        ),
        // Istio compares the Host as sent: a port or a trailing dot makes
        // it another host, so the notHosts DENY fires (fail closed).
        (
            R::http(Some(CURL), "GET", "/get").host("HTTPBIN.ORG:80"),
            D,
            Some("common-infrastructure/host-only"),
        ),
        (
            R::http(Some(CURL), "GET", "/get").host("httpbin.org."),
            D,
            Some("common-infrastructure/host-only"),
        ),
        (
            R::http(Some(CURL), "GET", "/get").host("evil.org"),
            D,
            Some("common-infrastructure/host-only"),
        ),
        (R::http(Some(ADMIN), "GET", "/admin"), D, deny_paths),
        (R::http(Some(ADMIN), "GET", "//admin"), D, deny_paths),
        (R::http(Some(ADMIN), "GET", "/%61dmin/x"), D, deny_paths),
        (R::http(Some(ADMIN), "GET", "/x/..%2Fadmin"), D, deny_paths),
        (
            R::http(Some(ADMIN), "GET", "/x/%2e%2e/admin"),
            D,
            deny_paths,
        ),
        (
            R::http(Some(ADMIN), "GET", "/x/%2E%2E%5Cadmin"),
            D,
            deny_paths,
        ),
        (R::http(Some(ADMIN), "GET", "/./admin"), D, deny_paths),
        (R::http(Some(ADMIN), "GET", "/../../admin"), D, deny_paths),
        (R::http(Some(ADMIN), "GET", "\\admin\\x"), D, deny_paths),
        (R::http(Some(ADMIN), "POST", "/x/../post"), D, deny_paths),
        (R::http(Some(ADMIN), "POST", "/post/."), A, BY_SEED), // "/post/" is another path
        (R::http(Some(ADMIN), "GET", "/ADMIN"), A, BY_SEED),
        (
            R::http(Some(ADMIN), "GET", "/public?next=/admin"),
            A,
            BY_SEED,
        ),
    ];
    let mut failures = Vec::new();
    for (r, allowed, by) in corpus {
        let d = decide(&set, r);
        // A denial because no ALLOW rule matched names the ALLOW policy
        // that applied; the corpus lists `None` for those.
        let decided_by = match d.reason {
            Reason::NoAllowMatched => None,
            _ => d.policy.as_deref(),
        };
        if d.allowed != *allowed || decided_by != *by {
            failures.push(format!(
                "{} {} host={}: expected allowed={allowed} by {by:?}, got {d}",
                r.m, r.path, r.host
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Unnormalizable paths are rejected before any policy runs (answer 400).
    for bad in ["/get%zz", "/get%2", "/get%", "get", "/%G0"] {
        assert!(
            HttpRequest::without_headers(
                "GET",
                bad,
                "httpbin.org",
                PathNormalization::DecodeAndMergeSlashes
            )
            .is_err(),
            "{bad} accepted"
        );
    }
}

#[test]
fn path_normalization() {
    let cases = [
        ("/get", "/get"),
        ("", "/"),
        ("/", "/"),
        ("//get", "/get"),
        ("///a//b///", "/a/b/"),
        ("/get/", "/get/"),
        ("/%67et", "/get"),
        ("/a%2Fb", "/a/b"),
        ("/a%5cb", "/a/b"),
        ("/a\\b", "/a/b"),
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("/a%2e%2E/b", "/a../b"),
        ("/%2e%2e/x", "/x"),
        ("/a%3ab", "/a%3Ab"),
        ("/a%20b", "/a%20b"),
        ("/a%252Fb", "/a%252Fb"),
        ("/get?x=1", "/get"),
        ("/get#frag", "/get"),
        ("/a/..?x=/../..", "/"),
        ("/caf\u{e9}/../x", "/x"),
        ("*", "*"),
    ];
    for (input, want) in cases {
        assert_eq!(
            normalize_path(input, PathNormalization::DecodeAndMergeSlashes).as_deref(),
            Ok(want),
            "input {input:?}"
        );
    }
    // Nothing to change: borrowed, no allocation.
    for mode in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        assert!(matches!(
            normalize_path("/get/x.json", mode),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
        assert!(matches!(
            normalize_path("/get?q=1", mode),
            Ok(std::borrow::Cow::Borrowed("/get"))
        ));
    }
    assert_eq!(
        normalize_path("/a%zz", PathNormalization::Base),
        Err(PathError::InvalidEscape { offset: 2 })
    );
}

#[test]
fn host_normalization() {
    // Lower-cased only: Istio's host match sees port and trailing dot.
    for (input, want) in [
        ("httpbin.org", "httpbin.org"),
        ("HTTPBIN.ORG:80", "httpbin.org:80"),
        ("httpbin.org.", "httpbin.org."),
        ("HttpBin.Org.:8080", "httpbin.org.:8080"),
        ("[2001:DB8::1]:443", "[2001:db8::1]:443"),
        ("10.0.0.1:80", "10.0.0.1:80"),
    ] {
        assert_eq!(normalize_host(input), want, "input {input:?}");
    }
    assert!(matches!(
        normalize_host("httpbin.org"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn framing() {
    let f = |h: &[(&str, &str)]| check_framing(h.iter().map(|(k, v)| (*k, v.as_bytes())));
    assert_eq!(f(&[("host", "x")]), Ok(Framing::None));
    assert_eq!(
        f(&[("Content-Length", "42")]),
        Ok(Framing::ContentLength(42))
    );
    assert_eq!(f(&[("transfer-encoding", "chunked")]), Ok(Framing::Chunked));
    assert_eq!(f(&[("Transfer-Encoding", "Chunked")]), Ok(Framing::Chunked));
    assert_eq!(
        f(&[("content-length", "5"), ("transfer-encoding", "chunked")]),
        Err(FramingError::ContentLengthWithTransferEncoding)
    );
    assert_eq!(
        f(&[("transfer-encoding", "chunked"), ("CONTENT-LENGTH", "5")]),
        Err(FramingError::ContentLengthWithTransferEncoding)
    );
    assert_eq!(
        f(&[("content-length", "5"), ("content-length", "5")]),
        Err(FramingError::DuplicateContentLength)
    );
    assert_eq!(
        f(&[("content-length", "5"), ("content-length", "6")]),
        Err(FramingError::DuplicateContentLength)
    );
    assert_eq!(
        f(&[("content-length", "5, 5")]),
        Err(FramingError::DuplicateContentLength)
    );
    assert!(matches!(
        f(&[("content-length", "+5")]),
        Err(FramingError::InvalidContentLength(_))
    ));
    assert!(matches!(
        f(&[("content-length", "-1")]),
        Err(FramingError::InvalidContentLength(_))
    ));
    assert!(matches!(
        f(&[("content-length", "")]),
        Err(FramingError::InvalidContentLength(_))
    ));
    assert!(matches!(
        f(&[("content-length", "99999999999999999999999")]),
        Err(FramingError::InvalidContentLength(_))
    ));
    assert!(matches!(
        f(&[("transfer-encoding", "gzip")]),
        Err(FramingError::BadTransferEncoding(_))
    ));
    assert!(matches!(
        f(&[("transfer-encoding", "chunked, gzip")]),
        Err(FramingError::BadTransferEncoding(_))
    ));
    assert!(matches!(
        f(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked")
        ]),
        Err(FramingError::BadTransferEncoding(_))
    ));
    assert!(matches!(
        f(&[("transfer-encoding", "xchunked")]),
        Err(FramingError::BadTransferEncoding(_))
    ));
    assert!(matches!(
        f(&[("transfer-encoding", "")]),
        Err(FramingError::BadTransferEncoding(_))
    ));
    // Other codings before chunked are refused too: shunt does not decode
    // them and an upstream might frame them differently (Envoy refuses them).
    assert!(matches!(
        f(&[("transfer-encoding", "gzip, chunked")]),
        Err(FramingError::BadTransferEncoding(_))
    ));
}

#[test]
fn explain_names_policies_and_reasons() {
    let set = build(
        &[
            (NS, "httpbin", SEED),
            (
                NS,
                "sel",
                "selector: {matchLabels: {a: b}}\naction: DENY\nrules: [{}]",
            ),
        ],
        &opts(),
    )
    .unwrap();
    let e = with_ctx(&POST, |ctx| explain(&set, NS, SE, ctx));
    assert!(!e.decision.allowed);
    let t = e.text;
    assert!(t.contains("ALLOW common-infrastructure/httpbin (bound to ServiceEntry common-infrastructure/httpbin.org)"), "{t}");
    assert!(t.contains("rule 0: no match"), "{t}");
    assert!(t.contains("from[0].principals: FAILS: \"cluster.local/ns/default/sa/curl\" matches none of [cluster.local/ns/default/sa/admin]"), "{t}");
    assert!(t.contains("rule 1: no match"), "{t}");
    assert!(
        t.contains("to[0].methods: FAILS: \"POST\" matches none of [GET]"),
        "{t}"
    );
    assert!(t.contains("common-infrastructure/sel"), "{t}");
    assert!(t.contains("decision: DENY"), "{t}");

    let e = with_ctx(&GET, |ctx| explain(&set, NS, SE, ctx));
    assert!(
        e.text.contains("rule 1: MATCH") && e.text.contains("decision: ALLOW"),
        "{}",
        e.text
    );

    let e = with_ctx(&R::tcp(Some(CURL)), |ctx| explain(&set, NS, SE, ctx));
    assert!(
        e.text.contains("rule 1: skipped: uses HTTP-only fields"),
        "{}",
        e.text
    );

    let e = with_ctx(&GET, |ctx| explain(&set, NS, "other.org", ctx));
    assert!(
        e.text.contains("policies applied: none") && e.text.contains("no ALLOW policy applies"),
        "{}",
        e.text
    );
}

#[test]
fn headers_via_http_headermap() {
    let set = build(
        &[(
            NS,
            "a",
            "rules: [{when: [{key: 'request.headers[X-User]', values: [alice]}]}]",
        )],
        &opts(),
    )
    .unwrap();
    let mut hm = http::HeaderMap::new();
    hm.insert("x-user", http::HeaderValue::from_static("alice"));
    let ctx = RequestContext {
        principal: Some(CURL),
        destination_port: 80,
        http: Some(
            HttpRequest::new("GET", "/", "httpbin.org", &hm, PathNormalization::Base).unwrap(),
        ),
        ..Default::default()
    };
    assert!(set.evaluate(NS, SE, &ctx).allowed);
    hm.append("x-user", http::HeaderValue::from_static("bob"));
    let ctx = RequestContext {
        principal: Some(CURL),
        destination_port: 80,
        http: Some(
            HttpRequest::new("GET", "/", "httpbin.org", &hm, PathNormalization::Base).unwrap(),
        ),
        ..Default::default()
    };
    assert!(!set.evaluate(NS, SE, &ctx).allowed);
}

#[test]
fn needs_http_and_empty() {
    let set = build(SEEDP, &opts()).unwrap();
    assert!(set.for_service(NS, SE).needs_http());
    assert!(set.for_service(NS, "other").is_empty());
    let set = build(
        &[(
            NS,
            "a",
            "rules: [{from: [{source: {namespaces: [default]}}]}]",
        )],
        &opts(),
    )
    .unwrap();
    assert!(!set.for_service(NS, SE).needs_http());
}

#[test]
fn path_normalization_follows_the_mesh_mode() {
    use PathNormalization::*;
    // (input, NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES)
    let cases: &[(&str, [&str; 4])] = &[
        ("/get", ["/get", "/get", "/get", "/get"]),
        ("//get", ["//get", "//get", "/get", "/get"]),
        ("/a//b/", ["/a//b/", "/a//b/", "/a/b/", "/a/b/"]),
        ("/a/../b", ["/a/../b", "/b", "/b", "/b"]),
        ("/a//../b", ["/a//../b", "/a/b", "/a/b", "/a/b"]),
        ("/%61dmin", ["/%61dmin", "/admin", "/admin", "/admin"]),
        ("/a%2fb", ["/a%2fb", "/a%2Fb", "/a%2Fb", "/a/b"]),
        ("/a%5Cb", ["/a%5Cb", "/a%5Cb", "/a%5Cb", "/a/b"]),
        ("/a\\b", ["/a\\b", "/a/b", "/a/b", "/a/b"]),
        (
            "/x/%2E%2E/admin",
            ["/x/%2E%2E/admin", "/admin", "/admin", "/admin"],
        ),
        (
            "/a/%2F../b",
            ["/a/%2F../b", "/a/%2F../b", "/a/%2F../b", "/a/b"],
        ),
        ("/a%3ab", ["/a%3ab", "/a%3Ab", "/a%3Ab", "/a%3Ab"]),
        ("/a/b/..", ["/a/b/..", "/a/", "/a/", "/a/"]),
        ("/get?x=//y", ["/get", "/get", "/get", "/get"]),
    ];
    let mut failures = Vec::new();
    for (input, want) in cases {
        for (mode, want) in [None, Base, MergeSlashes, DecodeAndMergeSlashes]
            .iter()
            .zip(want)
        {
            let got = normalize_path(input, *mode);
            if got.as_deref() != Ok(*want) {
                failures.push(format!("{mode} {input:?}: want {want:?}, got {got:?}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // Invalid escapes are refused from BASE on; NONE passes the path as is.
    assert!(normalize_path("/a%zz", Base).is_err());
    assert_eq!(normalize_path("/a%zz", None).as_deref(), Ok("/a%zz"));
}

#[test]
fn the_mesh_mode_decides_path_matches() {
    use PathNormalization::*;
    let deny = &[(
        NS,
        "d",
        "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]",
    )];
    let cases: &[(&str, [bool; 4])] = &[
        // denied? under NONE, BASE, MERGE_SLASHES, DECODE_AND_MERGE_SLASHES
        ("/admin", [true, true, true, true]),
        ("/x/../admin", [false, true, true, true]),
        ("//admin", [false, false, true, true]),
        ("/%2Fadmin", [false, false, false, true]),
    ];
    for (path, denied) in cases {
        for (mode, denied) in [None, Base, MergeSlashes, DecodeAndMergeSlashes]
            .iter()
            .zip(denied)
        {
            let set = build(deny, &opts_norm(*mode)).unwrap();
            let d = decide(&set, &R::http(Some(CURL), "GET", path));
            assert_eq!(!d.allowed, *denied, "{mode} {path}: {d}");
        }
    }
}

#[test]
fn weak_path_rules_are_warned_about_under_the_mesh_mode() {
    use PathNormalization::*;
    let ps = &[
        (
            NS,
            "d",
            "action: DENY\nrules: [{to: [{operation: {paths: ['/admin*']}}]}]",
        ),
        (
            NS,
            "a",
            "rules: [{to: [{operation: {notPaths: ['/admin*']}}]}]",
        ),
        (NS, "ok", "rules: [{to: [{operation: {paths: ['/get']}}]}]"),
    ];
    for mode in [None, Base, MergeSlashes] {
        let set = build(ps, &opts_norm(mode)).unwrap();
        let w: Vec<String> = set.warnings().iter().map(|w| w.to_string()).collect();
        assert!(
            w.iter().any(
                |x| x.contains("common-infrastructure/d: spec.rules[0]: DENY on paths")
                    && x.contains(mode.as_str())
                    && x.contains("DECODE_AND_MERGE_SLASHES")
            ),
            "{mode}: {w:#?}"
        );
        assert!(
            w.iter()
                .any(|x| x.contains("common-infrastructure/a: spec.rules[0]: ALLOW on notPaths")),
            "{mode}: {w:#?}"
        );
        assert!(!w.iter().any(|x| x.contains("/ok:")), "{mode}: {w:#?}");
    }
    let set = build(ps, &opts_norm(DecodeAndMergeSlashes)).unwrap();
    assert!(set.warnings().is_empty(), "{:?}", set.warnings());
}

#[test]
fn dry_run_policies_report_a_shadow_decision_and_never_enforce() {
    let deny = (
        NS,
        "dd",
        "#dry-run\naction: DENY\nrules: [{to: [{operation: {methods: [POST]}}]}]",
    );
    let allow = (
        NS,
        "da",
        "#dry-run\nrules: [{to: [{operation: {paths: [/get]}}]}]",
    );
    let set = build(&[deny, allow], &opts()).unwrap();
    // POST: the dry-run DENY would deny.
    let d = decide(&set, &POST);
    assert!(d.allowed && d.reason == Reason::NoAllowPolicy, "{d}");
    let sh = d.shadow.clone().expect("shadow decision");
    assert!(!sh.allowed && sh.action == Action::Deny, "{sh}");
    assert_eq!(sh.policy.as_deref(), Some("common-infrastructure/dd"));
    assert_eq!(sh.rule, Some(0));
    assert_eq!(
        d.to_string(),
        "allowed: no ALLOW policy applies (shadow denied: dry-run DENY policy common-infrastructure/dd rule 0 matched)"
    );
    // GET /get: the dry-run ALLOW would allow.
    let sh = decide(&set, &GET).shadow.expect("shadow");
    assert!(sh.allowed && sh.action == Action::Allow, "{sh}");
    assert_eq!(sh.policy.as_deref(), Some("common-infrastructure/da"));
    // GET /other: the dry-run ALLOW applies and nothing matched.
    let sh = decide(&set, &R::http(Some(CURL), "GET", "/other"))
        .shadow
        .expect("shadow");
    assert!(!sh.allowed && sh.rule.is_none(), "{sh}");
    assert_eq!(
        sh.to_string(),
        "shadow denied: no rule of dry-run ALLOW policy common-infrastructure/da matched"
    );
    // No dry-run policy bound: no shadow decision.
    let set = build(SEEDP, &opts()).unwrap();
    assert!(decide(&set, &GET).shadow.is_none());
    // Dry-run policies never make a port parse HTTP.
    let set = build(&[deny], &opts()).unwrap();
    assert!(!set.for_service(NS, SE).needs_http());
    assert!(!set.for_service(NS, SE).is_empty());
    // ... and explain shows them.
    let e = with_ctx(&POST, |ctx| explain(&set, NS, SE, ctx));
    assert!(
        e.text.contains("dry-run DENY common-infrastructure/dd"),
        "{}",
        e.text
    );
    assert!(e.text.contains("shadow denied"), "{}", e.text);
}

#[test]
fn connection_sni_is_refused_where_it_can_never_match() {
    let sni = "action: DENY\nrules: [{when: [{key: connection.sni, values: ['*.evil.example']}]}]";
    let with = |tls: bool| BuildOptions {
        service_tls: Some([((NS.to_string(), SE.to_string()), tls)].into()),
        ..opts()
    };
    let e = build(&[(NS, "d", sni)], &with(false))
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        e.contains("common-infrastructure/d")
            && e.contains("spec.rules[0].when[0]")
            && e.contains("ServiceEntry common-infrastructure/httpbin.org has none"),
        "{e}"
    );
    // A TLS port, an unknown ServiceEntry, or the whole waypoint: accepted.
    assert!(build(&[(NS, "d", sni)], &with(true)).is_ok());
    let other = BuildOptions {
        service_tls: Some([(("x".to_string(), "y".to_string()), false)].into()),
        ..opts()
    };
    assert!(build(&[(NS, "d", sni)], &other).is_ok());
    let gw = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: egress-gateway}]\naction: DENY\nrules: [{when: [{key: connection.sni, values: [x]}]}]";
    assert!(build(&[(NS, "d", gw)], &with(false)).is_ok());
    // notValues alone matches a connection without SNI; not refused.
    let not = "action: DENY\nrules: [{when: [{key: connection.sni, notValues: [ok.example]}]}]";
    assert!(build(&[(NS, "d", not)], &with(false)).is_ok());
}

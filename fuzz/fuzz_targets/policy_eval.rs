//! Policy evaluation with path normalization (policy/): a request's method,
//! target, Host, principal, source and headers against a fixed policy set
//! under each `pathNormalization`. Input: first byte the mode; then lines
//! `method`, `target`, `host`, `principal`, then `name: value` headers.
//!
//! Properties: normalization is idempotent (what goes upstream normalizes
//! to itself), and a request decides as its normalized path decides, so a
//! raw spelling can never reach a path the policy denies.
#![no_main]

use std::net::IpAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use shunt_agent::fuzzing;
use shunt_agent::policy::{
    normalize_path, BuildOptions, GatewayRef, HeaderList, HttpRequest, PathNormalization,
    PolicySet, RequestContext,
};

const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: infra}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin", "/admin/*", "*/secret", "/a b"]}}]
  - to: [{operation: {methods: ["DELETE"], notPaths: ["/tmp/*"]}}]
  - when: [{key: "request.headers[x-evil]", values: ["*"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: infra}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}]
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/admin"]}}]
  - to: [{operation: {methods: ["GET", "HEAD"], paths: ["/get", "/status/*", "/anything*"]}}]
  - to: [{operation: {hosts: ["httpbin.org", "*.example.com"], ports: ["80"]}}]
    when: [{key: "request.headers[x-token]", values: ["let-me-in", "pre*"]}]
  - from: [{source: {ipBlocks: ["10.244.0.0/16"], notPrincipals: ["*/sa/curl"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit, namespace: infra}
spec:
  targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}]
  action: AUDIT
  rules: [{to: [{operation: {paths: ["/anything/*"]}}]}]
"#;

const MODES: [PathNormalization; 4] = [
    PathNormalization::None,
    PathNormalization::Base,
    PathNormalization::MergeSlashes,
    PathNormalization::DecodeAndMergeSlashes,
];

fn sets() -> &'static [PolicySet; 4] {
    static S: OnceLock<[PolicySet; 4]> = OnceLock::new();
    S.get_or_init(|| {
        let cfg = fuzzing::config(&[("p.yaml", POLICIES.as_bytes())]).expect("policies parse");
        let items: Vec<_> = cfg
            .authorization_policies
            .iter()
            .map(|p| (p.metadata.clone(), p.spec.clone()))
            .collect();
        MODES.map(|mode| {
            let opts = BuildOptions {
                root_namespace: "istio-system".into(),
                waypoint: Some(GatewayRef {
                    namespace: "infra".into(),
                    name: "egress-gateway".into(),
                }),
                path_normalization: mode,
                service_tls: None,
            };
            PolicySet::build(&items, &opts).expect("policies compile")
        })
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let i = (m & 3) as usize;
    let mode = MODES[i];
    let mut lines = text.split('\n');
    let method = lines.next().unwrap_or("");
    let target = lines.next().unwrap_or("");
    let host = lines.next().unwrap_or("");
    let principal = lines.next().filter(|p| !p.is_empty());
    let headers: Vec<(&str, &str)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    let headers = HeaderList(&headers);

    let Ok(norm) = normalize_path(target, mode) else {
        return;
    };
    if mode != PathNormalization::None {
        assert_eq!(
            normalize_path(&norm, mode).as_deref(),
            Ok(&*norm),
            "normalizing {target:?} twice"
        );
        if norm != "*" {
            assert!(norm.starts_with('/'), "{target:?} -> {norm:?}");
            assert!(!norm.contains('\\'));
            for seg in norm.split('/') {
                assert!(seg != "." && seg != "..", "{target:?} -> {norm:?}");
            }
        }
    }
    if matches!(
        mode,
        PathNormalization::MergeSlashes | PathNormalization::DecodeAndMergeSlashes
    ) {
        assert!(!norm.contains("//"), "{target:?} -> {norm:?}");
    }
    if mode == PathNormalization::DecodeAndMergeSlashes {
        let up = norm.to_ascii_uppercase();
        assert!(
            !up.contains("%2F") && !up.contains("%5C"),
            "{target:?} -> {norm:?}"
        );
    }

    let set = &sets()[i];
    let source: IpAddr = if m & 4 == 0 {
        "10.244.1.19"
    } else {
        "192.0.2.7"
    }
    .parse()
    .unwrap();
    let decide = |t: &str| {
        let http = HttpRequest::new(method, t, host, &headers, mode).expect("normalizes");
        let req = RequestContext {
            principal,
            source_ip: Some(source),
            destination_port: 80,
            http: Some(http),
            ..Default::default()
        };
        set.for_service("infra", "httpbin.org").evaluate(&req)
    };
    let raw = decide(target);
    // The query is dropped by normalization; `norm` has none left to drop
    // unless it contains a `?`/`#` that came from an escape (never decoded).
    let again = decide(&norm);
    assert_eq!(
        raw.allowed, again.allowed,
        "{target:?} decides unlike {norm:?}"
    );
    assert_eq!(raw.policy, again.policy);
});

//! Per-request authorization cost at the waypoint with the seed's policy,
//! alone and among 1,000 policies attached to the same ServiceEntry.
//!
//! Run: `cargo bench -p shunt-agent --bench policy`

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use shunt_agent::config::authz::AuthorizationPolicySpec;
use shunt_agent::config::meta::ObjectMeta;
use shunt_agent::policy::{
    BuildOptions, HeaderList, HttpRequest, PathNormalization, PolicySet, RequestContext,
};
use shunt_testbed::seed;

const NS: &str = "common-infrastructure";
const SE: &str = "httpbin.org";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: name.into(),
        namespace: Some(NS.into()),
        ..Default::default()
    }
}

fn spec(yaml: &str) -> AuthorizationPolicySpec {
    serde_yaml_ng::from_str(yaml).expect("bench policy YAML")
}

/// The seed's policy plus `extra` others on the same ServiceEntry, half DENY
/// and half ALLOW, none matching the benchmark's requests (the worst case:
/// every one is evaluated).
fn policies(extra: usize) -> Vec<(ObjectMeta, AuthorizationPolicySpec)> {
    let seed: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&seed::file(seed::POLICY).expect("the seed's policy"))
            .expect("the seed's policy YAML");
    let seed = serde_yaml_ng::from_value(seed["spec"].clone()).expect("the seed's policy spec");
    let mut v = vec![(meta("httpbin"), seed)];
    for i in 0..extra {
        let y = if i % 2 == 0 {
            format!(
                "targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: {SE}}}]\naction: DENY\nrules:\n- from: [{{source: {{principals: [cluster.local/ns/team-{i}/sa/app]}}}}]\n  to: [{{operation: {{paths: ['/private-{i}*']}}}}]\n"
            )
        } else {
            format!(
                "targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: {SE}}}]\naction: ALLOW\nrules:\n- from: [{{source: {{namespaces: [team-{i}], ipBlocks: [10.{}.0.0/16]}}}}]\n  to: [{{operation: {{methods: [GET, HEAD], paths: ['/api/{i}/*'], hosts: [httpbin.org]}}}}]\n  when: [{{key: 'request.headers[x-team]', values: ['team-{i}']}}]\n",
                i % 250
            )
        };
        v.push((meta(&format!("p{i:04}")), spec(&y)));
    }
    v
}

fn bench(c: &mut Criterion) {
    let headers = [("user-agent", "curl/8.7.1"), ("accept", "*/*")];
    let hl = HeaderList(&headers);
    for (label, extra) in [("1 policy", 0usize), ("1000 policies", 999usize)] {
        let ps = policies(extra);
        let set = PolicySet::build(&ps, &BuildOptions::default()).expect("bench policies build");
        assert_eq!(set.len(), extra + 1);
        let sp = set.for_service(NS, SE);
        let mut g = c.benchmark_group(format!("policy/{label}"));
        for (name, principal, method, path, want) in [
            ("curl GET /get (allowed)", CURL, "GET", "/get", true),
            ("curl POST /post (denied)", CURL, "POST", "/post", false),
            ("admin POST /post (allowed)", ADMIN, "POST", "/post", true),
        ] {
            // Sanity: the benchmark measures the decision the seed defines.
            let ctx = RequestContext {
                principal: Some(principal),
                source_ip: Some("10.244.1.19".parse().expect("ip")),
                destination_port: 80,
                http: Some(
                    HttpRequest::new(method, path, "httpbin.org", &hl, PathNormalization::Base)
                        .expect("path"),
                ),
                ..Default::default()
            };
            assert_eq!(sp.evaluate(&ctx).allowed, want, "{label}: {name}");
            g.bench_function(format!("evaluate: {name}"), |b| {
                b.iter(|| black_box(sp.evaluate(black_box(&ctx))))
            });
        }
        // The whole per-request cost: lookup, normalization, evaluation.
        g.bench_function("normalize + lookup + evaluate: GET //foo/../get?x=1", |b| {
            b.iter(|| {
                let ctx = RequestContext {
                    principal: Some(black_box(CURL)),
                    source_ip: Some(std::net::IpAddr::from([10, 244, 1, 19])),
                    destination_port: 80,
                    http: HttpRequest::new(
                        "GET",
                        black_box("//foo/../get?x=1"),
                        black_box("HTTPBIN.org:80"),
                        &hl,
                        PathNormalization::DecodeAndMergeSlashes,
                    )
                    .ok(),
                    ..Default::default()
                };
                black_box(set.for_service(NS, SE).evaluate(&ctx))
            })
        });
        g.bench_function("TCP connection: curl", |b| {
            let ctx = RequestContext {
                principal: Some(CURL),
                source_ip: Some(std::net::IpAddr::from([10, 244, 1, 19])),
                destination_port: 80,
                ..Default::default()
            };
            b.iter(|| black_box(sp.evaluate(black_box(&ctx))))
        });
        g.finish();
    }
    c.bench_function("build: 1000 policies", |b| {
        let ps = policies(999);
        b.iter(|| black_box(PolicySet::build(&ps, &BuildOptions::default()).map(|s| s.len())))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);

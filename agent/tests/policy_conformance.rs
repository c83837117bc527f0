//! Conformance of shunt's AuthorizationPolicy decisions with Istio's: a
//! table of (policies, request, Istio's decision) read from
//! `tests/fixtures/conformance/*.yaml`, each case citing the Istio document
//! or source file its expected decision comes from. A case either expects
//! a decision (`allow` / `deny`, the deciding policy, the dry-run shadow
//! verdict, the path sent upstream) or expects the policies to be refused
//! (`refused`, with a fragment of the message), as Istio's validation does.
//!
//! Defaults keep cases short: policies live in `common-infrastructure` and
//! are bound to the ServiceEntry `httpbin.org` unless they have a
//! `targetRef(s)` or `selector`; the waypoint is
//! `common-infrastructure/egress-gateway`; the request is `GET /get` to
//! `httpbin.org:80` (VIP 240.240.0.1) from `default/curl` at 10.244.1.19.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use shunt_agent::config::authz::AuthorizationPolicySpec;
use shunt_agent::config::meta::ObjectMeta;
use shunt_agent::config::PathNormalization;
use shunt_agent::policy::{
    BuildOptions, GatewayRef, HeaderList, HttpRequest, PolicySet, Reason, RequestContext,
    DRY_RUN_ANNOTATION,
};

const NS: &str = "common-infrastructure";
const SE: &str = "httpbin.org";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    /// Where Istio documents (or implements) the expected decision.
    cite: String,
    /// MeshConfig `pathNormalization.normalization` (default BASE).
    #[serde(default)]
    normalization: Option<String>,
    /// Whether the ServiceEntry has a TLS/HTTPS port (default true: SNI
    /// conditions can match).
    #[serde(default = "yes", rename = "serviceTls")]
    service_tls: bool,
    policies: Vec<Policy>,
    #[serde(default)]
    request: Request,
    expect: Expect,
    /// The deciding policy (`ns/name`); absent: no single policy decided.
    #[serde(default)]
    by: Option<String>,
    /// The dry-run policies' would-be verdict.
    #[serde(default)]
    shadow: Option<Expect>,
    /// The path the waypoint matches and sends upstream.
    #[serde(default, rename = "upstreamPath")]
    upstream_path: Option<String>,
    /// For `expect: refused`: a fragment of the build error.
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
    Refused,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Policy {
    name: String,
    #[serde(default = "default_ns")]
    namespace: String,
    #[serde(default, rename = "dryRun")]
    dry_run: bool,
    spec: serde_yaml_ng::Value,
}

#[derive(Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
struct Request {
    /// `null`: an unauthenticated peer.
    principal: Option<String>,
    source_ip: String,
    remote_ip: Option<String>,
    destination_ip: Option<String>,
    port: u16,
    sni: Option<String>,
    /// A plain TCP connection (no HTTP request).
    tcp: bool,
    method: String,
    path: String,
    host: String,
    headers: Vec<(String, String)>,
    service: String,
}

impl Default for Request {
    fn default() -> Self {
        Request {
            principal: Some("spiffe://cluster.local/ns/default/sa/curl".into()),
            source_ip: "10.244.1.19".into(),
            remote_ip: None,
            destination_ip: Some("240.240.0.1".into()),
            port: 80,
            sni: None,
            tcp: false,
            method: "GET".into(),
            path: "/get".into(),
            host: "httpbin.org".into(),
            headers: Vec::new(),
            service: SE.into(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_ns() -> String {
    NS.into()
}

fn load_cases() -> Vec<(String, Case)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/conformance");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("conformance fixtures")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let cases: Vec<Case> =
            serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let file = f.file_name().unwrap().to_string_lossy().to_string();
        out.extend(cases.into_iter().map(|c| (file.clone(), c)));
    }
    out
}

fn policies(c: &Case) -> Result<Vec<(ObjectMeta, AuthorizationPolicySpec)>, String> {
    c.policies
        .iter()
        .map(|p| {
            let mut spec = p.spec.clone();
            let m = spec.as_mapping_mut().ok_or("spec is not a map")?;
            let bound = ["targetRef", "targetRefs", "selector"]
                .iter()
                .any(|k| m.contains_key(*k));
            if !bound {
                let to_se: serde_yaml_ng::Value = serde_yaml_ng::from_str(
                    "[{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org, namespace: common-infrastructure}]",
                )
                .unwrap();
                m.insert("targetRefs".into(), to_se);
            }
            let spec: AuthorizationPolicySpec =
                serde_yaml_ng::from_value(spec).map_err(|e| format!("policy {}: {e}", p.name))?;
            let mut meta = ObjectMeta {
                name: p.name.clone(),
                namespace: Some(p.namespace.as_str().into()),
                ..Default::default()
            };
            if p.dry_run {
                meta.annotations
                    .insert(DRY_RUN_ANNOTATION.into(), "true".into());
            }
            Ok((meta, spec))
        })
        .collect()
}

/// Runs one case; `Err` describes how shunt differs from the expectation.
fn run(c: &Case) -> Result<(), String> {
    let mode: PathNormalization = match &c.normalization {
        Some(n) => n.parse()?,
        None => PathNormalization::default(),
    };
    let opts = BuildOptions {
        root_namespace: "istio-system".into(),
        waypoint: Some(GatewayRef {
            namespace: NS.into(),
            name: "egress-gateway".into(),
        }),
        path_normalization: mode,
        service_tls: Some(HashMap::from([(
            (NS.to_string(), SE.to_string()),
            c.service_tls,
        )])),
    };
    let list = policies(c)?;
    let set = match PolicySet::build(&list, &opts) {
        Ok(s) => s,
        Err(e) => {
            let msg = e.to_string();
            return match (c.expect, &c.error) {
                (Expect::Refused, Some(frag)) if msg.contains(frag.as_str()) => Ok(()),
                (Expect::Refused, Some(frag)) => {
                    Err(format!("refused, but the message lacks {frag:?}: {msg}"))
                }
                (Expect::Refused, None) => Ok(()),
                _ => Err(format!("expected {:?}, policies refused: {msg}", c.expect)),
            };
        }
    };
    if c.expect == Expect::Refused {
        return Err("expected the policies to be refused; they were accepted".into());
    }
    let r = &c.request;
    let headers: Vec<(&str, &str)> = r
        .headers
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let headers = HeaderList(&headers);
    let http = if r.tcp {
        None
    } else {
        Some(
            HttpRequest::new(
                &r.method,
                &r.path,
                &r.host,
                &headers,
                set.path_normalization(),
            )
            .map_err(|e| format!("path not normalizable: {e}"))?,
        )
    };
    if let (Some(want), Some(h)) = (&c.upstream_path, &http) {
        if h.path() != want {
            return Err(format!("upstream path {:?}, expected {want:?}", h.path()));
        }
    }
    let ip = |s: &str| s.parse().map_err(|e| format!("bad ip {s:?}: {e}"));
    let ctx = RequestContext {
        principal: r.principal.as_deref(),
        source_ip: Some(ip(&r.source_ip)?),
        remote_ip: r.remote_ip.as_deref().map(ip).transpose()?,
        destination_ip: r.destination_ip.as_deref().map(ip).transpose()?,
        destination_port: r.port,
        sni: r.sni.as_deref(),
        http,
    };
    let d = set.evaluate(NS, &r.service, &ctx);
    let got = if d.allowed {
        Expect::Allow
    } else {
        Expect::Deny
    };
    let decided_by = match d.reason {
        Reason::NoAllowMatched => None,
        _ => d.policy.as_deref(),
    };
    if got != c.expect || decided_by != c.by.as_deref() {
        return Err(format!("expected {:?} by {:?}, got {d}", c.expect, c.by));
    }
    let shadow = d.shadow.as_ref().map(|s| {
        if s.allowed {
            Expect::Allow
        } else {
            Expect::Deny
        }
    });
    if shadow != c.shadow {
        return Err(format!(
            "expected shadow {:?}, got {:?}",
            c.shadow, d.shadow
        ));
    }
    Ok(())
}

#[test]
fn shunt_decides_as_istio_on_every_case_of_the_conformance_table() {
    let cases = load_cases();
    assert!(
        cases.len() >= 80,
        "the conformance table has {} cases (at least 80 expected)",
        cases.len()
    );
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for (file, c) in &cases {
        assert!(
            names.insert(c.name.clone()),
            "duplicate case name {:?}",
            c.name
        );
        assert!(
            c.cite.starts_with("https://istio.io/") || c.cite.starts_with("istio/istio:"),
            "{}: cite an istio.io page or an istio/istio source path",
            c.name
        );
        if let Err(e) = run(c) {
            failures.push(format!("{file}: {}: {e}\n    (Istio: {})", c.name, c.cite));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from Istio:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

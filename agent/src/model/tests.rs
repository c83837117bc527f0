use std::path::Path;

use super::*;
use crate::alloc::Allocator;
use crate::config::render::WAYPOINT_BOUND;
use crate::config::{Protocol, TlsMode};

pub(crate) fn load(files: &[(&str, &str)]) -> Arc<Config> {
    let d = tempfile::tempdir().unwrap();
    for (n, t) in files {
        std::fs::write(d.path().join(n), t).unwrap();
    }
    Arc::new(Config::load_dir(d.path()).unwrap())
}

pub(crate) fn seed_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/egress")
}

/// Allocates in a fresh state directory and builds.
pub(crate) fn model_of(cfg: &Arc<Config>, cgroups: &dyn CgroupResolver) -> (Model, Allocation) {
    let state = tempfile::tempdir().unwrap();
    let alloc = Allocator::open(state.path())
        .unwrap()
        .allocate(cfg)
        .unwrap()
        .clone();
    (Model::build(cfg.clone(), &alloc, cgroups), alloc)
}

const GW: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: infra\n  labels: {istio.io/waypoint-for: service}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.9}]\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n";

fn se(ns: &str, name: &str, labels: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  hosts: [{name}.example]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}, {{number: 443, name: tls, protocol: TLS}}]\n  resolution: DNS\n---\n")
}

fn bound(m: &Model, ns: &str, name: &str) -> (String, String, String) {
    let c = m.status[&ObjectKey::new(ns, name)]
        .condition(WAYPOINT_BOUND)
        .unwrap()
        .clone();
    (
        c.status.into_owned(),
        c.reason.into_owned(),
        c.message.into_owned(),
    )
}

fn at(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn the_seed_resolves_to_one_bound_service_and_one_enrolled_workload() {
    let cfg = Arc::new(Config::load_dir(&seed_dir()).unwrap());
    let (m, _) = model_of(&cfg, &|cg: &str| (cg == "shunt/curl").then_some(1001));
    let svc = m.service_at(at("240.240.0.1:80")).unwrap();
    assert_eq!(svc.name(), "httpbin.org");
    assert!(Arc::ptr_eq(
        svc,
        m.service_at(at("[2001:2::1]:80")).unwrap()
    ));
    assert!(Arc::ptr_eq(
        svc,
        m.service_at(at("[::ffff:240.240.0.1]:80")).unwrap()
    ));
    assert!(m.service_at(at("240.240.0.1:81")).is_none());
    assert_eq!(m.vip_ports().count(), 2);
    let wp = svc.waypoint.waypoint().unwrap();
    assert_eq!(
        wp.identity.uri(),
        "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway"
    );
    assert_eq!(wp.addr, at("10.244.1.18:15008"));
    assert_eq!(svc.port(80).unwrap().target_port, 80);
    assert_eq!(
        svc.host_of("240.240.0.1".parse().unwrap()),
        Some("httpbin.org")
    );
    // Status as in the seed.
    let st = &m.status[&ObjectKey::new("common-infrastructure", "httpbin.org")];
    let addrs: Vec<_> = st
        .addresses
        .iter()
        .map(|a| (a.host.as_str(), a.value.as_str()))
        .collect();
    assert_eq!(
        addrs,
        [("httpbin.org", "240.240.0.1"), ("httpbin.org", "2001:2::1")]
    );
    assert_eq!(
        bound(&m, "common-infrastructure", "httpbin.org"),
        (
            "True".into(),
            "WaypointAccepted".into(),
            "Successfully attached to waypoint common-infrastructure/egress-gateway".into()
        )
    );
    // Enrollment: curl resolves, admin's cgroup does not.
    let enrolled: Vec<_> = m
        .enrolled()
        .map(|(c, w)| (c, w.name().to_string()))
        .collect();
    assert_eq!(enrolled, [(1001, "curl".to_string())]);
    let curl = m
        .workload_by_addr("::ffff:10.244.1.19".parse().unwrap())
        .unwrap();
    assert_eq!(
        curl.identity.uri(),
        "spiffe://cluster.local/ns/default/sa/curl"
    );
    assert!(curl.baggage.is_some());
    assert_eq!(
        m.workload_by_addr("10.244.1.20".parse().unwrap())
            .unwrap()
            .name(),
        "admin"
    );
    assert!(m
        .warnings()
        .any(|w| w.kind == Kind::WorkloadEntry && w.to_string().contains("shunt/admin")));
    // DNS view, any case.
    let h = m.host("HTTPBIN.org").unwrap();
    assert_eq!(h.v4, vec![Ipv4Addr::new(240, 240, 0, 1)]);
    assert_eq!(m.mesh.egress, crate::config::OutboundMode::AllowAny);
    assert_eq!(m.mesh.root_namespace, "istio-system");
}

#[test]
fn tls_origination_comes_from_the_destination_rule_for_the_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["01-namespace.yaml", "02-waypoint.yaml"] {
        std::fs::copy(seed_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        seed_dir().join("tls-origination/03-serviceentry.yaml"),
        dir.path().join("03.yaml"),
    )
    .unwrap();
    let cfg = Arc::new(Config::load_dir(dir.path()).unwrap());
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_at(at("240.240.0.1:80")).unwrap();
    assert_eq!(svc.port(80).unwrap().target_port, 443);
    assert_eq!(
        svc.tls_for("httpbin.org", 80).unwrap().mode,
        TlsMode::Simple
    );
    assert!(svc.tls_for("httpbin.org", 443).is_none());
}

/// A DestinationRule in `ns` for `host` originating TLS with `sni` (which
/// names the rule in assertions), with `extra` spec lines.
fn dr(ns: &str, name: &str, host: &str, sni: &str, extra: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: \"{host}\"\n  trafficPolicy: {{tls: {{mode: SIMPLE, sni: {sni}}}}}\n{extra}---\n")
}

/// The SNI of the rule that applies to web.example:80 of apps/web, bound to
/// the waypoint infra/wp.
fn dr_sni(rules: &[String], mesh: &str) -> Option<String> {
    let web = se(
        "apps",
        "web",
        "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
    );
    let mut files = vec![
        ("gw.yaml".to_string(), GW.to_string()),
        ("se.yaml".to_string(), web),
    ];
    for (i, r) in rules.iter().enumerate() {
        files.push((format!("dr{i}.yaml"), r.clone()));
    }
    if !mesh.is_empty() {
        files.push(("mesh.yaml".into(), mesh.to_string()));
    }
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let cfg = load(&files);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let web = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert!(web.waypoint.waypoint().is_some());
    web.tls_for("web.example", 80).and_then(|t| t.sni.clone())
}

#[test]
fn destination_rules_are_looked_up_in_the_waypoint_namespace_then_the_service_namespace_then_the_root(
) {
    let infra_wild = dr("infra", "w", "*.example", "infra", "");
    let apps = dr("apps", "a", "web.example", "apps", "");
    let root = dr("istio-system", "r", "web.example", "root", "");
    // 1. The proxy's (waypoint's) namespace first, even with a wildcard.
    let all = [infra_wild, apps.clone(), root.clone()];
    assert_eq!(dr_sni(&all, "").as_deref(), Some("infra"));
    // 2. Then the service's namespace, 3. then the root namespace.
    assert_eq!(dr_sni(&[apps, root.clone()], "").as_deref(), Some("apps"));
    assert_eq!(
        dr_sni(std::slice::from_ref(&root), "").as_deref(),
        Some("root")
    );
    // A rule in a third namespace never applies.
    let elsewhere = dr("team", "t", "web.example", "team", "");
    assert_eq!(dr_sni(&[elsewhere], ""), None);
    // The root namespace is meshConfig.rootNamespace.
    let custom_root = dr("mesh-root", "r", "web.example", "custom", "");
    assert_eq!(
        dr_sni(&[custom_root], "rootNamespace: mesh-root\n").as_deref(),
        Some("custom")
    );
}

#[test]
fn destination_rule_export_to_hides_rules_from_the_waypoint() {
    let root = dr("istio-system", "r", "web.example", "root", "");
    let private = dr("apps", "a", "web.example", "apps", "  exportTo: [\".\"]\n");
    assert_eq!(
        dr_sni(&[private, root.clone()], "").as_deref(),
        Some("root")
    );
    let to_infra = dr(
        "apps",
        "a",
        "web.example",
        "apps",
        "  exportTo: [\".\", infra]\n",
    );
    assert_eq!(
        dr_sni(&[to_infra, root.clone()], "").as_deref(),
        Some("apps")
    );
    let to_other = dr("apps", "a", "web.example", "apps", "  exportTo: [team]\n");
    assert_eq!(dr_sni(&[to_other, root], "").as_deref(), Some("root"));
    // A private root rule is for proxies in the root namespace only.
    let root_private = dr(
        "istio-system",
        "r",
        "web.example",
        "root",
        "  exportTo: [\".\"]\n",
    );
    assert_eq!(dr_sni(&[root_private], ""), None);
    // MeshConfig defaultDestinationRuleExportTo "." makes rules without
    // exportTo private.
    assert_eq!(
        dr_sni(
            &[dr("apps", "a", "web.example", "apps", "")],
            "defaultDestinationRuleExportTo: [\".\"]\n"
        ),
        None
    );
}

#[test]
fn within_a_namespace_the_most_specific_destination_rule_host_wins() {
    let exact = dr("apps", "e", "web.example", "exact", "");
    let short = dr("apps", "s", "*", "star", "");
    let long = dr("apps", "l", "*.example", "suffix", "");
    assert_eq!(
        dr_sni(&[short.clone(), long.clone(), exact], "").as_deref(),
        Some("exact")
    );
    assert_eq!(dr_sni(&[short, long], "").as_deref(), Some("suffix"));
}

#[test]
fn service_entry_subject_alt_names_verify_the_upstream_when_the_rule_names_none() {
    let web = se(
        "apps",
        "web",
        "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
    )
    .replace(
        "  resolution: DNS\n",
        "  resolution: DNS\n  subjectAltNames: [web.example]\n",
    );
    let cfg = load(&[
        ("gw.yaml", GW),
        ("se.yaml", &web),
        ("dr.yaml", &dr("apps", "a", "web.example", "x", "")),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert_eq!(
        svc.tls_for("web.example", 80).unwrap().subject_alt_names,
        ["web.example"]
    );
    // Without origination the entry's SANs cannot be checked: a warning.
    let cfg = load(&[("gw.yaml", GW), ("se.yaml", &web)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    assert!(m
        .warnings()
        .any(|w| w.field.as_deref() == Some("spec.subjectAltNames")));
}

#[test]
fn tls_origination_for_a_service_without_waypoint_is_a_warning_not_silence() {
    let cfg = load(&[
        ("se.yaml", &se("apps", "web", "")),
        ("dr.yaml", &dr("apps", "a", "web.example", "x", "")),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert!(svc.tls_for("web.example", 80).is_none());
    let w = m
        .warnings()
        .find(|w| w.kind == Kind::DestinationRule)
        .expect("a DestinationRule warning");
    assert_eq!(w.field.as_deref(), Some("spec.trafficPolicy.tls"));
    assert!(w.to_string().contains("no waypoint"), "{w}");
}

#[test]
fn service_entry_export_to_decides_who_sees_its_hosts() {
    let a = se("apps", "web", "").replace(
        "  resolution: DNS\n",
        "  resolution: DNS\n  exportTo: [\".\", team]\n",
    );
    let cfg = load(&[("a.yaml", &a)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert!(svc.export_to.visible_to("apps") && svc.export_to.visible_to("team"));
    assert!(!svc.export_to.visible_to("default"));
    assert_eq!(m.host("web.example").unwrap().export_to, svc.export_to);
    // The MeshConfig default applies to entries without exportTo.
    let cfg = load(&[
        ("a.yaml", &se("apps", "web", "")),
        ("mesh.yaml", "defaultServiceExportTo: [\".\"]\n"),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert!(svc.export_to.visible_to("apps") && !svc.export_to.visible_to("team"));
}

#[test]
fn workload_selector_takes_endpoints_from_matching_workload_entries_of_the_namespace() {
    let se_sel = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: apps}\nspec:\n  hosts: [db.example]\n  addresses: [10.9.0.1]\n  ports: [{number: 5432, name: pg, targetPort: 5433}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: db}}\n---\n";
    let we = |ns: &str, name: &str, ip: &str, app: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  address: {ip}\n  labels: {{app: {app}}}\n  ports: {{pg: 6000}}\n---\n")
    };
    let cfg = load(&[
        ("se.yaml", se_sel),
        ("we1.yaml", &we("apps", "db-1", "10.1.0.1", "db")),
        ("we2.yaml", &we("apps", "web-1", "10.1.0.2", "web")),
        ("we3.yaml", &we("other", "db-2", "10.1.0.3", "db")),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "db")).unwrap();
    // Only apps/db-1, at its named port (ports[pg] over targetPort).
    assert_eq!(
        svc.destination("db.example", svc.port(5432).unwrap()),
        Ok(Destination::Static(vec![at("10.1.0.1:6000")]))
    );
    // Selecting nothing: no endpoints (connections fail), not a broken config.
    let cfg = load(&[("se.yaml", se_sel)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "db")).unwrap();
    assert_eq!(
        svc.destination("db.example", svc.port(5432).unwrap()),
        Ok(Destination::Static(vec![]))
    );
}

#[test]
fn a_waypoint_without_spec_addresses_is_reached_at_its_status_address() {
    let gw = GW
        .replace("  addresses: [{value: 10.0.0.9}]\n", "")
        .replace(
            "---\n",
            "status:\n  addresses: [{type: IPAddress, value: 10.0.0.42}]\n---\n",
        );
    let web = se(
        "apps",
        "web",
        "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
    );
    let cfg = load(&[("gw.yaml", &gw), ("se.yaml", &web)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("apps", "web")).unwrap();
    assert_eq!(svc.waypoint.waypoint().unwrap().addr, at("10.0.0.42:15008"));
}

#[test]
fn fields_accepted_but_not_honoured_are_warnings_naming_them() {
    let se_x = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x, namespace: apps}\nspec:\n  hosts: [x.example]\n  location: MESH_INTERNAL\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1, locality: us-east1, weight: 3, network: n1}]\n---\n";
    let dr_x = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: x, namespace: apps}\nspec:\n  host: x.example\n  trafficPolicy:\n    loadBalancer: {simple: ROUND_ROBIN}\n    connectionPool: {tcp: {maxConnections: 1}}\n    outlierDetection: {consecutive5xxErrors: 1}\n  subsets: [{name: v1, labels: {version: v1}}]\n---\n";
    let gw_x = GW.replace(
        "listeners: [{name: mesh, port: 15008, protocol: HBONE}]",
        "listeners: [{name: mesh, port: 15008, protocol: HBONE, allowedRoutes: {namespaces: {from: All}}}]",
    );
    let cfg = load(&[("se.yaml", se_x), ("dr.yaml", dr_x), ("gw.yaml", &gw_x)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let fields: Vec<(Kind, &str)> = m
        .warnings()
        .filter_map(|w| w.field.as_deref().map(|f| (w.kind, f)))
        .collect();
    for want in [
        (Kind::ServiceEntry, "spec.location"),
        (Kind::ServiceEntry, "spec.endpoints[0].locality"),
        (Kind::ServiceEntry, "spec.endpoints[0].weight"),
        (Kind::ServiceEntry, "spec.endpoints[0].network"),
        (Kind::DestinationRule, "spec.subsets"),
        (Kind::DestinationRule, "spec.trafficPolicy.loadBalancer"),
        (Kind::DestinationRule, "spec.trafficPolicy.connectionPool"),
        (Kind::DestinationRule, "spec.trafficPolicy.outlierDetection"),
        (Kind::Gateway, "spec.listeners[0].allowedRoutes"),
    ] {
        assert!(
            fields.contains(&want),
            "no warning for {want:?} in {fields:?}"
        );
    }
}

#[test]
fn waypoint_binding_follows_labels_and_names_the_reason_when_it_cannot_bind() {
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}\n---\n\
              apiVersion: v1\nkind: Namespace\nmetadata:\n  name: infra\n---\n\
              apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n---\n";
    let gw_noaddr = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: noaddr, namespace: infra}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n\
                     apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: infra}\nspec:\n  gatewayClassName: istio\n  addresses: [{value: 10.0.0.7}]\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n---\n\
                     apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wl\n  namespace: infra\n  labels: {istio.io/waypoint-for: workload}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.8}]\n  listeners: [{name: mesh, port: 15009, protocol: HBONE}]\n---\n";
    let ses = [
        se("infra", "by-label", "istio.io/use-waypoint: wp"),
        se("apps", "by-namespace", ""),
        se(
            "plain",
            "cross",
            "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
        ),
        se("plain", "missing", "istio.io/use-waypoint: nope"),
        se("plain", "unbound", ""),
        se("apps", "opt-out", "istio.io/use-waypoint: none"),
        se("infra", "no-address", "istio.io/use-waypoint: noaddr"),
        se("infra", "not-waypoint", "istio.io/use-waypoint: ingress"),
        se("infra", "workload-only", "istio.io/use-waypoint: wl"),
    ]
    .concat();
    let cfg = load(&[
        ("a.yaml", ns),
        ("b.yaml", GW),
        ("c.yaml", gw_noaddr),
        ("d.yaml", &ses),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let ok = |ns: &str, n: &str| {
        let (s, r, msg) = bound(&m, ns, n);
        assert_eq!(
            (s.as_str(), r.as_str()),
            ("True", "WaypointAccepted"),
            "{ns}/{n}: {msg}"
        );
        assert_eq!(msg, "Successfully attached to waypoint infra/wp");
        let svc = m.service_by_key(&ObjectKey::new(ns, n)).unwrap();
        assert_eq!(svc.waypoint.waypoint().unwrap().addr, at("10.0.0.9:15008"));
    };
    ok("infra", "by-label");
    ok("apps", "by-namespace");
    ok("plain", "cross");
    let reason = |ns: &str, n: &str| {
        let (s, r, msg) = bound(&m, ns, n);
        assert_eq!(s, "False", "{msg}");
        (r, msg)
    };
    assert_eq!(
        reason("plain", "missing"),
        (
            "WaypointNotFound".into(),
            "waypoint plain/nope (from the ServiceEntry label) not found".into()
        )
    );
    assert_eq!(reason("plain", "unbound").0, "NotBound");
    assert_eq!(reason("apps", "opt-out").0, "NotBound");
    assert_eq!(reason("infra", "no-address").0, "MissingAddress");
    assert_eq!(reason("infra", "not-waypoint").0, "WaypointNotFound");
    assert_eq!(reason("infra", "workload-only").0, "UnsupportedTrafficType");
    // Asked for a waypoint and cannot have it: refused, never direct.
    let binding = |ns: &str, n: &str| {
        m.service_by_key(&ObjectKey::new(ns, n))
            .unwrap()
            .waypoint
            .clone()
    };
    for (ns, n) in [
        ("plain", "missing"),
        ("infra", "no-address"),
        ("infra", "not-waypoint"),
        ("infra", "workload-only"),
    ] {
        let b = binding(ns, n);
        assert!(matches!(b, WaypointBinding::Refused(_)), "{ns}/{n}: {b:?}");
        assert!(b.required());
    }
    assert_eq!(binding("plain", "unbound"), WaypointBinding::None);
    assert_eq!(binding("apps", "opt-out"), WaypointBinding::None);
    // 9 entries x 2 VIPs x 2 TCP ports.
    assert_eq!(m.vip_ports().count(), 36);
    let wp = ObjectKey::new("infra", "wp");
    assert_eq!(m.bound_to(&wp).count(), 3);
}

#[test]
fn a_waypoint_without_a_valid_identity_refuses_instead_of_connecting_directly() {
    // A trust domain that cannot form a SPIFFE id: the binding must not
    // degrade to "no waypoint" (which would connect the pod directly).
    let cfg = load(&[
        ("a.yaml", GW),
        ("b.yaml", &se("infra", "svc", "istio.io/use-waypoint: wp")),
        ("mesh.yaml", "trustDomain: \"bad domain\"\n"),
    ]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let svc = m.service_by_key(&ObjectKey::new("infra", "svc")).unwrap();
    match &svc.waypoint {
        WaypointBinding::Refused(u) => assert_eq!(u.reason, "InvalidIdentity"),
        other => panic!("expected a refused binding, got {other:?}"),
    }
    assert!(svc.waypoint.required());
    assert_eq!(bound(&m, "infra", "svc").1, "InvalidIdentity");
}

#[test]
fn explicit_addresses_are_vips_of_the_first_host_and_ids_are_stable_across_reloads() {
    let explicit = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: ns}\nspec:\n  hosts: [db.example]\n  addresses: [10.1.2.3, 10.5.0.0/16, 'fd00::5/128']\n  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n---\n";
    let state = tempfile::tempdir().unwrap();
    let mut al = Allocator::open(state.path()).unwrap();
    let c1 = load(&[("a.yaml", explicit), ("b.yaml", &se("ns", "web", ""))]);
    let m1 = Model::build(c1.clone(), al.allocate(&c1).unwrap(), &NoCgroups);
    let db: Vec<_> = m1
        .vip_ports()
        .filter(|(a, _)| a.port() == 5432)
        .map(|(a, s)| (a.ip(), s.host_of(a.ip()).unwrap().to_string()))
        .collect();
    assert_eq!(
        db,
        [
            (
                "10.1.2.3".parse::<IpAddr>().unwrap(),
                "db.example".to_string()
            ),
            ("fd00::5".parse().unwrap(), "db.example".to_string())
        ],
        "single IPs only, CIDRs are not VIPs"
    );
    assert!(m1.status[&ObjectKey::new("ns", "db")].addresses.is_empty());
    let db_svc = m1.service_by_key(&ObjectKey::new("ns", "db")).unwrap();
    assert_eq!(
        db_svc.destination("db.example", db_svc.port(5432).unwrap()),
        Ok(Destination::Original)
    );

    // Edit: add an entry before the others and change `web`'s ports; the
    // ids of the unchanged entries stay.
    let c2 = load(&[
        ("0.yaml", &se("ns", "new", "")),
        ("a.yaml", explicit),
        (
            "b.yaml",
            &se("ns", "web", "").replace("number: 443", "number: 8443"),
        ),
    ]);
    let m2 = Model::build(c2.clone(), al.allocate(&c2).unwrap(), &NoCgroups);
    let ids = |m: &Model| {
        m.services()
            .map(|s| (s.key.clone(), s.id))
            .collect::<BTreeMap<_, _>>()
    };
    let (i1, i2) = (ids(&m1), ids(&m2));
    for k in i1.keys() {
        assert_eq!(i1[k], i2[k], "{k}");
    }
    let web_vip = |m: &Model| {
        m.vip_ports()
            .find(|(a, s)| a.port() == 80 && s.name() == "web")
            .unwrap()
            .0
    };
    assert_eq!(web_vip(&m1), web_vip(&m2));
    // After a restart too.
    let a3 = Allocator::open(state.path())
        .unwrap()
        .allocate(&c2)
        .unwrap()
        .clone();
    assert_eq!(ids(&Model::build(c2, &a3, &NoCgroups)), i2);
}

#[test]
fn an_older_entry_keeps_a_shared_vip_port_and_the_newer_one_is_warned() {
    let a = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a, namespace: ns, creationTimestamp: '2024-01-01T00:00:00Z'}\nspec:\n  hosts: [a.example]\n  addresses: [10.9.9.9]\n  ports: [{number: 80, name: http}]\n  resolution: STATIC\n  endpoints: [{address: 10.0.0.1}]\n---\n";
    let b = a
        .replace("name: a,", "name: b,")
        .replace("a.example", "b.example")
        .replace("2024-01-01", "2025-01-01");
    let cfg = load(&[("0.yaml", &b), ("1.yaml", a)]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    assert_eq!(m.service_at(at("10.9.9.9:80")).unwrap().name(), "a");
    assert!(m.warnings().any(|w| w.kind == Kind::ServiceEntry
        && w.object == ObjectKey::new("ns", "b")
        && w.message
            .contains("already belongs to an older ServiceEntry")));
    let svc = m.service_at(at("10.9.9.9:80")).unwrap();
    assert_eq!(
        svc.destination("a.example", svc.port(80).unwrap()),
        Ok(Destination::Static(vec![at("10.0.0.1:80")]))
    );
}

#[test]
fn enrollment_only_in_ambient_namespaces_and_never_waypoints() {
    let files = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels: {istio.io/dataplane-mode: ambient}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: a\n  namespace: amb\n  annotations: {shunt.io/cgroup: a}\nspec: {address: 10.0.0.1}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: b\n  namespace: other\n  annotations: {shunt.io/cgroup: b}\nspec: {address: 10.0.0.2, serviceAccount: bee}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: wp\n  namespace: amb\n  annotations: {shunt.io/cgroup: wp}\n  labels: {gateway.networking.k8s.io/gateway-name: wp}\nspec: {address: 10.0.0.3}\n---\n\
        apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: amb}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n\
        shunt: {dnsCapture: false}\n";
    let (objs, mesh) = files.rsplit_once("---\n").unwrap();
    let cfg = load(&[("a.yaml", objs), ("mesh.yaml", mesh)]);
    // A real resolver against a real directory tree.
    let root = tempfile::tempdir().unwrap();
    for n in ["a", "b", "wp"] {
        std::fs::create_dir(root.path().join(n)).unwrap();
    }
    let (m, _) = model_of(
        &cfg,
        &CgroupDir {
            root: root.path().to_path_buf(),
        },
    );
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(root.path().join("a")).unwrap().ino();
    let enrolled: Vec<_> = m
        .enrolled()
        .map(|(c, w)| (c, w.name().to_string()))
        .collect();
    assert_eq!(enrolled, [(ino, "a".to_string())]);
    assert!(!m.mesh.dns_capture);
    let a = m.workload_by_addr("10.0.0.1".parse().unwrap()).unwrap();
    assert_eq!(
        (a.service_account.as_str(), a.cgroup),
        ("default", Some(ino))
    );
    let b = m.workload_by_addr("10.0.0.2".parse().unwrap()).unwrap();
    assert_eq!(b.identity.uri(), "spiffe://cluster.local/ns/other/sa/bee");
    assert_eq!(b.cgroup, None);
}

#[test]
fn a_pod_label_overrides_its_namespace_and_every_listed_cgroup_is_enrolled() {
    let files = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels: {istio.io/dataplane-mode: ambient}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: in\n  namespace: plain\n  labels: {istio.io/dataplane-mode: ambient}\n  annotations: {shunt.io/cgroup: 'p/c1,p/c2'}\nspec: {address: 10.0.0.1}\n---\n\
        apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: out\n  namespace: amb\n  labels: {istio.io/dataplane-mode: none}\n  annotations: {shunt.io/cgroup: q}\nspec: {address: 10.0.0.2}\n";
    let cfg = load(&[("a.yaml", files)]);
    let root = tempfile::tempdir().unwrap();
    for n in ["p/c1", "p/c2", "q"] {
        std::fs::create_dir_all(root.path().join(n)).unwrap();
    }
    let (m, _) = model_of(
        &cfg,
        &CgroupDir {
            root: root.path().to_path_buf(),
        },
    );
    use std::os::unix::fs::MetadataExt;
    let ino = |n: &str| std::fs::metadata(root.path().join(n)).unwrap().ino();
    let mut want = [ino("p/c1"), ino("p/c2")];
    want.sort();
    let enrolled: Vec<_> = m
        .enrolled()
        .map(|(c, w)| (c, w.name().to_string()))
        .collect();
    assert_eq!(
        enrolled,
        want.iter()
            .map(|c| (*c, "in".to_string()))
            .collect::<Vec<_>>(),
        "one workload for both containers; `none` on the pod opts out"
    );
}

#[test]
fn the_root_namespace_comes_from_mesh_config() {
    let cfg = load(&[("mesh.yaml", "rootNamespace: mesh-root\n")]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    assert_eq!(m.mesh.root_namespace, "mesh-root");
}

#[test]
fn ports_record_whether_their_protocol_was_declared() {
    let cfg = load(&[(
        "a.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: s, namespace: ns}\nspec:\n  hosts: [s.example]\n  ports: [{number: 80, name: http}, {number: 81, name: x, protocol: TCP}]\n  resolution: DNS\n",
    )]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let s = m.service_by_key(&ObjectKey::new("ns", "s")).unwrap();
    let p80 = s.port(80).unwrap();
    assert_eq!((p80.protocol, p80.declared), (Protocol::Http, false));
    assert!(s.port(81).unwrap().declared);
    assert_eq!(
        s.destination("s.example", p80),
        Ok(Destination::Dns(vec![("s.example".into(), 80)]))
    );
}

#[test]
fn status_clock_keeps_times_until_the_condition_changes() {
    let cfg = Arc::new(Config::load_dir(&seed_dir()).unwrap());
    let state = tempfile::tempdir().unwrap();
    let alloc = Allocator::open(state.path())
        .unwrap()
        .allocate(&cfg)
        .unwrap()
        .clone();
    let mut st = Model::build(cfg.clone(), &alloc, &NoCgroups).status;
    let mut clock = StatusClock::default();
    assert!(clock.stamp(&mut st, "2024-10-27T00:45:08.374915129Z"));
    clock.save(state.path()).unwrap();
    let mut again = Model::build(cfg, &alloc, &NoCgroups).status;
    let mut clock = StatusClock::load(state.path());
    assert!(!clock.stamp(&mut again, "2030-01-01T00:00:00Z"));
    let k = ObjectKey::new("common-infrastructure", "httpbin.org");
    assert_eq!(
        again[&k].conditions[0].last_transition_time.as_deref(),
        Some("2024-10-27T00:45:08.374915129Z")
    );
    // A status that already carries its times (a reused service's) is left
    // shared with the model it came from, not copied.
    let mut reused = again.clone();
    assert!(!clock.stamp(&mut reused, "2031-01-01T00:00:00Z"));
    assert!(reused
        .iter()
        .all(|(k, s)| std::sync::Arc::ptr_eq(s, &again[k])));
    // Unbinding changes the condition, so the time moves.
    let mut changed = again.clone();
    let st = std::sync::Arc::make_mut(changed.get_mut(&k).unwrap());
    std::sync::Arc::make_mut(&mut st.conditions)[0].status = "False".into();
    assert!(clock.stamp(&mut changed, "2030-01-01T00:00:00Z"));
    assert_eq!(
        changed[&k].conditions[0].last_transition_time.as_deref(),
        Some("2030-01-01T00:00:00Z")
    );
    assert!(now_rfc3339().ends_with('Z'));
}

fn wildcard_se(name: &str, host: &str, labels: &str) -> String {
    format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: infra\n  labels: {{{labels}}}\nspec:\n  hosts: ['{host}']\n  ports: [{{number: 80, name: http, protocol: HTTP}}, {{number: 443, name: tls, protocol: TLS}}]\n  resolution: DYNAMIC_DNS\n---\n")
}

#[test]
fn a_bound_dynamic_dns_wildcard_gets_vips_and_answers_names_below_it_after_exact_hosts() {
    let wp = "istio.io/use-waypoint: wp";
    let cfg = load(&[(
        "a.yaml",
        &format!(
            "{GW}{}{}{}",
            wildcard_se("wild", "*.example.com", wp),
            wildcard_se("wild-eu", "*.eu.example.com", wp),
            se("infra", "exact", wp).replace("exact.example", "exact.example.com"),
        ),
    )]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    let wild = m.service_by_key(&ObjectKey::new("infra", "wild")).unwrap();
    assert_eq!(wild.vips.len(), 2, "one IPv4 and one IPv6 VIP");
    assert!(wild
        .vips
        .iter()
        .all(|v| wild.vip_host(v) == "*.example.com"));
    assert_eq!(
        wild.destination("*.example.com", wild.port(443).unwrap()),
        Ok(Destination::Dynamic)
    );
    let id = |n: &str| {
        m.host(n)
            .map(|r| m.service(r.service).unwrap().name().to_string())
    };
    assert_eq!(id("a.example.com").as_deref(), Some("wild"));
    assert_eq!(id("A.B.example.com").as_deref(), Some("wild"));
    assert_eq!(id("x.eu.example.com").as_deref(), Some("wild-eu"));
    assert_eq!(id("exact.example.com").as_deref(), Some("exact"));
    assert_eq!(id("example.com"), None);
    // Its VIP:ports are steered like any other.
    let v4 = wild.vips.iter().find(|v| v.ip.is_ipv4()).unwrap().ip;
    assert_eq!(
        m.service_at(SocketAddr::new(v4, 443)).unwrap().name(),
        "wild"
    );
}

#[test]
fn a_dynamic_dns_wildcard_without_a_waypoint_is_not_programmed() {
    let cfg = load(&[(
        "a.yaml",
        &format!("{GW}{}", wildcard_se("wild", "*.example.com", "")),
    )]);
    let (m, _) = model_of(&cfg, &NoCgroups);
    assert!(m.host("a.example.com").is_none());
    assert_eq!(m.vip_ports().count(), 0);
    assert!(
        m.warnings().any(|w| w
            .message
            .contains("does not apply until the entry is bound to a waypoint")),
        "{:?}",
        m.warnings().collect::<Vec<_>>()
    );
}

/// `build_from` must decide exactly like a fresh build: an edit of one
/// entry, an entry added before the others (it takes a VIP:port an older
/// entry keeps), a removal, and unchanged entries in the edited file and
/// in untouched files. The unchanged ones must really be reused, or this
/// test would only compare two fresh builds.
#[test]
fn a_model_built_from_the_previous_one_equals_a_fresh_build_and_reuses_unchanged_services() {
    let snap = |files: &[(&str, String)]| {
        Arc::new(crate::config::Snapshot::new(
            files
                .iter()
                .map(|(n, t)| (std::path::PathBuf::from(n), t.as_bytes().to_vec()))
                .collect(),
        ))
    };
    let explicit = |name: &str, created: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns, creationTimestamp: '{created}T00:00:00Z'}}\nspec:\n  hosts: [{name}.example]\n  addresses: [10.9.9.9]\n  ports: [{{number: 80, name: http}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.0.1}}]\n---\n")
    };
    let v1 = [
        (
            "a.yaml",
            format!(
                "{GW}{}{}",
                se("infra", "bound", "istio.io/use-waypoint: wp"),
                se("ns", "web", "")
            ),
        ),
        ("b.yaml", se("ns", "keep", "") + &se("ns", "gone", "")),
        ("c.yaml", explicit("old", "2024-01-01")),
    ];
    let v2 = [
        (
            "a.yaml",
            format!(
                "{GW}{}{}",
                se("infra", "bound", "istio.io/use-waypoint: wp"),
                se("ns", "web", "").replace("number: 443", "number: 8443")
            ),
        ),
        ("b.yaml", se("ns", "keep", "")),
        ("c.yaml", explicit("old", "2024-01-01")),
        (
            "d.yaml",
            explicit("young", "2025-01-01") + &se("ns", "added", ""),
        ),
    ];
    let state = tempfile::tempdir().unwrap();
    let mut al = Allocator::open(state.path()).unwrap();
    let mut parser = crate::config::Parser::default();
    let c1 = Arc::new(parser.parse(snap(&v1)).unwrap());
    let m1 = Model::build(c1.clone(), al.allocate(&c1).unwrap(), &NoCgroups);
    let c2 = Arc::new(parser.parse(snap(&v2)).unwrap());
    let a2 = al.allocate(&c2).unwrap().clone();
    let reused = Model::build_from(c2.clone(), &a2, &NoCgroups, Some(&m1));
    let fresh = Model::build(c2, &a2, &NoCgroups);

    let services = |m: &Model| {
        m.services()
            .map(|s| (s.key.clone(), (**s).clone()))
            .collect::<BTreeMap<_, _>>()
    };
    assert_eq!(services(&reused), services(&fresh));
    assert_eq!(reused.status, fresh.status);
    let vip_ports = |m: &Model| {
        m.vip_ports()
            .map(|(a, s)| (a, s.key.clone()))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(vip_ports(&reused), vip_ports(&fresh));
    let hosts = |m: &Model| {
        m.hosts()
            .map(|(h, r)| format!("{h} {r:?}"))
            .collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(hosts(&reused), hosts(&fresh));
    assert!(reused.warnings().eq(fresh.warnings()));
    assert_eq!(reused.service_at(at("10.9.9.9:80")).unwrap().name(), "old");
    assert_eq!(
        bound(&reused, "infra", "bound"),
        bound(&fresh, "infra", "bound")
    );

    let same = |ns: &str, name: &str| {
        let k = ObjectKey::new(ns, name);
        Arc::ptr_eq(
            m1.service_by_key(&k).unwrap(),
            reused.service_by_key(&k).unwrap(),
        )
    };
    assert!(
        same("ns", "keep"),
        "an unchanged entry in an edited file is reused"
    );
    assert!(same("ns", "old"), "an entry of an untouched file is reused");
    assert!(!same("ns", "web"), "the edited entry is rebuilt");
    assert!(reused
        .service_by_key(&ObjectKey::new("ns", "gone"))
        .is_none());
}

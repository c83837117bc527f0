use super::*;

fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A temp dir with the given files.
pub(crate) fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

#[test]
fn bad_inputs_golden() {
    // Relative path: error texts name files as the directory was given.
    let err = Config::load_dir(Path::new("tests/fixtures/config/bad")).unwrap_err();
    let got = err.to_string();
    let want = std::fs::read_to_string("tests/fixtures/config/bad/expected-errors.txt")
        .unwrap_or_default();
    assert_eq!(got.trim_end(), want.trim_end(), "\n--- got ---\n{got}\n");
}

fn copy_into(d: &Path, files: &[&str]) {
    for f in files {
        let src = manifest(&format!("../examples/egress/{f}"));
        let name = Path::new(f).file_name().unwrap();
        std::fs::copy(&src, d.join(name)).unwrap();
    }
}

#[test]
fn seed_examples_parse() {
    let cfg = Config::load_dir(&manifest("../examples/egress")).unwrap();
    let ns = cfg.namespace("common-infrastructure").unwrap();
    assert_eq!(ns.label(labels::DATAPLANE_MODE), Some("ambient"));
    assert!(cfg.namespace_is_ambient("default"));
    assert_eq!(cfg.service_entries.len(), 1);
    let se = &cfg.service_entries[0];
    assert_eq!(
        se.key(),
        ObjectKey::new("common-infrastructure", "httpbin.org")
    );
    assert_eq!(&se.spec.hosts[..], ["httpbin.org"]);
    assert_eq!(se.spec.resolution(), Resolution::Dns);
    assert_eq!(se.spec.ports[0].number, Port(80));
    assert_eq!(se.spec.ports[0].protocol(), Protocol::Http);
    assert_eq!(se.spec.ports[0].target_port(), 80);
    assert_eq!(
        cfg.waypoint_ref(se),
        WaypointRef::Gateway {
            gateway: ObjectKey::new("common-infrastructure", "egress-gateway"),
            from_namespace_label: true
        }
    );
    let gw = cfg
        .gateway(&ObjectKey::new("common-infrastructure", "egress-gateway"))
        .unwrap();
    assert!(gw.spec.is_waypoint());
    assert_eq!(gw.label(labels::WAYPOINT_FOR), Some("service"));
    assert_eq!(gw.spec.hbone_port(), 15008);
    assert_eq!(gw.spec.address(), Some("10.244.1.18".parse().unwrap()));
    let ap = &cfg.authorization_policies[0];
    assert_eq!(ap.spec.action.as_deref(), Some("ALLOW"));
    assert_eq!(ap.spec.target_refs[0].kind, "ServiceEntry");
    assert_eq!(ap.spec.target_refs[0].name, "httpbin.org");
    let rules = ap.spec.rules.as_ref().unwrap();
    assert_eq!(
        rules[0].from[0].source.principals,
        vec!["cluster.local/ns/default/sa/admin"]
    );
    assert_eq!(rules[1].to[0].operation.paths, vec!["/get"]);
    assert_eq!(cfg.workload_entries.len(), 2);
    let curl = &cfg.workload_entries[0];
    assert_eq!(curl.spec.service_account(), "curl");
    assert_eq!(
        curl.metadata.annotations[labels::CGROUP_ANNOTATION],
        "shunt/curl"
    );
    assert_eq!(cfg.trust_domain(), "cluster.local");
    assert_eq!(
        cfg.mesh.outbound_traffic_policy.mode,
        OutboundMode::AllowAny
    );
    assert!(cfg.mesh.shunt.dns_capture);
}

#[test]
fn seed_tls_origination_step_parses() {
    let d = tempfile::tempdir().unwrap();
    copy_into(
        d.path(),
        &[
            "01-namespace.yaml",
            "02-waypoint.yaml",
            "04-authorizationpolicy.yaml",
            "tls-origination/03-serviceentry.yaml",
        ],
    );
    let cfg = Config::load_dir(d.path()).unwrap();
    let se = &cfg.service_entries[0];
    assert_eq!(se.spec.ports[0].target_port(), 443);
    let dr = &cfg.destination_rules[0];
    assert_eq!(dr.spec.host, "httpbin.org");
    let tls = dr
        .spec
        .traffic_policy
        .as_ref()
        .unwrap()
        .tls
        .as_ref()
        .unwrap();
    assert_eq!(tls.mode, TlsMode::Simple);
    assert_eq!(tls.sni, None);
}

#[test]
fn seed_both_serviceentry_steps_together_are_a_duplicate() {
    let d = tempfile::tempdir().unwrap();
    copy_into(d.path(), &["03-serviceentry.yaml"]);
    std::fs::copy(
        manifest("../examples/egress/tls-origination/03-serviceentry.yaml"),
        d.path().join("05-tls.yaml"),
    )
    .unwrap();
    let err = Config::load_dir(d.path()).unwrap_err();
    assert_eq!(err.problems().len(), 1);
    let p = &err.problems()[0];
    assert_eq!(p.doc, Some(1));
    assert_eq!(p.field.as_deref(), Some("metadata.name"));
    assert!(p.file.ends_with("05-tls.yaml"), "{p}");
    assert!(p.message.starts_with("duplicate ServiceEntry"), "{p}");
}

#[test]
fn istio_documented_examples_parse() {
    let cfg = Config::load_dir(Path::new("tests/fixtures/config/istio-docs")).unwrap();
    let se = |n: &str| cfg.service_entries.iter().find(|s| s.name() == n).unwrap();
    let mongo = se("external-svc-mongocluster");
    assert_eq!(mongo.namespace(), "default");
    assert_eq!(mongo.spec.resolution(), Resolution::Static);
    assert_eq!(mongo.spec.location, Some(Location::MeshInternal));
    assert_eq!(&mongo.spec.addresses[..], ["192.192.192.192/24"]);
    assert_eq!(mongo.spec.ports[0].protocol(), Protocol::Mongo);
    assert_eq!(mongo.spec.endpoints.len(), 2);
    let dns = se("external-svc-dns");
    assert_eq!(dns.spec.endpoints[1].address, "uk.foo.bar.com");
    assert_eq!(dns.spec.endpoints[1].ports["http"], Port(9080));
    assert_eq!(se("external-svc-https").spec.hosts.len(), 3);
    assert_eq!(
        se("external-svc-https").spec.ports[0].protocol(),
        Protocol::Tls
    );
    assert_eq!(
        se("external-svc-wildcard-example").spec.resolution(),
        Resolution::None
    );
    // Protocol inferred from the port name like Istio.
    assert_eq!(se("explicit-vip").spec.ports[0].protocol(), Protocol::Tcp);

    let dr = |n: &str| {
        cfg.destination_rules
            .iter()
            .find(|d| d.name() == n)
            .unwrap()
    };
    let m = dr("db-mtls")
        .spec
        .traffic_policy
        .clone()
        .unwrap()
        .tls
        .unwrap();
    assert_eq!(m.mode, TlsMode::Mutual);
    assert_eq!(
        m.client_certificate.as_deref(),
        Some("/etc/certs/myclientcert.pem")
    );
    assert_eq!(
        m.private_key.as_deref(),
        Some("/etc/certs/client_private_key.pem")
    );
    assert_eq!(
        m.ca_certificates.as_deref(),
        Some("/etc/certs/rootcacerts.pem")
    );
    assert_eq!(dr("tls-foo").spec.host, "*.foo.com");
    let pl = &dr("ratings-port")
        .spec
        .traffic_policy
        .clone()
        .unwrap()
        .port_level_settings;
    let t = pl[1].tls.as_ref().unwrap();
    assert_eq!(pl[1].port.as_ref().unwrap().number, Port(443));
    assert_eq!(
        t.sni.as_deref(),
        Some("my-nginx.mesh-external.svc.cluster.local")
    );
    assert_eq!(t.insecure_skip_verify, Some(false));
    assert_eq!(dr("bookinfo-ratings").spec.subsets[0].name, "v1");

    let ap = |n: &str| {
        cfg.authorization_policies
            .iter()
            .find(|d| d.name() == n)
            .unwrap()
    };
    assert_eq!(ap("allow-get").spec.target_refs[0].kind, "ServiceEntry");
    assert_eq!(ap("deny-post").spec.action.as_deref(), Some("DENY"));
    assert_eq!(ap("deny-post").spec.target_refs[0].kind, "Gateway");
    assert_eq!(ap("allow-nothing").spec.rules, None);
}

#[test]
fn unknown_kinds_are_ignored_and_counted() {
    let d = dir_with(&[(
        "a.yaml",
        "apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: a}\n---\n\
         apiVersion: example.com/v1\nkind: Widget\nmetadata: {name: b}\n---\n\
         apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: c}\n---\n",
    )]);
    let cfg = Config::load_dir(d.path()).unwrap();
    assert_eq!(cfg.ignored_kinds.get("Widget.example.com"), Some(&2));
    assert_eq!(cfg.ignored_kinds.get("Deployment.apps"), Some(&1));
}

#[test]
fn only_yaml_files_sorted_and_mesh_file() {
    let d = dir_with(&[
        ("b.yml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: b}\nspec: {hosts: [b.example]}\n"),
        ("a.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a}\nspec: {hosts: [a.example]}\n"),
        ("notes.txt", "not: [yaml"),
        (".swp.yaml", "not: [yaml"),
        ("mesh.yml", "trustDomain: example.org\noutboundTrafficPolicy: {mode: REGISTRY_ONLY}\nshunt: {allowedEgressCIDRs: [10.0.0.0/8, 192.168.1.1]}\ndefaultConfig: {holdApplicationUntilProxyStarts: true}\n"),
    ]);
    let cfg = Config::load_dir(d.path()).unwrap();
    let names: Vec<_> = cfg.service_entries.iter().map(|s| s.name()).collect();
    assert_eq!(names, ["a", "b"]);
    assert_eq!(cfg.trust_domain(), "example.org");
    assert_eq!(
        cfg.mesh.outbound_traffic_policy.mode,
        OutboundMode::RegistryOnly
    );
    assert_eq!(cfg.mesh.shunt.allowed_egress_cidrs.len(), 2);
    assert_eq!(
        cfg.spiffe_id("ns", "sa"),
        "spiffe://example.org/ns/ns/sa/sa"
    );
}

#[test]
fn use_waypoint_none_and_cross_namespace() {
    let d = dir_with(&[(
        "a.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: optout\n  namespace: apps\n  labels: {istio.io/use-waypoint: none}\nspec: {hosts: [\"*.wild.example\"]}\n---\n\
         apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: x, namespace: apps}\nspec: {hosts: [x.example]}\n",
    )]);
    let cfg = Config::load_dir(d.path()).unwrap();
    assert_eq!(
        cfg.waypoint_ref(&cfg.service_entries[0]),
        WaypointRef::Unbound
    );
    assert_eq!(
        cfg.waypoint_ref(&cfg.service_entries[1]),
        WaypointRef::Gateway {
            gateway: ObjectKey::new("infra", "wp"),
            from_namespace_label: true
        }
    );
}

#[test]
fn render_seed_status_yaml_and_table() {
    use render::*;
    let cfg = Config::load_dir(&manifest("../examples/egress")).unwrap();
    let se = &cfg.service_entries[0];
    let st = ServiceEntryStatus {
        addresses: vec![
            StatusAddress {
                host: "httpbin.org".into(),
                value: "240.240.0.1".into(),
            },
            StatusAddress {
                host: "httpbin.org".into(),
                value: "2001:2::1".into(),
            },
        ],
        conditions: [StatusCondition {
            last_transition_time: Some("2024-10-27T00:45:08.374915129Z".into()),
            message: "Successfully attached to waypoint common-infrastructure/egress-gateway"
                .into(),
            reason: "WaypointAccepted".into(),
            status: "True".into(),
            type_: WAYPOINT_BOUND.into(),
        }]
        .into(),
    };
    let y = render_yaml(se, &st);
    let want_status = "status:
  addresses:
  - host: httpbin.org
    value: 240.240.0.1
  - host: httpbin.org
    value: 2001:2::1
  conditions:
  - lastTransitionTime: 2024-10-27T00:45:08.374915129Z
    message: Successfully attached to waypoint common-infrastructure/egress-gateway
    reason: WaypointAccepted
    status: 'True'
    type: istio.io/WaypointBound
";
    assert!(y.ends_with(want_status), "{y}");
    assert!(y.starts_with("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: httpbin.org\n  namespace: common-infrastructure\nspec:\n  hosts:\n  - httpbin.org\n"), "{y}");
    // Round trip: the rendered object is itself valid input.
    let back: serde_yaml_ng::Value = serde_yaml_ng::from_str(&y).unwrap();
    assert_eq!(
        back["spec"]["ports"][0]["number"],
        serde_yaml_ng::Value::from(80)
    );
    let t = render_table(&[TableRow::new(
        se,
        &st,
        Some("common-infrastructure/egress-gateway".into()),
    )]);
    assert_eq!(
        t,
        "NAMESPACE               NAME          HOSTS         ADDRESSES               WAYPOINT                               BOUND\n\
         common-infrastructure   httpbin.org   httpbin.org   240.240.0.1,2001:2::1   common-infrastructure/egress-gateway   True\n"
    );
}

#[tokio::test]
async fn watcher_publishes_valid_and_keeps_previous_on_error() {
    use std::time::Duration;
    let se = |name: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\nspec: {{hosts: [{name}.example], resolution: DNS}}\n")
    };
    let d = dir_with(&[("a.yaml", &se("one"))]);
    let mut w = watch::ConfigWatcher::spawn(d.path().to_path_buf(), Duration::from_millis(20));
    let first = w.current().expect("initial config valid");
    assert_eq!(first.service_entries[0].name(), "one");

    // Valid edit (an added file) is published.
    std::fs::write(d.path().join("b.yaml"), se("two")).unwrap();
    let deadline = Duration::from_secs(20);
    tokio::time::timeout(
        deadline,
        w.config
            .wait_for(|c| c.as_ref().is_some_and(|c| c.service_entries.len() == 2)),
    )
    .await
    .expect("edit seen")
    .unwrap();

    // Broken file: rejected, previous config stays.
    std::fs::write(d.path().join("c.yaml"), "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: bad, namespace: ns}\nspec: {hosts: [x.example], ports: [{number: abc}]}\n").unwrap();
    let mut rej = w.rejected.clone();
    tokio::time::timeout(deadline, rej.wait_for(|r| r.is_some()))
        .await
        .expect("rejection seen")
        .unwrap();
    let msg = w.rejected.borrow().as_ref().unwrap().to_string();
    assert!(
        msg.contains(
            "c.yaml: document 1 (ServiceEntry ns/bad): spec.ports[0].number: invalid value \"abc\""
        ),
        "{msg}"
    );
    assert_eq!(w.current().unwrap().service_entries.len(), 2);

    // Fixing it (here: deleting it and one more) applies the deletion.
    std::fs::remove_file(d.path().join("c.yaml")).unwrap();
    std::fs::remove_file(d.path().join("a.yaml")).unwrap();
    tokio::time::timeout(
        deadline,
        w.config
            .wait_for(|c| c.as_ref().is_some_and(|c| c.service_entries.len() == 1)),
    )
    .await
    .expect("deletion seen")
    .unwrap();
    assert_eq!(w.current().unwrap().service_entries[0].name(), "two");
    assert!(w.rejected.borrow().is_none());
}

/// A directory that cannot be read for a moment (here: moved away; on a
/// node, EMFILE while connections hold every fd) and then reads as before
/// is rejected, then recovered, without publishing the same config again
/// (which would re-apply all of it).
#[tokio::test]
async fn watcher_recovering_from_an_unreadable_directory_does_not_republish() {
    use std::time::Duration;
    let d = dir_with(&[(
        "a.yaml",
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: one, namespace: ns}\nspec: {hosts: [one.example], resolution: DNS}\n",
    )]);
    let cfg_dir = d.path().join("config");
    std::fs::create_dir(&cfg_dir).unwrap();
    std::fs::rename(d.path().join("a.yaml"), cfg_dir.join("a.yaml")).unwrap();
    let mut w = watch::ConfigWatcher::spawn(cfg_dir.clone(), Duration::from_millis(20));
    assert!(w.current().is_some());
    w.config.borrow_and_update();
    let deadline = Duration::from_secs(20);
    let mut rej = w.rejected.clone();
    let away = d.path().join("away");
    std::fs::rename(&cfg_dir, &away).unwrap();
    tokio::time::timeout(deadline, rej.wait_for(|r| r.is_some()))
        .await
        .expect("rejection seen")
        .unwrap();
    std::fs::rename(&away, &cfg_dir).unwrap();
    tokio::time::timeout(deadline, rej.wait_for(|r| r.is_none()))
        .await
        .expect("recovery seen")
        .unwrap();
    // A few more polls: still nothing new to apply.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !w.config.has_changed().unwrap(),
        "the same config was published again"
    );
    assert_eq!(w.current().unwrap().service_entries[0].name(), "one");
}

#[tokio::test]
async fn watcher_starting_invalid_has_no_config_until_fixed() {
    use std::time::Duration;
    let d = dir_with(&[("a.yaml", "kind: [")]);
    let mut w = watch::ConfigWatcher::spawn(d.path().to_path_buf(), Duration::from_millis(20));
    assert!(w.current().is_none());
    assert!(w.rejected.borrow().is_some());
    std::fs::write(
        d.path().join("a.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    )
    .unwrap();
    tokio::time::timeout(Duration::from_secs(20), w.config.wait_for(|c| c.is_some()))
        .await
        .expect("fixed config seen")
        .unwrap();
    assert!(w.current().unwrap().namespace("x").is_some());
}

#[test]
fn istio_accepts_these_and_so_does_shunt() {
    let d = dir_with(&[
        (
            "se.yaml",
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: a, namespace: ns1}\nspec:\n  hosts: [a.example]\n  # unquoted IPv6, as YAML 1.2 and kubectl read them\n  addresses: [::1, '::2', fd00::/8, 2001:db8::10]\n  ports:\n  - {number: 443, name: https-api, protocol: \"\"}\n  - {number: 80, name: tcp, protocol: ''}\n  resolution: DNS\n",
        ),
        (
            "we.yaml",
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: ns1}\nspec: {address: vm1.example.com, serviceAccount: sa}\n",
        ),
        ("mesh.yaml", "pathNormalization: {normalization: MERGE_SLASHES}\n"),
    ]);
    let cfg = Config::load_dir(d.path()).unwrap();
    let se = &cfg.service_entries[0];
    assert_eq!(
        &se.spec.addresses[..],
        ["::1", "::2", "fd00::/8", "2001:db8::10"]
    );
    // protocol "" is unset: inferred from the port name, as Istio does.
    assert_eq!(se.spec.ports[0].protocol, None);
    assert_eq!(se.spec.ports[0].protocol(), Protocol::Https);
    assert_eq!(se.spec.ports[1].protocol(), Protocol::Tcp);
    assert_eq!(cfg.workload_entries[0].spec.address, "vm1.example.com");
    assert_eq!(
        cfg.mesh.path_normalization.normalization,
        PathNormalization::MergeSlashes
    );
    // Istio's default when mesh.yaml says nothing.
    assert_eq!(
        MeshConfig::default().path_normalization.normalization,
        PathNormalization::Base
    );
}

#[test]
fn unsupported_istio_values_are_named_not_called_invalid() {
    let err = |files: &[(&str, &str)]| {
        let d = dir_with(files);
        Config::load_dir(d.path()).unwrap_err().to_string()
    };
    let e = err(&[(
        "dr.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d, namespace: ns1}\nspec:\n  host: a.example\n  workloadSelector: {matchLabels: {app: curl}}\n",
    )]);
    assert!(
        e.contains("DestinationRule ns1/d")
            && e.contains("spec.workloadSelector: not supported by shunt"),
        "{e}"
    );
    // An enrolled workload needs an IP; a bad address is still refused.
    let e = err(&[(
        "we.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: ns1, annotations: {shunt.io/cgroup: x}}\nspec: {address: vm1.example.com}\n",
    )]);
    assert!(
        e.contains("spec.address") && e.contains("needs an IP address"),
        "{e}"
    );
    let e = err(&[(
        "we.yaml",
        "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: vm, namespace: ns1}\nspec: {address: 'not a host'}\n",
    )]);
    assert!(e.contains("expected an IP address or DNS name"), "{e}");
    let e = err(&[("mesh.yaml", "pathNormalization: {normalization: DECODE}\n")]);
    assert!(
        e.contains("pathNormalization.normalization") && e.contains("DECODE_AND_MERGE_SLASHES"),
        "{e}"
    );
}

#[test]
fn ipv6_quoting_touches_only_flow_scalars_starting_with_colons() {
    let q = |t: &str| super::load::quote_flow_ipv6_for_tests(t);
    assert_eq!(q("a: [::1, x]\n").as_deref(), Some("a: [\"::1\", x]\n"));
    assert_eq!(
        q("a: {b: [::ffff:10.0.0.1]}\n").as_deref(),
        Some("a: {b: [\"::ffff:10.0.0.1\"]}\n")
    );
    // Quoted, commented, block context and mid-token colons are left alone.
    assert_eq!(q("a: ['::1', \"::2\"] # [::3]\nb: ::4\nc: [a::b]\n"), None);
    // Non-ASCII text survives.
    assert_eq!(
        q("# caf\u{e9}\na: [::1, \"\u{e9}\"]\n").as_deref(),
        Some("# caf\u{e9}\na: [\"::1\", \"\u{e9}\"]\n")
    );
}

#[test]
fn dynamic_dns_follows_istios_rules() {
    let se = |spec: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: a, namespace: ns1, labels: {{istio.io/use-waypoint: wp}}}}\nspec: {spec}\n")
    };
    let ok = se("{hosts: ['*.example.com'], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: tls, protocol: TLS}]}");
    let d = dir_with(&[("se.yaml", &ok)]);
    let cfg = Config::load_dir(d.path()).unwrap();
    assert_eq!(
        cfg.service_entries[0].spec.resolution(),
        Resolution::DynamicDns
    );
    let err = |spec: &str| {
        let d = dir_with(&[("se.yaml", &se(spec))]);
        Config::load_dir(d.path()).unwrap_err().to_string()
    };
    let cases = [
        ("{hosts: [a.example.com], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}", "spec.hosts[0]", "needs wildcard hosts"),
        ("{hosts: ['*.example.com'], addresses: [10.0.0.1], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}", "spec.addresses", "must be empty"),
        ("{hosts: ['*.example.com'], endpoints: [{address: 10.0.0.1}], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}", "spec.endpoints", "must be empty"),
        ("{hosts: ['*.example.com'], resolution: DYNAMIC_DNS, ports: [{number: 5432, name: tcp, protocol: TCP}]}", "spec.ports[0].protocol", "TCP: resolution DYNAMIC_DNS needs HTTP, HTTP2, GRPC or TLS"),
        ("{hosts: ['*.example.com'], resolution: DYNAMIC_DNS, ports: [{number: 443, name: https, protocol: HTTPS}]}", "spec.ports[0].protocol", "HTTPS: resolution DYNAMIC_DNS"),
        ("{hosts: ['*.example.com'], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http}]}", "spec.ports[0].protocol", "unset: resolution DYNAMIC_DNS"),
        ("{hosts: ['*.example.com'], location: MESH_INTERNAL, resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}", "spec.location", "not supported behind a waypoint"),
        ("{hosts: ['*'], resolution: DYNAMIC_DNS, ports: [{number: 80, name: http, protocol: HTTP}]}", "spec.hosts[0]", "cannot be the full wildcard"),
        // Other resolutions: a wildcard cannot be routed by a waypoint.
        ("{hosts: ['*.example.com'], resolution: NONE, ports: [{number: 443, name: tls, protocol: TLS}]}", "spec.hosts[0]", "only with resolution DYNAMIC_DNS"),
    ];
    for (spec, field, msg) in cases {
        let e = err(spec);
        assert!(e.contains(field) && e.contains(msg), "{spec}: {e}");
    }
}

fn se_doc(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: ns}}\nspec:\n  hosts: [{host}]\n  ports: [{{number: {port}, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\n"
    )
}

fn snap(files: &[(&str, String)]) -> Arc<Snapshot> {
    Arc::new(Snapshot::new(
        files
            .iter()
            .map(|(n, t)| (PathBuf::from(n), t.clone().into_bytes()))
            .collect(),
    ))
}

#[test]
fn a_reload_shares_the_unchanged_objects_and_names_only_the_changed_ones() {
    let a = format!(
        "{}{}",
        se_doc("a1", "a1.example", 80),
        se_doc("a2", "a2.example", 80)
    );
    let b = se_doc("b1", "b1.example", 80);
    let mut p = Parser::default();
    let old = p
        .parse(snap(&[("a.yaml", a), ("b.yaml", b.clone())]))
        .unwrap();
    // a2 gets another port; b.yaml is untouched; c.yaml is new.
    let a_edit = format!(
        "{}{}",
        se_doc("a1", "a1.example", 80),
        se_doc("a2", "a2.example", 81)
    );
    let c = se_doc("c1", "c1.example", 80);
    let new = p
        .parse(snap(&[("a.yaml", a_edit), ("b.yaml", b), ("c.yaml", c)]))
        .unwrap();
    let by_name = |cfg: &Config, n: &str| {
        cfg.service_entries
            .iter()
            .find(|s| s.name() == n)
            .unwrap()
            .clone()
    };
    // Unchanged file, and an unchanged object in a changed file: the same parse.
    assert!(Arc::ptr_eq(&by_name(&old, "b1"), &by_name(&new, "b1")));
    assert!(Arc::ptr_eq(&by_name(&old, "a1"), &by_name(&new, "a1")));
    assert!(!Arc::ptr_eq(&by_name(&old, "a2"), &by_name(&new, "a2")));
    let ch = new.changed_since(&old);
    let keys: Vec<String> = ch.service_entries.iter().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["ns/a2", "ns/c1"]);
    assert_eq!(ch.len(), 2);
    assert!(!ch.mesh);
    // Removal, and the same answer from a config parsed from cold.
    let gone = p
        .parse(snap(&[("c.yaml", se_doc("c1", "c1.example", 80))]))
        .unwrap();
    let ch = gone.changed_since(&new);
    let keys: Vec<String> = ch.service_entries.iter().map(|k| k.to_string()).collect();
    assert_eq!(keys, ["ns/a1", "ns/a2", "ns/b1"]);
    let cold = snap(&[("c.yaml", se_doc("c1", "c1.example", 80))])
        .into_config()
        .unwrap();
    assert!(gone.changed_since(&gone).is_empty());
    assert_eq!(
        cold.changed_since(&new).service_entries.len(),
        4,
        "another parser's objects are other parses"
    );
    assert_eq!(
        Config::default().changed_since(&gone).service_entries.len(),
        1,
        "a config built by hand compares object by object"
    );
}

#[test]
fn a_cached_file_still_takes_part_in_the_checks_across_files() {
    let mut p = Parser::default();
    let a = se_doc("x", "x.example", 80);
    p.parse(snap(&[("a.yaml", a.clone())])).unwrap();
    // b.yaml redefines a.yaml's entry: the whole snapshot is rejected,
    // naming the first definition, though a.yaml was not parsed again.
    let err = p
        .parse(snap(&[
            ("a.yaml", a.clone()),
            ("b.yaml", se_doc("x", "y.example", 80)),
        ]))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid configuration (1 error):\n  b.yaml: document 1 (ServiceEntry ns/x): metadata.name: duplicate ServiceEntry, first defined in a.yaml: document 1"
    );
    // A bad file rejects everything, and fixing it needs no other re-parse.
    let bad = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: y, namespace: ns}\nspec: {hosts: [y.example], ports: [{number: 0}]}\n".to_string();
    let err = p
        .parse(snap(&[("a.yaml", a.clone()), ("b.yaml", bad)]))
        .unwrap_err();
    assert!(
        err.to_string().contains(
            "b.yaml: document 1 (ServiceEntry ns/y): spec.ports[0].number: invalid value 0"
        ),
        "{err}"
    );
    let ok = p
        .parse(snap(&[
            ("a.yaml", a),
            ("b.yaml", se_doc("y", "y.example", 80)),
        ]))
        .unwrap();
    assert_eq!(ok.service_entries.len(), 2);
}

//! `shunt policy check` on the seed's AuthorizationPolicy: exit 0 allowed,
//! 3 denied, 1 error.

mod common;

use std::path::Path;

use shunt_testbed::seed::dir as seed;

/// `shunt policy check --config-dir <the seed> ARGS`.
fn check(args: &[&str]) -> (String, String, i32) {
    check_in(&seed(), args)
}

/// `shunt policy check --config-dir DIR ARGS`: stdout, stderr, exit code.
fn check_in(dir: &Path, args: &[&str]) -> (String, String, i32) {
    let mut a = vec!["policy", "check", "--config-dir", dir.to_str().unwrap()];
    a.extend_from_slice(args);
    common::shunt_text(&a)
}

const SVC: &[&str] = &["--service", "common-infrastructure/httpbin.org"];
const CURL: &str = "cluster.local/ns/default/sa/curl";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";

#[test]
fn curl_get_is_allowed() {
    let (out, err, code) = check(
        &[
            SVC,
            &["--principal", CURL, "--method", "GET", "--path", "/get"],
        ]
        .concat(),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("decision: ALLOW"), "{out}");
    assert!(
        out.contains("ALLOW policy common-infrastructure/httpbin rule 1 matched"),
        "{out}"
    );
}

#[test]
fn curl_post_is_denied_naming_the_policy() {
    let (out, _, code) = check(
        &[
            SVC,
            &["--principal", CURL, "--method", "POST", "--path", "/post"],
        ]
        .concat(),
    );
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("decision: DENY"), "{out}");
    assert!(out.contains("common-infrastructure/httpbin"), "{out}");
    assert!(out.contains("\"POST\" matches none of [GET]"), "{out}");
}

#[test]
fn admin_post_is_allowed_by_identity() {
    let (out, _, code) = check(&[
        "--host",
        "httpbin.org",
        "--identity",
        ADMIN,
        "--method",
        "POST",
        "--path",
        "/post",
    ]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ALLOW policy common-infrastructure/httpbin rule 0 matched"),
        "{out}"
    );
}

#[test]
fn normalized_path_and_tcp() {
    // The path is normalized before matching, as in the waypoint.
    let (out, _, code) = check(&[SVC, &["--principal", CURL, "--path", "/x/../get?q=1"]].concat());
    assert_eq!(code, 0, "{out}");
    // No principal and a HEAD: denied.
    let (_, _, code) = check(&[SVC, &["--method", "HEAD", "--path", "/get"]].concat());
    assert_eq!(code, 3);
    // TCP: the GET/path rule uses HTTP-only fields and never matches in ALLOW.
    let (out, _, code) = check(&[SVC, &["--principal", CURL, "--tcp"]].concat());
    assert_eq!(code, 3, "{out}");
    assert!(out.contains("TCP"), "{out}");
}

#[test]
fn errors_exit_1_with_one_sentence() {
    for args in [
        &["--service", "nope/none"][..],
        &["--service", "no-slash"][..],
        &["--host", "example.com"][..],
        &[
            "--service",
            "common-infrastructure/httpbin.org",
            "--identity",
            "admin",
        ][..],
        &[
            "--service",
            "common-infrastructure/httpbin.org",
            "--port",
            "443",
        ][..],
        &[
            "--service",
            "common-infrastructure/httpbin.org",
            "--header",
            "novalue",
        ][..],
    ] {
        let (out, err, code) = check(args);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(out.is_empty(), "{args:?}: {out}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("shunt: "), "{err}");
    }
}

/// A config with a TLS passthrough port and an SNI policy.
const TLS_CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: api.example
  namespace: common-infrastructure
spec:
  hosts: [api.example]
  ports:
  - {number: 443, name: tls, protocol: TLS}
  - {number: 80, name: http, protocol: HTTP}
  resolution: DNS
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: sni-only
  namespace: common-infrastructure
spec:
  targetRefs:
  - {kind: ServiceEntry, group: networking.istio.io, name: api.example}
  rules:
  - when:
    - key: connection.sni
      values: ["api.example"]
"#;

#[test]
fn sni_flag_decides_connection_sni_on_a_tls_port() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.yaml"), TLS_CONFIG).unwrap();
    let base = [
        "--host",
        "api.example",
        "--port",
        "443",
        "--principal",
        CURL,
    ];
    let (out, err, code) = check_in(dir.path(), &[&base[..], &["--sni", "API.example"]].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("sni=API.example") && out.contains("decision: ALLOW"),
        "{out}"
    );
    let (out, err, code) = check_in(
        dir.path(),
        &[&base[..], &["--sni", "other.example"]].concat(),
    );
    assert_eq!(code, 3, "{out}{err}");
    assert!(out.contains("when[connection.sni].values: FAILS"), "{out}");
    // No SNI sent: the ALLOW cannot match.
    let (out, err, code) = check_in(dir.path(), &base);
    assert_eq!(code, 3, "{out}{err}");
    // On a port where the waypoint never reads an SNI, --sni is refused.
    let (out, err, code) = check_in(
        dir.path(),
        &[
            "--host",
            "api.example",
            "--port",
            "80",
            "--sni",
            "api.example",
        ],
    );
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("reads the SNI only on TLS and HTTPS ports"),
        "{err}"
    );
}

#[test]
fn a_wildcard_entry_is_found_by_a_name_under_it_and_decided_by_sni_and_host() {
    // The seed plus the wildcard example, as a user would copy them.
    let dir = tempfile::tempdir().unwrap();
    let ex = seed();
    for f in std::fs::read_dir(&ex).unwrap().flatten() {
        if f.path().extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
    }
    std::fs::copy(
        ex.join("https/05-wildcard.yaml"),
        dir.path().join("05-wildcard.yaml"),
    )
    .unwrap();
    let tls = |sni: &str| {
        check_in(
            dir.path(),
            &[
                "--host",
                "api.example.com",
                "--port",
                "443",
                "--principal",
                CURL,
                "--sni",
                sni,
            ],
        )
    };
    let (out, err, code) = tls("api.example.com");
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("example-wildcard") && out.contains("decision: ALLOW"),
        "{out}"
    );
    let (out, err, code) = tls("www.example.com");
    assert_eq!(code, 3, "{out}{err}");
    // HTTP on port 80: the Host decides.
    let http = |host: &str| {
        check_in(
            dir.path(),
            &[
                "--host",
                host,
                "--port",
                "80",
                "--principal",
                CURL,
                "--method",
                "GET",
                "--path",
                "/",
            ],
        )
    };
    let (out, err, code) = http("api.example.com");
    assert_eq!(code, 0, "{out}{err}");
    let (out, err, code) = http("www.example.com");
    assert_eq!(code, 3, "{out}{err}");
}

//! `shunt policy check` on the seed's AuthorizationPolicy: exit 0 allowed,
//! 3 denied, 1 error.

use std::path::{Path, PathBuf};
use std::process::Command;

fn seed() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/egress")
}

fn check(args: &[&str]) -> (String, String, i32) {
    let seed = seed();
    let out = Command::new(env!("CARGO_BIN_EXE_shunt"))
        .args(["policy", "check", "--config-dir", seed.to_str().unwrap()])
        .args(args)
        .env_remove("SHUNT_CONFIG_DIR")
        .output()
        .expect("run shunt");
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap(),
    )
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

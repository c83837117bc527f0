//! Local CA layout, workload certificates, trust-domain and identity checks.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use shunt_agent::identity::{
    spiffe_ids, Ca, IdentityError, SpiffeId, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT,
};

/// A file's permission bits.
fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn ca_init_writes_plugin_layout_and_refuses_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::init(dir.path(), "cluster.local", false).unwrap();
    for f in [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN] {
        assert!(dir.path().join(f).is_file(), "{f}");
    }
    assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
    // cert-chain.pem = ca-cert + root, as Istio's tooling writes it.
    let chain = std::fs::read_to_string(dir.path().join(CERT_CHAIN)).unwrap();
    assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);

    let before = std::fs::read(dir.path().join(CA_KEY)).unwrap();
    match Ca::init(dir.path(), "cluster.local", false) {
        Err(IdentityError::CaExists(p)) => assert!(p.starts_with(dir.path())),
        other => panic!("want CaExists, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(dir.path().join(CA_KEY)).unwrap(),
        before,
        "existing key untouched"
    );
    // Asked to: replaced, still 0600.
    std::fs::set_permissions(
        dir.path().join(CA_KEY),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    Ca::init(dir.path(), "cluster.local", true).unwrap();
    assert_ne!(std::fs::read(dir.path().join(CA_KEY)).unwrap(), before);
    assert_eq!(mode(&dir.path().join(CA_KEY)), 0o600);
    drop(ca);
}

#[test]
fn ca_load_issues_workload_cert_with_one_spiffe_san() {
    let dir = tempfile::tempdir().unwrap();
    Ca::init(dir.path(), "cluster.local", false).unwrap();
    // What an existing mesh would hand over: load it fresh.
    let ca = Ca::load(dir.path()).unwrap();
    let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
        .parse()
        .unwrap();
    let c = ca.issue(&id, Duration::from_secs(3600)).unwrap();
    assert_eq!(c.chain.len(), 2, "leaf + intermediate (root not sent)");
    assert_eq!(spiffe_ids(&c.chain[0]).unwrap(), vec![id]);
    let (_, x) = x509_parser::parse_x509_certificate(&c.chain[0]).unwrap();
    let sans = x.subject_alternative_name().unwrap().unwrap();
    assert_eq!(sans.value.general_names.len(), 1, "exactly one SAN");
    let life = x.validity().not_after.timestamp() - x.validity().not_before.timestamp();
    assert!((3600..=3600 + 120).contains(&life), "short-lived: {life}s");
    assert!(c.key_pem().contains("BEGIN PRIVATE KEY"));
}

#[test]
fn ca_load_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Ca::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains(CA_CERT), "{err}");
    Ca::init(dir.path(), "cluster.local", false).unwrap();
    std::fs::write(dir.path().join(CA_KEY), "garbage").unwrap();
    let err = Ca::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains(CA_KEY), "{err}");
    // A key that is not the CA cert's key.
    let other = tempfile::tempdir().unwrap();
    Ca::init(other.path(), "cluster.local", false).unwrap();
    std::fs::copy(other.path().join(CA_KEY), dir.path().join(CA_KEY)).unwrap();
    let err = Ca::load(dir.path()).unwrap_err().to_string();
    assert!(err.contains("does not match"), "{err}");
}

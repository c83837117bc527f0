//! `shunt ca init|show|issue` on the built binary.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use common::shunt;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `shunt ca issue` of `identity` from the CA in `ca_dir` into `out`.
fn issue(ca_dir: &Path, identity: &str, out: &Path) -> Output {
    shunt(&[
        "ca",
        "issue",
        "--ca-dir",
        s(ca_dir),
        "--identity",
        identity,
        "--out",
        s(out),
    ])
}

#[test]
fn init_writes_0600_keys_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out = shunt(&["ca", "init", "--ca-dir", s(&dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "root-cert.pem",
        "cert-chain.pem",
    ] {
        assert!(dir.join(f).is_file(), "{f} missing");
        assert!(text.contains(s(&dir.join(f))), "{f} not listed:\n{text}");
    }
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
    let key_before = std::fs::read(dir.join("ca-key.pem")).unwrap();

    // Second init: refused, one sentence naming the file and what to do.
    let out = shunt(&["ca", "init", "--ca-dir", s(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(dir.join("ca-key.pem")).unwrap(), key_before);

    // --force replaces it (a new key), still 0600.
    let out = shunt(&["ca", "init", "--ca-dir", s(&dir), "--force"]);
    assert!(out.status.success());
    assert_ne!(std::fs::read(dir.join("ca-key.pem")).unwrap(), key_before);
    assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
}

#[test]
fn show_prints_subject_validity_and_root_fingerprint() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    assert!(shunt(&[
        "ca",
        "init",
        "--ca-dir",
        s(&dir),
        "--trust-domain",
        "example.org"
    ])
    .status
    .success());
    let out = shunt(&["ca", "show", "--ca-dir", s(&dir)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("subject:") && text.contains("O=example.org"),
        "{text}"
    );
    assert!(text.contains("CN=shunt root CA"), "{text}");
    assert!(text.contains("validity:"), "{text}");
    // The root's fingerprint is the SHA-256 of its DER.
    let pem_text = std::fs::read(dir.join("root-cert.pem")).unwrap();
    let der = pem::parse(&pem_text).unwrap().into_contents();
    let fp: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    let root_section = text.split("root (root-cert.pem)").nth(1).unwrap();
    assert!(root_section.contains(&fp), "{fp} not in\n{text}");

    // A missing CA: one sentence, what to do.
    let out = shunt(&["ca", "show", "--ca-dir", s(&tmp.path().join("none"))]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("shunt ca init"), "{err}");
}

#[test]
fn issue_writes_a_workload_cert_with_the_spiffe_san() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("ca");
    let out_dir = tmp.path().join("curl");
    assert!(shunt(&["ca", "init", "--ca-dir", s(&dir)]).status.success());
    let id = "spiffe://cluster.local/ns/default/sa/curl";
    let out = issue(&dir, id, &out_dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mode(&out_dir.join("key.pem")), 0o600);
    let chain = std::fs::read(out_dir.join("cert-chain.pem")).unwrap();
    let certs = pem::parse_many(&chain).unwrap();
    assert_eq!(certs.len(), 2, "leaf + signing CA");
    let (_, leaf) = x509_parser::parse_x509_certificate(certs[0].contents()).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<String> = san
        .value
        .general_names
        .iter()
        .filter_map(|g| match g {
            x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec![id.to_string()]);
    // The issued chain verifies against the written root with the verifier
    // the waypoint uses for HBONE clients (rustls webpki + trust domain).
    let roots = std::fs::read(out_dir.join("root-cert.pem")).unwrap();
    assert_eq!(roots, std::fs::read(dir.join("root-cert.pem")).unwrap());
    {
        use rustls::pki_types::{CertificateDer, UnixTime};
        use rustls::server::danger::ClientCertVerifier;
        let mut store = rustls::RootCertStore::empty();
        store
            .add(CertificateDer::from(
                pem::parse(&roots).unwrap().into_contents(),
            ))
            .unwrap();
        let store = std::sync::Arc::new(store);
        let der: Vec<CertificateDer> = certs
            .iter()
            .map(|c| CertificateDer::from(c.contents().to_vec()))
            .collect();
        let v = shunt_agent::identity::tls::TrustDomainClientVerifier::new(
            store.clone(),
            "cluster.local",
        )
        .unwrap();
        v.verify_client_cert(&der[0], &der[1..], UnixTime::now())
            .expect("issued cert verifies against the root");
        let other =
            shunt_agent::identity::tls::TrustDomainClientVerifier::new(store, "example.org")
                .unwrap();
        assert!(other
            .verify_client_cert(&der[0], &der[1..], UnixTime::now())
            .is_err());
    }

    // Issuing again into the same directory is refused without --force.
    let again = issue(&dir, id, &out_dir);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));

    // A malformed identity is one sentence that shows the expected form.
    let bad = issue(&dir, "curl", &out_dir);
    assert_eq!(bad.status.code(), Some(1));
    let err = String::from_utf8(bad.stderr).unwrap();
    assert!(err.contains("spiffe://<trust-domain>/ns/"), "{err}");
}

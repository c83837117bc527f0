//! TLS origination (DestinationRule tls) against a local rustls server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use shunt_agent::upstream::{OriginationSettings, TlsMode, UpstreamConnector};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: PathBuf,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca_der: CertificateDer<'static>,
}

fn pki() -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(p, ca_key);
    let sk = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["httpbin.test".to_string()])
        .unwrap()
        .signed_by(&sk, &issuer)
        .unwrap();
    let ck = KeyPair::generate().unwrap();
    let client = CertificateParams::new(vec!["client.test".to_string()])
        .unwrap()
        .signed_by(&ck, &issuer)
        .unwrap();
    let ca_pem = dir.path().join("ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let client_cert = dir.path().join("client.pem");
    let client_key = dir.path().join("client-key.pem");
    std::fs::write(&client_cert, client.pem()).unwrap();
    std::fs::write(&client_key, ck.serialize_pem()).unwrap();
    Pki {
        ca_pem,
        server_chain: vec![server.der().clone()],
        server_key: PrivatePkcs8KeyDer::from(sk.serialize_der()),
        client_cert,
        client_key,
        ca_der: ca.der().clone(),
        dir,
    }
}

/// A TLS server answering "hi" and recording the SNI and ALPN it saw.
async fn tls_server(
    p: &Pki,
    require_client_cert: bool,
) -> (
    std::net::SocketAddr,
    Arc<Mutex<Vec<(Option<String>, Option<Vec<u8>>)>>>,
) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let b = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let b = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(p.ca_der.clone()).unwrap();
        b.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap(),
        )
    } else {
        b.with_no_client_auth()
    };
    let mut cfg = b
        .with_single_cert(
            p.server_chain.clone(),
            PrivateKeyDer::Pkcs8(p.server_key.clone_key()),
        )
        .unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = s2.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let c = tls.get_ref().1;
                    seen.lock().unwrap().push((
                        c.server_name().map(str::to_owned),
                        c.alpn_protocol().map(|a| a.to_vec()),
                    ));
                    let _ = tls.write_all(b"hi").await;
                    let _ = tls.shutdown().await;
                }
            });
        }
    });
    (addr, seen)
}

async fn fetch(
    c: &UpstreamConnector,
    addr: std::net::SocketAddr,
    host: &str,
) -> Result<Vec<u8>, String> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut s = c.connect(tcp, host).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    Ok(out)
}

fn simple(p: &Pki) -> OriginationSettings {
    OriginationSettings {
        mode: TlsMode::Simple,
        ca_certificates: Some(p.ca_pem.clone()),
        ..Default::default()
    }
}

#[tokio::test]
async fn upstream_simple_sends_sni_of_host_and_verifies() {
    let p = pki();
    let (addr, seen) = tls_server(&p, false).await;
    let c = UpstreamConnector::new(&simple(&p)).unwrap();
    assert_eq!(fetch(&c, addr, "httpbin.test").await.unwrap(), b"hi");
    assert_eq!(
        seen.lock().unwrap()[0],
        (Some("httpbin.test".into()), Some(b"http/1.1".to_vec()))
    );
    // The certificate is not valid for another host.
    assert!(fetch(&c, addr, "other.test").await.is_err());
}

#[tokio::test]
async fn upstream_sni_override_and_subject_alt_names() {
    let p = pki();
    let (addr, seen) = tls_server(&p, false).await;
    let s = OriginationSettings {
        sni: Some("sni.test".into()),
        ..simple(&p)
    };
    // SNI is sent, and the name check is against it: fails.
    assert!(
        fetch(&UpstreamConnector::new(&s).unwrap(), addr, "httpbin.test")
            .await
            .is_err()
    );
    // subjectAltNames replaces the name check; the SNI is still the override.
    let s = OriginationSettings {
        subject_alt_names: vec!["httpbin.test".into()],
        ..s
    };
    assert_eq!(
        fetch(&UpstreamConnector::new(&s).unwrap(), addr, "whatever")
            .await
            .unwrap(),
        b"hi"
    );
    assert_eq!(
        seen.lock().unwrap().last().unwrap().0.as_deref(),
        Some("sni.test")
    );
    let s = OriginationSettings {
        subject_alt_names: vec!["nope.test".into()],
        ..s
    };
    assert!(
        fetch(&UpstreamConnector::new(&s).unwrap(), addr, "httpbin.test")
            .await
            .is_err()
    );
}

#[tokio::test]
async fn upstream_os_roots_reject_test_ca_unless_insecure() {
    let p = pki();
    let (addr, _) = tls_server(&p, false).await;
    let os = OriginationSettings {
        mode: TlsMode::Simple,
        ..Default::default()
    };
    match UpstreamConnector::new(&os) {
        // A machine without OS roots: a clear config error instead.
        Err(e) => assert!(e.to_string().contains("OS root"), "{e}"),
        Ok(c) => assert!(
            fetch(&c, addr, "httpbin.test").await.is_err(),
            "test CA is not an OS root"
        ),
    }
    let insecure = OriginationSettings {
        insecure_skip_verify: true,
        ..os
    };
    assert_eq!(
        fetch(
            &UpstreamConnector::new(&insecure).unwrap(),
            addr,
            "httpbin.test"
        )
        .await
        .unwrap(),
        b"hi"
    );
}

#[tokio::test]
async fn upstream_mutual_presents_client_cert() {
    let p = pki();
    let (addr, _) = tls_server(&p, true).await;
    let no_cert = UpstreamConnector::new(&simple(&p)).unwrap();
    assert!(
        fetch(&no_cert, addr, "httpbin.test").await.is_err(),
        "server requires a client cert"
    );
    let m = OriginationSettings {
        mode: TlsMode::Mutual,
        client_certificate: Some(p.client_cert.clone()),
        private_key: Some(p.client_key.clone()),
        ..simple(&p)
    };
    assert_eq!(
        fetch(&UpstreamConnector::new(&m).unwrap(), addr, "httpbin.test")
            .await
            .unwrap(),
        b"hi"
    );
}

#[tokio::test]
async fn upstream_disable_is_plain_and_bad_files_are_named() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"plain").await.unwrap();
    });
    let c = UpstreamConnector::new(&OriginationSettings::default()).unwrap();
    assert!(!c.originates_tls());
    assert_eq!(fetch(&c, addr, "httpbin.test").await.unwrap(), b"plain");

    let p = pki();
    let bad = OriginationSettings {
        ca_certificates: Some(p.dir.path().join("missing.pem")),
        ..simple(&p)
    };
    let e = UpstreamConnector::new(&bad).unwrap_err().to_string();
    assert!(
        e.contains("caCertificates") && e.contains("missing.pem"),
        "{e}"
    );
    let m = OriginationSettings {
        mode: TlsMode::Mutual,
        ..simple(&p)
    };
    let e = UpstreamConnector::new(&m).unwrap_err().to_string();
    assert!(e.contains("clientCertificate"), "{e}");
}

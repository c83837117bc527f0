//! rustls pieces for mesh mTLS: cert resolvers that read a swappable slot,
//! the SPIFFE-aware verifiers, and config builders (TLS 1.3, AES-GCM, h2).

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};

use super::manager::CertSlot;
use super::{IdentityError, SpiffeId};

/// ALPN for HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// ring with only the TLS 1.3 AES-GCM suites, as ztunnel.
pub fn mesh_provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| {
        use rustls::crypto::ring::{cipher_suite, default_provider};
        Arc::new(CryptoProvider {
            cipher_suites: vec![
                cipher_suite::TLS13_AES_256_GCM_SHA384,
                cipher_suite::TLS13_AES_128_GCM_SHA256,
            ],
            ..default_provider()
        })
    })
    .clone()
}

fn algs() -> WebPkiSupportedAlgorithms {
    mesh_provider().signature_verification_algorithms
}

/// All SPIFFE IDs in a certificate's URI SANs.
pub fn spiffe_ids(cert: &CertificateDer<'_>) -> Result<Vec<SpiffeId>, IdentityError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::PeerCert(format!("unparsable certificate: {e}")))?;
    let mut out = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                if let Ok(id) = u.parse::<SpiffeId>() {
                    out.push(id);
                }
            }
        }
    }
    Ok(out)
}

/// The identity of a verified peer: its leaf must carry exactly one SPIFFE
/// URI SAN (as Istio issues them).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Result<SpiffeId, IdentityError> {
    let leaf = certs
        .and_then(|c| c.first())
        .ok_or_else(|| IdentityError::PeerCert("peer presented no certificate".into()))?;
    let mut ids = spiffe_ids(leaf)?;
    match ids.len() {
        1 => Ok(ids.remove(0)),
        0 => Err(IdentityError::PeerCert(
            "peer certificate has no spiffe:// URI SAN".into(),
        )),
        n => Err(IdentityError::PeerCert(format!(
            "peer certificate has {n} spiffe:// URI SANs, want exactly one"
        ))),
    }
}

fn cert_error(msg: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
        IdentityError::PeerCert(msg),
    ))))
}

/// Serves whatever certificate the slot currently holds, so a renewal
/// applies to the next handshake while established connections continue.
#[derive(Debug, Clone)]
pub struct SlotResolver(pub Arc<CertSlot>);

impl ResolvesServerCert for SlotResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl ResolvesClientCert for SlotResolver {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.certified_key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Client side: the server's chain must lead to a mesh root and one of its
/// URI SANs must equal an expected identity (the waypoint's). The TLS server
/// name is not used (HBONE sends no SNI).
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<SpiffeId>,
}

impl SpiffeServerVerifier {
    pub fn new(roots: Arc<RootCertStore>, expected: Vec<SpiffeId>) -> Self {
        SpiffeServerVerifier { roots, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            algs().all,
        )?;
        let ids = spiffe_ids(end_entity).map_err(|e| cert_error(e.to_string()))?;
        if ids.iter().any(|id| self.expected.contains(id)) {
            Ok(ServerCertVerified::assertion())
        } else {
            let want: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
            let got: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            Err(cert_error(format!(
                "server identity {got:?} is not the expected {want:?}"
            )))
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &algs())
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &algs())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        algs().supported_schemes()
    }
}

/// Server side: webpki chain verification (client auth mandatory), then the
/// client's SPIFFE trust domain must be ours.
#[derive(Debug)]
pub struct TrustDomainClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl TrustDomainClientVerifier {
    pub fn new(roots: Arc<RootCertStore>, trust_domain: &str) -> Result<Self, IdentityError> {
        let inner = WebPkiClientVerifier::builder_with_provider(roots, mesh_provider())
            .build()
            .map_err(|e| IdentityError::Tls(format!("client verifier: {e}")))?;
        Ok(TrustDomainClientVerifier {
            inner,
            trust_domain: trust_domain.to_owned(),
        })
    }
}

impl ClientCertVerifier for TrustDomainClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = peer_identity(Some(std::slice::from_ref(end_entity)))
            .map_err(|e| cert_error(e.to_string()))?;
        if id.trust_domain() != self.trust_domain {
            return Err(cert_error(format!(
                "client {id} is in trust domain {:?}, want {:?}",
                id.trust_domain(),
                self.trust_domain
            )));
        }
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// HBONE client config: our workload's cert from `slot`, the server must be
/// one of `expected_server`. No SNI.
pub fn client_config(
    slot: Arc<CertSlot>,
    roots: Arc<RootCertStore>,
    expected_server: Vec<SpiffeId>,
) -> Result<Arc<ClientConfig>, IdentityError> {
    let mut cfg = ClientConfig::builder_with_provider(mesh_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier::new(
            roots,
            expected_server,
        )))
        .with_client_cert_resolver(Arc::new(SlotResolver(slot)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    cfg.enable_sni = false;
    Ok(Arc::new(cfg))
}

/// HBONE server config: our cert from `slot`; clients must chain to `roots`
/// and be in `trust_domain`.
pub fn server_config(
    slot: Arc<CertSlot>,
    roots: Arc<RootCertStore>,
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, IdentityError> {
    let mut cfg = ServerConfig::builder_with_provider(mesh_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_client_cert_verifier(Arc::new(TrustDomainClientVerifier::new(
            roots,
            trust_domain,
        )?))
        .with_cert_resolver(Arc::new(SlotResolver(slot)));
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Tunnels are long-lived and pooled; resumption tickets buy nothing.
    cfg.send_tls13_tickets = 0;
    Ok(Arc::new(cfg))
}

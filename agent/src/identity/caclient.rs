//! Client of Istio's CSR API: asks a CA (shunt's controller, or istiod at
//! `istiod.istio-system.svc:15012`) to sign a key generated here, with the
//! projected service-account token as credential, as ztunnel's
//! `caclient.rs` does. The CA's serving certificate is verified against the
//! mesh root (Istio's `istio-ca-root-cert`), the answer against the key and
//! identity asked for and the same root: a certificate peers would refuse
//! is never installed.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;

use super::csr::{
    IstioCertificateRequest, IstioCertificateResponse, CLUSTER_ID_HEADER, CREATE_CERTIFICATE_PATH,
};
use super::{tls, IdentityError, IssuedCert, SpiffeId};

/// How to reach and authenticate to the CA.
#[derive(Clone, Debug)]
pub struct CaClientSettings {
    /// `host:port` (Istio's CA_ADDRESS), optionally with `https://`.
    pub address: String,
    /// PEM of the mesh root(s): verifies the CA's serving certificate and
    /// the certificates it returns.
    pub root_cert: PathBuf,
    /// The projected service-account token (audience `istio-ca`); re-read
    /// for every request, as the kubelet rotates it.
    pub token: PathBuf,
    /// Ask for other identities through `ImpersonatedIdentity` (the node
    /// agent, for its pods); off: only the caller's own identity (a
    /// waypoint).
    pub impersonate: bool,
    /// Sent as `clusterid` metadata when set (istiod's multi-cluster lookup).
    pub cluster_id: Option<String>,
    /// Connect plus request.
    pub timeout: Duration,
}

impl CaClientSettings {
    /// Istio's defaults for `address`: the projected token at
    /// `/var/run/secrets/tokens/istio-token`, the root at
    /// `/var/run/secrets/istio/root-cert.pem`.
    pub fn new(address: impl Into<String>) -> Self {
        CaClientSettings {
            address: address.into(),
            root_cert: PathBuf::from("/var/run/secrets/istio/root-cert.pem"),
            token: PathBuf::from("/var/run/secrets/tokens/istio-token"),
            impersonate: true,
            cluster_id: None,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A connection (lazily established, re-established after failures) to the
/// CA's `IstioCertificateService`.
pub struct CaClient {
    settings: CaClientSettings,
    channel: tonic::transport::Channel,
    roots: Arc<RootCertStore>,
    root_pems: Vec<CertificateDer<'static>>,
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaClient")
            .field("address", &self.settings.address)
            .finish_non_exhaustive()
    }
}

/// `host` and `port` of a CA address.
fn split_address(address: &str) -> Result<(String, u16), IdentityError> {
    let bad = |why: &str| {
        IdentityError::Config(format!(
            "CA address {address:?} {why}: want host:port, e.g. istiod.istio-system.svc:15012"
        ))
    };
    let rest = address.strip_prefix("https://").unwrap_or(address);
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| bad("has no port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') {
        return Err(bad("has no host"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| bad("has an invalid port"))?;
    Ok((host.to_string(), port))
}

impl CaClient {
    /// Reads the root file and prepares the channel; nothing is dialled
    /// until the first request.
    pub fn new(settings: CaClientSettings) -> Result<CaClient, IdentityError> {
        let (host, port) = split_address(&settings.address)?;
        let data = std::fs::read(&settings.root_cert)
            .map_err(|e| IdentityError::Io(settings.root_cert.clone(), e))?;
        let root_pems = CertificateDer::pem_slice_iter(&data)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::BadFile(settings.root_cert.clone(), e.to_string()))?;
        let mut roots = RootCertStore::empty();
        for r in &root_pems {
            roots
                .add(r.clone())
                .map_err(|e| IdentityError::BadFile(settings.root_cert.clone(), e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(IdentityError::BadFile(
                settings.root_cert.clone(),
                "no CERTIFICATE in file".into(),
            ));
        }
        let roots = Arc::new(roots);
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| IdentityError::Config(format!("CA host {host:?}: {e}")))?;
        let mut tls_cfg = ClientConfig::builder_with_provider(tls::mesh_provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| IdentityError::Tls(e.to_string()))?
            .with_root_certificates(roots.clone())
            .with_no_client_auth();
        // gRPC servers (grpc-go since 1.67) require ALPN h2.
        tls_cfg.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(tls_cfg));
        let target = (host.clone(), port);
        let connect = tower::service_fn(move |_: http::Uri| {
            let (connector, target, name) =
                (connector.clone(), target.clone(), server_name.clone());
            async move {
                let tcp = TcpStream::connect((target.0.as_str(), target.1)).await?;
                let _ = tcp.set_nodelay(true);
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        });
        let uri = if host.contains(':') {
            format!("https://[{host}]:{port}")
        } else {
            format!("https://{host}:{port}")
        };
        let channel = tonic::transport::Endpoint::from_shared(uri)
            .map_err(|e| IdentityError::Config(format!("CA address: {e}")))?
            .connect_timeout(settings.timeout)
            .timeout(settings.timeout)
            .connect_with_connector_lazy(connect);
        Ok(CaClient {
            settings,
            channel,
            roots,
            root_pems,
        })
    }

    /// The mesh roots (from the root file) peers are verified against.
    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.roots.clone()
    }

    pub fn settings(&self) -> &CaClientSettings {
        &self.settings
    }

    /// A certificate for `id`, valid for `lifetime` unless the CA shortens
    /// it: a new key, a CSR with `id` as its only SAN, one request.
    pub async fn request(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<IssuedCert, IdentityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| IdentityError::Tls(format!("generating key for {id}: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names =
            vec![SanType::URI(id.uri().try_into().map_err(|e| {
                IdentityError::BadSpiffeId(format!("{id}: {e}"))
            })?)];
        let csr = params
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| IdentityError::Tls(format!("CSR for {id}: {e}")))?;
        let mut msg = IstioCertificateRequest {
            csr,
            validity_duration: lifetime.as_secs().min(i64::MAX as u64) as i64,
            metadata: None,
        };
        if self.settings.impersonate {
            msg.impersonate(id);
        }
        let mut req = tonic::Request::new(msg);
        let token = self.token()?;
        let md = req.metadata_mut();
        md.insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| self.bad_token("is not valid header text"))?,
        );
        if let Some(c) = &self.settings.cluster_id {
            md.insert(
                CLUSTER_ID_HEADER,
                c.parse()
                    .map_err(|_| IdentityError::Config(format!("cluster id {c:?}")))?,
            );
        }
        let issued_at = SystemTime::now();
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        grpc.ready()
            .await
            .map_err(|e| self.failed(id, tonic::Status::unavailable(e.to_string())))?;
        let codec =
            tonic_prost::ProstCodec::<IstioCertificateRequest, IstioCertificateResponse>::default();
        let path = http::uri::PathAndQuery::from_static(CREATE_CERTIFICATE_PATH);
        let resp = grpc
            .unary(req, path, codec)
            .await
            .map_err(|s| self.failed(id, s))?
            .into_inner();
        let chain = self.check_response(id, &key, resp)?;
        let not_after = not_after(&chain[0])?;
        Ok(IssuedCert {
            id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            issued_at,
            not_after,
        })
    }

    fn token(&self) -> Result<String, IdentityError> {
        let t = std::fs::read_to_string(&self.settings.token)
            .map_err(|e| IdentityError::Io(self.settings.token.clone(), e))?;
        let t = t.trim();
        if t.is_empty() {
            return Err(self.bad_token("is empty"));
        }
        Ok(t.to_string())
    }

    fn bad_token(&self, why: &str) -> IdentityError {
        IdentityError::BadFile(self.settings.token.clone(), format!("token {why}"))
    }

    fn failed(&self, id: &SpiffeId, s: tonic::Status) -> IdentityError {
        IdentityError::Csr {
            address: self.settings.address.clone(),
            identity: id.to_string(),
            code: s.code(),
            message: s.message().to_string(),
        }
    }

    /// The chain to present (leaf, intermediates; the root dropped), after
    /// checking that the leaf is for `id` and `key` and chains to our roots.
    fn check_response(
        &self,
        id: &SpiffeId,
        key: &KeyPair,
        resp: IstioCertificateResponse,
    ) -> Result<Vec<CertificateDer<'static>>, IdentityError> {
        let bad = |why: String| IdentityError::CaResponse(format!("for {id}: {why}"));
        let mut chain = Vec::new();
        for (i, pem) in resp.cert_chain.iter().enumerate() {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("cert_chain[{i}] is not PEM: {e}")))?;
            chain.extend(certs);
        }
        // Istio: "the root cert is the last element"; peers have it already.
        chain.retain(|c| !self.root_pems.contains(c));
        let Some(leaf) = chain.first() else {
            return Err(bad("no certificate besides the root".into()));
        };
        let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
            .map_err(|e| bad(format!("unparsable leaf: {e}")))?;
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(key).as_slice()
        {
            return Err(bad("the leaf is not for the key in the CSR".into()));
        }
        let got = super::peer_identity(Some(std::slice::from_ref(leaf)))
            .map_err(|e| bad(e.to_string()))?;
        if got != *id {
            return Err(bad(format!("the leaf is for {got}")));
        }
        let end = ParsedCertificate::try_from(leaf).map_err(|e| bad(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end,
            &self.roots,
            &chain[1..],
            UnixTime::now(),
            tls::mesh_provider().signature_verification_algorithms.all,
        )
        .map_err(|e| bad(format!("does not chain to the mesh root: {e}")))?;
        Ok(chain)
    }
}

fn not_after(leaf: &CertificateDer<'_>) -> Result<SystemTime, IdentityError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| IdentityError::CaResponse(format!("unparsable leaf: {e}")))?;
    let secs = parsed.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_addresses_are_host_and_port_as_istio_writes_them() {
        assert_eq!(
            split_address("istiod.istio-system.svc:15012").unwrap(),
            ("istiod.istio-system.svc".into(), 15012)
        );
        assert_eq!(
            split_address("https://shunt-controller.shunt-system.svc:15012/").unwrap(),
            ("shunt-controller.shunt-system.svc".into(), 15012)
        );
        assert_eq!(split_address("[::1]:15012").unwrap(), ("::1".into(), 15012));
        for bad in ["istiod", ":15012", "istiod:x", "istiod:99999"] {
            assert!(split_address(bad).is_err(), "{bad}");
        }
    }
}

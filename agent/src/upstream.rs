//! TLS origination at the waypoint: a connector built once per
//! DestinationRule `trafficPolicy.tls` that turns a connected upstream socket
//! into a plain or TLS stream.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::hbone::RelayIo;

/// DestinationRule `tls.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsMode {
    #[default]
    Disable,
    Simple,
    Mutual,
}

/// DestinationRule `trafficPolicy.tls`, as plain data.
#[derive(Clone, Debug, Default)]
pub struct OriginationSettings {
    pub mode: TlsMode,
    /// SNI to send; the host when absent.
    pub sni: Option<String>,
    /// PEM CA bundle; the OS roots (rustls-native-certs) when absent.
    pub ca_certificates: Option<PathBuf>,
    /// When set, the server certificate must carry one of these SANs (DNS,
    /// URI or IP) instead of matching the SNI host.
    pub subject_alt_names: Vec<String>,
    pub insecure_skip_verify: bool,
    /// MUTUAL only.
    pub client_certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    /// The port speaks HTTP/2 (HTTP2/GRPC): offer ALPN `h2` instead of
    /// `http/1.1`.
    pub http2: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("tls.{field}: {path}: {msg}")]
    File {
        field: &'static str,
        path: PathBuf,
        msg: String,
    },
    #[error("tls: {0}")]
    Config(String),
    #[error("tls.sni / host {0:?} is not a valid server name")]
    BadServerName(String),
    #[error("TLS handshake with upstream {host}: {source}")]
    Handshake {
        host: String,
        #[source]
        source: io::Error,
    },
}

/// Built once per configuration; `connect` is per connection.
#[derive(Clone)]
pub struct UpstreamConnector {
    tls: Option<(tokio_rustls::TlsConnector, Option<String>)>,
}

impl std::fmt::Debug for UpstreamConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamConnector")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, UpstreamError> {
    std::fs::read(path).map_err(|e| UpstreamError::File {
        field,
        path: path.to_owned(),
        msg: e.to_string(),
    })
}

fn provider() -> Arc<CryptoProvider> {
    // External servers: TLS 1.2 and 1.3, every ring suite.
    Arc::new(rustls::crypto::ring::default_provider())
}

impl UpstreamConnector {
    pub fn new(s: &OriginationSettings) -> Result<Self, UpstreamError> {
        if s.mode == TlsMode::Disable {
            return Ok(UpstreamConnector { tls: None });
        }
        let provider = provider();
        let verifier: Arc<dyn ServerCertVerifier> = if s.insecure_skip_verify {
            Arc::new(NoVerify(provider.clone()))
        } else {
            let mut roots = RootCertStore::empty();
            match &s.ca_certificates {
                Some(p) => {
                    let data = read_file("caCertificates", p)?;
                    let certs = CertificateDer::pem_slice_iter(&data)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| UpstreamError::File {
                            field: "caCertificates",
                            path: p.clone(),
                            msg: format!("invalid PEM: {e}"),
                        })?;
                    let (added, _) = roots.add_parsable_certificates(certs);
                    if added == 0 {
                        return Err(UpstreamError::File {
                            field: "caCertificates",
                            path: p.clone(),
                            msg: "no usable CA certificate".into(),
                        });
                    }
                }
                None => {
                    let found = rustls_native_certs::load_native_certs();
                    let (added, _) = roots.add_parsable_certificates(found.certs);
                    if added == 0 {
                        return Err(UpstreamError::Config(format!(
                            "caCertificates not set and no OS root certificates found ({:?})",
                            found
                                .errors
                                .iter()
                                .map(|e| e.to_string())
                                .collect::<Vec<_>>()
                        )));
                    }
                }
            }
            let roots = Arc::new(roots);
            let webpki =
                WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
                    .build()
                    .map_err(|e| UpstreamError::Config(e.to_string()))?;
            if s.subject_alt_names.is_empty() {
                webpki
            } else {
                Arc::new(SanVerifier {
                    roots,
                    sans: s.subject_alt_names.clone(),
                    inner: webpki,
                    provider: provider.clone(),
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| UpstreamError::Config(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut cfg = match s.mode {
            TlsMode::Mutual => {
                let (Some(cp), Some(kp)) = (&s.client_certificate, &s.private_key) else {
                    return Err(UpstreamError::Config(
                        "mode MUTUAL needs clientCertificate and privateKey".into(),
                    ));
                };
                let chain = CertificateDer::pem_slice_iter(&read_file("clientCertificate", cp)?)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| UpstreamError::File {
                        field: "clientCertificate",
                        path: cp.clone(),
                        msg: format!("invalid PEM: {e}"),
                    })?;
                if chain.is_empty() {
                    return Err(UpstreamError::File {
                        field: "clientCertificate",
                        path: cp.clone(),
                        msg: "no CERTIFICATE".into(),
                    });
                }
                let key =
                    PrivateKeyDer::from_pem_slice(&read_file("privateKey", kp)?).map_err(|e| {
                        UpstreamError::File {
                            field: "privateKey",
                            path: kp.clone(),
                            msg: format!("no private key: {e}"),
                        }
                    })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| UpstreamError::File {
                        field: "privateKey",
                        path: kp.clone(),
                        msg: e.to_string(),
                    })?
            }
            _ => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![if s.http2 {
            b"h2".to_vec()
        } else {
            b"http/1.1".to_vec()
        }];
        Ok(UpstreamConnector {
            tls: Some((
                tokio_rustls::TlsConnector::from(Arc::new(cfg)),
                s.sni.clone(),
            )),
        })
    }

    pub fn originates_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Wraps a connected socket: plain, or a TLS client to `host` (SNI =
    /// `sni` or `host`).
    pub async fn connect(
        &self,
        tcp: TcpStream,
        host: &str,
    ) -> Result<UpstreamStream, UpstreamError> {
        let Some((connector, sni)) = &self.tls else {
            return Ok(UpstreamStream::Plain(tcp));
        };
        let name = sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(name.to_owned())
            .map_err(|_| UpstreamError::BadServerName(name.to_owned()))?;
        let s =
            connector
                .connect(server_name, tcp)
                .await
                .map_err(|e| UpstreamError::Handshake {
                    host: host.to_owned(),
                    source: e,
                })?;
        Ok(UpstreamStream::Tls(Box::new(s)))
    }
}

/// Chain must verify; the name check is replaced by `subjectAltNames`.
#[derive(Debug)]
struct SanVerifier {
    roots: Arc<RootCertStore>,
    sans: Vec<String>,
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        for san in &self.sans {
            if let Ok(n) = ServerName::try_from(san.as_str()) {
                if rustls::client::verify_server_name(&parsed, &n).is_ok() {
                    return Ok(ServerCertVerified::assertion());
                }
            }
        }
        // URI SANs (e.g. spiffe://) are not server names; compare them textually.
        if let Ok((_, x)) = x509_parser::parse_x509_certificate(end_entity) {
            if let Ok(Some(ext)) = x.subject_alternative_name() {
                for g in &ext.value.general_names {
                    if let x509_parser::extensions::GeneralName::URI(u) = g {
                        if self.sans.iter().any(|s| s == u) {
                            return Ok(ServerCertVerified::assertion());
                        }
                    }
                }
            }
        }
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForNameContext {
                expected: ServerName::try_from(self.sans[0].clone())
                    .unwrap_or(ServerName::try_from("invalid").expect("valid")),
                presented: vec![],
            },
        ))
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(m, c, d)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(m, c, d)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `insecureSkipVerify`: any certificate, but handshake signatures are
/// still checked (the peer must hold the key it presents).
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A plain or TLS upstream connection.
pub enum UpstreamStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl UpstreamStream {
    pub fn tcp(&self) -> &TcpStream {
        match self {
            UpstreamStream::Plain(t) => t,
            UpstreamStream::Tls(t) => t.get_ref().0,
        }
    }
}

impl RelayIo for UpstreamStream {
    fn set_reset_on_close(&self) {
        let _ = self.tcp().set_zero_linger();
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(t) => Pin::new(t).poll_read(cx, buf),
            UpstreamStream::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(t) => Pin::new(t).poll_write(cx, buf),
            UpstreamStream::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(t) => Pin::new(t).poll_flush(cx),
            UpstreamStream::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(t) => Pin::new(t).poll_shutdown(cx),
            UpstreamStream::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(t) => Pin::new(t).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(t) => t.is_write_vectored(),
            UpstreamStream::Tls(t) => t.is_write_vectored(),
        }
    }
}

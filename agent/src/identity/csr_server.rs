//! The CSR endpoint: Istio's `IstioCertificateService` over gRPC and TLS,
//! run by `shunt controller`, the only process holding the CA key.
//!
//! Every request: the bearer token is authenticated (TokenReview, through
//! [`Authenticate`]), [`csr::authorize`] decides the identity, and
//! [`Ca::sign_csr`] signs the CSR only if its SAN is exactly that identity.
//! A refusal is a gRPC status with the rule that refused and a rate-limited
//! log line. The listener assumes hostile clients: handshakes are bounded in
//! time and number, messages in size, requests in concurrency and time.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::future::BoxFuture;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::csr::{
    self, bearer_token, Caller, CsrPolicy, IstioCertificateRequest, IstioCertificateResponse,
    PodLookup, Refusal, CREATE_CERTIFICATE_PATH,
};
use super::{tls, Ca, IdentityError};
use crate::telemetry::LogLimit;

/// Authenticates a bearer token (TokenReview in the cluster).
pub trait Authenticate: Send + Sync {
    fn authenticate<'a>(&'a self, token: &'a str) -> BoxFuture<'a, Result<Caller, Refusal>>;
}

/// Limits and names of the endpoint.
#[derive(Clone, Debug)]
pub struct CsrServerSettings {
    /// DNS names of the serving certificate (what clients dial).
    pub server_names: Vec<String>,
    /// Serving certificate lifetime; renewed at half-life.
    pub server_cert_lifetime: Duration,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    /// Requests being authenticated or signed at once; beyond, a request
    /// waits (up to the request timeout).
    pub max_inflight: usize,
    pub request_timeout: Duration,
    /// Largest request message (a CSR is about 1 KiB).
    pub max_message: usize,
}

impl CsrServerSettings {
    pub fn new(server_names: Vec<String>) -> Self {
        CsrServerSettings {
            server_names,
            server_cert_lifetime: Duration::from_secs(24 * 3600),
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 256,
            max_inflight: 64,
            request_timeout: Duration::from_secs(15),
            max_message: 64 * 1024,
        }
    }
}

/// Counts of answered requests (for tests and metrics).
#[derive(Debug, Default)]
pub struct CsrCounters {
    pub signed: AtomicU64,
    pub refused: AtomicU64,
}

/// The signing service, independent of the transport.
pub struct CsrService {
    ca: Arc<Ca>,
    policy: CsrPolicy,
    authn: Arc<dyn Authenticate>,
    pods: Arc<dyn PodLookup>,
    inflight: Semaphore,
    pub counters: CsrCounters,
}

static REFUSAL_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));

impl CsrService {
    pub fn new(
        ca: Arc<Ca>,
        policy: CsrPolicy,
        authn: Arc<dyn Authenticate>,
        pods: Arc<dyn PodLookup>,
        max_inflight: usize,
    ) -> Self {
        CsrService {
            ca,
            policy,
            authn,
            pods,
            inflight: Semaphore::new(max_inflight.max(1)),
            counters: CsrCounters::default(),
        }
    }

    /// Answers one request: the chain as Istio sends it (one PEM per
    /// element, leaf first, root last), or the refusal.
    pub async fn create_certificate(
        &self,
        authorization: Option<&str>,
        peer: Option<SocketAddr>,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let r = self.decide_and_sign(authorization, request).await;
        match &r {
            Ok(_) => {
                self.counters.signed.fetch_add(1, Ordering::Relaxed);
            }
            Err(refusal) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(suppressed) = REFUSAL_LOG.allow() {
                    tracing::warn!(
                        peer = ?peer,
                        reason = refusal.reason(),
                        error = %refusal,
                        suppressed,
                        "certificate request refused"
                    );
                }
            }
        }
        r
    }

    async fn decide_and_sign(
        &self,
        authorization: Option<&str>,
        request: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, Refusal> {
        let token = bearer_token(authorization)?;
        let _permit = self
            .inflight
            .acquire()
            .await
            .map_err(|_| Refusal::Unavailable("shutting down".into()))?;
        let caller = self.authn.authenticate(token).await?;
        let grant = csr::authorize(&self.policy, &caller, request, self.pods.as_ref())?;
        let chain = self
            .ca
            .sign_csr(&request.csr, &grant.identity, grant.validity)
            .map_err(|e| match e {
                super::ca::CsrError::Sign(m) => {
                    Refusal::Unavailable(format!("signing failed: {m}"))
                }
                other => Refusal::InvalidArgument(other.to_string()),
            })?;
        tracing::info!(
            identity = %grant.identity,
            caller = %format!("{}/{}", caller.namespace, caller.service_account),
            validity = ?grant.validity,
            "signed workload certificate"
        );
        let mut cert_chain: Vec<String> = chain.iter().map(|c| pem_cert(c)).collect();
        cert_chain.extend(self.ca.roots().iter().map(|c| pem_cert(c)));
        Ok(IstioCertificateResponse { cert_chain })
    }
}

fn pem_cert(der: &CertificateDer<'_>) -> String {
    ::pem::encode(&::pem::Pem::new("CERTIFICATE", der.to_vec()))
}

/// The tonic service: routes `CreateCertificate`, answers anything else
/// `UNIMPLEMENTED`.
#[derive(Clone)]
struct GrpcService {
    inner: Arc<CsrService>,
    max_message: usize,
}

impl tonic::server::NamedService for GrpcService {
    const NAME: &'static str = csr::SERVICE;
}

#[derive(Clone)]
struct Unary(Arc<CsrService>);

impl tonic::server::UnaryService<IstioCertificateRequest> for Unary {
    type Response = IstioCertificateResponse;
    type Future =
        BoxFuture<'static, Result<tonic::Response<IstioCertificateResponse>, tonic::Status>>;

    fn call(&mut self, req: tonic::Request<IstioCertificateRequest>) -> Self::Future {
        let svc = self.0.clone();
        Box::pin(async move {
            let auth = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let peer = req.extensions().get::<PeerAddr>().map(|p| p.0);
            let msg = req.into_inner();
            svc.create_certificate(auth.as_deref(), peer, &msg)
                .await
                .map(tonic::Response::new)
                .map_err(tonic::Status::from)
        })
    }
}

impl<B> tower::Service<http::Request<B>> for GrpcService
where
    B: hyper::body::Body + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CREATE_CERTIFICATE_PATH {
            return Box::pin(async {
                Ok(tonic::Status::unimplemented("only CreateCertificate is served").into_http())
            });
        }
        let (svc, max) = (self.inner.clone(), self.max_message);
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<IstioCertificateResponse, IstioCertificateRequest>::default();
            let mut grpc = tonic::server::Grpc::new(codec)
                .apply_max_message_size_config(Some(max), Some(max * 4));
            Ok(grpc.unary(Unary(svc), req).await)
        })
    }
}

/// The client's address, put into each request's extensions.
#[derive(Clone, Copy, Debug)]
struct PeerAddr(SocketAddr);

/// A TLS connection as tonic's server sees it.
struct TlsConn {
    io: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerAddr;
    fn connect_info(&self) -> PeerAddr {
        PeerAddr(self.peer)
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The serving certificate, swapped on renewal.
#[derive(Debug)]
struct ServingCert(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

fn serving_key(ca: &Ca, s: &CsrServerSettings) -> Result<Arc<CertifiedKey>, IdentityError> {
    let (chain, key) = ca.issue_server(&s.server_names, s.server_cert_lifetime)?;
    let signer = rustls::crypto::ring::sign::any_ecdsa_type(&PrivateKeyDer::Pkcs8(key))
        .map_err(|e| IdentityError::Tls(format!("serving key: {e}")))?;
    Ok(Arc::new(CertifiedKey::new(chain, signer)))
}

static ACCEPT_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));

/// Serves `service` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: TcpListener,
    service: Arc<CsrService>,
    settings: CsrServerSettings,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), IdentityError> {
    let cert = Arc::new(ServingCert(ArcSwap::new(serving_key(
        &service.ca,
        &settings,
    )?)));
    let mut cfg = ServerConfig::builder_with_provider(tls::mesh_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| IdentityError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert.clone());
    cfg.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));

    let renew = {
        let (ca, cert, s) = (service.ca.clone(), cert.clone(), settings.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(s.server_cert_lifetime / 2).await;
                match serving_key(&ca, &s) {
                    Ok(k) => cert.0.store(k),
                    Err(e) => {
                        tracing::error!(error = %e, "renewing the CSR endpoint's certificate")
                    }
                }
            }
        })
    };
    let _renew = AbortOnDrop(renew);

    let (tx, rx) = tokio::sync::mpsc::channel::<Result<TlsConn, std::io::Error>>(64);
    let handshakes = Arc::new(Semaphore::new(settings.max_handshakes.max(1)));
    let timeout = settings.handshake_timeout;
    let accept = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    if let Some(suppressed) = ACCEPT_LOG.allow() {
                        tracing::warn!(error = %e, suppressed, "CSR endpoint accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Beyond the handshake budget a connection is closed at once.
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let _ = tcp.set_nodelay(true);
                if let Ok(Ok(io)) = tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    let _ = tx.send(Ok(TlsConn { io, peer })).await;
                }
            });
        }
    });
    let _accept = AbortOnDrop(accept);
    let incoming =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    let grpc = GrpcService {
        inner: service,
        max_message: settings.max_message,
    };
    tonic::transport::Server::builder()
        .timeout(settings.request_timeout)
        .concurrency_limit_per_connection(32)
        .max_concurrent_streams(Some(32))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .http2_max_header_list_size(Some(16 * 1024))
        .serve_with_incoming_shutdown(grpc, incoming, shutdown)
        .await
        .map_err(|e| IdentityError::Tls(format!("CSR endpoint: {e}")))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

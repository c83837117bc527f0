//! The HBONE server (the waypoint's port 15008): mTLS with trust-domain
//! check, HTTP/2, one `CONNECT` per stream handed to a handler.
//!
//! A stream the client resets cancels its work: the handler's future (an
//! upstream connect, say) is dropped and the relay ends. Clients that reset
//! most of their streams right after opening them get GOAWAY, as Envoy
//! treats premature resets.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use super::headers::parse_forwarded;
use super::relay::{relay, BoxFuture, H2Stream, RelayIo, RelayStats};
use super::{HboneError, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::identity::{peer_identity, SpiffeId};
use crate::sockets::{Acceptor, FdBudget, ListenerName, NoPlace, PerSourceLimit, SourceSlot};
use crate::telemetry::LogLimit;

#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    pub max_concurrent_streams: u32,
    /// Deadline for the TLS and HTTP/2 handshakes together (slowloris).
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once; a connection beyond is closed at
    /// accept (the client retries).
    pub max_handshakes: usize,
    /// Open connections per source address; beyond, closed at accept.
    pub max_connections_per_source: usize,
    /// fds for connections and the upstream socket of each tunnel, in all
    /// and per source; beyond, a connection is closed at accept and a
    /// stream answered 503 before its handler runs. `None`: no such cap
    /// (in-process servers in tests); `shunt waypoint` derives it from its
    /// open-file limit. Without it, 1,024 connections of 200 streams each
    /// from one authenticated client could open 204,800 upstream sockets
    /// and take every fd the config reads need.
    pub fd_budget: Option<FdBudget>,
    /// A stream the client resets within this long of opening it is a
    /// premature reset (Envoy: `premature_reset_min_stream_lifetime_seconds`).
    pub premature_reset_lifetime: Duration,
    /// Once a connection has closed this many streams, it gets GOAWAY
    /// (ENHANCE_YOUR_CALM) when half or more of them were premature resets
    /// (Envoy: `premature_reset_total_stream_count`).
    pub premature_reset_streams: u32,
}

impl Default for ServerSettings {
    fn default() -> Self {
        ServerSettings {
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            max_concurrent_streams: 200,
            handshake_timeout: Duration::from_secs(10),
            // One source holds at most a quarter of the handshake places, so
            // a single slow-handshake flooder cannot starve other clients;
            // 1024 connections is far more than a node agent's pool opens.
            max_handshakes: 4096,
            max_connections_per_source: 1024,
            fd_budget: None,
            premature_reset_lifetime: Duration::from_secs(1),
            premature_reset_streams: 500,
        }
    }
}

/// A verified `CONNECT` request.
#[derive(Clone, Debug)]
pub struct InboundRequest {
    /// The client's verified SPIFFE identity (the principal).
    pub peer_identity: SpiffeId,
    /// The TCP peer of the HBONE connection.
    pub peer_addr: SocketAddr,
    /// Where the HBONE connection arrived.
    pub local_addr: SocketAddr,
    /// `:authority` (the original VIP:port).
    pub authority: SocketAddr,
    /// `Forwarded: for=`, or the TCP peer when absent. A claim only: the
    /// waypoint replaces it unless it is the certificate's workload.
    pub source_addr: SocketAddr,
    /// `Forwarded: host=` when present.
    pub forwarded_host: Option<String>,
    pub headers: HeaderMap,
}

/// What to do with a tunnel.
pub enum Decision {
    /// Answer with this status (401, 403, 503...) and end the stream.
    Refuse(StatusCode),
    /// Answer 200 and relay to this upstream connection (already
    /// connected: 200 only after the upstream connect succeeded).
    Forward(Box<dyn RelayIo>),
    /// Answer 200 at once and give the stream to this function (HTTP ports:
    /// the waypoint parses requests inside the tunnel).
    Serve(Box<dyn FnOnce(H2Stream) -> BoxFuture<()> + Send>),
}

impl Decision {
    pub fn serve<F, Fut>(f: F) -> Self
    where
        F: FnOnce(H2Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        Decision::Serve(Box::new(move |s| Box::pin(f(s))))
    }
}

pub trait ConnectHandler: Send + Sync + 'static {
    /// Decides on one tunnel; may connect upstream before answering.
    fn handle(&self, req: InboundRequest) -> impl Future<Output = Decision> + Send;
    /// Called when a `Forward` relay ends (for the access log and metrics).
    fn completed(&self, _stats: &RelayStats) {}
    /// Called when a stream was answered 400 before reaching `handle`.
    fn rejected(&self, _peer: &SpiffeId, _peer_addr: SocketAddr, _why: &str) {}
}

pub struct HboneServer {
    tls: tokio_rustls::TlsAcceptor,
    settings: ServerSettings,
    handshakes: Arc<Semaphore>,
    per_source: Arc<PerSourceLimit>,
    /// [`ServerSettings::fd_budget`]: connections weigh 1, tunnels 1.
    fds: Option<Arc<PerSourceLimit>>,
}

/// Connection-level errors of an unauthenticated port are the attacker's to
/// make: one line a second, with the count of those not written.
static CONNECTION_ERROR_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));

impl HboneServer {
    /// `tls` is typically `IdentityManager::server_config(&waypoint_id)`.
    pub fn new(tls: Arc<ServerConfig>, settings: ServerSettings) -> Self {
        HboneServer {
            tls: tokio_rustls::TlsAcceptor::from(tls),
            handshakes: Arc::new(Semaphore::new(settings.max_handshakes.max(1))),
            per_source: PerSourceLimit::new(settings.max_connections_per_source),
            fds: settings
                .fd_budget
                .map(|b| PerSourceLimit::with_total(b.per_source, b.total)),
            settings,
        }
    }

    /// Accepts connections until the task is dropped. Accept errors (out of
    /// fds...) are waited out, never returned; connections beyond the
    /// per-source or handshake budget are closed at once.
    pub async fn serve<H: ConnectHandler>(
        self: Arc<Self>,
        listener: TcpListener,
        handler: Arc<H>,
    ) -> Result<(), HboneError> {
        let mut acceptor = Acceptor::new(ListenerName::Hbone);
        loop {
            let (tcp, peer) = acceptor.accept(&listener).await;
            let Some(slot) = self.per_source.try_admit(peer.ip()) else {
                acceptor.refuse(tcp, peer, "per_source_limit");
                continue;
            };
            let fd_slot = match self.fds.as_ref().map(|f| f.admit(peer.ip(), 1)) {
                Some(Err(no)) => {
                    acceptor.refuse(tcp, peer, no.reason());
                    continue;
                }
                Some(Ok(s)) => Some(s),
                None => None,
            };
            let Ok(permit) = self.handshakes.clone().try_acquire_owned() else {
                acceptor.refuse(tcp, peer, "handshake_limit");
                continue;
            };
            let this = self.clone();
            let handler = handler.clone();
            let span =
                tracing::info_span!("hbone_inbound", peer = %crate::telemetry::LogAddr(peer));
            tokio::spawn(
                async move {
                    if let Err(e) = this.serve_admitted(tcp, peer, handler, permit).await {
                        log_connection_end(&e);
                    }
                    drop((slot, fd_slot));
                }
                .instrument(span),
            );
        }
    }

    /// Serves one accepted TCP connection (waits for a handshake place).
    pub async fn serve_connection<H: ConnectHandler>(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        handler: Arc<H>,
    ) -> Result<(), HboneError> {
        let permit = self
            .handshakes
            .clone()
            .acquire_owned()
            .await
            .expect("the handshake semaphore is never closed");
        self.serve_admitted(tcp, peer, handler, permit).await
    }

    /// Serves a connection holding a handshake place, released once the
    /// TLS and HTTP/2 handshakes are done.
    async fn serve_admitted<H: ConnectHandler>(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        handler: Arc<H>,
        handshake: OwnedSemaphorePermit,
    ) -> Result<(), HboneError> {
        let _ = tcp.set_nodelay(true);
        let local = tcp.local_addr().map_err(HboneError::Socket)?;
        let deadline = tokio::time::Instant::now() + self.settings.handshake_timeout;
        let tls = tokio::time::timeout_at(deadline, self.tls.accept(tcp))
            .await
            .map_err(|_| HboneError::Timeout(format!("TLS handshake from {peer}")))?
            .map_err(|e| HboneError::Tls(peer, e))?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(crate::identity::tls::ALPN_H2) {
            return Err(HboneError::NoAlpn(peer));
        }
        let identity = peer_identity(session.peer_certificates())?;
        tracing::debug!(identity = %identity, "HBONE connection accepted");
        let s = &self.settings;
        let h2 = h2::server::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            // h2 stops granting send capacity past this much buffered per
            // stream (400 KiB by default); a full stream window keeps the pipe full.
            .max_send_buffer_size(s.stream_window as usize)
            .max_concurrent_streams(s.max_concurrent_streams)
            .handshake::<_, Bytes>(tls);
        let mut conn = tokio::time::timeout_at(deadline, h2)
            .await
            .map_err(|_| HboneError::Timeout(format!("HTTP/2 preface from {peer}")))?
            .map_err(HboneError::H2)?;
        drop(handshake);
        let resets = Arc::new(ResetCount::new(s));
        let mut calm_down = false;
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = resets.abuse.notified(), if !calm_down => {
                    tracing::info!(identity = %identity, "client resets most streams it opens, sending GOAWAY");
                    conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
                    calm_down = true;
                    continue;
                }
            };
            let Some(r) = next else { break };
            let (req, mut respond) = r.map_err(HboneError::H2)?;
            // The upstream socket the tunnel will hold, before any work.
            let fd_slot: Option<SourceSlot> = match self.fds.as_ref().map(|f| f.admit(peer.ip(), 1))
            {
                Some(Err(no)) => {
                    refuse_stream(&mut respond, peer, no);
                    continue;
                }
                Some(Ok(s)) => Some(s),
                None => None,
            };
            let handler = handler.clone();
            let identity = identity.clone();
            let resets = resets.clone();
            tokio::spawn(
                async move {
                    let opened = Instant::now();
                    let reset = stream(req, respond, identity, peer, local, handler).await;
                    drop(fd_slot);
                    resets.stream_closed(reset && opened.elapsed() < resets.lifetime);
                }
                .in_current_span(),
            );
        }
        Ok(())
    }
}

/// How a connection ended, at a limited rate: a peer that just went away
/// (EOF, reset, broken pipe, GOAWAY) is `debug`; handshake failures and
/// timeouts are `info` (a client's problem, not the waypoint's).
fn log_connection_end(e: &HboneError) {
    if e.is_peer_gone() {
        tracing::debug!(error = %e, "HBONE connection closed by the peer");
        return;
    }
    if let Some(suppressed) = CONNECTION_ERROR_LOG.allow() {
        tracing::info!(error = %e, suppressed, "HBONE connection ended with error");
    }
}

/// Per connection: streams closed, and how many of them the client reset
/// right after opening.
struct ResetCount {
    lifetime: Duration,
    threshold: u64,
    closed: AtomicU64,
    premature: AtomicU64,
    /// Wakes the connection to send GOAWAY.
    abuse: Notify,
}

impl ResetCount {
    fn new(s: &ServerSettings) -> Self {
        ResetCount {
            lifetime: s.premature_reset_lifetime,
            threshold: u64::from(s.premature_reset_streams.max(1)),
            closed: AtomicU64::new(0),
            premature: AtomicU64::new(0),
            abuse: Notify::new(),
        }
    }

    fn stream_closed(&self, premature: bool) {
        let closed = self.closed.fetch_add(1, Ordering::Relaxed) + 1;
        let resets = if premature {
            self.premature.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.premature.load(Ordering::Relaxed)
        };
        if closed >= self.threshold && resets * 2 >= closed {
            self.abuse.notify_one();
        }
    }
}

/// Refused tunnels are a client's doing: one line a second.
static REFUSED_STREAM_LOG: LogLimit = LogLimit::new(Duration::from_secs(1));

/// A tunnel the fd budget has no room for: 503 before its handler runs,
/// counted in `shunt_refused_connections_total{listener="hbone_tunnel"}`.
fn refuse_stream(respond: &mut SendResponse<Bytes>, peer: SocketAddr, no: NoPlace) {
    respond_status(respond, StatusCode::SERVICE_UNAVAILABLE);
    crate::telemetry::count_refused_connection("hbone_tunnel", no.reason());
    if let Some(suppressed) = REFUSED_STREAM_LOG.allow() {
        tracing::warn!(
            peer = %crate::telemetry::LogAddr(peer),
            reason = no.reason(),
            suppressed,
            "fd budget spent; answering a new tunnel 503"
        );
    }
}

fn respond_status(respond: &mut SendResponse<Bytes>, status: StatusCode) {
    let resp = Response::builder()
        .status(status)
        .body(())
        .expect("static response");
    let _ = respond.send_response(resp, true);
}

/// What a `CONNECT` request names, before the handler judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectTarget {
    /// `:authority`, which must be an `ip:port` (the original VIP:port).
    pub authority: SocketAddr,
    /// `Forwarded: for=`, or the TCP peer when absent.
    pub source: SocketAddr,
    /// `Forwarded: host=` when present.
    pub forwarded_host: Option<String>,
}

/// Parses a stream's request head (a hostile client's bytes, as h2 decoded
/// them); `Err` is the reason for a 400.
pub(crate) fn parse_connect(
    parts: &http::request::Parts,
    peer: SocketAddr,
) -> Result<ConnectTarget, String> {
    if parts.method != Method::CONNECT {
        return Err(format!("method {} is not CONNECT", parts.method));
    }
    let auth = parts.uri.authority().map(|a| a.as_str()).unwrap_or("");
    let authority: SocketAddr = auth
        .parse()
        .map_err(|_| format!("authority {auth:?} is not ip:port"))?;
    let (source, forwarded_host) = match parts.headers.get(http::header::FORWARDED) {
        None => (peer, None),
        Some(v) => {
            let v = v
                .to_str()
                .map_err(|_| "Forwarded header is not text".to_string())?;
            let host = v.split(',').next().unwrap_or("").split(';').find_map(|p| {
                let (k, v) = p.trim().split_once('=')?;
                k.eq_ignore_ascii_case("host")
                    .then(|| v.trim_matches('"').to_string())
            });
            (parse_forwarded(v)?.unwrap_or(peer), host)
        }
    };
    Ok(ConnectTarget {
        authority,
        source,
        forwarded_host,
    })
}

/// Serves one stream; true when the client reset it.
async fn stream<H: ConnectHandler>(
    req: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    identity: SpiffeId,
    peer: SocketAddr,
    local: SocketAddr,
    handler: Arc<H>,
) -> bool {
    let (mut parts, recv) = req.into_parts();
    let parsed = parse_connect(&parts, peer);
    // Only the headers go on: the rest of the head would otherwise live as
    // long as the tunnel.
    let headers = std::mem::take(&mut parts.headers);
    drop(parts);
    let ConnectTarget {
        authority,
        source: source_addr,
        forwarded_host,
    } = match parsed {
        Ok(p) => p,
        Err(why) => {
            tracing::info!(identity = %identity, reason = %why, "bad HBONE request, answering 400");
            handler.rejected(&identity, peer, &why);
            respond_status(&mut respond, StatusCode::BAD_REQUEST);
            return false;
        }
    };
    let inbound = InboundRequest {
        peer_identity: identity,
        peer_addr: peer,
        local_addr: local,
        authority,
        source_addr,
        forwarded_host,
        headers,
    };
    // The handler's work (an upstream connect that may wait out its timeout
    // on a silent host) is dropped as soon as the client resets the stream.
    // The request is the handler's: nothing of it is held while relaying.
    let decision = tokio::select! {
        // Boxed, so the stream's task is not sized by the handler's future
        // (an upstream connect, a TLS handshake) for as long as it relays.
        d = Box::pin(handler.handle(inbound)) => d,
        _ = std::future::poll_fn(|cx| respond.poll_reset(cx)) => return true,
    };
    match decision {
        Decision::Refuse(status) => {
            respond_status(&mut respond, status);
            false
        }
        Decision::Forward(mut upstream) => {
            let send = match respond.send_response(Response::new(()), false) {
                Ok(s) => s,
                Err(e) => {
                    let stats = RelayStats {
                        error: Some(HboneError::from_h2(e)),
                        ..Default::default()
                    };
                    handler.completed(&stats);
                    return true;
                }
            };
            let stats = relay(&mut upstream, send, recv).await;
            handler.completed(&stats);
            matches!(stats.error, Some(HboneError::StreamReset(_)))
        }
        Decision::Serve(f) => match respond.send_response(Response::new(()), false) {
            Ok(send) => {
                f(H2Stream::new(send, recv)).await;
                false
            }
            Err(e) => {
                tracing::debug!(error = %e, "stream gone before 200");
                true
            }
        },
    }
}

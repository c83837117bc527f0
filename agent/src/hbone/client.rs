//! The HBONE client: a pool of mTLS HTTP/2 connections to waypoints, one
//! `CONNECT` stream per proxied connection.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tracing::Instrument;

use super::headers::{format_forwarded, new_traceparent};
use super::relay::{relay, H2Stream, RelayIo, RelayStats};
use super::{HboneError, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::identity::{peer_identity, IdentityManager, SpiffeId};

#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled connection before another connection is opened.
    pub max_streams_per_connection: usize,
    pub ping_interval: Duration,
    /// A connection whose PING is unanswered this long is closed.
    pub ping_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            max_streams_per_connection: 100,
            ping_interval: Duration::from_secs(10),
            ping_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One tunnel to open.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// The source workload's identity (its certificate is presented).
    pub source_identity: SpiffeId,
    /// The application's address (pod ip:port), sent as `Forwarded: for=`.
    pub source_addr: SocketAddr,
    /// Where the waypoint listens (ip:15008).
    pub waypoint_addr: SocketAddr,
    /// The identity the waypoint must present.
    pub waypoint_identity: SpiffeId,
    /// The original destination (VIP:port), sent as `:authority`.
    pub authority: SocketAddr,
    /// The service hostname, sent as `Forwarded: ...;host=`.
    pub host: Option<String>,
    /// Precomputed `baggage` value (see `Baggage::to_header`).
    pub baggage: Option<HeaderValue>,
    /// `traceparent` to propagate; a fresh one is generated when absent.
    pub traceparent: Option<HeaderValue>,
}

/// Pool key, as ztunnel: (source identity, destination SAN, source IP,
/// destination address).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PoolKey {
    src: SpiffeId,
    dst_id: SpiffeId,
    src_ip: IpAddr,
    dst: SocketAddr,
}

struct KeyPool {
    tls: Arc<ClientConfig>,
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// Serialises dialing for one key so a burst of connects opens one
    /// connection, not one each.
    dial: tokio::sync::Mutex<()>,
}

struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    active: AtomicUsize,
    opened: AtomicU64,
    dead: AtomicBool,
    peer: SpiffeId,
}

impl PooledConn {
    fn try_reserve(self: &Arc<Self>, max: usize) -> Option<StreamGuard> {
        let mut cur = self.active.load(Ordering::Acquire);
        loop {
            if cur >= max || self.dead.load(Ordering::Acquire) {
                return None;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    return Some(StreamGuard(self.clone()));
                }
                Err(c) => cur = c,
            }
        }
    }
}

/// Holds one stream slot of a pooled connection until the tunnel ends.
struct StreamGuard(Arc<PooledConn>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Opens HBONE tunnels over pooled connections.
pub struct HboneClient {
    identities: IdentityManager,
    settings: ClientSettings,
    pools: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    next_conn_id: AtomicU64,
    connections_opened: AtomicU64,
}

/// An established tunnel: `200` was received.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    peer: SpiffeId,
    connection_id: u64,
    _guard: StreamGuard,
}

impl Tunnel {
    /// The waypoint's verified identity.
    pub fn peer_identity(&self) -> &SpiffeId {
        &self.peer
    }
    /// Which pooled connection carries it (for tests and logs).
    pub fn connection_id(&self) -> u64 {
        self.connection_id
    }
    /// Relays between `io` and the tunnel until both sides end.
    pub async fn relay<S: RelayIo>(self, io: &mut S) -> RelayStats {
        let Tunnel {
            send, recv, _guard, ..
        } = self;
        let stats = relay(io, send, recv).await;
        drop(_guard);
        stats
    }
    /// The tunnel as a byte stream (the pool slot is held until it drops).
    pub fn into_stream(self) -> H2Stream {
        let mut s = H2Stream::new(self.send, self.recv);
        s.guard = Some(Box::new(self._guard));
        s
    }
}

impl HboneClient {
    pub fn new(identities: IdentityManager, settings: ClientSettings) -> Self {
        HboneClient {
            identities,
            settings,
            pools: Mutex::new(HashMap::new()),
            next_conn_id: AtomicU64::new(1),
            connections_opened: AtomicU64::new(0),
        }
    }

    /// How many HTTP/2 connections this client has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.connections_opened.load(Ordering::Relaxed)
    }

    /// Live pooled connections across all keys.
    pub fn pooled_connections(&self) -> usize {
        let pools: Vec<Arc<KeyPool>> = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        pools
            .iter()
            .map(|p| {
                p.conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .filter(|c| !c.dead.load(Ordering::Acquire))
                    .count()
            })
            .sum()
    }

    /// Opens a tunnel: one `CONNECT` on a pooled (or new) connection; an
    /// answer other than 200 is `HboneError::Status`.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<Tunnel, HboneError> {
        let pool = self.key_pool(req)?;
        let request = build_request(req)?;
        // One retry: a pooled connection may have just been closed by the peer.
        let mut last_err = None;
        for _ in 0..2 {
            let guard = self.checkout(&pool, req).await?;
            let conn = guard.0.clone();
            match send_connect(&conn, request.clone()).await {
                Ok((send, recv)) => {
                    return Ok(Tunnel {
                        send,
                        recv,
                        peer: conn.peer.clone(),
                        connection_id: conn.id,
                        _guard: guard,
                    })
                }
                Err(e @ HboneError::H2(_)) if !conn_usable(&conn) => {
                    conn.dead.store(true, Ordering::Release);
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(HboneError::StreamClosed))
    }

    fn key_pool(&self, req: &ConnectRequest) -> Result<Arc<KeyPool>, HboneError> {
        let key = PoolKey {
            src: req.source_identity.clone(),
            dst_id: req.waypoint_identity.clone(),
            src_ip: req.source_addr.ip(),
            dst: req.waypoint_addr,
        };
        if let Some(p) = self
            .pools
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(p.clone());
        }
        // Built outside the lock: it may issue a certificate.
        let tls = self
            .identities
            .client_config(&req.source_identity, vec![req.waypoint_identity.clone()])?;
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        Ok(pools
            .entry(key)
            .or_insert_with(|| {
                Arc::new(KeyPool {
                    tls,
                    conns: Mutex::new(Vec::new()),
                    dial: tokio::sync::Mutex::new(()),
                })
            })
            .clone())
    }

    fn try_pooled(&self, pool: &KeyPool) -> Option<StreamGuard> {
        let mut conns = pool.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|c| !c.dead.load(Ordering::Acquire));
        conns
            .iter()
            .find_map(|c| c.try_reserve(self.settings.max_streams_per_connection))
    }

    async fn checkout(
        &self,
        pool: &Arc<KeyPool>,
        req: &ConnectRequest,
    ) -> Result<StreamGuard, HboneError> {
        if let Some(g) = self.try_pooled(pool) {
            return Ok(g);
        }
        let _dialing = pool.dial.lock().await;
        if let Some(g) = self.try_pooled(pool) {
            return Ok(g);
        }
        let conn = tokio::time::timeout(self.settings.connect_timeout, self.dial(pool, req))
            .await
            .map_err(|_| {
                HboneError::Timeout(format!("connecting to waypoint {}", req.waypoint_addr))
            })??;
        let guard = conn
            .try_reserve(self.settings.max_streams_per_connection)
            .ok_or(HboneError::StreamClosed)?;
        pool.conns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(conn);
        Ok(guard)
    }

    async fn dial(
        &self,
        pool: &Arc<KeyPool>,
        req: &ConnectRequest,
    ) -> Result<Arc<PooledConn>, HboneError> {
        let addr = req.waypoint_addr;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| HboneError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        // No SNI is sent (enable_sni = false); the name is only a placeholder.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(pool.tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| HboneError::Tls(addr, e))?;
        let (_, session) = tls.get_ref();
        if session.alpn_protocol() != Some(crate::identity::tls::ALPN_H2) {
            return Err(HboneError::NoAlpn(addr));
        }
        let peer = peer_identity(session.peer_certificates())?;
        let s = &self.settings;
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(s.stream_window)
            .initial_connection_window_size(s.connection_window)
            .max_frame_size(s.max_frame_size)
            // h2 stops granting send capacity past this much buffered per
            // stream (400 KiB by default); a full stream window keeps the pipe full.
            .max_send_buffer_size(s.stream_window as usize)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(HboneError::H2)?;
        let ping = conn.ping_pong();
        let id = self.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let pooled = Arc::new(PooledConn {
            id,
            send,
            active: AtomicUsize::new(0),
            opened: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            peer: peer.clone(),
        });
        self.connections_opened.fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("hbone_conn", id, dst = %addr, peer = %peer, src = %req.source_identity);
        tracing::debug!(parent: &span, "connection established");
        tokio::spawn(drive(conn, ping, Arc::downgrade(&pooled), s.clone()).instrument(span));
        Ok(pooled)
    }
}

fn conn_usable(c: &PooledConn) -> bool {
    !c.dead.load(Ordering::Acquire)
}

fn build_request(req: &ConnectRequest) -> Result<Request<()>, HboneError> {
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(req.authority.to_string())
        .header(
            http::header::FORWARDED,
            format_forwarded(req.source_addr, req.host.as_deref())?,
        )
        .header(
            "traceparent",
            req.traceparent.clone().unwrap_or_else(new_traceparent),
        );
    if let Some(bg) = &req.baggage {
        b = b.header("baggage", bg.clone());
    }
    b.body(())
        .map_err(|e| HboneError::BadRequest(format!("authority {}: {e}", req.authority)))
}

async fn send_connect(
    conn: &PooledConn,
    request: Request<()>,
) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
    let mut sr = conn.send.clone().ready().await.map_err(HboneError::H2)?;
    let (resp, send) = sr.send_request(request, false).map_err(HboneError::H2)?;
    let resp = resp.await.map_err(HboneError::from_h2)?;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status(resp.status()));
    }
    Ok((send, resp.into_body()))
}

/// Drives one connection: the h2 state machine, PING keepalive and idle
/// close. The connection ends (and its streams fail) when any of them ends.
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
    pooled: Weak<PooledConn>,
    s: ClientSettings,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let watch = pooled.clone();
    let keepalive = async move {
        let mut ping = ping;
        let mut idle_for = Duration::ZERO;
        let mut last_opened = u64::MAX;
        loop {
            tokio::time::sleep(s.ping_interval).await;
            if let Some(p) = ping.as_mut() {
                match tokio::time::timeout(s.ping_timeout, p.ping(h2::Ping::opaque())).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("ping failed: {e}"),
                    Err(_) => return format!("no PING answer in {:?}", s.ping_timeout),
                }
            }
            let Some(c) = watch.upgrade() else {
                return "dropped".into();
            };
            let opened = c.opened.load(Ordering::Relaxed);
            if c.active.load(Ordering::Acquire) == 0 && opened == last_opened {
                idle_for += s.ping_interval;
                if idle_for >= s.idle_timeout {
                    // Out of the pool first so no new stream picks it.
                    c.dead.store(true, Ordering::Release);
                    if c.active.load(Ordering::Acquire) == 0 {
                        return "idle".into();
                    }
                }
            } else {
                idle_for = Duration::ZERO;
            }
            last_opened = opened;
        }
    };
    tokio::select! {
        r = conn => match r {
            Ok(()) => tracing::debug!("connection closed"),
            Err(e) => tracing::debug!(error = %e, "connection ended"),
        },
        why = keepalive => tracing::debug!(reason = %why, "closing connection"),
    }
    if let Some(c) = pooled.upgrade() {
        c.dead.store(true, Ordering::Release);
    }
}

//! Upstreams: resolution, connect with timeout, TLS origination, and a
//! pool of HTTP client connections per (host, target port, TLS settings).
//!
//! HTTP/1.1 connections go back to the pool's list as soon as a response
//! head arrives and are handed out again once hyper reports them ready
//! (the response read); an HTTP/2 upstream shares one
//! connection. A request that a pooled connection could not even start
//! (closed while idle) is retried once on a fresh connection.
//!
//! A wildcard (`Destination::Dynamic`) upstream connects nowhere itself: it
//! hands out one child upstream per concrete name the clients sent
//! ([`Upstream::for_name`]), each with its own pool and a short-lived
//! cache of its resolution, at most [`MAX_NAMES`] at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::upstream::{UpstreamConnector, UpstreamStream};

use super::body::CountingBody;

/// HTTP/1.1 connections kept per upstream (idle, or finishing a response).
const MAX_IDLE: usize = 64;
/// Concrete names a wildcard upstream keeps at once; a new name beyond
/// this evicts one not in use, or fails (503) when all are.
pub const MAX_NAMES: usize = 1024;
/// getaddrinfo reports no TTL: a wildcard name's addresses are reused for
/// this long (the TTL of shunt's own DNS answers), a failed lookup for
/// [`NEGATIVE_TTL`], so a client cannot make the waypoint resolve per
/// connection.
pub const RESOLVE_TTL: Duration = Duration::from_secs(30);
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

pub use crate::model::Destination;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 with prior knowledge (HTTP2 and GRPC ports).
    Http2,
}

/// Why an upstream connection or request failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamFailure {
    #[error("resolving {0}: {1}")]
    Resolve(String, String),
    #[error("{0}: more than {MAX_NAMES} names of this wildcard in use")]
    TooManyNames(String),
    #[error("connecting to {0}: {1}")]
    Connect(String, String),
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error("{0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(String),
}

impl UpstreamFailure {
    /// Envoy's `%UPSTREAM_TRANSPORT_FAILURE_REASON%`-like short reason.
    pub fn is_connect(&self) -> bool {
        !matches!(self, UpstreamFailure::Http(_))
    }
}

/// A connected upstream socket and its addresses.
pub struct Connected {
    pub stream: UpstreamStream,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

type H1 = http1::SendRequest<CountingBody>;
/// A lookup's result and the instant it stops being reused.
type Lookup = (Result<Vec<SocketAddr>, String>, Instant);
type H2 = http2::SendRequest<CountingBody>;

struct Idle {
    send: H1,
    peer: SocketAddr,
    local: SocketAddr,
    /// Its place in the [`IdleBudget`] once pooled.
    slot: Option<IdleSlot>,
}

/// The pooled HTTP/1.1 upstream connections of the whole waypoint (all
/// upstreams, every wildcard name), counted from the moment one is pooled
/// until it closes. Each holds an fd that no tunnel's budget counts once its
/// request is done: without a cap, 64 per upstream times every entry and
/// every wildcard name (up to [`MAX_NAMES`] each) could outgrow the fd
/// limit. Beyond the cap a connection serves its request and is not pooled
/// (it closes after its response). `shunt waypoint` sets half of its fd
/// reserve ([`crate::sockets::load_share`]); unlimited by default.
#[derive(Debug)]
pub struct IdleBudget {
    limit: usize,
    held: AtomicUsize,
}

impl Default for IdleBudget {
    fn default() -> Self {
        IdleBudget::new(usize::MAX)
    }
}

impl IdleBudget {
    pub fn new(limit: usize) -> Self {
        IdleBudget {
            limit,
            held: AtomicUsize::new(0),
        }
    }

    /// Connections pooled now.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_take(self: &Arc<Self>) -> Option<IdleSlot> {
        self.held
            .try_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.limit).then_some(n + 1)
            })
            .ok()
            .map(|_| IdleSlot(self.clone()))
    }
}

/// One pooled connection's place in the [`IdleBudget`], given back when
/// the connection is dropped.
#[derive(Debug)]
struct IdleSlot(Arc<IdleBudget>);

impl Drop for IdleSlot {
    fn drop(&mut self) {
        self.0.held.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Upstream {
    key: String,
    host: String,
    port: u16,
    resolve: Destination,
    connector: UpstreamConnector,
    protocol: UpstreamProtocol,
    timeout: Duration,
    idle: Mutex<Vec<Idle>>,
    /// Shared by every upstream of the waypoint.
    idle_budget: Arc<IdleBudget>,
    h2: tokio::sync::Mutex<Option<(H2, SocketAddr, SocketAddr)>>,
    /// `Destination::Dynamic`: the child upstream of each name.
    children: Mutex<HashMap<String, Arc<Upstream>>>,
    /// A wildcard's child: its last lookup and until when it holds.
    cached: Option<Mutex<Option<Lookup>>>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream").field("key", &self.key).finish()
    }
}

/// A response and where it came from.
pub struct Sent {
    pub response: Response<Incoming>,
    pub peer: SocketAddr,
    pub local: SocketAddr,
}

impl Upstream {
    pub fn new(
        key: String,
        host: String,
        port: u16,
        resolve: Destination,
        connector: UpstreamConnector,
        protocol: UpstreamProtocol,
        timeout: Duration,
    ) -> Self {
        Upstream {
            idle_budget: Arc::default(),
            key,
            host,
            port,
            resolve,
            connector,
            protocol,
            timeout,
            idle: Mutex::new(Vec::new()),
            h2: tokio::sync::Mutex::new(None),
            children: Mutex::new(HashMap::new()),
            cached: None,
        }
    }

    /// Pools its connections within `budget` (the waypoint's, shared).
    pub fn with_idle_budget(mut self, budget: Arc<IdleBudget>) -> Self {
        self.idle_budget = budget;
        self
    }

    /// Whether the destination is the name each client sends.
    pub fn is_dynamic(&self) -> bool {
        self.resolve == Destination::Dynamic
    }

    /// The upstream for `name`: this one, or for a wildcard the child of
    /// that (lower-cased) name, created on first use. The caller has
    /// checked that the name is one the target accepts.
    pub fn for_name(self: &Arc<Self>, name: &str) -> Result<Arc<Upstream>, UpstreamFailure> {
        if !self.is_dynamic() {
            return Ok(self.clone());
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = children.get(&name) {
            return Ok(c.clone());
        }
        if children.len() >= MAX_NAMES {
            // Drop one no tunnel or request holds (its idle pool goes too).
            let unused = children
                .iter()
                .find(|(_, c)| Arc::strong_count(c) == 1)
                .map(|(n, _)| n.clone());
            match unused {
                Some(n) => {
                    children.remove(&n);
                }
                None => return Err(UpstreamFailure::TooManyNames(self.host.clone())),
            }
        }
        let mut child = Upstream::new(
            format!("{}|{name}", self.key),
            name.clone(),
            self.port,
            Destination::Dns(vec![(name.clone(), self.port)]),
            self.connector.clone(),
            self.protocol,
            self.timeout,
        );
        child.idle_budget = self.idle_budget.clone();
        child.cached = Some(Mutex::new(None));
        let child = Arc::new(child);
        children.insert(name, child.clone());
        Ok(child)
    }

    /// Names resolved through a wildcard so far (for `/config_dump`).
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .children
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// getaddrinfo for each name; for a wildcard's child, through its cache.
    async fn lookup(&self, names: &[(String, u16)]) -> Result<Vec<SocketAddr>, String> {
        if let Some(cache) = &self.cached {
            let hit = cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .filter(|(_, until)| Instant::now() < *until)
                .map(|(r, _)| r.clone());
            if let Some(r) = hit {
                return r;
            }
        }
        let mut out = Vec::new();
        let mut last_err = None;
        for (h, p) in names {
            match tokio::net::lookup_host((h.as_str(), *p)).await {
                Ok(it) => out.extend(it),
                Err(e) => last_err = Some(format!("{h}: {e}")),
            }
        }
        let r = if out.is_empty() {
            Err(last_err.unwrap_or_else(|| "no addresses".into()))
        } else {
            Ok(out)
        };
        if let Some(cache) = &self.cached {
            let ttl = if r.is_ok() { RESOLVE_TTL } else { NEGATIVE_TTL };
            *cache.lock().unwrap_or_else(|e| e.into_inner()) =
                Some((r.clone(), Instant::now() + ttl));
        }
        r
    }

    pub fn key(&self) -> &str {
        &self.key
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn originates_tls(&self) -> bool {
        self.connector.originates_tls()
    }
    pub fn describe(&self) -> String {
        match &self.resolve {
            Destination::Dns(n) => n
                .iter()
                .map(|(h, p)| format!("dns:{h}:{p}"))
                .collect::<Vec<_>>()
                .join(","),
            Destination::Static(a) => a
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            Destination::Original => format!("original-destination:{}", self.port),
            Destination::Dynamic => format!("dynamic-dns:{}:{}", self.host, self.port),
        }
    }

    /// Resolves, connects (with the timeout, trying each address) and
    /// originates TLS when configured. `original` is the tunnel's VIP:port.
    pub async fn connect(&self, original: SocketAddr) -> Result<Connected, UpstreamFailure> {
        let what = || match &self.resolve {
            Destination::Dns(n) if n.len() == 1 => format!("{}:{}", n[0].0, n[0].1),
            _ => format!("{}:{}", self.host, self.port),
        };
        let fut = async {
            let addrs: Vec<SocketAddr> = match &self.resolve {
                Destination::Static(a) => a.clone(),
                Destination::Original => vec![SocketAddr::new(original.ip(), self.port)],
                Destination::Dns(names) => self
                    .lookup(names)
                    .await
                    .map_err(|e| UpstreamFailure::Resolve(what(), e))?,
                // Never connected itself: `for_name` gives the child.
                Destination::Dynamic => {
                    return Err(UpstreamFailure::Resolve(
                        what(),
                        "a wildcard destination needs the client's name".into(),
                    ))
                }
            };
            let mut last = None;
            for a in addrs {
                match TcpStream::connect(a).await {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        let local = tcp.local_addr().unwrap_or(a);
                        let stream = self
                            .connector
                            .connect(tcp, &self.host)
                            .await
                            .map_err(|e| UpstreamFailure::Tls(e.to_string()))?;
                        return Ok(Connected {
                            stream,
                            peer: a,
                            local,
                        });
                    }
                    Err(e) => last = Some(format!("{a}: {e}")),
                }
            }
            Err(UpstreamFailure::Connect(
                what(),
                last.unwrap_or_else(|| "no addresses".into()),
            ))
        };
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(UpstreamFailure::Timeout(what())),
        }
    }

    /// Sends one request over a pooled (or new) connection.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<CountingBody>,
        original: SocketAddr,
    ) -> Result<Sent, UpstreamFailure> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_h1(req, original).await,
            UpstreamProtocol::Http2 => self.send_h2(req, original).await,
        }
    }

    /// A pooled connection ready for a request. Closed ones are dropped;
    /// one still carrying its last response stays for a later request.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|c| !c.send.is_closed());
        let i = idle.iter().rposition(|c| c.send.is_ready())?;
        Some(idle.swap_remove(i))
    }

    async fn new_h1(&self, original: SocketAddr) -> Result<Idle, UpstreamFailure> {
        let c = self.connect(original).await?;
        let (send, conn) = http1::Builder::new()
            .handshake(TokioIo::new(c.stream))
            .await
            .map_err(|e| UpstreamFailure::Http(e.to_string()))?;
        let peer = c.peer;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/1.1 connection ended");
                }
            }
            .instrument(tracing::debug_span!("upstream", peer = %crate::telemetry::LogAddr(peer))),
        );
        Ok(Idle {
            send,
            peer: c.peer,
            local: c.local,
            slot: None,
        })
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<CountingBody>,
        original: SocketAddr,
    ) -> Result<Sent, UpstreamFailure> {
        let mut pooled = self.take_idle();
        loop {
            let from_pool = pooled.is_some();
            let mut c = match pooled.take() {
                Some(c) => c,
                None => self.new_h1(original).await?,
            };
            match c.send.try_send_request(req).await {
                Ok(response) => {
                    let (peer, local) = (c.peer, c.local);
                    // Back to the pool at once (no task per request to wait
                    // for it): `take_idle` hands it out only once hyper
                    // reports it ready, after this response has been read.
                    let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                    if idle.len() < MAX_IDLE {
                        if c.slot.is_none() {
                            c.slot = self.idle_budget.try_take();
                        }
                        if c.slot.is_some() {
                            idle.push(c);
                        }
                    }
                    drop(idle);
                    return Ok(Sent {
                        response,
                        peer,
                        local,
                    });
                }
                Err(mut e) => match e.take_message() {
                    // The idle connection died before the request started:
                    // nothing was sent, try a fresh one.
                    Some(r) if from_pool => req = r,
                    _ => return Err(UpstreamFailure::Http(e.into_error().to_string())),
                },
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        req: Request<CountingBody>,
        original: SocketAddr,
    ) -> Result<Sent, UpstreamFailure> {
        let (mut send, peer, local) = {
            let mut g = self.h2.lock().await;
            match &*g {
                Some((s, p, l)) if !s.is_closed() => (s.clone(), *p, *l),
                _ => {
                    let c = self.connect(original).await?;
                    let (s, conn) = http2::Builder::new(TokioExecutor::new())
                        .handshake(TokioIo::new(c.stream))
                        .await
                        .map_err(|e| UpstreamFailure::Http(e.to_string()))?;
                    tokio::spawn(async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                        }
                    });
                    *g = Some((s.clone(), c.peer, c.local));
                    (s, c.peer, c.local)
                }
            }
        };
        let response = send
            .send_request(req)
            .await
            .map_err(|e| UpstreamFailure::Http(e.to_string()))?;
        Ok(Sent {
            response,
            peer,
            local,
        })
    }
}

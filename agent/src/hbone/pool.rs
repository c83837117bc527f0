//! The keyed pool of HTTP/2 connections the HBONE client multiplexes
//! tunnels over. It knows nothing of TLS or CONNECT: the caller hands it a
//! dial function, and gets back a reserved stream slot on a connection.
//!
//! - Connections are kept per [`PoolKey`] and reused while they have fewer
//!   than `max_streams_per_connection` open streams; a full one makes the
//!   next caller open another.
//! - One dial per key at a time: concurrent callers that find no free slot
//!   wait for the dial in flight and share its outcome (a burst of 1,000
//!   connects opens one connection, and a dead waypoint costs one timeout,
//!   not one per caller).
//! - A connection leaves the pool when it ends, when the caller marks it
//!   closed (GOAWAY, I/O error), or after `idle_timeout` without streams;
//!   the key goes with its last connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::future::{FutureExt, Shared};
use h2::client::SendRequest;
use tokio::time::Instant;
use tracing::Instrument;

use super::HboneError;
use crate::identity::SpiffeId;

/// Who a pooled connection is for, as ztunnel keys its pool: connections
/// are never shared between source identities or source addresses.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The identity whose certificate the connection presents.
    pub source_identity: SpiffeId,
    /// The source workload's IP.
    pub source_ip: IpAddr,
    /// The identity the peer must present.
    pub destination_identity: SpiffeId,
    /// The peer's HBONE address (ip:15008).
    pub destination: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct PoolSettings {
    /// Open streams per connection before another connection is dialed.
    pub max_streams_per_connection: usize,
    /// A connection with no streams for this long is closed.
    pub idle_timeout: Duration,
}

/// A freshly dialed connection, handed to the pool.
pub struct Dialed {
    pub send: SendRequest<Bytes>,
    /// The peer's verified identity.
    pub peer: SpiffeId,
    /// Drives the connection (h2 state machine, keepalive); ends when the
    /// connection does. The pool runs it in its own task.
    pub driver: Pin<Box<dyn Future<Output = ()> + Send>>,
}

/// Set in `PooledConn::state` once the connection takes no new streams;
/// the low bits count open streams.
const CLOSED: usize = 1 << (usize::BITS - 1);

/// One HTTP/2 connection in the pool.
pub struct PooledConn {
    id: u64,
    send: SendRequest<Bytes>,
    peer: SpiffeId,
    /// Open streams, plus `CLOSED` once no new stream may use it.
    state: AtomicUsize,
    /// When a stream last started or ended (ms since the pool's epoch).
    last_used_ms: AtomicU64,
}

impl PooledConn {
    /// Which connection this is (unique per pool; for tests and logs).
    pub fn id(&self) -> u64 {
        self.id
    }
    pub fn peer(&self) -> &SpiffeId {
        &self.peer
    }
    /// A handle to open streams with.
    pub fn sender(&self) -> SendRequest<Bytes> {
        self.send.clone()
    }
    /// Takes the connection out of the pool: open streams finish, new ones
    /// go elsewhere (the peer sent GOAWAY, or the connection failed).
    pub fn close(&self) {
        self.state.fetch_or(CLOSED, Ordering::AcqRel);
    }
    pub fn is_closed(&self) -> bool {
        self.state.load(Ordering::Acquire) & CLOSED != 0
    }
    fn open_streams(&self) -> usize {
        self.state.load(Ordering::Acquire) & !CLOSED
    }

    fn try_reserve(self: &Arc<Self>, max: usize, epoch: Instant) -> Option<StreamSlot> {
        let mut cur = self.state.load(Ordering::Acquire);
        loop {
            // `CLOSED` makes `cur` exceed any `max`.
            if cur >= max {
                return None;
            }
            match self.state.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.last_used_ms.store(ms_since(epoch), Ordering::Relaxed);
                    return Some(StreamSlot {
                        conn: self.clone(),
                        epoch,
                    });
                }
                Err(c) => cur = c,
            }
        }
    }

    /// Closes the connection only if no stream is open, atomically with
    /// reservations (a stream that just reserved keeps it open).
    fn try_close_idle(&self) -> bool {
        self.state
            .compare_exchange(0, CLOSED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// One stream's place on a pooled connection, held until the tunnel ends.
pub struct StreamSlot {
    conn: Arc<PooledConn>,
    /// The pool's epoch, to stamp the release time.
    epoch: Instant,
}

impl StreamSlot {
    pub fn conn(&self) -> &Arc<PooledConn> {
        &self.conn
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.conn
            .last_used_ms
            .store(ms_since(self.epoch), Ordering::Relaxed);
        self.conn.state.fetch_sub(1, Ordering::AcqRel);
    }
}

type DialOutcome = Result<Arc<PooledConn>, Arc<HboneError>>;
type SharedDial = Shared<Pin<Box<dyn Future<Output = DialOutcome> + Send>>>;

struct KeyPool {
    conns: Mutex<Vec<Arc<PooledConn>>>,
    /// The dial in flight for this key, shared by every caller waiting.
    dialing: Mutex<Option<SharedDial>>,
}

struct Inner {
    settings: PoolSettings,
    keys: Mutex<HashMap<PoolKey, Arc<KeyPool>>>,
    epoch: Instant,
    next_id: AtomicU64,
    opened: AtomicU64,
}

/// The keyed connection pool.
pub struct Pool {
    inner: Arc<Inner>,
}

fn ms_since(epoch: Instant) -> u64 {
    epoch.elapsed().as_millis() as u64
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    pub fn new(settings: PoolSettings) -> Self {
        Pool {
            inner: Arc::new(Inner {
                settings,
                keys: Mutex::new(HashMap::new()),
                epoch: Instant::now(),
                next_id: AtomicU64::new(1),
                opened: AtomicU64::new(0),
            }),
        }
    }

    /// Connections dialed so far.
    pub fn connections_opened(&self) -> u64 {
        self.inner.opened.load(Ordering::Relaxed)
    }

    /// Connections in the pool that still take new streams.
    pub fn open_connections(&self) -> usize {
        let keys: Vec<Arc<KeyPool>> = lock(&self.inner.keys).values().cloned().collect();
        keys.iter()
            .map(|k| lock(&k.conns).iter().filter(|c| !c.is_closed()).count())
            .sum()
    }

    /// Keys with a connection or a dial in flight.
    pub fn keys(&self) -> usize {
        lock(&self.inner.keys).len()
    }

    /// A stream slot on a pooled connection for `key`, dialing with `dial`
    /// when none has room (joining the dial in flight when there is one).
    pub async fn checkout<D, F>(&self, key: &PoolKey, dial: D) -> Result<StreamSlot, HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Dialed, HboneError>> + Send + 'static,
    {
        let kp = self.key_pool(key);
        let res = self.checkout_in(key, &kp, dial).await;
        if res.is_err() {
            drop(kp);
            self.inner.forget_if_unused(key);
        }
        res
    }

    async fn checkout_in<D, F>(
        &self,
        key: &PoolKey,
        kp: &Arc<KeyPool>,
        dial: D,
    ) -> Result<StreamSlot, HboneError>
    where
        D: Fn() -> F,
        F: Future<Output = Result<Dialed, HboneError>> + Send + 'static,
    {
        let max = self.inner.settings.max_streams_per_connection;
        loop {
            if let Some(slot) = self.try_pooled(kp, max) {
                return Ok(slot);
            }
            let shared = {
                let mut dialing = lock(&kp.dialing);
                match &*dialing {
                    Some(d) => d.clone(),
                    None => {
                        let d = self.start_dial(key, kp, dial());
                        *dialing = Some(d.clone());
                        d
                    }
                }
            };
            let outcome = shared.await;
            if let Err(e) = outcome {
                // A lone caller gets the error itself; waiters share it.
                return Err(Arc::try_unwrap(e).unwrap_or_else(HboneError::Dial));
            }
            // The new connection is in the pool; take a slot (or, if the
            // callers that waited filled it, dial again).
        }
    }

    fn try_pooled(&self, kp: &KeyPool, max: usize) -> Option<StreamSlot> {
        let mut conns = lock(&kp.conns);
        conns.retain(|c| !c.is_closed());
        conns
            .iter()
            .find_map(|c| c.try_reserve(max, self.inner.epoch))
    }

    fn key_pool(&self, key: &PoolKey) -> Arc<KeyPool> {
        lock(&self.inner.keys)
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(KeyPool {
                    conns: Mutex::new(Vec::new()),
                    dialing: Mutex::new(None),
                })
            })
            .clone()
    }

    /// Starts the dial in its own task (it completes even if every caller
    /// waiting for it gives up); once, it puts the connection in the pool
    /// and starts its driver. Every waiting caller gets its outcome.
    fn start_dial<F>(&self, key: &PoolKey, kp: &Arc<KeyPool>, dial: F) -> SharedDial
    where
        F: Future<Output = Result<Dialed, HboneError>> + Send + 'static,
    {
        let inner = Arc::downgrade(&self.inner);
        let kp = Arc::downgrade(kp);
        let key = key.clone();
        let task = tokio::spawn(async move {
            let out = add_dialed(&inner, &kp, &key, dial.await);
            if let Some(kp) = kp.upgrade() {
                *lock(&kp.dialing) = None;
            }
            if out.is_err() {
                if let Some(i) = inner.upgrade() {
                    i.forget_if_unused(&key);
                }
            }
            out
        });
        let joined: Pin<Box<dyn Future<Output = DialOutcome> + Send>> =
            Box::pin(task.map(|r| r.unwrap_or_else(|_| Err(Arc::new(HboneError::StreamClosed)))));
        joined.shared()
    }
}

fn add_dialed(
    inner: &Weak<Inner>,
    kp: &Weak<KeyPool>,
    key: &PoolKey,
    dialed: Result<Dialed, HboneError>,
) -> DialOutcome {
    let d = dialed.map_err(Arc::new)?;
    let (Some(inner), Some(kp)) = (inner.upgrade(), kp.upgrade()) else {
        return Err(Arc::new(HboneError::StreamClosed));
    };
    let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
    let conn = Arc::new(PooledConn {
        id,
        send: d.send,
        peer: d.peer,
        state: AtomicUsize::new(0),
        last_used_ms: AtomicU64::new(ms_since(inner.epoch)),
    });
    inner.opened.fetch_add(1, Ordering::Relaxed);
    lock(&kp.conns).push(conn.clone());
    let span = tracing::info_span!("hbone_conn", id, dst = %key.destination, peer = %conn.peer, src = %key.source_identity);
    tracing::debug!(parent: &span, "connection established");
    tokio::spawn(
        run(
            Arc::downgrade(&inner),
            key.clone(),
            Arc::downgrade(&conn),
            d.driver,
        )
        .instrument(span),
    );
    Ok(conn)
}

impl Inner {
    /// Drops `key` when it has no connection and nobody is using it (a
    /// caller in `checkout` holds a reference to it).
    fn forget_if_unused(&self, key: &PoolKey) {
        let mut keys = lock(&self.keys);
        if let Some(kp) = keys.get(key) {
            lock(&kp.conns).retain(|c| !c.is_closed());
            if lock(&kp.conns).is_empty() && Arc::strong_count(kp) == 1 {
                keys.remove(key);
            }
        }
    }
}

/// Runs one connection until it ends or idles out, then takes it (and its
/// key, if that was the last connection) out of the pool.
async fn run(
    inner: Weak<Inner>,
    key: PoolKey,
    conn: Weak<PooledConn>,
    driver: Pin<Box<dyn Future<Output = ()> + Send>>,
) {
    let idle = {
        let inner = inner.clone();
        let conn = conn.clone();
        async move {
            loop {
                let (Some(i), Some(c)) = (inner.upgrade(), conn.upgrade()) else {
                    return "pool dropped";
                };
                let timeout_ms = i.settings.idle_timeout.as_millis() as u64;
                let now = ms_since(i.epoch);
                let due = c.last_used_ms.load(Ordering::Relaxed) + timeout_ms;
                if c.open_streams() == 0 && now >= due && c.try_close_idle() {
                    return "idle";
                }
                let wait = if now >= due {
                    // Streams are open: look again after another idle period.
                    timeout_ms
                } else {
                    due - now
                };
                drop((i, c));
                tokio::time::sleep(Duration::from_millis(wait.max(1))).await;
            }
        }
    };
    tokio::select! {
        () = driver => tracing::debug!("connection ended"),
        why = idle => tracing::debug!(reason = why, "closing connection"),
    }
    if let Some(c) = conn.upgrade() {
        c.close();
    }
    if let Some(i) = inner.upgrade() {
        i.forget_if_unused(&key);
    }
}

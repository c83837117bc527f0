//! The HBONE client's protocol side: one `CONNECT` stream per proxied
//! connection, with ztunnel's headers, on a connection from the keyed
//! [`Pool`] (dialed by the [`Dialer`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderValue, Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::dial::{DialSettings, Dialer};
use super::headers::{format_forwarded, new_traceparent};
use super::pool::{Pool, PoolKey, PoolSettings, StreamSlot};
use super::relay::{relay, H2Stream, RelayIo, RelayStats};
use super::{HboneError, CONNECTION_WINDOW, MAX_FRAME_SIZE, STREAM_WINDOW};
use crate::identity::{IdentityManager, SpiffeId};

/// Everything about the client's connections (`shunt agent --hbone-*`).
#[derive(Clone, Debug)]
pub struct ClientSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// Streams per pooled connection before another connection is opened.
    pub max_streams_per_connection: usize,
    /// A PING is sent this often on every connection.
    pub keepalive_interval: Duration,
    /// A connection whose PING is unanswered this long is closed.
    pub keepalive_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
    /// A connection with no streams for this long is closed (and its pool
    /// key forgotten with its last connection).
    pub idle_timeout: Duration,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            max_frame_size: MAX_FRAME_SIZE,
            max_streams_per_connection: 100,
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl ClientSettings {
    fn dial(&self) -> DialSettings {
        DialSettings {
            stream_window: self.stream_window,
            connection_window: self.connection_window,
            max_frame_size: self.max_frame_size,
            keepalive_interval: self.keepalive_interval,
            keepalive_timeout: self.keepalive_timeout,
            connect_timeout: self.connect_timeout,
        }
    }
    fn pool(&self) -> PoolSettings {
        PoolSettings {
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            idle_timeout: self.idle_timeout,
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

/// Opens HBONE tunnels over pooled connections.
pub struct HboneClient {
    dialer: Arc<Dialer>,
    pool: Pool,
}

/// An established tunnel: `200` was received.
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    slot: StreamSlot,
    /// Bytes already sent with the `CONNECT` ([`HboneClient::connect_early`]).
    early: u64,
}

impl Tunnel {
    /// The waypoint's verified identity.
    pub fn peer_identity(&self) -> &SpiffeId {
        self.slot.conn().peer()
    }
    /// Which pooled connection carries it (for tests and logs).
    pub fn connection_id(&self) -> u64 {
        self.slot.conn().id()
    }
    /// Relays between `io` and the tunnel until both sides end.
    pub async fn relay<S: RelayIo>(self, io: &mut S) -> RelayStats {
        let Tunnel {
            send,
            recv,
            slot,
            early,
        } = self;
        let mut stats = relay(io, send, recv).await;
        stats.bytes_sent += early;
        drop(slot);
        stats
    }
    /// The tunnel as a byte stream (the pool slot is held until it drops).
    pub fn into_stream(self) -> H2Stream {
        let mut s = H2Stream::new(self.send, self.recv);
        s.guard = Some(Box::new(self.slot));
        s
    }
}

impl HboneClient {
    pub fn new(identities: IdentityManager, settings: ClientSettings) -> Self {
        HboneClient {
            dialer: Arc::new(Dialer::new(identities, settings.dial())),
            pool: Pool::new(settings.pool()),
        }
    }

    /// How many HTTP/2 connections this client has opened so far.
    pub fn connections_opened(&self) -> u64 {
        self.pool.connections_opened()
    }

    /// Live pooled connections across all keys.
    pub fn pooled_connections(&self) -> usize {
        self.pool.open_connections()
    }

    /// Pool keys (source, waypoint pairs) with a connection or a dial.
    pub fn pool_keys(&self) -> usize {
        self.pool.keys()
    }

    /// Opens a tunnel: one `CONNECT` on a pooled (or new) connection; an
    /// answer other than 200 is `HboneError::Status`.
    pub async fn connect(&self, req: &ConnectRequest) -> Result<Tunnel, HboneError> {
        self.open(req, None::<&mut tokio::io::Empty>).await
    }

    /// [`connect`](Self::connect), sending right behind the `CONNECT` what
    /// `io` says before the 200 arrives (one read, at most [`EARLY_MAX`]
    /// bytes): a client that speaks first (an HTTP request) saves the
    /// round trip to the waypoint and back. The waypoint holds those bytes
    /// in the stream, under its flow control, until it has authorized the
    /// tunnel and connected upstream; a refused tunnel drops them with the
    /// stream, so nothing reaches anyone the 200 would not have let through.
    pub async fn connect_early<S: AsyncRead + Unpin>(
        &self,
        req: &ConnectRequest,
        io: &mut S,
    ) -> Result<Tunnel, HboneError> {
        self.open(req, Some(io)).await
    }

    async fn open<S: AsyncRead + Unpin>(
        &self,
        req: &ConnectRequest,
        mut io: Option<&mut S>,
    ) -> Result<Tunnel, HboneError> {
        let key = PoolKey {
            source_identity: req.source_identity.clone(),
            source_ip: req.source_addr.ip(),
            destination_identity: req.waypoint_identity.clone(),
            destination: req.waypoint_addr,
        };
        let request = build_request(req)?;
        // A pooled connection may have just been closed or sent GOAWAY: the
        // stream never started, so it is safe to try another connection.
        let mut early = Early::default();
        let mut last_err = None;
        for _ in 0..CONNECT_ATTEMPTS {
            let slot = self.pool.checkout(&key, || self.dialer.dial(&key)).await?;
            match send_connect(slot.conn().sender(), request.clone(), &mut early, &mut io).await {
                Ok((send, recv)) => {
                    let early = early.sent.map_or(0, |b| b.len() as u64);
                    return Ok(Tunnel {
                        send,
                        recv,
                        slot,
                        early,
                    });
                }
                // Once bytes went out, only a peer that says it never
                // processed the stream may get them again: a broken
                // connection may have carried them upstream already.
                Err(e)
                    if (early.sent.is_none()
                        && (slot.conn().is_closed() || connection_gone(&e)))
                        || never_processed(&e) =>
                {
                    slot.conn().close();
                    last_err = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_err.unwrap_or(HboneError::StreamClosed))
    }
}

/// The most sent ahead of the 200: one read of a request head's size.
pub const EARLY_MAX: usize = 4096;

/// What was read from the client while the `CONNECT` was in flight, kept
/// until the 200 so that a retry on another connection sends it again.
#[derive(Default)]
struct Early {
    sent: Option<Bytes>,
    /// The client already half-closed: read no more early.
    done: bool,
}

/// Tries per tunnel when pooled connections turn out to be gone.
const CONNECT_ATTEMPTS: usize = 3;

/// The connection, not this stream, failed: the stream was never processed
/// (GOAWAY, REFUSED_STREAM) or the connection is broken.
fn connection_gone(e: &HboneError) -> bool {
    never_processed(e) || matches!(e, HboneError::H2(e) if e.is_io())
}

/// The peer says it did not process the stream (RFC 9113 §8.7): a GOAWAY
/// whose last stream id is below it, or REFUSED_STREAM.
fn never_processed(e: &HboneError) -> bool {
    match e {
        HboneError::H2(e) => e.is_go_away() || e.reason() == Some(Reason::REFUSED_STREAM),
        HboneError::StreamReset(r) => *r == Reason::REFUSED_STREAM,
        _ => false,
    }
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

async fn send_connect<S: AsyncRead + Unpin>(
    sender: SendRequest<Bytes>,
    request: Request<()>,
    early: &mut Early,
    io: &mut Option<&mut S>,
) -> Result<(SendStream<Bytes>, RecvStream), HboneError> {
    let mut sr = sender.ready().await.map_err(HboneError::H2)?;
    let (resp, mut send) = sr.send_request(request, false).map_err(HboneError::H2)?;
    if let Some(b) = &early.sent {
        // A retry: the first stream was never processed.
        send.send_data(b.clone(), false).map_err(HboneError::H2)?;
    }
    tokio::pin!(resp);
    let resp = match io {
        Some(io) if early.sent.is_none() && !early.done => {
            let mut buf = [0u8; EARLY_MAX];
            tokio::select! {
                biased;
                r = &mut resp => r,
                n = io.read(&mut buf) => {
                    match n {
                        Ok(0) => early.done = true,
                        Ok(n) => {
                            let b = Bytes::copy_from_slice(&buf[..n]);
                            send.send_data(b.clone(), false).map_err(HboneError::H2)?;
                            early.sent = Some(b);
                        }
                        Err(e) => return Err(HboneError::Socket(e)),
                    }
                    (&mut resp).await
                }
            }
        }
        _ => resp.await,
    };
    let resp = resp.map_err(HboneError::from_h2)?;
    if resp.status() != StatusCode::OK {
        return Err(HboneError::Status(resp.status()));
    }
    Ok((send, resp.into_body()))
}

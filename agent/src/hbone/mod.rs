//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS, as ztunnel speaks them.
//! The node agent's side: `client` (the CONNECT protocol) over `pool`
//! (keyed HTTP/2 connections) dialed by `dial` (TCP, TLS, handshake,
//! keepalive). The waypoint's side: `server` (port 15008). `relay` moves
//! the bytes, `headers` formats and parses what rides on a CONNECT.

pub mod client;
pub mod dial;
pub mod headers;
pub mod pool;
pub mod relay;
pub mod server;

use std::net::SocketAddr;

pub use client::{ClientSettings, ConnectRequest, HboneClient, Tunnel};
pub use headers::{format_forwarded, new_traceparent, parse_forwarded, Baggage};
pub use pool::PoolKey;
pub use relay::{relay, H2Stream, RelayIo, RelayStats};
pub use server::{ConnectHandler, Decision, HboneServer, InboundRequest, ServerSettings};

use crate::identity::IdentityError;

/// HTTP/2 settings from ztunnel (reference.md).
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
pub const MAX_FRAME_SIZE: u32 = 1024 * 1024;
pub const HBONE_PORT: u16 = 15008;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("connecting to {0}: {1}")]
    Connect(SocketAddr, #[source] std::io::Error),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, #[source] std::io::Error),
    #[error("peer {0} did not negotiate ALPN h2")]
    NoAlpn(SocketAddr),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("identity: {0}")]
    Identity(#[from] IdentityError),
    #[error("HTTP/2: {0}")]
    H2(#[source] h2::Error),
    #[error("stream reset by peer ({0:?})")]
    StreamReset(h2::Reason),
    #[error("stream closed by peer")]
    StreamClosed,
    #[error("tunnel refused with HTTP status {0}")]
    Status(http::StatusCode),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("socket: {0}")]
    Socket(#[source] std::io::Error),
    /// A dial shared by every caller that waited for it.
    #[error(transparent)]
    Dial(std::sync::Arc<HboneError>),
}

impl HboneError {
    pub(crate) fn from_h2(e: h2::Error) -> Self {
        match e.reason() {
            Some(r) if e.is_reset() && e.is_remote() => HboneError::StreamReset(r),
            _ => HboneError::H2(e),
        }
    }
    /// The peer closed or reset (EOF, RST, broken pipe, a reset stream, a
    /// GOAWAY without error): a normal end of a connection or stream, to be
    /// logged as such rather than as a failure.
    pub fn is_peer_gone(&self) -> bool {
        let io_gone = is_peer_gone_io;
        match self {
            HboneError::StreamReset(r) => matches!(*r, h2::Reason::CANCEL | h2::Reason::NO_ERROR),
            HboneError::StreamClosed => true,
            HboneError::Tls(_, e) | HboneError::Socket(e) => io_gone(e),
            HboneError::H2(e) => {
                e.get_io().is_some_and(io_gone)
                    || (e.is_remote() && e.reason() == Some(h2::Reason::NO_ERROR))
                    || (e.is_reset() && e.reason() == Some(h2::Reason::CANCEL))
            }
            _ => false,
        }
    }

    /// The HTTP status a refused tunnel carried.
    pub fn status(&self) -> Option<http::StatusCode> {
        match self {
            HboneError::Status(s) => Some(*s),
            HboneError::Dial(e) => e.status(),
            _ => None,
        }
    }
}

/// A socket error that only says the other end closed or reset (EOF, RST,
/// broken pipe): a normal end of a connection, logged as such.
pub fn is_peer_gone_io(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

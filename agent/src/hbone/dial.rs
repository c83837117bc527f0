//! Dialing one HBONE connection: TCP connect, mutual TLS with the expected
//! peer identity, the HTTP/2 handshake with ztunnel's settings, and the
//! driver that keeps it alive with PINGs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use super::pool::{Dialed, PoolKey};
use super::HboneError;
use crate::identity::{peer_identity, IdentityManager};

/// How connections are dialed and kept alive.
#[derive(Clone, Debug)]
pub struct DialSettings {
    pub stream_window: u32,
    pub connection_window: u32,
    pub max_frame_size: u32,
    /// A PING is sent this often on every connection.
    pub keepalive_interval: Duration,
    /// A connection whose PING is unanswered this long is closed.
    pub keepalive_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes.
    pub connect_timeout: Duration,
}

/// Dials connections for pool keys with the identities' certificates.
pub struct Dialer {
    identities: IdentityManager,
    settings: DialSettings,
}

impl Dialer {
    pub fn new(identities: IdentityManager, settings: DialSettings) -> Self {
        Dialer {
            identities,
            settings,
        }
    }

    /// One connection for `key`, within the connect timeout.
    pub fn dial(
        self: &Arc<Self>,
        key: &PoolKey,
    ) -> impl std::future::Future<Output = Result<Dialed, HboneError>> + Send + 'static {
        let this = self.clone();
        let key = key.clone();
        async move {
            let addr = key.destination;
            tokio::time::timeout(this.settings.connect_timeout, this.dial_now(&key))
                .await
                .map_err(|_| HboneError::Timeout(format!("connecting to waypoint {addr}")))?
        }
    }

    async fn dial_now(&self, key: &PoolKey) -> Result<Dialed, HboneError> {
        let addr = key.destination;
        // A remote CA's first certificate for this identity is awaited here.
        self.identities.obtain(&key.source_identity).await?;
        // Built per dial (cheap; the certificate is the identity manager's).
        let tls = self
            .identities
            .client_config(&key.source_identity, vec![key.destination_identity.clone()])?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| HboneError::Connect(addr, e))?;
        let _ = tcp.set_nodelay(true);
        // No SNI is sent (enable_sni = false); the name is only a placeholder.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = tokio_rustls::TlsConnector::from(tls)
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
        Ok(Dialed {
            send,
            peer,
            driver: Box::pin(drive(conn, ping, s.clone())),
        })
    }
}

/// Runs the h2 state machine and the PING keepalive; ends when either does.
async fn drive<T>(
    conn: h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
    s: DialSettings,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let keepalive = async move {
        let Some(mut ping) = ping else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(s.keepalive_interval).await;
            match tokio::time::timeout(s.keepalive_timeout, ping.ping(h2::Ping::opaque())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return format!("ping failed: {e}"),
                Err(_) => return format!("no PING answer in {:?}", s.keepalive_timeout),
            }
        }
    };
    tokio::select! {
        r = conn => match r {
            Ok(()) => tracing::debug!("connection closed"),
            Err(e) => tracing::debug!(error = %e, "connection ended"),
        },
        why = keepalive => tracing::debug!(reason = %why, "closing connection"),
    }
}

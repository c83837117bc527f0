//! The tunnel handler: maps each CONNECT's authority to its target, applies
//! policy at L4 for TCP ports (or hands HTTP ports to [`super::l7`]),
//! connects upstream and relays; an open TCP tunnel is re-authorized on
//! every new set of routes and reset when a policy edit denies it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::hbone::{ConnectHandler, Decision, InboundRequest, RelayIo};
use crate::identity::SpiffeId;
use crate::policy::RequestContext;
use crate::telemetry::{
    intern, AccessLogger, ConnectionLabels, ConnectionLog, ConnectionRecorder, Direction, Reporter,
};
use crate::upstream::UpstreamStream;

use super::{l7, routes, source, tls, Shared};

pub(crate) struct TunnelHandler {
    pub(crate) shared: Arc<Shared>,
}

impl TunnelHandler {
    pub(crate) fn labels(&self, req: &InboundRequest, service: &str) -> ConnectionLabels {
        // Shared values, not copies: the recorder lives as long as the tunnel.
        ConnectionLabels {
            reporter: Reporter::Destination,
            source_workload: intern(req.peer_identity.service_account()),
            source_workload_namespace: intern(req.peer_identity.namespace()),
            source_principal: intern(&req.peer_identity.uri()),
            destination_service: intern(service),
            destination_workload: intern(&self.shared.gateway.name),
            destination_workload_namespace: intern(&self.shared.gateway.namespace),
            destination_principal: intern(&self.shared.identity_uri),
            request_protocol: intern("tcp"),
            response_flags: String::new(),
        }
    }

    pub(crate) fn conn_log(
        &self,
        req: &InboundRequest,
        dst: SocketAddr,
        service: Option<&str>,
    ) -> ConnectionLog {
        let mut l = ConnectionLog::new(req.source_addr, dst, Direction::Inbound);
        l.src_workload = source::workload_name(&self.shared.routes.load().model, req);
        l.src_namespace = Some(intern(req.peer_identity.namespace()));
        l.src_identity = Some(intern(&req.peer_identity.uri()));
        l.dst_hbone_addr = Some(req.authority.into());
        l.dst_service = service.map(intern);
        l.dst_workload = Some(intern(&self.shared.gateway.name));
        l.dst_namespace = Some(intern(&self.shared.gateway.namespace));
        l.dst_identity = Some(intern(&self.shared.identity_uri));
        l
    }

    /// A tunnel refused before any byte was relayed: error line + metrics.
    pub(crate) fn refused(
        &self,
        req: &InboundRequest,
        service: Option<&str>,
        flags: &str,
        why: String,
    ) {
        let mut l = self.conn_log(req, req.local_addr, service);
        l.error = Some(why);
        self.shared.access_log.connection(&l);
        let rec = self
            .shared
            .metrics
            .connection(self.labels(req, service.unwrap_or("")));
        rec.close(true, Some(flags));
    }
}

impl ConnectHandler for TunnelHandler {
    async fn handle(&self, mut req: InboundRequest) -> Decision {
        let start = Instant::now();
        let snap = self.shared.routes.load_full();
        // From here on `source_addr` is the address the waypoint believes:
        // every decision (l4, tls, l7) and log line below reads it.
        req.source_addr = source::trusted(&self.shared, &req, &snap.model);
        let authority = routes::canonical(req.authority);
        let Some(target) = snap.targets.get(&authority).cloned() else {
            let (status, why) = if snap.vips.contains(&authority.ip()) {
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "no port {} on the service at {}",
                        authority.port(),
                        authority.ip()
                    ),
                )
            } else {
                (
                    http::StatusCode::BAD_REQUEST,
                    format!("{authority} is not a service bound to this waypoint"),
                )
            };
            tracing::info!(identity = %req.peer_identity, %authority, status = status.as_u16(), "{why}");
            self.refused(&req, None, "NR", why);
            return Decision::Refuse(status);
        };
        if target.http {
            let tunnel = Arc::new(l7::TunnelInfo {
                authority,
                source: req.source_addr,
                principal: intern(&req.peer_identity.uri()),
                source_namespace: intern(req.peer_identity.namespace()),
                source_sa: intern(req.peer_identity.service_account()),
            });
            let shared = self.shared.clone();
            // One ztunnel-format line per tunnel at close, as for TCP ports
            // (the per-request Envoy lines are written by l7).
            let mut log = self.conn_log(&req, req.local_addr, Some(&target.host));
            return Decision::serve(move |stream| async move {
                let logger = shared.access_log.clone();
                l7::serve(shared, tunnel, stream).await;
                log.duration = start.elapsed();
                log.time = std::time::SystemTime::now();
                logger.connection(&log);
            });
        }

        if tls::is_tls_port(&target) {
            // `connection.sni` needs the ClientHello, sent after the 200.
            return tls::decision(self, req, target, authority, start);
        }

        // L4: decide on the connection, HTTP fields per Istio's TCP rule.
        let decision = {
            let principal = req.peer_identity.uri();
            let ctx = RequestContext {
                principal: Some(&principal),
                source_ip: Some(req.source_addr.ip()),
                destination_ip: Some(authority.ip()),
                destination_port: authority.port(),
                http: None,
                ..Default::default()
            };
            snap.policies
                .for_service(target.service.namespace(), target.service.name())
                .evaluate(&ctx)
        };
        let shadow = l7::note_shadow(&self.shared.metrics, &decision);
        if !decision.allowed {
            tracing::info!(identity = %req.peer_identity, %authority, %decision, "connection denied");
            self.refused(
                &req,
                Some(&target.host),
                "-",
                format!("connection denied by authorization policy: {decision}"),
            );
            return Decision::Refuse(http::StatusCode::UNAUTHORIZED);
        }
        match target.upstream.connect(authority).await {
            Ok(c) => {
                let rec = self
                    .shared
                    .metrics
                    .connection(self.labels(&req, &target.host));
                let mut log = self.conn_log(&req, req.local_addr, Some(&target.host));
                log.shadow = shadow;
                Decision::Forward(Box::new(Tracked {
                    io: c.stream,
                    sent: 0,
                    recv: 0,
                    error: None,
                    start,
                    done: Some((log, rec, self.shared.access_log.clone())),
                    revoked: Box::pin(revoked(
                        self.shared.clone(),
                        intern(&req.peer_identity.uri()),
                        None,
                        req.source_addr,
                        authority,
                        (
                            intern(target.service.namespace()),
                            intern(target.service.name()),
                        ),
                    )),
                }))
            }
            Err(e) => {
                tracing::info!(identity = %req.peer_identity, %authority, error = %e, "upstream connect failed, answering 503");
                self.refused(&req, Some(&target.host), "UF", e.to_string());
                Decision::Refuse(http::StatusCode::SERVICE_UNAVAILABLE)
            }
        }
    }

    fn rejected(&self, peer: &SpiffeId, peer_addr: SocketAddr, why: &str) {
        tracing::info!(identity = %peer, peer_addr = %crate::telemetry::LogAddr(peer_addr), reason = %why, "HBONE request rejected with 400");
    }
}

/// The upstream side of a TCP tunnel: counts bytes and writes the ztunnel
/// line and closes the metrics when the relay drops it.
pub(crate) struct Tracked {
    pub(crate) io: UpstreamStream,
    /// Written to the upstream (the client's request direction).
    pub(crate) sent: u64,
    /// Read from the upstream.
    pub(crate) recv: u64,
    pub(crate) error: Option<String>,
    pub(crate) start: Instant,
    pub(crate) done: Option<(ConnectionLog, ConnectionRecorder, Arc<AccessLogger>)>,
    /// Resolves (with the reason) when a new config no longer authorizes
    /// this connection; polled with the upstream reads, it ends the relay.
    pub(crate) revoked: Pin<Box<dyn std::future::Future<Output = String> + Send>>,
}

/// Re-evaluates an open TCP tunnel's L4 decision on every new snapshot, as
/// ztunnel closes connections that a policy change denies.
pub(crate) async fn revoked(
    shared: Arc<Shared>,
    principal: Arc<str>,
    sni: Option<String>,
    source: SocketAddr,
    authority: SocketAddr,
    service: (Arc<str>, Arc<str>),
) -> String {
    let mut rx = shared.changed.subscribe();
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snap = shared.routes.load_full();
        let ctx = RequestContext {
            principal: Some(&*principal),
            source_ip: Some(source.ip()),
            destination_ip: Some(authority.ip()),
            destination_port: authority.port(),
            sni: sni.as_deref(),
            http: None,
            ..Default::default()
        };
        let d = snap
            .policies
            .for_service(&service.0, &service.1)
            .evaluate(&ctx);
        if !d.allowed {
            return format!("connection closed: authorization policy changed: {d}");
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some((mut log, rec, logger)) = self.done.take() {
            log.time = SystemTime::now();
            log.bytes_sent = self.sent;
            log.bytes_recv = self.recv;
            log.duration = self.start.elapsed();
            log.error = self.error.take();
            logger.connection(&log);
            rec.sent(self.sent);
            rec.received(self.recv);
            rec.close(log.error.is_some(), None);
        }
    }
}

impl Tracked {
    /// Records an upstream failure; the upstream closing or resetting is a
    /// normal end (an `info` line), as on the agent's side.
    fn note<T>(&mut self, r: &Poll<std::io::Result<T>>) {
        if let Poll::Ready(Err(e)) = r {
            if self.error.is_none() && !crate::hbone::is_peer_gone_io(e) {
                self.error = Some(format!("upstream: {e}"));
            }
        }
    }
}

impl RelayIo for Tracked {
    fn set_reset_on_close(&self) {
        self.io.set_reset_on_close()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Poll::Ready(why) = self.revoked.as_mut().poll(cx) {
            tracing::info!(reason = %why, "closing TCP tunnel");
            self.error = Some(why.clone());
            self.io.set_reset_on_close();
            // Pending forever from now on, so the relay sees one error.
            self.revoked = Box::pin(std::future::pending());
            return Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionReset,
                why,
            )));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        self.recv += (buf.filled().len() - before) as u64;
        self.note(&r);
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.sent += *n as u64;
        }
        self.note(&r);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.note(&r);
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(&r);
        r
    }
}

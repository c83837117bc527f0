//! TLS and HTTPS ports: the waypoint does not terminate TLS but reads the
//! client's ClientHello (`sni`) so that `connection.sni` is known to the
//! policy and the access log, as Envoy's tls_inspector gives it to the RBAC
//! filter. The tunnel is answered 200 at once (the client sends its
//! ClientHello only then, as through Istio's waypoint), then the tunnel is
//! reset, with the reason in the access log, when: no well-formed
//! ClientHello arrives within the deadline; it names no server (SNI); the
//! name is not one this VIP stands for ([`Target::accepts_name`]); policy
//! denies it. Otherwise the upstream is connected, the ClientHello
//! replayed, and bytes relayed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;

use crate::hbone::{Decision, H2Stream, InboundRequest};
use crate::policy::RequestContext;
use crate::telemetry::LogLimit;

use super::l4::{revoked, Tracked, TunnelHandler as Handler};
use super::l7;
use super::routes::Target;
use super::sni::{read_client_hello, CLIENT_HELLO_TIMEOUT};

/// One waypoint log line per refused TLS connection, at most one a second
/// (a client can cause one per tunnel); the access log has every one.
fn refused_log(req: &InboundRequest, authority: SocketAddr, sni: Option<&str>, why: &str) {
    static LOG: LogLimit = LogLimit::new(Duration::from_secs(1));
    if let Some(suppressed) = LOG.allow() {
        tracing::info!(identity = %req.peer_identity, %authority, sni = sni.unwrap_or("-"), reason = %why, suppressed, "TLS connection refused");
    }
}

/// Whether a port's traffic is TLS the waypoint passes through.
pub(crate) fn is_tls_port(t: &Target) -> bool {
    matches!(
        t.port.protocol,
        crate::config::Protocol::Tls | crate::config::Protocol::Https
    )
}

/// The tunnel decision for a TLS port.
pub(crate) fn decision(
    h: &Handler,
    req: InboundRequest,
    target: Arc<Target>,
    authority: SocketAddr,
    start: Instant,
) -> Decision {
    let h = Handler {
        shared: h.shared.clone(),
    };
    Decision::serve(move |mut stream: H2Stream| async move {
        let mut log = h.conn_log(&req, req.local_addr, Some(&target.host));
        let refuse = |mut log: crate::telemetry::ConnectionLog,
                      stream: &mut H2Stream,
                      flags: &str,
                      why: String| {
            log.error = Some(why);
            log.duration = start.elapsed();
            log.time = SystemTime::now();
            h.shared.access_log.connection(&log);
            h.shared
                .metrics
                .connection(h.labels(&req, &target.host))
                .close(true, Some(flags));
            stream.reset();
        };
        let (hello, sni) = match read_client_hello(&mut stream, CLIENT_HELLO_TIMEOUT).await {
            Ok(x) => x,
            Err(e) => {
                let why = format!("TLS port: {e}");
                refused_log(&req, authority, None, &why);
                return refuse(log, &mut stream, "NR", why);
            }
        };
        log.sni = sni.clone();
        // The name decides what the client reaches (and, for a wildcard,
        // where the waypoint connects): without one, or with a name this
        // VIP does not stand for, nothing is connected.
        let Some(name) = sni.clone() else {
            let why = "TLS port: ClientHello without server_name (SNI): refused, the destination cannot be checked".to_string();
            refused_log(&req, authority, None, &why);
            return refuse(log, &mut stream, "NR", why);
        };
        if !target.accepts_name(&name) {
            let why = format!(
                "TLS port: SNI {name:?} is not a host of ServiceEntry {} at {authority}",
                target.service.key
            );
            refused_log(&req, authority, Some(&name), &why);
            return refuse(log, &mut stream, "NR", why);
        }
        let principal = req.peer_identity.uri();
        let decision = {
            // Policies as in force now: the ClientHello may come after a reload.
            let snap = h.shared.routes.load_full();
            let ctx = RequestContext {
                principal: Some(&principal),
                source_ip: Some(req.source_addr.ip()),
                destination_ip: Some(authority.ip()),
                destination_port: authority.port(),
                sni: sni.as_deref(),
                http: None,
                ..Default::default()
            };
            snap.policies
                .for_service(target.service.namespace(), target.service.name())
                .evaluate(&ctx)
        };
        log.shadow = l7::note_shadow(&h.shared.metrics, &decision);
        if !decision.allowed {
            let why = format!("connection denied by authorization policy: {decision}");
            refused_log(&req, authority, Some(&name), &why);
            return refuse(log, &mut stream, "-", why);
        }
        // A wildcard's upstream is the name's own (resolved here).
        let upstream = match target.upstream.for_name(&name) {
            Ok(u) => u,
            Err(e) => {
                let why = e.to_string();
                refused_log(&req, authority, Some(&name), &why);
                return refuse(log, &mut stream, "UF", why);
            }
        };
        let c = match upstream.connect(authority).await {
            Ok(c) => c,
            Err(e) => {
                let why = e.to_string();
                refused_log(&req, authority, Some(&name), &why);
                return refuse(log, &mut stream, "UF", why);
            }
        };
        let rec = h.shared.metrics.connection(h.labels(&req, &target.host));
        let mut up = Tracked {
            io: c.stream,
            sent: 0,
            recv: 0,
            error: None,
            start,
            done: Some((log, rec, h.shared.access_log.clone())),
            revoked: Box::pin(revoked(
                h.shared.clone(),
                crate::telemetry::intern(&principal),
                sni,
                req.source_addr,
                authority,
                (
                    crate::telemetry::intern(target.service.namespace()),
                    crate::telemetry::intern(target.service.name()),
                ),
            )),
        };
        if let Err(e) = up.write_all(&hello).await {
            up.error.get_or_insert_with(|| format!("upstream: {e}"));
            stream.reset();
            return;
        }
        if let Err(e) = tokio::io::copy_bidirectional(&mut stream, &mut up).await {
            tracing::debug!(error = %e, %authority, "TLS tunnel relay ended with error");
            // Either side resetting is a normal end (an `info` line).
            if !crate::hbone::is_peer_gone_io(&e) {
                up.error.get_or_insert_with(|| e.to_string());
            }
            crate::hbone::RelayIo::set_reset_on_close(&up);
            stream.reset();
        }
        // `up`'s drop writes the access-log line and closes the metrics.
    })
}

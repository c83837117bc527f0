//! The outbound path: every steered connection is carried over HBONE to its
//! service's waypoint, or connected directly when the service asks for no
//! waypoint (as ztunnel does). Fail closed by type: an unknown source, a
//! service missing from the model, or a service whose waypoint cannot be
//! resolved ([`WaypointBinding::Refused`]) is reset and logged — never
//! connected around the waypoint; so is a service not exported to the
//! source's namespace (`exportTo`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::net::TcpStream;

use crate::hbone::{ConnectRequest, HboneClient};
use crate::model::{Destination, Model, Service, WaypointBinding};
use crate::proxy::capture::{reset, BoxFuture, Handler, Steered};
use crate::telemetry::{
    intern, AccessLogger, ConnectionLabels, ConnectionLog, Direction, Metrics, Reporter,
};

/// How long a direct connection attempt may take, per address.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The production [`Handler`].
pub struct Outbound {
    pub client: Arc<HboneClient>,
    pub model: Arc<ArcSwap<Model>>,
    pub metrics: Arc<Metrics>,
    pub logger: Arc<AccessLogger>,
}

impl Handler for Outbound {
    fn handle(&self, conn: Steered) -> BoxFuture {
        let model = self.model.load_full();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let logger = self.logger.clone();
        Box::pin(async move { carry(conn, model, client, metrics, logger).await })
    }
}

fn refuse(conn: Steered, logger: &AccessLogger, why: String) {
    let mut log = ConnectionLog::new(conn.src, conn.dst, Direction::Outbound);
    log.error = Some(why);
    logger.connection(&log);
    reset(conn.stream);
}

async fn carry(
    mut conn: Steered,
    model: Arc<Model>,
    client: Arc<HboneClient>,
    metrics: Arc<Metrics>,
    logger: Arc<AccessLogger>,
) {
    let start = Instant::now();
    let Some(wl) = model.workload_by_addr(conn.src.ip()).cloned() else {
        let why = "unknown source: no workload has this address; connection refused";
        return refuse(conn, &logger, why.into());
    };
    let Some(svc) = model.service(conn.service.service_id).cloned() else {
        return refuse(conn, &logger, "service not in the agent's config".into());
    };
    // exportTo: a namespace that cannot see the entry has no such service.
    if !svc.export_to.visible_to(wl.namespace()) {
        let why = format!(
            "ServiceEntry {} is not exported to namespace {} (exportTo {}); connection refused",
            svc.key,
            wl.namespace(),
            svc.export_to
        );
        return refuse(conn, &logger, why);
    }
    let host = svc.host_of(conn.dst.ip()).or(svc.first_host());
    // Shared with every other connection of this workload and service: the
    // log record and the labels a held connection keeps copy no text.
    let src_name = intern(wl.name());
    let src_ns = intern(wl.namespace());
    let src_id = intern(&wl.identity.to_string());
    let service = host.map(intern);
    let mut log = ConnectionLog::new(conn.src, conn.dst, Direction::Outbound);
    log.src_workload = Some(src_name.clone());
    log.src_namespace = Some(src_ns.clone());
    log.src_identity = Some(src_id.clone());
    log.dst_service = service.clone();
    let waypoint = match &svc.waypoint {
        WaypointBinding::Refused(u) => {
            log.error = Some(format!(
                "ServiceEntry {} requires a waypoint that cannot be used ({}: {}); connection refused",
                svc.key, u.reason, u.message
            ));
            logger.connection(&log);
            reset(conn.stream);
            return;
        }
        WaypointBinding::Bound(w) => Some(w.clone()),
        WaypointBinding::None => None,
    };
    let (wp_name, wp_ns, wp_id) = match &waypoint {
        Some(w) => (
            intern(&w.gateway.name),
            intern(&w.gateway.namespace),
            intern(&w.identity.to_string()),
        ),
        None => Default::default(),
    };
    let labels = ConnectionLabels {
        reporter: Reporter::Source,
        source_workload: src_name,
        source_workload_namespace: src_ns,
        source_principal: src_id,
        destination_service: service.unwrap_or_default(),
        destination_workload: wp_name.clone(),
        destination_workload_namespace: wp_ns.clone(),
        destination_principal: wp_id.clone(),
        request_protocol: intern("tcp"),
        // Exported as `-`, as "-" was.
        response_flags: String::new(),
    };
    let rec = metrics.connection(labels);
    match waypoint {
        Some(wp) => {
            log.dst_addr = wp.addr;
            log.dst_hbone_addr = Some(conn.dst.into());
            log.dst_workload = Some(wp_name);
            log.dst_namespace = Some(wp_ns);
            log.dst_identity = Some(wp_id);
            // Dropped once connected: the request's copies of the identities
            // would otherwise live as long as the connection.
            let connected = {
                let req = ConnectRequest {
                    source_identity: wl.identity.clone(),
                    source_addr: conn.src,
                    waypoint_addr: wp.addr,
                    waypoint_identity: wp.identity.clone(),
                    authority: conn.dst,
                    host: host.map(str::to_string),
                    baggage: wl.baggage.clone(),
                    traceparent: None,
                };
                // Boxed: the connect (pool checkout, maybe a dial, the
                // early read's buffer) is freed once done instead of sizing
                // the task that lives as long as the connection. What the
                // pod sends first (an HTTP request) goes with the CONNECT.
                Box::pin(client.connect_early(&req, &mut conn.stream)).await
            };
            match connected {
                Ok(tunnel) => {
                    let stats = tunnel.relay(&mut conn.stream).await;
                    log.bytes_sent = stats.bytes_sent;
                    log.bytes_recv = stats.bytes_received;
                    rec.sent(stats.bytes_sent);
                    rec.received(stats.bytes_received);
                    // The pod or the upstream closing or resetting is a normal end (info).
                    log.error = stats
                        .error
                        .filter(|e| !e.is_peer_gone())
                        .map(|e| e.to_string());
                    rec.close(log.error.is_some(), None);
                }
                Err(e) => {
                    log.error = Some(e.to_string());
                    rec.close(true, Some("UF"));
                    reset(conn.stream);
                }
            }
        }
        None => match Box::pin(direct_connect(&svc, host, conn.dst)).await {
            Ok((mut up, addr)) => {
                log.dst_addr = addr;
                match tokio::io::copy_bidirectional(&mut conn.stream, &mut up).await {
                    Ok((a, b)) => {
                        log.bytes_sent = a;
                        log.bytes_recv = b;
                        rec.sent(a);
                        rec.received(b);
                        rec.close(false, None);
                    }
                    Err(e) => {
                        log.error = Some(e.to_string());
                        rec.close(true, None);
                    }
                }
            }
            Err(e) => {
                log.error = Some(format!("no waypoint bound; direct connect failed: {e}"));
                rec.close(true, Some("UF"));
                reset(conn.stream);
            }
        },
    }
    log.duration = start.elapsed();
    log.time = std::time::SystemTime::now();
    logger.connection(&log);
}

/// Connects to the service's destination for the VIP's host and port, as
/// the model resolves it (endpoints, DNS, or the original address).
async fn direct_connect(
    svc: &Service,
    host: Option<&str>,
    dst: SocketAddr,
) -> std::io::Result<(TcpStream, SocketAddr)> {
    let not_found =
        || std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the service");
    let port = svc.port(dst.port()).ok_or_else(not_found)?;
    let destination = svc
        .destination(host.unwrap_or_default(), port)
        .map_err(std::io::Error::other)?;
    let targets: Vec<SocketAddr> = match destination {
        Destination::Static(addrs) => addrs,
        Destination::Original => vec![SocketAddr::new(dst.ip(), port.target_port)],
        Destination::Dns(names) => {
            let mut all = Vec::new();
            for (name, p) in names {
                all.extend(tokio::net::lookup_host((name.as_str(), p)).await?);
            }
            all
        }
        // Only a waypoint learns the name (the model programs no such
        // entry without one); never connected from here.
        Destination::Dynamic => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "resolution DYNAMIC_DNS is served only through a waypoint",
            ))
        }
    };
    let mut last = not_found();
    for t in targets {
        match tokio::time::timeout(DIRECT_CONNECT_TIMEOUT, TcpStream::connect(t)).await {
            Ok(Ok(s)) => return Ok((s, t)),
            Ok(Err(e)) => last = e,
            Err(_) => {
                last = std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {t} timed out"),
                )
            }
        }
    }
    Err(last)
}

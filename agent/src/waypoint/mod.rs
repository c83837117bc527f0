//! `shunt waypoint`: the egress gateway. An HBONE server (port 15008) that
//! maps each tunnel's `:authority` (VIP:port) to its ServiceEntry port,
//! authorizes it with the AuthorizationPolicies bound to the ServiceEntry or
//! to this waypoint's Gateway, and then either relays bytes (TCP ports: 200
//! only after the upstream connect succeeded, 401 when denied, 503 when the
//! connect fails) or parses HTTP inside the tunnel and decides per request
//! (HTTP ports: 200 at once, then 403 `RBAC: access denied` or the
//! upstream's response, 503 when the upstream cannot be reached).
//!
//! Refusals before policy, following ztunnel's inbound: a VIP that is not a
//! service bound to this waypoint → 400 (its `validate_destination`); a
//! bound VIP on a port the ServiceEntry does not declare → 503 (its
//! `NoPortForServices`, from `resolve_inbound_target`).
//!
//! Everything per config (targets, policies, TLS connectors, upstream
//! pools) lives in an immutable [`Snapshot`] swapped atomically on reload;
//! a tunnel or request loads it once and does one hash lookup.

mod body;
mod framing;
mod l7;
mod pool;
mod snapshot;
mod sni;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{AdminServer, Endpoints};
use crate::config::watch::ConfigWatcher;
use crate::config::{Config, ObjectKey};
use crate::hbone::{
    ConnectHandler, Decision, HboneServer, InboundRequest, RelayIo, ServerSettings,
};
use crate::identity::{Ca, IdentityConfig, IdentityManager, SpiffeId};
use crate::policy::{GatewayRef, RequestContext};
use crate::telemetry::{
    AccessLogger, ConnectionLabels, ConnectionLog, ConnectionRecorder, Direction, LogFormat,
    Metrics, Reporter,
};
use crate::upstream::UpstreamStream;

pub use l7::RBAC_DENIED_BODY;
pub use snapshot::{Snapshot, Target};

/// Errors carry their cause in the message (no `source()` chain), so that
/// `{:#}` at the binary's edge prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("config directory {dir}: {msg}")]
    ConfigDir { dir: PathBuf, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("authorization policies: {0}")]
    Policy(crate::policy::PolicyError),
    #[error("state directory: {0}")]
    Alloc(crate::alloc::AllocError),
    #[error("CA directory {dir}: {err}")]
    Ca {
        dir: PathBuf,
        err: crate::identity::IdentityError,
    },
    #[error("waypoint identity: {0}")]
    Identity(crate::identity::IdentityError),
    #[error("binding HBONE listener {addr}: {err}")]
    Bind {
        addr: SocketAddr,
        err: std::io::Error,
    },
    #[error("admin: {0}")]
    Admin(crate::admin::AdminError),
    #[error("HBONE server: {0}")]
    Server(crate::hbone::HboneError),
}

macro_rules! from_err {
    ($t:ty, $v:ident) => {
        impl From<$t> for WaypointError {
            fn from(e: $t) -> Self {
                WaypointError::$v(e)
            }
        }
    };
}
from_err!(crate::alloc::AllocError, Alloc);
from_err!(crate::identity::IdentityError, Identity);
from_err!(crate::admin::AdminError, Admin);
from_err!(crate::hbone::HboneError, Server);

/// How to start a waypoint.
pub struct WaypointOptions {
    pub config_dir: PathBuf,
    /// Read only: the agent's persisted VIP allocation (`alloc::load`).
    pub state_dir: PathBuf,
    /// Istio plug-in CA layout (`identity::Ca::load`).
    pub ca_dir: PathBuf,
    /// This waypoint's Gateway; `None`: the config's only istio-waypoint
    /// Gateway.
    pub gateway: Option<GatewayRef>,
    /// HBONE listener (default `[::]:15008`).
    pub listen: SocketAddr,
    /// `/config_dump` (default `127.0.0.1:15000`); `None`: not served.
    pub admin: Option<SocketAddr>,
    /// `/metrics` (default `[::]:15020`).
    pub metrics_addr: Option<SocketAddr>,
    /// `/healthz/ready` (default `[::]:15021`).
    pub ready_addr: Option<SocketAddr>,
    /// Where access-log lines go (stdout in the binary).
    pub access_log: Arc<AccessLogger>,
    /// The process-wide metrics registry; a fresh one when `None`.
    pub metrics: Option<Arc<Metrics>>,
    /// Upstream resolve + connect + TLS handshake.
    pub upstream_timeout: Duration,
    /// Config directory and allocation poll interval.
    pub reload_interval: Duration,
    pub identity: IdentityConfig,
    pub server: ServerSettings,
}

impl WaypointOptions {
    /// Defaults from the port plan (ztunnel's), text access log on stdout.
    pub fn new(config_dir: PathBuf, state_dir: PathBuf, ca_dir: PathBuf) -> Self {
        WaypointOptions {
            config_dir,
            state_dir,
            ca_dir,
            gateway: None,
            listen: SocketAddr::from(([0u16; 8], crate::hbone::HBONE_PORT)),
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 15000))),
            metrics_addr: Some(SocketAddr::from(([0u16; 8], 15020))),
            ready_addr: Some(SocketAddr::from(([0u16; 8], 15021))),
            access_log: Arc::new(AccessLogger::stdout(LogFormat::Text)),
            metrics: None,
            upstream_timeout: Duration::from_secs(10),
            reload_interval: crate::config::watch::DEFAULT_INTERVAL,
            identity: IdentityConfig::default(),
            server: ServerSettings::default(),
        }
    }
}

/// State shared by the handler, the HTTP layer and the reload task.
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    /// Bumped after each new snapshot: open TCP tunnels re-check their
    /// authorization on it.
    pub changed: tokio::sync::watch::Sender<u64>,
    pub gateway: GatewayRef,
    pub identity_uri: String,
    pub access_log: Arc<AccessLogger>,
    pub metrics: Arc<Metrics>,
}

/// A running waypoint. Dropping it stops every task.
pub struct Waypoint {
    shared: Arc<Shared>,
    identity: SpiffeId,
    hbone_addr: SocketAddr,
    admin: Vec<AdminServer>,
    admin_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    ready_addr: Option<SocketAddr>,
    server: Option<JoinHandle<Result<(), crate::hbone::HboneError>>>,
    reload: JoinHandle<()>,
    _watcher: Arc<ConfigWatcher>,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        if let Some(s) = &self.server {
            s.abort();
        }
        self.reload.abort();
    }
}

fn pick_gateway(cfg: &Config, want: Option<GatewayRef>) -> Result<GatewayRef, WaypointError> {
    if let Some(g) = want {
        match cfg.gateway(&ObjectKey::new(&g.namespace, &g.name)) {
            Some(gw) if gw.spec.is_waypoint() => {}
            Some(gw) => tracing::warn!(
                gateway = %format!("{}/{}", g.namespace, g.name),
                class = %gw.spec.gateway_class_name,
                "Gateway is not of class istio-waypoint; no ServiceEntry will bind to it"
            ),
            None => tracing::warn!(
                gateway = %format!("{}/{}", g.namespace, g.name),
                "Gateway not found in the config (yet); serving no service until it appears"
            ),
        }
        return Ok(g);
    }
    let wps: Vec<_> = cfg
        .gateways
        .iter()
        .filter(|g| g.spec.is_waypoint())
        .collect();
    match wps.as_slice() {
        [one] => Ok(GatewayRef {
            namespace: one.namespace().to_string(),
            name: one.name().to_string(),
        }),
        [] => Err(WaypointError::Config(
            "no Gateway with gatewayClassName istio-waypoint in the config: pass --name and --namespace".into(),
        )),
        many => Err(WaypointError::Config(format!(
            "{} istio-waypoint Gateways in the config ({}): pass --name and --namespace",
            many.len(),
            many.iter()
                .map(|g| format!("{}/{}", g.namespace(), g.name()))
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Cheap change detector for the allocation file (the agent rewrites it).
fn alloc_fingerprint(state_dir: &std::path::Path) -> Option<(u64, SystemTime)> {
    let m = std::fs::metadata(state_dir.join(crate::alloc::STATE_FILE)).ok()?;
    Some((m.len(), m.modified().ok()?))
}

impl Waypoint {
    /// Loads config, allocation and CA, binds the HBONE and admin
    /// listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(opts: WaypointOptions) -> Result<Waypoint, WaypointError> {
        let watcher = ConfigWatcher::spawn(opts.config_dir.clone(), opts.reload_interval);
        let cfg = match watcher.current() {
            Some(c) => c,
            None => {
                let msg = watcher
                    .rejected
                    .borrow()
                    .as_ref()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "no valid configuration".into());
                return Err(WaypointError::ConfigDir {
                    dir: opts.config_dir.clone(),
                    msg,
                });
            }
        };
        let gateway = pick_gateway(&cfg, opts.gateway.clone())?;
        let alloc = crate::alloc::load(&opts.state_dir)?;
        let snap = snapshot::build(
            cfg.clone(),
            &alloc,
            &snapshot::BuildInputs {
                gateway: &gateway,
                connect_timeout: opts.upstream_timeout,
                previous: None,
            },
        )?;
        for w in &snap.warnings {
            tracing::warn!("{w}");
        }
        let ca = Ca::load(&opts.ca_dir).map_err(|err| WaypointError::Ca {
            dir: opts.ca_dir.clone(),
            err,
        })?;
        let ids = IdentityManager::new(Arc::new(ca), cfg.trust_domain(), opts.identity.clone())?;
        let identity = SpiffeId::new(cfg.trust_domain(), &gateway.namespace, &gateway.name)?;
        let tls = ids.server_config(&identity)?;
        let metrics = opts
            .metrics
            .clone()
            .unwrap_or_else(|| Metrics::builder().build());
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snap),
            changed: tokio::sync::watch::Sender::new(0),
            gateway: gateway.clone(),
            identity_uri: identity.uri(),
            access_log: opts.access_log.clone(),
            metrics: metrics.clone(),
        });

        let listener = TcpListener::bind(opts.listen)
            .await
            .map_err(|err| WaypointError::Bind {
                addr: opts.listen,
                err,
            })?;
        let hbone_addr = listener.local_addr().map_err(|err| WaypointError::Bind {
            addr: opts.listen,
            err,
        })?;
        let ready = Arc::new(AtomicBool::new(false));
        let mut admin = Vec::new();
        let bind = |addr: Option<SocketAddr>, ep: Endpoints| async move {
            match addr {
                Some(a) => AdminServer::bind(a, ep).await.map(Some),
                None => Ok(None),
            }
        };
        let dump = {
            let shared = shared.clone();
            Arc::new(move || {
                shared
                    .snapshot
                    .load()
                    .dump(&shared.identity_uri, &shared.gateway)
            })
        };
        let mut admin_addr = None;
        let mut metrics_addr = None;
        let mut ready_addr = None;
        if let Some(s) = bind(
            opts.admin,
            Endpoints {
                config_dump: Some(dump),
                ready: Some(ready.clone()),
                metrics: Some(metrics.clone()),
            },
        )
        .await?
        {
            admin_addr = Some(s.local_addr());
            admin.push(s);
        }
        if let Some(s) = bind(
            opts.metrics_addr,
            Endpoints {
                metrics: Some(metrics.clone()),
                ..Default::default()
            },
        )
        .await?
        {
            metrics_addr = Some(s.local_addr());
            admin.push(s);
        }
        if let Some(s) = bind(
            opts.ready_addr,
            Endpoints {
                ready: Some(ready.clone()),
                ..Default::default()
            },
        )
        .await?
        {
            ready_addr = Some(s.local_addr());
            admin.push(s);
        }

        let server = Arc::new(HboneServer::new(tls, opts.server.clone()));
        let handler = Arc::new(Handler {
            shared: shared.clone(),
        });
        let server = tokio::spawn(server.serve(listener, handler));
        ready.store(true, Ordering::Release);
        tracing::info!(
            identity = %identity,
            listen = %hbone_addr,
            services = shared.snapshot.load().targets.len(),
            "waypoint ready"
        );

        let watcher = Arc::new(watcher);
        let reload = tokio::spawn(reload_loop(
            watcher.clone(),
            shared.clone(),
            opts.state_dir.clone(),
            opts.upstream_timeout,
            opts.reload_interval,
        ));
        Ok(Waypoint {
            shared,
            identity,
            hbone_addr,
            admin,
            admin_addr,
            metrics_addr,
            ready_addr,
            server: Some(server),
            reload,
            _watcher: watcher,
        })
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.hbone_addr
    }
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }
    pub fn ready_addr(&self) -> Option<SocketAddr> {
        self.ready_addr
    }
    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }
    /// The snapshot in force (config digest, targets, policies).
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }
    /// Number of admin listeners running.
    pub fn admin_listeners(&self) -> usize {
        self.admin.len()
    }

    /// Serves until the HBONE listener fails.
    pub async fn wait(mut self) -> Result<(), WaypointError> {
        let Some(server) = self.server.take() else {
            return Ok(());
        };
        match server.await {
            Ok(r) => r.map_err(WaypointError::Server),
            Err(e) => Err(WaypointError::Config(format!("HBONE server task: {e}"))),
        }
    }
}

/// Rebuilds the snapshot on each new valid config or allocation change; a
/// config the waypoint cannot use (bad policy, unreadable CA file) keeps the
/// previous snapshot.
async fn reload_loop(
    watcher: Arc<ConfigWatcher>,
    shared: Arc<Shared>,
    state_dir: PathBuf,
    timeout: Duration,
    interval: Duration,
) {
    let mut cfg_rx = watcher.config.clone();
    let mut alloc_fp = alloc_fingerprint(&state_dir);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = cfg_rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                let fp = alloc_fingerprint(&state_dir);
                if fp == alloc_fp { continue }
                alloc_fp = fp;
            }
        }
        let Some(cfg) = cfg_rx.borrow_and_update().clone() else {
            continue;
        };
        let alloc = match crate::alloc::load(&state_dir) {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "reading the allocation; previous config stays in force");
                continue;
            }
        };
        let prev = shared.snapshot.load_full();
        let built = snapshot::build(
            cfg,
            &alloc,
            &snapshot::BuildInputs {
                gateway: &shared.gateway,
                connect_timeout: timeout,
                previous: Some(&prev),
            },
        );
        match built {
            Ok(s) => {
                for w in &s.warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(
                    version = %format!("{:016x}", s.digest),
                    services = s.targets.len(),
                    policies = s.policies.len(),
                    "waypoint config applied"
                );
                shared.snapshot.store(Arc::new(s));
                shared.changed.send_modify(|v| *v += 1);
            }
            Err(e) => {
                tracing::error!("waypoint config rejected, previous config stays in force: {e}")
            }
        }
    }
}

struct Handler {
    shared: Arc<Shared>,
}

impl Handler {
    fn labels(&self, req: &InboundRequest, service: &str) -> ConnectionLabels {
        ConnectionLabels {
            reporter: Reporter::Destination,
            source_workload: req.peer_identity.service_account().to_string(),
            source_workload_namespace: req.peer_identity.namespace().to_string(),
            source_principal: req.peer_identity.uri(),
            destination_service: service.to_string(),
            destination_workload: self.shared.gateway.name.clone(),
            destination_workload_namespace: self.shared.gateway.namespace.clone(),
            destination_principal: self.shared.identity_uri.clone(),
            request_protocol: "tcp".into(),
            response_flags: String::new(),
        }
    }

    fn conn_log(
        &self,
        req: &InboundRequest,
        dst: SocketAddr,
        service: Option<&str>,
    ) -> ConnectionLog {
        let mut l = ConnectionLog::new(req.source_addr, dst, Direction::Inbound);
        l.src_namespace = Some(req.peer_identity.namespace().to_string());
        l.src_identity = Some(req.peer_identity.uri());
        l.dst_hbone_addr = Some(req.authority.to_string());
        l.dst_service = service.map(str::to_string);
        l.dst_workload = Some(self.shared.gateway.name.clone());
        l.dst_namespace = Some(self.shared.gateway.namespace.clone());
        l.dst_identity = Some(self.shared.identity_uri.clone());
        l
    }

    /// A tunnel refused before any byte was relayed: error line + metrics.
    fn refused(&self, req: &InboundRequest, service: Option<&str>, flags: &str, why: String) {
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

impl ConnectHandler for Handler {
    async fn handle(&self, req: InboundRequest) -> Decision {
        let start = Instant::now();
        let snap = self.shared.snapshot.load_full();
        let authority = snapshot::canonical(req.authority);
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
                principal: req.peer_identity.uri(),
                source_namespace: req.peer_identity.namespace().to_string(),
                source_sa: req.peer_identity.service_account().to_string(),
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
                .for_service(&target.service.namespace, &target.service.name)
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
                        req.peer_identity.uri(),
                        None,
                        req.source_addr,
                        authority,
                        (
                            target.service.namespace.clone(),
                            target.service.name.clone(),
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
        tracing::info!(identity = %peer, %peer_addr, reason = %why, "HBONE request rejected with 400");
    }
}

/// The upstream side of a TCP tunnel: counts bytes and writes the ztunnel
/// line and closes the metrics when the relay drops it.
struct Tracked {
    io: UpstreamStream,
    /// Written to the upstream (the client's request direction).
    sent: u64,
    /// Read from the upstream.
    recv: u64,
    error: Option<String>,
    start: Instant,
    done: Option<(ConnectionLog, ConnectionRecorder, Arc<AccessLogger>)>,
    /// Resolves (with the reason) when a new config no longer authorizes
    /// this connection; polled with the upstream reads, it ends the relay.
    revoked: Pin<Box<dyn std::future::Future<Output = String> + Send>>,
}

/// Re-evaluates an open TCP tunnel's L4 decision on every new snapshot, as
/// ztunnel closes connections that a policy change denies.
async fn revoked(
    shared: Arc<Shared>,
    principal: String,
    sni: Option<String>,
    source: SocketAddr,
    authority: SocketAddr,
    service: (String, String),
) -> String {
    let mut rx = shared.changed.subscribe();
    loop {
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let snap = shared.snapshot.load_full();
        let ctx = RequestContext {
            principal: Some(&principal),
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
    fn note<T>(&mut self, r: &Poll<std::io::Result<T>>) {
        if let Poll::Ready(Err(e)) = r {
            if self.error.is_none() {
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

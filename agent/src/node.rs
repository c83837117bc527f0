//! The node agent assembled: config → allocation → desired state → pinned
//! maps (by difference), the DNS proxy fed from the same desired state,
//! egress reports from the kernel, and the HBONE handler for steered
//! connections. Everything a connection needs is resolved once per config
//! into a [`Snapshot`] that the data path reads without locks.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use http::HeaderValue;
use tracing::{error, info, warn};

use crate::{
    admin::{AdminServer, Endpoints},
    agent::{reset, Agent, AgentError, AgentOptions, BoxFuture, Handler, Steered},
    alloc::Allocator,
    config::{watch::ConfigWatcher, Config},
    desired::{self, Desired, ServiceInfo},
    dns::{DnsConfig, DnsProxy, HostTable, SharedHostTable},
    hbone::{Baggage, ClientSettings, ConnectRequest, HboneClient},
    identity::{Ca, IdentityConfig, IdentityManager, SpiffeId},
    kernel::{
        self,
        events::{EgressEvent, EgressKind, Transport},
        projection::{self, DnsCapture},
        KernelError, MapSync,
    },
    telemetry::{
        rfc3339_micros, AccessLogger, ConnectionLabels, ConnectionLog, Direction, LogFormat,
        Metrics, Reporter,
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Kube(#[from] crate::config::kube::KubeError),
    #[error("CA in {dir}: {source} (create one with `shunt ca init --ca-dir {dir}`)")]
    Ca {
        dir: String,
        source: crate::identity::IdentityError,
    },
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Alloc(#[from] crate::alloc::AllocError),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
    #[error(transparent)]
    Admin(#[from] crate::admin::AdminError),
}

#[derive(Clone, Debug)]
pub struct DnsSettings {
    pub enabled: bool,
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub port: u16,
    /// Where other names are forwarded.
    pub upstreams: Vec<SocketAddr>,
}

#[derive(Clone, Debug, Default)]
pub struct AdminAddrs {
    pub metrics: Option<SocketAddr>,
    pub ready: Option<SocketAddr>,
    pub config_dump: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub agent: AgentOptions,
    pub config_dir: PathBuf,
    /// Read config from the Kubernetes API instead of `config_dir`.
    pub kubernetes: Option<KubernetesSource>,
    pub ca_dir: PathBuf,
    pub dns: DnsSettings,
    pub admin: AdminAddrs,
    pub log_format: LogFormat,
    pub cert_lifetime: Duration,
    /// HBONE connections to waypoints: pool, keepalive, connect timeout.
    pub hbone: ClientSettings,
}

/// The API source's settings (`shunt agent --source kubernetes`).
#[derive(Clone, Debug)]
pub struct KubernetesSource {
    /// `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub options: crate::config::kube::KubeOptions,
}

/// How long start-up waits for the API source's first complete config
/// before going on with the pinned maps as they are.
const FIRST_SYNC_WAIT: Duration = Duration::from_secs(10);

/// Per-workload data resolved once per config.
struct WorkloadRt {
    name: String,
    namespace: String,
    identity: SpiffeId,
    baggage: Option<HeaderValue>,
}

/// Per-service data resolved once per config.
struct ServiceRt {
    info: Arc<ServiceInfo>,
    waypoint: Option<(SocketAddr, SpiffeId, String, String)>,
}

/// What the data path reads: swapped whole on every config change.
#[derive(Default)]
pub struct Snapshot {
    desired: Arc<Desired>,
    workloads: HashMap<IpAddr, Arc<WorkloadRt>>,
    workloads_by_id: HashMap<u32, Arc<WorkloadRt>>,
    services: HashMap<u32, Arc<ServiceRt>>,
}

impl Snapshot {
    fn build(desired: Arc<Desired>, cluster: &str) -> Self {
        let mut s = Snapshot {
            desired: desired.clone(),
            ..Default::default()
        };
        for (id, w) in &desired.workload_table {
            let Ok(identity) = w.identity.parse::<SpiffeId>() else {
                warn!(workload = %w.name, identity = %w.identity, "invalid workload identity; its connections are refused");
                continue;
            };
            let baggage = Baggage {
                cluster: Some(cluster.to_string()),
                namespace: Some(w.namespace.clone()),
                workload_kind: Some("workloadentry".into()),
                workload_name: Some(w.name.clone()),
                service_name: w
                    .labels
                    .get("app")
                    .cloned()
                    .or_else(|| Some(w.name.clone())),
                service_version: w.labels.get("version").cloned(),
            }
            .to_header()
            .ok();
            let rt = Arc::new(WorkloadRt {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                identity,
                baggage,
            });
            if let Some(ip) = w.address {
                s.workloads.insert(ip, rt.clone());
            }
            s.workloads_by_id.insert(*id, rt);
        }
        for (id, info) in &desired.service_table {
            let waypoint = info.waypoint.as_ref().and_then(|wp| {
                let ident = wp.identity.parse::<SpiffeId>().ok()?;
                Some((
                    wp.addr,
                    ident,
                    wp.gateway.name.clone(),
                    wp.gateway.namespace.clone(),
                ))
            });
            s.services.insert(
                *id,
                Arc::new(ServiceRt {
                    info: info.clone(),
                    waypoint,
                }),
            );
        }
        s
    }

    fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadRt>> {
        self.workloads.get(&ip.to_canonical())
    }
}

/// Run the node agent until a signal. Startup order matters: the kernel side
/// is installed and the capture socket inserted before config is applied, so
/// a restart never opens a window without a socket; an invalid config at
/// start leaves the pinned maps exactly as they are.
pub async fn run(opts: NodeOptions) -> Result<(), NodeError> {
    run_with(opts, None).await
}

/// As [`run`], with `handler` instead of HBONE for steered connections
/// (tests plug in an echo handler; no CA is needed then).
pub async fn run_with(
    mut opts: NodeOptions,
    handler: Option<Arc<dyn Handler>>,
) -> Result<(), NodeError> {
    let watcher = match &opts.kubernetes {
        None => ConfigWatcher::spawn(
            opts.config_dir.clone(),
            crate::config::watch::DEFAULT_INTERVAL,
        ),
        Some(k) => {
            let client = crate::config::kube::client(k.kubeconfig.as_deref()).await?;
            let mut w = crate::config::kube::spawn(client, k.options.clone())?;
            let _ = tokio::time::timeout(FIRST_SYNC_WAIT, w.config.wait_for(Option::is_some)).await;
            w
        }
    };
    let initial = watcher.config.borrow().clone();
    if initial.is_none() {
        match watcher.rejected.borrow().as_ref() {
            Some(e) => {
                error!(config_dir = %opts.config_dir.display(), "config is invalid; the pinned maps are left as they are until it is fixed:\n{e}")
            }
            None => {
                warn!(config_dir = %opts.config_dir.display(), "no config yet; the pinned maps are left as they are")
            }
        }
    }
    // With no valid config the pinned `meta` (egress mode) stays as it is.
    opts.agent.meta = initial
        .as_ref()
        .map(|c| projection::meta(c.mesh.outbound_traffic_policy.mode, dns_capture(&opts.dns)));
    kernel::netlink::set_strict_rp_filter()?;
    let agent = Agent::start(opts.agent.clone()).await?;
    let pin_dir = opts.agent.paths.pin_dir.clone();

    // Metrics, with the kernel's counters read at scrape time.
    let mut mb = Metrics::builder();
    for c in shunt_common::Counter::ALL {
        let maps = agent.maps();
        mb.register_counter_fn(
            format!("shunt_kernel_{}", c.name()),
            format!("Kernel programs: {} events (all CPUs).", c.name()),
            move || {
                maps.counters()
                    .ok()
                    .and_then(|v| v.into_iter().find(|(k, _)| *k == c).map(|(_, n)| n))
                    .unwrap_or(0)
            },
        );
    }
    let h = watcher.health.clone();
    mb.register_gauge_fn(
        "shunt_config_source_up",
        "1 while the config source (directory or Kubernetes API) is readable; 0 while the last good config is kept because it is not.",
        move || i64::from(h.borrow().up),
    );
    let h = watcher.health.clone();
    mb.register_gauge_fn(
        "shunt_config_last_sync_timestamp_seconds",
        "Unix time the config source was last known complete and current.",
        move || {
            crate::config::watch::HealthRecord::from(&*h.borrow())
                .last_sync
                .map_or(0, |s| s as i64)
        },
    );
    let _health_file = crate::config::watch::persist_health(
        watcher.health.clone(),
        opts.agent.state_dir.join(crate::config::watch::HEALTH_FILE),
    );
    let metrics = mb.build();
    let logger = Arc::new(AccessLogger::stdout(opts.log_format));

    let hosts: SharedHostTable = HostTable::empty().into_shared();
    let _dns = if opts.dns.enabled {
        kernel::netlink::install_dns_interface(opts.dns.addr4, opts.dns.addr6).await?;
        let listen = vec![
            SocketAddr::new(opts.dns.addr4.into(), opts.dns.port),
            SocketAddr::new(opts.dns.addr6.into(), opts.dns.port),
        ];
        let proxy = DnsProxy::start(
            DnsConfig::new(listen, opts.dns.upstreams.clone()),
            hosts.clone(),
            metrics.dns(),
        )
        .await?;
        info!(listen = ?proxy.local_addrs(), upstreams = ?opts.dns.upstreams, "DNS proxy ready");
        Some(proxy)
    } else {
        None
    };

    let client = if handler.is_none() {
        let ca = Ca::load(&opts.ca_dir).map_err(|source| NodeError::Ca {
            dir: opts.ca_dir.display().to_string(),
            source,
        })?;
        let trust_domain = initial
            .as_ref()
            .map(|c| c.mesh.trust_domain.clone())
            .unwrap_or_else(|| "cluster.local".into());
        let ids = IdentityManager::new(
            Arc::new(ca),
            &trust_domain,
            IdentityConfig {
                lifetime: opts.cert_lifetime,
                ..Default::default()
            },
        )?;
        Some(HboneClient::new(ids, opts.hbone.clone()))
    } else {
        None
    };

    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let mut reconciler = Reconciler::new(
        &opts,
        &pin_dir,
        hosts.clone(),
        snapshot.clone(),
        ready.clone(),
    )?;
    if let Some(cfg) = initial {
        reconciler.apply(&cfg).await;
    }
    tokio::spawn(reconciler.run(watcher));
    spawn_event_reader(&pin_dir, snapshot.clone(), logger.clone())?;

    let mut admin = Vec::new();
    if let Some(a) = opts.admin.metrics {
        admin.push(
            AdminServer::bind(
                a,
                Endpoints {
                    metrics: Some(metrics.clone()),
                    ready: None,
                    config_dump: None,
                },
            )
            .await?,
        );
    }
    if let Some(a) = opts.admin.ready {
        admin.push(
            AdminServer::bind(
                a,
                Endpoints {
                    metrics: None,
                    ready: Some(ready.clone()),
                    config_dump: None,
                },
            )
            .await?,
        );
    }
    if let Some(a) = opts.admin.config_dump {
        let snap = snapshot.clone();
        let dump: crate::admin::ConfigDumpFn = Arc::new(move || config_dump(&snap.load()));
        admin.push(
            AdminServer::bind(
                a,
                Endpoints {
                    metrics: None,
                    ready: None,
                    config_dump: Some(dump),
                },
            )
            .await?,
        );
    }

    let handler: Arc<dyn Handler> = match (handler, client) {
        (Some(h), _) => h,
        (None, Some(client)) => Arc::new(HboneHandler {
            client: Arc::new(client),
            snapshot,
            metrics,
            logger,
        }),
        (None, None) => unreachable!("a client is built whenever no handler is given"),
    };
    agent.serve(handler).await?;
    drop(admin);
    Ok(())
}

/// Where the kernel sends captured DNS queries; `None` with the proxy off.
fn dns_capture(dns: &DnsSettings) -> Option<DnsCapture> {
    dns.enabled.then_some(DnsCapture {
        addr4: dns.addr4,
        addr6: dns.addr6,
        port: dns.port,
    })
}

fn config_dump(s: &Snapshot) -> serde_json::Value {
    let services: Vec<_> = s
        .services
        .values()
        .map(|svc| {
            serde_json::json!({
                "namespace": svc.info.namespace,
                "name": svc.info.name,
                "hosts": svc.info.hosts,
                "vips": svc.info.vips,
                "waypoint": svc.waypoint.as_ref().map(|w| format!("{}/{} {} {}", w.3, w.2, w.0, w.1)),
            })
        })
        .collect();
    let workloads: Vec<_> = s
        .workloads_by_id
        .values()
        .map(|w| serde_json::json!({"namespace": w.namespace, "name": w.name, "identity": w.identity.to_string()}))
        .collect();
    serde_json::json!({ "services": services, "workloads": workloads, "warnings": s.desired.warnings })
}

/// Applies each new config to the pinned maps, the DNS table and the data
/// path snapshot. Owns the allocator (the only one) and the map mirrors.
struct Reconciler {
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    dns: DnsSettings,
    alloc: Allocator,
    /// The reconciled maps; their mirrors start from what is pinned, so a
    /// restarted agent changes only what differs.
    sync: MapSync,
    hosts: SharedHostTable,
    snapshot: Arc<ArcSwap<Snapshot>>,
    clock: desired::StatusClock,
    ready: Arc<AtomicBool>,
}

impl Reconciler {
    fn new(
        opts: &NodeOptions,
        pin_dir: &std::path::Path,
        hosts: SharedHostTable,
        snapshot: Arc<ArcSwap<Snapshot>>,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, NodeError> {
        Ok(Self {
            state_dir: opts.agent.state_dir.clone(),
            cgroup_root: opts.agent.paths.cgroup_root.clone(),
            dns: opts.dns.clone(),
            alloc: Allocator::open(&opts.agent.state_dir)?,
            sync: MapSync::open(pin_dir)?,
            hosts,
            snapshot,
            clock: desired::StatusClock::load(&opts.agent.state_dir),
            ready,
        })
    }

    async fn run(mut self, mut watcher: ConfigWatcher) {
        loop {
            tokio::select! {
                r = watcher.config.changed() => {
                    if r.is_err() { return; }
                    let cfg = watcher.config.borrow_and_update().clone();
                    if let Some(cfg) = cfg {
                        self.apply(&cfg).await;
                    }
                }
                r = watcher.rejected.changed() => {
                    if r.is_err() { return; }
                    if let Some(e) = watcher.rejected.borrow_and_update().as_ref() {
                        error!("config rejected; the previous config stays in force:\n{e}");
                    }
                }
            }
        }
    }

    async fn apply(&mut self, cfg: &Config) {
        let started = Instant::now();
        let allocation = match self.alloc.allocate(cfg) {
            Ok(a) => a.clone(),
            Err(e) => {
                error!(error = %e, "VIP allocation failed; maps unchanged");
                return;
            }
        };
        let mut d = desired::build(
            cfg,
            &allocation,
            desired::cgroup_resolver(self.cgroup_root.clone()),
        );
        for w in &d.warnings {
            warn!("{w}");
        }
        // Each workload address → the interface it must arrive on (the
        // route back to it), for the spoofing check in sk_lookup.
        let addrs: Vec<IpAddr> = d
            .workload_table
            .values()
            .filter_map(|w| w.address)
            .collect();
        let sources = match kernel::netlink::route_oifs(&addrs).await {
            Ok(oifs) => projection::sources(&oifs),
            Err(e) => {
                warn!(error = %e, "route lookups for workload sources failed; source interface checks unchanged");
                self.sync.sources().clone()
            }
        };
        let projection = projection::from_desired(&d, dns_capture(&self.dns), sources);
        let stats = match self.sync.apply(&projection) {
            Ok(s) => s.total(),
            Err(e) => {
                error!(error = %e, "applying config to the kernel maps failed");
                return;
            }
        };
        let table = HostTable::from_entries(
            d.hosts
                .iter()
                .map(|(h, r)| (h.clone(), r.v4.clone(), r.v6.clone())),
        );
        match table {
            Ok(t) => self.hosts.store(Arc::new(t)),
            Err(e) => error!(error = %e, "DNS host table not updated"),
        }
        let now = desired::now_rfc3339();
        if self.clock.stamp(&mut d.status, &now) {
            if let Err(e) = self.clock.save(&self.state_dir) {
                warn!(error = %e, "saving status times");
            }
        }
        let d = Arc::new(d);
        self.snapshot
            .store(Arc::new(Snapshot::build(d.clone(), "Kubernetes")));
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        info!(
            services = d.services.len(),
            enrolled = d.enrolled.len(),
            added = stats.added,
            updated = stats.updated,
            removed = stats.removed,
            took_ms = started.elapsed().as_millis() as u64,
            "config applied"
        );
    }
}

/// Writes one line per kernel egress report, like ztunnel's log for a
/// connection that bypassed the mesh.
fn spawn_event_reader(
    pin_dir: &std::path::Path,
    snapshot: Arc<ArcSwap<Snapshot>>,
    logger: Arc<AccessLogger>,
) -> Result<(), NodeError> {
    let json = logger.format() == LogFormat::Json;
    kernel::events::spawn_reader(pin_dir, move |ev| {
        let snap = snapshot.load();
        let wl = snap.workloads_by_id.get(&ev.workload_id);
        println!("{}", egress_line(&ev, wl.map(|w| w.as_ref()), json));
    })?;
    Ok(())
}

fn egress_line(ev: &EgressEvent, wl: Option<&WorkloadRt>, json: bool) -> String {
    let time = rfc3339_micros(std::time::SystemTime::now());
    let dst = ev.dst;
    let (level, msg) = match ev.kind {
        EgressKind::Denied => ("warn", "connection refused (REGISTRY_ONLY)"),
        EgressKind::Passthrough => ("info", "connection passthrough"),
    };
    let proto = match ev.transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    };
    if json {
        return serde_json::json!({
            "time": time, "level": level, "scope": "access", "message": msg,
            "src.workload": wl.map(|w| w.name.as_str()),
            "src.namespace": wl.map(|w| w.namespace.as_str()),
            "src.identity": wl.map(|w| w.identity.to_string()),
            "dst.addr": dst.to_string(), "protocol": proto, "direction": "outbound",
        })
        .to_string();
    }
    let mut s = format!("{time} {level} access {msg}");
    if let Some(w) = wl {
        s.push_str(&format!(
            " src.workload=\"{}\" src.namespace=\"{}\" src.identity=\"{}\"",
            w.name, w.namespace, w.identity
        ));
    } else {
        s.push_str(&format!(" src.cgroup={}", ev.cgroup_id));
    }
    s.push_str(&format!(
        " dst.addr={dst} protocol=\"{proto}\" direction=\"outbound\""
    ));
    s
}

/// The production handler: every steered connection goes over HBONE to its
/// service's waypoint (or, for a ServiceEntry without one, straight to the
/// resolved endpoint as ztunnel does). An unknown source is refused.
struct HboneHandler {
    client: Arc<HboneClient>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    metrics: Arc<Metrics>,
    logger: Arc<AccessLogger>,
}

impl Handler for HboneHandler {
    fn handle(&self, conn: Steered) -> BoxFuture {
        let snap = self.snapshot.load_full();
        let client = self.client.clone();
        let metrics = self.metrics.clone();
        let logger = self.logger.clone();
        Box::pin(async move { carry(conn, snap, client, metrics, logger).await })
    }
}

async fn carry(
    mut conn: Steered,
    snap: Arc<Snapshot>,
    client: Arc<HboneClient>,
    metrics: Arc<Metrics>,
    logger: Arc<AccessLogger>,
) {
    let start = Instant::now();
    let Some(wl) = snap.workload_by_ip(conn.src.ip()).cloned() else {
        let mut log = ConnectionLog::new(conn.src, conn.dst, Direction::Outbound);
        log.error = Some("unknown source: no workload has this address; connection refused".into());
        logger.connection(&log);
        reset(conn.stream);
        return;
    };
    let Some(svc) = snap.services.get(&conn.service.service_id).cloned() else {
        let mut log = ConnectionLog::new(conn.src, conn.dst, Direction::Outbound);
        log.error = Some("service not in the agent's config".into());
        logger.connection(&log);
        reset(conn.stream);
        return;
    };
    let host = svc.info.hosts.first().cloned();
    let mut log = ConnectionLog::new(conn.src, conn.dst, Direction::Outbound);
    log.src_workload = Some(wl.name.clone());
    log.src_namespace = Some(wl.namespace.clone());
    log.src_identity = Some(wl.identity.to_string());
    log.dst_service = host.clone();
    let labels = ConnectionLabels {
        reporter: Reporter::Source,
        source_workload: wl.name.clone(),
        source_workload_namespace: wl.namespace.clone(),
        source_principal: wl.identity.to_string(),
        destination_service: host.clone().unwrap_or_default(),
        destination_workload: svc
            .waypoint
            .as_ref()
            .map(|w| w.2.clone())
            .unwrap_or_default(),
        destination_workload_namespace: svc
            .waypoint
            .as_ref()
            .map(|w| w.3.clone())
            .unwrap_or_default(),
        destination_principal: svc
            .waypoint
            .as_ref()
            .map(|w| w.1.to_string())
            .unwrap_or_default(),
        request_protocol: "tcp".into(),
        response_flags: "-".into(),
    };
    let rec = metrics.connection(labels);
    match &svc.waypoint {
        Some((wp_addr, wp_id, wp_name, wp_ns)) => {
            log.dst_addr = *wp_addr;
            log.dst_hbone_addr = Some(conn.dst.to_string());
            log.dst_workload = Some(wp_name.clone());
            log.dst_namespace = Some(wp_ns.clone());
            log.dst_identity = Some(wp_id.to_string());
            let req = ConnectRequest {
                source_identity: wl.identity.clone(),
                source_addr: conn.src,
                waypoint_addr: *wp_addr,
                waypoint_identity: wp_id.clone(),
                authority: conn.dst,
                host: host.clone(),
                baggage: wl.baggage.clone(),
                traceparent: None,
            };
            match client.connect(&req).await {
                Ok(tunnel) => {
                    let stats = tunnel.relay(&mut conn.stream).await;
                    log.bytes_sent = stats.bytes_sent;
                    log.bytes_recv = stats.bytes_received;
                    rec.sent(stats.bytes_sent);
                    rec.received(stats.bytes_received);
                    log.error = stats.error.map(|e| e.to_string());
                    rec.close(log.error.is_some(), None);
                }
                Err(e) => {
                    log.error = Some(e.to_string());
                    rec.close(true, Some("UF"));
                    reset(conn.stream);
                }
            }
        }
        None => {
            // No waypoint bound: like ztunnel, connect to the endpoint.
            let port = svc
                .info
                .port(conn.dst.port())
                .map(|p| p.target_port)
                .unwrap_or(conn.dst.port());
            match direct_connect(&svc.info, port).await {
                Ok((mut up, addr)) => {
                    log.dst_addr = addr;
                    let r = tokio::io::copy_bidirectional(&mut conn.stream, &mut up).await;
                    match r {
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
            }
        }
    }
    log.duration = start.elapsed();
    log.time = std::time::SystemTime::now();
    logger.connection(&log);
}

async fn direct_connect(
    svc: &ServiceInfo,
    port: u16,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    let targets: Vec<SocketAddr> = if !svc.endpoints.is_empty() {
        svc.endpoints
            .iter()
            .filter_map(|e| e.address.parse::<IpAddr>().ok())
            .map(|ip| SocketAddr::new(ip, port))
            .collect()
    } else {
        let host = svc.hosts.first().cloned().unwrap_or_default();
        let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
            .await?
            .collect();
        found
    };
    let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address for the service");
    for t in targets {
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(t)).await
        {
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

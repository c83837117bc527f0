//! The node agent wired together: the capture server, the reconciler
//! (config → allocation → model → kernel maps, DNS table, data path), the
//! DNS proxy, egress reports from the kernel, admin endpoints and the
//! outbound path for steered connections. Wiring only: each stage lives in
//! its own module.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Duration,
};

use arc_swap::ArcSwap;
use tracing::{error, info, warn};

use crate::{
    admin::{AdminServer, Endpoints},
    config::watch::ConfigWatcher,
    dns::{ClientTable, DnsConfig, DnsProxy, HostTable, SharedClients, SharedHostTable},
    hbone::{ClientSettings, HboneClient},
    identity::{Ca, CaClient, IdentityConfig, IdentityManager},
    kernel::{
        self,
        events::{EgressKind, Transport},
        projection::{self, DnsCapture},
        KernelError,
    },
    model::{Mesh, Model},
    proxy::capture::{CaptureOptions, CaptureServer, CaptureServerError, Handler},
    proxy::handover::{self, Successor},
    proxy::outbound::Outbound,
    reconcile::Reconciler,
    telemetry::{AccessLogger, EgressLog, LogFormat, Metrics},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    CaptureServer(#[from] CaptureServerError),
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
    /// Forwarded queries in flight per client address; `None`: a quarter
    /// of what the fd limit allows, at most
    /// [`crate::dns::DEFAULT_MAX_INFLIGHT_PER_CLIENT`]
    /// ([`DnsConfig::fit_fds`]).
    pub max_inflight_per_client: Option<usize>,
}

#[derive(Clone, Debug, Default)]
pub struct AdminAddrs {
    pub metrics: Option<SocketAddr>,
    pub ready: Option<SocketAddr>,
    pub config_dump: Option<SocketAddr>,
}

#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub agent: CaptureOptions,
    pub config_dir: PathBuf,
    /// Read config from the Kubernetes API instead of `config_dir`.
    pub kubernetes: Option<KubernetesSource>,
    pub ca_dir: PathBuf,
    /// Certificates from this CA's CSR API (Istio's protocol, as node
    /// agent: for the pods on this node); `ca_dir` is then not read.
    pub ca_client: Option<crate::identity::CaClientSettings>,
    pub dns: DnsSettings,
    pub admin: AdminAddrs,
    pub log_format: LogFormat,
    pub cert_lifetime: Duration,
    /// HBONE connections to waypoints: pool, keepalive, connect timeout.
    pub hbone: ClientSettings,
    /// How long a removed host's VIPs stay reserved for its return.
    pub vip_grace: Duration,
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

/// Run the node agent until a signal. Startup order matters: a running
/// agent is told a successor is coming (`handover::announce`), the kernel
/// side is installed, config applied, and the capture socket inserted only
/// when connections can be served (`CaptureServer::serve`); the predecessor
/// keeps the slot until then, so a restart never opens a window without a
/// socket. An invalid config at start leaves the pinned maps as they are.
pub async fn run(opts: NodeOptions) -> Result<(), NodeError> {
    run_with(opts, None).await
}

/// As [`run`], with `handler` instead of HBONE for steered connections
/// (tests plug in an echo handler; no CA is needed then).
pub async fn run_with(
    mut opts: NodeOptions,
    handler: Option<Arc<dyn Handler>>,
) -> Result<(), NodeError> {
    // First of all: a running agent keeps capturing until this one takes
    // over, even if it is asked to stop meanwhile (a DaemonSet surge).
    let predecessor = handover::announce(&opts.agent.state_dir).await;
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
        .map(|c| projection::meta(Mesh::from_config(&c.mesh).egress, dns_capture(&opts.dns)));
    kernel::netlink::set_strict_rp_filter()?;
    let agent = CaptureServer::start(opts.agent.clone(), predecessor).await?;
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
    // The node until the first config names the enrolled workloads.
    let dns_clients: SharedClients = ClientTable::node_only().into_shared();
    // The DNS addresses go on first: the client table of every reconcile
    // (the first included) takes the node's addresses from the interfaces,
    // and a node query's source is the proxy address itself.
    if opts.dns.enabled {
        kernel::netlink::install_dns_interface(opts.dns.addr4, opts.dns.addr6).await?;
    }
    let client = if handler.is_none() {
        let trust_domain = initial
            .as_ref()
            .map(|c| c.mesh.trust_domain.clone())
            .unwrap_or_else(|| "cluster.local".into());
        let cfg = IdentityConfig {
            lifetime: opts.cert_lifetime,
            ..Default::default()
        };
        let ids = match &opts.ca_client {
            Some(settings) => {
                let client = CaClient::new(settings.clone())?;
                info!(ca = %settings.address, "workload certificates from the CA's CSR API");
                IdentityManager::remote(Arc::new(client), &trust_domain, cfg)?
            }
            None => {
                let ca = Ca::load(&opts.ca_dir).map_err(|source| NodeError::Ca {
                    dir: opts.ca_dir.display().to_string(),
                    source,
                })?;
                IdentityManager::new(Arc::new(ca), &trust_domain, cfg)?
            }
        };
        Some(HboneClient::new(ids, opts.hbone.clone()))
    } else {
        None
    };

    let model = Arc::new(ArcSwap::from_pointee(Model::default()));
    let ready = Arc::new(AtomicBool::new(false));
    let mut reconciler = Reconciler::new(
        &opts,
        &pin_dir,
        hosts.clone(),
        dns_clients.clone(),
        model.clone(),
        ready.clone(),
    )?;
    if let Some(cfg) = initial {
        reconciler.apply(&cfg).await;
    }
    // The DNS proxy only once the first config is applied: its socket
    // joins the predecessor's SO_REUSEPORT group at bind, and until then
    // it would answer pods REFUSED (no enrolled clients, no hosts yet) —
    // lookups lost across a handover.
    let _dns = if opts.dns.enabled {
        let listen = vec![
            SocketAddr::new(opts.dns.addr4.into(), opts.dns.port),
            SocketAddr::new(opts.dns.addr6.into(), opts.dns.port),
        ];
        let mut config = DnsConfig::new(listen, opts.dns.upstreams.clone());
        // Its sockets fit in its share of the fd limit (the captured
        // connections' budget is what the reserve leaves).
        let fd_limit = crate::sockets::fd_limit().map_err(crate::dns::DnsError::FdLimit)?;
        config.fit_fds(
            crate::sockets::load_share(crate::sockets::control_plane_reserve(fd_limit)),
            opts.dns.max_inflight_per_client,
        );
        config.clients = dns_clients.clone();
        let (inflight, per_client, tcp) = (
            config.max_inflight,
            config.max_inflight_per_client,
            config.max_tcp_connections,
        );
        let proxy = Arc::new(DnsProxy::start(config, hosts.clone(), metrics.dns()).await?);
        info!(
            listen = ?proxy.local_addrs(),
            upstreams = ?opts.dns.upstreams,
            max_forwards = inflight,
            max_forwards_per_client = per_client,
            max_tcp_per_listener = tcp,
            fd_limit,
            "DNS proxy ready"
        );
        // Once a successor took over (its DNS sockets are bound by then),
        // new queries go to it only; this proxy answers what it has queued
        // until the drain ends.
        let mut successors = agent.successors();
        let weak = Arc::downgrade(&proxy);
        tokio::spawn(async move {
            if successors
                .wait_for(|s| *s == Successor::TookOver)
                .await
                .is_ok()
            {
                if let Some(proxy) = weak.upgrade() {
                    proxy.leave_reuseport_group().await;
                }
            }
        });
        Some(proxy)
    } else {
        None
    };

    tokio::spawn(reconciler.run(watcher));
    spawn_event_reader(&pin_dir, model.clone(), logger.clone())?;

    let mut admin = Vec::new();
    if let Some(a) = opts.admin.metrics {
        admin.push(
            AdminServer::bind(
                a,
                Endpoints {
                    metrics: Some(metrics.clone()),
                    ..Default::default()
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
                    ready: Some(ready.clone()),
                    ..Default::default()
                },
            )
            .await?,
        );
    }
    if let Some(a) = opts.admin.config_dump {
        let m = model.clone();
        let dump: crate::admin::ConfigDumpFn = Arc::new(move || config_dump(&m.load()));
        let m = model.clone();
        let in_force: crate::admin::ConfigFn = Arc::new(move || m.load().config().clone());
        admin.push(
            AdminServer::bind(
                a,
                Endpoints {
                    config_dump: Some(dump),
                    config: Some(in_force),
                    ..Default::default()
                },
            )
            .await?,
        );
    }

    let handler: Arc<dyn Handler> = match (handler, client) {
        (Some(h), _) => h,
        (None, Some(client)) => Arc::new(Outbound {
            client: Arc::new(client),
            model,
            metrics,
            logger,
        }),
        (None, None) => unreachable!("a client is built whenever no handler is given"),
    };
    // On a worker thread, not `block_on`'s: each accepted connection's
    // task then starts in that worker's LIFO slot instead of the injection
    // queue, which woke a parked worker (a futex wake and two context
    // switches) for every connection.
    match tokio::spawn(agent.serve(handler)).await {
        Ok(served) => served?,
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(e) => panic!("capture server task: {e}"),
    }
    drop(admin);
    Ok(())
}

/// Where the kernel sends captured DNS queries; `None` with the proxy off.
pub(crate) fn dns_capture(dns: &DnsSettings) -> Option<DnsCapture> {
    dns.enabled.then_some(DnsCapture {
        addr4: dns.addr4,
        addr6: dns.addr6,
        port: dns.port,
    })
}

fn config_dump(m: &Model) -> serde_json::Value {
    let services: Vec<_> = m
        .services()
        .map(|svc| {
            serde_json::json!({
                "namespace": svc.namespace(),
                "name": svc.name(),
                "hosts": svc.hosts,
                "vips": svc.vips.iter().map(|v| v.ip).collect::<Vec<_>>(),
                "waypoint": match &svc.waypoint {
                    crate::model::WaypointBinding::Bound(w) => Some(format!("{} {} {}", w.gateway, w.addr, w.identity)),
                    crate::model::WaypointBinding::Refused(u) => Some(format!("refused: {}: {}", u.reason, u.message)),
                    crate::model::WaypointBinding::None => None,
                },
            })
        })
        .collect();
    let workloads: Vec<_> = m
        .workloads()
        .map(|w| serde_json::json!({"namespace": w.namespace(), "name": w.name(), "identity": w.identity.to_string()}))
        .collect();
    let warnings: Vec<String> = m.warnings().map(|w| w.to_string()).collect();
    serde_json::json!({ "services": services, "workloads": workloads, "warnings": warnings })
}

/// Writes one access line per kernel egress report, like ztunnel's log for
/// a connection that bypassed the mesh.
fn spawn_event_reader(
    pin_dir: &std::path::Path,
    model: Arc<ArcSwap<Model>>,
    logger: Arc<AccessLogger>,
) -> Result<(), NodeError> {
    kernel::events::spawn_reader(pin_dir, move |ev| {
        let m = model.load();
        let src = m.workload(ev.workload_id).map(|w| {
            (
                w.name().to_string(),
                w.namespace().to_string(),
                w.identity.to_string(),
            )
        });
        logger.egress(&EgressLog {
            time: std::time::SystemTime::now(),
            denied: ev.kind == EgressKind::Denied,
            udp: ev.transport == Transport::Udp,
            dst_addr: ev.dst,
            src,
            src_cgroup: ev.cgroup_id,
        });
    })?;
    Ok(())
}

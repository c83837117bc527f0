//! `shunt waypoint` wired together: config watcher, model and routes, CA
//! and identity, the HBONE server with the tunnel handler, admin endpoints
//! and the reload task. Wiring only: each stage lives in `waypoint/`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::admin::{AdminServer, Endpoints};
use crate::config::watch::ConfigWatcher;
use crate::config::{Config, ObjectKey};
use crate::hbone::HboneServer;
use crate::identity::{Ca, CaClient, IdentityManager, SpiffeId};
use crate::model::{Model, NoCgroups};
use crate::policy::GatewayRef;
use crate::telemetry::Metrics;

use crate::waypoint::l4::TunnelHandler;
use crate::waypoint::pool::IdleBudget;
use crate::waypoint::reload::reload_loop;
use crate::waypoint::{routes, Routes, Shared, WaypointError, WaypointOptions};

/// A running waypoint. Dropping it stops every task.
pub struct WaypointServer {
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

impl Drop for WaypointServer {
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

impl WaypointServer {
    /// Loads config, allocation and CA, binds the HBONE and admin
    /// listeners and starts serving. Must run inside a tokio runtime.
    pub async fn start(opts: WaypointOptions) -> Result<WaypointServer, WaypointError> {
        let watcher = match &opts.kubernetes {
            None => ConfigWatcher::spawn(opts.config_dir.clone(), opts.reload_interval),
            Some(k) => {
                let client = crate::config::kube::client(k.kubeconfig.as_deref()).await?;
                let mut ko =
                    crate::config::kube::KubeOptions::new(String::new(), std::path::PathBuf::new());
                ko.watch_pods = false;
                ko.mesh_file = k.mesh_file.clone();
                let mut w = crate::config::kube::spawn(client, ko)?;
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(30),
                    w.config.wait_for(Option::is_some),
                )
                .await;
                w
            }
        };
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
        let mut alloc = crate::alloc::Reader::new(&opts.state_dir);
        let allocation = match cfg.api_status {
            Some(_) => crate::alloc::from_status(&cfg),
            None => alloc.read()?,
        };
        let lagging = crate::waypoint::reload::lags(&cfg, &allocation);
        let model = Arc::new(Model::build(cfg.clone(), &allocation, &NoCgroups));
        let snap = routes::build(
            model,
            &routes::BuildInputs {
                gateway: &gateway,
                connect_timeout: opts.upstream_timeout,
                previous: None,
                // Pooled upstream connections hold fds no tunnel counts:
                // half of the reserve the fd budget keeps.
                idle_budget: opts
                    .server
                    .fd_budget
                    .map(|b| Arc::new(IdleBudget::new(crate::sockets::load_share(b.reserve)))),
            },
        )?;
        for w in &snap.warnings {
            tracing::warn!("{w}");
        }
        let ids = match &opts.ca_client {
            Some(settings) => {
                let mut settings = settings.clone();
                // A waypoint asks for its own identity only.
                settings.impersonate = false;
                let client = Arc::new(CaClient::new(settings)?);
                IdentityManager::remote(client, cfg.trust_domain(), opts.identity.clone())?
            }
            None => {
                let ca = Ca::load(&opts.ca_dir).map_err(|err| WaypointError::Ca {
                    dir: opts.ca_dir.clone(),
                    err,
                })?;
                IdentityManager::new(Arc::new(ca), cfg.trust_domain(), opts.identity.clone())?
            }
        };
        // The Gateway's service account (Istio names it after the Gateway).
        let identity = SpiffeId::new(cfg.trust_domain(), &gateway.namespace, &gateway.name)?;
        ids.obtain(&identity).await?;
        let tls = ids.server_config(&identity)?;
        let metrics = opts
            .metrics
            .clone()
            .unwrap_or_else(|| Metrics::builder().build());
        let shared = Arc::new(Shared {
            routes: ArcSwap::from_pointee(snap),
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
                    .routes
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
                ..Default::default()
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
        let handler = Arc::new(TunnelHandler {
            shared: shared.clone(),
        });
        let server = tokio::spawn(server.serve(listener, handler));
        ready.store(true, Ordering::Release);
        tracing::info!(
            identity = %identity,
            listen = %hbone_addr,
            services = shared.routes.load().targets.len(),
            "waypoint ready"
        );

        let watcher = Arc::new(watcher);
        let reload = tokio::spawn(reload_loop(
            watcher.clone(),
            shared.clone(),
            alloc,
            lagging,
            opts.upstream_timeout,
            opts.reload_interval,
        ));
        Ok(WaypointServer {
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
    pub fn routes(&self) -> Arc<Routes> {
        self.shared.routes.load_full()
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

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
//! pools) lives in immutable [`Routes`] swapped atomically on reload;
//! a tunnel or request loads it once and does one hash lookup.

mod body;
mod framing;
pub(crate) mod l4;
mod l7;
pub(crate) mod pool;
pub(crate) mod reload;
pub(crate) mod routes;
pub mod sni;
mod source;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::hbone::ServerSettings;
use crate::identity::IdentityConfig;
use crate::policy::GatewayRef;
use crate::telemetry::{AccessLogger, LogFormat, Metrics};

pub use crate::app::waypoint::WaypointServer;
pub use l7::RBAC_DENIED_BODY;
pub use routes::{check as check_routes, check_changed as check_changed_routes, Routes, Target};

// For `crate::fuzzing` only.
pub(crate) use framing::{Guard as FramingGuard, Verdicts as FramingVerdicts};
pub(crate) use source::judge as judge_source;

/// Errors carry their cause in the message (no `source()` chain), so that
/// `{:#}` at the binary's edge prints each cause once.
#[derive(Debug, thiserror::Error)]
pub enum WaypointError {
    #[error("config directory {dir}: {msg}")]
    ConfigDir { dir: PathBuf, msg: String },
    #[error("{0}")]
    Config(String),
    #[error("Kubernetes API: {0}")]
    Kube(crate::config::kube::KubeError),
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
from_err!(crate::config::kube::KubeError, Kube);
from_err!(crate::identity::IdentityError, Identity);
from_err!(crate::admin::AdminError, Admin);
from_err!(crate::hbone::HboneError, Server);

/// How to start a waypoint.
pub struct WaypointOptions {
    pub config_dir: PathBuf,
    /// Read the API server instead of `config_dir` (and VIPs from
    /// ServiceEntry status instead of `state_dir`).
    pub kubernetes: Option<WaypointKube>,
    /// Read only: the agent's persisted VIP allocation (`alloc::load`).
    pub state_dir: PathBuf,
    /// Istio plug-in CA layout (`identity::Ca::load`).
    pub ca_dir: PathBuf,
    /// The waypoint's own certificate from this CA's CSR API (Istio's
    /// protocol, no impersonation); `ca_dir` is then not read.
    pub ca_client: Option<crate::identity::CaClientSettings>,
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

/// `shunt waypoint --source kubernetes`.
#[derive(Clone, Debug, Default)]
pub struct WaypointKube {
    /// `None`: the in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
    pub mesh_file: Option<PathBuf>,
}

impl WaypointOptions {
    /// Defaults from the port plan (ztunnel's), text access log on stdout.
    pub fn new(config_dir: PathBuf, state_dir: PathBuf, ca_dir: PathBuf) -> Self {
        WaypointOptions {
            config_dir,
            kubernetes: None,
            state_dir,
            ca_dir,
            ca_client: None,
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
    pub routes: ArcSwap<Routes>,
    /// Bumped after each new snapshot: open TCP tunnels re-check their
    /// authorization on it.
    pub changed: tokio::sync::watch::Sender<u64>,
    pub gateway: GatewayRef,
    pub identity_uri: String,
    pub access_log: Arc<AccessLogger>,
    pub metrics: Arc<Metrics>,
}

//! `shunt waypoint`: the egress gateway.

use anyhow::Context as _;
use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use shunt_agent::{
    policy::GatewayRef,
    telemetry::{AccessLogger, LogFormat},
    waypoint::{WaypointKube, WaypointOptions, WaypointServer},
};

use super::common::{parse_duration, runtime, CaClientArgs, ConfigDirArgs, LogArgs, StateArgs};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Example:\n  shunt waypoint --config-dir /etc/shunt/config --ca-dir /etc/shunt/ca \\\n    --name egress-gateway --namespace common-infrastructure"
)]
pub struct Args {
    #[command(flatten)]
    config: ConfigDirArgs,
    /// Where config comes from: `directory` (--config-dir, VIPs from the
    /// agent's state dir) or `kubernetes` (the API server: the same objects
    /// the agents read, VIPs from ServiceEntry status).
    #[arg(long, env = "SHUNT_SOURCE", default_value = "directory", value_parser = ["directory", "kubernetes"])]
    source: String,
    /// kubeconfig for `--source kubernetes`; default: the in-cluster
    /// service account.
    #[arg(long, env = "SHUNT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// MeshConfig file (named mesh.yaml) for `--source kubernetes`.
    #[arg(long, env = "SHUNT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    log: LogArgs,
    /// CA directory in Istio's plug-in layout (ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem); the waypoint's certificate is issued
    /// from it.
    #[arg(long, env = "SHUNT_CA_DIR", default_value = "/etc/shunt/ca")]
    ca_dir: PathBuf,
    #[command(flatten)]
    ca_client: CaClientArgs,
    /// Name of this waypoint's Gateway. Default: the config's only
    /// istio-waypoint Gateway.
    #[arg(long, env = "SHUNT_WAYPOINT_NAME", requires = "namespace")]
    name: Option<String>,
    /// Namespace of this waypoint's Gateway.
    #[arg(long, env = "SHUNT_WAYPOINT_NAMESPACE", requires = "name")]
    namespace: Option<String>,
    /// HBONE listener.
    #[arg(long, env = "SHUNT_WAYPOINT_LISTEN", default_value = "[::]:15008")]
    listen: SocketAddr,
    /// `/config_dump` listener (keep it on localhost).
    #[arg(long, env = "SHUNT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// `/metrics` listener.
    #[arg(long, env = "SHUNT_METRICS_ADDR", default_value = "[::]:15020")]
    metrics: SocketAddr,
    /// `/healthz/ready` listener.
    #[arg(long, env = "SHUNT_READY_ADDR", default_value = "[::]:15021")]
    ready: SocketAddr,
    /// Upstream resolve + connect + TLS handshake timeout.
    #[arg(long, env = "SHUNT_UPSTREAM_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    upstream_timeout: Duration,
    /// Deadline for a client's TLS and HTTP/2 handshakes on the HBONE port.
    #[arg(long, env = "SHUNT_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// TLS handshakes in progress at once on the HBONE port; connections
    /// beyond are closed at accept.
    #[arg(long, env = "SHUNT_MAX_HANDSHAKES", default_value_t = 4096)]
    max_handshakes: usize,
    /// Open HBONE connections per source address; connections beyond are
    /// closed at accept.
    #[arg(long, env = "SHUNT_MAX_CONNECTIONS_PER_SOURCE", default_value_t = 1024)]
    max_connections_per_source: usize,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.log.init();
    super::common::raise_fd_limit();
    let format = if args.log.json() {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let mut opts = WaypointOptions::new(args.config.config_dir, args.state.state_dir, args.ca_dir);
    opts.ca_client = args.ca_client.settings();
    if args.source == "kubernetes" {
        opts.kubernetes = Some(WaypointKube {
            kubeconfig: args.kubeconfig,
            mesh_file: args.mesh_config,
        });
    }
    opts.gateway = match (args.name, args.namespace) {
        (Some(name), Some(namespace)) => Some(GatewayRef { namespace, name }),
        _ => None,
    };
    opts.listen = args.listen;
    opts.admin = Some(args.admin);
    opts.metrics_addr = Some(args.metrics);
    opts.ready_addr = Some(args.ready);
    opts.upstream_timeout = args.upstream_timeout;
    opts.server.handshake_timeout = args.handshake_timeout;
    opts.server.max_handshakes = args.max_handshakes;
    opts.server.max_connections_per_source = args.max_connections_per_source;
    // After raising the limit: connections and tunnels' upstream sockets
    // stay below it, and the config reads keep their fds.
    let fd_limit = shunt_agent::sockets::fd_limit().context("reading the open-file limit")?;
    let budget = shunt_agent::sockets::FdBudget::from_limit(fd_limit)?;
    tracing::info!(
        fd_limit,
        reserve = budget.reserve,
        total = budget.total,
        per_source = budget.per_source,
        "HBONE fd budget (connections and tunnels' upstream sockets)"
    );
    opts.server.fd_budget = Some(budget);
    opts.access_log = Arc::new(AccessLogger::stdout(format));
    runtime()?.block_on(async {
        let wp = WaypointServer::start(opts).await?;
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = wp.wait() => r?,
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, stopping"),
            _ = term.recv() => tracing::info!("terminated, stopping"),
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

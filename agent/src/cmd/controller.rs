//! `shunt controller`: the cluster's one VIP allocator (Lease-elected among
//! its replicas) and writer of ServiceEntry status.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use shunt_agent::config::kube::{
    self,
    controller::{self, ControllerOptions},
    lease::LeaseSettings,
};

use super::common::{parse_duration, runtime, LogArgs};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  POD_NAMESPACE=shunt-system POD_NAME=shunt-controller-0 shunt controller --mesh-config /etc/shunt/mesh/mesh.yaml
  shunt controller --kubeconfig ~/.kube/config --namespace shunt-system --identity $(hostname)")]
pub struct Args {
    /// kubeconfig; default: the in-cluster service account (else
    /// $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "SHUNT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the Lease and the allocation ConfigMap.
    #[arg(long, env = "POD_NAMESPACE", default_value = "shunt-system")]
    namespace: String,
    /// This replica's name in the Lease (the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: String,
    #[arg(long, default_value = "shunt-controller")]
    lease_name: String,
    /// ConfigMap holding the allocation state (`vips.json`).
    #[arg(long, default_value = "shunt-vips")]
    state_config_map: String,
    /// How long a silent leader keeps the Lease (whole seconds).
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// MeshConfig file (named mesh.yaml), as for the agent.
    #[arg(long, env = "SHUNT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    /// How long a removed host's VIPs stay reserved for its return.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    vip_grace: Duration,
    #[command(flatten)]
    log: LogArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.log.init();
    anyhow::ensure!(
        !args.identity.is_empty(),
        "--identity (or POD_NAME from the downward API) must not be empty"
    );
    let secs = args.lease_duration.as_secs().max(1);
    let lease = LeaseSettings {
        duration: Duration::from_secs(secs),
        // client-go's proportions: renew deadline 2/3, retry 2/15.
        renew_deadline: Duration::from_millis(secs * 2000 / 3),
        retry: Duration::from_millis((secs * 2000 / 15).max(200)),
        ..LeaseSettings::new(&args.namespace, &args.lease_name, &args.identity)
    };
    let mut opts = ControllerOptions::new(lease);
    opts.state_config_map = args.state_config_map;
    opts.mesh_file = args.mesh_config;
    opts.vip_grace = args.vip_grace;
    runtime()?.block_on(async move {
        let client = kube::client(args.kubeconfig.as_deref())
            .await
            .context("Kubernetes client")?;
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => tracing::info!("terminated, releasing the Lease"),
                _ = tokio::signal::ctrl_c() => tracing::info!("interrupted, releasing the Lease"),
            }
        };
        controller::run(client, opts, shutdown)
            .await
            .context("controller")
    })?;
    Ok(ExitCode::SUCCESS)
}

//! `shunt controller`: the cluster's one VIP allocator (Lease-elected among
//! its replicas) and writer of ServiceEntry status; with `--csr-listen`, the
//! cluster's CA (Istio's CSR API), on every replica: signing needs no
//! leader, so a leader change never interrupts certificate issuance.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::Context as _;
use shunt_agent::config::kube::{
    self,
    controller::{self, ControllerOptions},
    lease::LeaseSettings,
    node_auth,
};
use shunt_agent::config::Snapshot;
use shunt_agent::identity::{csr::CsrPolicy, csr_server::CsrServerSettings, Ca};

use super::common::{parse_duration, runtime, LogArgs};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  POD_NAMESPACE=shunt-system POD_NAME=shunt-controller-0 shunt controller --mesh-config /etc/shunt/mesh/mesh.yaml
  shunt controller --kubeconfig ~/.kube/config --namespace shunt-system --identity $(hostname)
  shunt controller --identity c-0 --csr-listen [::]:15012 --ca-dir /etc/shunt/ca \\
      --csr-server-name shunt-controller.shunt-system.svc")]
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
    #[command(flatten)]
    csr: CsrArgs,
}

/// The CSR endpoint (Istio's IstioCertificateService).
#[derive(clap::Args, Debug)]
struct CsrArgs {
    /// Serve the CSR API here (Istio's port is 15012). Unset: no CA here.
    #[arg(long, env = "SHUNT_CSR_LISTEN")]
    csr_listen: Option<SocketAddr>,
    /// The CA that signs (Istio plug-in layout: ca-cert.pem, ca-key.pem,
    /// root-cert.pem, cert-chain.pem; e.g. Istio's cacerts Secret). Only
    /// read with --csr-listen.
    #[arg(long, env = "SHUNT_CA_DIR", default_value = "/etc/shunt/ca")]
    ca_dir: PathBuf,
    /// DNS names of the endpoint's serving certificate: what agents dial
    /// (repeatable).
    #[arg(
        long = "csr-server-name",
        default_values_t = ["shunt-controller.shunt-system.svc".to_string()],
        value_delimiter = ','
    )]
    csr_server_names: Vec<String>,
    /// Service accounts (namespace/name) that may request certificates for
    /// the pods on their node (Istio's CA_TRUSTED_NODE_ACCOUNTS).
    #[arg(
        long,
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        default_value = "shunt-system/shunt-agent",
        value_delimiter = ','
    )]
    trusted_node_accounts: Vec<String>,
    /// Audience the callers' projected tokens must have (Istio's
    /// TOKEN_AUDIENCES).
    #[arg(
        long,
        env = "TOKEN_AUDIENCES",
        default_value = "istio-ca",
        value_delimiter = ','
    )]
    token_audience: Vec<String>,
    /// Workload certificate lifetime when a request asks for none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    default_cert_lifetime: Duration,
    /// Longer requested lifetimes are shortened to this.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    max_cert_lifetime: Duration,
}

impl CsrArgs {
    fn policy(&self, trust_domain: String) -> anyhow::Result<CsrPolicy> {
        let trusted = self
            .trusted_node_accounts
            .iter()
            .filter(|a| !a.is_empty())
            .map(|a| match a.split_once('/') {
                Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains('/') => {
                    Ok((ns.to_string(), sa.to_string()))
                }
                _ => Err(anyhow::anyhow!(
                    "--trusted-node-accounts: {a:?} is not namespace/serviceaccount"
                )),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(
            self.max_cert_lifetime >= Duration::from_secs(60),
            "--max-cert-lifetime must be at least 1m"
        );
        Ok(CsrPolicy {
            trust_domain,
            trusted_node_accounts: trusted,
            default_validity: self.default_cert_lifetime.min(self.max_cert_lifetime),
            max_validity: self.max_cert_lifetime,
        })
    }
}

/// The mesh's trust domain from the MeshConfig file (default cluster.local).
fn trust_domain(mesh: Option<&std::path::Path>) -> anyhow::Result<String> {
    let Some(path) = mesh else {
        return Ok("cluster.local".into());
    };
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let cfg = Snapshot::new(vec![(path.to_path_buf(), bytes)])
        .parse()
        .with_context(|| format!("mesh config {}", path.display()))?;
    Ok(cfg.trust_domain().to_string())
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
    // Read before anything runs: a CA that cannot be loaded stops start-up.
    let csr = match args.csr.csr_listen {
        Some(addr) => {
            let ca = Ca::load(&args.csr.ca_dir)
                .with_context(|| format!("CA in {}", args.csr.ca_dir.display()))?;
            let policy = args
                .csr
                .policy(trust_domain(args.mesh_config.as_deref())?)?;
            Some((addr, Arc::new(ca), policy))
        }
        None => None,
    };
    let mut opts = ControllerOptions::new(lease);
    opts.state_config_map = args.state_config_map;
    opts.mesh_file = args.mesh_config;
    opts.vip_grace = args.vip_grace;
    runtime()?.block_on(async move {
        let client = kube::client(args.kubeconfig.as_deref())
            .await
            .context("Kubernetes client")?;
        let (stop_csr, csr_stopped) = tokio::sync::watch::channel(false);
        let csr_task = match csr {
            Some((addr, ca, policy)) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("CSR endpoint {addr}"))?;
                tracing::info!(listen = %addr, trust_domain = %policy.trust_domain, "serving Istio's CSR API");
                let mut stopped = csr_stopped.clone();
                Some(tokio::spawn(node_auth::serve_csr(
                    client.clone(),
                    ca,
                    policy,
                    args.csr.token_audience.clone(),
                    listener,
                    CsrServerSettings::new(args.csr.csr_server_names.clone()),
                    async move {
                        let _ = stopped.wait_for(|s| *s).await;
                    },
                )))
            }
            None => None,
        };
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
        let r = match csr_task {
            Some(mut task) => tokio::select! {
                r = controller::run(client, opts, shutdown) => r.context("controller"),
                r = &mut task => Err(match r {
                    Ok(Ok(())) => anyhow::anyhow!("CSR endpoint stopped"),
                    Ok(Err(e)) => anyhow::Error::new(e).context("CSR endpoint"),
                    Err(e) => anyhow::Error::new(e).context("CSR endpoint"),
                }),
            },
            None => controller::run(client, opts, shutdown).await.context("controller"),
        };
        let _ = stop_csr.send(true);
        r
    })?;
    Ok(ExitCode::SUCCESS)
}

//! Flags shared by several subcommands, with the same names and env vars
//! everywhere.

use std::{path::PathBuf, time::Duration};

use clap::Args;

#[derive(Args, Clone, Debug)]
pub struct KernelArgs {
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, env = "SHUNT_PIN_DIR", default_value = "/sys/fs/bpf/shunt")]
    pub pin_dir: PathBuf,
    /// Network namespace that is the node (a name under /run/netns, as
    /// `ip netns` lists them, or a path): routes, sk_lookup, the capture
    /// socket, the DNS proxy and the admin endpoints live there. Default:
    /// the current one (for `status` and `get`: the running agent's).
    #[arg(long, env = "SHUNT_NETNS", value_parser = super::reach::parse_netns)]
    pub netns: Option<PathBuf>,
}

#[derive(Args, Clone, Debug)]
pub struct StateArgs {
    /// Directory for shunt's state: VIP allocations, status times, pid file.
    #[arg(long, env = "SHUNT_STATE_DIR", default_value = "/var/lib/shunt")]
    pub state_dir: PathBuf,
}

#[derive(Args, Clone, Debug)]
pub struct ConfigDirArgs {
    /// Directory of Istio YAML (Namespace, ServiceEntry, AuthorizationPolicy,
    /// DestinationRule, Gateway, WorkloadEntry) plus an optional mesh.yaml.
    #[arg(long, env = "SHUNT_CONFIG_DIR", default_value = "/etc/shunt/config")]
    pub config_dir: PathBuf,
}

/// Certificates from a CA's CSR API (Istio's IstioCertificateService)
/// instead of a CA key on this machine.
#[derive(Args, Clone, Debug)]
pub struct CaClientArgs {
    /// host:port of the CSR API (Istio's CA_ADDRESS): shunt's controller
    /// (shunt-controller.shunt-system.svc:15012) or istiod
    /// (istiod.istio-system.svc:15012). Set: certificates are requested
    /// there with the projected token and no CA key is read; unset: the CA
    /// directory (--ca-dir) signs them here.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Mesh root certificate(s), PEM: verifies the CA endpoint and peers
    /// (Istio's istio-ca-root-cert ConfigMap).
    #[arg(
        long,
        env = "SHUNT_CA_ROOT_CERT",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_cert: PathBuf,
    /// Projected service-account token (audience istio-ca) sent as the
    /// bearer credential; re-read for every request.
    #[arg(
        long,
        env = "SHUNT_CA_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub ca_token: PathBuf,
    /// Cluster ID sent to the CA as `clusterid` (istiod multi-cluster).
    #[arg(long, env = "CLUSTER_ID")]
    pub cluster_id: Option<String>,
}

impl CaClientArgs {
    /// The client settings when --ca-address is set.
    pub fn settings(&self) -> Option<shunt_agent::identity::CaClientSettings> {
        let address = self.ca_address.clone().filter(|a| !a.is_empty())?;
        let mut s = shunt_agent::identity::CaClientSettings::new(address);
        s.root_cert = self.ca_root_cert.clone();
        s.token = self.ca_token.clone();
        s.cluster_id = self.cluster_id.clone().filter(|c| !c.is_empty());
        Some(s)
    }
}

#[derive(Args, Clone, Debug)]
pub struct LogArgs {
    /// Log format: text or json (access logs and diagnostics).
    #[arg(long, env = "SHUNT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

impl LogArgs {
    pub fn init(&self) {
        use std::io::IsTerminal;
        use tracing_subscriber::{fmt, EnvFilter};
        let filter =
            EnvFilter::try_from_env("SHUNT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
        let builder = fmt()
            .with_env_filter(filter)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .with_writer(std::io::stderr);
        if self.log_format == "json" {
            builder.json().init();
        } else {
            builder.init();
        }
    }
    pub fn json(&self) -> bool {
        self.log_format == "json"
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: use e.g. 30s, 500ms, 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s, m or h")),
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Raises the soft fd limit to the hard one (every connection is an fd) and
/// logs the result; a failure is logged, not fatal.
pub fn raise_fd_limit() {
    match shunt_agent::sockets::raise_fd_limit() {
        Ok(n) => tracing::info!(nofile = n, "open-file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}

//! `shunt agent`: the node agent.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::Context as _;
use shunt_agent::{
    app::node::{self, AdminAddrs, DnsSettings, KubernetesSource, NodeOptions},
    config::kube::KubeOptions,
    dns::{parse_upstream, upstreams_from_resolv_conf},
    hbone::ClientSettings,
    kernel::KernelPaths,
    prereq,
    proxy::capture::{self as capture_server, CaptureLimits, CaptureOptions},
};

use super::common::{
    parse_duration, runtime, CaClientArgs, ConfigDirArgs, KernelArgs, LogArgs, StateArgs,
};

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:
  shunt agent --config-dir /etc/shunt/config --ca-dir /etc/shunt/ca
  NODE_NAME=node-a shunt agent --source kubernetes --mesh-config /etc/shunt/mesh/mesh.yaml \\
      --ca-address shunt-controller.shunt-system.svc:15012
  shunt agent --netns /var/run/netns/node --cgroup-root /sys/fs/cgroup/unified/kubepods \\
      --dns-upstream 10.96.0.10 --pin-dir /sys/fs/bpf/shunt")]
pub struct Args {
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    state: StateArgs,
    #[command(flatten)]
    config: ConfigDirArgs,
    /// Where config comes from: `directory` (--config-dir) or `kubernetes`
    /// (the API server: Namespaces, this node's Pods, ServiceEntry,
    /// DestinationRule, WorkloadEntry, AuthorizationPolicy, waypoint Gateways).
    #[arg(long, env = "SHUNT_SOURCE", default_value = "directory", value_parser = ["directory", "kubernetes"])]
    source: String,
    /// kubeconfig for `--source kubernetes`; default: the in-cluster
    /// service account (else $KUBECONFIG or ~/.kube/config).
    #[arg(long, env = "SHUNT_KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// This node's name, for `--source kubernetes` (set from the downward
    /// API: `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// MeshConfig file (named mesh.yaml) for `--source kubernetes`, e.g. a
    /// ConfigMap volume; re-read on every change.
    #[arg(long, env = "SHUNT_MESH_CONFIG")]
    mesh_config: Option<PathBuf>,
    #[command(flatten)]
    log: LogArgs,
    /// Mesh CA (Istio plug-in layout: ca-cert.pem, ca-key.pem, root-cert.pem,
    /// cert-chain.pem) that issues the workloads' certificates.
    #[arg(long, env = "SHUNT_CA_DIR", default_value = "/etc/shunt/ca")]
    ca_dir: PathBuf,
    #[command(flatten)]
    ca_client: CaClientArgs,
    /// cgroup v2 directory where the cgroup hooks are attached once; only
    /// enrolled cgroups below it are acted on. Default: the cgroup2 mount.
    #[arg(long, env = "SHUNT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Address of the capture listener. Only sk_lookup feeds it; the
    /// ephemeral port lets a successor bind its own during a handover.
    #[arg(
        long,
        env = "SHUNT_CAPTURE_ADDR",
        default_value = "[::ffff:127.0.0.1]:0"
    )]
    capture_addr: SocketAddr,
    /// How long open connections may finish after a shutdown or handover.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[command(flatten)]
    capture_limits: CaptureLimitArgs,
    /// How long a removed ServiceEntry host keeps its VIPs reserved for its
    /// return (keep it well above the DNS TTL of 30s).
    #[arg(long, env = "SHUNT_VIP_GRACE", default_value = "10m", value_parser = parse_duration)]
    vip_grace: Duration,
    /// IPv4 address of the DNS proxy (link-local, on the agent's dummy
    /// interface, like NodeLocal DNSCache).
    #[arg(long, env = "SHUNT_DNS_ADDR4", default_value = "169.254.20.10")]
    dns_addr4: Ipv4Addr,
    /// IPv6 address of the DNS proxy (a ULA on the same interface).
    #[arg(long, env = "SHUNT_DNS_ADDR6", default_value = "fd73:6875:6e74::53")]
    dns_addr6: Ipv6Addr,
    /// Port of the DNS proxy.
    #[arg(long, default_value_t = 53)]
    dns_port: u16,
    /// Upstream resolver for names that are not ServiceEntry hosts
    /// (repeatable; IP or IP:PORT). Default: the nameservers in /etc/resolv.conf.
    #[arg(
        long = "dns-upstream",
        env = "SHUNT_DNS_UPSTREAM",
        value_delimiter = ','
    )]
    dns_upstream: Vec<String>,
    /// Do not run the DNS proxy or capture DNS.
    #[arg(long)]
    no_dns: bool,
    /// Forwarded DNS queries in flight per client address; beyond, that
    /// client's queries are dropped (ServiceEntry answers never are).
    /// Default: 256, or a quarter of the forwards the DNS proxy's share of
    /// the open-file limit allows when that is less (a limit under ~20,000).
    #[arg(long, env = "SHUNT_DNS_MAX_INFLIGHT_PER_CLIENT", value_parser = clap::value_parser!(u64).range(1..))]
    dns_max_inflight_per_client: Option<u64>,
    /// Prometheus /metrics listener.
    #[arg(long, env = "SHUNT_METRICS_ADDR", default_value = "[::]:15020")]
    metrics_addr: SocketAddr,
    /// /healthz/ready listener.
    #[arg(long, env = "SHUNT_READY_ADDR", default_value = "[::]:15021")]
    ready_addr: SocketAddr,
    /// /config_dump listener (keep it on localhost).
    #[arg(long, env = "SHUNT_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Lifetime of workload certificates (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = parse_lifetime)]
    cert_lifetime: Duration,
    #[command(flatten)]
    hbone: HboneArgs,
}

/// The budget of captured connections: beyond it, a new one is closed with
/// RST at accept, so that a flood of connects leaves the agent the fds it
/// needs for config, netlink, DNS and admin.
#[derive(clap::Args, Debug)]
struct CaptureLimitArgs {
    /// Captured connections held at once, in fds (a connection without a
    /// waypoint holds two: the pod's and the destination's). Default: the
    /// open-file limit minus a reserve of max(512, 5%) for the agent's own
    /// work; more than that is an error.
    #[arg(long, env = "SHUNT_MAX_CAPTURED_CONNECTIONS",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_captured_connections: Option<usize>,
    /// Captured connections held at once per pod address, counted the same
    /// way. Default: a quarter of --max-captured-connections, at least 4096
    /// unless that is more than half of it.
    #[arg(long, env = "SHUNT_MAX_CAPTURED_CONNECTIONS_PER_SOURCE",
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    max_captured_connections_per_source: Option<usize>,
}

impl CaptureLimitArgs {
    fn limits(&self) -> CaptureLimits {
        CaptureLimits {
            total: self.max_captured_connections,
            per_source: self.max_captured_connections_per_source,
        }
    }
}

/// The HBONE connections to waypoints.
#[derive(clap::Args, Debug)]
struct HboneArgs {
    /// A pooled HBONE connection with no tunnel for this long is closed.
    #[arg(long, env = "SHUNT_HBONE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    hbone_idle_timeout: Duration,
    /// Tunnels per HBONE connection before another connection is opened.
    #[arg(long, env = "SHUNT_HBONE_MAX_STREAMS", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    hbone_max_streams: u32,
    /// How often each HBONE connection is checked with an HTTP/2 PING.
    #[arg(long, env = "SHUNT_HBONE_KEEPALIVE_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    hbone_keepalive_interval: Duration,
    /// A connection whose PING is unanswered this long is closed.
    #[arg(long, env = "SHUNT_HBONE_KEEPALIVE_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    hbone_keepalive_timeout: Duration,
    /// TCP connect plus TLS and HTTP/2 handshakes with a waypoint.
    #[arg(long, env = "SHUNT_HBONE_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    hbone_connect_timeout: Duration,
}

impl HboneArgs {
    fn settings(&self) -> ClientSettings {
        ClientSettings {
            max_streams_per_connection: self.hbone_max_streams as usize,
            idle_timeout: self.hbone_idle_timeout,
            keepalive_interval: self.hbone_keepalive_interval,
            keepalive_timeout: self.hbone_keepalive_timeout,
            connect_timeout: self.hbone_connect_timeout,
            ..ClientSettings::default()
        }
    }
}

fn parse_lifetime(s: &str) -> Result<Duration, String> {
    match s.strip_suffix('h') {
        Some(h) => h
            .parse::<u64>()
            .map(|h| Duration::from_secs(h * 3600))
            .map_err(|_| format!("invalid lifetime {s:?}: use e.g. 24h, 90m, 600s")),
        None => parse_duration(s),
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    args.log.init();
    super::common::raise_fd_limit();
    // Read the host's resolver before entering the node namespace.
    let upstreams = if args.dns_upstream.is_empty() {
        if args.no_dns {
            Vec::new()
        } else {
            upstreams_from_resolv_conf(std::path::Path::new("/etc/resolv.conf")).context(
                "reading upstream resolvers from /etc/resolv.conf (or pass --dns-upstream)",
            )?
        }
    } else {
        args.dns_upstream
            .iter()
            .map(|u| parse_upstream(u))
            .collect::<Result<Vec<_>, _>>()?
    };
    // Before the runtime starts: its threads inherit the namespace.
    if let Some(ns) = &args.kernel.netns {
        capture_server::enter_netns(ns)?;
    }
    let cgroup_root = match args.cgroup_root {
        Some(p) => p,
        None => PathBuf::from(
            prereq::cgroup2_mount()
                .context("no cgroup2 filesystem is mounted: mount one or pass --cgroup-root")?,
        ),
    };
    let kubernetes = match args.source.as_str() {
        "kubernetes" => {
            let node = args.node_name.filter(|n| !n.is_empty()).context(
                "--source kubernetes needs --node-name (or NODE_NAME from the downward API)",
            )?;
            let mut options = KubeOptions::new(node, cgroup_root.clone());
            options.mesh_file = args.mesh_config;
            Some(KubernetesSource {
                kubeconfig: args.kubeconfig,
                options,
            })
        }
        _ => None,
    };
    let opts = NodeOptions {
        agent: CaptureOptions {
            paths: KernelPaths {
                pin_dir: args.kernel.pin_dir,
                cgroup_root,
            },
            state_dir: args.state.state_dir,
            capture_addr: args.capture_addr,
            drain_timeout: args.drain_timeout,
            meta: None,
            limits: args.capture_limits.limits(),
        },
        config_dir: args.config.config_dir,
        kubernetes,
        ca_dir: args.ca_dir,
        ca_client: args.ca_client.settings(),
        dns: DnsSettings {
            enabled: !args.no_dns,
            addr4: args.dns_addr4,
            addr6: args.dns_addr6,
            port: args.dns_port,
            upstreams,
            max_inflight_per_client: args
                .dns_max_inflight_per_client
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        },
        admin: AdminAddrs {
            metrics: Some(args.metrics_addr),
            ready: Some(args.ready_addr),
            config_dump: Some(args.admin_addr),
        },
        log_format: if args.log.json() {
            shunt_agent::telemetry::LogFormat::Json
        } else {
            shunt_agent::telemetry::LogFormat::Text
        },
        cert_lifetime: args.cert_lifetime,
        hbone: args.hbone.settings(),
        vip_grace: args.vip_grace,
    };
    runtime()?.block_on(node::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

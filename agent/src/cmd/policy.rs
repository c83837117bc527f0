//! `shunt policy check`: explain the waypoint's authorization decision for a
//! hand-made request against a config directory, without a network.
//!
//! Exit codes: 0 allowed, 3 denied, 1 error (bad flags or config).

use std::{net::IpAddr, process::ExitCode};

use anyhow::Context as _;
use shunt_agent::{
    config::{AuthorizationPolicy, Config, ServiceEntry, WaypointRef},
    identity::SpiffeId,
    policy::{
        self, BuildOptions, GatewayRef, HeaderList, HttpRequest, PolicyError, PolicySet,
        RequestContext,
    },
};

use super::common::ConfigDirArgs;

/// Exit code of `shunt policy check` when the request is denied.
pub const EXIT_DENIED: u8 = 3;

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  shunt policy check --service common-infrastructure/httpbin.org \
--principal cluster.local/ns/default/sa/curl --method GET --path /get\n  \
shunt policy check --host httpbin.org --identity spiffe://cluster.local/ns/default/sa/admin --method POST --path /post"
)]
pub struct Args {
    #[command(subcommand)]
    cmd: PolicyCmd,
}

#[derive(clap::Subcommand, Debug)]
enum PolicyCmd {
    /// Evaluate the AuthorizationPolicies for one request and explain the result.
    #[command(
        after_help = "Examples:\n  shunt policy check --config-dir examples/egress --service common-infrastructure/httpbin.org \\\n    \
--principal cluster.local/ns/default/sa/curl --method POST --path /post\n  \
shunt policy check --config-dir examples/egress --host httpbin.org --tcp --source-ip 10.244.1.19\n\n\
Exit status: 0 when the request is allowed, 3 when it is denied, 1 on an error.\n\
Without --tcp, a request to an HTTP port is HTTP (default GET /); a TCP port is TCP\n\
unless --method or --path is given."
    )]
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    #[command(flatten)]
    config: ConfigDirArgs,
    /// The ServiceEntry the request goes to, as NAMESPACE/NAME.
    #[arg(long, required_unless_present = "host", conflicts_with = "host")]
    service: Option<String>,
    /// Pick the ServiceEntry by one of its hosts instead of --service.
    #[arg(long)]
    host: Option<String>,
    /// Peer principal as in policies: <trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, conflicts_with = "identity")]
    principal: Option<String>,
    /// Peer SPIFFE identity: spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long)]
    identity: Option<String>,
    /// Source address (from `Forwarded: for=`), for ipBlocks and source.ip.
    #[arg(long)]
    source_ip: Option<IpAddr>,
    /// Destination (VIP) address, for destination.ip.
    #[arg(long)]
    destination_ip: Option<IpAddr>,
    /// ServiceEntry port dialed. Default: the entry's first port.
    #[arg(long)]
    port: Option<u16>,
    /// HTTP method.
    #[arg(long)]
    method: Option<String>,
    /// HTTP request target (path and query).
    #[arg(long)]
    path: Option<String>,
    /// HTTP Host header. Default: the --host given, else the entry's first host.
    #[arg(long)]
    host_header: Option<String>,
    /// Request header NAME=VALUE; repeat for several.
    #[arg(long = "header", value_name = "NAME=VALUE")]
    headers: Vec<String>,
    /// Evaluate a TCP connection (no HTTP attributes).
    #[arg(long, conflicts_with_all = ["method", "path", "host_header", "headers"])]
    tcp: bool,
    /// TLS SNI the client sends, for `connection.sni` (TLS/HTTPS ports only,
    /// where the waypoint reads the ClientHello; the connection is TCP).
    #[arg(long, conflicts_with_all = ["method", "path", "host_header", "headers"])]
    sni: Option<String>,
}

/// The waypoint Gateways of a config, as policy build targets.
pub fn waypoints(cfg: &Config) -> Vec<GatewayRef> {
    cfg.gateways
        .iter()
        .filter(|g| g.spec.is_waypoint())
        .map(|g| GatewayRef {
            namespace: g.namespace().to_string(),
            name: g.name().to_string(),
        })
        .collect()
}

/// Compiles the config's policies as the waypoint `waypoint` would.
pub fn build_policies(
    cfg: &Config,
    waypoint: Option<GatewayRef>,
) -> Result<PolicySet, PolicyError> {
    let items: Vec<_> = cfg
        .authorization_policies
        .iter()
        .map(|p: &std::sync::Arc<AuthorizationPolicy>| (p.metadata.clone(), p.spec.clone()))
        .collect();
    PolicySet::build(&items, &BuildOptions::for_config(cfg, waypoint))
}

/// Flattens `PolicyError::Many`.
pub fn flatten_errors(e: PolicyError) -> Vec<PolicyError> {
    match e {
        PolicyError::Many(v) => v.into_iter().flat_map(flatten_errors).collect(),
        e => vec![e],
    }
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.cmd {
        PolicyCmd::Check(a) => check(a),
    }
}

fn find_service<'c>(cfg: &'c Config, a: &CheckArgs) -> anyhow::Result<&'c ServiceEntry> {
    if let Some(s) = &a.service {
        let (ns, name) = s.split_once('/').with_context(|| {
            format!("--service {s:?} is not NAMESPACE/NAME: write it like common-infrastructure/httpbin.org")
        })?;
        return cfg
            .service_entries
            .iter()
            .find(|se| se.namespace() == ns && se.name() == name)
            .map(|se| &**se)
            .with_context(|| {
                format!(
                    "no ServiceEntry {ns}/{name} in {}: list them with `shunt get se --config-dir {}`",
                    a.config.config_dir.display(),
                    a.config.config_dir.display()
                )
            });
    }
    let host = a.host.as_deref().unwrap_or_default().to_ascii_lowercase();
    // An exact host before the most specific wildcard, as DNS answers.
    let with_host = |h: &str| {
        cfg.service_entries
            .iter()
            .find(|se| se.spec.hosts.iter().any(|x| x.eq_ignore_ascii_case(h)))
            .map(|se| &**se)
    };
    with_host(&host)
        .or_else(|| shunt_agent::model::host::covering(&host).find_map(|w| with_host(&w)))
        .with_context(|| {
            format!(
                "no ServiceEntry has host {host:?} in {}: list them with `shunt get se --config-dir {}`",
                a.config.config_dir.display(),
                a.config.config_dir.display()
            )
        })
}

fn check(a: CheckArgs) -> anyhow::Result<ExitCode> {
    let dir = &a.config.config_dir;
    let cfg = Config::load_dir(dir).map_err(|e| {
        anyhow::anyhow!(
            "the config directory {} is not valid ({} problem(s)): run `shunt config check {}`",
            dir.display(),
            e.problems().len().max(1),
            dir.display()
        )
    })?;
    let se = find_service(&cfg, &a)?;
    let waypoint = match cfg.waypoint_ref(se) {
        WaypointRef::Gateway { gateway, .. } => Some(GatewayRef {
            namespace: gateway.namespace,
            name: gateway.name,
        }),
        WaypointRef::Unbound => None,
    };
    if waypoint.is_none() {
        eprintln!(
            "note: ServiceEntry {} is not bound to a waypoint, so no waypoint enforces these policies",
            se.key()
        );
    }
    let set = build_policies(&cfg, waypoint).map_err(|e| {
        anyhow::anyhow!(
            "the AuthorizationPolicies do not compile ({}): run `shunt config check {}`",
            flatten_errors(e)
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; "),
            dir.display()
        )
    })?;

    let principal = match (&a.principal, &a.identity) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(i)) => {
            let id: SpiffeId = i.parse().map_err(|e| {
                anyhow::anyhow!("{e}: pass --identity spiffe://<trust-domain>/ns/<ns>/sa/<sa>")
            })?;
            Some(id.principal())
        }
        (None, None) => None,
    };
    let port =
        match a.port {
            Some(p) => se
                .spec
                .ports
                .iter()
                .find(|sp| sp.number.0 == p)
                .with_context(|| {
                    format!(
                        "ServiceEntry {} has no port {p}: use one of {}",
                        se.key(),
                        se.spec
                            .ports
                            .iter()
                            .map(|p| p.number.0.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?,
            None => se.spec.ports.first().with_context(|| {
                format!("ServiceEntry {} has no ports: add spec.ports", se.key())
            })?,
        };
    let tls_port = matches!(
        port.protocol(),
        shunt_agent::config::Protocol::Tls | shunt_agent::config::Protocol::Https
    );
    if a.sni.is_some() && !tls_port {
        anyhow::bail!(
            "--sni: port {} of ServiceEntry {} is {}; the waypoint reads the SNI only on TLS and HTTPS ports",
            port.number.0,
            se.key(),
            port.protocol()
        );
    }
    let http = !a.tcp
        && !tls_port
        && (port.protocol().is_http() || a.method.is_some() || a.path.is_some());
    let headers: Vec<(&str, &str)> = a
        .headers
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .with_context(|| {
                    format!("--header {h:?} is not NAME=VALUE: write e.g. --header x-team=blue")
                })
        })
        .collect::<anyhow::Result<_>>()?;
    let header_list = HeaderList(&headers);
    let method = a.method.as_deref().unwrap_or("GET");
    let path = a.path.as_deref().unwrap_or("/");
    let host_header = a
        .host_header
        .as_deref()
        .or(a.host.as_deref())
        .or(se.spec.hosts.first().map(String::as_str))
        .unwrap_or_default();
    let http_req = if http {
        Some(
            HttpRequest::new(
                method,
                path,
                host_header,
                &header_list,
                set.path_normalization(),
            )
            .map_err(|e| {
                anyhow::anyhow!("--path {path:?} would be refused with 400 by the waypoint: {e}")
            })?,
        )
    } else {
        None
    };
    let req = RequestContext {
        principal: principal.as_deref(),
        source_ip: a.source_ip,
        remote_ip: None,
        destination_ip: a.destination_ip,
        destination_port: port.number.0,
        sni: a.sni.as_deref(),
        http: http_req,
    };
    let ex = policy::explain(&set, se.namespace(), se.name(), &req);
    print!("{ex}");
    Ok(if ex.decision.allowed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DENIED)
    })
}

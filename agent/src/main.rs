//! `shunt`: the node agent, the egress waypoint and their tools.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use clap::{Args, Parser, Subcommand};
use shunt_agent::{
    agent::{self, Agent, AgentOptions, RefuseHandler},
    capture::{self, KernelPaths},
    maps::{addr_from_bytes, PinnedMaps},
    prereq,
};
use shunt_common::{SVC_F_HTTP, SVC_F_WAYPOINT};

#[derive(Parser)]
#[command(
    name = "shunt",
    version,
    about = "eBPF egress data plane for Istio-ambient-style meshes",
    long_about = "shunt steers pod connections to ServiceEntry VIPs (240.240.0.0/16, 2001:2::/48) \
into the node agent with kernel programs, and carries them over HBONE to the egress waypoint.",
    after_help = "Examples:\n  shunt agent --config-dir /etc/shunt/config\n  shunt maps\n  shunt uninstall"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: load and attach the kernel programs, capture VIP
    /// connections and carry them to their waypoint.
    #[command(
        after_help = "Example:\n  shunt agent --pin-dir /sys/fs/bpf/shunt --cgroup-root /sys/fs/cgroup/unified/kubepods"
    )]
    Agent(AgentArgs),
    /// Print the services, enrolled workloads and counters from the pinned maps.
    #[command(after_help = "Example:\n  shunt maps --pin-dir /sys/fs/bpf/shunt")]
    Maps(KernelArgs),
    /// Remove shunt's pinned links (detaching the programs), maps and VIP routes. Nothing else.
    #[command(after_help = "Example:\n  shunt uninstall --pin-dir /sys/fs/bpf/shunt")]
    Uninstall(KernelArgs),
}

#[derive(Args, Clone)]
struct KernelArgs {
    /// Directory on a bpffs where maps and links are pinned.
    #[arg(long, env = "SHUNT_PIN_DIR", default_value = "/sys/fs/bpf/shunt")]
    pin_dir: PathBuf,
    /// Network namespace (a path such as /var/run/netns/NAME) that is the
    /// node: routes, sk_lookup and the capture socket live there. Default:
    /// the current one.
    #[arg(long, env = "SHUNT_NETNS")]
    netns: Option<PathBuf>,
}

#[derive(Args)]
struct AgentArgs {
    #[command(flatten)]
    kernel: KernelArgs,
    /// cgroup v2 directory where the connect hooks are attached once; only
    /// enrolled cgroups below it are acted on. Default: the cgroup2 mount.
    #[arg(long, env = "SHUNT_CGROUP_ROOT")]
    cgroup_root: Option<PathBuf>,
    /// Directory for the agent's state (pid file, VIP allocations).
    #[arg(long, env = "SHUNT_STATE_DIR", default_value = "/var/lib/shunt")]
    state_dir: PathBuf,
    /// Address of the capture listener. Only sk_lookup feeds it; the default
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
    /// Log format: text or json.
    #[arg(long, env = "SHUNT_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
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
        _ => Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    }
}

fn init_logging(json: bool) {
    use tracing_subscriber::{fmt, EnvFilter};
    let filter = EnvFilter::try_from_env("SHUNT_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("shunt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Agent(args) => {
            init_logging(args.log_format == "json");
            // Before the runtime starts: its threads inherit the namespace.
            if let Some(ns) = &args.kernel.netns {
                agent::enter_netns(ns)?;
            }
            let cgroup_root = match args.cgroup_root {
                Some(p) => p,
                None => PathBuf::from(prereq::cgroup2_mount().context(
                    "no cgroup2 filesystem is mounted: mount one or pass --cgroup-root",
                )?),
            };
            let opts = AgentOptions {
                paths: KernelPaths {
                    pin_dir: args.kernel.pin_dir,
                    cgroup_root,
                },
                state_dir: args.state_dir,
                capture_addr: args.capture_addr,
                drain_timeout: args.drain_timeout,
                meta: shunt_common::Meta::default(),
            };
            runtime()?.block_on(async {
                let agent = Agent::start(opts).await?;
                agent.serve(Arc::new(RefuseHandler)).await?;
                Ok(())
            })
        }
        Cmd::Maps(args) => print_maps(&args),
        Cmd::Uninstall(args) => {
            init_logging(false);
            if let Some(ns) = &args.netns {
                agent::enter_netns(ns)?;
            }
            let removed = capture::remove_pins(&args.pin_dir)
                .with_context(|| format!("removing pins under {}", args.pin_dir.display()))?;
            runtime()?.block_on(capture::remove_routes())?;
            println!(
                "removed {} pins under {} and the VIP routes",
                removed.len(),
                args.pin_dir.display()
            );
            Ok(())
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn print_maps(args: &KernelArgs) -> Result<()> {
    let maps = PinnedMaps::open(&args.pin_dir)?;
    let meta = maps.meta()?;
    println!(
        "pin dir {}  layout v{}  egress {}",
        args.pin_dir.display(),
        meta.layout_version,
        if meta.egress_mode == shunt_common::EGRESS_REGISTRY_ONLY {
            "REGISTRY_ONLY"
        } else {
            "ALLOW_ANY"
        }
    );
    let services = maps.read_services()?;
    println!("\nSERVICES ({})", services.len());
    println!(
        "{:<28} {:>5} {:>8} {:<28} FLAGS",
        "VIP", "PORT", "SERVICE", "WAYPOINT"
    );
    for (k, v) in &services {
        let wp = if v.flags & SVC_F_WAYPOINT != 0 {
            SocketAddr::new(addr_from_bytes(v.waypoint_addr), v.waypoint_port).to_string()
        } else {
            "-".to_string()
        };
        let mut flags = Vec::new();
        if v.flags & SVC_F_WAYPOINT != 0 {
            flags.push("waypoint");
        }
        if v.flags & SVC_F_HTTP != 0 {
            flags.push("http");
        }
        println!(
            "{:<28} {:>5} {:>8} {:<28} {}",
            addr_from_bytes(k.addr).to_string(),
            k.port,
            v.service_id,
            wp,
            flags.join(",")
        );
    }
    let enrolled = maps.read_enrolled()?;
    println!("\nENROLLED ({})", enrolled.len());
    println!("{:<20} {:>8} FLAGS", "CGROUP ID", "WORKLOAD");
    for (cg, v) in &enrolled {
        println!("{:<20} {:>8} {:#x}", cg, v.workload_id, v.flags);
    }
    println!("\nCOUNTERS");
    for (c, n) in maps.counters()? {
        println!("{:<12} {}", c.name(), n);
    }
    Ok(())
}

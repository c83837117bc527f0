//! `shunt`: the node agent, the egress waypoint and their tools. Each
//! subcommand lives in `cmd/`; this is the binary's edge, where errors
//! become one sentence on stderr and exit code 1.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cmd;

#[derive(Parser)]
#[command(
    name = "shunt",
    version,
    about = "eBPF egress data plane for Istio-ambient-style meshes",
    long_about = long_about(),
    after_help = "Examples:\n  shunt agent --config-dir /etc/shunt/config\n  shunt waypoint --config-dir /etc/shunt/config --name egress-gateway --namespace common-infrastructure\n  shunt get serviceentries -o yaml\n  shunt maps\n  shunt uninstall"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// The VIP prefixes as the allocator (and the kernel side) use them.
fn long_about() -> String {
    let vips = shunt_agent::alloc::Prefixes::default();
    format!(
        "shunt steers pod connections to ServiceEntry VIPs ({}, {}) \
into the node agent with kernel programs, and carries them over HBONE to the egress waypoint.",
        vips.v4, vips.v6
    )
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the node agent: load and attach the kernel programs, capture VIP
    /// connections and DNS, and carry connections to their waypoint.
    Agent(cmd::agent::Args),
    /// Run an egress waypoint: HBONE server, authorization, TLS origination.
    Waypoint(cmd::waypoint::Args),
    /// Manage the mesh CA (local CA or Istio's plug-in CA layout).
    Ca(cmd::ca::Args),
    /// Print the services, enrolled workloads and counters from the pinned maps.
    Maps(cmd::maps::Args),
    /// Summarize agent health, programs, services and counters.
    Status(cmd::status::Args),
    /// Show Istio objects with their status (e.g. `shunt get serviceentries -o yaml`).
    Get(cmd::get::Args),
    /// Validate a config directory (`shunt config check DIR`).
    Config(cmd::config::Args),
    /// Explain an authorization decision for a hand-made request.
    Policy(cmd::policy::Args),
    /// Remove shunt's pinned links (detaching the programs), maps, VIP routes and DNS interface. Nothing else.
    Uninstall(cmd::uninstall::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Before any runtime thread: keep freed relay buffers instead of
    // returning them to the kernel page by page.
    shunt_agent::hbone::tune_allocator();
    let r = match cli.cmd {
        Cmd::Agent(a) => cmd::agent::run(a),
        Cmd::Waypoint(a) => cmd::waypoint::run(a),
        Cmd::Ca(a) => cmd::ca::run(a),
        Cmd::Maps(a) => cmd::maps::run(a),
        Cmd::Status(a) => cmd::status::run(a),
        Cmd::Get(a) => cmd::get::run(a),
        Cmd::Config(a) => cmd::config::run(a),
        Cmd::Policy(a) => cmd::policy::run(a),
        Cmd::Uninstall(a) => cmd::uninstall::run(a),
    };
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("shunt: {e:#}");
            ExitCode::FAILURE
        }
    }
}

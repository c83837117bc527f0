//! `shunt uninstall`: remove what the agent installed, and nothing else.

use std::process::ExitCode;

use anyhow::Context as _;
use shunt_agent::{
    kernel::{loader, netlink, projection, PinnedMaps},
    proxy::capture as agent,
};

use super::common::{runtime, KernelArgs};

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  shunt uninstall --pin-dir /sys/fs/bpf/shunt")]
pub struct Args {
    #[command(flatten)]
    kernel: KernelArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(ns) = &args.kernel.netns {
        agent::enter_netns(ns)?;
    }
    let pin_dir = &args.kernel.pin_dir;
    // The DNS proxy's addresses are recorded in `meta`; read them before
    // the pins go.
    let dns = PinnedMaps::open(pin_dir)
        .ok()
        .and_then(|m| m.meta().ok())
        .and_then(|m| projection::dns_capture(&m))
        .map(|d| (d.addr4, d.addr6));
    let removed = loader::remove_pins(pin_dir)
        .with_context(|| format!("removing pins under {}", pin_dir.display()))?;
    runtime()?.block_on(netlink::uninstall_network(dns))?;
    println!(
        "removed {} pins under {}, the VIP routes and the DNS interface",
        removed.len(),
        pin_dir.display()
    );
    Ok(ExitCode::SUCCESS)
}

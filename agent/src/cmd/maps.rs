//! `shunt maps`: the pinned maps as readable tables.

use std::{net::SocketAddr, process::ExitCode};

use shunt_agent::{
    config::OutboundMode,
    kernel::{projection::egress_mode, registry::addr_from_bytes, PinnedMaps},
};
use shunt_common::{SVC_F_HTTP, SVC_F_WAYPOINT};

use super::common::KernelArgs;

#[derive(clap::Args, Debug)]
#[command(after_help = "Example:\n  shunt maps --pin-dir /sys/fs/bpf/shunt")]
pub struct Args {
    #[command(flatten)]
    kernel: KernelArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let pin_dir = &args.kernel.pin_dir;
    let maps = PinnedMaps::open(pin_dir)?;
    let meta = maps.meta()?;
    println!(
        "pin dir {}  layout v{}  egress {}",
        pin_dir.display(),
        meta.layout_version,
        match egress_mode(&meta) {
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
            OutboundMode::AllowAny => "ALLOW_ANY",
        }
    );
    let services = maps.read_services()?;
    println!("\nSERVICES ({})", services.len());
    println!(
        "{:<28} {:>5} {:>8} {:<28} FLAGS",
        "VIP", "PORT", "SERVICE", "WAYPOINT"
    );
    for (k, v) in &services {
        // A waypoint required but not resolvable has no address: the agent
        // refuses those connections.
        let wp = if v.flags & SVC_F_WAYPOINT != 0 && v.waypoint_port == 0 {
            "unresolved (refused)".to_string()
        } else if v.flags & SVC_F_WAYPOINT != 0 {
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
    let sources = maps.read_sources()?;
    println!("\nSOURCES ({})", sources.len());
    println!("{:<28} IFINDEX", "WORKLOAD ADDRESS");
    for (k, ifindex) in &sources {
        println!("{:<28} {ifindex}", addr_from_bytes(k.addr).to_string());
    }
    let allow = maps.read_egress_allow()?;
    println!("\nEGRESS_ALLOW ({})", allow.len());
    for k in allow.keys() {
        let net = match addr_from_bytes(k.addr.addr) {
            // IPv4 prefixes are stored IPv4-mapped, at 96 + their length.
            ip @ std::net::IpAddr::V4(_) => format!("{ip}/{}", k.prefix_len.saturating_sub(96)),
            ip => format!("{ip}/{}", k.prefix_len),
        };
        println!("{net}");
    }
    println!("\nCOUNTERS");
    for (c, n) in maps.counters()? {
        println!("{:<14} {}", c.name(), n);
    }
    Ok(ExitCode::SUCCESS)
}

//! `shunt status`: is the agent installed, running and healthy? Reads the
//! pins, the pid file and, from inside the agent's network namespace (see
//! [`super::reach`]), the readiness endpoint and where the DNS proxy's
//! addresses are; changes nothing. Exits 1 when the agent is not healthy.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::ExitCode,
};

use aya::programs::links::{FdLink, PinnedLink};
use serde::Serialize;
use shunt_agent::config::watch::{HealthRecord, HEALTH_FILE};
use shunt_agent::{
    config::OutboundMode,
    kernel::{
        link_pin,
        loader::{ProgramSpec, PROGRAMS},
        projection,
        registry::{MapDef, MetaSlot},
        PinnedMaps, LINK_PIN_PREFIX,
    },
};
use shunt_common::LAYOUT_VERSION;

use super::common::{runtime, KernelArgs, StateArgs};
use super::reach::{self, AgentProcess, NetnsView};

#[derive(clap::Args, Debug)]
#[command(
    after_help = "Examples:\n  shunt status\n  shunt status --pin-dir /sys/fs/bpf/shunt --state-dir /var/lib/shunt -o json\n\n\
Exit status: 0 when the agent is healthy, 1 otherwise."
)]
pub struct Args {
    #[command(flatten)]
    kernel: KernelArgs,
    #[command(flatten)]
    state: StateArgs,
    /// Address of the agent's readiness endpoint (/healthz/ready), in the
    /// agent's network namespace (entered through its pid, or --netns).
    #[arg(long, env = "SHUNT_READY_ADDR", default_value = "127.0.0.1:15021")]
    ready: SocketAddr,
    /// Output format: text or json.
    #[arg(short = 'o', long, value_parser = ["text", "json"], default_value = "text")]
    output: String,
}

#[derive(Serialize)]
struct Status {
    healthy: bool,
    problems: Vec<String>,
    pin_dir: PathBuf,
    agent: AgentProcess,
    /// The network namespace the agent was looked at from.
    netns: NetnsView,
    ready: ReadyStatus,
    programs: Vec<LinkStatus>,
    maps: Option<MapsStatus>,
    /// `None` without DNS capture.
    dns: Option<DnsStatus>,
    /// The agent's config source, as it last recorded it.
    config_source: Option<HealthRecord>,
}

#[derive(Serialize)]
struct ReadyStatus {
    addr: SocketAddr,
    /// HTTP status, when the endpoint answered.
    code: Option<u16>,
    error: Option<String>,
}

#[derive(Serialize)]
struct LinkStatus {
    program: String,
    pin: PathBuf,
    alive: bool,
    link_id: Option<u32>,
    program_id: Option<u32>,
    error: Option<String>,
}

#[derive(Serialize)]
struct MapsStatus {
    layout_version: u32,
    egress_mode: &'static str,
    dns_capture: bool,
    #[serde(skip)]
    dns: Option<projection::DnsCapture>,
    services: usize,
    enrolled: usize,
    counters: Vec<(String, u64)>,
}

/// Where the DNS proxy's addresses are, in the agent's namespace: on the
/// agent's dummy interface, or on `lo` where the kernel has no dummy driver
/// (both deliver them locally).
#[derive(Serialize)]
struct DnsStatus {
    addrs: Vec<IpAddr>,
    /// Interfaces carrying each address, in `addrs` order.
    interfaces: Vec<Vec<String>>,
    present: bool,
}

fn link_status(program: &str, pin: PathBuf) -> LinkStatus {
    let mut s = LinkStatus {
        program: program.to_string(),
        pin: pin.clone(),
        alive: false,
        link_id: None,
        program_id: None,
        error: None,
    };
    if !pin.exists() {
        s.error = Some("not pinned".into());
        return s;
    }
    match PinnedLink::from_pin(&pin) {
        Ok(l) => match FdLink::from(l).info() {
            // A link whose program is gone reports program id 0.
            Ok(info) => {
                s.link_id = Some(info.id());
                s.program_id = Some(info.program_id());
                s.alive = info.program_id() != 0;
                if !s.alive {
                    s.error = Some("link has no program".into());
                }
            }
            Err(e) => s.error = Some(format!("link info: {e}")),
        },
        Err(e) => s.error = Some(format!("not a live link: {e}")),
    }
    s
}

/// Link pins under the pin dir: every program of the table plus any other
/// `link_*` pins present.
fn programs(pin_dir: &Path) -> Vec<LinkStatus> {
    let mut out: Vec<LinkStatus> = PROGRAMS
        .iter()
        .map(|p: &ProgramSpec| link_status(p.name, link_pin(pin_dir, p)))
        .collect();
    let names: Vec<&str> = PROGRAMS.iter().map(|p| p.name).collect();
    if let Ok(rd) = std::fs::read_dir(pin_dir) {
        let mut extra: Vec<String> = rd
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(LINK_PIN_PREFIX))
                    .map(str::to_string)
            })
            .filter(|n| !names.contains(&n.as_str()))
            .collect();
        extra.sort();
        out.extend(
            extra
                .iter()
                .map(|n| link_status(n, pin_dir.join(format!("{LINK_PIN_PREFIX}{n}")))),
        );
    }
    out
}

fn maps_status(pin_dir: &Path) -> Result<MapsStatus, String> {
    let maps = PinnedMaps::open(pin_dir).map_err(|e| e.to_string())?;
    let meta = maps.meta().map_err(|e| e.to_string())?;
    Ok(MapsStatus {
        layout_version: meta.layout_version,
        egress_mode: match projection::egress_mode(&meta) {
            OutboundMode::RegistryOnly => "REGISTRY_ONLY",
            OutboundMode::AllowAny => "ALLOW_ANY",
        },
        dns_capture: projection::dns_capture(&meta).is_some(),
        dns: projection::dns_capture(&meta),
        services: maps.read_services().map_err(|e| e.to_string())?.len(),
        enrolled: maps.read_enrolled().map_err(|e| e.to_string())?.len(),
        counters: maps
            .counters()
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(c, n)| (c.name().to_string(), n))
            .collect(),
    })
}

/// Interfaces that carry `ip`, in this process's network namespace
/// (getifaddrs asks the kernel; /sys/class/net shows the namespace sysfs was
/// mounted in).
fn interfaces_with(ip: IpAddr) -> Vec<String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list head we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr whose family says its type.
        let addr: Option<IpAddr> = unsafe {
            match (*ifa.ifa_addr).sa_family as libc::c_int {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    Some(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            }
        };
        if addr == Some(ip) {
            // SAFETY: ifa_name is a NUL-terminated string of the list.
            let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
            let name = name.to_string_lossy().into_owned();
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

fn dns_status(m: &MapsStatus) -> Option<DnsStatus> {
    let d = m.dns?;
    let addrs = vec![IpAddr::V4(d.addr4), IpAddr::V6(d.addr6)];
    let interfaces: Vec<Vec<String>> = addrs.iter().map(|a| interfaces_with(*a)).collect();
    Some(DnsStatus {
        present: interfaces.iter().all(|i| !i.is_empty()),
        addrs,
        interfaces,
    })
}

/// True if anything of shunt's is pinned in `pin_dir`.
fn installed(pin_dir: &Path) -> bool {
    std::fs::read_dir(pin_dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                let n = e.file_name();
                let n = n.to_string_lossy();
                n.starts_with(LINK_PIN_PREFIX) || n == MetaSlot::SPEC.pin
            })
        })
        .unwrap_or(false)
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let pin_dir = args.kernel.pin_dir.clone();
    if !installed(&pin_dir) {
        anyhow::bail!(
            "the agent is not installed: nothing is pinned under {} (start it with `shunt agent --pin-dir {}`)",
            pin_dir.display(),
            pin_dir.display()
        );
    }
    // Before the runtime: its threads keep the namespace they start in.
    let agent = AgentProcess::find(&args.state.state_dir);
    let netns = reach::join_agent_netns(args.kernel.netns.as_deref(), &agent);
    if let (Some(ns), Some(e)) = (&args.kernel.netns, &netns.error) {
        anyhow::bail!("cannot enter the network namespace {}: {e}", ns.display());
    }
    let ready = match runtime()?.block_on(reach::admin_get(args.ready, "/healthz/ready")) {
        Ok((code, _)) => ReadyStatus {
            addr: args.ready,
            code: Some(code),
            error: None,
        },
        Err(e) => ReadyStatus {
            addr: args.ready,
            code: None,
            error: Some(e),
        },
    };
    let programs = programs(&pin_dir);
    let maps = maps_status(&pin_dir);
    let dns = maps.as_ref().ok().and_then(dns_status);

    let mut problems = Vec::new();
    if !agent.running {
        problems.push(match agent.pid {
            Some(p) => format!(
                "the agent (pid {p} in {}) is not running: start `shunt agent`",
                agent.pid_file.display()
            ),
            None => format!(
                "no agent pid in {}: start `shunt agent` (or pass its --state-dir)",
                agent.pid_file.display()
            ),
        });
    }
    if let (true, Some(e)) = (agent.running, &ready.error) {
        problems.push(format!(
            "/healthz/ready on {} is not reachable{} ({e}): pass the agent's --ready-addr as --ready, or its namespace as --netns",
            ready.addr,
            match (&netns.entered, &netns.error) {
                (_, Some(ne)) => format!(" from this namespace (the agent's cannot be entered: {ne})"),
                (Some(p), None) => format!(" in {}", p.display()),
                (None, None) => String::new(),
            }
        ));
    }
    if let Some(c) = ready.code.filter(|c| *c != 200) {
        problems.push(format!(
            "/healthz/ready on {} answered {c}: the agent is not ready, see its log",
            ready.addr
        ));
    }
    for l in programs
        .iter()
        .filter(|l| !l.alive && PROGRAMS.iter().any(|p| p.name == l.program))
    {
        problems.push(format!(
            "program {} is not attached ({}): restart `shunt agent` to re-attach it",
            l.program,
            l.error.as_deref().unwrap_or("unknown")
        ));
    }
    match &maps {
        Ok(m) if m.layout_version != LAYOUT_VERSION => problems.push(format!(
            "pinned maps have layout v{}, this shunt uses v{LAYOUT_VERSION}: run `shunt uninstall` and restart the agent",
            m.layout_version
        )),
        Ok(m) if m.dns_capture && dns.as_ref().is_some_and(|d| !d.present) => problems.push(format!(
            "DNS capture is on but the DNS proxy's addresses ({}) are on no interface{}: restart `shunt agent`",
            m.dns.map(|d| format!("{}, {}", d.addr4, d.addr6)).unwrap_or_default(),
            if netns.entered.is_none() && netns.error.is_some() {
                " of this namespace (the agent's cannot be entered)"
            } else {
                ""
            }
        )),
        Ok(_) => {}
        Err(e) => problems.push(format!("cannot read the pinned maps: {e}")),
    }
    let config_source: Option<HealthRecord> = std::fs::read(args.state.state_dir.join(HEALTH_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    if let Some(c) = config_source.as_ref().filter(|c| agent.running && !c.up) {
        problems.push(format!(
            "config source {} is down ({}): the last good config stays in force",
            c.source,
            c.error.as_deref().unwrap_or("unknown")
        ));
    }
    let healthy = problems.is_empty();
    let st = Status {
        healthy,
        problems,
        pin_dir,
        agent,
        netns,
        ready,
        programs,
        maps: maps.ok(),
        dns,
        config_source,
    };
    if args.output == "json" {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_text(&st);
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_text(s: &Status) {
    println!(
        "shunt agent: {}",
        if s.healthy { "healthy" } else { "NOT HEALTHY" }
    );
    for p in &s.problems {
        println!("  ! {p}");
    }
    let a = &s.agent;
    println!("\nAGENT");
    match a.pid {
        Some(p) => println!(
            "  pid {p} ({}){}",
            if a.running { "running" } else { "not running" },
            a.exe
                .as_deref()
                .map(|e| format!("  {e}"))
                .unwrap_or_default()
        ),
        None => println!("  no pid file at {}", a.pid_file.display()),
    }
    match (&s.netns.entered, &s.netns.error) {
        (Some(p), _) => println!("  network namespace {}", p.display()),
        (None, Some(e)) => {
            println!("  network namespace: this one (cannot enter the agent's: {e})")
        }
        (None, None) => {}
    }
    match (s.ready.code, &s.ready.error) {
        (Some(c), _) => println!("  /healthz/ready on {}: {c}", s.ready.addr),
        (None, Some(e)) => println!("  /healthz/ready on {}: not reachable ({e})", s.ready.addr),
        _ => {}
    }
    if let Some(c) = &s.config_source {
        println!(
            "  config source {}: {}{}",
            c.source,
            if c.up { "up" } else { "DOWN" },
            c.last_sync
                .map(|t| format!("  last sync {t} (unix)"))
                .unwrap_or_default()
        );
    }
    println!("\nPROGRAMS (links pinned in {})", s.pin_dir.display());
    for l in &s.programs {
        match (l.alive, l.link_id, l.program_id) {
            (true, Some(lid), Some(pid)) => {
                println!("  {:<24} attached  link {lid}  prog {pid}", l.program)
            }
            _ => println!(
                "  {:<24} NOT ATTACHED  {}",
                l.program,
                l.error.as_deref().unwrap_or("")
            ),
        }
    }
    println!("\nMAPS");
    match &s.maps {
        Some(m) => {
            println!(
                "  layout v{}  egress {}  DNS capture {}",
                m.layout_version,
                m.egress_mode,
                if m.dns_capture { "on" } else { "off" }
            );
            println!("  services {}  enrolled {}", m.services, m.enrolled);
            println!("\nCOUNTERS");
            for (c, n) in &m.counters {
                println!("  {c:<14} {n}");
            }
        }
        None => println!("  unreadable"),
    }
    if let Some(d) = &s.dns {
        println!("\nDNS PROXY ADDRESSES");
        for (a, i) in d.addrs.iter().zip(&d.interfaces) {
            if i.is_empty() {
                println!("  {a:<16} ON NO INTERFACE");
            } else {
                println!("  {a:<16} on {}", i.join(","));
            }
        }
    }
}

//! `shunt status`: is the agent installed, running and healthy? Reads the
//! pins, the pid file and the readiness endpoint; changes nothing. Exits 1
//! when the agent is not healthy.

use std::{
    ffi::CString,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use aya::programs::links::{FdLink, PinnedLink};
use serde::Serialize;
use shunt_agent::config::watch::{HealthRecord, HEALTH_FILE};
use shunt_agent::{
    config::OutboundMode,
    kernel::{
        link_pin,
        loader::{ProgramSpec, PROGRAMS},
        netlink::DNS_INTERFACE,
        projection,
        registry::{MapDef, MetaSlot},
        PinnedMaps, LINK_PIN_PREFIX,
    },
    proxy::capture as agent,
};
use shunt_common::LAYOUT_VERSION;

use super::common::{runtime, KernelArgs, StateArgs};

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
    /// Address of the agent's readiness endpoint (/healthz/ready).
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
    agent: AgentStatus,
    ready: ReadyStatus,
    programs: Vec<LinkStatus>,
    maps: Option<MapsStatus>,
    dns_interface: DnsStatus,
    /// The agent's config source, as it last recorded it.
    config_source: Option<HealthRecord>,
}

#[derive(Serialize)]
struct AgentStatus {
    pid_file: PathBuf,
    pid: Option<u32>,
    running: bool,
    exe: Option<String>,
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
    services: usize,
    enrolled: usize,
    counters: Vec<(String, u64)>,
}

#[derive(Serialize)]
struct DnsStatus {
    name: &'static str,
    present: bool,
}

fn agent_status(state_dir: &Path) -> AgentStatus {
    let pid_file = state_dir.join("agent.pid");
    let pid = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let exe = pid.and_then(|p| {
        std::fs::read_link(format!("/proc/{p}/exe"))
            .ok()
            .map(|e| e.display().to_string())
    });
    // A pid file left by a dead agent may name an unrelated process now:
    // only a process running a `shunt` binary counts.
    let running = pid.is_some_and(|p| {
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        comm.trim() == "shunt"
            || exe
                .as_deref()
                .is_some_and(|e| e.trim_end_matches(" (deleted)").ends_with("/shunt"))
    });
    AgentStatus {
        pid_file,
        pid,
        running,
        exe,
    }
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

fn dns_interface_present() -> bool {
    // if_nametoindex asks the kernel in this process's network namespace
    // (unlike /sys/class/net, which shows the namespace sysfs was mounted in).
    let name = CString::new(DNS_INTERFACE).expect("no NUL");
    // SAFETY: a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

async fn probe_ready(addr: SocketAddr) -> Result<u16, String> {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    let go = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = hyper::Request::get("/healthz/ready")
            .header(hyper::header::HOST, addr.to_string())
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = tx.send_request(req).await.map_err(|e| e.to_string())?;
        Ok(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(3), go)
        .await
        .map_err(|_| "no answer within 3s".to_string())?
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
    if let Some(ns) = &args.kernel.netns {
        agent::enter_netns(ns)?;
    }
    let agent = agent_status(&args.state.state_dir);
    let ready = match runtime()?.block_on(probe_ready(args.ready)) {
        Ok(code) => ReadyStatus {
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
    let dns = DnsStatus {
        name: DNS_INTERFACE,
        present: dns_interface_present(),
    };

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
        Ok(m) if m.dns_capture && !dns.present => problems.push(format!(
            "DNS capture is on but the interface {DNS_INTERFACE} is missing: restart `shunt agent`"
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
        ready,
        programs,
        maps: maps.ok(),
        dns_interface: dns,
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
    println!(
        "\nDNS interface {}: {}",
        s.dns_interface.name,
        if s.dns_interface.present {
            "present"
        } else {
            "absent"
        }
    );
}

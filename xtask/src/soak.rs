//! `cargo xtask soak --minutes N`: the node agent and the waypoint under
//! sustained load across agent handovers, in network namespaces.
//!
//! A pod runs `shunt-probe soak` against a VIP bound to a waypoint: short
//! connections at `--rate` per second (1 KiB echoed and checked each) and
//! `--streams` long-lived streams (4 KiB echoed every 100 ms, every byte
//! checked, each living 5–20 s, then reopened), through `shunt agent` →
//! HBONE → `shunt waypoint` → a plain echo server. Meanwhile `--handovers`
//! new agents are started, evenly spaced, the way README says to restart
//! (start the new one; it takes over and the old one drains and exits).
//!
//! Passes when: nothing was refused, failed, stalled or corrupted; every
//! old agent drained before its deadline and exited; the final agent's and
//! the waypoint's fds and RSS came back near their idle baselines; the
//! pinned maps hold the same number of entries as before. Prints a summary
//! either way and fails on the first unmet condition listed.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use shunt_testbed::mesh::{self, Port, ServiceEntry, NAMESPACE, WAYPOINT};
use shunt_testbed::{wait_for, Node, Proc};

const SVC_PORT: u16 = 9000;
const TARGET_PORT: u16 = 7000;
const VIP: &str = "240.240.0.1";
/// How long an old agent may drain (the agent's default).
const DRAIN: Duration = Duration::from_secs(30);
/// fds above the idle baseline still "near" it (a pooled HBONE connection
/// or two, the config watcher's files).
const FD_SLACK: usize = 16;
/// RSS above the idle baseline still "near" it: allocator caches (mimalloc
/// returns freed pages about a second after a burst).
const RSS_SLACK_KIB: u64 = 160 * 1024;

#[derive(Clone, Debug)]
pub struct Options {
    pub minutes: f64,
    pub rate: u64,
    pub streams: usize,
    pub handovers: usize,
}

fn config(node: &Node, wp_ip: &str, upstream_ip: &str) -> String {
    let mut d = mesh::base(node.pod("app").workload_entry(NAMESPACE, "app"), wp_ip);
    d.push(
        ServiceEntry {
            name: "echo",
            waypoint: Some(WAYPOINT),
            hosts: &["echo.internal"],
            ports: &[Port::tcp(SVC_PORT, TARGET_PORT)],
            endpoints: &[upstream_ip],
            ..Default::default()
        }
        .yaml(),
    );
    mesh::docs(&d)
}

/// fds and RSS (KiB) of a process.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    fds: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Result<Usage> {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("fds of {pid}"))?
        .count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Ok(Usage { fds, rss_kib })
}

/// CPU seconds (user + system) a process has used so far; 0 once gone.
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|st| {
            // Fields after the command name, which may contain spaces.
            let rest = &st[st.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
        })
        .unwrap_or(0.0)
}

/// Entries per pinned map, as `shunt maps` lists them (`NAME (N)` headers).
fn map_counts(shunt: &Path, node: &Node) -> Result<Vec<(String, usize)>> {
    let out = Command::new(shunt)
        .args(["maps", "--pin-dir", &node.pin_dir.display().to_string()])
        .output()
        .context("running shunt maps")?;
    if !out.status.success() {
        bail!("shunt maps: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.split_once(" (")?;
            let n = rest.strip_suffix(')')?.parse().ok()?;
            name.chars()
                .all(|c| c.is_ascii_uppercase() || c == '_')
                .then(|| (name.to_string(), n))
        })
        .collect())
}

/// The probe's final line as `key=value` pairs (numbers only).
fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

struct Mesh {
    // Drop order: pod processes before the node removes their cgroups.
    load: Option<Proc>,
    waypoint: Proc,
    _upstream: Proc,
    node: Node,
}

fn setup(bins: &Path) -> Result<Mesh> {
    let shunt = bins.join("shunt");
    let probe = bins.join("shunt-probe");
    let mut node = mesh::node()?;
    let wp_ip = node.pod("wp").ip4.clone();
    let upstream_ip = node.pod("inet").ip4.clone();
    let ca = node.work_dir.join("ca").display().to_string();
    let st = Command::new(&shunt)
        .args(["ca", "init", "--ca-dir", &ca])
        .output()?;
    if !st.status.success() {
        bail!("shunt ca init: {}", String::from_utf8_lossy(&st.stderr));
    }
    node.write_config("mesh.yaml", "trustDomain: cluster.local\n")?;
    node.write_config("00-mesh.yaml", &config(&node, &wp_ip, &upstream_ip))?;
    let cfg = node.config_dir().display().to_string();
    let state = node.state_dir.display().to_string();
    start_agent(&mut node, &shunt)?;
    let ulog = node.work_dir.join("upstream.log");
    let upstream = node.pod("inet").spawn(
        &probe,
        &["serve", &format!("{upstream_ip}:{TARGET_PORT}")],
        &ulog,
    )?;
    let wlog = node.work_dir.join("waypoint.log");
    let waypoint = node
        .pod("wp")
        .spawn(&shunt, &mesh::waypoint_args(&cfg, &state, &ca), &wlog)?;
    wait_for(
        "waypoint and upstream ready",
        Duration::from_secs(60),
        || {
            let w = std::fs::read_to_string(&wlog).ok()?;
            let u = std::fs::read_to_string(&ulog).ok()?;
            (mesh::waypoint_serving(&w) && u.contains("listening")).then_some(())
        },
    )
    .with_context(|| format!("waypoint log:\n{}", waypoint.log_text()))?;
    // One echo through the whole path before measuring anything.
    let vip = format!("{VIP}:{SVC_PORT}");
    let mut last = String::new();
    wait_for(
        "a first connection through the mesh",
        Duration::from_secs(30),
        || {
            let out = node
                .pod("app")
                .run(&probe, &["connect", &vip, "--echo", "1000", "--raw"])
                .ok()?;
            last = String::from_utf8_lossy(&out.stdout).trim().to_string();
            last.contains("echoed=1000").then_some(())
        },
    )
    .with_context(|| {
        format!(
            "probe: {last}\nagent log:\n{}\nwaypoint log:\n{}",
            node.agents[0].log_text(),
            waypoint.log_text()
        )
    })?;
    Ok(Mesh {
        load: None,
        waypoint,
        _upstream: upstream,
        node,
    })
}

/// The restart README documents: start the new agent next to the old one.
fn start_agent(node: &mut Node, shunt: &Path) -> Result<usize> {
    let cfg = node.config_dir().display().to_string();
    let ca = node.work_dir.join("ca").display().to_string();
    // Metrics and readiness listeners on ports of their own per node
    // (SO_REUSEPORT lets the successor bind them while the old one drains).
    node.start_agent(
        shunt,
        &["agent"],
        &[
            "--config-dir",
            &cfg,
            "--ca-dir",
            &ca,
            "--no-dns",
            "--drain-timeout",
            &format!("{}s", DRAIN.as_secs()),
        ],
    )
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the soak creates network namespaces and cgroups and loads kernel programs: run it as root");
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args(["build", "--bins"])
        .current_dir(root)
        .status()?;
    if !st.success() {
        bail!("cargo build --bins failed");
    }
    let bins: PathBuf = root.join("target/debug");
    let shunt = bins.join("shunt");
    // Access lines only for failed connections: 1,000 a second would be
    // the disk's load, not the mesh's.
    // SAFETY (edition 2021: safe): no other thread runs yet.
    std::env::set_var("SHUNT_LOG", "info,access=warn");
    let mut m = setup(&bins)?;
    let seconds = (o.minutes * 60.0).round().max(10.0) as u64;
    std::thread::sleep(Duration::from_secs(2));
    let agent0 = usage(m.node.agents[0].pid())?;
    let wp0 = usage(m.waypoint.pid())?;
    let maps0 = map_counts(&shunt, &m.node)?;
    println!(
        "soak: {seconds} s, {} conn/s, {} streams, {} handovers; baseline agent fds={} rss={} KiB, waypoint fds={} rss={} KiB, maps {maps0:?}",
        o.rate, o.streams, o.handovers, agent0.fds, agent0.rss_kib, wp0.fds, wp0.rss_kib
    );

    let llog = m.node.work_dir.join("load.log");
    let vip = format!("{VIP}:{SVC_PORT}");
    m.load = Some(m.node.pod("app").spawn(
        &bins.join("shunt-probe"),
        &[
            "soak",
            &vip,
            "--rate",
            &o.rate.to_string(),
            "--streams",
            &o.streams.to_string(),
            "--seconds",
            &seconds.to_string(),
        ],
        &llog,
    )?);
    let start = Instant::now();
    let mut peak_agent = agent0;
    let mut peak_wp = wp0;
    let mut handover_ms = Vec::new();
    // CPU seconds per agent pid (old agents' last sample before they exit),
    // to tell who limits the rate: the load or the mesh.
    let mut agent_cpu: std::collections::BTreeMap<u32, f64> = Default::default();
    let agent_cpu0 = cpu_secs(m.node.agents[0].pid());
    let (wp_cpu0, load_pid) = (
        cpu_secs(m.waypoint.pid()),
        m.load.as_ref().expect("started").pid(),
    );
    let mut sample_agents = |node: &Node| {
        for a in &node.agents {
            let c = cpu_secs(a.pid());
            let e = agent_cpu.entry(a.pid()).or_default();
            *e = e.max(c);
        }
    };
    for k in 1..=o.handovers {
        let at = Duration::from_secs(seconds * k as u64 / (o.handovers as u64 + 1));
        while start.elapsed() < at {
            std::thread::sleep(Duration::from_millis(500));
            if let Some(a) = m.node.agents.last() {
                let u = usage(a.pid()).unwrap_or_default();
                peak_agent.fds = peak_agent.fds.max(u.fds);
                peak_agent.rss_kib = peak_agent.rss_kib.max(u.rss_kib);
            }
            let u = usage(m.waypoint.pid()).unwrap_or_default();
            peak_wp.fds = peak_wp.fds.max(u.fds);
            peak_wp.rss_kib = peak_wp.rss_kib.max(u.rss_kib);
            m.waypoint.alive()?;
            sample_agents(&m.node);
        }
        let t = Instant::now();
        start_agent(&mut m.node, &shunt)?;
        handover_ms.push(t.elapsed().as_millis() as u64);
        println!(
            "soak: handover {k} at {} s (new agent capturing after {} ms)",
            start.elapsed().as_secs(),
            t.elapsed().as_millis()
        );
    }
    let mut load_cpu = 0.0f64;
    let done = wait_for(
        "the load to finish",
        Duration::from_secs(seconds + 120).saturating_sub(start.elapsed()),
        || {
            sample_agents(&m.node);
            load_cpu = load_cpu.max(cpu_secs(load_pid));
            let load = m.load.as_mut().expect("started");
            load.child.try_wait().ok().flatten()
        },
    );
    let wp_cpu = cpu_secs(m.waypoint.pid()) - wp_cpu0;
    let wall = start.elapsed().as_secs_f64();
    let log = std::fs::read_to_string(&llog).unwrap_or_default();
    let last = log
        .lines()
        .rev()
        .find(|l| l.starts_with("soak "))
        .unwrap_or("")
        .to_string();
    if done.is_err() || last.is_empty() {
        bail!("the load did not finish; its log:\n{log}");
    }

    // Every old agent drains and exits.
    let n = m.node.agents.len();
    let mut deadline_hit = Vec::new();
    let mut not_exited = Vec::new();
    for (i, a) in m.node.agents[..n - 1].iter_mut().enumerate() {
        if !a.wait_exit(DRAIN + Duration::from_secs(15)) {
            not_exited.push(i);
        }
        if a.log_text().contains("drain deadline reached") {
            deadline_hit.push(i);
        }
    }
    // Idle again: pooled connections close after the agent's HBONE idle
    // timeout (60 s).
    let final_pid = m.node.agents[n - 1].pid();
    let near = |now: Usage, base: Usage| {
        now.fds <= base.fds + FD_SLACK && now.rss_kib <= base.rss_kib + RSS_SLACK_KIB
    };
    let settled = wait_for(
        "fds and RSS back near baseline",
        Duration::from_secs(90),
        || {
            let a = usage(final_pid).ok()?;
            let w = usage(m.waypoint.pid()).ok()?;
            (near(a, agent0) && near(w, wp0)).then_some(())
        },
    );
    let agent1 = usage(final_pid)?;
    let wp1 = usage(m.waypoint.pid())?;
    let maps1 = map_counts(&shunt, &m.node)?;

    let get = |k: &str| field(&last, k);
    println!("\n== soak summary ==");
    println!(
        "duration {seconds} s; short connections {} ({:.0}/s achieved, {} asked), ok {}, refused {}, failed {}, stalled (>5 s) {}, corrupted {}; max latency {} ms",
        get("short"),
        get("short") as f64 / seconds as f64,
        o.rate,
        get("short_ok"),
        get("refused"),
        get("failed"),
        get("stalled"),
        get("corrupted"),
        get("max_latency_ms"),
    );
    println!(
        "streams opened {}, ok {}, failed {}, corrupted {}; {} MiB checked",
        get("streams_opened"),
        get("streams_ok"),
        get("streams_failed"),
        get("streams_corrupted"),
        get("stream_bytes") >> 20
    );
    println!(
        "handovers {} (new agent capturing after {handover_ms:?} ms); old agents at the drain deadline {deadline_hit:?}, not exited {not_exited:?}",
        o.handovers
    );
    println!(
        "agent fds {} -> peak {} -> {}, rss {} -> peak {} -> {} KiB",
        agent0.fds, peak_agent.fds, agent1.fds, agent0.rss_kib, peak_agent.rss_kib, agent1.rss_kib
    );
    println!(
        "waypoint fds {} -> peak {} -> {}, rss {} -> peak {} -> {} KiB",
        wp0.fds, peak_wp.fds, wp1.fds, wp0.rss_kib, peak_wp.rss_kib, wp1.rss_kib
    );
    println!(
        "cpu over {wall:.0} s wall ({} cores): load {load_cpu:.0} s, agents {:.0} s, waypoint {wp_cpu:.0} s; machine load average {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        agent_cpu.values().sum::<f64>() - agent_cpu0,
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!("maps before {maps0:?}\nmaps after  {maps1:?}");
    println!("load: {last}");
    println!("logs: {}", m.node.work_dir.display());

    let mut failures = Vec::new();
    for k in [
        "refused",
        "failed",
        "stalled",
        "corrupted",
        "streams_failed",
        "streams_corrupted",
    ] {
        if get(k) > 0 {
            failures.push(format!("{k}={}", get(k)));
        }
    }
    if !deadline_hit.is_empty() {
        failures.push(format!(
            "old agents {deadline_hit:?} reached the drain deadline"
        ));
    }
    if !not_exited.is_empty() {
        failures.push(format!("old agents {not_exited:?} did not exit"));
    }
    if settled.is_err() {
        failures.push("fds or RSS did not come back near baseline".into());
    }
    if maps0 != maps1 {
        failures.push("pinned map entries changed".into());
    }
    if get("short") < seconds * o.rate * 9 / 10 {
        println!(
            "note: the machine sustained {:.0} conn/s of the {} asked",
            get("short") as f64 / seconds as f64,
            o.rate
        );
    }
    if !failures.is_empty() {
        // Keep the logs for a look: the work dir is removed with the node.
        let keep = root.join("target/soak-logs");
        let _ = std::fs::remove_dir_all(&keep);
        let _ = Command::new("cp")
            .args([
                "-r",
                &m.node.work_dir.display().to_string(),
                &keep.display().to_string(),
            ])
            .status();
        bail!(
            "soak failed: {} (logs copied to {})",
            failures.join(", "),
            keep.display()
        );
    }
    println!("soak passed");
    Ok(())
}

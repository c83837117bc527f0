//! `cargo xtask bench`: the system benchmark of issue #14, and (with
//! `--micro`) the criterion micro-benchmarks.
//!
//! One run builds release binaries, stands up a node with three pods (the
//! client `app`, the waypoint's `wp`, the upstream `inet`; see
//! [`shunt_testbed::Node`]) and measures, in interleaved rounds (direct,
//! hop, shunt, seed, direct, hop, …), four ways from `app` to the same
//! upstream servers in `inet`:
//! - *direct*: `app` → node → `inet`, no proxy;
//! - *hop*: one plain TCP proxy, haproxy with splice, in `wp` (the same
//!   path as the mesh's: `app` → node → `wp` → node → `inet`);
//! - *shunt*: `app` → VIP → agent → HBONE → `shunt waypoint` in `wp` →
//!   `inet`, through a TCP ServiceEntry (L4);
//! - *seed*: the same through the seed's `httpbin.org` ServiceEntry (HTTP,
//!   L7) with the seed's AuthorizationPolicy — HTTP metrics only, since the
//!   seed's port speaks HTTP.
//!
//! The metrics come from Debian tools run in the pods (iperf3, sockperf,
//! wrk against nginx, haproxy as the hop) and /proc (CPU from utime+stime,
//! RSS). Held connections are opened by this binary itself (hidden
//! `--hold` mode, run in the `app` pod). Absolute numbers depend on the
//! machine's load (recorded); the ratios within one run are what counts.
//! The result is a markdown table on stdout and JSON under
//! `target/bench/`.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use shunt_testbed::{seed, wait_for, Node, Proc};

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run the criterion micro-benchmarks (`cargo bench -p shunt-agent -p
    /// shunt-tests`, extra arguments after `--`) instead of the system
    /// benchmark.
    #[arg(long)]
    micro: bool,
    /// A smoke run (about a minute): one round, short measurements, 200
    /// held connections.
    #[arg(long)]
    quick: bool,
    /// Interleaved rounds; each metric's value is the median over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    secs: u64,
    /// Connections held open for the per-connection memory figure.
    #[arg(long, default_value_t = 2000)]
    held: usize,
    /// Record a CPU profile (`perf record -e cpu-clock`) of the agent and
    /// the waypoint while these metrics (comma-separated) run through shunt (iperf1, iperf4,
    /// sockperf, conn1, conn4, http; `http` profiles the seed variant);
    /// perf data and a flat `perf report` land in target/bench/.
    #[arg(long)]
    perf: Option<String>,
    /// Skip `cargo build --release` (binaries already built).
    #[arg(long)]
    no_build: bool,
    /// Benchmark this `shunt` binary instead of the release build (implies
    /// `--no-build`), e.g. a copy of a baseline to compare against.
    #[arg(long)]
    shunt_bin: Option<PathBuf>,
    /// A second `shunt` binary (a candidate) measured in the same run on a
    /// node of its own: a second table, with ratios against the same
    /// direct and hop measurements.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Internal: hold this many connections to ADDR (see `--hold-n`) until
    /// killed; run by the benchmark inside the client pod.
    #[arg(long, hide = true)]
    hold: Option<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 2000)]
    hold_n: usize,
    /// With `--micro`: arguments for the criterion benches.
    #[arg(trailing_var_arg = true)]
    args: Vec<String>,
}

/// Ports the upstream servers listen on in `inet`; the hop listens on
/// each plus [`HOP_OFFSET`], the TCP ServiceEntry exposes each as itself.
const IPERF_PORT: u16 = 5201;
const SOCKPERF_PORT: u16 = 11111;
const HTTP_PORT: u16 = 8080;
const HOP_OFFSET: u16 = 10000;
/// The seed's ServiceEntry port (HTTP).
const SEED_PORT: u16 = 80;
/// sockperf's fixed message rate (messages/s) and size.
const SOCKPERF_MPS: &str = "5000";
const SOCKPERF_MSG: &str = "64";
/// When memory counts as settled after the load.
const SETTLE_SECS: u64 = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Direct,
    Hop,
    Shunt,
    Seed,
}

impl Variant {
    const ALL: [Variant; 4] = [Variant::Direct, Variant::Hop, Variant::Shunt, Variant::Seed];
    fn name(self) -> &'static str {
        match self {
            Variant::Direct => "direct",
            Variant::Hop => "hop",
            Variant::Shunt => "shunt",
            Variant::Seed => "seed",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Metric {
    Iperf1,
    Iperf4,
    Sockperf,
    Conn1,
    Conn4,
    Http,
}

impl Metric {
    const ALL: [Metric; 6] = [
        Metric::Iperf1,
        Metric::Iperf4,
        Metric::Sockperf,
        Metric::Conn1,
        Metric::Conn4,
        Metric::Http,
    ];
    fn name(self) -> &'static str {
        match self {
            Metric::Iperf1 => "iperf1",
            Metric::Iperf4 => "iperf4",
            Metric::Sockperf => "sockperf",
            Metric::Conn1 => "conn1",
            Metric::Conn4 => "conn4",
            Metric::Http => "http",
        }
    }
    /// The seed's port speaks HTTP: only the HTTP metric runs through it.
    fn applies(self, v: Variant) -> bool {
        v != Variant::Seed || self == Metric::Http
    }
}

/// What one measurement gave: named values (Gbit/s, µs, req/s…) and the
/// CPU seconds each proxy process used meanwhile.
#[derive(Clone, Debug, Default)]
struct Sample {
    values: BTreeMap<&'static str, f64>,
    cpu: BTreeMap<&'static str, f64>,
}

/// The processes of one run. Field order is drop order: everything in the
/// pods stops before the node removes them.
struct Bed {
    agent_pid: u32,
    waypoint: Proc,
    haproxy: Proc,
    _servers: Vec<Proc>,
    work: PathBuf,
    app_enter: shunt_testbed::Enter,
    inet_ip: String,
    wp_ip: String,
    shunt_vip: String,
    seed_vip: String,
    node: Node,
}

pub fn run(root: &Path, a: Args) -> Result<()> {
    if let Some(addr) = a.hold {
        return hold(addr, a.hold_n);
    }
    if a.micro {
        return micro(root, &a.args);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark creates network namespaces and loads kernel programs: run it as root");
    }
    let (rounds, secs, held) = if a.quick {
        (1, 2, 200)
    } else {
        (a.rounds.max(1), a.secs.max(1), a.held)
    };
    crate::setup()?;
    raise_nofile();
    let target = target_dir(root);
    let shunt = release_shunt(&target, a.no_build, a.shunt_bin.as_deref())?;
    ensure!(
        shunt.exists(),
        "{} missing: build it with cargo build --release",
        shunt.display()
    );
    for tool in ["iperf3", "sockperf", "wrk", "haproxy", "nginx"] {
        ensure!(
            which(tool),
            "{tool} not found: run scripts/setup.sh (or `cargo xtask setup`)"
        );
    }
    let load_before = loadavg();
    let started = Instant::now();
    let mut bed = Bed::up(&shunt)?;
    bed.check()?;
    // The candidate: its own node, measured in the same rounds.
    let mut bed_b = match &a.compare {
        Some(p) => {
            let mut b = Bed::up(p)?;
            b.check()?;
            Some(b)
        }
        None => None,
    };
    let pids = bed.pids();
    let rss_idle = rss_all(&pids);
    let rss_idle_b = bed_b.as_ref().map(|b| rss_all(&b.pids()));
    let mut samples: BTreeMap<(Metric, Variant), Vec<Sample>> = BTreeMap::new();
    let mut samples_b: BTreeMap<(Metric, Variant), Vec<Sample>> = BTreeMap::new();
    for r in 0..rounds {
        for m in Metric::ALL {
            for v in Variant::ALL {
                if !m.applies(v) {
                    continue;
                }
                eprintln!(
                    "[bench] round {}/{rounds}: {} {}",
                    r + 1,
                    m.name(),
                    v.name()
                );
                let profiled = a
                    .perf
                    .as_deref()
                    .is_some_and(|p| p.split(',').any(|x| x == m.name()))
                    && v == if m == Metric::Http {
                        Variant::Seed
                    } else {
                        Variant::Shunt
                    };
                let perf = if profiled {
                    Some(Perf::start(&bed.pids()[..2], &target.join("bench"), m, r)?)
                } else {
                    None
                };
                let s = bed
                    .measure(m, v, secs)
                    .with_context(|| format!("{} through {}", m.name(), v.name()))?;
                if let Some(p) = perf {
                    p.finish()?;
                }
                samples.entry((m, v)).or_default().push(s);
                match (&bed_b, v) {
                    (Some(b), Variant::Shunt | Variant::Seed) => {
                        eprintln!(
                            "[bench] round {}/{rounds}: {} {} (B)",
                            r + 1,
                            m.name(),
                            v.name()
                        );
                        let s = b
                            .measure(m, v, secs)
                            .with_context(|| format!("{} through {} (B)", m.name(), v.name()))?;
                        samples_b.entry((m, v)).or_default().push(s);
                    }
                    (Some(_), _) => {
                        // B's ratios are against the same direct and hop runs.
                        let s = samples[&(m, v)].last().cloned().unwrap_or_default();
                        samples_b.entry((m, v)).or_default().push(s);
                    }
                    (None, _) => {}
                }
            }
        }
    }
    // Memory after load: 2 s after the load stopped, and again later
    // (whether memory is returned).
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_all(&pids);
    let rss_after_b = bed_b.as_ref().map(|b| rss_all(&b.pids()));
    std::thread::sleep(Duration::from_secs(SETTLE_SECS - 2));
    let rss_settled = rss_all(&pids);
    let rss_settled_b = bed_b.as_ref().map(|b| rss_all(&b.pids()));
    let mut held_rss = BTreeMap::new();
    for v in [Variant::Hop, Variant::Shunt] {
        held_rss.insert(v, bed.held_rss(v, held)?);
    }
    let report_b = match bed_b.as_mut() {
        Some(b) => {
            let mut h = held_rss.clone();
            h.insert(Variant::Shunt, b.held_rss(Variant::Shunt, held)?);
            Some(Report {
                samples: samples_b,
                rss_idle: rss_idle_b.unwrap_or_default(),
                rss_after: rss_after_b.unwrap_or_default(),
                rss_settled: rss_settled_b.unwrap_or_default(),
                held_rss: h,
                held,
            })
        }
        None => None,
    };
    drop(bed_b);
    let load_after = loadavg();
    let elapsed = started.elapsed().as_secs();
    let report = Report {
        samples,
        rss_idle,
        rss_after,
        rss_settled,
        held_rss,
        held,
    };
    let mut table = report.table();
    if let Some(b) = &report_b {
        table = format!(
            "A: {}\n\n{table}\nB: {} (same run; direct and hop columns are A's)\n\n{}",
            shunt.display(),
            a.compare.as_deref().unwrap_or(Path::new("")).display(),
            b.table()
        );
    }
    let machine = machine();
    let out = json!({
        "machine": machine,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
        "rounds": rounds,
        "secs": secs,
        "held": held,
        "elapsed_s": elapsed,
        "results": report.json(),
        "results_b": report_b.as_ref().map(Report::json),
        "table": table,
    });
    drop(bed);
    let dir = target.join("bench");
    std::fs::create_dir_all(&dir)?;
    let file = dir.join(format!("system-{}.json", unix_now()));
    let text = serde_json::to_string_pretty(&out)?;
    std::fs::write(&file, &text)?;
    std::fs::write(dir.join("system-latest.json"), &text)?;
    println!(
        "machine: {machine}\nload average (1/5/15 min) before: {load_before}, after: {load_after}; {rounds} round(s) of {secs} s, {elapsed} s in all\n"
    );
    println!("{table}");
    println!("JSON: {}", file.display());
    Ok(())
}

/// The criterion benches (what `cargo xtask bench` ran before #14).
fn micro(root: &Path, args: &[String]) -> Result<()> {
    crate::setup()?;
    // Kernel benches spawn the built binaries.
    crate::run(crate::cargo().args(["build", "--bins"]))?;
    let mut b = crate::cargo();
    b.current_dir(root)
        .args(["bench", "-p", "shunt-agent", "-p", "shunt-tests"]);
    if !args.is_empty() {
        b.arg("--").args(args);
    }
    crate::run(&mut b)
}

pub(crate) fn target_dir(root: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
}

/// The `shunt` binary a benchmark runs: `given` as is, else the release
/// build (built first unless `no_build`).
pub(crate) fn release_shunt(
    target: &Path,
    no_build: bool,
    given: Option<&Path>,
) -> Result<PathBuf> {
    if let Some(bin) = given {
        return Ok(bin.to_path_buf());
    }
    if !no_build {
        crate::run(crate::cargo().args([
            "build",
            "--release",
            "-p",
            "shunt-agent",
            "--bin",
            "shunt",
        ]))?;
    }
    Ok(target.join("release/shunt"))
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Children inherit it: 2,000 held connections need more than 1,024 files
/// in the holder, the agent, the waypoint and the hop.
fn raise_nofile() {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) == 0 {
            r.rlim_cur = r.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} × {cpu}, Linux {}", kernel.trim())
}

/// `perf record` attached to the proxy processes for one measurement.
struct Perf {
    child: std::process::Child,
    data: PathBuf,
}

impl Perf {
    fn start(pids: &[(&'static str, u32)], dir: &Path, m: Metric, round: usize) -> Result<Perf> {
        std::fs::create_dir_all(dir)?;
        let data = dir.join(format!("perf-{}-{round}.data", m.name()));
        let list: Vec<String> = pids.iter().map(|(_, p)| p.to_string()).collect();
        let child = Command::new("perf")
            .args(["record", "-q", "-e", "cpu-clock", "-F", "2000", "-o"])
            .arg(&data)
            .args(["-p", &list.join(",")])
            .spawn()
            .context("starting perf record")?;
        // perf needs a moment to attach before the load starts.
        std::thread::sleep(Duration::from_millis(500));
        Ok(Perf { child, data })
    }

    fn finish(mut self) -> Result<()> {
        // SAFETY: plain kill(2) on our child: SIGINT makes perf write its data.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        self.child.wait()?;
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "--sort",
                "comm,dso,sym",
                "-i",
            ])
            .arg(&self.data)
            .output()?;
        let report = self.data.with_extension("txt");
        std::fs::write(&report, &out.stdout)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let top: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(40)
            .collect();
        eprintln!("[bench] profile {}:\n{}", report.display(), top.join("\n"));
        Ok(())
    }
}

/// CPU seconds (user + system, all threads) of a process so far.
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5): 12 and 13 here.
    let ticks: f64 = f
        .get(11..13)
        .map(|x| x.iter().filter_map(|v| v.parse::<f64>().ok()).sum())
        .unwrap_or(0.0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz
}

/// A `Key:   123 kB` line of a /proc file, in MB (0 when unreadable).
fn proc_mb(pid: u32, file: &str, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/{file}"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resident set size in MB (VmRSS).
fn rss_mb(pid: u32) -> f64 {
    proc_mb(pid, "status", "VmRSS")
}

/// VmRSS per process, RssAnon (heap, stacks; the rest is the binary's
/// and libraries' pages) as `<name>_anon`, and Pss (pages shared with
/// another process, such as the one binary agent and waypoint both map,
/// counted by share) as `<name>_pss`.
fn rss_all(pids: &[(&'static str, u32)]) -> BTreeMap<&'static str, f64> {
    let mut m: BTreeMap<&'static str, f64> = pids.iter().map(|(n, p)| (*n, rss_mb(*p))).collect();
    for (n, p) in pids {
        let (anon, pss) = match *n {
            "agent" => ("agent_anon", "agent_pss"),
            "waypoint" => ("waypoint_anon", "waypoint_pss"),
            "haproxy" => ("haproxy_anon", "haproxy_pss"),
            _ => continue,
        };
        m.insert(anon, proc_mb(*p, "status", "RssAnon"));
        m.insert(pss, proc_mb(*p, "smaps_rollup", "Pss"));
    }
    m
}

/// Median (the mean of the middle two for an even count).
fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

impl Bed {
    fn up(shunt: &Path) -> Result<Bed> {
        let mut node = Node::new()?;
        node.add_pod("app")?;
        node.add_pod("wp")?;
        node.add_pod("inet")?;
        node.enable_forwarding()?;
        // A `Connection: close` request can leave its client port in
        // TIME_WAIT for 60 s: without reuse (the default allows it on
        // loopback only), ~28k ports per destination cap a client at
        // ~470 connections/s once the first ones are spent. Set alike
        // for every variant: the client pod and the pod of the hop and
        // the waypoint, which connect out.
        for pod in ["app", "wp"] {
            let out = node
                .pod(pod)
                .ns
                .command("sysctl")
                .args(["-qw", "net.ipv4.tcp_tw_reuse=1"])
                .output()?;
            ensure!(
                out.status.success(),
                "sysctl in pod {pod}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let wp_ip = node.pod("wp").ip4.clone();
        let inet_ip = node.pod("inet").ip4.clone();
        let work = node.work_dir.join("bench");
        std::fs::create_dir_all(&work)?;
        let ca = node.work_dir.join("ca");
        let out = Command::new(shunt)
            .args(["ca", "init", "--ca-dir", &ca.display().to_string()])
            .output()?;
        ensure!(
            out.status.success(),
            "shunt ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        node.write_config("mesh.yaml", "trustDomain: cluster.local\n")?;
        node.write_config(
            "00-workload.yaml",
            &format!(
                "{}---\n{}",
                default_namespace(),
                node.pod("app").workload_entry("default", "curl")
            ),
        )?;
        node.write_config(
            "01-seed.yaml",
            &seed::loopback_service(wp_ip.parse()?, inet_ip.parse()?, HTTP_PORT, &[])?,
        )?;
        node.write_config("02-policy.yaml", &seed::file(seed::POLICY)?)?;
        node.write_config("03-bench-tcp.yaml", &tcp_service_entry(&inet_ip))?;
        let (cfg, ca_s, state) = (
            node.config_dir().display().to_string(),
            ca.display().to_string(),
            node.state_dir.display().to_string(),
        );
        let n = node.start_agent(
            shunt,
            &["agent"],
            &["--config-dir", &cfg, "--ca-dir", &ca_s, "--no-dns"],
        )?;
        let agent_pid = node.agents[n].pid();
        let vip = |name: &str, ns: &str| -> Result<String> {
            wait_for(
                &format!("a VIP for {name}"),
                Duration::from_secs(30),
                || {
                    let out = Command::new(shunt)
                        .args([
                            "get",
                            "se",
                            name,
                            "-n",
                            ns,
                            "-o",
                            "json",
                            "--config-dir",
                            &cfg,
                            "--state-dir",
                            &state,
                        ])
                        .output()
                        .ok()?;
                    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
                    first_address(&v)
                },
            )
        };
        let seed_vip = vip("httpbin.org", "common-infrastructure")?;
        let shunt_vip = vip("bench-tcp", "common-infrastructure")?;
        let wlog = node.work_dir.join("waypoint.log");
        let waypoint = node.pod("wp").spawn(
            shunt,
            &[
                "waypoint",
                "--config-dir",
                &cfg,
                "--state-dir",
                &state,
                "--ca-dir",
                &ca_s,
                "--name",
                "egress-gateway",
                "--namespace",
                "common-infrastructure",
            ],
            &wlog,
        )?;
        wait_for("waypoint ready", Duration::from_secs(30), || {
            let l = std::fs::read_to_string(&wlog).ok()?;
            l.lines()
                .any(|x| {
                    (x.contains("waypoint ready") || x.contains("config applied"))
                        && !x.contains("services=0")
                })
                .then_some(())
        })
        .with_context(|| format!("waypoint log:\n{}", shunt_testbed::tail(&wlog, 20)))?;
        let inet = node.pod("inet");
        let mut servers = Vec::new();
        servers.push(inet.spawn(
            Path::new("iperf3"),
            &["-s", "-B", &inet_ip, "-p", &IPERF_PORT.to_string()],
            &work.join("iperf3.log"),
        )?);
        servers.push(inet.spawn(
            Path::new("sockperf"),
            &[
                "server",
                "--tcp",
                "-i",
                &inet_ip,
                "-p",
                &SOCKPERF_PORT.to_string(),
            ],
            &work.join("sockperf.log"),
        )?);
        let nginx_conf = work.join("nginx.conf");
        std::fs::create_dir_all(work.join("nginx"))?;
        std::fs::write(&nginx_conf, nginx_conf_text(&work, &inet_ip))?;
        servers.push(inet.spawn(
            Path::new("nginx"),
            &[
                "-c",
                &nginx_conf.display().to_string(),
                "-p",
                &work.join("nginx").display().to_string(),
                "-e",
                &work.join("nginx/error.log").display().to_string(),
            ],
            &work.join("nginx.out"),
        )?);
        let hap_conf = work.join("haproxy.cfg");
        std::fs::write(&hap_conf, haproxy_conf_text(&wp_ip, &inet_ip))?;
        let haproxy = node.pod("wp").spawn(
            Path::new("haproxy"),
            &["-db", "-f", &hap_conf.display().to_string()],
            &work.join("haproxy.log"),
        )?;
        let bed = Bed {
            agent_pid,
            waypoint,
            haproxy,
            _servers: servers,
            work,
            app_enter: node.pod("app").enter(),
            inet_ip,
            wp_ip,
            shunt_vip,
            seed_vip,
            node,
        };
        for (ns, port) in [
            (&bed.node.pod("inet").ns, IPERF_PORT),
            (&bed.node.pod("inet").ns, SOCKPERF_PORT),
            (&bed.node.pod("inet").ns, HTTP_PORT),
            (&bed.node.pod("wp").ns, HTTP_PORT + HOP_OFFSET),
        ] {
            wait_for(
                &format!("a listener on port {port} in {}", ns.name),
                Duration::from_secs(20),
                || {
                    let out = ns.command("ss").args(["-Hltn"]).output().ok()?;
                    String::from_utf8_lossy(&out.stdout)
                        .contains(&format!(":{port} "))
                        .then_some(())
                },
            )
            .with_context(|| {
                let logs = ["iperf3.log", "sockperf.log", "nginx.out", "haproxy.log"];
                logs.iter()
                    .map(|l| format!("{l}:\n{}", shunt_testbed::tail(&bed.work.join(l), 5)))
                    .collect::<Vec<_>>()
                    .join("\n")
            })?;
        }
        Ok(bed)
    }

    fn pids(&self) -> Vec<(&'static str, u32)> {
        vec![
            ("agent", self.agent_pid),
            ("waypoint", self.waypoint.pid()),
            ("haproxy", self.haproxy.pid()),
        ]
    }

    /// Where a variant's client connects for the upstream port `port`.
    fn addr(&self, v: Variant, port: u16) -> String {
        match v {
            Variant::Direct => format!("{}:{port}", self.inet_ip),
            Variant::Hop => format!("{}:{}", self.wp_ip, port + HOP_OFFSET),
            Variant::Shunt => format!("{}:{port}", self.shunt_vip),
            Variant::Seed => format!("{}:{SEED_PORT}", self.seed_vip),
        }
    }

    /// A command run in the client pod.
    fn app(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .app_enter
            .command(program)
            .args(args)
            .output()
            .with_context(|| format!("running {program}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "{program} {}: {}{}",
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    }

    /// Every variant answers an HTTP GET before anything is measured, and
    /// the mesh variants really went through the waypoint.
    fn check(&mut self) -> Result<()> {
        for v in Variant::ALL {
            let addr = self.addr(v, HTTP_PORT);
            let code = wait_for(
                &format!("HTTP 200 through {}", v.name()),
                Duration::from_secs(20),
                || {
                    let c = self
                        .app(
                            "curl",
                            &[
                                "-s",
                                "-o",
                                "/dev/null",
                                "-w",
                                "%{http_code}",
                                "--max-time",
                                "3",
                                "-H",
                                "Host: httpbin.org",
                                &format!("http://{addr}/get"),
                            ],
                        )
                        .ok()?;
                    (c == "200").then_some(c)
                },
            );
            if let Err(e) = code {
                bail!(
                    "{e}; agent log:\n{}\nwaypoint log:\n{}",
                    shunt_testbed::tail(&self.node.agents[0].log, 10),
                    self.waypoint.log_text()
                );
            }
        }
        let wlog = self.waypoint.log_text();
        ensure!(
            wlog.matches("connection complete").count() >= 1
                || wlog.contains("direction=\"inbound\""),
            "the waypoint logged no connection: {wlog}"
        );
        self.waypoint.alive()?;
        Ok(())
    }

    fn measure(&self, m: Metric, v: Variant, secs: u64) -> Result<Sample> {
        let pids = self.pids();
        let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_secs(*p)).collect();
        let values = match m {
            Metric::Iperf1 | Metric::Iperf4 => self.iperf(v, secs, m == Metric::Iperf4)?,
            Metric::Sockperf => self.sockperf(v, secs)?,
            Metric::Conn1 => self.wrk(v, secs, 1, true)?,
            Metric::Conn4 => self.wrk(v, secs, 4, true)?,
            Metric::Http => self.wrk(v, secs, 8, false)?,
        };
        let cpu = pids
            .iter()
            .zip(before)
            .map(|((n, p), b)| (*n, cpu_secs(*p) - b))
            .collect();
        Ok(Sample { values, cpu })
    }

    fn iperf(&self, v: Variant, secs: u64, four: bool) -> Result<BTreeMap<&'static str, f64>> {
        let addr = self.addr(v, IPERF_PORT);
        let (host, port) = addr.rsplit_once(':').context("address")?;
        let out = self.app(
            "iperf3",
            &[
                "-c",
                host,
                "-p",
                port,
                "-t",
                &secs.to_string(),
                "-P",
                if four { "4" } else { "1" },
                "-J",
            ],
        )?;
        let j: Value = serde_json::from_str(&out).context("iperf3 -J output")?;
        let sum = &j["end"]["sum_received"];
        let bps = sum["bits_per_second"]
            .as_f64()
            .context("iperf3 bits_per_second")?;
        let bytes = sum["bytes"].as_f64().context("iperf3 bytes")?;
        Ok(BTreeMap::from([("gbit_s", bps / 1e9), ("gb", bytes / 1e9)]))
    }

    fn sockperf(&self, v: Variant, secs: u64) -> Result<BTreeMap<&'static str, f64>> {
        let addr = self.addr(v, SOCKPERF_PORT);
        let (host, port) = addr.rsplit_once(':').context("address")?;
        let out = self.app(
            "sockperf",
            &[
                "ping-pong",
                "--tcp",
                "-i",
                host,
                "-p",
                port,
                "-m",
                SOCKPERF_MSG,
                "--mps",
                SOCKPERF_MPS,
                "-t",
                &secs.to_string(),
            ],
        )?;
        // "sockperf: ---> percentile 50.000 =   12.345" (µs, one way).
        let pct = |p: &str| -> Result<f64> {
            out.lines()
                .find(|l| l.contains(&format!("percentile {p} =")))
                .and_then(|l| l.rsplit('=').next())
                .and_then(|x| x.trim().parse().ok())
                .with_context(|| format!("sockperf percentile {p} in:\n{out}"))
        };
        Ok(BTreeMap::from([
            ("p50_us", pct("50.000")?),
            ("p99_us", pct("99.000")?),
        ]))
    }

    /// wrk against nginx's /get: `close` makes every request a new
    /// connection (the new-connections metric), otherwise keep-alive.
    fn wrk(
        &self,
        v: Variant,
        secs: u64,
        conns: usize,
        close: bool,
    ) -> Result<BTreeMap<&'static str, f64>> {
        let addr = self.addr(v, HTTP_PORT);
        let threads = conns.min(2);
        let mut args = vec![
            format!("-t{threads}"),
            format!("-c{conns}"),
            format!("-d{secs}s"),
            "--latency".into(),
            "-H".into(),
            "Host: httpbin.org".into(),
        ];
        if close {
            args.extend(["-H".into(), "Connection: close".into()]);
        }
        args.push(format!("http://{addr}/get"));
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.app("wrk", &argv)?;
        let rps = out
            .lines()
            .find(|l| l.starts_with("Requests/sec:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|x| x.parse::<f64>().ok())
            .with_context(|| format!("wrk Requests/sec in:\n{out}"))?;
        let total = out
            .lines()
            .find(|l| l.contains("requests in"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|x| x.parse::<f64>().ok())
            .with_context(|| format!("wrk request count in:\n{out}"))?;
        let p50 = out
            .lines()
            .find(|l| l.trim_start().starts_with("50%"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(wrk_duration_us)
            .with_context(|| format!("wrk 50% latency in:\n{out}"))?;
        // Any error makes the figure meaningless, for every variant.
        let errors = out
            .lines()
            .any(|l| l.contains("Non-2xx") || l.contains("Socket errors"));
        ensure!(!errors, "wrk through {}: errors:\n{out}", v.name());
        Ok(BTreeMap::from([
            ("req_s", rps),
            ("requests", total),
            ("p50_us", p50),
        ]))
    }

    /// RSS growth per held connection (KB), for the variant's proxy
    /// processes together.
    fn held_rss(&self, v: Variant, n: usize) -> Result<Value> {
        let pids: Vec<(&'static str, u32)> = match v {
            Variant::Hop => vec![("haproxy", self.haproxy.pid())],
            _ => vec![("agent", self.agent_pid), ("waypoint", self.waypoint.pid())],
        };
        let before = rss_all(&pids);
        let exe = std::env::current_exe()?;
        let log = self.work.join(format!("hold-{}.log", v.name()));
        let addr = self.addr(v, HTTP_PORT);
        let mut cmd = self.app_enter.command(&exe);
        cmd.args(["bench", "--hold", &addr, "--hold-n", &n.to_string()]);
        let mut holder = Proc::spawn("holder", cmd, &log)?;
        let r = wait_for("connections held", Duration::from_secs(120), || {
            let t = holder.log_text();
            if t.contains("held") || t.contains("error") {
                return Some(t);
            }
            holder.alive().err().map(|e| e.to_string())
        })?;
        ensure!(
            r.contains("held"),
            "holding {n} connections through {}: {r}",
            v.name()
        );
        // Let the proxies settle what they allocate per connection.
        std::thread::sleep(Duration::from_secs(2));
        let during = rss_all(&pids);
        holder.stop();
        let mut per = serde_json::Map::new();
        let mut total = 0.0;
        for (name, _) in &pids {
            let kb = (during[name] - before[name]) * 1024.0 / n as f64;
            total += kb;
            per.insert(name.to_string(), json!(kb));
            per.insert(format!("{name}_rss_mb"), json!(during[name]));
        }
        per.insert("total_kb".into(), json!(total));
        Ok(Value::Object(per))
    }
}

/// `status.addresses[0].value` of `shunt get se -o json` (an object or a
/// list of them).
fn first_address(v: &Value) -> Option<String> {
    let obj = match v {
        Value::Array(a) => a.first()?,
        Value::Object(o) if o.contains_key("items") => o["items"].as_array()?.first()?,
        o => o,
    };
    let a = &obj["status"]["addresses"][0];
    a["value"]
        .as_str()
        .or_else(|| a.as_str())
        .filter(|s| s.contains('.'))
        .map(str::to_string)
}

fn default_namespace() -> String {
    shunt_testbed::mesh::namespace(shunt_testbed::mesh::NAMESPACE, None)
}

/// The L4 ServiceEntry of the *shunt* variant, bound to the seed's
/// waypoint through its namespace (not a target of the seed's policy).
fn tcp_service_entry(endpoint: &str) -> String {
    let mut ports = String::new();
    for (p, n) in [
        (IPERF_PORT, "tcp-iperf"),
        (SOCKPERF_PORT, "tcp-sockperf"),
        (HTTP_PORT, "tcp-http"),
    ] {
        ports.push_str(&format!(
            "  - number: {p}\n    name: {n}\n    protocol: TCP\n    targetPort: {p}\n"
        ));
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bench-tcp\n  namespace: common-infrastructure\nspec:\n  hosts:\n  - bench-tcp.internal\n  ports:\n{ports}  resolution: STATIC\n  endpoints:\n  - address: {endpoint}\n"
    )
}

fn nginx_conf_text(work: &Path, ip: &str) -> String {
    let d = work.join("nginx").display().to_string();
    format!(
        r#"daemon off;
worker_processes auto;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
events {{ worker_connections 10000; }}
http {{
  access_log off;
  keepalive_timeout 600s;
  keepalive_requests 100000000;
  client_body_temp_path {d}/body;
  proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fastcgi;
  uwsgi_temp_path {d}/uwsgi;
  scgi_temp_path {d}/scgi;
  server {{
    listen {ip}:{HTTP_PORT} backlog=4096;
    location / {{
      default_type application/json;
      return 200 '{{"url": "http://httpbin.org/get"}}\n';
    }}
  }}
}}
"#
    )
}

fn haproxy_conf_text(listen: &str, upstream: &str) -> String {
    let mut s = String::from(
        "global\n  maxconn 6000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 600s\n  timeout server 600s\n  option splice-request\n  option splice-response\n",
    );
    for (name, p) in [
        ("iperf", IPERF_PORT),
        ("sockperf", SOCKPERF_PORT),
        ("http", HTTP_PORT),
    ] {
        s.push_str(&format!(
            "listen {name}\n  bind {listen}:{}\n  server up {upstream}:{p}\n",
            p + HOP_OFFSET
        ));
    }
    s
}

/// wrk's "1.23ms" / "456.00us" / "1.02s" in µs.
fn wrk_duration_us(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else {
        (s.strip_suffix('s')?, 1e6)
    };
    num.parse::<f64>().ok().map(|x| x * mult)
}

/// Hidden `--hold` mode: open `n` connections to `addr`, one keep-alive
/// HTTP GET on each (so every hop really holds it), print `held N`, then
/// wait to be killed.
fn hold(addr: SocketAddr, n: usize) -> Result<()> {
    raise_nofile();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .with_context(|| format!("connection {i} to {addr}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET /get HTTP/1.1\r\nHost: httpbin.org\r\n\r\n")?;
        let mut buf = [0u8; 512];
        let got = s.read(&mut buf)?;
        ensure!(
            buf[..got].starts_with(b"HTTP/1.1 200"),
            "connection {i}: {:?}",
            String::from_utf8_lossy(&buf[..got])
        );
        conns.push(s);
    }
    println!("held {}", conns.len());
    std::io::stdout().flush()?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Issue #14's targets, as (label, check on the ratio or value).
struct Report {
    samples: BTreeMap<(Metric, Variant), Vec<Sample>>,
    rss_idle: BTreeMap<&'static str, f64>,
    rss_after: BTreeMap<&'static str, f64>,
    rss_settled: BTreeMap<&'static str, f64>,
    held_rss: BTreeMap<Variant, Value>,
    held: usize,
}

impl Report {
    fn value(&self, m: Metric, v: Variant, key: &str) -> f64 {
        median(
            self.samples
                .get(&(m, v))
                .map(|s| {
                    s.iter()
                        .filter_map(|x| x.values.get(key).copied())
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    /// CPU seconds of the proxy processes of `v` per unit of work, from
    /// the median over rounds of the per-round ratio.
    fn cpu_per(&self, m: Metric, v: Variant, procs: &[&str], unit: &str) -> f64 {
        median(
            self.samples
                .get(&(m, v))
                .map(|s| {
                    s.iter()
                        .map(|x| {
                            let c: f64 = procs.iter().filter_map(|p| x.cpu.get(p)).sum();
                            c / x.values.get(unit).copied().unwrap_or(f64::NAN)
                        })
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    fn mesh_procs(v: Variant) -> &'static [&'static str] {
        match v {
            Variant::Hop => &["haproxy"],
            _ => &["agent", "waypoint"],
        }
    }

    fn json(&self) -> Value {
        let mut per = serde_json::Map::new();
        for ((m, v), s) in &self.samples {
            let rounds: Vec<Value> = s
                .iter()
                .map(|x| json!({"values": x.values, "cpu_s": x.cpu}))
                .collect();
            per.insert(format!("{}/{}", m.name(), v.name()), Value::Array(rounds));
        }
        json!({
            "samples": per,
            "rss_idle_mb": self.rss_idle,
            "rss_after_load_mb": self.rss_after,
            "rss_settled_mb": self.rss_settled,
            "held_connections": self.held,
            "held_kb_per_connection": self.held_rss.iter().map(|(v, x)| (v.name(), x.clone())).collect::<BTreeMap<_, _>>(),
        })
    }

    fn table(&self) -> String {
        use Metric::*;
        use Variant::*;
        let f = |x: f64, d: usize| {
            if x.is_finite() {
                format!("{x:.d$}")
            } else {
                "—".into()
            }
        };
        let ratio = |a: f64, b: f64| f(a / b, 2);
        let mut rows: Vec<[String; 8]> = Vec::new();
        let mut row = |name: &str, vals: [f64; 4], d: usize, target: String| {
            let [di, ho, sh, se] = vals;
            rows.push([
                name.into(),
                f(di, d),
                f(ho, d),
                f(sh, d),
                f(se, d),
                ratio(sh, di),
                ratio(sh, ho),
                target,
            ]);
        };
        let tp = |m| [Direct, Hop, Shunt, Seed].map(|v| self.value(m, v, "gbit_s"));
        let iperf1 = tp(Iperf1);
        row(
            "iperf3 1 stream, Gbit/s",
            iperf1,
            2,
            check(iperf1[2] / iperf1[0] >= 0.5, "≥0.5× direct"),
        );
        row("iperf3 4 streams, Gbit/s", tp(Iperf4), 2, String::new());
        let cpu_gb = |v| {
            median(vec![
                self.cpu_per(Iperf1, v, Self::mesh_procs(v), "gb"),
                self.cpu_per(Iperf4, v, Self::mesh_procs(v), "gb"),
            ])
        };
        let cg = [f64::NAN, cpu_gb(Hop), cpu_gb(Shunt), f64::NAN];
        row(
            "CPU-s per GB (iperf3), proxy processes",
            cg,
            3,
            check(cg[2] / cg[1] <= 3.5, "≤3.5× hop"),
        );
        let a = self.cpu_per(Iperf1, Shunt, &["agent"], "gb");
        let w = self.cpu_per(Iperf1, Shunt, &["waypoint"], "gb");
        row(
            "  of which agent / waypoint (1 stream)",
            [f64::NAN, f64::NAN, a, w],
            3,
            "(seed column: waypoint)".into(),
        );
        let lat = |k| [Direct, Hop, Shunt, Seed].map(|v| self.value(Sockperf, v, k));
        let p50 = lat("p50_us");
        row(
            "sockperf one-way P50, µs",
            p50,
            1,
            check(
                p50[2] - p50[0] <= 20.0,
                &format!("≤+20 µs (is +{:.1})", p50[2] - p50[0]),
            ),
        );
        row("sockperf one-way P99, µs", lat("p99_us"), 1, String::new());
        let c1 = [Direct, Hop, Shunt, Seed].map(|v| self.value(Conn1, v, "req_s"));
        row(
            "new connections/s, 1 client",
            c1,
            0,
            check(c1[2] / c1[0] >= 0.24, "≥0.24× direct"),
        );
        row(
            "new connections/s, 4 clients",
            [Direct, Hop, Shunt, Seed].map(|v| self.value(Conn4, v, "req_s")),
            0,
            String::new(),
        );
        row(
            "connection + request P50, 1 client, µs",
            [Direct, Hop, Shunt, Seed].map(|v| self.value(Conn1, v, "p50_us")),
            0,
            String::new(),
        );
        let cpu_conn = |v| {
            1e6 * median(vec![
                self.cpu_per(Conn1, v, Self::mesh_procs(v), "requests"),
                self.cpu_per(Conn4, v, Self::mesh_procs(v), "requests"),
            ])
        };
        let cc = [f64::NAN, cpu_conn(Hop), cpu_conn(Shunt), f64::NAN];
        row(
            "CPU µs per new connection, proxy processes",
            cc,
            0,
            check(cc[2] / cc[1] <= 3.0, "≤3× hop"),
        );
        let http = [Direct, Hop, Shunt, Seed].map(|v| self.value(Http, v, "req_s"));
        row(
            "HTTP GET keep-alive, 8 conns, req/s",
            http,
            0,
            check(
                http[3] / http[0] >= 0.24,
                &format!("seed ≥0.24× direct (is {:.2})", http[3] / http[0]),
            ),
        );
        let mb = |m: &BTreeMap<&str, f64>, v| -> f64 {
            Self::mesh_procs(v).iter().filter_map(|p| m.get(p)).sum()
        };
        row(
            "RSS idle, MB",
            [
                f64::NAN,
                mb(&self.rss_idle, Hop),
                mb(&self.rss_idle, Shunt),
                f64::NAN,
            ],
            1,
            String::new(),
        );
        let after = [
            f64::NAN,
            mb(&self.rss_after, Hop),
            mb(&self.rss_after, Shunt),
            f64::NAN,
        ];
        row(
            "RSS 2 s after load, MB",
            after,
            1,
            check(after[2] <= 25.0, "≤25 MB"),
        );
        let settled = [
            f64::NAN,
            mb(&self.rss_settled, Hop),
            mb(&self.rss_settled, Shunt),
            f64::NAN,
        ];
        row(
            &format!("RSS {SETTLE_SECS} s after load, MB"),
            settled,
            1,
            check(settled[2] <= 25.0, "≤25 MB"),
        );
        let held = |v| {
            self.held_rss
                .get(&v)
                .and_then(|x| x["total_kb"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let hk = [f64::NAN, held(Hop), held(Shunt), f64::NAN];
        row(
            &format!("RSS per held connection ({}), KB", self.held),
            hk,
            1,
            check(hk[2] <= 8.0, "≤8 KB"),
        );
        let mut s = String::from(
            "| | direct | hop (haproxy) | shunt (L4) | shunt + seed policy (L7) | shunt / direct | shunt / hop | target |\n|---|---|---|---|---|---|---|---|\n",
        );
        for r in rows {
            s.push_str(&format!("| {} |\n", r.join(" | ")));
        }
        s.push_str(&format!(
            "\nRSS {SETTLE_SECS} s after load by process, MB: agent {:.1}, waypoint {:.1}, haproxy {:.1} (idle: {:.1}, {:.1}, {:.1}).\n",
            self.rss_settled.get("agent").unwrap_or(&0.0),
            self.rss_settled.get("waypoint").unwrap_or(&0.0),
            self.rss_settled.get("haproxy").unwrap_or(&0.0),
            self.rss_idle.get("agent").unwrap_or(&0.0),
            self.rss_idle.get("waypoint").unwrap_or(&0.0),
            self.rss_idle.get("haproxy").unwrap_or(&0.0),
        ));
        s.push_str(&format!(
            "Of which anonymous (heap, stacks; the rest is the binary's pages): agent {:.1}, waypoint {:.1}, haproxy {:.1} (idle: {:.1}, {:.1}, {:.1}).\n",
            self.rss_settled.get("agent_anon").unwrap_or(&0.0),
            self.rss_settled.get("waypoint_anon").unwrap_or(&0.0),
            self.rss_settled.get("haproxy_anon").unwrap_or(&0.0),
            self.rss_idle.get("agent_anon").unwrap_or(&0.0),
            self.rss_idle.get("waypoint_anon").unwrap_or(&0.0),
            self.rss_idle.get("haproxy_anon").unwrap_or(&0.0),
        ));
        let pss = |k: &str| *self.rss_settled.get(k).unwrap_or(&0.0);
        s.push_str(&format!(
            "PSS (shared pages counted by share: agent and waypoint map one binary) {SETTLE_SECS} s after load, MB: agent {:.1} + waypoint {:.1} = {:.1}, haproxy {:.1}.\n",
            pss("agent_pss"),
            pss("waypoint_pss"),
            pss("agent_pss") + pss("waypoint_pss"),
            pss("haproxy_pss"),
        ));
        s
    }
}

fn check(ok: bool, what: &str) -> String {
    format!("{} {what}", if ok { "✅" } else { "❌" })
}

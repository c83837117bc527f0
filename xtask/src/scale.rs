//! `cargo xtask scale [N]`: the control plane at scale (issue #14): N
//! ServiceEntries (default 100,000) through the real release agent (in its
//! own node namespace, real kernel maps) and the real waypoint.
//!
//! One run measures, in this order:
//! 1. *cold*: the agent started on an empty state directory with the N
//!    entries in its config directory, until it applied them (the
//!    `agent capturing` line, written once the config is in the maps), and
//!    then the waypoint until its routes are built;
//! 2. RSS of both with the N entries;
//! 3. per-connect kernel cost with N entries: a connect loop from an
//!    enrolled pod to a VIP, with the kernel's run time per program run
//!    (`bpf_stats_enabled`) of `connect4` and `sk_lookup`;
//! 4. *one edit*: one entry in one of the big files gets another port; the
//!    agent's own timings (read + parse, apply) and, from the file's
//!    rename, the moment a connect to the new VIP:port succeeds (this
//!    includes the directory poll interval, 300 ms);
//! 5. *removal*: the N entries' files deleted; time to apply, RSS after;
//! 6. per-connect kernel cost with the few entries left (same processes).
//!
//! The generated entries are mixed like a real registry: DNS (most), STATIC
//! with an endpoint, DNS with two hosts, DNS_ROUND_ROBIN, DYNAMIC_DNS
//! wildcards, explicit addresses for some; one or two ports; about a third
//! bound to the seed's waypoint by label; spread over 100 namespaces; in
//! files of `--per-file` entries. The seed's namespace, waypoint, HTTP
//! entry and policy are there too. Prints a markdown table against the
//! targets and writes JSON under `target/bench/`. The config is
//! `scale_config`'s (shared with the in-process stage harness).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, ensure, Context as _, Result};
use serde_json::{json, Value};
use shunt_testbed::{wait_for, Node, Proc};

use crate::scale_config::{
    self as gen, base_files, entry, file_name, file_text, Edit, EDIT_PORT, PROBE_PORT, WAYPOINT,
    WAYPOINT_NS,
};

/// `cargo xtask scale` options.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// ServiceEntries to generate.
    #[arg(default_value_t = 100_000)]
    n: usize,
    /// Entries per generated file.
    #[arg(long, default_value_t = 1000)]
    per_file: usize,
    /// Connects per per-connect measurement.
    #[arg(long, default_value_t = 20_000)]
    connects: usize,
    /// Skip `cargo build --release` (binary already built).
    #[arg(long)]
    no_build: bool,
    /// Measure this `shunt` binary instead of the release build (implies
    /// `--no-build`).
    #[arg(long)]
    shunt_bin: Option<PathBuf>,
    /// Record a CPU profile (`perf record -e cpu-clock -g`) of the agent and
    /// the waypoint from cold start to the end of the edit; data and a flat
    /// report land in target/bench/.
    #[arg(long)]
    perf: bool,
    /// Internal: connect `--count` times to ADDR (run in the client pod).
    #[arg(long, hide = true)]
    connect: Option<SocketAddr>,
    #[arg(long, hide = true, default_value_t = 20_000)]
    count: usize,
    /// Internal: retry connecting to ADDR until it succeeds; prints the
    /// unix time in µs of the first success.
    #[arg(long, hide = true)]
    until: Option<SocketAddr>,
    /// Internal: accept and drain connections on ADDR until killed.
    #[arg(long, hide = true)]
    sink: Option<SocketAddr>,
    /// Only write the generated config into DIR (for profiling `shunt
    /// config check` and the like), then exit.
    #[arg(long)]
    generate: Option<PathBuf>,
}

/// Targets of issue #14 (control plane at scale).
const COLD_TARGET_S: f64 = 2.0;
const EDIT_TARGET_MS: f64 = 100.0;
const RSS_TARGET_MB: f64 = 200.0;
/// How long memory is left to settle (the agent trims every 5 s).
const SETTLE: Duration = Duration::from_secs(7);

pub fn run(root: &Path, a: Args) -> Result<()> {
    if let Some(addr) = a.connect {
        return connect_loop(addr, a.count);
    }
    if let Some(addr) = a.until {
        return until(addr);
    }
    if let Some(addr) = a.sink {
        return sink(addr);
    }
    if let Some(dir) = &a.generate {
        return gen::write_all(dir, a.n, a.per_file);
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    ensure!(
        euid == 0,
        "the scale benchmark creates network namespaces and loads kernel programs: run it as root"
    );
    ensure!(a.n >= 2 && a.per_file >= 1, "need at least 2 entries");
    let target = crate::bench::target_dir(root);
    let shunt = crate::bench::release_shunt(&target, a.no_build, a.shunt_bin.as_deref())?;
    ensure!(shunt.exists(), "{} missing", shunt.display());
    ensure!(
        Command::new("bpftool").arg("version").output().is_ok(),
        "bpftool not found: run scripts/setup.sh"
    );
    let out_dir = target.join("bench");
    std::fs::create_dir_all(&out_dir)?;
    let stats_before = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled")
        .unwrap_or_else(|_| "0".into());
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1")
        .context("enabling bpf_stats_enabled")?;
    let res = measure(&a, &shunt, &out_dir);
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", stats_before.trim());
    let report = res?;
    let file = out_dir.join(format!("scale-{}.json", unix_us() / 1_000_000));
    let text = serde_json::to_string_pretty(&report)?;
    std::fs::write(&file, &text)?;
    std::fs::write(out_dir.join("scale-latest.json"), &text)?;
    println!("{}", report["table"].as_str().unwrap_or_default());
    println!("JSON: {}", file.display());
    Ok(())
}

fn write_base(node: &Node, inet_ip: &str, wp_ip: &str) -> Result<()> {
    let app = node.pod("app");
    let files = base_files(
        &app.ip4,
        inet_ip,
        wp_ip,
        &app.cgroup.path.display().to_string(),
    )?;
    for (name, text) in files {
        node.write_config(name, &text)?;
    }
    Ok(())
}

/// One timed line of a process's log (the tracing timestamp, unix µs).
fn log_lines(log: &Path, what: &str) -> Vec<(u64, String)> {
    shunt_testbed::read_lossy(log)
        .lines()
        .filter(|l| l.contains(what))
        .filter_map(|l| Some((log_time_us(l)?, l.to_string())))
        .collect()
}

/// `2026-12-01T15:04:05.123456Z ...` → unix µs.
fn log_time_us(line: &str) -> Option<u64> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, dd) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, s) = (t.next()??, t.next()??, t.next()??);
    let us: i64 = format!("{frac:0<6}")[..6].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + dd - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((((days * 24 + h) * 60 + mi) * 60 + s) as u64 * 1_000_000 + us as u64)
}

/// `key=value` from a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    let pat = format!("{key}=");
    let rest = &line[line.find(&pat)? + pat.len()..];
    rest.split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// VmRSS in MB.
fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// The first child of `pid` (the profiled process under `perf record`).
fn child_of(pid: u32) -> Option<u32> {
    let c = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    c.split_whitespace().next()?.parse().ok()
}

/// Id of the program attached through a link pin.
fn prog_id(link: &Path) -> Result<u64> {
    let out = Command::new("bpftool")
        .args(["link", "show", "pinned"])
        .arg(link)
        .arg("--json")
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bpftool link show {}", link.display()))?;
    v["prog_id"].as_u64().context("no prog_id")
}

/// (run_time_ns, run_cnt) of a program.
fn prog_stats(id: u64) -> Result<(u64, u64)> {
    let out = Command::new("bpftool")
        .args(["prog", "show", "id", &id.to_string(), "--json"])
        .output()?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok((
        v["run_time_ns"].as_u64().unwrap_or(0),
        v["run_cnt"].as_u64().unwrap_or(0),
    ))
}

struct Bed {
    node: Node,
    shunt: PathBuf,
    xtask: PathBuf,
    agent_pid: u32,
    waypoint: Option<Proc>,
    waypoint_pid: u32,
    wlog: PathBuf,
    _sink: Proc,
    progs: Vec<(&'static str, u64)>,
    probe: SocketAddr,
}

impl Bed {
    fn agent_log(&self) -> PathBuf {
        self.node.agents[0].log.clone()
    }

    /// A command in the client pod; its stdout.
    fn app(&self, args: &[&str]) -> Result<String> {
        let out = self
            .node
            .pod("app")
            .enter()
            .command(&self.xtask)
            .args(["scale"])
            .args(args)
            .output()?;
        ensure!(
            out.status.success(),
            "xtask scale {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Connect rate and kernel ns per program run over `n` connects.
    fn per_connect(&self, n: usize) -> Result<Value> {
        // Warm-up (caches, the agent's accept path).
        self.app(&["--connect", &self.probe.to_string(), "--count", "2000"])?;
        let before: Vec<(u64, u64)> = self
            .progs
            .iter()
            .map(|(_, id)| prog_stats(*id))
            .collect::<Result<_>>()?;
        let out = self.app(&[
            "--connect",
            &self.probe.to_string(),
            "--count",
            &n.to_string(),
        ])?;
        let rate = field(&out, "rate").unwrap_or(f64::NAN);
        let refused = field(&out, "refused").unwrap_or(f64::NAN);
        let mut v = json!({ "connects": n, "connects_per_s": rate, "refused": refused });
        for ((name, id), (t0, c0)) in self.progs.iter().zip(before) {
            let (t1, c1) = prog_stats(*id)?;
            let runs = c1.saturating_sub(c0);
            v[*name] = json!({
                "runs": runs,
                "ns_per_run": (t1.saturating_sub(t0)) as f64 / runs.max(1) as f64,
            });
        }
        Ok(v)
    }

    /// The first address of an entry (`shunt get`), as ip:port.
    fn vip_of(&self, ns: &str, name: &str, port: u16) -> Result<SocketAddr> {
        let cfg = self.node.config_dir().display().to_string();
        let state = self.node.state_dir.display().to_string();
        let out = Command::new(&self.shunt)
            .args(["get", "se", name, "-n", ns, "-o", "json"])
            .args(["--config-dir", &cfg, "--state-dir", &state])
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("shunt get se {ns}/{name}"))?;
        let obj = match &v {
            Value::Array(a) => a.first().context("no entry")?,
            Value::Object(o) if o.contains_key("items") => o["items"]
                .as_array()
                .and_then(|a| a.first())
                .context("no entry")?,
            o => o,
        };
        let addrs = obj["status"]["addresses"]
            .as_array()
            .context("no status.addresses")?;
        let ip = addrs
            .iter()
            .filter_map(|a| a["value"].as_str())
            .find(|s| s.contains('.'))
            .context("no IPv4 address")?;
        Ok(SocketAddr::new(ip.parse()?, port))
    }

    /// Waits until `log` has more than `before` lines containing `what`
    /// (and, if given, one containing `also`); the newest such line.
    fn wait_line(
        log: &Path,
        what: &str,
        before: usize,
        also: Option<&str>,
        timeout: Duration,
    ) -> Result<(u64, String)> {
        wait_for(what, timeout, || {
            let l = log_lines(log, what);
            (l.len() > before)
                .then(|| {
                    l.into_iter()
                        .skip(before)
                        .rfind(|(_, x)| also.is_none_or(|a| x.contains(a)))
                })
                .flatten()
        })
        .with_context(|| format!("log {}:\n{}", log.display(), shunt_testbed::tail(log, 15)))
    }
}

/// How many reload lines the agent's and the waypoint's logs had before a
/// config change, so that the lines the change adds can be waited for.
struct Marks {
    applied: usize,
    loaded: usize,
    waypoint_applied: usize,
}

/// The reload lines of one config change.
struct Reloaded {
    /// Time (unix µs) and line of the agent's `config applied`.
    agent_applied: (u64, String),
    agent_loaded: String,
    /// Time (unix µs) of the waypoint's `waypoint config applied`.
    waypoint_applied: u64,
    waypoint_line: String,
}

impl Marks {
    fn take(alog: &Path, wlog: &Path) -> Marks {
        Marks {
            applied: log_lines(alog, "config applied").len(),
            loaded: log_lines(alog, "config loaded").len(),
            waypoint_applied: log_lines(wlog, "waypoint config applied").len(),
        }
    }

    /// Waits for the agent to load and apply the change and the waypoint
    /// to apply it.
    fn wait(&self, alog: &Path, wlog: &Path) -> Result<Reloaded> {
        let long = Duration::from_secs(300);
        let agent_applied = Bed::wait_line(alog, "config applied", self.applied, None, long)?;
        let (_, agent_loaded) = Bed::wait_line(
            alog,
            "config loaded",
            self.loaded,
            None,
            Duration::from_secs(5),
        )?;
        let (waypoint_applied, waypoint_line) = Bed::wait_line(
            wlog,
            "waypoint config applied",
            self.waypoint_applied,
            None,
            long,
        )?;
        Ok(Reloaded {
            agent_applied,
            agent_loaded,
            waypoint_applied,
            waypoint_line,
        })
    }
}

impl Reloaded {
    /// Parse and apply times, and each process's delay from the write at
    /// `written` (unix µs).
    fn figures(&self, written: u64) -> Value {
        let (ta, applied) = &self.agent_applied;
        json!({
            "agent_parse_ms": field(&self.agent_loaded, "took_ms"),
            "agent_apply_ms": field(applied, "took_ms"),
            "agent_write_to_applied_ms": (ta.saturating_sub(written)) as f64 / 1e3,
            "waypoint_write_to_applied_ms": (self.waypoint_applied.saturating_sub(written)) as f64 / 1e3,
            "agent_line": applied,
        })
    }
}

fn measure(a: &Args, shunt: &Path, out_dir: &Path) -> Result<Value> {
    let t_run = Instant::now();
    let mut node = Node::new()?;
    node.add_pod("app")?;
    node.add_pod("wp")?;
    node.add_pod("inet")?;
    node.enable_forwarding()?;
    let (wp_ip, inet_ip) = (node.pod("wp").ip4.clone(), node.pod("inet").ip4.clone());
    let ca = node.work_dir.join("ca");
    let out = Command::new(shunt)
        .args(["ca", "init", "--ca-dir", &ca.display().to_string()])
        .output()?;
    ensure!(
        out.status.success(),
        "shunt ca init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    write_base(&node, &inet_ip, &wp_ip)?;
    let files = a.n.div_ceil(a.per_file);
    let t = Instant::now();
    let mut bytes = 0;
    for f in 0..files {
        let text = file_text(f, a.per_file, a.n, None);
        bytes += text.len();
        node.write_config(&file_name(f), &text)?;
    }
    eprintln!(
        "[scale] {} entries in {files} files ({:.1} MB) written in {:.1} s",
        a.n,
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let xtask = std::env::current_exe()?;
    let sink = node.pod("inet").spawn(
        &xtask,
        &["scale", "--sink", &format!("{inet_ip}:{PROBE_PORT}")],
        &node.work_dir.join("sink.log"),
    )?;
    let (cfg, ca_s, state) = (
        node.config_dir().display().to_string(),
        ca.display().to_string(),
        node.state_dir.display().to_string(),
    );

    // 1. Cold: agent, then waypoint.
    eprintln!("[scale] cold start of the agent");
    let perf_data = |who: &str| out_dir.join(format!("scale-perf-{who}.data"));
    let (program, mut leading): (PathBuf, Vec<String>) = if a.perf {
        (
            PathBuf::from("perf"),
            vec![
                "record".into(),
                "-q".into(),
                "-e".into(),
                "cpu-clock".into(),
                "-F".into(),
                "1000".into(),
                "-g".into(),
                "-o".into(),
                perf_data("agent").display().to_string(),
                "--".into(),
                shunt.display().to_string(),
            ],
        )
    } else {
        (shunt.to_path_buf(), vec![])
    };
    leading.push("agent".into());
    let leading: Vec<&str> = leading.iter().map(String::as_str).collect();
    let t0 = unix_us();
    // Not `Node::start_agent`: its 30 s wait is short for a cold start
    // at this scale on a loaded machine.
    let alog = node.work_dir.join("agent-0.log");
    let mut cmd = Command::new(&program);
    cmd.args(&leading).args(node.agent_args()).args([
        "--config-dir",
        &cfg,
        "--ca-dir",
        &ca_s,
        "--no-dns",
    ]);
    node.agents.push(Proc::spawn("agent-0", cmd, &alog)?);
    let (t_capturing, _) =
        Bed::wait_line(&alog, "agent capturing", 0, None, Duration::from_secs(600))?;
    let (t_applied, applied) =
        Bed::wait_line(&alog, "config applied", 0, None, Duration::from_secs(5))?;
    let (_, loaded) = Bed::wait_line(&alog, "config loaded", 0, None, Duration::from_secs(5))?;
    let agent_pid = if a.perf {
        wait_for("the profiled agent", Duration::from_secs(5), || {
            child_of(node.agents[0].pid())
        })?
    } else {
        node.agents[0].pid()
    };
    let cold_agent_s = (t_capturing.max(t_applied) - t0) as f64 / 1e6;
    eprintln!("[scale] agent: applied after {cold_agent_s:.2} s: {applied}");
    // With SHUNT_LOG=info,shunt_agent::reconcile=debug in the environment.
    if let Some((_, l)) = log_lines(&alog, "config apply stages").first() {
        eprintln!("[scale] agent: {l}");
    }

    eprintln!("[scale] cold start of the waypoint");
    let wlog = node.work_dir.join("waypoint.log");
    let mut wargs: Vec<String> = Vec::new();
    let wprog = if a.perf {
        wargs.extend(
            ["record", "-q", "-e", "cpu-clock", "-F", "1000", "-g", "-o"].map(String::from),
        );
        wargs.push(perf_data("waypoint").display().to_string());
        wargs.push("--".into());
        wargs.push(shunt.display().to_string());
        PathBuf::from("perf")
    } else {
        shunt.to_path_buf()
    };
    wargs.extend(
        [
            "waypoint",
            "--config-dir",
            &cfg,
            "--state-dir",
            &state,
            "--ca-dir",
            &ca_s,
            "--name",
            WAYPOINT,
            "--namespace",
            WAYPOINT_NS,
        ]
        .map(String::from),
    );
    let w0 = unix_us();
    let wref: Vec<&str> = wargs.iter().map(String::as_str).collect();
    let waypoint = node.pod("wp").spawn(&wprog, &wref, &wlog)?;
    let (w_ready, wline) =
        Bed::wait_line(&wlog, "waypoint ready", 0, None, Duration::from_secs(600))?;
    let waypoint_pid = if a.perf {
        wait_for("the profiled waypoint", Duration::from_secs(5), || {
            child_of(waypoint.pid())
        })?
    } else {
        waypoint.pid()
    };
    let cold_waypoint_s = (w_ready - w0) as f64 / 1e6;
    eprintln!("[scale] waypoint: ready after {cold_waypoint_s:.2} s: {wline}");

    let mut progs = Vec::new();
    for name in ["shunt_connect4", "shunt_sk_lookup"] {
        progs.push((name, prog_id(&node.pin_dir.join(format!("link_{name}")))?));
    }
    let mut bed = Bed {
        node,
        shunt: shunt.to_path_buf(),
        xtask,
        agent_pid,
        waypoint: Some(waypoint),
        waypoint_pid,
        wlog,
        _sink: sink,
        progs,
        probe: "0.0.0.0:0".parse()?,
    };
    bed.probe = bed.vip_of("default", "scale-probe", PROBE_PORT)?;

    // 2. Memory with N.
    std::thread::sleep(SETTLE);
    let rss_n = (rss_mb(bed.agent_pid), rss_mb(bed.waypoint_pid));
    eprintln!(
        "[scale] RSS with {} entries: agent {:.1} MB, waypoint {:.1} MB",
        a.n, rss_n.0, rss_n.1
    );

    // 3. Per-connect with N.
    eprintln!("[scale] per-connect cost with {} entries", a.n);
    let conn_n = bed.per_connect(a.connects)?;
    eprintln!("[scale] per-connect with {} entries: {conn_n}", a.n);

    // 4. One edit in the middle of the big files.
    let ei = (a.n / 2) / 10 * 10 + 3; // a DNS entry
    let e = entry(ei, None);
    let edit_vip = bed.vip_of(&e.ns, &e.name, EDIT_PORT)?;
    eprintln!(
        "[scale] one edit: {}/{} gets port {EDIT_PORT} ({edit_vip})",
        e.ns, e.name
    );
    let alog = bed.agent_log();
    let marks = Marks::take(&alog, &bed.wlog);
    let poller = bed
        .node
        .pod("app")
        .enter()
        .command(&bed.xtask)
        .args(["scale", "--until", &edit_vip.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(300));
    let f = ei / a.per_file;
    let text = file_text(f, a.per_file, a.n, Some((ei, Edit::Port)));
    let tw = unix_us();
    bed.node.write_config(&file_name(f), &text)?;
    let out = poller.wait_with_output()?;
    let t_ok: u64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    let r = marks.wait(&alog, &bed.wlog)?;
    let mut edit = r.figures(tw);
    edit["write_to_connect_ms"] = json!((t_ok.saturating_sub(tw)) as f64 / 1e3);
    edit["waypoint_line"] = json!(r.waypoint_line);
    eprintln!("[scale] edit: {edit}");
    let rss_edit = (rss_mb(bed.agent_pid), rss_mb(bed.waypoint_pid));
    if a.perf {
        // Stop the profiles here: SIGINT to perf writes its data.
        for pid in [
            bed.node.agents[0].pid(),
            bed.waypoint.as_ref().map_or(0, |w| w.pid()),
        ] {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(pid as i32, libc::SIGINT) };
        }
        std::thread::sleep(Duration::from_secs(3));
        for who in ["agent", "waypoint"] {
            let data = perf_data(who);
            let rep = Command::new("perf")
                .args([
                    "report",
                    "--stdio",
                    "--no-children",
                    "--sort",
                    "dso,sym",
                    "-i",
                ])
                .arg(&data)
                .output()?;
            std::fs::write(data.with_extension("txt"), &rep.stdout)?;
            eprintln!("[scale] profile: {}", data.with_extension("txt").display());
        }
        bail!("--perf stops after the edit (the profiled processes are gone)");
    }

    // 5. Removal.
    eprintln!("[scale] removing the {} entries", a.n);
    let marks = Marks::take(&alog, &bed.wlog);
    let tr = unix_us();
    for f in 0..files {
        bed.node.remove_config(&file_name(f))?;
    }
    let removal = marks.wait(&alog, &bed.wlog)?.figures(tr);
    eprintln!("[scale] removal: {removal}");
    std::thread::sleep(SETTLE);
    let rss_removed = (rss_mb(bed.agent_pid), rss_mb(bed.waypoint_pid));
    eprintln!(
        "[scale] RSS after removal: agent {:.1} MB, waypoint {:.1} MB",
        rss_removed.0, rss_removed.1
    );

    // 6. Per-connect with few.
    eprintln!("[scale] per-connect cost with the few entries left");
    let conn_few = bed.per_connect(a.connects)?;
    eprintln!("[scale] per-connect with few entries: {conn_few}");
    bed.node.agents[0].alive()?;
    if let Some(w) = bed.waypoint.as_mut() {
        w.alive()?;
    }

    let ns_run = |v: &Value, p: &str| v[p]["ns_per_run"].as_f64().unwrap_or(f64::NAN);
    let rate = |v: &Value| v["connects_per_s"].as_f64().unwrap_or(f64::NAN);
    let edit_ms = edit["agent_parse_ms"].as_f64().unwrap_or(f64::NAN)
        + edit["agent_apply_ms"].as_f64().unwrap_or(f64::NAN);
    let mut t = String::new();
    t.push_str(&format!(
        "Control plane at scale: {} ServiceEntries ({files} files), shunt {}\n\n",
        a.n,
        shunt.display()
    ));
    t.push_str("| | value | target | value / target |\n|---|---|---|---|\n");
    let row = |t: &mut String, what: &str, v: f64, target: f64, unit: &str| {
        t.push_str(&format!(
            "| {what} | {v:.2} {unit} | ≤ {target} {unit} | {:.2} {} |\n",
            v / target,
            if v <= target { "✓" } else { "✗" }
        ));
    };
    row(
        &mut t,
        "agent cold start → config applied (capturing)",
        cold_agent_s,
        COLD_TARGET_S,
        "s",
    );
    t.push_str(&format!(
        "| agent: read + parse / apply (its own timings) | {} / {} ms | | |\n",
        field(&loaded, "took_ms").map_or("?".into(), |x| format!("{x:.0}")),
        field(&applied, "took_ms").map_or("?".into(), |x| format!("{x:.0}")),
    ));
    row(
        &mut t,
        "waypoint cold start → routes built",
        cold_waypoint_s,
        COLD_TARGET_S,
        "s",
    );
    row(
        &mut t,
        "one edit: agent read + parse + apply",
        edit_ms,
        EDIT_TARGET_MS,
        "ms",
    );
    t.push_str(&format!(
        "| one edit: file renamed → agent applied (the watcher woken by inotify) | {:.0} ms | | |\n",
        edit["agent_write_to_applied_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)
    ));
    t.push_str(&format!(
        "| one edit: file renamed → connect to the new port succeeds (the watcher woken by inotify) | {:.0} ms | | |\n",
        edit["write_to_connect_ms"].as_f64().unwrap_or(f64::NAN)
    ));
    t.push_str(&format!(
        "| one edit: file renamed → waypoint applied | {:.0} ms | | |\n",
        edit["waypoint_write_to_applied_ms"]
            .as_f64()
            .unwrap_or(f64::NAN)
    ));
    row(
        &mut t,
        &format!("agent RSS with {} entries", a.n),
        rss_n.0,
        RSS_TARGET_MB,
        "MB",
    );
    row(
        &mut t,
        &format!("waypoint RSS with {} entries", a.n),
        rss_n.1,
        RSS_TARGET_MB,
        "MB",
    );
    t.push_str(&format!(
        "| RSS after removing them, agent / waypoint | {:.1} / {:.1} MB | | |\n",
        rss_removed.0, rss_removed.1
    ));
    t.push_str(&format!(
        "| removal: agent read + parse / apply | {} / {} ms | | |\n",
        removal["agent_parse_ms"]
            .as_f64()
            .map_or("?".into(), |x| format!("{x:.0}")),
        removal["agent_apply_ms"]
            .as_f64()
            .map_or("?".into(), |x| format!("{x:.0}")),
    ));
    for p in ["shunt_connect4", "shunt_sk_lookup"] {
        let (few, many) = (ns_run(&conn_few, p), ns_run(&conn_n, p));
        t.push_str(&format!(
            "| {p} ns per run, few / {} entries | {few:.0} / {many:.0} | unchanged | {:.2} |\n",
            a.n,
            many / few
        ));
    }
    t.push_str(&format!(
        "| connects/s to a VIP, few / {} entries | {:.0} / {:.0} | unchanged | {:.2} |\n",
        a.n,
        rate(&conn_few),
        rate(&conn_n),
        rate(&conn_n) / rate(&conn_few)
    ));
    Ok(json!({
        "n": a.n,
        "files": files,
        "bytes": bytes,
        "shunt": shunt.display().to_string(),
        "loadavg": std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim(),
        "elapsed_s": t_run.elapsed().as_secs(),
        "cold": {
            "agent_s": cold_agent_s,
            "agent_parse_ms": field(&loaded, "took_ms"),
            "agent_apply_ms": field(&applied, "took_ms"),
            "agent_line": applied,
            "waypoint_s": cold_waypoint_s,
            "waypoint_line": wline,
        },
        "edit": edit,
        "removal": removal,
        "rss_mb": {
            "with_n": {"agent": rss_n.0, "waypoint": rss_n.1},
            "after_edit": {"agent": rss_edit.0, "waypoint": rss_edit.1},
            "after_removal": {"agent": rss_removed.0, "waypoint": rss_removed.1},
        },
        "per_connect": {"with_n": conn_n, "few": conn_few},
        "table": t,
    }))
}

/// Hidden `--connect`: `n` sequential connect + close; prints the rate.
fn connect_loop(addr: SocketAddr, n: usize) -> Result<()> {
    // Many short connections from one client: reuse TIME_WAIT ports (this
    // pod's namespace only).
    let _ = std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000");
    let _ = std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1");
    let t = Instant::now();
    // Faster than the mesh carries them: the agent's per-pod budget of
    // connections in flight refuses some with RST. The kernel programs ran
    // for those too (what this measures); they are counted, not fatal.
    let mut refused = 0usize;
    for i in 0..n {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                refused += 1
            }
            Err(e) => return Err(e).with_context(|| format!("connect {i} to {addr}")),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "connects={n} refused={refused} secs={secs:.3} rate={:.0}",
        n as f64 / secs
    );
    Ok(())
}

/// Hidden `--until`: connect attempts until one succeeds.
fn until(addr: SocketAddr) -> Result<()> {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            println!("{}", unix_us());
            return Ok(());
        }
        if Instant::now() > end {
            bail!("{addr} never accepted");
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Hidden `--sink`: accept, read to EOF, close.
fn sink(addr: SocketAddr) -> Result<()> {
    let l = TcpListener::bind(addr)?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let mut b = [0u8; 512];
            while matches!(s.read(&mut b), Ok(n) if n > 0) {}
            let _ = s.flush();
        });
    }
    Ok(())
}

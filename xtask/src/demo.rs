//! `cargo xtask demo [--check]`: the seed's egress story
//! (`examples/egress/`, step by step) on this machine, in network namespaces.
//!
//! Topology (every name starts with `shunt-demo`):
//!
//! ```text
//!  shunt-demo-curl   10.244.1.19 ─┐                      ┌─ shunt-demo-internet
//!  shunt-demo-admin  10.244.1.20 ─┤  shunt-demo-node     │   203.0.113.10 nginx (httpbin.org :80, :443)
//!  shunt-demo-waypoint 10.244.1.18┤  (agent, VIP routes, ├─  203.0.113.53 dnsmasq
//!                                 └─ DNS proxy)  ────────┘
//! ```
//!
//! Every namespace has one veth to the node (`to-NAME` on the node side) and
//! a default route via 169.254.1.1, which the node owns on its loopback.
//! Pods are also cgroups under `<cgroup2>/shunt-demo`, the agent's cgroup
//! root; the WorkloadEntries of `examples/egress/00-curl.yaml` name them
//! (`shunt.io/cgroup: shunt/curl`). Pods resolve through 10.96.0.10, where
//! nothing listens: only the agent's DNS capture makes names work.
//!
//! Every check is an observation (a command's output, a log line, an
//! upstream's own log). Namespaces, veths, cgroups, pins and processes are
//! `shunt-testbed` guards: everything is removed on exit, on failure, on a
//! panic and on Ctrl-C, and leftovers of an interrupted (killed) run are
//! adopted and removed at the start.

use std::{
    fmt::Write as _,
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use shunt_testbed::{cgroup2_mount, read_lossy, seed, Cgroup, Netns, PinDir, Proc, Veth, WorkDir};

// ---------------------------------------------------------------------------
// Topology, as data.

const PREFIX: &str = "shunt-demo";
/// The pods' default gateway: an address of the node (on its loopback), so
/// the node answers ARP for it on every veth.
const GATEWAY: &str = "169.254.1.1";
/// The node's own source address towards pods, waypoint and internet.
const NODE_ADDR: &str = "10.244.1.1";
const HTTPBIN_IP: &str = "203.0.113.10";
const PUBLIC_DNS: &str = "203.0.113.53";
/// What pods' resolv.conf names; nothing listens there.
const CLUSTER_DNS: &str = "10.96.0.10";
const DNS_PROXY4: &str = "169.254.20.10";
const DNS_PROXY6: &str = "fd00:5353::10";
const WAYPOINT_NAME: &str = "egress-gateway";
const WAYPOINT_NS: &str = "common-infrastructure";
const HBONE_PORT: u16 = 15008;

struct Ns {
    /// Short name; the namespace is `shunt-demo-<name>`.
    name: &'static str,
    /// /32 addresses on its eth0.
    addrs: &'static [&'static str],
    /// cgroup relative to the agent's cgroup root (pods only).
    cgroup: Option<&'static str>,
    /// Files for /etc/netns/<ns>/, bind-mounted over /etc for every process
    /// started in the namespace (as `ip netns exec` does).
    etc: &'static [(&'static str, &'static str)],
}

const POD_RESOLV: &str = "nameserver 10.96.0.10\n";
const CURL: Ns = Ns {
    name: "curl",
    addrs: &["10.244.1.19"],
    cgroup: Some("shunt/curl"),
    etc: &[("resolv.conf", POD_RESOLV)],
};
const ADMIN: Ns = Ns {
    name: "admin",
    addrs: &["10.244.1.20"],
    cgroup: Some("shunt/admin"),
    etc: &[("resolv.conf", POD_RESOLV)],
};
/// The waypoint resolves httpbin.org (resolution: DNS) like any host on the
/// internet would: hosts file and the public DNS.
const WAYPOINT: Ns = Ns {
    name: "waypoint",
    addrs: &["10.244.1.18"],
    cgroup: None,
    etc: &[
        ("resolv.conf", "nameserver 203.0.113.53\n"),
        ("hosts", "127.0.0.1 localhost\n203.0.113.10 httpbin.org\n"),
    ],
};
const INTERNET: Ns = Ns {
    name: "internet",
    addrs: &[HTTPBIN_IP, PUBLIC_DNS],
    cgroup: None,
    etc: &[],
};
const NAMESPACES: [&Ns; 4] = [&CURL, &ADMIN, &WAYPOINT, &INTERNET];
/// The node: the agent's namespace, the pods' gateway (addresses on its
/// loopback, not on a veth).
const NODE: Ns = Ns {
    name: "node",
    addrs: &[GATEWAY, NODE_ADDR],
    cgroup: None,
    etc: &[],
};

fn netns(ns: &Ns) -> String {
    format!("{PREFIX}-{}", ns.name)
}

/// Deadline for anything that waits on a config reload, a process start or
/// a log line. Generous: the machine is shared.
const DEADLINE: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Ctrl-C: a flag every wait polls; children run in their own process group
// so that the terminal's SIGINT reaches only us and we stop them in order.

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

fn interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn sleep(d: Duration) -> Result<()> {
    let end = Instant::now() + d;
    while Instant::now() < end {
        interrupted()?;
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    interrupted()
}

// ---------------------------------------------------------------------------
// Paths.

struct Paths {
    root: PathBuf,
    shunt: PathBuf,
    /// Logs, config, state, CA: `target/shunt-demo/` (kept after the run for
    /// reading; emptied at the next start).
    work: PathBuf,
    config: PathBuf,
    staging: PathBuf,
    state: PathBuf,
    mesh_ca: PathBuf,
    pki: PathBuf,
    logs: PathBuf,
    pin_dir: PathBuf,
    cgroup_root: PathBuf,
}

impl Paths {
    fn new(root: &Path) -> Result<Self> {
        let work = root.join("target").join(PREFIX);
        let cg2 = cgroup2_mount().context("the demo needs cgroup v2")?;
        Ok(Self {
            root: root.to_path_buf(),
            shunt: root.join("target/debug/shunt"),
            config: work.join("config"),
            staging: work.join("staging"),
            state: work.join("state"),
            mesh_ca: work.join("mesh-ca"),
            pki: work.join("pki"),
            logs: work.join("logs"),
            work,
            pin_dir: PathBuf::from("/sys/fs/bpf").join(PREFIX),
            cgroup_root: cg2.join(PREFIX),
        })
    }
    fn cgroup(&self, ns: &Ns) -> Option<PathBuf> {
        ns.cgroup.map(|c| self.cgroup_root.join(c))
    }
    fn log(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }
    fn asset(&self, name: &str) -> PathBuf {
        self.root.join("xtask/demo").join(name)
    }
    fn example(&self, name: &str) -> PathBuf {
        seed::path(name)
    }
}

// ---------------------------------------------------------------------------
// Commands.

/// How a command line is shown: arguments with spaces or quotes get quoted.
fn display(cmd: &Command) -> String {
    let mut s = String::new();
    for (k, v) in cmd.get_envs() {
        if let Some(v) = v {
            let _ = write!(
                s,
                "{}={} ",
                k.to_string_lossy(),
                quote(&v.to_string_lossy())
            );
        }
    }
    s.push_str(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

/// A command as shown, prefixed with the namespace it runs in.
fn shown(at: Option<&Ns>, cmd: &Command) -> String {
    match at {
        Some(ns) => format!("[{}] {}", netns(ns), display(cmd)),
        None => display(cmd),
    }
}

fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,%+[]".contains(c))
    {
        a.to_string()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

fn output(cmd: &mut Command) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", display(cmd)))
}

/// Run a set-up command that must succeed.
fn must(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            display(cmd),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The demo's namespaces, veths, cgroups, pins and processes, as testbed
/// guards. Dropping it (a panic included) stops the processes, then
/// removes the rest; [`Topology::close`] does the same in order and says
/// what could not be removed.
struct Topology {
    /// In start order; stopped newest first.
    procs: Vec<Proc>,
    veths: Vec<Veth>,
    /// The agent's cgroup root first, then the pods' (below it).
    cgroups: Vec<(&'static str, Cgroup)>,
    pins: PinDir,
    /// The node first.
    netns: Vec<(&'static str, Netns)>,
}

impl Topology {
    fn new(p: &Paths) -> Self {
        Self {
            procs: Vec::new(),
            veths: Vec::new(),
            cgroups: Vec::new(),
            pins: PinDir::adopt(&p.pin_dir),
            netns: Vec::new(),
        }
    }

    fn netns(&self, ns: &Ns) -> &Netns {
        &self
            .netns
            .iter()
            .find(|(n, _)| *n == ns.name)
            .expect("namespace is part of the topology")
            .1
    }

    /// A command in `ns`: in a pod, its cgroup first (the cgroup hooks key
    /// on it), then the namespace and its /etc files (the pods' resolv.conf).
    fn command(&self, ns: &Ns, args: &[&str]) -> Command {
        let mut at = self.netns(ns).enter();
        if let Some((_, cg)) = self.cgroups.iter().find(|(n, _)| *n == ns.name) {
            at = at.cgroup(&cg.path);
        }
        let mut c = at.command(args[0]);
        c.args(&args[1..]);
        c
    }

    fn close(self) -> Vec<String> {
        let Topology {
            mut procs,
            veths,
            cgroups,
            pins,
            netns,
        } = self;
        while let Some(mut pr) = procs.pop() {
            pr.stop();
        }
        let mut problems = Vec::new();
        for (_, cg) in cgroups {
            problems.extend(cg.close().err().map(|e| format!("{e:#}")));
        }
        problems.extend(pins.close().err().map(|e| format!("{e:#}")));
        drop(veths);
        for (_, ns) in netns.into_iter().rev() {
            problems.extend(ns.close().err().map(|e| format!("{e:#}")));
        }
        problems
    }
}

/// A position in a log, so that a check only looks at what came after.
fn mark(path: &Path) -> usize {
    read_lossy(path).len()
}

fn lines_since(path: &Path, mark: usize) -> Vec<String> {
    let s = read_lossy(path);
    s.get(mark..)
        .unwrap_or("")
        .lines()
        .map(str::to_string)
        .collect()
}

/// Write a file into the watched config directory atomically (the watcher
/// must never read half a file).
fn put_config(p: &Paths, name: &str, text: &str) -> Result<()> {
    let tmp = p.staging.join(name);
    fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, p.config.join(name)).with_context(|| format!("installing {name}"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Steps and checks.

struct CheckResult {
    step: &'static str,
    name: String,
    ok: bool,
    detail: String,
}

struct Demo {
    p: Paths,
    check: bool,
    step: &'static str,
    results: Vec<CheckResult>,
    topo: Topology,
    /// Every pid we started, to prove afterwards that none survived.
    pids: Vec<u32>,
    vip4: Option<String>,
}

/// Terminal styles, empty when stdout is not a terminal or NO_COLOR is set.
struct Style(&'static str);
static COLOR: AtomicBool = AtomicBool::new(false);
impl std::fmt::Display for Style {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if COLOR.load(Ordering::Relaxed) {
            f.write_str(self.0)?;
        }
        Ok(())
    }
}
const BOLD: Style = Style("\x1b[1m");
const DIM: Style = Style("\x1b[2m");
const GREEN: Style = Style("\x1b[32m");
const RED: Style = Style("\x1b[31m");
const RESET: Style = Style("\x1b[0m");

impl Demo {
    fn header(&mut self, step: &'static str, title: &str) {
        self.step = step;
        println!("\n{BOLD}━━ {step}: {title}{RESET}");
    }

    fn say(&self, text: &str) {
        for l in text.lines() {
            println!("{DIM}# {l}{RESET}");
        }
    }

    /// Show the seed's command and the one that runs here, run it, print its
    /// real output, and return it.
    fn run_shown(&self, seed: Option<&str>, at: Option<&Ns>, mut cmd: Command) -> Result<Output> {
        interrupted()?;
        if let Some(s) = seed {
            println!("{DIM}$ {s}{RESET}");
        }
        println!("{BOLD}$ {}{RESET}", shown(at, &cmd));
        let out = output(&mut cmd)?;
        let so = String::from_utf8_lossy(&out.stdout);
        let se = String::from_utf8_lossy(&out.stderr);
        for l in se.lines() {
            println!("{l}");
        }
        print!("{so}");
        if !so.is_empty() && !so.ends_with('\n') {
            println!();
        }
        Ok(out)
    }

    fn record(&mut self, name: &str, r: Result<String, String>) -> bool {
        let (ok, detail) = match r {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        if ok {
            println!("{GREEN}✔ {name}{RESET}{DIM} {detail}{RESET}");
        } else {
            println!("{RED}✘ {name}: {detail}{RESET}");
        }
        self.results.push(CheckResult {
            step: self.step,
            name: name.to_string(),
            ok,
            detail,
        });
        ok
    }

    /// Poll `f` until it observes what it wants or the deadline passes; the
    /// last reason is what the table shows.
    fn expect(
        &mut self,
        name: &str,
        mut f: impl FnMut(&mut Self) -> Result<Result<String, String>>,
    ) -> Result<bool> {
        let end = Instant::now() + DEADLINE;
        loop {
            interrupted()?;
            for pr in &mut self.topo.procs {
                pr.alive()?;
            }
            let r = f(self)?;
            if r.is_ok() || Instant::now() >= end {
                return Ok(self.record(name, r));
            }
            sleep(Duration::from_millis(300))?;
        }
    }

    /// A log line (after `since`) containing every needle.
    fn expect_log(
        &mut self,
        name: &str,
        log: &Path,
        since: usize,
        needles: &[&str],
    ) -> Result<Option<String>> {
        let log = log.to_path_buf();
        let mut found = None;
        let ok = self.expect(name, |_| {
            let hit = lines_since(&log, since)
                .into_iter()
                .find(|l| needles.iter().all(|n| l.contains(n)));
            Ok(match hit {
                Some(l) => {
                    found = Some(l);
                    Ok(String::new())
                }
                None => Err(format!(
                    "no line in {} with {}",
                    log.display(),
                    needles.join(" and ")
                )),
            })
        })?;
        if let Some(l) = &found {
            println!("  {l}");
        }
        Ok(ok.then_some(found).flatten())
    }

    fn step_ok(&self) -> bool {
        self.results
            .iter()
            .filter(|r| r.step == self.step)
            .all(|r| r.ok)
    }

    fn shunt(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.p.shunt);
        c.args(args);
        c
    }

    /// A command in `ns` (see [`Topology::command`]).
    fn at(&self, ns: &Ns, args: &[&str]) -> Command {
        self.topo.command(ns, args)
    }

    /// Start a long-running child in its own process group (Ctrl-C reaches
    /// only the demo, which stops them in order), logging to `logs/NAME.log`.
    fn spawn(&mut self, name: &str, at: Option<&Ns>, mut cmd: Command) -> Result<()> {
        println!("{DIM}starting {name}: {}{RESET}", shown(at, &cmd));
        cmd.process_group(0);
        let pr = Proc::spawn(name, cmd, &self.p.log(name))?;
        self.pids.push(pr.pid());
        self.topo.procs.push(pr);
        Ok(())
    }

    /// Wait until a socket in `ns` listens on an address `matches` accepts
    /// (`ss` prints e.g. `10.244.1.18:15008`, `*:15008`, `[::]:15008`).
    fn wait_listening(
        &mut self,
        name: &str,
        at: &Ns,
        proto: &str,
        what: &str,
        matches: impl Fn(&str) -> bool,
    ) -> Result<()> {
        let ns = netns(at);
        let flag = if proto == "udp" { "-lun" } else { "-ltn" };
        let ok = self.expect(&format!("{name} listening on {proto} {what}"), |d| {
            let out = must(&mut d.at(at, &["ss", "-H", flag]))?;
            Ok(
                if out
                    .lines()
                    .any(|l| l.split_whitespace().nth(3).is_some_and(&matches))
                {
                    Ok(String::new())
                } else {
                    Err(format!("nothing listens on {what} in {ns}"))
                },
            )
        })?;
        if !ok {
            bail!("{name} did not start listening on {proto} {what}");
        }
        Ok(())
    }

    // -- set-up -------------------------------------------------------------

    fn build_topology(&mut self) -> Result<()> {
        let p = &self.p;
        for d in [&p.config, &p.staging, &p.state, &p.logs] {
            fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let topo = &mut self.topo;
        topo.cgroups.push(("", Cgroup::new(&p.cgroup_root)?));
        for ns in NAMESPACES {
            if let Some(cg) = p.cgroup(ns) {
                let cg = Cgroup::new(&cg)
                    .with_context(|| format!("creating cgroup {}", cg.display()))?;
                topo.cgroups.push((ns.name, cg));
            }
        }
        let node = Netns::new(netns(&NODE))?;
        for a in NODE.addrs {
            node.ip(&["addr", "add", &format!("{a}/32"), "dev", "lo"])?;
        }
        must(
            node.command("sysctl")
                .args(["-qw", "net.ipv4.ip_forward=1"]),
        )?;
        for ns in NAMESPACES {
            let name = netns(ns);
            let veth = format!("to-{}", ns.name);
            let pod = Netns::with_etc(&name, ns.etc)?;
            topo.veths.push(Veth::new(&node, &veth, &pod, "eth0")?);
            node.ip(&["link", "set", &veth, "up"])?;
            pod.ip(&["link", "set", "eth0", "up"])?;
            for a in ns.addrs {
                pod.ip(&["addr", "add", &format!("{a}/32"), "dev", "eth0"])?;
                node.ip(&[
                    "route",
                    "add",
                    &format!("{a}/32"),
                    "dev",
                    &veth,
                    "src",
                    NODE_ADDR,
                ])?;
            }
            pod.ip(&["route", "add", GATEWAY, "dev", "eth0", "scope", "link"])?;
            pod.ip(&["route", "add", "default", "via", GATEWAY, "dev", "eth0"])?;
            topo.netns.push((ns.name, pod));
        }
        topo.netns.insert(0, (NODE.name, node));
        println!(
            "{DIM}network namespaces: {}, {}; cgroup root {}{RESET}",
            netns(&NODE),
            NAMESPACES
                .iter()
                .map(|n| netns(n))
                .collect::<Vec<_>>()
                .join(", "),
            self.p.cgroup_root.display()
        );
        Ok(())
    }

    fn start_internet(&mut self) -> Result<()> {
        let p = &self.p;
        must(Command::new(p.asset("make-ca.sh")).arg(&p.pki))?;
        let work = p.work.to_string_lossy().into_owned();
        fs::create_dir_all(p.work.join("nginx/tmp"))?;
        let render = |name: &str| -> Result<PathBuf> {
            let text = fs::read_to_string(p.asset(name))?
                .replace("@DIR@", &work)
                .replace("@IP@", HTTPBIN_IP)
                .replace("@DNS@", PUBLIC_DNS);
            let out = p.work.join(name);
            fs::write(&out, text)?;
            Ok(out)
        };
        let nginx_conf = render("nginx.conf")?;
        let dnsmasq_conf = render("dnsmasq.conf")?;
        let nginx = self.at(
            &INTERNET,
            &[
                "nginx",
                "-c",
                &nginx_conf.to_string_lossy(),
                "-p",
                &p.work.join("nginx").to_string_lossy(),
                "-e",
                &p.work.join("nginx/error.log").to_string_lossy(),
            ],
        );
        let dnsmasq = self.at(
            &INTERNET,
            &["dnsmasq", "-C", &dnsmasq_conf.to_string_lossy()],
        );
        self.spawn("nginx", Some(&INTERNET), nginx)?;
        self.spawn("dnsmasq", Some(&INTERNET), dnsmasq)?;
        let https = format!("{HTTPBIN_IP}:443");
        self.wait_listening("nginx", &INTERNET, "tcp", &https, |a| a == https)?;
        let dns = format!("{PUBLIC_DNS}:53");
        self.wait_listening("dnsmasq", &INTERNET, "udp", &dns, |a| a == dns)?;
        Ok(())
    }

    /// Before any shunt process runs: the plumbing works on its own, so a
    /// later failure is shunt's.
    fn check_plumbing(&mut self) -> Result<()> {
        self.header("0", "the machine's stand-ins (no shunt yet)");
        self.say("httpbin.org is nginx in the \"internet\" namespace; its DNS is dnsmasq there.");
        let out = self.run_shown(
            None,
            Some(&NODE),
            self.at(
                &NODE,
                &["dig", "+short", &format!("@{PUBLIC_DNS}"), "httpbin.org"],
            ),
        )?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        self.record(
            "public DNS answers httpbin.org",
            if s.trim() == HTTPBIN_IP {
                Ok(s.trim().into())
            } else {
                Err(format!("dig said {s:?}"))
            },
        );
        let ca = self.p.pki.join("ca.pem").to_string_lossy().into_owned();
        let out = self.run_shown(
            None,
            Some(&WAYPOINT),
            self.at(
                &WAYPOINT,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "5",
                    "--cacert",
                    &ca,
                    "https://httpbin.org/get",
                ],
            ),
        )?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        self.record(
            "waypoint's namespace reaches https://httpbin.org with the demo CA",
            if s.contains("\"url\": \"https://httpbin.org/get\"") {
                Ok(String::new())
            } else {
                Err(format!(
                    "curl: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            },
        );
        let out = self.run_shown(
            None,
            Some(&CURL),
            self.at(
                &CURL,
                &[
                    "curl",
                    "-sS",
                    "--max-time",
                    "3",
                    &format!("http://{HTTPBIN_IP}/get"),
                ],
            ),
        )?;
        self.record(
            "curl pod reaches the internet namespace by address",
            if out.status.success() {
                Ok(String::new())
            } else {
                Err("no answer".into())
            },
        );
        let out = self.run_shown(
            None,
            Some(&CURL),
            self.at(
                &CURL,
                &["dig", "+short", "+time=1", "+tries=1", "httpbin.org"],
            ),
        )?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        self.record(
            &format!("without the agent, the pod's resolver {CLUSTER_DNS} answers nothing"),
            if s.contains(HTTPBIN_IP) {
                Err(format!("it answered {s:?}"))
            } else {
                Ok(String::new())
            },
        );
        if !self.step_ok() {
            bail!("the demo's own plumbing does not work; see the failed checks above");
        }
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        self.header("1a", "mesh CA and node agent");
        let ca = self.p.mesh_ca.to_string_lossy().into_owned();
        let out = self.run_shown(None, None, self.shunt(&["ca", "init", "--ca-dir", &ca]))?;
        if !out.status.success() {
            bail!("`shunt ca init` failed (see above): the mesh CA is needed for HBONE");
        }
        let p = &self.p;
        let agent = self.shunt(&[
            "agent",
            "--netns",
            &self.topo.netns(&NODE).path().to_string_lossy(),
            "--pin-dir",
            &p.pin_dir.to_string_lossy(),
            "--cgroup-root",
            &p.cgroup_root.to_string_lossy(),
            "--state-dir",
            &p.state.to_string_lossy(),
            "--config-dir",
            &p.config.to_string_lossy(),
            "--ca-dir",
            &ca,
            "--dns-addr4",
            DNS_PROXY4,
            "--dns-addr6",
            DNS_PROXY6,
            "--dns-upstream",
            &format!("{PUBLIC_DNS}:53"),
            "--drain-timeout",
            "1s",
        ]);
        self.spawn("agent", None, agent)?;
        // Installed: maps pinned, capture socket listening in the node.
        let services = self.p.pin_dir.join("services");
        let ok = self.expect("agent pinned its maps and listens", |d| {
            let listening = must(&mut d.at(&NODE, &["ss", "-H", "-ltn"]))?.contains("127.0.0.1]:");
            Ok(if services.exists() && listening {
                Ok(String::new())
            } else {
                Err(format!(
                    "pinned services map: {}, capture socket: {listening}",
                    services.exists()
                ))
            })
        })?;
        if !ok {
            bail!(
                "the agent did not come up; see {}",
                self.p.log("agent").display()
            );
        }
        Ok(())
    }

    // -- the walk -----------------------------------------------------------

    fn step1(&mut self) -> Result<()> {
        self.header("1", "Create a test workload: a direct connection, logged");
        self.say("Config: mesh.yaml (dnsCapture, ALLOW_ANY) and 00-curl.yaml (namespace default, ambient;\nWorkloadEntries curl and admin naming their cgroups).");
        for f in ["mesh.yaml", "00-curl.yaml"] {
            put_config(&self.p, f, &fs::read_to_string(self.p.example(f))?)?;
            println!("{DIM}applied examples/egress/{f}{RESET}");
        }
        let proxy = format!("{DNS_PROXY4}:");
        self.wait_listening("agent's DNS proxy", &NODE, "udp", DNS_PROXY4, |a| {
            a.starts_with(&proxy)
        })?;
        let agent_log = self.p.log("agent");
        let nginx_log = self.p.work.join("nginx/access.log");
        let (a0, n0) = (mark(&agent_log), mark(&nginx_log));
        // DNS capture: the pod asks 10.96.0.10 (nothing there) and gets the
        // public answer through the agent's proxy once it has enrolled curl.
        self.expect(
            "DNS capture: the pod resolves httpbin.org through the agent",
            |d| {
                let out = output(&mut d.at(
                    &CURL,
                    &["dig", "+short", "+time=1", "+tries=1", "httpbin.org"],
                ))?;
                let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
                Ok(if s == HTTPBIN_IP {
                    Ok(s)
                } else {
                    Err(format!("dig answered {s:?}"))
                })
            },
        )?;
        let out = self.run_shown(
            Some("kubectl exec deploy/curl -- curl -sI http://httpbin.org/get"),
            Some(&CURL),
            self.at(
                &CURL,
                &["curl", "-sI", "--max-time", "10", "http://httpbin.org/get"],
            ),
        )?;
        let s = String::from_utf8_lossy(&out.stdout).into_owned();
        self.record(
            "curl -sI answered directly",
            if s.starts_with("HTTP/1.1 200") {
                Ok(String::new())
            } else {
                Err(format!("got {s:?}"))
            },
        );
        self.say("The agent's passthrough line (not yet configured for egress control):");
        self.expect_log(
            "agent logs the passthrough of workload curl to the internet address",
            &agent_log,
            a0,
            &[
                "src.workload=\"curl\"",
                &format!("dst.addr={HTTPBIN_IP}:80"),
            ],
        )?;
        self.say("httpbin.org's own log: the pod's address, plain HTTP:");
        self.expect_log(
            "upstream saw the pod itself",
            &nginx_log,
            n0,
            &["10.244.1.19:", "scheme=http ", "\"HEAD /get"],
        )?;
        Ok(())
    }

    fn step2(&mut self) -> Result<()> {
        self.header("2", "Create an egress gateway and the ServiceEntry");
        println!("{DIM}$ kubectl create namespace common-infrastructure; kubectl label ... ambient{RESET}");
        println!("{DIM}$ istioctl waypoint apply --enroll-namespace --name egress-gateway --namespace common-infrastructure{RESET}");
        for f in ["01-namespace.yaml", "02-waypoint.yaml"] {
            put_config(&self.p, f, &fs::read_to_string(self.p.example(f))?)?;
            println!("{DIM}applied examples/egress/{f}{RESET}");
        }
        let ca = self.p.mesh_ca.to_string_lossy().into_owned();
        let wp = self.at(
            &WAYPOINT,
            &[
                &self.p.shunt.to_string_lossy(),
                "waypoint",
                "--name",
                WAYPOINT_NAME,
                "--namespace",
                WAYPOINT_NS,
                "--config-dir",
                &self.p.config.to_string_lossy(),
                // The agent's state: the waypoint reads the allocator's
                // VIPs there (read-only; it never allocates).
                "--state-dir",
                &self.p.state.to_string_lossy(),
                "--ca-dir",
                &ca,
            ],
        );
        self.spawn("waypoint", Some(&WAYPOINT), wp)?;
        let port = format!(":{HBONE_PORT}");
        self.wait_listening(
            "waypoint",
            &WAYPOINT,
            "tcp",
            &format!("port {HBONE_PORT}"),
            |a| a.ends_with(&port),
        )?;

        let wp_log = self.p.log("waypoint");
        let wp_mark = mark(&wp_log);
        put_config(
            &self.p,
            "03-serviceentry.yaml",
            &fs::read_to_string(self.p.example("03-serviceentry.yaml"))?,
        )?;
        println!("{DIM}applied examples/egress/03-serviceentry.yaml{RESET}");

        let seed_get = "kubectl get serviceentry httpbin.org -n common-infrastructure -oyaml";
        let mut status = String::new();
        self.expect(
            "ServiceEntry status: 240.240.0.x, 2001:2::x, WaypointBound",
            |d| {
                let out = output(&mut d.get_se())?;
                status = String::from_utf8_lossy(&out.stdout).into_owned();
                let v4 = status.contains("240.240.");
                let v6 = status.contains("2001:2::");
                let bound = status.contains("istio.io/WaypointBound");
                Ok(if v4 && v6 && bound {
                    Ok(String::new())
                } else {
                    Err(format!(
                        "`shunt get` shows v4 {v4}, v6 {v6}, WaypointBound {bound}: {}",
                        if out.status.success() {
                            status.lines().take(3).collect::<Vec<_>>().join(" | ")
                        } else {
                            String::from_utf8_lossy(&out.stderr).trim().to_string()
                        }
                    ))
                })
            },
        )?;
        // The waypoint holds a config whose ServiceEntries the agent has not
        // allocated yet, so the first config it applies with httpbin.org
        // already routes its VIPs (no 400 while the status shows them).
        self.expect(
            "the waypoint's first config with the ServiceEntry routes its VIPs",
            |_| {
                let first = lines_since(&wp_log, wp_mark)
                    .into_iter()
                    // A rebuild of the previous config (its allocation
                    // changed) may come first: the first with the entry.
                    .find(|l| {
                        l.contains("waypoint config applied") && !l.contains("service_entries=0")
                    });
                Ok(match first {
                    Some(l) if !l.contains("services=0") => Ok(String::new()),
                    Some(l) => Err(format!("applied without the VIPs: {l}")),
                    None => Err("no `waypoint config applied` line yet".into()),
                })
            },
        )?;
        self.run_shown(Some(seed_get), None, self.get_se())?;
        let vip = status
            .split(|c: char| c.is_whitespace() || c == '"')
            .find(|w| w.starts_with("240.240."))
            .map(str::to_string);
        let Some(vip) = vip else {
            bail!("no 240.240.x.x address for httpbin.org; later steps need it");
        };
        self.vip4 = Some(vip.clone());

        let agent_log = self.p.log("agent");
        let wp_log = self.p.log("waypoint");
        let nginx_log = self.p.work.join("nginx/access.log");
        let (a0, w0, n0) = (mark(&agent_log), mark(&wp_log), mark(&nginx_log));
        let vip_c = vip.clone();
        self.expect(&format!("DNS answers the VIP {vip} in the pod"), |d| {
            let out = output(&mut d.at(
                &CURL,
                &["dig", "+short", "+time=1", "+tries=1", "httpbin.org"],
            ))?;
            let s = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok(if s == vip_c {
                Ok(format!("dig +short httpbin.org → {s}"))
            } else {
                Err(format!("dig answered {s:?}"))
            })
        })?;
        let out = self.run_shown(
            Some("kubectl exec deploy/curl -- curl -sI http://httpbin.org/get -v"),
            Some(&CURL),
            self.at(
                &CURL,
                &[
                    "curl",
                    "-sI",
                    "--max-time",
                    "10",
                    "http://httpbin.org/get",
                    "-v",
                ],
            ),
        )?;
        let (so, se) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        self.record(
            &format!("curl connected to the VIP {vip}:80"),
            if se.contains(&format!("Connected to httpbin.org ({vip}) port 80")) {
                Ok(String::new())
            } else {
                Err("curl -v shows no connection to the VIP".into())
            },
        );
        self.record(
            "answered 200 through the waypoint",
            if so.starts_with("HTTP/1.1 200") {
                Ok(String::new())
            } else {
                Err(format!("got {:?}", so.lines().next().unwrap_or("")))
            },
        );
        self.say("The agent's line: the connection went to the waypoint over HBONE:");
        self.expect_log(
            "agent logs the HBONE connection to the waypoint",
            &agent_log,
            a0,
            &[
                "spiffe://cluster.local/ns/default/sa/curl",
                &format!("dst.hbone_addr={vip}:80"),
            ],
        )?;
        self.say("The waypoint's lines: the connection (with the pod's identity) and the request:");
        self.expect_log(
            "waypoint saw the curl pod's SPIFFE identity and the VIP",
            &wp_log,
            w0,
            &[
                "spiffe://cluster.local/ns/default/sa/curl",
                &format!("dst.hbone_addr={vip}:80"),
            ],
        )?;
        self.expect_log(
            "waypoint access log: HEAD /get 200",
            &wp_log,
            w0,
            &["\"HEAD /get HTTP/1.1\" 200"],
        )?;
        self.say("httpbin.org's own log: now from the waypoint's address:");
        self.expect_log(
            "upstream saw the waypoint, not the pod",
            &nginx_log,
            n0,
            &[&format!("{}:", WAYPOINT.addrs[0]), "\"HEAD /get"],
        )?;
        Ok(())
    }

    fn get_se(&self) -> Command {
        let mut c = self.shunt(&[
            "get",
            "serviceentries",
            "httpbin.org",
            "-n",
            WAYPOINT_NS,
            "-o",
            "yaml",
        ]);
        c.env("SHUNT_CONFIG_DIR", &self.p.config)
            .env("SHUNT_STATE_DIR", &self.p.state);
        c
    }

    fn step3(&mut self) -> Result<()> {
        self.header("3", "Policy enforcement");
        put_config(
            &self.p,
            "04-authorizationpolicy.yaml",
            &fs::read_to_string(self.p.example("04-authorizationpolicy.yaml"))?,
        )?;
        println!("{DIM}applied examples/egress/04-authorizationpolicy.yaml{RESET}");
        let wp_log = self.p.log("waypoint");
        // Wait for the reload: the POST that was allowed is now refused.
        self.expect("the policy is in force (POST from curl refused)", |d| {
            let out = output(&mut d.at(
                &CURL,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "-X",
                    "POST",
                    "httpbin.org/post",
                ],
            ))?;
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            Ok(if code == "403" {
                Ok(String::new())
            } else {
                Err(format!("POST got {code}"))
            })
        })?;
        let w1 = mark(&wp_log);
        self.say("From the low-privilege curl pod:");
        let get = self.run_shown(
            Some("curl httpbin.org/get"),
            Some(&CURL),
            self.at(
                &CURL,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    "-w",
                    "%{stderr}HTTP %{http_code}\\n",
                    "httpbin.org/get",
                ],
            ),
        )?;
        self.record(
            "curl: GET /get allowed (200, JSON)",
            ok_body(&get, "200", "\"url\": \"http://httpbin.org/get\""),
        );
        let post = self.run_shown(
            Some("curl -X POST httpbin.org/post"),
            Some(&CURL),
            self.at(
                &CURL,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    "-w",
                    "%{stderr}HTTP %{http_code}\\n",
                    "-X",
                    "POST",
                    "httpbin.org/post",
                ],
            ),
        )?;
        self.record(
            "curl: POST /post denied: 403 RBAC: access denied",
            ok_body(&post, "403", "RBAC: access denied"),
        );
        if let Some(l) = self.expect_log(
            "the 403 came from the waypoint's policy",
            &wp_log,
            w1,
            &["\"POST /post HTTP/1.1\" 403", "rbac_access_denied"],
        )? {
            let decided = l
                .split_whitespace()
                .find(|w| w.starts_with("rbac_access_denied"))
                .unwrap_or("")
                .to_string();
            // Envoy's details say `[none]` when ALLOW policies applied and
            // none matched (as here); the waypoint's log names the deciding
            // policy in its denial line.
            self.record(
                "Envoy-format line has the RBAC response details",
                if decided.contains("httpbin") || decided.contains("[none]") {
                    Ok(decided)
                } else {
                    Err(format!("response details {decided:?}"))
                },
            );
            self.expect_log(
                "the waypoint's log names the deciding policy common-infrastructure/httpbin",
                &wp_log,
                w1,
                &[
                    "request denied",
                    "method=POST",
                    "policy=\"common-infrastructure/httpbin\"",
                ],
            )?;
        }
        self.say("From the admin pod:");
        let w2 = mark(&wp_log);
        let admin = self.run_shown(
            Some("curl httpbin.org/post -X POST"),
            Some(&ADMIN),
            self.at(
                &ADMIN,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    "-w",
                    "%{stderr}HTTP %{http_code}\\n",
                    "httpbin.org/post",
                    "-X",
                    "POST",
                ],
            ),
        )?;
        self.record(
            "admin: POST /post allowed (200, JSON)",
            ok_body(&admin, "200", "\"url\": \"http://httpbin.org/post\""),
        );
        self.expect_log(
            "waypoint let admin's POST through",
            &wp_log,
            w2,
            &["\"POST /post HTTP/1.1\" 200"],
        )?;
        self.expect_log(
            "waypoint's connection line names admin's identity",
            &wp_log,
            w2,
            &["spiffe://cluster.local/ns/default/sa/admin"],
        )?;
        Ok(())
    }

    fn step4(&mut self) -> Result<()> {
        self.header("4", "TLS origination");
        self.say("examples/egress/tls-origination/03-serviceentry.yaml replaces the ServiceEntry (targetPort 443)\nand adds the DestinationRule; on this machine the DestinationRule also names the demo CA\n(caCertificates), the stand-in for the public CAs httpbin.org's real certificate chains to.");
        let src = fs::read_to_string(self.p.example("tls-origination/03-serviceentry.yaml"))?;
        let ca = self.p.pki.join("ca.pem");
        let text = with_ca_certificates(&src, &ca)?;
        put_config(&self.p, "03-serviceentry.yaml", &text)?;
        println!("{DIM}applied examples/egress/tls-origination/03-serviceentry.yaml (+ caCertificates: {}){RESET}", ca.display());
        let nginx_log = self.p.work.join("nginx/access.log");
        let n0 = mark(&nginx_log);
        self.expect("requests are upgraded to HTTPS", |d| {
            let out =
                output(&mut d.at(&CURL, &["curl", "-s", "--max-time", "5", "httpbin.org/get"]))?;
            let s = String::from_utf8_lossy(&out.stdout).to_string();
            Ok(if s.contains("\"url\": \"https://httpbin.org/get\"") {
                Ok(String::new())
            } else {
                Err(format!("body {:?}", s.lines().last().unwrap_or("")))
            })
        })?;
        let n1 = mark(&nginx_log);
        let out = self.run_shown(
            Some("curl httpbin.org/get"),
            Some(&CURL),
            self.at(
                &CURL,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "10",
                    "-w",
                    "%{stderr}HTTP %{http_code}\\n",
                    "httpbin.org/get",
                ],
            ),
        )?;
        self.record(
            "curl: \"url\": \"https://httpbin.org/get\"",
            ok_body(&out, "200", "\"url\": \"https://httpbin.org/get\""),
        );
        self.say("httpbin.org's own log: TLS, SNI httpbin.org, from the waypoint:");
        self.expect_log(
            "upstream saw TLS with SNI httpbin.org from the waypoint",
            &nginx_log,
            n1.max(n0),
            &[
                &format!("{}:", WAYPOINT.addrs[0]),
                "scheme=https sni=httpbin.org",
                "\"GET /get",
            ],
        )?;
        Ok(())
    }

    fn step5(&mut self) -> Result<()> {
        self.header("5", "HTTPS passthrough");
        self.say("examples/egress/https/03-serviceentry.yaml replaces the ServiceEntry: httpbin.org keeps port 80\nand gains 443 as TLS. The waypoint reads the ClientHello's SNI and relays the pod's own TLS.\nThe seed's policy still applies: its HTTP-only rule (GET /get) cannot match a TLS connection,\nso, as under Istio, only admin (the rule without HTTP fields) gets through.");
        let text = fs::read_to_string(self.p.example("https/03-serviceentry.yaml"))?;
        put_config(&self.p, "03-serviceentry.yaml", &text)?;
        println!("{DIM}applied examples/egress/https/03-serviceentry.yaml{RESET}");
        let ca = self.p.pki.join("ca.pem").to_string_lossy().into_owned();
        let nginx_log = self.p.work.join("nginx/access.log");
        let n0 = mark(&nginx_log);
        let wp_log = self.p.log("waypoint");
        let w0 = mark(&wp_log);
        let https = |d: &Demo, ns: &Ns| {
            d.at(
                ns,
                &[
                    "curl",
                    "-s",
                    "--max-time",
                    "5",
                    "--cacert",
                    &ca,
                    "-w",
                    "%{stderr}HTTP %{http_code}\\n",
                    "https://httpbin.org/get",
                ],
            )
        };
        self.expect(
            "admin: curl https://httpbin.org/get through the waypoint",
            |d| {
                let out = output(&mut https(d, &ADMIN))?;
                Ok(ok_body(&out, "200", "\"url\": \"https://httpbin.org/get\""))
            },
        )?;
        self.say("httpbin.org's own log: the pod's TLS (SNI httpbin.org), from the waypoint:");
        self.expect_log(
            "upstream saw the pod's TLS with SNI httpbin.org from the waypoint",
            &nginx_log,
            n0,
            &[
                &format!("{}:", WAYPOINT.addrs[0]),
                "scheme=https sni=httpbin.org",
                "\"GET /get",
            ],
        )?;
        self.expect_log(
            "waypoint: admin's identity and the SNI on the access line",
            &wp_log,
            w0,
            &[
                "connection complete",
                "src.identity=\"spiffe://cluster.local/ns/default/sa/admin\"",
                "sni=\"httpbin.org\"",
            ],
        )?;
        let n1 = mark(&nginx_log);
        let w1 = mark(&wp_log);
        let out = self.run_shown(
            Some("curl https://httpbin.org/get"),
            Some(&CURL),
            https(self, &CURL),
        )?;
        let refused = if out.status.success() {
            Err("curl's TLS connection was allowed".to_string())
        } else {
            Ok(String::new())
        };
        self.record("curl: TLS refused by the seed's HTTP-only rule", refused);
        self.expect_log(
            "waypoint: the refusal names curl and the seed's policy",
            &wp_log,
            w1,
            &[
                "TLS connection refused",
                "sa/curl",
                "ALLOW policy common-infrastructure/httpbin",
            ],
        )?;
        let reached = lines_since(&nginx_log, n1);
        self.record(
            "the refused connection never reached httpbin.org",
            if reached.is_empty() {
                Ok(String::new())
            } else {
                Err(format!("nginx logged {reached:?}"))
            },
        );
        Ok(())
    }

    /// What the demo tells the user to try, as (comment, shell line)
    /// pairs: printed as is by [`Demo::how_to_poke`] and run as is by
    /// [`Demo::check_pokes`].
    fn pokes(&self) -> Vec<(&'static str, String)> {
        let p = &self.p;
        let cg = p.cgroup(&CURL).expect("curl has a cgroup");
        let shunt = p.shunt.display();
        let curl = |args: &str| {
            format!(
                "sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec shunt-demo-curl curl -s {args}'",
                cg.display()
            )
        };
        vec![
            ("a command in the curl pod: join its cgroup first (DNS capture and egress control key on it)", curl("httpbin.org/get")),
            ("", curl("-X POST httpbin.org/post")),
            ("the kernel's view", format!("bpftool map dump pinned {}/services", p.pin_dir.display())),
            ("", format!("{shunt} maps --pin-dir {}", p.pin_dir.display())),
            ("", format!(
                "{shunt} status --pin-dir {} --state-dir {}",
                p.pin_dir.display(),
                p.state.display()
            )),
            ("", format!(
                "{shunt} get serviceentries -o yaml --config-dir {} --state-dir {}",
                p.config.display(),
                p.state.display()
            )),
            ("edit the live config (reloaded within a second)", format!("ls {}", p.config.display())),
            ("logs", format!(
                "tail -f {}/agent.log {}/waypoint.log {}/nginx/access.log",
                p.logs.display(),
                p.logs.display(),
                p.work.display()
            )),
        ]
    }

    fn how_to_poke(&self) {
        println!("\n{BOLD}━━ The mesh is up. Poke it (as root, in another terminal):{RESET}");
        for (comment, line) in self.pokes() {
            if !comment.is_empty() {
                println!("  # {comment}");
            }
            println!("  {line}");
        }
        println!("\nCtrl-C removes everything.");
    }

    /// Runs every line [`Demo::how_to_poke`] prints, as printed (`sh -c`):
    /// each must succeed (`tail -f` must still be following after 2s).
    fn check_pokes(&mut self) -> Result<()> {
        self.header("poke", "every command the demo prints runs as printed");
        for (_, line) in self.pokes() {
            let follows = line.starts_with("tail -f ");
            let mut cmd = if follows {
                let mut c = Command::new("timeout");
                c.args(["2", "sh", "-c", &line]);
                c
            } else {
                let mut c = Command::new("sh");
                c.args(["-c", &line]);
                c
            };
            let out = output(&mut cmd)?;
            let code = out.status.code();
            let ok = if follows {
                code == Some(124)
            } else {
                code == Some(0)
            };
            let err = String::from_utf8_lossy(&out.stderr);
            let r = if ok && err.lines().all(|l| !l.starts_with("warning:")) {
                Ok(String::new())
            } else {
                Err(format!(
                    "exit {}: {}{}",
                    code.map(|c| c.to_string())
                        .unwrap_or_else(|| "by signal".into()),
                    err.trim(),
                    String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .filter(|l| l.contains('!') || l.contains("NOT"))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ))
            };
            // Short names keep the checks table readable.
            let mut name = line.replace(&self.p.shunt.display().to_string(), "shunt");
            if name.len() > 72 {
                let cut = (0..=69)
                    .rev()
                    .find(|i| name.is_char_boundary(*i))
                    .unwrap_or(0);
                name = format!("{}...", &name[..cut]);
            }
            self.record(&format!("$ {name}"), r);
        }
        Ok(())
    }
}

/// Status and body of a curl run with `-w '%{stderr}HTTP %{http_code}'`.
fn ok_body(out: &Output, code: &str, body: &str) -> Result<String, String> {
    let so = String::from_utf8_lossy(&out.stdout);
    let se = String::from_utf8_lossy(&out.stderr);
    let got = se
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("HTTP "))
        .unwrap_or("none")
        .trim()
        .to_string();
    if got != code {
        return Err(format!("status {got}, expected {code}"));
    }
    if !so.contains(body) {
        return Err(format!("body lacks {body:?}"));
    }
    Ok(String::new())
}

/// The seed's DestinationRule plus `caCertificates`: httpbin.org's stand-in
/// has a certificate from the demo CA, not a public one.
fn with_ca_certificates(src: &str, ca: &Path) -> Result<String> {
    const MODE: &str = "      mode: SIMPLE\n";
    if src.matches(MODE).count() != 1 {
        bail!("examples/egress/tls-origination/03-serviceentry.yaml: expected one `tls.mode: SIMPLE` line to add caCertificates after");
    }
    Ok(src.replace(
        MODE,
        &format!("{MODE}      caCertificates: {}\n", ca.display()),
    ))
}

// ---------------------------------------------------------------------------
// Tear-down and leftovers.

/// Remove what an interrupted (killed) run left: its namespaces (and the
/// processes still in them), cgroups and pins, adopted by testbed guards.
/// Returns what could not be removed.
fn remove_leftovers(p: &Paths) -> Vec<String> {
    let mut closed: Vec<Result<()>> = Netns::adopt_all(PREFIX)
        .into_iter()
        .map(Netns::close)
        .collect();
    closed.push(Cgroup::adopt(&p.cgroup_root).close());
    closed.push(PinDir::adopt(&p.pin_dir).close());
    closed
        .into_iter()
        .filter_map(|r| r.err().map(|e| format!("{e:#}")))
        .collect()
}

/// Everything that must not outlive the demo.
fn leftovers(p: &Paths, pids: &[u32]) -> Vec<String> {
    let mut left: Vec<String> = Netns::list()
        .into_iter()
        .filter(|n| n.starts_with(PREFIX))
        .map(|n| format!("netns {n}"))
        .collect();
    for (what, path) in [("pins", &p.pin_dir), ("cgroup", &p.cgroup_root)] {
        if path.exists() {
            left.push(format!("{what} {}", path.display()));
        }
    }
    if let Ok(rd) = fs::read_dir("/etc/netns") {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with(PREFIX) {
                left.push(e.path().display().to_string());
            }
        }
    }
    for pid in pids {
        let stat = read_lossy(Path::new(&format!("/proc/{pid}/stat")));
        // A zombie (state Z) is gone in all but name.
        if !stat.is_empty() && !stat.contains(") Z ") {
            left.push(format!("process {pid}"));
        }
    }
    // The demo never touches the host's routes or links; prove it.
    for fam in ["-4", "-6"] {
        if let Ok(out) = Command::new("ip")
            .args([fam, "route", "show", "table", "all"])
            .output()
        {
            for l in String::from_utf8_lossy(&out.stdout).lines() {
                if l.contains("240.240.")
                    || l.contains("2001:2::")
                    || l.contains("203.0.113.")
                    || l.contains(DNS_PROXY4)
                {
                    left.push(format!("host route {l}"));
                }
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["-br", "link"]).output() {
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let name = l.split_whitespace().next().unwrap_or("");
            if name.starts_with("to-") || name == "shunt-dns0" {
                left.push(format!("host link {name}"));
            }
        }
    }
    left
}

// ---------------------------------------------------------------------------

pub fn run(root: &Path, check: bool) -> Result<()> {
    install_signal_handlers();
    {
        use std::io::IsTerminal as _;
        COLOR.store(
            std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none(),
            Ordering::Relaxed,
        );
    }
    let started = Instant::now();
    let p = Paths::new(root)?;
    if !p.shunt.exists() {
        bail!(
            "{} is missing: `cargo build --bins` first",
            p.shunt.display()
        );
    }
    let stale = leftovers(&p, &[]);
    if !stale.is_empty() {
        println!(
            "{DIM}removing leftovers of an earlier run: {}{RESET}",
            stale.join(", ")
        );
    }
    let problems = remove_leftovers(&p);
    if !problems.is_empty() {
        bail!(
            "could not remove an earlier run's leftovers: {}",
            problems.join("; ")
        );
    }
    // Emptied now, kept after the run for reading the logs.
    let _work = WorkDir::kept(&p.work)?;

    let mut demo = Demo {
        topo: Topology::new(&p),
        p,
        check,
        step: "setup",
        results: Vec::new(),
        pids: Vec::new(),
        vip4: None,
    };
    let walk = (|| -> Result<()> {
        demo.build_topology()?;
        demo.start_internet()?;
        demo.check_plumbing()?;
        demo.start_agent()?;
        let steps: [fn(&mut Demo) -> Result<()>; 5] = [
            Demo::step1,
            Demo::step2,
            Demo::step3,
            Demo::step4,
            Demo::step5,
        ];
        for step in steps {
            step(&mut demo)?;
            if !demo.step_ok() {
                bail!("step {} failed; the later steps build on it", demo.step);
            }
        }
        if demo.check {
            demo.check_pokes()?;
        } else {
            demo.how_to_poke();
            loop {
                sleep(Duration::from_millis(200))?;
                for pr in &mut demo.topo.procs {
                    pr.alive()?;
                }
            }
        }
        Ok(())
    })();
    let interrupted_by_user = INTERRUPTED.load(Ordering::SeqCst);
    if let Err(e) = &walk {
        if !interrupted_by_user {
            println!("\n{RED}{BOLD}demo stopped: {e:#}{RESET}");
            // The table must show where the walk stopped, not only what passed.
            demo.record("the walk reached its end", Err(format!("{e:#}")));
        }
    }

    // Tear down: our processes first (in reverse start order), then the rest.
    println!("\n{DIM}removing the demo's namespaces, cgroups, pins and processes...{RESET}");
    let topo = std::mem::replace(&mut demo.topo, Topology::new(&demo.p));
    let problems = topo.close();
    demo.step = "cleanup";
    let left = leftovers(&demo.p, &demo.pids);
    let mut detail = left;
    detail.extend(problems);
    demo.record(
        "nothing left behind (netns, pins, cgroups, routes, processes)",
        if detail.is_empty() {
            Ok(String::new())
        } else {
            Err(detail.join(", "))
        },
    );

    println!("\n{BOLD}Checks{RESET}");
    let w = demo
        .results
        .iter()
        .map(|r| r.name.len())
        .max()
        .unwrap_or(10);
    for r in &demo.results {
        let mark = if r.ok {
            format!("{GREEN}pass{RESET}")
        } else {
            format!("{RED}FAIL{RESET}")
        };
        let detail = if r.ok {
            String::new()
        } else {
            format!("  {}", r.detail)
        };
        println!("  {:<7} {:<w$}  {mark}{detail}", r.step, r.name);
    }
    let failed = demo.results.iter().filter(|r| !r.ok).count();
    println!(
        "{} checks, {failed} failed; {:.1}s; logs in {}",
        demo.results.len(),
        started.elapsed().as_secs_f64(),
        demo.p.logs.display()
    );
    match walk {
        Err(_) if interrupted_by_user && !check => Ok(()),
        Err(e) => Err(e),
        Ok(()) if failed > 0 => Err(anyhow!("{failed} check(s) failed")),
        Ok(()) => Ok(()),
    }
}

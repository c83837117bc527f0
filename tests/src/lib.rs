//! Harness for tests on the real kernel. A test gets its own "node" (a
//! network namespace), "pods" (namespaces joined to the node by veth, plus a
//! cgroup under the test's own cgroup root), its own pin directory and
//! state directory. Every resource is an RAII guard, so a failing test (a
//! panic) still removes what it made.

use std::{
    ffi::CString,
    os::unix::{ffi::OsStrExt, fs::MetadataExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use shunt_agent::kernel::{registry::tcp_key, PinnedMaps};
use shunt_common::{EnrolledValue, ServiceValue};

pub type Result<T> = anyhow::Result<T>;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short unique id for this test run (interface names are limited to 15
/// bytes, so names are built from it carefully).
pub fn unique_id() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Poll `f` until it returns Some or the (generous) deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn cgroup2_mount() -> PathBuf {
    PathBuf::from(shunt_agent::prereq::cgroup2_mount().expect("cgroup2 is mounted"))
}

/// Directory of the workspace's built binaries (next to the test binary's
/// `deps/` directory).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("target profile dir").to_path_buf()
}

pub fn shunt_bin() -> PathBuf {
    bin_dir().join("shunt")
}
pub fn probe_bin() -> PathBuf {
    bin_dir().join("shunt-probe")
}
pub fn echo_agent_bin() -> PathBuf {
    bin_dir().join("shunt-echo-agent")
}

pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: String) -> Result<Self> {
        sh("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        sh("ip", &a)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A cgroup directory that is removed (after its processes are gone) on drop.
pub struct Cgroup {
    pub path: PathBuf,
}

impl Cgroup {
    pub fn new(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
    /// The cgroup id the kernel reports from bpf_get_current_cgroup_id().
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).expect("cgroup dir").ino()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Processes may still be exiting; retry briefly.
        let end = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.path).is_err() && self.path.exists() && Instant::now() < end
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A child process killed (SIGTERM, then SIGKILL) on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    pub fn signal(&self, sig: i32) {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }
    /// Wait for exit up to `timeout`; true if it exited.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        wait_for("process exit", timeout, || {
            self.child.try_wait().ok().flatten()
        })
        .is_ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGTERM);
            if !self.wait_exit(Duration::from_secs(5)) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// Configure `cmd` to run in the cgroup `cgroup_procs` (a cgroup.procs path)
/// and the network namespace at `netns`, in that order: `ip netns exec`
/// would remount /sys and hide the cgroup tree.
pub fn in_pod(cmd: &mut Command, cgroup_procs: Option<&Path>, netns: Option<&Path>) {
    in_pod_with_resolv(cmd, cgroup_procs, netns, None)
}

/// As [`in_pod`], and with `resolv` bind-mounted over /etc/resolv.conf in a
/// private mount namespace (what `ip netns exec` does with
/// /etc/netns/NAME/resolv.conf), so the pod has its own resolver address.
pub fn in_pod_with_resolv(
    cmd: &mut Command,
    cgroup_procs: Option<&Path>,
    netns: Option<&Path>,
    resolv: Option<&Path>,
) {
    let procs = cgroup_procs.map(|p| CString::new(p.as_os_str().as_bytes()).unwrap());
    let ns = netns.map(|p| CString::new(p.as_os_str().as_bytes()).unwrap());
    let resolv = resolv.map(|p| CString::new(p.as_os_str().as_bytes()).unwrap());
    let etc_resolv = CString::new("/etc/resolv.conf").unwrap();
    let root = CString::new("/").unwrap();
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(ns) = &ns {
                let fd = libc::open(ns.as_ptr(), libc::O_RDONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let r = libc::setns(fd, libc::CLONE_NEWNET);
                libc::close(fd);
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if let Some(resolv) = &resolv {
                if libc::unshare(libc::CLONE_NEWNS) < 0
                    || libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) < 0
                    || libc::mount(
                        resolv.as_ptr(),
                        etc_resolv.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

pub struct Pod {
    pub name: String,
    pub ns: Netns,
    pub cgroup: Cgroup,
    pub ip4: String,
    pub ip6: String,
}

impl Pod {
    /// Run a command in this pod (its cgroup and network namespace).
    pub fn run(&self, program: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = Command::new(program);
        cmd.args(args);
        in_pod(
            &mut cmd,
            Some(&self.cgroup.path.join("cgroup.procs")),
            Some(&self.ns.path()),
        );
        Ok(cmd.output()?)
    }
    /// Run a command in this pod with its own /etc/resolv.conf naming
    /// `nameserver` (an ordinary resolver address, as a pod would have).
    pub fn run_with_resolver(
        &self,
        nameserver: &str,
        program: &str,
        args: &[&str],
    ) -> Result<Output> {
        let resolv = std::env::temp_dir().join(format!(
            "shunt-resolv-{}-{}",
            self.ns.name,
            nameserver.replace(':', "_")
        ));
        std::fs::write(
            &resolv,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
        )?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        in_pod_with_resolv(
            &mut cmd,
            Some(&self.cgroup.path.join("cgroup.procs")),
            Some(&self.ns.path()),
            Some(&resolv),
        );
        let out = cmd.output();
        let _ = std::fs::remove_file(&resolv);
        Ok(out?)
    }

    /// Start a long-running process in this pod (its cgroup and netns),
    /// stdout and stderr to `log`.
    pub fn spawn(&self, program: &Path, args: &[&str], log: &Path) -> Result<Proc> {
        self.spawn_env(program, args, &[], log)
    }

    pub fn spawn_env(
        &self,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let f = std::fs::File::create(log)?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .envs(env.iter().copied())
            .env("NO_COLOR", "1")
            .stdout(f.try_clone()?)
            .stderr(f);
        in_pod(
            &mut cmd,
            Some(&self.cgroup.path.join("cgroup.procs")),
            Some(&self.ns.path()),
        );
        Ok(Proc {
            child: cmd.spawn()?,
            log: log.to_path_buf(),
        })
    }

    /// The pod's node-side gateway address (IPv4).
    pub fn gateway4(&self) -> String {
        self.ip4.replace(".0.2", ".0.1")
    }

    /// A WorkloadEntry (namespace `ns`, service account `sa`) for this pod,
    /// with its cgroup named by the `shunt.io/cgroup` annotation.
    pub fn workload_entry(&self, ns: &str, sa: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {}\n  namespace: {ns}\n  annotations:\n    shunt.io/cgroup: {}\n  labels:\n    app: {}\nspec:\n  address: {}\n  serviceAccount: {sa}\n",
            self.name,
            self.cgroup.path.display(),
            self.name,
            self.ip4
        )
    }

    /// Run shunt-probe in this pod and return its one-line report.
    pub fn probe(&self, args: &[&str]) -> Result<String> {
        let out = self.run(&probe_bin(), args)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// One test's node: network namespace, cgroup root, pin and state
/// directories. Dropping it stops agents, uninstalls and removes all.
pub struct Node {
    pub id: String,
    pub pods: Vec<Pod>,
    pub agents: Vec<Proc>,
    pub ns: Netns,
    pub cgroup_root: Cgroup,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub work_dir: PathBuf,
    pod_seq: u32,
}

impl Node {
    pub fn new() -> Result<Self> {
        let id = unique_id();
        let ns = Netns::new(format!("shunt-t{id}-node"))?;
        let cgroup_root = Cgroup::new(cgroup2_mount().join(format!("shunt-test-{id}")))?;
        let work_dir = std::env::temp_dir().join(format!("shunt-test-{id}"));
        std::fs::create_dir_all(&work_dir)?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(Self {
            pin_dir: PathBuf::from(format!("/sys/fs/bpf/shunt-test-{id}")),
            state_dir: work_dir.join("state"),
            work_dir,
            id,
            pods: Vec::new(),
            agents: Vec::new(),
            ns,
            cgroup_root,
            pod_seq: 0,
        })
    }

    /// A pod joined to the node by a veth pair, with IPv4 and IPv6
    /// addresses and default routes via the node.
    pub fn add_pod(&mut self, name: &str) -> Result<usize> {
        self.pod_seq += 1;
        let k = self.pod_seq;
        let ns = Netns::new(format!("shunt-t{}-{name}", self.id))?;
        let host_if = format!("vs{}p{k}", self.id);
        anyhow::ensure!(host_if.len() <= 15, "interface name too long: {host_if}");
        sh(
            "ip",
            &[
                "link",
                "add",
                &host_if,
                "netns",
                &self.ns.name,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &ns.name,
            ],
        )?;
        let subnet = 10 + (self.pod_seq % 200);
        let (node4, pod4) = (format!("10.{subnet}.0.1"), format!("10.{subnet}.0.2"));
        let (node6, pod6) = (format!("fd00:{subnet}::1"), format!("fd00:{subnet}::2"));
        self.ns
            .ip(&["addr", "add", &format!("{node4}/24"), "dev", &host_if])?;
        self.ns.ip(&[
            "addr",
            "add",
            &format!("{node6}/64"),
            "dev",
            &host_if,
            "nodad",
        ])?;
        self.ns.ip(&["link", "set", &host_if, "up"])?;
        ns.ip(&["addr", "add", &format!("{pod4}/24"), "dev", "eth0"])?;
        ns.ip(&["addr", "add", &format!("{pod6}/64"), "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["route", "add", "default", "via", &node4])?;
        ns.ip(&["-6", "route", "add", "default", "via", &node6])?;
        let cgroup = Cgroup::new(self.cgroup_root.path.join(name))?;
        self.pods.push(Pod {
            name: name.to_string(),
            ns,
            cgroup,
            ip4: pod4,
            ip6: pod6,
        });
        Ok(self.pods.len() - 1)
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .expect("pod exists")
    }

    /// Common flags for an agent process of this node.
    pub fn agent_args(&self) -> Vec<String> {
        vec![
            "--netns".into(),
            self.ns.path().display().to_string(),
            "--pin-dir".into(),
            self.pin_dir.display().to_string(),
            "--cgroup-root".into(),
            self.cgroup_root.path.display().to_string(),
            "--state-dir".into(),
            self.state_dir.display().to_string(),
        ]
    }

    /// Start an agent binary (`shunt agent` or the echo agent) and wait
    /// until it reports that it is capturing.
    pub fn start_agent(
        &mut self,
        program: &Path,
        leading: &[&str],
        extra: &[&str],
    ) -> Result<usize> {
        let n = self.agents.len();
        let log = self.work_dir.join(format!("agent-{n}.log"));
        let f = std::fs::File::create(&log)?;
        let mut cmd = Command::new(program);
        cmd.args(leading)
            .args(self.agent_args())
            .args(extra)
            .env("NO_COLOR", "1")
            .stdout(f.try_clone()?)
            .stderr(f);
        let child = cmd.spawn()?;
        let mut proc = Proc { child, log };
        let r = wait_for("agent capturing", Duration::from_secs(30), || {
            if proc.log_text().contains("agent capturing") {
                return Some(Ok(()));
            }
            if let Ok(Some(st)) = proc.child.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "agent exited ({st}): {}",
                    proc.log_text()
                )));
            }
            None
        });
        self.agents.push(proc);
        r??;
        Ok(n)
    }

    pub fn start_echo_agent(&mut self) -> Result<usize> {
        self.start_agent(&echo_agent_bin(), &[], &[])
    }

    /// The echo agent reading this node's config directory (and, with
    /// `dns_upstream`, running the DNS proxy).
    pub fn start_echo_agent_with_config(&mut self, dns_upstream: Option<&str>) -> Result<usize> {
        let dir = self.config_dir().display().to_string();
        let mut extra = vec!["--config-dir", dir.as_str()];
        if let Some(u) = dns_upstream {
            extra.extend(["--dns-upstream", u]);
        }
        self.start_agent(&echo_agent_bin(), &[], &extra)
    }

    pub fn maps(&self) -> Result<PinnedMaps> {
        Ok(PinnedMaps::open(&self.pin_dir)?)
    }

    pub fn add_service(&self, dst: &str, service_id: u32) -> Result<()> {
        let mut m = self.maps()?;
        let key = tcp_key(dst.parse()?);
        let v = ServiceValue {
            service_id,
            flags: 0,
            waypoint_addr: [0; 16],
            waypoint_port: 0,
            target_port: key.port,
            _pad: [0; 4],
        };
        m.services.insert(&key, &v, 0)?;
        Ok(())
    }

    pub fn enroll(&self, pod: &str, workload_id: u32) -> Result<()> {
        let mut m = self.maps()?;
        m.enrolled.insert(
            &self.pod(pod).cgroup.id(),
            &EnrolledValue {
                workload_id,
                flags: 0,
            },
            0,
        )?;
        Ok(())
    }

    pub fn counter(&self, c: shunt_common::Counter) -> Result<u64> {
        Ok(self
            .maps()?
            .counters()?
            .into_iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v)
            .unwrap_or(0))
    }

    /// Start a plain listener in the node namespace (outside any pod
    /// cgroup), counting accepted connections in a file.
    pub fn node_listener(&mut self, addr: &str) -> Result<PathBuf> {
        let count = self.work_dir.join(format!(
            "listener-{}.count",
            addr.replace([':', '[', ']'], "_")
        ));
        let log = self
            .work_dir
            .join(format!("listener-{}.log", self.agents.len()));
        let mut cmd = Command::new(probe_bin());
        cmd.args(["listen", addr, "--count-file", &count.display().to_string()])
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(&log)?);
        in_pod(&mut cmd, None, Some(&self.ns.path()));
        let child = cmd.spawn()?;
        self.agents.push(Proc { child, log });
        wait_for("listener ready", Duration::from_secs(10), || {
            count.exists().then_some(())
        })?;
        Ok(count)
    }

    /// The config directory an agent of this node reads.
    pub fn config_dir(&self) -> PathBuf {
        self.work_dir.join("config")
    }

    /// Write (atomically: temp file + rename) one config file.
    pub fn write_config(&self, name: &str, yaml: &str) -> Result<()> {
        let dir = self.config_dir();
        std::fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, dir.join(name))?;
        Ok(())
    }

    pub fn remove_config(&self, name: &str) -> Result<()> {
        std::fs::remove_file(self.config_dir().join(name))?;
        Ok(())
    }

    /// Start dnsmasq in the node namespace on `addr` (added to the node's
    /// lo) as the upstream resolver, answering `records` (name, ip) and
    /// logging every query it receives.
    pub fn start_upstream_dns(&mut self, addr: &str, records: &[(&str, &str)]) -> Result<PathBuf> {
        self.ns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        let log = self.work_dir.join("dnsmasq.log");
        let mut cmd = Command::new("dnsmasq");
        cmd.args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--log-queries",
            "--bind-interfaces",
            &format!("--listen-address={addr}"),
            &format!("--log-facility={}", log.display()),
            "--pid-file=",
            "--user=root",
        ]);
        for (name, ip) in records {
            cmd.arg(format!("--address=/{name}/{ip}"));
        }
        cmd.stdout(std::fs::File::create(self.work_dir.join("dnsmasq.out"))?)
            .stderr(std::fs::File::create(self.work_dir.join("dnsmasq.err"))?);
        in_pod(&mut cmd, None, Some(&self.ns.path()));
        let child = cmd.spawn()?;
        self.agents.push(Proc {
            child,
            log: log.clone(),
        });
        wait_for("dnsmasq started", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("started"))
                .map(|_| ())
        })?;
        Ok(log)
    }

    /// Let the node route between its pods (waypoint, "internet").
    pub fn enable_forwarding(&self) -> Result<()> {
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &self.ns.name,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        Ok(())
    }

    /// Run `shunt uninstall` for this node.
    pub fn uninstall(&self) -> Result<Output> {
        let out = Command::new(shunt_bin())
            .args([
                "uninstall",
                "--pin-dir",
                &self.pin_dir.display().to_string(),
                "--netns",
                &self.ns.path().display().to_string(),
            ])
            .output()?;
        Ok(out)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.agents.clear();
        self.pods.clear();
        let _ = shunt_agent::kernel::loader::remove_pins(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.work_dir);
        // ns and cgroup_root drop after this (fields), removing the routes
        // with the namespace.
    }
}

pub fn read_count(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

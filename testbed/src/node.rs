//! A kernel test's node: a network namespace, a cgroup root, a pin
//! directory and a work directory (config, state, logs), all named from a
//! per-test id so tests run in parallel.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use crate::{
    bins::{echo_agent_bin, probe_bin, shunt_bin},
    cgroup::{cgroup2_mount, Cgroup},
    cmd::{unique_id, wait_for},
    netns::{Netns, Veth},
    pins::PinDir,
    pod::Pod,
    process::Proc,
    workdir::WorkDir,
    Result,
};

/// Dropping it stops agents and other processes (in start order), removes
/// the pods, then the node's namespace, cgroup root, pins and work
/// directory (in field order).
pub struct Node {
    pub id: String,
    pub pods: Vec<Pod>,
    /// Agents and other node processes (listeners, dnsmasq), in start order.
    pub agents: Vec<Proc>,
    pub ns: Netns,
    pub cgroup_root: Cgroup,
    pub pin_dir: PinDir,
    pub state_dir: PathBuf,
    pub work_dir: WorkDir,
    pod_seq: u32,
}

impl Node {
    pub fn new() -> Result<Self> {
        let id = unique_id();
        let ns = Netns::new(format!("shunt-t{id}-node"))?;
        let cgroup_root = Cgroup::new(cgroup2_mount()?.join(format!("shunt-test-{id}")))?;
        let work_dir = WorkDir::new(std::env::temp_dir().join(format!("shunt-test-{id}")))?;
        Ok(Self {
            pin_dir: PinDir::new(&format!("shunt-test-{id}")),
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
        let veth = Veth::new(&self.ns, &host_if, &ns, "eth0")?;
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
            veth,
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
        let mut cmd = Command::new(program);
        cmd.args(leading).args(self.agent_args()).args(extra);
        let mut proc = Proc::spawn(&format!("agent-{n}"), cmd, &log)?;
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
        let mut cmd = self.ns.command(probe_bin());
        cmd.args(["listen", addr, "--count-file", &count.display().to_string()]);
        self.agents.push(Proc::spawn("listener", cmd, &log)?);
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
        let mut cmd = self.ns.command("dnsmasq");
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
        let mut proc = Proc::spawn("dnsmasq", cmd, &self.work_dir.join("dnsmasq.out"))?;
        // Tests read the query log, where dnsmasq writes (not its output).
        proc.log = log.clone();
        self.agents.push(proc);
        wait_for("dnsmasq started", Duration::from_secs(10), || {
            std::fs::read_to_string(&log)
                .ok()
                .filter(|l| l.contains("started"))
                .map(|_| ())
        })?;
        Ok(log)
    }

    /// A DNS upstream at `addr` (port 53, on the node's loopback) that is
    /// bound and never reads: every query forwarded to it waits out the
    /// upstream timeout, and no ICMP answers it either. Drop the process
    /// before the node (it runs in its namespace).
    pub fn blackhole_dns(&self, addr: &str) -> Result<Proc> {
        self.ns
            .ip(&["addr", "add", &format!("{addr}/32"), "dev", "lo"])?;
        let mut sink = self.ns.command("python3");
        sink.args([
            "-c",
            &format!("import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('{addr}',53))\nprint('bound',flush=True)\ntime.sleep(3600)"),
        ]);
        let log = self.work_dir.join("blackhole.log");
        let proc = Proc::spawn("blackhole", sink, &log)?;
        wait_for("blackhole bound", Duration::from_secs(10), || {
            proc.log_text().contains("bound").then_some(())
        })?;
        Ok(proc)
    }

    /// Let the node route between its pods (waypoint, "internet").
    pub fn enable_forwarding(&self) -> Result<()> {
        let out = self
            .ns
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "sysctl in {}: {}",
            self.ns.name,
            String::from_utf8_lossy(&out.stderr).trim()
        );
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
        // The fields then drop in order: namespace, cgroup root, pins,
        // work directory.
    }
}

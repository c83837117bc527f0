//! A kernel test's pod: a network namespace joined to the node by a veth
//! pair, and a cgroup under the node's cgroup root.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::{
    bins::probe_bin, cgroup::Cgroup, netns::Netns, netns::Veth, process::Enter, process::Proc,
    Result,
};

/// Built by [`crate::Node::add_pod`]. Fields drop in order: the veth, the
/// namespace (killing what is left inside), then the cgroup.
pub struct Pod {
    pub name: String,
    pub veth: Veth,
    pub ns: Netns,
    pub cgroup: Cgroup,
    pub ip4: String,
    pub ip6: String,
}

impl Pod {
    /// Where this pod's processes run: its cgroup, then its namespace.
    pub fn enter(&self) -> Enter {
        self.ns.enter().cgroup(&self.cgroup.path)
    }

    /// Run a command in this pod.
    pub fn run(&self, program: &Path, args: &[&str]) -> Result<Output> {
        let mut cmd = self.enter().command(program);
        cmd.args(args);
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
        let (mut cmd, resolv) = self.with_resolver(nameserver, Path::new(program))?;
        cmd.args(args);
        let out = cmd.output();
        let _ = std::fs::remove_file(&resolv);
        Ok(out?)
    }

    /// [`Pod::spawn_env`] with the pod's own /etc/resolv.conf naming
    /// `nameserver` (a waypoint resolving upstream names as a pod would).
    pub fn spawn_with_resolver(
        &self,
        nameserver: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let (mut cmd, resolv) = self.with_resolver(nameserver, program)?;
        cmd.args(args).envs(env.iter().copied());
        let proc = Proc::spawn(&self.name, cmd, log);
        // Mounted before exec: the running process keeps the file.
        let _ = std::fs::remove_file(&resolv);
        proc
    }

    /// `program` in this pod with a resolv.conf naming `nameserver` bound
    /// over /etc/resolv.conf, and that file (the caller removes it).
    fn with_resolver(&self, nameserver: &str, program: &Path) -> Result<(Command, PathBuf)> {
        let resolv = std::env::temp_dir().join(format!(
            "shunt-resolv-{}-{}-{}",
            self.ns.name,
            nameserver.replace(':', "_"),
            crate::unique_id()
        ));
        std::fs::write(
            &resolv,
            format!("nameserver {nameserver}\noptions timeout:2 attempts:1\n"),
        )?;
        let cmd = self
            .enter()
            .bind(&resolv, "/etc/resolv.conf")
            .command(program);
        Ok((cmd, resolv))
    }

    /// Start a long-running process in this pod, stdout and stderr to `log`.
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
        let mut cmd: Command = self.enter().command(program);
        cmd.args(args).envs(env.iter().copied());
        Proc::spawn(&self.name, cmd, log)
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

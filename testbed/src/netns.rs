//! Network namespaces and veth pairs.

use std::{
    ffi::OsStr,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::{Duration, Instant},
};

use crate::{cmd::sh, process::Enter, Result};

/// Where `ip netns exec` (and [`Enter`]) find a namespace's own /etc files.
const ETC_NETNS: &str = "/etc/netns";

/// A named network namespace (`ip netns add`), loopback up. Dropping it
/// kills the processes still inside (never the current one), deletes the
/// namespace (its veths and routes go with it) and its `/etc/netns/NAME/`.
pub struct Netns {
    pub name: String,
    removed: bool,
}

impl Netns {
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        sh("ip", &["netns", "add", &name])?;
        let ns = Self {
            name,
            removed: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// As [`Netns::new`], with files for `/etc/netns/NAME/` (e.g.
    /// `resolv.conf`, `hosts`) that every process entering it through
    /// [`Netns::enter`] (or `ip netns exec`) sees over `/etc`.
    pub fn with_etc(name: impl Into<String>, files: &[(&str, &str)]) -> Result<Self> {
        let ns = Self::new(name)?;
        if !files.is_empty() {
            let dir = ns.etc_dir();
            std::fs::create_dir_all(&dir)?;
            for (f, text) in files {
                std::fs::write(dir.join(f), text)?;
            }
        }
        Ok(ns)
    }

    /// Take charge of every namespace whose name starts with `prefix`
    /// (an interrupted run's leftovers, with their `/etc/netns/` files), to
    /// remove them.
    pub fn adopt_all(prefix: &str) -> Vec<Netns> {
        let mut names: Vec<String> = Self::list();
        if let Ok(rd) = std::fs::read_dir(ETC_NETNS) {
            names.extend(
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned()),
            );
        }
        names.retain(|n| n.starts_with(prefix));
        names.sort();
        names.dedup();
        names
            .into_iter()
            .map(|name| Netns {
                name,
                removed: false,
            })
            .collect()
    }

    /// Names of all named network namespaces.
    pub fn list() -> Vec<String> {
        let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
            return vec![];
        };
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect()
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.name))
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new(ETC_NETNS).join(&self.name)
    }

    /// `ip -n NAME ARGS...`, which must succeed.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        sh("ip", &a)
    }

    /// Where a process runs to be in this namespace, with its /etc files.
    pub fn enter(&self) -> Enter {
        let mut e = Enter::new().netns(self.path());
        if let Ok(rd) = std::fs::read_dir(self.etc_dir()) {
            for f in rd.flatten() {
                e = e.bind(f.path(), Path::new("/etc").join(f.file_name()));
            }
        }
        e
    }

    /// A command that runs in this namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        self.enter().command(program)
    }

    /// Processes in this namespace (`ip netns pids`).
    pub fn pids(&self) -> Vec<i32> {
        let Ok(out) = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
        else {
            return vec![];
        };
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// Remove now, reporting what could not be removed.
    pub fn close(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.removed, true) {
            return Ok(());
        }
        let me = std::process::id() as i32;
        let pids: Vec<i32> = self.pids().into_iter().filter(|p| *p != me).collect();
        kill_all(&pids);
        let del = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output()?;
        let etc = self.etc_dir();
        if etc.exists() {
            std::fs::remove_dir_all(&etc)?;
        }
        if !del.status.success() && Self::list().contains(&self.name) {
            anyhow::bail!(
                "netns {}: {}",
                self.name,
                String::from_utf8_lossy(&del.stderr).trim()
            );
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// SIGTERM, up to 5 s for them to go, then SIGKILL.
pub(crate) fn kill_all(pids: &[i32]) {
    if pids.is_empty() {
        return;
    }
    for &pid in pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    let end = Instant::now() + Duration::from_secs(5);
    while Instant::now() < end
        && pids
            .iter()
            .any(|p| Path::new(&format!("/proc/{p}")).exists())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for &pid in pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// A veth pair between two namespaces. Deleting either end deletes both;
/// so does deleting either namespace, which is why dropping this after its
/// namespaces is fine.
pub struct Veth {
    /// The namespace of the end this guard deletes, and that end's name.
    pub ns: String,
    pub name: String,
}

impl Veth {
    /// `a_if` in `a`, `b_if` in `b`; both ends left down.
    pub fn new(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<Self> {
        anyhow::ensure!(a_if.len() <= 15, "interface name too long: {a_if}");
        anyhow::ensure!(b_if.len() <= 15, "interface name too long: {b_if}");
        a.ip(&[
            "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", &b.name,
        ])?;
        Ok(Self {
            ns: a.name.clone(),
            name: a_if.to_string(),
        })
    }
}

impl Drop for Veth {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["-n", &self.ns, "link", "del", &self.name])
            .output();
    }
}

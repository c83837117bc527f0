//! Child processes: [`Enter`] says where one runs, [`Proc`] stops it on drop.

use std::{
    ffi::{CString, OsStr},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    cmd::{read_lossy, tail, wait_for},
    Result,
};

/// Where a child runs: it joins a cgroup, then a network namespace, then
/// (in a private mount namespace) has files bind-mounted over others —
/// the order matters: `ip netns exec` would remount /sys and hide the
/// cgroup tree, and the cgroup hooks key on the cgroup. Cheap to clone and
/// `Send`, so a thread can start a pod's command.
#[derive(Clone, Debug, Default)]
pub struct Enter {
    cgroup: Option<PathBuf>,
    netns: Option<PathBuf>,
    binds: Vec<(PathBuf, PathBuf)>,
}

impl Enter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Join the cgroup directory `dir` (writes to its `cgroup.procs`).
    pub fn cgroup(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cgroup = Some(dir.into());
        self
    }

    /// Join the network namespace at `path` (e.g. `/var/run/netns/NAME`).
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// Bind-mount `src` over `over` (e.g. a resolv.conf over
    /// /etc/resolv.conf), as `ip netns exec` does with /etc/netns/NAME/.
    pub fn bind(mut self, src: impl Into<PathBuf>, over: impl Into<PathBuf>) -> Self {
        self.binds.push((src.into(), over.into()));
        self
    }

    /// Make `cmd` start there.
    pub fn apply(&self, cmd: &mut Command) {
        let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).expect("no NUL in a path");
        let procs = self.cgroup.as_deref().map(|d| c(&d.join("cgroup.procs")));
        let ns = self.netns.as_deref().map(c);
        let binds: Vec<(CString, CString)> = self.binds.iter().map(|(s, o)| (c(s), c(o))).collect();
        let root = CString::new("/").expect("no NUL");
        // SAFETY: only async-signal-safe syscalls between fork and exec, on
        // buffers prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(procs) = &procs {
                    let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if r < 0 {
                        return Err(err);
                    }
                }
                if let Some(ns) = &ns {
                    let fd = libc::open(ns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
                    if fd < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let r = libc::setns(fd, libc::CLONE_NEWNET);
                    let err = std::io::Error::last_os_error();
                    libc::close(fd);
                    if r < 0 {
                        return Err(err);
                    }
                }
                if !binds.is_empty() {
                    if libc::unshare(libc::CLONE_NEWNS) < 0
                        || libc::mount(
                            std::ptr::null(),
                            root.as_ptr(),
                            std::ptr::null(),
                            libc::MS_REC | libc::MS_PRIVATE,
                            std::ptr::null(),
                        ) < 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    for (src, over) in &binds {
                        if libc::mount(
                            src.as_ptr(),
                            over.as_ptr(),
                            std::ptr::null(),
                            libc::MS_BIND,
                            std::ptr::null(),
                        ) < 0
                        {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                Ok(())
            });
        }
    }

    /// A command that starts there.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new(program);
        self.apply(&mut cmd);
        cmd
    }
}

/// A long-running child, stdout and stderr to a log file; stopped
/// (SIGTERM, then SIGKILL after 5 s) on drop.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Start `cmd` (stdin from /dev/null, `NO_COLOR=1`), logging to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Result<Self> {
        let f = std::fs::File::create(log)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .env("NO_COLOR", "1");
        let child = cmd.spawn().map_err(|e| {
            anyhow::anyhow!("starting {name} ({}): {e}", cmd.get_program().display())
        })?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        read_lossy(&self.log)
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

    /// Fails, with the log's last lines, if the process has exited.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(st) = self.child.try_wait()? {
            anyhow::bail!(
                "{} exited ({st}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL if it has not exited within 5 s.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        if !self.wait_exit(Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

//! cgroup v2 directories.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::Result;

/// The cgroup2 mount point (from /proc/mounts).
pub fn cgroup2_mount() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts")?;
    mounts
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(dir))
        })
        .ok_or_else(|| anyhow::anyhow!("no cgroup2 filesystem in /proc/mounts"))
}

/// A cgroup directory (and any below it), removed on drop once its
/// processes are gone: a straggler still inside after a second is killed
/// (`cgroup.kill`), unless it is the current process.
pub struct Cgroup {
    pub path: PathBuf,
    removed: bool,
}

impl Cgroup {
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        std::fs::create_dir_all(&path)?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    /// Take charge of a cgroup that may exist (an interrupted run's), to
    /// remove it.
    pub fn adopt(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            removed: false,
        }
    }

    /// The cgroup id the kernel reports from bpf_get_current_cgroup_id().
    pub fn id(&self) -> u64 {
        std::fs::metadata(&self.path).expect("cgroup dir").ino()
    }

    /// Remove now, reporting failure.
    pub fn close(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.removed, true) || !self.path.exists() {
            return Ok(());
        }
        let start = Instant::now();
        let mut killed = false;
        loop {
            let r = rmdir_tree(&self.path);
            if r.is_ok() || !self.path.exists() {
                return Ok(());
            }
            // Processes may still be exiting; past a second, kill them.
            if !killed && start.elapsed() > Duration::from_secs(1) && !holds_self(&self.path) {
                let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
                killed = true;
            }
            if start.elapsed() > Duration::from_secs(5) {
                return Err(anyhow::anyhow!(
                    "cgroup {}: {}",
                    self.path.display(),
                    r.unwrap_err()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// cgroup directories are removed with rmdir (their files are virtual),
/// leaves first.
fn rmdir_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_type()?.is_dir() {
            rmdir_tree(&e.path())?;
        }
    }
    std::fs::remove_dir(dir)
}

/// Whether the current process is in `dir` or below it.
fn holds_self(dir: &Path) -> bool {
    let (Ok(mount), Ok(own)) = (
        cgroup2_mount(),
        std::fs::read_to_string("/proc/self/cgroup"),
    ) else {
        return true;
    };
    own.lines()
        .filter_map(|l| l.strip_prefix("0::"))
        .any(|rel| mount.join(rel.trim_start_matches('/')).starts_with(dir))
}

/// The kubelet's cgroup driver, which decides where a pod's cgroups go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope`
    Systemd,
    /// `kubepods/<qos>/pod<uid>/<id>`
    Cgroupfs,
}

/// A pod's cgroups laid out below `root` as the kubelet does for a
/// Burstable or BestEffort pod (`qos` is `burstable` or `besteffort`), for
/// tests of the API source's enrollment. Written independently of the
/// agent's own path code, from the kubelet's layout.
#[derive(Clone, Debug)]
pub struct KubeletPod {
    pub driver: CgroupDriver,
    /// The pod-level cgroup (no process runs in it).
    pub dir: PathBuf,
}

impl KubeletPod {
    pub fn new(root: &Path, driver: CgroupDriver, qos: &str, uid: &str) -> Self {
        let dir = match driver {
            CgroupDriver::Systemd => root
                .join("kubepods.slice")
                .join(format!("kubepods-{qos}.slice"))
                .join(format!("kubepods-{qos}-pod{}.slice", uid.replace('-', "_"))),
            CgroupDriver::Cgroupfs => root.join("kubepods").join(qos).join(format!("pod{uid}")),
        };
        Self { driver, dir }
    }

    /// Create the pod-level cgroup (the kubelet does, before any container).
    pub fn create(&self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        Ok(())
    }

    /// Create a container's cgroup (the runtime does, when it starts one).
    pub fn add_container(&self, id: &str) -> Result<PathBuf> {
        let p = match self.driver {
            CgroupDriver::Systemd => self.dir.join(format!("cri-containerd-{id}.scope")),
            CgroupDriver::Cgroupfs => self.dir.join(id),
        };
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }
}

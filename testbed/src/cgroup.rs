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

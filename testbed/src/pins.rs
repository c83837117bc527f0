//! A bpffs pin directory.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

use crate::Result;

/// A pin directory under /sys/fs/bpf that the agent under test creates;
/// removed with everything in it on drop (unpinning a link detaches its
/// program once no process holds it).
pub struct PinDir {
    path: PathBuf,
    removed: bool,
}

impl PinDir {
    /// `/sys/fs/bpf/NAME` (not created: the agent does that).
    pub fn new(name: &str) -> Self {
        Self::adopt(Path::new("/sys/fs/bpf").join(name))
    }

    /// Take charge of a pin directory that may exist, to remove it.
    pub fn adopt(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            removed: false,
        }
    }

    /// Remove now, reporting failure.
    pub fn close(mut self) -> Result<()> {
        self.remove()
    }

    fn remove(&mut self) -> Result<()> {
        if std::mem::replace(&mut self.removed, true) || !self.path.exists() {
            return Ok(());
        }
        std::fs::remove_dir_all(&self.path)
            .map_err(|e| anyhow::anyhow!("pins {}: {e}", self.path.display()))
    }
}

impl Deref for PinDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

//! A work directory for logs, config and state.

use std::{
    ops::Deref,
    path::{Path, PathBuf},
};

use crate::Result;

/// A directory that starts empty and is removed on drop, unless made
/// with [`WorkDir::kept`].
pub struct WorkDir {
    path: PathBuf,
    keep: bool,
}

impl WorkDir {
    /// `path`, emptied now and removed on drop.
    pub fn new(path: impl Into<PathBuf>) -> Result<Self> {
        Self::make(path.into(), false)
    }

    /// `path`, emptied now and kept after the run so its logs can be read.
    pub fn kept(path: impl Into<PathBuf>) -> Result<Self> {
        Self::make(path.into(), true)
    }

    fn make(path: PathBuf, keep: bool) -> Result<Self> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .map_err(|e| anyhow::anyhow!("emptying {}: {e}", path.display()))?;
        }
        std::fs::create_dir_all(&path)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", path.display()))?;
        Ok(Self { path, keep })
    }
}

impl Deref for WorkDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

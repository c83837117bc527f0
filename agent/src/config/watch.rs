//! Live reload: polls a config directory and publishes each new valid
//! `Config`. Polling (not inotify) works on every filesystem, including
//! ConfigMap volumes whose files are swapped by symlink renames.
//!
//! Each poll compares a cheap fingerprint (names, sizes, mtimes); when it
//! changes, or every `FULL_EVERY` polls in case an edit kept size and mtime,
//! the files are read and their content hashed. Only a new content hash is
//! parsed. An invalid directory is logged with all its problems, published on
//! `rejected`, and the previous good config stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{load, Config, ConfigError, Snapshot};

/// Default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(300);
/// Re-hash contents at least this often (in polls) even if metadata is equal.
const FULL_EVERY: u32 = 10;

/// Handle of the watcher task; dropping it stops the task.
pub struct ConfigWatcher {
    /// The config in force: `None` until the directory was valid once.
    pub config: watch::Receiver<Option<Arc<Config>>>,
    /// The last rejected directory content, `None` once a later one is valid.
    pub rejected: watch::Receiver<Option<Arc<ConfigError>>>,
    task: JoinHandle<()>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ConfigWatcher {
    /// Loads `dir` once synchronously (so the caller sees the initial state
    /// at once), then polls it every `interval` on a tokio task. Must be
    /// called inside a tokio runtime.
    pub fn spawn(dir: PathBuf, interval: Duration) -> ConfigWatcher {
        let mut st = State {
            dir,
            fingerprint: None,
            digest: None,
        };
        let (cfg, rej) = match st.poll(true) {
            Outcome::Valid(c) => (Some(c), None),
            Outcome::Invalid(e) => (None, Some(e)),
            Outcome::Unchanged => (None, None),
        };
        let (cfg_tx, config) = watch::channel(cfg);
        let (rej_tx, rejected) = watch::channel(rej);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut n = 0u32;
            loop {
                tick.tick().await;
                n = n.wrapping_add(1);
                let full = n.is_multiple_of(FULL_EVERY);
                let (back, out) = match tokio::task::spawn_blocking(move || {
                    let o = st.poll(full);
                    (st, o)
                })
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "config poll task failed");
                        return;
                    }
                };
                st = back;
                match out {
                    Outcome::Unchanged => {}
                    Outcome::Valid(c) => {
                        rej_tx.send_replace(None);
                        if cfg_tx.send(Some(c)).is_err() {
                            return; // nobody listens any more
                        }
                    }
                    Outcome::Invalid(e) => {
                        rej_tx.send_replace(Some(e));
                    }
                }
            }
        });
        ConfigWatcher {
            config,
            rejected,
            task,
        }
    }

    /// The config in force now.
    pub fn current(&self) -> Option<Arc<Config>> {
        self.config.borrow().clone()
    }
}

enum Outcome {
    Unchanged,
    Valid(Arc<Config>),
    Invalid(Arc<ConfigError>),
}

struct State {
    dir: PathBuf,
    fingerprint: Option<Vec<(PathBuf, u64, Option<SystemTime>)>>,
    /// Content hash of the last snapshot parsed (valid or not).
    digest: Option<u64>,
}

fn fingerprint(dir: &Path) -> Option<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    let files = load::list_yaml(dir).ok()?;
    Some(
        files
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(&p).ok();
                let len = m.as_ref().map(|m| m.len()).unwrap_or(u64::MAX);
                let mtime = m.and_then(|m| m.modified().ok());
                (p, len, mtime)
            })
            .collect(),
    )
}

impl State {
    fn poll(&mut self, full: bool) -> Outcome {
        let fp = fingerprint(&self.dir);
        if !full && fp.is_some() && fp == self.fingerprint {
            return Outcome::Unchanged;
        }
        let snap = match Snapshot::read(&self.dir) {
            Ok(s) => s,
            Err(e) => {
                // Reported once per distinct failure: remember a pseudo-digest.
                let d = hash_str(&e.to_string());
                self.fingerprint = fp;
                if self.digest == Some(d) {
                    return Outcome::Unchanged;
                }
                self.digest = Some(d);
                tracing::error!("config rejected, previous config stays in force: {e}");
                return Outcome::Invalid(Arc::new(e));
            }
        };
        self.fingerprint = fp;
        if self.digest == Some(snap.digest) {
            return Outcome::Unchanged;
        }
        self.digest = Some(snap.digest);
        match snap.parse() {
            Ok(c) => {
                tracing::info!(
                    dir = %self.dir.display(),
                    service_entries = c.service_entries.len(),
                    workload_entries = c.workload_entries.len(),
                    gateways = c.gateways.len(),
                    authorization_policies = c.authorization_policies.len(),
                    destination_rules = c.destination_rules.len(),
                    "config loaded"
                );
                Outcome::Valid(Arc::new(c))
            }
            Err(e) => {
                tracing::error!("config rejected, previous config stays in force: {e}");
                Outcome::Invalid(Arc::new(e))
            }
        }
    }
}

fn hash_str(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

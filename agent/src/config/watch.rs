//! Live reload: polls a config directory and publishes each new valid
//! `Config`. Polling works on every filesystem, including ConfigMap volumes
//! whose files are swapped by symlink renames; an inotify watch on the
//! directory only wakes the poll early ([`Wakeup`]), so that an edit is read
//! within milliseconds instead of at the next tick, and the poll stays the
//! one source of truth.
//!
//! Each poll compares a cheap fingerprint (names, sizes, mtimes); when it
//! changes the files whose fingerprint changed are read and their content
//! hashed (the others are taken from the last snapshot), and every
//! `FULL_EVERY` polls, in case an edit kept size and mtime, all of them;
//! a file an inotify event names is read whatever its metadata (a rewrite
//! of the same size within one tick of the coarse mtime clock keeps
//! both). Only a new content hash is
//! parsed, and of it only the files whose content changed (the watcher's
//! [`Parser`] keeps the others' parse). An invalid directory is logged with all its problems, published on
//! `rejected`, and the previous good config stays in force.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::{FutureExt, StreamExt};
use inotify::{EventStream, Inotify, WatchMask};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{load, Config, ConfigError, Parser, Snapshot};

/// Default poll interval.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(300);
/// Re-hash contents at least this often (in polls) even if metadata is equal.
const FULL_EVERY: u32 = 10;
/// After a directory event, how long the writer gets to finish its burst
/// (an editor's write and rename, kubelet's symlink swap) before the read.
const SETTLE: Duration = Duration::from_millis(10);

/// Wakes the poll when something in the directory is written, renamed,
/// removed or touched. Not `IN_CREATE`/`IN_MODIFY`: they fire before a
/// file's content is complete, and reading then would reject a half-written
/// file. Without inotify (no instances left, a filesystem without events)
/// the poll alone runs, as before.
struct Wakeup(Option<EventStream<[u8; 4096]>>);

impl Wakeup {
    fn watch(dir: &Path) -> Wakeup {
        let open = || -> std::io::Result<EventStream<[u8; 4096]>> {
            let ino = Inotify::init()?;
            ino.watches().add(
                dir,
                WatchMask::CLOSE_WRITE
                    | WatchMask::MOVED_TO
                    | WatchMask::MOVED_FROM
                    | WatchMask::DELETE
                    | WatchMask::ATTRIB,
            )?;
            ino.into_event_stream([0; 4096])
        };
        match open() {
            Ok(s) => Wakeup(Some(s)),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "no inotify watch on the config directory; edits are read at the next poll");
                Wakeup(None)
            }
        }
    }

    /// Resolves on the next event (never without a watch), then lets the
    /// burst settle and takes what else arrived meanwhile: the names of the
    /// files the events were about.
    async fn changed(&mut self) -> Vec<OsString> {
        let Some(events) = &mut self.0 else {
            return std::future::pending().await;
        };
        let mut named = Vec::new();
        match events.next().await {
            Some(Ok(ev)) => named.extend(ev.name),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "config directory events failed; polling only");
                self.0 = None;
                return named;
            }
            None => {
                self.0 = None;
                return named;
            }
        }
        tokio::time::sleep(SETTLE).await;
        while let Some(Some(Ok(ev))) = events.next().now_or_never() {
            named.extend(ev.name);
        }
        named
    }
}

/// Handle of the watcher task; dropping it stops the task.
pub struct ConfigWatcher {
    /// The config in force: `None` until the directory was valid once.
    pub config: watch::Receiver<Option<Arc<Config>>>,
    /// The last rejected directory content, `None` once a later one is valid.
    pub rejected: watch::Receiver<Option<Arc<ConfigError>>>,
    /// Whether the source can be read (a directory always can; the API
    /// source is down while the API server is unreachable).
    pub health: watch::Receiver<SourceHealth>,
    task: JoinHandle<()>,
}

/// A config source's connection state, for metrics and `shunt status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceHealth {
    /// `directory` or `kubernetes`.
    pub source: &'static str,
    /// Every part of the source was read successfully the last time it was
    /// tried. While false the last good config stays in force.
    pub up: bool,
    /// Why not up.
    pub error: Option<String>,
    /// Last time the source was known complete and current.
    pub last_sync: Option<SystemTime>,
}

impl Drop for ConfigWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// File in the state directory where the agent keeps its config source's
/// health for `shunt status` (which may run in another PID namespace).
pub const HEALTH_FILE: &str = "config-source.json";

/// The JSON form of [`SourceHealth`] in [`HEALTH_FILE`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HealthRecord {
    pub source: String,
    pub up: bool,
    pub error: Option<String>,
    /// Unix seconds.
    pub last_sync: Option<u64>,
}

impl From<&SourceHealth> for HealthRecord {
    fn from(h: &SourceHealth) -> Self {
        HealthRecord {
            source: h.source.to_string(),
            up: h.up,
            error: h.error.clone(),
            last_sync: h
                .last_sync
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_secs()),
        }
    }
}

/// Writes every health change to `path` (write to a temporary file, then
/// rename) until the source ends.
pub fn persist_health(mut rx: watch::Receiver<SourceHealth>, path: PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let rec = HealthRecord::from(&*rx.borrow_and_update());
            let tmp = path.with_extension("json.tmp");
            let res = serde_json::to_vec(&rec)
                .map_err(std::io::Error::other)
                .and_then(|b| std::fs::write(&tmp, b))
                .and_then(|_| std::fs::rename(&tmp, &path));
            if let Err(e) = res {
                tracing::warn!(path = %path.display(), error = %e, "cannot record the config source's health");
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    })
}

impl ConfigWatcher {
    /// Loads `dir` once synchronously (so the caller sees the initial state
    /// at once), then polls it every `interval` on a tokio task. Must be
    /// called inside a tokio runtime.
    pub fn spawn(dir: PathBuf, interval: Duration) -> ConfigWatcher {
        let mut wakeup = Wakeup::watch(&dir);
        let mut st = State {
            dir,
            fingerprint: None,
            digest: None,
            valid: None,
            parser: Parser::default(),
            last: None,
        };
        let (cfg, rej) = match st.poll(true, &[]) {
            Outcome::Valid(c) => (Some(c), None),
            Outcome::Invalid(e) => (None, Some(e)),
            Outcome::Unchanged | Outcome::Recovered => (None, None),
        };
        let (cfg_tx, config) = watch::channel(cfg);
        let (rej_tx, rejected) = watch::channel(rej);
        let (_, health) = watch::channel(SourceHealth {
            source: "directory",
            up: true,
            error: None,
            last_sync: Some(SystemTime::now()),
        });
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            let mut n = 0u32;
            loop {
                let named = tokio::select! {
                    _ = tick.tick() => Vec::new(),
                    named = wakeup.changed() => {
                        tick.reset();
                        named
                    }
                };
                n = n.wrapping_add(1);
                let full = n.is_multiple_of(FULL_EVERY);
                let (back, out) = match tokio::task::spawn_blocking(move || {
                    let o = st.poll(full, &named);
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
                    Outcome::Recovered => {
                        rej_tx.send_replace(None);
                    }
                }
            }
        });
        ConfigWatcher {
            config,
            rejected,
            health,
            task,
        }
    }

    /// A watcher over channels fed by `task` (another source's).
    pub(crate) fn from_parts(
        config: watch::Receiver<Option<Arc<Config>>>,
        rejected: watch::Receiver<Option<Arc<ConfigError>>>,
        health: watch::Receiver<SourceHealth>,
        task: JoinHandle<()>,
    ) -> ConfigWatcher {
        ConfigWatcher {
            config,
            rejected,
            health,
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
    /// After a rejection (an unreadable directory, a bad edit undone), the
    /// files are again those of the config in force: nothing to apply.
    Recovered,
    Valid(Arc<Config>),
    Invalid(Arc<ConfigError>),
}

/// Each file's path, size and mtime.
type Fingerprint = Vec<(PathBuf, u64, Option<SystemTime>)>;

struct State {
    dir: PathBuf,
    fingerprint: Option<Fingerprint>,
    /// Content hash of the last snapshot parsed (valid or not).
    digest: Option<u64>,
    /// Content hash of the last snapshot parsed valid: the config in force.
    valid: Option<u64>,
    parser: Parser,
    /// The last snapshot read, and the fingerprint it was read under.
    last: Option<(Arc<Snapshot>, Fingerprint)>,
}

fn fingerprint(dir: &Path) -> Option<Fingerprint> {
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
    /// `named`: files a directory event named, read whatever their
    /// metadata says.
    fn poll(&mut self, full: bool, named: &[OsString]) -> Outcome {
        let started = std::time::Instant::now();
        let fp = fingerprint(&self.dir);
        if !full && named.is_empty() && fp.is_some() && fp == self.fingerprint {
            return Outcome::Unchanged;
        }
        // Outside full polls a file whose name, size and mtime are as when
        // it was last read, and that no event named, is taken as read then.
        let same = |p: &Path| match (&self.last, &fp) {
            _ if p.file_name().is_some_and(|f| named.iter().any(|n| n == f)) => false,
            (Some((_, old)), Some(new)) if !full => {
                let at =
                    |v: &Fingerprint| v.iter().find(|(q, _, _)| q == p).map(|(_, l, m)| (*l, *m));
                at(old).is_some_and(|o| o.1.is_some() && Some(o) == at(new))
            }
            _ => false,
        };
        let read = Snapshot::read_reusing(&self.dir, self.last.as_ref().map(|l| &*l.0), same);
        let snap = match read {
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
        let snap = Arc::new(snap);
        self.last = fp.clone().map(|f| (snap.clone(), f));
        self.fingerprint = fp;
        if self.digest == Some(snap.digest) {
            return Outcome::Unchanged;
        }
        self.digest = Some(snap.digest);
        // A transient failure (EMFILE while the data path holds every fd)
        // must not make the same config look new: re-applying 100k entries
        // costs seconds.
        if self.valid == Some(snap.digest) {
            tracing::info!(dir = %self.dir.display(), "config directory readable again; the config in force is unchanged");
            return Outcome::Recovered;
        }
        let digest = snap.digest;
        match self.parser.parse(snap) {
            Ok(c) => {
                self.valid = Some(digest);
                tracing::info!(
                    dir = %self.dir.display(),
                    service_entries = c.service_entries.len(),
                    workload_entries = c.workload_entries.len(),
                    gateways = c.gateways.len(),
                    authorization_policies = c.authorization_policies.len(),
                    destination_rules = c.destination_rules.len(),
                    took_ms = started.elapsed().as_millis() as u64,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Read on the directory's event: with an hourly poll, only the inotify
    /// wake-up can publish the edit.
    #[tokio::test]
    async fn an_edit_is_read_on_the_directory_event_not_at_the_next_poll() {
        let d = tempfile::tempdir().unwrap();
        let mesh = |td: &str| format!("trustDomain: {td}\n");
        std::fs::write(d.path().join("mesh.yaml"), mesh("a.local")).unwrap();
        let mut w = ConfigWatcher::spawn(d.path().to_path_buf(), Duration::from_secs(3600));
        assert_eq!(w.current().expect("valid").trust_domain(), "a.local");
        // An editor's save: a new file renamed over the old one.
        std::fs::write(d.path().join(".mesh.yaml.swp"), mesh("b.local")).unwrap();
        std::fs::rename(d.path().join(".mesh.yaml.swp"), d.path().join("mesh.yaml")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            w.config
                .wait_for(|c| c.as_ref().is_some_and(|c| c.trust_domain() == "b.local")),
        )
        .await
        .expect("published on the event, long before the hourly poll")
        .unwrap();
        // An edit in place (written and closed) too.
        std::fs::write(d.path().join("mesh.yaml"), mesh("c.local")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            w.config
                .wait_for(|c| c.as_ref().is_some_and(|c| c.trust_domain() == "c.local")),
        )
        .await
        .expect("an in-place write is published on its event")
        .unwrap();
        // A rewrite that keeps size and mtime (as one within a tick of the
        // coarse mtime clock does): the event names the file, so it is read.
        let p = d.path().join("mesh.yaml");
        let mtime = std::fs::metadata(&p).unwrap().modified().unwrap();
        std::fs::write(&p, mesh("d.local")).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&p)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        tokio::time::timeout(
            Duration::from_secs(20),
            w.config
                .wait_for(|c| c.as_ref().is_some_and(|c| c.trust_domain() == "d.local")),
        )
        .await
        .expect("a rewrite with the same size and mtime is published on its event")
        .unwrap();
    }
}

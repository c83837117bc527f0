//! ServiceEntry status as Istio writes it (`status.addresses` and the
//! `istio.io/WaypointBound` condition), and the clock that keeps each
//! condition's `lastTransitionTime` across reloads and restarts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::render::{ServiceEntryStatus, StatusAddress, StatusCondition, WAYPOINT_BOUND};
use crate::config::ObjectKey;

use super::cow::{CowMap, Difference};
use super::waypoint::WaypointBinding;

/// The message of an entry without a waypoint (most of them: one text).
const NOT_BOUND: &str = "not bound to any waypoint: no istio.io/use-waypoint label on the ServiceEntry or its Namespace";

/// The condition for a binding (without `lastTransitionTime`).
pub(super) fn waypoint_condition(b: &WaypointBinding) -> StatusCondition {
    let (status, reason, message) = match b {
        WaypointBinding::Bound(w) => (
            "True",
            "WaypointAccepted",
            Cow::Owned(format!("Successfully attached to waypoint {}", w.gateway)),
        ),
        WaypointBinding::None => ("False", "NotBound", Cow::Borrowed(NOT_BOUND)),
        WaypointBinding::Refused(u) => ("False", u.reason, Cow::Owned(u.message.clone())),
    };
    StatusCondition {
        last_transition_time: None,
        message,
        reason: Cow::Borrowed(reason),
        status: Cow::Borrowed(status),
        type_: Cow::Borrowed(WAYPOINT_BOUND),
    }
}

/// The conditions of a binding, not stamped yet; those of an unbound entry
/// (most of them) are one list.
pub(super) fn conditions(b: &WaypointBinding) -> Arc<[StatusCondition]> {
    static NONE: std::sync::LazyLock<Arc<[StatusCondition]>> =
        std::sync::LazyLock::new(|| Arc::new([waypoint_condition(&WaypointBinding::None)]));
    match b {
        WaypointBinding::None => NONE.clone(),
        _ => Arc::new([waypoint_condition(b)]),
    }
}

/// Equal condition lists given one `Arc`: an apply stamps most entries
/// with the same condition and time (and a restart loads them so). The
/// last few lists made are looked at.
#[derive(Default)]
struct Shared(Vec<Arc<[StatusCondition]>>);

impl Shared {
    const KEEP: usize = 8;

    fn get(&mut self, conditions: Vec<StatusCondition>) -> Arc<[StatusCondition]> {
        if let Some(s) = self.0.iter().rev().find(|s| ***s == conditions[..]) {
            return s.clone();
        }
        let s: Arc<[StatusCondition]> = conditions.into();
        if self.0.len() == Self::KEEP {
            self.0.remove(0);
        }
        self.0.push(s.clone());
        s
    }
}

pub(super) fn address(host: &str, ip: std::net::IpAddr) -> StatusAddress {
    StatusAddress {
        host: host.to_string(),
        value: ip.to_string(),
    }
}

/// Keeps each condition's `lastTransitionTime` across reloads: it changes
/// only when the condition's status or reason changes. Persisted next to the
/// allocation so that the CLI shows the agent's times: a base file and a
/// journal of the entries changed since it (an edit appends a few lines
/// instead of writing 100,000 records again).
#[derive(Clone, Debug, Default)]
pub struct StatusClock {
    /// Per entry, the status last stamped (its conditions carry the times):
    /// the model's own `Arc`, so an entry whose status the next model reuses
    /// is recognised by pointer, and the times are not held twice.
    seen: CowMap<ObjectKey, Arc<ServiceEntryStatus>>,
    /// Entries whose record changed since the last save.
    dirty: Vec<ObjectKey>,
    files: Files,
}

/// Equal times: what the clock holds, not how it was saved.
impl PartialEq for StatusClock {
    fn eq(&self, other: &Self) -> bool {
        self.seen == other.seen
    }
}
impl Eq for StatusClock {}

/// The base file's generation (journal lines of another do not apply to
/// it; 0: a bare list of an older agent) and sizes.
#[derive(Clone, Copy, Debug, Default)]
struct Files {
    generation: u64,
    base_len: u64,
    journal_len: u64,
    /// The journal ended in a line cut short.
    torn: bool,
}

/// File name of the persisted condition times in the state directory.
pub const STATUS_FILE: &str = "status.json";
/// Entries changed since `status.json` was written, one line each.
pub const STATUS_JOURNAL: &str = "status.journal";

#[derive(serde::Deserialize)]
struct StatusRecord {
    namespace: String,
    name: String,
    conditions: Vec<StatusCondition>,
}

/// The base file: a list (older agents) or the list with its generation.
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Base {
    Generation {
        generation: u64,
        records: Vec<StatusRecord>,
    },
    List(Vec<StatusRecord>),
}

/// One changed entry; `conditions: None` when it is gone.
#[derive(serde::Serialize, serde::Deserialize)]
struct JournalLine<'a> {
    generation: u64,
    namespace: Cow<'a, str>,
    name: Cow<'a, str>,
    conditions: Option<Cow<'a, [StatusCondition]>>,
}

fn record(conditions: Arc<[StatusCondition]>) -> Arc<ServiceEntryStatus> {
    Arc::new(ServiceEntryStatus {
        addresses: Vec::new(),
        conditions,
    })
}

impl StatusClock {
    /// Reads persisted times; missing or unreadable state starts empty.
    pub fn load(state_dir: &Path) -> Self {
        let mut clock = StatusClock::default();
        let Ok(bytes) = std::fs::read(state_dir.join(STATUS_FILE)) else {
            return clock;
        };
        let (generation, recs) = match serde_json::from_slice(&bytes) {
            Ok(Base::Generation {
                generation,
                records,
            }) => (generation, records),
            Ok(Base::List(records)) => (0, records),
            Err(_) => return clock,
        };
        let mut shared = Shared::default();
        let recs: BTreeMap<ObjectKey, Arc<ServiceEntryStatus>> = recs
            .into_iter()
            .map(|r| {
                let k = ObjectKey::new(&r.namespace, &r.name);
                (k, record(shared.get(r.conditions)))
            })
            .collect();
        clock.seen = CowMap::from_sorted(recs);
        clock.files = Files {
            generation,
            base_len: bytes.len() as u64,
            ..Files::default()
        };
        let Ok(journal) = std::fs::read(state_dir.join(STATUS_JOURNAL)) else {
            return clock;
        };
        clock.files.journal_len = journal.len() as u64;
        for line in journal.split_inclusive(|b| *b == b'\n') {
            let parsed = line
                .strip_suffix(b"\n")
                .and_then(|l| serde_json::from_slice::<JournalLine>(l).ok());
            match parsed {
                Some(l) if generation != 0 && l.generation == generation => {
                    let k = ObjectKey::new(&l.namespace, &l.name);
                    match l.conditions {
                        Some(c) => clock.seen.insert(k, record(shared.get(c.into_owned()))),
                        None => clock.seen.remove(&k),
                    };
                }
                Some(_) => {}
                None => {
                    clock.files.torn = true;
                    break;
                }
            }
        }
        clock
    }

    /// Writes the times: the entries changed since the last save appended
    /// to the journal, or (at first, after a torn line, or once the journal
    /// is a quarter of the base) a new base (temp file + rename) and no
    /// journal.
    pub fn save(&mut self, state_dir: &Path) -> std::io::Result<()> {
        let f = self.files;
        if f.generation != 0 && !f.torn && f.journal_len * 4 <= f.base_len {
            let mut lines = Vec::new();
            for k in &self.dirty {
                let line = JournalLine {
                    generation: f.generation,
                    namespace: Cow::Borrowed(&k.namespace),
                    name: Cow::Borrowed(&k.name),
                    conditions: self.seen.get(k).map(|st| Cow::Borrowed(&st.conditions[..])),
                };
                serde_json::to_writer(&mut lines, &line).expect("serializes");
                lines.push(b'\n');
            }
            if (f.journal_len + lines.len() as u64) * 4 <= f.base_len {
                use std::io::Write;
                let mut file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(state_dir.join(STATUS_JOURNAL))?;
                if let Err(e) = file.write_all(&lines) {
                    // Cut back to the lines written before, else the next
                    // load stops at the torn one and the next save
                    // writes a new base.
                    if file.set_len(f.journal_len).is_err() {
                        self.files.torn = true;
                    }
                    return Err(e);
                }
                self.files.journal_len += lines.len() as u64;
                self.dirty.clear();
                return Ok(());
            }
        }
        // Borrowed: the records are only serialized.
        #[derive(serde::Serialize)]
        struct Record<'a> {
            namespace: &'a str,
            name: &'a str,
            conditions: &'a [StatusCondition],
        }
        #[derive(serde::Serialize)]
        struct Out<'a> {
            generation: u64,
            records: Vec<Record<'a>>,
        }
        let generation = fresh_generation(f.generation);
        let out = Out {
            generation,
            records: self
                .seen
                .iter()
                .map(|(k, st)| Record {
                    namespace: &k.namespace,
                    name: &k.name,
                    conditions: &st.conditions[..],
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&out).expect("serializes");
        let path = state_dir.join(STATUS_FILE);
        let tmp = state_dir.join(format!("{STATUS_FILE}.tmp"));
        std::fs::write(&tmp, &bytes)?;
        std::fs::rename(tmp, path)?;
        // Its lines name the base before: they apply no more.
        let _ = std::fs::remove_file(state_dir.join(STATUS_JOURNAL));
        self.files = Files {
            generation,
            base_len: bytes.len() as u64,
            journal_len: 0,
            torn: false,
        };
        self.dirty.clear();
        Ok(())
    }

    /// Fills `lastTransitionTime` of every condition: kept when status and
    /// reason are unchanged, else `now` (RFC 3339). Returns whether anything
    /// changed (worth saving). The clock keeps what it stamped as a clone
    /// of `status`, so the entries to look at are [`CowMap::differences`]
    /// from it: the chunks a model patched from the previous one shares
    /// with it are skipped whole, and an entry whose status is the one
    /// stamped last costs a pointer comparison.
    pub fn stamp(
        &mut self,
        status: &mut CowMap<ObjectKey, Arc<ServiceEntryStatus>>,
        now: &str,
    ) -> bool {
        let mut changed = false;
        // Without a base of this clock's yet, the next save writes one.
        let track = self.files.generation != 0;
        let mut shared = Shared::default();
        let diffs: Vec<(ObjectKey, bool)> = self
            .seen
            .differences(status)
            .into_iter()
            .map(|d| match d {
                Difference::Upsert(k, _) => (k.clone(), true),
                Difference::Removal(k) => (k.clone(), false),
            })
            .collect();
        for (k, present) in diffs {
            if !present {
                changed = true;
                if track {
                    self.dirty.push(k);
                }
                continue;
            }
            let prev = self.seen.get(&k);
            let st = status.get_mut(&k).expect("an upsert is in the new map");
            let conds = prev.map(|p| &p.conditions[..]);
            // The time each condition gets; a status already carrying
            // them (reused from the previous model) is left shared.
            let time = |c: &StatusCondition| {
                let p = conds.and_then(|o| o.iter().find(|p| p.type_ == c.type_));
                match p {
                    Some(p) if p.status == c.status && p.reason == c.reason => {
                        (p.last_transition_time.clone(), false)
                    }
                    _ => (Some(now.to_string()), true),
                }
            };
            let stale = st.conditions.iter().any(|c| {
                let (t, new) = time(c);
                new || c.last_transition_time != t
            });
            if stale {
                let stamped = st
                    .conditions
                    .iter()
                    .map(|c| {
                        let (t, new) = time(c);
                        changed |= new;
                        StatusCondition {
                            last_transition_time: t,
                            ..c.clone()
                        }
                    })
                    .collect();
                Arc::make_mut(st).conditions = shared.get(stamped);
            }
            match prev {
                Some(p) => {
                    if track && p.conditions != st.conditions {
                        self.dirty.push(k);
                    }
                }
                None => {
                    changed = true;
                    if track {
                        self.dirty.push(k);
                    }
                }
            }
        }
        self.seen = status.clone();
        changed
    }
}

/// A generation for a new base file, other than `prev` and 0.
fn fresh_generation(prev: u64) -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let g = t ^ (u64::from(std::process::id()) << 40);
    if g == prev || g == 0 {
        prev.wrapping_add(1).max(1)
    } else {
        g
    }
}

/// Current time as Kubernetes writes it (`2024-10-27T00:45:08.374915129Z`).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_not_bound_message_names_the_label() {
        assert!(super::NOT_BOUND.contains(crate::config::labels::USE_WAYPOINT));
    }

    fn status(reason: u64, msg: u64) -> Arc<ServiceEntryStatus> {
        Arc::new(ServiceEntryStatus {
            addresses: Vec::new(),
            conditions: vec![StatusCondition {
                last_transition_time: None,
                message: format!("m{msg}").into(),
                reason: format!("r{reason}").into(),
                status: "True".into(),
                type_: WAYPOINT_BOUND.into(),
            }]
            .into(),
        })
    }

    /// Random model statuses in sequence, each the previous one with a few
    /// entries added, removed or changed and the rest reused (as the model
    /// does): the clock stamping by pointer gives what a clock that knows
    /// only the saved times (loaded, so nothing is shared) gives, status by
    /// status, and says the same about what changed.
    #[test]
    fn stamping_reused_statuses_gives_what_stamping_from_the_file_gives() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut clock = StatusClock::default();
        let mut model: CowMap<ObjectKey, Arc<ServiceEntryStatus>> = CowMap::new();
        for step in 0..300 {
            let now = format!("2030-01-01T00:00:{:02}Z", step % 60);
            let mut st = model.clone();
            for _ in 0..next(4) {
                let k = ObjectKey::new("ns", &format!("s{}", next(40)));
                match next(4) {
                    0 => {
                        st.remove(&k);
                    }
                    // A status built again (not reused), maybe the same.
                    _ => {
                        st.insert(k, status(next(3), next(2)));
                    }
                }
            }
            // Built again without sharing, as from a model built cold.
            let mut fresh =
                CowMap::from_sorted(st.iter().map(|(k, v)| (k.clone(), Arc::new((**v).clone()))));
            let mut cold = StatusClock::load(dir.path());
            let a = clock.stamp(&mut st, &now);
            let b = cold.stamp(&mut fresh, &now);
            assert_eq!(st, fresh, "step {step}");
            assert_eq!(clock, cold, "step {step}");
            assert_eq!(a, b, "step {step}");
            clock.save(dir.path()).unwrap();
            model = st;
        }
    }

    /// A journal line cut short (a crash) is not applied, nor what follows;
    /// the next save writes a new base. A line of an earlier base is not
    /// applied to a later one.
    #[test]
    fn a_torn_or_stale_status_journal_line_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let k = |i: usize| ObjectKey::new("ns", &format!("s{i}"));
        let mut st: CowMap<ObjectKey, Arc<ServiceEntryStatus>> =
            (0..40).map(|i| (k(i), status(0, 0))).collect();
        let mut clock = StatusClock::default();
        clock.stamp(&mut st, "2030-01-01T00:00:00Z");
        clock.save(dir.path()).unwrap();
        let base = std::fs::read(dir.path().join(STATUS_FILE)).unwrap();
        st.insert(k(1), status(1, 0));
        assert!(clock.stamp(&mut st, "2030-01-01T00:00:01Z"));
        clock.save(dir.path()).unwrap();
        assert_eq!(std::fs::read(dir.path().join(STATUS_FILE)).unwrap(), base);
        let jpath = dir.path().join(STATUS_JOURNAL);
        let one = std::fs::read(&jpath).unwrap();
        assert_eq!(StatusClock::load(dir.path()), clock);
        let after_one = clock.clone();
        st.insert(k(2), status(1, 0));
        assert!(clock.stamp(&mut st, "2030-01-01T00:00:02Z"));
        clock.save(dir.path()).unwrap();
        let two = std::fs::read(&jpath).unwrap();
        std::fs::write(&jpath, &two[..two.len() - 3]).unwrap();
        let mut loaded = StatusClock::load(dir.path());
        assert_eq!(loaded, after_one);
        assert!(loaded.files.torn);
        loaded.stamp(&mut st, "2030-01-01T00:00:03Z");
        loaded.save(dir.path()).unwrap();
        assert!(!jpath.exists());
        assert_eq!(StatusClock::load(dir.path()), loaded);
        // The first base's line, left by a crash before its removal.
        std::fs::write(&jpath, &one).unwrap();
        assert_eq!(StatusClock::load(dir.path()), loaded);
    }
}

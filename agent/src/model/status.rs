//! ServiceEntry status as Istio writes it (`status.addresses` and the
//! `istio.io/WaypointBound` condition), and the clock that keeps each
//! condition's `lastTransitionTime` across reloads and restarts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::render::{ServiceEntryStatus, StatusAddress, StatusCondition, WAYPOINT_BOUND};
use crate::config::ObjectKey;

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

pub(super) fn address(host: &str, ip: std::net::IpAddr) -> StatusAddress {
    StatusAddress {
        host: host.to_string(),
        value: ip.to_string(),
    }
}

/// Keeps each condition's `lastTransitionTime` across reloads: it changes
/// only when the condition's status or reason changes. Persisted next to the
/// allocation so that the CLI shows the agent's times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusClock {
    /// Per entry, the status last stamped (its conditions carry the times):
    /// the model's own `Arc`, so an entry whose status the next model reuses
    /// is recognised by pointer, and the times are not held twice.
    seen: BTreeMap<ObjectKey, Arc<ServiceEntryStatus>>,
}

/// File name of the persisted condition times in the state directory.
pub const STATUS_FILE: &str = "status.json";

#[derive(serde::Deserialize)]
struct StatusRecord {
    namespace: String,
    name: String,
    conditions: Vec<StatusCondition>,
}

impl StatusClock {
    /// Reads persisted times; missing or unreadable state starts empty.
    pub fn load(state_dir: &Path) -> Self {
        let recs: Vec<StatusRecord> = std::fs::read(state_dir.join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatusClock {
            seen: recs
                .into_iter()
                .map(|r| {
                    let st = ServiceEntryStatus {
                        addresses: Vec::new(),
                        conditions: r.conditions,
                    };
                    (ObjectKey::new(&r.namespace, &r.name), Arc::new(st))
                })
                .collect(),
        }
    }

    /// Writes the times (temp file + rename).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        // Borrowed: the records are only serialized.
        #[derive(serde::Serialize)]
        struct Record<'a> {
            namespace: &'a str,
            name: &'a str,
            conditions: &'a [StatusCondition],
        }
        let recs: Vec<Record> = self
            .seen
            .iter()
            .map(|(k, st)| Record {
                namespace: &k.namespace,
                name: &k.name,
                conditions: &st.conditions,
            })
            .collect();
        let path = state_dir.join(STATUS_FILE);
        let tmp = state_dir.join(format!("{STATUS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&recs).expect("serializes"))?;
        std::fs::rename(tmp, path)
    }

    /// Fills `lastTransitionTime` of every condition: kept when status and
    /// reason are unchanged, else `now` (RFC 3339). Returns whether anything
    /// changed (worth saving). Both maps are in key order, so they are
    /// walked side by side; an entry whose status is the one stamped last
    /// (reused by the model from the previous one) costs a pointer
    /// comparison, and the clock is updated in place for the others.
    pub fn stamp(
        &mut self,
        status: &mut BTreeMap<ObjectKey, Arc<ServiceEntryStatus>>,
        now: &str,
    ) -> bool {
        let mut changed = false;
        let mut gone: Vec<ObjectKey> = Vec::new();
        let mut added: Vec<(ObjectKey, Arc<ServiceEntryStatus>)> = Vec::new();
        let mut old = self.seen.iter_mut().peekable();
        for (k, st) in status.iter_mut() {
            while let Some((ok, _)) = old.next_if(|(ok, _)| *ok < k) {
                gone.push(ok.clone());
            }
            let prev = old.next_if(|(ok, _)| *ok == k).map(|(_, p)| p);
            if let Some(p) = &prev {
                if Arc::ptr_eq(p, st) {
                    continue;
                }
            }
            let conds = prev.as_ref().map(|p| p.conditions.as_slice());
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
                let times: Vec<_> = st.conditions.iter().map(time).collect();
                for (c, (t, new)) in Arc::make_mut(st).conditions.iter_mut().zip(times) {
                    changed |= new;
                    c.last_transition_time = t;
                }
            }
            match prev {
                Some(p) => *p = st.clone(),
                None => {
                    changed = true;
                    added.push((k.clone(), st.clone()));
                }
            }
        }
        gone.extend(old.map(|(k, _)| k.clone()));
        changed |= !gone.is_empty();
        for k in gone {
            self.seen.remove(&k);
        }
        self.seen.extend(added);
        changed
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
            }],
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
        let mut model: BTreeMap<ObjectKey, Arc<ServiceEntryStatus>> = BTreeMap::new();
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
            let mut fresh = st.clone();
            // Built again without sharing, as from a model built cold.
            for v in fresh.values_mut() {
                *v = Arc::new((**v).clone());
            }
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
}

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
    seen: BTreeMap<ObjectKey, Vec<StatusCondition>>,
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
                .map(|r| (ObjectKey::new(&r.namespace, &r.name), r.conditions))
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
            .map(|(k, c)| Record {
                namespace: &k.namespace,
                name: &k.name,
                conditions: c,
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
    /// walked side by side; an entry whose conditions are unchanged keeps
    /// its record (no copy of 100,000 of them per edit).
    pub fn stamp(
        &mut self,
        status: &mut BTreeMap<ObjectKey, Arc<ServiceEntryStatus>>,
        now: &str,
    ) -> bool {
        let mut changed = self.seen.len() != status.len();
        let mut old = std::mem::take(&mut self.seen).into_iter().peekable();
        let mut next = Vec::with_capacity(status.len());
        for (k, st) in status.iter_mut() {
            while old.next_if(|(ok, _)| ok < k).is_some() {}
            let prev = old.next_if(|(ok, _)| ok == k);
            let conds = prev.as_ref().map(|(_, c)| c.as_slice());
            // The time each condition gets; a status already carrying
            // them (reused from the previous model) is left shared.
            let time = |c: &StatusCondition| {
                let p = conds.and_then(|o| o.iter().find(|p| p.type_ == c.type_));
                match p {
                    Some(p) if p.status == c.status && p.reason == c.reason => {
                        (p.last_transition_time.as_deref(), false)
                    }
                    _ => (Some(now), true),
                }
            };
            let stale = st.conditions.iter().any(|c| {
                let (t, new) = time(c);
                new || c.last_transition_time.as_deref() != t
            });
            if stale {
                for c in &mut Arc::make_mut(st).conditions {
                    let (t, new) = time(c);
                    changed |= new;
                    c.last_transition_time = t.map(str::to_string);
                }
            }
            next.push(match prev {
                Some((ok, oc)) if oc == st.conditions => (ok, oc),
                _ => (k.clone(), st.conditions.clone()),
            });
        }
        // Already in key order: built in one pass.
        self.seen = next.into_iter().collect();
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
    #[test]
    fn the_not_bound_message_names_the_label() {
        assert!(super::NOT_BOUND.contains(crate::config::labels::USE_WAYPOINT));
    }
}

//! ServiceEntry status as Istio writes it (`status.addresses` and the
//! `istio.io/WaypointBound` condition), and the clock that keeps each
//! condition's `lastTransitionTime` across reloads and restarts.

use std::collections::BTreeMap;
use std::path::Path;

use crate::config::render::{ServiceEntryStatus, StatusAddress, StatusCondition, WAYPOINT_BOUND};
use crate::config::ObjectKey;

use super::waypoint::WaypointBinding;

/// The condition for a binding (without `lastTransitionTime`).
pub(super) fn waypoint_condition(b: &WaypointBinding) -> StatusCondition {
    let (status, reason, message) = match b {
        WaypointBinding::Bound(w) => (
            "True",
            "WaypointAccepted",
            format!("Successfully attached to waypoint {}", w.gateway),
        ),
        WaypointBinding::None => (
            "False",
            "NotBound",
            format!(
                "not bound to any waypoint: no {} label on the ServiceEntry or its Namespace",
                crate::config::labels::USE_WAYPOINT
            ),
        ),
        WaypointBinding::Refused(u) => ("False", u.reason, u.message.clone()),
    };
    StatusCondition {
        last_transition_time: None,
        message,
        reason: reason.into(),
        status: status.into(),
        type_: WAYPOINT_BOUND.into(),
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

#[derive(serde::Serialize, serde::Deserialize)]
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
        let recs: Vec<StatusRecord> = self
            .seen
            .iter()
            .map(|(k, c)| StatusRecord {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                conditions: c.clone(),
            })
            .collect();
        let path = state_dir.join(STATUS_FILE);
        let tmp = state_dir.join(format!("{STATUS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&recs).expect("serializes"))?;
        std::fs::rename(tmp, path)
    }

    /// Fills `lastTransitionTime` of every condition: kept when status and
    /// reason are unchanged, else `now` (RFC 3339). Returns whether anything
    /// changed (worth saving).
    pub fn stamp(
        &mut self,
        status: &mut BTreeMap<ObjectKey, ServiceEntryStatus>,
        now: &str,
    ) -> bool {
        let mut changed = self.seen.len() != status.len();
        let mut next = BTreeMap::new();
        for (k, st) in status.iter_mut() {
            let old = self.seen.get(k);
            for c in &mut st.conditions {
                let prev = old.and_then(|o| o.iter().find(|p| p.type_ == c.type_));
                match prev {
                    Some(p) if p.status == c.status && p.reason == c.reason => {
                        c.last_transition_time = p.last_transition_time.clone();
                    }
                    _ => {
                        c.last_transition_time = Some(now.to_string());
                        changed = true;
                    }
                }
            }
            next.insert(k.clone(), st.conditions.clone());
        }
        self.seen = next;
        changed
    }
}

/// Current time as Kubernetes writes it (`2024-10-27T00:45:08.374915129Z`).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

//! `shunt get serviceentries [-o yaml]`: Istio-shaped ServiceEntry status and
//! its renderings (YAML like `kubectl get -o yaml`, and a short table).

use std::borrow::Cow;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_yaml_ng::{Mapping, Value};

use super::ServiceEntry;

/// `ServiceEntry.status` as Istio writes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceEntryStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<StatusAddress>,
    /// Shared between entries whose conditions are equal: the
    /// [`StatusClock`](crate::model::StatusClock) stamps most of 100,000
    /// entries with one condition and one time, and keeps one list of it.
    #[serde(default, skip_serializing_if = "is_empty", with = "shared_list")]
    pub conditions: Arc<[StatusCondition]>,
}

fn is_empty<T>(l: &Arc<[T]>) -> bool {
    l.is_empty()
}

/// An `Arc<[T]>` as a list (serde's own needs its `rc` feature).
mod shared_list {
    use std::sync::Arc;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<T: Serialize, S: Serializer>(l: &Arc<[T]>, s: S) -> Result<S::Ok, S::Error> {
        l[..].serialize(s)
    }

    pub fn deserialize<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Arc<[T]>, D::Error> {
        Vec::<T>::deserialize(d).map(Arc::from)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAddress {
    pub host: String,
    pub value: String,
}

/// A Kubernetes condition; fields in the order kubectl prints them. The
/// model's conditions borrow their fixed texts (every entry has one, and
/// the model and the [`StatusClock`](crate::model::StatusClock) each hold
/// 100,000 of them at scale); read from JSON they are owned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StatusCondition {
    /// RFC 3339 with nanoseconds; set by `model::StatusClock`, `None` from
    /// the pure model build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    pub message: Cow<'static, str>,
    pub reason: Cow<'static, str>,
    /// "True" or "False".
    pub status: Cow<'static, str>,
    #[serde(rename = "type")]
    pub type_: Cow<'static, str>,
}

/// Condition type for waypoint binding.
pub const WAYPOINT_BOUND: &str = "istio.io/WaypointBound";

impl ServiceEntryStatus {
    pub fn condition(&self, type_: &str) -> Option<&StatusCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

fn object_value(se: &ServiceEntry, status: &ServiceEntryStatus) -> Value {
    let mut m = Mapping::new();
    m.insert("apiVersion".into(), "networking.istio.io/v1".into());
    m.insert("kind".into(), "ServiceEntry".into());
    let mut meta = se.metadata.clone();
    meta.namespace = Some(se.namespace().into());
    m.insert(
        "metadata".into(),
        serde_yaml_ng::to_value(&meta).unwrap_or(Value::Null),
    );
    m.insert(
        "spec".into(),
        serde_yaml_ng::to_value(&se.spec).unwrap_or(Value::Null),
    );
    if status != &ServiceEntryStatus::default() {
        m.insert(
            "status".into(),
            serde_yaml_ng::to_value(status).unwrap_or(Value::Null),
        );
    }
    Value::Mapping(m)
}

/// YAML of one ServiceEntry with its status, as `kubectl get -o yaml NAME`.
pub fn render_yaml(se: &ServiceEntry, status: &ServiceEntryStatus) -> String {
    serde_yaml_ng::to_string(&object_value(se, status)).unwrap_or_default()
}

/// YAML of several ServiceEntries as a `List`, as `kubectl get -o yaml`.
pub fn render_yaml_list<'a>(
    items: impl IntoIterator<Item = (&'a ServiceEntry, &'a ServiceEntryStatus)>,
) -> String {
    let items: Vec<Value> = items
        .into_iter()
        .map(|(se, st)| object_value(se, st))
        .collect();
    let mut m = Mapping::new();
    m.insert("apiVersion".into(), "v1".into());
    m.insert("items".into(), Value::Sequence(items));
    m.insert("kind".into(), "List".into());
    serde_yaml_ng::to_string(&Value::Mapping(m)).unwrap_or_default()
}

/// One row of the short form.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableRow {
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
    pub addresses: Vec<String>,
    /// `ns/name` of the waypoint, if any.
    pub waypoint: Option<String>,
    /// Status of the WaypointBound condition.
    pub bound: String,
}

impl TableRow {
    pub fn new(se: &ServiceEntry, status: &ServiceEntryStatus, waypoint: Option<String>) -> Self {
        let mut addresses: Vec<String> = status.addresses.iter().map(|a| a.value.clone()).collect();
        for a in &se.spec.addresses {
            if !addresses.contains(a) {
                addresses.push(a.clone());
            }
        }
        TableRow {
            namespace: se.namespace().to_string(),
            name: se.name().to_string(),
            hosts: se.spec.hosts.to_vec(),
            addresses,
            waypoint,
            bound: status
                .condition(WAYPOINT_BOUND)
                .map(|c| c.status.to_string())
                .unwrap_or_else(|| "Unknown".into()),
        }
    }
}

/// `NAMESPACE NAME HOSTS ADDRESSES WAYPOINT BOUND`, columns padded like kubectl.
pub fn render_table(rows: &[TableRow]) -> String {
    let head = [
        "NAMESPACE",
        "NAME",
        "HOSTS",
        "ADDRESSES",
        "WAYPOINT",
        "BOUND",
    ];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            let or_none = |v: String| if v.is_empty() { "<none>".into() } else { v };
            [
                r.namespace.clone(),
                r.name.clone(),
                or_none(r.hosts.join(",")),
                or_none(r.addresses.join(",")),
                r.waypoint.clone().unwrap_or_else(|| "<none>".into()),
                r.bound.clone(),
            ]
        })
        .collect();
    let mut width = head.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.len());
        }
    }
    let mut out = String::new();
    let mut line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, s) in cols.iter().enumerate() {
            if i + 1 == cols.len() {
                l.push_str(s);
            } else {
                l.push_str(&format!("{:<w$}   ", s, w = width[i]));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&head);
    for c in &cells {
        line(&c.iter().map(String::as_str).collect::<Vec<_>>());
    }
    out
}

//! The Istio object model shunt reads from a config directory.
//!
//! `Config::load_dir` parses every `*.yaml` / `*.yml` file (sorted by name)
//! as multi-document YAML, plus an optional `mesh.yaml` / `mesh.yml` holding
//! MeshConfig fields. Any invalid object rejects the whole directory with
//! every problem found (file, document, object, field), so a half-applied
//! config never reaches the kernel maps.
pub mod authz;
mod changes;
pub mod kube;
mod load;
pub mod meta;
pub mod render;
mod strict;
pub mod types;
pub mod watch;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use changes::Changes;
pub use load::{Parser, Snapshot};
pub use types::*;

/// A valid configuration, as read from one directory snapshot.
///
/// Objects are shared, not copied: a reload that leaves an object unchanged
/// hands the next `Config` the same `Arc` (see [`Config::changed_since`]),
/// so later stages can reuse their work for it (`Arc::ptr_eq`). A parsed
/// config's object lists are its files' objects: editing them (rather than
/// building a `Config` by hand) would make `changed_since` miss the edit.
#[derive(Clone, Debug, Default)]
pub struct Config {
    pub mesh: MeshConfig,
    /// By name.
    pub namespaces: BTreeMap<String, Arc<Namespace>>,
    /// All objects below are in directory order (file name, then document).
    pub service_entries: Vec<Arc<ServiceEntry>>,
    pub destination_rules: Vec<Arc<DestinationRule>>,
    /// Every Gateway, waypoint or not.
    pub gateways: Vec<Arc<Gateway>>,
    pub workload_entries: Vec<Arc<WorkloadEntry>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// Content hash of the files this config was read from.
    pub digest: u64,
    /// The files themselves (the agent serves them as the config in force);
    /// `None` for a config not parsed from a source.
    pub source: Option<std::sync::Arc<Snapshot>>,
    /// Kinds (`Kind.group`) that were ignored, with their object counts.
    pub ignored_kinds: BTreeMap<String, usize>,
    /// ServiceEntry status as the API server holds it (`--source
    /// kubernetes`; `None` from a directory). The cluster's one allocator
    /// wrote it; agents take their VIPs from here and allocate none.
    pub api_status: Option<BTreeMap<ObjectKey, render::ServiceEntryStatus>>,
    /// The parse of each source file, in order (empty unless parsed).
    pub(crate) parsed: Vec<Arc<load::ParsedFile>>,
}

/// Which waypoint an object asks for, and through which label.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaypointRef {
    /// No `istio.io/use-waypoint` label (or its value is `none`).
    Unbound,
    /// The Gateway named by the label (namespace from
    /// `istio.io/use-waypoint-namespace`, else the labelled object's).
    Gateway {
        gateway: ObjectKey,
        from_namespace_label: bool,
    },
}

impl Config {
    /// Reads and validates a directory. See the module docs.
    pub fn load_dir(dir: &Path) -> Result<Config, ConfigError> {
        Arc::new(Snapshot::read(dir)?).into_config()
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.get(name).map(|n| &**n)
    }

    /// `istio.io/dataplane-mode: ambient` on the Namespace.
    pub fn namespace_is_ambient(&self, name: &str) -> bool {
        self.namespace(name)
            .and_then(|n| n.label(labels::DATAPLANE_MODE))
            == Some("ambient")
    }

    pub fn gateway(&self, key: &ObjectKey) -> Option<&Gateway> {
        self.gateways
            .iter()
            .find(|g| g.namespace() == key.namespace && g.name() == key.name)
            .map(|g| &**g)
    }

    /// The waypoint a ServiceEntry asks for: its own `istio.io/use-waypoint`
    /// label, else its Namespace's (`none` opts out at either level).
    pub fn waypoint_ref(&self, se: &ServiceEntry) -> WaypointRef {
        waypoint_ref(&se.metadata, self.namespace(se.namespace()))
    }

    /// Trust domain from the mesh config.
    pub fn trust_domain(&self) -> &str {
        &self.mesh.trust_domain
    }

    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn spiffe_id(&self, ns: &str, sa: &str) -> String {
        format!("spiffe://{}/ns/{}/sa/{}", self.trust_domain(), ns, sa)
    }
}

pub(crate) fn waypoint_ref(meta: &meta::ObjectMeta, ns: Option<&Namespace>) -> WaypointRef {
    let own_ns = meta.ns();
    let (labels_of, from_ns) = if let Some(name) = meta.labels.get(labels::USE_WAYPOINT) {
        (Some((name, &meta.labels)), false)
    } else if let Some(n) = ns {
        (
            n.metadata
                .labels
                .get(labels::USE_WAYPOINT)
                .map(|name| (name, &n.metadata.labels)),
            true,
        )
    } else {
        (None, false)
    };
    match labels_of {
        Some((name, labels)) if name != "none" && !name.is_empty() => {
            let gw_ns = labels
                .get(labels::USE_WAYPOINT_NAMESPACE)
                .map(String::as_str)
                .unwrap_or(own_ns);
            WaypointRef::Gateway {
                gateway: ObjectKey::new(gw_ns, name),
                from_namespace_label: from_ns,
            }
        }
        _ => WaypointRef::Unbound,
    }
}

/// One problem in a config directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    /// 1-based document index in the file.
    pub doc: Option<usize>,
    /// `Kind namespace/name` (or `Kind name` for cluster-scoped kinds).
    pub object: Option<String>,
    /// Field path such as `spec.ports[0].number`.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.doc {
            write!(f, ": document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(p) = &self.field {
            write!(f, ": {p}")?;
        }
        write!(f, ": {}", self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read config directory: {source}", path.display())]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Every problem found; the whole directory is rejected.
    #[error("{}", display_problems(.0))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            ConfigError::Dir { .. } => &[],
        }
    }
}

fn display_problems(p: &[Problem]) -> String {
    let mut s = format!(
        "invalid configuration ({} error{}):",
        p.len(),
        if p.len() == 1 { "" } else { "s" }
    );
    for e in p {
        s.push_str("\n  ");
        s.push_str(&e.to_string());
    }
    s
}

#[cfg(test)]
mod tests;

//! Which objects differ between two [`Config`]s, for the stages after the
//! parse that redo only the work of what changed.
//!
//! A reload re-parses only the files whose content changed (see
//! [`super::Parser`]), and within such a file an object equal to its previous
//! parse keeps that parse: an object that did not change is the *same*
//! `Arc` in the old and the new config. So [`Config::changed_since`] costs
//! O(files + objects of the changed files), not O(objects).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

use super::load::{Object, ParsedFile};
use super::{Config, ObjectKey};

/// The objects added, removed or modified between two configs, by kind.
/// Only the objects themselves: what depends on them (a ServiceEntry bound
/// to a waypoint through a changed Namespace's label, a DestinationRule's
/// host now matching another entry) is the reader's to follow.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// `mesh.yaml` differs.
    pub mesh: bool,
    /// [`Config::api_status`] differs (Kubernetes source only).
    pub api_status: bool,
    /// By name.
    pub namespaces: BTreeSet<String>,
    pub service_entries: BTreeSet<ObjectKey>,
    pub destination_rules: BTreeSet<ObjectKey>,
    pub workload_entries: BTreeSet<ObjectKey>,
    pub authorization_policies: BTreeSet<ObjectKey>,
    pub gateways: BTreeSet<ObjectKey>,
}

impl Changes {
    /// Nothing differs (the two configs are equal object by object).
    pub fn is_empty(&self) -> bool {
        !self.mesh
            && !self.api_status
            && self.namespaces.is_empty()
            && self.service_entries.is_empty()
            && self.destination_rules.is_empty()
            && self.workload_entries.is_empty()
            && self.authorization_policies.is_empty()
            && self.gateways.is_empty()
    }

    /// Objects changed, all kinds together.
    pub fn len(&self) -> usize {
        self.namespaces.len()
            + self.service_entries.len()
            + self.destination_rules.len()
            + self.workload_entries.len()
            + self.authorization_policies.len()
            + self.gateways.len()
    }

    fn insert(&mut self, o: &Object) {
        match o.key() {
            ObjectRef::Namespace(n) => self.namespaces.insert(n),
            ObjectRef::ServiceEntry(k) => self.service_entries.insert(k),
            ObjectRef::DestinationRule(k) => self.destination_rules.insert(k),
            ObjectRef::WorkloadEntry(k) => self.workload_entries.insert(k),
            ObjectRef::AuthorizationPolicy(k) => self.authorization_policies.insert(k),
            ObjectRef::Gateway(k) => self.gateways.insert(k),
        };
    }
}

/// One object by kind and key.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ObjectRef {
    Namespace(String),
    ServiceEntry(ObjectKey),
    DestinationRule(ObjectKey),
    WorkloadEntry(ObjectKey),
    AuthorizationPolicy(ObjectKey),
    Gateway(ObjectKey),
}

impl Config {
    /// The objects that differ in `self` from `old` (added, removed, or
    /// changed in any field, including where they were read).
    ///
    /// Every object that did not change is the same `Arc` in both configs
    /// when both were parsed by one [`super::Parser`] (the directory
    /// watcher's and the Kubernetes source's), so a stage can keep its work
    /// for an object while `Arc::ptr_eq(new, old)`, and needs to look only
    /// at the keys returned here. Configs parsed by different parsers (or
    /// built by hand) compare correctly too, only at the cost of a
    /// comparison per object.
    pub fn changed_since(&self, old: &Config) -> Changes {
        let mut c = Changes {
            mesh: self.mesh != old.mesh,
            api_status: self.api_status != old.api_status,
            ..Changes::default()
        };
        if self.source.is_some() && old.source.is_some() {
            diff_files(&old.parsed, &self.parsed, &mut c);
        } else {
            diff_objects(&objects(old), &objects(self), &mut c);
        }
        c
    }
}

/// Per file: an unchanged file (the same parse) is skipped, the objects of
/// the others are compared by key.
fn diff_files(old: &[Arc<ParsedFile>], new: &[Arc<ParsedFile>], c: &mut Changes) {
    let by_path = |files: &[Arc<ParsedFile>]| -> HashMap<Arc<Path>, Arc<ParsedFile>> {
        files.iter().map(|f| (f.path.clone(), f.clone())).collect()
    };
    let (o, n) = (by_path(old), by_path(new));
    for (path, nf) in &n {
        match o.get(path) {
            Some(of) if Arc::ptr_eq(of, nf) => {}
            Some(of) => diff_objects(&of.objects, &nf.objects, c),
            None => nf.objects.iter().for_each(|x| c.insert(x)),
        }
    }
    for (path, of) in &o {
        if !n.contains_key(path) {
            of.objects.iter().for_each(|x| c.insert(x));
        }
    }
}

fn diff_objects(old: &[Object], new: &[Object], c: &mut Changes) {
    let old_by_key: HashMap<ObjectRef, &Object> = old.iter().map(|o| (o.key(), o)).collect();
    let mut kept = 0;
    for o in new {
        match old_by_key.get(&o.key()) {
            Some(prev) if prev.ptr_eq(o) => kept += 1,
            _ => c.insert(o),
        }
    }
    if kept < old.len() {
        let new_keys: std::collections::HashSet<ObjectRef> = new.iter().map(Object::key).collect();
        for o in old {
            if !new_keys.contains(&o.key()) {
                c.insert(o);
            }
        }
    }
}

/// Every object of a config, as the parser's [`Object`]s.
fn objects(cfg: &Config) -> Vec<Object> {
    let mut v: Vec<Object> = cfg
        .namespaces
        .values()
        .map(|r| Object::Namespace(r.clone()))
        .collect();
    v.extend(
        cfg.service_entries
            .iter()
            .cloned()
            .map(Object::ServiceEntry),
    );
    v.extend(
        cfg.destination_rules
            .iter()
            .cloned()
            .map(Object::DestinationRule),
    );
    v.extend(
        cfg.workload_entries
            .iter()
            .cloned()
            .map(Object::WorkloadEntry),
    );
    v.extend(
        cfg.authorization_policies
            .iter()
            .cloned()
            .map(Object::AuthorizationPolicy),
    );
    v.extend(cfg.gateways.iter().cloned().map(Object::Gateway));
    v
}

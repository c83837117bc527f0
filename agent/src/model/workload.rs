//! Workloads (WorkloadEntries today; Pods from the Kubernetes API later):
//! address, SPIFFE identity, labels, and the cgroup that enrolls them.
//! Enrollment follows ambient: the workload's Namespace has
//! `istio.io/dataplane-mode: ambient`, and a waypoint's own pods never are
//! (their traffic would loop back into themselves).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use http::HeaderValue;

use crate::config::ObjectKey;
use crate::hbone::Baggage;
use crate::identity::SpiffeId;

/// A stable id from the allocation (the `enrolled` map value's
/// `workload_id`).
pub type WorkloadId = u32;

/// Istio's default cluster id, carried in `baggage`.
pub const CLUSTER_ID: &str = "Kubernetes";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub id: WorkloadId,
    pub key: ObjectKey,
    pub service_account: String,
    pub identity: SpiffeId,
    pub address: Option<IpAddr>,
    /// Spec labels, then metadata labels where the spec has none.
    pub labels: BTreeMap<String, String>,
    /// The cgroup id the kernel reports for its sockets, when enrolled (the
    /// first, when the annotation lists several: a pod's containers).
    pub cgroup: Option<u64>,
    /// The HBONE `baggage` header naming this workload (built once).
    pub baggage: Option<HeaderValue>,
}

impl Workload {
    pub fn name(&self) -> &str {
        &self.key.name
    }
    pub fn namespace(&self) -> &str {
        &self.key.namespace
    }
}

pub(super) fn baggage(key: &ObjectKey, labels: &BTreeMap<String, String>) -> Option<HeaderValue> {
    Baggage {
        cluster: Some(CLUSTER_ID.to_string()),
        namespace: Some(key.namespace.clone()),
        workload_kind: Some("workloadentry".into()),
        workload_name: Some(key.name.clone()),
        service_name: labels
            .get("app")
            .cloned()
            .or_else(|| Some(key.name.clone())),
        service_version: labels.get("version").cloned(),
    }
    .to_header()
    .ok()
}

/// Maps a `shunt.io/cgroup` annotation to the cgroup id the kernel reports.
pub trait CgroupResolver {
    fn cgroup_id(&self, annotation: &str) -> Option<u64>;
}

/// Resolves nothing: for readers (waypoint, CLI) that never enroll.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoCgroups;

impl CgroupResolver for NoCgroups {
    fn cgroup_id(&self, _: &str) -> Option<u64> {
        None
    }
}

impl<F: Fn(&str) -> Option<u64>> CgroupResolver for F {
    fn cgroup_id(&self, annotation: &str) -> Option<u64> {
        self(annotation)
    }
}

/// Resolves annotations against a cgroup v2 root: the cgroup id the kernel
/// reports (`bpf_get_current_cgroup_id`) is the inode number of the cgroup
/// directory. Relative annotations are below `root`.
#[derive(Clone, Debug)]
pub struct CgroupDir {
    pub root: PathBuf,
}

impl CgroupResolver for CgroupDir {
    fn cgroup_id(&self, annotation: &str) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        let p = Path::new(annotation);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.root.join(p)
        };
        std::fs::metadata(full)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| m.ino())
    }
}

//! Pods on this node as workloads: each becomes the WorkloadEntry the rest
//! of shunt already understands (address, service account, labels, and the
//! `shunt.io/cgroup-tree` annotation naming the pod's cgroup, which the
//! kernel matches for every container below it), so the
//! pipeline after the config source is the same on a cluster and on one
//! machine. Enrollment itself (ambient namespace or pod label, `none` on the
//! pod) is decided in one place, `desired`, for pods and WorkloadEntries
//! alike.

use std::path::Path;

use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Map, Value};

use super::cgroup::{find_pod_dir, Qos};
use crate::config::labels;

/// Why a pod is not turned into a workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Shares the node's network namespace: its address is the node's, and
    /// steering it would capture the node's own traffic.
    HostNetwork,
    /// Succeeded or Failed: its address may already belong to another pod.
    Finished,
    /// Scheduled to another node (the field selector should prevent it).
    OtherNode,
    /// No name, namespace or UID.
    Incomplete,
}

/// A pod turned into a workload.
#[derive(Clone, Debug, PartialEq)]
pub struct PodWorkload {
    /// The WorkloadEntry document.
    pub entry: Value,
    /// Whether the pod's cgroup directory was found (and is in the entry).
    /// Until it is, the source looks again periodically: the kubelet
    /// creates it after the pod is scheduled.
    pub cgroup_found: bool,
}

/// The WorkloadEntry document for `pod`, or why none. `cgroup_root` is the
/// kubelet's cgroup root as this agent sees it; the pod's cgroup directory
/// goes into the annotation as an absolute path. Its containers are not
/// listed: the kernel enrolls whatever runs below the pod's cgroup, so a
/// container started later is enrolled from its first connect.
pub fn workload_entry(pod: &Pod, node: &str, cgroup_root: &Path) -> Result<PodWorkload, Skip> {
    let meta = &pod.metadata;
    let (Some(name), Some(ns), Some(uid)) = (&meta.name, &meta.namespace, &meta.uid) else {
        return Err(Skip::Incomplete);
    };
    let spec = pod.spec.as_ref();
    if spec.and_then(|s| s.host_network).unwrap_or(false) {
        return Err(Skip::HostNetwork);
    }
    if spec.and_then(|s| s.node_name.as_deref()) != Some(node) {
        return Err(Skip::OtherNode);
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded") | Some("Failed")
    ) {
        return Err(Skip::Finished);
    }
    let sa = spec
        .and_then(|s| s.service_account_name.as_deref())
        .filter(|s| !s.is_empty())
        .unwrap_or("default");
    // The primary address (first of status.podIPs, which equals podIP).
    let address = status
        .and_then(|s| s.pod_ips.as_ref())
        .and_then(|ips| ips.first())
        .map(|ip| ip.ip.clone())
        .or_else(|| status.and_then(|s| s.pod_ip.clone()))
        .unwrap_or_default();
    let qos = status
        .and_then(|s| s.qos_class.as_deref())
        .and_then(Qos::from_status);

    let mut md = Map::new();
    md.insert("name".into(), json!(name));
    md.insert("namespace".into(), json!(ns));
    md.insert("uid".into(), json!(uid));
    if let Some(l) = &meta.labels {
        md.insert("labels".into(), json!(l));
    }
    if let Some(ts) = &meta.creation_timestamp {
        md.insert("creationTimestamp".into(), json!(ts));
    }
    let dir = find_pod_dir(cgroup_root, uid, qos).and_then(|d| d.to_str().map(str::to_string));
    // A comma would read as a list separator.
    let dir = dir.filter(|d| !d.contains(','));
    if let Some(d) = &dir {
        md.insert(
            "annotations".into(),
            json!({ labels::CGROUP_TREE_ANNOTATION: d }),
        );
    }
    let mut spec = Map::new();
    if !address.is_empty() {
        spec.insert("address".into(), json!(address));
    }
    spec.insert("serviceAccount".into(), json!(sa));
    Ok(PodWorkload {
        entry: json!({
            "apiVersion": "networking.istio.io/v1",
            "kind": "WorkloadEntry",
            "metadata": md,
            "spec": spec,
        }),
        cgroup_found: dir.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    const UID: &str = "0f0e0d0c-0b0a-4909-8807-060504030201";

    fn sample(host_network: bool, node: &str) -> Pod {
        pod(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "curl-7d", "namespace": "default", "uid": UID,
                         "labels": {"app": "curl"}, "creationTimestamp": "2026-01-02T03:04:05Z"},
            "spec": {"nodeName": node, "serviceAccountName": "curl", "hostNetwork": host_network,
                     "containers": [{"name": "curl", "image": "curl"}]},
            "status": {"phase": "Running", "podIP": "10.244.1.19",
                       "podIPs": [{"ip": "10.244.1.19"}, {"ip": "fd00::19"}], "qosClass": "BestEffort"}
        }))
    }

    #[test]
    fn a_pod_becomes_a_workload_entry_with_its_address_account_labels_and_pod_cgroup() {
        let t = tempfile::tempdir().unwrap();
        let pod_dir = t.path().join(format!("kubepods/besteffort/pod{UID}"));
        std::fs::create_dir_all(pod_dir.join("abc")).unwrap();
        let w = workload_entry(&sample(false, "n1"), "n1", t.path()).unwrap();
        assert!(w.cgroup_found);
        let we = w.entry;
        assert_eq!(we["metadata"]["name"], "curl-7d");
        assert_eq!(we["metadata"]["labels"]["app"], "curl");
        // The pod's cgroup, not its containers': the kernel enrolls below it.
        assert_eq!(
            we["metadata"]["annotations"][labels::CGROUP_TREE_ANNOTATION],
            pod_dir.to_str().unwrap()
        );
        assert!(we["metadata"]["annotations"]
            .get(labels::CGROUP_ANNOTATION)
            .is_none());
        assert_eq!(we["spec"]["address"], "10.244.1.19");
        assert_eq!(we["spec"]["serviceAccount"], "curl");
    }

    #[test]
    fn host_network_pods_and_pods_of_other_nodes_are_never_workloads() {
        let t = tempfile::tempdir().unwrap();
        assert_eq!(
            workload_entry(&sample(true, "n1"), "n1", t.path()),
            Err(Skip::HostNetwork)
        );
        assert_eq!(
            workload_entry(&sample(false, "n2"), "n1", t.path()),
            Err(Skip::OtherNode)
        );
    }

    #[test]
    fn a_pod_whose_cgroup_is_not_there_yet_has_no_cgroup_annotation_and_default_account() {
        let t = tempfile::tempdir().unwrap();
        let mut p = sample(false, "n1");
        p.spec.as_mut().unwrap().service_account_name = None;
        let w = workload_entry(&p, "n1", t.path()).unwrap();
        assert!(!w.cgroup_found);
        let we = w.entry;
        assert!(we["metadata"].get("annotations").is_none());
        assert_eq!(we["spec"]["serviceAccount"], "default");
    }
}

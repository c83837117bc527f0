//! Where the kubelet puts a pod's cgroups, and which of them to enroll.
//!
//! The kernel reports the cgroup of the *container* a socket's process runs
//! in (`bpf_get_current_cgroup_id`), never the pod's: with cgroup v2 no
//! process lives in the pod cgroup itself. So a pod is enrolled by its pod
//! directory with `ENR_F_DESCENDANTS`, and the kernel programs match every
//! cgroup below it (`ebpf/src/enroll.rs`): containers started after the pod
//! was seen (init containers, restarts, ephemeral containers) are enrolled
//! from their first connect, with no scan in between.
//!
//! Layouts (kubelet `--cgroup-driver`, `--cgroup-root=/`):
//! - systemd: `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice`
//!   with `-` in the UID written as `_`; Guaranteed pods sit directly in
//!   `kubepods.slice/kubepods-pod<uid_>.slice`.
//! - cgroupfs: `kubepods/<qos>/pod<uid>`; Guaranteed: `kubepods/pod<uid>`.

use std::path::{Path, PathBuf};

/// A pod's QoS class (`status.qosClass`), which picks its parent cgroup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Qos {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl Qos {
    pub const ALL: [Qos; 3] = [Qos::Guaranteed, Qos::Burstable, Qos::BestEffort];

    /// From `status.qosClass`; `None` when absent or unknown.
    pub fn from_status(s: &str) -> Option<Qos> {
        match s {
            "Guaranteed" => Some(Qos::Guaranteed),
            "Burstable" => Some(Qos::Burstable),
            "BestEffort" => Some(Qos::BestEffort),
            _ => None,
        }
    }

    /// The level's name in cgroup paths; Guaranteed has no level.
    fn level(self) -> Option<&'static str> {
        match self {
            Qos::Guaranteed => None,
            Qos::Burstable => Some("burstable"),
            Qos::BestEffort => Some("besteffort"),
        }
    }
}

/// The pod directory under `root` for each driver, systemd first.
pub fn pod_dir_candidates(root: &Path, uid: &str, qos: Qos) -> [PathBuf; 2] {
    let su = uid.replace('-', "_");
    let systemd = match qos.level() {
        None => root
            .join("kubepods.slice")
            .join(format!("kubepods-pod{su}.slice")),
        Some(l) => root
            .join("kubepods.slice")
            .join(format!("kubepods-{l}.slice"))
            .join(format!("kubepods-{l}-pod{su}.slice")),
    };
    let cgroupfs = match qos.level() {
        None => root.join("kubepods").join(format!("pod{uid}")),
        Some(l) => root.join("kubepods").join(l).join(format!("pod{uid}")),
    };
    [systemd, cgroupfs]
}

/// The pod's cgroup directory, if it exists under either driver's layout.
/// With `qos` unknown every class is tried.
pub fn find_pod_dir(root: &Path, uid: &str, qos: Option<Qos>) -> Option<PathBuf> {
    // A UID is a UUID; anything else could walk out of the tree.
    if uid.is_empty() || !uid.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-') {
        return None;
    }
    let classes: &[Qos] = match &qos {
        Some(q) => std::slice::from_ref(q),
        None => &Qos::ALL,
    };
    classes
        .iter()
        .flat_map(|q| pod_dir_candidates(root, uid, *q))
        .find(|p| p.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c4b3a8e-1f0d-4c1e-9a57-0e5b6f7d8c9a";

    fn mk(root: &Path, rel: &str) -> PathBuf {
        let p = root.join(rel);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    #[test]
    fn systemd_driver_burstable_pod_is_found() {
        let t = tempfile::tempdir().unwrap();
        let su = UID.replace('-', "_");
        let pod =
            format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{su}.slice");
        mk(t.path(), &format!("{pod}/cri-containerd-aaa.scope"));
        mk(t.path(), &format!("{pod}/cri-containerd-bbb.scope"));
        // A neighbour pod must not be picked up.
        mk(
            t.path(),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod11111111_2222_3333_4444_555555555555.slice/cri-containerd-ccc.scope",
        );
        let dir = find_pod_dir(t.path(), UID, Some(Qos::Burstable)).unwrap();
        assert_eq!(dir, t.path().join(&pod));
    }

    #[test]
    fn systemd_driver_guaranteed_pod_has_no_qos_level() {
        let t = tempfile::tempdir().unwrap();
        let su = UID.replace('-', "_");
        let pod = format!("kubepods.slice/kubepods-pod{su}.slice");
        mk(t.path(), &format!("{pod}/crio-123.scope"));
        assert_eq!(
            find_pod_dir(t.path(), UID, Some(Qos::Guaranteed)),
            Some(t.path().join(&pod))
        );
        // Wrong class given: not found under that class.
        assert_eq!(find_pod_dir(t.path(), UID, Some(Qos::BestEffort)), None);
        // Unknown class: every class is tried.
        assert_eq!(find_pod_dir(t.path(), UID, None), Some(t.path().join(&pod)));
    }

    #[test]
    fn cgroupfs_driver_besteffort_and_guaranteed_pods_are_found() {
        let t = tempfile::tempdir().unwrap();
        let be = format!("kubepods/besteffort/pod{UID}");
        mk(t.path(), &format!("{be}/0123abcd"));
        assert_eq!(
            find_pod_dir(t.path(), UID, Some(Qos::BestEffort)),
            Some(t.path().join(&be))
        );

        let other = "0b0b0b0b-0000-4000-8000-000000000000";
        let g = format!("kubepods/pod{other}");
        mk(t.path(), &format!("{g}/ffff"));
        assert_eq!(
            find_pod_dir(t.path(), other, Some(Qos::Guaranteed)),
            Some(t.path().join(&g))
        );
    }

    #[test]
    fn a_uid_that_is_not_a_uuid_is_never_looked_up() {
        let t = tempfile::tempdir().unwrap();
        mk(t.path(), "kubepods/pod../x");
        assert_eq!(find_pod_dir(t.path(), "../x", None), None);
        assert_eq!(find_pod_dir(t.path(), "", None), None);
    }
}

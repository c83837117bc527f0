//! Whether the calling socket is enrolled, and as which workload: the one
//! home for that question in the kernel programs.
//!
//! The kernel reports the cgroup of the task making the call, which on a
//! Kubernetes node is a container's cgroup, never the pod's (cgroup v2 keeps
//! no process in the pod cgroup itself). So an `enrolled` entry matches its
//! own cgroup exactly and, when flagged `ENR_F_DESCENDANTS`, every cgroup
//! below it: the agent enrolls a pod by its pod-level cgroup, and a
//! container the runtime starts later is enrolled from its first connect,
//! without waiting for the agent to see it. An entry without the flag (a
//! workload from the directory source, a plain cgroup) matches only itself,
//! exactly as before the flag existed.

use aya_ebpf::helpers::{bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id};
use shunt_common::{EnrolledValue, ENR_F_DESCENDANTS, MAX_CGROUP_LEVELS};

use crate::maps::enrolled;

/// An enrolled socket: the cgroup it reported (for egress reports) and its
/// workload's entry (its own cgroup's, else the nearest enrolling ancestor's).
pub struct Enrollment {
    pub cgroup: u64,
    pub workload: EnrolledValue,
}

/// The calling socket's enrollment, if any.
#[inline(always)]
pub fn current() -> Option<Enrollment> {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is copied out at once.
    if let Some(w) = unsafe { enrolled.get(&cgroup) }.copied() {
        return Some(Enrollment {
            cgroup,
            workload: w,
        });
    }
    // Ancestors from the root down (level 0 is the root); the deepest
    // enrolling one wins. A level past the caller's own depth reports 0,
    // the caller's own level reports its own id: both end the walk. The
    // bound keeps the loop finite for the verifier; kubelet pods sit at
    // level 3 (systemd driver: kubepods.slice/kubepods-<qos>.slice/pod),
    // nested nodes (kind) a few levels deeper.
    // Plain, always-initialised scalars: an `Option<EnrolledValue>` carried
    // through the loop left an undefined register on the path that skips
    // it, which the verifier rejects ("R8 !read_ok").
    let mut found = false;
    let mut workload_id: u32 = 0;
    let mut flags: u32 = 0;
    let mut level: i32 = 0;
    while level < MAX_CGROUP_LEVELS {
        // SAFETY: plain helper call; an out-of-range level returns 0.
        let anc = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if anc == 0 || anc == cgroup {
            break;
        }
        // SAFETY: the value is copied out at once.
        if let Some(w) = unsafe { enrolled.get(&anc) } {
            if w.flags & ENR_F_DESCENDANTS != 0 {
                found = true;
                workload_id = w.workload_id;
                flags = w.flags;
            }
        }
        level += 1;
    }
    found.then_some(Enrollment {
        cgroup,
        workload: EnrolledValue { workload_id, flags },
    })
}

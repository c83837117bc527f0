//! Checks that the machine can run shunt before anything is loaded, so a
//! missing privilege or filesystem is one clear sentence instead of an
//! EPERM from deep inside the loader.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

const BPF_FS_MAGIC: i64 = 0xcafe4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x63677270;
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum PrereqError {
    #[error("shunt cannot run here: {}", .0.join("; "))]
    Missing(Vec<String>),
}

/// Verify privilege, kernel BTF, that `cgroup_root` is on cgroup2 and that
/// `pin_dir` is (or will be created) on a bpffs. All problems are reported
/// together.
pub fn check(pin_dir: &Path, cgroup_root: &Path) -> Result<(), PrereqError> {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push(
            "root privileges (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN) are required: run as root or as a privileged DaemonSet".to_string(),
        );
    }
    if !Path::new(VMLINUX_BTF).exists() {
        missing.push(format!(
            "kernel BTF is missing ({VMLINUX_BTF}): use a kernel built with CONFIG_DEBUG_INFO_BTF=y"
        ));
    }
    match fs_magic(cgroup_root) {
        Some(CGROUP2_SUPER_MAGIC) => {}
        Some(_) => missing.push(format!(
            "cgroup root {} is not on a cgroup2 filesystem: pass --cgroup-root with a directory under the cgroup2 mount{}",
            cgroup_root.display(),
            cgroup2_mount().map(|m| format!(" ({m})")).unwrap_or_default()
        )),
        None => missing.push(format!(
            "cgroup root {} does not exist: create it or pass --cgroup-root{}",
            cgroup_root.display(),
            cgroup2_mount().map(|m| format!(" (cgroup2 is mounted at {m})")).unwrap_or_default()
        )),
    }
    let existing = nearest_existing(pin_dir);
    if fs_magic(&existing) != Some(BPF_FS_MAGIC) {
        missing.push(format!(
            "pin directory {} is not on a bpffs: mount one with `mount -t bpf bpf /sys/fs/bpf` or pass --pin-dir",
            pin_dir.display()
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrereqError::Missing(missing))
    }
}

/// The first cgroup2 mount point in /proc/mounts.
pub fn cgroup2_mount() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, dir, ty) = (f.next()?, f.next()?, f.next()?);
        (ty == "cgroup2").then(|| dir.to_string())
    })
}

fn nearest_existing(p: &Path) -> PathBuf {
    let mut cur = p.to_path_buf();
    while !cur.exists() {
        if !cur.pop() {
            return PathBuf::from("/");
        }
    }
    cur
}

fn fs_magic(p: &Path) -> Option<i64> {
    let c = CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path; st is written by the kernel.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_type)
}

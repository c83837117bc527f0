//! Pinned links and the one thing aya does not offer for them: replacing
//! the program of a cgroup or sk_lookup link in place (`BPF_LINK_UPDATE`;
//! aya exposes it only for XDP and TC). The attribute structs are aya-obj's
//! generated `bpf_attr`, so the layout is the kernel's UAPI, not ours.

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
};

use aya_obj::generated::{bpf_attr, bpf_cmd};

/// bpf(2) with a zero-initialized attribute filled in by `fill`.
fn sys_bpf(cmd: bpf_cmd, fill: impl FnOnce(&mut bpf_attr)) -> io::Result<libc::c_long> {
    // SAFETY: bpf_attr is a plain C union; all-zero is its documented
    // "unused fields" state.
    let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
    fill(&mut attr);
    // SAFETY: a fully initialized bpf_attr of the size we pass.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd as libc::c_long,
            &mut attr as *mut bpf_attr,
            std::mem::size_of::<bpf_attr>(),
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{cmd:?}: {e}")));
    }
    Ok(r)
}

/// Open the pinned object at `pin` (BPF_OBJ_GET).
pub fn open_pinned(pin: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let fd = sys_bpf(bpf_cmd::BPF_OBJ_GET, |a| {
        a.__bindgen_anon_4.pathname = path.as_ptr() as u64;
    })?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Replace the program of the pinned link at `pin` with `prog` in one step.
/// The attachment never goes away, so an upgraded agent takes over without
/// a moment of unfiltered traffic.
pub fn update_program(pin: &Path, prog: BorrowedFd<'_>) -> io::Result<()> {
    let link = open_pinned(pin)?;
    sys_bpf(bpf_cmd::BPF_LINK_UPDATE, |a| {
        a.link_update.link_fd = link.as_raw_fd() as u32;
        a.link_update.__bindgen_anon_1.new_prog_fd = prog.as_raw_fd() as u32;
        // flags 0, no old_prog_fd: replace whatever runs in the link.
    })?;
    Ok(())
}

//! Loading the kernel object with every registry map pinned, and attaching
//! the programs of [`PROGRAMS`] through pinned links.
//!
//! A link pin that already exists is kept (the attachment never lapses) and
//! this build's program is swapped into it with [`links::update_program`].
//! Pins written by a shunt with another map layout are refused.
//!
//! Adding a program: its function in `ebpf/` (and `mod` in its `main.rs`),
//! its name in `shunt_common::prog_names`, one row in [`PROGRAMS`].

use std::{fs::File, os::fd::AsFd as _, path::PathBuf};

use aya::{
    maps::{Array, Map, MapData},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, ProgramError, SkLookup,
    },
    Ebpf, EbpfLoader,
};
use aya_obj::{
    generated::{bpf_attach_type, bpf_prog_type},
    programs::CgroupSockAddrAttachType as Hook,
};
use shunt_common::{prog_names, Meta, LAYOUT_VERSION};
use tracing::{info, warn};

use super::{
    links, projection,
    registry::{self, MapDef, MetaSlot},
    KernelError, KernelPaths,
};

/// Where a program is attached.
#[derive(Clone, Copy, Debug)]
pub enum AttachPoint {
    /// sk_lookup on the node's network namespace (the one this thread is in).
    NodeNetns,
    /// A cgroup sock_addr hook on the cgroup root (`--cgroup-root`); the
    /// programs act only on enrolled cgroups below it.
    CgroupRoot(Hook),
}

/// One kernel program: its name in the object and where it is attached.
/// Its link is pinned as `link_<name>`.
#[derive(Clone, Copy, Debug)]
pub struct ProgramSpec {
    pub name: &'static str,
    pub attach: AttachPoint,
}

impl ProgramSpec {
    pub fn program_type(&self) -> bpf_prog_type {
        match self.attach {
            AttachPoint::NodeNetns => bpf_prog_type::BPF_PROG_TYPE_SK_LOOKUP,
            AttachPoint::CgroupRoot(_) => bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
        }
    }
    pub fn attach_type(&self) -> bpf_attach_type {
        match self.attach {
            AttachPoint::NodeNetns => bpf_attach_type::BPF_SK_LOOKUP,
            AttachPoint::CgroupRoot(h) => h.into(),
        }
    }
}

const fn cgroup(name: &'static str, hook: Hook) -> ProgramSpec {
    ProgramSpec {
        name,
        attach: AttachPoint::CgroupRoot(hook),
    }
}

/// Every program the agent attaches, each through its own pinned link.
pub const PROGRAMS: [ProgramSpec; 9] = [
    ProgramSpec {
        name: prog_names::SK_LOOKUP,
        attach: AttachPoint::NodeNetns,
    },
    cgroup(prog_names::CONNECT4, Hook::Connect4),
    cgroup(prog_names::CONNECT6, Hook::Connect6),
    cgroup(prog_names::SENDMSG4, Hook::UDPSendMsg4),
    cgroup(prog_names::SENDMSG6, Hook::UDPSendMsg6),
    cgroup(prog_names::RECVMSG4, Hook::UDPRecvMsg4),
    cgroup(prog_names::RECVMSG6, Hook::UDPRecvMsg6),
    cgroup(prog_names::GETPEERNAME4, Hook::GetPeerName4),
    cgroup(prog_names::GETPEERNAME6, Hook::GetPeerName6),
];

/// The loaded object. Kept alive by the agent for the map handles it owns
/// (the capture SOCKMAP) and the logger.
pub struct Installed {
    pub ebpf: Ebpf,
    /// Names of programs whose links were already pinned and were reused.
    pub reused_links: Vec<&'static str>,
}

/// Load the object with every registry map pinned under `paths.pin_dir`
/// (reusing existing pins), write `meta` (`None`: keep a pinned one, stamp a
/// fresh one), and attach each program unless its link is already pinned.
pub fn install(paths: &KernelPaths, meta: Option<Meta>) -> Result<Installed, KernelError> {
    let mut ebpf = load_pinned(paths)?;
    write_meta(&mut ebpf, meta)?;

    let mut reused_links = Vec::new();
    for spec in &PROGRAMS {
        let link_path = paths.link(spec);
        if link_path.exists() {
            match PinnedLink::from_pin(&link_path) {
                Ok(_) => {
                    // Keep the link (and with it the attachment: no gap),
                    // but run this build's program in it.
                    load(&mut ebpf, spec)?;
                    let fd = ebpf
                        .program(spec.name)
                        .ok_or(KernelError::MissingProgram(spec.name))?
                        .fd()
                        .map_err(|e| KernelError::Program(spec.name, e))?;
                    // On failure the link keeps the previous agent's program,
                    // which still enforces everything (the layout matched).
                    if let Err(e) = links::update_program(&link_path, fd.as_fd()) {
                        warn!(program = spec.name, error = %e, "could not update the pinned link's program; the previous one stays attached");
                    }
                    reused_links.push(spec.name);
                    continue;
                }
                Err(e) => {
                    // A pin that is not a live link (e.g. its cgroup was
                    // removed) is replaced rather than trusted.
                    warn!(path = %link_path.display(), error = %e, "stale link pin, re-attaching");
                    let _ = std::fs::remove_file(&link_path);
                }
            }
        }
        let link = attach(&mut ebpf, spec, paths)?;
        link.pin(&link_path)
            .map_err(|e| KernelError::Pin(link_path.clone(), e))?;
        info!(program = spec.name, link = %link_path.display(), "attached and pinned");
    }
    Ok(Installed { ebpf, reused_links })
}

/// Load the object (no program is loaded into the kernel yet) with every
/// registry map pinned under `paths.pin_dir`, reusing pins whose layout
/// version matches.
pub fn load_pinned(paths: &KernelPaths) -> Result<Ebpf, KernelError> {
    std::fs::create_dir_all(&paths.pin_dir)
        .map_err(|e| KernelError::PinDir(paths.pin_dir.clone(), e))?;
    check_layout(paths)?;
    let mut loader = EbpfLoader::new();
    for spec in registry::ALL {
        loader.map_pin_path(spec.name, paths.map(spec));
    }
    Ok(loader.load(crate::EBPF_OBJECT)?)
}

fn write_meta(ebpf: &mut Ebpf, meta: Option<Meta>) -> Result<(), KernelError> {
    let name = MetaSlot::SPEC.name;
    let mut slot: Array<_, Meta> =
        Array::try_from(ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?)
            .map_err(KernelError::map(name, "open"))?;
    let current = slot.get(&0, 0).map_err(KernelError::map(name, "read"))?;
    let value = meta.unwrap_or_else(|| projection::stamped(current));
    if value != current {
        slot.set(0, &value, 0)
            .map_err(KernelError::map(name, "write"))?;
    }
    Ok(())
}

/// The program of `spec`, as its aya type.
enum Prog<'a> {
    SkLookup(&'a mut SkLookup),
    SockAddr(&'a mut CgroupSockAddr),
}

/// Load the program of `spec` into the kernel (once per object).
fn load<'a>(ebpf: &'a mut Ebpf, spec: &ProgramSpec) -> Result<Prog<'a>, KernelError> {
    let err = |e: ProgramError| KernelError::Program(spec.name, e);
    let program = ebpf
        .program_mut(spec.name)
        .ok_or(KernelError::MissingProgram(spec.name))?;
    Ok(match spec.attach {
        AttachPoint::NodeNetns => {
            let p: &mut SkLookup = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            Prog::SkLookup(p)
        }
        AttachPoint::CgroupRoot(_) => {
            let p: &mut CgroupSockAddr = program.try_into().map_err(err)?;
            p.load().map_err(err)?;
            Prog::SockAddr(p)
        }
    })
}

fn attach(ebpf: &mut Ebpf, spec: &ProgramSpec, paths: &KernelPaths) -> Result<FdLink, KernelError> {
    let err = |e: ProgramError| KernelError::Program(spec.name, e);
    let link = match load(ebpf, spec)? {
        Prog::SkLookup(p) => {
            // thread-self: the netns this thread (the node's) is in.
            let ns_path = PathBuf::from("/proc/thread-self/ns/net");
            let ns = File::open(&ns_path).map_err(|e| KernelError::Open(ns_path, e))?;
            let id = p.attach(ns).map_err(err)?;
            FdLink::from(p.take_link(id).map_err(err)?)
        }
        Prog::SockAddr(p) => {
            let cg = File::open(&paths.cgroup_root)
                .map_err(|e| KernelError::Open(paths.cgroup_root.clone(), e))?;
            let id = p.attach(cg, CgroupAttachMode::Single).map_err(err)?;
            FdLink::try_from(p.take_link(id).map_err(err)?).map_err(|e| err(e.into()))?
        }
    };
    Ok(link)
}

/// Refuse to reuse pins written by a shunt with another map layout: the
/// programs would read garbage.
fn check_layout(paths: &KernelPaths) -> Result<(), KernelError> {
    let spec = &MetaSlot::SPEC;
    if !paths.map(spec).exists() {
        return Ok(());
    }
    let data = MapData::from_pin(paths.map(spec)).map_err(KernelError::map(spec.name, "open"))?;
    let arr: Array<_, Meta> =
        Array::try_from(Map::Array(data)).map_err(KernelError::map(spec.name, "open"))?;
    let found = arr.get(&0, 0).map(|m| m.layout_version).unwrap_or(0);
    // 0: created but never written (an agent died mid-install): reusable.
    if found != 0 && found != LAYOUT_VERSION {
        return Err(KernelError::LayoutMismatch {
            dir: paths.pin_dir.display().to_string(),
            found,
        });
    }
    Ok(())
}

/// Remove every pin shunt created under `pin_dir` (links first, which
/// detaches the programs), then the directory. Other files are left alone.
pub fn remove_pins(pin_dir: &std::path::Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let pins = PROGRAMS
        .iter()
        .map(|p| super::link_pin(pin_dir, p))
        .chain(registry::ALL.iter().map(|m| pin_dir.join(m.pin)));
    for p in pins {
        match std::fs::remove_file(&p) {
            Ok(()) => removed.push(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    match std::fs::remove_dir(pin_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {
            warn!(dir = %pin_dir.display(), "pin directory holds files shunt did not create; left in place");
        }
        Err(e) => return Err(e),
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya_obj::ProgramSection;

    /// The table and the built object list the same programs, each with
    /// the program type and hook the table attaches it with.
    #[test]
    fn program_table_matches_the_kernel_object() {
        let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("kernel object parses");
        let mut in_object: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        in_object.sort();
        let mut in_table: Vec<&str> = PROGRAMS.iter().map(|p| p.name).collect();
        in_table.sort();
        assert_eq!(in_object, in_table);
        for spec in &PROGRAMS {
            let (ty, hook) = match &obj.programs[spec.name].section {
                ProgramSection::SkLookup => (
                    bpf_prog_type::BPF_PROG_TYPE_SK_LOOKUP,
                    bpf_attach_type::BPF_SK_LOOKUP,
                ),
                ProgramSection::CgroupSockAddr { attach_type } => (
                    bpf_prog_type::BPF_PROG_TYPE_CGROUP_SOCK_ADDR,
                    (*attach_type).into(),
                ),
                other => panic!("{}: unexpected section {other:?}", spec.name),
            };
            assert_eq!(ty, spec.program_type(), "{}", spec.name);
            assert_eq!(hook, spec.attach_type(), "{}", spec.name);
        }
    }
}

//! Loading the kernel programs, attaching them through pinned links, the
//! local routes for the VIP prefixes, and the capture socket.
//!
//! Everything here is idempotent: an agent that finds its maps and links
//! already pinned reuses them, so a restart (or a second agent taking over)
//! never detaches a program and VIP traffic stays fail-closed throughout.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, SockMap},
    programs::{
        links::{FdLink, PinnedLink},
        CgroupAttachMode, CgroupSockAddr, SkLookup,
    },
    Ebpf, EbpfLoader,
};
use rtnetlink::packet_route::route::{RouteProtocol, RouteScope, RouteType};
use shunt_common::{map_names, prog_names, Meta, LAYOUT_VERSION};
use tracing::{info, warn};

/// aya-log's ring buffer, pinned too so that reused links keep logging into
/// a map the next agent can read.
const AYA_LOGS: &str = "AYA_LOGS";
const PINNED_MAPS: [&str; 9] = [
    map_names::SERVICES,
    map_names::ENROLLED,
    map_names::CAPTURE,
    map_names::COUNTERS,
    map_names::META,
    map_names::EGRESS_ALLOW,
    map_names::DNS_ORIG,
    map_names::EVENTS,
    map_names::SOURCES,
];
const RT_TABLE_LOCAL: u32 = 255;
const LOOPBACK_IFINDEX: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("creating pin directory {0}: {1}")]
    PinDir(PathBuf, std::io::Error),
    #[error(
        "pinned maps in {dir} have layout version {found}, this shunt uses {LAYOUT_VERSION}: run `shunt uninstall --pin-dir {dir}` first"
    )]
    LayoutMismatch { dir: String, found: u32 },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the kernel object")]
    MissingMap(&'static str),
    #[error("program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("pinning link {0}: {1}")]
    Pin(PathBuf, aya::pin::PinError),
    #[error("map {0}: {1}")]
    Map(&'static str, aya::maps::MapError),
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("netlink: {0}")]
    Netlink(String),
    #[error("capture socket on {0}: {1}")]
    Socket(SocketAddr, std::io::Error),
}

/// Where the agent's kernel state lives. Every field is a flag so that tests
/// get their own.
#[derive(Clone, Debug)]
pub struct KernelPaths {
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
}

impl KernelPaths {
    pub fn map(&self, name: &str) -> PathBuf {
        self.pin_dir.join(name)
    }
    pub fn link(&self, prog: &str) -> PathBuf {
        self.pin_dir.join(format!("link_{prog}"))
    }
}

/// The loaded object. Kept alive by the agent for the map handles it owns
/// (the capture SOCKMAP) and the logger.
pub struct Installed {
    pub ebpf: Ebpf,
    /// Names of programs whose links were already pinned and were reused.
    pub reused_links: Vec<&'static str>,
}

/// Load the object with every map pinned under `paths.pin_dir` (reusing
/// existing pins), write `meta` (layout version, egress mode, DNS proxy),
/// and attach each program unless its link is already pinned. The sk_lookup
/// link is attached to the current network namespace (the node's).
pub fn install(paths: &KernelPaths, meta_value: Option<Meta>) -> Result<Installed, CaptureError> {
    std::fs::create_dir_all(&paths.pin_dir)
        .map_err(|e| CaptureError::PinDir(paths.pin_dir.clone(), e))?;
    check_layout(paths)?;

    let map_paths: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|n| (*n, paths.map(n)))
        .chain(std::iter::once((AYA_LOGS, paths.map("aya_logs"))))
        .collect();
    let mut loader = EbpfLoader::new();
    for (name, path) in &map_paths {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader.load(crate::EBPF_OBJECT)?;

    let mut meta: Array<_, Meta> = Array::try_from(
        ebpf.map_mut(map_names::META)
            .ok_or(CaptureError::MissingMap(map_names::META))?,
    )
    .map_err(|e| CaptureError::Map(map_names::META, e))?;
    let current = meta
        .get(&0, 0)
        .map_err(|e| CaptureError::Map(map_names::META, e))?;
    let value = match meta_value {
        Some(m) => Meta {
            layout_version: LAYOUT_VERSION,
            ..m
        },
        // Keep what an earlier agent wrote; only stamp a fresh map.
        None => Meta {
            layout_version: LAYOUT_VERSION,
            ..current
        },
    };
    if value != current {
        meta.set(0, &value, 0)
            .map_err(|e| CaptureError::Map(map_names::META, e))?;
    }

    let mut reused_links = Vec::new();
    for prog in std::iter::once(prog_names::SK_LOOKUP).chain(prog_names::CGROUP) {
        let link_path = paths.link(prog);
        if link_path.exists() {
            match PinnedLink::from_pin(&link_path) {
                Ok(_) => {
                    // Keep the link (and with it the attachment: no gap),
                    // but run this build's program in it.
                    let fd = load_program(&mut ebpf, prog)?;
                    // On failure the link keeps the previous agent's program,
                    // which still enforces everything (the layout matched).
                    if let Err(e) = link_update(&link_path, fd) {
                        warn!(program = prog, error = %e, "could not update the pinned link's program; the previous one stays attached");
                    }
                    reused_links.push(prog);
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
        let link = attach(&mut ebpf, prog, paths)?;
        link.pin(&link_path)
            .map_err(|e| CaptureError::Pin(link_path.clone(), e))?;
        info!(program = prog, link = %link_path.display(), "attached and pinned");
    }
    Ok(Installed { ebpf, reused_links })
}

/// Load `prog` and return its fd (borrowed from the loaded object).
fn load_program(ebpf: &mut Ebpf, prog: &'static str) -> Result<std::os::fd::RawFd, CaptureError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let program = ebpf
        .program_mut(prog)
        .ok_or(CaptureError::MissingProgram(prog))?;
    let err = |e| CaptureError::Program(prog, e);
    if prog == prog_names::SK_LOOKUP {
        let p: &mut SkLookup = program.try_into().map_err(err)?;
        p.load().map_err(err)?;
        Ok(p.fd().map_err(err)?.as_fd().as_raw_fd())
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(err)?;
        p.load().map_err(err)?;
        Ok(p.fd().map_err(err)?.as_fd().as_raw_fd())
    }
}

/// Replace the program of the pinned link at `pin` with `prog_fd` in one
/// step (BPF_LINK_UPDATE; aya exposes it only for XDP and TC, so this is a
/// raw bpf(2) call). The attachment never goes away, so an upgraded agent
/// takes over without a moment of unfiltered traffic.
fn link_update(pin: &Path, prog_fd: std::os::fd::RawFd) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_UPDATE: libc::c_long = 29;
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    #[repr(C)]
    struct LinkUpdate {
        link_fd: u32,
        new_prog_fd: u32,
        flags: u32,
        old_prog_fd: u32,
    }
    let path = std::ffi::CString::new(pin.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let get = ObjGet {
        pathname: path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
    };
    // SAFETY: a valid, fully initialized bpf_attr prefix for the command,
    // with its size.
    let link_fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &get as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if link_fd < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(e.kind(), format!("BPF_OBJ_GET: {e}")));
    }
    // SAFETY: the kernel just returned this fd to us.
    let link =
        unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(link_fd as i32) };
    let upd = LinkUpdate {
        link_fd: std::os::fd::AsRawFd::as_raw_fd(&link) as u32,
        new_prog_fd: prog_fd as u32,
        flags: 0,
        old_prog_fd: 0,
    };
    // SAFETY: as above.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_UPDATE,
            &upd as *const LinkUpdate,
            std::mem::size_of::<LinkUpdate>(),
        )
    };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        return Err(std::io::Error::new(
            e.kind(),
            format!("BPF_LINK_UPDATE: {e}"),
        ));
    }
    Ok(())
}

fn attach(
    ebpf: &mut Ebpf,
    prog: &'static str,
    paths: &KernelPaths,
) -> Result<FdLink, CaptureError> {
    load_program(ebpf, prog)?;
    let program = ebpf
        .program_mut(prog)
        .ok_or(CaptureError::MissingProgram(prog))?;
    let err = |e| CaptureError::Program(prog, e);
    if prog == prog_names::SK_LOOKUP {
        let p: &mut SkLookup = program.try_into().map_err(err)?;
        // thread-self: the netns this thread (the node's) is in.
        let ns_path = PathBuf::from("/proc/thread-self/ns/net");
        let ns = File::open(&ns_path).map_err(|e| CaptureError::Open(ns_path, e))?;
        let id = p.attach(ns).map_err(err)?;
        let link = p.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|e| CaptureError::Program(prog, e.into()))
    } else {
        let p: &mut CgroupSockAddr = program.try_into().map_err(err)?;
        let cg = File::open(&paths.cgroup_root)
            .map_err(|e| CaptureError::Open(paths.cgroup_root.clone(), e))?;
        let id = p.attach(cg, CgroupAttachMode::Single).map_err(err)?;
        let link = p.take_link(id).map_err(err)?;
        FdLink::try_from(link).map_err(|e| CaptureError::Program(prog, e.into()))
    }
}

/// Refuse to reuse pins written by a shunt with another map layout: the
/// programs would read garbage.
fn check_layout(paths: &KernelPaths) -> Result<(), CaptureError> {
    let meta_path = paths.map(map_names::META);
    if !meta_path.exists() {
        return Ok(());
    }
    let data = MapData::from_pin(&meta_path).map_err(|e| CaptureError::Map(map_names::META, e))?;
    let arr: Array<_, Meta> = Array::try_from(aya::maps::Map::Array(data))
        .map_err(|e| CaptureError::Map(map_names::META, e))?;
    let found = arr.get(&0, 0).map(|m| m.layout_version).unwrap_or(0);
    // 0: created but never written (an agent died mid-install): reusable.
    if found != 0 && found != LAYOUT_VERSION {
        return Err(CaptureError::LayoutMismatch {
            dir: paths.pin_dir.display().to_string(),
            found,
        });
    }
    Ok(())
}

/// Put `listener` at index 0 of the capture SOCKMAP: new SYNs to services
/// go to it from now on; a previous agent's listener keeps the connections
/// already in its accept queue.
pub fn insert_capture_socket(ebpf: &mut Ebpf, listener: &impl AsRawFd) -> Result<(), CaptureError> {
    let mut map: SockMap<_> = SockMap::try_from(
        ebpf.map_mut(map_names::CAPTURE)
            .ok_or(CaptureError::MissingMap(map_names::CAPTURE))?,
    )
    .map_err(|e| CaptureError::Map(map_names::CAPTURE, e))?;
    map.set(0, listener, 0)
        .map_err(|e| CaptureError::Map(map_names::CAPTURE, e))
}

/// Remove index 0 of the capture SOCKMAP (used by an agent that shuts down
/// without a successor, so that it can drain its queue while new SYNs are
/// already refused).
pub fn clear_capture_socket(ebpf: &mut Ebpf) -> Result<(), CaptureError> {
    let mut map: SockMap<_> = SockMap::try_from(
        ebpf.map_mut(map_names::CAPTURE)
            .ok_or(CaptureError::MissingMap(map_names::CAPTURE))?,
    )
    .map_err(|e| CaptureError::Map(map_names::CAPTURE, e))?;
    match map.clear_index(&0) {
        Ok(()) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        Err(e) => Err(CaptureError::Map(map_names::CAPTURE, e)),
    }
}

/// The capture listener: one dual-stack socket (IPv4 arrives v4-mapped)
/// that only sk_lookup feeds. Bound to an ephemeral loopback port so that a
/// successor can bind its own without SO_REUSEPORT (a reuseport group would
/// let the kernel hand new SYNs back to the draining listener).
pub fn capture_listener(addr: SocketAddr) -> Result<std::net::TcpListener, CaptureError> {
    use socket2::{Domain, Socket, Type};
    let err = |e| CaptureError::Socket(addr, e);
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None).map_err(err)?;
    sock.set_only_v6(false).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(4096).map_err(err)?;
    Ok(sock.into())
}

/// VIP prefixes routed locally in the node namespace so that SYNs to them
/// reach sk_lookup (`ip route add local PREFIX dev lo`).
pub const VIP_ROUTES_V4: (Ipv4Addr, u8) = (Ipv4Addr::new(240, 240, 0, 0), 16);
pub const VIP_ROUTES_V6: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 0), 48);

/// Install (or replace, idempotently) the local routes with netlink.
pub async fn install_routes() -> Result<(), CaptureError> {
    routes(true).await
}

/// Remove the local routes; absent routes are not an error.
pub async fn remove_routes() -> Result<(), CaptureError> {
    routes(false).await
}

async fn routes(add: bool) -> Result<(), CaptureError> {
    use rtnetlink::{new_connection, RouteMessageBuilder};
    let (conn, handle, _) = new_connection().map_err(|e| CaptureError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    if add {
        // Local routes via a loopback that is down fail with ENETDOWN (a
        // fresh namespace); bringing lo up is idempotent.
        if let Err(e) = handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(LOOPBACK_IFINDEX)
                    .up()
                    .build(),
            )
            .execute()
            .await
        {
            task.abort();
            return Err(CaptureError::Netlink(format!("bringing lo up: {e}")));
        }
    }
    let v4 = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(VIP_ROUTES_V4.0, VIP_ROUTES_V4.1)
        .kind(RouteType::Local)
        .table_id(RT_TABLE_LOCAL)
        .scope(RouteScope::Host)
        .protocol(RouteProtocol::Static)
        .output_interface(LOOPBACK_IFINDEX)
        .build();
    let v6 = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(VIP_ROUTES_V6.0, VIP_ROUTES_V6.1)
        .kind(RouteType::Local)
        .table_id(RT_TABLE_LOCAL)
        .scope(RouteScope::Host)
        .protocol(RouteProtocol::Static)
        .output_interface(LOOPBACK_IFINDEX)
        .build();
    let mut result = Ok(());
    for msg in [v4, v6] {
        let r = if add {
            handle.route().add(msg).replace().execute().await
        } else {
            match handle.route().del(msg).execute().await {
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::ESRCH || e.raw_code() == -libc::ENOENT =>
                {
                    Ok(())
                }
                r => r,
            }
        };
        if let Err(e) = r {
            result = Err(CaptureError::Netlink(format!(
                "{} VIP route: {e}",
                if add { "adding" } else { "removing" }
            )));
        }
    }
    task.abort();
    result
}

/// Strict reverse-path filtering (IPv4) in the node namespace: a pod cannot
/// send with another pod's source address, which matters because the agent
/// identifies workloads by source address.
pub fn set_strict_rp_filter() -> Result<(), CaptureError> {
    for p in [
        "/proc/sys/net/ipv4/conf/all/rp_filter",
        "/proc/sys/net/ipv4/conf/default/rp_filter",
    ] {
        std::fs::write(p, "1").map_err(|e| CaptureError::Open(PathBuf::from(p), e))?;
    }
    Ok(())
}

/// Name of the dummy interface that carries the DNS proxy's addresses.
pub const DNS_INTERFACE: &str = "shunt-dns0";

/// Create (idempotently) the dummy interface owned by the agent and put the
/// DNS proxy's link-local IPv4 and ULA IPv6 addresses on it, so pods reach
/// the proxy through their default route to the node.
pub async fn install_dns_interface(v4: Ipv4Addr, v6: Ipv6Addr) -> Result<(), CaptureError> {
    use futures::TryStreamExt as _;
    use rtnetlink::{new_connection, packet_route::address::AddressHeaderFlags, LinkDummy};
    let nl =
        |e: rtnetlink::Error| CaptureError::Netlink(format!("DNS interface {DNS_INTERFACE}: {e}"));
    let (conn, handle, _) = new_connection().map_err(|e| CaptureError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let result = async {
        let index = match link_index(&handle, DNS_INTERFACE).await {
            Some(i) => i,
            None => match handle
                .link()
                .add(LinkDummy::new(DNS_INTERFACE).up().build())
                .execute()
                .await
            {
                Ok(()) => link_index(&handle, DNS_INTERFACE).await.ok_or_else(|| {
                    CaptureError::Netlink(format!("{DNS_INTERFACE} vanished after creation"))
                })?,
                // A kernel without the dummy driver: the addresses go on
                // lo, which delivers them locally just the same.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                    warn!("no dummy interface support in this kernel; the DNS proxy's addresses go on lo");
                    LOOPBACK_IFINDEX
                }
                Err(e) => return Err(nl(e)),
            },
        };
        handle
            .link()
            .set(rtnetlink::LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(nl)?;
        let existing: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(nl)?;
        let has = |ip: std::net::IpAddr| {
            existing.iter().any(|m| {
                m.attributes.iter().any(|a| {
                    matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(x) if *x == ip)
                })
            })
        };
        if !has(v4.into()) {
            handle.address().add(index, v4.into(), 32).execute().await.map_err(nl)?;
        }
        if !has(v6.into()) {
            let mut req = handle.address().add(index, v6.into(), 128);
            // No duplicate address detection: the address must work at once.
            req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
            req.execute().await.map_err(nl)?;
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

async fn remove_lo_addresses(ips: &[std::net::IpAddr]) -> Result<(), CaptureError> {
    use futures::TryStreamExt as _;
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| CaptureError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let nl =
        |e: rtnetlink::Error| CaptureError::Netlink(format!("removing DNS addresses from lo: {e}"));
    let result = async {
        let addrs: Vec<_> = handle
            .address()
            .get()
            .set_link_index_filter(LOOPBACK_IFINDEX)
            .execute()
            .try_collect()
            .await
            .map_err(nl)?;
        for m in addrs {
            let ours = m.attributes.iter().any(|a| {
                matches!(a, rtnetlink::packet_route::address::AddressAttribute::Address(x) if ips.contains(x))
            });
            if ours {
                handle.address().del(m).execute().await.map_err(nl)?;
            }
        }
        Ok(())
    }
    .await;
    task.abort();
    result
}

async fn link_index(handle: &rtnetlink::Handle, name: &str) -> Option<u32> {
    use futures::TryStreamExt as _;
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    links
        .try_next()
        .await
        .ok()
        .flatten()
        .map(|m| m.header.index)
}

/// The interface through which the node reaches each address (`ip route
/// get`): where a genuine packet from that workload arrives. Addresses
/// without a route are left out.
pub async fn route_oifs(
    ips: &[std::net::IpAddr],
) -> Result<std::collections::HashMap<std::net::IpAddr, u32>, CaptureError> {
    use futures::TryStreamExt as _;
    use rtnetlink::packet_route::route::RouteAttribute;
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| CaptureError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let mut out = std::collections::HashMap::new();
    for ip in ips {
        let msg = match rtnetlink::RouteMessageBuilder::<std::net::IpAddr>::new()
            .destination_prefix(*ip, if ip.is_ipv4() { 32 } else { 128 })
        {
            Ok(b) => b.build(),
            Err(_) => continue,
        };
        let Ok(routes) = handle
            .route()
            .get(msg)
            .execute()
            .try_collect::<Vec<_>>()
            .await
        else {
            continue;
        };
        let oif = routes
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            });
        if let Some(i) = oif {
            out.insert(*ip, i);
        }
    }
    task.abort();
    Ok(out)
}

/// Remove the VIP routes and the DNS interface, or the DNS proxy's
/// addresses from lo where there was no dummy interface (`shunt uninstall`).
pub async fn uninstall_network(dns: Option<(Ipv4Addr, Ipv6Addr)>) -> Result<(), CaptureError> {
    remove_routes().await?;
    if let Some((v4, v6)) = dns {
        remove_lo_addresses(&[v4.into(), v6.into()]).await?;
    }
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| CaptureError::Netlink(e.to_string()))?;
    let task = tokio::spawn(conn);
    let r = match link_index(&handle, DNS_INTERFACE).await {
        Some(i) => handle
            .link()
            .del(i)
            .execute()
            .await
            .map_err(|e| CaptureError::Netlink(format!("removing {DNS_INTERFACE}: {e}"))),
        None => Ok(()),
    };
    task.abort();
    r
}

/// Remove every pin shunt created under `pin_dir` (links first, which
/// detaches the programs), then the directory. Other files are left alone.
pub fn remove_pins(pin_dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let names = std::iter::once(prog_names::SK_LOOKUP)
        .chain(prog_names::CGROUP)
        .map(|p| format!("link_{p}"))
        .chain(PINNED_MAPS.iter().map(|s| s.to_string()))
        .chain(std::iter::once("aya_logs".to_string()));
    for name in names {
        let p = pin_dir.join(name);
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

/// Start forwarding the kernel programs' aya-log records to `tracing`.
/// Rare events only (no capture socket, ...); failures here are not fatal.
pub fn start_kernel_log(ebpf: &mut Ebpf) {
    match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => {
            // SAFETY: the logger owns its ring-buffer fd and lives inside the
            // AsyncFd, so the fd outlives its registration.
            let fd = match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
                Ok(fd) => fd,
                Err(e) => {
                    warn!(error = %e, "kernel log unavailable");
                    return;
                }
            };
            tokio::spawn(async move {
                let mut fd = fd;
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "kernel log unavailable"),
    }
}

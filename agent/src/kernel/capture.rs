//! The capture listener and its slot in the `capture` SOCKMAP: sk_lookup
//! assigns every SYN to a known VIP:port to the socket at index 0. The
//! accept loop that serves it is `crate::agent`.

use std::{net::SocketAddr, os::fd::AsRawFd};

use aya::{
    maps::{MapError, SockMap},
    Ebpf,
};

use super::{
    registry::{Capture, MapDef},
    KernelError,
};

/// The SOCKMAP slot sk_lookup reads.
const SLOT: u32 = 0;

fn sockmap(ebpf: &mut Ebpf) -> Result<SockMap<&mut aya::maps::MapData>, KernelError> {
    let name = Capture::SPEC.name;
    SockMap::try_from(ebpf.map_mut(name).ok_or(KernelError::MissingMap(name))?)
        .map_err(KernelError::map(name, "open"))
}

/// Put `listener` in the capture slot: new SYNs to services go to it from
/// now on; a previous agent's listener keeps the connections already in its
/// accept queue.
pub fn insert(ebpf: &mut Ebpf, listener: &impl AsRawFd) -> Result<(), KernelError> {
    sockmap(ebpf)?
        .set(SLOT, listener, 0)
        .map_err(KernelError::map(Capture::SPEC.name, "insert"))
}

/// Empty the capture slot (an agent that shuts down without a successor
/// drains its queue while new SYNs are already refused).
pub fn clear(ebpf: &mut Ebpf) -> Result<(), KernelError> {
    match sockmap(ebpf)?.clear_index(&SLOT) {
        Ok(()) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        Err(e) => Err(KernelError::map(Capture::SPEC.name, "clear")(e)),
    }
}

/// The capture listener: one dual-stack socket (IPv4 arrives v4-mapped)
/// that only sk_lookup feeds. Bound to an ephemeral loopback port so that a
/// successor can bind its own without SO_REUSEPORT (a reuseport group would
/// let the kernel hand new SYNs back to the draining listener).
pub fn listener(addr: SocketAddr) -> Result<std::net::TcpListener, KernelError> {
    use socket2::{Domain, Socket, Type};
    let err = |e| KernelError::Socket(addr, e);
    let sock = Socket::new(Domain::IPV6, Type::STREAM, None).map_err(err)?;
    sock.set_only_v6(false).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    // Accepted sockets inherit TCP_NODELAY: one setsockopt here, none per
    // connection.
    sock.set_tcp_nodelay(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(4096).map_err(err)?;
    Ok(sock.into())
}

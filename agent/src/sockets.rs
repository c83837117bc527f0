//! Listening sockets that a successor agent can bind while its predecessor
//! still drains (SO_REUSEPORT): the DNS proxy and the admin endpoints keep
//! answering through a handover. Not for the capture socket, where a
//! reuseport group would let the kernel pick the draining listener.

use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

pub fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

pub fn udp_socket(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    tokio::net::UdpSocket::from_std(s.into())
}

//! cgroup/recvmsg6: as recvmsg4, for IPv6 sockets.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{restore, ALLOW};

#[cgroup_sock_addr(recvmsg6)]
pub fn shunt_recvmsg6(ctx: SockAddrContext) -> i32 {
    restore::<true>(&ctx);
    ALLOW
}

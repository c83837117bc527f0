//! cgroup/getpeername6: as getpeername4, for IPv6 sockets.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{restore, ALLOW};

#[cgroup_sock_addr(getpeername6)]
pub fn shunt_getpeername6(ctx: SockAddrContext) -> i32 {
    restore::<true>(&ctx);
    ALLOW
}

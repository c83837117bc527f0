//! cgroup/getpeername4: a DNS-captured socket's peer is the resolver the
//! application asked, not the proxy.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{restore, ALLOW};

#[cgroup_sock_addr(getpeername4)]
pub fn shunt_getpeername4(ctx: SockAddrContext) -> i32 {
    restore::<false>(&ctx);
    ALLOW
}

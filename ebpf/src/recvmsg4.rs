//! cgroup/recvmsg4: a DNS answer from the proxy is shown as coming from the
//! resolver the application asked, so the resolver (glibc checks the
//! source) accepts it.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{restore, ALLOW};

#[cgroup_sock_addr(recvmsg4)]
pub fn shunt_recvmsg4(ctx: SockAddrContext) -> i32 {
    restore::<false>(&ctx);
    ALLOW
}

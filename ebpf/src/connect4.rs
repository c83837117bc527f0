//! cgroup/connect4: for enrolled sockets, refuse unknown VIP:ports
//! (ECONNREFUSED, no SYN), steer DNS to the proxy, apply the egress mode.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{refuse_connect, steer, ALLOW, REFUSE};

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    match steer::<false>(&ctx, true) {
        REFUSE => refuse_connect(),
        _ => ALLOW,
    }
}

//! cgroup/sendmsg6: as sendmsg4, for IPv6 (and IPv4-mapped) destinations.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{steer, ALLOW, REFUSE, REJECT};

#[cgroup_sock_addr(sendmsg6)]
pub fn shunt_sendmsg6(ctx: SockAddrContext) -> i32 {
    match steer::<true>(&ctx, false) {
        REFUSE => REJECT,
        _ => ALLOW,
    }
}

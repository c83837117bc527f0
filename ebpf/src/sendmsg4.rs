//! cgroup/sendmsg4: unconnected UDP. DNS queries of enrolled sockets go to
//! the DNS proxy; VIPs (TCP only) and, under REGISTRY_ONLY, destinations
//! outside the registry are refused (EPERM). Not reported per datagram.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{steer, ALLOW, REFUSE, REJECT};

#[cgroup_sock_addr(sendmsg4)]
pub fn shunt_sendmsg4(ctx: SockAddrContext) -> i32 {
    match steer::<false>(&ctx, false) {
        REFUSE => REJECT,
        _ => ALLOW,
    }
}

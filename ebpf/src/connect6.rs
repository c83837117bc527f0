//! cgroup/connect6: as connect4. IPv4-mapped destinations
//! (`::ffff:240.240.0.1`) reach the same map entries as plain IPv4, so a
//! dual-stack socket cannot slip past the check (cilium#9923).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{refuse_connect, steer, ALLOW, REFUSE};

#[cgroup_sock_addr(connect6)]
pub fn shunt_connect6(ctx: SockAddrContext) -> i32 {
    match steer::<true>(&ctx, true) {
        REFUSE => refuse_connect(),
        _ => ALLOW,
    }
}

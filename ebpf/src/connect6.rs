//! cgroup/connect6: same decision as connect4. IPv4-mapped destinations
//! (`::ffff:240.240.0.1`) reach the same map entries as plain IPv4, so a
//! dual-stack socket cannot slip past the check (cilium#9923).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    ctx_load,
    verdict::{connect_verdict, words_to_bytes},
};

#[cgroup_sock_addr(connect6)]
pub fn shunt_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = words_to_bytes([
        ctx_load!(sa, user_ip6[0]),
        ctx_load!(sa, user_ip6[1]),
        ctx_load!(sa, user_ip6[2]),
        ctx_load!(sa, user_ip6[3]),
    ]);
    let port = u16::from_be(ctx_load!(sa, user_port) as u16);
    connect_verdict(&addr, port, ctx_load!(sa, protocol))
}

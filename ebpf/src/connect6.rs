//! cgroup/connect6: same decision as connect4. IPv4-mapped destinations
//! (`::ffff:240.240.0.1`) reach the same map entries as plain IPv4, so a
//! dual-stack socket cannot slip past the check (cilium#9923).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::verdict::connect_verdict;

#[cgroup_sock_addr(connect6)]
pub fn shunt_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    let w = [
        sa.user_ip6[0],
        sa.user_ip6[1],
        sa.user_ip6[2],
        sa.user_ip6[3],
    ];
    let mut addr = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let b = w[i].to_ne_bytes();
        addr[i * 4] = b[0];
        addr[i * 4 + 1] = b[1];
        addr[i * 4 + 2] = b[2];
        addr[i * 4 + 3] = b[3];
        i += 1;
    }
    let port = u16::from_be(sa.user_port as u16);
    connect_verdict(&addr, port, sa.protocol)
}

//! cgroup/connect6: as connect4. IPv4-mapped destinations
//! (`::ffff:240.240.0.1`) reach the same map entries as plain IPv4, so a
//! dual-stack socket cannot slip past the check (cilium#9923).

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{
    bytes_to_words, decide, port_field, refuse_connect, words_to_bytes, Redirect, ALLOW, PASS,
    REDIRECT,
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
    let protocol = ctx_load!(sa, protocol);
    let mut r = Redirect {
        addr: [0; 16],
        port: 0,
    };
    match decide(&ctx, &addr, port, protocol, true, &mut r) {
        PASS => ALLOW,
        REDIRECT => {
            let (to, to_port) = (r.addr, r.port);
            let w = bytes_to_words(&to);
            ctx_store!(sa, w[0], user_ip6[0]);
            ctx_store!(sa, w[1], user_ip6[1]);
            ctx_store!(sa, w[2], user_ip6[2]);
            ctx_store!(sa, w[3], user_ip6[3]);
            ctx_store!(sa, port_field(to_port), user_port);
            ALLOW
        }
        _ => refuse_connect(),
    }
}

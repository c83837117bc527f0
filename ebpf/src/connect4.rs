//! cgroup/connect4: for enrolled sockets: refuse unknown VIP:ports
//! (ECONNREFUSED, no SYN), steer DNS to the proxy, apply the egress mode.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use shunt_common::v4_mapped;

use crate::sockaddr::{decide, port_field, refuse_connect, Redirect, ALLOW, PASS, REDIRECT};

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = v4_mapped(ctx_load!(sa, user_ip4).to_ne_bytes());
    // user_port is network order in the first two bytes of the u32.
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
            ctx_store!(
                sa,
                u32::from_ne_bytes([to[12], to[13], to[14], to[15]]),
                user_ip4
            );
            ctx_store!(sa, port_field(to_port), user_port);
            ALLOW
        }
        _ => refuse_connect(),
    }
}

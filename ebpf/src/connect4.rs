//! cgroup/connect4: refuse enrolled sockets' connects to unknown VIP:ports.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use shunt_common::v4_mapped;

use crate::{ctx_load, verdict::connect_verdict};

#[cgroup_sock_addr(connect4)]
pub fn shunt_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // user_ip4 and user_port are network order; the port sits in the first
    // two bytes of the u32, i.e. its low half on a little-endian load.
    let addr = v4_mapped(ctx_load!(sa, user_ip4).to_ne_bytes());
    let port = u16::from_be(ctx_load!(sa, user_port) as u16);
    connect_verdict(&addr, port, ctx_load!(sa, protocol))
}

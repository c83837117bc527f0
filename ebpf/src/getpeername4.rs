//! cgroup/getpeername4: a DNS-captured socket's peer is the resolver the application asked.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use shunt_common::v4_mapped;

use crate::sockaddr::{dns_restore, port_field, ALLOW};

#[cgroup_sock_addr(getpeername4)]
pub fn shunt_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = v4_mapped(ctx_load!(sa, user_ip4).to_ne_bytes());
    // user_port is network order in the first two bytes of the u32.
    let port = u16::from_be(ctx_load!(sa, user_port) as u16);
    if let Some(o) = dns_restore(&ctx, &addr, port) {
        ctx_store!(
            sa,
            u32::from_ne_bytes([o.addr[12], o.addr[13], o.addr[14], o.addr[15]]),
            user_ip4
        );
        ctx_store!(sa, port_field(o.port), user_port);
    }
    ALLOW
}

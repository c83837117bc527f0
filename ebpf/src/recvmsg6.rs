//! cgroup/recvmsg6: a DNS answer from the proxy is shown as coming from the resolver the
//! application asked, so the resolver (glibc checks the source) accepts it.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::sockaddr::{bytes_to_words, dns_restore, port_field, words_to_bytes, ALLOW};

#[cgroup_sock_addr(recvmsg6)]
pub fn shunt_recvmsg6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    let addr = words_to_bytes([
        ctx_load!(sa, user_ip6[0]),
        ctx_load!(sa, user_ip6[1]),
        ctx_load!(sa, user_ip6[2]),
        ctx_load!(sa, user_ip6[3]),
    ]);
    let port = u16::from_be(ctx_load!(sa, user_port) as u16);
    if let Some(o) = dns_restore(&ctx, &addr, port) {
        let w = bytes_to_words(&o.addr);
        ctx_store!(sa, w[0], user_ip6[0]);
        ctx_store!(sa, w[1], user_ip6[1]);
        ctx_store!(sa, w[2], user_ip6[2]);
        ctx_store!(sa, w[3], user_ip6[3]);
        ctx_store!(sa, port_field(o.port), user_port);
    }
    ALLOW
}

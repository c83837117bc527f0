//! sk_lookup on the node's network namespace: the only way into the VIP
//! prefixes. TCP to a known (VIP, port) is assigned to the agent's capture
//! socket; every other packet to the prefixes is dropped, including "known
//! service but no capture socket", so no other socket on the node (a wildcard
//! listener on :80, say) can ever receive VIP traffic. Everything outside the
//! prefixes passes to the normal lookup.

use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use aya_log_ebpf::warn;
use shunt_common::{is_vip, v4_mapped, CidrAddr, Counter, ServiceKey};

use crate::{
    maps::{capture, count, services, sources},
    sockaddr::words_to_bytes,
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn shunt_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Context fields are read with volatile loads of their exact width: the
    // verifier rejects loads through a ctx pointer the compiler has offset.
    // All loads happen up front, unconditionally, so the compiler cannot
    // merge per-branch ctx pointers into one offset pointer.
    let family = ctx_load!(l, family);
    let protocol = ctx_load!(l, protocol);
    let ip4 = ctx_load!(l, local_ip4);
    let ip6 = [
        ctx_load!(l, local_ip6[0]),
        ctx_load!(l, local_ip6[1]),
        ctx_load!(l, local_ip6[2]),
        ctx_load!(l, local_ip6[3]),
    ];
    let local_port = ctx_load!(l, local_port);
    let rip4 = ctx_load!(l, remote_ip4);
    let rip6 = [
        ctx_load!(l, remote_ip6[0]),
        ctx_load!(l, remote_ip6[1]),
        ctx_load!(l, remote_ip6[2]),
        ctx_load!(l, remote_ip6[3]),
    ];
    let ingress = ctx_load!(l, ingress_ifindex);
    let addr = match family {
        AF_INET => v4_mapped(ip4.to_ne_bytes()),
        AF_INET6 => words_to_bytes(ip6),
        _ => return SK_PASS,
    };
    if !is_vip(&addr) {
        return SK_PASS;
    }
    if protocol != IPPROTO_TCP {
        count(Counter::Dropped);
        return SK_DROP;
    }
    let key = ServiceKey {
        addr,
        // local_port is host order in bpf_sk_lookup.
        port: local_port as u16,
        proto: IPPROTO_TCP as u8,
        _pad: 0,
    };
    // SAFETY: only tested for presence.
    if unsafe { services.get(&key) }.is_none() {
        count(Counter::Dropped);
        return SK_DROP;
    }
    // The agent identifies workloads by source address: a known workload
    // address arriving on another interface than its own is spoofed.
    let src = CidrAddr {
        addr: if family == AF_INET {
            v4_mapped(rip4.to_ne_bytes())
        } else {
            words_to_bytes(rip6)
        },
    };
    // SAFETY: the value is copied out at once.
    if let Some(ifindex) = unsafe { sources.get(&src) }.copied() {
        if ifindex != ingress {
            count(Counter::Dropped);
            return SK_DROP;
        }
    }
    match capture.redirect_sk_lookup(&ctx, 0, 0) {
        Ok(()) => {
            count(Counter::Steered);
            SK_PASS
        }
        Err(_) => {
            count(Counter::NoSocket);
            warn!(&ctx, "shunt: service known but no capture socket; dropped");
            SK_DROP
        }
    }
}

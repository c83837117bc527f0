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
use shunt_common::{is_vip, v4_mapped, Counter, ServiceKey};

use crate::maps::{capture, count, services};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
const IPPROTO_TCP: u32 = 6;

#[sk_lookup]
pub fn shunt_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel passes a valid bpf_sk_lookup.
    let l = unsafe { &*ctx.lookup };
    let addr = match l.family {
        AF_INET => v4_mapped(l.local_ip4.to_ne_bytes()),
        AF_INET6 => {
            let w = [
                l.local_ip6[0],
                l.local_ip6[1],
                l.local_ip6[2],
                l.local_ip6[3],
            ];
            let mut a = [0u8; 16];
            let mut i = 0;
            while i < 4 {
                let b = w[i].to_ne_bytes();
                a[i * 4] = b[0];
                a[i * 4 + 1] = b[1];
                a[i * 4 + 2] = b[2];
                a[i * 4 + 3] = b[3];
                i += 1;
            }
            a
        }
        _ => return SK_PASS,
    };
    if !is_vip(&addr) {
        return SK_PASS;
    }
    if l.protocol != IPPROTO_TCP {
        count(Counter::Dropped);
        return SK_DROP;
    }
    let key = ServiceKey {
        addr,
        // local_port is host order in bpf_sk_lookup.
        port: l.local_port as u16,
        proto: IPPROTO_TCP as u8,
        _pad: 0,
    };
    // SAFETY: only tested for presence.
    if unsafe { services.get(&key) }.is_none() {
        count(Counter::Dropped);
        return SK_DROP;
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

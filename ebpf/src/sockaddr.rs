//! The decision shared by the cgroup sock_addr programs (connect, sendmsg,
//! recvmsg, getpeername; IPv4 and IPv6). Each program file only reads and
//! writes its own context layout.

use aya_ebpf::{
    bindings::bpf_sock_addr, btf_maps::lpm_trie::Key, helpers::bpf_set_retval,
    programs::SockAddrContext,
};
use shunt_common::{
    is_loopback, is_v4_mapped, is_vip, v4_mapped, CidrAddr, Counter, DnsOrig, EgressEvent,
    ServiceKey, EGRESS_REGISTRY_ONLY, ENR_F_DNS_CAPTURE, EV_DENIED, EV_PASSTHROUGH,
};

use crate::{
    enroll,
    maps::{count, dns_orig, egress_allow, events, meta, services},
};

pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const ECONNREFUSED: i32 = 111;
const DNS_PORT: u16 = 53;

/// What to do with a connect() or sendmsg() destination. Plain integers
/// and an out-parameter rather than an enum carrying the address: keeps the
/// generated code simple enough for the verifier.
pub const PASS: u32 = 0;
pub const REFUSE: u32 = 1;
/// Rewrite the destination (DNS capture) to the `Redirect` filled in.
pub const REDIRECT: u32 = 2;

pub struct Redirect {
    pub addr: [u8; 16],
    pub port: u16,
}

/// Decide for a destination `addr` (16-byte, IPv4-mapped for IPv4) and
/// `port` (host order). `report` is false for unconnected UDP sends, which
/// would report once per datagram.
#[inline(always)]
pub fn decide(
    ctx: &SockAddrContext,
    addr: &[u8; 16],
    port: u16,
    protocol: u32,
    report: bool,
    out: &mut Redirect,
) -> u32 {
    let Some(enroll::Enrollment {
        cgroup,
        workload: w,
    }) = enroll::current()
    else {
        return PASS;
    };
    if is_vip(addr) {
        if protocol == IPPROTO_TCP {
            let key = ServiceKey {
                addr: *addr,
                port,
                proto: IPPROTO_TCP as u8,
                _pad: 0,
            };
            // SAFETY: only tested for presence.
            if unsafe { services.get(&key) }.is_some() {
                return PASS;
            }
        }
        count(Counter::Refused);
        return REFUSE;
    }
    let Some(m) = meta.get(0).copied() else {
        return PASS;
    };
    if port == DNS_PORT && w.flags & ENR_F_DNS_CAPTURE != 0 && m.dns_port != 0 {
        let (proxy, ok) = if is_v4_mapped(addr) {
            (v4_mapped(m.dns_addr4), m.dns_addr4 != [0; 4])
        } else {
            (m.dns_addr6, m.dns_addr6 != [0; 16])
        };
        if *addr == proxy && port == m.dns_port {
            return PASS;
        }
        // No proxy for this family: refuse rather than resolve around it.
        if !ok {
            count(Counter::Refused);
            return REFUSE;
        }
        let p = dns_orig.get_or_insert_ptr_mut(ctx, None);
        if p.is_null() {
            count(Counter::Refused);
            return REFUSE;
        }
        // SAFETY: non-null storage of this socket.
        unsafe {
            (*p).addr = *addr;
            (*p).port = port;
        }
        out.addr = proxy;
        out.port = m.dns_port;
        count(Counter::DnsCaptured);
        return REDIRECT;
    }
    if is_loopback(addr) {
        return PASS;
    }
    let key = Key::new(128, CidrAddr { addr: *addr });
    if egress_allow.get(&key).is_some() {
        return PASS;
    }
    if m.egress_mode == EGRESS_REGISTRY_ONLY {
        count(Counter::EgressDenied);
        emit(cgroup, w.workload_id, EV_DENIED, addr, port, protocol);
        return REFUSE;
    }
    if report {
        count(Counter::Passthrough);
        emit(cgroup, w.workload_id, EV_PASSTHROUGH, addr, port, protocol);
    }
    PASS
}

#[inline(always)]
fn emit(cgroup: u64, workload_id: u32, kind: u32, addr: &[u8; 16], port: u16, protocol: u32) {
    let ev = EgressEvent {
        cgroup_id: cgroup,
        workload_id,
        kind,
        addr: *addr,
        port,
        proto: protocol as u8,
        _pad: [0; 5],
    };
    if events.output(&ev, 0).is_err() {
        count(Counter::EventsLost);
    }
}

/// Make connect() fail with ECONNREFUSED (instead of the default EPERM), so
/// clients report the usual "connection refused"; no SYN leaves.
#[inline(always)]
pub fn refuse_connect() -> i32 {
    // SAFETY: valid for cgroup sock_addr programs (kernel >= 5.18).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// For recvmsg/getpeername: if this socket was DNS-captured and `addr:port`
/// is the proxy, the resolver address the application asked for.
#[inline(always)]
pub fn dns_restore(ctx: &SockAddrContext, addr: &[u8; 16], port: u16) -> Option<DnsOrig> {
    let p = dns_orig.get_ptr_mut(ctx);
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket.
    let orig = unsafe { *p };
    let m = meta.get(0).copied()?;
    let proxy = if is_v4_mapped(addr) {
        v4_mapped(m.dns_addr4)
    } else {
        m.dns_addr6
    };
    (port == m.dns_port && *addr == proxy).then_some(orig)
}

/// Four network-order u32 words (as in the ctx structs) to 16 address bytes.
#[inline(always)]
pub fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
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

/// 16 address bytes to four network-order u32 words.
#[inline(always)]
pub fn bytes_to_words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// The user_port field: network order in the first two bytes.
#[inline(always)]
pub fn port_field(port: u16) -> u32 {
    u16::to_be(port) as u32
}

/// The destination a sock_addr program sees (`user_ip4/6`, `user_port`), as
/// 16 address bytes (IPv4-mapped for IPv4) and a host-order port. `V6`
/// picks the context layout at compile time, so each program reads only
/// its own fields (a runtime branch could merge ctx pointers, which the
/// verifier rejects).
#[inline(always)]
pub fn user_dst<const V6: bool>(sa: *mut bpf_sock_addr) -> ([u8; 16], u16) {
    let addr = if V6 {
        words_to_bytes([
            ctx_load!(sa, user_ip6[0]),
            ctx_load!(sa, user_ip6[1]),
            ctx_load!(sa, user_ip6[2]),
            ctx_load!(sa, user_ip6[3]),
        ])
    } else {
        v4_mapped(ctx_load!(sa, user_ip4).to_ne_bytes())
    };
    // user_port is network order in the first two bytes of the u32.
    (addr, u16::from_be(ctx_load!(sa, user_port) as u16))
}

/// Rewrite the destination (DNS capture) or restore it (recvmsg,
/// getpeername).
#[inline(always)]
pub fn set_user_dst<const V6: bool>(sa: *mut bpf_sock_addr, addr: &[u8; 16], port: u16) {
    if V6 {
        let w = bytes_to_words(addr);
        ctx_store!(sa, w[0], user_ip6[0]);
        ctx_store!(sa, w[1], user_ip6[1]);
        ctx_store!(sa, w[2], user_ip6[2]);
        ctx_store!(sa, w[3], user_ip6[3]);
    } else {
        ctx_store!(
            sa,
            u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]),
            user_ip4
        );
    }
    ctx_store!(sa, port_field(port), user_port);
}

/// The body of connect4/6 and sendmsg4/6: decide and apply a redirect.
/// Returns `PASS` or `REFUSE`; the caller turns a refusal into its
/// program's errno.
#[inline(always)]
pub fn steer<const V6: bool>(ctx: &SockAddrContext, report: bool) -> u32 {
    let sa = ctx.sock_addr;
    let (addr, port) = user_dst::<V6>(sa);
    let protocol = ctx_load!(sa, protocol);
    let mut r = Redirect {
        addr: [0; 16],
        port: 0,
    };
    match decide(ctx, &addr, port, protocol, report, &mut r) {
        REDIRECT => {
            set_user_dst::<V6>(sa, &r.addr, r.port);
            PASS
        }
        v => v,
    }
}

/// The body of recvmsg4/6 and getpeername4/6: show a DNS-captured socket
/// the resolver it asked instead of the proxy.
#[inline(always)]
pub fn restore<const V6: bool>(ctx: &SockAddrContext) {
    let sa = ctx.sock_addr;
    let (addr, port) = user_dst::<V6>(sa);
    if let Some(o) = dns_restore(ctx, &addr, port) {
        set_user_dst::<V6>(sa, &o.addr, o.port);
    }
}

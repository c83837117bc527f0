//! The connect-time decision shared by connect4 and connect6.

use aya_ebpf::helpers::{bpf_get_current_cgroup_id, bpf_set_retval};
use shunt_common::{is_vip, Counter, ServiceKey};

use crate::maps::{count, enrolled, services};

pub const ALLOW: i32 = 1;
pub const REJECT: i32 = 0;
const IPPROTO_TCP: u32 = 6;
const ECONNREFUSED: i32 = 111;

/// Decide a connect() by an enrolled socket to `addr` (16-byte, IPv4-mapped
/// for IPv4) and `port` (host order). Non-enrolled sockets pass untouched.
/// A VIP:port without a service is refused here, before any SYN leaves, with
/// ECONNREFUSED rather than the default EPERM so that clients report the
/// usual "connection refused".
#[inline(always)]
pub fn connect_verdict(addr: &[u8; 16], port: u16, protocol: u32) -> i32 {
    // SAFETY: helper without arguments.
    let cgroup = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: the value is not held across map updates.
    if unsafe { enrolled.get(&cgroup) }.is_none() {
        return ALLOW;
    }
    if !is_vip(addr) {
        return ALLOW;
    }
    if protocol == IPPROTO_TCP {
        let key = ServiceKey {
            addr: *addr,
            port,
            proto: IPPROTO_TCP as u8,
            _pad: 0,
        };
        // SAFETY: only tested for presence.
        if unsafe { services.get(&key) }.is_some() {
            return ALLOW;
        }
    }
    count(Counter::Refused);
    // SAFETY: valid for cgroup sock_addr programs (kernel >= 5.18).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
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

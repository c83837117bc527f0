//! Types shared by the kernel programs (`shunt-ebpf`) and userspace
//! (`shunt-agent`). Every map key and value is `#[repr(C)]` with explicit
//! padding so that both sides, and `bpftool`, agree on the layout byte for
//! byte. Ports are stored in host byte order so that map dumps read naturally.
//!
//! Addresses are always 16 bytes: IPv4 is stored IPv4-mapped
//! (`::ffff:a.b.c.d`), so one key type covers both families and a
//! v4-mapped IPv6 connect finds the same entry as a plain IPv4 connect.
#![no_std]

/// Version of every pinned map layout below. Bump on any change to a key or
/// value type or a map's size (aya refuses a pinned map whose `max_entries`
/// differs); the agent refuses to reuse pins written with another version.
/// 3: `services` holds 524,288 entries.
pub const LAYOUT_VERSION: u32 = 3;

/// The VIP prefixes, 240.240.0.0/16 and 2001:2::/48 (Istio's ranges for
/// auto-allocated ServiceEntry addresses). The only definition: the local
/// routes, the allocator's ranges and [`is_vip`] are derived from these.
pub const VIP4_NET: [u8; 4] = [240, 240, 0, 0];
pub const VIP4_PREFIX_LEN: u8 = 16;
pub const VIP6_NET: [u8; 16] = [0x20, 0x01, 0x00, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
pub const VIP6_PREFIX_LEN: u8 = 48;
// `is_vip` compares whole bytes.
const _: () = assert!(VIP4_PREFIX_LEN.is_multiple_of(8) && VIP6_PREFIX_LEN.is_multiple_of(8));

/// Names of the pinned maps (file names under the pin directory).
pub mod map_names {
    pub const SERVICES: &str = "services";
    pub const ENROLLED: &str = "enrolled";
    pub const CAPTURE: &str = "capture";
    pub const COUNTERS: &str = "counters";
    pub const META: &str = "meta";
    pub const EGRESS_ALLOW: &str = "egress_allow";
    pub const DNS_ORIG: &str = "dns_orig";
    pub const EVENTS: &str = "events";
    pub const SOURCES: &str = "sources";
}

/// Names of the kernel programs in the object file.
pub mod prog_names {
    pub const SK_LOOKUP: &str = "shunt_sk_lookup";
    pub const CONNECT4: &str = "shunt_connect4";
    pub const CONNECT6: &str = "shunt_connect6";
    pub const SENDMSG4: &str = "shunt_sendmsg4";
    pub const SENDMSG6: &str = "shunt_sendmsg6";
    pub const RECVMSG4: &str = "shunt_recvmsg4";
    pub const RECVMSG6: &str = "shunt_recvmsg6";
    pub const GETPEERNAME4: &str = "shunt_getpeername4";
    pub const GETPEERNAME6: &str = "shunt_getpeername6";
}

/// Key of the `services` map: one entry per (VIP, port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, IPv4-mapped for IPv4.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// L4 protocol (IPPROTO_TCP = 6). Only TCP is steered today.
    pub proto: u8,
    pub _pad: u8,
}

/// Value of the `services` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// Stable id of the ServiceEntry (index in the agent's service table).
    pub service_id: u32,
    /// `SVC_F_*` flags.
    pub flags: u32,
    /// Waypoint HBONE address, IPv4-mapped for IPv4; zero when none.
    pub waypoint_addr: [u8; 16],
    /// Waypoint HBONE port, host order (15008); zero when none.
    pub waypoint_port: u16,
    /// ServiceEntry port's targetPort, host order.
    pub target_port: u16,
    pub _pad: [u8; 4],
}

/// The service is bound to a waypoint (`waypoint_addr` is valid).
pub const SVC_F_WAYPOINT: u32 = 1 << 0;
/// The ServiceEntry port speaks HTTP (protocol HTTP/HTTP2/GRPC).
pub const SVC_F_HTTP: u32 = 1 << 1;

/// Value of the `enrolled` map, keyed by cgroup id (u64).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EnrolledValue {
    /// Stable id of the workload in the agent's workload table.
    pub workload_id: u32,
    /// `ENR_F_*` flags.
    pub flags: u32,
}

/// Capture this workload's DNS queries (issue #4).
pub const ENR_F_DNS_CAPTURE: u32 = 1 << 0;
/// The entry also enrolls every cgroup below its own (a Kubernetes pod's
/// cgroup: its containers, including ones started later). Without it an
/// entry matches only its own cgroup. A new flag bit, not a layout change:
/// programs built before it treat such an entry as exact.
pub const ENR_F_DESCENDANTS: u32 = 1 << 1;
/// How many cgroup levels (from the root, level 0) the kernel programs walk
/// looking for an enrolling ancestor (`bpf_get_current_ancestor_cgroup_id`):
/// an `ENR_F_DESCENDANTS` entry deeper than this enrolls only itself.
/// Kubelet pod cgroups sit at level 2 or 3.
pub const MAX_CGROUP_LEVELS: i32 = 16;

/// Value of the single-entry `meta` array: layout version and global modes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Meta {
    pub layout_version: u32,
    /// `EGRESS_*` mode for enrolled workloads.
    pub egress_mode: u32,
    /// DNS proxy port, host order; 0 disables DNS capture.
    pub dns_port: u16,
    pub _pad: u16,
    /// DNS proxy IPv4 address, network order bytes.
    pub dns_addr4: [u8; 4],
    /// DNS proxy IPv6 address.
    pub dns_addr6: [u8; 16],
}

/// What a DNS-captured socket originally asked for, kept per socket in
/// `bpf_sk_storage` so recvmsg/getpeername can show it back.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct DnsOrig {
    /// The resolver address the application used (IPv4-mapped for IPv4).
    pub addr: [u8; 16],
    /// Its port, host order.
    pub port: u16,
    pub _pad: [u8; 6],
}

/// Key data of the `egress_allow` LPM trie: an IPv4-mapped or IPv6 address
/// (IPv4 prefixes are stored with prefix length 96 + len).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CidrAddr {
    pub addr: [u8; 16],
}

/// Egress report from the connect hooks (ring buffer `events`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct EgressEvent {
    pub cgroup_id: u64,
    pub workload_id: u32,
    /// `EV_*`.
    pub kind: u32,
    pub addr: [u8; 16],
    /// Destination port, host order.
    pub port: u16,
    pub proto: u8,
    pub _pad: [u8; 5],
}

/// An enrolled socket connected outside the mesh (ALLOW_ANY passthrough).
pub const EV_PASSTHROUGH: u32 = 1;
/// An enrolled socket's connect was refused by REGISTRY_ONLY.
pub const EV_DENIED: u32 = 2;

pub const EGRESS_ALLOW_ANY: u32 = 0;
pub const EGRESS_REGISTRY_ONLY: u32 = 1;

/// Indices into the per-CPU `counters` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// sk_lookup assigned a connection to the capture socket.
    Steered = 0,
    /// sk_lookup dropped a packet to a VIP prefix (no service or no socket).
    Dropped = 1,
    /// connect4/6 refused a VIP:port without a service.
    Refused = 2,
    /// sk_lookup found a service but no capture socket (agent down).
    NoSocket = 3,
    /// A DNS query was steered to the DNS proxy.
    DnsCaptured = 4,
    /// REGISTRY_ONLY refused a destination outside the registry.
    EgressDenied = 5,
    /// ALLOW_ANY let a destination outside the mesh pass (and reported it).
    Passthrough = 6,
    /// An egress report was lost because the ring buffer was full.
    EventsLost = 7,
}

pub const COUNTER_SLOTS: u32 = 16;

impl Counter {
    pub const ALL: [Counter; 8] = [
        Counter::Steered,
        Counter::Dropped,
        Counter::Refused,
        Counter::NoSocket,
        Counter::DnsCaptured,
        Counter::EgressDenied,
        Counter::Passthrough,
        Counter::EventsLost,
    ];
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Steered => "steered",
            Counter::Dropped => "dropped",
            Counter::Refused => "refused",
            Counter::NoSocket => "no_socket",
            Counter::DnsCaptured => "dns_captured",
            Counter::EgressDenied => "egress_denied",
            Counter::Passthrough => "passthrough",
            Counter::EventsLost => "events_lost",
        }
    }
}

/// IPv4 address (network order bytes) as the 16-byte mapped form.
#[inline(always)]
pub const fn v4_mapped(a: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a[0], a[1], a[2], a[3],
    ]
}

/// True when a 16-byte address is IPv4-mapped (`::ffff:0:0/96`).
#[inline(always)]
pub fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Loopback (127.0.0.0/8 mapped, or ::1): a pod talking to itself.
#[inline(always)]
pub fn is_loopback(a: &[u8; 16]) -> bool {
    if is_v4_mapped(a) {
        a[12] == 127
    } else {
        a[0] | a[1]
            | a[2]
            | a[3]
            | a[4]
            | a[5]
            | a[6]
            | a[7]
            | a[8]
            | a[9]
            | a[10]
            | a[11]
            | a[12]
            | a[13]
            | a[14]
            == 0
            && a[15] == 1
    }
}

/// True when a 16-byte (mapped) address lies in one of the VIP prefixes.
#[inline(always)]
pub fn is_vip(a: &[u8; 16]) -> bool {
    // Constant bounds: unrolled by the compiler, no loop for the verifier.
    let mut i = 0;
    if is_v4_mapped(a) {
        while i < (VIP4_PREFIX_LEN / 8) as usize {
            if a[12 + i] != VIP4_NET[i] {
                return false;
            }
            i += 1;
        }
    } else {
        while i < (VIP6_PREFIX_LEN / 8) as usize {
            if a[i] != VIP6_NET[i] {
                return false;
            }
            i += 1;
        }
    }
    true
}

// Layouts are part of the pinned-map ABI: catch accidental changes at compile
// time on both sides.
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 32);
const _: () = assert!(core::mem::size_of::<EnrolledValue>() == 8);
const _: () = assert!(core::mem::size_of::<Meta>() == 32);
const _: () = assert!(core::mem::size_of::<DnsOrig>() == 24);
const _: () = assert!(core::mem::size_of::<CidrAddr>() == 16);
const _: () = assert!(core::mem::size_of::<EgressEvent>() == 40);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY (for each impl below): all types are repr(C), Copy, with
    // explicit padding and no invalid bit patterns.
    macro_rules! pod {
        ($($t:ty),+) => { $(
            // SAFETY: see above.
            unsafe impl aya::Pod for $t {}
        )+ };
    }
    pod!(
        ServiceKey,
        ServiceValue,
        EnrolledValue,
        Meta,
        DnsOrig,
        CidrAddr,
        EgressEvent
    );
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::offset_of;

    #[test]
    fn service_key_layout() {
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 16);
        assert_eq!(offset_of!(ServiceKey, proto), 18);
        assert_eq!(align_of::<ServiceKey>(), 2);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(offset_of!(ServiceValue, service_id), 0);
        assert_eq!(offset_of!(ServiceValue, flags), 4);
        assert_eq!(offset_of!(ServiceValue, waypoint_addr), 8);
        assert_eq!(offset_of!(ServiceValue, waypoint_port), 24);
        assert_eq!(offset_of!(ServiceValue, target_port), 26);
    }

    #[test]
    fn port_is_host_order_in_key_bytes() {
        let k = ServiceKey {
            addr: v4_mapped([240, 240, 0, 1]),
            port: 80,
            proto: 6,
            _pad: 0,
        };
        // SAFETY: repr(C) plain data.
        let bytes: [u8; 20] = unsafe { core::mem::transmute(k) };
        assert_eq!(&bytes[16..18], &80u16.to_ne_bytes());
        assert_eq!(&bytes[10..16], &[0xff, 0xff, 240, 240, 0, 1]);
    }

    #[test]
    fn meta_and_event_layout() {
        assert_eq!(offset_of!(Meta, dns_port), 8);
        assert_eq!(offset_of!(Meta, dns_addr4), 12);
        assert_eq!(offset_of!(Meta, dns_addr6), 16);
        assert_eq!(offset_of!(EgressEvent, addr), 16);
        assert_eq!(offset_of!(EgressEvent, port), 32);
        assert_eq!(offset_of!(DnsOrig, port), 16);
    }

    #[test]
    fn loopback() {
        assert!(is_loopback(&v4_mapped([127, 0, 0, 53])));
        let mut v6 = [0u8; 16];
        v6[15] = 1;
        assert!(is_loopback(&v6));
        assert!(!is_loopback(&v4_mapped([10, 0, 0, 1])));
    }

    #[test]
    fn vip_prefixes() {
        assert!(is_vip(&v4_mapped([240, 240, 3, 4])));
        assert!(!is_vip(&v4_mapped([240, 241, 0, 1])));
        assert!(!is_vip(&v4_mapped([10, 0, 0, 1])));
        let mut v6 = VIP6_NET;
        v6[15] = 1;
        assert!(is_vip(&v6));
        v6[5] = 1; // 2001:2:1::1 is outside the /48
        assert!(!is_vip(&v6));
        assert!(is_v4_mapped(&v4_mapped([1, 2, 3, 4])));
        assert!(!is_v4_mapped(&v6));
    }
}

//! The one registry of pinned maps: every map the kernel object declares,
//! with its type, its key and value types (from `shunt-common`, the shared
//! ABI) and who writes it. The loader pins exactly these, `shunt uninstall`
//! removes exactly these, and userspace opens them by pin path through the
//! typed handles here (agent, CLI and tests alike). A unit test checks the
//! list against the built object, so a map cannot be added on one side only.
//!
//! Adding a map: its name in `shunt_common::map_names`, its definition in
//! `ebpf/src/maps.rs`, one line in [`registry!`] below.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::Path,
};

use aya::maps::{lpm_trie, Array, HashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use aya_obj::generated::bpf_map_type;
use shunt_common::{
    map_names, CidrAddr, Counter, DnsOrig, EgressEvent, EnrolledValue, ServiceKey, ServiceValue,
    COUNTER_SLOTS,
};

use super::KernelError;

/// The map types shunt uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    Hash,
    LpmTrie,
    Array,
    PerCpuArray,
    SockMap,
    SkStorage,
    RingBuf,
}

impl MapKind {
    pub const fn bpf_type(self) -> bpf_map_type {
        match self {
            MapKind::Hash => bpf_map_type::BPF_MAP_TYPE_HASH,
            MapKind::LpmTrie => bpf_map_type::BPF_MAP_TYPE_LPM_TRIE,
            MapKind::Array => bpf_map_type::BPF_MAP_TYPE_ARRAY,
            MapKind::PerCpuArray => bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY,
            MapKind::SockMap => bpf_map_type::BPF_MAP_TYPE_SOCKMAP,
            MapKind::SkStorage => bpf_map_type::BPF_MAP_TYPE_SK_STORAGE,
            MapKind::RingBuf => bpf_map_type::BPF_MAP_TYPE_RINGBUF,
        }
    }
    /// Size of the kernel key for a userspace key type of `size` bytes (an
    /// LPM trie key is prefixed by its u32 prefix length).
    const fn key_size(self, size: usize) -> u32 {
        match self {
            MapKind::LpmTrie => (size + 4) as u32,
            _ => size as u32,
        }
    }
}

/// Who writes a map's entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Writer {
    /// The agent's reconciler, from a [`super::Projection`], by difference.
    Reconciler,
    /// The agent at start and on handover/shutdown (the capture socket).
    Agent,
    /// The kernel programs only; userspace reads.
    Kernel,
}

/// One pinned map.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    /// Name in the kernel object.
    pub name: &'static str,
    /// File name under the pin directory.
    pub pin: &'static str,
    pub kind: MapKind,
    /// Kernel key and value sizes, from the `shunt-common` types.
    pub key_size: u32,
    pub value_size: u32,
    pub writer: Writer,
}

/// A map of the registry as a type: its spec and its userspace key/value
/// types, so handles cannot be opened with the wrong ones.
pub trait MapDef {
    type Key;
    type Value;
    const SPEC: MapSpec;
}

macro_rules! registry {
    ($($(#[$doc:meta])* $def:ident = $name:expr $(, pinned as $pin:literal)?; $kind:ident, $key:ty => $value:ty, $writer:ident;)*) => {
        $(
            $(#[$doc])*
            pub enum $def {}
            impl MapDef for $def {
                type Key = $key;
                type Value = $value;
                const SPEC: MapSpec = MapSpec {
                    name: $name,
                    pin: registry!(@pin $name $(, $pin)?),
                    kind: MapKind::$kind,
                    key_size: MapKind::$kind.key_size(size_of::<$key>()),
                    value_size: size_of::<$value>() as u32,
                    writer: Writer::$writer,
                };
            }
        )*
        /// Every pinned map, in the object's terms.
        pub const ALL: &[MapSpec] = &[$(<$def as MapDef>::SPEC),*];
    };
    (@pin $name:expr) => { $name };
    (@pin $name:expr, $pin:literal) => { $pin };
}

registry! {
    /// (VIP, port, proto) → service and waypoint.
    Services = map_names::SERVICES; Hash, ServiceKey => ServiceValue, Reconciler;
    /// cgroup id → enrolled workload.
    Enrolled = map_names::ENROLLED; Hash, u64 => EnrolledValue, Reconciler;
    /// Workload source address → the interface it must arrive on.
    Sources = map_names::SOURCES; Hash, CidrAddr => u32, Reconciler;
    /// REGISTRY_ONLY exceptions: CIDR (IPv4 as /96+len) → 1.
    EgressAllow = map_names::EGRESS_ALLOW; LpmTrie, CidrAddr => u8, Reconciler;
    /// Index 0: layout version and global modes (stamped by the loader).
    MetaSlot = map_names::META; Array, u32 => shunt_common::Meta, Reconciler;
    /// Index 0: the capture listener (a socket fd from userspace).
    Capture = map_names::CAPTURE; SockMap, u32 => u32, Agent;
    /// Per-CPU counters indexed by [`Counter`].
    Counters = map_names::COUNTERS; PerCpuArray, u32 => u64, Kernel;
    /// Per socket: the resolver a DNS-captured socket asked for.
    DnsOrigins = map_names::DNS_ORIG; SkStorage, u32 => DnsOrig, Kernel;
    /// Egress reports (records of [`EgressEvent`]).
    Events = map_names::EVENTS; RingBuf, () => (), Kernel;
    /// aya-log's ring buffer, pinned so that reused links keep logging into
    /// a map the next agent can read.
    AyaLogs = "AYA_LOGS", pinned as "aya_logs"; RingBuf, () => (), Kernel;
}

/// Kernel layout of an `events` record.
pub const EVENT_SIZE: usize = size_of::<EgressEvent>();

const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

pub type HashHandle<M> = HashMap<MapData, <M as MapDef>::Key, <M as MapDef>::Value>;
pub type LpmHandle<M> = LpmTrie<MapData, <M as MapDef>::Key, <M as MapDef>::Value>;
pub type ArrayHandle<M> = Array<MapData, <M as MapDef>::Value>;
pub type PerCpuHandle<M> = PerCpuArray<MapData, <M as MapDef>::Value>;

/// Open the pinned map `M` as the aya wrapper `T` (which checks the map
/// type and the key/value sizes against the kernel's).
pub fn open<M: MapDef, T>(pin_dir: &Path) -> Result<T, KernelError>
where
    T: TryFrom<Map, Error = MapError>,
{
    let path = pin_dir.join(M::SPEC.pin);
    let data = MapData::from_pin(&path).map_err(|source| KernelError::OpenMap {
        path: path.clone(),
        source,
    })?;
    let map = Map::from_map_data(data).map_err(|source| KernelError::OpenMap {
        path: path.clone(),
        source,
    })?;
    T::try_from(map).map_err(KernelError::map(M::SPEC.name, "open"))
}

/// The maps userspace reads and writes by pin path (the ring buffers and
/// the SOCKMAP have their own readers and writers).
pub struct PinnedMaps {
    pub services: HashHandle<Services>,
    pub enrolled: HashHandle<Enrolled>,
    pub sources: HashHandle<Sources>,
    pub egress_allow: LpmHandle<EgressAllow>,
    pub meta: ArrayHandle<MetaSlot>,
    pub counters: PerCpuHandle<Counters>,
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        Ok(Self {
            services: open::<Services, _>(pin_dir)?,
            enrolled: open::<Enrolled, _>(pin_dir)?,
            sources: open::<Sources, _>(pin_dir)?,
            egress_allow: open::<EgressAllow, _>(pin_dir)?,
            meta: open::<MetaSlot, _>(pin_dir)?,
            counters: open::<Counters, _>(pin_dir)?,
        })
    }

    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    pub fn read_services(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>, KernelError> {
        read_hash::<Services>(&self.services)
    }

    pub fn read_enrolled(&self) -> Result<BTreeMap<u64, EnrolledValue>, KernelError> {
        read_hash::<Enrolled>(&self.enrolled)
    }

    pub fn read_sources(&self) -> Result<BTreeMap<CidrAddr, u32>, KernelError> {
        read_hash::<Sources>(&self.sources)
    }

    pub fn read_egress_allow(&self) -> Result<BTreeMap<LpmKey, u8>, KernelError> {
        self.egress_allow
            .iter()
            .map(|r| {
                r.map(|(k, v)| (LpmKey::from(&k), v))
                    .map_err(KernelError::map(EgressAllow::SPEC.name, "iterate"))
            })
            .collect()
    }

    /// Sum of each counter over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, KernelError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(KernelError::map(Counters::SPEC.name, "read"))?;
                Ok((*c, v.iter().sum()))
            })
            .collect()
    }

    pub fn meta(&self) -> Result<shunt_common::Meta, KernelError> {
        self.meta
            .get(&0, 0)
            .map_err(KernelError::map(MetaSlot::SPEC.name, "read"))
    }
}

fn read_hash<M>(map: &HashHandle<M>) -> Result<BTreeMap<M::Key, M::Value>, KernelError>
where
    M: MapDef,
    M::Key: aya::Pod + Ord,
    M::Value: aya::Pod,
{
    map.iter()
        .map(|r| r.map_err(KernelError::map(M::SPEC.name, "iterate")))
        .collect()
}

/// An LPM trie key as an ordered value (aya's `Key` is neither `Ord` nor
/// `Copy`), so the trie reconciles like a hash map.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LpmKey {
    pub prefix_len: u32,
    pub addr: CidrAddr,
}

impl LpmKey {
    /// The trie key of a CIDR: IPv4 as IPv4-mapped with prefix length
    /// 96 + len, host bits cleared.
    pub fn from_net(net: ipnet::IpNet) -> Self {
        match net {
            ipnet::IpNet::V4(v4) => LpmKey {
                prefix_len: 96 + u32::from(v4.prefix_len()),
                addr: CidrAddr {
                    addr: v4.network().to_ipv6_mapped().octets(),
                },
            },
            ipnet::IpNet::V6(v6) => LpmKey {
                prefix_len: u32::from(v6.prefix_len()),
                addr: CidrAddr {
                    addr: v6.network().octets(),
                },
            },
        }
    }
    pub fn to_key(self) -> lpm_trie::Key<CidrAddr> {
        lpm_trie::Key::new(self.prefix_len, self.addr)
    }
}

impl From<&lpm_trie::Key<CidrAddr>> for LpmKey {
    fn from(k: &lpm_trie::Key<CidrAddr>) -> Self {
        LpmKey {
            prefix_len: k.prefix_len(),
            addr: k.data(),
        }
    }
}

/// 16-byte map address form of an IP (IPv4 as IPv4-mapped).
pub fn addr_bytes(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Inverse of [`addr_bytes`]: IPv4-mapped becomes IPv4.
pub fn addr_from_bytes(b: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(b).to_canonical()
}

/// Service key for a TCP destination.
pub fn tcp_key(dst: SocketAddr) -> ServiceKey {
    ServiceKey {
        addr: addr_bytes(dst.ip()),
        port: dst.port(),
        proto: libc::IPPROTO_TCP as u8,
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_the_map_form() {
        for s in ["240.240.0.1", "2001:2::1", "10.0.0.1"] {
            let ip: IpAddr = s.parse().unwrap();
            assert_eq!(addr_from_bytes(addr_bytes(ip)), ip);
        }
        assert!(shunt_common::is_vip(&addr_bytes(
            "240.240.7.7".parse().unwrap()
        )));
        assert!(shunt_common::is_vip(&addr_bytes(
            "2001:2::7".parse().unwrap()
        )));
        assert!(!shunt_common::is_vip(&addr_bytes(
            "240.241.0.1".parse().unwrap()
        )));
    }

    #[test]
    fn tcp_keys_keep_the_port_in_host_order() {
        let k = tcp_key("240.240.0.1:8080".parse().unwrap());
        assert_eq!(k.port, 8080);
        assert_eq!(k.proto, 6);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 240, 240, 0, 1]);
    }

    #[test]
    fn ipv4_cidrs_become_mapped_trie_keys_with_host_bits_cleared() {
        let k = LpmKey::from_net("10.1.2.3/16".parse().unwrap());
        assert_eq!(k.prefix_len, 112);
        assert_eq!(
            addr_from_bytes(k.addr.addr),
            "10.1.0.0".parse::<IpAddr>().unwrap()
        );
        let k = LpmKey::from_net("fd00::1/64".parse().unwrap());
        assert_eq!(k.prefix_len, 64);
        assert_eq!(
            addr_from_bytes(k.addr.addr),
            "fd00::".parse::<IpAddr>().unwrap()
        );
    }

    /// The registry and the built object list the same maps with the same
    /// types and sizes: a map added or changed on one side only fails here.
    #[test]
    fn registry_matches_the_kernel_object() {
        let obj = aya_obj::Object::parse(crate::EBPF_OBJECT).expect("kernel object parses");
        let mut in_object: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.')) // .rodata/.bss/.data
            .collect();
        in_object.sort();
        let mut in_registry: Vec<&str> = ALL.iter().map(|s| s.name).collect();
        in_registry.sort();
        assert_eq!(in_object, in_registry);
        for s in ALL {
            let m = &obj.maps[s.name];
            assert_eq!(m.map_type(), s.kind.bpf_type() as u32, "{} type", s.name);
            if s.kind != MapKind::RingBuf {
                assert_eq!(m.key_size(), s.key_size, "{} key size", s.name);
                assert_eq!(m.value_size(), s.value_size, "{} value size", s.name);
            }
        }
        // What validation checks a config's projection against.
        let cap = crate::kernel::projection::Capacity::KERNEL;
        for (name, limit) in [
            (map_names::SERVICES, cap.services),
            (map_names::ENROLLED, cap.enrolled),
            (map_names::SOURCES, cap.sources),
            (map_names::EGRESS_ALLOW, cap.egress_allow),
        ] {
            assert_eq!(
                obj.maps[name].max_entries() as usize,
                limit,
                "{name} capacity"
            );
        }
        // Pin names are unique files under the pin directory.
        let mut pins: Vec<&str> = ALL.iter().map(|s| s.pin).collect();
        pins.sort();
        pins.dedup();
        assert_eq!(pins.len(), ALL.len());
    }
}

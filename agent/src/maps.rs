//! The pinned maps as seen from userspace: opened by pin path (so the agent,
//! the CLI and tests all use the same code), reconciled by difference.
//!
//! Owners: `services` and `enrolled` are written only by the agent's
//! reconciler; `counters` only by the kernel; `meta` by the loader.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use shunt_common::{
    map_names, CidrAddr, Counter, EnrolledValue, Meta, ServiceKey, ServiceValue, COUNTER_SLOTS,
};

#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    #[error("opening pinned map {path}: {source} (is the agent installed with this --pin-dir?)")]
    Open { path: PathBuf, source: MapError },
    #[error("map {map}: {op}: {source}")]
    Op {
        map: &'static str,
        op: &'static str,
        source: MapError,
    },
}

/// What one reconcile pass changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Diff {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

pub struct PinnedMaps {
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    pub enrolled: HashMap<MapData, u64, EnrolledValue>,
    pub counters: PerCpuArray<MapData, u64>,
    pub meta: Array<MapData, Meta>,
    pub sources: HashMap<MapData, CidrAddr, u32>,
}

fn open_map(dir: &Path, name: &'static str) -> Result<MapData, MapsError> {
    let path = dir.join(name);
    MapData::from_pin(&path).map_err(|source| MapsError::Open { path, source })
}

impl PinnedMaps {
    pub fn open(pin_dir: &Path) -> Result<Self, MapsError> {
        let op = |map, op| move |source| MapsError::Op { map, op, source };
        Ok(Self {
            services: HashMap::try_from(Map::HashMap(open_map(pin_dir, map_names::SERVICES)?))
                .map_err(op(map_names::SERVICES, "open"))?,
            enrolled: HashMap::try_from(Map::HashMap(open_map(pin_dir, map_names::ENROLLED)?))
                .map_err(op(map_names::ENROLLED, "open"))?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(open_map(
                pin_dir,
                map_names::COUNTERS,
            )?))
            .map_err(op(map_names::COUNTERS, "open"))?,
            meta: Array::try_from(Map::Array(open_map(pin_dir, map_names::META)?))
                .map_err(op(map_names::META, "open"))?,
            sources: HashMap::try_from(Map::HashMap(open_map(pin_dir, map_names::SOURCES)?))
                .map_err(op(map_names::SOURCES, "open"))?,
        })
    }

    pub fn service(&self, key: &ServiceKey) -> Option<ServiceValue> {
        self.services.get(key, 0).ok()
    }

    pub fn read_services(&self) -> Result<BTreeMap<ServiceKey, ServiceValue>, MapsError> {
        self.services
            .iter()
            .map(|r| {
                r.map_err(|source| MapsError::Op {
                    map: map_names::SERVICES,
                    op: "iterate",
                    source,
                })
            })
            .collect()
    }

    pub fn read_sources(&self) -> Result<BTreeMap<CidrAddr, u32>, MapsError> {
        self.sources
            .iter()
            .map(|r| {
                r.map_err(|source| MapsError::Op {
                    map: map_names::SOURCES,
                    op: "iterate",
                    source,
                })
            })
            .collect()
    }

    pub fn read_enrolled(&self) -> Result<BTreeMap<u64, EnrolledValue>, MapsError> {
        self.enrolled
            .iter()
            .map(|r| {
                r.map_err(|source| MapsError::Op {
                    map: map_names::ENROLLED,
                    op: "iterate",
                    source,
                })
            })
            .collect()
    }

    /// Sum of each counter over all CPUs.
    pub fn counters(&self) -> Result<Vec<(Counter, u64)>, MapsError> {
        Counter::ALL
            .iter()
            .map(|c| {
                let v = self
                    .counters
                    .get(&(*c as u32), 0)
                    .map_err(|source| MapsError::Op {
                        map: map_names::COUNTERS,
                        op: "read",
                        source,
                    })?;
                Ok((*c, v.iter().sum()))
            })
            .collect()
    }

    pub fn set_meta(&mut self, m: &Meta) -> Result<(), MapsError> {
        self.meta.set(0, m, 0).map_err(|source| MapsError::Op {
            map: map_names::META,
            op: "write",
            source,
        })
    }

    pub fn meta(&self) -> Result<Meta, MapsError> {
        self.meta.get(&0, 0).map_err(|source| MapsError::Op {
            map: map_names::META,
            op: "read",
            source,
        })
    }
}

const _: () = assert!(Counter::ALL.len() as u32 <= COUNTER_SLOTS);

/// Make `map` equal `desired`, touching only what differs: entries that are
/// unchanged are never removed, so a lookup for them can never miss during a
/// reload (no flush-and-refill). Adds and updates go first, removals last.
/// `current` is the caller's mirror of the map, read once at start.
pub fn reconcile<K, V>(
    map: &mut HashMap<MapData, K, V>,
    current: &mut BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
    name: &'static str,
) -> Result<Diff, MapsError>
where
    K: aya::Pod + Ord,
    V: aya::Pod + PartialEq,
{
    let mut diff = Diff::default();
    for (k, v) in desired {
        match current.get(k) {
            Some(old) if old == v => continue,
            Some(_) => diff.updated += 1,
            None => diff.added += 1,
        }
        map.insert(k, v, 0).map_err(|source| MapsError::Op {
            map: name,
            op: "insert",
            source,
        })?;
        current.insert(*k, *v);
    }
    let stale: Vec<K> = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    for k in stale {
        match map.remove(&k) {
            Ok(()) => {}
            Err(MapError::KeyNotFound) => {}
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => {}
            Err(source) => {
                return Err(MapsError::Op {
                    map: name,
                    op: "remove",
                    source,
                })
            }
        }
        current.remove(&k);
        diff.removed += 1;
    }
    Ok(diff)
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
    fn addr_roundtrip() {
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
    }

    #[test]
    fn tcp_key_host_order() {
        let k = tcp_key("240.240.0.1:8080".parse().unwrap());
        assert_eq!(k.port, 8080);
        assert_eq!(k.proto, 6);
        assert_eq!(&k.addr[10..], &[0xff, 0xff, 240, 240, 0, 1]);
    }
}

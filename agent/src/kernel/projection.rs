//! The kernel's view of a config: [`Projection`] is the exact desired
//! content of every reconciled map plus the `meta` value, and [`MapSync`]
//! makes the pinned maps equal to one, by difference.
//!
//! `meta` is assembled only by [`meta`]. [`project`] is the only code that
//! turns the model's Istio concepts into map entries.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use shunt_common::{
    CidrAddr, EnrolledValue, Meta, ServiceKey, ServiceValue, EGRESS_ALLOW_ANY,
    EGRESS_REGISTRY_ONLY, ENR_F_DESCENDANTS, ENR_F_DNS_CAPTURE, LAYOUT_VERSION, SVC_F_HTTP,
    SVC_F_WAYPOINT,
};

use super::{
    reconcile::{Diff, Mirrored},
    registry::{
        self, addr_bytes, EgressAllow, Enrolled, HashHandle, LpmHandle, LpmKey, MapDef, MetaSlot,
        Services, Sources,
    },
    KernelError,
};
use crate::config::OutboundMode;
use crate::model::{CowMap, Model, Service, WaypointBinding};

/// Exact content of every map the agent reconciles, and `meta`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Projection {
    /// A [`CowMap`]: patched from the mirror of the pinned map, it shares
    /// every chunk an edit did not touch (see [`project_from`]).
    pub services: CowMap<ServiceKey, ServiceValue>,
    pub enrolled: BTreeMap<u64, EnrolledValue>,
    /// Workload address → the interface it must arrive on.
    pub sources: BTreeMap<CidrAddr, u32>,
    /// REGISTRY_ONLY exceptions (value 1).
    pub egress_allow: BTreeMap<LpmKey, u8>,
    pub meta: Meta,
}

/// How many entries each reconciled map holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    pub services: usize,
    pub enrolled: usize,
    pub sources: usize,
    pub egress_allow: usize,
}

impl Capacity {
    /// `max_entries` of the kernel object's maps (the registry test checks
    /// these against the object).
    pub const KERNEL: Capacity = Capacity {
        services: 524_288,
        enrolled: 65_536,
        sources: 65_536,
        egress_allow: 4096,
    };
}

/// Where DNS capture sends queries (the agent's DNS proxy).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DnsCapture {
    pub addr4: Ipv4Addr,
    pub addr6: Ipv6Addr,
    pub port: u16,
}

/// The `meta` value: layout version, egress mode, DNS capture target
/// (`None`: no DNS capture).
pub fn meta(mode: OutboundMode, dns: Option<DnsCapture>) -> Meta {
    let dns = dns.unwrap_or(DnsCapture {
        addr4: Ipv4Addr::UNSPECIFIED,
        addr6: Ipv6Addr::UNSPECIFIED,
        port: 0,
    });
    Meta {
        layout_version: LAYOUT_VERSION,
        egress_mode: match mode {
            OutboundMode::AllowAny => EGRESS_ALLOW_ANY,
            OutboundMode::RegistryOnly => EGRESS_REGISTRY_ONLY,
        },
        dns_port: dns.port,
        _pad: 0,
        dns_addr4: dns.addr4.octets(),
        dns_addr6: dns.addr6.octets(),
    }
}

/// A pinned `meta` kept as it is but stamped with this layout version (a
/// fresh map reads as all zeroes).
pub fn stamped(current: Meta) -> Meta {
    Meta {
        layout_version: LAYOUT_VERSION,
        ..current
    }
}

/// The DNS capture target recorded in a `meta` value.
pub fn dns_capture(m: &Meta) -> Option<DnsCapture> {
    (m.dns_port != 0).then(|| DnsCapture {
        addr4: m.dns_addr4.into(),
        addr6: m.dns_addr6.into(),
        port: m.dns_port,
    })
}

/// The egress mode recorded in a `meta` value.
pub fn egress_mode(m: &Meta) -> OutboundMode {
    if m.egress_mode == EGRESS_REGISTRY_ONLY {
        OutboundMode::RegistryOnly
    } else {
        OutboundMode::AllowAny
    }
}

/// `sources` from route lookups (see [`super::netlink::route_oifs`]).
pub fn sources(oifs: &HashMap<IpAddr, u32>) -> BTreeMap<CidrAddr, u32> {
    oifs.iter()
        .map(|(ip, oif)| {
            (
                CidrAddr {
                    addr: addr_bytes(*ip),
                },
                *oif,
            )
        })
        .collect()
}

/// `egress_allow` from CIDRs.
pub fn egress_allow(cidrs: &[ipnet::IpNet]) -> BTreeMap<LpmKey, u8> {
    cidrs.iter().map(|n| (LpmKey::from_net(*n), 1)).collect()
}

/// Projects the model onto the maps. `dns` is where the proxy listens
/// (`None`: the agent runs without it); `sources` comes from route lookups,
/// which need the kernel, so the caller passes them in.
pub fn project(
    model: &Model,
    dns: Option<DnsCapture>,
    sources: BTreeMap<CidrAddr, u32>,
) -> Projection {
    project_from(model, dns, sources, None)
}

/// [`project`], with the services map patched from `prev`, the services
/// map of the model `model` was patched from (the agent's mirror of the
/// pinned map after it applied that model): only the VIP:ports in
/// [`Model::delta`] are projected again, the rest is a copy of plain
/// values. Without a delta or `prev`, every VIP:port.
pub fn project_from(
    model: &Model,
    dns: Option<DnsCapture>,
    sources: BTreeMap<CidrAddr, u32>,
    prev: Option<&CowMap<ServiceKey, ServiceValue>>,
) -> Projection {
    let services = match (prev, model.delta()) {
        (Some(prev), Some(delta)) => {
            let mut services = prev.clone();
            for &at in &delta.vip_ports {
                let value = model.service_at(at).and_then(|svc| service_value(at, svc));
                match value {
                    Some(v) => services.insert(registry::tcp_key(at), v),
                    None => services.remove(&registry::tcp_key(at)),
                };
            }
            services
        }
        _ => {
            let mut all: Vec<_> = model
                .vip_ports()
                .filter_map(|(at, svc)| service_value(at, svc).map(|v| (registry::tcp_key(at), v)))
                .collect();
            // VIP:port order is not the key's order. Stable, and the last
            // of equal keys wins, as collecting into a map would.
            all.sort_by_key(|kv| kv.0);
            let mut sorted: Vec<(ServiceKey, ServiceValue)> = Vec::with_capacity(all.len());
            for kv in all {
                match sorted.last_mut() {
                    Some(last) if last.0 == kv.0 => *last = kv,
                    _ => sorted.push(kv),
                }
            }
            CowMap::from_sorted(sorted)
        }
    };
    let dns_flag = if model.mesh.dns_capture {
        ENR_F_DNS_CAPTURE
    } else {
        0
    };
    let enrolled = model
        .enrolled()
        .map(|(cgroup, w)| {
            let tree = if model.enrolls_descendants(cgroup) {
                ENR_F_DESCENDANTS
            } else {
                0
            };
            let v = EnrolledValue {
                workload_id: w.id,
                flags: dns_flag | tree,
            };
            (cgroup, v)
        })
        .collect();
    Projection {
        services,
        enrolled,
        sources,
        egress_allow: egress_allow(&model.mesh.allowed_egress),
        meta: meta(model.mesh.egress, dns),
    }
}

/// The `services` value of the service steered at `at` (`None`: it has no
/// such port).
fn service_value(at: std::net::SocketAddr, svc: &Service) -> Option<ServiceValue> {
    let port = svc.port(at.port())?;
    let mut flags = 0;
    // A refused binding still requires a waypoint: `shunt maps` shows
    // the VIP as never direct (the agent refuses it).
    if svc.waypoint.required() {
        flags |= SVC_F_WAYPOINT;
    }
    if port.protocol.is_http() {
        flags |= SVC_F_HTTP;
    }
    let (waypoint_addr, waypoint_port) = match &svc.waypoint {
        WaypointBinding::Bound(w) => (addr_bytes(w.addr.ip()), w.addr.port()),
        _ => ([0; 16], 0),
    };
    Some(ServiceValue {
        service_id: svc.id,
        flags,
        waypoint_addr,
        waypoint_port,
        target_port: port.target_port,
        _pad: [0; 4],
    })
}

/// What one [`MapSync::apply`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SyncStats {
    pub services: Diff,
    pub enrolled: Diff,
    pub sources: Diff,
    pub egress_allow: Diff,
    pub meta_changed: bool,
}

impl SyncStats {
    /// Sum over every map.
    pub fn total(&self) -> Diff {
        self.services + self.enrolled + self.sources + self.egress_allow
    }
}

/// The reconciled pinned maps with their mirrors, which start from the
/// pinned state: a restarted agent changes only what differs.
pub struct MapSync {
    services:
        Mirrored<HashHandle<Services>, ServiceKey, ServiceValue, CowMap<ServiceKey, ServiceValue>>,
    enrolled: Mirrored<HashHandle<Enrolled>, u64, EnrolledValue>,
    sources: Mirrored<HashHandle<Sources>, CidrAddr, u32>,
    egress_allow: Mirrored<LpmHandle<EgressAllow>, LpmKey, u8>,
    meta: registry::ArrayHandle<MetaSlot>,
    current_meta: Meta,
}

impl MapSync {
    pub fn open(pin_dir: &Path) -> Result<Self, KernelError> {
        let meta: registry::ArrayHandle<MetaSlot> = registry::open::<MetaSlot, _>(pin_dir)?;
        let current_meta = meta
            .get(&0, 0)
            .map_err(KernelError::map(MetaSlot::SPEC.name, "read"))?;
        Ok(Self {
            services: Mirrored::new(registry::open::<Services, _>(pin_dir)?, Services::SPEC.name)?,
            enrolled: Mirrored::new(registry::open::<Enrolled, _>(pin_dir)?, Enrolled::SPEC.name)?,
            sources: Mirrored::new(registry::open::<Sources, _>(pin_dir)?, Sources::SPEC.name)?,
            egress_allow: Mirrored::new(
                registry::open::<EgressAllow, _>(pin_dir)?,
                EgressAllow::SPEC.name,
            )?,
            meta,
            current_meta,
        })
    }

    /// What `sources` holds now (kept when route lookups fail).
    pub fn sources(&self) -> &BTreeMap<CidrAddr, u32> {
        &self.sources.current
    }

    /// The `services` map as pinned (after a successful [`MapSync::apply`]:
    /// the projection applied).
    pub fn services(&self) -> &CowMap<ServiceKey, ServiceValue> {
        &self.services.current
    }

    /// Make every reconciled map and `meta` equal `p`. The allow list is
    /// written before `meta`, so a switch to REGISTRY_ONLY never enforces
    /// an incomplete list. On error the maps written so far stay written
    /// and the next apply continues from there.
    pub fn apply(&mut self, p: &Projection) -> Result<SyncStats, KernelError> {
        let mut s = SyncStats {
            services: self.services.reconcile(&p.services)?,
            enrolled: self.enrolled.reconcile(&p.enrolled)?,
            sources: self.sources.reconcile(&p.sources)?,
            egress_allow: self.egress_allow.reconcile(&p.egress_allow)?,
            meta_changed: false,
        };
        if p.meta != self.current_meta {
            self.meta
                .set(0, &p.meta, 0)
                .map_err(KernelError::map(MetaSlot::SPEC.name, "write"))?;
            self.current_meta = p.meta;
            s.meta_changed = true;
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::model::tests::{load, model_of, seed_dir};
    use crate::model::NoCgroups;
    use shunt_common::v4_mapped;

    fn at(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_seed_projects_two_waypoint_entries_and_one_enrolled_cgroup() {
        let cfg = Arc::new(Config::load_dir(&seed_dir()).unwrap());
        let (m, _) = model_of(&cfg, &|cg: &str| (cg == "shunt/curl").then_some(1001));
        let p = project(&m, None, BTreeMap::new());
        assert_eq!(p.services.len(), 2);
        let v = p
            .services
            .get(&registry::tcp_key(at("240.240.0.1:80")))
            .copied()
            .unwrap();
        assert_eq!(v.flags, SVC_F_WAYPOINT | SVC_F_HTTP);
        assert_eq!(v.waypoint_addr, v4_mapped([10, 244, 1, 18]));
        assert_eq!(v.waypoint_port, 15008);
        assert_eq!(v.target_port, 80);
        assert_eq!(
            p.services.get(&registry::tcp_key(at("[2001:2::1]:80"))),
            Some(&v)
        );
        assert_eq!(p.enrolled.len(), 1);
        assert_eq!(p.enrolled[&1001].flags, ENR_F_DNS_CAPTURE);
        assert_eq!(p.meta.egress_mode, EGRESS_ALLOW_ANY);
        assert_eq!(p.meta.layout_version, LAYOUT_VERSION);
        assert!(p.egress_allow.is_empty());
    }

    #[test]
    fn a_pod_cgroup_tree_enrolls_its_descendants_and_a_plain_cgroup_only_itself() {
        let cfg = load(&[("a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels: {istio.io/dataplane-mode: ambient}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: pod\n  namespace: amb\n  annotations: {shunt.io/cgroup-tree: /k/pod1}\nspec: {address: 10.0.0.1}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: plain\n  namespace: amb\n  annotations: {shunt.io/cgroup: plain}\nspec: {address: 10.0.0.2}\n")]);
        let ids = |cg: &str| match cg {
            "/k/pod1" => Some(7),
            "plain" => Some(8),
            _ => None,
        };
        let (m, _) = model_of(&cfg, &ids);
        let p = project(&m, None, BTreeMap::new());
        assert_eq!(p.enrolled.len(), 2);
        assert_eq!(p.enrolled[&7].flags & ENR_F_DESCENDANTS, ENR_F_DESCENDANTS);
        assert_eq!(p.enrolled[&8].flags & ENR_F_DESCENDANTS, 0);
    }

    #[test]
    fn an_unbindable_waypoint_keeps_the_waypoint_flag_without_an_address() {
        let cfg = load(&[("a.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: s\n  namespace: ns\n  labels: {istio.io/use-waypoint: missing}\nspec:\n  hosts: [s.example]\n  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}, {number: 53, name: dns, protocol: UDP}]\n  resolution: DNS\n")]);
        let (m, _) = model_of(&cfg, &NoCgroups);
        let p = project(&m, None, BTreeMap::new());
        assert_eq!(p.services.len(), 2, "UDP ports are not steered");
        for v in p.services.values() {
            assert_eq!(
                (v.flags, v.waypoint_addr, v.waypoint_port, v.target_port),
                (SVC_F_WAYPOINT | SVC_F_HTTP, [0; 16], 0, 8080)
            );
        }
    }

    #[test]
    fn meta_carries_the_layout_mode_and_dns_target() {
        let dns = DnsCapture {
            addr4: "169.254.20.10".parse().unwrap(),
            addr6: "fd73:6875:6e74::53".parse().unwrap(),
            port: 53,
        };
        let m = meta(OutboundMode::RegistryOnly, Some(dns));
        assert_eq!(m.layout_version, LAYOUT_VERSION);
        assert_eq!(m.egress_mode, EGRESS_REGISTRY_ONLY);
        assert_eq!(dns_capture(&m), Some(dns));
        assert_eq!(egress_mode(&m), OutboundMode::RegistryOnly);
        let off = meta(OutboundMode::AllowAny, None);
        assert_eq!(off.egress_mode, EGRESS_ALLOW_ANY);
        assert_eq!(dns_capture(&off), None);
    }

    #[test]
    fn a_fresh_meta_is_stamped_and_a_written_one_kept() {
        let written = meta(OutboundMode::RegistryOnly, None);
        assert_eq!(stamped(written), written);
        assert_eq!(stamped(Meta::default()).layout_version, LAYOUT_VERSION);
    }

    #[test]
    fn sources_use_the_mapped_address_form() {
        let oifs: HashMap<IpAddr, u32> = [("10.0.0.1".parse().unwrap(), 7)].into();
        let s = sources(&oifs);
        let (k, v) = s.iter().next().unwrap();
        assert_eq!(
            registry::addr_from_bytes(k.addr),
            oifs.keys().next().copied().unwrap()
        );
        assert_eq!(*v, 7);
    }
}

//! The resolved mesh model: one pure function from a valid [`Config`] and
//! the VIP [`Allocation`] to typed services, workloads and waypoints with
//! the indexes every consumer reads (by VIP:port, by host, by workload
//! address, by cgroup). The node agent, the waypoint and every CLI command
//! read this model; none re-derives Istio's rules from raw config. Each
//! rule has one home: eligibility and DestinationRule lookup in
//! [`service`], waypoint binding in [`waypoint`], enrollment in
//! [`workload`], host matching in [`host`], mesh settings in [`mesh`],
//! status in [`status`].
//!
//! Service and workload ids come from the persisted allocation, so an
//! unchanged object keeps its ids (and its kernel map entries) across
//! reloads and restarts.

pub mod host;
pub mod mesh;
pub mod service;
pub mod status;
mod unused;
pub mod visibility;
pub mod waypoint;
pub mod workload;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::alloc::Allocation;
use crate::config::render::ServiceEntryStatus;
use crate::config::{labels, Config, ObjectKey, ServiceEntry};
use crate::identity::SpiffeId;

pub use mesh::Mesh;
pub use service::{Destination, Service, ServiceId, ServicePort, Vip};
pub use status::{now_rfc3339, StatusClock};
pub use visibility::ExportTo;
pub use waypoint::{Unbindable, Waypoint, WaypointBinding};
pub use workload::{CgroupDir, CgroupResolver, NoCgroups, Workload, WorkloadId};

/// The kind of object a [`Warning`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    ServiceEntry,
    WorkloadEntry,
    DestinationRule,
    Gateway,
    /// `mesh.yaml`; its [`Warning::object`] is empty.
    MeshConfig,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::DestinationRule => "DestinationRule",
            Kind::Gateway => "Gateway",
            Kind::MeshConfig => "MeshConfig",
        }
    }
}

/// Something dropped, degraded or not acted on while building (two entries
/// on one VIP:port, a cgroup not found, a field shunt accepts but does not
/// honour, ...). The config stays valid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    pub kind: Kind,
    pub object: ObjectKey,
    /// The field the warning is about (`spec.subsets`), when it is one.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Warning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.kind.as_str())?;
        if !self.object.name.is_empty() {
            write!(f, " {}", self.object)?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// DNS view of a host in one ServiceEntry: its VIPs, service and who sees
/// them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRecord {
    pub service: ServiceId,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
    pub export_to: ExportTo,
}

/// See the module docs. Immutable once built; swapped whole on each change.
#[derive(Debug, Default)]
pub struct Model {
    config: Arc<Config>,
    pub mesh: Mesh,
    services: BTreeMap<ServiceId, Arc<Service>>,
    /// Canonical VIP:port (TCP ports only) → its service; older entries win.
    by_vip: BTreeMap<SocketAddr, ServiceId>,
    /// Lowercased host → VIPs per ServiceEntry (oldest first), for the DNS
    /// proxy.
    hosts: HashMap<String, Vec<HostRecord>>,
    workloads: BTreeMap<WorkloadId, Arc<Workload>>,
    by_addr: HashMap<IpAddr, WorkloadId>,
    by_cgroup: BTreeMap<u64, WorkloadId>,
    /// Enrolled cgroups that also enroll every cgroup below them
    /// (`shunt.io/cgroup-tree`: a pod's cgroup).
    descendants: BTreeSet<u64>,
    /// Per ServiceEntry, without `lastTransitionTime` until a
    /// [`StatusClock`] stamps it. Shared with the previous model for a
    /// reused service (a deep copy of 100,000 of them per edit otherwise);
    /// the clock copies one only to change it.
    pub status: BTreeMap<ObjectKey, Arc<ServiceEntryStatus>>,
    warnings: Vec<Warning>,
    /// Per service, the ServiceEntry (its address in `config`) it was
    /// resolved from without a warning: [`Model::build_from`] reuses it
    /// while the entry is the same object.
    reusable: HashMap<ServiceId, usize>,
}

impl Model {
    /// Builds the model. `cgroups` resolves `shunt.io/cgroup` annotations
    /// (the agent's [`CgroupDir`]; readers pass [`NoCgroups`]).
    pub fn build(cfg: Arc<Config>, alloc: &Allocation, cgroups: &dyn CgroupResolver) -> Model {
        Self::build_from(cfg, alloc, cgroups, None)
    }

    /// [`Model::build`], reusing the services of `prev` whose ServiceEntry
    /// is the very same object (the config loader shares unchanged ones
    /// across reloads) when nothing else a service is resolved from changed
    /// (mesh, namespaces, gateways, DestinationRules, WorkloadEntries) and
    /// its id and allocated addresses are the same. The result equals
    /// [`Model::build`]'s; an edit of one entry then resolves one service.
    pub fn build_from(
        cfg: Arc<Config>,
        alloc: &Allocation,
        cgroups: &dyn CgroupResolver,
        prev: Option<&Model>,
    ) -> Model {
        let prev = prev.filter(|p| same_context(&p.config, &cfg));
        let mesh = Mesh::from_config(&cfg.mesh);
        let mut m = Model {
            mesh,
            warnings: unused::warnings(&cfg),
            ..Default::default()
        };
        // Older entries first, so they win VIP:port collisions.
        let mut order: Vec<&ServiceEntry> = cfg.service_entries.iter().map(|se| &**se).collect();
        order.sort_by_key(|se| se.age_key());
        let mut bound = waypoint::Bound::new();
        for se in order {
            m.add_service(&cfg, alloc, se, &mut bound, prev);
        }
        for we in &cfg.workload_entries {
            m.add_workload(&cfg, alloc, cgroups, we);
        }
        m.config = cfg;
        m
    }

    fn warn(&mut self, kind: Kind, object: &ObjectKey, message: String) {
        self.warnings.push(Warning {
            kind,
            object: object.clone(),
            field: None,
            message,
        });
    }

    fn add_service(
        &mut self,
        cfg: &Config,
        alloc: &Allocation,
        se: &ServiceEntry,
        bound: &mut waypoint::Bound,
        prev: Option<&Model>,
    ) {
        let key = se.key();
        let origin = se as *const ServiceEntry as usize;
        if let Some((svc, status)) = prev.and_then(|p| p.reusable_service(alloc, se, &key, origin))
        {
            self.status.insert(key, status.clone());
            self.reusable.insert(svc.id, origin);
            self.index_service(svc.clone());
            return;
        }
        let binding = waypoint::bind(cfg, &self.mesh.trust_domain, se, bound);
        let mut vips: Vec<Vip> = alloc
            .addresses_of(&key, &se.spec.hosts)
            .map(|(host, ip)| Vip {
                ip,
                host: host.to_string(),
                allocated: true,
            })
            .collect();
        let status = ServiceEntryStatus {
            addresses: vips
                .iter()
                .map(|v| status::address(&v.host, v.ip))
                .collect(),
            conditions: vec![status::waypoint_condition(&binding)],
        };
        self.status.insert(key.clone(), Arc::new(status));
        if let Some(first) = se.spec.hosts.first() {
            for ip in service::explicit_ips(se) {
                let ip = ip.to_canonical();
                if !vips.iter().any(|v| v.ip == ip) {
                    vips.push(Vip {
                        ip,
                        host: first.clone(),
                        allocated: false,
                    });
                }
            }
        }
        // Collected from a flat_map: no exact size, spare capacity for two.
        vips.shrink_to_fit();
        let Some(id) = alloc.service_id(&key) else {
            self.warn(
                Kind::ServiceEntry,
                &key,
                "no service id in the allocation yet; not programmed".into(),
            );
            return;
        };
        let warned = self.warnings.len();
        let svc = service::resolve(
            cfg,
            &self.mesh,
            se,
            key,
            id,
            vips,
            binding,
            &mut self.warnings,
        );
        if self.warnings.len() == warned {
            self.reusable.insert(id, origin);
        }
        self.index_service(Arc::new(svc));
    }

    /// `prev`'s service for `se` and its status, if [`Model::build_from`]
    /// may reuse them.
    fn reusable_service(
        &self,
        alloc: &Allocation,
        se: &ServiceEntry,
        key: &ObjectKey,
        origin: usize,
    ) -> Option<(&Arc<Service>, &Arc<ServiceEntryStatus>)> {
        let id = alloc.service_id(key)?;
        if self.reusable.get(&id) != Some(&origin) {
            return None;
        }
        let svc = self.services.get(&id)?;
        let mut was = svc.vips.iter().filter(|v| v.allocated);
        let same_vips = alloc
            .addresses_of(key, &se.spec.hosts)
            .all(|(h, ip)| was.next().is_some_and(|v| v.ip == ip && v.host == h))
            && was.next().is_none();
        if !same_vips || &svc.key != key {
            return None;
        }
        Some((svc, self.status.get(key)?))
    }

    /// Puts a service into the indexes (VIP:port, hosts), older entries
    /// first; collisions become warnings.
    fn index_service(&mut self, svc: Arc<Service>) {
        let id = svc.id;
        if svc.resolution == crate::config::Resolution::DynamicDns
            && matches!(svc.waypoint, WaypointBinding::None)
        {
            // Only a waypoint can learn the name a client wants (Istio:
            // NoWaypointForWildcardService); the pods' DNS stays as it was.
            self.warn(
                Kind::ServiceEntry,
                &svc.key,
                "resolution DYNAMIC_DNS does not apply until the entry is bound to a waypoint; not programmed".into(),
            );
            self.services.insert(id, svc);
            return;
        }
        for vip in &svc.vips {
            for p in svc.ports.iter().filter(|p| p.is_tcp()) {
                let at = SocketAddr::new(vip.ip, p.number);
                match self.by_vip.get(&at) {
                    None => {
                        self.by_vip.insert(at, id);
                    }
                    Some(other) => {
                        let msg = format!(
                            "{} port {} already belongs to an older ServiceEntry (service id {other})",
                            vip.ip, p.number
                        );
                        self.warn(Kind::ServiceEntry, &svc.key, msg);
                    }
                }
            }
        }
        for v in svc.vips.iter().filter(|v| v.allocated) {
            // Host names are lower case as a rule: no key made for a host
            // already in the map (each host has two VIPs).
            let records = match self.hosts.get_mut(&*host::dns_key_ref(&v.host)) {
                Some(r) => r,
                None => self.hosts.entry(host::dns_key(&v.host)).or_default(),
            };
            // Exact capacities: most hosts have one record with one
            // address per family, and a pushed-to empty Vec reserves four
            // (at 100,000 hosts 40 MB of spare capacity here and as much in
            // the DNS table).
            let r = match records.iter_mut().position(|r| r.service == id) {
                Some(i) => &mut records[i],
                None => {
                    records.reserve_exact(1);
                    records.push(HostRecord {
                        service: id,
                        export_to: svc.export_to.clone(),
                        ..Default::default()
                    });
                    records.last_mut().expect("just pushed")
                }
            };
            match v.ip {
                IpAddr::V4(a) => {
                    r.v4.reserve_exact(1);
                    r.v4.push(a)
                }
                IpAddr::V6(a) => {
                    r.v6.reserve_exact(1);
                    r.v6.push(a)
                }
            }
        }
        self.services.insert(id, svc);
    }

    fn add_workload(
        &mut self,
        cfg: &Config,
        alloc: &Allocation,
        cgroups: &dyn CgroupResolver,
        we: &crate::config::WorkloadEntry,
    ) {
        let key = we.key();
        let Some(id) = alloc.workload_id(&key) else {
            self.warn(
                Kind::WorkloadEntry,
                &key,
                "no workload id in the allocation yet; not programmed".into(),
            );
            return;
        };
        let sa = we.spec.service_account().to_string();
        let identity = match SpiffeId::new(&self.mesh.trust_domain, &key.namespace, &sa) {
            Ok(i) => i,
            Err(e) => {
                let msg = format!("no valid SPIFFE identity ({e}); its connections are refused");
                self.warn(Kind::WorkloadEntry, &key, msg);
                return;
            }
        };
        let mut all_labels = we.spec.labels.clone();
        for (k, v) in &we.metadata.labels {
            all_labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let address = we
            .spec
            .address
            .parse::<IpAddr>()
            .ok()
            .map(|ip| ip.to_canonical());
        let mut cgroup = None;
        let exact = we.metadata.annotations.get(labels::CGROUP_ANNOTATION);
        let tree = we.metadata.annotations.get(labels::CGROUP_TREE_ANNOTATION);
        if exact.is_some() || tree.is_some() {
            // Istio's rule: the workload's own label wins (`none` opts
            // out), else its Namespace's.
            let ambient = match all_labels.get(labels::DATAPLANE_MODE).map(String::as_str) {
                Some("ambient") => true,
                Some(_) => false,
                None => cfg.namespace_is_ambient(we.namespace()),
            };
            if !ambient {
                // Not in the mesh: known (for identities), never enrolled.
            } else if is_waypoint_pod(cfg, we.namespace(), &all_labels) {
                self.warn(
                    Kind::WorkloadEntry,
                    &key,
                    "a waypoint, never enrolled".into(),
                );
            } else {
                // Several cgroups (comma-separated): a pod's containers;
                // a tree (a pod's cgroup) also enrolls what is below it.
                let listed = |a: Option<&String>, descendants: bool| {
                    a.into_iter()
                        .flat_map(|v| v.split(','))
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(move |c| (c.to_string(), descendants))
                        .collect::<Vec<_>>()
                };
                for (cg, descendants) in listed(exact, false).into_iter().chain(listed(tree, true))
                {
                    match cgroups.cgroup_id(&cg) {
                        Some(cid) => match self.by_cgroup.get(&cid) {
                            None => {
                                self.by_cgroup.insert(cid, id);
                                if descendants {
                                    self.descendants.insert(cid);
                                }
                                cgroup.get_or_insert(cid);
                            }
                            Some(other) => {
                                let msg = format!(
                                    "cgroup {cg:?} already enrolled for workload id {other}"
                                );
                                self.warn(Kind::WorkloadEntry, &key, msg);
                            }
                        },
                        None => self.warn(
                            Kind::WorkloadEntry,
                            &key,
                            format!("cgroup {cg:?} not found; not enrolled"),
                        ),
                    }
                }
            }
        }
        if let Some(ip) = address {
            self.by_addr.entry(ip).or_insert(id);
        }
        let baggage = workload::baggage(&key, &all_labels);
        self.workloads.insert(
            id,
            Arc::new(Workload {
                id,
                key,
                service_account: sa,
                identity,
                address,
                labels: all_labels,
                cgroup,
                baggage,
            }),
        );
    }

    // ------------------------------------------------------------- reads

    /// The config this model was built from (raw objects, for rendering and
    /// policy compilation).
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }
    pub fn service(&self, id: ServiceId) -> Option<&Arc<Service>> {
        self.services.get(&id)
    }
    pub fn service_by_key(&self, key: &ObjectKey) -> Option<&Arc<Service>> {
        self.services.values().find(|s| &s.key == key)
    }
    /// The service behind a VIP:port (IPv4-mapped addresses as IPv4).
    pub fn service_at(&self, at: SocketAddr) -> Option<&Arc<Service>> {
        let at = SocketAddr::new(at.ip().to_canonical(), at.port());
        self.by_vip.get(&at).and_then(|id| self.services.get(id))
    }
    /// Every steered VIP:port with its service, in address order.
    pub fn vip_ports(&self) -> impl Iterator<Item = (SocketAddr, &Arc<Service>)> {
        self.by_vip
            .iter()
            .filter_map(|(a, id)| self.services.get(id).map(|s| (*a, s)))
    }
    /// The DNS view of a name (any case) in its oldest ServiceEntry: its
    /// own host, else the most specific wildcard host covering it.
    pub fn host(&self, name: &str) -> Option<&HostRecord> {
        let key = host::dns_key(name);
        self.hosts
            .get(&key)
            .or_else(|| host::covering(&key).find_map(|w| self.hosts.get(&w)))
            .and_then(|r| r.first())
    }
    /// Every (host, record), one per ServiceEntry defining the host.
    pub fn hosts(&self) -> impl Iterator<Item = (&String, &HostRecord)> {
        self.hosts
            .iter()
            .flat_map(|(h, rs)| rs.iter().map(move |r| (h, r)))
    }
    /// Namespace of the workload at `ip`, for visibility checks.
    pub fn namespace_of(&self, ip: IpAddr) -> Option<&str> {
        self.workload_by_addr(ip).map(|w| w.namespace())
    }
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }
    pub fn workload(&self, id: WorkloadId) -> Option<&Arc<Workload>> {
        self.workloads.get(&id)
    }
    /// The workload with this address (IPv4-mapped addresses as IPv4).
    pub fn workload_by_addr(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_addr
            .get(&ip.to_canonical())
            .and_then(|id| self.workloads.get(id))
    }
    /// Whether the enrolled `cgroup` also enrolls the cgroups below it.
    pub fn enrolls_descendants(&self, cgroup: u64) -> bool {
        self.descendants.contains(&cgroup)
    }
    /// Enrolled cgroups with their workloads, in cgroup order.
    pub fn enrolled(&self) -> impl Iterator<Item = (u64, &Arc<Workload>)> {
        self.by_cgroup
            .iter()
            .filter_map(|(c, id)| self.workloads.get(id).map(|w| (*c, w)))
    }
    pub fn warnings(&self) -> &[Warning] {
        &self.warnings
    }
    /// Services bound to the waypoint `gateway`.
    pub fn bound_to<'a>(
        &'a self,
        gateway: &'a ObjectKey,
    ) -> impl Iterator<Item = &'a Arc<Service>> {
        self.services
            .values()
            .filter(move |s| s.waypoint.waypoint().is_some_and(|w| &w.gateway == gateway))
    }
}

/// Whether everything a service is resolved from, besides its own
/// ServiceEntry and allocation, is the same in `a` and `b` (a few objects:
/// compared by value).
fn same_context(a: &Config, b: &Config) -> bool {
    a.mesh == b.mesh
        && a.namespaces == b.namespaces
        && a.gateways == b.gateways
        && a.destination_rules == b.destination_rules
        && a.workload_entries == b.workload_entries
}

/// A WorkloadEntry that is one of a waypoint's own pods (labelled with the
/// name of an istio-waypoint Gateway in its namespace).
fn is_waypoint_pod(cfg: &Config, ns: &str, labels: &BTreeMap<String, String>) -> bool {
    labels
        .get("gateway.networking.k8s.io/gateway-name")
        .and_then(|g| cfg.gateway(&ObjectKey::new(ns, g)))
        .is_some_and(|g| g.spec.is_waypoint())
}

#[cfg(test)]
pub(crate) mod tests;

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

mod cow;
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

pub use cow::{CowMap, Difference};
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

/// Collision and record order of a ServiceEntry: its
/// [`ServiceEntry::age_key`], owned.
type Age = (bool, (i64, u32), Arc<std::path::Path>, usize);

fn age_of(se: &ServiceEntry) -> Age {
    let (none, created, _, doc) = se.age_key();
    (none, created, se.origin.file.clone(), doc)
}

/// Warnings as kept per entry; most entries have none, and those share
/// one empty list (an `Arc` of an empty `Vec` is an allocation each).
fn shared(own: Vec<Warning>) -> Arc<[Warning]> {
    static NONE: std::sync::LazyLock<Arc<[Warning]>> = std::sync::LazyLock::new(|| Arc::new([]));
    if own.is_empty() {
        NONE.clone()
    } else {
        own.into()
    }
}

/// What the model keeps per ServiceEntry to patch it out again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    age: Age,
    /// `None`: no id in the allocation yet, not a service.
    id: Option<ServiceId>,
    /// Its warnings that do not depend on other entries (fields not
    /// honoured, resolution); those about VIP:port collisions are
    /// recomputed when a contender comes or goes.
    own: Arc<[Warning]>,
}

/// What a model patched from a previous one changed in the indexes its
/// consumers project (the kernel's services map, the DNS table), so that
/// they patch their own output from the previous one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// VIP:ports whose service (or its value) may differ.
    pub vip_ports: BTreeSet<SocketAddr>,
    /// Lowercased hosts whose records may differ.
    pub hosts: BTreeSet<String>,
    /// Services resolved again (every other one is the previous model's).
    pub services: BTreeSet<ServiceId>,
}

/// See the module docs. Immutable once built; swapped whole on each
/// change. Its indexes are [`CowMap`]s: a model patched from the previous
/// one shares every entry it did not change.
#[derive(Debug, Default)]
pub struct Model {
    config: Arc<Config>,
    pub mesh: Mesh,
    services: CowMap<ServiceId, Arc<Service>>,
    /// Canonical VIP:port (TCP ports only) → every service on it, oldest
    /// first: the first one is steered, the others are warned about. The
    /// ages are the entries' ([`Model::age_of`]), not copied here (most
    /// VIP:ports have one service).
    claims: CowMap<SocketAddr, Vec<ServiceId>>,
    /// Lowercased host → VIPs per ServiceEntry (oldest first), for the DNS
    /// proxy.
    hosts: CowMap<String, Vec<HostRecord>>,
    entries: CowMap<ObjectKey, Entry>,
    /// Per ServiceEntry with warnings, in age order: its own, then its
    /// collisions.
    warned: CowMap<Age, Arc<[Warning]>>,
    /// Fields not honoured of objects other than ServiceEntries (they are
    /// the context an incremental build requires unchanged).
    unused: Arc<[Warning]>,
    /// Workload warnings (workloads are rebuilt on each build: cgroups
    /// come and go without a config change).
    workload_warnings: Vec<Warning>,
    workloads: BTreeMap<WorkloadId, Arc<Workload>>,
    by_addr: HashMap<IpAddr, WorkloadId>,
    by_cgroup: BTreeMap<u64, WorkloadId>,
    /// Enrolled cgroups that also enroll every cgroup below them
    /// (`shunt.io/cgroup-tree`: a pod's cgroup).
    descendants: BTreeSet<u64>,
    /// Per ServiceEntry, without `lastTransitionTime` until a
    /// [`StatusClock`] stamps it. Shared with the previous model for a
    /// reused service (a deep copy of 100,000 of them per edit otherwise);
    /// the clock copies one only to change it. A [`CowMap`], so that the
    /// clock keeps the statuses it stamped as a clone sharing its chunks,
    /// and finds what changed without a walk of every entry.
    pub status: CowMap<ObjectKey, Arc<ServiceEntryStatus>>,
    /// `Some` when patched from a previous model.
    delta: Option<Delta>,
}

impl Model {
    /// Builds the model. `cgroups` resolves `shunt.io/cgroup` annotations
    /// (the agent's [`CgroupDir`]; readers pass [`NoCgroups`]).
    pub fn build(cfg: Arc<Config>, alloc: &Allocation, cgroups: &dyn CgroupResolver) -> Model {
        Self::build_from(cfg, alloc, cgroups, None)
    }

    /// [`Model::build`], patched from `prev` when nothing a service is
    /// resolved from changed besides ServiceEntries (mesh, namespaces,
    /// gateways, DestinationRules, WorkloadEntries, the API server's
    /// status): only the entries [`Config::changed_since`] names are
    /// resolved again, with those whose allocated hosts may have moved to
    /// or from them, and every other one is shared with `prev`. The result
    /// equals [`Model::build`]'s, provided `alloc` differs from the
    /// allocation `prev` was built from only in the hosts of the changed
    /// entries (true of the agent's own allocator); a caller whose
    /// allocation can move on its own (the waypoint reading the agent's)
    /// passes `prev` only while it has not. [`Model::delta`] says what
    /// differs.
    pub fn build_from(
        cfg: Arc<Config>,
        alloc: &Allocation,
        cgroups: &dyn CgroupResolver,
        prev: Option<&Model>,
    ) -> Model {
        let changes = prev
            // Patching an empty model would only be a slower whole build.
            .filter(|p| !p.entries.is_empty() && same_context(&p.config, &cfg))
            .map(|p| (p, cfg.changed_since(&p.config)))
            .filter(|(_, c)| !c.api_status);
        let mut m = match changes {
            Some((p, changes)) => p.patched(&cfg, alloc, &changes.service_entries),
            None => Self::whole(&cfg, alloc),
        };
        for we in &cfg.workload_entries {
            m.add_workload(&cfg, alloc, cgroups, we);
        }
        m.config = cfg;
        m
    }

    /// The build from scratch: the indexes in ordinary maps, filled in age
    /// order (each collision found as it happens), then laid into
    /// [`CowMap`]s in one pass each.
    fn whole(cfg: &Config, alloc: &Allocation) -> Model {
        let mut m = Model {
            mesh: Mesh::from_config(&cfg.mesh),
            unused: unused::warnings(cfg).into(),
            ..Default::default()
        };
        // Older entries first, so they win VIP:port collisions.
        let mut order: Vec<&ServiceEntry> = cfg.service_entries.iter().map(|se| &**se).collect();
        order.sort_by_key(|se| se.age_key());
        let mut bound = waypoint::Bound::new();
        let mut entries = Vec::with_capacity(order.len());
        let mut services = Vec::with_capacity(order.len());
        let mut warned = Vec::new();
        let mut claims: BTreeMap<SocketAddr, Vec<ServiceId>> = BTreeMap::new();
        let mut hosts: HashMap<String, Vec<HostRecord>> = HashMap::new();
        let mut status = Vec::with_capacity(order.len());
        for se in order {
            let r = m.resolve_entry(cfg, alloc, se, &mut bound);
            status.push((r.key.clone(), r.status));
            let own = shared(r.own);
            let Some(svc) = r.svc else {
                warned.push((r.age.clone(), own.clone()));
                entries.push((
                    r.key,
                    Entry {
                        age: r.age,
                        id: None,
                        own,
                    },
                ));
                continue;
            };
            let id = svc.id;
            let mut all = own.to_vec();
            if !Self::indexed(&svc) {
                all.push(not_programmed(&svc));
            } else {
                for (vip, p) in Self::claims_of(&svc) {
                    let at = SocketAddr::new(vip.ip, p.number);
                    match claims.entry(at) {
                        std::collections::btree_map::Entry::Vacant(v) => {
                            v.insert(vec![id]);
                        }
                        std::collections::btree_map::Entry::Occupied(mut o) => {
                            let winner = o.get()[0];
                            if !o.get().contains(&id) {
                                o.get_mut().push(id);
                            }
                            all.push(collision(&svc, vip, p, winner));
                        }
                    }
                }
                for (h, rec) in Self::records(&svc) {
                    // Most hosts have one record: no spare capacity.
                    let rs = hosts.entry(h).or_default();
                    rs.reserve_exact(1);
                    rs.push(rec);
                }
            }
            if !all.is_empty() {
                warned.push((r.age.clone(), all.into()));
            }
            entries.push((
                r.key,
                Entry {
                    age: r.age,
                    id: Some(id),
                    own,
                },
            ));
            services.push((id, Arc::new(svc)));
        }
        entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        status.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        services.sort_unstable_by_key(|s| s.0);
        let mut hosts: Vec<_> = hosts.into_iter().collect();
        hosts.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        m.entries = CowMap::from_sorted(entries);
        m.status = CowMap::from_sorted(status);
        m.services = CowMap::from_sorted(services);
        m.warned = CowMap::from_sorted(warned);
        m.claims = CowMap::from_sorted(claims);
        m.hosts = CowMap::from_sorted(hosts);
        m
    }

    /// `self` with the entries `changed` (and those whose allocated hosts
    /// may have moved with them) removed and added again from `cfg`.
    fn patched(&self, cfg: &Config, alloc: &Allocation, changed: &BTreeSet<ObjectKey>) -> Model {
        let mut m = Model {
            config: Arc::default(),
            mesh: self.mesh.clone(),
            services: self.services.clone(),
            claims: self.claims.clone(),
            hosts: self.hosts.clone(),
            entries: self.entries.clone(),
            warned: self.warned.clone(),
            unused: self.unused.clone(),
            status: self.status.clone(),
            ..Default::default()
        };
        // An allocated host goes to another entry only when one that lists
        // it changed: its owner now and its owner before are redone too.
        let mut redo = changed.clone();
        let mut moved: BTreeSet<&str> = BTreeSet::new();
        for key in changed {
            if let Some(svc) = self.service_by_key(key) {
                moved.extend(svc.hosts.iter().map(String::as_str));
            }
        }
        let mut found = entries_named(cfg, changed);
        for se in &found {
            moved.extend(se.spec.hosts.iter().map(String::as_str));
        }
        let mut extra: BTreeSet<ObjectKey> = BTreeSet::new();
        for h in &moved {
            if let Some(a) = alloc.hosts.get(*h) {
                extra.insert(a.owner.clone());
            }
            for r in self.hosts.get(&*host::dns_key_ref(h)).into_iter().flatten() {
                if let Some(s) = self.services.get(&r.service) {
                    extra.insert(s.key.clone());
                }
            }
        }
        extra.retain(|k| !redo.contains(k));
        found.extend(entries_named(cfg, &extra));
        redo.extend(extra);
        let mut delta = Delta::default();
        let mut rewarn = BTreeSet::new();
        for key in &redo {
            m.remove_entry(key, &mut delta, &mut rewarn);
        }
        found.sort_by_key(|se| se.age_key());
        let mut bound = waypoint::Bound::new();
        for se in found {
            m.add_service(cfg, alloc, se, &mut bound, &mut delta, &mut rewarn);
        }
        m.rewarn(rewarn);
        m.delta = Some(delta);
        m
    }

    fn warn(&mut self, kind: Kind, object: &ObjectKey, message: String) {
        self.workload_warnings.push(Warning {
            kind,
            object: object.clone(),
            field: None,
            message,
        });
    }

    /// One ServiceEntry resolved (its service, if it has an id), not yet
    /// indexed.
    fn resolve_entry(
        &self,
        cfg: &Config,
        alloc: &Allocation,
        se: &ServiceEntry,
        bound: &mut waypoint::Bound,
    ) -> Resolved {
        let key = se.key();
        let age = age_of(se);
        let mut own = Vec::new();
        unused::service_entry(se, &key, &mut own);
        let binding = waypoint::bind(cfg, &self.mesh.trust_domain, se, bound);
        let hosts = &se.spec.hosts;
        let mut vips: Vec<Vip> = (0..hosts.len())
            .flat_map(|i| {
                alloc
                    .addresses_of(&key, &hosts[i..=i])
                    .map(move |(_, ip)| Vip {
                        ip,
                        host: i as u32,
                        allocated: true,
                    })
            })
            .collect();
        let status = Arc::new(ServiceEntryStatus {
            addresses: vips
                .iter()
                .map(|v| status::address(&hosts[v.host as usize], v.ip))
                .collect(),
            conditions: status::conditions(&binding),
        });
        if !hosts.is_empty() {
            for ip in service::explicit_ips(se) {
                let ip = ip.to_canonical();
                if !vips.iter().any(|v| v.ip == ip) {
                    vips.push(Vip {
                        ip,
                        host: 0,
                        allocated: false,
                    });
                }
            }
        }
        // Collected from a flat_map: no exact size, spare capacity for two.
        vips.shrink_to_fit();
        let Some(id) = alloc.service_id(&key) else {
            own.push(Warning {
                kind: Kind::ServiceEntry,
                object: key.clone(),
                field: None,
                message: "no service id in the allocation yet; not programmed".into(),
            });
            return Resolved {
                key,
                age,
                status,
                svc: None,
                own,
            };
        };
        let svc = service::resolve(
            cfg,
            &self.mesh,
            se,
            key.clone(),
            id,
            vips,
            binding,
            &mut own,
        );
        Resolved {
            key,
            age,
            status,
            svc: Some(svc),
            own,
        }
    }

    /// Resolves and indexes one entry into a patched model.
    fn add_service(
        &mut self,
        cfg: &Config,
        alloc: &Allocation,
        se: &ServiceEntry,
        bound: &mut waypoint::Bound,
        delta: &mut Delta,
        rewarn: &mut BTreeSet<ServiceId>,
    ) {
        let r = self.resolve_entry(cfg, alloc, se, bound);
        self.status.insert(r.key.clone(), r.status);
        let own = shared(r.own);
        let Some(svc) = r.svc else {
            self.warned.insert(r.age.clone(), own.clone());
            self.entries.insert(
                r.key,
                Entry {
                    age: r.age,
                    id: None,
                    own,
                },
            );
            return;
        };
        rewarn.insert(svc.id);
        self.entries.insert(
            r.key,
            Entry {
                age: r.age.clone(),
                id: Some(svc.id),
                own,
            },
        );
        self.index_service(Arc::new(svc), r.age, delta, rewarn);
    }

    /// Whether a service is steered: only a waypoint can learn the name a
    /// client wants for DYNAMIC_DNS (Istio: NoWaypointForWildcardService);
    /// the pods' DNS stays as it was.
    fn indexed(svc: &Service) -> bool {
        !(svc.resolution == crate::config::Resolution::DynamicDns
            && matches!(svc.waypoint, WaypointBinding::None))
    }

    /// Each (VIP, TCP port) of a service, in its order.
    fn claims_of(svc: &Service) -> impl Iterator<Item = (&Vip, &ServicePort)> + '_ {
        svc.vips.iter().flat_map(move |vip| {
            svc.ports
                .iter()
                .filter(|p| p.is_tcp())
                .map(move |p| (vip, p))
        })
    }

    /// The VIP:ports a service claims (TCP ports only).
    fn claimed(svc: &Service) -> impl Iterator<Item = SocketAddr> + '_ {
        Self::claims_of(svc).map(|(vip, p)| SocketAddr::new(vip.ip, p.number))
    }

    /// Each lowercased host of a service's allocated VIPs with its record.
    fn records(svc: &Service) -> Vec<(String, HostRecord)> {
        let mut out: Vec<(String, HostRecord)> = Vec::new();
        for v in svc.vips.iter().filter(|v| v.allocated) {
            let key = host::dns_key_ref(svc.vip_host(v));
            let i = match out.iter().position(|(h, _)| *h == *key) {
                Some(i) => i,
                None => {
                    out.push((
                        key.into_owned(),
                        HostRecord {
                            service: svc.id,
                            export_to: svc.export_to.clone(),
                            ..Default::default()
                        },
                    ));
                    out.len() - 1
                }
            };
            // Exact capacities: most hosts have one record with one
            // address per family, and a pushed-to empty Vec reserves four
            // (at 100,000 hosts 40 MB of spare capacity here and as much in
            // the DNS table).
            let r = &mut out[i].1;
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
        out
    }

    /// Puts a service into the indexes (VIP:port claims, hosts) in age
    /// order. Services whose collision warnings may change go to `rewarn`.
    fn index_service(
        &mut self,
        svc: Arc<Service>,
        age: Age,
        delta: &mut Delta,
        rewarn: &mut BTreeSet<ServiceId>,
    ) {
        let id = svc.id;
        delta.services.insert(id);
        if !Self::indexed(&svc) {
            self.services.insert(id, svc);
            return;
        }
        // Where `age` goes among services on one VIP:port or host (oldest
        // first).
        let older = |m: &Model, other: ServiceId| m.age_of(other).is_some_and(|a| *a < age);
        for at in Self::claimed(&svc) {
            delta.vip_ports.insert(at);
            let at_ = self
                .claims
                .get(&at)
                .map(|c| (c.contains(&id), c.partition_point(|s| older(self, *s))));
            match at_ {
                None => {
                    self.claims.insert(at, vec![id]);
                }
                Some((true, _)) => {}
                Some((false, i)) => {
                    let c = self.claims.get_mut(&at).expect("found above");
                    if i == 0 {
                        rewarn.extend(c.iter().copied());
                    }
                    c.insert(i, id);
                }
            }
        }
        for (h, r) in Self::records(&svc) {
            delta.hosts.insert(h.clone());
            let at = self
                .hosts
                .get(&*h)
                .map(|rs| rs.partition_point(|o| older(self, o.service)));
            match at {
                Some(i) => {
                    let rs = self.hosts.get_mut(&*h).expect("found above");
                    rs.reserve_exact(1);
                    rs.insert(i, r);
                }
                None => {
                    self.hosts.insert(h, vec![r]);
                }
            }
        }
        self.services.insert(id, svc);
    }

    /// Takes an entry and its service out of every index.
    fn remove_entry(
        &mut self,
        key: &ObjectKey,
        delta: &mut Delta,
        rewarn: &mut BTreeSet<ServiceId>,
    ) {
        let Some(e) = self.entries.remove(key) else {
            return;
        };
        self.warned.remove(&e.age);
        self.status.remove(key);
        let Some(svc) = e.id.and_then(|id| self.services.remove(&id)) else {
            return;
        };
        if !Self::indexed(&svc) {
            return;
        }
        for at in Self::claimed(&svc) {
            delta.vip_ports.insert(at);
            let Some(c) = self.claims.get_mut(&at) else {
                continue;
            };
            let Some(i) = c.iter().position(|s| *s == svc.id) else {
                continue;
            };
            c.remove(i);
            if c.is_empty() {
                self.claims.remove(&at);
            } else if i == 0 {
                rewarn.extend(c.iter().copied());
            }
        }
        for (h, _) in Self::records(&svc) {
            let Some(rs) = self.hosts.get_mut(&*h) else {
                continue;
            };
            rs.retain(|r| r.service != svc.id);
            if rs.is_empty() {
                self.hosts.remove(&*h);
            }
            delta.hosts.insert(h);
        }
    }

    /// Recomputes the warnings of `ids`: their own and their VIP:port
    /// collisions (each names the oldest entry on the address, as a build
    /// in age order finds it).
    fn rewarn(&mut self, ids: BTreeSet<ServiceId>) {
        for id in ids {
            let Some(svc) = self.services.get(&id) else {
                continue;
            };
            let Some(e) = self.entries.get(&svc.key) else {
                continue;
            };
            let mut all: Vec<Warning> = e.own.to_vec();
            if !Self::indexed(svc) {
                all.push(not_programmed(svc));
            } else {
                let mut seen = BTreeSet::new();
                for (vip, p) in Self::claims_of(svc) {
                    let at = SocketAddr::new(vip.ip, p.number);
                    let Some(&winner) = self.claims.get(&at).and_then(|c| c.first()) else {
                        continue;
                    };
                    if winner != id || !seen.insert(at) {
                        all.push(collision(svc, vip, p, winner));
                    }
                }
            }
            let age = e.age.clone();
            if all.is_empty() {
                self.warned.remove(&age);
            } else {
                self.warned.insert(age, all.into());
            }
        }
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
    /// What differs from the model this one was patched from (`None`: built
    /// whole, everything may differ). Callers patch only from the model in
    /// force, which passed [`crate::validate::validate`]: that check then
    /// looks at the delta's services only.
    pub fn delta(&self) -> Option<&Delta> {
        self.delta.as_ref()
    }
    pub fn services(&self) -> impl Iterator<Item = &Arc<Service>> {
        self.services.values()
    }
    pub fn service(&self, id: ServiceId) -> Option<&Arc<Service>> {
        self.services.get(&id)
    }
    pub fn service_by_key(&self, key: &ObjectKey) -> Option<&Arc<Service>> {
        self.entries
            .get(key)
            .and_then(|e| e.id)
            .and_then(|id| self.services.get(&id))
    }
    /// The collision and record order of an indexed service: its entry's.
    fn age_of(&self, id: ServiceId) -> Option<&Age> {
        let svc = self.services.get(&id)?;
        self.entries.get(&svc.key).map(|e| &e.age)
    }
    /// The service behind a VIP:port (IPv4-mapped addresses as IPv4).
    pub fn service_at(&self, at: SocketAddr) -> Option<&Arc<Service>> {
        let at = SocketAddr::new(at.ip().to_canonical(), at.port());
        self.claims
            .get(&at)
            .and_then(|c| c.first())
            .and_then(|id| self.services.get(id))
    }
    /// Every steered VIP:port with its service, in address order.
    pub fn vip_ports(&self) -> impl Iterator<Item = (SocketAddr, &Arc<Service>)> {
        self.claims.iter().filter_map(|(a, c)| {
            c.first()
                .and_then(|id| self.services.get(id))
                .map(|s| (*a, s))
        })
    }
    /// The DNS view of a name (any case) in its oldest ServiceEntry: its
    /// own host, else the most specific wildcard host covering it.
    pub fn host(&self, name: &str) -> Option<&HostRecord> {
        self.host_records(name).next()
    }
    /// Every record of a lowercased host, oldest ServiceEntry first (exact
    /// host, else the most specific wildcard covering it).
    fn host_records(&self, name: &str) -> impl Iterator<Item = &HostRecord> {
        let key = host::dns_key(name);
        self.hosts
            .get(&*key)
            .or_else(|| host::covering(&key).find_map(|w| self.hosts.get(&*w)))
            .into_iter()
            .flatten()
    }
    /// The records of one lowercased host exactly as it is written (no
    /// wildcard lookup), oldest ServiceEntry first: what the DNS table
    /// patches per host in [`Delta::hosts`].
    pub fn records_of<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a HostRecord> + 'a {
        self.hosts.get(key).into_iter().flatten()
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
    /// Every warning: per ServiceEntry in age order (fields not honoured,
    /// resolution, VIP:port collisions), then the other objects' fields not
    /// honoured in config order, then the workloads'.
    pub fn warnings(&self) -> impl Iterator<Item = &Warning> + Clone {
        self.warned
            .values()
            .flat_map(|w| w.iter())
            .chain(self.unused.iter())
            .chain(self.workload_warnings.iter())
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

/// One ServiceEntry resolved, before indexing.
struct Resolved {
    key: ObjectKey,
    age: Age,
    status: Arc<ServiceEntryStatus>,
    /// `None`: no id in the allocation yet.
    svc: Option<Service>,
    own: Vec<Warning>,
}

/// A DYNAMIC_DNS service without a waypoint (see [`Model::indexed`]).
fn not_programmed(svc: &Service) -> Warning {
    Warning {
        kind: Kind::ServiceEntry,
        object: svc.key.clone(),
        field: None,
        message: "resolution DYNAMIC_DNS does not apply until the entry is bound to a waypoint; not programmed".into(),
    }
}

/// `svc` on `vip`:`port` loses to the oldest entry there, `winner`.
fn collision(svc: &Service, vip: &Vip, port: &ServicePort, winner: ServiceId) -> Warning {
    Warning {
        kind: Kind::ServiceEntry,
        object: svc.key.clone(),
        field: None,
        message: format!(
            "{} port {} already belongs to an older ServiceEntry (service id {winner})",
            vip.ip, port.number
        ),
    }
}

/// The ServiceEntries of `cfg` with these keys (one pass; a key is made
/// only for an entry whose name is one of theirs).
fn entries_named<'a>(cfg: &'a Config, keys: &BTreeSet<ObjectKey>) -> Vec<&'a ServiceEntry> {
    if keys.is_empty() {
        return Vec::new();
    }
    let names: std::collections::HashSet<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    cfg.service_entries
        .iter()
        .map(|se| &**se)
        .filter(|se| {
            names.contains(se.name()) && keys.contains(&ObjectKey::new(se.namespace(), se.name()))
        })
        .collect()
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
mod incremental_tests;
#[cfg(test)]
pub(crate) mod tests;

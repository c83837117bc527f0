//! Desired state: a pure function from (config, allocation, cgroup resolver)
//! to the exact content of the kernel maps, plus the lookup tables the agent
//! and the waypoint use at run time and each ServiceEntry's status. Built
//! once per config; nothing here is per connection.
//!
//! Service and workload ids come from the persisted allocation, so an
//! unchanged object keeps its map entries byte for byte across reloads and
//! restarts, and reconciling by difference never touches it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use shunt_common::{
    EnrolledValue, ServiceKey, ServiceValue, ENR_F_DNS_CAPTURE, SVC_F_HTTP, SVC_F_WAYPOINT,
};

use crate::alloc::Allocation;
use crate::config::render::{ServiceEntryStatus, StatusAddress, StatusCondition, WAYPOINT_BOUND};
use crate::config::{
    labels, ClientTls, Config, Location, ObjectKey, OutboundTrafficPolicy, Protocol, Resolution,
    ServiceEntry, WaypointRef,
};

/// The bound waypoint of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointInfo {
    pub gateway: ObjectKey,
    /// `spiffe://<td>/ns/<gw ns>/sa/<gw name>`.
    pub identity: String,
    /// Address from `spec.addresses`, HBONE listener port.
    pub addr: SocketAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortInfo {
    pub number: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub address: String,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

/// Everything the agent and the waypoint need about one ServiceEntry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
    /// Auto-allocated VIPs, then explicit single-IP `spec.addresses`.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<PortInfo>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Vec<EndpointInfo>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<WaypointInfo>,
    /// TLS origination per (host, port) from DestinationRules.
    pub tls: HashMap<(String, u16), ClientTls>,
}

impl ServiceInfo {
    pub fn port(&self, number: u16) -> Option<&PortInfo> {
        self.ports.iter().find(|p| p.number == number)
    }
    pub fn tls_for(&self, host: &str, port: u16) -> Option<&ClientTls> {
        self.tls.get(&(host.to_string(), port))
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    /// `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub identity: String,
    pub address: Option<IpAddr>,
    pub labels: BTreeMap<String, String>,
    /// Resolved cgroup id when the workload is enrolled (the first, when the
    /// annotation lists several).
    pub cgroup_id: Option<u64>,
}

/// DNS view of a host: its VIPs and service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostRecord {
    pub service_id: u32,
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

#[derive(Clone, Debug, Default)]
pub struct Desired {
    /// Exact content of the `services` map.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// Exact content of the `enrolled` map.
    pub enrolled: BTreeMap<u64, EnrolledValue>,
    /// Mesh egress mode (for `meta`, see `kernel::projection::meta`).
    pub outbound: OutboundTrafficPolicy,
    /// REGISTRY_ONLY exceptions (mesh `shunt.allowedEgressCIDRs`).
    pub allowed_egress: Vec<ipnet::IpNet>,
    pub service_table: HashMap<u32, Arc<ServiceInfo>>,
    pub workload_table: HashMap<u32, Arc<WorkloadInfo>>,
    pub workloads_by_ip: HashMap<IpAddr, u32>,
    /// Lowercased host name -> VIPs (for the DNS proxy).
    pub hosts: HashMap<String, HostRecord>,
    /// Per ServiceEntry, without `lastTransitionTime` (see [`StatusClock`]).
    pub status: BTreeMap<ObjectKey, ServiceEntryStatus>,
    /// Things dropped while building (e.g. two entries on one VIP:port).
    pub warnings: Vec<String>,
}

impl Desired {
    pub fn service(&self, id: u32) -> Option<&Arc<ServiceInfo>> {
        self.service_table.get(&id)
    }
    pub fn workload(&self, id: u32) -> Option<&Arc<WorkloadInfo>> {
        self.workload_table.get(&id)
    }
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.workloads_by_ip
            .get(&ip)
            .and_then(|id| self.workload_table.get(id))
    }
    /// The service behind a VIP:port (as the agent sees it after accept).
    pub fn service_at(&self, ip: IpAddr, port: u16) -> Option<&Arc<ServiceInfo>> {
        let v = self.services.get(&service_key(ip, port))?;
        self.service_table.get(&v.service_id)
    }
}

/// The `services` key of a TCP VIP:port.
pub fn service_key(ip: IpAddr, port: u16) -> ServiceKey {
    crate::kernel::registry::tcp_key(std::net::SocketAddr::new(ip, port))
}

/// Resolves `shunt.io/cgroup` annotations against a cgroup v2 root: the
/// cgroup id the kernel reports (`bpf_get_current_cgroup_id`) is the inode
/// number of the cgroup directory.
pub fn cgroup_resolver(root: PathBuf) -> impl Fn(&str) -> Option<u64> {
    move |annotation: &str| {
        use std::os::unix::fs::MetadataExt;
        let p = Path::new(annotation);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            root.join(p)
        };
        std::fs::metadata(full)
            .ok()
            .filter(|m| m.is_dir())
            .map(|m| m.ino())
    }
}

/// Waypoint binding of one entry, or why not.
fn bind(cfg: &Config, se: &ServiceEntry) -> Result<WaypointInfo, (&'static str, String)> {
    let WaypointRef::Gateway {
        gateway,
        from_namespace_label,
    } = cfg.waypoint_ref(se)
    else {
        return Err((
            "NotBound",
            format!(
                "not bound to any waypoint: no {} label on the ServiceEntry or its Namespace",
                labels::USE_WAYPOINT
            ),
        ));
    };
    let via = if from_namespace_label {
        format!("Namespace {}", se.namespace())
    } else {
        "ServiceEntry".to_string()
    };
    let Some(gw) = cfg.gateway(&gateway) else {
        return Err((
            "WaypointNotFound",
            format!("waypoint {gateway} (from the {via} label) not found"),
        ));
    };
    if !gw.spec.is_waypoint() {
        return Err((
            "WaypointNotFound",
            format!(
                "Gateway {gateway} has gatewayClassName {:?}, not {:?}",
                gw.spec.gateway_class_name,
                crate::config::WAYPOINT_CLASS
            ),
        ));
    }
    let for_ = gw.label(labels::WAYPOINT_FOR).unwrap_or("service");
    if for_ != "service" && for_ != "all" {
        return Err((
            "UnsupportedTrafficType",
            format!("waypoint {gateway} is for {for_:?} traffic, not service traffic"),
        ));
    }
    let Some(ip) = gw.spec.address() else {
        return Err((
            "MissingAddress",
            format!("waypoint {gateway} has no IP address in spec.addresses"),
        ));
    };
    Ok(WaypointInfo {
        identity: cfg.spiffe_id(&gateway.namespace, &gateway.name),
        addr: SocketAddr::new(ip, gw.spec.hbone_port()),
        gateway,
    })
}

/// TLS settings of the DestinationRules for `host`: same namespace as the
/// entry first, then any other, in directory order; an exact host before a
/// `*.suffix` one. Port-level settings override the rule's default.
fn tls_for(cfg: &Config, se: &ServiceEntry, host: &str, port: u16) -> Option<ClientTls> {
    let matches_exact = |h: &str| h.eq_ignore_ascii_case(host);
    let matches_wild = |h: &str| {
        h.strip_prefix('*').is_some_and(|suffix| {
            host.len() > suffix.len()
                && host
                    .to_ascii_lowercase()
                    .ends_with(&suffix.to_ascii_lowercase())
        })
    };
    let candidates = cfg
        .destination_rules
        .iter()
        .filter(|d| d.namespace() == se.namespace())
        .chain(
            cfg.destination_rules
                .iter()
                .filter(|d| d.namespace() != se.namespace()),
        );
    let dr = candidates
        .clone()
        .find(|d| matches_exact(&d.spec.host))
        .or_else(|| candidates.clone().find(|d| matches_wild(&d.spec.host)))?;
    let tp = dr.spec.traffic_policy.as_ref()?;
    tp.port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().is_some_and(|p| p.number.0 == port))
        .and_then(|pl| pl.tls.clone())
        .or_else(|| tp.tls.clone())
}

/// Builds the desired state. `cgroup_id` maps a `shunt.io/cgroup`
/// annotation to a cgroup id (see [`cgroup_resolver`]).
pub fn build(cfg: &Config, alloc: &Allocation, cgroup_id: impl Fn(&str) -> Option<u64>) -> Desired {
    let mut d = Desired {
        outbound: cfg.mesh.outbound_traffic_policy.clone(),
        allowed_egress: cfg
            .mesh
            .shunt
            .allowed_egress_cidrs
            .iter()
            .map(|c| c.0)
            .collect(),
        ..Default::default()
    };

    // Older entries first, so they win VIP:port collisions.
    let mut order: Vec<&ServiceEntry> = cfg.service_entries.iter().collect();
    order.sort_by_key(|se| se.age_key());

    for se in order {
        let key = se.key();
        let binding = bind(cfg, se);
        let mut status = ServiceEntryStatus::default();
        let mut vips = Vec::new();
        for (host, ip) in alloc.addresses_of(&key, &se.spec.hosts) {
            status.addresses.push(StatusAddress {
                host: host.to_string(),
                value: ip.to_string(),
            });
            vips.push(ip);
        }
        for a in &se.spec.addresses {
            let ip = a.parse::<IpAddr>().ok().or_else(|| {
                a.parse::<ipnet::IpNet>()
                    .ok()
                    .filter(|n| n.prefix_len() == n.max_prefix_len())
                    .map(|n| n.addr())
            });
            if let Some(ip) = ip {
                if !vips.contains(&ip) {
                    vips.push(ip);
                }
            }
        }
        status.conditions.push(match &binding {
            Ok(w) => StatusCondition {
                last_transition_time: None,
                message: format!("Successfully attached to waypoint {}", w.gateway),
                reason: "WaypointAccepted".into(),
                status: "True".into(),
                type_: WAYPOINT_BOUND.into(),
            },
            Err((reason, message)) => StatusCondition {
                last_transition_time: None,
                message: message.clone(),
                reason: reason.to_string(),
                status: "False".into(),
                type_: WAYPOINT_BOUND.into(),
            },
        });
        d.status.insert(key.clone(), status);

        let Some(id) = alloc.service_id(&key) else {
            d.warnings.push(format!(
                "ServiceEntry {key}: no service id in the allocation yet; not programmed"
            ));
            continue;
        };
        let waypoint = binding.ok();
        let ports: Vec<PortInfo> = se
            .spec
            .ports
            .iter()
            .map(|p| PortInfo {
                number: p.number.0,
                target_port: p.target_port(),
                protocol: p.protocol(),
                name: p.name.clone(),
            })
            .collect();
        let (wp_addr, wp_port) = waypoint
            .as_ref()
            .map(|w| {
                (
                    crate::kernel::registry::addr_bytes(w.addr.ip()),
                    w.addr.port(),
                )
            })
            .unwrap_or(([0; 16], 0));
        for ip in &vips {
            for p in &ports {
                // Only TCP is steered.
                if p.protocol == Protocol::Udp {
                    continue;
                }
                let mut flags = 0;
                if waypoint.is_some() {
                    flags |= SVC_F_WAYPOINT;
                }
                if p.protocol.is_http() {
                    flags |= SVC_F_HTTP;
                }
                let v = ServiceValue {
                    service_id: id,
                    flags,
                    waypoint_addr: wp_addr,
                    waypoint_port: wp_port,
                    target_port: p.target_port,
                    _pad: [0; 4],
                };
                match d.services.entry(service_key(*ip, p.number)) {
                    std::collections::btree_map::Entry::Vacant(e) => {
                        e.insert(v);
                    }
                    std::collections::btree_map::Entry::Occupied(e) => {
                        let other = e.get().service_id;
                        d.warnings.push(format!(
                            "ServiceEntry {key}: {ip} port {} already belongs to an older ServiceEntry (service id {other})",
                            p.number
                        ));
                    }
                }
            }
        }
        for (host, ip) in alloc.addresses_of(&key, &se.spec.hosts) {
            let r = d
                .hosts
                .entry(host.to_ascii_lowercase())
                .or_insert_with(|| HostRecord {
                    service_id: id,
                    ..Default::default()
                });
            match ip {
                IpAddr::V4(a) => r.v4.push(a),
                IpAddr::V6(a) => r.v6.push(a),
            }
        }
        let mut tls = HashMap::new();
        for h in &se.spec.hosts {
            for p in &ports {
                if let Some(t) = tls_for(cfg, se, h, p.number) {
                    tls.insert((h.clone(), p.number), t);
                }
            }
        }
        let info = ServiceInfo {
            id,
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            hosts: se.spec.hosts.clone(),
            vips,
            ports,
            resolution: se.spec.resolution(),
            location: se.spec.location.unwrap_or(Location::MeshExternal),
            endpoints: se
                .spec
                .endpoints
                .iter()
                .map(|e| EndpointInfo {
                    address: e.address.clone(),
                    ports: e.ports.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
                    labels: e.labels.clone(),
                    service_account: e.service_account().to_string(),
                })
                .collect(),
            subject_alt_names: se.spec.subject_alt_names.clone(),
            waypoint,
            tls,
        };
        d.service_table.insert(id, Arc::new(info));
    }

    // Waypoint deployments are never enrolled: their traffic would loop
    // back into themselves.
    let is_waypoint_pod = |ns: &str, l: &BTreeMap<String, String>| {
        l.get("gateway.networking.k8s.io/gateway-name")
            .and_then(|g| cfg.gateway(&ObjectKey::new(ns, g)))
            .is_some_and(|g| g.spec.is_waypoint())
    };
    let dns = if cfg.mesh.shunt.dns_capture {
        ENR_F_DNS_CAPTURE
    } else {
        0
    };
    for we in &cfg.workload_entries {
        let key = we.key();
        let Some(id) = alloc.workload_id(&key) else {
            d.warnings.push(format!(
                "WorkloadEntry {key}: no workload id in the allocation yet; not programmed"
            ));
            continue;
        };
        let sa = we.spec.service_account().to_string();
        let address = we.spec.address.parse::<IpAddr>().ok();
        let mut cgroup = None;
        if let Some(cg) = we.metadata.annotations.get(labels::CGROUP_ANNOTATION) {
            let labels_all = we.metadata.labels.iter().chain(we.spec.labels.iter());
            let merged: BTreeMap<String, String> =
                labels_all.map(|(k, v)| (k.clone(), v.clone())).collect();
            // Istio's rule: the workload's own label wins (`none` opts
            // out), else its Namespace's.
            let ambient = match merged.get(labels::DATAPLANE_MODE).map(String::as_str) {
                Some("ambient") => true,
                Some(_) => false,
                None => cfg.namespace_is_ambient(we.namespace()),
            };
            if !ambient {
                // Not in the mesh: table entry only.
            } else if is_waypoint_pod(we.namespace(), &merged) {
                d.warnings
                    .push(format!("WorkloadEntry {key}: a waypoint, never enrolled"));
            } else {
                // Several cgroups (comma-separated): a pod's containers.
                for cg in cg.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                    match cgroup_id(cg) {
                        Some(cid) => match d.enrolled.entry(cid) {
                            std::collections::btree_map::Entry::Vacant(e) => {
                                e.insert(EnrolledValue {
                                    workload_id: id,
                                    flags: dns,
                                });
                                cgroup.get_or_insert(cid);
                            }
                            std::collections::btree_map::Entry::Occupied(e) => {
                                d.warnings.push(format!(
                                    "WorkloadEntry {key}: cgroup {cg:?} already enrolled for workload id {}",
                                    e.get().workload_id
                                ));
                            }
                        },
                        None => d.warnings.push(format!(
                            "WorkloadEntry {key}: cgroup {cg:?} not found; not enrolled"
                        )),
                    }
                }
            }
        }
        if let Some(ip) = address {
            d.workloads_by_ip.entry(ip).or_insert(id);
        }
        let mut all_labels = we.spec.labels.clone();
        for (k, v) in &we.metadata.labels {
            all_labels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        d.workload_table.insert(
            id,
            Arc::new(WorkloadInfo {
                id,
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                identity: cfg.spiffe_id(&key.namespace, &sa),
                service_account: sa,
                address,
                labels: all_labels,
                cgroup_id: cgroup,
            }),
        );
    }
    d
}

// ------------------------------------------------------------- status time

/// Keeps each condition's `lastTransitionTime` across reloads: it changes
/// only when the condition's status or reason changes. Persisted next to the
/// allocation so that the CLI shows the agent's times.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StatusClock {
    seen: BTreeMap<ObjectKey, Vec<StatusCondition>>,
}

/// File name of the persisted condition times in the state directory.
pub const STATUS_FILE: &str = "status.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StatusRecord {
    namespace: String,
    name: String,
    conditions: Vec<StatusCondition>,
}

impl StatusClock {
    /// Reads persisted times; missing or unreadable state starts empty.
    pub fn load(state_dir: &Path) -> Self {
        let recs: Vec<StatusRecord> = std::fs::read(state_dir.join(STATUS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        StatusClock {
            seen: recs
                .into_iter()
                .map(|r| (ObjectKey::new(&r.namespace, &r.name), r.conditions))
                .collect(),
        }
    }

    /// Writes the times (temp file + rename).
    pub fn save(&self, state_dir: &Path) -> std::io::Result<()> {
        let recs: Vec<StatusRecord> = self
            .seen
            .iter()
            .map(|(k, c)| StatusRecord {
                namespace: k.namespace.clone(),
                name: k.name.clone(),
                conditions: c.clone(),
            })
            .collect();
        let path = state_dir.join(STATUS_FILE);
        let tmp = state_dir.join(format!("{STATUS_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&recs).expect("serializes"))?;
        std::fs::rename(tmp, path)
    }

    /// Fills `lastTransitionTime` of every condition: kept when status and
    /// reason are unchanged, else `now` (RFC 3339). Returns whether anything
    /// changed (worth saving).
    pub fn stamp(
        &mut self,
        status: &mut BTreeMap<ObjectKey, ServiceEntryStatus>,
        now: &str,
    ) -> bool {
        let mut changed = self.seen.len() != status.len();
        let mut next = BTreeMap::new();
        for (k, st) in status.iter_mut() {
            let old = self.seen.get(k);
            for c in &mut st.conditions {
                let prev = old.and_then(|o| o.iter().find(|p| p.type_ == c.type_));
                match prev {
                    Some(p) if p.status == c.status && p.reason == c.reason => {
                        c.last_transition_time = p.last_transition_time.clone();
                    }
                    _ => {
                        c.last_transition_time = Some(now.to_string());
                        changed = true;
                    }
                }
            }
            next.insert(k.clone(), st.conditions.clone());
        }
        self.seen = next;
        changed
    }
}

/// Current time as Kubernetes writes it (`2024-10-27T00:45:08.374915129Z`).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::Allocator;
    use shunt_common::v4_mapped;

    fn load(files: &[(&str, &str)]) -> Config {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        Config::load_dir(d.path()).unwrap()
    }

    fn seed_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/egress")
    }

    fn no_cgroups(_: &str) -> Option<u64> {
        None
    }

    const GW: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: infra\n  labels: {istio.io/waypoint-for: service}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.9}]\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n";

    fn se(ns: &str, name: &str, labels: &str) -> String {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n  labels: {{{labels}}}\nspec:\n  hosts: [{name}.example]\n  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}, {{number: 443, name: tls, protocol: TLS}}]\n  resolution: DNS\n---\n")
    }

    fn bound(d: &Desired, ns: &str, name: &str) -> (String, String, String) {
        let c = d.status[&ObjectKey::new(ns, name)]
            .condition(WAYPOINT_BOUND)
            .unwrap()
            .clone();
        (c.status, c.reason, c.message)
    }

    #[test]
    fn seed_desired_state() {
        let cfg = Config::load_dir(&seed_dir()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        let alloc = al.allocate(&cfg).unwrap().clone();
        let d = build(&cfg, &alloc, |cg| match cg {
            "shunt/curl" => Some(1001),
            _ => None,
        });
        let vip4: IpAddr = "240.240.0.1".parse().unwrap();
        let vip6: IpAddr = "2001:2::1".parse().unwrap();
        assert_eq!(d.services.len(), 2);
        let v = d.services[&service_key(vip4, 80)];
        assert_eq!(v.flags, SVC_F_WAYPOINT | SVC_F_HTTP);
        assert_eq!(v.waypoint_addr, v4_mapped([10, 244, 1, 18]));
        assert_eq!(v.waypoint_port, 15008);
        assert_eq!(v.target_port, 80);
        assert_eq!(d.services[&service_key(vip6, 80)], v);
        let svc = d.service_at(vip4, 80).unwrap();
        assert_eq!(svc.name, "httpbin.org");
        let wp = svc.waypoint.as_ref().unwrap();
        assert_eq!(
            wp.identity,
            "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway"
        );
        assert_eq!(wp.addr, "10.244.1.18:15008".parse().unwrap());
        // Status as in the seed.
        let st = &d.status[&ObjectKey::new("common-infrastructure", "httpbin.org")];
        let addrs: Vec<_> = st
            .addresses
            .iter()
            .map(|a| (a.host.as_str(), a.value.as_str()))
            .collect();
        assert_eq!(
            addrs,
            [("httpbin.org", "240.240.0.1"), ("httpbin.org", "2001:2::1")]
        );
        assert_eq!(
            bound(&d, "common-infrastructure", "httpbin.org"),
            (
                "True".into(),
                "WaypointAccepted".into(),
                "Successfully attached to waypoint common-infrastructure/egress-gateway".into()
            )
        );
        // Enrollment: curl resolves, admin's cgroup does not.
        assert_eq!(d.enrolled.len(), 1);
        let e = d.enrolled[&1001];
        assert_eq!(e.flags, ENR_F_DNS_CAPTURE);
        let w = d.workload(e.workload_id).unwrap();
        assert_eq!(w.identity, "spiffe://cluster.local/ns/default/sa/curl");
        assert_eq!(
            d.workload_by_ip("10.244.1.20".parse().unwrap())
                .unwrap()
                .name,
            "admin"
        );
        assert_eq!(
            d.workload_by_ip("::ffff:10.244.1.19".parse().unwrap())
                .unwrap()
                .name,
            "curl"
        );
        assert!(d.warnings.iter().any(|w| w.contains("shunt/admin")));
        // DNS view.
        let h = &d.hosts["httpbin.org"];
        assert_eq!(h.v4, vec![Ipv4Addr::new(240, 240, 0, 1)]);
        assert_eq!(d.outbound.mode, crate::config::OutboundMode::AllowAny);
    }

    #[test]
    fn tls_origination_step() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["01-namespace.yaml", "02-waypoint.yaml"] {
            std::fs::copy(seed_dir().join(f), dir.path().join(f)).unwrap();
        }
        std::fs::copy(
            seed_dir().join("tls-origination/03-serviceentry.yaml"),
            dir.path().join("03.yaml"),
        )
        .unwrap();
        let cfg = Config::load_dir(dir.path()).unwrap();
        let state = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(state.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        let d = build(&cfg, &alloc, no_cgroups);
        let v = d.services[&service_key("240.240.0.1".parse().unwrap(), 80)];
        assert_eq!(v.target_port, 443);
        let svc = d.service(v.service_id).unwrap();
        assert_eq!(
            svc.tls_for("httpbin.org", 80).unwrap().mode,
            crate::config::TlsMode::Simple
        );
    }

    #[test]
    fn waypoint_binding_rules() {
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: apps\n  labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}\n---\n\
                  apiVersion: v1\nkind: Namespace\nmetadata:\n  name: infra\n---\n\
                  apiVersion: v1\nkind: Namespace\nmetadata:\n  name: plain\n---\n";
        let gw_noaddr = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: noaddr, namespace: infra}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n\
                         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: ingress, namespace: infra}\nspec:\n  gatewayClassName: istio\n  addresses: [{value: 10.0.0.7}]\n  listeners: [{name: http, port: 80, protocol: HTTP}]\n---\n\
                         apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wl\n  namespace: infra\n  labels: {istio.io/waypoint-for: workload}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.8}]\n  listeners: [{name: mesh, port: 15009, protocol: HBONE}]\n---\n";
        let ses = [
            se("infra", "by-label", "istio.io/use-waypoint: wp"),
            se("apps", "by-namespace", ""),
            se(
                "plain",
                "cross",
                "istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra",
            ),
            se("plain", "missing", "istio.io/use-waypoint: nope"),
            se("plain", "unbound", ""),
            se("apps", "opt-out", "istio.io/use-waypoint: none"),
            se("infra", "no-address", "istio.io/use-waypoint: noaddr"),
            se("infra", "not-waypoint", "istio.io/use-waypoint: ingress"),
            se("infra", "workload-only", "istio.io/use-waypoint: wl"),
        ]
        .concat();
        let cfg = load(&[
            ("a.yaml", ns),
            ("b.yaml", GW),
            ("c.yaml", gw_noaddr),
            ("d.yaml", &ses),
        ]);
        let state = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(state.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        let d = build(&cfg, &alloc, no_cgroups);
        let ok = |ns: &str, n: &str| {
            let (s, r, m) = bound(&d, ns, n);
            assert_eq!(
                (s.as_str(), r.as_str()),
                ("True", "WaypointAccepted"),
                "{ns}/{n}: {m}"
            );
            assert_eq!(m, "Successfully attached to waypoint infra/wp");
        };
        ok("infra", "by-label");
        ok("apps", "by-namespace");
        ok("plain", "cross");
        let reason = |ns: &str, n: &str| {
            let (s, r, m) = bound(&d, ns, n);
            assert_eq!(s, "False", "{m}");
            (r, m)
        };
        assert_eq!(
            reason("plain", "missing"),
            (
                "WaypointNotFound".into(),
                "waypoint plain/nope (from the ServiceEntry label) not found".into()
            )
        );
        assert_eq!(reason("plain", "unbound").0, "NotBound");
        assert_eq!(reason("apps", "opt-out").0, "NotBound");
        assert_eq!(reason("infra", "no-address").0, "MissingAddress");
        assert_eq!(reason("infra", "not-waypoint").0, "WaypointNotFound");
        assert_eq!(reason("infra", "workload-only").0, "UnsupportedTrafficType");
        // Map values follow the binding.
        let vip = |ns: &str, n: &str| {
            let k = ObjectKey::new(ns, n);
            let hosts = [format!("{n}.example")];
            let ip = alloc.addresses_of(&k, &hosts).next().unwrap().1;
            ip
        };
        let v = d.services[&service_key(vip("plain", "cross"), 80)];
        assert_eq!(v.flags, SVC_F_WAYPOINT | SVC_F_HTTP);
        assert_eq!(v.waypoint_addr, v4_mapped([10, 0, 0, 9]));
        assert_eq!(v.target_port, 8080);
        let v = d.services[&service_key(vip("plain", "cross"), 443)];
        assert_eq!(v.flags, SVC_F_WAYPOINT);
        assert_eq!(v.target_port, 443);
        let v = d.services[&service_key(vip("plain", "missing"), 80)];
        assert_eq!(
            (v.flags, v.waypoint_addr, v.waypoint_port),
            (SVC_F_HTTP, [0; 16], 0)
        );
        // 9 entries x 2 VIPs x 2 ports.
        assert_eq!(d.services.len(), 36);
    }

    #[test]
    fn explicit_addresses_and_stable_ids_across_reload() {
        let explicit = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: db, namespace: ns}\nspec:\n  hosts: [db.example]\n  addresses: [10.1.2.3, 10.5.0.0/16, 'fd00::5/128']\n  ports: [{number: 5432, name: tcp}]\n  resolution: NONE\n---\n";
        let state = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(state.path()).unwrap();
        let c1 = load(&[("a.yaml", explicit), ("b.yaml", &se("ns", "web", ""))]);
        let d1 = build(&c1, al.allocate(&c1).unwrap(), no_cgroups);
        let keys: Vec<_> = d1
            .services
            .keys()
            .filter(|k| k.port == 5432)
            .map(|k| k.addr)
            .collect();
        let mut want = vec![
            v4_mapped([10, 1, 2, 3]),
            "fd00::5".parse::<Ipv6Addr>().unwrap().octets(),
        ];
        want.sort();
        assert_eq!(keys, want, "single IPs only, CIDRs are not VIPs");
        assert!(d1.status[&ObjectKey::new("ns", "db")].addresses.is_empty());

        // Edit: add an entry before the others and change `web`'s port list;
        // `db`'s entries stay byte-identical.
        let c2 = load(&[
            ("0.yaml", &se("ns", "new", "")),
            ("a.yaml", explicit),
            (
                "b.yaml",
                &se("ns", "web", "").replace("number: 443", "number: 8443"),
            ),
        ]);
        let state2 = al.allocate(&c2).unwrap().clone();
        let d2 = build(&c2, &state2, no_cgroups);
        for (k, v) in d1.services.iter().filter(|(k, _)| k.port == 5432) {
            assert_eq!(d2.services.get(k), Some(v));
        }
        let web80 = |d: &Desired| {
            *d.services
                .iter()
                .find(|(k, _)| {
                    k.port == 80 && d.service(d.services[k].service_id).unwrap().name == "web"
                })
                .unwrap()
                .1
        };
        assert_eq!(web80(&d1), web80(&d2));
        // After a restart too.
        let a3 = Allocator::open(state.path())
            .unwrap()
            .allocate(&c2)
            .unwrap()
            .clone();
        assert_eq!(build(&c2, &a3, no_cgroups).services, d2.services);
    }

    #[test]
    fn enrollment_only_in_ambient_namespaces_and_never_waypoints() {
        let files = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels: {istio.io/dataplane-mode: ambient}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: a\n  namespace: amb\n  annotations: {shunt.io/cgroup: a}\nspec: {address: 10.0.0.1}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: b\n  namespace: other\n  annotations: {shunt.io/cgroup: b}\nspec: {address: 10.0.0.2, serviceAccount: bee}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: wp\n  namespace: amb\n  annotations: {shunt.io/cgroup: wp}\n  labels: {gateway.networking.k8s.io/gateway-name: wp}\nspec: {address: 10.0.0.3}\n---\n\
            apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: amb}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n\
            shunt: {dnsCapture: false}\n";
        let (objs, mesh) = files.rsplit_once("---\n").unwrap();
        let cfg = load(&[("a.yaml", objs), ("mesh.yaml", mesh)]);
        let state = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(state.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        // A real resolver against a real directory tree.
        let root = tempfile::tempdir().unwrap();
        for n in ["a", "b", "wp"] {
            std::fs::create_dir(root.path().join(n)).unwrap();
        }
        let d = build(&cfg, &alloc, cgroup_resolver(root.path().to_path_buf()));
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(root.path().join("a")).unwrap().ino();
        assert_eq!(d.enrolled.keys().copied().collect::<Vec<_>>(), [ino]);
        assert_eq!(d.enrolled[&ino].flags, 0, "dnsCapture: false");
        let w = d.workload(d.enrolled[&ino].workload_id).unwrap();
        assert_eq!(
            (w.name.as_str(), w.service_account.as_str(), w.cgroup_id),
            ("a", "default", Some(ino))
        );
        let b = d.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(b.identity, "spiffe://cluster.local/ns/other/sa/bee");
        assert_eq!(b.cgroup_id, None);
    }

    #[test]
    fn a_pod_label_overrides_its_namespace_and_every_listed_cgroup_is_enrolled() {
        let files = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: amb\n  labels: {istio.io/dataplane-mode: ambient}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: in\n  namespace: plain\n  labels: {istio.io/dataplane-mode: ambient}\n  annotations: {shunt.io/cgroup: 'p/c1,p/c2'}\nspec: {address: 10.0.0.1}\n---\n\
            apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: out\n  namespace: amb\n  labels: {istio.io/dataplane-mode: none}\n  annotations: {shunt.io/cgroup: q}\nspec: {address: 10.0.0.2}\n";
        let cfg = load(&[("a.yaml", files)]);
        let state = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(state.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        let root = tempfile::tempdir().unwrap();
        for n in ["p/c1", "p/c2", "q"] {
            std::fs::create_dir_all(root.path().join(n)).unwrap();
        }
        let d = build(&cfg, &alloc, cgroup_resolver(root.path().to_path_buf()));
        use std::os::unix::fs::MetadataExt;
        let ino = |n: &str| std::fs::metadata(root.path().join(n)).unwrap().ino();
        let mut want = vec![ino("p/c1"), ino("p/c2")];
        want.sort();
        assert_eq!(d.enrolled.keys().copied().collect::<Vec<_>>(), want);
        let ids: Vec<u32> = d.enrolled.values().map(|e| e.workload_id).collect();
        assert_eq!(ids[0], ids[1], "one workload for both containers");
        assert_eq!(d.workload(ids[0]).unwrap().name, "in");
    }

    #[test]
    fn status_clock_keeps_times_until_the_condition_changes() {
        let cfg = Config::load_dir(&seed_dir()).unwrap();
        let state = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(state.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        let mut st = build(&cfg, &alloc, no_cgroups).status;
        let mut clock = StatusClock::default();
        assert!(clock.stamp(&mut st, "2024-10-27T00:45:08.374915129Z"));
        clock.save(state.path()).unwrap();
        let mut again = build(&cfg, &alloc, no_cgroups).status;
        let mut clock = StatusClock::load(state.path());
        assert!(!clock.stamp(&mut again, "2030-01-01T00:00:00Z"));
        let k = ObjectKey::new("common-infrastructure", "httpbin.org");
        assert_eq!(
            again[&k].conditions[0].last_transition_time.as_deref(),
            Some("2024-10-27T00:45:08.374915129Z")
        );
        // Unbinding changes the condition, so the time moves.
        let mut changed = again.clone();
        changed.get_mut(&k).unwrap().conditions[0].status = "False".into();
        assert!(clock.stamp(&mut changed, "2030-01-01T00:00:00Z"));
        assert_eq!(
            changed[&k].conditions[0].last_transition_time.as_deref(),
            Some("2030-01-01T00:00:00Z")
        );
        assert!(now_rfc3339().ends_with('Z'));
    }
}

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
    v4_mapped, EnrolledValue, Meta, ServiceKey, ServiceValue, EGRESS_ALLOW_ANY,
    EGRESS_REGISTRY_ONLY, ENR_F_DNS_CAPTURE, LAYOUT_VERSION, SVC_F_HTTP, SVC_F_WAYPOINT,
};

use crate::alloc::Allocation;
use crate::config::render::{ServiceEntryStatus, StatusAddress, StatusCondition, WAYPOINT_BOUND};
use crate::config::{
    labels, ClientTls, Config, Location, ObjectKey, OutboundMode, Protocol, Resolution,
    ServiceEntry, WaypointRef,
};

const IPPROTO_TCP: u8 = 6;

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
    /// Resolved cgroup id when the workload is enrolled.
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
    /// Value of the `meta` map.
    pub meta: Meta,
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

/// 16-byte map form: IPv4 as IPv4-mapped.
pub fn map_addr(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(a) => v4_mapped(a.octets()),
        IpAddr::V6(a) => a.octets(),
    }
}

pub fn service_key(ip: IpAddr, port: u16) -> ServiceKey {
    ServiceKey {
        addr: map_addr(ip),
        port,
        proto: IPPROTO_TCP,
        _pad: 0,
    }
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
        meta: Meta {
            layout_version: LAYOUT_VERSION,
            egress_mode: match cfg.mesh.outbound_traffic_policy.mode {
                OutboundMode::AllowAny => EGRESS_ALLOW_ANY,
                OutboundMode::RegistryOnly => EGRESS_REGISTRY_ONLY,
            },
        },
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
            .map(|w| (map_addr(w.addr.ip()), w.addr.port()))
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
            if !cfg.namespace_is_ambient(we.namespace()) {
                // Not in the mesh: table entry only.
            } else if is_waypoint_pod(we.namespace(), &merged) {
                d.warnings
                    .push(format!("WorkloadEntry {key}: a waypoint, never enrolled"));
            } else {
                match cgroup_id(cg) {
                    Some(cid) => match d.enrolled.entry(cid) {
                        std::collections::btree_map::Entry::Vacant(e) => {
                            e.insert(EnrolledValue {
                                workload_id: id,
                                flags: dns,
                            });
                            cgroup = Some(cid);
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

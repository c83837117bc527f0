//! ServiceEntries resolved: their VIPs (with the host each belongs to),
//! ports, endpoints, waypoint binding and TLS origination, plus Istio's
//! rules for which entries get auto-allocated addresses and which
//! DestinationRule applies to a host.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use crate::config::{
    labels, ClientTls, Config, DestinationRule, Location, ObjectKey, Protocol, Resolution,
    ServiceEntry, TlsMode, WorkloadEntry,
};

use super::host;
use super::mesh::Mesh;
use super::visibility::ExportTo;
use super::waypoint::WaypointBinding;
use super::{Kind, Warning};

/// A stable id from the allocation (the `services` map value's `service_id`).
pub type ServiceId = u32;

/// One address of a service and the host it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub ip: IpAddr,
    /// The host this VIP was allocated for, as its index in the service's
    /// `hosts` ([`Service::vip_host`]; not a copy of the name); explicit
    /// `spec.addresses` stand for the entry's first host (SNI, Host
    /// default, `destination_service`).
    pub host: u32,
    /// Auto-allocated (shown in `status.addresses`) or explicit.
    pub allocated: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub number: u16,
    pub target_port: u16,
    pub protocol: Protocol,
    /// `protocol` was written in the entry (not inferred from the name), so
    /// the waypoint never upgrades the port to HTTP on its own.
    pub declared: bool,
    pub name: String,
}

impl ServicePort {
    /// Only TCP ports are steered; UDP to a VIP is dropped by the kernel.
    pub fn is_tcp(&self) -> bool {
        self.protocol != Protocol::Udp
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    pub ports: BTreeMap<String, u16>,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
}

/// Where connections for one (host, port) of a service go, from its
/// `resolution` and `endpoints`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// `resolution: DNS`: names (the host, or endpoint addresses) looked up
    /// with the system resolver at connect time, so /etc/hosts applies.
    Dns(Vec<(String, u16)>),
    /// `resolution: STATIC`: endpoint addresses.
    Static(Vec<SocketAddr>),
    /// `resolution: NONE`: the client's original destination (with the
    /// target port).
    Original,
    /// `resolution: DYNAMIC_DNS` (wildcard hosts): the concrete name the
    /// client sent (SNI or Host), checked against the wildcard and looked
    /// up by the waypoint itself, on the target port.
    Dynamic,
}

/// Everything the agent, the waypoint and the CLI need about one
/// ServiceEntry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    pub key: ObjectKey,
    /// Boxed slices here (16 bytes, no spare capacity, against a `Vec`'s
    /// 24): with them a `Service` fits mimalloc's 256-byte class.
    pub hosts: Box<[String]>,
    /// Auto-allocated VIPs (host order, IPv4 first), then explicit
    /// single-IP `spec.addresses`.
    pub vips: Vec<Vip>,
    pub ports: Box<[ServicePort]>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Box<[Endpoint]>,
    pub subject_alt_names: Box<[String]>,
    /// Namespaces that see this entry (DNS answers, connects).
    pub export_to: ExportTo,
    /// Endpoints come from `workloadSelector` (matching WorkloadEntries).
    pub selects_workloads: bool,
    pub waypoint: WaypointBinding,
    /// TLS origination per (host, port) from DestinationRules, with the
    /// entry's `subjectAltNames` where the rule names none. A `BTreeMap`:
    /// empty for most services, and 24 bytes against a `HashMap`'s 48.
    tls: BTreeMap<(String, u16), ClientTls>,
}

impl Service {
    pub fn namespace(&self) -> &str {
        &self.key.namespace
    }
    pub fn name(&self) -> &str {
        &self.key.name
    }
    pub fn port(&self, number: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.number == number)
    }
    /// The entry's first host (`destination_service` in logs).
    pub fn first_host(&self) -> Option<&str> {
        self.hosts.first().map(String::as_str)
    }
    /// The host a VIP stands for.
    pub fn host_of(&self, ip: IpAddr) -> Option<&str> {
        let ip = ip.to_canonical();
        self.vips
            .iter()
            .find(|v| v.ip == ip)
            .map(|v| self.vip_host(v))
    }
    /// The host one of its VIPs stands for.
    pub fn vip_host(&self, v: &Vip) -> &str {
        &self.hosts[v.host as usize]
    }
    /// The DestinationRule TLS settings for (host, port), if any.
    pub fn tls_for(&self, host: &str, port: u16) -> Option<&ClientTls> {
        // Most services have none: no key string made for them.
        if self.tls.is_empty() {
            return None;
        }
        self.tls.get(&(host.to_string(), port))
    }

    /// Whether any (host, port) has DestinationRule TLS settings.
    pub fn has_tls(&self) -> bool {
        !self.tls.is_empty()
    }

    /// Whether the upstream is found from the host name itself (DNS
    /// without endpoints), so that a client naming another host of the
    /// entry would reach another server.
    pub fn destination_derives_from_host(&self) -> bool {
        match self.resolution {
            Resolution::Dns | Resolution::DnsRoundRobin => {
                self.endpoints.is_empty() && !self.selects_workloads
            }
            Resolution::DynamicDns => true,
            Resolution::None | Resolution::Static => false,
        }
    }

    /// Where connections to `host`:`port` go.
    pub fn destination(&self, host: &str, port: &ServicePort) -> Result<Destination, String> {
        let endpoint_port =
            |e: &Endpoint| e.ports.get(&port.name).copied().unwrap_or(port.target_port);
        match self.resolution {
            Resolution::None => Ok(Destination::Original),
            Resolution::DynamicDns => Ok(Destination::Dynamic),
            Resolution::Static => {
                let mut addrs = Vec::new();
                for e in &self.endpoints {
                    let ip: IpAddr = e.address.parse().map_err(|_| {
                        format!(
                            "resolution STATIC needs IP endpoints, got address {:?}",
                            e.address
                        )
                    })?;
                    addrs.push(SocketAddr::new(ip, endpoint_port(e)));
                }
                // A workloadSelector matching nothing is a service without
                // endpoints (connections fail), not a broken config.
                if addrs.is_empty() && !self.selects_workloads {
                    return Err("resolution STATIC without endpoints".into());
                }
                Ok(Destination::Static(addrs))
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                // A workloadSelector's endpoints stand in for the host,
                // even when it selects none.
                if self.endpoints.is_empty() && !self.selects_workloads {
                    Ok(Destination::Dns(vec![(host.to_string(), port.target_port)]))
                } else {
                    Ok(Destination::Dns(
                        self.endpoints
                            .iter()
                            .map(|e| (e.address.clone(), endpoint_port(e)))
                            .collect(),
                    ))
                }
            }
        }
    }
}

/// Why Istio would not auto-allocate addresses for an entry; `None`: it
/// would.
pub fn no_auto_allocation_reason(se: &ServiceEntry) -> Option<&'static str> {
    if se.spec.resolution() == Resolution::None {
        Some("resolution NONE: Istio allocates no address")
    } else if !se.spec.addresses.is_empty() {
        Some("spec.addresses is set: those addresses are used")
    } else if se.label(labels::AUTOALLOCATE) == Some("false") {
        Some("label networking.istio.io/enable-autoallocate-ip is \"false\"")
    } else if se.spec.resolution() != Resolution::DynamicDns
        && se.spec.hosts.iter().any(|h| host::is_wildcard(h))
    {
        Some("a wildcard host without resolution DYNAMIC_DNS: Istio allocates no address")
    } else {
        None
    }
}

/// Whether Istio would auto-allocate addresses for this entry.
pub fn eligible(se: &ServiceEntry) -> bool {
    no_auto_allocation_reason(se).is_none()
}

/// Explicit `spec.addresses` that are single IPs (a CIDR is a range, not a
/// VIP).
pub(super) fn explicit_ips(se: &ServiceEntry) -> impl Iterator<Item = IpAddr> + '_ {
    se.spec.addresses.iter().filter_map(|a| {
        a.parse::<IpAddr>().ok().or_else(|| {
            a.parse::<ipnet::IpNet>()
                .ok()
                .filter(|n| n.prefix_len() == n.max_prefix_len())
                .map(|n| n.addr())
        })
    })
}

/// Istio's rule for which DestinationRule applies to `host` of a service in
/// namespace `se_ns`, for a proxy in namespace `proxy_ns` (for shunt, the
/// waypoint that originates TLS; `pilot/pkg/model` push context):
/// 1. rules in the proxy's namespace visible there (`exportTo` empty, `*`,
///    `.` or that namespace) — in the root namespace, only its private ones;
/// 2. rules exported from the service's namespace to the proxy's;
/// 3. rules exported from the root namespace to the proxy's.
///
/// Within one step the most specific host wins (exact, then the longest
/// wildcard); among rules for the same host the oldest with a
/// `trafficPolicy`, as Istio's merge keeps the first one set.
pub fn destination_rule<'a>(
    cfg: &'a Config,
    mesh: &Mesh,
    proxy_ns: &str,
    se_ns: &str,
    host: &str,
) -> Option<&'a DestinationRule> {
    let root = mesh.root_namespace.as_str();
    let defaults = &mesh.default_destination_rule_export_to;
    let private_only = |d: &DestinationRule| {
        let l = &d.spec.export_to;
        (l.is_empty() && defaults.iter().any(|e| e == "."))
            || (l.len() == 1 && (l[0] == "." || l[0] == d.namespace()))
    };
    let local = |d: &DestinationRule| {
        let l = &d.spec.export_to;
        l.is_empty() || l.iter().any(|e| e == "*" || e == "." || e == d.namespace())
    };
    let exported = |d: &DestinationRule| {
        let l = &d.spec.export_to;
        !private_only(d) && (l.is_empty() || l.iter().any(|e| e == "*" || e == proxy_ns))
    };
    let pick = |ns: &str, ok: &dyn Fn(&DestinationRule) -> bool| {
        let mut c: Vec<&DestinationRule> = cfg
            .destination_rules
            .iter()
            .map(|d| &**d)
            .filter(|d| d.namespace() == ns && host::matches(&d.spec.host, host) && ok(d))
            .collect();
        // Exact first, then longer (more specific) wildcards; oldest first.
        c.sort_by_key(|d| {
            (
                host::is_wildcard(&d.spec.host),
                std::cmp::Reverse(d.spec.host.len()),
                d.age_key(),
            )
        });
        let best = c.first()?.spec.host.as_str();
        c.iter()
            .filter(|d| d.spec.host.eq_ignore_ascii_case(best))
            .find(|d| d.spec.traffic_policy.is_some())
            .or(c.first())
            .copied()
    };
    let first = if proxy_ns != root {
        pick(proxy_ns, &local)
    } else {
        pick(root, &private_only)
    };
    first
        .or_else(|| pick(se_ns, &exported))
        .or_else(|| pick(root, &exported))
}

/// Whether `dr` can give any service TLS settings (see [`tls_of`]): a
/// config without such a rule has no service with TLS.
pub fn sets_tls(dr: &DestinationRule) -> bool {
    dr.spec.traffic_policy.as_ref().is_some_and(|tp| {
        tp.tls.is_some() || tp.port_level_settings.iter().any(|pl| pl.tls.is_some())
    })
}

/// TLS settings of the applicable DestinationRule for (host, port):
/// port-level settings override the rule's default.
fn tls_of(dr: &DestinationRule, port: u16) -> Option<ClientTls> {
    let tp = dr.spec.traffic_policy.as_ref()?;
    tp.port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().is_some_and(|p| p.number.0 == port))
        .and_then(|pl| pl.tls.clone())
        .or_else(|| tp.tls.clone())
}

/// WorkloadEntries of the entry's namespace whose labels (spec labels over
/// metadata labels, as for enrollment) include every selector label.
pub(super) fn selected<'a>(
    cfg: &'a Config,
    se: &'a ServiceEntry,
) -> impl Iterator<Item = &'a WorkloadEntry> + 'a {
    let sel = se.spec.workload_selector.as_ref();
    cfg.workload_entries
        .iter()
        .map(|we| &**we)
        .filter(move |we| {
            let Some(sel) = sel else { return false };
            we.namespace() == se.namespace()
                && sel.labels.iter().all(|(k, v)| {
                    we.spec.labels.get(k).or_else(|| we.metadata.labels.get(k)) == Some(v)
                })
        })
}

/// Builds one service (VIPs given by the caller from the allocation);
/// what it cannot honour goes to `warnings`.
#[allow(clippy::too_many_arguments)] // one call site, every input distinct
pub(super) fn resolve(
    cfg: &Config,
    mesh: &Mesh,
    se: &ServiceEntry,
    key: ObjectKey,
    id: ServiceId,
    vips: Vec<Vip>,
    waypoint: WaypointBinding,
    warnings: &mut Vec<Warning>,
) -> Service {
    let ports: Vec<ServicePort> = se
        .spec
        .ports
        .iter()
        .map(|p| ServicePort {
            number: p.number.0,
            target_port: p.target_port(),
            protocol: p.protocol(),
            declared: p.protocol.is_some(),
            name: p.name.clone(),
        })
        .collect();
    // The proxy that applies DestinationRules is the waypoint; without one
    // nothing originates TLS (the rule is reported below).
    let proxy_ns = waypoint
        .waypoint()
        .map_or(se.namespace(), |w| w.gateway.namespace.as_str());
    let mut tls = BTreeMap::new();
    let mut unapplied: Vec<ObjectKey> = Vec::new();
    // Without DestinationRules there is nothing to look up per host and port.
    let hosts = if cfg.destination_rules.is_empty() {
        &[][..]
    } else {
        &se.spec.hosts[..]
    };
    for h in hosts {
        for p in &ports {
            let Some(dr) = destination_rule(cfg, mesh, proxy_ns, se.namespace(), h) else {
                continue;
            };
            let Some(mut t) = tls_of(dr, p.number) else {
                continue;
            };
            if !waypoint.required() {
                if t.mode != TlsMode::Disable && !unapplied.contains(&dr.key()) {
                    unapplied.push(dr.key());
                }
                continue;
            }
            // Istio: an external service's subjectAltNames verify the
            // upstream's certificate when the rule names none.
            if matches!(t.mode, TlsMode::Simple | TlsMode::Mutual) && t.subject_alt_names.is_empty()
            {
                t.subject_alt_names = se.spec.subject_alt_names.to_vec();
            }
            tls.insert((h.clone(), p.number), t);
        }
    }
    for dr in unapplied {
        warnings.push(Warning {
            kind: Kind::DestinationRule,
            object: dr,
            field: Some("spec.trafficPolicy.tls".into()),
            message: format!(
                "not applied to ServiceEntry {key}: it has no waypoint, and shunt originates TLS only at a waypoint (the client's connection goes out as it is)"
            ),
        });
    }
    let originates = tls
        .values()
        .any(|t| matches!(t.mode, TlsMode::Simple | TlsMode::Mutual));
    if !se.spec.subject_alt_names.is_empty() && !originates {
        warnings.push(Warning {
            kind: Kind::ServiceEntry,
            object: key.clone(),
            field: Some("spec.subjectAltNames".into()),
            message: "not checked: shunt verifies the upstream's certificate only where the waypoint originates TLS (DestinationRule tls mode SIMPLE or MUTUAL); no port of this entry does".into(),
        });
    }
    let selects_workloads = se.spec.workload_selector.is_some();
    let endpoints: Vec<Endpoint> = if selects_workloads {
        let res = se.spec.resolution();
        selected(cfg, se)
            .filter(|we| {
                let ip = we.spec.address.parse::<IpAddr>().is_ok();
                if res == Resolution::Static && !ip {
                    warnings.push(Warning {
                        kind: Kind::ServiceEntry,
                        object: key.clone(),
                        field: Some("spec.workloadSelector".into()),
                        message: format!(
                            "selected WorkloadEntry {} has address {:?}, not an IP: skipped (resolution STATIC)",
                            we.key(),
                            we.spec.address
                        ),
                    });
                }
                !we.spec.address.is_empty() && (ip || res != Resolution::Static)
            })
            .map(|we| endpoint_of(&we.spec))
            .collect()
    } else {
        se.spec.endpoints.iter().map(endpoint_of).collect()
    };
    Service {
        id,
        key,
        hosts: se.spec.hosts.clone(),
        vips,
        ports: ports.into(),
        resolution: se.spec.resolution(),
        location: se.spec.location.unwrap_or(Location::MeshExternal),
        endpoints: endpoints.into(),
        subject_alt_names: se.spec.subject_alt_names.clone(),
        export_to: ExportTo::resolve(
            &se.spec.export_to,
            se.namespace(),
            &mesh.default_service_export_to,
        ),
        selects_workloads,
        waypoint,
        tls,
    }
}

fn endpoint_of(e: &crate::config::WorkloadEntrySpec) -> Endpoint {
    Endpoint {
        address: e.address.clone(),
        ports: e.ports.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        labels: e.labels.clone(),
        service_account: e.service_account().to_string(),
    }
}

//! ServiceEntries resolved: their VIPs (with the host each belongs to),
//! ports, endpoints, waypoint binding and TLS origination, plus Istio's
//! rules for which entries get auto-allocated addresses and which
//! DestinationRule applies to a host.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};

use crate::config::{
    labels, ClientTls, Config, Location, ObjectKey, Protocol, Resolution, ServiceEntry,
};

use super::host;
use super::waypoint::WaypointBinding;

/// A stable id from the allocation (the `services` map value's `service_id`).
pub type ServiceId = u32;

/// One address of a service and the host it stands for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vip {
    pub ip: IpAddr,
    /// The host this VIP was allocated for; explicit `spec.addresses` stand
    /// for the entry's first host (SNI, Host default, `destination_service`).
    pub host: String,
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
}

/// Everything the agent, the waypoint and the CLI need about one
/// ServiceEntry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    pub id: ServiceId,
    pub key: ObjectKey,
    pub hosts: Vec<String>,
    /// Auto-allocated VIPs (host order, IPv4 first), then explicit
    /// single-IP `spec.addresses`.
    pub vips: Vec<Vip>,
    pub ports: Vec<ServicePort>,
    pub resolution: Resolution,
    pub location: Location,
    pub endpoints: Vec<Endpoint>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: WaypointBinding,
    /// TLS origination per (host, port) from DestinationRules.
    tls: HashMap<(String, u16), ClientTls>,
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
            .map(|v| v.host.as_str())
    }
    /// The DestinationRule TLS settings for (host, port), if any.
    pub fn tls_for(&self, host: &str, port: u16) -> Option<&ClientTls> {
        self.tls.get(&(host.to_string(), port))
    }

    /// Whether the upstream is found from the host name itself (DNS
    /// without endpoints), so that a client naming another host of the
    /// entry would reach another server.
    pub fn destination_derives_from_host(&self) -> bool {
        matches!(self.resolution, Resolution::Dns | Resolution::DnsRoundRobin)
            && self.endpoints.is_empty()
    }

    /// Where connections to `host`:`port` go.
    pub fn destination(&self, host: &str, port: &ServicePort) -> Result<Destination, String> {
        let endpoint_port =
            |e: &Endpoint| e.ports.get(&port.name).copied().unwrap_or(port.target_port);
        match self.resolution {
            Resolution::None => Ok(Destination::Original),
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
                if addrs.is_empty() {
                    return Err("resolution STATIC without endpoints".into());
                }
                Ok(Destination::Static(addrs))
            }
            Resolution::Dns | Resolution::DnsRoundRobin => {
                if self.endpoints.is_empty() {
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
    } else if se.spec.hosts.iter().any(|h| host::is_wildcard(h)) {
        Some("a wildcard host: Istio allocates no address")
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

/// TLS settings of the DestinationRules for `host`: an exact host before a
/// wildcard one; among equals the entry's own namespace first, then any
/// other, in directory order. Port-level settings override the rule's
/// default.
fn tls_for(cfg: &Config, se: &ServiceEntry, host: &str, port: u16) -> Option<ClientTls> {
    let in_order = || {
        let same = cfg
            .destination_rules
            .iter()
            .filter(|d| d.namespace() == se.namespace());
        let other = cfg
            .destination_rules
            .iter()
            .filter(|d| d.namespace() != se.namespace());
        same.chain(other)
            .filter(|d| host::matches(&d.spec.host, host))
    };
    let dr = in_order()
        .find(|d| !host::is_wildcard(&d.spec.host))
        .or_else(|| in_order().next())?;
    let tp = dr.spec.traffic_policy.as_ref()?;
    tp.port_level_settings
        .iter()
        .find(|pl| pl.port.as_ref().is_some_and(|p| p.number.0 == port))
        .and_then(|pl| pl.tls.clone())
        .or_else(|| tp.tls.clone())
}

/// Builds one service (VIPs given by the caller from the allocation).
pub(super) fn resolve(
    cfg: &Config,
    se: &ServiceEntry,
    id: ServiceId,
    vips: Vec<Vip>,
    waypoint: WaypointBinding,
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
    let mut tls = HashMap::new();
    for h in &se.spec.hosts {
        for p in &ports {
            if let Some(t) = tls_for(cfg, se, h, p.number) {
                tls.insert((h.clone(), p.number), t);
            }
        }
    }
    Service {
        id,
        key: se.key(),
        hosts: se.spec.hosts.clone(),
        vips,
        ports,
        resolution: se.spec.resolution(),
        location: se.spec.location.unwrap_or(Location::MeshExternal),
        endpoints: se
            .spec
            .endpoints
            .iter()
            .map(|e| Endpoint {
                address: e.address.clone(),
                ports: e.ports.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
                labels: e.labels.clone(),
                service_account: e.service_account().to_string(),
            })
            .collect(),
        subject_alt_names: se.spec.subject_alt_names.clone(),
        waypoint,
        tls,
    }
}

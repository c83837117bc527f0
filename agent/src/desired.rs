//! The kernel projection of the model: the exact content of the `services`
//! and `enrolled` maps, the `egress_allow` prefixes and the `meta` value.
//! Pure; the only code that turns Istio concepts into map entries.

use std::collections::BTreeMap;

use shunt_common::{
    EnrolledValue, Meta, ServiceKey, ServiceValue, EGRESS_ALLOW_ANY, EGRESS_REGISTRY_ONLY,
    ENR_F_DNS_CAPTURE, LAYOUT_VERSION, SVC_F_HTTP, SVC_F_WAYPOINT,
};

use crate::model::{EgressMode, Model, WaypointBinding};

/// Where the agent's DNS proxy listens (its flags), for `meta`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DnsTarget {
    pub port: u16,
    pub addr4: [u8; 4],
    pub addr6: [u8; 16],
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
}

/// The `meta` value: the one place it is assembled.
pub fn meta(egress: EgressMode, dns: Option<DnsTarget>) -> Meta {
    let dns = dns.unwrap_or_default();
    Meta {
        layout_version: LAYOUT_VERSION,
        egress_mode: match egress {
            EgressMode::AllowAny => EGRESS_ALLOW_ANY,
            EgressMode::RegistryOnly => EGRESS_REGISTRY_ONLY,
        },
        dns_port: dns.port,
        dns_addr4: dns.addr4,
        dns_addr6: dns.addr6,
        ..Default::default()
    }
}

/// The `services` key of a TCP VIP:port.
pub fn service_key(at: std::net::SocketAddr) -> ServiceKey {
    crate::maps::tcp_key(at)
}

/// Projects the model onto the maps. `dns` is where the proxy listens
/// (`None`: DNS capture is off in the agent).
pub fn project(model: &Model, dns: Option<DnsTarget>) -> Desired {
    let mut services = BTreeMap::new();
    for (at, svc) in model.vip_ports() {
        let Some(port) = svc.port(at.port()) else {
            continue;
        };
        let mut flags = 0;
        // A refused binding still needs a waypoint: the flag tells the
        // kernel's readers (and `shunt maps`) this VIP is never direct.
        if svc.waypoint.required() {
            flags |= SVC_F_WAYPOINT;
        }
        if port.protocol.is_http() {
            flags |= SVC_F_HTTP;
        }
        let (waypoint_addr, waypoint_port) = match &svc.waypoint {
            WaypointBinding::Bound(w) => (crate::maps::addr_bytes(w.addr.ip()), w.addr.port()),
            _ => ([0; 16], 0),
        };
        services.insert(
            service_key(at),
            ServiceValue {
                service_id: svc.id,
                flags,
                waypoint_addr,
                waypoint_port,
                target_port: port.target_port,
                _pad: [0; 4],
            },
        );
    }
    let dns_flag = if model.mesh.dns_capture {
        ENR_F_DNS_CAPTURE
    } else {
        0
    };
    let enrolled = model
        .enrolled()
        .map(|(cgroup, w)| {
            (
                cgroup,
                EnrolledValue {
                    workload_id: w.id,
                    flags: dns_flag,
                },
            )
        })
        .collect();
    Desired {
        services,
        enrolled,
        meta: meta(model.mesh.egress, dns),
        allowed_egress: model.mesh.allowed_egress.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::model::{tests::model_of, tests::seed_dir, NoCgroups};
    use shunt_common::v4_mapped;

    fn at(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_seed_projects_two_waypoint_entries_and_one_enrolled_cgroup() {
        let cfg = Arc::new(Config::load_dir(&seed_dir()).unwrap());
        let (m, _) = model_of(&cfg, &|cg: &str| (cg == "shunt/curl").then_some(1001));
        let d = project(&m, None);
        assert_eq!(d.services.len(), 2);
        let v = d.services[&service_key(at("240.240.0.1:80"))];
        assert_eq!(v.flags, SVC_F_WAYPOINT | SVC_F_HTTP);
        assert_eq!(v.waypoint_addr, v4_mapped([10, 244, 1, 18]));
        assert_eq!(v.waypoint_port, 15008);
        assert_eq!(v.target_port, 80);
        assert_eq!(d.services[&service_key(at("[2001:2::1]:80"))], v);
        assert_eq!(d.enrolled.len(), 1);
        assert_eq!(d.enrolled[&1001].flags, ENR_F_DNS_CAPTURE);
        assert_eq!(d.meta.egress_mode, EGRESS_ALLOW_ANY);
        assert_eq!(d.meta.layout_version, LAYOUT_VERSION);
        assert_eq!(d.meta.dns_port, 0);
    }

    #[test]
    fn an_unbindable_waypoint_keeps_the_waypoint_flag_without_an_address() {
        let cfg = Arc::new({
            let d = tempfile::tempdir().unwrap();
            std::fs::write(d.path().join("a.yaml"), "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: s\n  namespace: ns\n  labels: {istio.io/use-waypoint: missing}\nspec:\n  hosts: [s.example]\n  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n  resolution: DNS\n").unwrap();
            Config::load_dir(d.path()).unwrap()
        });
        let (m, _) = model_of(&cfg, &NoCgroups);
        let d = project(&m, None);
        let (_, v) = d.services.iter().next().unwrap();
        assert_eq!(
            (v.flags, v.waypoint_addr, v.waypoint_port, v.target_port),
            (SVC_F_WAYPOINT | SVC_F_HTTP, [0; 16], 0, 8080)
        );
    }

    #[test]
    fn meta_carries_the_dns_proxy_and_the_egress_mode() {
        let m = meta(
            EgressMode::RegistryOnly,
            Some(DnsTarget {
                port: 53,
                addr4: [169, 254, 20, 10],
                addr6: [0; 16],
            }),
        );
        assert_eq!(
            (m.egress_mode, m.dns_port, m.dns_addr4),
            (EGRESS_REGISTRY_ONLY, 53, [169, 254, 20, 10])
        );
    }
}

//! Fields shunt accepts (Istio's documented examples use them) but does not
//! act on: each one set in the config becomes a [`Warning`] naming it, so
//! that nothing is accepted and silently ignored. Fields shunt honours are
//! not listed here; fields it cannot honour safely are refused at load.

use crate::config::{Config, Location, ObjectKey, ServiceEntry, TrafficPolicy, WorkloadEntrySpec};

use super::{Kind, Warning};

/// MeshConfig fields the model reads (`mesh.rs`); any other is reported.
const MESH_FIELDS_READ: &[&str] = &[
    "rootNamespace",
    "defaultServiceExportTo",
    "defaultDestinationRuleExportTo",
];

/// The warnings for fields of one ServiceEntry set but not honoured, to
/// `out` (the model keeps them with the entry's other warnings).
pub(super) fn service_entry(se: &ServiceEntry, key: &ObjectKey, out: &mut Vec<Warning>) {
    let mut w = |kind, object: &ObjectKey, field: String, message: &str| {
        out.push(Warning {
            kind,
            object: object.clone(),
            field: Some(field),
            message: message.to_string(),
        })
    };
    {
        if se.spec.location != Some(Location::MeshInternal) && se.spec.endpoints.is_empty() {
            return;
        }
        let key = key.clone();
        if se.spec.location == Some(Location::MeshInternal) {
            w(
                Kind::ServiceEntry,
                &key,
                "spec.location".into(),
                "MESH_INTERNAL not honoured: shunt treats every entry as MESH_EXTERNAL (no automatic mutual TLS to its endpoints)",
            );
        }
        for (i, e) in se.spec.endpoints.iter().enumerate() {
            endpoint(
                &mut w,
                Kind::ServiceEntry,
                &key,
                &format!("spec.endpoints[{i}]"),
                e,
            );
            if !e.labels.is_empty() {
                w(
                    Kind::ServiceEntry,
                    &key,
                    format!("spec.endpoints[{i}].labels"),
                    "not used: Istio uses endpoint labels for DestinationRule subsets, which shunt does not support",
                );
            }
            if !e.service_account.is_empty() {
                w(
                    Kind::ServiceEntry,
                    &key,
                    format!("spec.endpoints[{i}].serviceAccount"),
                    "not used: Istio uses it to verify ISTIO_MUTUAL upstreams, which shunt does not originate",
                );
            }
        }
    }
}

/// Every warning for fields set but not honoured of the objects other
/// than ServiceEntries ([`service_entry`]), in config order.
pub(super) fn warnings(cfg: &Config) -> Vec<Warning> {
    let mut out = Vec::new();
    let mut w = |kind, object: &ObjectKey, field: String, message: &str| {
        out.push(Warning {
            kind,
            object: object.clone(),
            field: Some(field),
            message: message.to_string(),
        })
    };
    for we in &cfg.workload_entries {
        endpoint(&mut w, Kind::WorkloadEntry, &we.key(), "spec", &we.spec);
    }
    for dr in &cfg.destination_rules {
        let key = dr.key();
        if !dr.spec.subsets.is_empty() {
            w(
                Kind::DestinationRule,
                &key,
                "spec.subsets".into(),
                "not supported by shunt: no route selects a subset, so their settings never apply",
            );
        }
        if let Some(tp) = &dr.spec.traffic_policy {
            traffic_policy(&mut w, &key, "spec.trafficPolicy", tp);
        }
    }
    for gw in &cfg.gateways {
        let key = gw.key();
        if !gw.spec.is_waypoint() {
            w(
                Kind::Gateway,
                &key,
                "spec.gatewayClassName".into(),
                &format!(
                    "{:?} is not istio-waypoint: shunt serves only waypoints and ignores this Gateway",
                    gw.spec.gateway_class_name
                ),
            );
            continue;
        }
        for (i, l) in gw.spec.listeners.iter().enumerate() {
            let at = format!("spec.listeners[{i}]");
            if l.protocol != "HBONE" {
                w(
                    Kind::Gateway,
                    &key,
                    format!("{at}.protocol"),
                    &format!(
                        "listener {:?} ({}) not served: a shunt waypoint serves only its HBONE listener",
                        l.name, l.protocol
                    ),
                );
            }
            if l.allowed_routes.is_some() {
                w(
                    Kind::Gateway,
                    &key,
                    format!("{at}.allowedRoutes"),
                    "not used by shunt: the waypoint takes its services from istio.io/use-waypoint labels, not routes",
                );
            }
            for (name, set) in [("tls", l.tls.is_some()), ("hostname", l.hostname.is_some())] {
                if set {
                    w(
                        Kind::Gateway,
                        &key,
                        format!("{at}.{name}"),
                        "not used by shunt: its HBONE listener always speaks mutual TLS with mesh identities, for any host",
                    );
                }
            }
        }
        for (name, set) in [
            ("infrastructure", gw.spec.infrastructure.is_some()),
            ("allowedListeners", gw.spec.allowed_listeners.is_some()),
            ("backendTLS", gw.spec.backend_tls.is_some()),
        ] {
            if set {
                w(
                    Kind::Gateway,
                    &key,
                    format!("spec.{name}"),
                    "not used by shunt (it does not deploy waypoints or attach routes)",
                );
            }
        }
    }
    let mesh = ObjectKey::new("", "");
    if cfg.mesh.outbound_traffic_policy.egress_proxy.is_some() {
        w(
            Kind::MeshConfig,
            &mesh,
            "outboundTrafficPolicy.egressProxy".into(),
            "not supported by shunt: ALLOW_ANY traffic goes to its original destination",
        );
    }
    let other: Vec<&str> = cfg
        .mesh
        .other
        .keys()
        .map(String::as_str)
        .filter(|k| !MESH_FIELDS_READ.contains(k))
        .collect();
    if !other.is_empty() {
        w(
            Kind::MeshConfig,
            &mesh,
            other.join(", "),
            "not used by shunt",
        );
    }
    out
}

fn endpoint(
    w: &mut impl FnMut(Kind, &ObjectKey, String, &str),
    kind: Kind,
    key: &ObjectKey,
    at: &str,
    e: &WorkloadEntrySpec,
) {
    for (name, set) in [
        ("locality", !e.locality.is_empty()),
        ("weight", e.weight.is_some()),
        ("network", !e.network.is_empty()),
    ] {
        if set {
            w(
                kind,
                key,
                format!("{at}.{name}"),
                "not used by shunt: endpoints are tried in order, with no locality, weight or network awareness",
            );
        }
    }
}

fn traffic_policy(
    w: &mut impl FnMut(Kind, &ObjectKey, String, &str),
    key: &ObjectKey,
    at: &str,
    tp: &TrafficPolicy,
) {
    let msg = "not supported by shunt: only tls is applied (at the waypoint)";
    for (name, set) in [
        ("loadBalancer", tp.load_balancer.is_some()),
        ("connectionPool", tp.connection_pool.is_some()),
        ("outlierDetection", tp.outlier_detection.is_some()),
        ("tunnel", tp.tunnel.is_some()),
        ("proxyProtocol", tp.proxy_protocol.is_some()),
        ("retryBudget", tp.retry_budget.is_some()),
    ] {
        if set {
            w(Kind::DestinationRule, key, format!("{at}.{name}"), msg);
        }
    }
    for (i, pl) in tp.port_level_settings.iter().enumerate() {
        for (name, set) in [
            ("loadBalancer", pl.load_balancer.is_some()),
            ("connectionPool", pl.connection_pool.is_some()),
            ("outlierDetection", pl.outlier_detection.is_some()),
        ] {
            if set {
                w(
                    Kind::DestinationRule,
                    key,
                    format!("{at}.portLevelSettings[{i}].{name}"),
                    msg,
                );
            }
        }
    }
}

//! Waypoint binding, as Istio ambient decides it: a ServiceEntry asks for a
//! waypoint with `istio.io/use-waypoint` (its own label, else its
//! Namespace's; `none` opts out), naming a Gateway of class
//! `istio-waypoint` for service traffic. The binding is typed so that the
//! data path cannot confuse "asked for a waypoint that cannot be reached"
//! with "asked for none": the first is refused, only the second may be
//! connected directly.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::{labels, Config, ObjectKey, ServiceEntry, WaypointRef, WAYPOINT_CLASS};
use crate::identity::SpiffeId;

/// A waypoint the agent can reach: its Gateway, HBONE address and identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub gateway: ObjectKey,
    /// `spiffe://<td>/ns/<gw ns>/sa/<gw name>`: what its certificate must say.
    pub identity: SpiffeId,
    /// Address from `spec.addresses` (else `status.addresses`), HBONE
    /// listener port.
    pub addr: SocketAddr,
}

/// Why a service asked for a waypoint and cannot have it. The reasons are
/// the `istio.io/WaypointBound` condition's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unbindable {
    /// `WaypointNotFound`, `MissingAddress`, `UnsupportedTrafficType`, ...
    pub reason: &'static str,
    pub message: String,
}

/// The waypoint of one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WaypointBinding {
    /// No waypoint asked for: connected directly, as ztunnel does.
    None,
    Bound(Arc<Waypoint>),
    /// A waypoint was asked for but cannot be used: connections are refused,
    /// never carried around it.
    Refused(Unbindable),
}

impl WaypointBinding {
    pub fn waypoint(&self) -> Option<&Arc<Waypoint>> {
        match self {
            WaypointBinding::Bound(w) => Some(w),
            _ => None,
        }
    }

    /// Whether traffic must go through a waypoint (bound or refused).
    pub fn required(&self) -> bool {
        !matches!(self, WaypointBinding::None)
    }
}

/// Waypoints already bound while building one model, by Gateway: every
/// service bound to a waypoint shares its one `Arc` (100,000 entries made
/// as many copies of the same identity and address).
pub(super) type Bound = std::collections::HashMap<ObjectKey, Arc<Waypoint>>;

/// Resolves the waypoint a ServiceEntry asks for.
pub(super) fn bind(
    cfg: &Config,
    trust_domain: &str,
    se: &ServiceEntry,
    bound: &mut Bound,
) -> WaypointBinding {
    let WaypointRef::Gateway {
        gateway,
        from_namespace_label,
    } = cfg.waypoint_ref(se)
    else {
        return WaypointBinding::None;
    };
    if let Some(w) = bound.get(&gateway) {
        return WaypointBinding::Bound(w.clone());
    }
    let refuse = |reason, message| WaypointBinding::Refused(Unbindable { reason, message });
    let via = if from_namespace_label {
        format!("Namespace {}", se.namespace())
    } else {
        "ServiceEntry".to_string()
    };
    let Some(gw) = cfg.gateway(&gateway) else {
        return refuse(
            "WaypointNotFound",
            format!("waypoint {gateway} (from the {via} label) not found"),
        );
    };
    if !gw.spec.is_waypoint() {
        return refuse(
            "WaypointNotFound",
            format!(
                "Gateway {gateway} has gatewayClassName {:?}, not {WAYPOINT_CLASS:?}",
                gw.spec.gateway_class_name
            ),
        );
    }
    let for_ = gw.label(labels::WAYPOINT_FOR).unwrap_or("service");
    if for_ != "service" && for_ != "all" {
        return refuse(
            "UnsupportedTrafficType",
            format!("waypoint {gateway} is for {for_:?} traffic, not service traffic"),
        );
    }
    let Some(ip) = gw.waypoint_address() else {
        return refuse(
            "MissingAddress",
            format!("waypoint {gateway} has no IP address in spec.addresses or status.addresses"),
        );
    };
    match SpiffeId::new(trust_domain, &gateway.namespace, &gateway.name) {
        Ok(identity) => {
            let w = Arc::new(Waypoint {
                identity,
                addr: SocketAddr::new(ip, gw.spec.hbone_port()),
                gateway: gateway.clone(),
            });
            bound.insert(gateway, w.clone());
            WaypointBinding::Bound(w)
        }
        Err(e) => refuse(
            "InvalidIdentity",
            format!("waypoint {gateway} has no valid SPIFFE identity: {e}"),
        ),
    }
}

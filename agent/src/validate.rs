//! The one acceptance step over a built [`Model`], run by the agent's
//! reconciler, the waypoint's reload and `shunt config check` before any of
//! them applies anything: a config is refused whole (the previous one stays
//! in force) when its kernel projection does not fit the maps, or when a
//! waypoint bound in it could not build its routes (ISTIO_MUTUAL,
//! `credentialName`, non-IP STATIC endpoints, policies it cannot compile).
//! So the agent and the waypoint refuse the same configs, and `config
//! check` says so beforehand.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::kernel::projection::{self, Capacity, Projection};
use crate::model::{CowMap, Model};
use crate::policy::GatewayRef;
use crate::waypoint::WaypointError;
use shunt_common::{ServiceKey, ServiceValue};

/// One reason a config is refused.
#[derive(Debug)]
pub enum Rejection {
    /// More entries than a kernel map holds.
    Capacity {
        map: &'static str,
        entries: usize,
        limit: usize,
    },
    /// A waypoint of the config would refuse it.
    Waypoint {
        gateway: GatewayRef,
        error: WaypointError,
    },
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Capacity {
                map,
                entries,
                limit,
            } => write!(
                f,
                "the config needs {entries} entries in the kernel map `{map}`, which holds {limit}"
            ),
            Rejection::Waypoint { gateway, error } => write!(
                f,
                "waypoint {}/{} would refuse this config: {error}",
                gateway.namespace, gateway.name
            ),
        }
    }
}

/// Every reason, so one pass shows them all.
#[derive(Debug, thiserror::Error)]
#[error("config refused whole, the previous config stays in force: {}", join(.0))]
pub struct Rejected(pub Vec<Rejection>);

fn join(r: &[Rejection]) -> String {
    r.iter()
        .map(|r| r.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Counts of `p` against `limits`.
pub fn check_capacity(p: &Projection, limits: &Capacity) -> Vec<Rejection> {
    [
        ("services", p.services.len(), limits.services),
        ("enrolled", p.enrolled.len(), limits.enrolled),
        ("sources", p.sources.len(), limits.sources),
        ("egress_allow", p.egress_allow.len(), limits.egress_allow),
    ]
    .into_iter()
    .filter(|(_, n, limit)| n > limit)
    .map(|(map, entries, limit)| Rejection::Capacity {
        map,
        entries,
        limit,
    })
    .collect()
}

/// The projection as the agent would write it, for readers that do not
/// write maps (the waypoint, `config check`): each workload address one
/// `sources` entry, as the reconciler's route lookups give.
pub fn projection_of(model: &Model) -> Projection {
    projection_from(model, None)
}

/// [`projection_of`] with the services map patched from `prev`, that of
/// the model `model` was patched from (see [`projection::project_from`]).
pub fn projection_from(
    model: &Model,
    prev: Option<&CowMap<ServiceKey, ServiceValue>>,
) -> Projection {
    let oifs: HashMap<_, _> = model
        .workloads()
        .filter_map(|w| w.address)
        .map(|a| (a, 0))
        .collect();
    projection::project_from(model, None, projection::sources(&oifs), prev)
}

/// The waypoints (istio-waypoint Gateways) of the model's config.
pub fn waypoints(model: &Model) -> Vec<GatewayRef> {
    model
        .config()
        .gateways
        .iter()
        .filter(|g| g.spec.is_waypoint())
        .map(|g| GatewayRef {
            namespace: g.namespace().to_string(),
            name: g.name().to_string(),
        })
        .collect()
}

/// Capacity of `projection` (the agent's own, or [`projection_of`]) and
/// every waypoint's routes. A model patched from the model in force (see
/// [`Model::delta`]) has its routes checked for the services it resolved
/// again, and those with TLS settings (files to read again).
pub fn validate(
    model: &Arc<Model>,
    projection: &Projection,
    limits: &Capacity,
) -> Result<(), Rejected> {
    let mut out = check_capacity(projection, limits);
    for gateway in waypoints(model) {
        let changed = model.delta().map(|d| &d.services);
        if let Err(error) = crate::waypoint::check_changed_routes(model.clone(), &gateway, changed)
        {
            out.push(Rejection::Waypoint { gateway, error });
        }
    }
    if out.is_empty() {
        Ok(())
    } else {
        Err(Rejected(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::Allocator;
    use crate::model::NoCgroups;

    fn model(files: &[(&str, &str)]) -> Arc<Model> {
        let cfg = crate::alloc::tests::cfg(files);
        let dir = tempfile::tempdir().unwrap();
        let alloc = Allocator::open(dir.path())
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        Arc::new(Model::build(Arc::new(cfg), &alloc, &NoCgroups))
    }

    fn entries(n: usize) -> String {
        (0..n)
            .map(|i| crate::alloc::tests::se(&format!("e{i}"), &[&format!("h{i}.example")], ""))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    #[test]
    fn a_config_with_more_vip_ports_than_the_services_map_holds_is_refused_naming_counts_and_limit()
    {
        let m = model(&[("se.yaml", &entries(3))]);
        let p = projection_of(&m);
        let limits = Capacity {
            services: p.services.len() - 1,
            ..Capacity::KERNEL
        };
        let e = validate(&m, &p, &limits).unwrap_err().to_string();
        assert!(
            e.contains(&format!(
                "needs {} entries in the kernel map `services`, which holds {}",
                p.services.len(),
                p.services.len() - 1
            )),
            "{e}"
        );
        assert!(
            validate(&m, &p, &Capacity::KERNEL).is_ok(),
            "fits the real maps"
        );
    }

    #[test]
    fn exactly_full_maps_are_accepted() {
        let m = model(&[("se.yaml", &entries(2))]);
        let p = projection_of(&m);
        let limits = Capacity {
            services: p.services.len(),
            ..Capacity::KERNEL
        };
        assert!(validate(&m, &p, &limits).is_ok());
        assert!(!p.services.is_empty());
    }
}

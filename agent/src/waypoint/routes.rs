//! The waypoint's routes, built once per model: every VIP:port bound to
//! this waypoint resolved to its service, host, port mode (L4 or HTTP) and
//! upstream (destination, TLS connector, connection pool), with the
//! compiled policies, so that a tunnel or a request costs one hash lookup.
//! Everything Istio-specific comes from the [`Model`]; this file only
//! decides what the waypoint does with it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{ClientTls, ObjectKey, Protocol, TlsMode as DrTlsMode};
use crate::model::{self, CowMap, Model, Service, ServicePort};
use crate::policy::{BuildOptions, GatewayRef, PolicySet};
use crate::upstream::{OriginationSettings, TlsMode, UpstreamConnector};
use shunt_common::{ServiceKey, ServiceValue};

use super::pool::{IdleBudget, Upstream, UpstreamProtocol};
use super::WaypointError;

/// One VIP:port this waypoint serves.
#[derive(Debug)]
pub struct Target {
    pub service: Arc<Service>,
    /// The ServiceEntry host this VIP was allocated for (SNI, Host default,
    /// `destination_service`).
    pub host: String,
    pub port: ServicePort,
    /// Requests are parsed (HTTP port, or an unset protocol whose policies
    /// need HTTP fields); otherwise the tunnel is relayed as bytes.
    pub http: bool,
    pub upstream: Arc<Upstream>,
    /// Host patterns a client may name (SNI, Host) through this VIP: the
    /// VIP's own host when the destination is derived from it (DNS without
    /// endpoints, a wildcard resolved per name), else every host of the
    /// entry (the endpoints are the same whichever host is named).
    pub names: Vec<String>,
    /// Envoy's cluster name for the access log: `inbound-vip|80|http|host`.
    pub cluster: String,
}

impl Target {
    /// Whether a client may name `name` (its SNI or Host) through this
    /// VIP: a concrete DNS name matched by one of [`Target::names`]. A
    /// name holding a wildcard is never a destination.
    pub fn accepts_name(&self, name: &str) -> bool {
        !name.contains('*') && self.names.iter().any(|p| model::host::matches(p, name))
    }
}

/// Everything the waypoint derives from one model.
pub struct Routes {
    pub model: Arc<Model>,
    pub policies: PolicySet,
    /// Canonical VIP:port → target.
    pub targets: HashMap<SocketAddr, Arc<Target>>,
    /// VIPs of services bound to this waypoint (any port).
    pub vips: HashSet<IpAddr>,
    pub warnings: Vec<String>,
    /// Config digest and allocation generation, for `/config_dump`.
    pub digest: u64,
    /// The pooled upstream connections' cap, kept across reloads.
    pub idle_budget: Arc<IdleBudget>,
    /// The kernel `services` map the agent would write for `model`, once
    /// the reload's acceptance step computed it: the next reload patches
    /// it (a whole projection cost ~100 ms at 100,000 entries).
    pub projected: Option<CowMap<ServiceKey, ServiceValue>>,
}

impl std::fmt::Debug for Routes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routes")
            .field("digest", &self.digest)
            .field("targets", &self.targets.len())
            .finish()
    }
}

/// Build-time inputs that do not come from the model.
pub(crate) struct BuildInputs<'a> {
    pub gateway: &'a GatewayRef,
    pub connect_timeout: Duration,
    /// The previous routes: upstreams with identical settings are reused
    /// so that their pooled connections survive a reload (and its
    /// [`IdleBudget`] is kept).
    pub previous: Option<&'a Routes>,
    /// Without previous routes: the pooled connections' cap.
    pub idle_budget: Option<Arc<IdleBudget>>,
}

fn origination(
    tls: Option<&ClientTls>,
    http2: bool,
    what: &str,
) -> Result<OriginationSettings, WaypointError> {
    let Some(t) = tls else {
        return Ok(OriginationSettings::default());
    };
    let mode = match t.mode {
        DrTlsMode::Disable => TlsMode::Disable,
        DrTlsMode::Simple => TlsMode::Simple,
        DrTlsMode::Mutual => TlsMode::Mutual,
        DrTlsMode::IstioMutual => {
            return Err(WaypointError::Config(format!(
                "{what}: DestinationRule trafficPolicy.tls.mode ISTIO_MUTUAL is not supported for egress (use SIMPLE or MUTUAL)"
            )))
        }
    };
    if t.credential_name.is_some() {
        return Err(WaypointError::Config(format!(
            "{what}: DestinationRule trafficPolicy.tls.credentialName needs Kubernetes secrets; use caCertificates / clientCertificate / privateKey files"
        )));
    }
    Ok(OriginationSettings {
        mode,
        sni: t.sni.clone(),
        ca_certificates: t.ca_certificates.as_ref().map(Into::into),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
        client_certificate: t.client_certificate.as_ref().map(Into::into),
        private_key: t.private_key.as_ref().map(Into::into),
        http2,
    })
}

/// Whether a waypoint for `gateway` could build its routes from `model`,
/// without building them: the same policy compilation and, in the same
/// order as [`build`], every check that can fail there (destinations,
/// TLS origination it cannot do, unreadable CA or key files), so that
/// `shunt config check` and the agent refuse exactly what the waypoint
/// refuses. At 100,000 entries building the routes only to drop them cost
/// the agent as much as the waypoint's own build.
pub fn check(model: Arc<Model>, gateway: &GatewayRef) -> Result<(), WaypointError> {
    check_changed(model, gateway, None)
}

/// [`check`] of a model whose services outside `changed` passed it before
/// (unchanged, the same `Arc`s): those are skipped unless they have TLS
/// settings, whose files are read again.
pub fn check_changed(
    model: Arc<Model>,
    gateway: &GatewayRef,
    changed: Option<&std::collections::BTreeSet<model::ServiceId>>,
) -> Result<(), WaypointError> {
    let cfg = model.config();
    let metas: Vec<_> = cfg
        .authorization_policies
        .iter()
        .map(|p| (p.metadata.clone(), p.spec.clone()))
        .collect();
    PolicySet::build(
        &metas,
        &BuildOptions::for_config(cfg, Some(gateway.clone())),
    )
    .map_err(WaypointError::Policy)?;
    let connect_timeout = Duration::from_secs(10);
    let mut seen: HashSet<String> = HashSet::new();
    let key = ObjectKey::new(&gateway.namespace, &gateway.name);
    // Without a rule that sets TLS no unchanged service needs checking:
    // only the changed ones are looked at (a walk of every bound service
    // cost ~30 ms at 100,000 entries). Both walks are in service id order.
    let only_changed = changed.filter(|_| {
        !cfg.destination_rules
            .iter()
            .any(|dr| model::service::sets_tls(dr))
    });
    let services: Box<dyn Iterator<Item = &Arc<Service>>> = match only_changed {
        Some(c) => Box::new(
            c.iter()
                .filter_map(|id| model.service(*id))
                .filter(|s| s.waypoint.waypoint().is_some_and(|w| w.gateway == key)),
        ),
        None => Box::new(model.bound_to(&key)),
    };
    for svc in services {
        if changed.is_some_and(|c| !c.contains(&svc.id)) && !svc.has_tls() {
            continue;
        }
        for port in svc.ports.iter().filter(|p| p.is_tcp()) {
            for vip in &svc.vips {
                let host = svc.vip_host(vip);
                let what = || format!("ServiceEntry {} host {host} port {}", svc.key, port.number);
                let resolve = svc
                    .destination(host, port)
                    .map_err(|m| WaypointError::Config(format!("{}: {m}", what())))?;
                // Without TLS settings nothing below can fail.
                let Some(tls) = svc.tls_for(host, port.number) else {
                    continue;
                };
                let protocol = upstream_protocol(port);
                let ukey = upstream_key(host, port, &resolve, Some(tls), protocol, connect_timeout);
                if seen.insert(ukey) {
                    let what = what();
                    let settings =
                        origination(Some(tls), protocol == UpstreamProtocol::Http2, &what)?;
                    UpstreamConnector::new(&settings)
                        .map_err(|e| WaypointError::Config(format!("{what}: {e}")))?;
                }
            }
        }
    }
    Ok(())
}

fn upstream_protocol(port: &ServicePort) -> UpstreamProtocol {
    if matches!(port.protocol, Protocol::Http2 | Protocol::Grpc) {
        UpstreamProtocol::Http2
    } else {
        UpstreamProtocol::Http1
    }
}

/// Upstreams with equal keys are one upstream (and one pool).
fn upstream_key(
    host: &str,
    port: &ServicePort,
    resolve: &model::Destination,
    tls: Option<&ClientTls>,
    protocol: UpstreamProtocol,
    timeout: Duration,
) -> String {
    format!(
        "{host}|{}|{resolve:?}|{tls:?}|{protocol:?}|{timeout:?}",
        port.target_port
    )
}

pub(crate) fn build(model: Arc<Model>, inp: &BuildInputs<'_>) -> Result<Routes, WaypointError> {
    let cfg = model.config();
    let metas: Vec<_> = cfg
        .authorization_policies
        .iter()
        .map(|p| (p.metadata.clone(), p.spec.clone()))
        .collect();
    let policies = PolicySet::build(
        &metas,
        &BuildOptions::for_config(cfg, Some(inp.gateway.clone())),
    )
    .map_err(WaypointError::Policy)?;
    let idle_budget = match (inp.previous, &inp.idle_budget) {
        (Some(prev), _) => prev.idle_budget.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) => Arc::default(),
    };
    // Workload warnings concern the agent, not the waypoint.
    let mut warnings: Vec<String> = model
        .warnings()
        .filter(|w| {
            matches!(
                w.kind,
                model::Kind::ServiceEntry | model::Kind::DestinationRule
            )
        })
        .map(|w| w.to_string())
        .collect();
    warnings.extend(policies.warnings().iter().map(|w| w.to_string()));

    // Reuse upstreams (and their pools) whose settings did not change.
    let mut old: HashMap<String, Arc<Upstream>> = HashMap::new();
    if let Some(prev) = inp.previous {
        for t in prev.targets.values() {
            old.insert(t.upstream.key().to_string(), t.upstream.clone());
        }
    }
    let mut upstreams: HashMap<String, Arc<Upstream>> = HashMap::new();
    let mut targets = HashMap::new();
    let mut vips = HashSet::new();
    let gateway = ObjectKey::new(&inp.gateway.namespace, &inp.gateway.name);
    for svc in model.bound_to(&gateway) {
        let sp = policies.for_service(svc.namespace(), svc.name());
        for port in svc.ports.iter().filter(|p| p.is_tcp()) {
            let http = port.protocol.is_http() || (sp.needs_http() && !port.declared);
            for vip in &svc.vips {
                let host = svc.vip_host(vip);
                // Made only for an error or a TLS upstream.
                let what = || format!("ServiceEntry {} host {host} port {}", svc.key, port.number);
                let resolve = svc
                    .destination(host, port)
                    .map_err(|m| WaypointError::Config(format!("{}: {m}", what())))?;
                let tls = svc.tls_for(host, port.number);
                let protocol = upstream_protocol(port);
                let ukey = upstream_key(host, port, &resolve, tls, protocol, inp.connect_timeout);
                let upstream = match upstreams.get(&ukey) {
                    Some(u) => u.clone(),
                    None => {
                        let u = match old.get(&ukey) {
                            Some(u) => {
                                // Reused with its pool, but its files are
                                // checked again as for a new one (`check`).
                                if tls.is_some() {
                                    let what = what();
                                    let settings = origination(
                                        tls,
                                        protocol == UpstreamProtocol::Http2,
                                        &what,
                                    )?;
                                    UpstreamConnector::new(&settings).map_err(|e| {
                                        WaypointError::Config(format!("{what}: {e}"))
                                    })?;
                                }
                                u.clone()
                            }
                            None => {
                                let settings = match tls {
                                    // What `origination` gives without TLS.
                                    None => OriginationSettings::default(),
                                    Some(_) => origination(
                                        tls,
                                        protocol == UpstreamProtocol::Http2,
                                        &what(),
                                    )?,
                                };
                                let connector = UpstreamConnector::new(&settings).map_err(|e| {
                                    WaypointError::Config(format!("{}: {e}", what()))
                                })?;
                                Arc::new(
                                    Upstream::new(
                                        ukey.clone(),
                                        host.to_string(),
                                        port.target_port,
                                        resolve,
                                        connector,
                                        protocol,
                                        inp.connect_timeout,
                                    )
                                    .with_idle_budget(idle_budget.clone()),
                                )
                            }
                        };
                        upstreams.insert(ukey, u.clone());
                        u
                    }
                };
                let names = if svc.destination_derives_from_host() {
                    vec![host.to_string()]
                } else {
                    svc.hosts.to_vec()
                };
                let t = Arc::new(Target {
                    service: svc.clone(),
                    host: host.to_string(),
                    port: port.clone(),
                    http,
                    upstream,
                    names,
                    cluster: format!(
                        "inbound-vip|{}|{}|{host}",
                        port.number,
                        if port.name.is_empty() {
                            port.protocol.as_str().to_ascii_lowercase()
                        } else {
                            port.name.clone()
                        }
                    ),
                });
                vips.insert(vip.ip);
                targets.insert(SocketAddr::new(vip.ip, port.number), t);
            }
        }
    }
    let digest = cfg.digest;
    Ok(Routes {
        model,
        policies,
        targets,
        vips,
        warnings,
        digest,
        idle_budget,
        projected: None,
    })
}

impl Routes {
    /// `/config_dump` JSON.
    pub fn dump(&self, identity: &str, gateway: &GatewayRef) -> serde_json::Value {
        let mut services: Vec<_> = self
            .targets
            .iter()
            .map(|(addr, t)| {
                serde_json::json!({
                    "vip": addr.to_string(),
                    "serviceEntry": t.service.key.to_string(),
                    "host": t.host,
                    "port": t.port.number,
                    "targetPort": t.port.target_port,
                    "protocol": t.port.protocol.as_str(),
                    "mode": if t.http { "http" } else { "tcp" },
                    "tlsOrigination": t.upstream.originates_tls(),
                    "upstream": t.upstream.describe(),
                    "names": t.upstream.names(),
                })
            })
            .collect();
        services.sort_by(|a, b| a["vip"].as_str().cmp(&b["vip"].as_str()));
        serde_json::json!({
            "waypoint": {
                "identity": identity,
                "gateway": format!("{}/{}", gateway.namespace, gateway.name),
            },
            "version": format!("{:016x}", self.digest),
            "services": services,
            "policies": {
                "count": self.policies.len(),
                "warnings": self.policies.warnings().iter().map(|w| w.to_string()).collect::<Vec<_>>(),
            },
            "warnings": self.warnings,
        })
    }
}

/// IPv4-mapped IPv6 authorities are looked up as IPv4.
pub(crate) fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

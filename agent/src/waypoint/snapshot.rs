//! The per-config runtime snapshot: every VIP:port bound to this waypoint
//! resolved once to its service, host, port mode (L4 or HTTP), upstream
//! (resolution, TLS connector, connection pool), so that a tunnel or a
//! request costs one hash lookup.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::alloc::Allocation;
use crate::config::{ClientTls, Config, Resolution, TlsMode as DrTlsMode};
use crate::desired::{self, PortInfo, ServiceInfo};
use crate::policy::{BuildOptions, GatewayRef, PolicySet};
use crate::upstream::{OriginationSettings, TlsMode, UpstreamConnector};

use super::pool::{Resolve, Upstream, UpstreamProtocol};
use super::WaypointError;

/// One VIP:port this waypoint serves.
#[derive(Debug)]
pub struct Target {
    pub service: Arc<ServiceInfo>,
    /// The ServiceEntry host this VIP was allocated for (SNI, Host default,
    /// `destination_service`).
    pub host: String,
    pub port: PortInfo,
    /// Requests are parsed (HTTP port, or an unset protocol whose policies
    /// need HTTP fields); otherwise the tunnel is relayed as bytes.
    pub http: bool,
    pub upstream: Arc<Upstream>,
    /// Envoy's cluster name for the access log: `inbound-vip|80|http|host`.
    pub cluster: String,
}

/// Everything derived from one valid config (and allocation).
pub struct Snapshot {
    pub config: Arc<Config>,
    pub policies: PolicySet,
    /// Canonical VIP:port → target.
    pub targets: HashMap<SocketAddr, Arc<Target>>,
    /// VIPs of services bound to this waypoint (any port).
    pub vips: HashSet<IpAddr>,
    pub warnings: Vec<String>,
    /// Config digest and allocation generation, for `/config_dump`.
    pub digest: u64,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("digest", &self.digest)
            .field("targets", &self.targets.len())
            .finish()
    }
}

/// Build-time inputs that do not come from the config directory.
pub(crate) struct BuildInputs<'a> {
    pub gateway: &'a GatewayRef,
    pub connect_timeout: Duration,
    /// The previous snapshot: upstreams with identical settings are reused
    /// so that their pooled connections survive a reload.
    pub previous: Option<&'a Snapshot>,
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

/// Where connections for `port` of `svc` go (host `host`).
fn resolve_for(svc: &ServiceInfo, host: &str, port: &PortInfo) -> Result<Resolve, String> {
    match svc.resolution {
        // No resolution: the client's original destination is the address.
        Resolution::None => Ok(Resolve::Original),
        Resolution::Static => {
            let mut addrs = Vec::new();
            for e in &svc.endpoints {
                let ip: IpAddr = e.address.parse().map_err(|_| {
                    format!(
                        "resolution STATIC needs IP endpoints, got address {:?}",
                        e.address
                    )
                })?;
                let p = e.ports.get(&port.name).copied().unwrap_or(port.target_port);
                addrs.push(SocketAddr::new(ip, p));
            }
            if addrs.is_empty() {
                return Err("resolution STATIC without endpoints".into());
            }
            Ok(Resolve::Static(addrs))
        }
        Resolution::Dns | Resolution::DnsRoundRobin => {
            if svc.endpoints.is_empty() {
                Ok(Resolve::Dns(vec![(host.to_string(), port.target_port)]))
            } else {
                Ok(Resolve::Dns(
                    svc.endpoints
                        .iter()
                        .map(|e| {
                            (
                                e.address.clone(),
                                e.ports.get(&port.name).copied().unwrap_or(port.target_port),
                            )
                        })
                        .collect(),
                ))
            }
        }
    }
}

/// Whether the config declares a protocol for this port (vs inferred).
fn explicit_protocol(cfg: &Config, svc: &ServiceInfo, number: u16) -> bool {
    cfg.service_entries
        .iter()
        .find(|se| se.namespace() == svc.namespace && se.name() == svc.name)
        .and_then(|se| se.spec.ports.iter().find(|p| p.number.0 == number))
        .is_some_and(|p| p.protocol.is_some())
}

pub(crate) fn build(
    cfg: Arc<Config>,
    alloc: &Allocation,
    inp: &BuildInputs<'_>,
) -> Result<Snapshot, WaypointError> {
    let desired = desired::build(&cfg, alloc, |_| None);
    let metas: Vec<_> = cfg
        .authorization_policies
        .iter()
        .map(|p| (p.metadata.clone(), p.spec.clone()))
        .collect();
    let policies = PolicySet::build(
        &metas,
        &BuildOptions::for_config(&cfg, Some(inp.gateway.clone())),
    )
    .map_err(WaypointError::Policy)?;
    // Workload warnings concern the agent, not the waypoint.
    let mut warnings: Vec<String> = desired
        .warnings
        .iter()
        .filter(|w| w.starts_with("ServiceEntry"))
        .cloned()
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
    let mut ids: Vec<_> = desired.service_table.keys().copied().collect();
    ids.sort_unstable();
    for id in ids {
        let svc = &desired.service_table[&id];
        let Some(wp) = &svc.waypoint else { continue };
        if wp.gateway.namespace != inp.gateway.namespace || wp.gateway.name != inp.gateway.name {
            continue;
        }
        let key = crate::config::ObjectKey::new(&svc.namespace, &svc.name);
        // VIP → host: allocated addresses name their host; explicit
        // `spec.addresses` belong to the first host.
        let mut vip_host: Vec<(IpAddr, String)> = alloc
            .addresses_of(&key, &svc.hosts)
            .map(|(h, ip)| (ip, h.to_string()))
            .collect();
        for ip in &svc.vips {
            if !vip_host.iter().any(|(v, _)| v == ip) {
                if let Some(h) = svc.hosts.first() {
                    vip_host.push((*ip, h.clone()));
                }
            }
        }
        let sp = policies.for_service(&svc.namespace, &svc.name);
        for port in &svc.ports {
            if port.protocol == crate::config::Protocol::Udp {
                continue;
            }
            let http = port.protocol.is_http()
                || (sp.needs_http() && !explicit_protocol(&cfg, svc, port.number));
            for (ip, host) in &vip_host {
                let what = format!(
                    "ServiceEntry {}/{} host {host} port {}",
                    svc.namespace, svc.name, port.number
                );
                let resolve = resolve_for(svc, host, port)
                    .map_err(|m| WaypointError::Config(format!("{what}: {m}")))?;
                let tls = svc.tls_for(host, port.number);
                let protocol = if matches!(
                    port.protocol,
                    crate::config::Protocol::Http2 | crate::config::Protocol::Grpc
                ) {
                    UpstreamProtocol::Http2
                } else {
                    UpstreamProtocol::Http1
                };
                let ukey = format!(
                    "{host}|{}|{resolve:?}|{tls:?}|{protocol:?}|{:?}",
                    port.target_port, inp.connect_timeout
                );
                let upstream = match upstreams.get(&ukey) {
                    Some(u) => u.clone(),
                    None => {
                        let u = match old.get(&ukey) {
                            Some(u) => u.clone(),
                            None => {
                                let settings =
                                    origination(tls, protocol == UpstreamProtocol::Http2, &what)?;
                                let connector = UpstreamConnector::new(&settings)
                                    .map_err(|e| WaypointError::Config(format!("{what}: {e}")))?;
                                Arc::new(Upstream::new(
                                    ukey.clone(),
                                    host.clone(),
                                    port.target_port,
                                    resolve,
                                    connector,
                                    protocol,
                                    inp.connect_timeout,
                                ))
                            }
                        };
                        upstreams.insert(ukey, u.clone());
                        u
                    }
                };
                let t = Arc::new(Target {
                    service: svc.clone(),
                    host: host.clone(),
                    port: port.clone(),
                    http,
                    upstream,
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
                vips.insert(*ip);
                targets.insert(SocketAddr::new(*ip, port.number), t);
            }
        }
    }
    let digest = cfg.digest;
    Ok(Snapshot {
        config: cfg,
        policies,
        targets,
        vips,
        warnings,
        digest,
    })
}

impl Snapshot {
    /// `/config_dump` JSON.
    pub fn dump(&self, identity: &str, gateway: &GatewayRef) -> serde_json::Value {
        let mut services: Vec<_> = self
            .targets
            .iter()
            .map(|(addr, t)| {
                serde_json::json!({
                    "vip": addr.to_string(),
                    "serviceEntry": format!("{}/{}", t.service.namespace, t.service.name),
                    "host": t.host,
                    "port": t.port.number,
                    "targetPort": t.port.target_port,
                    "protocol": t.port.protocol.as_str(),
                    "mode": if t.http { "http" } else { "tcp" },
                    "tlsOrigination": t.upstream.originates_tls(),
                    "upstream": t.upstream.describe(),
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

//! Mesh-wide settings resolved from `mesh.yaml` (MeshConfig): the trust
//! domain, the root namespace, the egress mode and shunt's extensions.

use crate::config::{MeshConfig, OutboundMode};

/// Istio's default `meshConfig.rootNamespace`.
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mesh {
    pub trust_domain: String,
    /// `meshConfig.rootNamespace`: policies there apply mesh-wide.
    pub root_namespace: String,
    /// `outboundTrafficPolicy.mode`.
    pub egress: OutboundMode,
    /// REGISTRY_ONLY exceptions (`shunt.allowedEgressCIDRs`).
    pub allowed_egress: Vec<ipnet::IpNet>,
    /// Steer enrolled workloads' DNS to the agent (`shunt.dnsCapture`).
    pub dns_capture: bool,
    /// `defaultServiceExportTo` (Istio's default `["*"]`).
    pub default_service_export_to: Vec<String>,
    /// `defaultDestinationRuleExportTo` (Istio's default `["*"]`).
    pub default_destination_rule_export_to: Vec<String>,
}

impl Default for Mesh {
    fn default() -> Self {
        Mesh::from_config(&MeshConfig::default())
    }
}

impl Mesh {
    pub fn from_config(m: &MeshConfig) -> Self {
        Mesh {
            trust_domain: m.trust_domain.clone(),
            root_namespace: m
                .other
                .get("rootNamespace")
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .unwrap_or(DEFAULT_ROOT_NAMESPACE)
                .to_string(),
            egress: m.outbound_traffic_policy.mode,
            allowed_egress: m.shunt.allowed_egress_cidrs.iter().map(|c| c.0).collect(),
            dns_capture: m.shunt.dns_capture,
            default_service_export_to: string_list(m, "defaultServiceExportTo"),
            default_destination_rule_export_to: string_list(m, "defaultDestinationRuleExportTo"),
        }
    }
}

/// A MeshConfig list of strings; `["*"]` when absent or empty, as Istio.
fn string_list(m: &MeshConfig, field: &str) -> Vec<String> {
    let v: Vec<String> = m
        .other
        .get(field)
        .and_then(|v| v.as_sequence())
        .map(|s| {
            s.iter()
                .filter_map(|e| e.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if v.is_empty() {
        vec!["*".into()]
    } else {
        v
    }
}

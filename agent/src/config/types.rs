//! Spec types of the Istio and Gateway API objects shunt reads, field names as
//! in istio/api and gateway-api. Every spec rejects unknown fields (a typo
//! must never silently change behaviour); fields shunt does not act on but
//! that Istio's documented examples use are accepted and kept opaque.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use super::authz::AuthorizationPolicySpec;
use super::meta::ObjectMeta;

/// Opaque YAML kept for fields shunt accepts but does not interpret.
pub type Opaque = serde_yaml_ng::Value;

/// Where an object came from: file and 1-based document index. Directory
/// order is (file, document): files are read sorted by path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// Shared by every object of the file.
    pub file: std::sync::Arc<std::path::Path>,
    pub doc: usize,
}

impl Default for Origin {
    fn default() -> Self {
        Origin {
            file: std::sync::Arc::from(std::path::Path::new("")),
            doc: 0,
        }
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: document {}", self.file.display(), self.doc)
    }
}

/// One parsed object: metadata, spec and where it was read.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource<S> {
    pub metadata: ObjectMeta,
    pub spec: S,
    /// `status` as written by a controller (only a Gateway's `addresses`
    /// is read: see [`Gateway::waypoint_address`]).
    pub status: Option<Opaque>,
    pub origin: Origin,
    /// `creationTimestamp` as (unix seconds, nanoseconds); `None` when absent.
    pub created: Option<(i64, u32)>,
}

impl<S> Resource<S> {
    pub fn namespace(&self) -> &str {
        self.metadata.ns()
    }
    pub fn name(&self) -> &str {
        &self.metadata.name
    }
    pub fn key(&self) -> ObjectKey {
        ObjectKey::new(self.namespace(), self.name())
    }
    pub fn label(&self, k: &str) -> Option<&str> {
        self.metadata.labels.get(k).map(String::as_str)
    }
    /// Collision order: older `creationTimestamp` first (objects without one
    /// come after all that have one), then directory order (file, document).
    /// Not a global sequence number, so that an object's parse stays valid
    /// (and shared) while other files change.
    pub fn age_key(&self) -> (bool, (i64, u32), &std::path::Path, usize) {
        (
            self.created.is_none(),
            self.created.unwrap_or((0, 0)),
            &self.origin.file,
            self.origin.doc,
        )
    }
}

/// Namespace/name of a namespaced object.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

pub type Namespace = Resource<Opaque>;
pub type ServiceEntry = Resource<ServiceEntrySpec>;
pub type DestinationRule = Resource<DestinationRuleSpec>;
pub type Gateway = Resource<GatewaySpec>;
pub type WorkloadEntry = Resource<WorkloadEntrySpec>;
pub type AuthorizationPolicy = Resource<AuthorizationPolicySpec>;

// ---------------------------------------------------------------- ports

/// A TCP/UDP port, 1-65535. Deserializes only from an integer in range, with
/// an error that says what was expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u16);

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        const WANT: &str = "expected a port 1-65535";
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p > 0 => Ok(Port(p)),
                    _ => Err(E::custom(format!("invalid value {v}: {WANT}"))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                if v < 0 {
                    return Err(E::custom(format!("invalid value {v}: {WANT}")));
                }
                self.visit_u64(v as u64)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Port, E> {
                Err(E::custom(format!("invalid value {v}: {WANT}")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Port, E> {
                Err(E::custom(format!("invalid value {v:?}: {WANT}")))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Port, E> {
                Err(E::custom(format!("invalid value {v}: {WANT}")))
            }
        }
        d.deserialize_any(V)
    }
}

// ------------------------------------------------------------- enums

/// Declares a string enum with Istio's spelling and a clear error for
/// unknown values (`invalid value "X": expected one of A, B`).
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($var),+ }
        impl $name {
            pub const ALL: &'static [&'static str] = &[$($s),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }
        }
        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($name::$var),)+
                    _ => Err(format!("invalid value {:?}: expected one of {}", s, Self::ALL.join(", "))),
                }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { f.write_str(self.as_str()) }
        }
        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { s.serialize_str(self.as_str()) }
        }
        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = serde_yaml_ng::Value::deserialize(d)?;
                match &v {
                    serde_yaml_ng::Value::String(s) => s.parse().map_err(de::Error::custom),
                    other => Err(de::Error::custom(format!(
                        "invalid value {}: expected one of {}",
                        yaml_inline(other), Self::ALL.join(", ")))),
                }
            }
        }
    };
}

/// A scalar rendered on one line for error messages.
pub(crate) fn yaml_inline(v: &serde_yaml_ng::Value) -> String {
    match v {
        serde_yaml_ng::Value::String(s) => format!("{s:?}"),
        serde_yaml_ng::Value::Number(n) => n.to_string(),
        serde_yaml_ng::Value::Bool(b) => b.to_string(),
        serde_yaml_ng::Value::Null => "null".into(),
        serde_yaml_ng::Value::Sequence(_) => "a list".into(),
        serde_yaml_ng::Value::Mapping(_) => "a map".into(),
        serde_yaml_ng::Value::Tagged(_) => "a tagged value".into(),
    }
}

string_enum!(
    /// `ServiceEntry.spec.resolution`.
    /// `DYNAMIC_DNS`: wildcard hosts only; the waypoint resolves the name
    /// the client sent (SNI or Host) itself.
    Resolution { None = "NONE", Static = "STATIC", Dns = "DNS", DnsRoundRobin = "DNS_ROUND_ROBIN", DynamicDns = "DYNAMIC_DNS" }
);
string_enum!(
    /// `ServiceEntry.spec.location`.
    Location { MeshExternal = "MESH_EXTERNAL", MeshInternal = "MESH_INTERNAL" }
);
string_enum!(
    /// `ClientTLSSettings.mode`.
    TlsMode { Disable = "DISABLE", Simple = "SIMPLE", Mutual = "MUTUAL", IstioMutual = "ISTIO_MUTUAL" }
);
string_enum!(
    /// `MeshConfig.outboundTrafficPolicy.mode`.
    OutboundMode { AllowAny = "ALLOW_ANY", RegistryOnly = "REGISTRY_ONLY" }
);

string_enum!(
    /// `MeshConfig.pathNormalization.normalization`, as Istio maps it to
    /// Envoy; each level includes the ones before it.
    /// - `NONE`: paths as received;
    /// - `BASE` (Istio's default): RFC 3986 normalization (dot segments,
    ///   unreserved escapes decoded, other escapes upper-cased), `\` as `/`;
    /// - `MERGE_SLASHES`: then repeated slashes merged;
    /// - `DECODE_AND_MERGE_SLASHES`: `%2F`/`%5C` decoded to `/` first.
    PathNormalization {
        None = "NONE",
        Base = "BASE",
        MergeSlashes = "MERGE_SLASHES",
        DecodeAndMergeSlashes = "DECODE_AND_MERGE_SLASHES",
    }
);

// The variants come from `string_enum!`, which cannot mark a `#[default]`.
#[allow(clippy::derivable_impls)]
impl Default for PathNormalization {
    fn default() -> Self {
        PathNormalization::Base
    }
}

// string_enum! declares the enum, so `#[derive(Default)]` cannot mark a variant.
#[allow(clippy::derivable_impls)]
impl Default for Resolution {
    fn default() -> Self {
        Resolution::None
    }
}

/// Istio's port protocols (`pkg/config/protocol`). Parsed case-insensitively
/// like Istio does; rendered in Istio's canonical spelling.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Protocol {
    Http,
    Https,
    Grpc,
    GrpcWeb,
    Http2,
    Mongo,
    Redis,
    Mysql,
    Tcp,
    Tls,
    Udp,
    Thrift,
}

impl Protocol {
    const NAMES: &'static [(&'static str, Protocol)] = &[
        ("HTTP", Protocol::Http),
        ("HTTPS", Protocol::Https),
        ("GRPC", Protocol::Grpc),
        ("GRPC-Web", Protocol::GrpcWeb),
        ("HTTP2", Protocol::Http2),
        ("Mongo", Protocol::Mongo),
        ("Redis", Protocol::Redis),
        ("MySQL", Protocol::Mysql),
        ("TCP", Protocol::Tcp),
        ("TLS", Protocol::Tls),
        ("UDP", Protocol::Udp),
        ("Thrift", Protocol::Thrift),
    ];
    pub fn as_str(self) -> &'static str {
        Self::NAMES.iter().find(|(_, p)| *p == self).unwrap().0
    }
    pub fn parse(s: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|(_, p)| *p)
    }
    /// HTTP-speaking protocols: the waypoint parses requests on these ports.
    pub fn is_http(self) -> bool {
        matches!(
            self,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::GrpcWeb
        )
    }
    /// Istio's inference from a port name when `protocol` is empty
    /// (`http`, `http-foo`, `grpc-web`, ...); TCP otherwise.
    pub fn from_port_name(name: &str) -> Self {
        let prefix = name.split('-').next().unwrap_or("");
        let lower = name.to_ascii_lowercase();
        if lower.starts_with("grpc-web") {
            return Protocol::GrpcWeb;
        }
        match Self::parse(prefix) {
            Some(p) if p != Protocol::GrpcWeb => p,
            _ => Protocol::Tcp,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Protocol {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml_ng::Value::deserialize(d)?;
        let want = || {
            Protocol::NAMES
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        };
        match &v {
            serde_yaml_ng::Value::String(s) => Protocol::parse(s).ok_or_else(|| {
                de::Error::custom(format!("invalid value {s:?}: expected one of {}", want()))
            }),
            other => Err(de::Error::custom(format!(
                "invalid value {}: expected one of {}",
                yaml_inline(other),
                want()
            ))),
        }
    }
}

// ------------------------------------------------------- ServiceEntry

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    // Boxed slices (16 bytes against a `Vec`'s 24, no spare capacity) and
    // the selector boxed: 100,000 of these are held, and so a
    // ServiceEntry fits mimalloc's 384-byte class instead of 448.
    pub hosts: Box<[String]>,
    /// IPs or CIDRs; validated at load.
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub addresses: Box<[String]>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub ports: Box<[ServicePort]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<Resolution>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub endpoints: Box<[WorkloadEntrySpec]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<Box<WorkloadSelector>>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub export_to: Box<[String]>,
    #[serde(default, skip_serializing_if = "<[_]>::is_empty")]
    pub subject_alt_names: Box<[String]>,
}

/// `protocol`: Istio treats an empty string as unset (inferred from the
/// port name).
fn protocol<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Protocol>, D::Error> {
    let v = serde_yaml_ng::Value::deserialize(d)?;
    match v.as_str() {
        Some("") => Ok(None),
        _ => Protocol::deserialize(v)
            .map(Some)
            .map_err(de::Error::custom),
    }
}

impl ServiceEntrySpec {
    pub fn resolution(&self) -> Resolution {
        self.resolution.unwrap_or_default()
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    pub number: Port,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "protocol"
    )]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<Port>,
}

impl ServicePort {
    /// `protocol`, else inferred from the name like Istio.
    pub fn protocol(&self) -> Protocol {
        self.protocol
            .unwrap_or_else(|| Protocol::from_port_name(&self.name))
    }
    /// `targetPort`, defaulting to `number`.
    pub fn target_port(&self) -> u16 {
        self.target_port.unwrap_or(self.number).0
    }
}

// ------------------------------------------------------ WorkloadEntry

/// `WorkloadEntry.spec`, also used for `ServiceEntry.spec.endpoints[]`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntrySpec {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub address: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, Port>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub network: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub locality: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub service_account: String,
}

impl WorkloadEntrySpec {
    /// Istio's default service account is `default`.
    pub fn service_account(&self) -> &str {
        if self.service_account.is_empty() {
            "default"
        } else {
            &self.service_account
        }
    }
}

// ---------------------------------------------------- DestinationRule

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    pub host: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Istio's `istio.type.v1beta1.WorkloadSelector` (`matchLabels`), not
    /// the ServiceEntry's (`labels`). Refused at load: see `validate_dr`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<MatchLabels>,
}

/// `{matchLabels: {...}}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabels {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_level_settings: Vec<PortTrafficPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_protocol: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<Opaque>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortTrafficPolicy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClientTls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Opaque>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: Port,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    pub name: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `ClientTLSSettings`: how the waypoint originates TLS to the upstream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClientTls {
    pub mode: TlsMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_certificate: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_certificates: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_crl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential_name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub insecure_skip_verify: Option<bool>,
}

// ------------------------------------------------------------ Gateway

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<Listener>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub infrastructure: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_listeners: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_tls: Option<Opaque>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    pub port: Port,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Opaque>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<Opaque>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    /// `IPAddress` (default) or `Hostname`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub value: String,
}

/// Istio's waypoint GatewayClass.
pub const WAYPOINT_CLASS: &str = "istio-waypoint";
/// Istio's default HBONE port.
pub const HBONE_PORT: u16 = 15008;

impl GatewaySpec {
    pub fn is_waypoint(&self) -> bool {
        self.gateway_class_name == WAYPOINT_CLASS
    }
    /// Port of the listener with protocol HBONE, else 15008.
    pub fn hbone_port(&self) -> u16 {
        self.listeners
            .iter()
            .find(|l| l.protocol == "HBONE")
            .map(|l| l.port.0)
            .unwrap_or(HBONE_PORT)
    }
    /// First IP address in `spec.addresses` (validated at load).
    pub fn address(&self) -> Option<std::net::IpAddr> {
        first_ip(&self.addresses)
    }
}

fn first_ip(addrs: &[GatewayAddress]) -> Option<std::net::IpAddr> {
    addrs
        .iter()
        .filter(|a| a.kind.as_deref().unwrap_or("IPAddress") == "IPAddress")
        .find_map(|a| a.value.parse().ok())
}

impl Gateway {
    /// The address clients reach the waypoint at: the first IP of
    /// `spec.addresses`, else of `status.addresses` (what Istio's gateway
    /// controller writes for the waypoint's Service).
    pub fn waypoint_address(&self) -> Option<std::net::IpAddr> {
        self.spec.address().or_else(|| {
            let addrs = self.status.as_ref()?.get("addresses")?.clone();
            let addrs: Vec<GatewayAddress> = serde_yaml_ng::from_value(addrs).ok()?;
            first_ip(&addrs)
        })
    }
}

// --------------------------------------------------------- MeshConfig

/// The MeshConfig fields shunt uses, read from `mesh.yaml` / `mesh.yml`.
/// Other Istio MeshConfig fields are accepted and ignored (a real mesh config
/// has dozens); the `shunt` section is strict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    #[serde(default)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// `pathNormalization`: how the waypoint normalizes request paths before
    /// authorization (and sends them upstream).
    #[serde(default)]
    pub path_normalization: PathNormalizationConfig,
    /// shunt's extension (not an Istio field): see [`ShuntMeshConfig`].
    #[serde(default)]
    pub shunt: ShuntMeshConfig,
    /// Other Istio MeshConfig fields, ignored.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, Opaque>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

impl Default for MeshConfig {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            outbound_traffic_policy: OutboundTrafficPolicy::default(),
            path_normalization: PathNormalizationConfig::default(),
            shunt: ShuntMeshConfig::default(),
            other: BTreeMap::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutboundTrafficPolicy {
    #[serde(default = "default_outbound_mode")]
    pub mode: OutboundMode,
    /// Istio field, accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<Opaque>,
}

fn default_outbound_mode() -> OutboundMode {
    OutboundMode::AllowAny
}

impl Default for OutboundTrafficPolicy {
    fn default() -> Self {
        Self {
            mode: OutboundMode::AllowAny,
            egress_proxy: None,
        }
    }
}

/// `MeshConfig.pathNormalization`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathNormalizationConfig {
    #[serde(default)]
    pub normalization: PathNormalization,
}

/// `shunt:` section of `mesh.yaml`:
///
/// ```yaml
/// trustDomain: cluster.local
/// outboundTrafficPolicy:
///   mode: REGISTRY_ONLY
/// shunt:
///   # Destinations that enrolled workloads may still reach directly in
///   # REGISTRY_ONLY mode (the cluster's pod/service ranges, the node, ...).
///   allowedEgressCIDRs: ["10.0.0.0/8", "fd00::/8"]
///   # Steer enrolled workloads' DNS queries to the agent (default true).
///   dnsCapture: true
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShuntMeshConfig {
    #[serde(rename = "allowedEgressCIDRs", default)]
    pub allowed_egress_cidrs: Vec<Cidr>,
    #[serde(rename = "dnsCapture", default = "yes")]
    pub dns_capture: bool,
}

fn yes() -> bool {
    true
}

impl Default for ShuntMeshConfig {
    fn default() -> Self {
        Self {
            allowed_egress_cidrs: Vec::new(),
            dns_capture: true,
        }
    }
}

/// A CIDR (`10.0.0.0/8`); a bare address means a single host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr(pub ipnet::IpNet);

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_yaml_ng::Value::deserialize(d)?;
        let bad = || {
            de::Error::custom(format!(
                "invalid value {}: expected a CIDR such as 10.0.0.0/8",
                yaml_inline(&v)
            ))
        };
        let s = v.as_str().ok_or_else(bad)?;
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
            .map(Cidr)
            .map_err(|_| bad())
    }
}

// ----------------------------------------------------------- labels

pub mod labels {
    pub const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
    pub const USE_WAYPOINT: &str = "istio.io/use-waypoint";
    pub const USE_WAYPOINT_NAMESPACE: &str = "istio.io/use-waypoint-namespace";
    pub const WAYPOINT_FOR: &str = "istio.io/waypoint-for";
    pub const AUTOALLOCATE: &str = "networking.istio.io/enable-autoallocate-ip";
    /// shunt's annotation on a WorkloadEntry: its cgroup on this machine,
    /// relative to the agent's cgroup root unless absolute; several
    /// comma-separated (a pod's containers, written by the API source).
    pub const CGROUP_ANNOTATION: &str = "shunt.io/cgroup";
    /// As [`CGROUP_ANNOTATION`], and every cgroup below it is enrolled too,
    /// by the kernel at connect time (a Kubernetes pod's cgroup, written by
    /// the API source: containers started later are enrolled from their
    /// first connect).
    pub const CGROUP_TREE_ANNOTATION: &str = "shunt.io/cgroup-tree";
}

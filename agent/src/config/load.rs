//! Reading and validating a config directory.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::meta::ObjectMeta;
use super::*;

/// The YAML files of a directory at one moment, with a content hash.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Sorted by file name.
    pub files: Vec<(PathBuf, Vec<u8>)>,
    pub digest: u64,
}

const MESH_FILES: [&str; 2] = ["mesh.yaml", "mesh.yml"];

/// `*.yaml` / `*.yml` files of `dir` (not hidden: editors' swap files and
/// `..data` symlink farms of ConfigMap volumes start with a dot), sorted.
pub(crate) fn list_yaml(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let err = |source| ConfigError::Dir {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(err)? {
        let ent = ent.map_err(err)?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') || !(name.ends_with(".yaml") || name.ends_with(".yml")) {
            continue;
        }
        // Follow symlinks (ConfigMap volumes), skip directories.
        if std::fs::metadata(ent.path())
            .map(|m| m.is_file())
            .unwrap_or(false)
        {
            out.push(dir.join(name));
        }
    }
    out.sort();
    Ok(out)
}

impl Snapshot {
    pub fn read(dir: &Path) -> Result<Snapshot, ConfigError> {
        let mut files = Vec::new();
        let mut problems = Vec::new();
        for path in list_yaml(dir)? {
            match std::fs::read(&path) {
                Ok(b) => files.push((path, b)),
                // Deleted between listing and reading: the next poll sees it.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(Problem {
                    file: path,
                    doc: None,
                    object: None,
                    field: None,
                    message: format!("cannot read: {e}"),
                }),
            }
        }
        if !problems.is_empty() {
            return Err(ConfigError::Invalid(problems));
        }
        Ok(Snapshot::new(files))
    }

    /// A snapshot of `files` (sorted by name), with their content hash.
    pub fn new(files: Vec<(PathBuf, Vec<u8>)>) -> Snapshot {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for (p, b) in &files {
            p.hash(&mut h);
            b.hash(&mut h);
        }
        Snapshot {
            files,
            digest: h.finish(),
        }
    }

    /// Same files with the same contents, by file name: what `shunt get`
    /// compares (the agent and the operator may spell the directory
    /// differently).
    pub fn same_files(&self, other: &Snapshot) -> bool {
        let names = |s: &Snapshot| -> Vec<(Option<std::ffi::OsString>, u64)> {
            s.files
                .iter()
                .map(|(p, b)| {
                    let mut h = std::collections::hash_map::DefaultHasher::new();
                    b.hash(&mut h);
                    (p.file_name().map(|n| n.to_os_string()), h.finish())
                })
                .collect()
        };
        names(self) == names(other)
    }

    /// Parses and validates every file; all problems or a `Config`.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        std::sync::Arc::new(self.clone()).into_config()
    }

    /// [`Snapshot::parse`] without copying the files: the config keeps this
    /// snapshot as its source (at 100,000 entries the copy was 30 MB).
    pub fn into_config(self: std::sync::Arc<Self>) -> Result<Config, ConfigError> {
        let mut b = Builder::default();
        b.cfg.digest = self.digest;
        b.cfg.source = Some(self.clone());
        let mut seq = 0usize;
        for (path, bytes) in &self.files {
            let is_mesh = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| MESH_FILES.contains(&n));
            let text = match std::str::from_utf8(bytes) {
                Ok(t) => t,
                Err(e) => {
                    b.problem(path, None, None, None, format!("not UTF-8: {e}"));
                    continue;
                }
            };
            if is_mesh {
                b.mesh(path, text);
                continue;
            }
            // One libyaml pass; only text it refuses is tried again with
            // flow-context IPv6 scalars quoted.
            let (docs, err) = match values_of(text) {
                (docs, None) => (docs, None),
                (docs, Some(e)) => match quote_flow_ipv6(text).map(|f| values_of(&f)) {
                    Some((fixed, None)) => (fixed, None),
                    _ => (docs, Some(e)),
                },
            };
            let n = docs.len();
            for (i, v) in docs.into_iter().enumerate() {
                let origin = Origin {
                    file: path.clone(),
                    doc: i + 1,
                    seq,
                };
                seq += 1;
                if !matches!(v, Value::Null) {
                    b.document(v, origin);
                }
            }
            if let Some(e) = err {
                seq += 1;
                b.problem(path, Some(n + 1), None, None, e.to_string());
            }
        }
        b.cross_checks();
        if b.problems.is_empty() {
            Ok(b.cfg)
        } else {
            Err(ConfigError::Invalid(b.problems))
        }
    }
}

#[derive(Default)]
struct Builder {
    cfg: Config,
    problems: Vec<Problem>,
    warned_kinds: HashSet<String>,
    seen: HashMap<(&'static str, String, String), Origin>,
}

/// The top level of every Kubernetes object shunt reads.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Doc<S> {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<S>,
    /// Written by controllers; only a Gateway's `status.addresses` is read.
    #[serde(default)]
    status: Option<Value>,
}

/// Error context for one document.
struct Ctx<'a> {
    origin: &'a Origin,
    object: String,
}

impl Builder {
    fn problem(
        &mut self,
        file: &Path,
        doc: Option<usize>,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.problems.push(Problem {
            file: file.to_path_buf(),
            doc,
            object,
            field,
            message,
        });
    }

    fn at(&mut self, ctx: &Ctx, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        self.problems.push(Problem {
            file: ctx.origin.file.clone(),
            doc: Some(ctx.origin.doc),
            object: Some(ctx.object.clone()),
            field: (!field.is_empty()).then_some(field),
            message: message.into(),
        });
    }

    fn mesh(&mut self, path: &Path, text: &str) {
        // Through a Value so that messages carry the field path only once.
        let v: Value = match serde_yaml_ng::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.problem(path, None, None, None, e.to_string());
                return;
            }
        };
        match serde_path_to_error::deserialize::<_, Option<MeshConfig>>(v) {
            Ok(m) => {
                let m = m.unwrap_or_default();
                if !m.other.is_empty() {
                    tracing::debug!(
                        file = %path.display(),
                        fields = ?m.other.keys().collect::<Vec<_>>(),
                        "MeshConfig fields not used by shunt"
                    );
                }
                self.cfg.mesh = m;
            }
            Err(e) => {
                let field = path_of(e.path());
                self.problem(path, None, None, field, e.into_inner().to_string());
            }
        }
    }

    fn document(&mut self, v: Value, origin: Origin) {
        let file = origin.file.clone();
        let doc = Some(origin.doc);
        let Value::Mapping(m) = &v else {
            self.problem(
                &file,
                doc,
                None,
                None,
                format!(
                    "expected a Kubernetes object, found {}",
                    types::yaml_inline(&v)
                ),
            );
            return;
        };
        let get = |k: &str| m.get(k).and_then(|v| v.as_str()).map(str::to_string);
        let (Some(api), Some(kind)) = (get("apiVersion"), get("kind")) else {
            let which = if get("apiVersion").is_none() {
                "apiVersion"
            } else {
                "kind"
            };
            self.problem(&file, doc, None, Some(which.into()), "missing".into());
            return;
        };
        let meta = m.get("metadata").and_then(|v| v.as_mapping());
        let mget = |k: &str| {
            meta.and_then(|m| m.get(k))
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        };
        let name = mget("name");
        let name = if name.is_empty() {
            "<unnamed>".to_string()
        } else {
            name
        };
        let (group, version) = api.rsplit_once('/').unwrap_or(("", api.as_str()));
        const ISTIO3: &[&str] = &["v1", "v1beta1", "v1alpha3"];
        const V1B1: &[&str] = &["v1", "v1beta1"];
        let (versions, namespaced): (&[&str], bool) = match (group, kind.as_str()) {
            ("", "Namespace") => (&["v1"], false),
            ("networking.istio.io", "ServiceEntry")
            | ("networking.istio.io", "DestinationRule")
            | ("networking.istio.io", "WorkloadEntry") => (ISTIO3, true),
            ("security.istio.io", "AuthorizationPolicy") => (V1B1, true),
            ("gateway.networking.k8s.io", "Gateway") => (V1B1, true),
            _ => {
                let k = format!("{kind}.{group}");
                *self.cfg.ignored_kinds.entry(k.clone()).or_default() += 1;
                if self.warned_kinds.insert(k.clone()) {
                    tracing::warn!(kind = %k, file = %file.display(), "ignoring objects of unsupported kind");
                }
                return;
            }
        };
        let object = if namespaced {
            let ns = mget("namespace");
            let ns = if ns.is_empty() { "default".into() } else { ns };
            format!("{kind} {ns}/{name}")
        } else {
            format!("{kind} {name}")
        };
        let ctx = Ctx {
            origin: &origin,
            object,
        };
        if !versions.contains(&version) {
            self.at(
                &ctx,
                "apiVersion",
                format!(
                    "unsupported version {api:?}: expected one of {}",
                    versions
                        .iter()
                        .map(|v| format!("{group}/{v}").trim_start_matches('/').to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return;
        }
        match kind.as_str() {
            "Namespace" => {
                if let Some(r) = self.typed::<Value>(v, &ctx, false, "Namespace") {
                    self.cfg.namespaces.insert(r.name().to_string(), r);
                }
            }
            "ServiceEntry" => {
                if let Some(r) = self.typed::<ServiceEntrySpec>(v, &ctx, true, "ServiceEntry") {
                    self.validate_se(&r, &ctx);
                    self.cfg.service_entries.push(r);
                }
            }
            "DestinationRule" => {
                if let Some(r) = self.typed::<DestinationRuleSpec>(v, &ctx, true, "DestinationRule")
                {
                    self.validate_dr(&r, &ctx);
                    self.cfg.destination_rules.push(r);
                }
            }
            "WorkloadEntry" => {
                if let Some(r) = self.typed::<WorkloadEntrySpec>(v, &ctx, true, "WorkloadEntry") {
                    self.validate_we(&r, &ctx);
                    self.cfg.workload_entries.push(r);
                }
            }
            "AuthorizationPolicy" => {
                if let Some(r) = self.typed::<authz::AuthorizationPolicySpec>(
                    v,
                    &ctx,
                    false,
                    "AuthorizationPolicy",
                ) {
                    self.validate_ap(&r, &ctx);
                    self.cfg.authorization_policies.push(r);
                }
            }
            "Gateway" => {
                if let Some(r) = self.typed::<GatewaySpec>(v, &ctx, true, "Gateway") {
                    self.validate_gw(&r, &ctx);
                    self.cfg.gateways.push(r);
                }
            }
            _ => unreachable!("kind matched above"),
        }
    }

    /// Deserializes a document into its typed form and checks metadata and
    /// uniqueness. `None` when it has problems that make it unusable.
    fn typed<S: DeserializeOwned + Default>(
        &mut self,
        v: Value,
        ctx: &Ctx,
        spec_required: bool,
        kind: &'static str,
    ) -> Option<Resource<S>> {
        let doc: Doc<S> = match serde_path_to_error::deserialize(v) {
            Ok(d) => d,
            Err(e) => {
                let field = path_of(e.path()).unwrap_or_default();
                self.at(ctx, field, e.into_inner().to_string());
                return None;
            }
        };
        let mut ok = true;
        if doc.metadata.name.is_empty() {
            self.at(ctx, "metadata.name", "missing");
            ok = false;
        } else if !is_object_name(&doc.metadata.name) {
            self.at(
                ctx,
                "metadata.name",
                format!(
                    "invalid value {:?}: expected a lowercase DNS name",
                    doc.metadata.name
                ),
            );
            ok = false;
        }
        if let Some(ns) = &doc.metadata.namespace {
            if kind != "Namespace" && !is_label(ns) {
                self.at(
                    ctx,
                    "metadata.namespace",
                    format!("invalid value {ns:?}: expected a lowercase DNS label"),
                );
                ok = false;
            }
        }
        let created = match &doc.metadata.creation_timestamp {
            None => None,
            Some(ts) => match time::OffsetDateTime::parse(
                ts,
                &time::format_description::well_known::Rfc3339,
            ) {
                Ok(t) => Some((t.unix_timestamp(), t.nanosecond())),
                Err(_) => {
                    self.at(
                        ctx,
                        "metadata.creationTimestamp",
                        format!("invalid value {ts:?}: expected an RFC 3339 time"),
                    );
                    ok = false;
                    None
                }
            },
        };
        let spec = match doc.spec {
            Some(s) => s,
            None if spec_required => {
                self.at(ctx, "spec", "missing");
                return None;
            }
            None => S::default(),
        };
        if !ok {
            return None;
        }
        let ns = if kind == "Namespace" {
            String::new()
        } else {
            doc.metadata.ns().to_string()
        };
        let id = (kind, ns, doc.metadata.name.clone());
        if let Some(first) = self.seen.get(&id) {
            let msg = format!("duplicate {kind}, first defined in {first}");
            self.at(ctx, "metadata.name", msg);
            return None;
        }
        self.seen.insert(id, ctx.origin.clone());
        Some(Resource {
            metadata: doc.metadata,
            spec,
            status: doc.status,
            origin: ctx.origin.clone(),
            created,
        })
    }

    fn validate_se(&mut self, r: &ServiceEntry, ctx: &Ctx) {
        let s = &r.spec;
        if s.hosts.is_empty() {
            self.at(ctx, "spec.hosts", "at least one host is required");
        }
        for (i, h) in s.hosts.iter().enumerate() {
            if h == "*" {
                // Istio: the full wildcard is never a ServiceEntry host.
                self.at(
                    ctx,
                    format!("spec.hosts[{i}]"),
                    "invalid value \"*\": a ServiceEntry host cannot be the full wildcard",
                );
            } else if !is_host(h) {
                self.at(
                    ctx,
                    format!("spec.hosts[{i}]"),
                    format!("invalid value {h:?}: expected a DNS name or *.wildcard"),
                );
            }
        }
        for (i, a) in s.addresses.iter().enumerate() {
            if a.parse::<IpAddr>().is_err() && a.parse::<ipnet::IpNet>().is_err() {
                self.at(
                    ctx,
                    format!("spec.addresses[{i}]"),
                    format!("invalid value {a:?}: expected an IP address or CIDR"),
                );
            }
        }
        let mut numbers = HashSet::new();
        for (i, p) in s.ports.iter().enumerate() {
            if !numbers.insert(p.number) {
                self.at(
                    ctx,
                    format!("spec.ports[{i}].number"),
                    format!("duplicate port {}", p.number.0),
                );
            }
        }
        let res = s.resolution();
        if res == Resolution::DynamicDns {
            self.validate_dynamic_dns(r, ctx);
        }
        for (i, e) in s.endpoints.iter().enumerate() {
            let f = format!("spec.endpoints[{i}].address");
            if e.address.is_empty() {
                if res != Resolution::None {
                    self.at(ctx, f, "missing");
                }
            } else if res == Resolution::Static
                && e.address.parse::<IpAddr>().is_err()
                && !e.address.starts_with("unix://")
            {
                self.at(
                    ctx,
                    f,
                    format!(
                        "invalid value {:?}: expected an IP address (resolution STATIC)",
                        e.address
                    ),
                );
            } else if e.address.parse::<IpAddr>().is_err()
                && !e.address.starts_with("unix://")
                && !is_host(&e.address)
            {
                self.at(
                    ctx,
                    f,
                    format!(
                        "invalid value {:?}: expected an IP address or DNS name",
                        e.address
                    ),
                );
            }
        }
        self.export_to(ctx, &s.export_to, r.namespace(), true);
        if s.workload_selector.is_some() && !s.endpoints.is_empty() {
            // Istio's validation: the endpoints would be ambiguous.
            self.at(
                ctx,
                "spec.workloadSelector",
                "only one of workloadSelector or endpoints is allowed",
            );
        }
        if let Some(v) = r.label(labels::AUTOALLOCATE) {
            if v != "true" && v != "false" {
                self.at(
                    ctx,
                    format!("metadata.labels.{}", labels::AUTOALLOCATE),
                    format!("invalid value {v:?}: expected \"true\" or \"false\""),
                );
            }
        }
    }

    /// Istio's rules for `resolution: DYNAMIC_DNS` (its
    /// `ValidateServiceEntry`): every host a wildcard, no addresses, no
    /// endpoints, only ports whose protocol names the destination (HTTP,
    /// HTTP2, GRPC by Host/`:authority`, TLS by SNI), and not
    /// `MESH_INTERNAL` behind a waypoint.
    fn validate_dynamic_dns(&mut self, r: &ServiceEntry, ctx: &Ctx) {
        let s = &r.spec;
        for (i, h) in s.hosts.iter().enumerate() {
            if !h.starts_with("*.") {
                self.at(
                    ctx,
                    format!("spec.hosts[{i}]"),
                    format!("invalid value {h:?}: resolution DYNAMIC_DNS needs wildcard hosts (*.example.com)"),
                );
            }
        }
        if !s.addresses.is_empty() {
            self.at(
                ctx,
                "spec.addresses",
                "must be empty with resolution DYNAMIC_DNS (addresses are allocated per host)",
            );
        }
        if !s.endpoints.is_empty() {
            self.at(
                ctx,
                "spec.endpoints",
                "must be empty with resolution DYNAMIC_DNS (the destination is the name the client sends)",
            );
        }
        for (i, p) in s.ports.iter().enumerate() {
            if !matches!(
                p.protocol,
                Some(Protocol::Http | Protocol::Http2 | Protocol::Grpc | Protocol::Tls)
            ) {
                let got = p.protocol.map(|p| p.as_str()).unwrap_or("unset");
                self.at(
                    ctx,
                    format!("spec.ports[{i}].protocol"),
                    format!("{got}: resolution DYNAMIC_DNS needs HTTP, HTTP2, GRPC or TLS (the waypoint must read the name from Host or SNI)"),
                );
            }
        }
        // Istio looks at the entry's own label only (its `usesWaypoint`).
        let uses_waypoint = r
            .label(labels::USE_WAYPOINT)
            .is_some_and(|v| !v.is_empty() && !v.eq_ignore_ascii_case("none"));
        if s.location == Some(Location::MeshInternal) && uses_waypoint {
            self.at(
                ctx,
                "spec.location",
                "MESH_INTERNAL with resolution DYNAMIC_DNS is not supported behind a waypoint",
            );
        }
    }

    fn validate_dr(&mut self, r: &DestinationRule, ctx: &Ctx) {
        if r.spec.host.is_empty() {
            self.at(ctx, "spec.host", "missing");
        } else if !is_host(&r.spec.host) {
            self.at(
                ctx,
                "spec.host",
                format!(
                    "invalid value {:?}: expected a DNS name or *.wildcard",
                    r.spec.host
                ),
            );
        }
        let check = |b: &mut Self, path: String, tp: &TrafficPolicy| {
            if let Some(t) = &tp.tls {
                b.validate_tls(ctx, &format!("{path}.tls"), t);
            }
            for (i, pl) in tp.port_level_settings.iter().enumerate() {
                let p = format!("{path}.portLevelSettings[{i}]");
                if pl.port.is_none() {
                    b.at(ctx, format!("{p}.port"), "missing");
                }
                if let Some(t) = &pl.tls {
                    b.validate_tls(ctx, &format!("{p}.tls"), t);
                }
            }
        };
        self.export_to(ctx, &r.spec.export_to, r.namespace(), false);
        if r.spec.workload_selector.is_some() {
            // Istio applies such a rule only in the selected workloads' own
            // proxies; shunt applies DestinationRules at the waypoint and
            // does not match its labels yet, so refusing beats ignoring.
            self.at(
                ctx,
                "spec.workloadSelector",
                "not supported by shunt: a DestinationRule with workloadSelector applies only to the selected workloads' proxies, and shunt originates TLS at the waypoint; remove it to apply the rule to every client",
            );
        }
        if let Some(tp) = &r.spec.traffic_policy {
            check(self, "spec.trafficPolicy".into(), tp);
        }
        for (i, s) in r.spec.subsets.iter().enumerate() {
            if let Some(tp) = &s.traffic_policy {
                check(self, format!("spec.subsets[{i}].trafficPolicy"), tp);
            }
        }
    }

    /// `exportTo` as Istio validates it (`~` only for ServiceEntries).
    fn export_to(&mut self, ctx: &Ctx, list: &[String], ns: &str, allow_none: bool) {
        for (i, msg) in crate::model::visibility::validate(list, ns, allow_none) {
            let field = match i {
                Some(i) => format!("spec.exportTo[{i}]"),
                None => "spec.exportTo".into(),
            };
            self.at(ctx, field, msg);
        }
    }

    fn validate_tls(&mut self, ctx: &Ctx, path: &str, t: &ClientTls) {
        if t.ca_crl.is_some() {
            // Ignoring a revocation list would accept revoked certificates.
            self.at(
                ctx,
                format!("{path}.caCrl"),
                "not supported by shunt: certificate revocation lists are not checked; remove it or revoke by rotating caCertificates",
            );
        }
        if t.mode == TlsMode::Mutual && t.credential_name.is_none() {
            for (f, v) in [
                ("clientCertificate", &t.client_certificate),
                ("privateKey", &t.private_key),
            ] {
                if v.as_deref().unwrap_or("").is_empty() {
                    self.at(
                        ctx,
                        format!("{path}.{f}"),
                        "required when mode is MUTUAL (or set credentialName)",
                    );
                }
            }
        }
    }

    fn validate_we(&mut self, r: &WorkloadEntry, ctx: &Ctx) {
        let a = &r.spec.address;
        let ip = a.parse::<IpAddr>().is_ok() || a.starts_with("unix://");
        if !a.is_empty() && !ip {
            // Istio allows a DNS name (resolved by the proxies that use the
            // entry); an enrolled workload needs its address to check the
            // source of its packets.
            let enrolled = [labels::CGROUP_ANNOTATION, labels::CGROUP_TREE_ANNOTATION]
                .iter()
                .any(|a| r.metadata.annotations.contains_key(*a));
            if enrolled {
                self.at(
                    ctx,
                    "spec.address",
                    format!(
                        "invalid value {a:?}: a workload enrolled with {} needs an IP address",
                        labels::CGROUP_ANNOTATION
                    ),
                );
            } else if !is_host(a)
                || a.contains('*')
                // An all-numeric last label is a mistyped IPv4, not a name.
                || a.trim_end_matches('.').rsplit('.').next().is_some_and(|l| l.bytes().all(|c| c.is_ascii_digit()))
            {
                self.at(
                    ctx,
                    "spec.address",
                    format!("invalid value {a:?}: expected an IP address or DNS name"),
                );
            }
        }
        for a in [labels::CGROUP_ANNOTATION, labels::CGROUP_TREE_ANNOTATION] {
            if let Some(cg) = r.metadata.annotations.get(a) {
                if cg.trim().is_empty() || cg.split('/').any(|c| c == "..") {
                    self.at(
                        ctx,
                        format!("metadata.annotations.{a}"),
                        format!("invalid value {cg:?}: expected a cgroup path without \"..\""),
                    );
                }
            }
        }
    }

    fn validate_ap(&mut self, r: &AuthorizationPolicy, ctx: &Ctx) {
        if let Some(a) = &r.spec.action {
            if !["ALLOW", "DENY", "AUDIT", "CUSTOM"].contains(&a.as_str()) {
                self.at(
                    ctx,
                    "spec.action",
                    format!("invalid value {a:?}: expected one of ALLOW, DENY, AUDIT, CUSTOM"),
                );
            }
        }
        for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
            for (j, from) in rule.from.iter().enumerate() {
                let s = &from.source;
                for (name, list) in [
                    ("ipBlocks", &s.ip_blocks),
                    ("notIpBlocks", &s.not_ip_blocks),
                    ("remoteIpBlocks", &s.remote_ip_blocks),
                    ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
                ] {
                    for (k, b) in list.iter().enumerate() {
                        if b.parse::<IpAddr>().is_err() && b.parse::<ipnet::IpNet>().is_err() {
                            self.at(
                                ctx,
                                format!("spec.rules[{i}].from[{j}].source.{name}[{k}]"),
                                format!("invalid value {b:?}: expected an IP address or CIDR"),
                            );
                        }
                    }
                }
            }
        }
    }

    fn validate_gw(&mut self, r: &Gateway, ctx: &Ctx) {
        for (i, a) in r.spec.addresses.iter().enumerate() {
            match a.kind.as_deref().unwrap_or("IPAddress") {
                "IPAddress" => {
                    if a.value.parse::<IpAddr>().is_err() {
                        self.at(
                            ctx,
                            format!("spec.addresses[{i}].value"),
                            format!("invalid value {:?}: expected an IP address", a.value),
                        );
                    }
                }
                "Hostname" => {}
                other => self.at(
                    ctx,
                    format!("spec.addresses[{i}].type"),
                    format!("invalid value {other:?}: expected one of IPAddress, Hostname"),
                ),
            }
        }
        if let Some(v) = r.label(labels::WAYPOINT_FOR) {
            if !["service", "workload", "all", "none"].contains(&v) {
                self.at(
                    ctx,
                    format!("metadata.labels.{}", labels::WAYPOINT_FOR),
                    format!("invalid value {v:?}: expected one of service, workload, all, none"),
                );
            }
        }
    }

    /// Checks that need more than one object.
    fn cross_checks(&mut self) {
        // Istio allocates addresses for wildcard hosts only with resolution
        // DYNAMIC_DNS, where the waypoint learns the name from SNI or Host;
        // with any other resolution a bound wildcard could not be routed.
        let mut found = Vec::new();
        for se in &self.cfg.service_entries {
            if se.spec.resolution() == Resolution::DynamicDns {
                continue;
            }
            if let WaypointRef::Gateway { gateway, .. } = self.cfg.waypoint_ref(se) {
                for (i, h) in se.spec.hosts.iter().enumerate() {
                    if h.starts_with('*') {
                        found.push(Problem {
                            file: se.origin.file.clone(),
                            doc: Some(se.origin.doc),
                            object: Some(format!("ServiceEntry {}", se.key())),
                            field: Some(format!("spec.hosts[{i}]")),
                            message: format!(
                                "wildcard host {h:?} can be bound to a waypoint only with resolution DYNAMIC_DNS (bound to {gateway} by {})",
                                labels::USE_WAYPOINT
                            ),
                        });
                    }
                }
            }
        }
        self.problems.extend(found);
        // Keep problems in directory order for readers.
        self.problems
            .sort_by(|a, b| (&a.file, a.doc).cmp(&(&b.file, b.doc)));
    }
}

/// serde_path_to_error renders an empty path as "."; shunt omits it.
fn path_of(p: &serde_path_to_error::Path) -> Option<String> {
    let s = p.to_string();
    (s != "." && !s.is_empty()).then_some(s)
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Kubernetes object names: DNS subdomain (lowercase labels joined by dots).
fn is_object_name(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

/// A ServiceEntry host: a DNS name, `*`, or `*.suffix`.
#[cfg(test)]
pub(crate) fn quote_flow_ipv6_for_tests(text: &str) -> Option<String> {
    quote_flow_ipv6(text)
}

/// The documents of `text` up to the first that does not parse, and its
/// error (libyaml cannot resume after a syntax error).
fn values_of(text: &str) -> (Vec<Value>, Option<serde_yaml_ng::Error>) {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        match Value::deserialize(doc) {
            Ok(v) => out.push(v),
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

/// YAML 1.2 (and so `kubectl`) reads `[::1, fd00::/8]` as two strings;
/// libyaml, a YAML 1.1 parser, refuses a plain scalar starting with `::`.
/// Quotes such scalars inside flow collections; `None` when there are none.
/// Only used on text libyaml refused, so valid input is never rewritten.
fn quote_flow_ipv6(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len() + 16);
    let (mut depth, mut changed) = (0usize, false);
    let mut quote: Option<u8> = None;
    let mut token_start = false; // just after `[`, `{` or `,` (and spaces)
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            }
            let len = text[i..].chars().next().map_or(1, char::len_utf8);
            out.push_str(&text[i..i + len]);
            i += len;
            continue;
        }
        match c {
            b'"' | b'\'' => {
                quote = Some(c);
                token_start = false;
            }
            b'#' if i == 0 || b[i - 1].is_ascii_whitespace() => {
                // A comment: copy to the end of the line.
                let end = text[i..].find('\n').map_or(b.len(), |n| i + n);
                out.push_str(&text[i..end]);
                i = end;
                continue;
            }
            b'[' | b'{' => {
                depth += 1;
                token_start = true;
            }
            b']' | b'}' => {
                depth = depth.saturating_sub(1);
                token_start = false;
            }
            b',' if depth > 0 => token_start = true,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            b':' if depth > 0 && token_start && b.get(i + 1) == Some(&b':') => {
                let end = text[i..]
                    .find(|ch: char| matches!(ch, ',' | ']' | '}') || ch.is_whitespace())
                    .map_or(b.len(), |n| i + n);
                out.push('"');
                out.push_str(&text[i..end]);
                out.push('"');
                changed = true;
                token_start = false;
                i = end;
                continue;
            }
            _ => token_start = false,
        }
        // Multi-byte UTF-8 is copied whole (only ASCII is inspected above).
        let len = text[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&text[i..i + len]);
        i += len;
    }
    changed.then_some(out)
}

pub(crate) fn is_host(h: &str) -> bool {
    let rest = if h == "*" {
        return true;
    } else if let Some(r) = h.strip_prefix("*.") {
        r
    } else {
        h
    };
    !rest.is_empty()
        && rest.len() <= 253
        && rest.trim_end_matches('.').split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

//! Reading and validating a config directory.
//!
//! Two stages: each file is parsed and its objects validated on their own
//! ([`ParsedFile`], cached by [`Parser`] under the file's path and content
//! hash, files parsed in parallel); then the whole set is assembled into a
//! [`Config`] with the checks that need more than one object (duplicate
//! names, wildcard hosts bound to a waypoint through a Namespace label).

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_yaml_ng::Value;

use super::changes::ObjectRef;
use super::meta::ObjectMeta;
use super::strict::Strict;
use super::*;

/// The YAML files of a directory at one moment, with a content hash.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// Sorted by file name. The bytes are shared: a file that did not
    /// change is held once by consecutive snapshots (and by the config in
    /// force, which serves them on the admin `/config`).
    pub files: Vec<(PathBuf, bytes::Bytes)>,
    pub digest: u64,
    /// Content hash of each file, in `files` order (the parse cache's key).
    hashes: Vec<u64>,
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

fn content_hash(b: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl Snapshot {
    pub fn read(dir: &Path) -> Result<Snapshot, ConfigError> {
        Snapshot::read_reusing(dir, None, |_| false)
    }

    /// [`Snapshot::read`], but the files of `prev` for which `unchanged`
    /// holds are taken from it, neither read nor hashed again.
    pub fn read_reusing(
        dir: &Path,
        prev: Option<&Snapshot>,
        unchanged: impl Fn(&Path) -> bool,
    ) -> Result<Snapshot, ConfigError> {
        let old: HashMap<&Path, usize> = prev
            .map(|s| {
                s.files
                    .iter()
                    .enumerate()
                    .map(|(i, (p, _))| (p.as_path(), i))
                    .collect()
            })
            .unwrap_or_default();
        let mut files = Vec::new();
        let mut hashes = Vec::new();
        let mut problems = Vec::new();
        for path in list_yaml(dir)? {
            if let (Some(&i), Some(prev)) = (old.get(path.as_path()), prev) {
                if unchanged(&path) {
                    files.push((path, prev.files[i].1.clone()));
                    hashes.push(prev.hashes[i]);
                    continue;
                }
            }
            match std::fs::read(&path) {
                Ok(b) => {
                    hashes.push(content_hash(&b));
                    files.push((path, bytes::Bytes::from(b)));
                }
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
        Ok(Snapshot::with_hashes(files, hashes))
    }

    /// A snapshot of `files` (sorted by name), with their content hash.
    pub fn new(files: Vec<(PathBuf, Vec<u8>)>) -> Snapshot {
        let hashes: Vec<u64> = files.iter().map(|(_, b)| content_hash(b)).collect();
        let files = files
            .into_iter()
            .map(|(p, b)| (p, bytes::Bytes::from(b)))
            .collect();
        Snapshot::with_hashes(files, hashes)
    }

    fn with_hashes(files: Vec<(PathBuf, bytes::Bytes)>, hashes: Vec<u64>) -> Snapshot {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for ((p, _), c) in files.iter().zip(&hashes) {
            p.hash(&mut h);
            c.hash(&mut h);
        }
        Snapshot {
            files,
            digest: h.finish(),
            hashes,
        }
    }

    /// Same files with the same contents, by file name: what `shunt get`
    /// compares (the agent and the operator may spell the directory
    /// differently).
    pub fn same_files(&self, other: &Snapshot) -> bool {
        let names = |s: &Snapshot| -> Vec<(Option<std::ffi::OsString>, u64)> {
            s.files
                .iter()
                .zip(&s.hashes)
                .map(|((p, _), h)| (p.file_name().map(|n| n.to_os_string()), *h))
                .collect()
        };
        names(self) == names(other)
    }

    /// Parses and validates every file; all problems or a `Config`.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        Arc::new(self.clone()).into_config()
    }

    /// [`Snapshot::parse`] without copying the files: the config keeps this
    /// snapshot as its source (at 100,000 entries the copy was 30 MB).
    pub fn into_config(self: Arc<Self>) -> Result<Config, ConfigError> {
        Parser::default().parse(self)
    }
}

/// Parses snapshots, re-parsing only the files whose content changed since
/// the previous call: each file's parse (its objects and their own problems)
/// is kept under its path and content hash, and an unchanged file's objects
/// reach the new [`Config`] as the same `Arc`s (see
/// [`Config::changed_since`]). The checks across files run on the whole set
/// every time, so validation is the same as parsing from cold. Holds only
/// the files of the last snapshot parsed, valid or not.
#[derive(Default)]
pub struct Parser {
    cache: HashMap<PathBuf, Arc<ParsedFile>>,
}

impl Parser {
    /// Parses and validates `snap` (see [`Snapshot::parse`]).
    pub fn parse(&mut self, snap: Arc<Snapshot>) -> Result<Config, ConfigError> {
        let mut parsed: Vec<Option<Arc<ParsedFile>>> = snap
            .files
            .iter()
            .zip(&snap.hashes)
            .map(|((path, _), h)| self.cache.get(path).filter(|f| f.hash == *h).cloned())
            .collect();
        let todo: Vec<usize> = (0..parsed.len()).filter(|i| parsed[*i].is_none()).collect();
        for (i, f) in parse_files(&snap, &todo, &self.cache) {
            parsed[i] = Some(f);
        }
        let files: Vec<Arc<ParsedFile>> = parsed.into_iter().flatten().collect();
        self.cache = snap
            .files
            .iter()
            .zip(&files)
            .map(|((p, _), f)| (p.clone(), f.clone()))
            .collect();
        assemble(snap, files)
    }
}

/// Parses the files of `snap` at `todo` on up to one thread per core.
fn parse_files(
    snap: &Snapshot,
    todo: &[usize],
    prev: &HashMap<PathBuf, Arc<ParsedFile>>,
) -> Vec<(usize, Arc<ParsedFile>)> {
    let one = |i: usize| {
        let (path, bytes) = &snap.files[i];
        let prev = prev.get(path).map(|f| &**f);
        (
            i,
            Arc::new(ParsedFile::parse(path, bytes, snap.hashes[i], prev)),
        )
    };
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(todo.len());
    if threads <= 1 {
        return todo.iter().map(|&i| one(i)).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut out = Vec::new();
                    loop {
                        let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&i) = todo.get(n) else { break };
                        out.push(one(i));
                    }
                    out
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| match w.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    })
}

/// One object of a file, shared by every [`Config`] that holds it.
#[derive(Clone, Debug)]
pub(crate) enum Object {
    Namespace(Arc<Namespace>),
    ServiceEntry(Arc<ServiceEntry>),
    DestinationRule(Arc<DestinationRule>),
    WorkloadEntry(Arc<WorkloadEntry>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    Gateway(Arc<Gateway>),
}

impl Object {
    /// (kind, namespace or "" for a Namespace, name, origin).
    fn id(&self) -> (&'static str, &str, &str, &Origin) {
        fn of<'a, S>(
            k: &'static str,
            r: &'a Resource<S>,
        ) -> (&'static str, &'a str, &'a str, &'a Origin) {
            (k, r.namespace(), r.name(), &r.origin)
        }
        match self {
            Object::Namespace(r) => ("Namespace", "", r.name(), &r.origin),
            Object::ServiceEntry(r) => of("ServiceEntry", r),
            Object::DestinationRule(r) => of("DestinationRule", r),
            Object::WorkloadEntry(r) => of("WorkloadEntry", r),
            Object::AuthorizationPolicy(r) => of("AuthorizationPolicy", r),
            Object::Gateway(r) => of("Gateway", r),
        }
    }

    /// The same object (both `Arc`s point to one parse).
    pub(crate) fn ptr_eq(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Namespace(a), Object::Namespace(b)) => Arc::ptr_eq(a, b),
            (Object::ServiceEntry(a), Object::ServiceEntry(b)) => Arc::ptr_eq(a, b),
            (Object::DestinationRule(a), Object::DestinationRule(b)) => Arc::ptr_eq(a, b),
            (Object::WorkloadEntry(a), Object::WorkloadEntry(b)) => Arc::ptr_eq(a, b),
            (Object::AuthorizationPolicy(a), Object::AuthorizationPolicy(b)) => Arc::ptr_eq(a, b),
            (Object::Gateway(a), Object::Gateway(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// Equal in every field (not necessarily the same parse).
    fn same_value(&self, other: &Object) -> bool {
        match (self, other) {
            (Object::Namespace(a), Object::Namespace(b)) => a == b,
            (Object::ServiceEntry(a), Object::ServiceEntry(b)) => a == b,
            (Object::DestinationRule(a), Object::DestinationRule(b)) => a == b,
            (Object::WorkloadEntry(a), Object::WorkloadEntry(b)) => a == b,
            (Object::AuthorizationPolicy(a), Object::AuthorizationPolicy(b)) => a == b,
            (Object::Gateway(a), Object::Gateway(b)) => a == b,
            _ => false,
        }
    }

    pub(crate) fn key(&self) -> ObjectRef {
        let (kind, ns, name, _) = self.id();
        let key = ObjectKey::new(ns, name);
        match self {
            Object::Namespace(_) => ObjectRef::Namespace(name.to_string()),
            Object::ServiceEntry(_) => ObjectRef::ServiceEntry(key),
            Object::DestinationRule(_) => ObjectRef::DestinationRule(key),
            Object::WorkloadEntry(_) => ObjectRef::WorkloadEntry(key),
            Object::AuthorizationPolicy(_) => ObjectRef::AuthorizationPolicy(key),
            Object::Gateway(_) => {
                debug_assert_eq!(kind, "Gateway");
                ObjectRef::Gateway(key)
            }
        }
    }
}

/// What one file holds on its own: its objects (those whose metadata is
/// valid, in document order) and every problem found in the file alone.
#[derive(Debug)]
pub(crate) struct ParsedFile {
    pub(crate) path: Arc<Path>,
    hash: u64,
    /// `Some` for `mesh.yaml` / `mesh.yml` when valid.
    mesh: Option<MeshConfig>,
    pub(crate) objects: Vec<Object>,
    problems: Vec<Problem>,
    /// Kinds (`Kind.group`) ignored, with their object counts.
    ignored_kinds: BTreeMap<String, usize>,
}

impl ParsedFile {
    /// Parses one file. An object equal to its parse in `prev` (the same
    /// file's previous content) is taken from there, so that it stays the
    /// same `Arc` (see [`Config::changed_since`]).
    fn parse(path: &Path, bytes: &[u8], hash: u64, prev: Option<&ParsedFile>) -> ParsedFile {
        let mut f = Self::parse_new(path, bytes, hash);
        if let Some(prev) = prev {
            let old: HashMap<ObjectRef, &Object> =
                prev.objects.iter().map(|o| (o.key(), o)).collect();
            for o in &mut f.objects {
                if let Some(p) = old.get(&o.key()) {
                    if p.same_value(o) {
                        *o = (*p).clone();
                    }
                }
            }
        }
        f
    }

    fn parse_new(path: &Path, bytes: &[u8], hash: u64) -> ParsedFile {
        Self::parse_with(path, bytes, hash, true)
    }

    /// `fast`: try [`ParsedFile::parse_fast`] first (off only in tests that
    /// compare the two paths).
    fn parse_with(path: &Path, bytes: &[u8], hash: u64, fast: bool) -> ParsedFile {
        let file: Arc<Path> = Arc::from(path);
        let mut b = Builder::new(file.clone(), hash);
        let is_mesh = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| MESH_FILES.contains(&n));
        let text = match std::str::from_utf8(bytes) {
            Ok(t) => t,
            Err(e) => {
                b.problem(None, None, None, format!("not UTF-8: {e}"));
                return b.out;
            }
        };
        if is_mesh {
            b.mesh(text);
            return b.out;
        }
        if let Some(f) = fast.then(|| Self::parse_fast(&file, text, hash)).flatten() {
            return f;
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
                file: file.clone(),
                doc: i + 1,
            };
            if !matches!(v, Value::Null) {
                b.document(v, origin);
            }
        }
        if let Some(e) = err {
            b.problem(Some(n + 1), None, None, e.to_string());
        }
        b.out
    }
}

impl ParsedFile {
    /// The fast path: every document deserialized straight from libyaml's
    /// events ([`Strict`]), without a value tree. `None` as soon as one
    /// document needs the tree (it does not deserialize, or is of a kind or
    /// version shunt does not read): the file is then parsed the slow way
    /// from the start, so its problems read as they always have. Only
    /// `apiVersion` and `kind` first, in either order, take this path.
    fn parse_fast(file: &Arc<Path>, text: &str, hash: u64) -> Option<ParsedFile> {
        let mut b = Builder::new(file.clone(), hash);
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                doc: i + 1,
            };
            // An empty document is skipped, as the slow path skips a null.
            if let Some(f) = Option::<Fast>::deserialize(Strict::new(doc)).ok()? {
                b.fast(f, origin);
            }
        }
        Some(b.out)
    }
}

/// One document of a kind shunt reads, deserialized on the fast path.
struct Fast {
    kind: KindInfo,
    doc: TypedDoc,
}

/// A document deserialized into its kind's type, by either path; checked
/// and kept by [`Builder::object`].
enum TypedDoc {
    Namespace(Doc<Value>),
    ServiceEntry(Doc<ServiceEntrySpec>),
    /// Boxed: a DestinationRuleSpec is ten times the others' size.
    DestinationRule(Box<Doc<DestinationRuleSpec>>),
    WorkloadEntry(Doc<WorkloadEntrySpec>),
    AuthorizationPolicy(Doc<authz::AuthorizationPolicySpec>),
    Gateway(Doc<GatewaySpec>),
}

impl TypedDoc {
    /// Its `kind` and metadata.
    fn head(&self) -> (&str, &ObjectMeta) {
        match self {
            TypedDoc::Namespace(d) => (&d.kind, &d.metadata),
            TypedDoc::ServiceEntry(d) => (&d.kind, &d.metadata),
            TypedDoc::DestinationRule(d) => (&d.kind, &d.metadata),
            TypedDoc::WorkloadEntry(d) => (&d.kind, &d.metadata),
            TypedDoc::AuthorizationPolicy(d) => (&d.kind, &d.metadata),
            TypedDoc::Gateway(d) => (&d.kind, &d.metadata),
        }
    }
}

impl<'de> Deserialize<'de> for Fast {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Fast, D::Error> {
        d.deserialize_map(FastVisitor)
    }
}

struct FastVisitor;

impl<'de> serde::de::Visitor<'de> for FastVisitor {
    type Value = Fast;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Fast, A::Error> {
        use serde::de::Error;
        let mut entry = || -> Result<(String, String), A::Error> {
            let k = m
                .next_key::<String>()?
                .ok_or_else(|| A::Error::custom("empty"))?;
            Ok((k, m.next_value::<String>()?))
        };
        let (k1, v1) = entry()?;
        let (k2, v2) = entry()?;
        let (api, kind) = match (k1.as_str(), k2.as_str()) {
            ("apiVersion", "kind") => (v1, v2),
            ("kind", "apiVersion") => (v2, v1),
            _ => return Err(A::Error::custom("apiVersion and kind are not first")),
        };
        let (group, version) = api.rsplit_once('/').unwrap_or(("", api.as_str()));
        let info = match kind_of(group, &kind) {
            Some(k) if k.versions.contains(&version) => k,
            _ => return Err(A::Error::custom("a kind or version for the slow path")),
        };
        fn rest<'de, S: Deserialize<'de> + Default, A: serde::de::MapAccess<'de>>(
            m: A,
            api_version: String,
            kind: String,
        ) -> Result<Doc<S>, A::Error> {
            let r = Rest::<S>::deserialize(serde::de::value::MapAccessDeserializer::new(m))?;
            Ok(Doc {
                api_version,
                kind,
                metadata: r.metadata,
                spec: r.spec,
                status: r.status,
            })
        }
        let doc = match kind.as_str() {
            "Namespace" => TypedDoc::Namespace(rest(m, api, kind)?),
            "ServiceEntry" => TypedDoc::ServiceEntry(rest(m, api, kind)?),
            "DestinationRule" => TypedDoc::DestinationRule(Box::new(rest(m, api, kind)?)),
            "WorkloadEntry" => TypedDoc::WorkloadEntry(rest(m, api, kind)?),
            "AuthorizationPolicy" => TypedDoc::AuthorizationPolicy(rest(m, api, kind)?),
            "Gateway" => TypedDoc::Gateway(rest(m, api, kind)?),
            _ => unreachable!("kind_of knows these kinds only"),
        };
        Ok(Fast { kind: info, doc })
    }
}

/// [`Doc`] after its `apiVersion` and `kind`.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Rest<S> {
    #[serde(default)]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<S>,
    #[serde(default)]
    status: Option<Value>,
}

/// What the parse needs to know of a kind shunt reads (both paths read it
/// here, so they cannot disagree).
#[derive(Clone, Copy)]
struct KindInfo {
    versions: &'static [&'static str],
    namespaced: bool,
    /// A missing `spec` is a problem (else the spec's default).
    spec_required: bool,
}

/// `None` for a kind shunt ignores.
fn kind_of(group: &str, kind: &str) -> Option<KindInfo> {
    const ISTIO3: &[&str] = &["v1", "v1beta1", "v1alpha3"];
    const V1B1: &[&str] = &["v1", "v1beta1"];
    let k = |versions, namespaced, spec_required| {
        Some(KindInfo {
            versions,
            namespaced,
            spec_required,
        })
    };
    match (group, kind) {
        ("", "Namespace") => k(&["v1"], false, false),
        ("networking.istio.io", "ServiceEntry")
        | ("networking.istio.io", "DestinationRule")
        | ("networking.istio.io", "WorkloadEntry") => k(ISTIO3, true, true),
        ("security.istio.io", "AuthorizationPolicy") => k(V1B1, true, false),
        ("gateway.networking.k8s.io", "Gateway") => k(V1B1, true, true),
        _ => None,
    }
}

/// The [`Config`] of `files` (the parses of `snap`'s files, in order), or
/// every problem: the files' own and those of the checks across files.
fn assemble(snap: Arc<Snapshot>, files: Vec<Arc<ParsedFile>>) -> Result<Config, ConfigError> {
    let mut cfg = Config {
        digest: snap.digest,
        source: Some(snap),
        ..Config::default()
    };
    // Problems with their rank within one document: a duplicate name is
    // reported before the object's own problems (as when it was found while
    // reading the object), checks across objects after them.
    let mut problems: Vec<(u8, Problem)> = Vec::new();
    let total: usize = files.iter().map(|f| f.objects.len()).sum();
    // foldhash: SipHash over the three names was ~8% of an edit at 100k.
    let mut seen: HashMap<(&'static str, &str, &str), &Origin, foldhash::fast::RandomState> =
        HashMap::with_capacity_and_hasher(total, Default::default());
    let mut warned_kinds = HashSet::new();
    for f in &files {
        problems.extend(f.problems.iter().map(|p| (1, p.clone())));
        if let Some(m) = &f.mesh {
            cfg.mesh = m.clone();
        }
        for (k, n) in &f.ignored_kinds {
            *cfg.ignored_kinds.entry(k.clone()).or_default() += n;
            if warned_kinds.insert(k.as_str()) {
                tracing::warn!(kind = %k, file = %f.path.display(), "ignoring objects of unsupported kind");
            }
        }
        for o in &f.objects {
            let (kind, ns, name, origin) = o.id();
            if let Some(first) = seen.get(&(kind, ns, name)) {
                problems.push((
                    0,
                    Problem {
                        file: origin.file.to_path_buf(),
                        doc: Some(origin.doc),
                        object: Some(if kind == "Namespace" {
                            format!("{kind} {name}")
                        } else {
                            format!("{kind} {ns}/{name}")
                        }),
                        field: Some("metadata.name".into()),
                        message: format!("duplicate {kind}, first defined in {first}"),
                    },
                ));
                continue;
            }
            seen.insert((kind, ns, name), origin);
            match o {
                Object::Namespace(r) => {
                    cfg.namespaces.insert(r.name().to_string(), r.clone());
                }
                Object::ServiceEntry(r) => cfg.service_entries.push(r.clone()),
                Object::DestinationRule(r) => cfg.destination_rules.push(r.clone()),
                Object::WorkloadEntry(r) => cfg.workload_entries.push(r.clone()),
                Object::AuthorizationPolicy(r) => cfg.authorization_policies.push(r.clone()),
                Object::Gateway(r) => cfg.gateways.push(r.clone()),
            }
        }
    }
    drop(seen);
    problems.extend(cross_checks(&cfg).into_iter().map(|p| (2, p)));
    if problems.is_empty() {
        cfg.parsed = files;
        return Ok(cfg);
    }
    // Keep problems in directory order for readers.
    problems.sort_by(|(ra, a), (rb, b)| (&a.file, a.doc, ra).cmp(&(&b.file, b.doc, rb)));
    Err(ConfigError::Invalid(
        problems.into_iter().map(|(_, p)| p).collect(),
    ))
}

/// Checks that need more than one object.
fn cross_checks(cfg: &Config) -> Vec<Problem> {
    // Istio allocates addresses for wildcard hosts only with resolution
    // DYNAMIC_DNS, where the waypoint learns the name from SNI or Host;
    // with any other resolution a bound wildcard could not be routed.
    let mut found = Vec::new();
    for se in &cfg.service_entries {
        if se.spec.resolution() == Resolution::DynamicDns
            || !se.spec.hosts.iter().any(|h| h.starts_with('*'))
        {
            continue;
        }
        if let WaypointRef::Gateway { gateway, .. } = cfg.waypoint_ref(se) {
            for (i, h) in se.spec.hosts.iter().enumerate() {
                if h.starts_with('*') {
                    found.push(Problem {
                        file: se.origin.file.to_path_buf(),
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
    found
}

/// Parses one file: its objects and problems.
struct Builder {
    file: Arc<Path>,
    out: ParsedFile,
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
    fn new(file: Arc<Path>, hash: u64) -> Builder {
        Builder {
            file: file.clone(),
            out: ParsedFile {
                path: file,
                hash,
                mesh: None,
                objects: Vec::new(),
                problems: Vec::new(),
                ignored_kinds: BTreeMap::new(),
            },
        }
    }

    fn problem(
        &mut self,
        doc: Option<usize>,
        object: Option<String>,
        field: Option<String>,
        message: String,
    ) {
        self.out.problems.push(Problem {
            file: self.file.to_path_buf(),
            doc,
            object,
            field,
            message,
        });
    }

    fn at(&mut self, ctx: &Ctx, field: impl Into<String>, message: impl Into<String>) {
        let field = field.into();
        self.out.problems.push(Problem {
            file: ctx.origin.file.to_path_buf(),
            doc: Some(ctx.origin.doc),
            object: Some(ctx.object.clone()),
            field: (!field.is_empty()).then_some(field),
            message: message.into(),
        });
    }

    fn mesh(&mut self, text: &str) {
        let path = self.file.clone();
        // Through a Value so that messages carry the field path only once.
        let v: Value = match serde_yaml_ng::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                self.problem(None, None, None, e.to_string());
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
                self.out.mesh = Some(m);
            }
            Err(e) => {
                let field = path_of(e.path());
                self.problem(None, None, field, e.into_inner().to_string());
            }
        }
    }

    fn document(&mut self, v: Value, origin: Origin) {
        let doc = Some(origin.doc);
        let Value::Mapping(m) = &v else {
            self.problem(
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
            self.problem(doc, None, Some(which.into()), "missing".into());
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
        let Some(info) = kind_of(group, &kind) else {
            *self
                .out
                .ignored_kinds
                .entry(format!("{kind}.{group}"))
                .or_default() += 1;
            return;
        };
        let (versions, spec) = (info.versions, info.spec_required);
        let object = if info.namespaced {
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
        let doc = match kind.as_str() {
            "Namespace" => self.typed(v, &ctx).map(TypedDoc::Namespace),
            "ServiceEntry" => self.typed(v, &ctx).map(TypedDoc::ServiceEntry),
            "DestinationRule" => self
                .typed(v, &ctx)
                .map(|d| TypedDoc::DestinationRule(Box::new(d))),
            "WorkloadEntry" => self.typed(v, &ctx).map(TypedDoc::WorkloadEntry),
            "AuthorizationPolicy" => self.typed(v, &ctx).map(TypedDoc::AuthorizationPolicy),
            "Gateway" => self.typed(v, &ctx).map(TypedDoc::Gateway),
            _ => unreachable!("kind matched above"),
        };
        if let Some(doc) = doc {
            self.object(doc, &ctx, spec);
        }
    }

    /// Deserializes a document's tree into its typed form; `None` (and the
    /// problem, at its field) when it does not fit.
    fn typed<S: DeserializeOwned + Default>(&mut self, v: Value, ctx: &Ctx) -> Option<Doc<S>> {
        match serde_path_to_error::deserialize(v) {
            Ok(d) => Some(d),
            Err(e) => {
                let field = path_of(e.path()).unwrap_or_default();
                self.at(ctx, field, e.into_inner().to_string());
                None
            }
        }
    }

    /// A fast path's document (see [`ParsedFile::parse_fast`]), named as
    /// [`Builder::document`] names it from the tree.
    fn fast(&mut self, f: Fast, origin: Origin) {
        let (kind, meta) = f.doc.head();
        let name = match meta.name.as_str() {
            "" => "<unnamed>",
            n => n,
        };
        let object = if f.kind.namespaced {
            let ns = match meta.namespace.as_deref() {
                None | Some("") => "default",
                Some(ns) => ns,
            };
            format!("{kind} {ns}/{name}")
        } else {
            format!("{kind} {name}")
        };
        let ctx = Ctx {
            origin: &origin,
            object,
        };
        self.object(f.doc, &ctx, f.kind.spec_required);
    }

    /// Checks a typed document's metadata, validates it and keeps it (both
    /// paths end here).
    fn object(&mut self, doc: TypedDoc, ctx: &Ctx, spec_required: bool) {
        let obj = match doc {
            TypedDoc::Namespace(d) => self
                .resource(d, ctx, spec_required, "Namespace")
                .map(|r| Object::Namespace(Arc::new(r))),
            TypedDoc::ServiceEntry(d) => {
                self.resource(d, ctx, spec_required, "ServiceEntry")
                    .map(|r| {
                        self.validate_se(&r, ctx);
                        Object::ServiceEntry(Arc::new(r))
                    })
            }
            TypedDoc::DestinationRule(d) => self
                .resource(*d, ctx, spec_required, "DestinationRule")
                .map(|r| {
                    self.validate_dr(&r, ctx);
                    Object::DestinationRule(Arc::new(r))
                }),
            TypedDoc::WorkloadEntry(d) => self
                .resource(d, ctx, spec_required, "WorkloadEntry")
                .map(|r| {
                    self.validate_we(&r, ctx);
                    Object::WorkloadEntry(Arc::new(r))
                }),
            TypedDoc::AuthorizationPolicy(d) => self
                .resource(d, ctx, spec_required, "AuthorizationPolicy")
                .map(|r| {
                    self.validate_ap(&r, ctx);
                    Object::AuthorizationPolicy(Arc::new(r))
                }),
            TypedDoc::Gateway(d) => self.resource(d, ctx, spec_required, "Gateway").map(|r| {
                self.validate_gw(&r, ctx);
                Object::Gateway(Arc::new(r))
            }),
        };
        self.out.objects.extend(obj);
    }

    /// Checks a deserialized document's metadata; `None` when it has
    /// problems that make it unusable.
    fn resource<S: Default>(
        &mut self,
        doc: Doc<S>,
        ctx: &Ctx,
        spec_required: bool,
        kind: &'static str,
    ) -> Option<Resource<S>> {
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

/// `cargo xtask scale`'s generated config, its one home. It takes only the
/// seed's names from `shunt_testbed` (no `shunt_agent` type crosses, which
/// is why unit tests otherwise keep away from the testbed).
#[cfg(test)]
#[path = "../../../xtask/src/scale_config.rs"]
#[allow(dead_code)]
mod scale_gen;

#[cfg(test)]
mod fast_path_tests {
    //! The fast path must read exactly what the value tree reads whenever it
    //! succeeds (it gives up on anything else; see `strict.rs`).
    use super::*;

    /// Objects, problems and ignored kinds, as text.
    fn view(f: &ParsedFile) -> String {
        format!("{:#?}\n{:#?}\n{:?}", f.objects, f.problems, f.ignored_kinds)
    }

    fn both(text: &str) -> (Option<String>, String) {
        let path = Path::new("dir/x.yaml");
        let file: Arc<Path> = Arc::from(path);
        let fast = ParsedFile::parse_fast(&file, text, 0).map(|f| view(&f));
        let slow = view(&ParsedFile::parse_with(path, text.as_bytes(), 0, false));
        (fast, slow)
    }

    /// Every YAML file of the repository (examples, fixtures, deploy).
    fn corpus() -> Vec<(PathBuf, String)> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut out = Vec::new();
        let mut dirs = vec![root];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().to_string();
                if p.is_dir() {
                    if !name.starts_with('.') && name != "target" {
                        dirs.push(p);
                    }
                } else if name.ends_with(".yaml") || name.ends_with(".yml") {
                    if let Ok(t) = std::fs::read_to_string(&p) {
                        out.push((p, t));
                    }
                }
            }
        }
        out.sort();
        out
    }

    const SE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: se-1
  namespace: ns-1
  labels:
    istio.io/use-waypoint: egress-gateway
    team: a
  creationTimestamp: \"2026-01-02T03:04:05Z\"
spec:
  hosts:
  - s1.example
  - \"*.w.example\"
  addresses: [240.240.1.1/32, 10.0.0.0/8]
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - {number: 443, name: tls, protocol: TLS, targetPort: 8443}
  resolution: DNS
  location: MESH_EXTERNAL
  exportTo: [\".\"]
  endpoints:
  - address: 10.1.2.3
    ports: {http: 8080}
    labels: {a: b}
---
kind: DestinationRule
apiVersion: networking.istio.io/v1
metadata: {name: dr-1, namespace: ns-1}
spec:
  host: s1.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: s1.example
";

    use super::scale_gen as gen;

    /// The 100,000-entry benchmark's files are what the fast path is for:
    /// a change to the config types that sends them down the slow path
    /// (twice the parse) fails here.
    #[test]
    fn the_scale_benchmarks_files_take_the_fast_path() {
        let text = gen::file_text(3, 1000, 100_000, None);
        let file: Arc<Path> = Arc::from(Path::new("dir/se-0003.yaml"));
        for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            if let Err(e) = Option::<Fast>::deserialize(Strict::new(doc)) {
                panic!("document {}: {e}", i + 1);
            }
        }
        let (fast, slow) = both(&text);
        assert_eq!(fast.as_deref(), Some(slow.as_str()));
        assert!(ParsedFile::parse_fast(&file, &text, 0).is_some());
    }

    #[test]
    fn the_corpus_reads_the_same_and_mostly_takes_the_fast_path() {
        let mut fast = 0;
        let files = corpus();
        assert!(files.len() > 20, "found {} YAML files", files.len());
        for (p, text) in &files {
            let (f, slow) = both(text);
            if let Some(f) = f {
                assert_eq!(f, slow, "{}", p.display());
                fast += 1;
            }
        }
        assert!(both(SE).0.is_some(), "the sample takes the fast path");
        // Most of them are configs shunt reads; the rest (other kinds,
        // bad inputs) fall back.
        assert!(fast * 3 >= files.len(), "{fast} of {} fast", files.len());
    }

    /// xorshift with a fixed seed per run, so a failure reproduces.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Values and lines that the stream and the tree could read apart.
    const SCALARS: &[&str] = &[
        "123",
        "0x50",
        "1_000",
        "-1",
        "1.5",
        ".inf",
        "true",
        "yes",
        "~",
        "null",
        "\"null\"",
        "",
        "\"123\"",
        "'x'",
        "[a, 1]",
        "{a: 1}",
        "!foo x",
        "!!str 12",
        "&a x",
        "*a",
        "2026-01-02",
        "\"::1\"",
        "[::1]",
        "|\n    block",
        "0o17",
        "NaN",
        "!!null \"null\"",
        "!!int \"5\"",
        "99999999999999999999",
    ];

    #[test]
    fn mutated_documents_read_the_same_whenever_the_fast_path_succeeds() {
        let mut texts: Vec<String> = corpus().into_iter().map(|(_, t)| t).collect();
        texts.push(SE.to_string());
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let (mut fast, mut tried) = (0, 0);
        for round in 0..4000 {
            let base = &texts[rng.below(texts.len())];
            let mut lines: Vec<String> = base.lines().map(str::to_string).collect();
            if lines.is_empty() {
                continue;
            }
            for _ in 0..1 + rng.below(3) {
                let i = rng.below(lines.len());
                match rng.below(5) {
                    // Replace a value.
                    0 | 1 => {
                        if let Some(c) = lines[i].find(": ") {
                            let v = SCALARS[rng.below(SCALARS.len())];
                            lines[i] = format!("{}: {v}", &lines[i][..c]);
                        } else if let Some(d) = lines[i].find("- ") {
                            let v = SCALARS[rng.below(SCALARS.len())];
                            lines[i] = format!("{}- {v}", &lines[i][..d]);
                        }
                    }
                    // A duplicate key (or list item).
                    2 => {
                        let l = lines[i].clone();
                        lines.insert(i, l);
                    }
                    3 => {
                        lines.remove(i);
                    }
                    // A key the types do not know, or a swapped line.
                    _ => {
                        let j = rng.below(lines.len());
                        lines.swap(i, j);
                    }
                }
                if lines.is_empty() {
                    break;
                }
            }
            let text = lines.join("\n");
            let (f, slow) = both(&text);
            tried += 1;
            if let Some(f) = f {
                fast += 1;
                assert_eq!(f, slow, "round {round}, text:\n{text}");
            }
        }
        // Enough mutants succeed on the fast path to mean something (about
        // one in ten: most mutations break the document).
        assert!(fast * 20 >= tried, "{fast} of {tried} fast");
    }

    #[test]
    fn what_the_tree_refuses_the_fast_path_leaves_to_it() {
        for text in [
            // A number where a string is wanted: the stream would read "123".
            SE.replace("name: se-1", "name: 123"),
            SE.replace("- s1.example", "- true"),
            // Duplicate keys: the stream would keep the last.
            SE.replace("    team: a", "    team: a\n    team: b"),
            SE.replace(
                "  resolution: DNS",
                "  resolution: DNS\n  resolution: STATIC",
            ),
            // A number as a field's name: serde would read `4` as the
            // index of `resolution`; the tree refuses it.
            SE.replace("  resolution: DNS", "  4: DNS"),
            // kind and apiVersion not first.
            SE.replacen(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\n",
                "kind: ServiceEntry\nspec2: 1\napiVersion: networking.istio.io/v1\n",
                1,
            ),
        ] {
            let (f, slow) = both(&text);
            assert!(f.is_none(), "took the fast path:\n{text}");
            assert!(
                slow.contains("Problem"),
                "the slow path finds a problem:\n{text}\n{slow}"
            );
        }
        // A quoted null as the status: the stream calls it present, the
        // tree reads `None`.
        let with_status = SE.replacen("\n---\n", "\nstatus: !!null \"null\"\n---\n", 1);
        let (f, slow) = both(&with_status);
        assert!(f.is_none(), "took the fast path:\n{with_status}");
        assert_eq!(slow, both(SE).1);
        // A tag: the tree reads the tagged string (and so does shunt); the
        // fast path leaves it to the tree.
        let (f, slow) = both(&SE.replace("  - s1.example", "  - !h s1.example"));
        assert!(f.is_none());
        assert_eq!(slow, both(SE).1);
    }
}

//! VIP auto-allocation for ServiceEntries, following Istio's
//! `pilot/pkg/controllers/ipallocate` rules, plus the stable service and
//! workload ids the kernel maps carry.
//!
//! Rules:
//! - Eligible entry: resolution not NONE, empty `spec.addresses`, label
//!   `networking.istio.io/enable-autoallocate-ip` not `"false"`, and no
//!   wildcard host (any wildcard host makes the whole entry ineligible, as in
//!   Istio).
//! - One IPv4 (240.240.0.0/16) and one IPv6 (2001:2::/48) address per host.
//!   A VIP belongs to a *host name*: DNS answers one VIP per name, so a host
//!   listed by two eligible entries is owned by the older one (older
//!   `creationTimestamp`, entries without one after all that have one, then
//!   directory order); the other gets no address for it and a warning.
//! - Persisted in `<state dir>/vips.json` (temp file + rename). A host that
//!   has an address keeps it across restarts and edits. If two hosts claim the
//!   same address in the persisted state (hand edits, a prefix change), the
//!   host of the older entry keeps it and the other is given a new one.
//! - A host that disappears keeps its addresses *reserved* for a grace period
//!   ([`DEFAULT_GRACE`], `--vip-grace`), well above the DNS TTL: an empty or
//!   truncated file for a moment must not change a VIP that clients cache. A
//!   host that returns within the grace gets its addresses back; no other
//!   host is given a reserved address. The release time is persisted, so a
//!   restart keeps the reservation.
//! - Free addresses are handed out oldest-released first, so a client that
//!   still caches a deleted host's VIP is the least likely to reach a
//!   different service: never-used addresses first (a cursor from prefix+1
//!   that only moves forward), then, once the prefix has been used up, the
//!   address whose grace ended longest ago. The release times are persisted
//!   (the most recent [`MAX_FREED`] per family; older ones, and those of
//!   files written before release times were recorded, count as released
//!   before all of them and are found by the cursor).
//! - A full prefix leaves the host without an address of that family and is
//!   reported as a warning (not a config error).
//!
//! There is one allocator per state: the agent on one machine, the elected
//! `shunt controller` on a cluster (state in a ConfigMap, see
//! `config::kube::controller`). Readers call [`load`]. An agent with
//! `--source kubernetes` *follows* ([`Allocator::following`]): it takes
//! each host's addresses from the ServiceEntry's `status.addresses` and
//! allocates none itself; only its node-local service and workload ids are
//! its own.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ObjectKey, ServiceEntry};
use crate::telemetry::LogLimit;

/// File name of the persisted state in the state directory.
pub const STATE_FILE: &str = "vips.json";
const STATE_VERSION: u32 = 1;
/// File name of the journal of patches since `vips.json` was written:
/// an edit appends one line instead of writing 100,000 hosts again.
pub const JOURNAL_FILE: &str = "vips.journal";

/// How long a removed host's addresses stay reserved for its return (well
/// above the DNS TTL of 30 s that clients cache answers for).
pub const DEFAULT_GRACE: Duration = Duration::from_secs(600);

/// Release times kept per family. Bounds the state (an IPv6 /48 is never
/// used up, so its records would only grow); forgetting the oldest keeps
/// the order, since a forgotten one counts as released before every kept one.
pub const MAX_FREED: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AllocError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: corrupt allocation state: {source}", path.display())]
    Corrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: allocation state version {found}, expected {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

/// The address ranges VIPs are taken from (by default the VIP prefixes of
/// `shunt_common`, which the kernel side routes and steers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prefixes {
    pub v4: Ipv4Net,
    pub v6: Ipv6Net,
}

impl Default for Prefixes {
    fn default() -> Self {
        use shunt_common::{VIP4_NET, VIP4_PREFIX_LEN, VIP6_NET, VIP6_PREFIX_LEN};
        Prefixes {
            v4: Ipv4Net::new(VIP4_NET.into(), VIP4_PREFIX_LEN).expect("a valid prefix length"),
            v6: Ipv6Net::new(VIP6_NET.into(), VIP6_PREFIX_LEN).expect("a valid prefix length"),
        }
    }
}

/// The addresses of one host and the ServiceEntry that owns them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAlloc {
    pub owner: ObjectKey,
    pub v4: Option<Ipv4Addr>,
    pub v6: Option<Ipv6Addr>,
}

/// Something the allocator could not do; shown in status, not an error.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum AllocWarning {
    /// The prefix of `family` is full: `host` has no address of that family.
    #[serde(rename_all = "camelCase")]
    Exhausted {
        entry: ObjectKey,
        host: String,
        family: String,
    },
    /// `host` is owned by the older entry `owner`; `entry` gets no address.
    #[serde(rename_all = "camelCase")]
    HostConflict {
        entry: ObjectKey,
        host: String,
        owner: ObjectKey,
    },
    /// The persisted `address` of `host` was taken by `owner`'s host (or lies
    /// outside the prefix) and was replaced.
    #[serde(rename_all = "camelCase")]
    Reassigned {
        entry: ObjectKey,
        host: String,
        address: IpAddr,
        reason: String,
    },
}

impl AllocWarning {
    pub fn entry(&self) -> &ObjectKey {
        match self {
            AllocWarning::Exhausted { entry, .. }
            | AllocWarning::HostConflict { entry, .. }
            | AllocWarning::Reassigned { entry, .. } => entry,
        }
    }
}

impl fmt::Display for AllocWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocWarning::Exhausted {
                entry,
                host,
                family,
            } => write!(
                f,
                "ServiceEntry {entry}: no {family} address for host {host}: prefix exhausted"
            ),
            AllocWarning::HostConflict { entry, host, owner } => write!(
                f,
                "ServiceEntry {entry}: host {host} already has addresses as a host of the older ServiceEntry {owner}"
            ),
            AllocWarning::Reassigned {
                entry,
                host,
                address,
                reason,
            } => write!(
                f,
                "ServiceEntry {entry}: host {host} lost its address {address} ({reason}) and got a new one"
            ),
        }
    }
}

/// The result of allocation: what readers need, without a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allocation {
    pub hosts: HashMap<String, HostAlloc>,
    /// Stable ids of every ServiceEntry (eligible or not); never 0.
    pub service_ids: HashMap<ObjectKey, u32>,
    /// Stable ids of every WorkloadEntry; never 0.
    pub workload_ids: HashMap<ObjectKey, u32>,
    pub warnings: Vec<AllocWarning>,
    /// Hosts that disappeared, with their addresses and release time (unix
    /// seconds): held for their return until the grace ends.
    reserved: HashMap<String, (HostAlloc, u64)>,
    /// Addresses free again after their grace, with their release time
    /// (unix seconds), oldest first.
    freed_v4: Vec<(Ipv4Addr, u64)>,
    freed_v6: Vec<(Ipv6Addr, u64)>,
    prefixes: Option<Prefixes>,
    next_v4: Option<Ipv4Addr>,
    next_v6: Option<Ipv6Addr>,
    next_service_id: u32,
    next_workload_id: u32,
}

impl Allocation {
    /// The auto-allocated addresses of an entry, host by host in the entry's
    /// host order, IPv4 before IPv6 (the order of Istio's status.addresses).
    pub fn addresses_of<'a>(
        &'a self,
        entry: &'a ObjectKey,
        hosts: &'a [String],
    ) -> impl Iterator<Item = (&'a str, IpAddr)> + 'a {
        hosts.iter().flat_map(move |h| {
            let a = self.hosts.get(h).filter(|a| &a.owner == entry);
            let v4 = a.and_then(|a| a.v4).map(IpAddr::V4);
            let v6 = a.and_then(|a| a.v6).map(IpAddr::V6);
            v4.into_iter().chain(v6).map(move |ip| (h.as_str(), ip))
        })
    }

    pub fn service_id(&self, k: &ObjectKey) -> Option<u32> {
        self.service_ids.get(k).copied()
    }

    pub fn workload_id(&self, k: &ObjectKey) -> Option<u32> {
        self.workload_ids.get(k).copied()
    }

    /// How many hosts the full prefix of `family` ("IPv4", "IPv6") left
    /// without an address of it.
    pub fn hosts_without_address(&self, family: &str) -> usize {
        self.warnings
            .iter()
            .filter(|w| matches!(w, AllocWarning::Exhausted { family: f, .. } if f == family))
            .count()
    }

    pub fn warnings_for<'a>(&'a self, k: &'a ObjectKey) -> impl Iterator<Item = &'a AllocWarning> {
        self.warnings.iter().filter(move |w| w.entry() == k)
    }
}

pub use crate::model::service::eligible;

// ----------------------------------------------------------- persistence

/// The persisted form; borrowed from the [`Allocation`] when written (no
/// copy of 100,000 host names to serialize them once).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct State<'a> {
    version: u32,
    prefixes: Prefixes,
    next_v4: Ipv4Addr,
    next_v6: Ipv6Addr,
    #[serde(borrow)]
    hosts: Vec<HostRecord<'a>>,
    next_service_id: u32,
    #[serde(borrow)]
    services: Vec<IdRecord<'a>>,
    next_workload_id: u32,
    #[serde(borrow)]
    workloads: Vec<IdRecord<'a>>,
    #[serde(default)]
    warnings: Cow<'a, [AllocWarning]>,
    /// Absent in files of older agents: no release time known.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    freed: Vec<FreedRecord>,
    /// Names this write: only journal lines of the same generation apply
    /// to it (0 in files of older agents, which had no journal).
    #[serde(default)]
    generation: u64,
}

/// An address whose grace ended, free for another host.
#[derive(Serialize, Deserialize)]
struct FreedRecord {
    address: IpAddr,
    /// Unix seconds when its host disappeared.
    released: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct HostRecord<'a> {
    #[serde(borrow)]
    host: Cow<'a, str>,
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v6: Option<Ipv6Addr>,
    /// Unix seconds when the host disappeared: its addresses are reserved,
    /// not live. Absent in files of older agents (every host live).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released: Option<u64>,
}

#[derive(Serialize, Deserialize)]
struct IdRecord<'a> {
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    id: u32,
}

fn state_path(dir: &Path) -> PathBuf {
    dir.join(STATE_FILE)
}

/// A reader of the allocation another process (the agent) writes: knows
/// when the file changed, so followers reload only then. The one way the
/// waypoint and the CLI read the allocation.
#[derive(Debug)]
pub struct Reader {
    state_dir: PathBuf,
    seen: [Option<(u64, std::time::SystemTime)>; 2],
}

impl Reader {
    pub fn new(state_dir: &Path) -> Self {
        Reader {
            state_dir: state_dir.to_path_buf(),
            seen: [None, None],
        }
    }

    /// Reads the allocation now and remembers the file's version.
    pub fn read(&mut self) -> Result<Allocation, AllocError> {
        self.seen = self.fingerprint();
        load(&self.state_dir)
    }

    /// Whether the files changed since the last [`Reader::read`] (length or
    /// modification time; the agent replaces the base by rename and
    /// appends to the journal).
    pub fn changed(&self) -> bool {
        self.fingerprint() != self.seen
    }

    fn fingerprint(&self) -> [Option<(u64, std::time::SystemTime)>; 2] {
        let of = |p: PathBuf| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        };
        [
            of(state_path(&self.state_dir)),
            of(journal_path(&self.state_dir)),
        ]
    }
}

/// Reads the persisted allocation without changing anything. A missing file
/// is an empty allocation (the agent has not run yet).
pub fn load(state_dir: &Path) -> Result<Allocation, AllocError> {
    Ok(load_journaled(state_dir)?.0)
}

/// Where a directory's state stands: the base's generation and size, the
/// journal's size and whether it ended in a line that does not apply (a
/// write cut short).
#[derive(Clone, Copy, Debug, Default)]
struct Journaled {
    generation: u64,
    base_len: u64,
    journal_len: u64,
    torn: bool,
}

/// The base file with the journal's lines of its generation applied.
fn load_journaled(state_dir: &Path) -> Result<(Allocation, Journaled), AllocError> {
    let path = state_path(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok((Allocation::default(), Journaled::default()))
        }
        Err(source) => return Err(AllocError::Io { path, source }),
    };
    let (mut a, generation) = parse_state_gen(&bytes, path)?;
    let mut j = Journaled {
        generation,
        base_len: bytes.len() as u64,
        ..Journaled::default()
    };
    let jpath = journal_path(state_dir);
    let journal = match std::fs::read(&jpath) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((a, j)),
        Err(source) => {
            return Err(AllocError::Io {
                path: jpath,
                source,
            })
        }
    };
    j.journal_len = journal.len() as u64;
    for line in journal.split_inclusive(|b| *b == b'\n') {
        // A line without its newline was cut short: it and what follows
        // were never committed.
        let parsed = line
            .strip_suffix(b"\n")
            .and_then(|l| serde_json::from_slice::<JournalLine>(l).ok());
        match parsed {
            Some(l) if l.generation == generation => l.apply(&mut a),
            // Of an earlier base (written before this one replaced it).
            Some(_) => {}
            None => {
                j.torn = true;
                break;
            }
        }
    }
    Ok((a, j))
}

fn journal_path(dir: &Path) -> PathBuf {
    dir.join(JOURNAL_FILE)
}

/// Reads a persisted allocation from `bytes`; `path` names it in errors.
fn parse_state(bytes: &[u8], path: PathBuf) -> Result<Allocation, AllocError> {
    Ok(parse_state_gen(bytes, path)?.0)
}

/// [`parse_state`] and the file's generation.
fn parse_state_gen(bytes: &[u8], path: PathBuf) -> Result<(Allocation, u64), AllocError> {
    let st: State = serde_json::from_slice(bytes).map_err(|source| AllocError::Corrupt {
        path: path.clone(),
        source,
    })?;
    if st.version != STATE_VERSION {
        return Err(AllocError::Version {
            path,
            found: st.version,
        });
    }
    let key = |ns: Cow<str>, name: Cow<str>| ObjectKey {
        namespace: ns.into_owned(),
        name: name.into_owned(),
    };
    let mut hosts = HashMap::with_capacity(st.hosts.len());
    let mut reserved = HashMap::new();
    for h in st.hosts {
        let a = HostAlloc {
            owner: key(h.namespace, h.name),
            v4: h.v4,
            v6: h.v6,
        };
        if let Some(t) = h.released {
            reserved.insert(h.host.into_owned(), (a, t));
        } else {
            hosts.insert(h.host.into_owned(), a);
        }
    }
    let (mut freed_v4, mut freed_v6) = (Vec::new(), Vec::new());
    for f in st.freed {
        match f.address {
            IpAddr::V4(a) => freed_v4.push((a, f.released)),
            IpAddr::V6(a) => freed_v6.push((a, f.released)),
        }
    }
    let a = Allocation {
        hosts,
        reserved,
        freed_v4,
        freed_v6,
        service_ids: st
            .services
            .into_iter()
            .map(|r| (key(r.namespace, r.name), r.id))
            .collect(),
        workload_ids: st
            .workloads
            .into_iter()
            .map(|r| (key(r.namespace, r.name), r.id))
            .collect(),
        warnings: st.warnings.into_owned(),
        prefixes: Some(st.prefixes),
        next_v4: Some(st.next_v4),
        next_v6: Some(st.next_v6),
        next_service_id: st.next_service_id,
        next_workload_id: st.next_workload_id,
    };
    Ok((a, st.generation))
}

/// One committed patch, a line of the journal: the new value of each
/// record it changed (`None`: gone), and the warnings' edits in order.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct JournalLine {
    generation: u64,
    hosts: Vec<(String, Option<JournalHost>)>,
    services: Vec<(ObjectKey, Option<u32>)>,
    workloads: Vec<(ObjectKey, Option<u32>)>,
    /// Indices before the removal, ascending.
    warnings_removed: Vec<usize>,
    /// Index at insertion, in insertion order.
    warnings_inserted: Vec<(usize, AllocWarning)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    freed_v4: Option<Vec<(Ipv4Addr, u64)>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    freed_v6: Option<Vec<(Ipv6Addr, u64)>>,
    next_v4: Option<Ipv4Addr>,
    next_v6: Option<Ipv6Addr>,
    next_service_id: u32,
    next_workload_id: u32,
}

/// A host's record in the journal (as [`HostRecord`], owned).
#[derive(Serialize, Deserialize)]
struct JournalHost {
    namespace: String,
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v4: Option<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    v6: Option<Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    released: Option<u64>,
}

impl JournalLine {
    /// The line of the patch `u` that made `a`.
    fn of(u: &Undo, a: &Allocation, generation: u64) -> JournalLine {
        let mut names: Vec<&str> = u
            .hosts
            .iter()
            .map(|(h, _)| h.as_str())
            .chain(u.reserved.iter().map(|(h, _)| h.as_str()))
            .collect();
        names.sort_unstable();
        names.dedup();
        let hosts = names
            .into_iter()
            .map(|h| {
                let rec = |x: &HostAlloc, released| JournalHost {
                    namespace: x.owner.namespace.clone(),
                    name: x.owner.name.clone(),
                    v4: x.v4,
                    v6: x.v6,
                    released,
                };
                let r = match (a.hosts.get(h), a.reserved.get(h)) {
                    (Some(x), _) => Some(rec(x, None)),
                    (None, Some((x, t))) => Some(rec(x, Some(*t))),
                    (None, None) => None,
                };
                (h.to_string(), r)
            })
            .collect();
        let ids = |log: &[(ObjectKey, Option<u32>)], m: &HashMap<ObjectKey, u32>| {
            let mut keys: Vec<&ObjectKey> = log.iter().map(|(k, _)| k).collect();
            keys.sort_unstable();
            keys.dedup();
            keys.into_iter()
                .map(|k| (k.clone(), m.get(k).copied()))
                .collect()
        };
        JournalLine {
            generation,
            hosts,
            services: ids(&u.service_ids, &a.service_ids),
            workloads: ids(&u.workload_ids, &a.workload_ids),
            warnings_removed: u.warnings_removed.iter().map(|(i, _)| *i).collect(),
            warnings_inserted: u
                .inserted_at()
                .into_iter()
                .zip(&u.warnings_inserted)
                .map(|(fin, at)| (*at, a.warnings[fin].clone()))
                .collect(),
            freed_v4: u
                .freed_v4
                .as_ref()
                .filter(|f| **f != a.freed_v4)
                .map(|_| a.freed_v4.clone()),
            freed_v6: u
                .freed_v6
                .as_ref()
                .filter(|f| **f != a.freed_v6)
                .map(|_| a.freed_v6.clone()),
            next_v4: a.next_v4,
            next_v6: a.next_v6,
            next_service_id: a.next_service_id,
            next_workload_id: a.next_workload_id,
        }
    }

    fn apply(self, a: &mut Allocation) {
        for (h, r) in self.hosts {
            a.hosts.remove(&h);
            a.reserved.remove(&h);
            if let Some(r) = r {
                let x = HostAlloc {
                    owner: ObjectKey {
                        namespace: r.namespace,
                        name: r.name,
                    },
                    v4: r.v4,
                    v6: r.v6,
                };
                if let Some(t) = r.released {
                    a.reserved.insert(h, (x, t));
                } else {
                    a.hosts.insert(h, x);
                }
            }
        }
        for (m, log) in [
            (&mut a.service_ids, self.services),
            (&mut a.workload_ids, self.workloads),
        ] {
            for (k, id) in log {
                match id {
                    Some(id) => m.insert(k, id),
                    None => m.remove(&k),
                };
            }
        }
        for i in self.warnings_removed.into_iter().rev() {
            if i < a.warnings.len() {
                a.warnings.remove(i);
            }
        }
        for (i, w) in self.warnings_inserted {
            a.warnings.insert(i.min(a.warnings.len()), w);
        }
        if let Some(f) = self.freed_v4 {
            a.freed_v4 = f;
        }
        if let Some(f) = self.freed_v6 {
            a.freed_v6 = f;
        }
        a.next_v4 = self.next_v4;
        a.next_v6 = self.next_v6;
        a.next_service_id = self.next_service_id;
        a.next_workload_id = self.next_workload_id;
    }
}

fn to_state(a: &Allocation, prefixes: Prefixes, generation: u64) -> State<'_> {
    fn record<'a>(h: &'a str, x: &'a HostAlloc, released: Option<u64>) -> HostRecord<'a> {
        HostRecord {
            host: Cow::Borrowed(h),
            namespace: Cow::Borrowed(x.owner.namespace.as_str()),
            name: Cow::Borrowed(x.owner.name.as_str()),
            v4: x.v4,
            v6: x.v6,
            released,
        }
    }
    let mut hosts: Vec<HostRecord> = Vec::with_capacity(a.hosts.len() + a.reserved.len());
    hosts.extend(a.hosts.iter().map(|(h, x)| record(h, x, None)));
    hosts.extend(a.reserved.iter().map(|(h, (x, t))| record(h, x, Some(*t))));
    hosts.sort_unstable_by(|a, b| a.host.cmp(&b.host));
    fn ids(m: &HashMap<ObjectKey, u32>) -> Vec<IdRecord<'_>> {
        let mut v: Vec<IdRecord> = m
            .iter()
            .map(|(k, id)| IdRecord {
                namespace: Cow::Borrowed(k.namespace.as_str()),
                name: Cow::Borrowed(k.name.as_str()),
                id: *id,
            })
            .collect();
        v.sort_unstable_by_key(|r| r.id);
        v
    }
    State {
        version: STATE_VERSION,
        prefixes,
        next_v4: a.next_v4.unwrap_or(nth_v4(prefixes.v4, 1)),
        next_v6: a.next_v6.unwrap_or(nth_v6(prefixes.v6, 1)),
        hosts,
        next_service_id: a.next_service_id.max(1),
        services: ids(&a.service_ids),
        next_workload_id: a.next_workload_id.max(1),
        workloads: ids(&a.workload_ids),
        warnings: Cow::Borrowed(&a.warnings),
        freed: a
            .freed_v4
            .iter()
            .map(|(a, t)| (IpAddr::V4(*a), *t))
            .chain(a.freed_v6.iter().map(|(a, t)| (IpAddr::V6(*a), *t)))
            .map(|(address, released)| FreedRecord { address, released })
            .collect(),
        generation,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), AllocError> {
    let io = |source| AllocError::Io {
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)?;
    // Make the rename itself durable.
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// A generation for a new base file, other than `prev` and 0.
fn fresh_generation(prev: u64) -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let g = t ^ (u64::from(std::process::id()) << 40);
    if g == prev || g == 0 {
        prev.wrapping_add(1).max(1)
    } else {
        g
    }
}

// ------------------------------------------------------------- allocator

/// Offsets inside a prefix: first usable is prefix+1; for IPv4 the last
/// (broadcast-like) address is not used. A free offset is either recorded
/// in `freed` with its release time or counts as released at time 0 (never
/// used, or its time is not known); the oldest goes first.
struct Pool {
    used: HashSet<u128>,
    /// Free offsets with a known release time, and the same by age.
    freed: HashMap<u128, u64>,
    by_age: BTreeSet<(u64, u128)>,
    first: u128,
    last: u128,
    cursor: u128,
}

impl Pool {
    fn new(first: u128, last: u128, cursor: u128) -> Self {
        let cursor = if (first..=last).contains(&cursor) {
            cursor
        } else {
            first
        };
        Pool {
            used: HashSet::new(),
            freed: HashMap::new(),
            by_age: BTreeSet::new(),
            first,
            last,
            cursor,
        }
    }
    fn capacity(&self) -> u128 {
        self.last - self.first + 1
    }
    /// Reserves a specific offset; false when taken or outside the pool.
    fn claim(&mut self, off: u128) -> bool {
        let ok = (self.first..=self.last).contains(&off) && self.used.insert(off);
        if ok {
            if let Some(t) = self.freed.remove(&off) {
                self.by_age.remove(&(t, off));
            }
        }
        ok
    }
    /// Records that the free `off` was released at `t` (the later time wins
    /// if it was recorded already).
    fn release(&mut self, off: u128, t: u64) {
        if !(self.first..=self.last).contains(&off) || self.used.contains(&off) {
            return;
        }
        let t = match self.freed.get(&off) {
            Some(&old) => {
                self.by_age.remove(&(old, off));
                old.max(t)
            }
            None => t,
        };
        self.freed.insert(off, t);
        self.by_age.insert((t, off));
    }
    /// The free offset released longest ago: one without a recorded time at
    /// or after the cursor (wrapping once), else the oldest recorded one.
    fn next(&mut self) -> Option<u128> {
        let unrecorded = self.capacity() - self.used.len() as u128 - self.freed.len() as u128;
        if unrecorded > 0 {
            loop {
                let c = self.cursor;
                self.cursor = if c >= self.last { self.first } else { c + 1 };
                if !self.freed.contains_key(&c) && self.used.insert(c) {
                    return Some(c);
                }
            }
        }
        let (_, off) = self.by_age.pop_first()?;
        self.freed.remove(&off);
        self.used.insert(off);
        Some(off)
    }
    /// The recorded free offsets, oldest first, the most recent `MAX_FREED`.
    fn freed(&self) -> impl Iterator<Item = (u128, u64)> + '_ {
        let skip = self.by_age.len().saturating_sub(MAX_FREED);
        self.by_age.iter().skip(skip).map(|(t, off)| (*off, *t))
    }
}

fn nth_v4(p: Ipv4Net, off: u128) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(p.network()).wrapping_add(off as u32))
}
fn nth_v6(p: Ipv6Net, off: u128) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(p.network()).wrapping_add(off))
}
fn off_v4(p: Ipv4Net, a: Ipv4Addr) -> Option<u128> {
    p.contains(&a)
        .then(|| (u32::from(a) - u32::from(p.network())) as u128)
}
fn off_v6(p: Ipv6Net, a: Ipv6Addr) -> Option<u128> {
    p.contains(&a)
        .then(|| u128::from(a) - u128::from(p.network()))
}

/// The one allocator: owns the state directory (or, `dir: None`, state the
/// caller persists elsewhere through [`Allocator::state_bytes`]).
pub struct Allocator {
    dir: Option<PathBuf>,
    /// Take host addresses from `Config::api_status`, allocate none.
    follow: bool,
    prefixes: Prefixes,
    current: Allocation,
    grace: Duration,
    /// Hash of the last state written, to skip identical writes (`None`
    /// as well once the journal has lines after it).
    written: Option<u64>,
    /// The state directory's base file and journal.
    journal: Journaled,
    /// The summary line of a full prefix, at most once a minute.
    exhausted_log: LogLimit,
    /// The config the allocation in force was computed for, when it was
    /// committed through [`Allocator::commit_for`] (see
    /// [`Allocator::propose_for`]).
    basis: Option<Arc<Config>>,
    /// The undo record of a [`Proposal::Patched`] not committed yet: the
    /// allocation in force is patched in place (copying 100,000 hosts per
    /// edit cost more than computing them), and put back by the next call
    /// unless committed.
    pending: Option<Box<Undo>>,
}

/// What [`Allocator::propose_for`] proposes.
#[derive(Debug)]
pub enum Proposal {
    /// The allocation in force, which computing again would give unchanged.
    Unchanged,
    New(Box<Allocation>),
    /// The allocation in force, patched in place for the few entries that
    /// changed (what computing again gives, see [`Allocator::patch`]);
    /// undone by the allocator's next call unless committed.
    Patched,
}

impl Allocator {
    /// Opens (or starts) the state in `state_dir` with Istio's prefixes.
    pub fn open(state_dir: &Path) -> Result<Self, AllocError> {
        Self::open_with(state_dir, Prefixes::default())
    }

    /// Same with other prefixes (tests use tiny ones to reach exhaustion).
    pub fn open_with(state_dir: &Path, prefixes: Prefixes) -> Result<Self, AllocError> {
        std::fs::create_dir_all(state_dir).map_err(|source| AllocError::Io {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let (current, journal) = load_journaled(state_dir)?;
        Ok(Allocator {
            dir: Some(state_dir.to_path_buf()),
            follow: false,
            prefixes,
            current,
            grace: DEFAULT_GRACE,
            written: None,
            journal,
            exhausted_log: LogLimit::new(Duration::from_secs(60)),
            basis: None,
            pending: None,
        })
    }

    /// An allocator without a state directory, resuming from `state` (the
    /// bytes of [`Allocator::state_bytes`], e.g. from a ConfigMap; `None`:
    /// a fresh start). `origin` names the state in errors.
    pub fn from_state(
        state: Option<&[u8]>,
        origin: &str,
        prefixes: Prefixes,
    ) -> Result<Self, AllocError> {
        let current = match state {
            Some(b) => parse_state(b, PathBuf::from(origin))?,
            None => Allocation::default(),
        };
        Ok(Allocator {
            dir: None,
            follow: false,
            prefixes,
            current,
            grace: DEFAULT_GRACE,
            written: None,
            journal: Journaled::default(),
            exhausted_log: LogLimit::new(Duration::from_secs(60)),
            basis: None,
            pending: None,
        })
    }

    /// The persisted form of the current allocation (`vips.json`).
    pub fn state_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(&to_state(&self.current, self.prefixes, 0))
            .expect("allocation state serializes")
    }

    /// Follow the cluster's allocator: host addresses come from the
    /// ServiceEntries' `status.addresses` (`Config::api_status`), none is
    /// allocated here; a config without API status gives no host an
    /// address. Service and workload ids are still this allocator's.
    pub fn following(mut self) -> Self {
        self.follow = true;
        self
    }

    /// How long a removed host's addresses stay reserved for its return.
    pub fn with_grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// The allocation in force (between [`Allocator::propose_for`] and
    /// [`Allocator::commit_for`], the proposal's).
    pub fn current(&self) -> &Allocation {
        &self.current
    }

    /// Allocates for `cfg`, persists the result when it changed, and returns
    /// it. Logs each warning that is new since the previous call.
    pub fn allocate(&mut self, cfg: &Config) -> Result<&Allocation, AllocError> {
        self.allocate_at(cfg, SystemTime::now())
    }

    /// [`Allocator::allocate`] at the time `now` (the clock tests move).
    pub fn allocate_at(
        &mut self,
        cfg: &Config,
        now: SystemTime,
    ) -> Result<&Allocation, AllocError> {
        self.rollback();
        let next = self.propose_at(cfg, now);
        self.commit(next)
    }

    /// The allocation for `cfg`, neither persisted nor in force: a caller
    /// that may still refuse the config [`Allocator::commit`]s it only once
    /// accepted, so a refused config reserves nothing.
    pub fn propose(&mut self, cfg: &Config) -> Allocation {
        self.rollback();
        self.propose_at(cfg, SystemTime::now())
    }

    fn propose_at(&self, cfg: &Config, now: SystemTime) -> Allocation {
        let now = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        if self.follow {
            follow(&self.current, cfg)
        } else {
            compute(&self.current, cfg, self.prefixes, now, self.grace)
        }
    }

    /// [`Allocator::propose`], but [`Proposal::Unchanged`] without
    /// computing when that gives the allocation in force again: it was
    /// committed for a config with the same allocation inputs as `cfg`
    /// (every ServiceEntry's key, eligibility, hosts and age in the same
    /// order, the same WorkloadEntry keys and API status), and it is its
    /// own fixed point (no reservation whose grace ends by now, no address
    /// reassigned by the computation that made it). Most edits (ports,
    /// labels, endpoints) change no allocation input; this costs a pointer
    /// comparison per unchanged entry instead of the whole computation.
    ///
    /// When inputs did change, for a few entries (most edits), the
    /// allocation in force is patched for those ([`Proposal::Patched`]):
    /// O(changed entries) rather than O(entries).
    pub fn propose_for(&mut self, cfg: &Arc<Config>) -> Proposal {
        self.propose_for_at(cfg, SystemTime::now())
    }

    fn propose_for_at(&mut self, cfg: &Arc<Config>, now: SystemTime) -> Proposal {
        self.rollback();
        let secs = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let fixed_point = !self
            .current
            .warnings
            .iter()
            .any(|w| matches!(w, AllocWarning::Reassigned { .. }))
            && self
                .current
                .reserved
                .values()
                .all(|(_, t)| secs.saturating_sub(*t) < self.grace.as_secs());
        let basis = self.basis.clone().filter(|_| fixed_point);
        match basis {
            Some(b) if same_inputs(&b, cfg) => Proposal::Unchanged,
            Some(b) if self.patch(&b, cfg, secs) => Proposal::Patched,
            _ => Proposal::New(Box::new(self.propose_at(cfg, now))),
        }
    }

    /// The allocation `p` stands for.
    pub fn proposed<'a>(&'a self, p: &'a Proposal) -> &'a Allocation {
        match p {
            Proposal::Unchanged | Proposal::Patched => &self.current,
            Proposal::New(a) => a,
        }
    }

    /// [`Allocator::commit`] of a proposal for `cfg` from
    /// [`Allocator::propose_for`].
    pub fn commit_for(
        &mut self,
        p: Proposal,
        cfg: &Arc<Config>,
    ) -> Result<&Allocation, AllocError> {
        match p {
            Proposal::New(next) => {
                self.commit(*next)?;
            }
            Proposal::Patched => {
                let undo = self.pending.take().expect("a patch proposed is pending");
                let new = undo.new_warnings(&self.current);
                if !new.is_empty() {
                    self.log_warnings(new.into_iter(), &self.current);
                }
                if !undo.is_noop(&self.current) {
                    if let Err(e) = self.persist_patch(&undo) {
                        self.pending = Some(undo);
                        self.rollback();
                        return Err(e);
                    }
                }
            }
            Proposal::Unchanged => {}
        }
        self.basis = Some(cfg.clone());
        Ok(&self.current)
    }

    /// Persists `next` (from [`Allocator::propose`]) when it changed and
    /// puts it in force. Logs each warning that is new since the previous
    /// one.
    pub fn commit(&mut self, next: Allocation) -> Result<&Allocation, AllocError> {
        self.rollback();
        self.basis = None;
        if next.warnings != self.current.warnings {
            let old: HashSet<&AllocWarning> = self.current.warnings.iter().collect();
            self.log_warnings(next.warnings.iter().filter(|w| !old.contains(w)), &next);
        }
        // An edit that changes no host, id or reservation (most edits)
        // writes nothing: comparing is much cheaper than serializing.
        if self.written.is_some() && next == self.current {
            self.current = next;
            return Ok(&self.current);
        }
        let prev = std::mem::replace(&mut self.current, next);
        if let Err(e) = self.persist() {
            self.current = prev;
            return Err(e);
        }
        Ok(&self.current)
    }

    /// Writes the allocation in force unless it is what was written last:
    /// a new base file (generation), the journal emptied.
    fn persist(&mut self) -> Result<(), AllocError> {
        let mut bytes = serde_json::to_vec(&to_state(&self.current, self.prefixes, 0))
            .expect("allocation state serializes");
        let h = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut h);
            h.finish()
        };
        // The generation is the last field: written in place of the 0
        // hashed (it differs in every write).
        let generation = fresh_generation(self.journal.generation);
        debug_assert!(bytes.ends_with(b"\"generation\":0}"));
        bytes.truncate(bytes.len() - 2);
        bytes.extend_from_slice(format!("{generation}}}").as_bytes());
        if self.written != Some(h) {
            if let Some(dir) = &self.dir {
                write_atomic(&state_path(dir), &bytes)?;
                // Its lines name the base before: they apply no more.
                let _ = std::fs::remove_file(journal_path(dir));
                self.journal = Journaled {
                    generation,
                    base_len: bytes.len() as u64,
                    journal_len: 0,
                    torn: false,
                };
            }
            self.written = Some(h);
        }
        Ok(())
    }

    /// Persists the patch `u` that made the allocation in force: one line
    /// appended to the journal (synced as the base file is), or a new base
    /// when the journal has grown to a quarter of it, ends in a torn line,
    /// or there is no base yet.
    fn persist_patch(&mut self, u: &Undo) -> Result<(), AllocError> {
        let Some(dir) = self.dir.clone() else {
            return self.persist();
        };
        let j = self.journal;
        // Generation 0: a base of an older agent, which could write
        // another 0 after lines of this one.
        if j.torn || j.base_len == 0 || j.generation == 0 || j.journal_len * 4 > j.base_len {
            return self.persist();
        }
        let mut line = serde_json::to_vec(&JournalLine::of(u, &self.current, j.generation))
            .expect("journal line serializes");
        line.push(b'\n');
        let path = journal_path(&dir);
        let io = |source| AllocError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let written = f.write_all(&line).and_then(|()| f.sync_all());
        if let Err(e) = written {
            // Cut back to the lines committed; if that fails too, the
            // next load stops at the torn line and the next write is a
            // new base.
            if f.set_len(j.journal_len)
                .and_then(|()| f.sync_all())
                .is_err()
            {
                self.journal.torn = true;
            }
            return Err(io(e));
        }
        if j.journal_len == 0 {
            // The journal's name made durable with it.
            if let Ok(d) = std::fs::File::open(&dir) {
                let _ = d.sync_all();
            }
        }
        self.journal.journal_len += line.len() as u64;
        // The files no longer hold what was hashed.
        self.written = None;
        Ok(())
    }

    /// Puts back the allocation in force if a patch was proposed and not
    /// committed (its config was refused).
    fn rollback(&mut self) {
        if let Some(u) = self.pending.take() {
            u.undo(&mut self.current);
        }
    }
}

impl Allocator {
    /// Logs `new`, the warnings of `next` new since the previous allocation: a full prefix as one summary
    /// line per family (a config of 100k hosts left ~30k without an IPv4
    /// address, each once a line), rate-limited; other warnings one line
    /// each, the first [`MAX_WARNING_LINES`] of them.
    fn log_warnings<'a>(&self, new: impl Iterator<Item = &'a AllocWarning>, next: &Allocation) {
        let (mut new4, mut new6, mut others) = (0usize, 0usize, 0usize);
        for w in new {
            match w {
                AllocWarning::Exhausted { family, .. } if family == "IPv4" => new4 += 1,
                AllocWarning::Exhausted { .. } => new6 += 1,
                _ => {
                    others += 1;
                    if others <= MAX_WARNING_LINES {
                        tracing::warn!("{w}");
                    }
                }
            }
        }
        if others > MAX_WARNING_LINES {
            tracing::warn!(
                more = others - MAX_WARNING_LINES,
                "more new VIP allocation warnings (see `shunt config check`)"
            );
        }
        for (family, new, prefix) in [
            ("IPv4", new4, self.prefixes.v4.to_string()),
            ("IPv6", new6, self.prefixes.v6.to_string()),
        ] {
            if new == 0 {
                continue;
            }
            if let Some(suppressed) = self.exhausted_log.allow() {
                tracing::warn!(
                    new,
                    suppressed,
                    "{family} VIP range {prefix} exhausted: {} hosts left without an {family} address",
                    next.hosts_without_address(family)
                );
            }
        }
    }
}

/// Most changed entries an edit may have for [`Allocator::patch`]; more
/// are computed in full (the patch's lookups scan the entries per key).
const MAX_PATCHED: usize = 16;

/// What a patch changed in the allocation in force, in order, to put back
/// if its proposal is not committed. Each record holds the value before.
#[derive(Debug)]
pub(crate) struct Undo {
    hosts: Vec<(String, Option<HostAlloc>)>,
    reserved: Vec<(String, Option<(HostAlloc, u64)>)>,
    service_ids: Vec<(ObjectKey, Option<u32>)>,
    workload_ids: Vec<(ObjectKey, Option<u32>)>,
    /// Removed first (index in the vector before), then inserted (index at
    /// insertion, in insertion order).
    warnings_removed: Vec<(usize, AllocWarning)>,
    warnings_inserted: Vec<usize>,
    freed_v4: Option<Vec<(Ipv4Addr, u64)>>,
    freed_v6: Option<Vec<(Ipv6Addr, u64)>>,
    next_v4: Option<Ipv4Addr>,
    next_v6: Option<Ipv6Addr>,
    next_service_id: u32,
    next_workload_id: u32,
}

impl Undo {
    fn new(a: &Allocation) -> Undo {
        Undo {
            hosts: Vec::new(),
            reserved: Vec::new(),
            service_ids: Vec::new(),
            workload_ids: Vec::new(),
            warnings_removed: Vec::new(),
            warnings_inserted: Vec::new(),
            freed_v4: None,
            freed_v6: None,
            next_v4: a.next_v4,
            next_v6: a.next_v6,
            next_service_id: a.next_service_id,
            next_workload_id: a.next_workload_id,
        }
    }

    fn set_host(&mut self, a: &mut Allocation, h: &str, v: Option<HostAlloc>) {
        let old = match v {
            Some(v) => a.hosts.insert(h.to_string(), v),
            None => a.hosts.remove(h),
        };
        self.hosts.push((h.to_string(), old));
    }

    fn set_reserved(&mut self, a: &mut Allocation, h: &str, v: Option<(HostAlloc, u64)>) {
        let old = match v {
            Some(v) => a.reserved.insert(h.to_string(), v),
            None => a.reserved.remove(h),
        };
        self.reserved.push((h.to_string(), old));
    }

    fn set_id(
        log: &mut Vec<(ObjectKey, Option<u32>)>,
        m: &mut HashMap<ObjectKey, u32>,
        k: &ObjectKey,
        v: Option<u32>,
    ) {
        let old = match v {
            Some(v) => m.insert(k.clone(), v),
            None => m.remove(k),
        };
        log.push((k.clone(), old));
    }

    /// Puts `a` back as it was before the patch.
    fn undo(self, a: &mut Allocation) {
        fn back<K: std::hash::Hash + Eq, V>(m: &mut HashMap<K, V>, log: Vec<(K, Option<V>)>) {
            for (k, old) in log.into_iter().rev() {
                match old {
                    Some(v) => m.insert(k, v),
                    None => m.remove(&k),
                };
            }
        }
        back(&mut a.hosts, self.hosts);
        back(&mut a.reserved, self.reserved);
        back(&mut a.service_ids, self.service_ids);
        back(&mut a.workload_ids, self.workload_ids);
        for i in self.warnings_inserted.into_iter().rev() {
            a.warnings.remove(i);
        }
        for (i, w) in self.warnings_removed {
            a.warnings.insert(i, w);
        }
        if let Some(f) = self.freed_v4 {
            a.freed_v4 = f;
        }
        if let Some(f) = self.freed_v6 {
            a.freed_v6 = f;
        }
        a.next_v4 = self.next_v4;
        a.next_v6 = self.next_v6;
        a.next_service_id = self.next_service_id;
        a.next_workload_id = self.next_workload_id;
    }

    /// The patch left `a` as it was (every record holds the value now).
    fn is_noop(&self, a: &Allocation) -> bool {
        self.hosts.iter().all(|(k, v)| a.hosts.get(k) == v.as_ref())
            && self
                .reserved
                .iter()
                .all(|(k, v)| a.reserved.get(k) == v.as_ref())
            && self
                .service_ids
                .iter()
                .all(|(k, v)| a.service_ids.get(k) == v.as_ref())
            && self
                .workload_ids
                .iter()
                .all(|(k, v)| a.workload_ids.get(k) == v.as_ref())
            && self.warnings_removed.len() == self.warnings_inserted.len()
            && self
                .warnings_removed
                .iter()
                .zip(&self.warnings_inserted)
                .all(|((i, w), j)| i == j && a.warnings[*j] == *w)
            && self.freed_v4.as_ref().is_none_or(|f| *f == a.freed_v4)
            && self.freed_v6.as_ref().is_none_or(|f| *f == a.freed_v6)
            && self.next_v4 == a.next_v4
            && self.next_v6 == a.next_v6
            && self.next_service_id == a.next_service_id
            && self.next_workload_id == a.next_workload_id
    }

    /// Where each inserted warning is now, in insertion order (indices
    /// shift with later insertions: found by replaying them).
    fn inserted_at(&self) -> Vec<usize> {
        let mut at: Vec<usize> = Vec::with_capacity(self.warnings_inserted.len());
        for &i in &self.warnings_inserted {
            for j in at.iter_mut().filter(|j| **j >= i) {
                *j += 1;
            }
            at.push(i);
        }
        at
    }

    /// The warnings the patch added to `a` that it did not hold before.
    fn new_warnings<'a>(&self, a: &'a Allocation) -> Vec<&'a AllocWarning> {
        let removed: HashSet<&AllocWarning> =
            self.warnings_removed.iter().map(|(_, w)| w).collect();
        self.inserted_at()
            .into_iter()
            .map(|i| &a.warnings[i])
            .filter(|w| !removed.contains(w))
            .collect()
    }
}

/// The position of each of `keys` in `list` (index and object); `None`
/// when a key is there twice (a config built by hand).
#[allow(clippy::type_complexity)]
fn find_keys<'a, S>(
    list: &'a [Arc<crate::config::Resource<S>>],
    keys: &[&ObjectKey],
) -> Option<Vec<Option<(usize, &'a crate::config::Resource<S>)>>> {
    let mut out = vec![None; keys.len()];
    for (i, r) in list.iter().enumerate() {
        let name = r.name();
        for (j, k) in keys.iter().enumerate() {
            if k.name == name && k.namespace == r.namespace() {
                if out[j].is_some() {
                    return None;
                }
                out[j] = Some((i, &**r));
            }
        }
    }
    Some(out)
}

/// The order of step 4 of [`compute`] (and of its `Exhausted` warnings):
/// entries oldest first, then the host's place in its entry, IPv4 first.
type Rank<'a> = ((bool, (i64, u32), &'a Path, usize), usize, u8);

impl Allocator {
    /// Patches the allocation in force (computed for `basis`, and its own
    /// fixed point) into what [`compute`] gives for `cfg`, touching only the
    /// entries that changed; records the undo in `pending`. False, with
    /// nothing changed, for what it does not cover: many changes, host
    /// conflicts, API status, addresses freed (a zero grace), a follower.
    /// Why it is the same: with no conflict each host's owner is the one
    /// entry listing it, so ownership changes only for hosts of changed
    /// entries; in a fixed point no two hosts share an address and a family
    /// with an `Exhausted` warning has no free address, and a gone host's
    /// addresses stay reserved (grace > 0), so step 4 hands out addresses
    /// only to the changed entries' hosts, in their age order.
    fn patch(&mut self, basis: &Config, cfg: &Config, now: u64) -> bool {
        let cur = &self.current;
        if self.follow
            || self.grace.as_secs() == 0
            || basis.api_status.is_some()
            || cfg.api_status.is_some()
            || cur.prefixes != Some(self.prefixes)
            || cur.next_v4.is_none()
            || cur.next_v6.is_none()
            || cur
                .warnings
                .iter()
                .any(|w| !matches!(w, AllocWarning::Exhausted { .. }))
        {
            return false;
        }
        let ch = cfg.changed_since(basis);
        if ch.service_entries.len() > MAX_PATCHED || ch.workload_entries.len() > MAX_PATCHED {
            return false;
        }
        let keys: Vec<&ObjectKey> = ch.service_entries.iter().collect();
        let (Some(old), Some(new)) = (
            find_keys(&basis.service_entries, &keys),
            find_keys(&cfg.service_entries, &keys),
        ) else {
            return false;
        };
        let changed = |k: &ObjectKey| ch.service_entries.contains(k);
        // Hosts the changed entries own now, and will own, oldest first.
        let mut owned_before: Vec<&str> = Vec::new();
        for (k, o) in keys.iter().zip(&old) {
            if let Some((_, se)) = o.filter(|(_, se)| eligible(se)) {
                for h in &se.spec.hosts {
                    if cur.hosts.get(h.as_str()).is_some_and(|a| &a.owner == *k)
                        && !owned_before.contains(&h.as_str())
                    {
                        owned_before.push(h.as_str());
                    }
                }
            }
        }
        let mut owners: Vec<(&ServiceEntry, &ObjectKey)> = keys
            .iter()
            .zip(&new)
            .filter_map(|(k, n)| n.filter(|(_, se)| eligible(se)).map(|(_, se)| (se, *k)))
            .collect();
        owners.sort_by_key(|(se, _)| se.age_key());
        if owners
            .windows(2)
            .any(|w| w[0].0.age_key() == w[1].0.age_key())
        {
            return false;
        }
        let mut owned_after: Vec<(&str, &ObjectKey, Rank)> = Vec::new();
        for (se, k) in &owners {
            for (i, h) in se.spec.hosts.iter().enumerate() {
                if let Some(o) = owned_after.iter().find(|o| o.0 == h.as_str()) {
                    if o.1 != *k {
                        return false; // two changed entries list it
                    }
                    continue; // listed twice
                }
                if cur
                    .hosts
                    .get(h.as_str())
                    .is_some_and(|a| !changed(&a.owner))
                {
                    return false; // an unchanged entry owns it
                }
                owned_after.push((h, k, (se.age_key(), i, 0)));
            }
        }
        // The ids of entries added and removed (in the config's order).
        let mut added_se: Vec<(usize, &ObjectKey)> = Vec::new();
        let mut removed_se: Vec<&ObjectKey> = Vec::new();
        for ((k, o), n) in keys.iter().zip(&old).zip(&new) {
            match (o, n) {
                (None, Some((i, _))) => added_se.push((*i, k)),
                (Some(_), None) => removed_se.push(k),
                _ => {}
            }
        }
        added_se.sort();
        let wkeys: Vec<&ObjectKey> = ch.workload_entries.iter().collect();
        let (Some(wold), Some(wnew)) = (
            find_keys(&basis.workload_entries, &wkeys),
            find_keys(&cfg.workload_entries, &wkeys),
        ) else {
            return false;
        };
        let mut added_we: Vec<(usize, &ObjectKey)> = Vec::new();
        let mut removed_we: Vec<&ObjectKey> = Vec::new();
        for ((k, o), n) in wkeys.iter().zip(&wold).zip(&wnew) {
            match (o, n) {
                (None, Some((i, _))) => added_we.push((*i, k)),
                (Some(_), None) => removed_we.push(k),
                _ => {}
            }
        }
        added_we.sort();
        let exhausted = |fam: &str| {
            cur.warnings
                .iter()
                .any(|w| matches!(w, AllocWarning::Exhausted { family, .. } if family == fam))
        };
        let (full4, full6) = (exhausted("IPv4"), exhausted("IPv6"));

        // Checked: from here on the patch is applied.
        let prefixes = self.prefixes;
        let a = &mut self.current;
        let mut u = Undo::new(a);
        // Warnings of changed entries out; put in again below as computed.
        let mut i = 0;
        while i < a.warnings.len() {
            if changed(a.warnings[i].entry()) {
                let w = a.warnings.remove(i);
                // Its index before any removal, for putting it back.
                u.warnings_removed.push((i + u.warnings_removed.len(), w));
            } else {
                i += 1;
            }
        }
        // Hosts gone: reserved from now.
        for h in &owned_before {
            if owned_after.iter().any(|o| o.0 == *h) {
                continue;
            }
            let Some(x) = a.hosts.get(*h).cloned() else {
                continue;
            };
            u.set_host(a, h, None);
            if x.v4.is_some() || x.v6.is_some() {
                u.set_reserved(a, h, Some((x, now)));
            }
        }
        // Hosts kept or back keep their addresses; the rest need some.
        let mut need: Vec<(&str, &ObjectKey, Rank)> = Vec::new();
        for &(h, k, rank) in &owned_after {
            let prev = match a.hosts.get(h) {
                Some(x) => Some(x.clone()),
                None => match a.reserved.get(h) {
                    Some((x, _)) => {
                        let x = x.clone();
                        u.set_reserved(a, h, None);
                        Some(x)
                    }
                    None => None,
                },
            };
            let v4 = prev.as_ref().and_then(|x| x.v4);
            let v6 = prev.as_ref().and_then(|x| x.v6);
            if v4.is_none() {
                need.push((h, k, (rank.0, rank.1, 0)));
            }
            if v6.is_none() {
                need.push((h, k, (rank.0, rank.1, 1)));
            }
            let x = HostAlloc {
                owner: (*k).clone(),
                v4,
                v6,
            };
            if a.hosts.get(h) != Some(&x) {
                u.set_host(a, h, Some(x));
            }
        }
        // New addresses: none while a family is exhausted, else from the
        // pool as [`compute`] builds it.
        let mut warnings: Vec<(Rank, AllocWarning)> = Vec::new();
        for fam in [0u8, 1] {
            let wants: Vec<_> = need.iter().filter(|n| n.2 .2 == fam).collect();
            if wants.is_empty() {
                continue;
            }
            let family = if fam == 0 { "IPv4" } else { "IPv6" };
            let full = if fam == 0 { full4 } else { full6 };
            let mut pool = (!full).then(|| {
                let (last, cursor) = if fam == 0 {
                    let last = (1u128 << (32 - prefixes.v4.prefix_len())).saturating_sub(2);
                    (
                        last,
                        a.next_v4.and_then(|x| off_v4(prefixes.v4, x)).unwrap_or(1),
                    )
                } else {
                    let last = if prefixes.v6.prefix_len() == 0 {
                        u128::MAX
                    } else {
                        (1u128 << (128 - prefixes.v6.prefix_len())) - 1
                    };
                    (
                        last,
                        a.next_v6.and_then(|x| off_v6(prefixes.v6, x)).unwrap_or(1),
                    )
                };
                let mut p = Pool::new(1, last, cursor);
                let off = |x: &HostAlloc| {
                    if fam == 0 {
                        x.v4.and_then(|v| off_v4(prefixes.v4, v))
                    } else {
                        x.v6.and_then(|v| off_v6(prefixes.v6, v))
                    }
                };
                if fam == 0 {
                    for (x, t) in &a.freed_v4 {
                        if let Some(o) = off_v4(prefixes.v4, *x) {
                            p.release(o, *t);
                        }
                    }
                } else {
                    for (x, t) in &a.freed_v6 {
                        if let Some(o) = off_v6(prefixes.v6, *x) {
                            p.release(o, *t);
                        }
                    }
                }
                for x in a.hosts.values().chain(a.reserved.values().map(|(x, _)| x)) {
                    if let Some(o) = off(x) {
                        p.claim(o);
                    }
                }
                p
            });
            for (h, k, rank) in wants {
                match pool.as_mut().and_then(Pool::next) {
                    Some(off) => {
                        let mut x = a.hosts[*h].clone();
                        if fam == 0 {
                            x.v4 = Some(nth_v4(prefixes.v4, off));
                        } else {
                            x.v6 = Some(nth_v6(prefixes.v6, off));
                        }
                        u.set_host(a, h, Some(x));
                    }
                    None => warnings.push((
                        *rank,
                        AllocWarning::Exhausted {
                            entry: (*k).clone(),
                            host: h.to_string(),
                            family: family.into(),
                        },
                    )),
                }
            }
            if let Some(p) = pool {
                if fam == 0 {
                    let f = p
                        .freed()
                        .map(|(o, t)| (nth_v4(prefixes.v4, o), t))
                        .collect();
                    u.freed_v4 = Some(std::mem::replace(&mut a.freed_v4, f));
                    a.next_v4 = Some(nth_v4(prefixes.v4, p.cursor));
                } else {
                    let f = p
                        .freed()
                        .map(|(o, t)| (nth_v6(prefixes.v6, o), t))
                        .collect();
                    u.freed_v6 = Some(std::mem::replace(&mut a.freed_v6, f));
                    a.next_v6 = Some(nth_v6(prefixes.v6, p.cursor));
                }
            }
        }
        // Exhausted warnings in step 4's order among those kept.
        if !warnings.is_empty() {
            warnings.sort_by(|x, y| x.0.cmp(&y.0));
            let by_key: HashMap<(&str, &str), &ServiceEntry> = if a.warnings.is_empty() {
                HashMap::new()
            } else {
                cfg.service_entries
                    .iter()
                    .map(|se| ((se.namespace(), se.name()), &**se))
                    .collect()
            };
            let rank_of = |w: &AllocWarning| -> Option<Rank> {
                let AllocWarning::Exhausted {
                    entry,
                    host,
                    family,
                } = w
                else {
                    return None;
                };
                let se = by_key.get(&(entry.namespace.as_str(), entry.name.as_str()))?;
                let i = se.spec.hosts.iter().position(|h| h == host)?;
                Some((se.age_key(), i, u8::from(family != "IPv4")))
            };
            for (r, w) in warnings {
                // Every rank known and none equal (a tie [`compute`] breaks
                // by config order), else computed in full.
                let mut ok = true;
                let at = a.warnings.partition_point(|x| match rank_of(x) {
                    Some(xr) => xr < r,
                    None => {
                        ok = false;
                        false
                    }
                });
                ok &= a
                    .warnings
                    .get(at)
                    .is_none_or(|x| rank_of(x).is_some_and(|xr| xr != r));
                if !ok {
                    u.undo(a);
                    return false;
                }
                a.warnings.insert(at, w);
                u.warnings_inserted.push(at);
            }
        }
        // Ids: removed entries' out, added ones' from the counters.
        for k in removed_se {
            Undo::set_id(&mut u.service_ids, &mut a.service_ids, k, None);
        }
        for k in removed_we {
            Undo::set_id(&mut u.workload_ids, &mut a.workload_ids, k, None);
        }
        a.next_service_id = a.next_service_id.max(1);
        a.next_workload_id = a.next_workload_id.max(1);
        for (fresh, map, next, log) in [
            (
                added_se,
                &mut a.service_ids,
                &mut a.next_service_id,
                &mut u.service_ids,
            ),
            (
                added_we,
                &mut a.workload_ids,
                &mut a.next_workload_id,
                &mut u.workload_ids,
            ),
        ] {
            if fresh.is_empty() {
                continue;
            }
            // As [`assign_ids`]: the ids in use before any fresh one.
            let taken: HashSet<u32> = map.values().copied().collect();
            for (_, k) in fresh {
                while *next == 0 || taken.contains(next) {
                    *next = next.wrapping_add(1);
                }
                Undo::set_id(log, map, k, Some(*next));
                *next = next.wrapping_add(1);
            }
        }
        self.pending = Some(Box::new(u));
        true
    }
}

/// Whether `a` and `b` give allocation the same inputs (see
/// [`Allocator::propose_for`]). An unchanged entry is the same `Arc` in
/// both (the parser shares it), so this is a pointer comparison per entry
/// but for the few that changed.
fn same_inputs(a: &Config, b: &Config) -> bool {
    let same_se = |x: &Arc<ServiceEntry>, y: &Arc<ServiceEntry>| {
        Arc::ptr_eq(x, y)
            || (x.namespace() == y.namespace()
                && x.name() == y.name()
                && x.spec.hosts == y.spec.hosts
                && x.age_key() == y.age_key()
                && eligible(x) == eligible(y))
    };
    a.service_entries.len() == b.service_entries.len()
        && a.workload_entries.len() == b.workload_entries.len()
        && a.service_entries
            .iter()
            .zip(&b.service_entries)
            .all(|(x, y)| same_se(x, y))
        && a.workload_entries
            .iter()
            .zip(&b.workload_entries)
            .all(|(x, y)| {
                Arc::ptr_eq(x, y) || (x.namespace() == y.namespace() && x.name() == y.name())
            })
        && a.api_status == b.api_status
}

/// New allocation warnings other than a full prefix logged one line each
/// per commit; the rest are counted in one line.
const MAX_WARNING_LINES: usize = 20;

/// Pure allocation step: previous allocation + config -> next allocation.
fn compute(
    prev: &Allocation,
    cfg: &Config,
    prefixes: Prefixes,
    now: u64,
    grace: Duration,
) -> Allocation {
    let mut warnings = Vec::new();

    // Eligible entries, oldest first: the order that decides collisions.
    // Each entry's key made once (every host below borrows it).
    let mut order: Vec<(&ServiceEntry, ObjectKey)> = cfg
        .service_entries
        .iter()
        .map(|se| &**se)
        .filter(|se| eligible(se))
        .map(|se| {
            let se: &ServiceEntry = se;
            (se, se.key())
        })
        .collect();
    order.sort_by_key(|(se, _)| se.age_key());
    let n_hosts: usize = order.iter().map(|(se, _)| se.spec.hosts.len()).sum();

    // 1. Host ownership.
    let mut owners: HashMap<&str, &ObjectKey> = HashMap::with_capacity(n_hosts);
    let mut owned: Vec<(&str, &ObjectKey)> = Vec::with_capacity(n_hosts);
    for (se, key) in &order {
        for h in &se.spec.hosts {
            match owners.get(h.as_str()) {
                Some(owner) if *owner == key => {} // host listed twice
                Some(owner) => warnings.push(AllocWarning::HostConflict {
                    entry: key.clone(),
                    host: h.clone(),
                    owner: (*owner).clone(),
                }),
                None => {
                    owners.insert(h.as_str(), key);
                    owned.push((h.as_str(), key));
                }
            }
        }
    }

    // 2. Keep persisted addresses, oldest entry first; note the rest.
    let v4_last = (1u128 << (32 - prefixes.v4.prefix_len())).saturating_sub(2);
    let v6_last = if prefixes.v6.prefix_len() == 0 {
        u128::MAX
    } else {
        (1u128 << (128 - prefixes.v6.prefix_len())) - 1
    };
    let same_prefixes = prev.prefixes == Some(prefixes);
    let cur4 = prev
        .next_v4
        .filter(|_| same_prefixes)
        .and_then(|a| off_v4(prefixes.v4, a))
        .unwrap_or(1);
    let cur6 = prev
        .next_v6
        .filter(|_| same_prefixes)
        .and_then(|a| off_v6(prefixes.v6, a))
        .unwrap_or(1);
    let mut pool4 = Pool::new(1, v4_last, cur4);
    let mut pool6 = Pool::new(1, v6_last, cur6);
    if same_prefixes {
        for (a, t) in &prev.freed_v4 {
            if let Some(off) = off_v4(prefixes.v4, *a) {
                pool4.release(off, *t);
            }
        }
        for (a, t) in &prev.freed_v6 {
            if let Some(off) = off_v6(prefixes.v6, *a) {
                pool6.release(off, *t);
            }
        }
    }
    let mut hosts: HashMap<String, HostAlloc> = HashMap::with_capacity(owned.len());
    let mut need: Vec<(&str, &ObjectKey, bool, bool)> = Vec::new();
    for &(h, key) in &owned {
        // A host back within its grace gets its reserved addresses again;
        // one the state does not know keeps what its status says (a lost
        // state, or addresses another allocator wrote).
        let from_status = status_alloc(cfg, key, h);
        let old = prev
            .hosts
            .get(h)
            .or_else(|| prev.reserved.get(h).map(|(a, _)| a))
            .or(from_status.as_ref());
        let mut v4 = None;
        let mut v6 = None;
        if let Some(a) = old.and_then(|o| o.v4) {
            match off_v4(prefixes.v4, a) {
                Some(off) if pool4.claim(off) => v4 = Some(a),
                Some(_) => warnings.push(AllocWarning::Reassigned {
                    entry: key.clone(),
                    host: h.to_string(),
                    address: IpAddr::V4(a),
                    reason: "address claimed by an older entry".into(),
                }),
                None => warnings.push(AllocWarning::Reassigned {
                    entry: key.clone(),
                    host: h.to_string(),
                    address: IpAddr::V4(a),
                    reason: format!("outside {}", prefixes.v4),
                }),
            }
        }
        if let Some(a) = old.and_then(|o| o.v6) {
            match off_v6(prefixes.v6, a) {
                Some(off) if pool6.claim(off) => v6 = Some(a),
                Some(_) => warnings.push(AllocWarning::Reassigned {
                    entry: key.clone(),
                    host: h.to_string(),
                    address: IpAddr::V6(a),
                    reason: "address claimed by an older entry".into(),
                }),
                None => warnings.push(AllocWarning::Reassigned {
                    entry: key.clone(),
                    host: h.to_string(),
                    address: IpAddr::V6(a),
                    reason: format!("outside {}", prefixes.v6),
                }),
            }
        }
        if v4.is_none() || v6.is_none() {
            need.push((h, key, v4.is_none(), v6.is_none()));
        }
        hosts.insert(
            h.to_string(),
            HostAlloc {
                owner: key.clone(),
                v4,
                v6,
            },
        );
    }

    // 3. Reservations: hosts gone now (released now) or still within their
    //    grace keep their addresses out of the pool; those whose grace ended
    //    are free, with their release time. An address a live host holds
    //    (hand edits) or outside the prefix is dropped.
    let gone = prev
        .hosts
        .iter()
        .map(|(h, a)| (h, a, now))
        .chain(prev.reserved.iter().map(|(h, (a, t))| (h, a, *t)))
        .filter(|(h, _, _)| !hosts.contains_key(*h));
    let mut gone: Vec<_> = gone.collect();
    gone.sort_by(|a, b| a.0.cmp(b.0)); // deterministic claims
    let mut reserved = HashMap::new();
    for (h, a, t) in gone {
        if now.saturating_sub(t) >= grace.as_secs() {
            if let Some(off) = a.v4.and_then(|a| off_v4(prefixes.v4, a)) {
                pool4.release(off, t);
            }
            if let Some(off) = a.v6.and_then(|a| off_v6(prefixes.v6, a)) {
                pool6.release(off, t);
            }
            continue;
        }
        let v4 =
            a.v4.filter(|a| off_v4(prefixes.v4, *a).is_some_and(|o| pool4.claim(o)));
        let v6 =
            a.v6.filter(|a| off_v6(prefixes.v6, *a).is_some_and(|o| pool6.claim(o)));
        if v4.is_some() || v6.is_some() {
            let owner = a.owner.clone();
            reserved.insert(h.clone(), (HostAlloc { owner, v4, v6 }, t));
        }
    }

    // 4. New addresses, oldest entry first.
    for (h, key, want4, want6) in need {
        let slot = hosts.get_mut(h).expect("inserted above");
        if want4 {
            match pool4.next() {
                Some(off) => slot.v4 = Some(nth_v4(prefixes.v4, off)),
                None => warnings.push(AllocWarning::Exhausted {
                    entry: key.clone(),
                    host: h.to_string(),
                    family: "IPv4".into(),
                }),
            }
        }
        if want6 {
            match pool6.next() {
                Some(off) => slot.v6 = Some(nth_v6(prefixes.v6, off)),
                None => warnings.push(AllocWarning::Exhausted {
                    entry: key.clone(),
                    host: h.to_string(),
                    family: "IPv6".into(),
                }),
            }
        }
    }

    let ids = Ids::assign(prev, cfg);
    Allocation {
        hosts,
        service_ids: ids.services,
        workload_ids: ids.workloads,
        warnings,
        reserved,
        freed_v4: pool4
            .freed()
            .map(|(off, t)| (nth_v4(prefixes.v4, off), t))
            .collect(),
        freed_v6: pool6
            .freed()
            .map(|(off, t)| (nth_v6(prefixes.v6, off), t))
            .collect(),
        prefixes: Some(prefixes),
        next_v4: Some(nth_v4(prefixes.v4, pool4.cursor)),
        next_v6: Some(nth_v6(prefixes.v6, pool6.cursor)),
        next_service_id: ids.next_service_id,
        next_workload_id: ids.next_workload_id,
    }
}

/// The addresses `key`'s API status gives `host` (first of each family).
fn status_alloc(cfg: &Config, key: &ObjectKey, host: &str) -> Option<HostAlloc> {
    let st = cfg.api_status.as_ref()?.get(key)?;
    let mut a = HostAlloc {
        owner: key.clone(),
        v4: None,
        v6: None,
    };
    for sa in st.addresses.iter().filter(|sa| sa.host == host) {
        match sa.value.parse::<IpAddr>() {
            Ok(IpAddr::V4(v)) if a.v4.is_none() => a.v4 = Some(v),
            Ok(IpAddr::V6(v)) if a.v6.is_none() => a.v6 = Some(v),
            _ => {}
        }
    }
    (a.v4.is_some() || a.v6.is_some()).then_some(a)
}

/// The allocation a reader without state of its own (a waypoint with
/// `--source kubernetes`) serves: host addresses from the API status, ids
/// in config order (stable for this config, not across processes).
pub fn from_status(cfg: &Config) -> Allocation {
    follow(&Allocation::default(), cfg)
}

/// Follower step: each eligible entry's hosts take the addresses of its
/// API status (older entries own a host first, as the allocator decides);
/// ids as the allocator's. Nothing is reserved or allocated.
fn follow(prev: &Allocation, cfg: &Config) -> Allocation {
    let mut order: Vec<&ServiceEntry> = cfg
        .service_entries
        .iter()
        .map(|se| &**se)
        .filter(|se| eligible(se))
        .collect();
    order.sort_by_key(|se| se.age_key());
    let mut hosts: HashMap<String, HostAlloc> = HashMap::new();
    let mut taken: HashSet<IpAddr> = HashSet::new();
    for se in order {
        let key = se.key();
        for h in &se.spec.hosts {
            if hosts.contains_key(h) {
                continue;
            }
            let Some(mut a) = status_alloc(cfg, &key, h) else {
                continue;
            };
            // An address twice in the statuses (hand edits) serves once.
            a.v4 = a.v4.filter(|v| taken.insert(IpAddr::V4(*v)));
            a.v6 = a.v6.filter(|v| taken.insert(IpAddr::V6(*v)));
            hosts.insert(h.clone(), a);
        }
    }
    let ids = Ids::assign(prev, cfg);
    Allocation {
        hosts,
        service_ids: ids.services,
        workload_ids: ids.workloads,
        prefixes: prev.prefixes,
        next_v4: prev.next_v4,
        next_v6: prev.next_v6,
        next_service_id: ids.next_service_id,
        next_workload_id: ids.next_workload_id,
        ..Default::default()
    }
}

/// The stable ids of every ServiceEntry and WorkloadEntry (the one home of
/// id assignment, for allocator and follower alike): kept for known
/// objects, new ones from a counter.
struct Ids {
    services: HashMap<ObjectKey, u32>,
    workloads: HashMap<ObjectKey, u32>,
    next_service_id: u32,
    next_workload_id: u32,
}

impl Ids {
    fn assign(prev: &Allocation, cfg: &Config) -> Ids {
        let mut next_service_id = prev.next_service_id.max(1);
        let services = assign_ids(
            cfg.service_entries.iter().map(|s| s.key()),
            &prev.service_ids,
            &mut next_service_id,
        );
        let mut next_workload_id = prev.next_workload_id.max(1);
        let workloads = assign_ids(
            cfg.workload_entries.iter().map(|w| w.key()),
            &prev.workload_ids,
            &mut next_workload_id,
        );
        Ids {
            services,
            workloads,
            next_service_id,
            next_workload_id,
        }
    }
}

fn assign_ids(
    keys: impl Iterator<Item = ObjectKey>,
    prev: &HashMap<ObjectKey, u32>,
    next: &mut u32,
) -> HashMap<ObjectKey, u32> {
    let mut out = HashMap::with_capacity(prev.len());
    let mut fresh = Vec::new();
    for k in keys {
        match prev.get(&k) {
            Some(id) => {
                out.insert(k, *id);
            }
            None => fresh.push(k),
        }
    }
    let taken: HashSet<u32> = out.values().copied().collect();
    for k in fresh {
        // Skip 0 (reserved) and ids still in use after a wrap.
        while *next == 0 || taken.contains(next) {
            *next = next.wrapping_add(1);
        }
        out.insert(k, *next);
        *next = next.wrapping_add(1);
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A config directory built from `(file, yaml)` pairs.
    pub(crate) fn cfg(files: &[(&str, &str)]) -> Config {
        let d = tempfile::tempdir().unwrap();
        for (n, t) in files {
            std::fs::write(d.path().join(n), t).unwrap();
        }
        Config::load_dir(d.path()).unwrap()
    }

    pub(crate) fn se(name: &str, hosts: &[&str], extra: &str) -> String {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: ns\n{extra}spec:\n  hosts: [{}]\n  ports: [{{number: 80, name: http}}]\n  resolution: DNS\n---\n",
            hosts.join(", ")
        )
    }

    fn v4(a: &Allocation, host: &str) -> Option<Ipv4Addr> {
        a.hosts.get(host).and_then(|h| h.v4)
    }
    fn v6(a: &Allocation, host: &str) -> Option<Ipv6Addr> {
        a.hosts.get(host).and_then(|h| h.v6)
    }

    #[test]
    fn first_addresses_are_prefix_plus_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        let a = al
            .allocate(&cfg(&[(
                "a.yaml",
                &se("httpbin.org", &["httpbin.org"], ""),
            )]))
            .unwrap();
        assert_eq!(v4(a, "httpbin.org"), Some("240.240.0.1".parse().unwrap()));
        assert_eq!(v6(a, "httpbin.org"), Some("2001:2::1".parse().unwrap()));
        let k = ObjectKey::new("ns", "httpbin.org");
        let addrs: Vec<_> = a
            .addresses_of(&k, &["httpbin.org".to_string()])
            .map(|(_, ip)| ip.to_string())
            .collect();
        assert_eq!(addrs, ["240.240.0.1", "2001:2::1"]);
    }

    #[test]
    fn stable_across_restart_and_edits() {
        let dir = tempfile::tempdir().unwrap();
        let c1 = cfg(&[(
            "a.yaml",
            &(se("a", &["a.example"], "") + &se("b", &["b.example"], "")),
        )]);
        let (a1, b1) = {
            let mut al = Allocator::open(dir.path()).unwrap();
            let a = al.allocate(&c1).unwrap();
            (a.hosts["a.example"].clone(), a.hosts["b.example"].clone())
        };
        // Restart, with `a` deleted and a new entry listed first.
        let c2 = cfg(&[(
            "a.yaml",
            &(se("c", &["c.example"], "") + &se("b", &["b.example"], "")),
        )]);
        let mut al = Allocator::open(dir.path()).unwrap();
        assert_eq!(
            load(dir.path()).unwrap().hosts["a.example"],
            a1,
            "reader sees persisted state"
        );
        let a = al.allocate(&c2).unwrap().clone();
        assert_eq!(a.hosts["b.example"], b1);
        assert!(!a.hosts.contains_key("a.example"), "deleted host released");
        // The released .1 is not handed out again at once (cursor moves on).
        assert_eq!(v4(&a, "c.example"), Some("240.240.0.3".parse().unwrap()));
        // Ids: b keeps its id, c gets a new one.
        let bid = a.service_id(&ObjectKey::new("ns", "b")).unwrap();
        let cid = a.service_id(&ObjectKey::new("ns", "c")).unwrap();
        assert_ne!(bid, cid);
        // Reload again: identical.
        let again = Allocator::open(dir.path())
            .unwrap()
            .allocate(&c2)
            .unwrap()
            .clone();
        assert_eq!(again.hosts, a.hosts);
        assert_eq!(again.service_ids, a.service_ids);
        // A reader's load equals the allocator's result.
        let r = load(dir.path()).unwrap();
        assert_eq!(r.hosts, a.hosts);
        assert_eq!(r.service_ids, a.service_ids);
    }

    #[test]
    fn same_host_in_two_entries_older_creation_timestamp_wins() {
        let dir = tempfile::tempdir().unwrap();
        let young = se(
            "young",
            &["shared.example"],
            "  creationTimestamp: \"2024-10-28T00:00:00Z\"\n",
        );
        let old = se(
            "old",
            &["shared.example"],
            "  creationTimestamp: \"2024-10-27T00:45:08.374915129Z\"\n",
        );
        // `young` comes first in file order; age decides.
        let c = cfg(&[("a.yaml", &(young + &old))]);
        let mut al = Allocator::open(dir.path()).unwrap();
        let a = al.allocate(&c).unwrap();
        assert_eq!(a.hosts["shared.example"].owner, ObjectKey::new("ns", "old"));
        assert_eq!(
            a.warnings,
            vec![AllocWarning::HostConflict {
                entry: ObjectKey::new("ns", "young"),
                host: "shared.example".into(),
                owner: ObjectKey::new("ns", "old"),
            }]
        );
        let yk = ObjectKey::new("ns", "young");
        assert_eq!(a.addresses_of(&yk, &["shared.example".into()]).count(), 0);
    }

    #[test]
    fn same_host_without_timestamps_first_in_file_order_wins() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&[
            ("a.yaml", &se("first", &["h.example"], "")),
            ("b.yaml", &se("second", &["h.example"], "")),
        ]);
        let a = Allocator::open(dir.path())
            .unwrap()
            .allocate(&c)
            .unwrap()
            .clone();
        assert_eq!(a.hosts["h.example"].owner, ObjectKey::new("ns", "first"));
    }

    #[test]
    fn persisted_address_collision_older_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(&[(
            "a.yaml",
            &(se(
                "young",
                &["y.example"],
                "  creationTimestamp: \"2024-10-28T00:00:00Z\"\n",
            ) + &se(
                "old",
                &["o.example"],
                "  creationTimestamp: \"2024-01-01T00:00:00Z\"\n",
            )),
        )]);
        Allocator::open(dir.path()).unwrap().allocate(&c).unwrap();
        // Corrupt the state by hand: both hosts claim the same addresses.
        let p = dir.path().join(STATE_FILE);
        let mut st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap();
        let hosts = st["hosts"].as_array_mut().unwrap();
        let o = hosts
            .iter()
            .find(|h| h["host"] == "o.example")
            .unwrap()
            .clone();
        for h in hosts.iter_mut() {
            h["v4"] = o["v4"].clone();
            h["v6"] = o["v6"].clone();
        }
        std::fs::write(&p, serde_json::to_vec(&st).unwrap()).unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        let a = al.allocate(&c).unwrap();
        let ov4: Ipv4Addr = o["v4"].as_str().unwrap().parse().unwrap();
        assert_eq!(v4(a, "o.example"), Some(ov4));
        assert!(v4(a, "y.example").is_some());
        assert_ne!(v4(a, "y.example"), Some(ov4));
        assert!(a
            .warnings
            .iter()
            .any(|w| matches!(w, AllocWarning::Reassigned { entry, .. } if entry.name == "young")));
    }

    #[test]
    fn exhaustion_is_a_warning_not_an_error() {
        let dir = tempfile::tempdir().unwrap();
        // /30: offsets 1 and 2 usable (IPv4 excludes the last address).
        let pf = Prefixes {
            v4: "10.9.0.0/30".parse().unwrap(),
            v6: "fd00::/126".parse().unwrap(),
        };
        let yaml: String = (0..4)
            .map(|i| se(&format!("s{i}"), &[&format!("h{i}.example")], ""))
            .collect();
        let c = cfg(&[("a.yaml", &yaml)]);
        // No grace: a deleted host's address is free at once.
        let mut al = Allocator::open_with(dir.path(), pf)
            .unwrap()
            .with_grace(Duration::ZERO);
        let a = al.allocate(&c).unwrap().clone();
        assert_eq!(v4(&a, "h0.example"), Some("10.9.0.1".parse().unwrap()));
        assert_eq!(v4(&a, "h1.example"), Some("10.9.0.2".parse().unwrap()));
        assert_eq!(v4(&a, "h2.example"), None);
        assert_eq!(v6(&a, "h2.example"), Some("fd00::3".parse().unwrap()));
        assert_eq!(v6(&a, "h3.example"), None);
        let ex: Vec<_> = a
            .warnings
            .iter()
            .filter_map(|w| match w {
                AllocWarning::Exhausted { host, family, .. } => Some(format!("{host} {family}")),
                _ => None,
            })
            .collect();
        assert_eq!(
            ex,
            ["h2.example IPv4", "h3.example IPv4", "h3.example IPv6"]
        );
        assert_eq!(a.hosts_without_address("IPv4"), 2);
        assert_eq!(a.hosts_without_address("IPv6"), 1);
        // Deleting an entry frees its address for the next one (after wrap).
        let yaml: String = [1, 2, 3]
            .iter()
            .map(|i| se(&format!("s{i}"), &[&format!("h{i}.example")], ""))
            .collect();
        let a = al.allocate(&cfg(&[("a.yaml", &yaml)])).unwrap();
        assert_eq!(v4(a, "h1.example"), Some("10.9.0.2".parse().unwrap()));
        assert_eq!(v4(a, "h2.example"), Some("10.9.0.1".parse().unwrap()));
        assert_eq!(v4(a, "h3.example"), None);
    }

    #[test]
    fn ineligible_entries_get_no_addresses_but_ids() {
        let dir = tempfile::tempdir().unwrap();
        let none = se("none", &["none.example"], "").replace("resolution: DNS", "resolution: NONE");
        let optout = se(
            "optout",
            &["optout.example"],
            "  labels: {networking.istio.io/enable-autoallocate-ip: \"false\"}\n",
        );
        let explicit = se("explicit", &["explicit.example"], "").replace(
            "  resolution: DNS",
            "  addresses: [10.1.2.3]\n  resolution: DNS",
        );
        let wild = se("wild", &["\"*.wild.example\"", "x.example"], "");
        let ok = se("ok", &["ok.example"], "");
        let c = cfg(&[("a.yaml", &(none + &optout + &explicit + &wild + &ok))]);
        let a = Allocator::open(dir.path())
            .unwrap()
            .allocate(&c)
            .unwrap()
            .clone();
        let hosts: Vec<_> = a.hosts.keys().cloned().collect();
        assert_eq!(hosts, ["ok.example"]);
        assert_eq!(v4(&a, "ok.example"), Some("240.240.0.1".parse().unwrap()));
        assert_eq!(a.service_ids.len(), 5);
        let mut ids: Vec<_> = a.service_ids.values().copied().collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 5);
        assert!(!ids.contains(&0));
    }

    /// A fixed start for the tests' clock.
    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    /// `n` entries `s{i}` with host `h{i}.example`, for each `i` in `which`.
    fn hosts_cfg(which: &[usize]) -> Config {
        let yaml: String = which
            .iter()
            .map(|i| se(&format!("s{i}"), &[&format!("h{i}.example")], ""))
            .collect();
        cfg(&[("a.yaml", &yaml)])
    }

    /// Two usable IPv4 and three IPv6 addresses: every free one is reached.
    fn tiny() -> Prefixes {
        Prefixes {
            v4: "10.9.0.0/30".parse().unwrap(),
            v6: "fd00::/126".parse().unwrap(),
        }
    }

    #[test]
    fn a_host_removed_and_restored_within_the_grace_gets_the_same_vips() {
        let dir = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        let before = al.allocate_at(&hosts_cfg(&[0, 1]), t(0)).unwrap().hosts["h0.example"].clone();
        // An empty or truncated file for a moment: h0 disappears.
        let gone = al.allocate_at(&hosts_cfg(&[1]), t(1)).unwrap();
        assert!(
            !gone.hosts.contains_key("h0.example"),
            "not served while gone"
        );
        assert!(!load(dir.path()).unwrap().hosts.contains_key("h0.example"));
        // A new host meanwhile gets neither of h0's addresses.
        let other = al.allocate_at(&hosts_cfg(&[1, 2]), t(2)).unwrap().hosts["h2.example"].clone();
        assert_ne!(other.v4, before.v4);
        assert_ne!(other.v6, before.v6);
        let back = al.allocate_at(&hosts_cfg(&[0, 1, 2]), t(3)).unwrap();
        assert_eq!(back.hosts["h0.example"], before);
        assert_eq!(v4(back, "h0.example"), Some("240.240.0.1".parse().unwrap()));
        assert_eq!(v6(back, "h0.example"), Some("2001:2::1".parse().unwrap()));
    }

    #[test]
    fn a_reserved_address_is_not_given_to_another_host_and_is_free_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(600);
        let mut al = Allocator::open_with(dir.path(), tiny())
            .unwrap()
            .with_grace(grace);
        let a = al.allocate_at(&hosts_cfg(&[0, 1]), t(0)).unwrap();
        assert_eq!(v4(a, "h0.example"), Some("10.9.0.1".parse().unwrap()));
        al.allocate_at(&hosts_cfg(&[1]), t(10)).unwrap();
        // Within the grace, h2 finds the IPv4 range full (h0's .1 is held).
        let a = al.allocate_at(&hosts_cfg(&[1, 2]), t(10 + 599)).unwrap();
        assert_eq!(v4(a, "h2.example"), None);
        assert_eq!(v6(a, "h2.example"), Some("fd00::3".parse().unwrap()));
        assert!(a
            .warnings
            .iter()
            .any(|w| matches!(w, AllocWarning::Exhausted { host, .. } if host == "h2.example")));
        // The grace counts from the removal; then .1 is free again.
        let a = al.allocate_at(&hosts_cfg(&[1, 2]), t(10 + 600)).unwrap();
        assert_eq!(v4(a, "h2.example"), Some("10.9.0.1".parse().unwrap()));
        // h0 returns too late: its old address now belongs to h2.
        let a = al.allocate_at(&hosts_cfg(&[1, 2, 0]), t(10 + 601)).unwrap();
        assert_eq!(v4(a, "h0.example"), None);
    }

    #[test]
    fn a_restart_keeps_the_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let before = {
            let mut al = Allocator::open_with(dir.path(), tiny()).unwrap();
            al.allocate_at(&hosts_cfg(&[0, 1]), t(0)).unwrap();
            al.allocate_at(&hosts_cfg(&[1]), t(1)).unwrap();
            load(dir.path()).unwrap()
        };
        assert!(
            !before.hosts.contains_key("h0.example"),
            "readers see live hosts only"
        );
        let mut al = Allocator::open_with(dir.path(), tiny()).unwrap();
        let a = al.allocate_at(&hosts_cfg(&[1, 2]), t(2)).unwrap();
        assert_eq!(
            v4(a, "h2.example"),
            None,
            "h0's reserved .1 survived the restart"
        );
        let a = al.allocate_at(&hosts_cfg(&[0, 1, 2]), t(3)).unwrap();
        assert_eq!(v4(a, "h0.example"), Some("10.9.0.1".parse().unwrap()));
        assert_eq!(v6(a, "h0.example"), Some("fd00::1".parse().unwrap()));
    }

    #[test]
    fn a_state_file_of_an_older_agent_loads_with_every_host_live() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(STATE_FILE),
            r#"{"version":1,"prefixes":{"v4":"240.240.0.0/16","v6":"2001:2::/48"},"nextV4":"240.240.0.3","nextV6":"2001:2::3","hosts":[{"host":"h0.example","namespace":"ns","name":"s0","v4":"240.240.0.2","v6":"2001:2::2"}],"nextServiceId":2,"services":[{"namespace":"ns","name":"s0","id":1}],"nextWorkloadId":1,"workloads":[]}"#,
        )
        .unwrap();
        assert_eq!(
            v4(&load(dir.path()).unwrap(), "h0.example"),
            Some("240.240.0.2".parse().unwrap())
        );
        let mut al = Allocator::open(dir.path()).unwrap();
        let a = al.allocate_at(&hosts_cfg(&[0]), t(0)).unwrap();
        assert_eq!(v4(a, "h0.example"), Some("240.240.0.2".parse().unwrap()));
        assert_eq!(a.service_id(&ObjectKey::new("ns", "s0")), Some(1));
    }

    #[test]
    fn after_the_grace_the_address_released_longest_ago_is_handed_out_first() {
        let dir = tempfile::tempdir().unwrap();
        // A /29: offsets 1..=6 usable.
        let pf = Prefixes {
            v4: "10.9.0.0/29".parse().unwrap(),
            v6: "fd00::/125".parse().unwrap(),
        };
        let grace = Duration::from_secs(100);
        let open = || {
            Allocator::open_with(dir.path(), pf)
                .unwrap()
                .with_grace(grace)
        };
        let mut al = open();
        let a = al.allocate_at(&hosts_cfg(&[0, 1, 2, 3]), t(0)).unwrap();
        assert_eq!(v4(a, "h3.example"), Some("10.9.0.4".parse().unwrap()));
        // Released in an order that is not the address order: .3, .1, .4.
        al.allocate_at(&hosts_cfg(&[0, 1, 3]), t(10)).unwrap();
        al.allocate_at(&hosts_cfg(&[1, 3]), t(20)).unwrap();
        al.allocate_at(&hosts_cfg(&[1]), t(30)).unwrap();
        // The release times survive a restart.
        drop(al);
        let mut al = open();
        // Long after every grace: never-used addresses first (.5, .6),
        // then the one released longest ago (.3, then .1, then .4).
        let mut next = vec![1];
        let mut got = Vec::new();
        for (i, h) in (4..9).enumerate() {
            next.push(h);
            let a = al
                .allocate_at(&hosts_cfg(&next), t(1000 + i as u64))
                .unwrap();
            got.push(v4(a, &format!("h{h}.example")).unwrap().to_string());
        }
        assert_eq!(
            got,
            ["10.9.0.5", "10.9.0.6", "10.9.0.3", "10.9.0.1", "10.9.0.4"]
        );
        // IPv6 the same (offsets 1..=7, so one more never-used first).
        let a = al.allocate_at(&hosts_cfg(&next), t(2000)).unwrap();
        let got: Vec<_> = (6..9)
            .map(|h| v6(a, &format!("h{h}.example")).unwrap().to_string())
            .collect();
        assert_eq!(got, ["fd00::7", "fd00::3", "fd00::1"]);
    }

    #[test]
    fn an_address_freed_within_a_grace_is_not_recorded_until_the_grace_ends() {
        let dir = tempfile::tempdir().unwrap();
        let grace = Duration::from_secs(100);
        let mut al = Allocator::open_with(dir.path(), tiny())
            .unwrap()
            .with_grace(grace);
        al.allocate_at(&hosts_cfg(&[0, 1]), t(0)).unwrap();
        // h0 (.1) goes at 10, h1 (.2) at 50; at 120 only h0's grace ended.
        al.allocate_at(&hosts_cfg(&[1]), t(10)).unwrap();
        al.allocate_at(&hosts_cfg(&[]), t(50)).unwrap();
        let a = al.allocate_at(&hosts_cfg(&[2]), t(120)).unwrap();
        assert_eq!(v4(a, "h2.example"), Some("10.9.0.1".parse().unwrap()));
        // h1 returns within its grace and gets .2 back, not h2's .1.
        let a = al.allocate_at(&hosts_cfg(&[1, 2]), t(140)).unwrap();
        assert_eq!(v4(a, "h1.example"), Some("10.9.0.2".parse().unwrap()));
    }

    /// `n` entries `s{i}` with host `h{i}.example`, built without YAML.
    fn many(n: usize) -> Config {
        let mut c = Config::default();
        let base = (*cfg(&[("a.yaml", &se("x", &["x.example"], ""))]).service_entries[0]).clone();
        for i in 0..n {
            let mut s = base.clone();
            s.metadata.name = format!("s{i}");
            s.spec.hosts = [format!("h{i}.example")].into();
            s.origin.doc = i;
            c.service_entries.push(std::sync::Arc::new(s));
        }
        c
    }

    #[test]
    fn release_times_kept_are_bounded_and_the_forgotten_count_as_oldest() {
        let dir = tempfile::tempdir().unwrap();
        // A /19: 8190 usable IPv4 addresses, all of them handed out.
        let n = 8190;
        let pf = Prefixes {
            v4: "10.8.0.0/19".parse().unwrap(),
            v6: "fd00::/112".parse().unwrap(),
        };
        let mut al = Allocator::open_with(dir.path(), pf)
            .unwrap()
            .with_grace(Duration::ZERO);
        let mut c = many(n);
        al.allocate_at(&c, t(0)).unwrap();
        // h0..h3 are released first, then all the others.
        c.service_entries.drain(..4);
        al.allocate_at(&c, t(1)).unwrap();
        c.service_entries.clear();
        al.allocate_at(&c, t(2)).unwrap();
        let st: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join(STATE_FILE)).unwrap()).unwrap();
        let freed = st["freed"].as_array().unwrap();
        assert_eq!(freed.len(), 2 * MAX_FREED);
        let recorded: HashSet<&str> = freed.iter().filter_map(|f| f["address"].as_str()).collect();
        assert!(!recorded.contains("10.8.0.1"), "the oldest are forgotten");
        assert!(recorded.contains("10.8.31.254"), "the most recent are kept");
        // A forgotten one still goes before every recorded one.
        let a = al.allocate_at(&hosts_cfg(&[0]), t(3)).unwrap();
        assert_eq!(v4(a, "h0.example"), Some("10.8.0.1".parse().unwrap()));
    }

    #[test]
    fn a_proposal_not_committed_reserves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        al.allocate(&hosts_cfg(&[0])).unwrap();
        let file = std::fs::read(dir.path().join(STATE_FILE)).unwrap();
        // A config refused after allocation: h1 would get .2.
        let refused = al.propose(&hosts_cfg(&[0, 1]));
        assert_eq!(
            v4(&refused, "h1.example"),
            Some("240.240.0.2".parse().unwrap())
        );
        drop(refused);
        assert_eq!(std::fs::read(dir.path().join(STATE_FILE)).unwrap(), file);
        assert_eq!(al.current().hosts.len(), 1);
        // The next accepted config's new host takes .2: nothing was held.
        let a = al.allocate(&hosts_cfg(&[0, 2])).unwrap();
        assert_eq!(v4(a, "h2.example"), Some("240.240.0.2".parse().unwrap()));
    }

    #[test]
    fn hundred_thousand_entries_are_linear() {
        // Not a timing assertion: checks the result at the scale the
        // benchmark measures (and that it finishes).
        let mut c = Config::default();
        let base = (*cfg(&[("a.yaml", &se("x", &["x.example"], ""))]).service_entries[0]).clone();
        for i in 0..100_000 {
            let mut s = base.clone();
            s.metadata.name = format!("s{i}");
            s.spec.hosts = [format!("h{i}.example")].into();
            s.origin.doc = i;
            c.service_entries.push(std::sync::Arc::new(s));
        }
        let dir = tempfile::tempdir().unwrap();
        let a = Allocator::open(dir.path())
            .unwrap()
            .allocate(&c)
            .unwrap()
            .clone();
        assert_eq!(a.hosts.len(), 100_000);
        // 65534 usable IPv4 addresses in a /16; IPv6 never runs out.
        assert_eq!(a.hosts.values().filter(|h| h.v4.is_some()).count(), 65_534);
        assert_eq!(a.hosts.values().filter(|h| h.v6.is_some()).count(), 100_000);
        assert_eq!(
            v4(&a, "h65533.example"),
            Some("240.240.255.254".parse().unwrap())
        );
    }
}

#[cfg(test)]
mod incremental_tests {
    use super::tests::se;
    use super::*;
    use crate::config::{Parser, Snapshot};

    fn t(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    /// `propose_for` + `commit_for` against a full `allocate_at` for each
    /// step of an edit sequence (parsed by one parser, as the watcher
    /// does): the same allocation in force and the same `vips.json` after
    /// every step, and the shortcut taken exactly where `unchanged` says.
    #[test]
    fn the_shortcut_gives_what_computing_again_gives() {
        let prefixes = Prefixes {
            v4: "10.9.0.0/30".parse().unwrap(), // two addresses: h2 has none
            v6: "fd00::/124".parse().unwrap(),
        };
        let grace = Duration::from_secs(100);
        let (di, df) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut inc = Allocator::open_with(di.path(), prefixes)
            .unwrap()
            .with_grace(grace);
        let mut full = Allocator::open_with(df.path(), prefixes)
            .unwrap()
            .with_grace(grace);
        let mut parser = Parser::default();
        let old = "  creationTimestamp: \"2020-01-01T00:00:00Z\"\n";
        let port = |y: String| y.replace("number: 80", "number: 8080");
        let label = "  labels: {team: a}\n";
        let steps: Vec<(u64, String, bool)> = vec![
            (0, [se("s0", &["h0"], ""), se("s1", &["h1"], ""), se("s2", &["h2"], "")].concat(), false),
            // A port: no allocation input.
            (1, [se("s0", &["h0"], ""), port(se("s1", &["h1"], "")), se("s2", &["h2"], "")].concat(), true),
            (2, [se("s0", &["h0"], label), port(se("s1", &["h1"], "")), se("s2", &["h2"], "")].concat(), true),
            // A host changed: h1 reserved, h1b gets the free v6.
            (3, [se("s0", &["h0"], label), se("s1", &["h1b"], ""), se("s2", &["h2"], "")].concat(), false),
            // Within h1's grace: nothing to compute.
            (4, [se("s0", &["h0"], ""), se("s1", &["h1b"], ""), se("s2", &["h2"], "")].concat(), true),
            // h1's grace ended: its addresses are freed, so computed again
            // although no input changed (h1b, the older, gets its IPv4).
            (3 + 100, [se("s0", &["h0"], label), se("s1", &["h1b"], ""), se("s2", &["h2"], "")].concat(), false),
            // An older entry now lists h0: it takes h0's VIPs from s0.
            (200, [se("s0", &["h0"], label), se("s1", &["h1b"], ""), se("s2", &["h2"], ""), se("s3", &["h0"], old)].concat(), false),
            (201, [se("s0", &["h0"], ""), se("s1", &["h1b"], ""), se("s2", &["h2"], ""), se("s3", &["h0"], old)].concat(), true),
            // Explicit addresses: s2 no longer eligible.
            (202, [se("s0", &["h0"], ""), se("s1", &["h1b"], ""), se("s2", &["h2"], "").replace("  resolution: DNS", "  addresses: [10.1.1.1]\n  resolution: DNS"), se("s3", &["h0"], old)].concat(), false),
            // A removal.
            (203, [se("s0", &["h0"], ""), se("s2", &["h2"], ""), se("s3", &["h0"], old)].concat(), false),
            // A workload added: new id, computed.
            (204, [se("s0", &["h0"], ""), se("s2", &["h2"], ""), se("s3", &["h0"], old), "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {name: w, namespace: ns}\nspec: {address: 10.0.0.1}\n".into()].concat(), false),
        ];
        for (i, (secs, yaml, unchanged)) in steps.into_iter().enumerate() {
            let snap = Snapshot::new(vec![
                ("/c/a.yaml".into(), yaml.into_bytes()),
                ("/c/b.yaml".into(), se("other", &["x"], "").into_bytes()),
            ]);
            let cfg = Arc::new(parser.parse(Arc::new(snap)).unwrap());
            let p = inc.propose_for_at(&cfg, t(secs));
            assert_eq!(matches!(p, Proposal::Unchanged), unchanged, "step {i}");
            inc.commit_for(p, &cfg).unwrap();
            full.allocate_at(&cfg, t(secs)).unwrap();
            assert_eq!(inc.current(), full.current(), "step {i}");
            // What a restart or a reader finds (base and journal).
            assert_eq!(
                &load(di.path()).unwrap(),
                full.current(),
                "step {i}: persisted"
            );
            assert_eq!(
                &load(df.path()).unwrap(),
                full.current(),
                "step {i}: persisted"
            );
        }
        // The sequence reached what it is about.
        let a = inc.current();
        assert_eq!(a.hosts["h0"].owner.name, "s3");
        assert!(a
            .warnings
            .iter()
            .any(|w| matches!(w, AllocWarning::HostConflict { .. })));
    }

    /// Random edit sequences (hosts renamed, shared, entries added and
    /// removed, made ineligible, aged; workloads; time passing through
    /// graces; proposals refused): the allocator with its patches gives
    /// after every committed step what computing in full gives, in memory
    /// and in `vips.json`; and the patch is taken on many of them.
    #[test]
    fn patches_give_what_computing_again_gives() {
        let prefixes = Prefixes {
            v4: "10.9.0.0/29".parse().unwrap(), // six addresses
            v6: "fd00::/123".parse().unwrap(),  // 31
        };
        let grace = Duration::from_secs(50);
        for seed in 1..=12u64 {
            let mut rng = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut next = move |n: u64| {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % n
            };
            let (di, df) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
            let mut inc = Allocator::open_with(di.path(), prefixes)
                .unwrap()
                .with_grace(grace);
            let mut full = Allocator::open_with(df.path(), prefixes)
                .unwrap()
                .with_grace(grace);
            let mut parser = Parser::default();
            // Per entry: present, host numbers, age, eligible.
            let mut ents: Vec<(bool, Vec<u64>, Option<u64>, bool)> = (0..16)
                .map(|i| (next(3) > 0, vec![i], None, true))
                .collect();
            let mut workloads = [false; 4];
            let (mut secs, mut patched, mut journaled) = (0u64, 0usize, false);
            for step in 0..60 {
                for _ in 0..1 + next(2) {
                    let i = next(16);
                    let e = &mut ents[i as usize];
                    // Host numbers of an entry's own, but a few shared.
                    match next(8) {
                        0 => e.0 = !e.0,
                        1 => e.1 = vec![i * 8 + next(8)],
                        2 => e.1 = vec![i * 8 + next(8), i * 8 + next(8)],
                        3 => e.2 = Some(next(5)),
                        4 => e.3 = !e.3,
                        5 if next(3) == 0 => e.1.push(200 + next(6)),
                        _ => workloads[next(4) as usize] ^= true,
                    }
                }
                // Mostly within the graces, now and then past them.
                secs += if next(8) == 0 { next(80) } else { next(3) };
                let yaml = |range: std::ops::Range<usize>| -> String {
                    let mut y = String::new();
                    for (i, (present, hosts, age, el)) in ents[range.clone()].iter().enumerate() {
                        if !present {
                            continue;
                        }
                        let hosts: Vec<String> = hosts.iter().map(|h| format!("h{h}")).collect();
                        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
                        let extra = age
                            .map(|a| {
                                format!("  creationTimestamp: \"2020-01-0{}T00:00:00Z\"\n", a + 1)
                            })
                            .unwrap_or_default();
                        let mut doc = se(&format!("s{}", i + range.start), &hosts, &extra);
                        if !el {
                            doc = doc.replace(
                                "  resolution: DNS",
                                "  addresses: [10.1.1.1]\n  resolution: DNS",
                            );
                        }
                        y.push_str(&doc);
                    }
                    y
                };
                let mut w = String::new();
                for (i, on) in workloads.iter().enumerate() {
                    if *on {
                        w.push_str(&format!("apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: w{i}, namespace: ns}}\nspec: {{address: 10.0.0.{}}}\n---\n", i + 1));
                    }
                }
                let snap = Snapshot::new(vec![
                    ("/c/a.yaml".into(), yaml(0..6).into_bytes()),
                    ("/c/b.yaml".into(), yaml(6..11).into_bytes()),
                    ("/c/c.yaml".into(), yaml(11..16).into_bytes()),
                    ("/c/w.yaml".into(), w.into_bytes()),
                ]);
                let Ok(cfg) = parser.parse(Arc::new(snap)) else {
                    continue;
                };
                let cfg = Arc::new(cfg);
                let p = inc.propose_for_at(&cfg, t(secs));
                patched += usize::from(matches!(p, Proposal::Patched));
                if next(6) == 0 {
                    // Refused: nothing of it may remain.
                    drop(p);
                    continue;
                }
                inc.commit_for(p, &cfg).unwrap();
                journaled |= inc.journal.journal_len > 0;
                full.allocate_at(&cfg, t(secs)).unwrap();
                assert_eq!(inc.current(), full.current(), "seed {seed} step {step}");
                assert_eq!(
                    &load(di.path()).unwrap(),
                    full.current(),
                    "seed {seed} step {step}: persisted (base and journal)"
                );
                if next(20) == 0 {
                    // A restart resumes from base and journal.
                    let again = Allocator::open_with(di.path(), prefixes).unwrap();
                    inc = again.with_grace(grace);
                }
            }
            assert!(patched >= 5, "seed {seed}: only {patched} patches");
            assert!(
                journaled || patched == 0,
                "seed {seed}: no patch was journaled"
            );
        }
    }

    /// The journal after a crash: a line cut short is not applied (nor
    /// anything after it) and the next write is a new base; lines of an
    /// earlier base are not applied to a later one.
    #[test]
    fn a_torn_or_stale_journal_line_is_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        let mut parser = Parser::default();
        // Enough other entries for the base to outweigh a few lines.
        let others: String = (0..40)
            .map(|i| se(&format!("o{i}"), &[&format!("o{i}.example")], ""))
            .collect();
        let mut parse = |y: String| {
            let snap = Snapshot::new(vec![
                ("/c/a.yaml".into(), y.into_bytes()),
                ("/c/b.yaml".into(), others.clone().into_bytes()),
            ]);
            Arc::new(parser.parse(Arc::new(snap)).unwrap())
        };
        let mut al = Allocator::open(dir.path()).unwrap();
        let c1 = parse([se("a", &["a.example"], ""), se("b", &["b.example"], "")].concat());
        let p = al.propose_for_at(&c1, t(0));
        al.commit_for(p, &c1).unwrap();
        let c2 = parse([se("a", &["a.example"], ""), se("b", &["b2.example"], "")].concat());
        let p = al.propose_for_at(&c2, t(1));
        assert!(matches!(p, Proposal::Patched));
        al.commit_for(p, &c2).unwrap();
        let two = al.current().clone();
        let jpath = journal_path(dir.path());
        let journal = std::fs::read(&jpath).unwrap();
        assert_eq!(journal.iter().filter(|b| **b == b'\n').count(), 1);
        assert_eq!(load(dir.path()).unwrap(), two);
        // A third line cut short by a crash.
        let c3 = parse([se("a", &["a.example"], ""), se("b", &["b3.example"], "")].concat());
        let p = al.propose_for_at(&c3, t(2));
        al.commit_for(p, &c3).unwrap();
        let full = std::fs::read(&jpath).unwrap();
        std::fs::write(&jpath, &full[..full.len() - 5]).unwrap();
        assert_eq!(load(dir.path()).unwrap(), two);
        let mut al = Allocator::open(dir.path()).unwrap();
        assert!(al.journal.torn);
        assert_eq!(al.current(), &two);
        // The next write replaces base and journal.
        let p = al.propose_for_at(&c3, t(3));
        al.commit_for(p, &c3).unwrap();
        assert!(!jpath.exists());
        assert_eq!(&load(dir.path()).unwrap(), al.current());
        // A line of the base before (a crash between the new base's rename
        // and the journal's removal) is ignored.
        std::fs::write(&jpath, &journal).unwrap();
        assert_eq!(&load(dir.path()).unwrap(), al.current());
    }
}

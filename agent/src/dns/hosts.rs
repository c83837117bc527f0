//! The table of ServiceEntry hosts the proxy answers for itself, each with
//! the namespaces that see it (`exportTo`): a client sees a host only if
//! one of its ServiceEntries is exported to the client's namespace (looked
//! up by the query's source address); otherwise the query goes upstream,
//! as Istio's DNS proxy does for hosts it does not know.
//!
//! Wildcard hosts (`*.example.com`, DYNAMIC_DNS entries bound to a
//! waypoint) answer every name strictly below their suffix. The exact host
//! wins over a wildcard, a more specific wildcard over a broader one
//! (`model::host`'s rule, walked here without allocating), each among the
//! entries the client sees.

use std::borrow::Cow;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::Name;

use super::DnsError;
use crate::model::{CowMap, ExportTo, Model};

/// The live table: the config side calls `store(Arc::new(new_table))`.
pub type SharedHostTable = Arc<ArcSwap<HostTable>>;

/// VIPs of one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// The VIPs one ServiceEntry gives a host, and who sees them.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Scoped {
    export_to: ExportTo,
    addrs: HostAddrs,
}

/// Lower-case host name (no trailing dot) → VIPs per visibility; client
/// address → namespace. The hosts are [`CowMap`]s: a table patched from
/// the previous one ([`HostTable::from_model`]) shares every host it did
/// not change.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostTable {
    hosts: CowMap<Box<str>, Vec<Scoped>>,
    /// `*.suffix` hosts, keyed by `suffix`.
    wildcards: CowMap<Box<str>, Vec<Scoped>>,
    clients: HashMap<IpAddr, Box<str>>,
}

/// Lower-cases and strips one trailing dot; checks RFC 1035 shape (letters,
/// digits, `-`, `_`; labels 1..=63; at most 253 characters). A leading
/// `*.` label makes a wildcard: `(true, suffix)`; any other `*` is refused.
fn normalize(host: &str) -> Result<(bool, String), DnsError> {
    let bad = |reason| DnsError::InvalidHost {
        host: host.to_string(),
        reason,
    };
    let h = host.strip_suffix('.').unwrap_or(host);
    if h.is_empty() {
        return Err(bad("empty name"));
    }
    if h.len() > 253 {
        return Err(bad("longer than 253 characters"));
    }
    let (wild, h) = match h.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, h),
    };
    if h.contains('*') {
        return Err(bad("only a leading '*.' label may be a wildcard"));
    }
    for label in h.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(bad("each label must have 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad("only letters, digits, '-' and '_' are allowed"));
        }
    }
    Ok((wild, h.to_ascii_lowercase()))
}

impl HostTable {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds the table from `(host, IPv4 VIPs, IPv6 VIPs)`, every host
    /// visible to every client. A host listed twice gets the union of its
    /// addresses, in order.
    pub fn from_entries<I, S>(entries: I) -> Result<Self, DnsError>
    where
        I: IntoIterator<Item = (S, Vec<Ipv4Addr>, Vec<Ipv6Addr>)>,
        S: AsRef<str>,
    {
        Self::from_scoped(
            entries
                .into_iter()
                .map(|(h, v4, v6)| (h, ExportTo::public(), v4, v6)),
            std::iter::empty(),
        )
    }

    /// Builds the table from `(host, exportTo, IPv4 VIPs, IPv6 VIPs)` and
    /// the namespace of each client address (IPv4-mapped as IPv4). Entries
    /// of one host with the same visibility are merged. Borrowed values
    /// are copied once, into the table.
    pub fn from_scoped<I, S, E, A4, A6, C>(entries: I, clients: C) -> Result<Self, DnsError>
    where
        I: IntoIterator<Item = (S, E, A4, A6)>,
        S: AsRef<str>,
        E: std::borrow::Borrow<ExportTo>,
        A4: AsRef<[Ipv4Addr]>,
        A6: AsRef<[Ipv6Addr]>,
        C: IntoIterator<Item = (IpAddr, String)>,
    {
        let entries = entries.into_iter();
        let mut hosts: HashMap<Box<str>, Vec<Scoped>> =
            HashMap::with_capacity(entries.size_hint().0);
        let mut wildcards: HashMap<Box<str>, Vec<Scoped>> = HashMap::new();
        for (host, export_to, v4, v6) in entries {
            let (wild, key) = normalize(host.as_ref())?;
            let map = if wild { &mut wildcards } else { &mut hosts };
            let scopes = map.entry(key.into_boxed_str()).or_default();
            merge(scopes, export_to.borrow(), v4.as_ref(), v6.as_ref());
        }
        let sorted = |m: HashMap<Box<str>, Vec<Scoped>>| {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            CowMap::from_sorted(v)
        };
        Ok(HostTable {
            hosts: sorted(hosts),
            wildcards: sorted(wildcards),
            clients: clients_of(clients),
        })
    }

    /// The table of a model's hosts and workloads. With `prev`, the table
    /// of the model `model` was patched from ([`Model::delta`]), only the
    /// hosts in the delta are built again; without either, all of them.
    pub fn from_model(model: &Model, prev: Option<&HostTable>) -> Result<Self, DnsError> {
        let clients = model
            .workloads()
            .filter_map(|w| w.address.map(|ip| (ip, w.namespace().to_string())));
        let (Some(prev), Some(delta)) = (prev, model.delta()) else {
            return Self::from_scoped(
                model.hosts().map(|(h, r)| (h, &r.export_to, &r.v4, &r.v6)),
                clients,
            );
        };
        let mut t = HostTable {
            hosts: prev.hosts.clone(),
            wildcards: prev.wildcards.clone(),
            clients: clients_of(clients),
        };
        let mut done = std::collections::BTreeSet::new();
        for h in &delta.hosts {
            let (wild, key) = normalize(h)?;
            if !done.insert((wild, key.clone())) {
                continue;
            }
            // Every model host that normalizes to this one, in the model's
            // (sorted) order, as `from_scoped` meets them.
            let host = if wild {
                format!("*.{key}")
            } else {
                key.clone()
            };
            let dotted = format!("{host}.");
            let mut scopes = Vec::new();
            for r in model.records_of(&host).chain(model.records_of(&dotted)) {
                merge(&mut scopes, &r.export_to, &r.v4, &r.v6);
            }
            let map = if wild { &mut t.wildcards } else { &mut t.hosts };
            if scopes.is_empty() {
                map.remove(key.as_str());
            } else {
                map.insert(key.into_boxed_str(), scopes);
            }
        }
        Ok(t)
    }

    /// A shareable live handle holding this table.
    pub fn into_shared(self) -> SharedHostTable {
        Arc::new(ArcSwap::from_pointee(self))
    }

    /// Exact and wildcard hosts.
    pub fn len(&self) -> usize {
        self.hosts.len() + self.wildcards.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The VIPs of `host` (any case, with or without the trailing dot)
    /// that the client at `client` sees (`None`: an unknown client, which
    /// sees only hosts exported to every namespace).
    pub fn lookup(&self, host: &str, client: Option<IpAddr>) -> Option<Cow<'_, HostAddrs>> {
        let h = host.strip_suffix('.').unwrap_or(host);
        if h.bytes().any(|b| b.is_ascii_uppercase()) {
            self.find(&h.to_ascii_lowercase(), client)
        } else {
            self.find(h, client)
        }
    }

    /// A lower-case name: its own entry, else the nearest wildcard, among
    /// those the client sees.
    fn find(&self, name: &str, client: Option<IpAddr>) -> Option<Cow<'_, HostAddrs>> {
        if let Some(a) = self
            .hosts
            .get(name)
            .and_then(|scopes| self.visible(scopes, client))
        {
            return Some(a);
        }
        if self.wildcards.is_empty() {
            return None;
        }
        crate::model::host::parents(name).find_map(|p| {
            self.wildcards
                .get(p)
                .and_then(|scopes| self.visible(scopes, client))
        })
    }

    /// Lookup of a query name without allocating (unless several
    /// ServiceEntries of the host are visible): the labels are lower-cased
    /// into a stack buffer. A label holding a literal '.' can never be a
    /// ServiceEntry host.
    pub(crate) fn lookup_name(
        &self,
        name: &Name,
        client: Option<IpAddr>,
    ) -> Option<Cow<'_, HostAddrs>> {
        let mut buf = [0u8; 256];
        let mut len = 0usize;
        for (i, label) in name.iter().enumerate() {
            if len + label.len() + 1 > buf.len() {
                return None;
            }
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            for &b in label {
                if b == b'.' {
                    return None;
                }
                buf[len] = b.to_ascii_lowercase();
                len += 1;
            }
        }
        let s = std::str::from_utf8(&buf[..len]).ok()?;
        self.find(s, client)
    }

    fn visible<'a>(
        &'a self,
        scopes: &'a [Scoped],
        client: Option<IpAddr>,
    ) -> Option<Cow<'a, HostAddrs>> {
        let ns = client.and_then(|ip| self.clients.get(&ip.to_canonical()));
        let mut seen = scopes
            .iter()
            .filter(|s| s.export_to.public || ns.is_some_and(|ns| s.export_to.visible_to(ns)));
        let first = seen.next()?;
        let Some(second) = seen.next() else {
            return Some(Cow::Borrowed(&first.addrs));
        };
        let mut all = first.addrs.clone();
        for s in std::iter::once(second).chain(seen) {
            extend_unique(&mut all.v4, &s.addrs.v4);
            extend_unique(&mut all.v6, &s.addrs.v6);
        }
        Some(Cow::Owned(all))
    }
}

/// Adds one ServiceEntry's VIPs of a host to its scopes: into the scope of
/// the same visibility, else a new one.
fn merge(scopes: &mut Vec<Scoped>, export_to: &ExportTo, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) {
    let i = match scopes.iter().position(|s| s.export_to == *export_to) {
        Some(i) => i,
        None => {
            // Most hosts have one scope: no spare capacity (a pushed-to
            // empty Vec reserves four, 320 bytes a host).
            scopes.reserve_exact(1);
            scopes.push(Scoped {
                export_to: export_to.clone(),
                addrs: HostAddrs::default(),
            });
            scopes.len() - 1
        }
    };
    extend_unique(&mut scopes[i].addrs.v4, v4);
    extend_unique(&mut scopes[i].addrs.v6, v6);
}

/// Client address (IPv4-mapped as IPv4) → namespace.
fn clients_of(clients: impl IntoIterator<Item = (IpAddr, String)>) -> HashMap<IpAddr, Box<str>> {
    clients
        .into_iter()
        .map(|(ip, ns)| (ip.to_canonical(), ns.into_boxed_str()))
        .collect()
}

fn extend_unique<T: PartialEq + Copy>(into: &mut Vec<T>, from: &[T]) {
    if into.is_empty() {
        into.extend_from_slice(from);
        return;
    }
    for a in from {
        if !into.contains(a) {
            into.push(*a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_and_merges() {
        let t = HostTable::from_entries([
            ("HTTPBin.org.", vec![Ipv4Addr::new(240, 240, 0, 4)], vec![]),
            (
                "httpbin.org",
                vec![Ipv4Addr::new(240, 240, 0, 4)],
                vec!["2001:2::4".parse().unwrap()],
            ),
        ])
        .unwrap();
        assert_eq!(t.len(), 1);
        let a = t.lookup("httpbin.ORG.", None).unwrap();
        assert_eq!(a.v4.len(), 1);
        assert_eq!(a.v6.len(), 1);
        let name = Name::from_ascii("HttpBin.Org.").unwrap();
        assert_eq!(t.lookup_name(&name, None), Some(a));
        assert!(t
            .lookup("httpbin.org.default.svc.cluster.local", None)
            .is_none());
    }

    #[test]
    fn a_host_is_answered_only_to_namespaces_it_is_exported_to() {
        let only = |ns: &str| ExportTo {
            public: false,
            namespaces: [ns.to_string()].into(),
        };
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t = HostTable::from_scoped(
            [
                (
                    "db.example",
                    only("a"),
                    vec![Ipv4Addr::new(240, 240, 0, 1)],
                    vec![],
                ),
                (
                    "db.example",
                    only("b"),
                    vec![Ipv4Addr::new(240, 240, 0, 2)],
                    vec![],
                ),
                (
                    "none.example",
                    ExportTo::default(),
                    vec![Ipv4Addr::new(240, 240, 0, 3)],
                    vec![],
                ),
            ],
            [(a, "a".to_string()), (b, "b".to_string())],
        )
        .unwrap();
        let mapped_a: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            t.lookup("db.example", Some(mapped_a)).unwrap().v4,
            [Ipv4Addr::new(240, 240, 0, 1)]
        );
        assert_eq!(
            t.lookup("db.example", Some(b)).unwrap().v4,
            [Ipv4Addr::new(240, 240, 0, 2)]
        );
        assert!(
            t.lookup("db.example", None).is_none(),
            "unknown clients see only public hosts"
        );
        assert!(t
            .lookup("db.example", Some("10.9.9.9".parse().unwrap()))
            .is_none());
        assert!(
            t.lookup("none.example", Some(a)).is_none(),
            "exportTo ~ is seen by no one"
        );
    }

    #[test]
    fn a_wildcard_answers_names_below_it_and_the_more_specific_host_wins() {
        let v = |n: u8| vec![Ipv4Addr::new(240, 240, 0, n)];
        let t = HostTable::from_entries([
            ("*.example.com", v(1), vec![]),
            ("*.eu.example.com", v(2), vec![]),
            ("exact.example.com", v(3), vec![]),
        ])
        .unwrap();
        let at = |n: &str| t.lookup(n, None).map(|a| a.v4[0].octets()[3]);
        assert_eq!(at("a.example.com"), Some(1));
        assert_eq!(at("A.B.Example.COM."), Some(1));
        assert_eq!(at("x.eu.example.com"), Some(2));
        assert_eq!(at("exact.example.com"), Some(3));
        // Strictly below: never the suffix itself, never a look-alike.
        assert_eq!(at("example.com"), None);
        assert_eq!(at("badexample.com"), None);
        let name = Name::from_ascii("Deep.A.eu.example.com.").unwrap();
        assert_eq!(
            t.lookup_name(&name, None).map(|a| a.v4[0].octets()[3]),
            Some(2)
        );
        // The same answers as the model's rule.
        for n in ["q.example.com", "q.eu.example.com", "example.com"] {
            let model_pick = crate::model::host::covering(n)
                .find(|w| ["*.example.com", "*.eu.example.com"].contains(&w.as_str()));
            assert_eq!(at(n).is_some(), model_pick.is_some(), "{n}");
        }
    }

    #[test]
    fn rejects_bad_hosts() {
        for bad in ["", "a.*.example.com", "*", "a..b", "exa mple.com"] {
            let err = HostTable::from_entries([(bad, vec![], vec![])]).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}

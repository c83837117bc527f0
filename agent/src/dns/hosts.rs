//! The table of ServiceEntry hosts the proxy answers for itself.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use hickory_proto::rr::Name;

use super::DnsError;

/// The live table: the config side calls `store(Arc::new(new_table))`.
pub type SharedHostTable = Arc<ArcSwap<HostTable>>;

/// VIPs of one host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAddrs {
    pub v4: Vec<Ipv4Addr>,
    pub v6: Vec<Ipv6Addr>,
}

/// Lower-case host name (no trailing dot) → VIPs.
#[derive(Clone, Debug, Default)]
pub struct HostTable {
    hosts: HashMap<Box<str>, HostAddrs>,
}

/// Lower-cases and strips one trailing dot; checks RFC 1035 shape (letters,
/// digits, `-`, `_`; labels 1..=63; at most 253 characters) and refuses
/// wildcards, which ambient ServiceEntries do not support.
fn normalize(host: &str) -> Result<String, DnsError> {
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
    if h.contains('*') {
        return Err(bad("wildcard hosts are not answered by the DNS proxy"));
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
    Ok(h.to_ascii_lowercase())
}

impl HostTable {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Builds the table from `(host, IPv4 VIPs, IPv6 VIPs)`. A host listed
    /// twice (two ServiceEntries) gets the union of its addresses, in order.
    pub fn from_entries<I, S>(entries: I) -> Result<Self, DnsError>
    where
        I: IntoIterator<Item = (S, Vec<Ipv4Addr>, Vec<Ipv6Addr>)>,
        S: AsRef<str>,
    {
        let mut hosts: HashMap<Box<str>, HostAddrs> = HashMap::new();
        for (host, v4, v6) in entries {
            let key = normalize(host.as_ref())?;
            match hosts.entry(key.into_boxed_str()) {
                Entry::Vacant(e) => {
                    let mut addrs = HostAddrs {
                        v4: Vec::new(),
                        v6: Vec::new(),
                    };
                    extend_unique(&mut addrs.v4, v4);
                    extend_unique(&mut addrs.v6, v6);
                    e.insert(addrs);
                }
                Entry::Occupied(mut e) => {
                    let addrs = e.get_mut();
                    extend_unique(&mut addrs.v4, v4);
                    extend_unique(&mut addrs.v6, v6);
                }
            }
        }
        Ok(HostTable { hosts })
    }

    /// A shareable live handle holding this table.
    pub fn into_shared(self) -> SharedHostTable {
        Arc::new(ArcSwap::from_pointee(self))
    }

    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    /// Case-insensitive, with or without the trailing dot.
    pub fn lookup(&self, host: &str) -> Option<&HostAddrs> {
        let h = host.strip_suffix('.').unwrap_or(host);
        if h.bytes().any(|b| b.is_ascii_uppercase()) {
            self.hosts.get(h.to_ascii_lowercase().as_str())
        } else {
            self.hosts.get(h)
        }
    }

    /// Lookup of a query name without allocating: the labels are lower-cased
    /// into a stack buffer. A label holding a literal '.' can never be a
    /// ServiceEntry host.
    pub(crate) fn lookup_name(&self, name: &Name) -> Option<&HostAddrs> {
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
        self.hosts.get(s)
    }
}

fn extend_unique<T: PartialEq>(into: &mut Vec<T>, from: Vec<T>) {
    for a in from {
        if !into.contains(&a) {
            into.push(a);
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
        let a = t.lookup("httpbin.ORG.").unwrap();
        assert_eq!(a.v4.len(), 1);
        assert_eq!(a.v6.len(), 1);
        let name = Name::from_ascii("HttpBin.Org.").unwrap();
        assert_eq!(t.lookup_name(&name), Some(a));
        assert!(t.lookup("httpbin.org.default.svc.cluster.local").is_none());
    }

    #[test]
    fn rejects_bad_hosts() {
        for bad in ["", "*.example.com", "a..b", "exa mple.com"] {
            let err = HostTable::from_entries([(bad, vec![], vec![])]).unwrap_err();
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }
}

//! Who the proxy serves: enrolled workloads (their addresses, from the
//! model) and the node itself (loopback and the node's own interface
//! addresses). The kernel only redirects enrolled workloads' DNS to the
//! proxy, but anything that can route to its address can send there
//! directly; everyone else gets REFUSED and costs no forwarding budget.
//!
//! The proxy sees a pod's own address as the source: the redirect happens
//! at the pod's socket (cgroup `connect`/`sendmsg`), so the packet then
//! leaves the pod's network namespace like any other.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// The live set: the reconciler stores a new one with each config.
pub type SharedClients = Arc<ArcSwap<ClientTable>>;

#[derive(Clone, Debug, Default)]
pub struct ClientTable {
    workloads: HashSet<IpAddr>,
    node: HashSet<IpAddr>,
}

impl ClientTable {
    /// The node only: loopback and the addresses its interfaces have now.
    pub fn node_only() -> Self {
        Self::new(std::iter::empty())
    }

    /// `workloads` (enrolled workloads' addresses) and the node.
    pub fn new(workloads: impl IntoIterator<Item = IpAddr>) -> Self {
        ClientTable {
            workloads: workloads.into_iter().map(|a| a.to_canonical()).collect(),
            node: local_addresses(),
        }
    }

    pub fn into_shared(self) -> SharedClients {
        Arc::new(ArcSwap::from_pointee(self))
    }

    /// Is a query from `ip` served?
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        // A loopback source can only be a process of this network namespace.
        ip.is_loopback() || self.workloads.contains(&ip) || self.node.contains(&ip)
    }

    /// Number of workload addresses served.
    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }
}

/// Every address of every interface of the current network namespace.
fn local_addresses() -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below; each node's
    // `ifa_addr` is null or points to a sockaddr of the family it names.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut p = head;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                match i32::from((*a).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(a as *const libc::sockaddr_in);
                        out.insert(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))));
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(a as *const libc::sockaddr_in6);
                        out.insert(IpAddr::from(sin6.sin6_addr.s6_addr).to_canonical());
                    }
                    _ => {}
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_loopback_and_node_addresses_are_served_and_others_are_not() {
        let t = ClientTable::new(["10.1.0.2".parse().unwrap(), "fd00:1::2".parse().unwrap()]);
        for ok in [
            "10.1.0.2",
            "::ffff:10.1.0.2",
            "fd00:1::2",
            "127.0.0.1",
            "127.0.0.53",
            "::1",
        ] {
            assert!(t.allows(ok.parse().unwrap()), "{ok}");
        }
        for no in ["10.1.0.3", "203.0.113.7", "fd00:1::3"] {
            assert!(!t.allows(no.parse().unwrap()), "{no}");
        }
        assert!(!ClientTable::node_only().allows("10.1.0.2".parse().unwrap()));
    }
}

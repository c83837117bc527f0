//! The node's network setup, over one rtnetlink helper ([`Netlink`]): the
//! local routes for the VIP prefixes (so SYNs to them reach sk_lookup), the
//! DNS proxy's interface and addresses, route lookups for `sources`, and
//! strict rp_filter. Everything is idempotent.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use futures::TryStreamExt as _;
use rtnetlink::{
    packet_route::{
        address::{AddressAttribute, AddressHeaderFlags, AddressMessage},
        route::{RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType},
    },
    LinkDummy, LinkUnspec, RouteMessageBuilder,
};
use shunt_common::{VIP4_NET, VIP4_PREFIX_LEN, VIP6_NET, VIP6_PREFIX_LEN};
use tracing::warn;

use super::KernelError;

/// Name of the dummy interface that carries the DNS proxy's addresses.
pub const DNS_INTERFACE: &str = "shunt-dns0";
const RT_TABLE_LOCAL: u32 = 255;
const LOOPBACK_IFINDEX: u32 = 1;

/// One rtnetlink connection; its task ends when this is dropped.
pub struct Netlink {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn nl(what: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> KernelError {
    let what = what.into();
    move |source| KernelError::Netlink { what, source }
}

/// Errors that mean "already gone" for a delete.
fn absent(e: &rtnetlink::Error) -> bool {
    matches!(e, rtnetlink::Error::NetlinkError(m)
        if m.raw_code() == -libc::ESRCH || m.raw_code() == -libc::ENOENT)
}

impl Netlink {
    pub fn connect() -> Result<Self, KernelError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(KernelError::NetlinkConnect)?;
        Ok(Self {
            handle,
            task: tokio::spawn(conn),
        })
    }

    pub async fn link_index(&self, name: &str) -> Option<u32> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        links
            .try_next()
            .await
            .ok()
            .flatten()
            .map(|m| m.header.index)
    }

    pub async fn set_up(&self, index: u32) -> Result<(), rtnetlink::Error> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
    }

    pub async fn addresses(&self, index: u32) -> Result<Vec<AddressMessage>, rtnetlink::Error> {
        self.handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
    }

    /// The local VIP routes (`ip route add local PREFIX dev lo`), one per
    /// family, built the same way.
    fn vip_routes() -> [RouteMessage; 2] {
        let local = |net: IpAddr, len: u8| {
            RouteMessageBuilder::<IpAddr>::new()
                .destination_prefix(net, len)
                .expect("the VIP prefixes are valid constants")
                .kind(RouteType::Local)
                .table_id(RT_TABLE_LOCAL)
                .scope(RouteScope::Host)
                .protocol(RouteProtocol::Static)
                .output_interface(LOOPBACK_IFINDEX)
                .build()
        };
        [
            local(VIP4_NET.into(), VIP4_PREFIX_LEN),
            local(VIP6_NET.into(), VIP6_PREFIX_LEN),
        ]
    }

    /// The interface the node reaches `ip` through (`ip route get`).
    pub async fn route_oif(&self, ip: IpAddr) -> Option<u32> {
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
            .ok()?
            .build();
        let routes: Vec<_> = self
            .handle
            .route()
            .get(msg)
            .execute()
            .try_collect()
            .await
            .ok()?;
        routes
            .iter()
            .flat_map(|r| r.attributes.iter())
            .find_map(|a| match a {
                RouteAttribute::Oif(i) => Some(*i),
                _ => None,
            })
    }
}

fn has_address(existing: &[AddressMessage], ip: IpAddr) -> bool {
    existing.iter().any(|m| {
        m.attributes
            .iter()
            .any(|a| matches!(a, AddressAttribute::Address(x) if *x == ip))
    })
}

/// Install (or replace, idempotently) the local VIP routes.
pub async fn install_vip_routes() -> Result<(), KernelError> {
    let nlk = Netlink::connect()?;
    // Local routes via a loopback that is down fail with ENETDOWN (a fresh
    // namespace); bringing lo up is idempotent.
    nlk.set_up(LOOPBACK_IFINDEX)
        .await
        .map_err(nl("bringing lo up"))?;
    for msg in Netlink::vip_routes() {
        nlk.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(nl("adding VIP route"))?;
    }
    Ok(())
}

/// Remove the local VIP routes; absent routes are not an error. Both are
/// tried; the last failure is returned.
pub async fn remove_vip_routes() -> Result<(), KernelError> {
    let nlk = Netlink::connect()?;
    let mut result = Ok(());
    for msg in Netlink::vip_routes() {
        match nlk.handle.route().del(msg).execute().await {
            Err(e) if !absent(&e) => result = Err(nl("removing VIP route")(e)),
            _ => {}
        }
    }
    result
}

/// Create (idempotently) the dummy interface owned by the agent and put the
/// DNS proxy's link-local IPv4 and ULA IPv6 addresses on it, so pods reach
/// the proxy through their default route to the node.
pub async fn install_dns_interface(v4: Ipv4Addr, v6: Ipv6Addr) -> Result<(), KernelError> {
    let nlk = Netlink::connect()?;
    let what = format!("DNS interface {DNS_INTERFACE}");
    let index = match nlk.link_index(DNS_INTERFACE).await {
        Some(i) => i,
        None => {
            match nlk
                .handle
                .link()
                .add(LinkDummy::new(DNS_INTERFACE).up().build())
                .execute()
                .await
            {
                Ok(()) => nlk.link_index(DNS_INTERFACE).await.ok_or_else(|| {
                    nl(format!("{what} vanished after creation"))(rtnetlink::Error::RequestFailed)
                })?,
                // A kernel without the dummy driver: the addresses go on lo,
                // which delivers them locally just the same.
                Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EOPNOTSUPP => {
                    warn!("no dummy interface support in this kernel; the DNS proxy's addresses go on lo");
                    LOOPBACK_IFINDEX
                }
                Err(e) => return Err(nl(what)(e)),
            }
        }
    };
    nlk.set_up(index).await.map_err(nl(what.clone()))?;
    let existing = nlk.addresses(index).await.map_err(nl(what.clone()))?;
    if !has_address(&existing, v4.into()) {
        nlk.handle
            .address()
            .add(index, v4.into(), 32)
            .execute()
            .await
            .map_err(nl(what.clone()))?;
    }
    if !has_address(&existing, v6.into()) {
        let mut req = nlk.handle.address().add(index, v6.into(), 128);
        // No duplicate address detection: the address must work at once.
        req.message_mut().header.flags |= AddressHeaderFlags::Nodad;
        req.execute().await.map_err(nl(what))?;
    }
    Ok(())
}

/// The interface through which the node reaches each address: where a
/// genuine packet from that workload arrives. Addresses without a route are
/// left out.
pub async fn route_oifs(ips: &[IpAddr]) -> Result<HashMap<IpAddr, u32>, KernelError> {
    let nlk = Netlink::connect()?;
    let mut out = HashMap::new();
    for ip in ips {
        if let Some(oif) = nlk.route_oif(*ip).await {
            out.insert(*ip, oif);
        }
    }
    Ok(out)
}

/// Remove the VIP routes and the DNS interface, or the DNS proxy's
/// addresses from lo where there was no dummy interface (`shunt uninstall`).
pub async fn uninstall_network(dns: Option<(Ipv4Addr, Ipv6Addr)>) -> Result<(), KernelError> {
    remove_vip_routes().await?;
    let nlk = Netlink::connect()?;
    if let Some((v4, v6)) = dns {
        let ips: [IpAddr; 2] = [v4.into(), v6.into()];
        let what = "removing DNS addresses from lo";
        for m in nlk.addresses(LOOPBACK_IFINDEX).await.map_err(nl(what))? {
            if ips
                .iter()
                .any(|ip| has_address(std::slice::from_ref(&m), *ip))
            {
                nlk.handle
                    .address()
                    .del(m)
                    .execute()
                    .await
                    .map_err(nl(what))?;
            }
        }
    }
    if let Some(i) = nlk.link_index(DNS_INTERFACE).await {
        nlk.handle
            .link()
            .del(i)
            .execute()
            .await
            .map_err(nl(format!("removing {DNS_INTERFACE}")))?;
    }
    Ok(())
}

/// Strict reverse-path filtering (IPv4) in the node namespace: a pod cannot
/// send with another pod's source address, which matters because the agent
/// identifies workloads by source address. (A sysctl, not netlink, but the
/// same node setup.)
pub fn set_strict_rp_filter() -> Result<(), KernelError> {
    for p in [
        "/proc/sys/net/ipv4/conf/all/rp_filter",
        "/proc/sys/net/ipv4/conf/default/rp_filter",
    ] {
        std::fs::write(p, "1").map_err(|e| KernelError::Open(PathBuf::from(p), e))?;
    }
    Ok(())
}

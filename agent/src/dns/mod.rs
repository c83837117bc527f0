//! DNS proxy: answers A/AAAA for ServiceEntry hosts with their VIPs
//! (authoritative, TTL 30 s) and forwards everything else to the upstream
//! resolvers. UDP and TCP on every listen address. Only enrolled workloads
//! and the node are served; ServiceEntry answers never wait behind
//! forwarded queries, which are budgeted per client. Built on hickory-proto
//! for parsing and serialization only; the proxy logic is ours.
//!
//! The host table is read through an [`ArcSwap`], so the config side can
//! publish a new table at any time and the next query sees it, with no lock
//! on the query path.

mod budget;
mod clients;
mod hosts;
mod proxy;
mod upstream;

pub use clients::{ClientTable, SharedClients};
pub use hosts::{HostAddrs, HostTable, SharedHostTable};
pub(crate) use proxy::handle_message;
pub use proxy::{DnsConfig, DnsProxy, DEFAULT_MAX_INFLIGHT_PER_CLIENT};
pub use upstream::{parse_upstream, upstreams_from_resolv_conf};

use std::net::SocketAddr;
use std::path::PathBuf;

/// TTL of the answers for ServiceEntry hosts (ztunnel uses 30 s).
pub const SERVICE_ENTRY_TTL: u32 = 30;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("invalid ServiceEntry host {host:?} in the DNS host table: {reason}")]
    InvalidHost { host: String, reason: &'static str },
    #[error("reading resolver file {path}: {source}")]
    ResolvConf {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: invalid nameserver address {value:?}")]
    ResolvConfAddress {
        path: PathBuf,
        line: usize,
        value: String,
    },
    #[error("{path}: no `nameserver` line")]
    NoNameserver { path: PathBuf },
    #[error("invalid --dns-upstream {value:?}: expected IP or IP:PORT ([IPv6]:PORT)")]
    UpstreamAddress { value: String },
    #[error("reading the open-file limit (RLIMIT_NOFILE) for the DNS proxy's budgets: {0}")]
    FdLimit(std::io::Error),
    #[error("DNS proxy needs at least one upstream resolver")]
    NoUpstream,
    #[error("DNS proxy needs at least one listen address")]
    NoListenAddress,
    #[error("upstream resolver {0} is the proxy's own listen address (would loop)")]
    UpstreamIsSelf(SocketAddr),
    #[error("binding DNS {proto} listener on {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

//! The source address the waypoint believes. Any holder of a mesh
//! certificate can send `Forwarded: for=<any ip>`; the claim is accepted
//! only for an address of a workload whose identity is the certificate's
//! (an agent presents its pod's certificate and names the pod's address,
//! while the TCP peer is the agent's node). Anything else falls back to
//! the TCP peer, so `source.ip`/`ipBlocks` and `src.addr` cannot be forged.

use std::net::SocketAddr;
use std::time::Duration;

use crate::hbone::InboundRequest;
use crate::model::Model;
use crate::telemetry::{intern, LogLimit};

use super::Shared;

/// What the waypoint makes of a tunnel's claimed source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// No claim, or the claim names the TCP peer's own address.
    Peer(SocketAddr),
    /// An address of a workload with the certificate's identity.
    Claimed(SocketAddr),
    /// Not the certificate's workload: the TCP peer is used.
    Refused {
        peer: SocketAddr,
        claimed: SocketAddr,
    },
}

impl Source {
    /// The address policy and logs use.
    pub(crate) fn addr(self) -> SocketAddr {
        match self {
            Source::Peer(a) | Source::Claimed(a) => a,
            Source::Refused { peer, .. } => peer,
        }
    }
}

/// The rule, on its own (no logging): see the module doc.
pub(crate) fn judge(req: &InboundRequest, model: &Model) -> Source {
    let claimed = req.source_addr;
    if claimed.ip().to_canonical() == req.peer_addr.ip().to_canonical() {
        return Source::Peer(claimed);
    }
    match model.workload_by_addr(claimed.ip()) {
        Some(w) if w.identity == req.peer_identity => Source::Claimed(claimed),
        _ => Source::Refused {
            peer: req.peer_addr,
            claimed,
        },
    }
}

/// The source workload's name for log lines, as ztunnel's `src.workload`:
/// the workload at the (trusted) source address, when its identity is the
/// certificate's; `None` rather than a name the certificate does not back.
pub(crate) fn workload_name(model: &Model, req: &InboundRequest) -> Option<std::sync::Arc<str>> {
    model
        .workload_by_addr(req.source_addr.ip())
        .filter(|w| w.identity == req.peer_identity)
        .map(|w| intern(&w.key.name))
}

/// [`judge`], counting and logging (rate-limited: a client can send any
/// number of tunnels) a refused claim; returns the address to use.
pub(crate) fn trusted(shared: &Shared, req: &InboundRequest, model: &Model) -> SocketAddr {
    let s = judge(req, model);
    if let Source::Refused { peer, claimed } = s {
        shared.metrics.record_forwarded_rejected();
        static LOG: LogLimit = LogLimit::new(Duration::from_secs(1));
        if let Some(suppressed) = LOG.allow() {
            tracing::warn!(
                identity = %req.peer_identity,
                claimed = %crate::telemetry::LogAddr(claimed),
                peer = %crate::telemetry::LogAddr(peer),
                suppressed,
                "Forwarded for= is not a workload of the client's identity, using the peer address"
            );
        }
    }
    s.addr()
}

//! Listening sockets and their accept loops.
//!
//! Sockets that a successor agent can bind while its predecessor still
//! drains (SO_REUSEPORT): the DNS proxy and the admin endpoints keep
//! answering through a handover. Not for the capture socket, where a
//! reuseport group would let the kernel pick the draining listener.
//!
//! [`Acceptor`]: every server's accept loop goes through it, so that no
//! accept error ends or spins a server: out of fds or memory, it backs off
//! (capped, exponential) and keeps serving; a connection that died in the
//! queue is skipped at once. Each error is counted in
//! `shunt_accept_errors_total{listener, reason}` and logged at most once a
//! second with the number of suppressed lines.
//!
//! [`PerSourceLimit`]: the one connection budget of the servers (the
//! waypoint's HBONE port per source, the agent's captured connections per
//! pod address and in all), with [`Acceptor::refuse`] closing what it has no
//! place for.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::telemetry::{self, LogLimit};

fn socket(addr: SocketAddr, ty: Type, proto: Protocol) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

pub fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket(addr, Type::STREAM, Protocol::TCP)?;
    s.listen(1024)?;
    tokio::net::TcpListener::from_std(s.into())
}

pub fn udp_socket(addr: SocketAddr) -> std::io::Result<tokio::net::UdpSocket> {
    let s = socket(addr, Type::DGRAM, Protocol::UDP)?;
    tokio::net::UdpSocket::from_std(s.into())
}

/// Which server a listener belongs to: the `listener` label of the accept
/// and budget metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ListenerName {
    /// The agent's capture socket (steered VIP connections).
    Capture,
    /// The waypoint's HBONE port (15008).
    Hbone,
    /// The DNS proxy's TCP side.
    DnsTcp,
    /// An admin endpoint (metrics, readiness, config dump).
    Admin,
}

impl ListenerName {
    pub fn as_str(self) -> &'static str {
        match self {
            ListenerName::Capture => "capture",
            ListenerName::Hbone => "hbone",
            ListenerName::DnsTcp => "dns_tcp",
            ListenerName::Admin => "admin",
        }
    }
}

/// What an accept error means for the loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AcceptFailure {
    /// The connection died in the queue (ECONNABORTED, a pending network
    /// error): skip it, accept the next one at once.
    Connection,
    /// Out of fds or kernel memory: retrying at once would spin; wait.
    Resources,
    /// Anything else: also waited on, so that nothing can spin.
    Other,
}

impl AcceptFailure {
    fn of(e: &std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(
                libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
                | libc::ENOPROTOOPT
                | libc::EOPNOTSUPP,
            ) => AcceptFailure::Connection,
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                AcceptFailure::Resources
            }
            _ => AcceptFailure::Other,
        }
    }

    /// The `reason` label.
    fn reason(e: &std::io::Error) -> &'static str {
        match e.raw_os_error() {
            Some(libc::EMFILE) => "emfile",
            Some(libc::ENFILE) => "enfile",
            Some(libc::ENOBUFS) => "enobufs",
            Some(libc::ENOMEM) => "enomem",
            Some(libc::ECONNABORTED) => "econnaborted",
            _ => match Self::of(e) {
                AcceptFailure::Connection => "connection",
                _ => "other",
            },
        }
    }
}

/// First wait after a resource error; doubled per consecutive error.
const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest wait: a freed fd is used within this long.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The accept side of one server loop: the listener stays the caller's
/// (handover code needs it), the backoff and log limit live here.
#[derive(Debug)]
pub struct Acceptor {
    name: ListenerName,
    backoff: Duration,
    log: LogLimit,
    refused_log: LogLimit,
}

impl Acceptor {
    pub fn new(name: ListenerName) -> Self {
        Acceptor {
            name,
            backoff: Duration::ZERO,
            log: LogLimit::new(Duration::from_secs(1)),
            refused_log: LogLimit::new(Duration::from_secs(1)),
        }
    }

    /// Closes a connection a budget has no room for, with RST (nothing
    /// lingers in TIME_WAIT on this side); counted in
    /// `shunt_refused_connections_total{listener, reason}` and logged at a
    /// limited rate.
    pub fn refuse(&self, stream: TcpStream, peer: SocketAddr, reason: &'static str) {
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        drop(stream);
        telemetry::count_refused_connection(self.name.as_str(), reason);
        if let Some(suppressed) = self.refused_log.allow() {
            tracing::warn!(
                listener = self.name.as_str(),
                peer = %telemetry::LogAddr(peer),
                reason,
                suppressed,
                "connection budget spent; closing new connection"
            );
        }
    }

    /// The next connection. Never fails: errors are counted, logged at a
    /// limited rate and waited out. Cancel-safe (the listener's `accept` is,
    /// and an interrupted wait only shortens one backoff).
    pub async fn accept(&mut self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            match listener.accept().await {
                Ok(c) => {
                    self.backoff = Duration::ZERO;
                    return c;
                }
                Err(e) => {
                    let failure = AcceptFailure::of(&e);
                    telemetry::count_accept_error(self.name.as_str(), AcceptFailure::reason(&e));
                    if failure != AcceptFailure::Connection {
                        self.backoff = (self.backoff * 2).clamp(BACKOFF_MIN, BACKOFF_MAX);
                    }
                    if let Some(suppressed) = self.log.allow() {
                        tracing::warn!(
                            listener = self.name.as_str(),
                            error = %e,
                            retry_in_ms = if failure == AcceptFailure::Connection { 0 } else { self.backoff.as_millis() as u64 },
                            suppressed,
                            "accept failed; still serving"
                        );
                    }
                    if failure != AcceptFailure::Connection {
                        tokio::time::sleep(self.backoff).await;
                    }
                }
            }
        }
    }
}

/// Open connections per source address and in all, capped: one client
/// cannot take a server's whole fd budget, and all of them together cannot
/// take the fds its control plane needs. A connection weighs what it holds
/// (the agent's direct path holds two fds per captured connection). The
/// count is also what a draining server waits on ([`PerSourceLimit::idle`]).
#[derive(Debug)]
pub struct PerSourceLimit {
    per_source: usize,
    total: usize,
    open: Mutex<Open>,
    idle: Notify,
}

#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Why a connection was given no place: the `reason` label of
/// `shunt_refused_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoPlace {
    /// Its source holds its maximum.
    PerSource,
    /// The server holds its maximum in all.
    Total,
}

impl NoPlace {
    pub fn reason(self) -> &'static str {
        match self {
            NoPlace::PerSource => "per_source_limit",
            NoPlace::Total => "connection_limit",
        }
    }
}

/// One admitted connection; dropping it frees its place.
#[derive(Debug)]
pub struct SourceSlot {
    limit: Arc<PerSourceLimit>,
    ip: IpAddr,
    weight: usize,
}

impl PerSourceLimit {
    /// At most `max` per source, no cap in all.
    pub fn new(max: usize) -> Arc<Self> {
        Self::with_total(max, usize::MAX)
    }

    /// At most `per_source` per source and `total` in all.
    pub fn with_total(per_source: usize, total: usize) -> Arc<Self> {
        Arc::new(PerSourceLimit {
            per_source: per_source.max(1),
            total: total.max(1),
            open: Mutex::default(),
            idle: Notify::new(),
        })
    }

    /// A place for one more connection of weight 1 from `ip`.
    pub fn try_admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        self.admit(ip, 1).ok()
    }

    /// A place for one more connection from `ip` weighing `weight`, if
    /// both its source and the total stay within their maximum with it.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, weight: usize) -> Result<SourceSlot, NoPlace> {
        let ip = ip.to_canonical();
        let mut open = self.lock();
        let Open { total, by_source } = &mut *open;
        let n = by_source.get(&ip).copied().unwrap_or(0);
        if n + weight > self.per_source {
            return Err(NoPlace::PerSource);
        }
        if *total + weight > self.total {
            return Err(NoPlace::Total);
        }
        *total += weight;
        by_source.insert(ip, n + weight);
        Ok(SourceSlot {
            limit: Arc::clone(self),
            ip,
            weight,
        })
    }

    /// Weight open from `ip`.
    pub fn open(&self, ip: IpAddr) -> usize {
        self.lock()
            .by_source
            .get(&ip.to_canonical())
            .copied()
            .unwrap_or(0)
    }

    /// Weight open in all.
    pub fn open_total(&self) -> usize {
        self.lock().total
    }

    /// Returns once nothing is open.
    pub async fn idle(&self) {
        loop {
            // Created before the check: a notify_waiters in between wakes it.
            let idle = self.idle.notified();
            if self.open_total() == 0 {
                return;
            }
            idle.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Open> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        open.total -= self.weight;
        if let Some(n) = open.by_source.get_mut(&self.ip) {
            *n -= self.weight;
            if *n == 0 {
                open.by_source.remove(&self.ip);
            }
        }
        if open.total == 0 {
            self.limit.idle.notify_waiters();
        }
    }
}

fn nofile() -> std::io::Result<libc::rlimit> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(lim)
}

/// The soft `RLIMIT_NOFILE`: how many fds this process may hold.
pub fn fd_limit() -> std::io::Result<u64> {
    Ok(nofile()?.rlim_cur)
}

/// A per-source default below this would refuse `cargo xtask bench`'s
/// 2,000 held connections from one pod (4,000 fds on the agent's direct
/// path; 2,000 tunnels plus their upstream sockets on the waypoint).
const PER_SOURCE_FLOOR: usize = 4096;

/// The fds kept for a process's own work when a connection budget is
/// derived from its open-file limit: at least 512, for the fixed part (the
/// kernel objects' fds, listeners, control socket, admin and metrics
/// scrapes, the config watcher's reads, netlink and CA/API connections:
/// under 128), and 5% of the limit for what grows with load: the agent's
/// HBONE pool connections (one per `--hbone-max-streams` tunnels, 1% of the
/// budget at the default 100), and, in half of it each ([`load_share`]),
/// the agent's DNS proxy and the waypoint's pooled upstream connections.
pub fn control_plane_reserve(fd_limit: u64) -> u64 {
    (fd_limit / 20).max(512)
}

/// Half of a `reserve` ([`control_plane_reserve`]), for the part of a process's own work
/// that grows with load: the agent's DNS proxy (its forwards in flight and
/// TCP clients, `DnsConfig::fit_fds`), the waypoint's pooled upstream
/// connections (`waypoint::pool::IdleBudget`). So a DNS flood or a pool
/// grown over many names cannot starve the connections or the control
/// plane. 256 fds at limits up to 10,240; the DNS proxy's own maxima (4,096
/// forwards, 256 TCP clients per listener) from about 90,000.
pub fn load_share(reserve: u64) -> usize {
    usize::try_from(reserve / 2).unwrap_or(usize::MAX)
}

/// The default share of one source in a budget of `total`: a quarter, at
/// least [`PER_SOURCE_FLOOR`] unless that is more than half (one source
/// never holds the whole budget).
pub fn default_per_source(total: usize) -> usize {
    PER_SOURCE_FLOOR
        .min(total / 2)
        .max(total / 4)
        .clamp(1, total.max(1))
}

/// A connection budget counted in fds, in all and per source, from the
/// open-file limit: the agent's captured connections (per pod address), the
/// waypoint's HBONE connections and the upstream socket each tunnel holds
/// (per node agent).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdBudget {
    pub total: usize,
    pub per_source: usize,
    /// The open-file limit it was derived from, and what is kept out of it.
    pub fd_limit: u64,
    pub reserve: u64,
}

/// The reserve takes the whole open-file limit.
#[derive(Debug, thiserror::Error)]
#[error(
    "the open-file limit ({fd_limit}) leaves no room for connections after the control \
     plane's reserve of {reserve} fds: raise it (ulimit -n, LimitNOFILE)"
)]
pub struct FdLimitTooLow {
    pub fd_limit: u64,
    pub reserve: u64,
}

impl FdBudget {
    /// All of `fd_limit` but [`control_plane_reserve`], and
    /// [`default_per_source`] of that per source.
    pub fn from_limit(fd_limit: u64) -> Result<FdBudget, FdLimitTooLow> {
        let reserve = control_plane_reserve(fd_limit);
        let total = usize::try_from(fd_limit.saturating_sub(reserve)).unwrap_or(usize::MAX);
        if total == 0 {
            return Err(FdLimitTooLow { fd_limit, reserve });
        }
        Ok(FdBudget {
            total,
            per_source: default_per_source(total),
            fd_limit,
            reserve,
        })
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (every connection
/// is an fd; the common default soft limit of 1024 is far too low for a
/// proxy). Returns the new soft limit. Call once at process start.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut lim = nofile()?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(lim.rlim_cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_fds_backs_off_and_a_dead_connection_does_not() {
        let err = std::io::Error::from_raw_os_error;
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert_eq!(AcceptFailure::of(&err(e)), AcceptFailure::Resources);
        }
        assert_eq!(
            AcceptFailure::of(&err(libc::ECONNABORTED)),
            AcceptFailure::Connection
        );
        assert_eq!(AcceptFailure::of(&err(libc::EBADF)), AcceptFailure::Other);
        assert_eq!(AcceptFailure::reason(&err(libc::EMFILE)), "emfile");
    }

    #[test]
    fn a_source_gets_its_maximum_and_its_places_back_when_they_close() {
        let limit = PerSourceLimit::new(2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = limit.try_admit(a).unwrap();
        let _s2 = limit.try_admit(a).unwrap();
        assert!(limit.try_admit(a).is_none(), "third from the same source");
        assert!(
            limit.try_admit(b).is_some(),
            "another source is not affected"
        );
        drop(s1);
        assert_eq!(limit.open(a), 1);
        let _s3 = limit.try_admit(a).expect("a freed place is reused");
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert!(
            limit.try_admit(mapped).is_none(),
            "a v4-mapped address is the same source"
        );
    }

    #[test]
    fn the_total_caps_all_sources_together_and_weights_count() {
        let limit = PerSourceLimit::with_total(4, 5);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let heavy = limit.admit(a, 2).unwrap();
        let _a2 = limit.admit(a, 2).unwrap();
        assert_eq!(limit.open(a), 4);
        assert_eq!(
            limit.admit(a, 1).unwrap_err(),
            NoPlace::PerSource,
            "a's own maximum comes first"
        );
        let _b1 = limit.admit(b, 1).unwrap();
        let e = limit.admit(b, 1).unwrap_err();
        assert_eq!(
            e,
            NoPlace::Total,
            "b is under its maximum, the total is not"
        );
        assert_eq!(e.reason(), "connection_limit");
        assert_eq!(NoPlace::PerSource.reason(), "per_source_limit");
        assert_eq!(limit.open_total(), 5);
        drop(heavy);
        assert_eq!(limit.open_total(), 3, "a slot frees its whole weight");
        assert_eq!(limit.open(a), 2);
        let _b2 = limit.admit(b, 2).expect("room again in all");
        assert!(
            limit.admit(b, 5).is_err(),
            "heavier than a source's maximum: never admitted"
        );
    }

    #[tokio::test]
    async fn idle_returns_once_the_last_slot_is_dropped() {
        let limit = PerSourceLimit::with_total(10, 10);
        limit.idle().await;
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let s1 = limit.admit(a, 1).unwrap();
        let s2 = limit.admit(a, 2).unwrap();
        let waiter = tokio::spawn({
            let limit = limit.clone();
            async move { limit.idle().await }
        });
        drop(s1);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "one slot still open");
        drop(s2);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("idle after the last slot")
            .unwrap();
    }
}

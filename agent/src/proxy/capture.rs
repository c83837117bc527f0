//! The capture server: the node agent's lifecycle around the capture
//! socket. It installs the kernel side, accepts steered connections and
//! hands each to a [`Handler`] (the outbound path, or a test's), and hands
//! over to a successor without refusing a single connect.
//!
//! Handover (protocol in [`super::handover`]): a new agent tells the running
//! one it is starting (the control socket `<state>/agent.sock`), sets itself
//! up to serve (config applied, outbound path built), inserts its listener
//! into the capture SOCKMAP (new SYNs go to it at once), publishes its own
//! control socket and tells the old agent it took over. The old agent keeps
//! accepting until its accept queue stays empty (closing a listener with
//! queued connections would reset them), closes it, and lets its open
//! connections finish up to a deadline. SIGTERM/SIGINT while a successor is
//! starting waits for it (it owns the slot next); without one, the agent
//! removes its socket from the SOCKMAP (new VIP connects are refused by
//! sk_lookup), drains the same way and exits. Links, maps and routes always
//! stay, so traffic stays fail-closed. `<state>/agent.pid` records the
//! capturing agent for `shunt status`; nothing signals through it (two agent
//! pods in their own PID namespaces may even have the same pid).

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use shunt_common::{is_vip, ServiceValue, SVC_F_WAYPOINT};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    kernel::{
        self, capture,
        registry::{addr_bytes, tcp_key},
        KernelError, KernelPaths, PinnedMaps,
    },
    prereq::{self, PrereqError},
    proxy::handover::{Control, HandoverError, Predecessor, Successor},
    sockets::{self, Acceptor, FdBudget, FdLimitTooLow, ListenerName, PerSourceLimit},
};

#[derive(Debug, thiserror::Error)]
pub enum CaptureServerError {
    #[error(transparent)]
    Prereq(#[from] PrereqError),
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("state directory {0}: {1}")]
    State(PathBuf, std::io::Error),
    #[error("entering network namespace {0}: {1}")]
    Netns(PathBuf, std::io::Error),
    #[error("signal handler: {0}")]
    Signal(std::io::Error),
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error(transparent)]
    Budget(#[from] BudgetError),
}

/// A connection that sk_lookup steered to the capture socket.
pub struct Steered {
    pub stream: TcpStream,
    /// The pod's address and port.
    pub src: SocketAddr,
    /// The original destination: the accepted socket's local address.
    pub dst: SocketAddr,
    /// The `services` entry for `dst`.
    pub service: ServiceValue,
}

pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What happens to a steered connection. Production plugs in HBONE; tests
/// plug in an echo handler.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, conn: Steered) -> BoxFuture;
}

/// Close with RST (SO_LINGER 0) so the client sees a refusal, not a clean EOF.
pub fn reset(stream: TcpStream) {
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

#[derive(Clone, Debug)]
pub struct CaptureOptions {
    pub paths: KernelPaths,
    pub state_dir: PathBuf,
    /// Capture listener address; an ephemeral port keeps a successor from
    /// needing SO_REUSEPORT.
    pub capture_addr: SocketAddr,
    /// How long open connections may run after the agent stops accepting.
    pub drain_timeout: Duration,
    /// Initial `meta` (from `kernel::projection::meta`). `None` leaves a
    /// pinned `meta` as it is.
    pub meta: Option<shunt_common::Meta>,
    /// The captured-connection budget; unset parts follow the open-file
    /// limit ([`CaptureLimits::resolve`]).
    pub limits: CaptureLimits,
}

/// Captured connections the agent holds at once, counted in the fds they
/// hold: one for a connection carried over HBONE (its stream rides a pooled
/// TLS connection), two for one connected directly (no waypoint). Beyond
/// either budget a new connection is closed with RST at accept. Without a
/// cap a flood of connects took every fd, and the config watcher's reads and
/// the netlink lookups failed with EMFILE until it ended (#14).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureLimits {
    /// All captured connections. Default: the open-file limit minus
    /// [`sockets::control_plane_reserve`].
    pub total: Option<usize>,
    /// Per pod address (canonical: an IPv4-mapped address is its IPv4
    /// one). Default: a quarter of the total, at least 4096 (`cargo xtask
    /// bench` holds 2,000 connections from one pod) unless that is more
    /// than half of it; never more than the total.
    pub per_source: Option<usize>,
}

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("reading the open-file limit (RLIMIT_NOFILE): {0}")]
    FdLimit(std::io::Error),
    #[error(transparent)]
    FdLimitTooLow(#[from] FdLimitTooLow),
    #[error(
        "captured-connection budget {asked} (--max-captured-connections) is more than the \
         open-file limit ({fd_limit}) leaves after the control plane's reserve of {reserve} \
         fds ({room}): lower it or raise the limit"
    )]
    AboveFdLimit {
        asked: usize,
        fd_limit: u64,
        reserve: u64,
        room: usize,
    },
}

impl CaptureLimits {
    /// The budget under an open-file limit of `fd_limit`: the flags where
    /// given, [`FdBudget::from_limit`]'s defaults where not.
    pub fn resolve(self, fd_limit: u64) -> Result<FdBudget, BudgetError> {
        let room = FdBudget::from_limit(fd_limit)?;
        let total = match self.total {
            Some(asked) if asked > room.total => {
                return Err(BudgetError::AboveFdLimit {
                    asked,
                    fd_limit,
                    reserve: room.reserve,
                    room: room.total,
                })
            }
            Some(asked) => asked.max(1),
            None => room.total,
        };
        let per_source = self
            .per_source
            .unwrap_or_else(|| sockets::default_per_source(total))
            .clamp(1, total);
        Ok(FdBudget {
            total,
            per_source,
            ..room
        })
    }
}

/// The fds a captured connection holds on the agent: its own, and on the
/// direct path (no waypoint) the one to its destination.
fn weight(service: &ServiceValue) -> usize {
    if service.flags & SVC_F_WAYPOINT != 0 {
        1
    } else {
        2
    }
}

/// Enter the node's network namespace. Must run before any thread is
/// spawned (tokio's workers inherit the namespace of the thread that
/// creates them).
pub fn enter_netns(path: &Path) -> Result<(), CaptureServerError> {
    use std::os::fd::AsRawFd;
    let f =
        std::fs::File::open(path).map_err(|e| CaptureServerError::Netns(path.to_path_buf(), e))?;
    // SAFETY: valid fd; CLONE_NEWNET restricts it to a network namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(CaptureServerError::Netns(
            path.to_path_buf(),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Everything the running agent holds. Created by [`CaptureServer::start`], which
/// leaves the agent capturing; [`CaptureServer::serve`] runs it until a signal.
pub struct CaptureServer {
    opts: CaptureOptions,
    installed: kernel::loader::Installed,
    listener: TcpListener,
    maps: Arc<PinnedMaps>,
    /// Connections in flight: the budget, and what draining waits for.
    in_flight: Arc<PerSourceLimit>,
    signals: Option<[tokio::signal::unix::Signal; 2]>,
    control: Control,
    predecessor: Option<Predecessor>,
}

impl CaptureServer {
    /// Check prerequisites, install programs/maps/routes and bind the
    /// capture socket; [`CaptureServer::serve`] inserts it. `predecessor`:
    /// the running agent this one announced itself to
    /// ([`super::handover::announce`], done first thing so that it keeps the
    /// slot meanwhile).
    pub async fn start(
        opts: CaptureOptions,
        predecessor: Option<Predecessor>,
    ) -> Result<Self, CaptureServerError> {
        prereq::check(&opts.paths.pin_dir, &opts.paths.cgroup_root)?;
        let fd_limit = sockets::fd_limit().map_err(BudgetError::FdLimit)?;
        let budget = opts.limits.resolve(fd_limit)?;
        info!(
            max_connections = budget.total,
            max_per_source = budget.per_source,
            fd_limit,
            reserve = budget.reserve,
            "captured-connection budget (in fds: 2 per direct connection)"
        );
        let signals = [
            signal(SignalKind::terminate()).map_err(CaptureServerError::Signal)?,
            signal(SignalKind::interrupt()).map_err(CaptureServerError::Signal)?,
        ];
        let mut installed = kernel::loader::install(&opts.paths, opts.meta)?;
        if !installed.reused_links.is_empty() {
            info!(links = ?installed.reused_links, "reusing pinned links (their programs replaced in place by this build)");
        }
        kernel::netlink::install_vip_routes().await?;
        let maps = Arc::new(PinnedMaps::open(&opts.paths.pin_dir)?);
        let std_listener = capture::listener(opts.capture_addr)?;
        let listener = TcpListener::from_std(std_listener)
            .map_err(|e| KernelError::Socket(opts.capture_addr, e))?;
        kernel::events::forward_kernel_log(&mut installed.ebpf);
        std::fs::create_dir_all(&opts.state_dir)
            .map_err(|e| CaptureServerError::State(opts.state_dir.clone(), e))?;
        let control = Control::bind(&opts.state_dir)?;
        Ok(Self {
            opts,
            installed,
            listener,
            maps,
            in_flight: PerSourceLimit::with_total(budget.per_source, budget.total),
            signals: Some(signals),
            control,
            predecessor,
        })
    }

    pub fn maps(&self) -> Arc<PinnedMaps> {
        self.maps.clone()
    }

    /// Where a successor agent stands (see [`super::handover`]).
    pub fn successors(&self) -> tokio::sync::watch::Receiver<Successor> {
        self.control.subscribe()
    }

    /// Insert the capture socket (new SYNs come here from now on), become
    /// the agent a next successor finds, and tell a predecessor. Only once
    /// the caller can serve: a successor that took the slot while still
    /// loading its CA and config left connections in its accept queue,
    /// unserved for seconds, while the predecessor that could serve them
    /// had stopped accepting (#11 item 9). Until then the predecessor keeps
    /// the slot (it was told a successor is coming), so no window opens.
    async fn take_over(&mut self) -> Result<(), CaptureServerError> {
        capture::insert(&mut self.installed.ebpf, &self.listener)?;
        self.control.publish()?;
        if let Some(p) = self.predecessor.take() {
            p.taken().await;
        }
        write_pidfile(&self.opts.state_dir)?;
        info!(
            capture = %self.listener.local_addr().map(|a| crate::telemetry::LogAddr(a).to_string()).unwrap_or_default(),
            pin_dir = %self.opts.paths.pin_dir.display(),
            cgroup_root = %self.opts.paths.cgroup_root.display(),
            "agent capturing"
        );
        Ok(())
    }

    /// Take over the capture slot, then accept steered connections until
    /// SIGTERM/SIGINT (shutdown) or a successor takes over, then drain.
    pub async fn serve(mut self, handler: Arc<dyn Handler>) -> Result<(), CaptureServerError> {
        let Some([mut term, mut int]) = self.signals.take() else {
            unreachable!("set by start, taken only here");
        };
        self.take_over().await?;
        let mut acceptor = Acceptor::new(ListenerName::Capture);
        // Asked to stop while a successor was starting: serve until it
        // takes over or goes away, at most the drain timeout.
        let mut stop_by: Option<tokio::time::Instant> = None;
        let mut successors = self.control.subscribe();
        let handed_over = loop {
            let successor = async {
                let r = match stop_by {
                    None => successors
                        .wait_for(|s| *s == Successor::TookOver)
                        .await
                        .map(|s| *s),
                    Some(t) => {
                        let w = successors.wait_for(|s| *s != Successor::Starting);
                        match tokio::time::timeout_at(t, w).await {
                            Ok(r) => r.map(|s| *s),
                            Err(_) => Ok(Successor::None),
                        }
                    }
                };
                // A closed channel: no successor can reach us any more.
                r.unwrap_or(Successor::None)
            };
            let stop = tokio::select! {
                (stream, peer) = acceptor.accept(&self.listener) => {
                    self.dispatch(&acceptor, stream, peer, &handler);
                    false
                }
                s = successor => break s == Successor::TookOver,
                _ = term.recv(), if stop_by.is_none() => true,
                _ = int.recv(), if stop_by.is_none() => true,
            };
            if stop {
                if self.control.successor() == Successor::None {
                    break false;
                }
                info!("stop requested while a successor is starting; serving until it takes over");
                stop_by = Some(tokio::time::Instant::now() + self.opts.drain_timeout);
            }
        };
        if handed_over {
            info!("a successor took over the capture socket; draining");
        } else {
            // No successor owns the slot (the protocol says so; the pid file
            // cannot: agents in other PID namespaces may share a pid).
            capture::clear(&mut self.installed.ebpf)?;
            if pidfile_owner(&self.opts.state_dir) == Some(std::process::id()) {
                let _ = std::fs::remove_file(self.opts.state_dir.join(PIDFILE));
            }
            info!("shutting down; VIP connects are refused until an agent starts");
        }
        self.drain_accept_queue(&handler).await;
        drop(self.listener);
        // One budget from the stop request: waiting for a successor counts
        // (the DaemonSet's grace period covers the drain timeout once).
        let deadline = tokio::time::sleep_until(
            stop_by.unwrap_or_else(|| tokio::time::Instant::now() + self.opts.drain_timeout),
        );
        tokio::select! {
            _ = self.in_flight.idle() => {}
            _ = deadline => {
                warn!(open_fds = self.in_flight.open_total(), "drain deadline reached; closing open connections");
            }
        }
        info!("agent stopped");
        Ok(())
    }

    /// Accept until the queue has stayed empty for a while: handshakes that
    /// completed against this listener before the switch still land here.
    async fn drain_accept_queue(&self, handler: &Arc<dyn Handler>) {
        const QUIET: Duration = Duration::from_millis(500);
        let mut acceptor = Acceptor::new(ListenerName::Capture);
        while let Ok((stream, peer)) =
            tokio::time::timeout(QUIET, acceptor.accept(&self.listener)).await
        {
            self.dispatch(&acceptor, stream, peer, handler);
        }
    }

    /// `src` is the peer address accept(2) returned (no getpeername per
    /// connection); TCP_NODELAY comes from the listener. A connection the
    /// budget has no place for is refused through `acceptor` (RST, counted,
    /// logged at a limited rate).
    fn dispatch(
        &self,
        acceptor: &Acceptor,
        stream: TcpStream,
        src: SocketAddr,
        handler: &Arc<dyn Handler>,
    ) {
        let Ok(dst) = stream.local_addr() else {
            return;
        };
        let src = SocketAddr::new(src.ip().to_canonical(), src.port());
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        // Only sk_lookup feeds this socket; anything else connected to it
        // directly is not ours to carry.
        if !is_vip(&addr_bytes(dst.ip())) {
            debug!(%src, %dst, "direct connection to the capture socket; reset");
            reset(stream);
            return;
        }
        let Some(service) = self.maps.service(&tcp_key(dst)) else {
            // Removed between the SYN and now.
            debug!(%src, %dst, "service gone; reset");
            reset(stream);
            return;
        };
        let slot = match self.in_flight.admit(src.ip(), weight(&service)) {
            Ok(slot) => slot,
            Err(no) => return acceptor.refuse(stream, src, no.reason()),
        };
        let fut = handler.handle(Steered {
            stream,
            src,
            dst,
            service,
        });
        tokio::spawn(
            async move {
                fut.await;
                drop(slot);
            }
            .instrument(info_span!("conn", %src, %dst, svc = service.service_id)),
        );
    }
}

/// The agent's pid, in its state directory (read by `shunt status`).
pub const PIDFILE: &str = "agent.pid";

fn pidfile_owner(state_dir: &Path) -> Option<u32> {
    std::fs::read_to_string(state_dir.join(PIDFILE))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Record this agent's pid for `shunt status` (which finds the agent's
/// network namespace from it when it runs in the same PID namespace).
fn write_pidfile(state_dir: &Path) -> Result<(), CaptureServerError> {
    let me = std::process::id();
    let path = state_dir.join(PIDFILE);
    let tmp = state_dir.join(format!("{PIDFILE}.{me}"));
    std::fs::write(&tmp, format!("{me}\n"))
        .map_err(|e| CaptureServerError::State(tmp.clone(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CaptureServerError::State(path.clone(), e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: Option<usize>, per_source: Option<usize>) -> CaptureLimits {
        CaptureLimits { total, per_source }
    }

    #[test]
    fn the_default_budget_keeps_the_reserve_and_a_quarter_per_source() {
        // This machine's (and the scale run's) limit.
        let b = CaptureLimits::default().resolve(20_000).unwrap();
        assert_eq!((b.reserve, b.total, b.per_source), (1000, 19_000, 4750));
        // Large limits: 5% kept, a quarter per pod.
        let b = CaptureLimits::default().resolve(1 << 20).unwrap();
        assert_eq!(b.reserve, (1 << 20) / 20);
        assert_eq!(b.per_source, b.total / 4);
        // 4096 per pod while that is at most half the budget...
        let b = CaptureLimits::default().resolve(10_000).unwrap();
        assert_eq!((b.total, b.per_source), (9_488, 4096));
        // ...else half: one pod never holds the whole budget.
        let b = CaptureLimits::default().resolve(1024).unwrap();
        assert_eq!((b.reserve, b.total, b.per_source), (512, 512, 256));
    }

    #[test]
    fn bench_s_held_connections_fit_the_default_per_source_budget() {
        // `cargo xtask bench` holds 2,000 connections from one pod, two fds
        // each on the direct path, under the hard limit it raises to.
        for fd_limit in [20_000, 65_536, 1 << 20] {
            let b = CaptureLimits::default().resolve(fd_limit).unwrap();
            assert!(b.per_source >= 4000, "{fd_limit}: {b:?}");
        }
    }

    #[test]
    fn flags_are_kept_within_the_fd_limit() {
        let b = limits(Some(300), Some(100)).resolve(1024).unwrap();
        assert_eq!((b.total, b.per_source), (300, 100));
        let b = limits(Some(300), None).resolve(1024).unwrap();
        assert_eq!(b.per_source, 150, "the default follows the given total");
        let b = limits(None, Some(5000)).resolve(1024).unwrap();
        assert_eq!(b.per_source, 512, "a source never gets more than the total");
        let e = limits(Some(600), None).resolve(1024).unwrap_err();
        assert!(
            matches!(
                e,
                BudgetError::AboveFdLimit {
                    asked: 600,
                    room: 512,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("--max-captured-connections"), "{e}");
        let e = CaptureLimits::default().resolve(512).unwrap_err();
        assert!(matches!(e, BudgetError::FdLimitTooLow(_)), "{e}");
    }

    #[test]
    fn a_direct_connection_weighs_its_two_fds() {
        let mut v = ServiceValue {
            service_id: 1,
            flags: SVC_F_WAYPOINT,
            waypoint_addr: [0; 16],
            waypoint_port: 15008,
            target_port: 80,
            _pad: [0; 4],
        };
        assert_eq!(weight(&v), 1);
        v.flags = 0;
        assert_eq!(weight(&v), 2);
    }
}

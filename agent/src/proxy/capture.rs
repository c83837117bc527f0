//! The capture server: the node agent's lifecycle around the capture
//! socket. It installs the kernel side, accepts steered connections and
//! hands each to a [`Handler`] (the outbound path, or a test's), and hands
//! over to a successor without refusing a single connect.
//!
//! Handover: a new agent, once set up to serve (config applied, outbound
//! path built), inserts its listener into the capture SOCKMAP (new SYNs go
//! to it at once), records its pid in `<state>/agent.pid` and sends
//! the previous agent SIGUSR2. The old agent keeps accepting until its accept
//! queue stays empty (closing a listener with queued connections would reset
//! them), closes it, and lets its open connections finish up to a deadline.
//! SIGTERM/SIGINT without a successor: the agent removes its socket from the
//! SOCKMAP (new VIP connects are refused by sk_lookup), drains the same way
//! and exits. Links, maps and routes always stay, so traffic stays fail-closed.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use shunt_common::{is_vip, ServiceValue};
use tokio::{
    net::{TcpListener, TcpStream},
    signal::unix::{signal, SignalKind},
    sync::Notify,
};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    kernel::{
        self, capture,
        registry::{addr_bytes, tcp_key},
        KernelError, KernelPaths, PinnedMaps,
    },
    prereq::{self, PrereqError},
    sockets::{Acceptor, ListenerName},
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

/// Connections in flight, for draining.
#[derive(Default)]
struct InFlight {
    n: AtomicUsize,
    idle: Notify,
}

struct InFlightGuard(Arc<InFlight>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self.0.n.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Everything the running agent holds. Created by [`CaptureServer::start`], which
/// leaves the agent capturing; [`CaptureServer::serve`] runs it until a signal.
pub struct CaptureServer {
    opts: CaptureOptions,
    installed: kernel::loader::Installed,
    listener: TcpListener,
    maps: Arc<PinnedMaps>,
    in_flight: Arc<InFlight>,
    signals: Option<[tokio::signal::unix::Signal; 3]>,
}

impl CaptureServer {
    /// Check prerequisites, install programs/maps/routes and bind the
    /// capture socket; [`CaptureServer::serve`] inserts it.
    pub async fn start(opts: CaptureOptions) -> Result<Self, CaptureServerError> {
        prereq::check(&opts.paths.pin_dir, &opts.paths.cgroup_root)?;
        // Before the socket is visible: a successor's SIGUSR2 must never hit
        // the default action (terminate) of an agent still starting.
        let signals = [
            signal(SignalKind::terminate()).map_err(CaptureServerError::Signal)?,
            signal(SignalKind::interrupt()).map_err(CaptureServerError::Signal)?,
            signal(SignalKind::user_defined2()).map_err(CaptureServerError::Signal)?,
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
        Ok(Self {
            opts,
            installed,
            listener,
            maps,
            in_flight: Arc::default(),
            signals: Some(signals),
        })
    }

    pub fn maps(&self) -> Arc<PinnedMaps> {
        self.maps.clone()
    }

    /// Insert the capture socket (new SYNs come here from now on) and tell
    /// a predecessor. Only once the caller can serve: a successor that took
    /// the slot while still loading its CA and config left connections in
    /// its accept queue, unserved for seconds, while the predecessor that
    /// could serve them had stopped accepting (#11 item 9). Until then the
    /// predecessor keeps the slot, so no window opens.
    fn take_over(&mut self) -> Result<(), CaptureServerError> {
        capture::insert(&mut self.installed.ebpf, &self.listener)?;
        signal_predecessor(&self.opts.state_dir)?;
        info!(
            capture = %self.listener.local_addr().map(|a| crate::telemetry::LogAddr(a).to_string()).unwrap_or_default(),
            pin_dir = %self.opts.paths.pin_dir.display(),
            cgroup_root = %self.opts.paths.cgroup_root.display(),
            "agent capturing"
        );
        Ok(())
    }

    /// Take over the capture slot, then accept steered connections until
    /// SIGTERM/SIGINT (shutdown) or SIGUSR2 (handed over), then drain.
    pub async fn serve(mut self, handler: Arc<dyn Handler>) -> Result<(), CaptureServerError> {
        let Some([mut term, mut int, mut usr2]) = self.signals.take() else {
            unreachable!("set by start, taken only here");
        };
        self.take_over()?;
        let mut acceptor = Acceptor::new(ListenerName::Capture);
        let handed_over = loop {
            tokio::select! {
                (stream, _) = acceptor.accept(&self.listener) => self.dispatch(stream, &handler),
                _ = term.recv() => break false,
                _ = int.recv() => break false,
                _ = usr2.recv() => break true,
            }
        };
        if handed_over {
            info!("a successor took over the capture socket; draining");
        } else {
            if pidfile_owner(&self.opts.state_dir) == Some(std::process::id()) {
                capture::clear(&mut self.installed.ebpf)?;
                let _ = std::fs::remove_file(self.opts.state_dir.join(PIDFILE));
            }
            info!("shutting down; VIP connects are refused until an agent starts");
        }
        self.drain_accept_queue(&handler).await;
        drop(self.listener);
        let deadline = tokio::time::sleep(self.opts.drain_timeout);
        tokio::pin!(deadline);
        loop {
            let idle = self.in_flight.idle.notified();
            if self.in_flight.n.load(Ordering::Acquire) == 0 {
                break;
            }
            tokio::select! {
                _ = idle => {}
                _ = &mut deadline => {
                    warn!(open = self.in_flight.n.load(Ordering::Acquire), "drain deadline reached; closing open connections");
                    break;
                }
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
        while let Ok((stream, _)) =
            tokio::time::timeout(QUIET, acceptor.accept(&self.listener)).await
        {
            self.dispatch(stream, handler);
        }
    }

    fn dispatch(&self, stream: TcpStream, handler: &Arc<dyn Handler>) {
        let (Ok(src), Ok(dst)) = (stream.peer_addr(), stream.local_addr()) else {
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
        let _ = stream.set_nodelay(true);
        self.in_flight.n.fetch_add(1, Ordering::AcqRel);
        let guard = InFlightGuard(self.in_flight.clone());
        let fut = handler.handle(Steered {
            stream,
            src,
            dst,
            service,
        });
        tokio::spawn(
            async move {
                fut.await;
                drop(guard);
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

/// Record this agent as the owner and tell a still-running predecessor that
/// it has been replaced.
fn signal_predecessor(state_dir: &Path) -> Result<(), CaptureServerError> {
    let me = std::process::id();
    let prev = pidfile_owner(state_dir);
    let path = state_dir.join(PIDFILE);
    let tmp = state_dir.join(format!("{PIDFILE}.{me}"));
    std::fs::write(&tmp, format!("{me}\n"))
        .map_err(|e| CaptureServerError::State(tmp.clone(), e))?;
    std::fs::rename(&tmp, &path).map_err(|e| CaptureServerError::State(path.clone(), e))?;
    if let Some(pid) = prev.filter(|p| *p != me) {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
        let mine = std::fs::read_link("/proc/self/exe").unwrap_or_default();
        // Only signal something that is plausibly a shunt agent.
        if comm.trim().starts_with("shunt") || exe == mine {
            info!(pid, "handing over from the previous agent");
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid as i32, libc::SIGUSR2) };
        }
    }
    Ok(())
}

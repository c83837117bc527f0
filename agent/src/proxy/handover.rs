//! Handover between two agents on one node through a control socket,
//! `<state-dir>/agent.sock` (a unix stream socket; on a cluster the state
//! dir is a hostPath, so two agent pods reach each other without sharing a
//! PID namespace and without signals).
//!
//! Protocol, one ASCII line each way:
//! 1. The successor, as the first thing it does, connects and sends
//!    `SUCCESSOR <pid>`; the predecessor answers `OK` (or `BUSY` while
//!    another successor is connected). From then until the connection ends,
//!    the predecessor does not give up the capture slot, even on SIGTERM:
//!    a successor is coming, and clearing the slot now would refuse
//!    connects until it inserts its socket.
//! 2. Once it can serve, the successor inserts its capture socket, publishes
//!    its own control socket under the same name (rename over), and sends
//!    `TAKEN`; the predecessor answers `DRAINING`, stops accepting once its
//!    queue is empty, and drains.
//! 3. A successor that goes away before `TAKEN` (the connection closes)
//!    leaves the predecessor the owner, as before it came.
//!
//! `STATUS` answers `OK <pid>` (the pid in the agent's own PID namespace;
//! a client in another one reads the agent's pid as it sees it from
//! `SO_PEERCRED`). Every client is treated as hostile: only root or the
//! agent's own uid may talk (peer credentials, and the socket is 0600),
//! lines are at most [`MAX_LINE`] bytes, the first line must come within
//! [`FIRST_LINE`].

use std::{
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::watch,
};
use tracing::{info, warn};

/// The control socket's name in the state directory.
pub const SOCKET: &str = "agent.sock";
/// Longest line either side sends.
pub const MAX_LINE: usize = 64;
/// How long a client has for its first line.
pub const FIRST_LINE: Duration = Duration::from_secs(5);
/// How long the successor waits for each answer.
const ANSWER: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("control socket {0}: {1}")]
    Socket(PathBuf, std::io::Error),
}

/// Where a successor stands, as the predecessor sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Successor {
    /// None connected: this agent owns the capture slot alone.
    None,
    /// Connected and starting: keep the slot until it takes over or leaves.
    Starting,
    /// It inserted its socket: drain.
    TookOver,
}

/// This agent's control socket: bound at start under a temporary name,
/// published under [`SOCKET`] when the agent takes over.
pub struct Control {
    dir: PathBuf,
    tmp: PathBuf,
    /// Inode of the published socket file, to remove only our own.
    published: Option<u64>,
    state: watch::Receiver<Successor>,
    task: tokio::task::JoinHandle<()>,
}

impl Control {
    /// Binds the socket (not yet reachable under [`SOCKET`]) and serves it.
    pub fn bind(state_dir: &Path) -> Result<Control, HandoverError> {
        let tmp = state_dir.join(format!("{SOCKET}.{}", std::process::id()));
        let err = |e| HandoverError::Socket(tmp.clone(), e);
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp).map_err(err)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        let (tx, state) = watch::channel(Successor::None);
        let task = tokio::spawn(serve(listener, Arc::new(tx)));
        Ok(Control {
            dir: state_dir.to_path_buf(),
            tmp,
            published: None,
            state,
            task,
        })
    }

    /// Makes this agent's socket the one a next successor finds.
    pub fn publish(&mut self) -> Result<(), HandoverError> {
        let path = self.dir.join(SOCKET);
        std::fs::rename(&self.tmp, &path).map_err(|e| HandoverError::Socket(path.clone(), e))?;
        self.published = std::fs::metadata(&path).ok().map(|m| m.ino());
        Ok(())
    }

    /// Changes of the successor state, for a select loop.
    pub fn subscribe(&self) -> watch::Receiver<Successor> {
        self.state.clone()
    }

    pub fn successor(&self) -> Successor {
        *self.state.borrow()
    }

    /// Waits until the successor state satisfies `f`.
    pub async fn wait_for(&mut self, f: impl Fn(Successor) -> bool) -> Successor {
        match self.state.wait_for(|s| f(*s)).await {
            Ok(s) => *s,
            // The serving task ended: no successor can reach us any more.
            Err(_) => Successor::None,
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.tmp);
        let path = self.dir.join(SOCKET);
        let ours = std::fs::metadata(&path).ok().map(|m| m.ino());
        if ours.is_some() && ours == self.published {
            let _ = std::fs::remove_file(&path);
        }
    }
}

async fn serve(listener: UnixListener, state: Arc<watch::Sender<Successor>>) {
    let me = std::process::id();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of fds and the like: do not spin.
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if !trusted(&stream) {
            continue;
        }
        tokio::spawn(connection(stream, state.clone(), me));
    }
}

/// Root or our own uid only.
fn trusted(s: &UnixStream) -> bool {
    // SAFETY: geteuid has no failure mode.
    let euid = unsafe { libc::geteuid() };
    s.peer_cred().is_ok_and(|c| c.uid() == 0 || c.uid() == euid)
}

async fn connection(stream: UnixStream, state: Arc<watch::Sender<Successor>>, me: u32) {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let first = match tokio::time::timeout(FIRST_LINE, read_line(&mut r)).await {
        Ok(Some(l)) => l,
        _ => return,
    };
    let mut words = first.split_whitespace();
    match (words.next(), words.next()) {
        (Some("STATUS"), None) => {
            let _ = w.write_all(format!("OK {me}\n").as_bytes()).await;
        }
        (Some("SUCCESSOR"), Some(pid)) => {
            let pid = pid.to_string();
            let claimed = state.send_if_modified(|s| {
                let free = *s == Successor::None;
                if free {
                    *s = Successor::Starting;
                }
                free
            });
            if !claimed {
                let _ = w.write_all(b"BUSY\n").await;
                return;
            }
            info!(successor = %pid, "a successor agent is starting; keeping the capture socket until it takes over");
            if w.write_all(b"OK\n").await.is_err() {
                state.send_replace(Successor::None);
                return;
            }
            // No timeout: the successor may load config for a while; it
            // ends the wait by taking over or by going away.
            match read_line(&mut r).await.as_deref() {
                Some("TAKEN") => {
                    state.send_replace(Successor::TookOver);
                    let _ = w.write_all(b"DRAINING\n").await;
                }
                other => {
                    warn!(successor = %pid, line = ?other, "the successor went away before taking over; this agent keeps serving");
                    state.send_replace(Successor::None);
                }
            }
        }
        _ => {
            let _ = w.write_all(b"ERR unknown request\n").await;
        }
    }
}

/// One line without its newline; `None` on EOF, error, a line longer than
/// [`MAX_LINE`] or one that is not ASCII.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Option<String> {
    let mut buf = Vec::new();
    let mut limited = tokio::io::AsyncReadExt::take(r, MAX_LINE as u64 + 1);
    let n = limited.read_until(b'\n', &mut buf).await.ok()?;
    if n == 0 || buf.last() != Some(&b'\n') || !buf.is_ascii() {
        return None;
    }
    buf.pop();
    String::from_utf8(buf).ok()
}

/// The successor's side: an open connection to the predecessor, which
/// keeps the capture slot while it lasts.
pub struct Predecessor {
    r: BufReader<tokio::net::unix::OwnedReadHalf>,
    w: tokio::net::unix::OwnedWriteHalf,
}

/// Tells a running agent that a successor is starting. `None` when no
/// agent answers (none running, a stale socket file, or one busy with
/// another successor).
pub async fn announce(state_dir: &Path) -> Option<Predecessor> {
    let path = state_dir.join(SOCKET);
    let stream = UnixStream::connect(&path).await.ok()?;
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let hello = format!("SUCCESSOR {}\n", std::process::id());
    let answer = tokio::time::timeout(ANSWER, async {
        w.write_all(hello.as_bytes()).await.ok()?;
        read_line(&mut r).await
    })
    .await
    .ok()
    .flatten();
    match answer.as_deref() {
        Some("OK") => {
            info!(control = %path.display(), "a running agent keeps capturing until this one takes over");
            Some(Predecessor { r, w })
        }
        other => {
            warn!(control = %path.display(), answer = ?other, "the running agent did not accept a successor; taking over without its promise");
            None
        }
    }
}

impl Predecessor {
    /// After inserting our capture socket: the predecessor drains.
    pub async fn taken(mut self) {
        let answer = tokio::time::timeout(ANSWER, async {
            self.w.write_all(b"TAKEN\n").await.ok()?;
            read_line(&mut self.r).await
        })
        .await
        .ok()
        .flatten();
        match answer.as_deref() {
            Some("DRAINING") => info!("the previous agent is draining"),
            other => warn!(answer = ?other, "the previous agent did not confirm the handover"),
        }
    }
}

/// The running agent's pid as the caller sees it (`SO_PEERCRED` is
/// translated into the caller's PID namespace; an agent pod's own pid file
/// names its pid in the pod's), for `shunt status`. Blocking, brief.
pub fn agent_pid(state_dir: &Path) -> Option<u32> {
    use std::io::Write as _;
    use std::os::fd::AsRawFd as _;
    let mut s = std::os::unix::net::UnixStream::connect(state_dir.join(SOCKET)).ok()?;
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    // A well-formed request, so the agent does not log a stray client.
    let _ = s.write_all(b"STATUS\n");
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn published(dir: &Path) -> Control {
        let mut c = Control::bind(dir).unwrap();
        c.publish().unwrap();
        c
    }

    #[tokio::test]
    async fn a_successor_is_promised_the_slot_then_takes_it_and_the_predecessor_drains() {
        let t = tempfile::tempdir().unwrap();
        let mut old = published(t.path()).await;
        assert_eq!(old.successor(), Successor::None);
        let p = announce(t.path()).await.expect("the running agent answers");
        assert_eq!(
            old.wait_for(|s| s != Successor::None).await,
            Successor::Starting
        );
        // A second successor meanwhile is refused, not promised.
        assert!(announce(t.path()).await.is_none());
        let mut new = Control::bind(t.path()).unwrap();
        new.publish().unwrap();
        p.taken().await;
        assert_eq!(
            old.wait_for(|s| s == Successor::TookOver).await,
            Successor::TookOver
        );
        // The name now reaches the successor; dropping the old one leaves it.
        drop(old);
        assert_eq!(
            agent_pid(t.path()),
            Some(std::process::id()),
            "the new agent's socket is still published"
        );
        assert_eq!(new.successor(), Successor::None);
    }

    #[tokio::test]
    async fn a_successor_that_goes_away_before_taking_over_leaves_the_predecessor_the_owner() {
        let t = tempfile::tempdir().unwrap();
        let mut old = published(t.path()).await;
        let p = announce(t.path()).await.unwrap();
        old.wait_for(|s| s == Successor::Starting).await;
        drop(p);
        assert_eq!(
            old.wait_for(|s| s != Successor::Starting).await,
            Successor::None
        );
        // And the next successor is promised again.
        assert!(announce(t.path()).await.is_some());
    }

    #[tokio::test]
    async fn no_agent_or_a_stale_socket_file_means_no_predecessor() {
        let t = tempfile::tempdir().unwrap();
        assert!(announce(t.path()).await.is_none());
        // A socket file nobody listens on (an agent that was killed).
        let mut c = published(t.path()).await;
        let path = t.path().join(SOCKET);
        // Forget that the file is ours, so dropping leaves it behind, as a
        // killed agent does.
        let ino = c.published.take();
        drop(c);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(std::fs::metadata(&path).ok().map(|m| m.ino()), ino);
        assert!(announce(t.path()).await.is_none());
    }

    #[tokio::test]
    async fn garbage_and_overlong_lines_get_no_promise() {
        let t = tempfile::tempdir().unwrap();
        let old = published(t.path()).await;
        for junk in [&b"HELLO\n"[..], &[b'A'; 200][..], b"SUCCESSOR\n"] {
            let mut s = UnixStream::connect(t.path().join(SOCKET)).await.unwrap();
            s.write_all(junk).await.unwrap();
            let mut out = String::new();
            let _ = tokio::time::timeout(
                Duration::from_secs(2),
                tokio::io::AsyncReadExt::read_to_string(&mut s, &mut out),
            )
            .await;
            assert!(!out.starts_with("OK"), "{junk:?} → {out:?}");
        }
        assert_eq!(old.successor(), Successor::None);
        // The socket file is 0600.
        let mode = std::fs::metadata(t.path().join(SOCKET))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

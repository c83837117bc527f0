//! Loopback HBONE peers and PKI (`mesh` feature): a CA in a temp dir, an
//! echo upstream, a waypoint with a recording handler, a client. Used by
//! the agent's HBONE tests and the HBONE bench.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shunt_agent::hbone::{ClientSettings, ConnectRequest};
use shunt_agent::hbone::{
    ConnectHandler, Decision, HboneClient, HboneServer, InboundRequest, RelayStats, ServerSettings,
};
use shunt_agent::identity::{Ca, IdentityConfig, IdentityManager, SpiffeId};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub ca: Arc<Ca>,
    pub ids: IdentityManager,
}

impl Mesh {
    pub fn new(trust_domain: &str) -> Mesh {
        Self::with_config(trust_domain, IdentityConfig::default())
    }
    pub fn with_config(trust_domain: &str, cfg: IdentityConfig) -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::init(dir.path(), trust_domain, false).unwrap());
        let ids = IdentityManager::new(ca.clone(), trust_domain, cfg).unwrap();
        Mesh { dir, ca, ids }
    }
    /// Another trust domain under the same root (same CA).
    pub fn other_domain(&self, trust_domain: &str) -> IdentityManager {
        IdentityManager::new(self.ca.clone(), trust_domain, IdentityConfig::default()).unwrap()
    }
}

pub fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

/// Echoes each connection until EOF, then half-closes.
pub async fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Echoes through a 256-byte buffer, then half-closes: for memory tests,
/// where the upstream's own buffers would blur what the proxy holds.
pub async fn small_echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Forward,
    Refuse(u16),
}

/// Connects every tunnel to `upstream` (or refuses), recording requests.
pub struct TestHandler {
    pub upstream: SocketAddr,
    pub mode: Mode,
    pub seen: Mutex<Vec<InboundRequest>>,
    pub completed: Mutex<Vec<(u64, u64, bool)>>,
}

impl TestHandler {
    pub fn new(upstream: SocketAddr, mode: Mode) -> Arc<Self> {
        Arc::new(TestHandler {
            upstream,
            mode,
            seen: Mutex::new(vec![]),
            completed: Mutex::new(vec![]),
        })
    }
    pub fn seen(&self) -> Vec<InboundRequest> {
        self.seen.lock().unwrap().clone()
    }
}

impl ConnectHandler for TestHandler {
    async fn handle(&self, req: InboundRequest) -> Decision {
        self.seen.lock().unwrap().push(req);
        match self.mode {
            Mode::Refuse(s) => Decision::Refuse(http::StatusCode::from_u16(s).unwrap()),
            Mode::Forward => match TcpStream::connect(self.upstream).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    Decision::Forward(Box::new(s))
                }
                Err(_) => Decision::Refuse(http::StatusCode::SERVICE_UNAVAILABLE),
            },
        }
    }
    fn completed(&self, stats: &RelayStats) {
        self.completed.lock().unwrap().push((
            stats.bytes_sent,
            stats.bytes_received,
            stats.error.is_none(),
        ));
    }
}

/// Starts a waypoint presenting `identity` from `ids`.
pub async fn start_waypoint<H: ConnectHandler>(
    ids: &IdentityManager,
    identity: &SpiffeId,
    handler: Arc<H>,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = Arc::new(HboneServer::new(
        ids.server_config(identity).unwrap(),
        ServerSettings::default(),
    ));
    tokio::spawn(server.serve(l, handler));
    addr
}

pub fn request(src: &SpiffeId, waypoint: SocketAddr, waypoint_id: &SpiffeId) -> ConnectRequest {
    ConnectRequest {
        source_identity: src.clone(),
        source_addr: "10.1.2.3:45678".parse().unwrap(),
        waypoint_addr: waypoint,
        waypoint_identity: waypoint_id.clone(),
        authority: "240.240.0.2:80".parse().unwrap(),
        host: Some("httpbin.org".into()),
        baggage: None,
        traceparent: None,
    }
}

pub fn client(ids: &IdentityManager) -> HboneClient {
    HboneClient::new(ids.clone(), ClientSettings::default())
}

/// A connected socket pair: (app side, agent side).
pub async fn socket_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    let _ = a.set_nodelay(true);
    let _ = b.set_nodelay(true);
    (a, b)
}

/// Writes `msg` on `app`, reads the same number of bytes back.
pub async fn roundtrip(app: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    app.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(30), app.read_exact(&mut back))
        .await
        .expect("echo timed out")
        .unwrap();
    back
}

pub const SRC: &str = "spiffe://cluster.local/ns/default/sa/sleep";
pub const WAYPOINT: &str = "spiffe://cluster.local/ns/istio-egress/sa/egress-gateway";

/// A listener whose accept queue is full and never drained: the kernel
/// drops every further SYN, so connects to it stay in SYN-SENT (as towards
/// a host that silently drops packets). Returns the address and the
/// sockets that fill the queue.
pub async fn syn_dropping_upstream() -> (SocketAddr, socket2::Socket, Vec<TcpStream>) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    s.listen(0).unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    let mut fill = Vec::new();
    // Backlog 0 holds one connection; try a few until a connect hangs.
    for _ in 0..4 {
        match tokio::time::timeout(Duration::from_millis(300), TcpStream::connect(addr)).await {
            Ok(Ok(c)) => fill.push(c),
            Ok(Err(e)) => panic!("connect to the full listener failed: {e}"),
            Err(_) => return (addr, s, fill),
        }
    }
    panic!("the listener's accept queue never filled");
}

/// TCP sockets of this network namespace connected (or connecting) to
/// `addr`, other than `except`, as (all, in SYN-SENT).
pub fn sockets_to(addr: SocketAddr, except: &[TcpStream]) -> (usize, usize) {
    let SocketAddr::V4(a) = addr else {
        unreachable!()
    };
    let want = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(a.ip().octets()),
        a.port()
    );
    let skip: Vec<String> = except
        .iter()
        .map(|s| format!(":{:04X}", s.local_addr().unwrap().port()))
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let mut all = 0;
    let mut syn_sent = 0;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() > 3 && f[2] == want && !skip.iter().any(|p| f[1].ends_with(p.as_str())) {
            all += 1;
            if f[3] == "02" {
                syn_sent += 1;
            }
        }
    }
    (all, syn_sent)
}

//! The HBONE client's connection pool against real TLS peers on 127.0.0.1:
//! reuse, the per-connection stream limit, GOAWAY, idle eviction and one
//! dial per key.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use shunt_agent::hbone::{ClientSettings, HboneClient, HboneServer, ServerSettings, Tunnel};
use shunt_agent::identity::{IdentityManager, SpiffeId};
use shunt_testbed::hbone::*;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

/// A waypoint that counts the TCP connections it accepted and how many of
/// them are still open.
struct CountingWaypoint {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    open: Arc<AtomicUsize>,
}

async fn counting_waypoint(ids: &IdentityManager, identity: &SpiffeId) -> CountingWaypoint {
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let server = Arc::new(HboneServer::new(
        ids.server_config(identity).unwrap(),
        ServerSettings::default(),
    ));
    let accepted = Arc::new(AtomicUsize::new(0));
    let open = Arc::new(AtomicUsize::new(0));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((tcp, peer)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let (server, handler, o) = (server.clone(), handler.clone(), o.clone());
            tokio::spawn(async move {
                let _ = server.serve_connection(tcp, peer, handler).await;
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    CountingWaypoint {
        addr,
        accepted,
        open,
    }
}

/// A tunnel being relayed for a local socket pair.
struct Open {
    conn: u64,
    app: TcpStream,
    relay: tokio::task::JoinHandle<shunt_agent::hbone::RelayStats>,
}

async fn open(t: Tunnel) -> Open {
    let conn = t.connection_id();
    let (app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { t.relay(&mut agent_side).await });
    Open { conn, app, relay }
}

impl Open {
    async fn echoes(&mut self, msg: &str) {
        assert_eq!(
            roundtrip(&mut self.app, msg.as_bytes()).await,
            msg.as_bytes()
        );
    }
    async fn close(mut self) {
        use tokio::io::AsyncWriteExt;
        self.app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        self.app.read_to_end(&mut rest).await.unwrap();
        let stats = self.relay.await.unwrap();
        assert!(stats.error.is_none(), "{:?}", stats.error);
    }
}

async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_reuse_one_connection_until_it_holds_the_stream_limit() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let w = counting_waypoint(&mesh.ids, &wp).await;
    let client = client(&mesh.ids);
    let req = request(&src, w.addr, &wp);

    // One after another: always the same connection.
    let first = open(client.connect(&req).await.unwrap()).await;
    let conn = first.conn;
    first.close().await;
    for _ in 0..3 {
        let t = client.connect(&req).await.unwrap();
        assert_eq!(
            t.connection_id(),
            conn,
            "a finished tunnel's connection is reused"
        );
    }
    // 100 at once fit on it; the 101st needs another.
    let mut held = Vec::new();
    for _ in 0..100 {
        held.push(client.connect(&req).await.unwrap());
    }
    assert!(held.iter().all(|t| t.connection_id() == conn));
    assert_eq!(client.connections_opened(), 1);
    let mut extra = open(client.connect(&req).await.unwrap()).await;
    assert_ne!(
        extra.conn, conn,
        "the 101st stream goes to a second connection"
    );
    extra.echoes("on the second connection").await;
    assert_eq!(client.connections_opened(), 2);
    assert_eq!(w.accepted.load(Ordering::SeqCst), 2);
    // A freed slot on the first connection is used again before dialing.
    held.pop();
    let t = client.connect(&req).await.unwrap();
    assert!([conn, extra.conn].contains(&t.connection_id()));
    assert_eq!(client.connections_opened(), 2);
    extra.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_first_tunnels_for_one_key_dial_one_connection() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let w = counting_waypoint(&mesh.ids, &wp).await;
    let client = Arc::new(client(&mesh.ids));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (client, req) = (client.clone(), request(&src, w.addr, &wp));
        tasks.push(tokio::spawn(
            async move { client.connect(&req).await.unwrap() },
        ));
    }
    let tunnels: Vec<Tunnel> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|t| t.unwrap())
        .collect();
    assert_eq!(tunnels.len(), 50);
    assert_eq!(
        w.accepted.load(Ordering::SeqCst),
        1,
        "one TCP connection for 50 callers"
    );
    assert_eq!(client.connections_opened(), 1);
    // Another source address is another key, so another connection.
    let mut other = request(&src, w.addr, &wp);
    other.source_addr = "10.1.2.4:5000".parse().unwrap();
    let t = client.connect(&other).await.unwrap();
    assert_ne!(t.connection_id(), tunnels[0].connection_id());
    assert_eq!(client.pool_keys(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_of_an_unreachable_waypoint_all_fail_and_its_key_is_dropped() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    // A port nobody listens on: the connect is refused at once.
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    };
    let client = Arc::new(client(&mesh.ids));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (client, req) = (client.clone(), request(&src, dead, &wp));
        tasks.push(tokio::spawn(async move { client.connect(&req).await }));
    }
    for t in futures::future::join_all(tasks).await {
        let err = t.unwrap().err().expect("no waypoint, no tunnel");
        assert!(err.to_string().contains("connecting to"), "{err}");
    }
    assert_eq!(client.connections_opened(), 0);
    assert_eq!(
        client.pool_keys(),
        0,
        "a key without connections is not kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_and_its_key_evicted_but_a_busy_one_stays() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let w = counting_waypoint(&mesh.ids, &wp).await;
    let client = HboneClient::new(
        mesh.ids.clone(),
        ClientSettings {
            idle_timeout: Duration::from_millis(300),
            ..ClientSettings::default()
        },
    );
    let req = request(&src, w.addr, &wp);

    // A tunnel open for longer than the idle timeout keeps its connection.
    let mut t = open(client.connect(&req).await.unwrap()).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    t.echoes("still here").await;
    assert_eq!((client.pooled_connections(), client.pool_keys()), (1, 1));
    assert_eq!(w.open.load(Ordering::SeqCst), 1);
    t.close().await;

    // Without tunnels, it goes after the idle timeout, and the key with it.
    eventually("idle connection closed", || client.pool_keys() == 0).await;
    assert_eq!(client.pooled_connections(), 0);
    eventually("waypoint saw the close", || {
        w.open.load(Ordering::SeqCst) == 0
    })
    .await;
    // The next tunnel dials afresh.
    let mut t = open(client.connect(&req).await.unwrap()).await;
    t.echoes("new connection").await;
    assert_eq!(client.connections_opened(), 2);
    assert_eq!(w.accepted.load(Ordering::SeqCst), 2);
    t.close().await;
}

/// An HBONE peer that echoes each CONNECT stream and sends GOAWAY (a
/// graceful shutdown: open streams finish) when `goaway` is notified.
async fn goaway_waypoint(ids: &IdentityManager, identity: &SpiffeId) -> (SocketAddr, Arc<Notify>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let tls = tokio_rustls::TlsAcceptor::from(ids.server_config(identity).unwrap());
    let goaway = Arc::new(Notify::new());
    let g = goaway.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let (tls, goaway) = (tls.clone(), g.clone());
            tokio::spawn(async move {
                let tls = tls.accept(tcp).await.unwrap();
                let mut conn = h2::server::handshake(tls).await.unwrap();
                let mut shut = false;
                loop {
                    tokio::select! {
                        next = conn.accept() => match next {
                            Some(Ok((req, respond))) => { tokio::spawn(echo_stream(req, respond)); }
                            _ => return,
                        },
                        () = goaway.notified(), if !shut => { conn.graceful_shutdown(); shut = true; }
                    }
                }
            });
        }
    });
    (addr, goaway)
}

async fn echo_stream(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
) -> Result<(), h2::Error> {
    let mut send = respond.send_response(http::Response::new(()), false)?;
    let mut body = req.into_body();
    while let Some(d) = body.data().await {
        let d = d?;
        let _ = body.flow_control().release_capacity(d.len());
        send.send_data(d, false)?;
    }
    send.send_data(Bytes::new(), true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_goaway_new_tunnels_use_a_new_connection_while_open_ones_finish() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let (addr, goaway) = goaway_waypoint(&mesh.ids, &wp).await;
    let client = client(&mesh.ids);
    let req = request(&src, addr, &wp);

    let mut old = open(client.connect(&req).await.unwrap()).await;
    old.echoes("before GOAWAY").await;
    goaway.notify_one();
    // Let the client read the GOAWAY.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut new = open(client.connect(&req).await.unwrap()).await;
    assert_ne!(
        new.conn, old.conn,
        "a connection that sent GOAWAY takes no new stream"
    );
    assert_eq!(client.connections_opened(), 2);
    new.echoes("after GOAWAY").await;
    old.echoes("the old tunnel still works").await;
    old.close().await;
    let new_conn = new.conn;
    new.close().await;
    // More tunnels keep going to the new connection.
    let again = client.connect(&req).await.unwrap();
    assert_eq!(again.connection_id(), new_conn);
}

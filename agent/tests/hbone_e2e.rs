//! HBONE client → server → upstream over real TLS on 127.0.0.1.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use sha2::{Digest, Sha256};
use shunt_agent::hbone::HboneError;
use shunt_agent::identity::IdentityConfig;
use shunt_testbed::hbone::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[tokio::test]
async fn hbone_bytes_both_ways_identities_and_headers() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    let client = client(&mesh.ids);

    let tunnel = client.connect(&request(&src, addr, &wp)).await.unwrap();
    assert_eq!(
        tunnel.peer_identity(),
        &wp,
        "client sees the waypoint's identity"
    );
    let (mut app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });

    assert_eq!(
        roundtrip(&mut app, b"hello through the mesh").await,
        b"hello through the mesh"
    );
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let stats = relay.await.unwrap();
    assert!(stats.error.is_none(), "{:?}", stats.error);
    assert_eq!((stats.bytes_sent, stats.bytes_received), (22, 22));

    let seen = handler.seen();
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.peer_identity, src, "server sees the client's identity");
    assert_eq!(r.authority, "240.240.0.2:80".parse().unwrap());
    assert_eq!(r.source_addr, "10.1.2.3:45678".parse().unwrap());
    assert_eq!(r.forwarded_host.as_deref(), Some("httpbin.org"));
    assert!(r.headers.get("traceparent").is_some());
    // The waypoint's relay finished cleanly too.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handler.completed.lock().unwrap().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        handler.completed.lock().unwrap().as_slice(),
        &[(22, 22, true)]
    );
}

/// An upstream that reads to EOF, then answers with the SHA-256 of what it
/// got and the byte count, then closes: only works if half-close passes.
async fn digest_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut h = Sha256::new();
                let mut n = 0u64;
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let k = s.read(&mut buf).await.unwrap();
                    if k == 0 {
                        break;
                    }
                    n += k as u64;
                    h.update(&buf[..k]);
                }
                let out = format!("{:x} {n}", h.finalize());
                s.write_all(out.as_bytes()).await.unwrap();
                s.shutdown().await.unwrap();
            });
        }
    });
    addr
}

async fn send_and_digest(total: u64) {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let handler = TestHandler::new(digest_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    let client = client(&mesh.ids);
    let tunnel = client.connect(&request(&src, addr, &wp)).await.unwrap();
    let (app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    let (mut rd, mut wr) = app.into_split();

    let writer = tokio::spawn(async move {
        let mut h = Sha256::new();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut chunk = vec![0u8; 1 << 20];
        let mut left = total;
        while left > 0 {
            for w in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
            }
            let k = left.min(chunk.len() as u64) as usize;
            h.update(&chunk[..k]);
            wr.write_all(&chunk[..k]).await.unwrap();
            left -= k as u64;
        }
        wr.shutdown().await.unwrap(); // half-close: the reply comes after this
        format!("{:x} {total}", h.finalize())
    });
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(300), rd.read_to_string(&mut reply))
        .await
        .unwrap()
        .unwrap();
    let expect = writer.await.unwrap();
    assert_eq!(reply, expect, "upstream saw exactly what the app sent");
    let stats = relay.await.unwrap();
    assert!(stats.error.is_none(), "{:?}", stats.error);
    assert_eq!(stats.bytes_sent, total);
    assert_eq!(stats.bytes_received, expect.len() as u64);
}

#[tokio::test]
async fn hbone_half_close_reply_after_eof() {
    send_and_digest(100_000).await;
}

/// 1 GiB in release builds (about 8 s here); 128 MiB in debug builds, where
/// unoptimised TLS, h2 and SHA-256 would make 1 GiB take minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_one_gib_checksum() {
    send_and_digest(if cfg!(debug_assertions) {
        128 << 20
    } else {
        1 << 30
    })
    .await;
}

#[tokio::test]
async fn hbone_client_from_other_trust_domain_refused() {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    // Same root CA, so only the trust-domain check can refuse it.
    let other = mesh.other_domain("evil.local");
    let client = client(&other);
    let src = id("spiffe://evil.local/ns/default/sa/sleep");
    let err = client
        .connect(&request(&src, addr, &wp))
        .await
        .err()
        .expect("must be refused");
    assert!(
        matches!(err, HboneError::Tls(..) | HboneError::H2(_)),
        "{err}"
    );
    assert!(handler.seen().is_empty(), "handler never called");
}

#[tokio::test]
async fn hbone_unexpected_server_identity_refused() {
    let mesh = Mesh::new("cluster.local");
    let impostor = id("spiffe://cluster.local/ns/default/sa/not-the-gateway");
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &impostor, handler.clone()).await;
    let client = client(&mesh.ids);
    let err = client
        .connect(&request(&id(SRC), addr, &id(WAYPOINT)))
        .await
        .err()
        .expect("must be refused");
    match &err {
        HboneError::Tls(_, e) => assert!(e.to_string().contains("not the expected"), "{e}"),
        other => panic!("want a TLS error, got {other}"),
    }
    assert!(handler.seen().is_empty());
}

/// A CONNECT from [`SRC`] through a waypoint whose handler is `handler`:
/// the error the client gets.
async fn refused(handler: std::sync::Arc<TestHandler>) -> HboneError {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let addr = start_waypoint(&mesh.ids, &wp, handler).await;
    client(&mesh.ids)
        .connect(&request(&id(SRC), addr, &wp))
        .await
        .err()
        .unwrap()
}

#[tokio::test]
async fn hbone_handler_503_reaches_client() {
    let handler = TestHandler::new(echo_upstream().await, Mode::Refuse(503));
    let err = refused(handler).await;
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");
}

#[tokio::test]
async fn hbone_upstream_down_is_503() {
    // A port with nothing listening.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let err = refused(TestHandler::new(dead, Mode::Forward)).await;
    assert_eq!(err.status(), Some(StatusCode::SERVICE_UNAVAILABLE), "{err}");
}

#[tokio::test]
async fn hbone_bad_authority_and_non_connect_are_400() {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    // A raw h2 client, so the requests can be malformed.
    let cfg = mesh.ids.client_config(&id(SRC), vec![wp.clone()]).unwrap();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            tcp,
        )
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let cases = [
        Request::builder()
            .method(Method::CONNECT)
            .uri("httpbin.org:80")
            .body(())
            .unwrap(),
        Request::builder()
            .method(Method::CONNECT)
            .uri("240.240.0.2")
            .body(())
            .unwrap(),
        Request::builder()
            .method(Method::GET)
            .uri("https://240.240.0.2:80/")
            .body(())
            .unwrap(),
        Request::builder()
            .method(Method::CONNECT)
            .uri("240.240.0.2:80")
            .header("forwarded", "for=\"not-an-address\"")
            .body(())
            .unwrap(),
    ];
    for req in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let mut s = send.clone().ready().await.unwrap();
        let (resp, _) = s.send_request(req, false).unwrap();
        let resp = resp.await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{what}");
    }
    assert!(handler.seen().is_empty());
    // And a good one on the same connection still works.
    let mut s = send.clone().ready().await.unwrap();
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("240.240.0.2:80")
        .body(())
        .unwrap();
    let (resp, mut body_tx) = s.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    body_tx
        .send_data(Bytes::from_static(b"ping"), true)
        .unwrap();
    let mut body = resp.into_body();
    let got = body.data().await.unwrap().unwrap();
    assert_eq!(&got[..], b"ping");
    // No Forwarded header: the source is the TCP peer.
    assert_eq!(handler.seen()[0].source_addr.ip(), addr.ip());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_200_concurrent_connects_share_pooled_connections() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    let client = std::sync::Arc::new(client(&mesh.ids));
    let mut tasks = Vec::new();
    for i in 0..200u32 {
        let client = client.clone();
        let req = request(&src, addr, &wp);
        tasks.push(tokio::spawn(async move {
            let t = client.connect(&req).await.unwrap();
            let conn = t.connection_id();
            let (mut app, mut agent_side) = socket_pair().await;
            let relay = tokio::spawn(async move { t.relay(&mut agent_side).await });
            let msg = format!("tunnel {i}");
            assert_eq!(roundtrip(&mut app, msg.as_bytes()).await, msg.as_bytes());
            (conn, app, relay)
        }));
    }
    // Every tunnel stays open until all 200 are up.
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    let mut conns: Vec<u64> = open.iter().map(|(c, _, _)| *c).collect();
    conns.sort();
    conns.dedup();
    assert_eq!(
        client.connections_opened(),
        2,
        "200 streams at 100 per connection"
    );
    assert_eq!(conns.len(), 2);
    for (_, mut app, relay) in open {
        app.shutdown().await.unwrap();
        let mut rest = Vec::new();
        app.read_to_end(&mut rest).await.unwrap();
        assert!(relay.await.unwrap().error.is_none());
    }
    // Released slots are reused: no new connection for the next tunnel.
    let t = client.connect(&request(&src, addr, &wp)).await.unwrap();
    assert!(conns.contains(&t.connection_id()));
    assert_eq!(client.connections_opened(), 2);
}

#[tokio::test]
async fn hbone_cert_renewal_keeps_open_tunnel() {
    let cfg = IdentityConfig {
        lifetime: Duration::from_secs(3),
        renew_fraction: 0.5,
    };
    let mesh = Mesh::with_config("cluster.local", cfg);
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler).await;
    let client1 = client(&mesh.ids);
    let tunnel = client1.connect(&request(&src, addr, &wp)).await.unwrap();
    let (mut app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    assert_eq!(roundtrip(&mut app, b"before").await, b"before");

    let slot = mesh.ids.fetch(&src).unwrap();
    let first = slot.current();
    let first_expiry = first.issued.not_after;
    // Wait until both certificates were renewed and the first has expired.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (slot.renewals() < 2 || std::time::SystemTime::now() <= first_expiry)
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(slot.renewals() >= 2, "renewed in the background");
    assert!(std::time::SystemTime::now() > first_expiry);
    assert_ne!(slot.current().issued.chain[0], first.issued.chain[0]);

    // The established tunnel keeps working past the old cert's expiry.
    assert_eq!(
        roundtrip(&mut app, b"after renewal").await,
        b"after renewal"
    );
    // A new connection handshakes with the renewed certificates (both sides).
    let client2 = client(&mesh.ids);
    let t2 = client2
        .connect(&request(&src, addr, &wp))
        .await
        .expect("renewed certs are served");
    assert_eq!(t2.peer_identity(), &wp);
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(relay.await.unwrap().error.is_none());
}

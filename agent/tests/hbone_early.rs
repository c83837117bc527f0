//! What a client says first travels with the CONNECT: the agent does not
//! wait for the 200 before forwarding the first read (a new HTTP
//! connection saves the round trip to the waypoint), and what it sent
//! early is counted and arrives once, in order. Real sockets, TLS and h2
//! on 127.0.0.1; the server is a raw h2 server that answers only once
//! it has the first DATA frame, so a client that waits for the 200 first
//! gets no answer.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use shunt_testbed::hbone::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Accepts one HBONE connection; per CONNECT it waits (at most 5 s) for
/// the first DATA frame, answers 200 only if it came, and echoes.
async fn data_first_server(mesh: &Mesh) -> SocketAddr {
    let tls = mesh.ids.server_config(&id(WAYPOINT)).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let mut body = req.into_body();
                let first = tokio::time::timeout(Duration::from_secs(5), body.data()).await;
                let Ok(Some(Ok(first))) = first else {
                    let r = http::Response::builder().status(408).body(()).unwrap();
                    let _ = respond.send_response(r, true);
                    return;
                };
                let _ = body.flow_control().release_capacity(first.len());
                let r = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(r, false).unwrap();
                send.send_data(first, false).unwrap();
                while let Some(Ok(d)) = body.data().await {
                    let _ = body.flow_control().release_capacity(d.len());
                    send.send_data(d, false).unwrap();
                }
                let _ = send.send_data(Bytes::new(), true);
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_bytes_of_a_client_go_with_the_connect_not_after_the_200() {
    let mesh = Mesh::new("cluster.local");
    let addr = data_first_server(&mesh).await;
    let client = client(&mesh.ids);
    let (mut app, mut agent_side) = socket_pair().await;
    let head = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    app.write_all(head).await.unwrap();
    let tunnel = tokio::time::timeout(
        Duration::from_secs(20),
        client.connect_early(&request(&id(SRC), addr, &id(WAYPOINT)), &mut agent_side),
    )
    .await
    .expect("no answer to the CONNECT")
    .expect("the server refused: the first bytes did not come before its 200");
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    // Echoed once and in order: the early bytes, then what follows.
    let mut got = vec![0u8; head.len()];
    app.read_exact(&mut got).await.unwrap();
    assert_eq!(got, head);
    app.write_all(b"more").await.unwrap();
    let mut more = [0u8; 4];
    app.read_exact(&mut more).await.unwrap();
    assert_eq!(&more, b"more");
    app.shutdown().await.unwrap();
    let mut rest = Vec::new();
    app.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty(), "echoed twice: {rest:?}");
    let stats = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .expect("the relay did not end")
        .unwrap();
    assert_eq!(
        stats.bytes_sent,
        (head.len() + 4) as u64,
        "early bytes counted"
    );
    assert_eq!(stats.bytes_received, (head.len() + 4) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_the_server_to_speak_still_gets_its_tunnel() {
    // The waypoint's ordinary handler answers 200 without waiting for
    // data: a server-first protocol's client sends nothing early, and the
    // early read gives way to the answer.
    let mesh = Mesh::new("cluster.local");
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &id(WAYPOINT), handler).await;
    let client = client(&mesh.ids);
    let (mut app, mut agent_side) = socket_pair().await;
    let tunnel = tokio::time::timeout(
        Duration::from_secs(20),
        client.connect_early(&request(&id(SRC), addr, &id(WAYPOINT)), &mut agent_side),
    )
    .await
    .expect("the early read held the tunnel back")
    .unwrap();
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    assert_eq!(roundtrip(&mut app, b"hello").await, b"hello");
    drop(app);
    let _ = tokio::time::timeout(Duration::from_secs(10), relay).await;
}

//! Side-by-side loopback measurement: app → agent socket → HBONE client →
//! HBONE server → upstream, versus app → upstream directly.
//! Run: cargo test --release -p shunt-agent --test hbone_bench -- --ignored --nocapture

mod hbone_support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hbone_support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BYTES: u64 = 2 << 30;
const RTTS: u32 = 5000;
const CONNS: u32 = 2000;

/// Reads to EOF and replies with the byte count; or, after a first byte
/// 'e', echoes.
async fn sink_or_echo() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1 << 20];
                let mut n = 0u64;
                let mut echo = None;
                loop {
                    let k = match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(k) => k,
                    };
                    if echo.is_none() {
                        echo = Some(buf[0] == b'e');
                    }
                    if echo == Some(true) {
                        if s.write_all(&buf[..k]).await.is_err() {
                            return;
                        }
                    } else {
                        n += k as u64;
                    }
                }
                let _ = s.write_all(n.to_string().as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

async fn throughput(mut s: TcpStream) -> f64 {
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut left = BYTES;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
    s.shutdown().await.unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(reply, BYTES.to_string());
    BYTES as f64 * 8.0 / secs / 1e9
}

async fn rtt(mut s: TcpStream) -> Duration {
    let mut b = [b'e'];
    s.write_all(&b).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
    let start = Instant::now();
    for _ in 0..RTTS {
        s.write_all(&b).await.unwrap();
        s.read_exact(&mut b).await.unwrap();
    }
    start.elapsed() / RTTS
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with --release -- --ignored --nocapture"]
async fn hbone_bench_vs_direct() {
    let mesh = Mesh::new("cluster.local");
    let (src, wp) = (id(SRC), id(WAYPOINT));
    let upstream = sink_or_echo().await;
    let handler = TestHandler::new(upstream, Mode::Forward);
    let waypoint = start_waypoint(&mesh.ids, &wp, handler).await;
    let client = Arc::new(client(&mesh.ids));

    // The agent's capture side: each accepted socket gets a tunnel.
    let agent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_addr = agent.local_addr().unwrap();
    let c2 = client.clone();
    let (src2, wp2) = (src.clone(), wp.clone());
    tokio::spawn(async move {
        loop {
            let (mut s, peer) = agent.accept().await.unwrap();
            let _ = s.set_nodelay(true);
            let client = c2.clone();
            let mut req = request(&src2, waypoint, &wp2);
            req.source_addr = peer;
            tokio::spawn(async move {
                let t = client.connect(&req).await.unwrap();
                t.relay(&mut s).await;
            });
        }
    });
    let dial = |a: SocketAddr| async move {
        let s = TcpStream::connect(a).await.unwrap();
        s.set_nodelay(true).unwrap();
        s
    };

    let direct_tp = throughput(dial(upstream).await).await;
    let hbone_tp = throughput(dial(agent_addr).await).await;
    let direct_rtt = rtt(dial(upstream).await).await;
    let hbone_rtt = rtt(dial(agent_addr).await).await;

    let conn_rate = |a: SocketAddr| async move {
        let start = Instant::now();
        for _ in 0..CONNS {
            let mut s = TcpStream::connect(a).await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut b = [b'e'];
            s.write_all(&b).await.unwrap();
            s.read_exact(&mut b).await.unwrap();
        }
        CONNS as f64 / start.elapsed().as_secs_f64()
    };
    let direct_cps = conn_rate(upstream).await;
    let hbone_cps = conn_rate(agent_addr).await;

    println!(
        "\n== HBONE loopback benchmark (release={}, {} GiB per throughput run) ==",
        !cfg!(debug_assertions),
        BYTES >> 30
    );
    println!("{:<34} {:>12} {:>12} {:>8}", "", "direct", "hbone", "ratio");
    println!(
        "{:<34} {:>12.2} {:>12.2} {:>7.2}x",
        "single-stream throughput (Gbit/s)",
        direct_tp,
        hbone_tp,
        hbone_tp / direct_tp
    );
    println!(
        "{:<34} {:>12.1} {:>12.1} {:>+8.1}",
        "round trip, 1 byte (µs)",
        direct_rtt.as_secs_f64() * 1e6,
        hbone_rtt.as_secs_f64() * 1e6,
        (hbone_rtt.as_secs_f64() - direct_rtt.as_secs_f64()) * 1e6
    );
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>7.2}x",
        "new connections/s (+1 B echo)",
        direct_cps,
        hbone_cps,
        hbone_cps / direct_cps
    );
    println!(
        "HTTP/2 connections opened by the client: {}",
        client.connections_opened()
    );
}

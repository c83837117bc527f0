//! The per-connection cost of reading the ClientHello's SNI at the
//! waypoint, against a plain TCP relay of the same first bytes:
//!
//! - `plain_relay`: the tunnel side reads what the client sent (one read)
//!   and writes it to the upstream, as a TCP port's relay starts.
//! - `sni_peek_relay`: `waypoint::sni::read_client_hello` (bounded peek with
//!   its deadline, full ClientHello parse) and the replay of those bytes to
//!   the upstream, as a TLS port's relay starts.
//!
//! Both over real loopback TCP sockets with a ClientHello as rustls sends
//! it (SNI `api.example.com`); the difference is the SNI peek's added
//! latency per connection.
//!
//! `cargo bench -p shunt-agent --bench sni`

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use shunt_agent::waypoint::sni::{read_client_hello, CLIENT_HELLO_TIMEOUT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

fn client_hello(name: &str) -> Vec<u8> {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("hello");
    out
}

/// A connected pair of loopback sockets.
async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let (a, b) = tokio::join!(TcpStream::connect(l.local_addr().unwrap()), l.accept());
    (a.expect("connect"), b.expect("accept").0)
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::new().expect("runtime");
    let hello = client_hello("api.example.com");
    let (mut client, mut tunnel, mut up_w, mut up_r) = rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (client, tunnel) = pair(&l).await;
        let (up_w, up_r) = pair(&l).await;
        for s in [&client, &tunnel, &up_w, &up_r] {
            s.set_nodelay(true).unwrap();
        }
        (client, tunnel, up_w, up_r)
    });
    let mut sink = vec![0u8; 64 * 1024];
    let mut g = c.benchmark_group("first_bytes");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("plain_relay", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&hello).await.unwrap();
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = 0;
                while got < hello.len() {
                    got += tunnel.read(&mut buf[got..]).await.unwrap();
                }
                up_w.write_all(&buf[..got]).await.unwrap();
                let mut seen = 0;
                while seen < got {
                    seen += up_r.read(&mut sink).await.unwrap();
                }
            })
        })
    });
    g.bench_function("sni_peek_relay", |b| {
        b.iter(|| {
            rt.block_on(async {
                client.write_all(&hello).await.unwrap();
                let (buf, sni) = read_client_hello(&mut tunnel, CLIENT_HELLO_TIMEOUT)
                    .await
                    .unwrap();
                assert_eq!(sni.as_deref(), Some("api.example.com"));
                up_w.write_all(&buf).await.unwrap();
                let mut seen = 0;
                while seen < buf.len() {
                    seen += up_r.read(&mut sink).await.unwrap();
                }
            })
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);

//! DNS proxy over UDP on loopback: a ServiceEntry host answered from the
//! host table, side by side with the same query forwarded to a local
//! upstream. Prints P50/P99 latency and queries/s (sequential and with 16
//! concurrent clients), then runs the same two queries under criterion.
//!
//! `cargo bench -p shunt-agent --bench dns`

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hickory_proto::op::{Edns, Message, OpCode, Query};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use shunt_agent::dns::{DnsConfig, DnsProxy, HostTable};
use shunt_agent::telemetry::Metrics;

/// A minimal authoritative upstream: every A query → 192.0.2.1.
async fn upstream(sock: tokio::net::UdpSocket) {
    let mut buf = vec![0u8; 4096];
    loop {
        let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
            continue;
        };
        let Ok(req) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut resp = Message::response(req.id, OpCode::Query);
        resp.metadata.authoritative = true;
        resp.add_queries(req.queries.iter().cloned());
        if let Some(q) = req.queries.first() {
            resp.add_answer(Record::from_rdata(
                q.name().clone(),
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
        }
        if req.edns.is_some() {
            resp.set_edns(Edns::new());
        }
        let _ = sock.send_to(&resp.to_vec().unwrap(), peer).await;
    }
}

fn query(name: &str) -> Vec<u8> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let mut e = Edns::new();
    e.set_max_payload(1232);
    m.set_edns(e);
    m.to_vec().unwrap()
}

fn client(proxy: SocketAddr) -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.connect(proxy).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn exchange(s: &UdpSocket, q: &[u8], buf: &mut [u8]) -> Duration {
    let t = Instant::now();
    s.send(q).unwrap();
    let n = s.recv(buf).expect("answer");
    let d = t.elapsed();
    assert!(n > 12 && buf[3] & 0x0f == 0, "NOERROR answer expected");
    d
}

struct Report {
    p50: Duration,
    p99: Duration,
    seq_qps: f64,
    conc_qps: f64,
}

fn measure(proxy: SocketAddr, q: &[u8]) -> Report {
    let s = client(proxy);
    let mut buf = [0u8; 2048];
    for _ in 0..2000 {
        exchange(&s, q, &mut buf);
    }
    let n = 20_000;
    let mut lat = Vec::with_capacity(n);
    let start = Instant::now();
    for _ in 0..n {
        lat.push(exchange(&s, q, &mut buf));
    }
    let seq_qps = n as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let p50 = lat[n / 2];
    let p99 = lat[n * 99 / 100];

    // 16 clients, each one query in flight, for 2 s.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let (stop, count, q) = (stop.clone(), count.clone(), q.to_vec());
            std::thread::spawn(move || {
                let s = client(proxy);
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    exchange(&s, &q, &mut buf);
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let conc_qps = count.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    Report {
        p50,
        p99,
        seq_qps,
        conc_qps,
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (proxy, _guard) = rt.block_on(async {
        let up = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(upstream(up));
        let hosts = HostTable::from_entries([(
            "httpbin.org",
            vec![Ipv4Addr::new(240, 240, 0, 4)],
            vec!["2001:2::4".parse().unwrap()],
        )])
        .unwrap()
        .into_shared();
        let metrics = Metrics::builder().build();
        let cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], vec![up_addr]);
        let proxy = DnsProxy::start(cfg, hosts, metrics.dns()).await.unwrap();
        (proxy.local_addrs()[0], proxy)
    });

    let local_q = query("httpbin.org.");
    let fwd_q = query("forwarded.example.");
    let local = measure(proxy, &local_q);
    let fwd = measure(proxy, &fwd_q);
    println!("\nDNS proxy, UDP on loopback (2 tokio workers)");
    println!(
        "{:<28} {:>10} {:>10} {:>14} {:>16}",
        "query", "P50", "P99", "seq q/s", "16 clients q/s"
    );
    for (name, r) in [
        ("ServiceEntry host (local)", &local),
        ("forwarded to upstream", &fwd),
    ] {
        println!(
            "{:<28} {:>8.1}µs {:>8.1}µs {:>14.0} {:>16.0}",
            name,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.seq_qps,
            r.conc_qps
        );
    }
    println!();

    let mut c = Criterion::default().configure_from_args();
    let s = client(proxy);
    let mut buf = [0u8; 2048];
    c.bench_function("dns_udp_service_entry", |b| {
        b.iter(|| exchange(&s, &local_q, &mut buf))
    });
    c.bench_function("dns_udp_forwarded", |b| {
        b.iter(|| exchange(&s, &fwd_q, &mut buf))
    });
    c.final_summary();
}

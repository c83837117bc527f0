//! HBONE data path on loopback, side by side with direct TCP:
//! app → agent socket → `HboneClient` (mTLS HTTP/2 CONNECT) → `HboneServer`
//! → upstream, versus app → upstream.
//!
//! - `throughput`: one long-lived connection, N MiB per iteration into a sink
//!   that acknowledges each batch (`SHUNT_BENCH_MIB`, default 256).
//! - `rtt`: 1 byte request, 1 byte response over an established connection.
//! - `connect`: TCP connect + CONNECT (pool warm) + 1 byte echo + close.
//!
//! The agent and the waypoint each run on their own tokio runtime (2
//! workers, as separate processes would); the app and upstream share a third.
//! After criterion's output a table of hbone/direct ratios is printed.
//!
//! `cargo bench -p shunt-agent --bench hbone` (add `-- throughput` etc. to
//! filter).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use shunt_agent::hbone::HboneClient;
use shunt_testbed::hbone::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

/// Upstream: the first byte picks the mode. `e`: echo until EOF. `s`: sink,
/// repeatedly read an 8-byte big-endian length, swallow that many bytes and
/// answer one byte.
async fn upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = l.accept().await else { return };
            let _ = s.set_nodelay(true);
            tokio::spawn(serve_upstream(s));
        }
    });
    addr
}

async fn serve_upstream(mut s: TcpStream) -> std::io::Result<()> {
    let mut mode = [0u8];
    s.read_exact(&mut mode).await?;
    // Sized per mode: zeroing 1 MiB per echo connection would dominate the
    // connection benchmark.
    let mut buf = vec![0u8; if mode[0] == b'e' { 16 << 10 } else { 1 << 20 }];
    if mode[0] == b'e' {
        s.write_all(&mode).await?;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return s.shutdown().await;
            }
            s.write_all(&buf[..n]).await?;
        }
    }
    loop {
        let mut len = [0u8; 8];
        if s.read_exact(&mut len).await.is_err() {
            return Ok(());
        }
        let mut left = u64::from_be_bytes(len);
        while left > 0 {
            let k = (left as usize).min(buf.len());
            let n = s.read(&mut buf[..k]).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as u64;
        }
        s.write_all(b"k").await?;
    }
}

/// The agent's capture side: every accepted socket gets a tunnel.
async fn agent(client: Arc<HboneClient>, waypoint: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (src, wp) = (id(SRC), id(WAYPOINT));
    tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            let _ = s.set_nodelay(true);
            let client = client.clone();
            let mut req = request(&src, waypoint, &wp);
            req.source_addr = peer;
            tokio::spawn(async move {
                match client.connect(&req).await {
                    Ok(t) => {
                        t.relay(&mut s).await;
                    }
                    Err(e) => eprintln!("bench agent: connect failed: {e}"),
                }
            });
        }
    });
    addr
}

async fn dial(a: SocketAddr, mode: u8) -> TcpStream {
    let mut s = TcpStream::connect(a).await.unwrap();
    s.set_nodelay(true).unwrap();
    s.write_all(&[mode]).await.unwrap();
    if mode == b'e' {
        let mut b = [0u8];
        s.read_exact(&mut b).await.unwrap();
    }
    s
}

async fn push(s: &mut TcpStream, buf: &[u8], bytes: u64) {
    s.write_all(&bytes.to_be_bytes()).await.unwrap();
    let mut left = bytes;
    while left > 0 {
        let k = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..k]).await.unwrap();
        left -= k as u64;
    }
    let mut ack = [0u8];
    s.read_exact(&mut ack).await.unwrap();
}

async fn ping(s: &mut TcpStream) {
    let mut x = [7u8];
    s.write_all(&x).await.unwrap();
    s.read_exact(&mut x).await.unwrap();
}

async fn one_connection(a: SocketAddr) {
    let mut s = TcpStream::connect(a).await.unwrap();
    s.set_nodelay(true).unwrap();
    let mut b = *b"e";
    s.write_all(&b).await.unwrap();
    s.read_exact(&mut b).await.unwrap();
}

/// Per sample: (iterations, wall time, process CPU time), by (group, path).
type Samples = Arc<Mutex<HashMap<(String, String), Vec<(u64, Duration, Duration)>>>>;

/// CPU time of the whole process (all runtimes): on a machine shared with
/// other work, CPU per operation is steadier than wall time.
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall filling a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `work` (`iters` iterations) on `rt`, recording wall and CPU time.
fn measure<Fut: std::future::Future<Output = ()>>(
    rt: &Runtime,
    samples: &Samples,
    key: (&str, &str),
    iters: u64,
    work: Fut,
) -> Duration {
    let (wall, cpu) = rt.block_on(async {
        let c = cpu_now();
        let t = Instant::now();
        work.await;
        (t.elapsed(), cpu_now() - c)
    });
    samples
        .lock()
        .unwrap()
        .entry((key.0.into(), key.1.into()))
        .or_default()
        .push((iters, wall, cpu));
    wall
}

/// Median wall seconds per iteration over the last `n` samples (criterion's
/// measurement phase; earlier calls were warm-up), and mean CPU seconds per
/// iteration over the same samples.
fn per_iter(samples: &Samples, group: &str, path: &str, n: usize) -> Option<(f64, f64)> {
    let s = samples.lock().unwrap();
    let v = s.get(&(group.to_string(), path.to_string()))?;
    let v = &v[v.len().saturating_sub(n)..];
    let mut t: Vec<f64> = v
        .iter()
        .map(|(i, d, _)| d.as_secs_f64() / *i as f64)
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let iters: u64 = v.iter().map(|x| x.0).sum();
    let cpu: f64 = v.iter().map(|x| x.2.as_secs_f64()).sum();
    Some((*t.get(t.len() / 2)?, cpu / iters as f64))
}

fn runtime(name: &str) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// The `shunt` binary's allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let mib: u64 = std::env::var("SHUNT_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let bytes = mib << 20;

    let apps = runtime("apps");
    let agent_rt = runtime("agent");
    let waypoint_rt = runtime("waypoint");

    let mesh = agent_rt.block_on(async { Mesh::new("cluster.local") });
    let upstream_addr = apps.block_on(upstream());
    let waypoint_addr = waypoint_rt.block_on(async {
        let handler = TestHandler::new(upstream_addr, Mode::Forward);
        start_waypoint(&mesh.ids, &id(WAYPOINT), handler).await
    });
    let client = Arc::new(client(&mesh.ids));
    let agent_addr = agent_rt.block_on(agent(client.clone(), waypoint_addr));
    // Warm the pool (TLS + HTTP/2 handshakes happen once).
    apps.block_on(one_connection(agent_addr));

    let paths = [("direct", upstream_addr), ("hbone", agent_addr)];
    let samples: Samples = Arc::default();
    let mut c = Criterion::default().configure_from_args();

    let tp_samples = 10;
    {
        let mut g = c.benchmark_group("throughput");
        g.throughput(Throughput::Bytes(bytes))
            .sample_size(tp_samples)
            .sampling_mode(SamplingMode::Flat)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
        for (path, addr) in paths {
            let mut s = apps.block_on(dial(addr, b's'));
            let buf = vec![0x5au8; 1 << 20];
            g.bench_function(BenchmarkId::new("single_stream", path), |b| {
                b.iter_custom(|iters| {
                    let work = async {
                        for _ in 0..iters {
                            push(&mut s, &buf, bytes).await;
                        }
                    };
                    measure(&apps, &samples, ("throughput", path), iters, work)
                })
            });
        }
        g.finish();
    }

    let small_samples = 30;
    {
        let mut g = c.benchmark_group("rtt");
        g.sample_size(small_samples)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        for (path, addr) in paths {
            let mut s = apps.block_on(dial(addr, b'e'));
            g.bench_function(BenchmarkId::new("1_byte", path), |b| {
                b.iter_custom(|iters| {
                    let work = async {
                        for _ in 0..iters {
                            ping(&mut s).await;
                        }
                    };
                    measure(&apps, &samples, ("rtt", path), iters, work)
                })
            });
        }
        g.finish();
    }

    {
        let mut g = c.benchmark_group("connect");
        g.throughput(Throughput::Elements(1))
            .sample_size(small_samples)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        for (path, addr) in paths {
            g.bench_function(BenchmarkId::new("echo_1_byte_close", path), |b| {
                b.iter_custom(|iters| {
                    let work = async {
                        for _ in 0..iters {
                            one_connection(addr).await;
                        }
                    };
                    measure(&apps, &samples, ("connect", path), iters, work)
                })
            });
        }
        g.finish();
    }

    let get = |g: &str, p: &str, n: usize| per_iter(&samples, g, p, n);
    println!("\nHBONE vs direct TCP on loopback (wall: median of measured samples; CPU: whole process, all threads)");
    println!(
        "{:<34} {:>10} {:>10} {:>9} | {:>10} {:>10} {:>9}",
        "", "direct", "hbone", "hbone/dir", "CPU dir", "CPU hbone", "ratio"
    );
    // name, direct, hbone, hbone/direct (>1 is better for rates), CPU direct,
    // CPU hbone.
    let row = |name: &str, d: f64, h: f64, ratio: f64, cd: f64, ch: f64| {
        println!(
            "{name:<34} {d:>10.2} {h:>10.2} {ratio:>8.2}x | {cd:>10.2} {ch:>10.2} {:>8.2}x",
            ch / cd
        );
    };
    if let (Some(d), Some(h)) = (
        get("throughput", "direct", tp_samples),
        get("throughput", "hbone", tp_samples),
    ) {
        let gbit = |t: f64| bytes as f64 * 8.0 / t / 1e9;
        let ms_per_gib = |c: f64| c * 1e3 * (1u64 << 30) as f64 / bytes as f64;
        row(
            "throughput Gbit/s | CPU ms/GiB",
            gbit(d.0),
            gbit(h.0),
            d.0 / h.0,
            ms_per_gib(d.1),
            ms_per_gib(h.1),
        );
    }
    if let (Some(d), Some(h)) = (
        get("rtt", "direct", small_samples),
        get("rtt", "hbone", small_samples),
    ) {
        row(
            "1 B round trip µs | CPU µs",
            d.0 * 1e6,
            h.0 * 1e6,
            h.0 / d.0,
            d.1 * 1e6,
            h.1 * 1e6,
        );
        println!(
            "{:<34} {:>+10.1} µs",
            "  added round-trip latency",
            (h.0 - d.0) * 1e6
        );
    }
    if let (Some(d), Some(h)) = (
        get("connect", "direct", small_samples),
        get("connect", "hbone", small_samples),
    ) {
        row(
            "new conn/s | CPU µs per conn",
            1.0 / d.0,
            1.0 / h.0,
            d.0 / h.0,
            d.1 * 1e6,
            h.1 * 1e6,
        );
    }
    println!(
        "HTTP/2 connections opened by the client: {}",
        client.connections_opened()
    );
    c.final_summary();
}

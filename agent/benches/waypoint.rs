//! End-to-end HTTP/1.1 request rate through the waypoint, with the seed's
//! AuthorizationPolicy versus without, side by side, and direct as baseline:
//!
//! - `direct`: app → upstream (plain TCP keep-alive).
//! - `no_policy`: app → `HboneClient` (curl identity, mTLS HTTP/2 CONNECT)
//!   → `Waypoint` (L7 on the ServiceEntry's HTTP port) → upstream; config:
//!   the seed's ServiceEntry only.
//! - `seed_policy`: the same plus the seed's exact AuthorizationPolicy
//!   (`examples/egress/04-authorizationpolicy.yaml`); `GET /get` is allowed.
//! - `denied`: `POST /post` on the `seed_policy` waypoint: 403 `RBAC: access
//!   denied` from the waypoint, never reaching upstream.
//!
//! Each over 1 and 8 concurrent keep-alive connections (one request in
//! flight per connection). The two waypoints are separate `Waypoint`s with
//! their own config directories, on one tokio runtime (2 workers, as a
//! separate process would have); the app, client and upstream share another.
//! Every response's status is checked; setup failures panic. After
//! criterion's output a table of rates, latencies and ratios is printed,
//! then a paired A/B run (alternating rounds of both waypoints, 20 by
//! default, `SHUNT_BENCH_ROUNDS`) for a drift-resistant policy/no-policy
//! ratio.
//!
//! `cargo bench -p shunt-agent --bench waypoint` (add `-- c8` etc. to filter).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use shunt_agent::alloc::Allocator;
use shunt_agent::config::Config;
use shunt_agent::hbone::{ClientSettings, ConnectRequest, HboneClient};
use shunt_agent::identity::{Ca, IdentityConfig, IdentityManager};
use shunt_agent::telemetry::{AccessLogger, LogFormat};
use shunt_agent::waypoint::{WaypointOptions, WaypointServer};
use shunt_testbed::seed;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;

const TD: &str = "cluster.local";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway";
/// Roughly httpbin's `/get` answer size.
const BODY: &[u8] = br#"{"args":{},"headers":{"Accept":"*/*","Host":"httpbin.org","User-Agent":"curl/8.7.1"},"origin":"10.244.1.19","url":"http://httpbin.org/get"}"#;

// ------------------------------------------------------------- upstream

/// HTTP/1.1 keep-alive upstream answering 200 with `BODY`; counts requests.
async fn upstream(count: Arc<AtomicU64>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let count = count.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| {
                    count.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(BODY)));
                        r.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}

// ------------------------------------------------------------- waypoints

/// The seed's namespace, waypoint Gateway and ServiceEntry; the
/// ServiceEntry gains static loopback endpoints and a targetPort so the
/// waypoint reaches the local upstream instead of httpbin.org.
fn objects(upstream: SocketAddr) -> String {
    let lo = "127.0.0.1".parse().unwrap();
    seed::loopback_service(lo, lo, upstream.port(), &[]).expect("the seed's objects")
}

/// Counts access-log bytes instead of keeping them (the binary writes to
/// stdout; formatting cost is kept, storage is not).
struct CountingSink(Arc<AtomicU64>);

impl Write for CountingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Wp {
    wp: WaypointServer,
    /// httpbin.org's VIP:80 from this waypoint's allocation.
    vip: SocketAddr,
    log_bytes: Arc<AtomicU64>,
}

/// A waypoint with its own config and state directories under `root`,
/// sharing the CA in `ca_dir`. Must run inside the waypoint's runtime.
async fn start_waypoint(
    root: &Path,
    ca_dir: &Path,
    upstream: SocketAddr,
    policy: Option<&str>,
) -> Wp {
    let cfg_dir = root.join("config");
    let state_dir = root.join("state");
    for d in [&cfg_dir, &state_dir] {
        std::fs::create_dir_all(d).expect("create waypoint dirs");
    }
    std::fs::write(cfg_dir.join("10-objects.yaml"), objects(upstream)).unwrap();
    if let Some(p) = policy {
        std::fs::write(cfg_dir.join("20-policy.yaml"), p).unwrap();
    }
    let cfg = Config::load_dir(&cfg_dir).expect("bench config must load");
    let alloc = Allocator::open(&state_dir)
        .expect("open allocator")
        .allocate(&cfg)
        .expect("allocate VIPs")
        .clone();
    let v4 = alloc.hosts["httpbin.org"]
        .v4
        .expect("httpbin.org has no IPv4 VIP");
    let log_bytes = Arc::new(AtomicU64::new(0));
    let mut opts = WaypointOptions::new(cfg_dir, state_dir, ca_dir.to_path_buf());
    opts.listen = "127.0.0.1:0".parse().unwrap();
    opts.admin = None;
    opts.metrics_addr = None;
    opts.ready_addr = None;
    opts.access_log = Arc::new(AccessLogger::to_writer(
        LogFormat::Text,
        Box::new(CountingSink(log_bytes.clone())),
    ));
    opts.upstream_timeout = Duration::from_secs(5);
    let wp = WaypointServer::start(opts).await.expect("waypoint start");
    Wp {
        wp,
        vip: SocketAddr::new(v4.into(), 80),
        log_bytes,
    }
}

// ------------------------------------------------------------- client side

type Conn = SendRequest<Empty<Bytes>>;

async fn h1_over<IO>(io: IO) -> Conn
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .expect("HTTP/1.1 handshake");
    tokio::spawn(conn);
    send
}

async fn direct_conn(upstream: SocketAddr) -> Conn {
    let tcp = TcpStream::connect(upstream)
        .await
        .expect("connect upstream");
    tcp.set_nodelay(true).unwrap();
    h1_over(TokioIo::new(tcp)).await
}

async fn mesh_conn(client: &HboneClient, wp: &Wp) -> Conn {
    let req = ConnectRequest {
        source_identity: CURL.parse().unwrap(),
        source_addr: "10.244.1.19:45678".parse().unwrap(),
        waypoint_addr: wp.wp.hbone_addr(),
        waypoint_identity: WAYPOINT_ID.parse().unwrap(),
        authority: wp.vip,
        host: Some("httpbin.org".into()),
        baggage: None,
        traceparent: None,
    };
    let t = tokio::time::timeout(Duration::from_secs(20), client.connect(&req))
        .await
        .expect("tunnel timed out")
        .expect("tunnel refused");
    h1_over(TokioIo::new(t.into_stream())).await
}

#[derive(Clone, Copy)]
struct Call {
    method: &'static str,
    path: &'static str,
    want: u16,
}

const GET: Call = Call {
    method: "GET",
    path: "/get",
    want: 200,
};
const POST: Call = Call {
    method: "POST",
    path: "/post",
    want: 403,
};

/// One request; panics on a transport error or an unexpected status.
async fn call(s: &mut Conn, c: Call) -> Bytes {
    s.ready().await.expect("connection closed");
    let req = Request::builder()
        .method(c.method)
        .uri(c.path)
        .header("host", "httpbin.org")
        .header("user-agent", "curl/8.7.1")
        .header("accept", "*/*")
        .body(Empty::new())
        .unwrap();
    let r = s.send_request(req).await.expect("request failed");
    let code = r.status().as_u16();
    let body = r.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(
        code,
        c.want,
        "{} {}: {}",
        c.method,
        c.path,
        String::from_utf8_lossy(&body)
    );
    body
}

/// `iters` requests spread over the connections, one in flight on each.
async fn run(conns: &mut [Conn], c: Call, iters: u64) {
    let n = conns.len() as u64;
    let work = conns.iter_mut().enumerate().map(|(i, s)| {
        let k = iters / n + u64::from((i as u64) < iters % n);
        async move {
            for _ in 0..k {
                call(s, c).await;
            }
        }
    });
    futures::future::join_all(work).await;
}

// ------------------------------------------------------------- measuring

/// Per sample: (iterations, wall time, process CPU time), by bench id.
type Samples = Arc<Mutex<HashMap<String, Vec<(u64, Duration, Duration)>>>>;

/// CPU time of the whole process (all runtimes).
fn cpu_now() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall filling a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Median wall seconds per request over the last `n` samples (criterion's
/// measurement phase) and mean CPU seconds per request over them.
fn per_iter(samples: &Samples, key: &str, n: usize) -> Option<(f64, f64)> {
    let s = samples.lock().unwrap();
    let v = s.get(key)?;
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
    let apps = runtime("apps");
    let waypoint_rt = runtime("waypoint");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca_dir = dir.path().join("ca");
    let ca = Arc::new(Ca::init(&ca_dir, TD, false).expect("CA init"));
    let up_count = Arc::new(AtomicU64::new(0));
    let up = apps.block_on(upstream(up_count.clone()));
    let seed_policy = seed::file(seed::POLICY).expect("the seed's policy");
    let (wp_none, wp_seed) = waypoint_rt.block_on(async {
        (
            start_waypoint(&dir.path().join("no-policy"), &ca_dir, up, None).await,
            start_waypoint(
                &dir.path().join("seed-policy"),
                &ca_dir,
                up,
                Some(&seed_policy),
            )
            .await,
        )
    });
    let ids = IdentityManager::new(ca, TD, IdentityConfig::default()).expect("identities");
    let client = HboneClient::new(ids, ClientSettings::default());

    // Sanity before timing: the seed's policy allows GET /get and denies
    // POST /post with Istio's body without reaching upstream, on the same
    // keep-alive connection; without a policy POST goes through.
    apps.block_on(async {
        let mut s = mesh_conn(&client, &wp_seed).await;
        assert_eq!(call(&mut s, GET).await, BODY);
        let before = up_count.load(Ordering::Relaxed);
        assert_eq!(&call(&mut s, POST).await[..], b"RBAC: access denied");
        assert_eq!(
            up_count.load(Ordering::Relaxed),
            before,
            "denied request reached upstream"
        );
        assert_eq!(call(&mut s, GET).await, BODY);
        let mut s = mesh_conn(&client, &wp_none).await;
        call(&mut s, GET).await;
        call(&mut s, Call { want: 200, ..POST }).await;
    });

    let samples: Samples = Arc::default();
    let mut c = Criterion::default().configure_from_args();
    let sample_size = 20;
    let concurrency = [1usize, 8];
    let paths = ["direct", "no_policy", "seed_policy", "denied"];
    for &n in &concurrency {
        let mut g = c.benchmark_group(format!("get_c{n}"));
        g.throughput(Throughput::Elements(1))
            .sample_size(sample_size)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4));
        for path in paths {
            let mut conns: Vec<Conn> = apps.block_on(async {
                let mut v = Vec::new();
                for _ in 0..n {
                    v.push(match path {
                        "direct" => direct_conn(up).await,
                        "no_policy" => mesh_conn(&client, &wp_none).await,
                        _ => mesh_conn(&client, &wp_seed).await,
                    });
                }
                v
            });
            let what = if path == "denied" { POST } else { GET };
            let key = format!("c{n}/{path}");
            g.bench_function(BenchmarkId::new(path, n), |b| {
                b.iter_custom(|iters| {
                    let (wall, cpu) = apps.block_on(async {
                        let c0 = cpu_now();
                        let t = Instant::now();
                        run(&mut conns, what, iters).await;
                        (t.elapsed(), cpu_now() - c0)
                    });
                    samples
                        .lock()
                        .unwrap()
                        .entry(key.clone())
                        .or_default()
                        .push((iters, wall, cpu));
                    wall
                })
            });
        }
        g.finish();
    }

    println!(
        "\nHTTP/1.1 keep-alive GET /get on loopback (wall: median of measured samples; \
         latency = connections × time per request; CPU: whole process, all threads)"
    );
    println!(
        "{:<6} {:<12} {:>10} {:>12} {:>12}",
        "conns", "path", "req/s", "latency µs", "CPU µs/req"
    );
    for &n in &concurrency {
        let get = |p: &str| per_iter(&samples, &format!("c{n}/{p}"), sample_size);
        for p in paths {
            if let Some((t, cpu)) = get(p) {
                println!(
                    "{n:<6} {p:<12} {:>10.0} {:>12.1} {:>12.1}",
                    1.0 / t,
                    t * n as f64 * 1e6,
                    cpu * 1e6
                );
            }
        }
        let ratio = |a: &str, b: &str| -> Option<(f64, f64)> {
            let (ta, ca) = get(a)?;
            let (tb, cb) = get(b)?;
            Some((tb / ta, ca / cb))
        };
        for (a, b, label) in [
            ("seed_policy", "no_policy", "seed policy / no policy"),
            ("no_policy", "direct", "mesh (no policy) / direct"),
            ("seed_policy", "direct", "mesh (seed policy) / direct"),
            ("denied", "seed_policy", "denied 403 / allowed 200"),
        ] {
            if let Some((rate, cpu)) = ratio(a, b) {
                println!("{n:<6}   {label:<30} rate {rate:>5.2}x   CPU/req {cpu:>5.2}x");
            }
        }
    }
    // Criterion runs the paths one after another; on a shared machine load
    // drifts between them. Alternating short rounds of both waypoints gives
    // a policy/no-policy ratio that drift affects far less.
    let rounds: usize = std::env::var("SHUNT_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let per_round = 2000u64;
    println!(
        "\nPaired A/B: {rounds} alternating rounds of {per_round} GET /get per waypoint \
         (median of per-round ratios)"
    );
    for &n in &concurrency {
        let (mut none, mut seed): (Vec<Conn>, Vec<Conn>) = apps.block_on(async {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for _ in 0..n {
                a.push(mesh_conn(&client, &wp_none).await);
                b.push(mesh_conn(&client, &wp_seed).await);
            }
            (a, b)
        });
        let mut ratios = Vec::with_capacity(rounds);
        let (mut t_none, mut t_seed) = (Duration::ZERO, Duration::ZERO);
        for r in 0..rounds {
            let timed = |conns: &mut [Conn]| {
                apps.block_on(async {
                    let t = Instant::now();
                    run(conns, GET, per_round).await;
                    t.elapsed()
                })
            };
            // Alternate which goes first so neither always follows the other.
            let (a, b) = if r % 2 == 0 {
                let a = timed(&mut none);
                (a, timed(&mut seed))
            } else {
                let b = timed(&mut seed);
                (timed(&mut none), b)
            };
            t_none += a;
            t_seed += b;
            ratios.push(a.as_secs_f64() / b.as_secs_f64());
        }
        ratios.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let total = (rounds as u64 * per_round) as f64;
        println!(
            "{n:<6} no_policy {:>8.0} req/s   seed_policy {:>8.0} req/s   \
             seed/no-policy rate: median {:.3}x (min {:.3}x, max {:.3}x)",
            total / t_none.as_secs_f64(),
            total / t_seed.as_secs_f64(),
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    println!(
        "upstream requests: {}; access-log bytes: no_policy {}, seed_policy {}; \
         HTTP/2 connections opened by the client: {}",
        up_count.load(Ordering::Relaxed),
        wp_none.log_bytes.load(Ordering::Relaxed),
        wp_seed.log_bytes.load(Ordering::Relaxed),
        client.connections_opened()
    );
    c.final_summary();
    // Stop the waypoints inside their runtime before it goes away.
    waypoint_rt.block_on(async move {
        drop(wp_none);
        drop(wp_seed);
    });
}

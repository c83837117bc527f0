//! The waypoint end to end on loopback: a real CA, a real config directory
//! and allocation, `WaypointServer::start` in-process, `HboneClient` tunnels with
//! the `curl` and `admin` identities, real upstream HTTP / TLS / TCP
//! servers.

use std::convert::Infallible;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use shunt_agent::alloc::Allocator;
use shunt_agent::config::Config;
use shunt_agent::hbone::{ClientSettings, ConnectRequest, H2Stream, HboneClient};
use shunt_agent::identity::{Ca, IdentityConfig, IdentityManager, SpiffeId};
use shunt_agent::telemetry::{AccessLogger, LogFormat};
use shunt_agent::waypoint::{WaypointOptions, WaypointServer};
use shunt_testbed::hbone::echo_upstream;
use shunt_testbed::mesh::{self, Port, ServiceEntry};
use shunt_testbed::seed;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

const TD: &str = "cluster.local";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const ADMIN: &str = "spiffe://cluster.local/ns/default/sa/admin";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway";
const T: Duration = Duration::from_secs(20);
/// The seed's namespace, where every object of this test lives.
const NS: &str = "common-infrastructure";

// ------------------------------------------------------------- upstreams

/// What an upstream HTTP server saw: (method, path?query, host, sni).
type Seen = Arc<Mutex<Vec<(String, String, String, Option<String>)>>>;

async fn answer(req: Request<Incoming>, seen: Seen, sni: Option<String>) -> Response<Full<Bytes>> {
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let host = req
        .headers()
        .get("host")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    seen.lock()
        .unwrap()
        .push((method.clone(), path.clone(), host.clone(), sni));
    let text = format!("{method} {path} host={host} body={}", body.len());
    let mut r = Response::new(Full::new(Bytes::from(text)));
    r.headers_mut().insert(
        "server",
        hyper::header::HeaderValue::from_static("gunicorn/19.9.0"),
    );
    r
}

/// Plain HTTP/1.1 upstream (keep-alive).
async fn http_upstream() -> (SocketAddr, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let seen = s2.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    async move { Ok::<_, Infallible>(answer(req, seen, None).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// HTTPS upstream with a certificate for `hosts` from a test CA; records SNI.
async fn tls_upstream(dir: &Path, hosts: &[&str]) -> (SocketAddr, Seen, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(p, ca_key);
    let sk = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>())
        .unwrap()
        .signed_by(&sk, &issuer)
        .unwrap();
    let ca_pem = dir.join("upstream-ca.pem");
    std::fs::write(&ca_pem, ca.pem()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(sk.serialize_der())),
        )
        .unwrap();
    // Both, as a public server would: the waypoint offers h2 for HTTP2
    // ports and http/1.1 otherwise.
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let s2 = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = l.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let seen = s2.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_owned);
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                let svc = hyper::service::service_fn(move |req| {
                    let seen = seen.clone();
                    let sni = sni.clone();
                    async move { Ok::<_, Infallible>(answer(req, seen, sni).await) }
                });
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                }
            });
        }
    });
    (addr, seen, ca_pem)
}

/// A port with nothing listening.
async fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

// ------------------------------------------------------------- config

/// The seed's AuthorizationPolicy; `extra_curl_methods` (e.g. `, "POST"`)
/// widens its second rule to those methods and `/post`.
fn seed_policy(extra_curl_methods: &str) -> String {
    let p = seed::file(seed::POLICY).unwrap();
    if extra_curl_methods.is_empty() {
        return p;
    }
    let p = seed::edit(
        &p,
        r#"methods: ["GET"]"#,
        &format!(r#"methods: ["GET"{extra_curl_methods}]"#),
    )
    .unwrap();
    seed::edit(&p, r#"paths: ["/get"]"#, r#"paths: ["/get", "/post"]"#).unwrap()
}

fn config_text(
    http: SocketAddr,
    echo: SocketAddr,
    down: SocketAddr,
    tls: SocketAddr,
    ca_pem: &Path,
) -> String {
    let lo = "127.0.0.1".parse().unwrap();
    let down_port = Port {
        number: 81,
        name: "http-down",
        protocol: "HTTP",
        target_port: Some(down.port()),
    };
    let seed = seed::loopback_service(lo, lo, http.port(), &[down_port]).unwrap();
    // The clients' WorkloadEntries: a tunnel's `Forwarded: for=` is believed
    // only for an address of the certificate's workload.
    let workloads = seed::file(seed::WORKLOADS).unwrap();
    let entry = |name, host, ports, resolution, endpoint| {
        ServiceEntry {
            name,
            namespace: NS,
            hosts: &[host],
            ports,
            resolution,
            endpoints: &[endpoint],
            ..Default::default()
        }
        .yaml()
    };
    let echo_ports = [
        Port::tcp(9000, echo.port()),
        Port {
            name: "tcp-down",
            ..Port::tcp(9001, down.port())
        },
    ];
    // HTTP ports to the TLS upstream (TLS originated by a DestinationRule).
    let secure = |name, protocol| Port {
        number: 80,
        name,
        protocol,
        target_port: Some(tls.port()),
    };
    mesh::docs(&[
        workloads,
        seed,
        entry("echo", "echo.example", &echo_ports, "DNS", "localhost"),
        entry(
            "admin-only",
            "admin-only.example",
            &[Port::tcp(9000, echo.port())],
            "STATIC",
            "127.0.0.1",
        ),
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: admin-only
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: admin-only
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/admin"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-blocked-host
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: httpbin.org
  action: DENY
  rules:
  - to:
    - operation:
        hosts: ["blocked.example"]
"#
        .to_string(),
        entry(
            "secure.example",
            "secure.example",
            &[secure("http", "HTTP")],
            "STATIC",
            "127.0.0.1",
        ),
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: secure-tls
  namespace: common-infrastructure
spec:
  host: secure.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      caCertificates: {ca}
"#,
            ca = ca_pem.display()
        ),
        // The same TLS upstream, spoken to as HTTP/2 (ALPN h2).
        entry(
            "secure2.example",
            "secure2.example",
            &[secure("http2", "HTTP2")],
            "STATIC",
            "127.0.0.1",
        ),
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: secure2-tls
  namespace: common-infrastructure
spec:
  host: secure2.example
  trafficPolicy:
    tls:
      mode: SIMPLE
      sni: secure.example
      caCertificates: {ca}
"#,
            ca = ca_pem.display()
        ),
    ])
}

/// Shared sink for access-log lines.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
    /// Polls until a line contains every needle.
    async fn wait_for(&self, needles: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + T;
        loop {
            if let Some(l) = self
                .text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return l.to_string();
            }
            if tokio::time::Instant::now() > deadline {
                panic!("no log line with {needles:?} in:\n{}", self.text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

struct Env {
    _dir: tempfile::TempDir,
    cfg_dir: PathBuf,
    state_dir: PathBuf,
    wp: WaypointServer,
    ids: IdentityManager,
    client: HboneClient,
    lines: Lines,
    http_seen: Seen,
    tls_seen: Seen,
    vips: std::collections::HashMap<String, IpAddr>,
}

impl Env {
    async fn new() -> Env {
        Env::with_files(&[]).await
    }

    /// Extra config files (name, text) written before the allocation, in
    /// which `{tls_port}` stands for the TLS upstream's port.
    async fn with_files(extra: &[(&str, &str)]) -> Env {
        Env::start(extra, &[], Duration::from_millis(100)).await
    }

    /// [`Env::with_files`], then `late` files written after the allocation
    /// (as if the agent had not read them yet), with the waypoint polling
    /// its config directory and the allocation every `reload_interval`.
    async fn start(
        extra: &[(&str, &str)],
        late: &[(&str, &str)],
        reload_interval: Duration,
    ) -> Env {
        Env::start_with(extra, late, reload_interval, |_| {}).await
    }

    /// [`Env::start`], with `options` changing the waypoint's options last.
    async fn start_with(
        extra: &[(&str, &str)],
        late: &[(&str, &str)],
        reload_interval: Duration,
        options: impl FnOnce(&mut WaypointOptions),
    ) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let cfg_dir = dir.path().join("config");
        let state_dir = dir.path().join("state");
        for d in [&ca_dir, &cfg_dir, &state_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ca = Arc::new(Ca::init(&ca_dir, TD, false).unwrap());
        let (http, http_seen) = http_upstream().await;
        let echo = echo_upstream().await;
        let down = closed_port().await;
        let (tls, tls_seen, ca_pem) =
            tls_upstream(dir.path(), &["secure.example", "tls.example"]).await;
        std::fs::write(
            cfg_dir.join("10-objects.yaml"),
            config_text(http, echo, down, tls, &ca_pem),
        )
        .unwrap();
        std::fs::write(cfg_dir.join("20-policy.yaml"), seed_policy("")).unwrap();
        for (name, text) in extra {
            let text = text.replace("{tls_port}", &tls.port().to_string());
            std::fs::write(cfg_dir.join(name), text).unwrap();
        }
        // The agent is the allocator; the waypoint only reads its result.
        let cfg = Config::load_dir(&cfg_dir).unwrap();
        let mut a = Allocator::open(&state_dir).unwrap();
        let alloc = a.allocate(&cfg).unwrap().clone();
        let vips = alloc
            .hosts
            .iter()
            .map(|(h, a)| (h.clone(), IpAddr::V4(a.v4.unwrap())))
            .collect();
        for (name, text) in late {
            std::fs::write(cfg_dir.join(name), text).unwrap();
        }

        let lines = Lines::default();
        let mut opts = WaypointOptions::new(cfg_dir.clone(), state_dir.clone(), ca_dir);
        opts.listen = "127.0.0.1:0".parse().unwrap();
        opts.admin = Some("127.0.0.1:0".parse().unwrap());
        opts.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
        opts.ready_addr = Some("127.0.0.1:0".parse().unwrap());
        opts.access_log = Arc::new(AccessLogger::to_writer(
            LogFormat::Text,
            Box::new(lines.clone()),
        ));
        opts.upstream_timeout = Duration::from_secs(5);
        opts.reload_interval = reload_interval;
        options(&mut opts);
        let wp = WaypointServer::start(opts).await.unwrap();
        let ids = IdentityManager::new(ca, TD, IdentityConfig::default()).unwrap();
        let client = HboneClient::new(ids.clone(), ClientSettings::default());
        Env {
            _dir: dir,
            cfg_dir,
            state_dir,
            wp,
            ids,
            client,
            lines,
            http_seen,
            tls_seen,
            vips,
        }
    }

    fn vip(&self, host: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.vips[host], port)
    }

    fn request(&self, src: &str, authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            source_identity: src.parse().unwrap(),
            // Each client's own WorkloadEntry address (00-curl.yaml).
            source_addr: if src == ADMIN {
                "10.244.1.20:45678"
            } else {
                "10.244.1.19:45678"
            }
            .parse()
            .unwrap(),
            waypoint_addr: self.wp.hbone_addr(),
            waypoint_identity: WAYPOINT_ID.parse().unwrap(),
            authority,
            host: None,
            baggage: None,
            traceparent: None,
        }
    }

    async fn tunnel(&self, src: &str, authority: SocketAddr) -> H2Stream {
        tokio::time::timeout(T, self.client.connect(&self.request(src, authority)))
            .await
            .expect("tunnel timed out")
            .expect("tunnel refused")
            .into_stream()
    }

    async fn h1(
        &self,
        src: &str,
        host: &str,
    ) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
        h1_over(self.tunnel(src, self.vip(host, 80)).await).await
    }
}

/// An HTTP/1.1 client over `io`, its connection driven by a task.
async fn h1_over<I>(io: I) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// A GET of `path` with `Host: host`.
fn get(path: &str, host: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// A TLS client trusting `roots`, with ring (the waypoint's provider).
fn tls_connector(roots: rustls::RootCertStore) -> tokio_rustls::TlsConnector {
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Writes `bytes` on `io`, half-closes it and asserts they all come back.
async fn echoes(mut io: H2Stream, bytes: &[u8]) {
    io.write_all(bytes).await.unwrap();
    io.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(T, io.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(back, bytes);
}

async fn send(
    s: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    host: &str,
) -> (u16, String) {
    s.ready().await.unwrap();
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", host)
        .header("user-agent", "curl/8.7.1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = tokio::time::timeout(T, s.send_request(req))
        .await
        .expect("request timed out")
        .unwrap();
    let code = r.status().as_u16();
    let body = r.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&body).into_owned())
}

/// Writes raw bytes on a fresh tunnel and reads until the waypoint closes it.
async fn raw(env: &Env, src: &str, bytes: &[u8]) -> String {
    let mut io = env.tunnel(src, env.vip("httpbin.org", 80)).await;
    io.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read the first response (a request per tunnel here); stop at EOF or
    // once a complete response with a body has been seen.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let n = tokio::time::timeout_at(deadline, io.read(&mut buf))
            .await
            .expect("no response from the waypoint")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let s = String::from_utf8_lossy(&out);
        if let Some((head, body)) = s.split_once("\r\n\r\n") {
            let cl = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap_or(0))
            });
            if cl.is_some_and(|cl| body.len() >= cl) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(resp: &str) -> u16 {
    resp.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {resp:?}"))
}

async fn get_text(addr: SocketAddr, path: &str) -> (u16, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = h1_over(tcp).await;
    let r = s.send_request(get(path, "localhost")).await.unwrap();
    let code = r.status().as_u16();
    let b = r.into_body().collect().await.unwrap().to_bytes();
    (code, String::from_utf8_lossy(&b).into_owned())
}

// ------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_port_relays_and_logs_ztunnel_line() {
    let env = Env::new().await;
    let vip = env.vip("echo.example", 9000);
    echoes(env.tunnel(CURL, vip).await, b"hello through the waypoint").await;
    let line = env
        .lines
        .wait_for(&[
            "connection complete",
            &format!("src.identity=\"{CURL}\""),
            &format!("dst.hbone_addr={vip}"),
        ])
        .await;
    assert!(line.contains(" info access "), "{line}");
    assert!(line.contains("src.addr=10.244.1.19:45678"), "{line}");
    // The source workload from the model, as ztunnel names it.
    assert!(
        line.contains("src.addr=10.244.1.19:45678 src.workload=\"curl\" src.namespace=\"default\""),
        "{line}"
    );
    assert!(line.contains("dst.service=\"echo.example\""), "{line}");
    assert!(
        line.contains(&format!("dst.identity=\"{WAYPOINT_ID}\"")),
        "{line}"
    );
    assert!(line.contains("direction=\"inbound\""), "{line}");
    assert!(line.contains("bytes_sent=26 bytes_recv=26"), "{line}");
    // Metrics on the metrics listener.
    let (code, m) = get_text(env.wp.metrics_addr().unwrap(), "/metrics").await;
    assert_eq!(code, 200);
    let opened = m
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total")
                && l.contains("destination_service=\"echo.example\"")
        })
        .unwrap_or_else(|| panic!("no opened counter:\n{m}"));
    assert!(
        opened.contains(&format!("source_principal=\"{CURL}\"")),
        "{opened}"
    );
    assert!(opened.contains("reporter=\"destination\""), "{opened}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_refusals_503_401_400() {
    let env = Env::new().await;
    // Upstream down: 503, and an error line.
    let e = env
        .client
        .connect(&env.request(CURL, env.vip("echo.example", 9001)))
        .await
        .err()
        .expect("tunnel to a dead upstream must be refused");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
    env.lines
        .wait_for(&[
            " error access connection complete",
            "dst.hbone_addr=",
            ":9001",
            "error=",
        ])
        .await;
    // L4 policy: admin only.
    let vip = env.vip("admin-only.example", 9000);
    let e = env
        .client
        .connect(&env.request(CURL, vip))
        .await
        .err()
        .expect("curl must be denied");
    assert_eq!(e.status().map(|s| s.as_u16()), Some(401), "{e}");
    let mut io = env.tunnel(ADMIN, vip).await;
    io.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"x");
    // Not a service of this waypoint: 400; a bound VIP on an undeclared port: 503.
    let e = env
        .client
        .connect(&env.request(CURL, "240.240.255.254:80".parse().unwrap()))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(400), "{e}");
    let e = env
        .client
        .connect(&env.request(CURL, env.vip("echo.example", 1234)))
        .await
        .err()
        .unwrap();
    assert_eq!(e.status().map(|s| s.as_u16()), Some(503), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seed_policy_over_http1_keepalive() {
    let env = Env::new().await;
    let mut curl = env.h1(CURL, "httpbin.org").await;
    let (code, body) = send(&mut curl, "GET", "/get?x=1", "httpbin.org").await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(body, "GET /get?x=1 host=httpbin.org body=0");
    let (code, body) = send(&mut curl, "POST", "/post", "httpbin.org").await;
    assert_eq!((code, body.as_str()), (403, "RBAC: access denied"));
    // Same connection still usable after the denial.
    let (code, _) = send(&mut curl, "GET", "/get", "httpbin.org").await;
    assert_eq!(code, 200);
    let (code, _) = send(&mut curl, "HEAD", "/get", "httpbin.org").await;
    assert_eq!(code, 403, "HEAD is not GET");
    let mut admin = env.h1(ADMIN, "httpbin.org").await;
    let (code, body) = send(&mut admin, "POST", "/post", "httpbin.org").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "POST /post host=httpbin.org body=0")
    );
    // The upstream never saw the denied requests.
    let seen: Vec<_> = env
        .http_seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| format!("{} {}", s.0, s.1))
        .collect();
    assert_eq!(seen, ["GET /get?x=1", "GET /get", "POST /post"]);

    // One Envoy line per request; the denial names no policy (no ALLOW rule matched).
    let denied = env
        .lines
        .wait_for(&["\"POST /post HTTP/1.1\" 403 RBAC rbac_access_denied_matched_policy[none]"])
        .await;
    assert!(denied.contains("\"curl/8.7.1\""), "{denied}");
    assert!(
        denied.contains("inbound-vip|80|http|httpbin.org"),
        "{denied}"
    );
    let ok = env
        .lines
        .wait_for(&["\"GET /get?x=1 HTTP/1.1\" 200 - via_upstream"])
        .await;
    assert!(
        ok.contains(&format!("{}", env.vip("httpbin.org", 80))),
        "{ok}"
    );
    assert!(ok.contains("10.244.1.19:45678"), "{ok}");
    // Per-request metrics with response codes.
    let (_, m) = get_text(env.wp.metrics_addr().unwrap(), "/metrics").await;
    let has = |code: &str| {
        m.lines().any(|l| {
            l.starts_with("istio_requests_total")
                && l.contains(&format!("response_code=\"{code}\""))
                && l.contains("destination_service=\"httpbin.org\"")
        })
    };
    assert!(has("200") && has("403"), "{m}");
    assert!(
        m.contains("istio_request_duration_milliseconds_bucket"),
        "{m}"
    );
    // Response headers: the upstream's, plus the service time.
    let mut s = env.h1(CURL, "httpbin.org").await;
    let r = s.send_request(get("/get", "httpbin.org")).await.unwrap();
    assert_eq!(r.headers()["server"], "gunicorn/19.9.0");
    assert!(r.headers().contains_key("x-envoy-upstream-service-time"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge() {
    let env = Env::new().await;
    let io = env.tunnel(CURL, env.vip("httpbin.org", 80)).await;
    let (mut s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .unwrap();
    tokio::spawn(conn);
    for (method, path, want) in [
        ("GET", "/get", 200),
        ("POST", "/post", 403),
        ("GET", "/get", 200),
    ] {
        let req = Request::builder()
            .method(method)
            .uri(format!("http://httpbin.org{path}"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let r = tokio::time::timeout(T, s.send_request(req))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{method} {path}");
        let b = r.into_body().collect().await.unwrap().to_bytes();
        if want == 403 {
            assert_eq!(b, "RBAC: access denied");
        } else {
            assert_eq!(b, "GET /get host=httpbin.org body=0");
        }
    }
    env.lines
        .wait_for(&["\"POST /post HTTP/2\" 403 RBAC"])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_http_on_http_port_is_closed() {
    let env = Env::new().await;
    let resp = raw(
        &env,
        CURL,
        b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n",
    )
    .await;
    // hyper answers 400 (or nothing) and the tunnel ends; never relayed.
    assert!(resp.is_empty() || status_of(&resp) == 400, "{resp:?}");
    assert!(env.http_seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_framing_is_400() {
    let env = Env::new().await;
    for req in [
        // CL + TE: hyper tolerates it (uses chunked); check_framing refuses.
        "POST /get HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        // Duplicate equal Content-Length.
        "GET /get HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
        // Conflicting Content-Length (hyper itself refuses).
        "GET /get HTTP/1.1\r\nHost: httpbin.org\r\nContent-Length: 0\r\nContent-Length: 7\r\n\r\n",
        // Transfer-Encoding not ending in chunked.
        "POST /get HTTP/1.1\r\nHost: httpbin.org\r\nTransfer-Encoding: gzip\r\n\r\n",
    ] {
        let resp = raw(&env, ADMIN, req.as_bytes()).await;
        assert_eq!(status_of(&resp), 400, "{req:?} -> {resp:?}");
    }
    assert!(
        env.http_seen.lock().unwrap().is_empty(),
        "{:?}",
        env.http_seen.lock().unwrap()
    );
}

/// (request line target, Host, method, expected status, upstream path if allowed)
type CorpusCase = (
    &'static str,
    &'static str,
    &'static str,
    u16,
    Option<&'static str>,
);

/// Requests through the waypoint: the decision, and the path the upstream
/// received (the path the policy matched, plus the query).
async fn run_corpus(env: &Env, cases: &[CorpusCase]) {
    for (target, host, method, want, up) in cases {
        env.http_seen.lock().unwrap().clear();
        let req =
            format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\n\r\n");
        let resp = raw(env, CURL, req.as_bytes()).await;
        assert_eq!(
            status_of(&resp),
            *want,
            "{method} {target} Host {host}: {resp}"
        );
        let seen = env.http_seen.lock().unwrap().clone();
        match up {
            Some(p) => {
                assert_eq!(seen.len(), 1, "{target}");
                assert_eq!(seen[0].1, *p, "{target}");
            }
            None => assert!(
                seen.is_empty(),
                "{method} {target} reached upstream: {seen:?}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_corpus_through_the_http_path() {
    // Istio's default pathNormalization (BASE): dot segments and unreserved
    // escapes are normalized, repeated and escaped slashes are not.
    let env = Env::new().await;
    let cases: &[CorpusCase] = &[
        ("//get", "httpbin.org", "GET", 403, None),
        ("/./get", "httpbin.org", "GET", 200, Some("/get")),
        ("/x/../get", "httpbin.org", "GET", 200, Some("/get")),
        ("/get/../post", "httpbin.org", "GET", 403, None),
        ("/get%2F..%2Fpost", "httpbin.org", "GET", 403, None),
        ("/post/..%2Fget", "httpbin.org", "GET", 403, None),
        ("/get%5C..%5Cpost", "httpbin.org", "GET", 403, None),
        ("/%67et", "httpbin.org", "GET", 200, Some("/get")),
        ("/x/%2e%2e/get", "httpbin.org", "GET", 200, Some("/get")),
        ("/GET", "httpbin.org", "GET", 403, None),
        ("/get", "httpbin.org", "get", 403, None),
        ("/get", "httpbin.org", "POST", 403, None),
        ("/get?/post", "httpbin.org", "GET", 200, Some("/get?/post")),
        // DENY by host: case-insensitive; a port or a trailing dot makes
        // another Host, as in Istio (hosts: [blocked.example] only).
        ("/get", "blocked.example", "GET", 403, None),
        ("/get", "BLOCKED.Example", "GET", 403, None),
        ("/get", "blocked.example:80", "GET", 200, Some("/get")),
        ("/get", "blocked.example.", "GET", 200, Some("/get")),
    ];
    let mut curl = env.h1(CURL, "httpbin.org").await;
    run_corpus(&env, cases).await;
    // The deciding DENY policy is named on its denial line.
    env.lines
        .wait_for(&[
            "403 RBAC rbac_access_denied_matched_policy[ns[common-infrastructure]-policy[deny-blocked-host]-rule[0]]",
            "\"BLOCKED.Example\"",
        ])
        .await;
    // And the keep-alive client still works.
    let (code, _) = send(&mut curl, "GET", "/get", "httpbin.org").await;
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decode_and_merge_slashes_from_mesh_yaml_is_what_policy_and_upstream_see() {
    let env = Env::with_files(&[(
        "mesh.yaml",
        "pathNormalization:\n  normalization: DECODE_AND_MERGE_SLASHES\n",
    )])
    .await;
    let cases: &[CorpusCase] = &[
        ("//get", "httpbin.org", "GET", 200, Some("/get")),
        ("///get?a=b", "httpbin.org", "GET", 200, Some("/get?a=b")),
        ("/get%2F..%2Fpost", "httpbin.org", "GET", 403, None),
        ("/post/..%2Fget", "httpbin.org", "GET", 200, Some("/get")),
        ("/get%5C..%5Cpost", "httpbin.org", "GET", 403, None),
        ("/%67et", "httpbin.org", "GET", 200, Some("/get")),
    ];
    run_corpus(&env, cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_normalization_none_passes_paths_as_received() {
    let env = Env::with_files(&[("mesh.yaml", "pathNormalization: {normalization: NONE}\n")]).await;
    let cases: &[CorpusCase] = &[
        ("/get", "httpbin.org", "GET", 200, Some("/get")),
        ("/./get", "httpbin.org", "GET", 403, None),
        ("/%67et", "httpbin.org", "GET", 403, None),
    ];
    run_corpus(&env, cases).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_policy_is_logged_and_counted_never_enforced() {
    let dry = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: would-deny-get
  namespace: common-infrastructure
  annotations:
    istio.io/dry-run: "true"
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: httpbin.org
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/get"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: would-deny-admin-tcp
  namespace: common-infrastructure
  annotations:
    istio.io/dry-run: "true"
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: admin-only
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/admin"]
"#;
    let env = Env::with_files(&[("40-dry-run.yaml", dry)]).await;
    // HTTP: the request goes through; the line says what the policy would do.
    let mut c = env.h1(CURL, "httpbin.org").await;
    let (code, _) = send(&mut c, "GET", "/get", "httpbin.org").await;
    assert_eq!(code, 200);
    let line = env
        .lines
        .wait_for(&["\"GET /get HTTP/1.1\" 200", "shadow="])
        .await;
    assert!(
        line.contains("shadow denied: dry-run DENY policy common-infrastructure/would-deny-get rule 0 matched"),
        "{line}"
    );
    // TCP: the admin connection is relayed; the ztunnel line carries it.
    echoes(
        env.tunnel(ADMIN, env.vip("admin-only.example", 9000)).await,
        b"ping",
    )
    .await;
    let line = env
        .lines
        .wait_for(&["connection complete", "admin-only.example", "shadow="])
        .await;
    assert!(line.contains("would-deny-admin-tcp"), "{line}");
    // Counted, per engine and result.
    let (_, m) = get_text(env.wp.metrics_addr().unwrap(), "/metrics").await;
    for policy in ["would-deny-get", "would-deny-admin-tcp"] {
        assert!(
            m.lines()
                .any(|l| l.starts_with("shunt_authz_shadow_decisions_total")
                    && l.contains("shadow_engine=\"istio_dry_run_deny\"")
                    && l.contains("shadow_result=\"denied\"")
                    && l.contains(&format!("policy=\"common-infrastructure/{policy}\""))
                    && l.ends_with(" 1")),
            "{policy}: {m}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_simple() {
    let env = Env::new().await;
    let mut c = env.h1(CURL, "secure.example").await;
    let (code, body) = send(&mut c, "GET", "/get", "secure.example").await;
    assert_eq!(
        (code, body.as_str()),
        (200, "GET /get host=secure.example body=0")
    );
    let (code, _) = send(&mut c, "GET", "/anything", "secure.example").await;
    assert_eq!(code, 200, "no policy on secure.example");
    let seen = env.tls_seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    assert!(
        seen.iter()
            .all(|s| s.3.as_deref() == Some("secure.example")),
        "{seen:?}"
    );
    env.lines
        .wait_for(&[
            "\"GET /get HTTP/1.1\" 200",
            "inbound-vip|80|http|secure.example",
        ])
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_upstream_down_is_503() {
    let env = Env::new().await;
    let mut s = h1_over(env.tunnel(CURL, env.vip("httpbin.org", 81)).await).await;
    let (code, body) = send(&mut s, "GET", "/get", "httpbin.org").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("connection failure"), "{body}");
    env.lines.wait_for(&["\"GET /get HTTP/1.1\" 503 UF"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edit_applies_to_new_requests() {
    let env = Env::new().await;
    let mut curl = env.h1(CURL, "httpbin.org").await;
    assert_eq!(send(&mut curl, "POST", "/post", "httpbin.org").await.0, 403);
    std::fs::write(
        env.cfg_dir.join("20-policy.yaml"),
        seed_policy(r#", "POST""#),
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    loop {
        // Same keep-alive connection: the decision is per request.
        let (code, _) = send(&mut curl, "POST", "/post", "httpbin.org").await;
        if code == 200 {
            break;
        }
        assert_eq!(code, 403);
        assert!(
            tokio::time::Instant::now() < deadline,
            "policy edit never applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A broken edit (GET-only again, plus an unsupported CUSTOM policy)
    // is rejected as a whole: the previous config, allowing POST, stays.
    let broken = format!(
        "{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: x, namespace: common-infrastructure}}\nspec:\n  targetRefs: [{{kind: ServiceEntry, group: networking.istio.io, name: httpbin.org}}]\n  action: CUSTOM\n  provider: {{name: ext}}\n  rules: [{{}}]\n",
        seed_policy("")
    );
    std::fs::write(env.cfg_dir.join("20-policy.yaml"), broken).unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(send(&mut curl, "POST", "/post", "httpbin.org").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_trust_domain_refused_and_admin_endpoints() {
    let env = Env::new().await;
    let other = IdentityManager::new(
        env.ids.ca().expect("local CA").clone(),
        "other.domain",
        IdentityConfig::default(),
    )
    .unwrap();
    let client = HboneClient::new(other, ClientSettings::default());
    let mut req = env.request(CURL, env.vip("httpbin.org", 80));
    req.source_identity = SpiffeId::new("other.domain", "default", "curl").unwrap();
    let r = tokio::time::timeout(T, client.connect(&req)).await.unwrap();
    assert!(
        r.is_err(),
        "a client of another trust domain must be refused"
    );

    let (code, body) = get_text(env.wp.ready_addr().unwrap(), "/healthz/ready").await;
    assert_eq!((code, body.as_str()), (200, "ready\n"));
    let (code, body) = get_text(env.wp.admin_addr().unwrap(), "/config_dump").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["waypoint"]["identity"], WAYPOINT_ID);
    assert_eq!(v["policies"]["count"], 3);
    let services = v["services"].as_array().unwrap();
    let http = services
        .iter()
        .find(|s| s["vip"] == env.vip("httpbin.org", 80).to_string())
        .unwrap();
    assert_eq!(http["mode"], "http");
    let tcp = services
        .iter()
        .find(|s| s["vip"] == env.vip("echo.example", 9000).to_string())
        .unwrap();
    assert_eq!(tcp["mode"], "tcp");
    let tls = services
        .iter()
        .find(|s| s["host"] == "secure.example")
        .unwrap();
    assert_eq!(tls["tlsOrigination"], true);
    assert_eq!(v["version"].as_str().unwrap().len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_edit_closes_open_tcp_tunnels_it_now_denies() {
    let env = Env::new().await;
    let vip = env.vip("echo.example", 9000);
    let mut io = env.tunnel(CURL, vip).await;
    io.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(T, io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"before");
    // Deny curl on every ServiceEntry behind this waypoint.
    std::fs::write(
        env.cfg_dir.join("30-deny-curl.yaml"),
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-curl\n  namespace: common-infrastructure\nspec:\n  targetRefs:\n  - kind: Gateway\n    group: gateway.networking.k8s.io\n    name: egress-gateway\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/curl\"]\n",
    )
    .unwrap();
    // The open tunnel is closed (reset or EOF) once the new config lands.
    let mut rest = Vec::new();
    let r = tokio::time::timeout(T, io.read_to_end(&mut rest)).await;
    assert!(
        r.is_ok(),
        "the tunnel stayed open after the policy denied it"
    );
    let line = env
        .lines
        .wait_for(&["connection complete", "authorization policy changed"])
        .await;
    assert!(line.contains("deny-curl"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_origination_to_an_http2_port_negotiates_h2() {
    let env = Env::new().await;
    let mut c = env.h1(CURL, "secure2.example").await;
    let (code, body) = send(&mut c, "GET", "/get", "secure2.example").await;
    assert_eq!(code, 200, "{body}");
    env.lines
        .wait_for(&[
            "\"GET /get HTTP/1.1\" 200",
            "inbound-vip|80|http2|secure2.example",
        ])
        .await;
    let seen = env.tls_seen.lock().unwrap().clone();
    assert!(
        seen.iter()
            .any(|s| s.3.as_deref() == Some("secure.example")),
        "the upstream saw TLS with the configured SNI: {seen:?}"
    );
}

// ------------------------------------------------------------- TLS ports

/// A TLS passthrough port (protocol TLS) to the TLS upstream (three hosts,
/// one set of endpoints), with SNI policies: ALLOW tls.example and
/// *.evil.example, DENY *.evil.example.
const TLS_PORT_CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: tls.example
  namespace: common-infrastructure
spec:
  hosts:
  - tls.example
  - api.evil.example
  - other.example
  ports:
  - number: 443
    name: tls
    protocol: TLS
    targetPort: {tls_port}
  resolution: STATIC
  endpoints:
  - address: 127.0.0.1
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tls-sni-allow
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: tls.example
  rules:
  - when:
    - key: connection.sni
      values: ["tls.example", "*.evil.example"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tls-sni-deny
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: tls.example
  action: DENY
  rules:
  - when:
    - key: connection.sni
      values: ["*.evil.example"]
"#;

/// TLS through a tunnel to tls.example:443 with `sni` (an IP sends none),
/// then one HTTP/1.1 GET; the status, or the handshake error.
async fn tls_get(env: &Env, sni: &str) -> Result<u16, String> {
    let io = env.tunnel(CURL, env.vip("tls.example", 443)).await;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(env._dir.path().join("upstream-ca.pem")).unwrap();
    for c in rustls_pemfile_certs(&pem) {
        roots.add(c).unwrap();
    }
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let tls = tokio::time::timeout(T, tls_connector(roots).connect(name, io))
        .await
        .expect("TLS handshake timed out")
        .map_err(|e| e.to_string())?;
    let r = h1_over(tls)
        .await
        .send_request(get("/get", "secure.example"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(r.status().as_u16())
}

fn rustls_pemfile_certs(pem: &[u8]) -> Vec<rustls::pki_types::CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_sni_allow_admits_the_named_server_and_logs_its_sni() {
    let env = Env::with_files(&[("40-tls.yaml", TLS_PORT_CONFIG)]).await;
    assert_eq!(tls_get(&env, "tls.example").await, Ok(200));
    let line = env
        .lines
        .wait_for(&[
            "connection complete",
            "dst.service=\"tls.example\"",
            "sni=\"tls.example\"",
        ])
        .await;
    // (The client drops its tunnel without a close: the line may say so.)
    assert!(!line.contains("denied"), "{line}");
    // The upstream saw the client's own TLS (SNI passed through untouched).
    let seen = env.tls_seen.lock().unwrap().clone();
    assert!(
        seen.iter().any(|s| s.3.as_deref() == Some("tls.example")),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_sni_deny_fires_and_other_names_are_not_allowed() {
    let env = Env::with_files(&[("40-tls.yaml", TLS_PORT_CONFIG)]).await;
    // DENY on SNI matches (it never fired before shunt read the ClientHello).
    assert!(tls_get(&env, "api.evil.example").await.is_err());
    let line = env
        .lines
        .wait_for(&["connection complete", "sni=\"api.evil.example\""])
        .await;
    assert!(
        line.contains("denied by authorization policy") && line.contains("tls-sni-deny"),
        "{line}"
    );
    // Not in the ALLOW list.
    assert!(tls_get(&env, "other.example").await.is_err());
    let line = env.lines.wait_for(&["sni=\"other.example\""]).await;
    assert!(
        line.contains("tls-sni-allow") && line.contains("denied"),
        "{line}"
    );
    // A name the upstream serves, but not a host of this ServiceEntry:
    // refused before policy.
    assert!(tls_get(&env, "secure.example").await.is_err());
    env.lines
        .wait_for(&[
            "sni=\"secure.example\"",
            "SNI \\\"secure.example\\\" is not a host of ServiceEntry common-infrastructure/tls.example",
        ])
        .await;
    // No SNI at all (a client dialing by IP): refused, whatever the policy.
    assert!(tls_get(&env, "127.0.0.1").await.is_err());
    env.lines
        .wait_for(&[
            "dst.service=\"tls.example\"",
            "ClientHello without server_name (SNI)",
        ])
        .await;
    assert!(
        env.tls_seen.lock().unwrap().is_empty(),
        "a denied connection reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_port_without_a_client_hello_is_reset() {
    let env = Env::with_files(&[("40-tls.yaml", TLS_PORT_CONFIG)]).await;
    let mut io = env.tunnel(CURL, env.vip("tls.example", 443)).await;
    io.write_all(b"GET / HTTP/1.1\r\nHost: tls.example\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(T, io.read_to_end(&mut out))
        .await
        .expect("tunnel left open");
    assert!(r.is_err() || out.is_empty(), "got bytes back: {out:?}");
    let line = env
        .lines
        .wait_for(&[
            "connection complete",
            "dst.service=\"tls.example\"",
            "not a TLS handshake",
        ])
        .await;
    assert!(line.contains(" error access "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_reset_while_their_upstream_connect_hangs_leave_no_upstream_sockets() {
    // The endpoint's accept queue is full: connects to it hang in SYN-SENT
    // (for the 5 s upstream timeout here) unless they are abandoned.
    let (silent, _listener, fill) = shunt_testbed::hbone::syn_dropping_upstream().await;
    let entry = ServiceEntry {
        name: "silent",
        namespace: NS,
        hosts: &["silent.example"],
        ports: &[Port::tcp(7000, silent.port())],
        endpoints: &["127.0.0.1"],
        ..Default::default()
    }
    .yaml();
    let env = Env::with_files(&[("30-silent.yaml", &entry)]).await;
    let vip = env.vip("silent.example", 7000);
    // A client that gives up on a CONNECT after 20 ms drops its stream,
    // which h2 sends as RST_STREAM(CANCEL).
    let mut gave_up = 0;
    for _ in 0..3 {
        let attempts =
            (0..100).map(|_| {
                let req = env.request(CURL, vip);
                let client = &env.client;
                async move {
                    tokio::time::timeout(Duration::from_millis(20), client.connect(&req)).await
                }
            });
        gave_up += futures::future::join_all(attempts)
            .await
            .iter()
            .filter(|r| r.is_err())
            .count();
    }
    assert_eq!(
        gave_up, 300,
        "no CONNECT to the silent endpoint is answered in 20 ms"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (left, syn_sent) = shunt_testbed::hbone::sockets_to(silent, &fill);
    println!("300 reset tunnels: {left} upstream sockets left ({syn_sent} SYN-SENT)");
    assert!(
        left < 10,
        "{left} upstream connects outlive their reset tunnels"
    );
}

/// ipBlocks that tell the claimed source from the TCP peer (127.0.0.1):
/// admin-only also ALLOWs curl's and admin's pod addresses; echo DENYs
/// loopback.
const IP_BLOCKS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: admin-only-pods
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: admin-only
  action: ALLOW
  rules:
  - from:
    - source:
        ipBlocks: ["10.244.1.19/32", "10.244.1.20/32"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: echo-no-loopback
  namespace: common-infrastructure
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: echo
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["127.0.0.0/8"]
"#;

/// A tunnel from `src`'s certificate claiming `claimed`: the HTTP status
/// of the CONNECT (200 when it relays a byte).
async fn claim(env: &Env, src: &str, claimed: &str, authority: SocketAddr) -> u16 {
    let mut req = env.request(src, authority);
    req.source_addr = claimed.parse().unwrap();
    match tokio::time::timeout(T, env.client.connect(&req))
        .await
        .unwrap()
    {
        Ok(t) => {
            let mut io = t.into_stream();
            io.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            io.read_exact(&mut b).await.unwrap();
            200
        }
        Err(e) => e.status().map(|s| s.as_u16()).unwrap_or(0),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_of_the_certificates_own_workload_is_believed() {
    let env = Env::with_files(&[("30-ipblocks.yaml", IP_BLOCKS)]).await;
    let admin_only = env.vip("admin-only.example", 9000);
    let echo = env.vip("echo.example", 9000);
    // curl's certificate naming curl's pod: its ipBlocks ALLOW admits it,
    // the DENY on loopback (the TCP peer) does not apply.
    assert_eq!(
        claim(&env, CURL, "10.244.1.19:40001", admin_only).await,
        200
    );
    assert_eq!(claim(&env, CURL, "10.244.1.19:40002", echo).await, 200);
    env.lines
        .wait_for(&[
            "src.addr=10.244.1.19:40001",
            "dst.service=\"admin-only.example\"",
        ])
        .await;
    let (_, m) = get_text(env.wp.metrics_addr().unwrap(), "/metrics").await;
    assert!(m.contains("shunt_forwarded_rejected_total 0"), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_of_another_workload_or_none_is_replaced_by_the_peer() {
    let env = Env::with_files(&[("30-ipblocks.yaml", IP_BLOCKS)]).await;
    let admin_only = env.vip("admin-only.example", 9000);
    let echo = env.vip("echo.example", 9000);
    // curl's certificate naming admin's pod: the ALLOW for admin's address
    // does not admit it, and the DENY on its real peer applies.
    assert_eq!(
        claim(&env, CURL, "10.244.1.20:40003", admin_only).await,
        401
    );
    assert_eq!(claim(&env, CURL, "10.244.1.20:40004", echo).await, 401);
    // An address of no workload: the same.
    assert_eq!(claim(&env, CURL, "10.9.9.9:40005", admin_only).await, 401);
    // The refusal line names the peer, never the claim.
    let line = env
        .lines
        .wait_for(&["dst.service=\"admin-only.example\"", "src.addr=127.0.0.1:"])
        .await;
    assert!(line.contains("authorization policy"), "{line}");
    // No workload lives at the peer address: none is named.
    assert!(!line.contains("src.workload="), "{line}");
    // HTTP ports too: the Envoy line's downstream address is the peer.
    let mut req = env.request(CURL, env.vip("httpbin.org", 80));
    req.source_addr = "10.244.1.20:40007".parse().unwrap();
    let mut h1 = h1_over(env.client.connect(&req).await.unwrap().into_stream()).await;
    assert_eq!(send(&mut h1, "GET", "/get?l7", "httpbin.org").await.0, 200);
    let l7 = env.lines.wait_for(&["\"GET /get?l7 HTTP/1.1\" 200"]).await;
    assert!(l7.contains(" 127.0.0.1:"), "{l7}");
    assert!(
        !env.lines.text().contains("10.244.1.20:4000"),
        "{}",
        env.lines.text()
    );
    assert!(
        !env.lines.text().contains("10.9.9.9"),
        "{}",
        env.lines.text()
    );
    let (_, m) = get_text(env.wp.metrics_addr().unwrap(), "/metrics").await;
    assert!(m.contains("shunt_forwarded_rejected_total 4"), "{m}");
    // Admin's own certificate naming admin's pod is believed.
    assert_eq!(claim(&env, ADMIN, "10.244.1.20:40006", echo).await, 200);
}

// ------------------------------------------------------------- wildcards

/// A DYNAMIC_DNS wildcard bound to the waypoint (the namespace's label).
/// `.invalid` names never resolve (RFC 6761), so the waypoint's own lookup
/// fails at once.
const WILDCARD_CONFIG: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: wild
  namespace: common-infrastructure
spec:
  hosts:
  - "*.wild.invalid"
  ports:
  - number: 80
    name: http
    protocol: HTTP
  - number: 443
    name: tls
    protocol: TLS
  resolution: DYNAMIC_DNS
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_http_routes_by_host_404_outside_it_503_when_the_name_does_not_resolve() {
    let env = Env::with_files(&[("40-wild.yaml", WILDCARD_CONFIG)]).await;
    let mut s = env.h1(CURL, "*.wild.invalid").await;
    // Not under the wildcard: no route, nothing resolved or connected.
    let (code, _) = send(&mut s, "GET", "/get", "other.example").await;
    assert_eq!(code, 404);
    env.lines
        .wait_for(&["404 NR route_not_found", "\"other.example\""])
        .await;
    // The suffix itself is not under it either.
    let (code, _) = send(&mut s, "GET", "/get", "wild.invalid").await;
    assert_eq!(code, 404);
    // Under it, but the name does not resolve: 503, the reason logged.
    let (code, _) = send(&mut s, "GET", "/get", "a.wild.invalid:80").await;
    assert_eq!(code, 503);
    let line = env
        .lines
        .wait_for(&["\" 503 UF ", "\"a.wild.invalid:80\""])
        .await;
    assert!(line.contains("resolving a.wild.invalid:80"), "{line}");
    assert!(env.http_seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_tls_refuses_names_outside_it_no_sni_and_unresolvable_names() {
    let env = Env::with_files(&[("40-wild.yaml", WILDCARD_CONFIG)]).await;
    let get = |sni: &'static str| {
        let env = &env;
        async move {
            let io = env.tunnel(CURL, env.vip("*.wild.invalid", 443)).await;
            let name = rustls::pki_types::ServerName::try_from(sni).unwrap();
            tokio::time::timeout(
                T,
                tls_connector(rustls::RootCertStore::empty()).connect(name, io),
            )
            .await
            .expect("TLS handshake timed out")
            .is_ok()
        }
    };
    assert!(!get("secure.example").await);
    env.lines
        .wait_for(&[
            "sni=\"secure.example\"",
            "is not a host of ServiceEntry common-infrastructure/wild",
        ])
        .await;
    assert!(!get("127.0.0.1").await);
    env.lines
        .wait_for(&[
            "dst.service=\"*.wild.invalid\"",
            "without server_name (SNI)",
        ])
        .await;
    assert!(!get("b.wild.invalid").await);
    env.lines
        .wait_for(&["sni=\"b.wild.invalid\"", "resolving b.wild.invalid:443"])
        .await;
    assert!(env.tls_seen.lock().unwrap().is_empty());
}

// ------------------------------------------------- allocation lag (#11)

/// A ServiceEntry bound to the waypoint (the namespace's label) that the
/// allocation of [`Env`] does not know.
fn late_entry() -> String {
    ServiceEntry {
        name: "late",
        namespace: NS,
        hosts: &["late.example"],
        ports: &[Port::tcp(9000, 9)],
        endpoints: &["127.0.0.1"],
        ..Default::default()
    }
    .yaml()
}

/// What the agent does on its own poll: allocates the directory's config
/// and writes vips.json; the VIP of late.example.
fn agent_allocates(cfg_dir: &Path, state_dir: &Path) -> IpAddr {
    let cfg = Config::load_dir(cfg_dir).unwrap();
    let mut a = Allocator::open(state_dir).unwrap();
    IpAddr::V4(a.allocate(&cfg).unwrap().hosts["late.example"].v4.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_entry_is_first_applied_with_the_vip_the_agent_allocates_for_it() {
    let env = Env::new().await;
    let before = env.wp.routes().digest;
    std::fs::write(env.cfg_dir.join("30-late.yaml"), late_entry()).unwrap();
    // The waypoint polls every 100 ms; the agent allocates after it, as
    // when the agent's poll comes later or its reconcile takes longer.
    let (cfg_dir, state_dir) = (env.cfg_dir.clone(), env.state_dir.clone());
    let agent = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(800)).await;
        agent_allocates(&cfg_dir, &state_dir)
    });
    let deadline = tokio::time::Instant::now() + T;
    let first = loop {
        let r = env.wp.routes();
        if r.digest != before {
            break r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "config never applied"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    let vip = agent.await.unwrap();
    assert!(
        first.vips.contains(&vip),
        "the waypoint applied the config with late.example before its VIP {vip}: {:?}",
        first.vips
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vip_the_agent_writes_after_the_waypoint_started_is_routed_within_a_second() {
    // A reload interval far longer than the test: only the lag check can
    // pick the allocation up in time.
    let late = late_entry();
    let env = Env::start(&[], &[("30-late.yaml", &late)], Duration::from_secs(60)).await;
    let vip = agent_allocates(&env.cfg_dir, &env.state_dir);
    let written = std::time::Instant::now();
    while !env.wp.routes().vips.contains(&vip) {
        assert!(
            written.elapsed() < Duration::from_secs(3),
            "VIP {vip} of late.example not routed 3 s after vips.json was written"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert!(
        written.elapsed() < Duration::from_secs(1),
        "routed {:?} after vips.json was written",
        written.elapsed()
    );
}

/// An HTTP/1.1 upstream that answers each request after `delay`, counting
/// the connections it accepted and those still open.
async fn slow_upstream(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (accepted, open) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, o) = (accepted.clone(), open.clone());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            a.fetch_add(1, Ordering::SeqCst);
            o.fetch_add(1, Ordering::SeqCst);
            let o = o.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
                o.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, accepted, open)
}

/// Pooled upstream connections hold fds that no tunnel counts once their
/// request is done; the waypoint keeps at most half of its fd reserve of
/// them (`pool::IdleBudget`). Here a reserve of 4: 5 requests at once need
/// 5 upstream connections, 2 stay pooled and the other 3 close after their
/// response; the next 5 reuse the 2 and open 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_upstream_connections_stay_within_half_the_fd_reserve() {
    let (up, accepted, open) = slow_upstream(Duration::from_millis(300)).await;
    let entry = ServiceEntry {
        name: "pooled",
        namespace: NS,
        hosts: &["pooled.example"],
        ports: &[Port {
            number: 80,
            name: "http",
            protocol: "HTTP",
            target_port: Some(up.port()),
        }],
        resolution: "STATIC",
        endpoints: &["127.0.0.1"],
        ..Default::default()
    }
    .yaml();
    let env = Arc::new(
        Env::start_with(
            &[("30-pooled.yaml", &entry)],
            &[],
            Duration::from_millis(100),
            |o| {
                o.server.fd_budget = Some(shunt_agent::sockets::FdBudget {
                    total: 10_000,
                    per_source: 10_000,
                    fd_limit: 20_000,
                    reserve: 4,
                })
            },
        )
        .await,
    );
    let open_now = || open.load(Ordering::SeqCst);
    let wait_open = |n: usize| async move {
        for _ in 0..100 {
            if open_now() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{} upstream connections open, expected {n}", open_now());
    };
    for (round, want_accepted) in [(1, 5), (2, 8)] {
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..5 {
            let env = env.clone();
            clients.spawn(async move {
                let mut c = env.h1(CURL, "pooled.example").await;
                send(&mut c, "GET", "/", "pooled.example").await
            });
        }
        while let Some(r) = clients.join_next().await {
            assert_eq!(r.unwrap(), (200, "ok".to_string()), "round {round}");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            want_accepted,
            "round {round}: upstream connections opened"
        );
        wait_open(2).await;
    }
}

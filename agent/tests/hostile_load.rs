//! Hostile load on the real `shunt waypoint` binary (loopback): idle
//! connections beyond its fd limit, and slow ClientHellos beyond its
//! budgets. After each, a legitimate tunnel works and the process is alive.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use shunt_agent::alloc::Allocator;
use shunt_agent::config::Config;
use shunt_agent::hbone::{ClientSettings, ConnectRequest, HboneClient};
use shunt_agent::identity::{Ca, IdentityConfig, IdentityManager};
use shunt_testbed::hbone::echo_upstream;
use shunt_testbed::mesh::{self, Port, ServiceEntry};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const TD: &str = "cluster.local";
const CURL: &str = "spiffe://cluster.local/ns/default/sa/curl";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway";

fn config_text(echo: SocketAddr) -> String {
    const NS: &str = "common-infrastructure";
    mesh::docs(&[
        mesh::namespace(NS, Some("egress-gateway")),
        mesh::waypoint("egress-gateway", NS, "127.0.0.1"),
        ServiceEntry {
            name: "echo",
            namespace: NS,
            hosts: &["echo.example"],
            ports: &[Port::tcp(9000, echo.port())],
            endpoints: &["127.0.0.1"],
            ..Default::default()
        }
        .yaml(),
    ])
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `shunt waypoint` child; killed on drop.
struct Waypoint {
    child: Child,
    hbone: SocketAddr,
    metrics: SocketAddr,
    vip: SocketAddr,
    ids: IdentityManager,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Waypoint {
    /// Starts the binary, under `prlimit --nofile=N` when `nofile` is set.
    async fn start(nofile: Option<u32>, extra: &[&str]) -> Waypoint {
        let dir = tempfile::tempdir().unwrap();
        let (ca_dir, cfg_dir, state_dir) = (
            dir.path().join("ca"),
            dir.path().join("config"),
            dir.path().join("state"),
        );
        for d in [&ca_dir, &cfg_dir, &state_dir] {
            std::fs::create_dir_all(d).unwrap();
        }
        let ca = Arc::new(Ca::init(&ca_dir, TD, false).unwrap());
        let echo = echo_upstream().await;
        std::fs::write(cfg_dir.join("10-objects.yaml"), config_text(echo)).unwrap();
        let cfg = Config::load_dir(&cfg_dir).unwrap();
        let alloc = Allocator::open(&state_dir)
            .unwrap()
            .allocate(&cfg)
            .unwrap()
            .clone();
        let vip = SocketAddr::new(IpAddr::V4(alloc.hosts["echo.example"].v4.unwrap()), 9000);
        let hbone = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.path().join("waypoint.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = match nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}"))
                    .arg("--")
                    .arg(env!("CARGO_BIN_EXE_shunt"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_shunt")),
        };
        cmd.arg("waypoint")
            .args(["--config-dir".as_ref(), cfg_dir.as_os_str()])
            .args(["--state-dir".as_ref(), state_dir.as_os_str()])
            .args(["--ca-dir".as_ref(), ca_dir.as_os_str()])
            .args(["--listen", &hbone.to_string()])
            .args(["--admin", "127.0.0.1:0"])
            .args(["--metrics", &metrics.to_string()])
            .args(["--ready", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = cmd.spawn().expect("spawning shunt waypoint");
        let ids = IdentityManager::new(ca, TD, IdentityConfig::default()).unwrap();
        let mut wp = Waypoint {
            child,
            hbone,
            metrics,
            vip,
            ids,
            log,
            _dir: dir,
        };
        for _ in 0..300 {
            if TcpStream::connect(hbone).await.is_ok() {
                return wp;
            }
            assert!(wp.alive(), "waypoint exited at start:\n{}", wp.log_text());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("waypoint never listened:\n{}", wp.log_text());
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn open_fds(&self) -> usize {
        // The waypoint itself: prlimit execs it in place, same pid.
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    async fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    /// One echo round trip through a fresh HBONE connection (a new TLS
    /// handshake), with the `curl` identity.
    async fn echo_once(&self) -> Result<(), String> {
        let client = HboneClient::new(self.ids.clone(), ClientSettings::default());
        let req = ConnectRequest {
            source_identity: CURL.parse().unwrap(),
            source_addr: "10.244.1.19:45678".parse().unwrap(),
            waypoint_addr: self.hbone,
            waypoint_identity: WAYPOINT_ID.parse().unwrap(),
            authority: self.vip,
            host: None,
            baggage: None,
            traceparent: None,
        };
        let t = tokio::time::timeout(Duration::from_secs(10), client.connect(&req))
            .await
            .map_err(|_| "tunnel timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut s = t.into_stream();
        s.write_all(b"ping").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut buf))
            .await
            .map_err(|_| "echo timed out".to_string())?
            .map_err(|e| e.to_string())?;
        if &buf != b"ping" {
            return Err(format!("echo answered {buf:?}"));
        }
        Ok(())
    }

    /// A legitimate tunnel works, allowing a backoff of a few seconds.
    async fn echo_works(&self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..10 {
            match self.echo_once().await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err(last)
    }
}

fn metric(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn connect_from(src: IpAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(dst).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_beyond_the_fd_limit_do_not_stop_the_waypoint() {
    shunt_agent::sockets::raise_fd_limit().unwrap();
    let mut wp = Waypoint::start(Some(1024), &[]).await;
    wp.echo_works().await.expect("before the flood");

    let mut idle = Vec::new();
    for _ in 0..2000 {
        // The kernel completes handshakes into the accept queue whether or
        // not the waypoint can accept them; past the queue, SYNs are dropped
        // and the connect times out: keep what connected.
        if let Ok(Ok(s)) =
            tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(wp.hbone)).await
        {
            idle.push(s);
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        wp.alive(),
        "waypoint exited under the flood:\n{}",
        wp.log_text()
    );
    let held = idle.len();
    let fds_during = wp.open_fds();
    drop(idle);
    tokio::time::sleep(Duration::from_secs(1)).await;

    wp.echo_works().await.expect("after the flood");
    assert!(wp.alive(), "waypoint exited:\n{}", wp.log_text());
    let m = wp.metrics_text().await;
    let emfile = metric(
        &m,
        r#"shunt_accept_errors_total{listener="hbone",reason="emfile"}"#,
    );
    assert!(emfile > 0, "the flood reached the fd limit:\n{m}");
    let log = wp.log_text();
    let accept_lines = log.matches("accept failed").count();
    eprintln!(
        "held {held} idle connections; waypoint fds during the flood {fds_during}; \
         {emfile} EMFILE accept errors counted, {accept_lines} log lines about them"
    );
    assert!(
        (accept_lines as u64) < emfile.max(2),
        "accept errors are logged at a limited rate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_hellos_are_bounded_by_the_budgets_and_real_clients_get_through() {
    shunt_agent::sockets::raise_fd_limit().unwrap();
    let wp = Waypoint::start(
        None,
        &[
            "--max-connections-per-source",
            "200",
            "--max-handshakes",
            "400",
            "--handshake-timeout",
            "30s",
        ],
    )
    .await;
    let baseline = wp.open_fds();
    let attacker: IpAddr = "127.0.0.2".parse().unwrap();
    // A TLS handshake record header, then one byte at a time.
    const HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];
    let mut slow = Vec::new();
    for _ in 0..3000 {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_millis(200), connect_from(attacker, wp.hbone)).await
        {
            let _ = s.write_all(&HELLO[..1]).await;
            slow.push(s);
        }
    }
    let mut peak = 0;
    for round in 1..HELLO.len() {
        for s in &mut slow {
            let _ = s.write_all(&HELLO[round..=round]).await;
        }
        peak = peak.max(wp.open_fds());
        wp.echo_once()
            .await
            .unwrap_or_else(|e| panic!("a legitimate tunnel during the flood failed: {e}"));
    }
    let m = wp.metrics_text().await;
    let refused = metric(
        &m,
        r#"shunt_refused_connections_total{listener="hbone",reason="per_source_limit"}"#,
    );
    eprintln!(
        "{} slow ClientHello connections opened; waypoint fds: baseline {baseline}, peak {peak}; \
         {refused} refused for the per-source budget",
        slow.len()
    );
    assert!(
        peak <= baseline + 200 + 50,
        "fds stay within the per-source budget (baseline {baseline}, peak {peak})"
    );
    assert!(refused > 0, "the budget refused the excess:\n{m}");
    drop(slow);
    wp.echo_works().await.expect("after the flood");
}

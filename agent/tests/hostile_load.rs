//! Hostile load on the real `shunt waypoint` binary (loopback): idle
//! connections beyond its fd limit, tunnels beyond its fd budget, and slow
//! ClientHellos beyond its budgets. After each, a legitimate tunnel works
//! and the process is alive.
//! And on the real `shunt agent` on the kernel (root; a testbed node): a
//! pod flooding captured connections beyond its budget, or its DNS proxy
//! with names to forward, under a low fd limit, while another pod and a
//! config edit still get through.

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
    // The fd budget (512 of 1024, 256 per source) closes the flood's
    // connections at accept before the process reaches its limit.
    let refused = metric(&m, r#"shunt_refused_connections_total{listener="hbone""#);
    let emfile = metric(
        &m,
        r#"shunt_accept_errors_total{listener="hbone",reason="emfile"}"#,
    );
    let log = wp.log_text();
    let refused_lines = log.matches("connection budget spent").count();
    eprintln!(
        "held {held} idle connections; waypoint fds during the flood {fds_during}; \
         {refused} refused at accept, {refused_lines} log lines about them; {emfile} EMFILE"
    );
    assert!(refused > 0, "the flood was refused by the budget:\n{m}");
    assert_eq!(
        emfile, 0,
        "the budget kept the waypoint below its fd limit:\n{m}"
    );
    assert!(fds_during < 1000, "fds during the flood: {fds_during}");
    assert!(
        (refused_lines as u64) < refused.max(2),
        "refusals are logged at a limited rate"
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

// ------------------------------------------- the agent's capture budget

/// Runs `f` on a thread of its own in the network namespace at `ns`; the
/// sockets it creates stay in that namespace wherever they are used.
fn in_netns<T: Send>(ns: &std::path::Path, f: impl FnOnce() -> T + Send) -> T {
    use std::os::fd::AsRawFd;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(ns).unwrap();
                // SAFETY: a valid fd; only this thread changes namespace.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {}", ns.display());
                f()
            })
            .join()
            .unwrap()
    })
}

/// One echo round trip over `s`.
fn ping(s: &mut std::net::TcpStream) -> std::io::Result<()> {
    use std::io::{Read, Write};
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(b"ping")?;
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf)?;
    if &buf != b"ping" {
        return Err(std::io::Error::other(format!("echo answered {buf:?}")));
    }
    Ok(())
}

fn ping_from(pod: &shunt_testbed::Pod, vip: SocketAddr) -> std::io::Result<()> {
    in_netns(&pod.ns.path(), || {
        let mut s = std::net::TcpStream::connect_timeout(&vip, Duration::from_secs(5))?;
        ping(&mut s)
    })
}

/// An echo server on `addr` in namespace `ns`, served by `rt`.
fn echo_in(rt: &tokio::runtime::Runtime, ns: &std::path::Path, addr: SocketAddr) {
    let listener = in_netns(ns, || std::net::TcpListener::bind(addr)).unwrap();
    listener.set_nonblocking(true).unwrap();
    rt.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

/// `GET /metrics` of the agent (default address, in the node namespace).
fn agent_metrics(node: &shunt_testbed::Node) -> String {
    use std::io::{Read, Write};
    in_netns(&node.ns.path(), || {
        let mut s = std::net::TcpStream::connect("127.0.0.1:15020").unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
}

fn echo_entry(name: &str, host: &str, port: u16, endpoint: &str) -> String {
    ServiceEntry {
        name,
        namespace: mesh::NAMESPACE,
        waypoint: Some(mesh::WAYPOINT),
        hosts: &[host],
        ports: &[Port::tcp(port, 7000)],
        endpoints: &[endpoint],
        ..Default::default()
    }
    .yaml()
}

/// The flood tests' mesh: the pods `app` (the flooder) and `other`, the
/// echo upstream behind the waypoint at [`FloodMesh::vip`], a CA, the config
/// with `mesh_yaml`, the real agent under an fd limit of [`FLOOD_NOFILE`]
/// with `agent_args`, and the waypoint. Fields drop in order: the waypoint
/// before the node whose pod it runs in.
struct FloodMesh {
    _waypoint: shunt_testbed::Proc,
    node: shunt_testbed::Node,
    _rt: tokio::runtime::Runtime,
    vip: SocketAddr,
    /// Services programmed once the agent applied the config.
    services_before: usize,
}

const FLOOD_NOFILE: u64 = 1024;

impl FloodMesh {
    fn start(mesh_yaml: &str, agent_args: &[&str]) -> shunt_testbed::Result<FloodMesh> {
        shunt_agent::sockets::raise_fd_limit()?;
        let rt = tokio::runtime::Runtime::new()?;
        let mut node = mesh::node()?;
        node.add_pod("other")?;
        let (wp_ip, inet_ip) = (node.pod("wp").ip4.clone(), node.pod("inet").ip4.clone());
        echo_in(
            &rt,
            &node.pod("inet").ns.path(),
            SocketAddr::new(inet_ip.parse()?, 7000),
        );
        let ca_dir = node.work_dir.join("ca");
        Ca::init(&ca_dir, TD, false)?;
        node.write_config("mesh.yaml", mesh_yaml)?;
        let mut docs = mesh::base(
            node.pod("app").workload_entry(mesh::NAMESPACE, "app"),
            &wp_ip,
        );
        docs.push(node.pod("other").workload_entry(mesh::NAMESPACE, "other"));
        docs.push(echo_entry("echo", "echo.internal", 9000, &inet_ip));
        node.write_config("00-mesh.yaml", &mesh::docs(&docs))?;
        let (cfg, ca, state) = (
            node.config_dir().display().to_string(),
            ca_dir.display().to_string(),
            node.state_dir.display().to_string(),
        );
        let nofile = format!("--nofile={FLOOD_NOFILE}:{FLOOD_NOFILE}");
        let mut args = vec!["--config-dir", &cfg, "--ca-dir", &ca];
        args.extend_from_slice(agent_args);
        node.start_agent(
            std::path::Path::new("prlimit"),
            &[nofile.as_str(), "--", env!("CARGO_BIN_EXE_shunt"), "agent"],
            &args,
        )?;
        let maps = node.maps()?;
        let services_before =
            shunt_testbed::wait_for("services programmed", Duration::from_secs(20), || {
                let n = maps.read_services().map(|s| s.len()).unwrap_or(0);
                (n > 0).then_some(n)
            })?;
        let waypoint =
            mesh::start_waypoint(&node, None, &mesh::waypoint_args(&cfg, &state, &ca), "info")?;
        Ok(FloodMesh {
            _waypoint: waypoint,
            node,
            _rt: rt,
            vip: "240.240.0.1:9000".parse()?,
            services_before,
        })
    }
}

/// #14's finding: a pod's connect loop filled every fd of the agent, and
/// the config watcher's reads and the netlink lookups failed with EMFILE
/// while it lasted. Under a low fd limit (1024: a budget of 512), a pod
/// opening far more connections than its per-source budget (150) gets that
/// many carried and the rest reset at accept, counted; another pod still
/// gets through, and the agent takes a config edit while the flood holds.
#[test]
fn a_pod_flooding_captured_connections_is_refused_beyond_its_budget_and_config_still_applies(
) -> shunt_testbed::Result<()> {
    const FLOOD: usize = 1500;
    const PER_SOURCE: usize = 150;
    const NOFILE: u64 = FLOOD_NOFILE;
    let per_source = PER_SOURCE.to_string();
    let m = FloodMesh::start(
        "trustDomain: cluster.local\n",
        &[
            "--no-dns",
            "--max-captured-connections-per-source",
            &per_source,
        ],
    )?;
    let (node, vip, before) = (&m.node, m.vip, m.services_before);
    let maps = node.maps()?;
    let services = || maps.read_services().map(|s| s.len()).unwrap_or(0);
    let inet_ip = node.pod("inet").ip4.clone();
    ping_from(node.pod("app"), vip).expect("app reaches the echo before the flood");

    let mut flood = in_netns(&node.pod("app").ns.path(), || {
        (0..FLOOD)
            .filter_map(|_| {
                std::net::TcpStream::connect_timeout(&vip, Duration::from_millis(200)).ok()
            })
            .collect::<Vec<_>>()
    });
    let agent_pid = node.agents[0].pid();
    let fds_during = std::fs::read_dir(format!("/proc/{agent_pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);

    // The bug: without the budget this read failed with EMFILE (checked
    // first: without it, pinging the connections left in the accept queue
    // would wait for each).
    node.write_config(
        "10-edit.yaml",
        &echo_entry("echo2", "echo2.internal", 9001, &inet_ip),
    )?;
    let after = shunt_testbed::wait_for(
        "the edit programmed during the flood",
        Duration::from_secs(30),
        || {
            let n = services();
            (n > before).then_some(n)
        },
    )
    .map_err(|e| {
        anyhow::anyhow!(
            "{e}; agent log:\n{}",
            shunt_testbed::tail(&node.work_dir.join("agent-0.log"), 30)
        )
    })?;
    ping_from(node.pod("other"), vip).expect("another pod gets through during the flood");
    let mut carried = 0;
    for s in &mut flood {
        if ping(s).is_ok() {
            carried += 1;
        }
    }
    let m = agent_metrics(node);
    let refused = metric(
        &m,
        r#"shunt_refused_connections_total{listener="capture",reason="per_source_limit"}"#,
    );
    let log = node.agents[0].log_text();
    let log_lines = log.matches("connection budget spent").count();
    eprintln!(
        "{} of {FLOOD} connects completed; {carried} carried, {refused} refused for the \
         per-source budget ({log_lines} log lines); agent fds during the flood {fds_during} \
         of {NOFILE}; services {before} -> {after}",
        flood.len()
    );
    assert!(
        (1..=PER_SOURCE).contains(&carried),
        "the flooding pod got at most its budget carried: {carried}"
    );
    assert!(
        refused as usize >= flood.len() - carried,
        "every connection not carried was refused and counted ({refused}):\n{m}"
    );
    assert!(
        (log_lines as u64) < refused.max(2),
        "refusals are logged at a limited rate"
    );
    // Its places come back as its connections' relays end.
    drop(flood);
    shunt_testbed::wait_for(
        "app reaching the echo after the flood",
        Duration::from_secs(20),
        || ping_from(node.pod("app"), vip).ok(),
    )?;
    Ok(())
}

/// Sends `n` A queries for random names over `secs` seconds from one
/// connected UDP socket (captured at connect), never reading answers.
const DNS_FLOODER: &str = r#"
import os, socket, struct, sys, time
dst, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, 53))
print("flood started", flush=True)
start = time.time()
for i in range(n):
    q = struct.pack(">HHHHHH", i & 0xffff, 0x0100, 1, 0, 0, 0)
    for label in (os.urandom(8).hex(), "flood", "example"):
        q += bytes([len(label)]) + label.encode()
    try:
        s.send(q + b"\x00" + struct.pack(">HH", 1, 1))
    except OSError:
        pass
    lag = start + secs * (i + 1) / n - time.time()
    if lag > 0:
        time.sleep(lag)
print("flood sent", flush=True)
"#;

/// Session 7's finding: the DNS proxy forwarded up to 4,096 queries at
/// once, one UDP socket each, whatever the agent's fd limit, so a pod's
/// flood of names towards a slow upstream could take every fd the captured
/// connections and the config watcher need. Under a limit of 1024 its
/// sockets fit in its share (256 fds: 224 forwards) even with a per-client
/// share set far above that (`--dns-max-inflight-per-client 4096`: the
/// total still caps it); the flood's excess is dropped and counted, and
/// another pod's connection and a config edit still get through.
#[test]
fn a_dns_flood_under_a_low_fd_limit_stays_in_the_dns_share_and_connections_still_work(
) -> shunt_testbed::Result<()> {
    const NOFILE: u64 = FLOOD_NOFILE;
    const POD_RESOLVER: &str = "10.96.0.10";
    const BLACKHOLE_DNS: &str = "192.0.2.53";
    let m = FloodMesh::start(
        "trustDomain: cluster.local\nshunt:\n  dnsCapture: true\n",
        &[
            "--dns-upstream",
            BLACKHOLE_DNS,
            "--dns-max-inflight-per-client",
            "4096",
        ],
    )?;
    let (node, vip, before) = (&m.node, m.vip, m.services_before);
    let maps = node.maps()?;
    let services = || maps.read_services().map(|s| s.len()).unwrap_or(0);
    let inet_ip = node.pod("inet").ip4.clone();
    // Every forward holds its socket for the whole upstream timeout.
    // Dropped before `m`: it runs in the node's namespace.
    let _sink = node.blackhole_dns(BLACKHOLE_DNS)?;
    ping_from(node.pod("other"), vip).expect("other reaches the echo before the flood");
    let log = node.agents[0].log_text();
    assert!(
        log.contains("DNS proxy ready")
            && log.contains("max_forwards=224")
            && log.contains("max_forwards_per_client=4096"),
        "the DNS budgets fitted to the fd limit are logged:\n{log}"
    );

    // 40,000 names in 10 s: with a 2 s upstream timeout, ~8,000 forwards
    // would be waiting at once without the fd share.
    let flood_log = node.work_dir.join("dns-flood.log");
    let mut flood = node.pod("app").spawn(
        std::path::Path::new("python3"),
        &["-c", DNS_FLOODER, POD_RESOLVER, "40000", "10"],
        &flood_log,
    )?;
    shunt_testbed::wait_for("flood started", Duration::from_secs(10), || {
        flood.log_text().contains("flood started").then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(3));
    let agent_pid = node.agents[0].pid();
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent_pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    let mut peak = fds();
    // The victims, while the flood runs: a new connection from another pod
    // and a config edit (the watcher reads the directory).
    let other = ping_from(node.pod("other"), vip);
    peak = peak.max(fds());
    node.write_config(
        "10-edit.yaml",
        &echo_entry("echo2", "echo2.internal", 9001, &inet_ip),
    )?;
    let after = shunt_testbed::wait_for(
        "the edit programmed during the flood",
        Duration::from_secs(30),
        || {
            peak = peak.max(fds());
            let n = services();
            (n > before).then_some(n)
        },
    );
    let flood_running = !flood.log_text().contains("flood sent");
    assert!(flood.wait_exit(Duration::from_secs(60)), "flooder exits");
    let m = agent_metrics(node);
    let dropped = metric(&m, r#"shunt_dns_dropped_total{reason="total_budget""#);
    eprintln!(
        "agent fds at peak during the flood {peak} of {NOFILE}; other pod: {other:?}; \
         edit: {after:?}; {dropped} queries dropped for the total budget; flood still \
         running at the end of the checks: {flood_running}"
    );
    assert!(flood_running, "the checks ran during the flood");
    other.expect("another pod's connection got through during the flood");
    after.map_err(|e| {
        anyhow::anyhow!(
            "{e}; agent log:\n{}",
            shunt_testbed::tail(&node.work_dir.join("agent-0.log"), 30)
        )
    })?;
    assert!(
        (peak as u64) < NOFILE - 256,
        "the DNS proxy's sockets stayed in their share: {peak} fds of {NOFILE}"
    );
    assert!(
        dropped > 0,
        "the flood's excess was dropped and counted:\n{m}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_beyond_the_waypoint_s_fd_budget_get_503_and_its_config_still_applies() {
    shunt_agent::sockets::raise_fd_limit().unwrap();
    // 1024 fds: a budget of 512 (the reserve keeps 512), 256 per source.
    let mut wp = Waypoint::start(Some(1024), &[]).await;
    wp.echo_works().await.expect("before the flood");
    let log = wp.log_text();
    assert!(
        log.contains("HBONE fd budget")
            && log.contains("total=512")
            && log.contains("per_source=256"),
        "the budget is logged at start:\n{log}"
    );

    // One client (one source) opens more tunnels than the waypoint has fds,
    // each holding an upstream socket: without the budget they take every
    // fd and the config directory cannot be read.
    let client = HboneClient::new(wp.ids.clone(), ClientSettings::default());
    let req = ConnectRequest {
        source_identity: CURL.parse().unwrap(),
        source_addr: "10.244.1.19:45678".parse().unwrap(),
        waypoint_addr: wp.hbone,
        waypoint_identity: WAYPOINT_ID.parse().unwrap(),
        authority: wp.vip,
        host: None,
        baggage: None,
        traceparent: None,
    };
    let (mut held, mut refused, mut other) = (Vec::new(), 0, Vec::new());
    for _ in 0..1100 {
        match tokio::time::timeout(Duration::from_secs(10), client.connect(&req)).await {
            Ok(Ok(t)) => held.push(t),
            Ok(Err(shunt_agent::hbone::HboneError::Status(s))) if s == 503 => refused += 1,
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("timed out".into()),
        }
    }
    let fds_during = wp.open_fds();
    eprintln!(
        "{} tunnels held, {refused} answered 503, {} other failures; waypoint fds {fds_during}",
        held.len(),
        other.len()
    );
    assert!(wp.alive(), "waypoint exited:\n{}", wp.log_text());
    assert!(
        refused > 0,
        "nothing was refused; other failures: {other:?}"
    );
    assert!(
        held.len() <= 256,
        "one source holds at most its share: {}",
        held.len()
    );
    assert!(fds_during < 900, "the budget kept fds free: {fds_during}");

    // A config edit while the tunnels are held.
    let cfg_dir = wp._dir.path().join("config");
    std::fs::write(
        cfg_dir.join("20-more.yaml"),
        ServiceEntry {
            name: "echo2",
            namespace: "common-infrastructure",
            hosts: &["echo2.example"],
            ports: &[Port::tcp(9001, 9001)],
            endpoints: &["127.0.0.1"],
            ..Default::default()
        }
        .yaml(),
    )
    .unwrap();
    let mut applied = false;
    for _ in 0..100 {
        if wp.log_text().contains("service_entries=2") {
            applied = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        applied,
        "the edit was not applied while the tunnels were held:\n{}",
        wp.log_text()
    );
    let m = wp.metrics_text().await;
    let counted = metric(
        &m,
        r#"shunt_refused_connections_total{listener="hbone_tunnel""#,
    );
    assert_eq!(counted, refused as u64, "refusals counted:\n{m}");
    let lines = wp.log_text().matches("answering a new tunnel 503").count();
    assert!(lines < refused, "logged at a limited rate: {lines} lines");

    // Released places are free again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(500)).await;
    wp.echo_works().await.expect("after the flood");
}

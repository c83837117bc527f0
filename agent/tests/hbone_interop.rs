//! Interop with an independent HTTP/2 implementation: python's `h2` package
//! (Debian python3-h2) over python's ssl module, as HBONE client against
//! `HboneServer` and as HBONE server for `HboneClient`.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use shunt_agent::identity::{Ca, SpiffeId};
use shunt_testbed::hbone::*;

/// A python interpreter that has `h2` (pyenv shims may hide Debian's).
fn python() -> String {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import h2"])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success());
        if matches!(ok, Ok(true)) {
            return p.to_string();
        }
    }
    panic!("no python3 with the h2 package: apt-get install python3-h2");
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/interop")
        .join(name)
}

/// Writes cert chain, key and root PEM for `id`; returns their paths.
fn write_identity(ca: &Ca, dir: &Path, id: &SpiffeId, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let c = ca.issue(id, Duration::from_secs(3600)).unwrap();
    let (cert, key, root) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
        dir.join("root.pem"),
    );
    std::fs::write(&cert, c.chain_pem()).unwrap();
    std::fs::write(&key, c.key_pem()).unwrap();
    std::fs::write(&root, ca.roots_pem()).unwrap();
    (cert, key, root)
}

/// `hbone_client.py` against the HBONE server at `addr` (CONNECT to
/// 240.240.0.9:443) with the identity files `pem` (chain, key, root), plus
/// `extra` flags.
async fn python_client(
    addr: SocketAddr,
    pem: (PathBuf, PathBuf, PathBuf),
    extra: &[&str],
) -> Output {
    let (cert, key, root) = pem;
    let py = python();
    let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Command::new(py)
            .arg(script("hbone_client.py"))
            .args([
                "--addr",
                &addr.to_string(),
                "--authority",
                "240.240.0.9:443",
            ])
            .args([
                "--cert",
                cert.to_str().unwrap(),
                "--key",
                key.to_str().unwrap(),
                "--ca",
                root.to_str().unwrap(),
            ])
            .args(&extra)
            .output()
            .unwrap()
    })
    .await
    .unwrap()
}

fn json_line(line: &str) -> serde_json::Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_python_h2_client_against_hbone_server() {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let py_id = id("spiffe://cluster.local/ns/py/sa/python-client");
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    let (cert, key, root) = write_identity(&mesh.ca, mesh.dir.path(), &py_id, "py-client");

    let out = python_client(
        addr,
        (cert, key, root),
        &[
            "--expect-server-id",
            WAYPOINT,
            "--forwarded-for",
            "10.9.8.7:4321",
            "--payload",
            "3000000",
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "python client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json_line(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(v["status"], "200");
    assert_eq!(
        v["server_id"], WAYPOINT,
        "python verified the waypoint's SPIFFE identity"
    );
    assert_eq!(v["echo_ok"], true, "3 MB echoed through the waypoint: {v}");
    assert_eq!(v["received"], 3_000_000);

    let seen = handler.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].peer_identity, py_id,
        "waypoint saw python's identity"
    );
    assert_eq!(seen[0].authority, "240.240.0.9:443".parse().unwrap());
    assert_eq!(seen[0].source_addr, "10.9.8.7:4321".parse().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_python_h2_client_from_other_trust_domain_refused() {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let handler = TestHandler::new(echo_upstream().await, Mode::Forward);
    let addr = start_waypoint(&mesh.ids, &wp, handler.clone()).await;
    let bad = id("spiffe://evil.local/ns/py/sa/python-client");
    let (cert, key, root) = write_identity(&mesh.ca, mesh.dir.path(), &bad, "evil");
    let out = python_client(
        addr,
        (cert, key, root),
        &["--expect-server-id", WAYPOINT, "--payload", "10"],
    )
    .await;
    assert!(
        !out.status.success(),
        "must fail: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(handler.seen().is_empty());
}

struct PyServer {
    child: Child,
    lines: std::sync::mpsc::Receiver<String>,
    port: u16,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_py_server(ca: &Ca, dir: &Path, server_id: &SpiffeId, trust_domain: &str) -> PyServer {
    let (cert, key, root) = write_identity(ca, dir, server_id, "py-server");
    let mut child = Command::new(python())
        .arg(script("hbone_server.py"))
        .args([
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "--ca",
            root.to_str().unwrap(),
        ])
        .args(["--trust-domain", trust_domain])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("python server printed its port");
    let port = json_line(&first)["port"].as_u64().unwrap() as u16;
    PyServer {
        child,
        lines: rx,
        port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_hbone_client_against_python_h2_server() {
    let mesh = Mesh::new("cluster.local");
    let wp = id(WAYPOINT);
    let src = id(SRC);
    let server = start_py_server(&mesh.ca, mesh.dir.path(), &wp, "cluster.local");
    let waypoint: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();

    let client = client(&mesh.ids);
    let mut req = request(&src, waypoint, &wp);
    req.baggage = Some(
        shunt_agent::hbone::Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_name: Some("sleep".into()),
            ..Default::default()
        }
        .to_header()
        .unwrap(),
    );
    let tunnel = client
        .connect(&req)
        .await
        .expect("python server accepted the tunnel");
    assert_eq!(tunnel.peer_identity(), &wp);
    let (mut app, mut agent_side) = socket_pair().await;
    let relay = tokio::spawn(async move { tunnel.relay(&mut agent_side).await });
    let msg: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    assert_eq!(roundtrip(&mut app, &msg).await, msg);
    tokio::io::AsyncWriteExt::shutdown(&mut app).await.unwrap();
    let mut rest = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut app, &mut rest)
        .await
        .unwrap();
    let stats = relay.await.unwrap();
    assert!(stats.error.is_none(), "{:?}", stats.error);
    assert_eq!((stats.bytes_sent, stats.bytes_received), (200_000, 200_000));

    let line = server.lines.recv_timeout(Duration::from_secs(30)).unwrap();
    let v = json_line(&line);
    assert_eq!(v["peer"], SRC, "python verified our client identity");
    assert_eq!(v["alpn"], "h2");
    assert!(v["sni"].is_null(), "no SNI sent: {v}");
    assert_eq!(v["authority"], "240.240.0.2:80");
    assert_eq!(v["forwarded"], "for=\"10.1.2.3:45678\";host=httpbin.org");
    assert_eq!(
        v["baggage"],
        "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep"
    );
    assert!(v["traceparent"].as_str().unwrap().starts_with("00-"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interop_python_server_with_wrong_identity_refused() {
    let mesh = Mesh::new("cluster.local");
    let other = id("spiffe://cluster.local/ns/default/sa/someone-else");
    let server = start_py_server(&mesh.ca, mesh.dir.path(), &other, "cluster.local");
    let waypoint: SocketAddr = format!("127.0.0.1:{}", server.port).parse().unwrap();
    let err = client(&mesh.ids)
        .connect(&request(&id(SRC), waypoint, &id(WAYPOINT)))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not the expected"), "{err}");
}

//! Issue #5 on the real kernel with real TLS: pod → VIP → `shunt agent` →
//! HBONE → `shunt waypoint` (its own namespace) → upstream (an "internet"
//! namespace), for a TCP port: bytes intact both ways, identities in both
//! access logs, pooled tunnels under 200 concurrent connections, and an
//! upstream failure surfacing as a reset plus error lines.

use std::time::Duration;

use shunt_testbed::mesh::{self, Port, ServiceEntry, NAMESPACE, WAYPOINT};
use shunt_testbed::{probe_bin, shunt_bin, wait_for, Node, Proc, Result};

const SVC_PORT: u16 = 9000;
const TARGET_PORT: u16 = 7000;
/// Where the endpoint of the service with an unusable waypoint listens.
const BYPASS_PORT: u16 = 7100;

/// Field order is drop order: the processes living in pods stop before the
/// node removes the pods' cgroups.
struct Mesh {
    waypoint: Proc,
    upstream: Option<Proc>,
    upstream_ip: String,
    node: Node,
}

fn config(node: &Node, wp_ip: &str, upstream_ip: &str) -> String {
    let mut d = mesh::base(node.pod("app").workload_entry(NAMESPACE, "app"), wp_ip);
    let entry = |name, waypoint, host, port| {
        ServiceEntry {
            name,
            waypoint,
            hosts: &[host],
            ports: &[port],
            endpoints: &[upstream_ip],
            ..Default::default()
        }
        .yaml()
    };
    d.push(entry(
        "echo",
        Some(WAYPOINT),
        "echo.internal",
        Port::tcp(SVC_PORT, TARGET_PORT),
    ));
    // No waypoint bound: the agent connects to the endpoint itself.
    d.push(entry(
        "direct",
        None,
        "direct.internal",
        Port::tcp(9100, TARGET_PORT),
    ));
    // Asks for a waypoint that does not exist: refused, never connected
    // around it.
    d.push(entry(
        "nowp",
        Some("missing-wp"),
        "nowp.internal",
        Port::tcp(9200, BYPASS_PORT),
    ));
    mesh::docs(&d)
}

fn start_upstream(node: &Node, ip: &str) -> Result<Proc> {
    let log = node.work_dir.join("upstream.log");
    let p = node.pod("inet").spawn(
        &probe_bin(),
        &["serve", &format!("{ip}:{TARGET_PORT}")],
        &log,
    )?;
    wait_for("upstream listening", Duration::from_secs(10), || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("listening")
            .then_some(())
    })?;
    Ok(p)
}

fn setup() -> Result<Mesh> {
    let mut node = mesh::node()?;
    let wp_ip = node.pod("wp").ip4.clone();
    let upstream_ip = node.pod("inet").ip4.clone();
    let ca_dir = node.work_dir.join("ca");
    shunt_agent::identity::Ca::init(&ca_dir, "cluster.local", false)?;
    node.write_config("mesh.yaml", "trustDomain: cluster.local\n")?;
    node.write_config("00-mesh.yaml", &config(&node, &wp_ip, &upstream_ip))?;
    let (cfg, ca, state) = (
        node.config_dir().display().to_string(),
        ca_dir.display().to_string(),
        node.state_dir.display().to_string(),
    );
    node.start_agent(
        &shunt_bin(),
        &["agent"],
        &["--config-dir", &cfg, "--ca-dir", &ca, "--no-dns"],
    )?;
    let maps = node.maps()?;
    wait_for("services programmed", Duration::from_secs(20), || {
        (maps.read_services().ok()?.len() == 6).then_some(())
    })?;
    // Debug for the HBONE server: it logs each accepted HTTP/2 connection.
    let waypoint = mesh::start_waypoint(
        &node,
        None,
        &mesh::waypoint_args(&cfg, &state, &ca),
        "info,shunt_agent::hbone::server=debug",
    )?;
    let upstream = Some(start_upstream(&node, &upstream_ip)?);
    Ok(Mesh {
        waypoint,
        upstream,
        upstream_ip,
        node,
    })
}

fn agent_log(m: &Mesh) -> String {
    m.node.agents[0].log_text()
}

#[test]
fn tcp_port_through_agent_and_waypoint_keeps_bytes_and_identities() -> Result<()> {
    let m = setup()?;
    let vip = format!("240.240.0.1:{SVC_PORT}");
    let r = m
        .node
        .pod("app")
        .probe(&["connect", &vip, "--echo", "33554432", "--raw"])?;
    assert!(
        r.contains("echoed=33554432"),
        "32 MiB through the mesh: {r}"
    );
    assert!(r.contains(&format!("peer={vip}")), "{r}");
    let line = wait_for("agent access line", Duration::from_secs(20), || {
        agent_log(&m)
            .lines()
            .find(|l| l.contains("connection complete") && l.contains("bytes_sent=33554432"))
            .map(str::to_string)
    })?;
    for f in [
        "src.workload=\"app\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/app\"",
        &format!("dst.hbone_addr={vip}"),
        "dst.identity=\"spiffe://cluster.local/ns/default/sa/wp\"",
        "direction=\"outbound\"",
    ] {
        assert!(line.contains(f), "missing {f} in {line}");
    }
    let wline = wait_for("waypoint access line", Duration::from_secs(20), || {
        m.waypoint
            .log_text()
            .lines()
            .find(|l| l.contains("connection complete") && l.contains("direction=\"inbound\""))
            .map(str::to_string)
    })?;
    assert!(
        wline.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/app\""),
        "{wline}"
    );
    assert!(wline.contains(&format!("dst.hbone_addr={vip}")), "{wline}");
    assert!(
        wline.contains(&m.node.pod("app").ip4),
        "Forwarded: for= names the pod: {wline}"
    );
    Ok(())
}

#[test]
fn concurrent_connections_share_a_few_pooled_tunnels() -> Result<()> {
    let m = setup()?;
    let vip = format!("240.240.0.1:{SVC_PORT}");
    let r = m
        .node
        .pod("app")
        .probe(&["many", &vip, "--n", "200", "--echo", "2000"])?;
    assert!(r.starts_with("ok=200 failed=0"), "{r}");
    // One tunnel (stream, access line) per connection...
    let log = wait_for("200 tunnel lines", Duration::from_secs(30), || {
        let log = m.waypoint.log_text();
        (log.lines()
            .filter(|l| l.contains("connection complete"))
            .count()
            >= 200)
            .then_some(log)
    })?;
    // ...riding a few HTTP/2 connections (at most 100 streams each).
    let h2 = log
        .lines()
        .filter(|l| l.contains("HBONE connection accepted"))
        .count();
    assert!(
        (2..=4).contains(&h2),
        "200 concurrent streams should share 2-4 pooled connections, got {h2}"
    );
    Ok(())
}

#[test]
fn upstream_down_resets_the_pod_connection_and_logs_errors() -> Result<()> {
    let mut m = setup()?;
    drop(m.upstream.take());
    let vip = format!("240.240.0.1:{SVC_PORT}");
    let r = m
        .node
        .pod("app")
        .probe(&["connect", &vip, "--echo", "100", "--raw"])?;
    assert!(
        r.starts_with("err"),
        "no upstream, yet bytes came back: {r}"
    );
    let line = wait_for("agent error line", Duration::from_secs(20), || {
        agent_log(&m)
            .lines()
            .find(|l| l.contains(" error access ") && l.contains(&vip))
            .map(str::to_string)
    })?;
    assert!(line.contains("error=") && line.contains("503"), "{line}");
    wait_for("waypoint error line", Duration::from_secs(20), || {
        m.waypoint
            .log_text()
            .lines()
            .find(|l| l.contains(" error access ") && l.contains(&m.upstream_ip))
            .map(|_| ())
    })?;
    Ok(())
}

#[test]
fn serviceentry_without_waypoint_is_connected_directly_and_logged() -> Result<()> {
    let m = setup()?;
    // The second ServiceEntry got the second VIP.
    let r =
        m.node
            .pod("app")
            .probe(&["connect", "240.240.0.2:9100", "--echo", "65536", "--raw"])?;
    assert!(r.contains("echoed=65536"), "{r}");
    let line = wait_for(
        "agent line for the direct connection",
        Duration::from_secs(20),
        || {
            agent_log(&m)
                .lines()
                .find(|l| {
                    l.contains("connection complete")
                        && l.contains("dst.service=\"direct.internal\"")
                })
                .map(str::to_string)
        },
    )?;
    assert!(
        line.contains(&format!("dst.addr={}:{TARGET_PORT}", m.upstream_ip)),
        "{line}"
    );
    assert!(
        !line.contains("dst.hbone_addr"),
        "no tunnel was used: {line}"
    );
    Ok(())
}

#[test]
fn a_service_whose_waypoint_cannot_be_resolved_is_refused_never_connected_directly() -> Result<()> {
    let m = setup()?;
    // A real listener at the service's endpoint counts what reaches it.
    let count = m.node.work_dir.join("bypass.count");
    let _listener = m.node.pod("inet").spawn(
        &probe_bin(),
        &[
            "listen",
            &format!("{}:{BYPASS_PORT}", m.upstream_ip),
            "--count-file",
            &count.display().to_string(),
        ],
        &m.node.work_dir.join("bypass.log"),
    )?;
    wait_for("endpoint listening", Duration::from_secs(10), || {
        (std::fs::read_to_string(&count).ok()? == "0").then_some(())
    })?;
    // The third ServiceEntry got the third VIP.
    let r = m
        .node
        .pod("app")
        .probe(&["connect", "240.240.0.3:9200", "--echo", "1024", "--raw"])?;
    assert!(!r.contains("echoed="), "no bytes may flow: {r}");
    let line = wait_for("agent refusal line", Duration::from_secs(20), || {
        agent_log(&m)
            .lines()
            .find(|l| l.contains("requires a waypoint that cannot be used"))
            .map(str::to_string)
    })?;
    assert!(line.contains("ServiceEntry default/nowp"), "{line}");
    assert!(line.contains("WaypointNotFound"), "{line}");
    // Nothing reached the endpoint around the waypoint.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(std::fs::read_to_string(&count)?, "0");
    Ok(())
}

#[test]
fn status_reports_a_healthy_agent() -> Result<()> {
    let m = setup()?;
    let out = std::process::Command::new(shunt_bin())
        .args([
            "status",
            "--pin-dir",
            &m.node.pin_dir.display().to_string(),
            "--state-dir",
            &m.node.state_dir.display().to_string(),
            "--netns",
            &m.node.ns.path().display().to_string(),
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "status: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for p in shunt_agent::kernel::loader::PROGRAMS.map(|p| p.name) {
        assert!(text.contains(p), "{p} missing in:\n{text}");
    }
    Ok(())
}

#[test]
fn agent_handover_under_load_keeps_open_tunnels_and_refuses_nothing() -> Result<()> {
    let mut m = setup()?;
    let vip = format!("240.240.0.1:{SVC_PORT}");
    let enter = m.node.pod("app").enter();
    // A long transfer that spans the handover...
    let (e1, v1) = (enter.clone(), vip.clone());
    let long = std::thread::spawn(move || {
        let mut cmd = e1.command(probe_bin());
        // Half the bytes, a 3 s pause across the handover, the rest.
        cmd.args([
            "connect",
            &v1,
            "--echo",
            "16777216",
            "--raw",
            "--hold-ms",
            "3000",
        ]);
        cmd.output()
    });
    // ...and short connections through it.
    let short = std::thread::spawn(move || {
        let mut cmd = enter.command(probe_bin());
        cmd.args(["many", "240.240.0.2:9100", "--n", "50", "--echo", "1000"]);
        cmd.output()
    });
    std::thread::sleep(Duration::from_millis(300));
    let ca = m.node.work_dir.join("ca").display().to_string();
    let cfg = m.node.config_dir().display().to_string();
    m.node.start_agent(
        &shunt_bin(),
        &["agent"],
        &["--config-dir", &cfg, "--ca-dir", &ca, "--no-dns"],
    )?;
    let out = long.join().expect("long transfer")?;
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(
        r.contains("echoed=16777216"),
        "the open tunnel must survive the handover: {r}"
    );
    let out = short.join().expect("short connections")?;
    let r = String::from_utf8_lossy(&out.stdout);
    assert!(r.starts_with("ok=50 failed=0"), "{r}");
    // New connections go to the new agent; the old one drained and left.
    let r = m
        .node
        .pod("app")
        .probe(&["connect", &vip, "--echo", "1000", "--raw"])?;
    assert!(r.contains("echoed=1000"), "{r}");
    assert!(
        m.node.agents[0].wait_exit(Duration::from_secs(60)),
        "the old agent did not exit after handing over"
    );
    assert!(m.node.agents[0].log_text().contains("successor took over"));
    Ok(())
}

//! Issue #2 on the real kernel: sk_lookup steering, connect-time refusal,
//! fail-closed behaviour, handover, pins and uninstall.

use std::time::Duration;

use shunt_common::Counter;
use shunt_testbed::{read_count, shunt_bin, wait_for, Node, Result};

const ECONNREFUSED: &str = "errno=111";

fn node_with_pod(pod: &str) -> Result<Node> {
    let mut node = Node::new()?;
    node.add_pod(pod)?;
    Ok(node)
}

#[test]
fn known_vip_is_steered_with_original_destination_both_ways() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "100000"])?;
    assert!(r.starts_with("ok "), "{r}");
    assert!(
        r.contains("peer=240.240.0.1:80"),
        "pod's getpeername must be the VIP: {r}"
    );
    assert!(
        r.contains("dst=240.240.0.1:80"),
        "agent's local address must be the VIP: {r}"
    );
    assert!(r.contains("echoed=100000"), "{r}");
    assert!(node.counter(Counter::Steered)? >= 1);
    Ok(())
}

#[test]
fn non_enrolled_pod_is_steered_too_for_known_services() -> Result<()> {
    // sk_lookup serves the node, whatever the client's cgroup.
    let mut node = node_with_pod("other")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.9:443", 9)?;
    let r = node
        .pod("other")
        .probe(&["connect", "240.240.0.9:443", "--echo", "10"])?;
    assert!(
        r.contains("dst=240.240.0.9:443") && r.contains("echoed=10"),
        "{r}"
    );
    Ok(())
}

#[test]
fn ipv6_vip_is_steered() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("[2001:2::5]:8080", 5)?;
    node.enroll("app", 1)?;
    let r = node
        .pod("app")
        .probe(&["connect", "[2001:2::5]:8080", "--echo", "4096"])?;
    assert!(r.contains("peer=[2001:2::5]:8080"), "{r}");
    assert!(
        r.contains("dst=[2001:2::5]:8080") && r.contains("echoed=4096"),
        "{r}"
    );
    Ok(())
}

#[test]
fn v4_mapped_ipv6_behaves_as_ipv4() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let pod = node.pod("app");
    let r = pod.probe(&["connect", "[::ffff:240.240.0.1]:80", "--echo", "64"])?;
    assert!(
        r.contains("dst=240.240.0.1:80") && r.contains("echoed=64"),
        "{r}"
    );
    let before = node.counter(Counter::Refused)?;
    let r = pod.probe(&["connect", "[::ffff:240.240.0.1]:81"])?;
    assert!(
        r.contains(ECONNREFUSED),
        "unknown mapped VIP:port must be refused: {r}"
    );
    assert_eq!(
        node.counter(Counter::Refused)?,
        before + 1,
        "refused by connect6, not by sk_lookup"
    );
    Ok(())
}

#[test]
fn unknown_vip_port_is_refused_at_connect_for_enrolled_pods() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let dropped = node.counter(Counter::Dropped)?;
    for dst in ["240.240.0.1:81", "240.240.3.3:80", "[2001:2::77]:80"] {
        let r = node.pod("app").probe(&["connect", dst])?;
        assert!(r.contains(ECONNREFUSED), "{dst}: {r}");
    }
    assert_eq!(node.counter(Counter::Refused)?, 3);
    // No SYN left the pod: sk_lookup never saw these.
    assert_eq!(node.counter(Counter::Dropped)?, dropped);
    Ok(())
}

#[test]
fn unknown_vip_port_from_non_enrolled_pod_is_dropped_by_sk_lookup() -> Result<()> {
    let mut node = node_with_pod("other")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    let r = node.pod("other").probe(&["connect", "240.240.0.1:81"])?;
    assert!(r.contains(ECONNREFUSED), "{r}");
    assert!(node.counter(Counter::Dropped)? >= 1);
    assert_eq!(node.counter(Counter::Refused)?, 0);
    Ok(())
}

#[test]
fn wildcard_listener_on_node_never_receives_vip_traffic() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.add_pod("other")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let count4 = node.node_listener("0.0.0.0:80")?;
    let count6 = node.node_listener("[::]:81")?;
    for pod in ["app", "other"] {
        for dst in [
            "240.240.0.1:80",
            "240.240.0.1:81",
            "[2001:2::1]:80",
            "[2001:2::1]:81",
        ] {
            node.pod(pod).probe(&["connect", dst])?;
        }
    }
    // Agent stopped: the known service has no socket in the SOCKMAP.
    let agent = &mut node.agents[0];
    agent.signal(libc::SIGTERM);
    assert!(
        agent.wait_exit(Duration::from_secs(30)),
        "agent did not stop"
    );
    for pod in ["app", "other"] {
        for dst in ["240.240.0.1:80", "[2001:2::1]:81"] {
            let r = node.pod(pod).probe(&["connect", dst])?;
            assert!(
                r.contains(ECONNREFUSED),
                "{pod} {dst} with agent stopped: {r}"
            );
        }
    }
    assert_eq!(
        read_count(&count4),
        0,
        "wildcard :80 listener got VIP traffic"
    );
    assert_eq!(
        read_count(&count6),
        0,
        "wildcard :81 listener got VIP traffic"
    );
    // The listener itself works for non-VIP traffic (the test can fail).
    let node_ip = format!("{}:80", node.pod("app").ip4.replace(".0.2", ".0.1"));
    let r = node.pod("app").probe(&["connect", &node_ip])?;
    assert!(
        r.starts_with("ok "),
        "non-VIP destination must be untouched: {r}"
    );
    wait_for("listener count", Duration::from_secs(10), || {
        (read_count(&count4) == 1).then_some(())
    })?;
    Ok(())
}

#[test]
fn agent_stopped_refuses_vip_connects() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    assert!(node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "1"])?
        .starts_with("ok"));
    let agent = &mut node.agents[0];
    agent.signal(libc::SIGKILL);
    assert!(agent.wait_exit(Duration::from_secs(10)));
    let r = node.pod("app").probe(&["connect", "240.240.0.1:80"])?;
    assert!(r.contains(ECONNREFUSED), "killed agent: {r}");
    assert!(node.counter(Counter::NoSocket)? >= 1);
    // Links survived the agent: an unknown port is still refused at connect.
    let r = node.pod("app").probe(&["connect", "240.240.0.1:81"])?;
    assert!(r.contains(ECONNREFUSED), "{r}");
    assert_eq!(node.counter(Counter::Refused)?, 1);
    Ok(())
}

#[test]
fn handover_under_connect_loop_refuses_nothing() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let enter = node.pod("app").enter();
    let looper = std::thread::spawn(move || {
        let mut cmd = enter.command(shunt_testbed::probe_bin());
        cmd.args(["loop", "240.240.0.1:80", "--for-ms", "6000"]);
        cmd.output()
    });
    std::thread::sleep(Duration::from_millis(1500));
    // Two successive takeovers while connects run.
    node.start_echo_agent()?;
    std::thread::sleep(Duration::from_millis(1000));
    node.start_echo_agent()?;
    let out = looper.join().expect("loop thread")?;
    let report = String::from_utf8_lossy(&out.stdout);
    let ok: u64 = report
        .split_whitespace()
        .find_map(|f| f.strip_prefix("ok="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!("handover loop: {report}");
    assert!(ok > 50, "the loop must have run: {report}");
    assert!(
        report.contains("failed=0"),
        "connects failed during handover: {report}"
    );
    // The predecessors handed over and exited on their own.
    for i in 0..2 {
        let a = &mut node.agents[i];
        assert!(
            a.wait_exit(Duration::from_secs(30)),
            "agent {i} did not exit after handover"
        );
        assert!(
            a.log_text().contains("successor took over"),
            "{}",
            a.log_text()
        );
    }
    Ok(())
}

#[test]
fn restarted_agent_keeps_links_and_updates_their_programs_in_place() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    let link = node.pin_dir.join("link_shunt_sk_lookup");
    // `bpftool link show pinned` prints "ID: sk_lookup  prog PROG_ID ...".
    let link_info = || -> Result<(String, String)> {
        let out = shunt_testbed::sh(
            "bpftool",
            &["link", "show", "pinned", &link.display().to_string()],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let id = text.split(':').next().unwrap_or("").trim().to_string();
        let prog = text
            .split_whitespace()
            .skip_while(|w| *w != "prog")
            .nth(1)
            .unwrap_or("")
            .to_string();
        Ok((id, prog))
    };
    let (id, prog) = link_info()?;
    let a = &mut node.agents[0];
    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(Duration::from_secs(30)));
    assert!(link.exists(), "clean shutdown must leave links pinned");
    node.start_echo_agent()?;
    assert!(node.agents[1].log_text().contains("reusing pinned links"));
    let (id2, prog2) = link_info()?;
    assert_eq!(id2, id, "the same kernel link must still be attached");
    assert_ne!(
        prog2, prog,
        "the new agent's program must run in the link (BPF_LINK_UPDATE)"
    );
    // And it works.
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "10"])?;
    assert!(r.contains("echoed=10"), "{r}");
    Ok(())
}

#[test]
fn bpftool_dump_shows_field_names() -> Result<()> {
    let mut node = Node::new()?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 7)?;
    let out = shunt_testbed::sh(
        "bpftool",
        &[
            "map",
            "dump",
            "pinned",
            &node.pin_dir.join("services").display().to_string(),
        ],
    )?;
    let s = String::from_utf8_lossy(&out.stdout);
    for field in [
        "\"addr\"",
        "\"port\": 80",
        "\"service_id\": 7",
        "\"waypoint_addr\"",
        "\"flags\"",
    ] {
        assert!(s.contains(field), "missing {field} in:\n{s}");
    }
    Ok(())
}

#[test]
fn maps_command_prints_services() -> Result<()> {
    let mut node = Node::new()?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 7)?;
    let out = std::process::Command::new(shunt_bin())
        .args(["maps", "--pin-dir", &node.pin_dir.display().to_string()])
        .output()?;
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{s}");
    assert!(
        s.contains("240.240.0.1") && s.contains("SERVICES (1)"),
        "{s}"
    );
    // Every reconciled map of the registry has its table.
    for table in [
        "ENROLLED (0)",
        "SOURCES (0)",
        "EGRESS_ALLOW (0)",
        "COUNTERS",
    ] {
        assert!(s.contains(table), "{table} missing in:\n{s}");
    }
    Ok(())
}

#[test]
fn uninstall_leaves_nothing() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.start_echo_agent()?;
    let a = &mut node.agents[0];
    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(Duration::from_secs(30)));
    let out = node.uninstall()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!node.pin_dir.exists(), "pin dir left behind");
    let routes = node.ns.ip(&["route", "show", "table", "local"])?;
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("240.240"),
        "v4 route left"
    );
    let routes = node.ns.ip(&["-6", "route", "show", "table", "local"])?;
    assert!(
        !String::from_utf8_lossy(&routes.stdout).contains("2001:2::"),
        "v6 route left"
    );
    assert!(node.maps().is_err(), "maps still reachable by pin");
    Ok(())
}

#[test]
fn missing_prerequisites_are_one_clear_error() -> Result<()> {
    let out = std::process::Command::new(shunt_bin())
        .args([
            "agent",
            "--pin-dir",
            "/tmp/not-a-bpffs/shunt",
            "--cgroup-root",
            "/tmp",
            "--state-dir",
            "/tmp/shunt-prereq-test",
        ])
        .output()?;
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(
        e.contains("not on a bpffs") && e.contains("mount -t bpf"),
        "{e}"
    );
    assert!(e.contains("not on a cgroup2 filesystem"), "{e}");
    assert_eq!(
        e.lines().filter(|l| l.starts_with("shunt:")).count(),
        1,
        "{e}"
    );
    Ok(())
}

#[test]
fn spoofed_source_address_gets_nothing() -> Result<()> {
    let mut node = node_with_pod("app")?;
    node.add_pod("other")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("app", 1)?;
    // The genuine source works.
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "1"])?;
    assert!(r.contains("echoed=1"), "{r}");
    let steered = node.counter(Counter::Steered)?;
    // `app` claims `other`'s address: strict reverse-path filtering in the
    // node namespace drops the SYN before any socket sees it, so the agent
    // (which identifies workloads by source address) never gets it.
    let other_ip = node.pod("other").ip4.clone();
    node.pod("app")
        .ns
        .ip(&["addr", "add", &format!("{other_ip}/32"), "dev", "eth0"])?;
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--bind", &other_ip])?;
    assert!(r.starts_with("err"), "spoofed connection was answered: {r}");
    assert_eq!(
        node.counter(Counter::Steered)?,
        steered,
        "a spoofed SYN reached sk_lookup"
    );
    Ok(())
}

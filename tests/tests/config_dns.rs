//! Issues #3 and #4 on the real kernel: config directory → pinned maps
//! (reconciled by difference under load, bad files change nothing), DNS
//! capture with real clients (glibc getent, dig over UDP and TCP), and the
//! egress modes enforced at connect().

use std::time::Duration;

use shunt_common::Counter;
use shunt_testbed::{wait_for, Node, Result};

const ECONNREFUSED: &str = "errno=111";
/// What the pods' resolv.conf names: nothing listens there; only DNS
/// capture makes names resolve.
const POD_RESOLVER: &str = "10.96.0.10";
const UPSTREAM_DNS: &str = "192.0.2.53";

fn namespace(name: &str, ambient: bool) -> String {
    let labels = if ambient {
        "\n  labels:\n    istio.io/dataplane-mode: ambient"
    } else {
        ""
    };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n")
}

fn service_entry(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n  hosts:\n  - {host}\n  ports:\n  - number: {port}\n    name: p{port}\n    protocol: TCP\n  resolution: DNS\n"
    )
}

fn mesh(mode: &str, allowed: &[&str]) -> String {
    let allowed: Vec<String> = allowed.iter().map(|c| format!("\"{c}\"")).collect();
    format!(
        "trustDomain: cluster.local\noutboundTrafficPolicy:\n  mode: {mode}\nshunt:\n  allowedEgressCIDRs: [{}]\n  dnsCapture: true\n",
        allowed.join(", ")
    )
}

/// A node with pod `app` enrolled (ambient namespace `default`) and pod
/// `other` not enrolled, plus the given mesh mode.
fn setup(mode: &str, allowed: &[&str]) -> Result<Node> {
    let mut node = Node::new()?;
    node.add_pod("app")?;
    node.add_pod("other")?;
    node.write_config("mesh.yaml", &mesh(mode, allowed))?;
    node.write_config(
        "00-workloads.yaml",
        &format!(
            "{}---\n{}",
            namespace("default", true),
            node.pod("app").workload_entry("default", "app")
        ),
    )?;
    node.write_config(
        "10-httpbin.yaml",
        &service_entry("httpbin.org", "httpbin.org", 80),
    )?;
    Ok(node)
}

/// Start the echo agent on the node's config and wait until the two
/// entries of `httpbin.org` (IPv4 and IPv6 VIP) are in the map.
fn start_with_config(node: &mut Node) -> Result<shunt_agent::kernel::PinnedMaps> {
    node.start_echo_agent_with_config(None)?;
    let maps = node.maps()?;
    wait_for("services from config", Duration::from_secs(20), || {
        (maps.read_services().ok()?.len() == 2).then_some(())
    })?;
    Ok(maps)
}

fn dig(node: &Node, pod: &str, args: &[&str]) -> Result<String> {
    let mut a = vec!["+short", "+tries=1", "+time=2"];
    a.extend_from_slice(args);
    let out = node.pod(pod).run_with_resolver(POD_RESOLVER, "dig", &a)?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn config_dir_fills_maps_with_allocated_vips_and_enrollment() -> Result<()> {
    let mut node = setup("ALLOW_ANY", &[])?;
    let maps = start_with_config(&mut node)?;
    let keys: Vec<String> = maps
        .read_services()?
        .keys()
        .map(|k| {
            format!(
                "{}:{}",
                shunt_agent::kernel::registry::addr_from_bytes(k.addr),
                k.port
            )
        })
        .collect();
    assert!(keys.contains(&"240.240.0.1:80".to_string()), "{keys:?}");
    assert!(keys.contains(&"2001:2::1:80".to_string()), "{keys:?}");
    let enrolled = maps.read_enrolled()?;
    assert!(
        enrolled.contains_key(&node.pod("app").cgroup.id()),
        "app enrolled: {enrolled:?}"
    );
    assert!(
        !enrolled.contains_key(&node.pod("other").cgroup.id()),
        "other not enrolled"
    );
    // The VIP works end to end from the enrolled pod.
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "1000"])?;
    assert!(
        r.contains("dst=240.240.0.1:80") && r.contains("echoed=1000"),
        "{r}"
    );
    Ok(())
}

#[test]
fn config_edits_apply_live_without_refusing_unchanged_vips() -> Result<()> {
    let mut node = setup("ALLOW_ANY", &[])?;
    let maps = start_with_config(&mut node)?;
    let enter = node.pod("app").enter();
    let looper = std::thread::spawn(move || {
        let mut cmd = enter.command(shunt_testbed::probe_bin());
        cmd.args(["loop", "240.240.0.1:80", "--for-ms", "8000"]);
        cmd.output()
    });
    // Add, edit and remove other entries while the loop runs.
    for i in 0..6 {
        node.write_config(
            "20-extra.yaml",
            &service_entry("extra.example", &format!("extra{i}.example"), 443),
        )?;
        wait_for("extra entry present", Duration::from_secs(20), || {
            (maps.read_services().ok()?.len() == 4).then_some(())
        })?;
        node.remove_config("20-extra.yaml")?;
        wait_for("extra entry removed", Duration::from_secs(20), || {
            (maps.read_services().ok()?.len() == 2).then_some(())
        })?;
    }
    let out = looper.join().expect("loop thread")?;
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.contains("failed=0"),
        "connects to an unchanged VIP failed during edits: {report}"
    );
    assert!(!report.contains("ok=0 "), "{report}");
    Ok(())
}

#[test]
fn broken_file_changes_nothing_and_previous_config_stays() -> Result<()> {
    let mut node = setup("ALLOW_ANY", &[])?;
    let maps = start_with_config(&mut node)?;
    let before = maps.read_services()?;
    node.write_config("30-broken.yaml", "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: bad\n  namespace: default\nspec:\n  hosts: [bad.example]\n  ports:\n  - number: notaport\n    name: x\n")?;
    // Also remove a valid file in the same change: it must not take effect.
    node.remove_config("10-httpbin.yaml")?;
    wait_for("rejection logged", Duration::from_secs(20), || {
        node.agents[0]
            .log_text()
            .contains("config rejected")
            .then_some(())
    })?;
    let log = node.agents[0].log_text();
    assert!(
        log.contains("30-broken.yaml") && log.contains("spec.ports[0].number"),
        "{log}"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        maps.read_services()?,
        before,
        "a rejected config changed the maps"
    );
    Ok(())
}

#[test]
fn agent_started_with_invalid_config_leaves_pinned_maps() -> Result<()> {
    let mut node = setup("ALLOW_ANY", &[])?;
    let maps = start_with_config(&mut node)?;
    let before = maps.read_services()?;
    let a = &mut node.agents[0];
    a.signal(libc::SIGTERM);
    assert!(a.wait_exit(Duration::from_secs(30)));
    node.write_config("10-httpbin.yaml", "kind: ServiceEntry\napiVersion: networking.istio.io/v1\nmetadata: {name: x, namespace: default}\nspec: {hosts: [x], ports: [{number: 0, name: a}]}\n")?;
    node.start_echo_agent_with_config(None)?;
    assert!(
        node.agents[1]
            .log_text()
            .contains("pinned maps are left as they are"),
        "{}",
        node.agents[1].log_text()
    );
    assert_eq!(node.maps()?.read_services()?, before);
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "10"])?;
    assert!(
        r.contains("echoed=10"),
        "the previous services still work: {r}"
    );
    Ok(())
}

fn dns_node(mode: &str, allowed: &[&str]) -> Result<Node> {
    let mut node = setup(mode, allowed)?;
    node.start_upstream_dns(UPSTREAM_DNS, &[("other.test", "192.0.2.77")])?;
    node.start_echo_agent_with_config(Some(UPSTREAM_DNS))?;
    let maps = node.maps()?;
    let r = wait_for("services from config", Duration::from_secs(20), || {
        (maps.read_services().ok()?.len() == 2).then_some(())
    });
    if let Err(e) = r {
        let log = node.agents.last().map(|a| a.log_text()).unwrap_or_default();
        anyhow::bail!("{e}; agent log:\n{log}");
    }
    Ok(node)
}

#[test]
fn dns_capture_answers_serviceentry_hosts_to_real_clients() -> Result<()> {
    let node = dns_node("ALLOW_ANY", &[])?;
    let pod = node.pod("app");
    // glibc, through the pod's resolv.conf naming an ordinary resolver.
    let out = pod.run_with_resolver(POD_RESOLVER, "getent", &["ahostsv4", "httpbin.org"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("240.240.0.1"),
        "getent: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(dig(&node, "app", &["httpbin.org", "A"])?, "240.240.0.1");
    assert_eq!(
        dig(&node, "app", &["+tcp", "httpbin.org", "A"])?,
        "240.240.0.1"
    );
    assert_eq!(dig(&node, "app", &["httpbin.org", "AAAA"])?, "2001:2::1");
    // Not a ServiceEntry: answered by the upstream.
    assert_eq!(dig(&node, "app", &["other.test", "A"])?, "192.0.2.77");
    assert!(node.counter(Counter::DnsCaptured)? >= 5);
    // dig reports the server it asked: the pod's resolver, not the proxy.
    let out =
        pod.run_with_resolver(POD_RESOLVER, "dig", &["+tries=1", "+time=2", "httpbin.org"])?;
    let full = String::from_utf8_lossy(&out.stdout);
    assert!(
        full.contains(&format!("SERVER: {POD_RESOLVER}#53")),
        "{full}"
    );
    Ok(())
}

#[test]
fn dns_new_serviceentry_answered_without_restart() -> Result<()> {
    let node = dns_node("ALLOW_ANY", &[])?;
    node.write_config("20-new.yaml", &service_entry("new", "new.example", 443))?;
    let answer = wait_for("new host answered", Duration::from_secs(20), || {
        let a = dig(&node, "app", &["new.example", "A"]).ok()?;
        a.starts_with("240.240.").then_some(a)
    })?;
    assert_eq!(answer, "240.240.0.2");
    Ok(())
}

#[test]
fn dns_non_enrolled_pod_is_not_captured() -> Result<()> {
    let node = dns_node("ALLOW_ANY", &[])?;
    let before = node.counter(Counter::DnsCaptured)?;
    let a = dig(&node, "other", &["httpbin.org", "A"])?;
    assert!(!a.contains("240.240."), "non-enrolled pod got a VIP: {a}");
    assert_eq!(node.counter(Counter::DnsCaptured)?, before);
    Ok(())
}

#[test]
fn dns_fails_closed_when_the_agent_is_gone() -> Result<()> {
    let mut node = dns_node("ALLOW_ANY", &[])?;
    assert_eq!(dig(&node, "app", &["other.test", "A"])?, "192.0.2.77");
    let upstream_log = node.agents[0].log.clone();
    let queries_before = std::fs::read_to_string(&upstream_log)?
        .matches("query[A] other.test")
        .count();
    let agent = node.agents.len() - 1;
    let a = &mut node.agents[agent];
    a.signal(libc::SIGKILL);
    assert!(a.wait_exit(Duration::from_secs(10)));
    // Queries go to the proxy address, where nothing listens: they fail...
    for args in [&["other.test", "A"][..], &["+tcp", "other.test", "A"][..]] {
        let a = dig(&node, "app", args)?;
        assert!(!a.contains("192.0.2.77"), "answered without the agent: {a}");
        assert!(
            a.contains("connection refused") || a.contains("timed out"),
            "{a}"
        );
    }
    // ...and none reached the upstream around the proxy.
    let queries_after = std::fs::read_to_string(&upstream_log)?
        .matches("query[A] other.test")
        .count();
    assert_eq!(
        queries_before, queries_after,
        "a query went around the proxy"
    );
    Ok(())
}

#[test]
fn registry_only_refuses_unregistered_destinations_at_connect() -> Result<()> {
    let mut node = dns_node("REGISTRY_ONLY", &[])?;
    let real = format!("{}:8080", node.pod("app").gateway4());
    let count = node.node_listener("0.0.0.0:8080")?;
    let r = node.pod("app").probe(&["connect", &real])?;
    assert!(
        r.contains(ECONNREFUSED),
        "unregistered destination must be refused: {r}"
    );
    assert!(node.counter(Counter::EgressDenied)? >= 1);
    assert_eq!(
        shunt_testbed::read_count(&count),
        0,
        "a SYN reached the destination"
    );
    // The VIP path and DNS still work.
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "10"])?;
    assert!(r.contains("echoed=10"), "{r}");
    assert_eq!(dig(&node, "app", &["httpbin.org", "A"])?, "240.240.0.1");
    // Non-enrolled workloads are not subject to the mesh's egress mode.
    let r = node.pod("other").probe(&["connect", &real])?;
    assert!(r.starts_with("ok"), "{r}");
    // An allow-listed CIDR passes (edit applied live).
    node.write_config("mesh.yaml", &mesh("REGISTRY_ONLY", &["10.0.0.0/8"]))?;
    wait_for("allow-list applied", Duration::from_secs(20), || {
        node.pod("app")
            .probe(&["connect", &real])
            .ok()?
            .starts_with("ok")
            .then_some(())
    })?;
    Ok(())
}

#[test]
fn registry_only_holds_while_the_agent_is_down() -> Result<()> {
    let mut node = dns_node("REGISTRY_ONLY", &[])?;
    let real = format!("{}:8080", node.pod("app").gateway4());
    node.node_listener("0.0.0.0:8080")?;
    let agent = node.agents.len() - 2; // the echo agent (the listener was started after it)
    let a = &mut node.agents[agent];
    a.signal(libc::SIGKILL);
    assert!(a.wait_exit(Duration::from_secs(10)));
    let r = node.pod("app").probe(&["connect", &real])?;
    assert!(r.contains(ECONNREFUSED), "{r}");
    Ok(())
}

#[test]
fn allow_any_passthrough_is_logged_with_the_workload_identity() -> Result<()> {
    let mut node = dns_node("ALLOW_ANY", &[])?;
    let real = format!("{}:8080", node.pod("app").gateway4());
    node.node_listener("0.0.0.0:8080")?;
    let r = node.pod("app").probe(&["connect", &real])?;
    assert!(r.starts_with("ok"), "{r}");
    let agent = node
        .agents
        .iter()
        .position(|a| a.log_text().contains("agent capturing"))
        .expect("agent");
    let line = wait_for("passthrough line", Duration::from_secs(20), || {
        node.agents[agent]
            .log_text()
            .lines()
            .find(|l| l.contains("connection passthrough") && l.contains(&real))
            .map(str::to_string)
    })?;
    assert!(line.contains("src.workload=\"app\""), "{line}");
    assert!(
        line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/app\""),
        "{line}"
    );
    assert!(node.counter(Counter::Passthrough)? >= 1);
    Ok(())
}

#[test]
fn spoofed_workload_address_is_dropped_by_sk_lookup_without_rp_filter() -> Result<()> {
    let mut node = setup("ALLOW_ANY", &[])?;
    node.write_config(
        "01-other.yaml",
        &node.pod("other").workload_entry("default", "other"),
    )?;
    node.start_echo_agent_with_config(None)?;
    let maps = node.maps()?;
    wait_for(
        "services and workload sources",
        Duration::from_secs(20),
        || {
            (maps.read_services().ok()?.len() == 2 && maps.read_sources().ok()?.len() == 2)
                .then_some(())
        },
    )?;
    // Take reverse-path filtering away: the sk_lookup check alone must hold.
    shunt_testbed::sh(
        "ip",
        &[
            "netns",
            "exec",
            &node.ns.name,
            "sh",
            "-c",
            "for f in /proc/sys/net/ipv4/conf/*/rp_filter; do echo 0 > $f; done",
        ],
    )?;
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "1"])?;
    assert!(r.contains("echoed=1"), "the genuine source works: {r}");
    let steered = node.counter(Counter::Steered)?;
    let dropped = node.counter(Counter::Dropped)?;
    let other_ip = node.pod("other").ip4.clone();
    node.pod("app")
        .ns
        .ip(&["addr", "add", &format!("{other_ip}/32"), "dev", "eth0"])?;
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--bind", &other_ip])?;
    assert!(
        r.starts_with("err"),
        "a spoofed workload address was answered: {r}"
    );
    assert_eq!(
        node.counter(Counter::Steered)?,
        steered,
        "the spoofed SYN reached the agent"
    );
    assert!(
        node.counter(Counter::Dropped)? > dropped,
        "sk_lookup did not drop the spoofed SYN"
    );
    Ok(())
}

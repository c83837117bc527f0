//! Issue #11 item 4 on the real kernel: one enrolled pod floods the DNS
//! proxy (captured like any pod's DNS) with 50,000 random names towards an
//! upstream that never answers; another enrolled pod's ServiceEntry
//! lookups all succeed meanwhile, the flooder's drops are in
//! `shunt_dns_dropped_total`, the agent's log stays a few summary lines,
//! and a pod that is not enrolled is refused.

use std::path::Path;
use std::time::{Duration, Instant};

use shunt_testbed::{wait_for, Node, Result};

/// What the pods' resolv.conf names: only DNS capture makes it answer.
const POD_RESOLVER: &str = "10.96.0.10";
/// The DNS proxy's own address (the echo agent's default).
const PROXY_ADDR: &str = "169.254.20.10";
/// The upstream: a socket that never reads, so each forwarded query holds
/// its budget for the full upstream timeout.
const BLACKHOLE_DNS: &str = "192.0.2.53";
const METRICS_ADDR: &str = "127.0.0.1:15020";
const FLOOD: usize = 50_000;
const LOOKUPS: usize = 45;

/// Sends `n` queries for random names over `secs` seconds from one
/// connected UDP socket (captured at connect), never reading answers.
const FLOODER: &str = r#"
import os, socket, struct, sys, time
dst, n, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((dst, 53))
print("flood started", flush=True)
start, sent, batch = time.time(), 0, 500
while sent < n:
    for _ in range(min(batch, n - sent)):
        name = os.urandom(8).hex() + ".flood.example"
        q = struct.pack(">HHHHHH", sent & 0xffff, 0x0100, 1, 0, 0, 0)
        for label in name.split("."):
            q += bytes([len(label)]) + label.encode()
        q += b"\x00" + struct.pack(">HH", 1, 1)
        try:
            s.send(q)
        except OSError:
            pass
        sent += 1
    lag = start + secs * sent / n - time.time()
    if lag > 0:
        time.sleep(lag)
print("flood sent", sent, "in", round(time.time() - start, 1), "s", flush=True)
"#;

fn namespace(name: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    istio.io/dataplane-mode: ambient\n")
}

fn service_entry(i: usize) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: svc{i}\n  namespace: default\nspec:\n  hosts:\n  - svc{i}.example\n  ports:\n  - number: 80\n    name: http\n    protocol: TCP\n  resolution: DNS\n"
    )
}

fn metric_sum(text: &str, prefix: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[test]
fn a_random_name_flood_from_one_pod_leaves_another_pods_service_entry_lookups_answered(
) -> Result<()> {
    let mut node = Node::new()?;
    node.add_pod("flood")?;
    node.add_pod("app")?;
    node.add_pod("stranger")?;
    node.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\noutboundTrafficPolicy:\n  mode: ALLOW_ANY\nshunt:\n  dnsCapture: true\n",
    )?;
    node.write_config(
        "00-workloads.yaml",
        &format!(
            "{}---\n{}---\n{}",
            namespace("default"),
            node.pod("flood").workload_entry("default", "flood"),
            node.pod("app").workload_entry("default", "app"),
        ),
    )?;
    let entries: Vec<String> = (0..LOOKUPS).map(service_entry).collect();
    node.write_config("10-services.yaml", &entries.join("---\n"))?;

    // The blackholed upstream: bound, never read, so no ICMP either.
    node.agents.push(node.blackhole_dns(BLACKHOLE_DNS)?);

    let dir = node.config_dir().display().to_string();
    let bin = shunt_testbed::echo_agent_bin();
    node.start_agent(
        &bin,
        &[],
        &[
            "--config-dir",
            &dir,
            "--dns-upstream",
            BLACKHOLE_DNS,
            "--metrics-addr",
            METRICS_ADDR,
        ],
    )?;
    let maps = node.maps()?;
    wait_for("services from config", Duration::from_secs(30), || {
        (maps.read_services().ok()?.len() == 2 * LOOKUPS).then_some(())
    })?;
    let dig = |pod: &str, name: &str| -> Result<String> {
        let out = node.pod(pod).run_with_resolver(
            POD_RESOLVER,
            "dig",
            &["+short", "+tries=1", "+time=2", name, "A"],
        )?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    // Enrollment reaches the DNS proxy with the config: wait for the app.
    wait_for("app served", Duration::from_secs(20), || {
        dig("app", "svc0.example")
            .ok()
            .filter(|a| a.starts_with("240.240."))
    })?;

    // The flood, and the other pod's lookups while it runs.
    let flood_log = node.work_dir.join("flood.log");
    let mut flood = node.pod("flood").spawn(
        Path::new("python3"),
        &["-c", FLOODER, POD_RESOLVER, &FLOOD.to_string(), "30"],
        &flood_log,
    )?;
    wait_for("flood started", Duration::from_secs(10), || {
        flood.log_text().contains("flood started").then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let mut failed = Vec::new();
    for i in 0..LOOKUPS {
        let name = format!("svc{i}.example");
        let a = dig("app", &name)?;
        if !a.starts_with("240.240.") {
            failed.push(format!("{name}: {a:?}"));
        }
        // Spread over the flood, not only its first seconds.
        std::thread::sleep(Duration::from_millis(400));
    }
    let lookups_took = started.elapsed();
    let flood_running = !flood.log_text().contains("flood sent");
    assert!(flood.wait_exit(Duration::from_secs(60)), "flooder exits");
    let flood_report = flood.log_text();

    // A pod that is not enrolled reaches the proxy's address directly (no
    // capture for it) and is refused; the node itself is served.
    let out = node.pod("stranger").run(
        Path::new("dig"),
        &[
            &format!("@{PROXY_ADDR}"),
            "+tries=1",
            "+time=2",
            "svc0.example",
            "A",
        ],
    )?;
    let stranger = String::from_utf8_lossy(&out.stdout).to_string();
    let mut node_dig = node.ns.command("dig");
    node_dig.args([
        &format!("@{PROXY_ADDR}"),
        "+short",
        "+tries=1",
        "+time=2",
        "svc1.example",
        "A",
    ]);
    let node_answer = String::from_utf8_lossy(&node_dig.output()?.stdout)
        .trim()
        .to_string();

    let metrics = {
        let out = node
            .ns
            .command("curl")
            .args(["-s", &format!("http://{METRICS_ADDR}/metrics")])
            .output()?;
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let flood_ip = node.pod("flood").ip4.clone();
    let dropped_flood = metric_sum(
        &metrics,
        &format!(r#"shunt_dns_dropped_total{{reason="client_budget",client="{flood_ip}"}}"#),
    );
    let dropped_app = metric_sum(
        &metrics,
        &format!(
            r#"shunt_dns_dropped_total{{reason="client_budget",client="{}"}}"#,
            node.pod("app").ip4
        ),
    );
    let refused = metric_sum(&metrics, "shunt_dns_refused_total");
    let log = node
        .agents
        .iter()
        .find(|p| p.log_text().contains("agent capturing"))
        .map(|p| p.log_text())
        .unwrap_or_default();
    let dns_lines = log
        .lines()
        .filter(|l| l.contains("DNS") || l.contains("SERVFAIL"))
        .count();
    eprintln!(
        "flood: {} ({}); {LOOKUPS} ServiceEntry lookups from another pod in {lookups_took:?}: \
         {} failed {failed:?}; flooder drops {dropped_flood}, app drops {dropped_app}, \
         refused {refused}; DNS log lines {dns_lines}",
        flood_report.trim().replace('\n', " / "),
        if flood_running {
            "lookups ran during the flood"
        } else {
            "flood ended before the lookups"
        },
        failed.len(),
    );
    assert!(
        flood_running,
        "the lookups ran while the flood did: {flood_report}"
    );
    assert!(
        failed.is_empty(),
        "ServiceEntry lookups failed during the flood: {failed:?}"
    );
    assert!(
        dropped_flood > (FLOOD as u64) / 2,
        "the flooder's drops are counted ({dropped_flood}):\n{metrics}"
    );
    assert_eq!(dropped_app, 0, "the other pod lost nothing");
    assert!(stranger.contains("status: REFUSED"), "{stranger}");
    assert!(refused >= 1, "{metrics}");
    assert!(
        node_answer.starts_with("240.240."),
        "the node is served: {node_answer:?}"
    );
    // Summaries, not a line per query: at most one per 10 s per kind.
    assert!(dns_lines <= 12, "{dns_lines} DNS lines:\n{log}");
    Ok(())
}

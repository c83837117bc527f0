//! Issue #13 on the real kernel with real clients: a pod's curl and
//! openssl → DNS capture and VIP → `shunt agent` → HBONE → `shunt waypoint`
//! → an "internet" namespace where nginx serves several names over HTTP and
//! HTTPS (certificates from a test CA) and dnsmasq answers them for the
//! waypoint's own resolver. A DYNAMIC_DNS wildcard ServiceEntry
//! (`*.example.com`) decided by `connection.sni` (TLS) and `hosts` (HTTP),
//! and the seed's `httpbin.org:443` as TLS passthrough. nginx's access log
//! proves each allowed connection came from the waypoint and each refused
//! one never reached it.

use std::process::Output;
use std::time::Duration;

use shunt_testbed::mesh::{self, Port, ServiceEntry, NAMESPACE, WAYPOINT};
use shunt_testbed::{code_and_text, shunt_bin, wait_for, Internet, Node, Proc, Result};

const POD_RESOLVER: &str = "10.96.0.10";
/// dnsmasq for the waypoint, on the node's lo.
const WAYPOINT_DNS: &str = "192.0.2.53";
const NAMES: &[&str] = &[
    "a.example.com",
    "b.example.com",
    "c.other.test",
    "httpbin.org",
];

/// Field order is drop order: pod processes before the node.
struct Env {
    waypoint: Proc,
    inet: Internet,
    node: Node,
}

fn config(node: &Node, wp_ip: &str) -> String {
    let mut d = mesh::base(node.pod("app").workload_entry(NAMESPACE, "app"), wp_ip);
    let tls = Port {
        number: 443,
        name: "tls",
        protocol: "TLS",
        target_port: None,
    };
    let http = Port {
        number: 80,
        name: "http",
        protocol: "HTTP",
        target_port: None,
    };
    d.push(
        ServiceEntry {
            name: "example-wildcard",
            waypoint: Some(WAYPOINT),
            hosts: &["*.example.com"],
            ports: &[http, tls],
            resolution: "DYNAMIC_DNS",
            ..Default::default()
        }
        .yaml(),
    );
    d.push(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: only-a
  namespace: default
spec:
  targetRefs:
  - kind: ServiceEntry
    group: networking.istio.io
    name: example-wildcard
  rules:
  - when:
    - key: connection.sni
      values: ["a.example.com"]
  - to:
    - operation:
        hosts: ["a.example.com"]
"#
        .to_string(),
    );
    d.push(
        ServiceEntry {
            name: "httpbin.org",
            waypoint: Some(WAYPOINT),
            hosts: &["httpbin.org"],
            ports: &[tls],
            resolution: "DNS",
            ..Default::default()
        }
        .yaml(),
    );
    mesh::docs(&d)
}

fn setup() -> Result<Env> {
    let mut node = mesh::node()?;
    let wp_ip = node.pod("wp").ip4.clone();
    let inet_ip = node.pod("inet").ip4.clone();
    let inet = Internet::start(
        node.pod("inet"),
        &inet_ip,
        NAMES,
        &node.work_dir.join("internet"),
    )?;
    let records: Vec<(&str, &str)> = NAMES.iter().map(|n| (*n, inet_ip.as_str())).collect();
    node.start_upstream_dns(WAYPOINT_DNS, &records)?;

    let ca_dir = node.work_dir.join("ca");
    shunt_agent::identity::Ca::init(&ca_dir, "cluster.local", false)?;
    node.write_config(
        "mesh.yaml",
        "trustDomain: cluster.local\nshunt:\n  dnsCapture: true\n",
    )?;
    node.write_config("00-mesh.yaml", &config(&node, &wp_ip))?;
    let (cfg, ca, state) = (
        node.config_dir().display().to_string(),
        ca_dir.display().to_string(),
        node.state_dir.display().to_string(),
    );
    node.start_agent(
        &shunt_bin(),
        &["agent"],
        &["--config-dir", &cfg, "--ca-dir", &ca],
    )?;
    let maps = node.maps()?;
    // Wildcard: 2 VIPs x 2 ports; httpbin.org: 2 VIPs x 1 port.
    wait_for("services programmed", Duration::from_secs(20), || {
        (maps.read_services().ok()?.len() == 6).then_some(())
    })?;
    // The waypoint resolves the names the clients send with its own
    // resolver: dnsmasq, as the internet's DNS.
    let waypoint = mesh::start_waypoint(
        &node,
        Some(WAYPOINT_DNS),
        &mesh::waypoint_args(&cfg, &state, &ca),
        "info",
    )?;
    Ok(Env {
        waypoint,
        inet,
        node,
    })
}

impl Env {
    /// `shunt agent` (the node's processes: dnsmasq first, then the agent).
    fn agent(&self) -> &Proc {
        &self.node.agents[1]
    }

    /// A command in the app pod, its DNS captured by the agent.
    fn app(&self, program: &str, args: &[&str]) -> Result<Output> {
        self.node
            .pod("app")
            .run_with_resolver(POD_RESOLVER, program, args)
    }

    fn curl(&self, args: &[&str]) -> Result<(i32, String)> {
        let ca = self.inet.ca_pem.display().to_string();
        let mut a = vec!["-4", "-sS", "--max-time", "10", "--cacert", &ca];
        a.extend_from_slice(args);
        Ok(code_and_text(&self.app("curl", &a)?))
    }

    /// The IPv4 VIP the pod's DNS gives `name`.
    fn vip_of(&self, name: &str) -> Result<String> {
        let out = self.app("getent", &["ahostsv4", name])?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .next()
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("no answer for {name}: {text}"))
    }

    fn waypoint_line(&self, needles: &[&str]) -> Result<String> {
        wait_for("waypoint log line", Duration::from_secs(20), || {
            self.waypoint
                .log_text()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        })
        .map_err(|e| anyhow::anyhow!("{e} {needles:?}:\n{}", self.waypoint.log_text()))
    }
}

#[test]
fn wildcard_egress_by_sni_and_host_and_httpbin_passthrough() -> Result<()> {
    let env = setup()?;
    let wp_ip = env.node.pod("wp").ip4.clone();
    let wild = env.vip_of("a.example.com")?;
    assert!(
        wild.starts_with("240.240."),
        "DNS capture answers the wildcard: {wild}"
    );
    assert_eq!(
        env.vip_of("deep.b.example.com")?,
        wild,
        "one VIP for the wildcard"
    );

    // Allowed by connection.sni: the pod's own TLS to nginx, end to end.
    let (code, out) = env.curl(&["https://a.example.com/tls"])?;
    assert_eq!((code, out.trim()), (0, "a.example.com /tls"), "{out}");
    env.waypoint_line(&[
        "connection complete",
        "sni=\"a.example.com\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/app\"",
    ])?;

    // Refused by policy: reset before any byte reaches the internet.
    let (code, out) = env.curl(&["https://b.example.com/tls"])?;
    assert_ne!(code, 0, "{out}");
    env.waypoint_line(&["sni=\"b.example.com\"", "denied by authorization policy"])?;

    // A name outside the wildcard, sent to its VIP.
    let (code, out) = env.curl(&[
        "--resolve",
        &format!("c.other.test:443:{wild}"),
        "https://c.other.test/tls",
    ])?;
    assert_ne!(code, 0, "{out}");
    env.waypoint_line(&[
        "sni=\"c.other.test\"",
        "is not a host of ServiceEntry default/example-wildcard",
    ])?;

    // No SNI at all.
    let out = env.app(
        "sh",
        &[
            "-c",
            &format!("echo | timeout 10 openssl s_client -connect {wild}:443 -noservername"),
        ],
    )?;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("BEGIN CERTIFICATE"),
        "a handshake without SNI completed"
    );
    env.waypoint_line(&["without server_name (SNI)"])?;

    // Plain HTTP under the wildcard, routed by Host; another name is 403.
    let (code, out) = env.curl(&["http://a.example.com/plain"])?;
    assert_eq!((code, out.trim()), (0, "a.example.com /plain"), "{out}");
    let (code, out) = env.curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://b.example.com/plain",
    ])?;
    assert_eq!((code, out.trim()), (0, "403"), "{out}");

    // The seed's httpbin.org:443 passed through with the pod's identity.
    let (code, out) = env.curl(&["https://httpbin.org/get"])?;
    assert_eq!((code, out.trim()), (0, "httpbin.org /get"), "{out}");
    env.waypoint_line(&[
        "connection complete",
        "sni=\"httpbin.org\"",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/app\"",
    ])?;
    let agent_line = wait_for("agent access line", Duration::from_secs(20), || {
        env.agent()
            .log_text()
            .lines()
            .find(|l| {
                l.contains("connection complete")
                    && l.contains("direction=\"outbound\"")
                    && l.contains("httpbin.org")
            })
            .map(str::to_string)
    })
    .map_err(|e| anyhow::anyhow!("{e}:\n{}", env.agent().log_text()))?;
    assert!(
        agent_line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/app\""),
        "{agent_line}"
    );

    // nginx: every allowed request came from the waypoint; no refused one
    // arrived.
    let log = env.inet.log();
    for want in [
        "sni=a.example.com host=a.example.com \"GET /tls",
        "sni=- host=a.example.com \"GET /plain",
        "sni=httpbin.org host=httpbin.org \"GET /get",
    ] {
        let line = log
            .lines()
            .find(|l| l.contains(want))
            .unwrap_or_else(|| panic!("nginx never saw {want}:\n{log}"));
        assert!(
            line.starts_with(&format!("{wp_ip} ")),
            "not from the waypoint: {line}"
        );
    }
    for never in ["b.example.com", "c.other.test"] {
        assert!(!log.contains(never), "{never} reached the internet:\n{log}");
    }
    assert_eq!(log.lines().count(), 3, "{log}");
    Ok(())
}

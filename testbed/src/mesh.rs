//! The Istio objects tests stand a mesh up with, as YAML documents: an
//! ambient Namespace, a waypoint Gateway, ServiceEntries and their ports.
//! One home for the text the kernel tests (`tests/`), the agent's loopback
//! tests and `cargo xtask soak` write into a config directory, so a change
//! of Istio's field names or shunt's parser is made once. The seed's own
//! objects are read from `examples/egress/` ([`crate::seed`]), never built
//! here. Plain text, no `shunt-agent` types: usable without the `mesh`
//! feature (xtask).
//!
//! Each object function returns one document (no `---`); [`docs`] joins
//! them. [`node`], [`waypoint_args`] and [`waypoint_serving`] are the rest
//! of standing such a mesh up on a [`Node`].

use std::ops::Range;
use std::time::Duration;

use crate::{wait_for, Node, Proc, Result};

/// The namespace of the kernel tests' meshes.
pub const NAMESPACE: &str = "default";
/// The kernel tests' waypoint Gateway (in [`NAMESPACE`]).
pub const WAYPOINT: &str = "wp";

/// `documents` as one multi-document YAML stream.
pub fn docs<S: AsRef<str>>(documents: &[S]) -> String {
    let mut y = String::new();
    for (i, d) in documents.iter().enumerate() {
        if i > 0 {
            y.push_str("---\n");
        }
        y.push_str(d.as_ref());
        if !y.ends_with('\n') {
            y.push('\n');
        }
    }
    y
}

/// A Namespace enrolled in ambient; with `use_waypoint`, its services are
/// bound to that waypoint (`istio.io/use-waypoint` on the namespace).
pub fn namespace(name: &str, use_waypoint: Option<&str>) -> String {
    let mut y = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
    );
    if let Some(wp) = use_waypoint {
        y.push_str(&format!("    istio.io/use-waypoint: {wp}\n"));
    }
    y
}

/// A waypoint for service traffic: Gateway `name` of class
/// `istio-waypoint` at `address`, HBONE on 15008.
pub fn waypoint(name: &str, namespace: &str, address: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: {name}
  namespace: {namespace}
  labels:
    istio.io/waypoint-for: service
spec:
  gatewayClassName: istio-waypoint
  addresses:
  - type: IPAddress
    value: {address}
  listeners:
  - name: mesh
    port: 15008
    protocol: HBONE
"#
    )
}

/// The start of every kernel test's mesh: the ambient Namespace
/// [`NAMESPACE`], a pod's WorkloadEntry (`Pod::workload_entry`) and the
/// waypoint [`WAYPOINT`] at `waypoint_ip`.
pub fn base(workload: String, waypoint_ip: &str) -> Vec<String> {
    vec![
        namespace(NAMESPACE, None),
        workload,
        waypoint(WAYPOINT, NAMESPACE, waypoint_ip),
    ]
}

/// A node with the pods of a mesh: `app` (the client), `wp` (the
/// waypoint) and `inet` (the upstreams), forwarding between them.
pub fn node() -> Result<Node> {
    let mut node = Node::new()?;
    for pod in ["app", "wp", "inet"] {
        node.add_pod(pod)?;
    }
    node.enable_forwarding()?;
    Ok(node)
}

/// `shunt waypoint` serving [`WAYPOINT`] from these directories.
pub fn waypoint_args<'a>(
    config_dir: &'a str,
    state_dir: &'a str,
    ca_dir: &'a str,
) -> [&'a str; 11] {
    [
        "waypoint",
        "--config-dir",
        config_dir,
        "--state-dir",
        state_dir,
        "--ca-dir",
        ca_dir,
        "--name",
        WAYPOINT,
        "--namespace",
        NAMESPACE,
    ]
}

/// Whether a waypoint's log says it serves a config with services.
pub fn waypoint_serving(log: &str) -> bool {
    log.lines().any(|l| {
        (l.contains("waypoint ready") || l.contains("config applied")) && !l.contains("services=0")
    })
}

/// Starts `shunt waypoint` with `args` in the node's `wp` pod (`SHUNT_LOG`
/// is `log_filter`; log `waypoint.log` in the node's work dir), resolving
/// names through `nameserver` when given, and waits until it serves.
pub fn start_waypoint(
    node: &Node,
    nameserver: Option<&str>,
    args: &[&str],
    log_filter: &str,
) -> Result<Proc> {
    let (pod, log) = (node.pod("wp"), node.work_dir.join("waypoint.log"));
    let env = [("SHUNT_LOG", log_filter)];
    let waypoint = match nameserver {
        Some(ns) => pod.spawn_with_resolver(ns, &crate::shunt_bin(), args, &env, &log)?,
        None => pod.spawn_env(&crate::shunt_bin(), args, &env, &log)?,
    };
    wait_serving(&waypoint)?;
    Ok(waypoint)
}

/// Waits until `waypoint`'s log says it serves a config with services; the
/// error carries its log.
pub fn wait_serving(waypoint: &Proc) -> Result<()> {
    wait_for(
        "waypoint ready with services",
        Duration::from_secs(30),
        || waypoint_serving(&waypoint.log_text()).then_some(()),
    )
    .map_err(|e| anyhow::anyhow!("{e}; waypoint log:\n{}", waypoint.log_text()))
}

/// One port of a ServiceEntry.
#[derive(Clone, Copy, Debug)]
pub struct Port<'a> {
    pub number: u16,
    pub name: &'a str,
    pub protocol: &'a str,
    /// Where the endpoints listen, when not on `number`.
    pub target_port: Option<u16>,
}

impl Port<'static> {
    /// A TCP port `number` to `target_port`.
    pub const fn tcp(number: u16, target_port: u16) -> Self {
        Port {
            number,
            name: "tcp",
            protocol: "TCP",
            target_port: Some(target_port),
        }
    }
}

impl Port<'_> {
    /// The port as an item of `spec.ports`.
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "  - number: {}\n    name: {}\n    protocol: {}\n",
            self.number, self.name, self.protocol
        );
        if let Some(t) = self.target_port {
            y.push_str(&format!("    targetPort: {t}\n"));
        }
        y
    }
}

/// A ServiceEntry; [`Default`] is an empty STATIC entry in [`NAMESPACE`]
/// with no waypoint.
#[derive(Clone, Copy, Debug)]
pub struct ServiceEntry<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    /// `istio.io/use-waypoint` on the entry itself.
    pub waypoint: Option<&'a str>,
    pub hosts: &'a [&'a str],
    pub ports: &'a [Port<'a>],
    /// `STATIC`, `DNS` or `DYNAMIC_DNS`.
    pub resolution: &'a str,
    /// Endpoint addresses (none: omitted).
    pub endpoints: &'a [&'a str],
}

impl Default for ServiceEntry<'_> {
    fn default() -> Self {
        ServiceEntry {
            name: "",
            namespace: NAMESPACE,
            waypoint: None,
            hosts: &[],
            ports: &[],
            resolution: "STATIC",
            endpoints: &[],
        }
    }
}

impl ServiceEntry<'_> {
    pub fn yaml(&self) -> String {
        let mut y = format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {}\n  namespace: {}\n",
            self.name, self.namespace
        );
        if let Some(wp) = self.waypoint {
            y.push_str(&format!("  labels:\n    istio.io/use-waypoint: {wp}\n"));
        }
        y.push_str("spec:\n  hosts:\n");
        for h in self.hosts {
            // Quoted: a wildcard host would otherwise be a YAML alias.
            y.push_str(&format!("  - \"{h}\"\n"));
        }
        y.push_str("  ports:\n");
        for p in self.ports {
            y.push_str(&p.yaml());
        }
        y.push_str(&format!("  resolution: {}\n", self.resolution));
        if !self.endpoints.is_empty() {
            y.push_str("  endpoints:\n");
            for e in self.endpoints {
                y.push_str(&format!("  - address: {e}\n"));
            }
        }
        y
    }
}

/// A DNS ServiceEntry `name` in [`NAMESPACE`] with every host of `hosts`
/// and a TCP port `p<n>` for each `n` of `ports`: configs sized against the
/// kernel's maps and the VIP range.
pub fn wide_entry(name: &str, hosts: &[String], ports: Range<u16>) -> String {
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let names: Vec<String> = ports.clone().map(|n| format!("p{n}")).collect();
    let ports: Vec<Port> = ports
        .zip(&names)
        .map(|(number, name)| Port {
            number,
            name,
            protocol: "TCP",
            target_port: None,
        })
        .collect();
    ServiceEntry {
        name,
        hosts: &hosts,
        ports: &ports,
        resolution: "DNS",
        ..Default::default()
    }
    .yaml()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_waypoint_serves_only_once_it_has_services() {
        assert!(!waypoint_serving("x waypoint ready services=0\n"));
        assert!(waypoint_serving("a\nx config applied services=2\n"));
        assert!(!waypoint_serving("x listening\n"));
    }

    #[test]
    fn docs_are_separated_once_each() {
        let y = docs(&["a: 1\n", "b: 2"]);
        assert_eq!(y, "a: 1\n---\nb: 2\n");
    }

    #[test]
    fn a_service_entry_has_its_label_ports_and_endpoints() {
        let y = ServiceEntry {
            name: "echo",
            waypoint: Some(WAYPOINT),
            hosts: &["echo.internal", "*.example.com"],
            ports: &[
                Port::tcp(9000, 7000),
                Port {
                    number: 80,
                    name: "http",
                    protocol: "HTTP",
                    target_port: None,
                },
            ],
            endpoints: &["10.0.0.1"],
            ..Default::default()
        }
        .yaml();
        assert!(
            y.contains("  namespace: default\n  labels:\n    istio.io/use-waypoint: wp\nspec:\n"),
            "{y}"
        );
        assert!(y.contains("  - \"*.example.com\"\n"), "{y}");
        assert!(
            y.contains("    targetPort: 7000\n  - number: 80\n    name: http\n    protocol: HTTP\n  resolution: STATIC\n"),
            "{y}"
        );
        assert!(y.ends_with("  endpoints:\n  - address: 10.0.0.1\n"), "{y}");
    }

    /// The documents are what shunt's own parser accepts and means.
    #[cfg(feature = "mesh")]
    #[test]
    fn shunt_loads_a_mesh_built_here() {
        let dir = tempfile::tempdir().unwrap();
        let mut d = vec![
            namespace("infra", Some("egress")),
            waypoint("egress", "infra", "10.0.0.9"),
        ];
        d.push(
            ServiceEntry {
                name: "wild",
                namespace: "infra",
                hosts: &["*.example.com"],
                ports: &[Port {
                    number: 443,
                    name: "tls",
                    protocol: "TLS",
                    target_port: None,
                }],
                resolution: "DYNAMIC_DNS",
                ..Default::default()
            }
            .yaml(),
        );
        d.push(
            ServiceEntry {
                name: "echo",
                namespace: "infra",
                waypoint: Some("egress"),
                hosts: &["echo.internal"],
                ports: &[Port::tcp(9000, 7000)],
                endpoints: &["10.0.0.1"],
                ..Default::default()
            }
            .yaml(),
        );
        std::fs::write(dir.path().join("10-objects.yaml"), docs(&d)).unwrap();
        let cfg = shunt_agent::config::Config::load_dir(dir.path()).unwrap();
        assert!(cfg.namespace_is_ambient("infra"));
        assert_eq!(cfg.gateways.len(), 1);
        let [wild, echo] = &cfg.service_entries[..] else {
            panic!("two entries: {:?}", cfg.service_entries);
        };
        assert_eq!(&wild.spec.hosts[..], ["*.example.com"]);
        assert!(wild.spec.endpoints.is_empty());
        assert_eq!(
            echo.spec.ports[0].target_port,
            Some(shunt_agent::config::Port(7000))
        );
        assert_eq!(echo.spec.endpoints[0].address, "10.0.0.1");
        let gateway = shunt_agent::config::ObjectKey {
            namespace: "infra".into(),
            name: "egress".into(),
        };
        for (se, from_namespace_label) in [(wild, true), (echo, false)] {
            assert_eq!(
                cfg.waypoint_ref(se),
                shunt_agent::config::WaypointRef::Gateway {
                    gateway: gateway.clone(),
                    from_namespace_label
                }
            );
        }
    }
}

//! The config `cargo xtask scale` generates: N ServiceEntries mixed like a
//! real registry, plus the fixed files (mesh, namespaces, the client
//! workload, the seed, the probe entry). Its one home: the in-process stage
//! harness `agent/examples/scale_stages.rs` includes this file too
//! (`#[path]`), so both measure the same config. Only std, anyhow and
//! `shunt_testbed::seed`, which both crates have.

use anyhow::Result;
use shunt_testbed::seed;

/// Port of the probe ServiceEntry (and of the sink behind it).
pub const PROBE_PORT: u16 = 9000;
/// The edited entry's HTTP port after an [`Edit::Port`].
pub const EDIT_PORT: u16 = 8081;
pub const NAMESPACES: usize = 100;
pub const WAYPOINT_NS: &str = "common-infrastructure";
pub const WAYPOINT: &str = "egress-gateway";

/// How a generated entry is edited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edit {
    /// Its HTTP port becomes [`EDIT_PORT`].
    Port,
    /// Its first host gets another name (its VIP changes owner).
    Host,
}

/// The generated entry `i`: its namespace, name and YAML.
pub struct Entry {
    pub ns: String,
    pub name: String,
    pub yaml: String,
}

/// Entry `i`: DNS (most), STATIC with an endpoint, DNS with explicit
/// addresses, DNS with two hosts, DNS_ROUND_ROBIN, DYNAMIC_DNS wildcards;
/// one or two ports; about a third bound to the seed's waypoint by label;
/// spread over [`NAMESPACES`] namespaces.
pub fn entry(i: usize, edit: Option<Edit>) -> Entry {
    let ns = format!("scale-{:02}", i % NAMESPACES);
    let name = format!("se-{i}");
    let bound = i.is_multiple_of(3);
    let kind = i % 10;
    let mut labels = String::new();
    if bound || kind == 8 {
        labels = format!(
            "  labels:\n    istio.io/use-waypoint: {WAYPOINT}\n    istio.io/use-waypoint-namespace: {WAYPOINT_NS}\n"
        );
    }
    let http = if edit == Some(Edit::Port) {
        EDIT_PORT
    } else {
        80
    };
    let tag = if edit == Some(Edit::Host) { "x" } else { "" };
    let two_ports = i.is_multiple_of(2);
    let (hosts, resolution, extra) = match kind {
        0 => (
            format!("  - s{i}{tag}.static.example\n"),
            "STATIC",
            format!(
                "  endpoints:\n  - address: 10.{}.{}.{}\n",
                100 + (i >> 16) % 100,
                (i >> 8) & 255,
                i & 255
            ),
        ),
        1 => (
            format!("  - s{i}{tag}.addr.example\n"),
            "DNS",
            format!("  addresses:\n  - 10.200.{}.{}\n", (i >> 8) & 255, i & 255),
        ),
        7 => (
            format!("  - s{i}{tag}.a.example\n  - s{i}.b.example\n"),
            "DNS",
            String::new(),
        ),
        8 => (
            format!("  - \"*.d{i}{tag}.example\"\n"),
            "DYNAMIC_DNS",
            String::new(),
        ),
        9 => (
            format!("  - s{i}{tag}.rr.example\n"),
            "DNS_ROUND_ROBIN",
            String::new(),
        ),
        _ => (format!("  - s{i}{tag}.svc.example\n"), "DNS", String::new()),
    };
    let mut ports = format!("  - number: {http}\n    name: http\n    protocol: HTTP\n");
    if two_ports {
        // TLS passthrough (by SNI), which DYNAMIC_DNS accepts too.
        ports.push_str("  - number: 443\n    name: tls\n    protocol: TLS\n");
    }
    let yaml = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {name}\n  namespace: {ns}\n{labels}spec:\n  hosts:\n{hosts}  ports:\n{ports}  resolution: {resolution}\n{extra}"
    );
    Entry { ns, name, yaml }
}

/// The text of generated file `f` (entries `f * per_file ..` below `n`),
/// with entry `edit.0` edited as `edit.1` if it is in this file.
pub fn file_text(f: usize, per_file: usize, n: usize, edit: Option<(usize, Edit)>) -> String {
    let mut s = String::with_capacity(per_file * 300);
    for i in f * per_file..((f + 1) * per_file).min(n) {
        if !s.is_empty() {
            s.push_str("---\n");
        }
        let e = edit.filter(|(j, _)| *j == i).map(|(_, e)| e);
        s.push_str(&entry(i, e).yaml);
    }
    s
}

pub fn file_name(f: usize) -> String {
    format!("se-{f:04}.yaml")
}

/// The fixed part of the config: mesh, namespaces, the client workload
/// (`app_ip`, its cgroup `app_cgroup`), the seed (rewired to this machine)
/// and the probe entry (unbound, STATIC to the sink at `inet_ip`).
pub fn base_files(
    app_ip: &str,
    inet_ip: &str,
    wp_ip: &str,
    app_cgroup: &str,
) -> Result<Vec<(&'static str, String)>> {
    let mut ns = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    istio.io/dataplane-mode: ambient\n",
    );
    for i in 0..NAMESPACES {
        ns.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: scale-{i:02}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
        ));
    }
    ns.push_str(&format!(
        "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: app\n  namespace: default\n  annotations:\n    shunt.io/cgroup: {app_cgroup}\n  labels:\n    app: app\nspec:\n  address: {app_ip}\n  serviceAccount: curl\n"
    ));
    Ok(vec![
        ("mesh.yaml", "trustDomain: cluster.local\n".to_string()),
        ("00-workload.yaml", ns),
        (
            "01-seed.yaml",
            seed::loopback_service(wp_ip.parse()?, inet_ip.parse()?, PROBE_PORT, &[])?,
        ),
        ("02-policy.yaml", seed::file(seed::POLICY)?),
        (
            "03-probe.yaml",
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: scale-probe\n  namespace: default\nspec:\n  hosts:\n  - probe.scale.internal\n  ports:\n  - number: {PROBE_PORT}\n    name: tcp-probe\n    protocol: TCP\n  resolution: STATIC\n  endpoints:\n  - address: {inet_ip}\n"
            ),
        ),
    ])
}

/// Writes the whole generated config into `dir` (created if missing), with
/// the addresses `cargo xtask scale --generate` uses outside a test bed.
pub fn write_all(dir: &std::path::Path, n: usize, per_file: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in base_files("10.1.0.2", "10.2.0.2", "10.3.0.2", "/sys/fs/cgroup/app")? {
        std::fs::write(dir.join(name), text)?;
    }
    for f in 0..n.div_ceil(per_file) {
        std::fs::write(dir.join(file_name(f)), file_text(f, per_file, n, None))?;
    }
    Ok(())
}

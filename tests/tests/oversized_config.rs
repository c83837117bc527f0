//! Issue #11 item 7 on the real kernel: a config with more (VIP, port)
//! entries than the `services` map holds is refused whole by a running
//! agent. Every reconciled map and `meta` stay as they were, `vips.json`
//! keeps no address for the refused config's hosts, connections to the old
//! VIPs still work, and the error names the counts and the limit.

use std::time::Duration;

use shunt_agent::kernel::{projection::Capacity, PinnedMaps, Projection};
use shunt_testbed::{mesh::wide_entry, wait_for, Node, Result};

/// Hosts of the oversized entry; its ports are as many as take it (an IPv4
/// and an IPv6 VIP per host) just past the `services` map.
const HOSTS: usize = 400;

/// Everything the agent reconciles into the kernel, as pinned now.
fn snapshot(maps: &PinnedMaps) -> Result<Projection> {
    Ok(Projection {
        services: shunt_agent::model::CowMap::from_sorted(maps.read_services()?),
        enrolled: maps.read_enrolled()?,
        sources: maps.read_sources()?,
        egress_allow: maps.read_egress_allow()?,
        meta: maps.meta()?,
    })
}

#[test]
fn a_config_larger_than_the_services_map_is_refused_whole_and_the_previous_one_stays_in_force(
) -> Result<()> {
    let mut node = Node::new()?;
    node.add_pod("app")?;
    node.write_config(
        "00-workloads.yaml",
        &format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels:\n    istio.io/dataplane-mode: ambient\n---\n{}",
            node.pod("app").workload_entry("default", "app")
        ),
    )?;
    node.write_config(
        "10-httpbin.yaml",
        &wide_entry("httpbin.org", &["httpbin.org".into()], 80..81),
    )?;
    node.start_echo_agent_with_config(None)?;
    let maps = node.maps()?;
    wait_for("httpbin.org's two VIPs", Duration::from_secs(20), || {
        (maps.read_services().ok()?.len() == 2).then_some(())
    })?;
    let before = snapshot(&maps)?;
    let vips = node.state_dir.join("vips.json");
    let vips_before = std::fs::read_to_string(&vips)?;

    let hosts: Vec<String> = (0..HOSTS).map(|i| format!("h{i}.big.example")).collect();
    let ports = Capacity::KERNEL.services / (2 * HOSTS) + 1;
    node.write_config(
        "20-big.yaml",
        &wide_entry("big", &hosts, 1000..1000 + ports as u16),
    )?;
    let needed = 2 + 2 * HOSTS * ports;
    let want = format!(
        "the config needs {needed} entries in the kernel map `services`, which holds {}",
        Capacity::KERNEL.services
    );
    wait_for("the refusal logged", Duration::from_secs(120), || {
        node.agents[0].log_text().contains(&want).then_some(())
    })?;
    let log = node.agents[0].log_text();
    assert!(
        log.contains("config refused whole, the previous config stays in force"),
        "{log}"
    );
    assert!(!log.contains("bpf_map_update_elem"), "{log}");

    // Give a partial write time to show, then compare everything.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(snapshot(&maps)?, before, "a refused config changed a map");
    let vips_after = std::fs::read_to_string(&vips)?;
    assert!(
        vips_after == vips_before,
        "a refused config changed vips.json ({} -> {} bytes)",
        vips_before.len(),
        vips_after.len()
    );
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.1:80", "--echo", "1000"])?;
    assert!(
        r.contains("dst=240.240.0.1:80") && r.contains("echoed=1000"),
        "the old VIP stopped working: {r}"
    );

    // A config that fits is applied next, and its new host gets the next
    // address: the refused one's 400 hosts reserved nothing.
    node.write_config(
        "20-big.yaml",
        &wide_entry("small", &["small.example".into()], 443..444),
    )?;
    wait_for(
        "the fitting config applied",
        Duration::from_secs(60),
        || (maps.read_services().ok()?.len() == 4).then_some(()),
    )?;
    let state = std::fs::read_to_string(&vips)?;
    assert!(!state.contains("big.example"), "{state}");
    let r = node
        .pod("app")
        .probe(&["connect", "240.240.0.2:443", "--echo", "10"])?;
    assert!(r.contains("dst=240.240.0.2:443"), "{r}");
    Ok(())
}

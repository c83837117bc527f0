//! `kernel::MapSync` against real pinned maps (no program attached): the
//! generic reconcile works for the hash maps and the LPM trie, a second
//! sync opened on the same pins (a restarted agent) changes nothing, and a
//! changed projection touches exactly what differs.

use std::path::PathBuf;

use aya::maps::lpm_trie::Key;
use shunt_agent::{
    config::OutboundMode,
    kernel::{
        loader,
        projection::{self, DnsCapture},
        reconcile::Diff,
        registry::{addr_bytes, tcp_key},
        KernelPaths, MapSync, PinnedMaps, Projection,
    },
};
use shunt_common::{CidrAddr, EnrolledValue, ServiceValue};
use shunt_testbed::{shunt_bin, unique_id, PinDir, Result};

/// A pin directory of its own, removed with everything in it (the
/// testbed's guard) on drop.
struct Pins {
    paths: KernelPaths,
    _dir: PinDir,
}

impl Pins {
    fn new() -> Result<Self> {
        let dir = PinDir::new(&format!("shunt-test-sync-{}", unique_id()));
        let paths = KernelPaths {
            pin_dir: dir.to_path_buf(),
            cgroup_root: PathBuf::new(),
        };
        // The object only creates and pins the maps; dropping it leaves them.
        drop(loader::load_pinned(&paths)?);
        Ok(Pins { paths, _dir: dir })
    }
}

fn service(id: u32) -> ServiceValue {
    ServiceValue {
        service_id: id,
        flags: 0,
        waypoint_addr: [0; 16],
        waypoint_port: 0,
        target_port: 80,
        _pad: [0; 4],
    }
}

fn projection(services: &[(&str, u32)], cidrs: &[&str]) -> Projection {
    Projection {
        services: services
            .iter()
            .map(|(dst, id)| (tcp_key(dst.parse().unwrap()), service(*id)))
            .collect(),
        enrolled: [(
            4242u64,
            EnrolledValue {
                workload_id: 1,
                flags: 0,
            },
        )]
        .into(),
        sources: [(
            CidrAddr {
                addr: addr_bytes("10.0.0.1".parse().unwrap()),
            },
            3u32,
        )]
        .into(),
        egress_allow: projection::egress_allow(
            &cidrs.iter().map(|c| c.parse().unwrap()).collect::<Vec<_>>(),
        ),
        meta: projection::meta(
            OutboundMode::RegistryOnly,
            Some(DnsCapture {
                addr4: "169.254.20.10".parse().unwrap(),
                addr6: "fd73:6875:6e74::53".parse().unwrap(),
                port: 53,
            }),
        ),
    }
}

fn assert_pinned_equals(maps: &PinnedMaps, p: &Projection) -> Result<()> {
    let services: std::collections::BTreeMap<_, _> =
        p.services.iter().map(|(k, v)| (*k, *v)).collect();
    assert_eq!(maps.read_services()?, services);
    assert_eq!(maps.read_enrolled()?, p.enrolled);
    assert_eq!(maps.read_sources()?, p.sources);
    assert_eq!(maps.read_egress_allow()?, p.egress_allow);
    assert_eq!(maps.meta()?, p.meta);
    Ok(())
}

/// The kernel's longest-prefix match for one address.
fn allowed(maps: &PinnedMaps, ip: &str) -> bool {
    let key = Key::new(
        128,
        CidrAddr {
            addr: addr_bytes(ip.parse().unwrap()),
        },
    );
    maps.egress_allow.get(&key, 0).is_ok()
}

#[test]
fn map_sync_reconciles_hash_maps_and_the_lpm_trie_and_a_restart_changes_nothing() -> Result<()> {
    let pins = Pins::new()?;
    let dir = &pins.paths.pin_dir;
    let first = projection(
        &[("240.240.0.1:80", 1), ("240.240.0.2:80", 2)],
        &["10.96.0.0/12", "fd00::/64"],
    );
    let stats = MapSync::open(dir)?.apply(&first)?;
    assert_eq!(stats.services.added, 2);
    assert_eq!(stats.egress_allow.added, 2);
    assert!(stats.meta_changed);
    let maps = PinnedMaps::open(dir)?;
    assert_pinned_equals(&maps, &first)?;
    assert!(allowed(&maps, "10.100.1.1"));
    assert!(allowed(&maps, "fd00::53"));
    assert!(!allowed(&maps, "10.112.0.1"));

    // A restarted agent mirrors the pinned state: nothing to write.
    let mut restarted = MapSync::open(dir)?;
    let again = restarted.apply(&first)?;
    assert_eq!(again.total(), Diff::default());
    assert!(!again.meta_changed);

    // One service changed, one gone, one new; one CIDR swapped.
    let second = projection(
        &[("240.240.0.1:80", 9), ("[2001:2::3]:443", 3)],
        &["10.96.0.0/12", "192.168.0.0/16"],
    );
    let stats = restarted.apply(&second)?;
    assert_eq!(
        stats.services,
        Diff {
            added: 1,
            updated: 1,
            removed: 1
        }
    );
    assert_eq!(
        stats.egress_allow,
        Diff {
            added: 1,
            updated: 0,
            removed: 1
        }
    );
    assert_eq!(stats.enrolled, Diff::default());
    assert!(!stats.meta_changed);
    assert_pinned_equals(&maps, &second)?;
    assert!(allowed(&maps, "192.168.7.7"));
    assert!(!allowed(&maps, "fd00::53"));

    // `shunt maps` reads the same registry handles.
    let out = std::process::Command::new(shunt_bin())
        .args(["maps", "--pin-dir", &dir.display().to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for want in [
        "SERVICES (2)",
        "2001:2::3",
        "SOURCES (1)",
        "10.0.0.1",
        "EGRESS_ALLOW (2)",
        "10.96.0.0/12",
        "192.168.0.0/16",
        "egress REGISTRY_ONLY",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    Ok(())
}

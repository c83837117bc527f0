//! The YAML config loader (config/load.rs): any bytes as a config file,
//! then what a valid config feeds (policy compilation, the mesh view).
//! Input: the objects file; after a line `#mesh` (if any), `mesh.yaml`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shunt_agent::fuzzing;
use shunt_agent::policy::{BuildOptions, GatewayRef, PolicySet};

fuzz_target!(|data: &[u8]| {
    let (objects, mesh) = match find(data, b"\n#mesh\n") {
        Some(i) => (&data[..i], Some(&data[i + 7..])),
        None => (data, None),
    };
    let mut files: Vec<(&str, &[u8])> = vec![("10-objects.yaml", objects)];
    if let Some(m) = mesh {
        files.push(("mesh.yaml", m));
    }
    let Ok(cfg) = fuzzing::config(&files) else {
        return;
    };
    let _ = shunt_agent::model::Mesh::from_config(&cfg.mesh);
    let items: Vec<_> = cfg
        .authorization_policies
        .iter()
        .map(|p| (p.metadata.clone(), p.spec.clone()))
        .collect();
    let gateways = cfg.gateways.iter().map(|g| {
        Some(GatewayRef {
            namespace: g.namespace().to_string(),
            name: g.name().to_string(),
        })
    });
    for g in gateways.chain([None]) {
        let _ = PolicySet::build(&items, &BuildOptions::for_config(&cfg, g));
    }
});

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

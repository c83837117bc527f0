//! The seed's configuration, read from `examples/egress/` — its one copy.
//! Tests and benches that need it on one machine without the internet
//! rewrite it with [`edit`], which fails when the seed no longer has the
//! text being replaced (so a changed seed cannot silently go untested).

use std::{net::IpAddr, path::PathBuf};

use crate::{mesh::Port, Result};

pub const MESH: &str = "mesh.yaml";
pub const WORKLOADS: &str = "00-curl.yaml";
pub const NAMESPACE: &str = "01-namespace.yaml";
pub const WAYPOINT: &str = "02-waypoint.yaml";
pub const SERVICE_ENTRY: &str = "03-serviceentry.yaml";
pub const POLICY: &str = "04-authorizationpolicy.yaml";
/// Replaces [`SERVICE_ENTRY`] in the TLS origination step.
pub const TLS_SERVICE_ENTRY: &str = "tls-origination/03-serviceentry.yaml";

/// The waypoint's address in [`WAYPOINT`].
const SEED_WAYPOINT_ADDR: &str = "10.244.1.18";

/// `examples/egress/`.
pub fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/egress")
}

/// The path of one of the seed's files (`name` relative to [`dir`]).
pub fn path(name: &str) -> PathBuf {
    dir().join(name)
}

/// The text of one of the seed's files.
pub fn file(name: &str) -> Result<String> {
    let p = path(name);
    std::fs::read_to_string(&p).map_err(|e| anyhow::anyhow!("seed file {}: {e}", p.display()))
}

/// `text` with its one occurrence of `from` replaced by `to`; an error if
/// `from` occurs other than exactly once.
pub fn edit(text: &str, from: &str, to: &str) -> Result<String> {
    let n = text.matches(from).count();
    anyhow::ensure!(
        n == 1,
        "expected one {from:?} in the seed's text to replace, found {n}"
    );
    Ok(text.replacen(from, to, 1))
}

/// The seed's namespace, waypoint Gateway and ServiceEntry as one
/// multi-document YAML, rewired for one machine: the waypoint listens at
/// `waypoint`; httpbin.org is STATIC with the endpoint `endpoint`, its
/// port 80 going to `target_port`, plus `extra` ports.
pub fn loopback_service(
    waypoint: IpAddr,
    endpoint: IpAddr,
    target_port: u16,
    extra: &[Port<'_>],
) -> Result<String> {
    let gateway = edit(
        &file(WAYPOINT)?,
        &format!("value: {SEED_WAYPOINT_ADDR}\n"),
        &format!("value: {waypoint}\n"),
    )?;
    let mut ports = format!("    protocol: HTTP\n    targetPort: {target_port}\n");
    for p in extra {
        ports.push_str(&p.yaml());
    }
    let se = edit(&file(SERVICE_ENTRY)?, "    protocol: HTTP\n", &ports)?;
    let se = edit(
        &se,
        "  resolution: DNS\n",
        &format!("  resolution: STATIC\n  endpoints:\n  - address: {endpoint}\n"),
    )?;
    Ok(format!("{}---\n{gateway}---\n{se}", file(NAMESPACE)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_seed_file_is_readable() {
        for f in [
            MESH,
            WORKLOADS,
            NAMESPACE,
            WAYPOINT,
            SERVICE_ENTRY,
            POLICY,
            TLS_SERVICE_ENTRY,
        ] {
            assert!(file(f).unwrap().contains(':'), "{f}");
        }
    }

    #[test]
    fn loopback_service_rewires_waypoint_endpoint_and_ports() {
        let y = loopback_service(
            "127.0.0.1".parse().unwrap(),
            "127.0.0.2".parse().unwrap(),
            8080,
            &[Port {
                number: 81,
                name: "http-down",
                protocol: "HTTP",
                target_port: Some(9),
            }],
        )
        .unwrap();
        assert!(y.contains("value: 127.0.0.1\n"), "{y}");
        assert!(!y.contains(SEED_WAYPOINT_ADDR), "{y}");
        assert!(y.contains("    targetPort: 8080\n  - number: 81\n"), "{y}");
        assert!(
            y.contains("resolution: STATIC\n  endpoints:\n  - address: 127.0.0.2\n"),
            "{y}"
        );
        assert_eq!(y.matches("---\n").count(), 2, "three documents: {y}");
    }

    #[test]
    fn edit_refuses_text_the_seed_does_not_have_once() {
        assert!(edit("a b a", "a", "c").is_err());
        assert!(edit("a b", "x", "c").is_err());
        assert_eq!(edit("a b", "b", "c").unwrap(), "a c");
    }
}

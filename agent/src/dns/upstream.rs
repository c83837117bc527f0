//! Upstream resolver addresses: from resolv.conf or `--dns-upstream`.

use std::net::{IpAddr, SocketAddr, SocketAddrV6};
use std::path::Path;

use super::DnsError;

/// Parses `IP`, `IP:PORT`, `[IPv6]:PORT` (port defaults to 53).
pub fn parse_upstream(value: &str) -> Result<SocketAddr, DnsError> {
    let v = value.trim();
    if let Ok(sa) = v.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if let Ok(ip) = v.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    Err(DnsError::UpstreamAddress {
        value: value.to_string(),
    })
}

/// The `nameserver` lines of a resolv.conf, port 53. IPv6 link-local
/// addresses may carry a zone (`fe80::1%eth0`).
pub fn upstreams_from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, DnsError> {
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let value = words.next().unwrap_or("");
        let bad = || DnsError::ResolvConfAddress {
            path: path.to_path_buf(),
            line: i + 1,
            value: value.to_string(),
        };
        let (ip, zone) = match value.split_once('%') {
            Some((ip, zone)) => (ip, Some(zone)),
            None => (value, None),
        };
        let ip: IpAddr = ip.parse().map_err(|_| bad())?;
        let addr = match (ip, zone) {
            (IpAddr::V6(v6), Some(zone)) => {
                let scope = zone_index(zone).ok_or_else(bad)?;
                SocketAddr::V6(SocketAddrV6::new(v6, 53, 0, scope))
            }
            (IpAddr::V4(_), Some(_)) => return Err(bad()),
            (ip, None) => SocketAddr::new(ip, 53),
        };
        out.push(addr);
    }
    if out.is_empty() {
        return Err(DnsError::NoNameserver {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

fn zone_index(zone: &str) -> Option<u32> {
    if let Ok(n) = zone.parse::<u32>() {
        return Some(n);
    }
    let c = std::ffi::CString::new(zone).ok()?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (idx != 0).then_some(idx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("resolv.conf");
        std::fs::write(&p, "# c\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver ::1 # x\noptions ndots:5\n").unwrap();
        let ups = upstreams_from_resolv_conf(&p).unwrap();
        assert_eq!(
            ups,
            vec![
                "10.96.0.10:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        std::fs::write(&p, "nameserver 10.96.0\n").unwrap();
        let e = upstreams_from_resolv_conf(&p).unwrap_err().to_string();
        assert!(e.contains(":1:") && e.contains("10.96.0"), "{e}");
        std::fs::write(&p, "search x\n").unwrap();
        assert!(upstreams_from_resolv_conf(&p)
            .unwrap_err()
            .to_string()
            .contains("no `nameserver`"));
    }

    #[test]
    fn upstream_flag() {
        assert_eq!(
            parse_upstream("1.1.1.1").unwrap(),
            "1.1.1.1:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[::1]:5353").unwrap(),
            "[::1]:5353".parse().unwrap()
        );
        assert!(parse_upstream("dns.google").is_err());
    }
}

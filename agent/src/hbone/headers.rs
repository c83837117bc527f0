//! HBONE request headers: `Forwarded`, `baggage`, `traceparent`.

use std::net::{IpAddr, SocketAddr};

use http::HeaderValue;

use super::HboneError;

/// `Forwarded: for="<ip:port>"[;host=<hostname>]` (IPv6 in brackets).
pub fn format_forwarded(source: SocketAddr, host: Option<&str>) -> Result<HeaderValue, HboneError> {
    let mut v = format!("for=\"{source}\"");
    if let Some(h) = host {
        v.push_str(";host=");
        v.push_str(h);
    }
    HeaderValue::try_from(v)
        .map_err(|_| HboneError::BadRequest(format!("host {host:?} is not a valid header value")))
}

/// The `for=` address of the first `Forwarded` element; `Ok(None)` when the
/// element has no `for=`. A bare IP gets port 0.
pub fn parse_forwarded(value: &str) -> Result<Option<SocketAddr>, String> {
    let first = value.split(',').next().unwrap_or("");
    for pair in first.split(';') {
        let Some((k, v)) = pair.trim().split_once('=') else {
            continue;
        };
        if !k.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|s| s.strip_suffix('"'))
            .unwrap_or(v);
        if let Ok(sa) = v.parse::<SocketAddr>() {
            return Ok(Some(sa));
        }
        let ip = v
            .strip_prefix('[')
            .and_then(|s| s.strip_suffix(']'))
            .unwrap_or(v);
        return ip
            .parse::<IpAddr>()
            .map(|ip| Some(SocketAddr::new(ip, 0)))
            .map_err(|_| format!("Forwarded for={v:?} is not an address"));
    }
    Ok(None)
}

/// Workload metadata for the `baggage` header. Build its header once per
/// workload with [`Baggage::to_header`].
#[derive(Clone, Debug, Default)]
pub struct Baggage {
    pub cluster: Option<String>,
    pub namespace: Option<String>,
    /// Workload kind as in `k8s.<kind>.name`, e.g. `deployment`.
    pub workload_kind: Option<String>,
    pub workload_name: Option<String>,
    pub service_name: Option<String>,
    pub service_version: Option<String>,
}

impl Baggage {
    pub fn to_header(&self) -> Result<HeaderValue, HboneError> {
        let kind_key = format!(
            "k8s.{}.name",
            self.workload_kind.as_deref().unwrap_or("deployment")
        );
        let items = [
            ("k8s.cluster.name", &self.cluster),
            ("k8s.namespace.name", &self.namespace),
            (kind_key.as_str(), &self.workload_name),
            ("service.name", &self.service_name),
            ("service.version", &self.service_version),
        ];
        let v: Vec<String> = items
            .iter()
            .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
            .collect();
        HeaderValue::try_from(v.join(",")).map_err(|_| {
            HboneError::BadRequest(format!("baggage {v:?} is not a valid header value"))
        })
    }
}

/// A fresh W3C `traceparent` (random trace and span ids, not sampled).
pub fn new_traceparent() -> HeaderValue {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 24];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    HeaderValue::try_from(format!("00-{}-{}-00", &hex[..32], &hex[32..]))
        .expect("hex is a valid header")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_round_trip() {
        let v4: SocketAddr = "10.0.0.1:4567".parse().unwrap();
        let v6: SocketAddr = "[fd00::1]:80".parse().unwrap();
        assert_eq!(
            format_forwarded(v4, Some("httpbin.org")).unwrap(),
            "for=\"10.0.0.1:4567\";host=httpbin.org"
        );
        assert_eq!(format_forwarded(v6, None).unwrap(), "for=\"[fd00::1]:80\"");
        assert_eq!(
            parse_forwarded("for=\"10.0.0.1:4567\";host=httpbin.org").unwrap(),
            Some(v4)
        );
        assert_eq!(
            parse_forwarded("host=x;For=\"[fd00::1]:80\", for=1.1.1.1").unwrap(),
            Some(v6)
        );
        assert_eq!(
            parse_forwarded("for=10.0.0.1").unwrap(),
            Some("10.0.0.1:0".parse().unwrap())
        );
        assert_eq!(parse_forwarded("host=x").unwrap(), None);
        assert!(parse_forwarded("for=\"_hidden\"").is_err());
    }

    #[test]
    fn baggage_and_traceparent() {
        let b = Baggage {
            cluster: Some("Kubernetes".into()),
            namespace: Some("default".into()),
            workload_kind: None,
            workload_name: Some("sleep".into()),
            service_name: Some("sleep".into()),
            service_version: Some("v1".into()),
        };
        assert_eq!(
            b.to_header().unwrap(),
            "k8s.cluster.name=Kubernetes,k8s.namespace.name=default,k8s.deployment.name=sleep,service.name=sleep,service.version=v1"
        );
        let t = new_traceparent();
        let parts: Vec<&str> = t.to_str().unwrap().split('-').collect();
        assert_eq!((parts.len(), parts[1].len(), parts[2].len()), (4, 32, 16));
    }
}

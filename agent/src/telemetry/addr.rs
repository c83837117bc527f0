//! One address format in every log line: `10.0.0.1:15008`, never the
//! IPv4-mapped `[::ffff:10.0.0.1]:15008` a dual-stack (`[::]`) socket
//! reports for an IPv4 peer. Every log site formats addresses through
//! [`LogAddr`] (`%LogAddr(peer)`), so a grep for one address finds every
//! line about it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A socket address as log lines show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogAddr(pub SocketAddr);

impl LogAddr {
    /// The address with an IPv4-mapped IPv6 IP as IPv4.
    pub fn canonical(self) -> SocketAddr {
        SocketAddr::new(self.0.ip().to_canonical(), self.0.port())
    }
}

impl From<SocketAddr> for LogAddr {
    fn from(a: SocketAddr) -> Self {
        LogAddr(a)
    }
}

impl fmt::Display for LogAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.canonical().fmt(f)
    }
}

/// An IP as log lines show it (IPv4-mapped IPv6 as IPv4).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LogIp(pub IpAddr);

impl fmt::Display for LogIp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.to_canonical().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shown(a: &str) -> String {
        LogAddr(a.parse().unwrap()).to_string()
    }

    #[test]
    fn an_ipv4_mapped_address_is_shown_as_ipv4() {
        assert_eq!(shown("[::ffff:10.0.0.1]:15008"), "10.0.0.1:15008");
        assert_eq!(
            LogIp("::ffff:203.0.113.10".parse().unwrap()).to_string(),
            "203.0.113.10"
        );
    }

    #[test]
    fn ipv4_and_real_ipv6_addresses_are_unchanged() {
        assert_eq!(shown("10.0.0.1:15008"), "10.0.0.1:15008");
        assert_eq!(shown("[2001:db8::1]:443"), "[2001:db8::1]:443");
        // ::1 and IPv4-compatible (deprecated) addresses are real IPv6.
        assert_eq!(shown("[::1]:15000"), "[::1]:15000");
        assert_eq!(shown("[::10.0.0.1]:80"), "[::a00:1]:80");
    }

    #[test]
    fn a_width_is_honoured_like_socketaddr() {
        assert_eq!(
            format!("{:<16}|", LogAddr("[::ffff:10.0.0.1]:80".parse().unwrap())),
            "10.0.0.1:80     |"
        );
    }
}

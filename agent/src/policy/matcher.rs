//! Compiled value matchers. Everything here is built once per config so that
//! evaluation is comparisons only: no parsing, no lower-casing, no allocation.

// Header values are visited through a callback (`&dyn Fn(&mut dyn
// FnMut(&[u8]))`) so that a repeated header costs no allocation.
#![allow(clippy::type_complexity)]

use std::net::IpAddr;

use ipnet::IpNet;

/// Calls its argument with each value of one header, in order.
pub(crate) type HeaderValues<'a> = dyn Fn(&mut dyn FnMut(&[u8])) + 'a;

/// Istio's string match forms: `abc` exact, `abc*` prefix, `*abc` suffix,
/// `*` presence (any non-empty value). Like Istio, a `*` elsewhere is literal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum StrMatch {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    Presence,
}

impl StrMatch {
    /// Compiles a pattern. `lower` pre-lower-cases it for case-insensitive
    /// fields (hosts), whose request values are lower-cased by normalization.
    pub(crate) fn new(pattern: &str, lower: bool) -> StrMatch {
        let p: Box<str> = if lower {
            pattern.to_ascii_lowercase().into()
        } else {
            pattern.into()
        };
        if &*p == "*" {
            StrMatch::Presence
        } else if let Some(rest) = p.strip_prefix('*') {
            // Istio checks the leading `*` first: `*a*` is a suffix match on `a*`.
            StrMatch::Suffix(rest.into())
        } else if let Some(rest) = p.strip_suffix('*') {
            StrMatch::Prefix(rest.into())
        } else {
            StrMatch::Exact(p)
        }
    }

    #[inline]
    pub(crate) fn matches(&self, v: &str) -> bool {
        self.matches_bytes(v.as_bytes())
    }

    #[inline]
    pub(crate) fn matches_bytes(&self, v: &[u8]) -> bool {
        match self {
            StrMatch::Exact(p) => v == p.as_bytes(),
            StrMatch::Prefix(p) => v.starts_with(p.as_bytes()),
            StrMatch::Suffix(p) => v.ends_with(p.as_bytes()),
            StrMatch::Presence => !v.is_empty(),
        }
    }

    /// Matches the values of a header as Envoy sees them: several values of
    /// one header are joined with `,`. The join is virtual (two passes over
    /// the values) so that a repeated header costs no allocation.
    pub(crate) fn matches_joined(&self, values: &HeaderValues<'_>) -> bool {
        let mut count = 0usize;
        let mut total = 0usize;
        let mut single: Option<bool> = None;
        values(&mut |v: &[u8]| {
            count += 1;
            total += v.len();
            if count == 1 {
                single = Some(self.matches_bytes(v));
            }
        });
        if matches!(self, StrMatch::Presence) {
            // Istio compiles `*` on a header to Envoy's present_match.
            return count > 0;
        }
        match count {
            0 => false,
            1 => single.unwrap_or(false),
            _ => {
                let total = total + count - 1;
                let (start, pat): (usize, &[u8]) = match self {
                    StrMatch::Presence => return true,
                    StrMatch::Exact(p) if p.len() != total => return false,
                    StrMatch::Exact(p) => (0, p.as_bytes()),
                    StrMatch::Prefix(p) if p.len() > total => return false,
                    StrMatch::Prefix(p) => (0, p.as_bytes()),
                    StrMatch::Suffix(p) if p.len() > total => return false,
                    StrMatch::Suffix(p) => (total - p.len(), p.as_bytes()),
                };
                virtual_window_eq(values, start, pat)
            }
        }
    }
}

/// Whether bytes `start..start+pat.len()` of the `,`-joined values equal `pat`.
fn virtual_window_eq(values: &HeaderValues<'_>, start: usize, pat: &[u8]) -> bool {
    let end = start + pat.len();
    let mut pos = 0usize; // position in the joined string
    let mut ok = true;
    let mut first = true;
    values(&mut |v: &[u8]| {
        if !ok {
            return;
        }
        if !first {
            if pos >= start && pos < end && pat[pos - start] != b',' {
                ok = false;
            }
            pos += 1;
        }
        first = false;
        // Overlap of [pos, pos+len) with [start, end).
        let lo = pos.max(start);
        let hi = (pos + v.len()).min(end);
        if lo < hi && v[lo - pos..hi - pos] != pat[lo - start..hi - start] {
            ok = false;
        }
        pos += v.len();
    });
    ok
}

pub(crate) fn any_str(ms: &[StrMatch], v: &str) -> bool {
    ms.iter().any(|m| m.matches(v))
}

/// Parses an Istio IP block: a single address or a CIDR.
pub(crate) fn parse_ip_block(s: &str) -> Option<IpNet> {
    let s = s.trim();
    if let Ok(net) = s.parse::<IpNet>() {
        return Some(net.trunc());
    }
    s.parse::<IpAddr>().ok().map(IpNet::from)
}

/// v4-mapped IPv6 (`::ffff:a.b.c.d`) is compared as IPv4 so that a dual-stack
/// socket cannot slip past an IPv4 block.
#[inline]
pub(crate) fn any_ip(nets: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joined<'a>(vals: &'a [&'a str]) -> Box<HeaderValues<'a>> {
        Box::new(move |f: &mut dyn FnMut(&[u8])| {
            for v in vals {
                f(v.as_bytes())
            }
        })
    }

    #[test]
    fn forms() {
        assert!(StrMatch::new("/get", false).matches("/get"));
        assert!(!StrMatch::new("/get", false).matches("/get/"));
        assert!(StrMatch::new("/api*", false).matches("/api/x"));
        assert!(StrMatch::new("*.org", false).matches("httpbin.org"));
        assert!(StrMatch::new("*", false).matches("x"));
        assert!(!StrMatch::new("*", false).matches(""));
        assert!(StrMatch::new("HTTPBIN.org", true).matches("httpbin.org"));
        // A `*` in the middle is literal, as in Istio.
        assert!(!StrMatch::new("/a/*/b", false).matches("/a/x/b"));
        assert!(StrMatch::new("/a/*/b", false).matches("/a/*/b"));
    }

    #[test]
    fn joined_headers() {
        let ex = StrMatch::new("a,b", false);
        assert!(ex.matches_joined(&joined(&["a", "b"])));
        assert!(!ex.matches_joined(&joined(&["a", "c"])));
        assert!(!ex.matches_joined(&joined(&["a"])));
        let sfx = StrMatch::new("*b,cd", false);
        assert!(sfx.matches_joined(&joined(&["x", "ab", "cd"])));
        assert!(!sfx.matches_joined(&joined(&["x", "ab", "ce"])));
        let pfx = StrMatch::new("x,a*", false);
        assert!(pfx.matches_joined(&joined(&["x", "ab", "cd"])));
        assert!(!StrMatch::Presence.matches_joined(&joined(&[])));
        assert!(StrMatch::Presence.matches_joined(&joined(&["", ""])));
    }

    #[test]
    fn ip_blocks() {
        let nets = [
            parse_ip_block("10.0.0.0/8").unwrap(),
            parse_ip_block("2001:db8::1").unwrap(),
        ];
        assert!(any_ip(&nets, "10.1.2.3".parse().unwrap()));
        assert!(any_ip(&nets, "::ffff:10.1.2.3".parse().unwrap()));
        assert!(any_ip(&nets, "2001:db8::1".parse().unwrap()));
        assert!(!any_ip(&nets, "2001:db8::2".parse().unwrap()));
        assert!(parse_ip_block("10.0.0.300").is_none());
    }
}

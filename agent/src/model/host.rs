//! Host names as Istio compares them: DNS names are case-insensitive, and a
//! pattern `*.example.com` matches any name strictly below `example.com`
//! (`a.example.com`, `a.b.example.com`, never `example.com` itself); `*`
//! alone matches every name. The one home of this rule: DestinationRule
//! lookup, ServiceEntry selection in the CLI and DNS all use it. When a
//! name is covered by several hosts, an exact host wins, then the most
//! specific wildcard ([`covering`]: the longest suffix first).

/// Whether `host` is matched by `pattern` (a ServiceEntry or DestinationRule
/// host, possibly a wildcard).
pub fn matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" {
        return true;
    }
    match pattern.strip_prefix('*') {
        // `suffix` keeps its leading dot, so `*.a.com` never matches `xa.com`.
        Some(suffix) => {
            host.len() > suffix.len()
                && host.as_bytes()[host.len() - suffix.len()..]
                    .eq_ignore_ascii_case(suffix.as_bytes())
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// Whether a pattern is a wildcard (`*` or `*.suffix`).
pub fn is_wildcard(pattern: &str) -> bool {
    pattern.starts_with('*')
}

/// The parent domains of `name`, nearest first (`a.b.c` → `b.c`, `c`):
/// the suffixes a wildcard `*.suffix` covering `name` can have, most
/// specific first. Borrowed slices, so lookups on a hot path allocate
/// nothing.
pub fn parents(name: &str) -> impl Iterator<Item = &str> {
    name.char_indices()
        .filter(|&(_, c)| c == '.')
        .map(move |(i, _)| &name[i + 1..])
        .filter(|s| !s.is_empty())
}

/// The wildcard hosts that cover `name`, most specific first
/// (`a.b.c` → `*.b.c`, `*.c`).
pub fn covering(name: &str) -> impl Iterator<Item = String> + '_ {
    parents(name).map(|p| format!("*.{p}"))
}

/// The DNS proxy's key for a name: lowercased, as a query may use any case.
pub fn dns_key(host: &str) -> String {
    host.to_ascii_lowercase()
}

/// [`dns_key`] without a copy for a name already in lower case.
pub fn dns_key_ref(host: &str) -> std::borrow::Cow<'_, str> {
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(dns_key(host))
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_names_match_case_insensitively() {
        assert!(matches("httpbin.org", "HTTPBIN.org"));
        assert!(!matches("httpbin.org", "httpbin.org.evil"));
    }

    #[test]
    fn a_wildcard_matches_names_strictly_below_its_suffix() {
        assert!(matches("*.example.com", "a.example.com"));
        assert!(matches("*.example.com", "a.b.Example.COM"));
        assert!(!matches("*.example.com", "example.com"));
        assert!(!matches("*.example.com", "badexample.com"));
        assert!(matches("*", "anything.at.all"));
    }

    #[test]
    fn covering_wildcards_come_most_specific_first_and_agree_with_matches() {
        let c: Vec<String> = covering("a.b.example.com").collect();
        assert_eq!(c, ["*.b.example.com", "*.example.com", "*.com"]);
        for w in &c {
            assert!(matches(w, "a.b.example.com"), "{w}");
        }
        assert_eq!(covering("com").count(), 0);
        assert_eq!(
            covering("trailing.").collect::<Vec<_>>(),
            Vec::<String>::new()
        );
    }
}

//! Text that log lines and metric labels of every connection repeat
//! (identities, names, namespaces, services): shared, not copied per
//! connection. [`intern`] hands out one `Arc<str>` per distinct value;
//! [`LogStr`] is a log field that is such a string, or an address
//! formatted only when the line is written.

use std::collections::HashSet;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};

/// Distinct values kept. The values come from the config and from mesh
/// certificates, so this is far above a real mesh's count; beyond it,
/// values no longer in use are forgotten, and if all are, a value is
/// returned unshared rather than kept.
const MAX_INTERNED: usize = 16 * 1024;

static INTERNED: LazyLock<Mutex<HashSet<Arc<str>>>> = LazyLock::new(Mutex::default);

/// The shared copy of `s` (one allocation per distinct value, not per
/// connection).
pub fn intern(s: &str) -> Arc<str> {
    let mut set = match INTERNED.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(a) = set.get(s) {
        return a.clone();
    }
    if set.len() >= MAX_INTERNED {
        set.retain(|a| Arc::strong_count(a) > 1);
        if set.len() >= MAX_INTERNED {
            return Arc::from(s);
        }
    }
    let a: Arc<str> = Arc::from(s);
    set.insert(a.clone());
    a
}

/// A log field's text: shared, or a socket address formatted (as its
/// `Display`) when the line is written.
#[derive(Clone, PartialEq, Eq, Hash)]
pub enum LogStr {
    Text(Arc<str>),
    Addr(SocketAddr),
}

impl fmt::Display for LogStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogStr::Text(s) => f.write_str(s),
            LogStr::Addr(a) => a.fmt(f),
        }
    }
}

/// Quoted and escaped as the `String` of the same text would be.
impl fmt::Debug for LogStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LogStr::Text(s) => fmt::Debug::fmt(&**s, f),
            LogStr::Addr(a) => fmt::Debug::fmt(&a.to_string(), f),
        }
    }
}

impl From<&str> for LogStr {
    fn from(s: &str) -> Self {
        LogStr::Text(s.into())
    }
}

impl From<String> for LogStr {
    fn from(s: String) -> Self {
        LogStr::Text(s.into())
    }
}

impl From<Arc<str>> for LogStr {
    fn from(s: Arc<str>) -> Self {
        LogStr::Text(s)
    }
}

impl From<SocketAddr> for LogStr {
    fn from(a: SocketAddr) -> Self {
        LogStr::Addr(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interned_value_is_one_allocation_shared() {
        let a = intern("spiffe://cluster.local/ns/default/sa/curl-interned");
        let b = intern(&String::from(
            "spiffe://cluster.local/ns/default/sa/curl-interned",
        ));
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &intern("another")));
    }

    #[test]
    fn a_log_str_prints_as_the_string_it_stands_for() {
        let quoted = "say \"hi\"\n";
        assert_eq!(
            format!("{:?}", LogStr::from(quoted)),
            format!("{:?}", quoted.to_string())
        );
        let a: SocketAddr = "[2001:db8::1]:80".parse().unwrap();
        assert_eq!(LogStr::from(a).to_string(), a.to_string());
        assert_eq!(
            format!("{:?}", LogStr::from(a)),
            format!("{:?}", a.to_string())
        );
    }
}

//! `exportTo`: which namespaces see a ServiceEntry or a DestinationRule, as
//! Istio decides it (`pilot/pkg/model` push context): `*` every namespace,
//! `.` the object's own, `~` none (ServiceEntries only), else the named
//! namespaces. An empty list takes the MeshConfig default
//! (`defaultServiceExportTo` / `defaultDestinationRuleExportTo`, both `*`
//! unless set), of which Istio honours only `.` (private, checked first)
//! and `*`.
//!
//! A namespace that cannot see a ServiceEntry gets no VIP from the DNS
//! proxy (its query goes upstream, as Istio's DNS proxy does for hosts it
//! does not know) and is refused at connect by the agent.

use std::collections::BTreeSet;
use std::fmt;

/// Who sees an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExportTo {
    /// `*`: every namespace.
    pub public: bool,
    /// Namespaces named (`.` resolved to the object's own).
    pub namespaces: BTreeSet<String>,
}

impl ExportTo {
    /// Every namespace (Istio's default).
    pub fn public() -> Self {
        ExportTo {
            public: true,
            namespaces: BTreeSet::new(),
        }
    }

    /// Resolves an object's `exportTo` (empty: `default`, the MeshConfig
    /// default) for an object in namespace `own`.
    pub fn resolve(export_to: &[String], own: &str, default: &[String]) -> Self {
        if export_to.is_empty() {
            return Self::from_default(own, default);
        }
        let mut out = ExportTo::default();
        for e in export_to {
            match e.as_str() {
                "*" => out.public = true,
                "~" => {}
                "." => {
                    out.namespaces.insert(own.to_string());
                }
                ns => {
                    out.namespaces.insert(ns.to_string());
                }
            }
        }
        out
    }

    /// The MeshConfig default: `.` wins over `*`; anything else exports to
    /// no one, as in Istio (it only looks for those two values).
    fn from_default(own: &str, default: &[String]) -> Self {
        if default.iter().any(|d| d == ".") {
            ExportTo {
                public: false,
                namespaces: [own.to_string()].into(),
            }
        } else if default.iter().any(|d| d == "*") {
            Self::public()
        } else {
            ExportTo::default()
        }
    }

    pub fn visible_to(&self, namespace: &str) -> bool {
        self.public || self.namespaces.contains(namespace)
    }

    /// Visible only in its own namespace `own` (Istio's "private only").
    pub fn private_to(&self, own: &str) -> bool {
        !self.public && self.namespaces.len() == 1 && self.namespaces.contains(own)
    }
}

impl fmt::Display for ExportTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.public {
            return f.write_str("*");
        }
        if self.namespaces.is_empty() {
            return f.write_str("~");
        }
        let v: Vec<&str> = self.namespaces.iter().map(String::as_str).collect();
        f.write_str(&v.join(","))
    }
}

/// Istio's `exportTo` validation (`pkg/config/validation`): `.`, `*`, a
/// namespace name, or `~` (ServiceEntries only); no duplicates (`.` counts
/// as the own namespace); `*` and `~` only alone. The messages, one per
/// problem, with the index of the offending entry when there is one.
pub fn validate(export_to: &[String], own: &str, allow_none: bool) -> Vec<(Option<usize>, String)> {
    let mut out = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, e) in export_to.iter().enumerate() {
        let key = if e == "." { own } else { e.as_str() };
        if !seen.insert(key.to_string()) {
            let msg = if key != e {
                format!("duplicate entries in exportTo: . and current namespace {own}")
            } else {
                format!("duplicate entry {e:?}")
            };
            out.push((Some(i), msg));
            continue;
        }
        let ok = match e.as_str() {
            "." | "*" => true,
            "~" => allow_none,
            ns => is_dns_label(ns),
        };
        if !ok {
            let want = if allow_none {
                "\".\", \"*\", \"~\" or a namespace name"
            } else {
                "\".\", \"*\" or a namespace name"
            };
            out.push((Some(i), format!("invalid value {e:?}: expected {want}")));
        }
    }
    if export_to.len() > 1 {
        if seen.contains("*") {
            out.push((
                None,
                "cannot have both public (*) and non-public exportTo values".into(),
            ));
        }
        if allow_none && seen.contains("~") {
            out.push((None, "cannot export to no one (~) and to someone".into()));
        }
    }
    out
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dot_star_tilde_and_names_resolve_as_istio_reads_them() {
        let star = v(&["*"]);
        let e = ExportTo::resolve(&v(&["."]), "a", &star);
        assert!(e.visible_to("a") && !e.visible_to("b"));
        let e = ExportTo::resolve(&v(&["~"]), "a", &star);
        assert!(!e.visible_to("a") && !e.visible_to("b"));
        let e = ExportTo::resolve(&v(&[".", "b"]), "a", &star);
        assert!(e.visible_to("a") && e.visible_to("b") && !e.visible_to("c"));
        let e = ExportTo::resolve(&v(&["b"]), "a", &star);
        assert!(!e.visible_to("a") && e.visible_to("b"));
        assert!(ExportTo::resolve(&[], "a", &star).visible_to("z"));
    }

    #[test]
    fn an_empty_list_takes_the_mesh_default_where_dot_wins() {
        let e = ExportTo::resolve(&[], "a", &v(&["*", "."]));
        assert!(e.visible_to("a") && !e.visible_to("b"));
        let e = ExportTo::resolve(&[], "a", &v(&["b"]));
        assert!(!e.visible_to("a") && !e.visible_to("b"));
    }

    #[test]
    fn validation_refuses_what_istio_refuses() {
        assert!(!validate(&v(&[".", "*", "b"]), "a", true).is_empty());
        assert_eq!(validate(&v(&[".", "a"]), "a", false).len(), 1);
        assert_eq!(validate(&v(&["~"]), "a", false).len(), 1);
        assert!(validate(&v(&["~"]), "a", true).is_empty());
        assert_eq!(validate(&v(&["~", "b"]), "a", true).len(), 1);
        assert_eq!(validate(&v(&["B_ad"]), "a", true).len(), 1);
        assert!(validate(&v(&[".", "b", "c"]), "a", false).is_empty());
    }
}

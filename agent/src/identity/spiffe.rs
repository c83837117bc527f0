//! SPIFFE identities as Istio uses them: `spiffe://<td>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

use super::IdentityError;

/// A workload identity. Istio only issues the `ns/<ns>/sa/<sa>` shape, and
/// policies compare principals textually, so anything else is rejected.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, IdentityError> {
        let id = SpiffeId {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        for (what, v) in [
            ("trust domain", &id.trust_domain),
            ("namespace", &id.namespace),
            ("service account", &id.service_account),
        ] {
            if v.is_empty()
                || v.contains('/')
                || v.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(IdentityError::BadSpiffeId(format!(
                    "{what} {v:?} must be non-empty without '/', spaces or control characters"
                )));
            }
        }
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }
    pub fn namespace(&self) -> &str {
        &self.namespace
    }
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Istio's principal form, as used in AuthorizationPolicy `principals`:
    /// `td/ns/N/sa/S`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// Parses the principal form `td/ns/N/sa/S` (no scheme).
    pub fn from_principal(s: &str) -> Result<Self, IdentityError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => SpiffeId::new(*td, *ns, *sa),
            _ => Err(IdentityError::BadSpiffeId(format!(
                "{s:?} is not of the form <trust-domain>/ns/<namespace>/sa/<service-account>"
            ))),
        }
    }

    /// The URI form used in certificates.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    /// Parses `spiffe://td/ns/N/sa/S`.
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        let rest = s.strip_prefix("spiffe://").ok_or_else(|| {
            IdentityError::BadSpiffeId(format!("{s:?} does not start with spiffe://"))
        })?;
        SpiffeId::from_principal(rest)
            .map_err(|_| IdentityError::BadSpiffeId(format!("{s:?} is not of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_display() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/sleep"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "sleep");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/sleep");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/sleep");
        assert_eq!(
            SpiffeId::from_principal("cluster.local/ns/default/sa/sleep").unwrap(),
            id
        );
        for bad in [
            "cluster.local/ns/default/sa/sleep",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/x",
            "spiffe://td/sa/x/ns/y",
            "spiffe://td/ns/a/sa/b/extra",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}

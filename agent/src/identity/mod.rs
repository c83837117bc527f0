//! Mesh identity: SPIFFE IDs, a local CA in Istio's plug-in layout,
//! short-lived workload certificates with background renewal, and the
//! rustls verifiers that check SPIFFE identities.

mod ca;
mod manager;
mod spiffe;
pub mod tls;

use std::path::PathBuf;

pub use ca::{Ca, IssuedCert, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
pub use manager::{CertSlot, IdentityConfig, IdentityManager, WorkloadCert};
pub use spiffe::SpiffeId;
pub use tls::{peer_identity, spiffe_ids};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid SPIFFE identity: {0}")]
    BadSpiffeId(String),
    #[error("{0}: {1}")]
    Io(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    BadFile(PathBuf, String),
    #[error(
        "{0} already exists; refusing to overwrite an existing CA (pass overwrite to replace it)"
    )]
    CaExists(PathBuf),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("peer certificate: {0}")]
    PeerCert(String),
    #[error("identity config: {0}")]
    Config(String),
}

//! Mesh identity: SPIFFE IDs, a local CA in Istio's plug-in layout,
//! short-lived workload certificates with background renewal, and the
//! rustls verifiers that check SPIFFE identities. Certificates come from the
//! CA key here (one machine) or from a CA's CSR API (`caclient`, Istio's
//! protocol; `csr_server` is shunt's side of it in the controller).

mod ca;
pub mod caclient;
pub mod csr;
pub mod csr_server;
mod manager;
mod spiffe;
pub mod tls;

use std::path::PathBuf;

pub use ca::{Ca, CsrError, IssuedCert, CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT};
pub use caclient::{CaClient, CaClientSettings};
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
    #[error("CA {address} refused a certificate for {identity}: {code:?}: {message}")]
    Csr {
        address: String,
        identity: String,
        code: tonic::Code,
        message: String,
    },
    #[error("CA answer {0}")]
    CaResponse(String),
    #[error("no certificate for {0} yet: it is requested from the CA asynchronously (IdentityManager::obtain)")]
    NotIssuedYet(String),
    #[error(
        "no certificate for {identity}: the CA request failed, next try in {retry_in:?} ({last})"
    )]
    Backoff {
        identity: String,
        retry_in: std::time::Duration,
        last: String,
    },
}

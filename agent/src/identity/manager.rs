//! Per-identity certificate cache with background renewal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ca::{Ca, IssuedCert};
use super::{tls, IdentityError, SpiffeId};

/// Certificate lifetime and when to renew.
#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// Workload certificate lifetime (Istio's default is 24 h).
    pub lifetime: Duration,
    /// Renew when this fraction of the lifetime has passed.
    pub renew_fraction: f64,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            lifetime: Duration::from_secs(24 * 3600),
            renew_fraction: 0.5,
        }
    }
}

/// One issued certificate in both forms.
pub struct WorkloadCert {
    pub issued: IssuedCert,
    pub certified: Arc<rustls::sign::CertifiedKey>,
}

/// The current certificate of one identity; renewal swaps it atomically.
/// Readers (TLS handshakes) never block.
pub struct CertSlot {
    id: SpiffeId,
    current: ArcSwap<WorkloadCert>,
    renewals: AtomicU64,
}

impl std::fmt::Debug for CertSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertSlot")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl CertSlot {
    fn new(cert: WorkloadCert) -> Self {
        CertSlot {
            id: cert.issued.id.clone(),
            current: ArcSwap::from_pointee(cert),
            renewals: AtomicU64::new(0),
        }
    }
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
    pub fn current(&self) -> Arc<WorkloadCert> {
        self.current.load_full()
    }
    pub fn certified_key(&self) -> Arc<rustls::sign::CertifiedKey> {
        self.current.load().certified.clone()
    }
    /// How many times the certificate was renewed.
    pub fn renewals(&self) -> u64 {
        self.renewals.load(Ordering::Relaxed)
    }
    fn store(&self, cert: WorkloadCert) {
        self.current.store(Arc::new(cert));
        self.renewals.fetch_add(1, Ordering::Relaxed);
    }
}

fn issue(ca: &Ca, id: &SpiffeId, lifetime: Duration) -> Result<WorkloadCert, IdentityError> {
    let issued = ca.issue(id, lifetime)?;
    let certified = issued.certified_key()?;
    Ok(WorkloadCert { issued, certified })
}

/// Issues and caches workload certificates (one per identity), renews them
/// in the background, and builds the mesh TLS configs that read them.
#[derive(Clone)]
pub struct IdentityManager {
    inner: Arc<Inner>,
}

struct Inner {
    ca: Arc<Ca>,
    trust_domain: String,
    cfg: IdentityConfig,
    slots: Mutex<HashMap<SpiffeId, Arc<CertSlot>>>,
}

impl IdentityManager {
    pub fn new(
        ca: Arc<Ca>,
        trust_domain: &str,
        cfg: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        if !(cfg.renew_fraction > 0.0 && cfg.renew_fraction < 1.0) {
            return Err(IdentityError::Config(format!(
                "renew_fraction {} must be in (0, 1)",
                cfg.renew_fraction
            )));
        }
        if cfg.lifetime < Duration::from_secs(1) {
            return Err(IdentityError::Config(format!(
                "certificate lifetime {:?} is shorter than 1 s",
                cfg.lifetime
            )));
        }
        Ok(IdentityManager {
            inner: Arc::new(Inner {
                ca,
                trust_domain: trust_domain.to_owned(),
                cfg,
                slots: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner.ca.root_store()
    }
    pub fn ca(&self) -> &Arc<Ca> {
        &self.inner.ca
    }

    /// The slot for `id`, issuing its first certificate (and starting its
    /// renewal task) on first use. Must run inside a tokio runtime.
    pub fn fetch(&self, id: &SpiffeId) -> Result<Arc<CertSlot>, IdentityError> {
        if let Some(s) = self
            .inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
        {
            return Ok(s.clone());
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            IdentityError::Config("IdentityManager::fetch needs a tokio runtime for renewal".into())
        })?;
        // Issue outside the lock; a racing caller's slot wins and ours is dropped.
        let cert = issue(&self.inner.ca, id, self.inner.cfg.lifetime)?;
        let slot = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = slots.get(id) {
                return Ok(s.clone());
            }
            let slot = Arc::new(CertSlot::new(cert));
            slots.insert(id.clone(), slot.clone());
            slot
        };
        rt.spawn(renew_loop(
            Arc::downgrade(&slot),
            self.inner.ca.clone(),
            self.inner.cfg.clone(),
        ));
        Ok(slot)
    }

    /// Client config for tunnels from `source` to a peer that must present
    /// one of `expected_server`.
    pub fn client_config(
        &self,
        source: &SpiffeId,
        expected_server: Vec<SpiffeId>,
    ) -> Result<Arc<ClientConfig>, IdentityError> {
        tls::client_config(self.fetch(source)?, self.roots(), expected_server)
    }

    /// Server config presenting `id` and accepting clients of our trust
    /// domain.
    pub fn server_config(&self, id: &SpiffeId) -> Result<Arc<ServerConfig>, IdentityError> {
        tls::server_config(self.fetch(id)?, self.roots(), &self.inner.trust_domain)
    }
}

async fn renew_loop(slot: Weak<CertSlot>, ca: Arc<Ca>, cfg: IdentityConfig) {
    loop {
        let (id, wait) = {
            let Some(s) = slot.upgrade() else { return };
            let cur = s.current();
            let life = cur.issued.lifetime();
            let due = cur.issued.issued_at + life.mul_f64(cfg.renew_fraction);
            (
                s.id.clone(),
                due.duration_since(SystemTime::now()).unwrap_or_default(),
            )
        };
        tokio::time::sleep(wait).await;
        let Some(s) = slot.upgrade() else { return };
        match issue(&ca, &id, cfg.lifetime) {
            Ok(c) => {
                tracing::info!(identity = %id, not_after = ?c.issued.not_after, "renewed workload certificate");
                s.store(c);
            }
            Err(e) => {
                // Keep the old certificate and retry soon; it is still valid
                // for the rest of its lifetime.
                tracing::error!(identity = %id, error = %e, "certificate renewal failed");
                drop(s);
                tokio::time::sleep((cfg.lifetime / 20).max(Duration::from_millis(100))).await;
            }
        }
    }
}

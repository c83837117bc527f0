//! Per-identity certificate cache with background renewal. Certificates
//! come from the CA key on this machine or from a CA's CSR API; a failed
//! request is retried with backoff, and a renewal that fails keeps the
//! current certificate until it succeeds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::ca::{Ca, IssuedCert};
use super::caclient::CaClient;
use super::{tls, IdentityError, SpiffeId};

/// Where certificates come from.
#[derive(Clone)]
enum Source {
    /// The CA key is here: certificates are signed in-process.
    Local(Arc<Ca>),
    /// A CA's CSR API signs keys made here.
    Remote(Arc<CaClient>),
}

impl Source {
    async fn issue(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<WorkloadCert, IdentityError> {
        let issued = match self {
            Source::Local(ca) => ca.issue(id, lifetime)?,
            Source::Remote(c) => c.request(id, lifetime).await?,
        };
        let certified = issued.certified_key()?;
        Ok(WorkloadCert { issued, certified })
    }
    fn roots(&self) -> Arc<RootCertStore> {
        match self {
            Source::Local(ca) => ca.root_store(),
            Source::Remote(c) => c.root_store(),
        }
    }
}

/// First retry after a failed request; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// One identity's first request to a remote CA: concurrent callers wait for
/// the one request in flight; after a failure, callers are refused at once
/// until the backoff has passed.
#[derive(Default)]
struct Pending(tokio::sync::Mutex<Backoff>);

#[derive(Default)]
struct Backoff {
    retry_at: Option<Instant>,
    delay: Duration,
    last_error: String,
}

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
    source: Source,
    trust_domain: String,
    cfg: IdentityConfig,
    slots: Mutex<HashMap<SpiffeId, Arc<CertSlot>>>,
    pending: Mutex<HashMap<SpiffeId, Arc<Pending>>>,
}

impl IdentityManager {
    /// Certificates signed here with `ca`'s key.
    pub fn new(
        ca: Arc<Ca>,
        trust_domain: &str,
        cfg: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        Self::with_source(Source::Local(ca), trust_domain, cfg)
    }

    /// Certificates requested from a CA's CSR API; peers are verified
    /// against the client's root file.
    pub fn remote(
        client: Arc<CaClient>,
        trust_domain: &str,
        cfg: IdentityConfig,
    ) -> Result<Self, IdentityError> {
        Self::with_source(Source::Remote(client), trust_domain, cfg)
    }

    fn with_source(
        source: Source,
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
                source,
                trust_domain: trust_domain.to_owned(),
                cfg,
                slots: Mutex::new(HashMap::new()),
                pending: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.inner.trust_domain
    }
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner.source.roots()
    }
    /// The CA key, when certificates are signed here.
    pub fn ca(&self) -> Option<&Arc<Ca>> {
        match &self.inner.source {
            Source::Local(ca) => Some(ca),
            Source::Remote(_) => None,
        }
    }

    fn cached(&self, id: &SpiffeId) -> Option<Arc<CertSlot>> {
        self.inner
            .slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Stores a first certificate (a racing caller's slot wins and ours is
    /// dropped) and starts its renewal.
    fn install(&self, rt: &tokio::runtime::Handle, cert: WorkloadCert) -> Arc<CertSlot> {
        let slot = {
            let mut slots = self.inner.slots.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = slots.get(&cert.issued.id) {
                return s.clone();
            }
            let slot = Arc::new(CertSlot::new(cert));
            slots.insert(slot.id.clone(), slot.clone());
            slot
        };
        rt.spawn(renew_loop(
            Arc::downgrade(&slot),
            self.inner.source.clone(),
            self.inner.cfg.clone(),
        ));
        slot
    }

    /// The slot for `id`, issuing its first certificate (and starting its
    /// renewal task) on first use. Must run inside a tokio runtime. With a
    /// remote CA only a certificate already obtained is returned (see
    /// [`obtain`](Self::obtain)).
    pub fn fetch(&self, id: &SpiffeId) -> Result<Arc<CertSlot>, IdentityError> {
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        let rt = tokio::runtime::Handle::try_current().map_err(|_| {
            IdentityError::Config("IdentityManager::fetch needs a tokio runtime for renewal".into())
        })?;
        let Source::Local(ca) = &self.inner.source else {
            return Err(IdentityError::NotIssuedYet(id.to_string()));
        };
        let cert = issue(ca, id, self.inner.cfg.lifetime)?;
        Ok(self.install(&rt, cert))
    }

    /// The slot for `id`, from either source: the first use of an identity
    /// with a remote CA waits for one CSR round trip (shared by concurrent
    /// callers); after a failure, requests are refused at once until the
    /// backoff (1 s, doubling to 30 s) has passed.
    pub async fn obtain(&self, id: &SpiffeId) -> Result<Arc<CertSlot>, IdentityError> {
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        if matches!(self.inner.source, Source::Local(_)) {
            return self.fetch(id);
        }
        let rt = tokio::runtime::Handle::current();
        let pending = self
            .inner
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.clone())
            .or_default()
            .clone();
        let mut backoff = pending.0.lock().await;
        if let Some(s) = self.cached(id) {
            return Ok(s);
        }
        if let Some(at) = backoff.retry_at.filter(|at| *at > Instant::now()) {
            return Err(IdentityError::Backoff {
                identity: id.to_string(),
                retry_in: at - Instant::now(),
                last: backoff.last_error.clone(),
            });
        }
        match self.first_issue(id).await {
            Ok(cert) => {
                tracing::info!(identity = %id, not_after = ?cert.issued.not_after, "workload certificate issued by the CA");
                let slot = self.install(&rt, cert);
                drop(backoff);
                self.inner
                    .pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(id);
                Ok(slot)
            }
            Err(e) => {
                backoff.delay = (backoff.delay * 2).clamp(FIRST_BACKOFF, MAX_BACKOFF);
                backoff.retry_at = Some(Instant::now() + backoff.delay);
                backoff.last_error = e.to_string();
                Err(e)
            }
        }
    }

    /// The first request for `id`, retried twice (250 ms, 500 ms) when the
    /// CA cannot decide yet or has not seen the pod yet: a pod's first
    /// connection can come before the CA's watch shows it on this node.
    async fn first_issue(&self, id: &SpiffeId) -> Result<WorkloadCert, IdentityError> {
        let mut wait = Duration::from_millis(250);
        for _ in 0..2 {
            match self.inner.source.issue(id, self.inner.cfg.lifetime).await {
                Err(IdentityError::Csr {
                    code: tonic::Code::PermissionDenied | tonic::Code::Unavailable,
                    ..
                }) => {
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                }
                r => return r,
            }
        }
        self.inner.source.issue(id, self.inner.cfg.lifetime).await
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

async fn renew_loop(slot: Weak<CertSlot>, source: Source, cfg: IdentityConfig) {
    // After a failure: 1 s, doubling, at most a twentieth of the lifetime.
    let cap = (cfg.lifetime / 20).max(Duration::from_millis(100));
    let mut delay = Duration::ZERO;
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
        drop(s);
        match source.issue(&id, cfg.lifetime).await {
            Ok(c) => {
                tracing::info!(identity = %id, not_after = ?c.issued.not_after, "renewed workload certificate");
                let Some(s) = slot.upgrade() else { return };
                s.store(c);
                delay = Duration::ZERO;
            }
            Err(e) => {
                // Keep the old certificate and retry; it is still valid for
                // the rest of its lifetime.
                delay = (delay * 2).clamp(FIRST_BACKOFF.min(cap), cap);
                tracing::error!(identity = %id, error = %e, retry_in = ?delay, "certificate renewal failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

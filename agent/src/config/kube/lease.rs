//! Leader election on a `coordination.k8s.io/v1` Lease, as client-go's
//! `leaderelection` does it (kube-runtime has none): whoever holds the Lease
//! renews it every `retry` period; a candidate takes it over only after the
//! record has not changed for `leaseDurationSeconds` *by its own clock*
//! (no clock comparison across machines). Every write is a replace with the
//! resourceVersion read, so of two candidates racing for an expired Lease
//! exactly one wins and the other gets `409 Conflict`.
//!
//! A leader that cannot renew within `renew_deadline` (shorter than the
//! lease duration) stops acting as leader before anyone else can take over.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};

#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Lease object name and namespace.
    pub name: String,
    pub namespace: String,
    /// This candidate (the pod name).
    pub identity: String,
    /// How long a record unchanged means its holder is gone.
    pub duration: Duration,
    /// A leader that has not renewed for this long stops leading.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry: Duration,
}

impl LeaseSettings {
    /// client-go's defaults: 15 s lease, 10 s renew deadline, 2 s retry.
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaseSettings {
            name: name.into(),
            namespace: namespace.into(),
            identity: identity.into(),
            duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry: Duration::from_secs(2),
        }
    }
}

/// What the Lease said when it last changed, and when this candidate saw
/// that change.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    holder: Option<String>,
    renew: Option<MicroTime>,
    transitions: Option<i32>,
    duration_s: Option<i32>,
}

pub struct LeaseLock {
    api: Api<Lease>,
    s: LeaseSettings,
    observed: Option<(Record, Instant)>,
    /// Last successful acquire or renew.
    renewed: Option<Instant>,
}

impl LeaseLock {
    pub fn new(client: kube::Client, s: LeaseSettings) -> Self {
        LeaseLock {
            api: Api::namespaced(client, &s.namespace),
            s,
            observed: None,
            renewed: None,
        }
    }

    pub fn settings(&self) -> &LeaseSettings {
        &self.s
    }

    /// Whether this candidate may act as leader now: it renewed within the
    /// renew deadline.
    pub fn is_leader(&self) -> bool {
        self.renewed
            .is_some_and(|t| t.elapsed() < self.s.renew_deadline)
    }

    /// One round: create, renew or take over the Lease. `Ok(true)` while
    /// this candidate holds it. A lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(cur) = self.api.get_opt(&self.s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.s.name.clone()),
                    namespace: Some(self.s.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(l) => Ok(self.won(&l)),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.lost()),
                Err(e) => Err(self.failed(e)),
            };
        };
        let spec = cur.spec.clone().unwrap_or_default();
        let rec = record(&spec);
        if self.observed.as_ref().map(|(r, _)| r) != Some(&rec) {
            self.observed = Some((rec.clone(), Instant::now()));
        }
        let held_by_me = rec.holder.as_deref() == Some(self.s.identity.as_str());
        let holder_gone = match (&rec.holder, &self.observed) {
            (None, _) => true,
            (Some(h), _) if h.is_empty() => true,
            (_, Some((_, seen))) => {
                let d = Duration::from_secs(rec.duration_s.unwrap_or(0).max(0) as u64);
                seen.elapsed() >= d
            }
            (_, None) => false,
        };
        if !held_by_me && !holder_gone {
            return Ok(self.lost());
        }
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if held_by_me {
            self.spec(
                spec.acquire_time.clone().unwrap_or_else(|| now.clone()),
                now,
                transitions,
            )
        } else {
            tracing::info!(
                lease = %self.s.name,
                previous = ?rec.holder,
                "taking over the leader Lease"
            );
            self.spec(now.clone(), now, transitions + 1)
        };
        let mut lease = cur;
        lease.spec = Some(next);
        // The resourceVersion read stays in metadata: a replace against a
        // newer one is 409 Conflict.
        match self
            .api
            .replace(&self.s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(l) => Ok(self.won(&l)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(self.lost()),
            Err(e) => Err(self.failed(e)),
        }
    }

    /// Gives the Lease up (graceful shutdown), so a successor need not wait
    /// out the lease duration.
    pub async fn release(&mut self) -> Result<(), kube::Error> {
        if !self.is_leader() {
            return Ok(());
        }
        self.renewed = None;
        let Some(mut cur) = self.api.get_opt(&self.s.name).await? else {
            return Ok(());
        };
        let spec = cur.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.s.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(Timestamp::now()));
        self.api
            .replace(&self.s.name, &PostParams::default(), &cur)
            .await
            .map(|_| ())
    }

    fn spec(&self, acquire: MicroTime, renew: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.s.identity.clone()),
            lease_duration_seconds: Some(self.s.duration.as_secs().max(1) as i32),
            acquire_time: Some(acquire),
            renew_time: Some(renew),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    fn won(&mut self, l: &Lease) -> bool {
        let now = Instant::now();
        self.observed = Some((record(&l.spec.clone().unwrap_or_default()), now));
        self.renewed = Some(now);
        true
    }

    fn lost(&mut self) -> bool {
        if self.renewed.take().is_some() {
            tracing::warn!(lease = %self.s.name, "lost the leader Lease");
        }
        false
    }

    /// An API error: leadership lapses by itself at the renew deadline.
    fn failed(&mut self, e: kube::Error) -> kube::Error {
        if !self.is_leader() {
            self.renewed = None;
        }
        e
    }
}

fn record(s: &LeaseSpec) -> Record {
    Record {
        holder: s.holder_identity.clone(),
        renew: s.renew_time.clone(),
        transitions: s.lease_transitions,
        duration_s: s.lease_duration_seconds,
    }
}

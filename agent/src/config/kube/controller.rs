//! `shunt controller`: the cluster's one writer of ServiceEntry
//! `status.addresses` and the `istio.io/WaypointBound` condition.
//!
//! Replicas elect a leader on a Lease ([`super::lease`]). Only the leader
//! allocates: it resumes the allocator from a ConfigMap (`vips.json`, the
//! agent's own state format: addresses, reservations of removed hosts and
//! the cursor, so the grace rule holds cluster-wide and across leader
//! changes), writes the ConfigMap back with its resourceVersion (a `409`
//! means another writer: the state is re-read, nothing is patched), and
//! then patches the status subresource of each ServiceEntry whose status
//! differs, with the entry's resourceVersion as precondition. Addresses a
//! status already holds are kept even if the ConfigMap is lost (see
//! `alloc::Allocator`). Agents read the status and allocate nothing.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::Client;
use serde_json::json;

use super::lease::{LeaseLock, LeaseSettings};
use super::{KubeError, KubeOptions};
use crate::alloc::{AllocError, Allocator, Prefixes};
use crate::config::render::{ServiceEntryStatus, StatusCondition, WAYPOINT_BOUND};
use crate::config::Config;
use crate::model::{now_rfc3339, Model, NoCgroups};

/// Key of the allocation state in the ConfigMap.
pub const STATE_KEY: &str = "vips.json";

#[derive(Clone, Debug)]
pub struct ControllerOptions {
    pub lease: LeaseSettings,
    /// ConfigMap holding the allocation, in the Lease's namespace.
    pub state_config_map: String,
    /// MeshConfig file, as for the agent.
    pub mesh_file: Option<PathBuf>,
    /// How long a removed host's VIPs stay reserved.
    pub vip_grace: Duration,
    pub prefixes: Prefixes,
    /// Re-run allocation this often without a change (grace expiry).
    pub resync: Duration,
}

impl ControllerOptions {
    pub fn new(lease: LeaseSettings) -> Self {
        ControllerOptions {
            lease,
            state_config_map: "shunt-vips".into(),
            mesh_file: None,
            vip_grace: crate::alloc::DEFAULT_GRACE,
            prefixes: Prefixes::default(),
            resync: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Source(#[from] KubeError),
    #[error("allocation state in ConfigMap {0}: {1}")]
    State(String, AllocError),
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// What one leader round did, for logs and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub patched: usize,
    pub conflicts: usize,
}

/// The leader's allocator and the ConfigMap version it last read or wrote.
struct Leading {
    alloc: Allocator,
    /// `None`: the ConfigMap does not exist yet.
    rv: Option<String>,
    written: Option<Vec<u8>>,
}

/// Runs until `shutdown` resolves, then releases the Lease if held.
pub async fn run(
    client: Client,
    opts: ControllerOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let mut kopts = KubeOptions::new(String::new(), PathBuf::new());
    kopts.watch_pods = false;
    kopts.mesh_file = opts.mesh_file.clone();
    let mut src = super::spawn(client.clone(), kopts)?;
    let mut lock = LeaseLock::new(client.clone(), opts.lease.clone());
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &opts.lease.namespace);
    let mut leading: Option<Leading> = None;
    let mut tick = tokio::time::interval(opts.lease.retry);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_round = tokio::time::Instant::now();
    let mut dirty = true;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                if let Err(e) = lock.release().await {
                    tracing::warn!(error = %e, "releasing the leader Lease");
                }
                return Ok(());
            }
            r = src.config.changed() => {
                if r.is_err() { return Ok(()); }
                dirty = true;
            }
            _ = tick.tick() => {
                let was = lock.is_leader();
                if let Err(e) = lock.try_acquire_or_renew().await {
                    tracing::warn!(error = %e, "leader Lease");
                }
                if lock.is_leader() && !was {
                    tracing::info!(identity = %opts.lease.identity, "leading: allocating ServiceEntry addresses");
                    dirty = true;
                }
            }
        }
        if !lock.is_leader() {
            leading = None;
            continue;
        }
        if !dirty && last_round.elapsed() < opts.resync {
            continue;
        }
        let Some(cfg) = src.config.borrow().clone() else {
            continue; // not listed yet
        };
        dirty = false;
        last_round = tokio::time::Instant::now();
        match round(&client, &cms, &opts, &mut leading, &cfg).await {
            Ok(r) if r.patched > 0 || r.conflicts > 0 => {
                tracing::info!(
                    patched = r.patched,
                    conflicts = r.conflicts,
                    "ServiceEntry status"
                )
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "allocation round failed; retrying");
                leading = None;
                dirty = true;
            }
        }
    }
}

/// One leader round: allocate, persist, patch statuses.
async fn round(
    client: &Client,
    cms: &Api<ConfigMap>,
    opts: &ControllerOptions,
    leading: &mut Option<Leading>,
    cfg: &Arc<Config>,
) -> Result<Round, ControllerError> {
    let cm_name = format!("{}/{}", opts.lease.namespace, opts.state_config_map);
    if leading.is_none() {
        let cm = cms.get_opt(&opts.state_config_map).await?;
        let bytes = cm
            .as_ref()
            .and_then(|c| c.data.as_ref())
            .and_then(|d| d.get(STATE_KEY))
            .map(|s| s.as_bytes().to_vec());
        let alloc = Allocator::from_state(bytes.as_deref(), &cm_name, opts.prefixes)
            .map_err(|e| ControllerError::State(cm_name.clone(), e))?
            .with_grace(opts.vip_grace);
        *leading = Some(Leading {
            alloc,
            rv: cm.and_then(|c| c.metadata.resource_version),
            written: bytes,
        });
    }
    let l = leading.as_mut().expect("set above");
    let allocation = l
        .alloc
        .allocate(cfg)
        .map_err(|e| ControllerError::State(cm_name.clone(), e))?
        .clone();
    let bytes = l.alloc.state_bytes();
    if l.written.as_ref() != Some(&bytes) {
        let text = String::from_utf8(bytes.clone()).expect("JSON is UTF-8");
        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(opts.state_config_map.clone()),
                namespace: Some(opts.lease.namespace.clone()),
                resource_version: l.rv.clone(),
                ..Default::default()
            },
            data: Some(BTreeMap::from([(STATE_KEY.to_string(), text)])),
            ..Default::default()
        };
        let pp = PostParams::default();
        let res = match &l.rv {
            None => cms.create(&pp, &cm).await,
            Some(_) => cms.replace(&opts.state_config_map, &pp, &cm).await,
        };
        // A 409 (another writer since we read) propagates: the caller
        // drops this state and re-reads it next round.
        let written = res?;
        l.rv = written.metadata.resource_version;
        l.written = Some(bytes);
    }

    let model = Model::build(cfg.clone(), &allocation, &NoCgroups);
    let api = se_api();
    let now = now_rfc3339();
    let empty = BTreeMap::new();
    let current = cfg.api_status.as_ref().unwrap_or(&empty);
    let mut r = Round::default();
    for se in &cfg.service_entries {
        let key = se.key();
        let Some(ours) = model.status.get(&key) else {
            continue;
        };
        let have = current.get(&key);
        let Some(want) = desired(ours, have, &now) else {
            continue;
        };
        let rv = se
            .metadata
            .other
            .get("resourceVersion")
            .and_then(|v| v.as_str())
            .map(str::to_string);
        let mut patch = json!({ "status": want });
        if let Some(rv) = rv {
            // Precondition: a patch against a newer version is 409.
            patch["metadata"] = json!({ "resourceVersion": rv });
        }
        let ns_api: Api<DynamicObject> = Api::namespaced_with(client.clone(), se.namespace(), &api);
        match ns_api
            .patch_status(se.name(), &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => r.patched += 1,
            // The entry changed since this config: its new version brings
            // a new round.
            Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => r.conflicts += 1,
            Err(e) => return Err(e.into()),
        }
    }
    Ok(r)
}

fn se_api() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("networking.istio.io", "v1", "ServiceEntry"),
        "serviceentries",
    )
}

/// The status to write, or `None` when the API's already says it. Our
/// condition keeps its `lastTransitionTime` while status and reason stay;
/// conditions of other types (other controllers') are kept.
fn desired(
    ours: &ServiceEntryStatus,
    have: Option<&ServiceEntryStatus>,
    now: &str,
) -> Option<ServiceEntryStatus> {
    let mut conditions: Vec<StatusCondition> = have
        .map(|h| {
            h.conditions
                .iter()
                .filter(|c| c.type_ != WAYPOINT_BOUND)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    for c in ours.conditions.iter() {
        let mut c = c.clone();
        let prev = have.and_then(|h| h.condition(&c.type_));
        c.last_transition_time = match prev {
            Some(p) if p.status == c.status && p.reason == c.reason => {
                p.last_transition_time.clone().or_else(|| Some(now.into()))
            }
            _ => Some(now.into()),
        };
        conditions.push(c);
    }
    let want = ServiceEntryStatus {
        addresses: ours.addresses.clone(),
        conditions: conditions.into(),
    };
    let same = have.is_some_and(|h| {
        h.addresses == want.addresses
            && h.conditions.len() == want.conditions.len()
            && want.conditions.iter().all(|c| h.conditions.contains(c))
    });
    (!same).then_some(want)
}

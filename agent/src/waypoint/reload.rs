//! Reload: a new valid config, or a changed allocation, rebuilds the model
//! and the waypoint's [`Routes`](super::Routes); a config the waypoint
//! cannot use, or that [`validate`](crate::validate) refuses, keeps the
//! previous routes whole.
//!
//! The agent allocates VIPs on its own poll of the same directory and a
//! ServiceEntry's status shows them as soon as it wrote them, so the
//! waypoint must not sit on a config whose entries it has no VIPs for: a
//! new config waits briefly for the agent's allocation to cover it, and
//! while the allocation in force lags behind the config the file is
//! checked every [`LAGGING_POLL`], not every reload interval.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::alloc::{AllocError, Allocation};
use crate::config::watch::ConfigWatcher;
use crate::config::Config;
use crate::kernel::projection::Capacity;
use crate::model::{Model, NoCgroups};
use crate::validate;

use super::{routes, Shared};

/// How long a new config waits for the agent to allocate its entries'
/// VIPs before it is applied without them (the agent polls the same
/// directory, every 300 ms by default, so it is rarely more than one poll
/// behind; an agent that is down or refused the config must not hold the
/// waypoint's other changes for longer).
const ALLOCATION_WAIT: Duration = Duration::from_secs(3);
/// How often the allocation file is checked (one `stat`) while the
/// allocation lags behind the config.
pub(crate) const LAGGING_POLL: Duration = Duration::from_millis(10);

/// Whether `alloc` was written before the agent saw `cfg`: an entry it
/// has no id for, or an auto-allocated host it has no record of (the
/// allocator records every host it owns, with or without addresses, and
/// warns for those without). Extra records (entries since removed) are not
/// a lag. Configs from the API carry their addresses: never lagging.
pub(crate) fn lags(cfg: &Config, alloc: &Allocation) -> bool {
    if cfg.api_status.is_some() {
        return false;
    }
    cfg.service_entries.iter().any(|se| {
        alloc.service_id(&se.key()).is_none()
            || (crate::alloc::eligible(se)
                && se.spec.hosts.iter().any(|h| !alloc.hosts.contains_key(h)))
    }) || cfg
        .workload_entries
        .iter()
        .any(|we| alloc.workload_id(&we.key()).is_none())
}

/// The allocation for `cfg`: read now and, while it lags behind `cfg`,
/// again each time the agent rewrites it, for up to [`ALLOCATION_WAIT`] or
/// until a newer config arrives (which is then applied next). With it,
/// whether the files changed since the reader's last read.
async fn allocation_for(
    cfg: &Config,
    alloc: &mut crate::alloc::Reader,
    newer: &watch::Receiver<Option<Arc<Config>>>,
) -> Result<(Allocation, bool), AllocError> {
    let mut changed = alloc.changed();
    let mut a = alloc.read()?;
    let deadline = tokio::time::Instant::now() + ALLOCATION_WAIT;
    while lags(cfg, &a)
        && tokio::time::Instant::now() < deadline
        && !newer.has_changed().unwrap_or(true)
    {
        tokio::time::sleep(LAGGING_POLL).await;
        if alloc.changed() {
            changed = true;
            a = alloc.read()?;
        }
    }
    Ok((a, changed))
}

/// Rebuilds the snapshot on each new valid config or allocation change; a
/// config the waypoint cannot use (bad policy, unreadable CA file) keeps the
/// previous snapshot. `alloc` is the reader the snapshot in force was built
/// from, `lagging` whether that allocation lags behind its config.
pub(crate) async fn reload_loop(
    watcher: Arc<ConfigWatcher>,
    shared: Arc<Shared>,
    mut alloc: crate::alloc::Reader,
    mut lagging: bool,
    timeout: Duration,
    interval: Duration,
) {
    let mut cfg_rx = watcher.config.clone();
    // The routes in force were built from an older allocation than the
    // reader's last read (a reload that read a new one was refused).
    let mut unsettled = false;
    loop {
        let poll = if lagging { LAGGING_POLL } else { interval };
        tokio::select! {
            r = cfg_rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(poll) => {
                if !alloc.changed() { continue }
            }
        }
        let Some(cfg) = cfg_rx.borrow_and_update().clone() else {
            continue;
        };
        // From the API, addresses come with the config (ServiceEntry status).
        let read = match cfg.api_status {
            Some(_) => Ok((crate::alloc::from_status(&cfg), false)),
            None => allocation_for(&cfg, &mut alloc, &cfg_rx).await,
        };
        let (allocation, moved) = match read {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "reading the allocation; previous config stays in force");
                continue;
            }
        };
        lagging = lags(&cfg, &allocation);
        let service_entries = cfg.service_entries.len();
        let prev = shared.routes.load_full();
        let gateway = shared.gateway.clone();
        // Seconds of CPU at 100,000 entries: off the runtime's workers,
        // which keep serving tunnels meanwhile.
        // The model is patched from the one in force only for the entries
        // whose objects changed: an allocation the agent rewrote (a VIP
        // for an entry the waypoint already had) needs a whole build.
        let patch = !(moved || unsettled);
        unsettled = true;
        let started = std::time::Instant::now();
        let built = tokio::task::spawn_blocking(move || {
            rebuild(cfg, &allocation, &gateway, timeout, &prev, patch)
        })
        .await;
        let built = match built {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => {
                tracing::error!("waypoint reload task: {e}");
                continue;
            }
        };
        match built {
            Ok(s) => {
                for w in &s.warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(
                    version = %format!("{:016x}", s.digest),
                    service_entries,
                    services = s.targets.len(),
                    policies = s.policies.len(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "waypoint config applied"
                );
                unsettled = false;
                let old = shared.routes.swap(Arc::new(s));
                shared.changed.send_modify(|v| *v += 1);
                // The old routes are as big as the new: freed off the
                // runtime's workers too.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => {
                tracing::error!("waypoint config rejected, previous config stays in force: {e}")
            }
        }
    }
}

/// Model, acceptance step and routes for a new config; `None` when the
/// acceptance step refuses it (logged).
fn rebuild(
    cfg: Arc<crate::config::Config>,
    allocation: &crate::alloc::Allocation,
    gateway: &crate::policy::GatewayRef,
    timeout: Duration,
    prev: &routes::Routes,
    patch: bool,
) -> Option<Result<routes::Routes, super::WaypointError>> {
    let model = Arc::new(Model::build_from(
        cfg,
        allocation,
        &NoCgroups,
        patch.then_some(&*prev.model),
    ));
    // The agent's acceptance step: a config the agent refuses (too big
    // for its maps, refused by another waypoint) is refused here too.
    let projection =
        validate::projection_from(&model, patch.then_some(prev.projected.as_ref()).flatten());
    if let Err(e) = validate::validate(&model, &projection, &Capacity::KERNEL) {
        tracing::error!("waypoint config rejected: {e}");
        return None;
    }
    let built = routes::build(
        model,
        &routes::BuildInputs {
            gateway,
            connect_timeout: timeout,
            previous: Some(prev),
            idle_budget: None,
        },
    );
    Some(built.map(|mut r| {
        r.projected = Some(projection.services);
        r
    }))
}

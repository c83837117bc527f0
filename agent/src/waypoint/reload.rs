//! Reload: a new valid config, or a changed allocation, rebuilds the model
//! and the waypoint's [`Routes`](super::Routes); a config the waypoint
//! cannot use, or that [`validate`](crate::validate) refuses, keeps the
//! previous routes whole.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::watch::ConfigWatcher;
use crate::kernel::projection::Capacity;
use crate::model::{Model, NoCgroups};
use crate::validate;

use super::{routes, Shared};

/// Rebuilds the snapshot on each new valid config or allocation change; a
/// config the waypoint cannot use (bad policy, unreadable CA file) keeps the
/// previous snapshot.
pub(crate) async fn reload_loop(
    watcher: Arc<ConfigWatcher>,
    shared: Arc<Shared>,
    state_dir: PathBuf,
    timeout: Duration,
    interval: Duration,
) {
    let mut cfg_rx = watcher.config.clone();
    let mut alloc = crate::alloc::Reader::new(&state_dir);
    let _ = alloc.read();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = cfg_rx.changed() => if r.is_err() { return },
            _ = tick.tick() => {
                if !alloc.changed() { continue }
            }
        }
        let Some(cfg) = cfg_rx.borrow_and_update().clone() else {
            continue;
        };
        // From the API, addresses come with the config (ServiceEntry status).
        let read = match cfg.api_status {
            Some(_) => Ok(crate::alloc::from_status(&cfg)),
            None => alloc.read(),
        };
        let allocation = match read {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(error = %e, "reading the allocation; previous config stays in force");
                continue;
            }
        };
        let prev = shared.routes.load_full();
        let model = Arc::new(Model::build(cfg, &allocation, &NoCgroups));
        // The agent's acceptance step: a config the agent refuses (too big
        // for its maps, refused by another waypoint) is refused here too.
        let projection = validate::projection_of(&model);
        if let Err(e) = validate::validate(&model, &projection, &Capacity::KERNEL) {
            tracing::error!("waypoint config rejected: {e}");
            continue;
        }
        let built = routes::build(
            model,
            &routes::BuildInputs {
                gateway: &shared.gateway,
                connect_timeout: timeout,
                previous: Some(&prev),
            },
        );
        match built {
            Ok(s) => {
                for w in &s.warnings {
                    tracing::warn!("{w}");
                }
                tracing::info!(
                    version = %format!("{:016x}", s.digest),
                    services = s.targets.len(),
                    policies = s.policies.len(),
                    "waypoint config applied"
                );
                shared.routes.store(Arc::new(s));
                shared.changed.send_modify(|v| *v += 1);
            }
            Err(e) => {
                tracing::error!("waypoint config rejected, previous config stays in force: {e}")
            }
        }
    }
}

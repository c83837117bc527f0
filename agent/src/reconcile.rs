//! The reconciler: applies each new valid config, in order, to everything
//! that serves from it — allocation (the one writer of `vips.json`,
//! persisted only once the config passed validation), the model, the
//! kernel maps (by difference: adds and updates first, removals
//! last), the DNS host table, the data path's model and the ServiceEntry
//! status times. A config that cannot be applied leaves all of them as
//! they were.

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Instant,
};

use arc_swap::ArcSwap;
use tracing::{debug, error, info, warn};

use crate::{
    alloc::Allocator,
    app::node::{dns_capture, DnsSettings, NodeError, NodeOptions},
    config::{watch::ConfigWatcher, Config},
    dns::{ClientTable, HostTable, SharedClients, SharedHostTable},
    kernel::{self, projection, projection::Capacity, MapSync},
    model::{now_rfc3339, CgroupDir, Model, StatusClock},
    validate,
};

/// Owns the allocator (the only one on one machine; a follower of the
/// cluster's controller with `--source kubernetes`) and the kernel maps'
/// mirrors. Each apply runs on a blocking thread: at 100,000 entries it
/// takes seconds of CPU, and the DNS proxy and the data path share the
/// runtime's workers.
pub struct Reconciler {
    /// `None` only while an apply runs (it is moved to the blocking thread).
    stages: Option<Box<Stages>>,
}

/// Everything an apply reads and writes.
struct Stages {
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    dns: DnsSettings,
    alloc: Allocator,
    /// The reconciled maps; their mirrors start from what is pinned, so a
    /// restarted agent changes only what differs.
    sync: MapSync,
    hosts: SharedHostTable,
    /// Whom the DNS proxy serves: the enrolled workloads and the node.
    dns_clients: SharedClients,
    model: Arc<ArcSwap<Model>>,
    clock: StatusClock,
    ready: Arc<AtomicBool>,
    /// The pinned `services` map and the DNS table are those of the model
    /// in force, so the next apply patches them for what its model changed
    /// (false after a failed map write or table build: then built whole).
    synced: bool,
    table_current: bool,
}

impl Reconciler {
    pub fn new(
        opts: &NodeOptions,
        pin_dir: &std::path::Path,
        hosts: SharedHostTable,
        dns_clients: SharedClients,
        model: Arc<ArcSwap<Model>>,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, NodeError> {
        let stages = Stages {
            state_dir: opts.agent.state_dir.clone(),
            cgroup_root: opts.agent.paths.cgroup_root.clone(),
            dns: opts.dns.clone(),
            alloc: {
                let a = Allocator::open(&opts.agent.state_dir)?.with_grace(opts.vip_grace);
                // On a cluster the elected controller allocates; agents
                // read ServiceEntry status.
                if opts.kubernetes.is_some() {
                    a.following()
                } else {
                    a
                }
            },
            sync: MapSync::open(pin_dir)?,
            hosts,
            dns_clients,
            model,
            clock: StatusClock::load(&opts.agent.state_dir),
            ready,
            synced: true,
            table_current: true,
        };
        Ok(Self {
            stages: Some(Box::new(stages)),
        })
    }

    pub async fn run(mut self, mut watcher: ConfigWatcher) {
        loop {
            tokio::select! {
                r = watcher.config.changed() => {
                    if r.is_err() { return; }
                    let cfg = watcher.config.borrow_and_update().clone();
                    if let Some(cfg) = cfg {
                        self.apply(&cfg).await;
                    }
                }
                r = watcher.rejected.changed() => {
                    if r.is_err() { return; }
                    if let Some(e) = watcher.rejected.borrow_and_update().as_ref() {
                        error!("config rejected; the previous config stays in force:\n{e}");
                    }
                }
            }
        }
    }

    /// Applies `cfg` on a blocking thread (see [`Reconciler`]).
    pub async fn apply(&mut self, cfg: &Arc<Config>) {
        let mut stages = self.stages.take().expect("one apply at a time");
        let cfg = cfg.clone();
        let rt = tokio::runtime::Handle::current();
        let done = tokio::task::spawn_blocking(move || {
            stages.apply(&cfg, &rt);
            stages
        })
        .await;
        match done {
            Ok(stages) => self.stages = Some(stages),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("config apply task: {e}"),
        }
    }
}

/// Milliseconds per stage of one apply, for its debug line.
struct Laps(Instant);

impl Laps {
    fn new(t: Instant) -> Laps {
        Laps(t)
    }
    /// Since the previous lap.
    fn next(&mut self) -> u64 {
        let now = Instant::now();
        let ms = now.duration_since(self.0).as_millis() as u64;
        self.0 = now;
        ms
    }
}

impl Stages {
    fn apply(&mut self, cfg: &Arc<Config>, rt: &tokio::runtime::Handle) {
        let started = Instant::now();
        let mut laps = Laps::new(started);
        // Allocate, validate, then persist: a refused config must not keep
        // addresses reserved for its new hosts.
        // Most edits change no allocation input: then nothing is computed.
        let proposal = self.alloc.propose_for(cfg);
        let allocation = self.alloc.proposed(&proposal);
        let alloc_ms = laps.next();
        let cgroups = CgroupDir {
            root: self.cgroup_root.clone(),
        };
        // Patched from the model in force: only what changed is resolved
        // again, and the stages below patch their output for its delta.
        let model = Model::build_from(cfg.clone(), allocation, &cgroups, Some(&self.model.load()));
        for w in model.warnings() {
            warn!("{w}");
        }
        let model_ms = laps.next();
        // Each workload address → the interface it must arrive on (the
        // route back to it), for the spoofing check in sk_lookup.
        let addrs: Vec<IpAddr> = model.workloads().filter_map(|w| w.address).collect();
        let sources = match rt.block_on(kernel::netlink::route_oifs(&addrs)) {
            Ok(oifs) => projection::sources(&oifs),
            Err(e) => {
                warn!(error = %e, "route lookups for workload sources failed; source interface checks unchanged");
                self.sync.sources().clone()
            }
        };
        let projection = projection::project_from(
            &model,
            dns_capture(&self.dns),
            sources,
            self.synced.then(|| self.sync.services()),
        );
        let project_ms = laps.next();
        // Nothing is written unless all of it fits and every waypoint would
        // take it too.
        let mut model = Arc::new(model);
        if let Err(e) = validate::validate(&model, &projection, &Capacity::KERNEL) {
            error!("{e}");
            return;
        }
        let validate_ms = laps.next();
        // The DNS table reads only the model: it is built on another core
        // while the allocation is persisted and the maps written (~60 ms of
        // a cold start at 100k), and published only after them, so no name
        // resolves to a VIP the maps do not steer yet.
        let prev_table = self.table_current.then(|| self.hosts.load_full());
        let (written, table) = std::thread::scope(|s| {
            let table = s.spawn(|| HostTable::from_model(&model, prev_table.as_deref()));
            // Persisted before any map names a new VIP, so a restart cannot
            // give it to another host.
            let written = match self.alloc.commit_for(proposal, cfg) {
                Err(e) => {
                    error!(error = %e, "persisting the VIP allocation failed; maps unchanged");
                    None
                }
                Ok(_) => match self.sync.apply(&projection) {
                    Ok(s) => Some(s.total()),
                    Err(e) => {
                        self.synced = false;
                        error!(error = %e, "applying config to the kernel maps failed");
                        None
                    }
                },
            };
            let table = match table.join() {
                Ok(t) => t,
                Err(p) => std::panic::resume_unwind(p),
            };
            (written, table)
        });
        let Some(stats) = written else { return };
        let write_ms = laps.next();
        self.synced = true;
        match table {
            Ok(t) => {
                self.hosts.store(Arc::new(t));
                self.table_current = true;
            }
            Err(e) => {
                self.table_current = false;
                error!(error = %e, "DNS host table not updated");
            }
        }
        // The node's own addresses are read again too (interfaces change).
        self.dns_clients.store(Arc::new(ClientTable::new(
            model.enrolled().filter_map(|(_, w)| w.address),
        )));
        let dns_ms = laps.next();
        let stamped = Arc::get_mut(&mut model)
            .is_some_and(|m| self.clock.stamp(&mut m.status, &now_rfc3339()));
        if stamped {
            if let Err(e) = self.clock.save(&self.state_dir) {
                warn!(error = %e, "saving status times");
            }
        }
        let status_ms = laps.next();
        let old = self.model.swap(model);
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        debug!(
            alloc_ms,
            model_ms, project_ms, validate_ms, write_ms, dns_ms, status_ms, "config apply stages"
        );
        info!(
            services = projection.services.len(),
            enrolled = projection.enrolled.len(),
            added = stats.added,
            updated = stats.updated,
            removed = stats.removed,
            took_ms = started.elapsed().as_millis() as u64,
            "config applied"
        );
        // Freeing a 100k-entry model takes 0.4-0.9 s: not on the path of the
        // next apply. Readers still holding it keep it alive meanwhile.
        rt.spawn_blocking(move || drop(old));
    }
}

//! The reconciler: applies each new valid config, in order, to everything
//! that serves from it — allocation (the one writer of `vips.json`), the
//! model, the kernel maps (by difference: adds and updates first, removals
//! last), the DNS host table, the data path's model and the ServiceEntry
//! status times. A config that cannot be applied leaves all of them as
//! they were.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    sync::{atomic::AtomicBool, Arc},
    time::Instant,
};

use arc_swap::ArcSwap;
use aya::maps::{lpm_trie::Key, LpmTrie, Map, MapData};
use shunt_common::{map_names, CidrAddr, EnrolledValue, ServiceKey, ServiceValue};
use tracing::{error, info, warn};

use crate::{
    alloc::Allocator,
    app::node::{dns_target, DnsSettings, NodeError, NodeOptions},
    capture,
    config::{watch::ConfigWatcher, Config},
    desired,
    dns::{HostTable, SharedHostTable},
    maps::{self, PinnedMaps},
    model::{now_rfc3339, CgroupDir, Model, StatusClock},
};

/// Applies each new config to the pinned maps, the DNS table and the data
/// path snapshot. Owns the allocator (the only one) and the map mirrors.
pub struct Reconciler {
    state_dir: PathBuf,
    cgroup_root: PathBuf,
    dns: DnsSettings,
    alloc: Allocator,
    maps: PinnedMaps,
    allow: LpmTrie<MapData, CidrAddr, u8>,
    services: BTreeMap<ServiceKey, ServiceValue>,
    enrolled: BTreeMap<u64, EnrolledValue>,
    sources: BTreeMap<CidrAddr, u32>,
    allowed: BTreeMap<(u32, [u8; 16]), u8>,
    hosts: SharedHostTable,
    model: Arc<ArcSwap<Model>>,
    clock: StatusClock,
    ready: Arc<AtomicBool>,
}

impl Reconciler {
    pub fn new(
        opts: &NodeOptions,
        pin_dir: &std::path::Path,
        hosts: SharedHostTable,
        model: Arc<ArcSwap<Model>>,
        ready: Arc<AtomicBool>,
    ) -> Result<Self, NodeError> {
        let maps = PinnedMaps::open(pin_dir)?;
        // Mirrors start from what is pinned, so a restarted agent changes
        // only what differs.
        let services = maps.read_services()?;
        let enrolled = maps.read_enrolled()?;
        let sources = maps.read_sources()?;
        let data = MapData::from_pin(pin_dir.join(map_names::EGRESS_ALLOW))
            .map_err(|e| NodeError::Map(map_names::EGRESS_ALLOW, e))?;
        let allow: LpmTrie<MapData, CidrAddr, u8> = LpmTrie::try_from(Map::LpmTrie(data))
            .map_err(|e| NodeError::Map(map_names::EGRESS_ALLOW, e))?;
        let allowed = allow
            .iter()
            .filter_map(|r| r.ok())
            .map(|(k, v)| ((k.prefix_len(), k.data().addr), v))
            .collect();
        Ok(Self {
            state_dir: opts.agent.state_dir.clone(),
            cgroup_root: opts.agent.paths.cgroup_root.clone(),
            dns: opts.dns.clone(),
            alloc: Allocator::open(&opts.agent.state_dir)?,
            maps,
            allow,
            services,
            enrolled,
            sources,
            allowed,
            hosts,
            model,
            clock: StatusClock::load(&opts.agent.state_dir),
            ready,
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

    pub async fn apply(&mut self, cfg: &Arc<Config>) {
        let started = Instant::now();
        let allocation = match self.alloc.allocate(cfg) {
            Ok(a) => a.clone(),
            Err(e) => {
                error!(error = %e, "VIP allocation failed; maps unchanged");
                return;
            }
        };
        let mut model = Model::build(
            cfg.clone(),
            &allocation,
            &CgroupDir {
                root: self.cgroup_root.clone(),
            },
        );
        for w in model.warnings() {
            warn!("{w}");
        }
        let d = desired::project(&model, dns_target(&self.dns));
        // Each workload address → the interface it must arrive on (the
        // route back to it), for the spoofing check in sk_lookup.
        let addrs: Vec<IpAddr> = model.workloads().filter_map(|w| w.address).collect();
        let desired_sources: BTreeMap<CidrAddr, u32> = match capture::route_oifs(&addrs).await {
            Ok(m) => m
                .into_iter()
                .map(|(ip, oif)| {
                    (
                        CidrAddr {
                            addr: maps::addr_bytes(ip),
                        },
                        oif,
                    )
                })
                .collect(),
            Err(e) => {
                warn!(error = %e, "route lookups for workload sources failed; source interface checks unchanged");
                self.sources.clone()
            }
        };
        let result = (|| -> Result<_, NodeError> {
            let s = maps::reconcile(
                &mut self.maps.services,
                &mut self.services,
                &d.services,
                map_names::SERVICES,
            )?;
            let e = maps::reconcile(
                &mut self.maps.enrolled,
                &mut self.enrolled,
                &d.enrolled,
                map_names::ENROLLED,
            )?;
            maps::reconcile(
                &mut self.maps.sources,
                &mut self.sources,
                &desired_sources,
                map_names::SOURCES,
            )?;
            self.maps.set_meta(&d.meta)?;
            self.sync_allow(&d.allowed_egress)?;
            Ok((s, e))
        })();
        let (s, e) = match result {
            Ok(v) => v,
            Err(e) => {
                error!(error = %e, "applying config to the kernel maps failed");
                return;
            }
        };
        let table = HostTable::from_entries(
            model
                .hosts()
                .map(|(h, r)| (h.clone(), r.v4.clone(), r.v6.clone())),
        );
        match table {
            Ok(t) => self.hosts.store(Arc::new(t)),
            Err(e) => error!(error = %e, "DNS host table not updated"),
        }
        let now = now_rfc3339();
        if self.clock.stamp(&mut model.status, &now) {
            if let Err(e) = self.clock.save(&self.state_dir) {
                warn!(error = %e, "saving status times");
            }
        }
        self.model.store(Arc::new(model));
        self.ready.store(true, std::sync::atomic::Ordering::Release);
        info!(
            services = d.services.len(),
            enrolled = d.enrolled.len(),
            added = s.added + e.added,
            updated = s.updated + e.updated,
            removed = s.removed + e.removed,
            took_ms = started.elapsed().as_millis() as u64,
            "config applied"
        );
    }

    fn sync_allow(&mut self, cidrs: &[ipnet::IpNet]) -> Result<(), NodeError> {
        let desired: BTreeMap<(u32, [u8; 16]), u8> = cidrs
            .iter()
            .map(|n| {
                let (len, addr) = match n {
                    ipnet::IpNet::V4(v4) => (
                        96 + v4.prefix_len() as u32,
                        v4.network().to_ipv6_mapped().octets(),
                    ),
                    ipnet::IpNet::V6(v6) => (v6.prefix_len() as u32, v6.network().octets()),
                };
                ((len, addr), 1u8)
            })
            .collect();
        for (k, v) in &desired {
            if self.allowed.get(k) != Some(v) {
                self.allow
                    .insert(&Key::new(k.0, CidrAddr { addr: k.1 }), v, 0)
                    .map_err(|e| NodeError::Map(map_names::EGRESS_ALLOW, e))?;
            }
        }
        for k in self.allowed.keys().filter(|k| !desired.contains_key(k)) {
            let _ = self.allow.remove(&Key::new(k.0, CidrAddr { addr: k.1 }));
        }
        self.allowed = desired;
        Ok(())
    }
}

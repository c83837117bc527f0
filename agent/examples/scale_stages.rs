//! In-process stage harness for #14's control plane at scale: the agent's
//! apply (the reconciler's stages without the kernel: the map write is the
//! diff plan applied to a mirror) on `cargo xtask scale`'s generated config
//! (`xtask/src/scale_config.rs`, included below), cold and for edits after
//! that.
//!
//! Run with a non-LTO optimised profile, e.g.
//! `CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
//! CARGO_PROFILE_BENCH_OPT_LEVEL=2 cargo run --profile bench -p shunt-agent
//! --example scale_stages -- [--mem | --time] [--remove] [N] [REPS]`. `--mem` adds
//! each stage's live heap after it and its peak during it, `[live/peak]`
//! in MB (counted over mimalloc, the binary's allocator); `--time` turns
//! the counting off (its shared atomics double the parallel parse's time;
//! use it for timings); `--remove` ends with every generated file removed;
//! the end of a run breaks the kept heap down by holder. For RSS as the binary has it, give mimalloc the
//! binary's options: `MIMALLOC_PURGE_DELAY=10 MIMALLOC_ARENA_EAGER_COMMIT=0`
//! (`main.rs` sets them as defaults; without them RSS reads ~1.3x higher).

use std::alloc::{GlobalAlloc, Layout};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mimalloc::MiMalloc;

use shunt_agent::alloc::Allocator;
use shunt_agent::config::{Config, Parser, Snapshot};
use shunt_agent::dns::{ClientTable, HostTable};
use shunt_agent::kernel::{projection, reconcile::Mirror};
use shunt_agent::model::{now_rfc3339, Model, NoCgroups, StatusClock};
use shunt_agent::validate;

/// `cargo xtask scale`'s generated config, its one home.
#[path = "../../xtask/src/scale_config.rs"]
#[allow(dead_code)]
mod gen;
use gen::Edit;

const PER_FILE: usize = 1000;

/// Counts live heap bytes (and their peak) over mimalloc, the binary's
/// allocator: what each stage allocates and keeps.
struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// Off with `--time`: the counters are atomics shared by the parse's
/// threads, which doubles its time (heap figures then read 0).
static COUNT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

// SAFETY: every call is forwarded to mimalloc unchanged; the counters only
// observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, forwarded.
        let p = unsafe { MiMalloc.alloc(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        // SAFETY: the caller's layout, forwarded.
        let p = unsafe { MiMalloc.alloc_zeroed(l) };
        if !p.is_null() {
            grow(l.size());
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: a block mimalloc gave out with this layout, forwarded.
        unsafe { MiMalloc.dealloc(p, l) };
        if COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
        }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        // SAFETY: a block mimalloc gave out with this layout, forwarded.
        let q = unsafe { MiMalloc.realloc(p, l, new) };
        if !q.is_null() && COUNT.load(Ordering::Relaxed) {
            LIVE.fetch_sub(l.size(), Ordering::Relaxed);
            grow(new);
        }
        q
    }
}

fn grow(n: usize) {
    if !COUNT.load(Ordering::Relaxed) {
        return;
    }
    let live = LIVE.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live_mb() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / 1048576.0
}

/// File `f` with entry `edit.0` edited as `edit.1`, and entries `0..n`
/// only (`n` below the file's end: the rest removed).
fn write_file(dir: &Path, f: usize, n: usize, edit: Option<(usize, Edit)>) {
    std::fs::write(
        dir.join(gen::file_name(f)),
        gen::file_text(f, PER_FILE, n, edit),
    )
    .unwrap();
}

/// The reconciler's stages, with the kernel maps as mirrors.
struct Agent {
    state: PathBuf,
    alloc: Allocator,
    model: Arc<Model>,
    services: shunt_agent::model::CowMap<shunt_common::ServiceKey, shunt_common::ServiceValue>,
    clock: StatusClock,
    parser: Parser,
    snap: Option<Arc<Snapshot>>,
    /// The previous model being freed (joined before the next read, so
    /// heap figures do not race it).
    freeing: Option<std::thread::JoinHandle<()>>,
    /// Size and mtime of each file at the last read.
    seen: std::collections::HashMap<PathBuf, (u64, std::time::SystemTime)>,
    /// What the agent keeps for its DNS proxy.
    dns: Option<(Arc<HostTable>, Arc<ClientTable>)>,
}

/// Per stage: its time, the live heap after it and the peak during it
/// (MB, with `--mem`).
#[derive(Default)]
struct Times(Vec<(&'static str, Duration, f64, f64)>);

impl Times {
    fn lap(&mut self, name: &'static str, t: &mut Instant) {
        let d = t.elapsed();
        let live = LIVE.load(Ordering::Relaxed);
        let peak = PEAK.swap(live, Ordering::Relaxed);
        self.0
            .push((name, d, live as f64 / 1048576.0, peak as f64 / 1048576.0));
        *t = Instant::now();
    }
    fn total(&self) -> Duration {
        self.0.iter().map(|x| x.1).sum()
    }
}

impl Agent {
    /// Waits for the previous model to be freed.
    fn settle(&mut self) {
        if let Some(f) = self.freeing.take() {
            f.join().unwrap();
        }
    }

    fn load(&mut self, dir: &Path, t: &mut Times) -> Arc<Config> {
        self.settle();
        PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        let mut at = Instant::now();
        // As the config watcher reads: a file whose size and mtime are as
        // at the last read is taken from the previous snapshot.
        let stat = |p: &Path| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.len(), m.modified().ok()?))
        };
        let seen = std::mem::take(&mut self.seen);
        let snap = Snapshot::read_reusing(dir, self.snap.as_deref(), |p| {
            seen.get(p).is_some_and(|s| Some(*s) == stat(p))
        })
        .unwrap();
        self.seen = snap
            .files
            .iter()
            .filter_map(|(p, _)| Some((p.clone(), stat(p)?)))
            .collect();
        let snap = Arc::new(snap);
        t.lap("read", &mut at);
        let cfg = Arc::new(self.parser.parse(snap.clone()).unwrap());
        self.snap = Some(snap);
        t.lap("parse", &mut at);
        cfg
    }

    fn apply(&mut self, cfg: &Arc<Config>, t: &mut Times) -> usize {
        let mut at = Instant::now();
        let proposal = self.alloc.propose_for(cfg);
        let allocation = self.alloc.proposed(&proposal);
        t.lap("alloc", &mut at);
        let model = Model::build_from(cfg.clone(), allocation, &NoCgroups, Some(&self.model));
        t.lap("model", &mut at);
        let p = projection::project_from(&model, None, BTreeMap::new(), Some(&self.services));
        t.lap("projection", &mut at);
        let mut model = Arc::new(model);
        validate::validate(&model, &p, &projection::Capacity::KERNEL).unwrap();
        t.lap("validate", &mut at);
        self.alloc.commit_for(proposal, cfg).unwrap();
        t.lap("persist", &mut at);
        let pl = self.services.plan(&p.services);
        let changed = pl.upserts.len() + pl.removals.len();
        for (k, v) in pl.upserts {
            self.services.put(k, v);
        }
        for k in pl.removals {
            self.services.delete(&k);
        }
        self.services.settle(&p.services);
        t.lap("maps", &mut at);
        let table = HostTable::from_model(&model, self.dns.as_ref().map(|d| &*d.0)).unwrap();
        let clients = ClientTable::new(model.enrolled().filter_map(|(_, w)| w.address));
        self.dns = Some((Arc::new(table), Arc::new(clients)));
        t.lap("dns", &mut at);
        let stamped = Arc::get_mut(&mut model)
            .is_some_and(|m| self.clock.stamp(&mut m.status, &now_rfc3339()));
        if stamped {
            self.clock.save(&self.state).unwrap();
        }
        t.lap("status", &mut at);
        // As the reconciler does: the old model is freed on another thread.
        let old = std::mem::replace(&mut self.model, model);
        self.freeing = Some(std::thread::spawn(move || drop(old)));
        drop(p);
        t.lap("drop", &mut at);
        changed
    }
}

fn rss_kb(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `--mem`: print each stage's live heap after it and peak during it.
static MEM: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn print(label: &str, t: &Times, extra: &str) {
    let parts: Vec<String> =
        t.0.iter()
            .map(|(n, d, live, peak)| {
                if MEM.load(Ordering::Relaxed) {
                    format!("{n} {:.1} [{live:.0}/{peak:.0}]", d.as_secs_f64() * 1e3)
                } else {
                    format!("{n} {:.1}", d.as_secs_f64() * 1e3)
                }
            })
            .collect();
    println!(
        "{label:<14} total {:8.1} ms | {} {extra}",
        t.total().as_secs_f64() * 1e3,
        parts.join(", ")
    );
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--time") {
        args.remove(i);
        COUNT.store(false, Ordering::Relaxed);
    }
    if let Some(i) = args.iter().position(|a| a == "--mem") {
        args.remove(i);
        MEM.store(true, Ordering::Relaxed);
    }
    let remove = args
        .iter()
        .position(|a| a == "--remove")
        .map(|i| args.remove(i));
    let remove = remove.is_some();
    let mut args = args.into_iter();
    let n: usize = args.next().map_or(100_000, |a| a.parse().unwrap());
    let reps: usize = args.next().map_or(3, |a| a.parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    let state = tmp.path().join("state");
    let cgroup = tmp.path().join("app");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, text) in gen::base_files(
        "10.1.0.2",
        "10.2.0.2",
        "10.3.0.2",
        &cgroup.display().to_string(),
    )
    .unwrap()
    {
        std::fs::write(dir.join(name), text).unwrap();
    }
    for f in 0..n.div_ceil(PER_FILE) {
        write_file(&dir, f, n, None);
    }
    let mut a = Agent {
        alloc: Allocator::open(&state).unwrap(),
        state,
        model: Arc::new(Model::default()),
        services: Default::default(),
        clock: StatusClock::default(),
        parser: Parser::default(),
        snap: None,
        seen: Default::default(),
        freeing: None,
        dns: None,
    };
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let mut t = Times::default();
    let cfg = a.load(&dir, &mut t);
    let changed = a.apply(&cfg, &mut t);
    let peak = t.0.iter().map(|x| x.3).fold(0.0, f64::max);
    drop(cfg);
    a.settle();
    print(
        "cold",
        &t,
        &format!(
            "(map entries {changed}; heap kept {:.0} MB, peak {peak:.0} MB; RSS {} MB, peak {} MB)",
            live_mb(),
            rss_kb("VmRSS:") / 1024,
            rss_kb("VmHWM:") / 1024
        ),
    );
    // Edits in the middle of the config, each applied then reverted.
    let e = n / 2 + 7; // kind 7: two hosts, bound
    let f = e / PER_FILE;
    let last = n - 1;
    for rep in 0..reps {
        for (label, edit, count) in [
            ("edit port", Some((e, Edit::Port)), n),
            ("edit host", Some((e, Edit::Host)), n),
            ("remove last", None, n - 1),
        ] {
            let ff = if count < n { last / PER_FILE } else { f };
            for (what, ed, cnt) in [(label, edit, count), ("  revert", None, n)] {
                write_file(&dir, ff, cnt, ed);
                let mut t = Times::default();
                let cfg = a.load(&dir, &mut t);
                let changed = a.apply(&cfg, &mut t);
                print(
                    &format!("{what}#{rep}"),
                    &t,
                    &format!("(map writes {changed})"),
                );
            }
        }
    }
    a.settle();
    println!(
        "after edits: heap {:.0} MB; RSS {} MB, peak {} MB",
        live_mb(),
        rss_kb("VmRSS:") / 1024,
        rss_kb("VmHWM:") / 1024
    );
    if remove {
        for f in 0..n.div_ceil(PER_FILE) {
            std::fs::remove_file(dir.join(gen::file_name(f))).unwrap();
        }
        let mut t = Times::default();
        let cfg = a.load(&dir, &mut t);
        let changed = a.apply(&cfg, &mut t);
        drop(cfg);
        print("remove all", &t, &format!("(map writes {changed})"));
        a.settle();
        println!(
            "after removal: heap {:.0} MB; RSS {} MB",
            live_mb(),
            rss_kb("VmRSS:") / 1024
        );
    }
    a.settle();
    // Where the kept heap is: each holder dropped in turn (a holder shared
    // with a later one frees only what is its own).
    let mut parts = Vec::new();
    let mut free = |name: &'static str, before: usize| {
        parts.push(format!(
            "{name} {:.1}",
            (before - LIVE.load(Ordering::Relaxed)) as f64 / 1048576.0
        ));
    };
    let l = LIVE.load(Ordering::Relaxed);
    drop(a.dns.take());
    free("dns", l);
    let l = LIVE.load(Ordering::Relaxed);
    drop(std::mem::take(&mut a.services));
    free("map mirror", l);
    let l = LIVE.load(Ordering::Relaxed);
    a.model = Arc::new(Model::default());
    free("model", l);
    let l = LIVE.load(Ordering::Relaxed);
    a.clock = StatusClock::default();
    free("status clock", l);
    // The allocator holds the config it allocated for (its basis).
    let l = LIVE.load(Ordering::Relaxed);
    a.alloc = Allocator::open(&tmp.path().join("empty")).unwrap();
    free("allocator", l);
    let l = LIVE.load(Ordering::Relaxed);
    a.parser = Parser::default();
    free("parser cache (objects)", l);
    let l = LIVE.load(Ordering::Relaxed);
    a.snap = None;
    free("snapshot (file bytes)", l);
    println!("kept heap by holder, MB: {}", parts.join(", "));
    println!(
        "left: {:.1} MB",
        LIVE.load(Ordering::Relaxed).saturating_sub(base) as f64 / 1048576.0
    );
}

//! In-process stage harness for #14's control plane at scale: the agent's
//! apply (the reconciler's stages without the kernel: the map write is the
//! diff plan applied to a mirror) on a generated config like `cargo xtask
//! scale`'s, cold and for edits after that.
//!
//! Run with a non-LTO optimised profile, e.g.
//! `CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16
//! CARGO_PROFILE_BENCH_OPT_LEVEL=2 cargo run --profile bench -p shunt-agent
//! --example scale_stages -- [N] [REPS]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shunt_agent::alloc::Allocator;
use shunt_agent::config::{Config, Parser, Snapshot};
use shunt_agent::dns::{ClientTable, HostTable};
use shunt_agent::kernel::{projection, reconcile::plan};
use shunt_agent::model::{now_rfc3339, Model, NoCgroups, StatusClock};
use shunt_agent::validate;

const NAMESPACES: usize = 100;
const PER_FILE: usize = 1000;
const EDIT_PORT: u16 = 8081;

/// Entry `i` as `cargo xtask scale` generates it (same mix of resolutions,
/// ports, hosts and waypoint binding). `edit`: 1 changes its HTTP port, 2
/// its host (a VIP changes owner).
fn entry(i: usize, edit: u8) -> String {
    let ns = format!("scale-{:02}", i % NAMESPACES);
    let bound = i.is_multiple_of(3);
    let kind = i % 10;
    let labels = if bound || kind == 8 {
        "  labels:\n    istio.io/use-waypoint: egress-gateway\n    istio.io/use-waypoint-namespace: common-infrastructure\n"
    } else {
        ""
    };
    let http = if edit == 1 { EDIT_PORT } else { 80 };
    let tag = if edit == 2 { "x" } else { "" };
    let (hosts, resolution, extra) = match kind {
        0 => (
            format!("  - s{i}{tag}.static.example\n"),
            "STATIC",
            format!(
                "  endpoints:\n  - address: 10.{}.{}.{}\n",
                100 + (i >> 16) % 100,
                (i >> 8) & 255,
                i & 255
            ),
        ),
        1 => (
            format!("  - s{i}{tag}.addr.example\n"),
            "DNS",
            format!("  addresses:\n  - 10.200.{}.{}\n", (i >> 8) & 255, i & 255),
        ),
        7 => (
            format!("  - s{i}{tag}.a.example\n  - s{i}.b.example\n"),
            "DNS",
            String::new(),
        ),
        8 => (
            format!("  - \"*.d{i}{tag}.example\"\n"),
            "DYNAMIC_DNS",
            String::new(),
        ),
        9 => (
            format!("  - s{i}{tag}.rr.example\n"),
            "DNS_ROUND_ROBIN",
            String::new(),
        ),
        _ => (format!("  - s{i}{tag}.svc.example\n"), "DNS", String::new()),
    };
    let mut ports = format!("  - number: {http}\n    name: http\n    protocol: HTTP\n");
    if i.is_multiple_of(2) {
        ports.push_str("  - number: 443\n    name: tls\n    protocol: TLS\n");
    }
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: se-{i}\n  namespace: {ns}\n{labels}spec:\n  hosts:\n{hosts}  ports:\n{ports}  resolution: {resolution}\n{extra}"
    )
}

/// File `f` with entry `edit.0` edited as `edit.1`, and entries `0..n`
/// only (`n` below the file's end: the rest removed).
fn write_file(dir: &Path, f: usize, n: usize, edit: Option<(usize, u8)>) {
    let mut s = String::new();
    for i in f * PER_FILE..((f + 1) * PER_FILE).min(n) {
        if !s.is_empty() {
            s.push_str("---\n");
        }
        let e = edit.filter(|(j, _)| *j == i).map_or(0, |(_, e)| e);
        s.push_str(&entry(i, e));
    }
    std::fs::write(dir.join(format!("se-{f:04}.yaml")), s).unwrap();
}

fn write_base(dir: &Path, n: usize) {
    std::fs::write(dir.join("mesh.yaml"), "trustDomain: cluster.local\n").unwrap();
    let mut ns =
        String::from("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: common-infrastructure\n");
    for i in 0..NAMESPACES {
        ns.push_str(&format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: scale-{i:02}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
        ));
    }
    ns.push_str("---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: egress-gateway\n  namespace: common-infrastructure\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.9}]\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n");
    std::fs::write(dir.join("00-base.yaml"), ns).unwrap();
    for f in 0..n.div_ceil(PER_FILE) {
        write_file(dir, f, n, None);
    }
}

/// The reconciler's stages, with the kernel maps as mirrors.
struct Agent {
    state: PathBuf,
    alloc: Allocator,
    model: Arc<Model>,
    services: BTreeMap<shunt_common::ServiceKey, shunt_common::ServiceValue>,
    clock: StatusClock,
    parser: Parser,
    snap: Option<Arc<Snapshot>>,
}

#[derive(Default)]
struct Times(Vec<(&'static str, Duration)>);

impl Times {
    fn lap(&mut self, name: &'static str, t: &mut Instant) {
        self.0.push((name, t.elapsed()));
        *t = Instant::now();
    }
    fn total(&self) -> Duration {
        self.0.iter().map(|x| x.1).sum()
    }
}

impl Agent {
    fn load(&mut self, dir: &Path, t: &mut Times) -> Arc<Config> {
        let mut at = Instant::now();
        let snap = Arc::new(Snapshot::read(dir).unwrap());
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
        let p = projection::project(&model, None, BTreeMap::new());
        t.lap("projection", &mut at);
        let mut model = Arc::new(model);
        validate::validate(&model, &p, &projection::Capacity::KERNEL).unwrap();
        t.lap("validate", &mut at);
        self.alloc.commit_for(proposal, cfg).unwrap();
        t.lap("persist", &mut at);
        let pl = plan(&self.services, &p.services);
        let changed = pl.upserts.len() + pl.removals.len();
        for (k, v) in pl.upserts {
            self.services.insert(k, v);
        }
        for k in pl.removals {
            self.services.remove(&k);
        }
        t.lap("maps", &mut at);
        let table = HostTable::from_scoped(
            model.hosts().map(|(h, r)| (h, &r.export_to, &r.v4, &r.v6)),
            model
                .workloads()
                .filter_map(|w| w.address.map(|ip| (ip, w.namespace().to_string()))),
        )
        .unwrap();
        std::hint::black_box(table.len());
        let clients = ClientTable::new(model.enrolled().filter_map(|(_, w)| w.address));
        std::hint::black_box(&clients);
        t.lap("dns", &mut at);
        let stamped = Arc::get_mut(&mut model)
            .is_some_and(|m| self.clock.stamp(&mut m.status, &now_rfc3339()));
        if stamped {
            self.clock.save(&self.state).unwrap();
        }
        t.lap("status", &mut at);
        // The old model's drop happens on the apply thread too.
        self.model = model;
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

fn print(label: &str, t: &Times, extra: &str) {
    let parts: Vec<String> =
        t.0.iter()
            .map(|(n, d)| format!("{n} {:.1}", d.as_secs_f64() * 1e3))
            .collect();
    println!(
        "{label:<14} total {:8.1} ms | {} {extra}",
        t.total().as_secs_f64() * 1e3,
        parts.join(", ")
    );
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(100_000, |a| a.parse().unwrap());
    let reps: usize = args.next().map_or(3, |a| a.parse().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("config");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    write_base(&dir, n);
    let mut a = Agent {
        alloc: Allocator::open(&state).unwrap(),
        state,
        model: Arc::new(Model::default()),
        services: BTreeMap::new(),
        clock: StatusClock::default(),
        parser: Parser::default(),
        snap: None,
    };
    let mut t = Times::default();
    let cfg = a.load(&dir, &mut t);
    let changed = a.apply(&cfg, &mut t);
    print(
        "cold",
        &t,
        &format!(
            "(map entries {changed}; RSS {} MB, peak {} MB)",
            rss_kb("VmRSS:") / 1024,
            rss_kb("VmHWM:") / 1024
        ),
    );
    drop(cfg);
    // Edits in the middle of the config, each applied then reverted.
    let e = n / 2 + 7; // kind 7: two hosts, bound
    let f = e / PER_FILE;
    let last = n - 1;
    for rep in 0..reps {
        for (label, edit, count) in [
            ("edit port", Some((e, 1)), n),
            ("edit host", Some((e, 2)), n),
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
    println!(
        "after edits: RSS {} MB, peak {} MB",
        rss_kb("VmRSS:") / 1024,
        rss_kb("VmHWM:") / 1024
    );
}

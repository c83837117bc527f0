//! Time to turn N ServiceEntries into kernel map content: allocation
//! (including the persisted state write) plus the desired state, from cold
//! (empty state directory) and for one edited entry after that.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use shunt_agent::alloc::Allocator;
use shunt_agent::config::Config;
use shunt_agent::kernel::projection;
use shunt_agent::model::{Model, NoCgroups};

/// N entries in one namespace bound to a waypoint, in one file.
fn config(n: usize) -> std::sync::Arc<Config> {
    let mut y = String::with_capacity(n * 260);
    y.push_str("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns\n  labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}\n---\n");
    y.push_str("apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: ns}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.9}]\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n");
    for i in 0..n {
        y.push_str(&format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: s{i}, namespace: ns}}\nspec:\n  hosts: [h{i}.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: DNS\n---\n"
        ));
    }
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a.yaml"), y).unwrap();
    std::sync::Arc::new(Config::load_dir(d.path()).unwrap())
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("config_apply");
    g.sample_size(10);
    for n in [10_000usize, 100_000] {
        let cfg = config(n);
        g.bench_function(format!("cold/{n}"), |b| {
            b.iter_batched(
                || tempfile::tempdir().unwrap(),
                |dir| {
                    let mut al = Allocator::open(dir.path()).unwrap();
                    let a = al.allocate(&cfg).unwrap();
                    let d = projection::project(
                        &Model::build(cfg.clone(), a, &NoCgroups),
                        None,
                        Default::default(),
                    );
                    black_box(d.services.len());
                    dir
                },
                BatchSize::PerIteration,
            )
        });
        // One edit after a cold apply: a port changed on one entry.
        let mut edited = (*cfg).clone();
        std::sync::Arc::make_mut(&mut edited.service_entries[n / 2])
            .spec
            .ports[0]
            .number
            .0 = 8080;
        let edited = std::sync::Arc::new(edited);
        let dir = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(dir.path()).unwrap();
        al.allocate(&cfg).unwrap();
        let mut flip = false;
        g.bench_function(format!("one_edit/{n}"), |b| {
            b.iter(|| {
                flip = !flip;
                let c = if flip { &edited } else { &cfg };
                let a = al.allocate(c).unwrap();
                let d = projection::project(
                    &Model::build(c.clone(), a, &NoCgroups),
                    None,
                    Default::default(),
                );
                black_box(d.services.len());
            })
        });
    }
    g.finish();
    // One-shot breakdown of a cold 100k apply, for the report.
    let cfg = config(100_000);
    let dir = tempfile::tempdir().unwrap();
    let mut al = Allocator::open(dir.path()).unwrap();
    let t = std::time::Instant::now();
    al.allocate(&cfg).unwrap();
    let t_alloc = t.elapsed();
    let t = std::time::Instant::now();
    let st = shunt_agent::alloc::load(dir.path()).unwrap();
    let t_load = t.elapsed();
    black_box(st.hosts.len());
    let t = std::time::Instant::now();
    let d = projection::project(
        &Model::build(cfg.clone(), al.current(), &NoCgroups),
        None,
        Default::default(),
    );
    let t_build = t.elapsed();
    let t = std::time::Instant::now();
    al.allocate(&cfg).unwrap();
    let t_realloc = t.elapsed();
    eprintln!(
        "cold 100k: allocate+persist {t_alloc:?}, desired {t_build:?} ({} map entries); unchanged re-allocate {t_realloc:?}, reader load {t_load:?}",
        d.services.len()
    );
    // Parsing is separate from apply; report it once for context.
    let t = std::time::Instant::now();
    let n = config(100_000).service_entries.len();
    eprintln!(
        "(generating + parsing {n} ServiceEntries took {:?})",
        t.elapsed()
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);

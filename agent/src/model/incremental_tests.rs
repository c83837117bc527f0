//! [`Model::build_from`] patched from the previous model against a build
//! from scratch, over random sequences of edits: entries added, removed,
//! moved between files, their ports, hosts (shared between entries, so
//! allocated hosts move between them), explicit addresses (VIP:port
//! collisions), creation times (collision and record order), waypoint
//! labels and resolutions changed. The kernel projection and the DNS
//! table patched for the model's delta are checked the same way.

use std::path::PathBuf;

use super::*;
use crate::alloc::Allocator;
use crate::config::{Parser, Snapshot};
use crate::dns::HostTable;
use crate::kernel::projection;

const GW: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: wp\n  namespace: infra\n  labels: {istio.io/waypoint-for: service}\nspec:\n  gatewayClassName: istio-waypoint\n  addresses: [{value: 10.0.0.9}]\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\n";

/// xorshift: a fixed seed per run, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, of: &'a [T]) -> &'a T {
        &of[self.below(of.len())]
    }
}

#[derive(Clone, Debug)]
struct Entry {
    live: bool,
    file: usize,
    ns: &'static str,
    created: Option<u32>,
    hosts: Vec<&'static str>,
    ports: Vec<u16>,
    addresses: Vec<&'static str>,
    waypoint: bool,
    /// DYNAMIC_DNS with a wildcard host (else DNS or STATIC).
    dynamic: bool,
    stat: bool,
}

const HOSTS: &[&str] = &[
    "h1.example",
    "h2.example",
    "H1.example",
    "h3.example",
    "h4.example",
];
const WILD: &[&str] = &["*.w1.example", "*.w2.example"];
const PORTS: &[u16] = &[80, 443, 8080];
const ADDRS: &[&str] = &["10.9.9.1", "10.9.9.2", "10.9.9.3/32"];

fn random_entry(r: &mut Rng) -> Entry {
    let dynamic = r.below(6) == 0;
    let mut e = Entry {
        live: r.below(4) != 0,
        file: r.below(4),
        ns: r.pick(&["a", "b"]),
        created: (r.below(3) != 0).then(|| r.below(4) as u32),
        hosts: Vec::new(),
        ports: Vec::new(),
        addresses: Vec::new(),
        waypoint: r.below(3) == 0,
        dynamic,
        stat: !dynamic && r.below(3) == 0,
    };
    reroll_hosts(r, &mut e);
    reroll_ports(r, &mut e);
    if !dynamic && r.below(2) == 0 {
        e.addresses = vec![*r.pick(ADDRS)];
    }
    e
}

fn reroll_hosts(r: &mut Rng, e: &mut Entry) {
    e.hosts = if e.dynamic {
        vec![*r.pick(WILD)]
    } else {
        let mut h = vec![*r.pick(HOSTS)];
        if r.below(2) == 0 {
            let other = *r.pick(HOSTS);
            if !h.contains(&other) {
                h.push(other);
            }
        }
        h
    };
}

fn reroll_ports(r: &mut Rng, e: &mut Entry) {
    e.ports = vec![*r.pick(PORTS)];
    if r.below(2) == 0 {
        let p = *r.pick(PORTS);
        if !e.ports.contains(&p) {
            e.ports.push(p);
        }
    }
}

fn yaml(i: usize, e: &Entry) -> String {
    let mut meta = format!("name: se{i}, namespace: {}", e.ns);
    if let Some(d) = e.created {
        meta += &format!(", creationTimestamp: '2024-01-0{}T00:00:00Z'", d + 1);
    }
    if e.waypoint {
        meta += ", labels: {istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}";
    }
    let hosts = e.hosts.join(", ");
    let hosts = if e.dynamic {
        format!("'{hosts}'")
    } else {
        hosts
    };
    let ports: Vec<String> = e
        .ports
        .iter()
        .map(|p| {
            let proto = if e.dynamic { "TLS" } else { "TCP" };
            format!("{{number: {p}, name: p{p}, protocol: {proto}}}")
        })
        .collect();
    let (res, rest) = if e.dynamic {
        ("DYNAMIC_DNS", String::new())
    } else if e.stat {
        ("STATIC", "  endpoints: [{address: 10.0.0.1}]\n".to_string())
    } else {
        ("DNS", String::new())
    };
    let addrs = if e.addresses.is_empty() {
        String::new()
    } else {
        format!("  addresses: [{}]\n", e.addresses.join(", "))
    };
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{{meta}}}\nspec:\n  hosts: [{hosts}]\n  ports: [{}]\n  resolution: {res}\n{addrs}{rest}---\n",
        ports.join(", ")
    )
}

fn snapshot(entries: &[Entry]) -> Arc<Snapshot> {
    let mut files: BTreeMap<usize, String> = BTreeMap::new();
    files.insert(0, GW.to_string());
    for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.live) {
        files.entry(e.file).or_default().push_str(&yaml(i, e));
    }
    Arc::new(Snapshot::new(
        files
            .into_iter()
            .map(|(f, t)| (PathBuf::from(format!("f{f}.yaml")), t.into_bytes()))
            .collect(),
    ))
}

/// Every index and every warning of two models, field by field.
pub(super) fn assert_same(patched: &Model, fresh: &Model, step: usize) {
    assert_eq!(patched.services, fresh.services, "services, step {step}");
    assert_eq!(patched.claims, fresh.claims, "VIP:port claims, step {step}");
    assert_eq!(patched.hosts, fresh.hosts, "host records, step {step}");
    assert_eq!(patched.entries, fresh.entries, "entries, step {step}");
    assert_eq!(patched.status, fresh.status, "status, step {step}");
    assert_eq!(
        patched.warnings().collect::<Vec<_>>(),
        fresh.warnings().collect::<Vec<_>>(),
        "warnings, step {step}"
    );
}

#[test]
fn a_patched_model_equals_a_fresh_build_after_every_random_edit() {
    for seed in 1..=4u64 {
        let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let mut entries: Vec<Entry> = (0..14).map(|_| random_entry(&mut r)).collect();
        let state = tempfile::tempdir().unwrap();
        let mut al = Allocator::open(state.path()).unwrap();
        let mut parser = Parser::default();
        let cfg = Arc::new(parser.parse(snapshot(&entries)).unwrap());
        let mut prev = Model::build(cfg.clone(), al.allocate(&cfg).unwrap(), &NoCgroups);
        let mut prev_services = projection::project(&prev, None, BTreeMap::new()).services;
        let mut prev_table = HostTable::from_model(&prev, None).unwrap();
        let mut patched_steps = 0;
        for step in 0..100 {
            let i = r.below(entries.len());
            let e = &mut entries[i];
            match r.below(8) {
                0 => e.live = !e.live,
                1 => reroll_ports(&mut r, e),
                2 => reroll_hosts(&mut r, e),
                3 if !e.dynamic => {
                    e.addresses = match r.below(3) {
                        0 => Vec::new(),
                        _ => vec![*r.pick(ADDRS)],
                    }
                }
                4 => e.created = (r.below(3) != 0).then(|| r.below(4) as u32),
                5 => e.file = r.below(4),
                6 => e.waypoint = !e.waypoint,
                _ => *e = random_entry(&mut r),
            }
            let cfg = Arc::new(parser.parse(snapshot(&entries)).unwrap_or_else(|e| {
                panic!("seed {seed} step {step}: generated config refused: {e}")
            }));
            let alloc = al.allocate(&cfg).unwrap().clone();
            let patched = Model::build_from(cfg.clone(), &alloc, &NoCgroups, Some(&prev));
            patched_steps += patched.delta().is_some() as usize;
            let fresh = Model::build(cfg, &alloc, &NoCgroups);
            assert_same(&patched, &fresh, step);
            let p = projection::project_from(&patched, None, BTreeMap::new(), Some(&prev_services));
            assert_eq!(
                p,
                projection::project(&fresh, None, BTreeMap::new()),
                "projection, seed {seed} step {step}"
            );
            let table = HostTable::from_model(&patched, Some(&prev_table)).unwrap();
            assert_eq!(
                table,
                HostTable::from_model(&fresh, None).unwrap(),
                "DNS table, seed {seed} step {step}"
            );
            prev = patched;
            prev_services = p.services;
            prev_table = table;
        }
        assert_eq!(patched_steps, 100, "every step patched, seed {seed}");
    }
}

/// The acceptance step of a patched model checks the services it resolved
/// again: an edit that makes a bound entry's STATIC endpoint a name is
/// refused as a build from scratch refuses it.
#[test]
fn a_patched_model_is_refused_for_an_edit_its_waypoint_cannot_route() {
    let entry = |endpoint: &str| {
        format!("apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: a, labels: {{istio.io/use-waypoint: wp, istio.io/use-waypoint-namespace: infra}}}}\nspec:\n  hosts: [db.example]\n  ports: [{{number: 5432, name: tcp, protocol: TCP}}]\n  resolution: STATIC\n  endpoints: [{endpoint}]\n---\n")
    };
    let snap = |endpoint: &str| {
        Arc::new(Snapshot::new(vec![
            (PathBuf::from("gw.yaml"), GW.as_bytes().to_vec()),
            (PathBuf::from("se.yaml"), entry(endpoint).into_bytes()),
            (
                PathBuf::from("z.yaml"),
                yaml(9, &other_entry()).into_bytes(),
            ),
        ]))
    };
    let state = tempfile::tempdir().unwrap();
    let mut al = Allocator::open(state.path()).unwrap();
    let mut parser = Parser::default();
    let c1 = Arc::new(parser.parse(snap("{address: 10.0.0.1}")).unwrap());
    let m1 = Model::build(c1.clone(), al.allocate(&c1).unwrap(), &NoCgroups);
    let p1 = crate::validate::projection_of(&m1);
    let m1 = Arc::new(m1);
    crate::validate::validate(&m1, &p1, &projection::Capacity::KERNEL).unwrap();
    let c2 = Arc::new(parser.parse(snap("")).unwrap());
    let a2 = al.allocate(&c2).unwrap().clone();
    let m2 = Arc::new(Model::build_from(c2, &a2, &NoCgroups, Some(&m1)));
    assert!(m2.delta().is_some(), "patched");
    let p2 = crate::validate::projection_of(&m2);
    let e = crate::validate::validate(&m2, &p2, &projection::Capacity::KERNEL)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("ServiceEntry a/db") && e.contains("STATIC without endpoints"),
        "{e}"
    );
}

/// An unrelated entry, so that the edited one is not the model's only one.
fn other_entry() -> Entry {
    Entry {
        live: true,
        file: 9,
        ns: "b",
        created: None,
        hosts: vec!["h1.example"],
        ports: vec![80],
        addresses: Vec::new(),
        waypoint: true,
        dynamic: false,
        stat: false,
    }
}

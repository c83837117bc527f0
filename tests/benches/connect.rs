//! connect() to a VIP (connect4 + sk_lookup + the capture socket) versus
//! connect() to a plain listener on the node, side by side from the same
//! enrolled pod. Afterwards prints each program's average run time from the
//! kernel's BPF stats (run_time_ns / run_cnt).
//!
//! The bench process itself becomes the pod: it joins the pod's cgroup and
//! network namespace after a helper thread has bound the baseline listener
//! inside the node's namespace.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    time::Duration,
};

use criterion::{criterion_group, criterion_main, Criterion};
use shunt_testbed::{Node, Result};

fn setns(path: &std::path::Path) {
    let f = std::fs::File::open(path).expect("netns");
    assert_eq!(
        // SAFETY: valid fd.
        unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) },
        0,
        "setns"
    );
}

fn bpf_stats() -> Vec<(String, u64, u64)> {
    let out = std::process::Command::new("bpftool")
        .args(["prog", "show", "--json"])
        .output();
    let Ok(out) = out else { return vec![] };
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // Minimal parse: objects with "name", "run_time_ns", "run_cnt".
    let mut res = Vec::new();
    for obj in text.split("},{") {
        let field = |k: &str| {
            obj.split(&format!("\"{k}\":")).nth(1).map(|r| {
                r.trim_start_matches('"')
                    .split(['"', ',', '}'])
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
        };
        if let Some(name) = field("name").filter(|n| n.starts_with("shunt_")) {
            let rt = field("run_time_ns")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let rc = field("run_cnt").and_then(|v| v.parse().ok()).unwrap_or(0);
            res.push((name, rt, rc));
        }
    }
    res
}

fn setup() -> Result<(Node, SocketAddr, SocketAddr)> {
    let mut node = Node::new()?;
    node.add_pod("bench")?;
    node.start_echo_agent()?;
    node.add_service("240.240.0.1:80", 1)?;
    node.enroll("bench", 1)?;
    let node_ip = node.pod("bench").ip4.replace(".0.2", ".0.1");
    let plain: SocketAddr = format!("{node_ip}:9000").parse()?;
    let ns = node.ns.path();
    // Baseline listener in the node namespace. Like the agent, it keeps
    // each connection until the client closes, so TIME_WAIT lands on the
    // client in both cases and the two runs differ only in the path.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        setns(&ns);
        // Same backlog as the capture listener (std's default is 128).
        let sock =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        sock.bind(&plain.into()).expect("bind baseline");
        sock.listen(4096).unwrap();
        sock.set_nonblocking(true).unwrap();
        let l: TcpListener = sock.into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            tx.send(()).unwrap();
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut b = [0u8; 64];
                    while matches!(s.read(&mut b).await, Ok(n) if n > 0) {}
                });
            }
        });
    });
    rx.recv()?;
    std::fs::write(node.pod("bench").cgroup.path.join("cgroup.procs"), "0")?;
    setns(&node.pod("bench").ns.path());
    // Tens of thousands of short connections from one client: widen the
    // pod's port range and let it reuse TIME_WAIT ports (same for both paths).
    std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65000")?;
    std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
    Ok((node, "240.240.0.1:80".parse()?, plain))
}

fn bench(c: &mut Criterion) {
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1");
    let (_node, vip, plain) = setup().expect("bench setup");
    // Declared after `node`, so it drops first (also on a panic): the
    // process leaves the pod's cgroup before the guards remove it.
    let _leave = LeaveCgroup;
    let mut g = c.benchmark_group("connect");
    g.measurement_time(Duration::from_secs(5));
    g.bench_function("plain_node_listener", |b| {
        b.iter(|| TcpStream::connect(plain).expect("connect plain"))
    });
    g.bench_function("vip_via_sk_lookup", |b| {
        b.iter(|| TcpStream::connect(vip).expect("connect vip"))
    });
    g.finish();
    // Percentiles, interleaved so that both paths see the same machine state.
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..10_000 {
        for (addr, v) in [(plain, &mut a), (vip, &mut b)] {
            let t = std::time::Instant::now();
            let s = TcpStream::connect(addr).expect("connect");
            v.push(t.elapsed().as_nanos() as u64);
            drop(s);
        }
    }
    for (name, v) in [
        ("plain_node_listener", &mut a),
        ("vip_via_sk_lookup", &mut b),
    ] {
        v.sort_unstable();
        let pct = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] as f64 / 1000.0;
        println!(
            "connect percentiles {name}: p50={:.1}us p90={:.1}us p99={:.1}us (n={})",
            pct(0.5),
            pct(0.9),
            pct(0.99),
            v.len()
        );
    }
    for (name, rt, rc) in bpf_stats() {
        if rc > 0 {
            println!(
                "bpf stats: {name}: run_cnt={rc} avg={:.0} ns",
                rt as f64 / rc as f64
            );
        }
    }
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "0");
}

struct LeaveCgroup;

impl Drop for LeaveCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(
            shunt_testbed::cgroup2_mount()
                .expect("cgroup2")
                .join("cgroup.procs"),
            "0",
        );
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);

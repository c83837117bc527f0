//! The DNS proxy's TCP listener under 2,000 idle connections, in a process
//! whose soft fd limit is 1024 (its own test binary: the limit is
//! process-wide). The flood comes from another process (python3), so that
//! only the proxy's side counts against the limit.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use shunt_agent::dns::{DnsConfig, DnsProxy, HostTable};
use shunt_agent::telemetry::Metrics;

const FLOODER: &str = r#"
import os, resource, socket, sys, time
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
socks = []
for _ in range(n):
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("127.0.0.1", port))
        socks.append(s)
    except OSError:
        s.close()
time.sleep(1)
# The proxy's process may have no fd left to count its own with.
print(len(socks), len(os.listdir("/proc/%s/fd" % pid)), flush=True)
sys.stdin.read()
"#;

/// Holds `n` idle connections to `port` until dropped.
struct Flood {
    child: std::process::Child,
    held: usize,
    /// This process's open fds with the flood held.
    our_fds: usize,
}

impl Flood {
    fn open(port: u16, n: usize) -> Flood {
        let mut child = Command::new("python3")
            .args([
                "-c",
                FLOODER,
                &port.to_string(),
                &n.to_string(),
                &std::process::id().to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let mut nums = line
            .split_whitespace()
            .map(|n| n.parse().expect("flooder output"));
        Flood {
            child,
            held: nums.next().expect("held"),
            our_fds: nums.next().expect("fds"),
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        if let Some(mut stdin) = self.child.stdin.take() {
            let _ = stdin.flush();
        }
        let _ = self.child.wait();
    }
}

fn own_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn set_soft_fd_limit(n: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a struct we own.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = n;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

/// `dig +tcp` for a ServiceEntry host, retried while the proxy backs off.
async fn tcp_lookup_works(addr: SocketAddr) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..10 {
        let out = tokio::process::Command::new("dig")
            .args([
                "@127.0.0.1",
                "-p",
                &addr.port().to_string(),
                "+tcp",
                "+tries=1",
                "+time=2",
                "+short",
                "httpbin.org",
                "A",
            ])
            .output()
            .await
            .map_err(|e| e.to_string())?;
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        if last.trim() == "240.240.0.4" {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(format!("dig +tcp answered {last:?}"))
}

async fn proxy(max_tcp_connections: usize) -> DnsProxy {
    let hosts =
        HostTable::from_entries([("httpbin.org", vec!["240.240.0.4".parse().unwrap()], vec![])])
            .unwrap()
            .into_shared();
    let metrics = Metrics::builder().build();
    // The upstream is never asked: only the ServiceEntry host is looked up.
    let mut cfg = DnsConfig::new(
        vec!["127.0.0.1:0".parse().unwrap()],
        vec!["127.0.0.1:9".parse().unwrap()],
    );
    cfg.max_tcp_connections = max_tcp_connections;
    DnsProxy::start(cfg, hosts, metrics.dns()).await.unwrap()
}

fn metric(prefix: &str) -> u64 {
    Metrics::builder()
        .build()
        .encode()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_tcp_connections_neither_stop_nor_exhaust_the_dns_proxy() {
    set_soft_fd_limit(1024);

    // Without a connection budget the flood reaches the fd limit: accept
    // fails with EMFILE, the loop backs off and serves again afterwards.
    let unbudgeted = proxy(100_000).await;
    let addr = unbudgeted.local_addrs()[0];
    tcp_lookup_works(addr).await.expect("before the flood");
    let flood = Flood::open(addr.port(), 2000);
    let fds_unbudgeted = flood.our_fds;
    drop(flood);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tcp_lookup_works(addr).await.expect("after the flood");
    let emfile = metric(r#"shunt_accept_errors_total{listener="dns_tcp",reason="emfile"}"#);
    assert!(emfile > 0, "the flood reached the fd limit");
    drop(unbudgeted);

    // With the default budget (256) the flood never gets there, and the
    // proxy's fds stay near the budget.
    let budgeted = proxy(DnsConfig::new(vec![], vec![]).max_tcp_connections).await;
    let addr = budgeted.local_addrs()[0];
    let baseline = own_fds();
    let flood = Flood::open(addr.port(), 2000);
    let fds_budgeted = flood.our_fds;
    let held = flood.held;
    drop(flood);
    tokio::time::sleep(Duration::from_secs(1)).await;
    tcp_lookup_works(addr).await.expect("after the flood");
    let refused =
        metric(r#"shunt_refused_connections_total{listener="dns_tcp",reason="connection_limit"}"#);
    eprintln!(
        "no budget: {fds_unbudgeted} fds in use, {emfile} EMFILE accept errors; \
         budget 256: {held} connections held by the flooder, fds {baseline} -> {fds_budgeted}, \
         {refused} refused"
    );
    assert!(refused > 0, "the budget refused the excess");
    assert!(
        fds_budgeted <= baseline + 256 + 16,
        "fds stay within the budget ({baseline} -> {fds_budgeted})"
    );
}

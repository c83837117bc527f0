//! `shunt-echo-agent`: the real node agent with a test handler plugged in
//! instead of HBONE. For every steered connection it writes
//! `dst=<original destination>\n` and then echoes the bytes back, so kernel
//! tests can check steering, the original destination and both directions
//! without a waypoint. It exists only in the test crate: no production path
//! sends bytes anywhere but to a waypoint.

use std::{path::PathBuf, sync::Arc, time::Duration};

use shunt_agent::{
    app::node::{self, AdminAddrs, DnsSettings, NodeOptions},
    kernel::KernelPaths,
    proxy::capture::{enter_netns, BoxFuture, CaptureOptions, Handler, Steered},
};
use tokio::io::AsyncWriteExt;

struct Echo;

impl Handler for Echo {
    fn handle(&self, conn: Steered) -> BoxFuture {
        Box::pin(async move {
            let mut s = conn.stream;
            if s.write_all(format!("dst={}\n", conn.dst).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
    }
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn main() {
    tracing_subscriber_init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let need = |n: &str| {
        arg(&args, n).unwrap_or_else(|| {
            eprintln!("shunt-echo-agent: missing {n}");
            std::process::exit(2)
        })
    };
    if let Some(ns) = arg(&args, "--netns") {
        enter_netns(&PathBuf::from(ns)).expect("netns");
    }
    let state_dir: PathBuf = need("--state-dir").into();
    // Without --config-dir the config is absent, so the pinned maps are
    // left to the test (which writes them directly).
    let config_dir = arg(&args, "--config-dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir.join("no-config"));
    let dns_upstream: Vec<std::net::SocketAddr> = arg(&args, "--dns-upstream")
        .map(|u| vec![shunt_agent::dns::parse_upstream(&u).expect("--dns-upstream")])
        .unwrap_or_default();
    let opts = NodeOptions {
        agent: CaptureOptions {
            paths: KernelPaths {
                pin_dir: need("--pin-dir").into(),
                cgroup_root: need("--cgroup-root").into(),
            },
            state_dir,
            capture_addr: "[::ffff:127.0.0.1]:0".parse().unwrap(),
            drain_timeout: Duration::from_secs(10),
            meta: None,
            limits: Default::default(),
        },
        config_dir,
        kubernetes: None,
        ca_dir: PathBuf::new(),
        ca_client: None,
        dns: DnsSettings {
            enabled: !dns_upstream.is_empty(),
            addr4: "169.254.20.10".parse().unwrap(),
            addr6: "fd73:6875:6e74::53".parse().unwrap(),
            port: 53,
            upstreams: dns_upstream,
            max_inflight_per_client: arg(&args, "--dns-max-inflight-per-client")
                .map(|n| n.parse().expect("--dns-max-inflight-per-client")),
        },
        admin: AdminAddrs {
            metrics: arg(&args, "--metrics-addr").map(|a| a.parse().expect("--metrics-addr")),
            ..AdminAddrs::default()
        },
        log_format: shunt_agent::telemetry::LogFormat::Text,
        cert_lifetime: Duration::from_secs(3600),
        hbone: Default::default(),
        vip_grace: shunt_agent::alloc::DEFAULT_GRACE,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let r = rt.block_on(node::run_with(opts, Some(Arc::new(Echo))));
    if let Err(e) = r {
        eprintln!("shunt-echo-agent: {e}");
        std::process::exit(1);
    }
}

fn tracing_subscriber_init() {
    use tracing_subscriber::{fmt, EnvFilter};
    let _ = fmt()
        .with_env_filter(EnvFilter::new("info"))
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

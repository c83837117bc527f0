//! Admin endpoints fetched with the real `curl`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use shunt_agent::admin::{AdminServer, Endpoints};
use shunt_agent::telemetry::{ConnectionLabels, Metrics};

/// (status, body) of `curl http://ADDR/PATH`.
async fn curl(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--max-time", "10", "-o", "-", "-w", "\n%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .await
        .expect("running curl");
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn telemetry_admin_endpoints_over_http() {
    let metrics = Metrics::builder().build();
    let rec = metrics.connection(ConnectionLabels {
        source_workload: "curl".into(),
        request_protocol: "tcp".into(),
        ..Default::default()
    });
    rec.sent(1234);
    metrics.dns().requests.inc();

    let ready = Arc::new(AtomicBool::new(false));
    let localhost = "127.0.0.1:0".parse().unwrap();
    let m = AdminServer::bind(
        localhost,
        Endpoints {
            metrics: Some(metrics.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let r = AdminServer::bind(
        localhost,
        Endpoints {
            ready: Some(ready.clone()),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let c = AdminServer::bind(
        localhost,
        Endpoints {
            config_dump: Some(Arc::new(
                || serde_json::json!({"services": [{"host": "httpbin.org", "vip": "240.240.0.4"}]}),
            )),
            ..Default::default()
        },
    )
    .await
    .unwrap();

    let (code, body) = curl(m.local_addr(), "/metrics").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE istio_tcp_sent_bytes counter"),
        "{body}"
    );
    let sent = body
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_sent_bytes_total{") && l.contains(r#"source_workload="curl""#)
        })
        .expect("sent bytes line");
    assert!(sent.ends_with(" 1234"), "{sent}");
    assert!(body.contains("istio_dns_requests_total 1"), "{body}");
    assert!(body.trim_end().ends_with("# EOF"));

    let (code, _) = curl(r.local_addr(), "/healthz/ready").await;
    assert_eq!(code, 503);
    ready.store(true, Ordering::Release);
    let (code, _) = curl(r.local_addr(), "/healthz/ready").await;
    assert_eq!(code, 200);

    let (code, body) = curl(c.local_addr(), "/config_dump").await;
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["services"][0]["vip"], "240.240.0.4");

    // Each listener serves only what it was given; anything else is 404.
    assert_eq!(curl(m.local_addr(), "/config_dump").await.0, 404);
    assert_eq!(curl(r.local_addr(), "/metrics").await.0, 404);
    assert_eq!(curl(c.local_addr(), "/nope").await.0, 404);

    // Several requests on one connection (curl reuses it for two URLs).
    let out = tokio::process::Command::new("curl")
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\n",
        ])
        .arg(format!("http://{}/healthz/ready", r.local_addr()))
        .arg(format!("http://{}/healthz/ready", r.local_addr()))
        .output()
        .await
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text, "200 1\n200 0\n", "keep-alive reuse");
}

#[tokio::test]
async fn telemetry_admin_bind_error_names_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let e = AdminServer::bind(addr, Endpoints::default())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains(&addr.to_string()), "{e}");
}

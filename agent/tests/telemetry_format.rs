//! Access-log formats against the seed's lines, and the metrics registry.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use shunt_agent::telemetry::{
    AccessLogger, ConnectionLabels, ConnectionLog, Direction, LogFormat, Metrics, Reporter,
    RequestLabels, RequestLog,
};

// The lines as the seed (shared/seed/istio-ambient-egress.txt) shows them.
const SEED_PASSTHROUGH: &str = r#"2024-10-29T02:10:57.056612Z info access connection complete src.addr=10.244.1.19:54882 src.workload="curl-759db5669d-dl5xw" src.namespace="default" dst.addr=54.84.141.5:80 direction="outbound" bytes_sent=78 bytes_recv=230 duration="616ms""#;
const SEED_WAYPOINT: &str = r#"2024-10-29T01:24:32.582832Z info access connection complete src.addr=10.244.1.19:38994 src.workload="curl-759db5669d-dl5xw" src.namespace="default" src.identity="spiffe://cluster.local/ns/default/sa/curl" dst.addr=10.244.1.18:15008 dst.hbone_addr=240.240.0.4:80 dst.service="httpbin.org" dst.workload="egress-gateway-55767f4d4d-gkd5q" dst.namespace="common-infrastructure" dst.identity="spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway" direction="outbound" bytes_sent=78 bytes_recv=285 duration="404ms""#;
const SEED_ENVOY: &str = r#"[2024-10-29T01:24:32.608Z] "HEAD /get HTTP/1.1" 200 - via_upstream - "-" 0 0 392 392 "-" "curl/8.7.1" "b3c2eff1-b545-4dbf-b1e3-01dd203ded93" "httpbin.org" "34.228.248.173:80" inbound-vip|80|http|httpbin.org 10.244.1.18:49894 240.240.0.4:80 10.244.1.19:55866 - d"#;

/// The seed file sits beside the repository (`../shared/seed`). When it is
/// there, the constants above must be its exact lines.
#[test]
fn telemetry_seed_lines_match_the_seed_file() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/seed/istio-ambient-egress.txt"
    );
    let Ok(seed) = std::fs::read_to_string(path) else {
        eprintln!("seed file {path} not present; using the embedded copies");
        return;
    };
    let lines: Vec<&str> = seed
        .lines()
        .map(|l| l.trim_matches(|c| c == '│' || c == ' '))
        .collect();
    for want in [SEED_PASSTHROUGH, SEED_WAYPOINT, SEED_ENVOY] {
        assert!(lines.contains(&want), "seed no longer has: {want}");
    }
}

fn at(y: i32, mo: u8, d: u8, h: u8, mi: u8, s: u8, micros: u32) -> SystemTime {
    let date = time::Date::from_calendar_date(y, time::Month::try_from(mo).unwrap(), d).unwrap();
    let t = time::Time::from_hms_micro(h, mi, s, micros).unwrap();
    SystemTime::from(time::PrimitiveDateTime::new(date, t).assume_utc())
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn passthrough() -> ConnectionLog {
    let mut l = ConnectionLog::new(
        addr("10.244.1.19:54882"),
        addr("54.84.141.5:80"),
        Direction::Outbound,
    );
    l.time = at(2024, 10, 29, 2, 10, 57, 56612);
    l.src_workload = Some("curl-759db5669d-dl5xw".into());
    l.src_namespace = Some("default".into());
    l.bytes_sent = 78;
    l.bytes_recv = 230;
    l.duration = Duration::from_micros(616_900);
    l
}

fn via_waypoint() -> ConnectionLog {
    let mut l = ConnectionLog::new(
        addr("10.244.1.19:38994"),
        addr("10.244.1.18:15008"),
        Direction::Outbound,
    );
    l.time = at(2024, 10, 29, 1, 24, 32, 582832);
    l.src_workload = Some("curl-759db5669d-dl5xw".into());
    l.src_namespace = Some("default".into());
    l.src_identity = Some("spiffe://cluster.local/ns/default/sa/curl".into());
    l.dst_hbone_addr = Some("240.240.0.4:80".into());
    l.dst_service = Some("httpbin.org".into());
    l.dst_workload = Some("egress-gateway-55767f4d4d-gkd5q".into());
    l.dst_namespace = Some("common-infrastructure".into());
    l.dst_identity =
        Some("spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway".into());
    l.bytes_sent = 78;
    l.bytes_recv = 285;
    l.duration = Duration::from_millis(404);
    l
}

#[test]
fn telemetry_connection_lines_are_ztunnel_text() {
    assert_eq!(passthrough().format_text(), SEED_PASSTHROUGH);
    assert_eq!(via_waypoint().format_text(), SEED_WAYPOINT);
}

#[test]
fn telemetry_error_variant_and_quoting() {
    let mut l = passthrough();
    l.error = Some("connection refused: upstream \"httpbin.org\" down".into());
    let line = l.format_text();
    assert!(
        line.starts_with("2024-10-29T02:10:57.056612Z error access connection complete src.addr=")
    );
    // Same fields, `error` last, quotes escaped as tracing prints them.
    let expected_tail =
        r#" duration="616ms" error="connection refused: upstream \"httpbin.org\" down""#;
    assert!(line.ends_with(expected_tail), "{line}");
    let info_part = SEED_PASSTHROUGH.split_once(" info access ").unwrap().1;
    assert!(line.contains(info_part), "{line}");
}

#[test]
fn telemetry_connection_json_keeps_order() {
    let line = via_waypoint().format_json();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "info");
    assert_eq!(v["scope"], "access");
    assert_eq!(v["message"], "connection complete");
    assert_eq!(v["time"], "2024-10-29T01:24:32.582832Z");
    assert_eq!(
        v["src.identity"],
        "spiffe://cluster.local/ns/default/sa/curl"
    );
    assert_eq!(v["dst.hbone_addr"], "240.240.0.4:80");
    assert_eq!(v["bytes_sent"], 78);
    assert_eq!(v["duration"], "404ms");
    assert!(v.get("error").is_none());
    // The keys appear in ztunnel's order (the text line's order).
    let keys = [
        "\"src.addr\"",
        "\"src.workload\"",
        "\"src.namespace\"",
        "\"src.identity\"",
        "\"dst.addr\"",
        "\"dst.hbone_addr\"",
        "\"dst.service\"",
        "\"dst.workload\"",
        "\"dst.namespace\"",
        "\"dst.identity\"",
        "\"direction\"",
        "\"bytes_sent\"",
        "\"bytes_recv\"",
        "\"duration\"",
    ];
    let pos: Vec<usize> = keys.iter().map(|k| line.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{line}");
    // Absent fields are omitted.
    let p = passthrough().format_json();
    assert!(
        !p.contains("src.identity") && !p.contains("dst.hbone_addr"),
        "{p}"
    );
    let mut e = passthrough();
    e.error = Some("boom".into());
    let v: serde_json::Value = serde_json::from_str(&e.format_json()).unwrap();
    assert_eq!(v["level"], "error");
    assert_eq!(v["error"], "boom");
}

fn seed_request() -> RequestLog {
    let mut r = RequestLog::new("HEAD", "/get", "HTTP/1.1");
    r.start_time = at(2024, 10, 29, 1, 24, 32, 608_412);
    r.response_code = 200;
    r.response_code_details = Some("via_upstream".into());
    r.duration = Duration::from_millis(392);
    r.upstream_service_time = Some(Duration::from_millis(392));
    r.user_agent = Some("curl/8.7.1".into());
    r.request_id = Some("b3c2eff1-b545-4dbf-b1e3-01dd203ded93".into());
    r.authority = Some("httpbin.org".into());
    r.upstream_host = Some(addr("34.228.248.173:80"));
    r.upstream_cluster = Some("inbound-vip|80|http|httpbin.org".into());
    r.upstream_local_address = Some(addr("10.244.1.18:49894"));
    r.downstream_local_address = Some(addr("240.240.0.4:80"));
    r.downstream_remote_address = Some(addr("10.244.1.19:55866"));
    r.route_name = Some("d".into());
    r
}

#[test]
fn telemetry_envoy_request_line_matches_seed() {
    assert_eq!(seed_request().format_text(), SEED_ENVOY);
}

#[test]
fn telemetry_envoy_denial_names_the_policy() {
    let mut r = seed_request();
    r.method = "GET".into();
    r.path = "/ip".into();
    r.response_code = 403;
    r.response_flags = Some("-".into());
    r.response_code_details = Some(RequestLog::rbac_denied_details(Some((
        "common-infrastructure",
        "httpbin",
        0,
    ))));
    r.upstream_host = None;
    r.upstream_local_address = None;
    r.upstream_service_time = None;
    r.bytes_sent = 19;
    let line = r.format_text();
    let fields: Vec<&str> = line.split(' ').collect();
    // [time] "GET /ip HTTP/1.1" CODE FLAGS DETAILS ...
    assert_eq!(fields[4], "403");
    assert_eq!(
        fields[6],
        "rbac_access_denied_matched_policy[ns[common-infrastructure]-policy[httpbin]-rule[0]]"
    );
    assert!(
        line.contains(r#""httpbin.org" "-" inbound-vip|80|http|httpbin.org - 240.240.0.4:80"#),
        "{line}"
    );
    assert_eq!(
        RequestLog::rbac_denied_details(None),
        "rbac_access_denied_matched_policy[none]"
    );
    // Spaces in details never split the line.
    r.response_code_details = Some("upstream reset before headers".into());
    assert!(r.format_text().contains(" upstream_reset_before_headers "));
    let v: serde_json::Value = serde_json::from_str(&seed_request().format_json()).unwrap();
    assert_eq!(v["start_time"], "2024-10-29T01:24:32.608Z");
    assert_eq!(v["upstream_cluster"], "inbound-vip|80|http|httpbin.org");
    assert_eq!(v["response_flags"], serde_json::Value::Null);
}

#[derive(Clone, Default)]
struct Sink(Arc<std::sync::Mutex<Vec<u8>>>);
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn telemetry_logger_writes_lines_in_the_chosen_format() {
    assert_eq!("json".parse::<LogFormat>().unwrap(), LogFormat::Json);
    let e = "yaml".parse::<LogFormat>().unwrap_err().to_string();
    assert!(e.contains("yaml"), "{e}");
    let sink = Sink::default();
    let logger = AccessLogger::to_writer(LogFormat::Text, Box::new(sink.clone()));
    logger.connection(&passthrough());
    logger.request(&seed_request());
    let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    assert_eq!(out, format!("{SEED_PASSTHROUGH}\n{SEED_ENVOY}\n"));
    let sink = Sink::default();
    let logger = AccessLogger::to_writer(LogFormat::Json, Box::new(sink.clone()));
    logger.connection(&passthrough());
    let out = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
    let v: serde_json::Value = serde_json::from_str(out.trim_end()).unwrap();
    assert_eq!(v["src.workload"], "curl-759db5669d-dl5xw");
}

fn sample_labels() -> ConnectionLabels {
    ConnectionLabels {
        reporter: Reporter::Source,
        source_workload: "curl".into(),
        source_workload_namespace: "default".into(),
        source_principal: "spiffe://cluster.local/ns/default/sa/curl".into(),
        destination_service: "httpbin.org".into(),
        destination_workload: "egress-gateway".into(),
        destination_workload_namespace: "common-infrastructure".into(),
        destination_principal: "spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway"
            .into(),
        request_protocol: "tcp".into(),
        response_flags: String::new(),
    }
}

fn metric_line<'a>(text: &'a str, name: &str, must_contain: &str) -> Option<&'a str> {
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(must_contain))
}

#[test]
fn telemetry_metrics_connection_requests_and_kernel_counters() {
    let steered = Arc::new(AtomicU64::new(7));
    let mut b = Metrics::builder();
    let s = steered.clone();
    b.register_counter_fn(
        "shunt_kernel_steered_connections",
        "Connections steered by the kernel",
        move || s.load(Ordering::Relaxed),
    );
    let m = b.build();

    let rec = m.connection(sample_labels());
    rec.sent(78);
    rec.sent(2);
    rec.received(230);
    rec.close(false, None);
    let failed = m.connection(sample_labels());
    failed.close(true, Some("UF"));

    let mut req = RequestLabels {
        connection: sample_labels(),
        response_code: 403,
    };
    req.connection.request_protocol = "http".into();
    req.connection.reporter = Reporter::Destination;
    m.record_request(&req, 3.0);
    m.record_request(&req, 700.0);

    let text = m.encode().unwrap();
    let labels = r#"reporter="source",source_workload="curl",source_workload_namespace="default",source_principal="spiffe://cluster.local/ns/default/sa/curl",destination_service="httpbin.org",destination_workload="egress-gateway",destination_workload_namespace="common-infrastructure",destination_principal="spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway",request_protocol="tcp",response_flags="-""#;
    assert!(
        text.contains(&format!("istio_tcp_sent_bytes_total{{{labels}}} 80")),
        "{text}"
    );
    assert!(
        text.contains(&format!("istio_tcp_received_bytes_total{{{labels}}} 230")),
        "{text}"
    );
    assert!(
        text.contains(&format!("istio_tcp_connections_opened_total{{{labels}}} 2")),
        "{text}"
    );
    assert!(
        text.contains(&format!("istio_tcp_connections_closed_total{{{labels}}} 1")),
        "{text}"
    );
    let uf = metric_line(
        &text,
        "istio_tcp_connections_failed_total",
        r#"response_flags="UF""#,
    )
    .expect("failed counter with UF");
    assert!(uf.ends_with(" 1"), "{uf}");
    let r = metric_line(&text, "istio_requests_total", r#"response_code="403""#).expect("requests");
    assert!(
        r.contains(r#"reporter="destination""#) && r.ends_with(" 2"),
        "{r}"
    );
    let c = metric_line(
        &text,
        "istio_request_duration_milliseconds_count",
        r#"response_code="403""#,
    )
    .expect("histogram");
    assert!(c.ends_with(" 2"), "{c}");
    let b5 = metric_line(
        &text,
        "istio_request_duration_milliseconds_bucket",
        r#"le="5.0""#,
    )
    .unwrap();
    assert!(b5.ends_with(" 1"), "{b5}");
    for name in [
        "istio_dns_requests_total",
        "istio_dns_upstream_requests_total",
        "istio_dns_upstream_failures_total",
    ] {
        assert!(text.contains(&format!("{name} 0")), "{name}: {text}");
    }
    // Kernel counter read at scrape time.
    assert!(
        text.contains("shunt_kernel_steered_connections_total 7"),
        "{text}"
    );
    steered.store(9, Ordering::Relaxed);
    assert!(m
        .encode()
        .unwrap()
        .contains("shunt_kernel_steered_connections_total 9"));
    // Empty labels are exported as "unknown".
    let rec = m.connection(ConnectionLabels::default());
    rec.close(false, None);
    let t = m.encode().unwrap();
    assert!(
        t.contains(
            r#"istio_tcp_connections_closed_total{reporter="source",source_workload="unknown""#
        ),
        "{t}"
    );
}

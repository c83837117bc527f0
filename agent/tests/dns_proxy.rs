//! The DNS proxy on loopback, driven by the real `dig` and by hickory-proto
//! messages on raw sockets, with a small authoritative upstream server
//! started by each test on its own loopback port.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, TXT};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use shunt_agent::dns::{DnsConfig, DnsProxy, HostTable, SharedHostTable};
use shunt_agent::telemetry::{DnsMetrics, Metrics};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

// ---------------------------------------------------------------- upstream

/// What the test upstream was asked: (lower-case name, type, over TCP).
type Seen = Arc<Mutex<Vec<(String, RecordType, bool)>>>;

struct Upstream {
    addr: SocketAddr,
    seen: Seen,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Upstream {
    fn asked(&self, name: &str, rtype: RecordType) -> Vec<bool> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, t, _)| n == name && *t == rtype)
            .map(|(_, _, tcp)| *tcp)
            .collect()
    }
}

const BIG_TXT_RECORDS: usize = 60;

fn lower(name: &Name) -> String {
    name.to_ascii().trim_end_matches('.').to_ascii_lowercase()
}

/// A tiny authoritative server for `*.test` and a TXT for httpbin.org.
fn upstream_answer(req: &Message, limit: usize) -> Vec<u8> {
    let q = &req.queries[0];
    let name = lower(q.name());
    let mut resp = Message::response(req.id, OpCode::Query);
    resp.metadata.authoritative = true;
    resp.metadata.recursion_desired = req.recursion_desired;
    resp.add_query(q.clone());
    if let Some(e) = &req.edns {
        let mut out = Edns::new();
        out.set_max_payload(e.max_payload().max(512));
        resp.set_edns(out);
    }
    let qn = q.name().clone();
    match (name.as_str(), q.query_type()) {
        ("example.test", RecordType::A) => {
            resp.add_answer(Record::from_rdata(
                qn,
                300,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 1))),
            ));
        }
        ("example.test", _) => {}
        ("big.test", RecordType::TXT) => {
            for i in 0..BIG_TXT_RECORDS {
                let s = format!("record-{i:03}-{}", "x".repeat(60));
                resp.add_answer(Record::from_rdata(
                    qn.clone(),
                    300,
                    RData::TXT(TXT::new(vec![s])),
                ));
            }
        }
        ("httpbin.org", RecordType::TXT) => {
            resp.add_answer(Record::from_rdata(
                qn,
                300,
                RData::TXT(TXT::new(vec!["from-upstream".into()])),
            ));
        }
        _ => resp.metadata.response_code = ResponseCode::NXDomain,
    }
    let bytes = resp.to_vec().unwrap();
    if bytes.len() <= limit {
        return bytes;
    }
    resp.answers.clear();
    resp.metadata.truncation = true;
    resp.to_vec().unwrap()
}

async fn start_upstream() -> Upstream {
    // UDP and TCP on one port: the ephemeral UDP port's TCP twin may be
    // taken by another test's socket, so pick again until both bind.
    let (udp, tcp, addr) = {
        let mut tries = 0;
        loop {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            match TcpListener::bind(addr).await {
                Ok(tcp) => break (Arc::new(udp), tcp, addr),
                Err(_) if tries < 50 => tries += 1,
                Err(e) => panic!("no port free for both UDP and TCP: {e}"),
            }
        }
    };
    let seen: Seen = Arc::default();
    let s = seen.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (n, peer) = udp.recv_from(&mut buf).await.unwrap();
            let req = Message::from_vec(&buf[..n]).unwrap();
            let q = &req.queries[0];
            s.lock()
                .unwrap()
                .push((lower(q.name()), q.query_type(), false));
            let limit = req
                .edns
                .as_ref()
                .map(|e| e.max_payload().max(512))
                .unwrap_or(512);
            udp.send_to(&upstream_answer(&req, limit as usize), peer)
                .await
                .unwrap();
        }
    });
    let s = seen.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.unwrap();
            let s = s.clone();
            tokio::spawn(async move {
                loop {
                    let mut len = [0u8; 2];
                    if stream.read_exact(&mut len).await.is_err() {
                        return;
                    }
                    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
                    stream.read_exact(&mut buf).await.unwrap();
                    let req = Message::from_vec(&buf).unwrap();
                    let q = &req.queries[0];
                    s.lock()
                        .unwrap()
                        .push((lower(q.name()), q.query_type(), true));
                    let resp = upstream_answer(&req, usize::MAX);
                    let mut out = (resp.len() as u16).to_be_bytes().to_vec();
                    out.extend_from_slice(&resp);
                    stream.write_all(&out).await.unwrap();
                }
            });
        }
    });
    Upstream {
        addr,
        seen,
        tasks: vec![udp_task, tcp_task],
    }
}

// ------------------------------------------------------------------ proxy

const HTTPBIN_V4: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 4);
const HTTPBIN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 0, 4);
const MANY_VIPS: u8 = 100;

fn table() -> HostTable {
    let many: Vec<Ipv4Addr> = (1..=MANY_VIPS)
        .map(|i| Ipv4Addr::new(240, 240, 1, i))
        .collect();
    HostTable::from_entries([
        ("httpbin.org", vec![HTTPBIN_V4], vec![HTTPBIN_V6]),
        ("v4only.test", vec![Ipv4Addr::new(240, 240, 0, 5)], vec![]),
        ("many.test", many, vec![]),
    ])
    .unwrap()
}

struct Harness {
    proxy: DnsProxy,
    hosts: SharedHostTable,
    metrics: DnsMetrics,
    full: Arc<Metrics>,
}

impl Harness {
    fn port(&self) -> u16 {
        self.proxy.local_addrs()[0].port()
    }
    fn addr(&self) -> SocketAddr {
        self.proxy.local_addrs()[0]
    }
}

async fn start_proxy(upstreams: Vec<SocketAddr>, timeout: Duration) -> Harness {
    let hosts = table().into_shared();
    let full = Metrics::builder().build();
    let metrics = full.dns();
    let mut cfg = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], upstreams);
    cfg.upstream_timeout = timeout;
    let proxy = DnsProxy::start(cfg, hosts.clone(), metrics.clone())
        .await
        .unwrap();
    Harness {
        proxy,
        hosts,
        metrics,
        full,
    }
}

// -------------------------------------------------------------------- dig

struct Dig {
    out: String,
}

impl Dig {
    fn status(&self) -> &str {
        let l = self
            .out
            .lines()
            .find(|l| l.contains("->>HEADER<<-"))
            .expect("no dig header");
        l.split("status: ")
            .nth(1)
            .unwrap()
            .split(',')
            .next()
            .unwrap()
    }
    fn flags(&self) -> Vec<&str> {
        let l = self
            .out
            .lines()
            .rfind(|l| l.starts_with(";; flags:"))
            .expect("no flags");
        l[";; flags:".len()..]
            .split(';')
            .next()
            .unwrap()
            .split_whitespace()
            .collect()
    }
    /// (name, ttl, type, data) of the answer section.
    fn answers(&self) -> Vec<(String, u32, String, String)> {
        let mut lines = self
            .out
            .lines()
            .skip_while(|l| !l.starts_with(";; ANSWER SECTION:"));
        lines.next();
        lines
            .take_while(|l| !l.trim().is_empty())
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (
                    f[0].to_string(),
                    f[1].parse().unwrap(),
                    f[3].to_string(),
                    f[4..].join(" "),
                )
            })
            .collect()
    }
    fn edns_udp(&self) -> Option<u16> {
        let l = self.out.lines().find(|l| l.starts_with("; EDNS:"))?;
        Some(l.split("udp: ").nth(1)?.trim().parse().unwrap())
    }
}

async fn dig(port: u16, args: &[&str]) -> Dig {
    let out = tokio::process::Command::new("dig")
        .arg("@127.0.0.1")
        .arg("-p")
        .arg(port.to_string())
        .args(["+tries=1", "+time=5"])
        .args(args)
        .output()
        .await
        .expect("running dig (dnsutils)");
    let out = String::from_utf8_lossy(&out.stdout).into_owned();
    Dig { out }
}

// ---------------------------------------------------------- raw messages

fn query_msg(name: &str, rtype: RecordType, edns: Option<u16>) -> Message {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
    if let Some(size) = edns {
        let mut e = Edns::new();
        e.set_max_payload(size);
        m.set_edns(e);
    }
    m
}

async fn udp_raw(addr: SocketAddr, bytes: &[u8]) -> (Message, usize) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.connect(addr).await.unwrap();
    sock.send(bytes).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
        .await
        .expect("no answer from the proxy")
        .unwrap();
    (Message::from_vec(&buf[..n]).unwrap(), n)
}

async fn udp_exchange(addr: SocketAddr, m: &Message) -> (Message, usize) {
    udp_raw(addr, &m.to_vec().unwrap()).await
}

// ------------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_known_host_a_and_aaaa_are_authoritative_vips() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    let d = dig(h.port(), &["httpbin.org", "A"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert!(d.flags().contains(&"aa"), "{}", d.out);
    assert_eq!(
        d.answers(),
        vec![("httpbin.org.".into(), 30, "A".into(), "240.240.0.4".into())],
        "{}",
        d.out
    );

    let d = dig(h.port(), &["httpbin.org", "AAAA"]).await;
    assert!(d.flags().contains(&"aa"), "{}", d.out);
    assert_eq!(
        d.answers(),
        vec![("httpbin.org.".into(), 30, "AAAA".into(), "2001:2::4".into())]
    );

    // Case-insensitive; the answer keeps the client's spelling.
    let d = dig(h.port(), &["HttpBin.ORG", "A"]).await;
    assert_eq!(
        d.answers(),
        vec![("HttpBin.ORG.".into(), 30, "A".into(), "240.240.0.4".into())]
    );

    // Without the trailing dot (a non-FQDN name) as well.
    let m = query_msg("httpbin.org", RecordType::A, None);
    assert!(!m.queries[0].name().is_fqdn());
    let (resp, _) = udp_exchange(h.addr(), &m).await;
    assert!(resp.authoritative);
    assert_eq!(resp.answers.len(), 1);
    assert_eq!(resp.answers[0].data, RData::A(A(HTTPBIN_V4)));

    assert!(
        up.seen.lock().unwrap().is_empty(),
        "known host must not be forwarded"
    );
    assert_eq!(h.metrics.requests.get(), 4);
    assert_eq!(h.metrics.upstream_requests.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_other_family_of_known_host_is_empty_noerror() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;
    let d = dig(h.port(), &["v4only.test", "AAAA"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert!(d.flags().contains(&"aa"), "{}", d.out);
    assert!(d.answers().is_empty(), "{}", d.out);
    assert!(d.out.contains("ANSWER: 0"), "{}", d.out);
    assert!(up.asked("v4only.test", RecordType::AAAA).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_unknown_names_and_other_types_are_forwarded() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    let d = dig(h.port(), &["example.test", "A"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert_eq!(
        d.answers(),
        vec![("example.test.".into(), 300, "A".into(), "192.0.2.1".into())]
    );
    assert_eq!(up.asked("example.test", RecordType::A), vec![false]);

    let d = dig(h.port(), &["nothing.test", "A"]).await;
    assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);

    // A known host with another record type goes upstream.
    let d = dig(h.port(), &["httpbin.org", "TXT"]).await;
    assert_eq!(
        d.answers(),
        vec![(
            "httpbin.org.".into(),
            300,
            "TXT".into(),
            "\"from-upstream\"".into()
        )],
        "{}",
        d.out
    );

    // A search-domain expansion of a ServiceEntry host is not that host.
    let d = dig(h.port(), &["httpbin.org.default.svc.cluster.local", "A"]).await;
    assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
    assert_eq!(
        up.asked("httpbin.org.default.svc.cluster.local", RecordType::A)
            .len(),
        1
    );

    assert_eq!(h.metrics.upstream_requests.get(), 4);
    assert_eq!(h.metrics.upstream_failures.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_upstream_down_gives_servfail() {
    // Nothing listening (ICMP port unreachable) ...
    let closed = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    // ... and a resolver that never answers (timeout).
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let h = start_proxy(
        vec![closed, silent.local_addr().unwrap()],
        Duration::from_millis(300),
    )
    .await;

    let d = dig(h.port(), &["example.test", "A"]).await;
    assert_eq!(d.status(), "SERVFAIL", "{}", d.out);
    assert_eq!(h.metrics.upstream_requests.get(), 2);
    assert_eq!(h.metrics.upstream_failures.get(), 2);

    // Known hosts keep working without any upstream.
    let d = dig(h.port(), &["httpbin.org", "A"]).await;
    assert_eq!(d.status(), "NOERROR", "{}", d.out);

    let text = h.full.encode().unwrap();
    assert!(
        text.contains("istio_dns_upstream_failures_total 2"),
        "{text}"
    );
    assert!(
        text.contains("istio_dns_upstream_requests_total 2"),
        "{text}"
    );
    assert!(text.contains("istio_dns_requests_total 2"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_tcp_answers_and_several_queries_per_connection() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    let d = dig(h.port(), &["+tcp", "httpbin.org", "A"]).await;
    assert!(d.flags().contains(&"aa"), "{}", d.out);
    assert_eq!(
        d.answers(),
        vec![("httpbin.org.".into(), 30, "A".into(), "240.240.0.4".into())]
    );
    let d = dig(h.port(), &["+tcp", "example.test", "A"]).await;
    assert_eq!(
        d.answers(),
        vec![("example.test.".into(), 300, "A".into(), "192.0.2.1".into())]
    );

    // Three queries, one connection, answers in order.
    let mut s = TcpStream::connect(h.addr()).await.unwrap();
    let qs = [
        query_msg("httpbin.org.", RecordType::A, None),
        query_msg("example.test.", RecordType::A, None),
        query_msg("httpbin.org.", RecordType::AAAA, None),
    ];
    for q in &qs {
        let b = q.to_vec().unwrap();
        s.write_all(&(b.len() as u16).to_be_bytes()).await.unwrap();
        s.write_all(&b).await.unwrap();
    }
    for q in &qs {
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.unwrap();
        let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut buf).await.unwrap();
        let r = Message::from_vec(&buf).unwrap();
        assert_eq!(r.id, q.id);
        assert_eq!(r.answers.len(), 1, "{r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_big_answers_truncate_over_udp_and_complete_over_tcp() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    // Local answer: 100 VIPs do not fit 1232 bytes.
    let (r, n) = udp_exchange(
        h.addr(),
        &query_msg("many.test.", RecordType::A, Some(1232)),
    )
    .await;
    assert!(r.truncation, "{r}");
    assert!(n <= 1232);
    assert!(r.answers.is_empty());
    assert!(r.edns.is_some(), "OPT kept in the truncated answer");
    // dig sees TC, retries over TCP by itself, and prints the full answer.
    let d = dig(h.port(), &["many.test", "A"]).await;
    assert!(
        d.out.contains("Truncated, retrying in TCP mode"),
        "{}",
        d.out
    );
    assert_eq!(d.answers().len(), MANY_VIPS as usize, "{}", d.out);
    assert!(d.flags().contains(&"aa"));
    assert!(!d.flags().contains(&"tc"));

    // Forwarded answer: the upstream truncates over UDP, the proxy retries
    // it over TCP, then truncates again for the client's UDP limit.
    let d = dig(h.port(), &["big.test", "TXT"]).await;
    assert!(
        d.out.contains("Truncated, retrying in TCP mode"),
        "{}",
        d.out
    );
    assert_eq!(d.status(), "NOERROR", "{}", d.out);
    assert_eq!(d.answers().len(), BIG_TXT_RECORDS, "{}", d.out);
    let asked = up.asked("big.test", RecordType::TXT);
    assert!(
        asked.contains(&false) && asked.contains(&true),
        "UDP then TCP upstream: {asked:?}"
    );
    // Over TCP from the start: never truncated.
    let d = dig(h.port(), &["+tcp", "big.test", "TXT"]).await;
    assert!(!d.flags().contains(&"tc"), "{}", d.out);
    assert!(!d.out.contains("Truncated"), "{}", d.out);
    assert_eq!(d.answers().len(), BIG_TXT_RECORDS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_formerr_and_notimp() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    // A response sent as a query.
    let mut m = query_msg("httpbin.org.", RecordType::A, None);
    m.metadata.message_type = MessageType::Response;
    let (r, _) = udp_exchange(h.addr(), &m).await;
    assert_eq!(r.response_code, ResponseCode::FormErr);
    assert_eq!(r.id, m.id);
    assert!(r.answers.is_empty());

    // Bytes that are not a DNS message past the header.
    let mut junk = m.to_vec().unwrap()[..12].to_vec();
    junk[2] = 0x01; // a query, RD
    junk[5] = 1; // claims one question, has none
    junk.extend_from_slice(&[0xff, 0xff, 0xff]);
    let (r, _) = udp_raw(h.addr(), &junk).await;
    assert_eq!(r.response_code, ResponseCode::FormErr);
    assert_eq!(r.message_type, MessageType::Response);
    assert_eq!(r.id, m.id);

    // Opcodes other than QUERY.
    for op in [OpCode::Status, OpCode::Notify, OpCode::Update] {
        let mut m = query_msg("httpbin.org.", RecordType::A, None);
        m.metadata.op_code = op;
        let (r, _) = udp_exchange(h.addr(), &m).await;
        assert_eq!(r.response_code, ResponseCode::NotImp, "{op:?}");
        assert_eq!(r.op_code, op);
    }
    // dig's own NOTIFY.
    let d = dig(h.port(), &["+opcode=notify", "httpbin.org", "SOA"]).await;
    assert_eq!(d.status(), "NOTIMP", "{}", d.out);
    assert!(up.seen.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_edns_payload_size_echoed() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    let d = dig(h.port(), &["+bufsize=1000", "httpbin.org", "A"]).await;
    assert_eq!(d.edns_udp(), Some(1000), "{}", d.out);
    // Capped at the proxy's maximum (1232), at least 512.
    let d = dig(h.port(), &["+bufsize=4096", "httpbin.org", "A"]).await;
    assert_eq!(d.edns_udp(), Some(1232), "{}", d.out);
    let (r, _) = udp_exchange(
        h.addr(),
        &query_msg("httpbin.org.", RecordType::A, Some(100)),
    )
    .await;
    assert_eq!(r.edns.as_ref().map(|e| e.max_payload()), Some(512));
    // No OPT in the query, none in the answer.
    let d = dig(h.port(), &["+noedns", "httpbin.org", "A"]).await;
    assert_eq!(d.edns_udp(), None, "{}", d.out);
    assert_eq!(d.answers().len(), 1);

    // Without EDNS the UDP limit is 512: 100 VIPs are truncated.
    let (r, n) = udp_exchange(h.addr(), &query_msg("many.test.", RecordType::A, None)).await;
    assert!(r.truncation && n <= 512 && r.edns.is_none());
    // A 20-VIP answer (~350 bytes) fits.
    h.hosts.store(Arc::new(
        HostTable::from_entries([(
            "twenty.test",
            (1..=20).map(|i| Ipv4Addr::new(240, 240, 2, i)).collect(),
            vec![],
        )])
        .unwrap(),
    ));
    let (r, _) = udp_exchange(h.addr(), &query_msg("twenty.test.", RecordType::A, None)).await;
    assert!(!r.truncation);
    assert_eq!(r.answers.len(), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_host_table_swap_is_live() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;

    let d = dig(h.port(), &["new.test", "A"]).await;
    assert_eq!(
        d.status(),
        "NXDOMAIN",
        "forwarded before the swap: {}",
        d.out
    );

    let entries: Vec<(String, Vec<Ipv4Addr>, Vec<Ipv6Addr>)> = vec![
        ("httpbin.org".into(), vec![HTTPBIN_V4], vec![HTTPBIN_V6]),
        (
            "New.Test.".into(),
            vec![Ipv4Addr::new(240, 240, 0, 9)],
            vec![],
        ),
    ];
    h.hosts
        .store(Arc::new(HostTable::from_entries(entries).unwrap()));

    let d = dig(h.port(), &["new.test", "A"]).await;
    assert!(d.flags().contains(&"aa"), "{}", d.out);
    assert_eq!(
        d.answers(),
        vec![("new.test.".into(), 30, "A".into(), "240.240.0.9".into())]
    );
    // Hosts dropped from the new table are forwarded again.
    let before = up.asked("v4only.test", RecordType::A).len();
    let d = dig(h.port(), &["v4only.test", "A"]).await;
    assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
    assert_eq!(up.asked("v4only.test", RecordType::A).len(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_concurrent_udp_queries_all_answered() {
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;
    let done = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..200 {
        let addr = h.addr();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let name = if i % 2 == 0 {
                "httpbin.org."
            } else {
                "example.test."
            };
            let (r, _) = udp_exchange(addr, &query_msg(name, RecordType::A, Some(1232))).await;
            assert_eq!(r.answers.len(), 1);
            done.fetch_add(1, Ordering::Relaxed);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(done.load(Ordering::Relaxed), 200);
    assert_eq!(h.metrics.requests.get(), 200);
    assert_eq!(h.metrics.upstream_requests.get(), 100);
}

#[tokio::test]
async fn dns_config_errors_are_named() {
    let hosts = HostTable::empty().into_shared();
    let m = DnsMetrics::default();
    let addr: SocketAddr = "127.0.0.1:5399".parse().unwrap();
    let e = DnsProxy::start(
        DnsConfig::new(vec![addr], vec![addr]),
        hosts.clone(),
        m.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    let e = DnsProxy::start(DnsConfig::new(vec![addr], vec![]), hosts, m)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("upstream"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_answers_a_host_only_to_namespaces_it_is_exported_to() {
    use shunt_agent::model::ExportTo;
    let up = start_upstream().await;
    let h = start_proxy(vec![up.addr], Duration::from_secs(2)).await;
    let only = |ns: &str| ExportTo {
        public: false,
        namespaces: [ns.to_string()].into(),
    };
    // The client (127.0.0.1) is a workload of namespace apps.
    h.hosts.store(Arc::new(
        HostTable::from_scoped(
            [
                (
                    "mine.test",
                    only("apps"),
                    vec![Ipv4Addr::new(240, 240, 0, 7)],
                    vec![],
                ),
                (
                    "theirs.test",
                    only("team"),
                    vec![Ipv4Addr::new(240, 240, 0, 8)],
                    vec![],
                ),
            ],
            [("127.0.0.1".parse().unwrap(), "apps".to_string())],
        )
        .unwrap(),
    ));
    for transport in ["+notcp", "+tcp"] {
        let d = dig(h.port(), &[transport, "mine.test", "A"]).await;
        assert_eq!(
            d.answers(),
            vec![("mine.test.".into(), 30, "A".into(), "240.240.0.7".into())],
            "{}",
            d.out
        );
        // Not exported to apps: no VIP, the query goes upstream.
        let before = up.asked("theirs.test", RecordType::A).len();
        let d = dig(h.port(), &[transport, "theirs.test", "A"]).await;
        assert_eq!(d.status(), "NXDOMAIN", "{}", d.out);
        assert_eq!(up.asked("theirs.test", RecordType::A).len(), before + 1);
    }
}

/// A handover: a successor's proxy binds the same address (SO_REUSEPORT)
/// with its own table; once the predecessor leaves the group, every query
/// (from many source ports, so many reuseport hashes, including one that
/// hashed to the predecessor before) reaches the successor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_a_predecessor_that_left_the_reuseport_group_gets_no_new_query() {
    const NEW_VIP: Ipv4Addr = Ipv4Addr::new(240, 240, 0, 9);
    let up = start_upstream().await;
    let old = start_proxy(vec![up.addr], Duration::from_secs(2)).await;
    let new_hosts = HostTable::from_entries([("httpbin.org", vec![NEW_VIP], vec![])])
        .unwrap()
        .into_shared();
    let new = DnsProxy::start(
        DnsConfig::new(vec![old.addr()], vec![up.addr]),
        new_hosts,
        Metrics::builder().build().dns(),
    )
    .await
    .unwrap();
    assert_eq!(new.local_addrs(), &[old.addr()]);
    // Which proxy answered: 240.240.0.4 is the predecessor's, .9 the
    // successor's.
    async fn ask(sock: &UdpSocket) -> bool {
        let m = query_msg("httpbin.org", RecordType::A, None);
        sock.send(&m.to_vec().unwrap()).await.unwrap();
        let mut buf = vec![0u8; 65535];
        let n = tokio::time::timeout(Duration::from_secs(10), sock.recv(&mut buf))
            .await
            .expect("no answer")
            .unwrap();
        let resp = Message::from_vec(&buf[..n]).unwrap();
        match &resp.answers[0].data {
            RData::A(a) if a.0 == HTTPBIN_V4 => true,
            RData::A(a) if a.0 == NEW_VIP => false,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    async fn client(addr: SocketAddr) -> UdpSocket {
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sock.connect(addr).await.unwrap();
        sock
    }
    // Both in the group: the kernel spreads clients over both sockets.
    let mut to_old = None;
    let mut from_new = 0;
    for _ in 0..200 {
        let c = client(old.addr()).await;
        if ask(&c).await {
            to_old.get_or_insert(c);
        } else {
            from_new += 1;
        }
    }
    let to_old = to_old.expect("no client hashed to the predecessor");
    assert!(from_new > 0, "no client hashed to the successor");
    assert!(ask(&to_old).await, "a client's 4-tuple keeps its socket");

    old.proxy.leave_reuseport_group().await;
    assert!(
        !ask(&to_old).await,
        "the predecessor's client now reaches the successor"
    );
    for _ in 0..200 {
        assert!(
            !ask(&client(old.addr()).await).await,
            "after leaving, only the successor answers"
        );
    }
    drop(new);
}

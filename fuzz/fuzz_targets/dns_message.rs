//! The DNS proxy's message handling: a client's query (any bytes) and, for
//! a forwarded query, the upstream's answer (any bytes). Input: flags byte
//! (bit 0: query over TCP; bits 1-2: the client, see [`client`]), u16
//! query length, the query, then the answer the upstream sends before a
//! well-formed one.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;
use shunt_agent::dns::{ClientTable, DnsConfig, HostTable};
use shunt_agent::model::ExportTo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::runtime::Runtime;

struct World {
    rt: Runtime,
    config: DnsConfig,
    hosts: HostTable,
    /// What the upstream answers first (the current input's tail).
    answer: Arc<Mutex<Vec<u8>>>,
}

/// The upstream answers each query twice over UDP: the input's bytes (with
/// the query's id, so they are considered), then the query echoed as a
/// response (so a rejected first answer does not wait out the timeout).
/// Over TCP it answers the input's bytes only.
fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let answer = Arc::new(Mutex::new(Vec::new()));
        let upstream = rt.block_on(async {
            let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let addr = udp.local_addr().unwrap();
            let tcp = TcpListener::bind(addr).await.unwrap();
            let a = answer.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65535];
                loop {
                    let Ok((n, from)) = udp.recv_from(&mut buf).await else {
                        continue;
                    };
                    let mut first = a.lock().unwrap().clone();
                    if first.len() >= 2 && n >= 2 {
                        first[..2].copy_from_slice(&buf[..2]);
                    }
                    let _ = udp.send_to(&first, from).await;
                    if n >= 3 {
                        buf[2] |= 0x80;
                        let _ = udp.send_to(&buf[..n], from).await;
                    }
                }
            });
            let a = answer.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((mut s, _)) = tcp.accept().await else {
                        continue;
                    };
                    let first = a.lock().unwrap().clone();
                    tokio::spawn(async move {
                        let mut len = [0u8; 2];
                        if s.read_exact(&mut len).await.is_err() {
                            return;
                        }
                        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                        if s.read_exact(&mut q).await.is_err() {
                            return;
                        }
                        let mut out = (first.len() as u16).to_be_bytes().to_vec();
                        out.extend_from_slice(&first);
                        let _ = s.write_all(&out).await;
                    });
                }
            });
            addr
        });
        let mut config = DnsConfig::new(vec!["127.0.0.1:0".parse().unwrap()], vec![upstream]);
        config.upstream_timeout = Duration::from_millis(200);
        config.clients = ClientTable::new([WORKLOAD.into()]).into_shared();
        let team_a = ExportTo::resolve(&[".".to_string()], "team-a", &[]);
        let hosts = HostTable::from_scoped(
            [
                (
                    "httpbin.org",
                    ExportTo::public(),
                    vec![Ipv4Addr::new(240, 240, 0, 1)],
                    vec!["2001:2::1".parse::<Ipv6Addr>().unwrap()],
                ),
                (
                    "api.example.com",
                    ExportTo::public(),
                    vec![Ipv4Addr::new(240, 240, 0, 2)],
                    vec![],
                ),
                // Seen by the workload's namespace only.
                (
                    "db.example.com",
                    team_a.clone(),
                    vec![Ipv4Addr::new(240, 240, 0, 3)],
                    vec![],
                ),
                // Names below a wildcard (DYNAMIC_DNS), and one more
                // specific wildcard for one namespace.
                (
                    "*.wild.example.com",
                    ExportTo::public(),
                    vec![Ipv4Addr::new(240, 240, 0, 4)],
                    vec!["2001:2::4".parse::<Ipv6Addr>().unwrap()],
                ),
                (
                    "*.a.wild.example.com",
                    team_a,
                    vec![Ipv4Addr::new(240, 240, 0, 5)],
                    vec![],
                ),
                // Many addresses: answers that need truncation.
                (
                    "big.example.com",
                    ExportTo::public(),
                    (0..200).map(|i| Ipv4Addr::new(240, 240, 1, i)).collect(),
                    (0..100u16)
                        .map(|i| Ipv6Addr::new(0x2001, 2, 0, 0, 0, 0, 1, i))
                        .collect(),
                ),
            ],
            [(IpAddr::from(WORKLOAD), "team-a".to_string())],
        )
        .unwrap();
        World {
            rt,
            config,
            hosts,
            answer,
        }
    })
}

/// The enrolled workload (namespace team-a) the proxy serves.
const WORKLOAD: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);

/// Who sends the query (flags bits 1-2), and whether the proxy serves it.
fn client(flags: u8) -> (IpAddr, bool) {
    match (flags >> 1) & 3 {
        0 => (Ipv4Addr::LOCALHOST.into(), true),
        1 => (WORKLOAD.into(), true),
        2 => (WORKLOAD.to_ipv6_mapped().into(), true),
        // Neither a workload nor the node: REFUSED, never forwarded.
        _ => (Ipv4Addr::new(192, 0, 2, 7).into(), false),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    let tcp = data[0] & 1 == 1;
    let (client, served) = client(data[0]);
    let qlen = (u16::from_be_bytes([data[1], data[2]]) as usize).min(data.len() - 3);
    let (query, answer) = data[3..].split_at(qlen);
    let w = world();
    *w.answer.lock().unwrap() = answer.to_vec();
    let resp = w.rt.block_on(shunt_agent::fuzzing::dns_message(
        &w.config, &w.hosts, query, !tcp, client,
    ));
    let Some(resp) = resp else {
        assert!(
            query.len() < 12,
            "only a query without a header goes unanswered"
        );
        return;
    };
    assert!(resp.len() >= 12, "an answer has at least a header");
    assert_eq!(resp[..2], query[..2], "the answer carries the query's id");
    assert!(resp[2] & 0x80 != 0, "the answer is a response");
    if !served {
        assert_eq!(resp.len(), 12, "REFUSED is a bare header");
        assert_eq!(resp[3] & 0x0f, 5, "an unknown client is REFUSED");
    }
    if !tcp {
        // Never more than the clamp (1232), whatever the client advertises.
        assert!(resp.len() <= 1232, "UDP answer of {} bytes", resp.len());
        if let Ok(q) = Message::from_vec(query) {
            let limit = q
                .edns
                .as_ref()
                .map_or(512, |e| e.max_payload().clamp(512, 1232));
            assert!(resp.len() <= limit as usize, "{} > {limit}", resp.len());
        }
    }
});

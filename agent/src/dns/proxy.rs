//! The proxy: listeners, local answers, forwarding.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn, Instrument};

use super::budget::{ForwardBudget, Permit};
use super::clients::{ClientTable, SharedClients};
use super::{DnsError, HostAddrs, SharedHostTable, SERVICE_ENTRY_TTL};
use crate::sockets::{Acceptor, ListenerName};
use crate::telemetry::{DnsDropLabels, DnsMetrics, LogLimit};

/// Plain inputs of the proxy.
#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Each address gets a UDP and a TCP listener on the same port (port 0:
    /// one ephemeral port shared by both).
    pub listen: Vec<SocketAddr>,
    /// Tried in order; the next one on timeout or failure.
    pub upstreams: Vec<SocketAddr>,
    /// Per upstream attempt (UDP exchange, or TCP exchange after TC).
    pub upstream_timeout: Duration,
    /// Largest UDP answer the proxy sends whatever the client advertises
    /// (1232: the DNS flag day 2020 value, safe from fragmentation).
    pub max_udp_payload: u16,
    /// A TCP client idle this long between queries (or this slow to send a
    /// query or read an answer) is disconnected.
    pub tcp_idle_timeout: Duration,
    /// TCP connections open at once per listener; beyond, new ones are
    /// closed at accept (clients fall back to UDP or retry).
    pub max_tcp_connections: usize,
    /// Queries waiting on an upstream resolver at once, all clients
    /// together (UDP and TCP); beyond, queries are dropped (the client
    /// retries) rather than queued without bound.
    pub max_inflight: usize,
    /// The same, per client address: one client's flood of names to forward
    /// cannot take the others' share. ServiceEntry answers take no budget.
    pub max_inflight_per_client: usize,
    /// Whom to serve (enrolled workloads, the node); others get REFUSED.
    pub clients: SharedClients,
}

impl DnsConfig {
    pub fn new(listen: Vec<SocketAddr>, upstreams: Vec<SocketAddr>) -> Self {
        DnsConfig {
            listen,
            upstreams,
            upstream_timeout: Duration::from_secs(2),
            max_udp_payload: 1232,
            tcp_idle_timeout: Duration::from_secs(10),
            max_tcp_connections: 256,
            max_inflight: 4096,
            max_inflight_per_client: DEFAULT_MAX_INFLIGHT_PER_CLIENT,
            clients: ClientTable::node_only().into_shared(),
        }
    }

    /// Fits the proxy's sockets into `fds`, its share of the process's
    /// open files ([`crate::sockets::load_share`]): a forwarded query
    /// holds one (its UDP socket, then its TCP one after TC, never both), a
    /// TCP client one. The defaults of [`DnsConfig::new`] are the most it
    /// takes; a smaller share shrinks the TCP budget to an eighth of it
    /// (across the listeners) and the forwards to the rest, and the
    /// per-client share to a quarter of the forwards unless `per_client`
    /// was given. Without this, 4,096 forwards and 512 TCP clients could
    /// take every fd of an agent under a limit of a few thousand.
    pub fn fit_fds(&mut self, fds: usize, per_client: Option<usize>) {
        let listeners = self.listen.len().max(1);
        self.max_tcp_connections = self.max_tcp_connections.min(fds / 8 / listeners).max(1);
        self.max_inflight = self
            .max_inflight
            .min(fds.saturating_sub(self.max_tcp_connections * listeners))
            .max(1);
        self.max_inflight_per_client = per_client.unwrap_or_else(|| {
            DEFAULT_MAX_INFLIGHT_PER_CLIENT
                .min(self.max_inflight / 4)
                .max(1)
        });
    }
}

/// Default of [`DnsConfig::max_inflight_per_client`] (when the fd share
/// allows, see [`DnsConfig::fit_fds`]): a pod's resolver
/// rarely has more than a few queries outstanding; 256 at a 2 s timeout
/// still forwards over 100 queries a second to a blackholed upstream.
pub const DEFAULT_MAX_INFLIGHT_PER_CLIENT: usize = 256;

/// Receive buffer of each UDP listener (the kernel caps it at
/// `net.core.rmem_max`): ~5,000 queries.
const UDP_RECV_BUFFER: usize = 4 << 20;

/// Smallest UDP payload any DNS client accepts (RFC 1035).
const MIN_UDP_PAYLOAD: u16 = 512;

struct Inner {
    hosts: SharedHostTable,
    upstreams: Vec<SocketAddr>,
    upstream_timeout: Duration,
    max_udp_payload: u16,
    tcp_idle_timeout: Duration,
    metrics: DnsMetrics,
    clients: SharedClients,
    budget: Arc<ForwardBudget>,
}

/// A running proxy; dropping it stops every listener.
#[derive(Debug)]
pub struct DnsProxy {
    local_addrs: Vec<SocketAddr>,
    /// The UDP listeners, kept to leave their SO_REUSEPORT group on a
    /// handover ([`DnsProxy::leave_reuseport_group`]).
    udp: Vec<Arc<UdpSocket>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DnsProxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl DnsProxy {
    /// Binds every listen address (UDP and TCP) and starts serving.
    pub async fn start(
        config: DnsConfig,
        hosts: SharedHostTable,
        metrics: DnsMetrics,
    ) -> Result<Self, DnsError> {
        if config.listen.is_empty() {
            return Err(DnsError::NoListenAddress);
        }
        if config.upstreams.is_empty() {
            return Err(DnsError::NoUpstream);
        }
        if let Some(u) = config.upstreams.iter().find(|u| config.listen.contains(u)) {
            return Err(DnsError::UpstreamIsSelf(*u));
        }
        let inner = Arc::new(Inner::new(&config, hosts, metrics));
        let mut local_addrs = Vec::new();
        let mut udp_socks = Vec::new();
        let mut tasks = Vec::new();
        for addr in &config.listen {
            let (udp, tcp) = bind_pair(*addr).await?;
            let local = udp.local_addr().map_err(|source| DnsError::Bind {
                proto: "udp",
                addr: *addr,
                source,
            })?;
            local_addrs.push(local);
            // One queue for every client: room for a burst of a flood so
            // that the others' packets are not dropped by the kernel before
            // the loop (which answers ServiceEntry names first) sees them.
            if let Err(e) = socket2::SockRef::from(&udp).set_recv_buffer_size(UDP_RECV_BUFFER) {
                debug!(error = %e, "SO_RCVBUF on the DNS listener");
            }
            let udp = Arc::new(udp);
            udp_socks.push(udp.clone());
            tasks.push(tokio::spawn(
                udp_loop(udp, inner.clone()).instrument(tracing::info_span!("dns_udp", %local)),
            ));
            let tcp_budget = Arc::new(Semaphore::new(config.max_tcp_connections.max(1)));
            tasks.push(tokio::spawn(
                tcp_loop(tcp, inner.clone(), tcp_budget)
                    .instrument(tracing::info_span!("dns_tcp", %local)),
            ));
        }
        Ok(DnsProxy {
            local_addrs,
            udp: udp_socks,
            tasks,
        })
    }

    /// Stops new UDP queries from reaching this proxy while it still
    /// answers those already queued: a successor's sockets have joined the
    /// SO_REUSEPORT group, and the kernel would otherwise keep hashing some
    /// clients' queries here until this proxy closes, dropping whatever is
    /// queued at that moment (a lookup lost across a handover). Each socket
    /// is connected to its own address: the reuseport selection skips
    /// connected UDP sockets, and no client's source matches that peer.
    pub async fn leave_reuseport_group(&self) {
        for (sock, addr) in self.udp.iter().zip(&self.local_addrs) {
            match sock.connect(addr).await {
                Ok(()) => {
                    info!(listen = %addr, "DNS listener left to the successor; answering what is queued")
                }
                Err(e) => {
                    warn!(listen = %addr, error = %e, "DNS listener could not leave the reuseport group; queries queued at exit are lost")
                }
            }
        }
    }

    /// The bound addresses (UDP and TCP share each one).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }
}

/// UDP and TCP on the same address and port. With port 0 the kernel picks
/// the UDP port; TCP may find it taken, so retry a few times.
async fn bind_pair(addr: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let attempts = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = crate::sockets::udp_socket(addr).map_err(|source| DnsError::Bind {
            proto: "udp",
            addr,
            source,
        })?;
        let port = udp
            .local_addr()
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr,
                source,
            })?
            .port();
        let tcp_addr = SocketAddr::new(addr.ip(), port);
        match crate::sockets::tcp_listener(tcp_addr) {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(source) => {
                last = Some(DnsError::Bind {
                    proto: "tcp",
                    addr: tcp_addr,
                    source,
                })
            }
        }
    }
    Err(last.unwrap_or(DnsError::NoListenAddress))
}

/// Lines an attacker can trigger per packet: at most one per interval
/// each, carrying the count since the previous line (the metrics have the
/// exact totals).
static DROP_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static REFUSED_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));
static SERVFAIL_LOG: LogLimit = LogLimit::new(Duration::from_secs(10));

async fn udp_loop(sock: Arc<UdpSocket>, inner: Arc<Inner>) {
    // One receive buffer for the listener; a forwarded query is copied out
    // into its own Vec for its task. Local answers are sent from here, so
    // they never wait behind forwarded queries.
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                debug!(error = %e, "udp recv");
                continue;
            }
        };
        let (req, limit) = match inner.prepare(&buf[..n], true, peer.ip()) {
            Step::Drop => continue,
            Step::Answer(resp) => {
                if let Err(e) = sock.send_to(&resp, peer).await {
                    debug!(peer = %crate::telemetry::LogAddr(peer), error = %e, "udp send");
                }
                continue;
            }
            Step::Forward { req, limit } => (req, limit),
        };
        let Some(permit) = inner.take_budget(peer.ip()) else {
            continue;
        };
        let query = buf[..n].to_vec();
        let sock = sock.clone();
        let inner = inner.clone();
        tokio::spawn(async move {
            let resp = inner.forward(&req, &query, limit).await;
            if let Err(e) = sock.send_to(&resp, peer).await {
                debug!(peer = %crate::telemetry::LogAddr(peer), error = %e, "udp send");
            }
            drop(permit);
        });
    }
}

async fn tcp_loop(listener: TcpListener, inner: Arc<Inner>, budget: Arc<Semaphore>) {
    let mut acceptor = Acceptor::new(ListenerName::DnsTcp);
    loop {
        let (stream, peer) = acceptor.accept(&listener).await;
        let Ok(permit) = budget.clone().try_acquire_owned() else {
            acceptor.refuse(stream, peer, "connection_limit");
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(
            async move {
                if let Err(e) = tcp_conn(stream, peer.ip(), &inner).await {
                    debug!(error = %e, "dns tcp connection");
                }
                drop(permit);
            }
            .instrument(
                tracing::debug_span!("dns_tcp_conn", peer = %crate::telemetry::LogAddr(peer)),
            ),
        );
    }
}

/// Several length-prefixed queries per connection (RFC 7766), answered in
/// order; TCP answers are never truncated.
async fn tcp_conn(mut stream: TcpStream, client: IpAddr, inner: &Inner) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(inner.tcp_idle_timeout, stream.read_exact(&mut len)).await {
            Err(_) => return Ok(()), // idle
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r?,
        };
        let len = u16::from_be_bytes(len) as usize;
        if len == 0 {
            return Ok(());
        }
        let mut query = vec![0u8; len];
        tokio::time::timeout(inner.tcp_idle_timeout, stream.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "partial query"))??;
        let resp = match inner.prepare(&query, false, client) {
            Step::Drop => return Ok(()),
            Step::Answer(resp) => resp,
            Step::Forward { req, limit } => {
                // Budget spent: close, as a UDP query is dropped; the
                // client retries.
                let Some(_permit) = inner.take_budget(client) else {
                    return Ok(());
                };
                inner.forward(&req, &query, limit).await
            }
        };
        let mut out = Vec::with_capacity(resp.len() + 2);
        out.extend_from_slice(&(resp.len() as u16).to_be_bytes());
        out.extend_from_slice(&resp);
        tokio::time::timeout(inner.tcp_idle_timeout, stream.write_all(&out))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "answer not read"))??;
    }
}

/// A header-only error answer for a message hickory could not parse: id and
/// opcode copied from the raw header.
fn raw_error(query: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut h = [0u8; 12];
    h[0] = query[0];
    h[1] = query[1];
    h[2] = 0x80 | (query[2] & 0x79); // QR, opcode, RD
    h[3] = u16::from(rcode) as u8 & 0x0f;
    h.to_vec()
}

/// The OPT record the answer carries when the query had one: payload size
/// echoed, clamped to [512, cap].
fn answer_edns(req: &Message, cap: u16) -> Option<Edns> {
    req.edns.as_ref().map(|e| {
        let mut out = Edns::new();
        out.set_max_payload(e.max_payload().clamp(MIN_UDP_PAYLOAD, cap));
        out.set_version(0);
        out
    })
}

/// What to do with one query, decided without waiting on anything.
enum Step {
    /// Not even a header to answer to.
    Drop,
    /// A local answer, an error or REFUSED.
    Answer(Vec<u8>),
    /// Ask the upstreams (after taking from the forwarding budget).
    Forward { req: Message, limit: usize },
}

impl Inner {
    fn new(config: &DnsConfig, hosts: SharedHostTable, metrics: DnsMetrics) -> Inner {
        Inner {
            hosts,
            upstreams: config.upstreams.clone(),
            upstream_timeout: config.upstream_timeout,
            max_udp_payload: config.max_udp_payload.max(MIN_UDP_PAYLOAD),
            tcp_idle_timeout: config.tcp_idle_timeout,
            metrics,
            clients: config.clients.clone(),
            budget: ForwardBudget::new(config.max_inflight, config.max_inflight_per_client),
        }
    }

    /// Checks the client, parses, answers ServiceEntry hosts (those
    /// `client` may see) and errors.
    fn prepare(&self, query: &[u8], udp: bool, client: IpAddr) -> Step {
        self.metrics.requests.inc();
        if query.len() < 12 {
            return Step::Drop;
        }
        if !self.clients.load().allows(client) {
            self.metrics.refused.inc();
            if let Some(suppressed) = REFUSED_LOG.allow() {
                info!(client = %client.to_canonical(), refused_since_last_line = suppressed, "DNS query from an address that is neither an enrolled workload nor the node; REFUSED");
            }
            return Step::Answer(raw_error(query, ResponseCode::Refused));
        }
        let req = match Message::from_vec(query) {
            Ok(m) => m,
            Err(e) => {
                debug!(error = %e, "unparsable DNS query");
                return Step::Answer(raw_error(query, ResponseCode::FormErr));
            }
        };
        let limit = if udp {
            req.edns
                .as_ref()
                .map(|e| e.max_payload().clamp(MIN_UDP_PAYLOAD, self.max_udp_payload))
                .unwrap_or(MIN_UDP_PAYLOAD) as usize
        } else {
            u16::MAX as usize
        };
        if req.message_type == MessageType::Response {
            return Step::Answer(self.error(&req, ResponseCode::FormErr, limit));
        }
        if req.op_code != OpCode::Query {
            return Step::Answer(self.error(&req, ResponseCode::NotImp, limit));
        }
        if req.queries.len() != 1 {
            return Step::Answer(self.error(&req, ResponseCode::FormErr, limit));
        }
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return Step::Answer(self.error(&req, ResponseCode::BADVERS, limit));
        }
        let q = &req.queries[0];
        if q.query_class() == DNSClass::IN
            && matches!(q.query_type(), RecordType::A | RecordType::AAAA)
        {
            let table = self.hosts.load();
            if let Some(addrs) = table.lookup_name(q.name(), Some(client)) {
                return Step::Answer(self.local_answer(&req, q, &addrs, limit));
            }
        }
        Step::Forward { req, limit }
    }

    /// A share of the forwarding budget, or `None` (counted, and logged as
    /// a periodic summary) when the client's or the total is spent.
    fn take_budget(&self, client: IpAddr) -> Option<Permit> {
        match self.budget.try_take(client) {
            Ok(p) => Some(p),
            Err(spent) => {
                self.metrics
                    .dropped
                    .get_or_create(&DnsDropLabels {
                        reason: spent.as_str(),
                        client: client.to_canonical().to_string(),
                    })
                    .inc();
                if let Some(suppressed) = DROP_LOG.allow() {
                    warn!(client = %client.to_canonical(), budget = spent.as_str(), dropped_since_last_line = suppressed, "DNS forwarding budget spent; dropping queries (counts in shunt_dns_dropped_total)");
                }
                None
            }
        }
    }

    fn base_response(&self, req: &Message, rcode: ResponseCode) -> Message {
        let mut resp = Message::response(req.id, req.op_code);
        resp.metadata.response_code = rcode;
        resp.metadata.recursion_desired = req.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.metadata.checking_disabled = req.checking_disabled;
        if req.op_code == OpCode::Query {
            resp.add_queries(req.queries.iter().cloned());
        }
        if let Some(edns) = answer_edns(req, self.max_udp_payload) {
            resp.set_edns(edns);
        }
        resp
    }

    fn error(&self, req: &Message, rcode: ResponseCode, limit: usize) -> Vec<u8> {
        fit(self.base_response(req, rcode), limit)
    }

    /// Authoritative answer from the host table. The other family of a
    /// known host is an empty NOERROR (the name exists), never NXDOMAIN.
    fn local_answer(&self, req: &Message, q: &Query, addrs: &HostAddrs, limit: usize) -> Vec<u8> {
        let mut resp = self.base_response(req, ResponseCode::NoError);
        resp.metadata.authoritative = true;
        let name = q.name().clone();
        match q.query_type() {
            RecordType::A => {
                for ip in &addrs.v4 {
                    resp.add_answer(Record::from_rdata(
                        name.clone(),
                        SERVICE_ENTRY_TTL,
                        RData::A(A(*ip)),
                    ));
                }
            }
            _ => {
                for ip in &addrs.v6 {
                    resp.add_answer(Record::from_rdata(
                        name.clone(),
                        SERVICE_ENTRY_TTL,
                        RData::AAAA(AAAA(*ip)),
                    ));
                }
            }
        }
        fit(resp, limit)
    }

    /// Forwards the client's bytes unchanged to each upstream in turn; UDP
    /// first, TCP when the upstream truncated. All failed → SERVFAIL.
    async fn forward(&self, req: &Message, raw: &[u8], limit: usize) -> Vec<u8> {
        for &upstream in &self.upstreams {
            self.metrics.upstream_requests.inc();
            let mut answer =
                match tokio::time::timeout(self.upstream_timeout, exchange_udp(upstream, raw, req))
                    .await
                {
                    Ok(Ok(a)) => a,
                    Ok(Err(e)) => {
                        self.metrics.upstream_failures.inc();
                        debug!(%upstream, error = %e, "upstream udp exchange failed");
                        continue;
                    }
                    Err(_) => {
                        self.metrics.upstream_failures.inc();
                        debug!(%upstream, "upstream udp exchange timed out");
                        continue;
                    }
                };
            if answer.1.truncation {
                self.metrics.upstream_requests.inc();
                match tokio::time::timeout(self.upstream_timeout, exchange_tcp(upstream, raw, req))
                    .await
                {
                    Ok(Ok(a)) => answer = a,
                    Ok(Err(e)) => {
                        // The truncated UDP answer is still a valid answer:
                        // the client sees TC and retries over TCP itself.
                        self.metrics.upstream_failures.inc();
                        debug!(%upstream, error = %e, "upstream tcp retry failed");
                    }
                    Err(_) => {
                        self.metrics.upstream_failures.inc();
                        debug!(%upstream, "upstream tcp retry timed out");
                    }
                }
            }
            let (bytes, msg) = answer;
            if bytes.len() <= limit {
                return bytes;
            }
            return fit(msg, limit);
        }
        if let Some(suppressed) = SERVFAIL_LOG.allow() {
            warn!(name = %req.queries[0].name(), servfail_since_last_line = suppressed, "every upstream resolver failed; SERVFAIL");
        }
        self.error(req, ResponseCode::ServFail, limit)
    }
}

/// The message handling without listeners, for the fuzz targets (`fuzz/`):
/// one query from `client` as a listener received it (`udp`: over UDP),
/// forwarded to `config.upstreams` unless answered locally; `None` when
/// dropped.
pub(crate) async fn handle_message(
    config: &DnsConfig,
    hosts: SharedHostTable,
    query: &[u8],
    udp: bool,
    client: IpAddr,
) -> Option<Vec<u8>> {
    let inner = Inner::new(config, hosts, DnsMetrics::default());
    match inner.prepare(query, udp, client) {
        Step::Drop => None,
        Step::Answer(resp) => Some(resp),
        Step::Forward { req, limit } => {
            let _permit = inner.take_budget(client)?;
            Some(inner.forward(&req, query, limit).await)
        }
    }
}

/// Serializes `resp`; if it exceeds `limit`, sends header, question and OPT
/// only, with TC set, so the client retries over TCP.
fn fit(mut resp: Message, limit: usize) -> Vec<u8> {
    match resp.to_vec() {
        Ok(bytes) if bytes.len() <= limit => return bytes,
        Ok(_) => {}
        Err(e) => warn!(error = %e, "serializing DNS answer"),
    }
    resp.answers.clear();
    resp.authorities.clear();
    resp.additionals.clear();
    resp.signature = None;
    resp.metadata.truncation = true;
    match resp.to_vec() {
        Ok(b) => b,
        Err(_) => {
            // Only reachable with a pathological question; send a header.
            let mut h = [0u8; 12];
            h[..2].copy_from_slice(&resp.id.to_be_bytes());
            h[2] = 0x82; // QR, TC
            h[3] = 0x02; // SERVFAIL
            h.to_vec()
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("upstream answer does not match the query")]
    Mismatch,
    #[error("upstream answer too large")]
    TooLarge,
}

/// Is `resp` the answer to `req` (id, QR, same question)? Anything else is
/// a stale or spoofed packet.
fn matches(req: &Message, resp: &Message) -> bool {
    resp.id == req.id
        && resp.message_type == MessageType::Response
        && (resp.queries.is_empty()
            || (resp.queries.len() == req.queries.len()
                && resp.queries.iter().zip(&req.queries).all(|(a, b)| {
                    a.query_type() == b.query_type()
                        && a.query_class() == b.query_class()
                        && a.name() == b.name() // case-insensitive (0x20 mixing)
                })))
}

fn unspecified_for(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(_) => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        IpAddr::V6(_) => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    }
}

/// One query on a fresh connected socket: a random source port per query
/// (spoofing resistance) and only the upstream's packets are accepted.
async fn exchange_udp(
    upstream: SocketAddr,
    raw: &[u8],
    req: &Message,
) -> Result<(Vec<u8>, Message), ExchangeError> {
    let sock = UdpSocket::bind(unspecified_for(upstream)).await?;
    sock.connect(upstream).await?;
    sock.send(raw).await?;
    loop {
        let mut buf = Vec::with_capacity(65535);
        sock.recv_buf(&mut buf).await?;
        match Message::from_vec(&buf) {
            Ok(msg) if matches(req, &msg) => return Ok((buf, msg)),
            _ => debug!(%upstream, "ignoring non-matching upstream packet"),
        }
    }
}

async fn exchange_tcp(
    upstream: SocketAddr,
    raw: &[u8],
    req: &Message,
) -> Result<(Vec<u8>, Message), ExchangeError> {
    let mut stream = TcpStream::connect(upstream).await?;
    let _ = stream.set_nodelay(true);
    let len = u16::try_from(raw.len()).map_err(|_| ExchangeError::TooLarge)?;
    let mut out = Vec::with_capacity(raw.len() + 2);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(raw);
    stream.write_all(&out).await?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await?;
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut buf).await?;
    let msg = Message::from_vec(&buf).map_err(|_| ExchangeError::Mismatch)?;
    if !matches(req, &msg) {
        return Err(ExchangeError::Mismatch);
    }
    Ok((buf, msg))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockets::{control_plane_reserve, load_share};

    fn fitted(fd_limit: u64, per_client: Option<usize>) -> DnsConfig {
        let listen = vec![
            "169.254.20.10:53".parse().unwrap(),
            "[fd73:6875:6e74::53]:53".parse().unwrap(),
        ];
        let mut c = DnsConfig::new(listen, vec!["192.0.2.53:53".parse().unwrap()]);
        c.fit_fds(share(fd_limit), per_client);
        c
    }

    /// The DNS proxy's share under `fd_limit`, as the agent gives it.
    fn share(fd_limit: u64) -> usize {
        load_share(control_plane_reserve(fd_limit))
    }

    /// The fds the proxy can hold at once.
    fn fds(c: &DnsConfig) -> usize {
        c.max_inflight + c.max_tcp_connections * c.listen.len()
    }

    #[test]
    fn the_dns_budgets_fit_in_their_share_of_the_fd_limit() {
        for fd_limit in [1024, 4096, 10_240, 20_000, 65_536] {
            let c = fitted(fd_limit, None);
            assert!(
                fds(&c) <= share(fd_limit),
                "{fd_limit}: {} fds in a share of {}",
                fds(&c),
                share(fd_limit)
            );
            assert!(
                c.max_inflight_per_client <= c.max_inflight / 4,
                "{fd_limit}"
            );
            assert!(c.max_tcp_connections >= 1 && c.max_inflight_per_client >= 1);
        }
        // 1024: a share of 256, 16 TCP clients per listener, 224 forwards.
        let c = fitted(1024, None);
        assert_eq!(
            (
                c.max_tcp_connections,
                c.max_inflight,
                c.max_inflight_per_client
            ),
            (16, 224, 56)
        );
    }

    #[test]
    fn a_large_fd_limit_keeps_the_proxys_own_maxima() {
        let c = fitted(1 << 20, None);
        assert_eq!(
            (
                c.max_tcp_connections,
                c.max_inflight,
                c.max_inflight_per_client
            ),
            (256, 4096, DEFAULT_MAX_INFLIGHT_PER_CLIENT)
        );
    }

    #[test]
    fn an_explicit_per_client_share_is_kept() {
        assert_eq!(fitted(1024, Some(200)).max_inflight_per_client, 200);
        assert_eq!(fitted(1 << 20, Some(1000)).max_inflight_per_client, 1000);
    }
}

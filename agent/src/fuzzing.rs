//! Entry points for the fuzz targets in `fuzz/` (cargo-fuzz, its own
//! workspace). Not an API: each function hands one hostile input to the
//! same code the listeners run, so that the internals stay private.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, ReadBuf};

use crate::config::{Config, Snapshot};
use crate::dns::{DnsConfig, HostTable};
use crate::hbone::InboundRequest;
use crate::identity::SpiffeId;
use crate::model::{Model, NoCgroups};
use crate::policy::FramingError;

pub use crate::hbone::server::ConnectTarget;

/// The HBONE server's reading of a stream's request head.
pub fn hbone_connect(
    parts: &http::request::Parts,
    peer: SocketAddr,
) -> Result<ConnectTarget, String> {
    crate::hbone::server::parse_connect(parts, peer)
}

/// A model built from `files` (name, YAML) with VIPs allocated in a
/// throw-away state directory (removed before returning).
pub fn model(files: &[(&str, &[u8])]) -> Result<Model, String> {
    let cfg = Arc::new(config(files)?);
    let dir = std::env::temp_dir().join(format!("shunt-fuzz-alloc-{}", std::process::id()));
    let alloc = crate::alloc::Allocator::open(&dir)
        .and_then(|mut a| a.allocate(&cfg).cloned())
        .map_err(|e| e.to_string());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Model::build(cfg, &alloc?, &NoCgroups))
}

/// The config loader over in-memory files, as `Snapshot::read` would give them.
pub fn config(files: &[(&str, &[u8])]) -> Result<Config, String> {
    Snapshot::new(
        files
            .iter()
            .map(|(n, t)| (std::path::PathBuf::from(n), t.to_vec()))
            .collect(),
    )
    .parse()
    .map_err(|e| e.to_string())
}

/// Whether the waypoint believes the tunnel's `Forwarded: for=` claim:
/// the address policy and logs use.
pub fn trusted_source(
    model: &Model,
    peer_identity: SpiffeId,
    peer_addr: SocketAddr,
    target: &ConnectTarget,
) -> SocketAddr {
    let req = InboundRequest {
        peer_identity,
        peer_addr,
        local_addr: peer_addr,
        authority: target.authority,
        source_addr: target.source,
        forwarded_host: target.forwarded_host.clone(),
        headers: http::HeaderMap::new(),
    };
    crate::waypoint::judge_source(&req, model).addr()
}

/// One DNS message from `client` through the proxy's handling (`udp`: as
/// received over UDP); queries the host table does not answer go to
/// `config.upstreams`.
pub async fn dns_message(
    config: &DnsConfig,
    hosts: &HostTable,
    query: &[u8],
    udp: bool,
    client: std::net::IpAddr,
) -> Option<Vec<u8>> {
    crate::dns::handle_message(config, hosts.clone().into_shared(), query, udp, client).await
}

/// The HTTP/1.1 framing guard's verdicts for a tunnel whose bytes arrive in
/// `chunks` (one read each), in request order.
pub fn framing_verdicts(chunks: &[&[u8]]) -> Vec<Result<(), FramingError>> {
    /// Yields (up to the buffer's room of) one chunk per read, then EOF.
    struct Chunks<'a, I>(I, &'a [u8]);
    impl<'a, I: Iterator<Item = &'a [u8]> + Unpin> AsyncRead for Chunks<'a, I> {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            while self.1.is_empty() {
                match self.0.next() {
                    Some(c) => self.1 = c,
                    None => return Poll::Ready(Ok(())),
                }
            }
            let n = self.1.len().min(buf.remaining());
            buf.put_slice(&self.1[..n]);
            self.1 = &self.1[n..];
            Poll::Ready(Ok(()))
        }
    }
    let verdicts = crate::waypoint::FramingVerdicts::default();
    let mut guard =
        crate::waypoint::FramingGuard::new(Chunks(chunks.iter().copied(), &[]), verdicts.clone());
    let mut cx = Context::from_waker(Waker::noop());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut guard).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if !rb.filled().is_empty() => {}
            _ => break,
        }
    }
    std::iter::from_fn(|| verdicts.next()).collect()
}

//! HTTP inside a tunnel: HTTP/1.1 (keep-alive, several requests per
//! connection) or HTTP/2 with prior knowledge, detected from the first
//! bytes. Each request is normalized, checked for ambiguous framing,
//! authorized, then forwarded over the upstream pool; anything that is not
//! HTTP gets hyper's 400 and the tunnel is closed, never relayed.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use bytes::{Buf, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use crate::hbone::H2Stream;
use crate::policy::{Action, Decision, HttpRequest, RequestContext};
use crate::telemetry::{
    intern, ConnectionLabels, LogLimit, Metrics, Reporter, RequestLabels, RequestLog, ShadowLabels,
};

use super::body::{CountingBody, Finish, LoggedBody};
use super::framing::{Guard, Verdicts};
use super::routes::Target;
use super::Shared;

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const RBAC_DENIED_BODY: &str = "RBAC: access denied";

/// Per-request refusals a client can cause at will: one line a second.
static NAME_LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));
static UPSTREAM_LOG: LogLimit = LogLimit::new(std::time::Duration::from_secs(1));

/// What a tunnel tells every request in it.
pub(crate) struct TunnelInfo {
    /// Canonical VIP:port (`:authority` of the CONNECT).
    pub authority: SocketAddr,
    /// `Forwarded: for=`.
    pub source: SocketAddr,
    /// The client's SPIFFE URI (shared values: see `telemetry::intern`).
    pub principal: Arc<str>,
    pub source_namespace: Arc<str>,
    pub source_sa: Arc<str>,
}

/// Counts a decision's dry-run result, if any, and returns the text the
/// access log line carries for it. Never changes the decision.
pub(crate) fn note_shadow(metrics: &Metrics, d: &Decision) -> Option<String> {
    let s = d.shadow.as_ref()?;
    metrics.record_shadow(&ShadowLabels {
        engine: match s.action {
            Action::Deny => "istio_dry_run_deny",
            _ => "istio_dry_run_allow",
        },
        result: if s.allowed { "allowed" } else { "denied" },
        policy: s.policy.as_deref().unwrap_or_default().to_string(),
    });
    Some(s.to_string())
}

/// Serves HTTP on one tunnel until the client is done.
pub(crate) async fn serve(shared: Arc<Shared>, tunnel: Arc<TunnelInfo>, mut io: H2Stream) {
    // Detect HTTP/2 prior knowledge by its preface; stop reading as soon as
    // the bytes differ from it.
    let mut pre = BytesMut::with_capacity(H2_PREFACE.len());
    let is_h2 = loop {
        if pre.len() >= H2_PREFACE.len() {
            break true;
        }
        let mut b = [0u8; 24];
        let want = H2_PREFACE.len() - pre.len();
        match io.read(&mut b[..want]).await {
            Ok(0) => return,
            Ok(n) => pre.extend_from_slice(&b[..n]),
            Err(e) => {
                tracing::debug!(error = %e, "tunnel read failed before the first request");
                return;
            }
        }
        if !H2_PREFACE.starts_with(&pre) {
            break false;
        }
    };
    let io = Rewind {
        pre: pre.freeze(),
        io,
    };
    let verdicts = (!is_h2).then(Verdicts::default);
    let svc = {
        let shared = shared.clone();
        let tunnel = tunnel.clone();
        let verdicts = verdicts.clone();
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let shared = shared.clone();
            let tunnel = tunnel.clone();
            let verdicts = verdicts.clone();
            async move { Ok::<_, Infallible>(handle(&shared, &tunnel, verdicts.as_ref(), req).await) }
        })
    };
    let res = match verdicts {
        None => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(io), svc)
                .await
        }
        Some(v) => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .keep_alive(true)
                .serve_connection(TokioIo::new(Guard::new(io, v)), svc)
                .await
        }
    };
    if let Err(e) = res {
        tracing::debug!(error = %e, source = %tunnel.source, "HTTP tunnel ended with error");
    }
}

/// The first bytes read for protocol detection, then the stream.
struct Rewind {
    pre: Bytes,
    io: H2Stream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.pre.is_empty() {
            let n = self.pre.len().min(buf.remaining());
            buf.put_slice(&self.pre[..n]);
            self.pre.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

fn version_str(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

/// Connection-specific headers never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers named by `Connection` are hop-by-hop too.
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in &HOP_BY_HOP {
        h.remove(n);
    }
}

fn header_str(h: &HeaderMap, name: &HeaderName) -> Option<String> {
    h.get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.to_string())
}

/// A random UUIDv4 for `x-request-id`, as Envoy generates one.
fn request_id() -> String {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    let _ = ring::rand::SystemRandom::new().fill(&mut b);
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    // One allocation per request (this runs for every request without one).
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, x) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(HEX[usize::from(x >> 4)] as char);
        s.push(HEX[usize::from(x & 0x0f)] as char);
    }
    s
}

fn local(
    status: StatusCode,
    body: &'static str,
    close: bool,
) -> Response<Either<Incoming, Full<Bytes>>> {
    let mut r = Response::new(Either::Right(Full::new(Bytes::from_static(
        body.as_bytes(),
    ))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if close {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

async fn handle(
    shared: &Arc<Shared>,
    tunnel: &TunnelInfo,
    verdicts: Option<&Verdicts>,
    req: Request<Incoming>,
) -> Response<LoggedBody> {
    let start = Instant::now();
    let start_time = SystemTime::now();
    let snap = shared.routes.load_full();
    let (parts, body) = req.into_parts();
    let target_str = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    // Absolute-form targets name the host; otherwise Host / :authority.
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| header_str(&parts.headers, &header::HOST))
        .unwrap_or_default();

    let mut log = RequestLog::new(
        parts.method.as_str(),
        target_str,
        version_str(parts.version),
    );
    log.start_time = start_time;
    log.user_agent = header_str(&parts.headers, &header::USER_AGENT);
    log.x_forwarded_for = header_str(&parts.headers, &HeaderName::from_static("x-forwarded-for"));
    let rid = header_str(&parts.headers, &HeaderName::from_static("x-request-id"))
        .unwrap_or_else(request_id);
    log.request_id = Some(rid.clone());
    log.authority = (!authority.is_empty()).then(|| authority.clone());
    log.downstream_local_address = Some(tunnel.authority);
    log.downstream_remote_address = Some(tunnel.source);
    log.route_name = Some("default".into());

    let target: Option<Arc<Target>> = snap.targets.get(&tunnel.authority).cloned();
    let request_bytes = Arc::new(AtomicU64::new(0));
    let labels = |t: Option<&Target>, flags: &str| ConnectionLabels {
        reporter: Reporter::Destination,
        source_workload: tunnel.source_sa.clone(),
        source_workload_namespace: tunnel.source_namespace.clone(),
        source_principal: tunnel.principal.clone(),
        destination_service: t.map(|t| intern(&t.host)).unwrap_or_default(),
        destination_workload: intern(&shared.gateway.name),
        destination_workload_namespace: intern(&shared.gateway.namespace),
        destination_principal: intern(&shared.identity_uri),
        request_protocol: intern(if parts.version == Version::HTTP_2 {
            "http2"
        } else {
            "http"
        }),
        response_flags: flags.to_string(),
    };
    let finish = |mut log: RequestLog,
                  resp: Response<Either<Incoming, Full<Bytes>>>,
                  t: Option<&Target>,
                  flags: &str| {
        log.response_code = resp.status().as_u16();
        if !flags.is_empty() {
            log.response_flags = Some(flags.to_string());
        }
        if let Some(t) = t {
            log.upstream_cluster = Some(t.cluster.clone());
        }
        let code = resp.status().as_u16();
        let f = Finish {
            log,
            start,
            request_bytes: request_bytes.clone(),
            labels: RequestLabels {
                connection: labels(t, flags),
                response_code: code,
            },
            logger: shared.access_log.clone(),
            metrics: shared.metrics.clone(),
        };
        resp.map(|b| LoggedBody::new(b, f))
    };

    let Some(target) = target else {
        // The service left this waypoint's config while the tunnel was open.
        log.response_code_details = Some("route_not_found".into());
        return finish(log, local(StatusCode::NOT_FOUND, "", false), None, "NR");
    };

    // Request smuggling defence: HTTP/1 framing must be unambiguous, as
    // received (hyper normalizes some ambiguities away; see `framing`). No
    // verdict means the guard lost track: fail closed.
    if let Some(v) = verdicts {
        let verdict = v.next().unwrap_or_else(|| {
            Err(crate::policy::FramingError::BadTransferEncoding(
                "request head not tracked".into(),
            ))
        });
        if let Err(e) = verdict {
            tracing::info!(error = %e, source = %tunnel.source, "ambiguous HTTP/1.1 framing, answering 400");
            log.response_code_details = Some("http1.invalid_framing".into());
            return finish(
                log,
                local(StatusCode::BAD_REQUEST, "Bad Request", true),
                Some(&target),
                "DPE",
            );
        }
    }

    // A wildcard port's destination is the name the request carries
    // (Host, `:authority`): it must be one the entry covers, else no route
    // (Envoy's 404 for a host no virtual host matches).
    let upstream = if target.upstream.is_dynamic() {
        let name = authority
            .parse::<http::uri::Authority>()
            .map(|a| a.host().to_string())
            .unwrap_or_default();
        if !target.accepts_name(&name) {
            if let Some(suppressed) = NAME_LOG.allow() {
                tracing::info!(source = %tunnel.source, authority = %authority, wildcard = %target.host, suppressed, "request names no host of the wildcard ServiceEntry, answering 404");
            }
            log.response_code_details = Some("route_not_found".into());
            return finish(
                log,
                local(StatusCode::NOT_FOUND, "", false),
                Some(&target),
                "NR",
            );
        }
        match target.upstream.for_name(&name) {
            Ok(u) => u,
            Err(e) => {
                log.upstream_transport_failure_reason = Some(e.to_string());
                log.response_code_details =
                    Some("upstream_reset_before_response_started{overflow}".into());
                return finish(
                    log,
                    local(StatusCode::SERVICE_UNAVAILABLE, "upstream overflow", false),
                    Some(&target),
                    "UO",
                );
            }
        }
    } else {
        target.upstream.clone()
    };

    let evaluated = match HttpRequest::new(
        parts.method.as_str(),
        target_str,
        &authority,
        &parts.headers,
        snap.policies.path_normalization(),
    ) {
        Ok(hreq) => {
            let ctx = RequestContext {
                principal: Some(&*tunnel.principal),
                source_ip: Some(tunnel.source.ip()),
                destination_ip: Some(tunnel.authority.ip()),
                destination_port: tunnel.authority.port(),
                http: Some(hreq),
                ..Default::default()
            };
            let decision = snap
                .policies
                .for_service(target.service.namespace(), target.service.name())
                .evaluate(&ctx);
            let path = ctx
                .http
                .as_ref()
                .map(|h| h.path().to_string())
                .unwrap_or_default();
            Ok((decision, path))
        }
        Err(e) => Err(e),
    };
    let (decision, mut path) = match evaluated {
        Ok(d) => {
            log.shadow = note_shadow(&shared.metrics, &d.0);
            d
        }
        Err(e) => {
            tracing::info!(error = %e, "unnormalizable request path, answering 400");
            log.response_code_details = Some("invalid_path".into());
            return finish(
                log,
                local(StatusCode::BAD_REQUEST, "Bad Request", false),
                Some(&target),
                "DPE",
            );
        }
    };
    if !decision.allowed {
        // Envoy's details name a policy only when a DENY rule matched;
        // otherwise `[none]`. The log line below names the deciding policy
        // either way.
        let deciding = match decision.reason {
            crate::policy::Reason::DenyMatched => {
                decision.policy.as_deref().and_then(|p| p.split_once('/'))
            }
            _ => None,
        };
        log.response_code_details = Some(RequestLog::rbac_denied_details(
            deciding.map(|(ns, n)| (ns, n, decision.rule.unwrap_or(0))),
        ));
        tracing::info!(
            principal = %tunnel.principal,
            method = %parts.method,
            path = %parts.uri.path(),
            policy = decision.policy.as_deref().unwrap_or("-"),
            "request {decision}"
        );
        return finish(
            log,
            local(StatusCode::FORBIDDEN, RBAC_DENIED_BODY, false),
            Some(&target),
            "RBAC",
        );
    }

    // Upstream request: normalized path plus the original query.
    if let Some(q) = parts.uri.query() {
        path.push('?');
        path.push_str(q);
    }
    let h2_up = matches!(
        target.port.protocol,
        crate::config::Protocol::Http2 | crate::config::Protocol::Grpc
    );
    let uri = if h2_up {
        format!(
            "http://{}:{}{}",
            upstream.host(),
            target.port.target_port,
            path
        )
    } else {
        path
    };
    let uri: http::Uri = match uri.parse() {
        Ok(u) => u,
        Err(_) => {
            log.response_code_details = Some("invalid_path".into());
            return finish(
                log,
                local(StatusCode::BAD_REQUEST, "Bad Request", false),
                Some(&target),
                "DPE",
            );
        }
    };
    let mut headers = parts.headers;
    strip_hop_by_hop(&mut headers);
    if !headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::try_from(authority.as_str()) {
            headers.insert(header::HOST, v);
        }
    }
    if h2_up {
        // :authority carries it on HTTP/2.
        headers.remove(header::HOST);
    }
    if let Ok(v) = HeaderValue::try_from(rid.as_str()) {
        headers.insert(HeaderName::from_static("x-request-id"), v);
    }
    let mut up = Request::new(CountingBody::new(body, request_bytes.clone()));
    *up.method_mut() = parts.method;
    *up.uri_mut() = uri;
    *up.version_mut() = if h2_up {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    *up.headers_mut() = headers;

    match upstream.send(up, tunnel.authority).await {
        Ok(sent) => {
            log.upstream_host = Some(sent.peer);
            log.upstream_local_address = Some(sent.local);
            log.response_code_details = Some("via_upstream".into());
            let took = start.elapsed();
            log.upstream_service_time = Some(took);
            let (mut rparts, rbody) = sent.response.into_parts();
            strip_hop_by_hop(&mut rparts.headers);
            if let Ok(v) = HeaderValue::try_from(took.as_millis().to_string()) {
                rparts
                    .headers
                    .insert(HeaderName::from_static("x-envoy-upstream-service-time"), v);
            }
            let resp = Response::from_parts(rparts, Either::Left(rbody));
            finish(log, resp, Some(&target), "")
        }
        Err(e) => {
            if let Some(suppressed) = UPSTREAM_LOG.allow() {
                tracing::info!(error = %e, host = %upstream.host(), suppressed, "upstream request failed, answering 503");
            }
            let flags = if e.is_connect() { "UF" } else { "UC" };
            log.upstream_transport_failure_reason = Some(e.to_string());
            log.response_code_details = Some(if e.is_connect() {
                "upstream_reset_before_response_started{connection_failure}".into()
            } else {
                "upstream_reset_before_response_started{connection_termination}".into()
            });
            let body = if e.is_connect() {
                "upstream connect error or disconnect/reset before headers. reset reason: connection failure"
            } else {
                "upstream connect error or disconnect/reset before headers. reset reason: connection termination"
            };
            finish(
                log,
                local(StatusCode::SERVICE_UNAVAILABLE, body, false),
                Some(&target),
                flags,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn generated_request_ids_are_distinct_version_4_uuids() {
        let a = super::request_id();
        assert_ne!(a, super::request_id());
        let lens: Vec<usize> = a.split('-').map(str::len).collect();
        assert_eq!(lens, [8, 4, 4, 4, 12], "{a}");
        assert!(a
            .chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c)));
        assert_eq!(&a[14..15], "4", "version nibble of {a}");
        assert!(
            matches!(&a[19..20], "8" | "9" | "a" | "b"),
            "variant of {a}"
        );
    }
}

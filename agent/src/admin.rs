//! Admin HTTP endpoints (hyper 1, HTTP/1.1): `/metrics` (15020),
//! `/healthz/ready` (15021), `/config_dump` and `/config` (localhost:15000).
//! One small server task per listener; each listener serves the endpoints it
//! is given and answers 404 for the rest.
//!
//! `/config` is the config in force: the files the running model was built
//! from ([`ConfigInForce`]), which `shunt get` parses with the same parser
//! the agent used, so it shows exactly what the agent enforces even while
//! the directory holds a newer, invalid version.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, Snapshot};
use crate::sockets::{Acceptor, ListenerName};
use crate::telemetry::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("binding admin listener {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Produces the JSON of `/config_dump` at request time.
pub type ConfigDumpFn = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// The config in force at request time (`/config`).
pub type ConfigFn = Arc<dyn Fn() -> Arc<Config> + Send + Sync>;

/// What one listener serves. Unset endpoints answer 404.
#[derive(Clone, Default)]
pub struct Endpoints {
    pub metrics: Option<Arc<Metrics>>,
    /// `/healthz/ready`: 200 when set, 503 otherwise.
    pub ready: Option<Arc<AtomicBool>>,
    pub config_dump: Option<ConfigDumpFn>,
    pub config: Option<ConfigFn>,
}

/// `/config`'s body: the source files of the config in force, in the order
/// the parser read them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigInForce {
    pub files: Vec<ConfigFile>,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConfigFile {
    /// As the agent read it (its config directory, or the Kubernetes
    /// source's object names).
    pub path: PathBuf,
    pub content: String,
}

impl ConfigInForce {
    /// `None` for a config that was not parsed from a source (the empty
    /// default before the first valid one).
    pub fn of(cfg: &Config) -> Option<ConfigInForce> {
        let src = cfg.source.as_ref()?;
        Some(ConfigInForce {
            files: src
                .files
                .iter()
                .map(|(path, b)| ConfigFile {
                    path: path.clone(),
                    content: String::from_utf8_lossy(b).into_owned(),
                })
                .collect(),
        })
    }

    /// The snapshot to parse again (the digest is recomputed).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::new(
            self.files
                .iter()
                .map(|f| (f.path.clone(), f.content.clone().into_bytes()))
                .collect(),
        )
    }
}

impl std::fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoints")
            .field("metrics", &self.metrics.is_some())
            .field("ready", &self.ready)
            .field("config_dump", &self.config_dump.is_some())
            .field("config", &self.config.is_some())
            .finish()
    }
}

/// A running admin listener; dropping it stops accepting.
#[derive(Debug)]
pub struct AdminServer {
    local_addr: SocketAddr,
    task: JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` and starts serving `endpoints` on it.
    pub async fn bind(addr: SocketAddr, endpoints: Endpoints) -> Result<Self, AdminError> {
        let listener = crate::sockets::tcp_listener(addr)
            .map_err(|source| AdminError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| AdminError::Bind { addr, source })?;
        let endpoints = Arc::new(endpoints);
        let task = tokio::spawn(accept_loop(listener, endpoints));
        Ok(AdminServer { local_addr, task })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, endpoints: Arc<Endpoints>) {
    let mut acceptor = Acceptor::new(ListenerName::Admin);
    loop {
        let (stream, peer) = acceptor.accept(&listener).await;
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let endpoints = endpoints.clone();
                async move { Ok::<_, Infallible>(handle(&endpoints, req)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(peer = %crate::telemetry::LogAddr(peer), error = %e, "admin connection");
            }
        });
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

fn handle(endpoints: &Endpoints, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n",
        );
    }
    match (req.uri().path(), endpoints) {
        (
            "/metrics",
            Endpoints {
                metrics: Some(m), ..
            },
        ) => match m.encode() {
            Ok(body) => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                body,
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        ("/healthz/ready", Endpoints { ready: Some(r), .. }) => {
            if r.load(Ordering::Acquire) {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (
            "/config_dump",
            Endpoints {
                config_dump: Some(f),
                ..
            },
        ) => match serde_json::to_vec_pretty(&f()) {
            Ok(body) => text(StatusCode::OK, "application/json", body),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        (
            "/config",
            Endpoints {
                config: Some(f), ..
            },
        ) => match ConfigInForce::of(&f()) {
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "no valid config has been loaded yet\n",
            ),
            Some(c) => match serde_json::to_vec(&c) {
                Ok(body) => text(StatusCode::OK, "application/json", body),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("{e}\n"),
                ),
            },
        },
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

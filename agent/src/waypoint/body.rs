//! Body wrappers: byte counting for the access log, and a response body
//! that writes the request's log line and metrics when it ends (or is
//! dropped, when the client went away), as Envoy logs at stream end.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::telemetry::{AccessLogger, Metrics, RequestLabels, RequestLog};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The downstream request body on its way upstream, counted.
pub struct CountingBody {
    inner: Incoming,
    count: Arc<AtomicU64>,
}

impl CountingBody {
    pub fn new(inner: Incoming, count: Arc<AtomicU64>) -> Self {
        CountingBody { inner, count }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = hyper::Error;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
            }
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// What is needed to finish a request's telemetry.
pub struct Finish {
    pub log: RequestLog,
    pub start: Instant,
    pub request_bytes: Arc<AtomicU64>,
    pub labels: RequestLabels,
    pub logger: Arc<AccessLogger>,
    pub metrics: Arc<Metrics>,
}

impl Finish {
    fn done(mut self: Box<Self>, response_bytes: u64, aborted: bool) {
        let elapsed = self.start.elapsed();
        self.log.duration = elapsed;
        self.log.bytes_sent = response_bytes;
        self.log.bytes_received = self.request_bytes.load(Ordering::Relaxed);
        if aborted && self.log.connection_termination_details.is_none() {
            self.log.connection_termination_details = Some("downstream_remote_disconnect".into());
        }
        self.logger.request(&self.log);
        self.metrics
            .record_request(&self.labels, elapsed.as_secs_f64() * 1000.0);
    }
}

pub type Inner = Either<Incoming, Full<Bytes>>;

/// The response body given to hyper's server.
pub struct LoggedBody {
    inner: Inner,
    bytes: u64,
    finish: Option<Box<Finish>>,
}

impl LoggedBody {
    pub fn new(inner: Inner, finish: Finish) -> Self {
        LoggedBody {
            inner,
            bytes: 0,
            finish: Some(Box::new(finish)),
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if this.inner.is_end_stream() {
                    if let Some(f) = this.finish.take() {
                        f.done(this.bytes, false);
                    }
                }
            }
            Poll::Ready(None) => {
                if let Some(f) = this.finish.take() {
                    f.done(this.bytes, false);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut f) = this.finish.take() {
                    f.log.connection_termination_details = Some("upstream_reset".into());
                    f.done(this.bytes, false);
                }
            }
            Poll::Pending => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        if let Some(f) = self.finish.take() {
            // hyper may drop an empty body without polling it.
            let aborted = !self.inner.is_end_stream();
            f.done(self.bytes, aborted);
        }
    }
}

//! Byte relay between a socket and an HTTP/2 stream, and `H2Stream`, an
//! `AsyncRead + AsyncWrite` view of an h2 stream.
//!
//! The relay is one future polling both directions (no task per direction,
//! no lock around a split socket). An idle or lightly used connection holds
//! no read buffer: reads land on the stack and are copied out at their
//! size. A read that fills that switches to a heap `BytesMut` whose read
//! size grows while reads fill it; its chunks go to h2 as `Bytes` without a
//! copy, and it is given back after [`IDLE_RELEASE`] without a read. Data
//! from h2 is written straight from the received `Bytes`. Flow-control
//! capacity is released as soon as bytes are written to the socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::io::poll_read_buf;

use super::HboneError;

/// Reads up to this size are copied off the stack (one page or a few for a
/// request, none held while the connection is idle); a read that fills it
/// starts bulk mode.
const SMALL_READ: usize = 16 * 1024;
/// Largest read, and so the largest DATA frame we send. 256 KiB rather than
/// a full 1 MiB frame: the peer's frame buffer and our read buffer stay small
/// enough for malloc to recycle, and the next hop starts sooner (~3% less
/// CPU per byte than 1 MiB in `benches/hbone.rs`).
const MAX_READ: usize = 256 * 1024;
/// A bulk-mode read buffer unused this long is freed (back to stack reads).
pub const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// A socket-like thing the relay can drive, and reset when the peer resets.
pub trait RelayIo: AsyncRead + AsyncWrite + Unpin + Send {
    /// Make the next close a reset (RST) rather than a FIN.
    fn set_reset_on_close(&self) {}
}

impl RelayIo for tokio::net::TcpStream {
    fn set_reset_on_close(&self) {
        let _ = self.set_zero_linger();
    }
}

impl<T: RelayIo + ?Sized> RelayIo for Box<T> {
    fn set_reset_on_close(&self) {
        (**self).set_reset_on_close()
    }
}

impl RelayIo for tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    fn set_reset_on_close(&self) {
        self.get_ref().0.set_reset_on_close()
    }
}

impl RelayIo for tokio_rustls::server::TlsStream<tokio::net::TcpStream> {
    fn set_reset_on_close(&self) {
        self.get_ref().0.set_reset_on_close()
    }
}

/// What a finished relay did, for the access log.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Bytes read from the socket and sent into the tunnel.
    pub bytes_sent: u64,
    /// Bytes received from the tunnel and written to the socket.
    pub bytes_received: u64,
    /// Why the relay ended early, if it did.
    pub error: Option<HboneError>,
}

struct Up {
    /// Bulk mode's read buffer (no allocation otherwise).
    buf: BytesMut,
    /// Bulk mode's read size; 0 in stack mode.
    next_read: usize,
    /// Bulk mode: fires every [`IDLE_RELEASE`] to check for reads.
    idle: Option<Pin<Box<Sleep>>>,
    /// Bulk mode: a read completed since `idle` was last armed.
    active: bool,
    pending: Bytes,
    eof: bool,
    done: bool,
    bytes: u64,
}

struct Down {
    pending: Bytes,
    eos: bool,
    done: bool,
    bytes: u64,
}

/// Copies both ways until both sides have ended: socket EOF becomes
/// END_STREAM; the peer's END_STREAM becomes `shutdown(Write)` on the socket;
/// a reset from the peer resets the socket; a socket error resets the stream.
///
/// A NO_ERROR reset is the peer asking us to stop sending because its side
/// is complete (RFC 9113 §8.1: a server that answered before the whole
/// request arrived; h2 sends it when a server drops a stream it has
/// finished): it ends only the socket → tunnel direction, and what the peer
/// sent is still delivered and closed with a FIN. Only when its END_STREAM
/// never came does the reset reach the socket.
pub async fn relay<S: RelayIo>(
    io: &mut S,
    send: SendStream<Bytes>,
    recv: RecvStream,
) -> RelayStats {
    let mut r = Relay {
        io,
        send,
        recv,
        up: Up {
            buf: BytesMut::new(),
            next_read: 0,
            idle: None,
            active: false,
            pending: Bytes::new(),
            eof: false,
            done: false,
            bytes: 0,
        },
        down: Down {
            pending: Bytes::new(),
            eos: false,
            done: false,
            bytes: 0,
        },
    };
    let res = std::future::poll_fn(|cx| r.poll(cx)).await;
    let mut stats = RelayStats {
        bytes_sent: r.up.bytes,
        bytes_received: r.down.bytes,
        error: None,
    };
    if let Err(e) = res {
        match &e {
            HboneError::StreamReset(_) => r.io.set_reset_on_close(),
            _ => r.send.send_reset(Reason::CANCEL),
        }
        stats.error = Some(e);
    }
    stats
}

struct Relay<'a, S> {
    io: &'a mut S,
    send: SendStream<Bytes>,
    recv: RecvStream,
    up: Up,
    down: Down,
}

impl<S: RelayIo> Relay<'_, S> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HboneError>> {
        if !self.up.done {
            match self.poll_up(cx) {
                // The peer stops reading; its own data still comes (below).
                Poll::Ready(Err(HboneError::StreamReset(Reason::NO_ERROR))) => self.up.done = true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                _ => {}
            }
        }
        if !self.down.done {
            if let Poll::Ready(Err(e)) = self.poll_down(cx) {
                return Poll::Ready(Err(e));
            }
        }
        if self.up.done && self.down.done {
            return Poll::Ready(Ok(()));
        }
        // A reset is noticed even while neither direction touches the stream
        // (say, waiting on a silent socket after the peer's END_STREAM).
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(Reason::NO_ERROR)) => {
                self.up.done = true;
                if self.down.done {
                    Poll::Ready(Ok(()))
                } else {
                    // poll_down is pending on the socket or the stream and
                    // has registered its wakers.
                    Poll::Pending
                }
            }
            Poll::Ready(Ok(reason)) => Poll::Ready(Err(HboneError::StreamReset(reason))),
            Poll::Ready(Err(e)) => Poll::Ready(Err(HboneError::from_h2(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Socket → tunnel.
    fn poll_up(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HboneError>> {
        let up = &mut self.up;
        loop {
            if !up.pending.is_empty() {
                ready!(poll_send_capacity(&mut self.send, up.pending.len(), cx))?;
                let n = self.send.capacity().min(up.pending.len());
                // Taking the last chunk drops our reference to the read
                // buffer (an empty `Bytes` would still hold it).
                let chunk = if n == up.pending.len() {
                    std::mem::take(&mut up.pending)
                } else {
                    up.pending.split_to(n)
                };
                if let Err(e) = self.send.send_data(chunk, false) {
                    return Poll::Ready(Err(send_error(&mut self.send, e, cx)));
                }
                continue;
            }
            if up.eof {
                if let Err(e) = self.send.send_data(Bytes::new(), true) {
                    return Poll::Ready(Err(send_error(&mut self.send, e, cx)));
                }
                up.done = true;
                return Poll::Ready(Ok(()));
            }
            if up.next_read == 0 {
                let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); SMALL_READ];
                let mut rb = ReadBuf::uninit(&mut stack);
                ready!(Pin::new(&mut *self.io).poll_read(cx, &mut rb))
                    .map_err(HboneError::Socket)?;
                let n = rb.filled().len();
                if n == 0 {
                    up.eof = true;
                    continue;
                }
                up.bytes += n as u64;
                up.pending = Bytes::copy_from_slice(rb.filled());
                if n == SMALL_READ {
                    up.next_read = 2 * SMALL_READ;
                    up.active = false;
                    up.idle = Some(Box::pin(tokio::time::sleep(IDLE_RELEASE)));
                }
                continue;
            }
            if up.buf.capacity() < up.next_read {
                up.buf.reserve(up.next_read);
            }
            let n = match poll_read_buf(Pin::new(&mut *self.io), cx, &mut up.buf) {
                Poll::Ready(r) => r.map_err(HboneError::Socket)?,
                Poll::Pending => {
                    if up.release_if_idle(cx) {
                        // Back to stack reads (which register the waker).
                        continue;
                    }
                    return Poll::Pending;
                }
            };
            if n == 0 {
                up.eof = true;
                continue;
            }
            up.bytes += n as u64;
            up.active = true;
            if n >= up.next_read && up.next_read < MAX_READ {
                up.next_read *= 2;
            }
            up.pending = up.buf.split().freeze();
        }
    }

    /// Tunnel → socket.
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HboneError>> {
        let down = &mut self.down;
        loop {
            if !down.pending.is_empty() {
                let n = ready!(Pin::new(&mut *self.io).poll_write(cx, &down.pending))
                    .map_err(HboneError::Socket)?;
                if n == 0 {
                    return Poll::Ready(Err(HboneError::Socket(io::ErrorKind::WriteZero.into())));
                }
                down.pending.advance(n);
                if down.pending.is_empty() {
                    // Let go of h2's receive buffer while idle.
                    down.pending = Bytes::new();
                }
                let _ = self.recv.flow_control().release_capacity(n);
                continue;
            }
            if down.eos {
                ready!(Pin::new(&mut *self.io).poll_shutdown(cx)).map_err(HboneError::Socket)?;
                down.done = true;
                return Poll::Ready(Ok(()));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(b)) => {
                    down.bytes += b.len() as u64;
                    down.pending = b;
                }
                Some(Err(e)) => return Poll::Ready(Err(HboneError::from_h2(e))),
                None => down.eos = true,
            }
        }
    }
}

impl Up {
    /// Bulk mode, no read pending: frees the read buffer when no read
    /// completed for [`IDLE_RELEASE`]; otherwise re-arms the check.
    fn release_if_idle(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(idle) = self.idle.as_mut() else {
            return false;
        };
        if idle.as_mut().poll(cx).is_pending() {
            return false;
        }
        if self.active {
            self.active = false;
            idle.as_mut().reset(Instant::now() + IDLE_RELEASE);
            // Registers the timer's waker.
            let _ = idle.as_mut().poll(cx);
            return false;
        }
        self.buf = BytesMut::new();
        self.next_read = 0;
        self.idle = None;
        true
    }
}

/// Waits until the stream has send capacity for (part of) `want` bytes.
fn poll_send_capacity(
    send: &mut SendStream<Bytes>,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<(), HboneError>> {
    send.reserve_capacity(want);
    loop {
        if send.capacity() > 0 {
            return Poll::Ready(Ok(()));
        }
        match ready!(send.poll_capacity(cx)) {
            Some(Ok(_)) => {}
            Some(Err(e)) => return Poll::Ready(Err(send_error(send, e, cx))),
            None => {
                return Poll::Ready(Err(match send.poll_reset(cx) {
                    Poll::Ready(Ok(reason)) => HboneError::StreamReset(reason),
                    _ => HboneError::StreamClosed,
                }))
            }
        }
    }
}

/// A failed send, as the peer's reset when the peer reset the stream: h2
/// reports sending on such a stream as a user error ("inactive stream").
fn send_error(send: &mut SendStream<Bytes>, e: h2::Error, cx: &mut Context<'_>) -> HboneError {
    match send.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => HboneError::StreamReset(reason),
        _ => HboneError::from_h2(e),
    }
}

/// An h2 stream as a byte stream: reads release flow control as they are
/// consumed, `shutdown` sends END_STREAM. Used when the waypoint parses
/// HTTP inside a tunnel.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    rbuf: Bytes,
    read_eof: bool,
    write_closed: bool,
    /// Whatever must live as long as the stream (a client's pool slot).
    pub(crate) guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> Self {
        H2Stream {
            send,
            recv,
            rbuf: Bytes::new(),
            read_eof: false,
            write_closed: false,
            guard: None,
        }
    }
    /// Aborts the stream (RST_STREAM CANCEL).
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
    }
}

fn h2_io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    let kind = if e.reason().is_some() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, e)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.rbuf.is_empty() {
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(b)) => this.rbuf = b,
                Some(Err(e)) => return Poll::Ready(Err(h2_io_error(e))),
                None => this.read_eof = true,
            }
        }
        let n = this.rbuf.len().min(buf.remaining());
        buf.put_slice(&this.rbuf[..n]);
        this.rbuf.advance(n);
        let _ = this.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let want = buf.len().min(MAX_READ);
        ready!(poll_send_capacity(&mut this.send, want, cx))
            .map_err(|e| io::Error::new(io::ErrorKind::BrokenPipe, e))?;
        let n = this.send.capacity().min(want);
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2 flushes frames from the connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send
                .send_data(Bytes::new(), true)
                .map_err(h2_io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// The boxed future a `Decision::Serve` handler returns.
pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

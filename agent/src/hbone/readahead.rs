//! A read-ahead buffer between an HBONE connection's TCP socket and rustls.
//!
//! rustls' deframer asks its reader for at most 4 KiB at a time, so a
//! 16 KiB TLS record took about five `recv` calls. `ReadAhead` reads up to
//! [`READ_AHEAD`] per call and serves rustls' small reads from memory. The
//! buffer exists only while it holds unread bytes or a read is completing:
//! a read that finds the socket empty gives it back, so an idle connection
//! holds none.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest read from the socket: four full TLS records.
pub const READ_AHEAD: usize = 64 * 1024;

/// `io` with reads staged through a buffer of [`READ_AHEAD`] bytes; writes
/// (vectored included) go straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    io: T,
    /// Received, not yet handed on: `buf[pos..]`. Capacity 0 when empty.
    buf: Vec<u8>,
    pos: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(io: T) -> Self {
        ReadAhead {
            io,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            if out.remaining() >= READ_AHEAD {
                // A reader this large needs no staging.
                return Pin::new(&mut this.io).poll_read(cx, out);
            }
            this.buf.clear();
            this.pos = 0;
            this.buf.reserve_exact(READ_AHEAD);
            let mut rb = ReadBuf::uninit(this.buf.spare_capacity_mut());
            match Pin::new(&mut this.io).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    // SAFETY: `n` bytes of the spare capacity were initialised
                    // by the read.
                    unsafe { this.buf.set_len(n) };
                    if n == 0 {
                        this.buf = Vec::new();
                        return Poll::Ready(Ok(()));
                    }
                }
                other => {
                    // Nothing to read (or an error): hold no buffer meanwhile.
                    this.buf = Vec::new();
                    return other;
                }
            }
        }
        let n = (this.buf.len() - this.pos).min(out.remaining());
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_see_every_byte_in_order_and_eof() {
        let (mut tx, rx) = tokio::io::duplex(256 * 1024);
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let writer = tokio::spawn(async move {
            tx.write_all(&sent).await.unwrap();
            tx.shutdown().await.unwrap();
        });
        let mut r = ReadAhead::new(rx);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        writer.await.unwrap();
        assert_eq!(got, data);
        assert_eq!(r.buf.capacity(), 0, "no buffer is held after EOF");
    }

    #[tokio::test]
    async fn an_idle_reader_holds_no_buffer() {
        let (mut tx, rx) = tokio::io::duplex(1024);
        let mut r = ReadAhead::new(rx);
        tx.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 16];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 5);
        // The next read finds nothing and gives the buffer back.
        let pending = futures::poll!(std::pin::pin!(r.read(&mut chunk)));
        assert!(pending.is_pending());
        assert_eq!(r.buf.capacity(), 0);
    }
}

//! Request-smuggling guard for HTTP/1.1 tunnels. hyper resolves ambiguous
//! framing silently (with both Content-Length and Transfer-Encoding it
//! drops Content-Length; a repeated equal Content-Length is folded), so the
//! waypoint cannot see it in the parsed request. This reader sits between
//! the tunnel and hyper, follows message boundaries itself, runs
//! `policy::check_framing` on each request head as received, and queues one
//! verdict per request; the HTTP layer takes them in order (HTTP/1.1 serves
//! requests one at a time, in order) and answers 400 on a bad one.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::policy::{check_framing, Framing, FramingError};

/// Heads larger than this are left to hyper (it refuses them).
const MAX_HEAD: usize = 128 * 1024;
const MAX_HEADERS: usize = 128;

/// One verdict per request head, in order.
#[derive(Clone, Default)]
pub(crate) struct Verdicts(Arc<Mutex<VecDeque<Result<(), FramingError>>>>);

impl Verdicts {
    /// The next request's verdict; `None` when the guard lost track (the
    /// caller fails closed).
    pub fn next(&self) -> Option<Result<(), FramingError>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }
    fn push(&self, v: Result<(), FramingError>) {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push_back(v)
    }
}

enum State {
    Head,
    Body(u64),
    ChunkSize,
    ChunkData(u64),
    ChunkEnd(u8),
    Trailers,
    /// Stopped tracking (bad head or bad framing: hyper or the waypoint
    /// ends the connection after this request).
    Lost,
}

pub(crate) struct Guard<IO> {
    io: IO,
    state: State,
    line: Vec<u8>,
    verdicts: Verdicts,
}

impl<IO> Guard<IO> {
    pub fn new(io: IO, verdicts: Verdicts) -> Self {
        Guard {
            io,
            state: State::Head,
            line: Vec::new(),
            verdicts,
        }
    }

    fn head_done(&mut self) {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&self.line) {
            Ok(httparse::Status::Complete(_)) => {
                let framing = check_framing(req.headers.iter().map(|h| (h.name, h.value)));
                self.state = match &framing {
                    Ok(Framing::None) | Ok(Framing::ContentLength(0)) => State::Head,
                    Ok(Framing::ContentLength(n)) => State::Body(*n),
                    Ok(Framing::Chunked) => State::ChunkSize,
                    Err(_) => State::Lost,
                };
                self.verdicts.push(framing.map(|_| ()));
            }
            // hyper will refuse this head itself.
            _ => self.state = State::Lost,
        }
        self.line.clear();
    }

    /// Follows message boundaries over `data`.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.state {
                State::Lost => return,
                State::Head => {
                    // Empty lines before a request line are ignored (RFC 9112 §2.2).
                    if self.line.is_empty() && (data[0] == b'\r' || data[0] == b'\n') {
                        data = &data[1..];
                        continue;
                    }
                    let start = self.line.len().saturating_sub(3);
                    let take = data.len().min(MAX_HEAD + 1 - self.line.len().min(MAX_HEAD));
                    self.line.extend_from_slice(&data[..take]);
                    if let Some(end) = find(&self.line[start..], b"\r\n\r\n") {
                        let end = start + end + 4;
                        let rest = self.line.split_off(end);
                        data = &data[take - rest.len()..];
                        self.head_done();
                    } else if self.line.len() > MAX_HEAD {
                        self.state = State::Lost;
                    } else {
                        data = &data[take..];
                    }
                }
                State::Body(n) => {
                    let k = (*n).min(data.len() as u64);
                    *n -= k;
                    data = &data[k as usize..];
                    if *n == 0 {
                        self.state = State::Head;
                    }
                }
                State::ChunkSize | State::Trailers => {
                    let Some(i) = data.iter().position(|&b| b == b'\n') else {
                        self.line.extend_from_slice(data);
                        if self.line.len() > MAX_HEAD {
                            self.state = State::Lost;
                        }
                        return;
                    };
                    self.line.extend_from_slice(&data[..=i]);
                    data = &data[i + 1..];
                    let line = std::mem::take(&mut self.line);
                    let text = String::from_utf8_lossy(&line);
                    let text = text.trim_end_matches(['\r', '\n']);
                    if matches!(self.state, State::Trailers) {
                        if text.is_empty() {
                            self.state = State::Head;
                        }
                    } else {
                        let hex = text.split(';').next().unwrap_or("").trim();
                        self.state = match u64::from_str_radix(hex, 16) {
                            Ok(0) => State::Trailers,
                            Ok(n) => State::ChunkData(n),
                            Err(_) => State::Lost,
                        };
                    }
                }
                State::ChunkData(n) => {
                    let k = (*n).min(data.len() as u64);
                    *n -= k;
                    data = &data[k as usize..];
                    if *n == 0 {
                        self.state = State::ChunkEnd(2);
                    }
                }
                State::ChunkEnd(left) => {
                    *left -= 1;
                    data = &data[1..];
                    if *left == 0 {
                        self.state = State::ChunkSize;
                    }
                }
            }
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

impl<IO: AsyncRead + Unpin> AsyncRead for Guard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r {
            this.feed(&buf.filled()[before..]);
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Guard<IO> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn run(chunks: &[&[u8]]) -> Vec<Option<bool>> {
        let v = Verdicts::default();
        let mut g = Guard::new((), v.clone());
        for c in chunks {
            g.feed(c);
        }
        let mut out = Vec::new();
        while let Some(r) = v.next() {
            out.push(Some(r.is_ok()));
        }
        out
    }

    #[test]
    fn follows_boundaries_across_splits() {
        let msg: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n";
        assert_eq!(run(&[msg]), [Some(true), Some(true), Some(false)]);
        // Byte by byte gives the same verdicts.
        let bytes: Vec<&[u8]> = msg.chunks(1).collect();
        assert_eq!(run(&bytes), [Some(true), Some(true), Some(false)]);
    }

    #[test]
    fn smuggling_shapes() {
        assert_eq!(
            run(&[b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"]),
            [Some(false)]
        );
        assert_eq!(
            run(&[b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"]),
            [Some(false)]
        );
        // Garbage: no verdict (hyper refuses it; the waypoint fails closed).
        assert_eq!(run(&[b"\x16\x03\x01 not http\r\n\r\n"]), []);
    }
}

//! The SNI of a TLS ClientHello, read without terminating TLS, for
//! `connection.sni` at the waypoint (Envoy's `tls_inspector`). The client's
//! first bytes are read into a bounded buffer under a deadline and parsed
//! here; the caller replays them upstream untouched.
//!
//! Hostile input is the normal case: every length is checked against what
//! remains, the handshake message is bounded ([`MAX_CLIENT_HELLO`]), and
//! anything that is not a well-formed ClientHello is an error (the caller
//! refuses the connection). Only what SNI needs is validated; the upstream
//! server judges the rest of the handshake.

use std::time::Duration;

use bytes::BytesMut;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest ClientHello handshake message accepted (Envoy's tls_inspector
/// default is 16 KiB too); a larger one is refused.
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// How long a client may take to send its ClientHello (Envoy's default
/// listener filter timeout).
pub const CLIENT_HELLO_TIMEOUT: Duration = Duration::from_secs(15);

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const NAME_TYPE_HOST: u8 = 0;
/// TLS 1.2/1.3 plaintext records carry at most 2^14 bytes.
const MAX_RECORD: usize = 1 << 14;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SniError {
    #[error("no TLS ClientHello within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete TLS ClientHello")]
    Closed,
    #[error("reading the TLS ClientHello: {0}")]
    Io(String),
    #[error("not a TLS handshake (first byte {0:#04x})")]
    NotTls(u8),
    #[error("TLS ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLarge,
    #[error("malformed TLS ClientHello: {0}")]
    Malformed(&'static str),
}

/// What the bytes read so far tell.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A complete ClientHello; its host name when it sent `server_name`.
    Done(Option<String>),
    /// At least this many bytes in total are needed to go on.
    NeedMore(usize),
}

/// Parses the start of a TLS connection (one or more handshake records
/// carrying the ClientHello).
pub fn parse(buf: &[u8]) -> Result<Parsed, SniError> {
    // Reassemble the handshake bytes of consecutive handshake records until
    // the ClientHello's length is known and present.
    let mut hs: Vec<u8> = Vec::new();
    let mut pos = 0;
    loop {
        let Some(hdr) = buf.get(pos..pos + 5) else {
            return Ok(Parsed::NeedMore(pos + 5));
        };
        if hdr[0] != CONTENT_HANDSHAKE {
            return Err(if pos == 0 {
                SniError::NotTls(hdr[0])
            } else {
                SniError::Malformed("non-handshake record inside the ClientHello")
            });
        }
        if hdr[1] != 3 {
            return Err(SniError::Malformed("record version is not 3.x"));
        }
        let len = usize::from(u16::from_be_bytes([hdr[3], hdr[4]]));
        if len == 0 || len > MAX_RECORD {
            return Err(SniError::Malformed("record length out of range"));
        }
        let Some(body) = buf.get(pos + 5..pos + 5 + len) else {
            return Ok(Parsed::NeedMore(pos + 5 + len));
        };
        hs.extend_from_slice(body);
        pos += 5 + len;
        if hs.len() >= 4 {
            if hs[0] != HANDSHAKE_CLIENT_HELLO {
                return Err(SniError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let msg_len =
                (usize::from(hs[1]) << 16) | (usize::from(hs[2]) << 8) | usize::from(hs[3]);
            if msg_len > MAX_CLIENT_HELLO {
                return Err(SniError::TooLarge);
            }
            if hs.len() >= 4 + msg_len {
                return client_hello(&hs[4..4 + msg_len]).map(Parsed::Done);
            }
        }
        if hs.len() > MAX_CLIENT_HELLO + 4 {
            return Err(SniError::TooLarge);
        }
    }
}

/// A cursor that refuses to read past its end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SniError> {
        if self.0.len() < n {
            return Err(SniError::Malformed("truncated field"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SniError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SniError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    /// A vector with a 1- or 2-byte length prefix.
    fn vec8(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u8()?;
        self.take(n.into())
    }
    fn vec16(&mut self) -> Result<&'a [u8], SniError> {
        let n = self.u16()?;
        self.take(n.into())
    }
}

/// The ClientHello body (RFC 8446 §4.1.2, RFC 5246 §7.4.1.2).
fn client_hello(body: &[u8]) -> Result<Option<String>, SniError> {
    let mut r = Reader(body);
    let version = r.u16()?;
    if version >> 8 != 3 {
        return Err(SniError::Malformed("client version is not 3.x"));
    }
    r.take(32)?; // random
    if r.vec8()?.len() > 32 {
        return Err(SniError::Malformed("session id longer than 32 bytes"));
    }
    let suites = r.vec16()?;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(SniError::Malformed("bad cipher suite list"));
    }
    if r.vec8()?.is_empty() {
        return Err(SniError::Malformed("no compression method"));
    }
    if r.0.is_empty() {
        return Ok(None); // no extensions at all (old clients)
    }
    let exts = r.vec16()?;
    if !r.0.is_empty() {
        return Err(SniError::Malformed("bytes after the extensions"));
    }
    let mut r = Reader(exts);
    let mut seen: Vec<u16> = Vec::new();
    let mut sni = None;
    while !r.0.is_empty() {
        let ty = r.u16()?;
        let data = r.vec16()?;
        if seen.contains(&ty) {
            return Err(SniError::Malformed("duplicate extension"));
        }
        seen.push(ty);
        if ty == EXT_SERVER_NAME {
            sni = server_name(data)?;
        }
    }
    Ok(sni)
}

/// The `server_name` extension (RFC 6066 §3): one `host_name` at most.
fn server_name(data: &[u8]) -> Result<Option<String>, SniError> {
    if data.is_empty() {
        // Servers send it empty; a client must not. Treat as absent.
        return Ok(None);
    }
    let mut outer = Reader(data);
    let list = outer.vec16()?;
    if !outer.0.is_empty() || list.is_empty() {
        return Err(SniError::Malformed("bad server_name list"));
    }
    let mut r = Reader(list);
    let mut host = None;
    while !r.0.is_empty() {
        let ty = r.u8()?;
        let name = r.vec16()?;
        if ty != NAME_TYPE_HOST {
            continue; // unknown name types are skipped, as RFC 6066 allows
        }
        if host.is_some() {
            return Err(SniError::Malformed("more than one host_name"));
        }
        if name.is_empty() || name.len() > 255 {
            return Err(SniError::Malformed("host_name length out of range"));
        }
        // A DNS name in ASCII; anything else cannot be a ServiceEntry host
        // and must not reach logs or policy matching as-is.
        if !name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'*'))
        {
            return Err(SniError::Malformed("host_name is not a DNS name"));
        }
        // Checked ASCII above.
        host = Some(String::from_utf8_lossy(name).into_owned());
    }
    Ok(host)
}

/// Reads the client's ClientHello from `io` (at most
/// [`MAX_CLIENT_HELLO`] plus record headers, within `timeout`). Returns the
/// bytes read (to be replayed upstream) and the SNI.
pub async fn read_client_hello<R: AsyncRead + Unpin>(
    io: &mut R,
    timeout: Duration,
) -> Result<(BytesMut, Option<String>), SniError> {
    let mut buf = BytesMut::with_capacity(1024);
    let work = async {
        loop {
            let need = match parse(&buf)? {
                Parsed::Done(sni) => return Ok(sni),
                Parsed::NeedMore(n) => n,
            };
            // Bounded by `parse`: records are at most 2^14 and the message
            // at most MAX_CLIENT_HELLO, so `need` stays small.
            let want = need.saturating_sub(buf.len()).max(1);
            buf.reserve(want);
            let mut chunk = vec![0u8; want.min(MAX_RECORD + 5)];
            match io.read(&mut chunk).await {
                Ok(0) => return Err(SniError::Closed),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) => return Err(SniError::Io(e.to_string())),
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(sni)) => Ok((buf, sni)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(SniError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as rustls sends it, for `name`.
    fn rustls_hello(name: &str) -> Vec<u8> {
        use std::sync::Arc;
        let mut roots = rustls::RootCertStore::empty();
        let _ = &mut roots;
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let server = rustls::pki_types::ServerName::try_from(name.to_string()).expect("name");
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).expect("client");
        let mut out = Vec::new();
        conn.write_tls(&mut out).expect("hello");
        out
    }

    /// A hand-made ClientHello with the given extensions block.
    fn hello_with(exts: &[u8]) -> Vec<u8> {
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7u8; 32]);
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x13, 0x01]); // one suite
        body.extend_from_slice(&[1, 0]); // null compression
        body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
        body.extend_from_slice(exts);
        let mut hs = vec![HANDSHAKE_CLIENT_HELLO, 0, 0, 0];
        let n = body.len();
        hs[1..4].copy_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
        hs.extend_from_slice(&body);
        record(&hs)
    }

    fn record(payload: &[u8]) -> Vec<u8> {
        let mut r = vec![CONTENT_HANDSHAKE, 3, 1];
        r.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        r.extend_from_slice(payload);
        r
    }

    fn sni_ext(names: &[(u8, &[u8])]) -> Vec<u8> {
        let mut list = Vec::new();
        for (ty, n) in names {
            list.push(*ty);
            list.extend_from_slice(&(n.len() as u16).to_be_bytes());
            list.extend_from_slice(n);
        }
        let mut data = (list.len() as u16).to_be_bytes().to_vec();
        data.extend_from_slice(&list);
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(data.len() as u16).to_be_bytes());
        ext.extend_from_slice(&data);
        ext
    }

    #[test]
    fn reads_the_sni_rustls_sends() {
        let h = rustls_hello("api.example.com");
        assert_eq!(parse(&h), Ok(Parsed::Done(Some("api.example.com".into()))));
    }

    #[test]
    fn asks_for_more_bytes_until_the_hello_is_complete() {
        let h = rustls_hello("httpbin.org");
        for cut in [0, 1, 4, 5, 6, 40, h.len() - 1] {
            assert!(
                matches!(parse(&h[..cut]), Ok(Parsed::NeedMore(n)) if n > cut),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn reassembles_a_hello_split_over_records() {
        let h = hello_with(&sni_ext(&[(0, b"split.example")]));
        let hs = &h[5..];
        let mut two = record(&hs[..10]);
        two.extend_from_slice(&record(&hs[10..]));
        assert_eq!(parse(&two), Ok(Parsed::Done(Some("split.example".into()))));
    }

    #[test]
    fn a_hello_without_server_name_has_no_sni() {
        assert_eq!(parse(&hello_with(&[])), Ok(Parsed::Done(None)));
        // Another extension only (supported_groups).
        assert_eq!(
            parse(&hello_with(&[0, 10, 0, 4, 0, 2, 0, 29])),
            Ok(Parsed::Done(None))
        );
    }

    #[test]
    fn refuses_what_is_not_a_client_hello() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n"), Err(SniError::NotTls(b'G')));
        // Alert record.
        assert_eq!(parse(&[21, 3, 3, 0, 2, 2, 40]), Err(SniError::NotTls(21)));
        // ServerHello instead of ClientHello.
        let mut h = hello_with(&[]);
        h[5] = 2;
        assert!(matches!(parse(&h), Err(SniError::Malformed(_))));
        // Zero-length and oversized records.
        assert!(matches!(
            parse(&[22, 3, 1, 0, 0]),
            Err(SniError::Malformed(_))
        ));
        assert!(matches!(
            parse(&[22, 3, 1, 0x40, 1]),
            Err(SniError::Malformed(_))
        ));
        // SSLv2-style version byte.
        assert!(matches!(
            parse(&[22, 2, 0, 0, 5]),
            Err(SniError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_a_hello_larger_than_the_bound() {
        let n = MAX_CLIENT_HELLO + 1;
        let hs = [
            HANDSHAKE_CLIENT_HELLO,
            (n >> 16) as u8,
            (n >> 8) as u8,
            n as u8,
        ];
        assert_eq!(parse(&record(&hs)), Err(SniError::TooLarge));
    }

    #[test]
    fn refuses_malformed_server_names() {
        let bad: &[Vec<u8>] = &[
            sni_ext(&[(0, b"a.example"), (0, b"b.example")]),
            sni_ext(&[(0, b"")]),
            sni_ext(&[(0, b"evil\x00.example")]),
            sni_ext(&[(0, b"sp ace.example")]),
            sni_ext(&[(0, "caf\u{e9}.example".as_bytes())]),
            sni_ext(&[(0, &[b'a'; 256])]),
            // Extension length larger than the data.
            vec![0, 0, 0, 9, 0, 1],
            // Duplicate server_name extension.
            [sni_ext(&[(0, b"a.example")]), sni_ext(&[(0, b"a.example")])].concat(),
        ];
        for (i, exts) in bad.iter().enumerate() {
            assert!(
                matches!(parse(&hello_with(exts)), Err(SniError::Malformed(_))),
                "case {i}: {:?}",
                parse(&hello_with(exts))
            );
        }
        // An unknown name type is skipped.
        assert_eq!(
            parse(&hello_with(&sni_ext(&[(7, b"x"), (0, b"ok.example")]))),
            Ok(Parsed::Done(Some("ok.example".into())))
        );
    }

    #[test]
    fn truncated_inner_lengths_are_malformed_not_a_panic() {
        let h = hello_with(&sni_ext(&[(0, b"httpbin.org")]));
        // Shrink the handshake length field so the body is cut short at
        // every possible point: each must be an error or NeedMore, never a
        // panic or a wrong name.
        for cut in 0..h.len() - 9 {
            let mut m = h.clone();
            let body = (m.len() - 9 - cut) as u32;
            m[6..9].copy_from_slice(&body.to_be_bytes()[1..]);
            let rec = (m.len() - 5 - cut) as u16;
            m[3..5].copy_from_slice(&rec.to_be_bytes());
            m.truncate(m.len() - cut);
            if let Ok(Parsed::Done(Some(n))) = parse(&m) {
                assert_eq!(n, "httpbin.org", "cut {cut}");
            }
        }
    }

    #[tokio::test]
    async fn reading_stops_at_the_deadline_or_on_close() {
        let (mut a, b) = tokio::io::duplex(64);
        let t = Duration::from_millis(50);
        let r = read_client_hello(&mut a, t).await;
        assert_eq!(r.err(), Some(SniError::Timeout(t)));
        drop(b);
        let r = read_client_hello(&mut a, t).await;
        assert_eq!(r.err(), Some(SniError::Closed));
    }

    #[tokio::test]
    async fn reading_returns_every_byte_read_for_replay() {
        let h = rustls_hello("replay.example");
        let (mut a, mut b) = tokio::io::duplex(64 * 1024);
        let mut sent = h.clone();
        sent.extend_from_slice(b"early data the server must still see");
        tokio::io::AsyncWriteExt::write_all(&mut b, &sent)
            .await
            .unwrap();
        let (buf, sni) = read_client_hello(&mut a, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(sni.as_deref(), Some("replay.example"));
        // Everything read is returned; nothing past it was consumed.
        assert!(sent.starts_with(&buf) && buf.len() >= h.len());
        let mut rest = vec![0u8; sent.len() - buf.len()];
        tokio::io::AsyncReadExt::read_exact(&mut a, &mut rest)
            .await
            .unwrap();
        assert_eq!([&buf[..], &rest[..]].concat(), sent);
    }
}

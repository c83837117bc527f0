//! Request normalization applied before any policy matching. The path is
//! normalized as Envoy does under Istio's MeshConfig
//! `pathNormalization.normalization` ([`PathNormalization`]), and the
//! normalized path is also what goes upstream, so that the policy and the
//! upstream see the same path. The Host is only lower-cased: Istio matches
//! `hosts` against the `:authority` as received (port and trailing dot
//! significant), case-insensitively.

use std::borrow::Cow;

use thiserror::Error;

pub use crate::config::PathNormalization;

/// Request paths that reach the upstream as a path a DENY `paths` rule
/// names while not matching it at the waypoint under `mode`; `None` when
/// there is no known class.
pub fn path_weakness(mode: PathNormalization) -> Option<&'static str> {
    match mode {
        PathNormalization::None => Some("no normalization: `/a/../admin`, `//admin`, `/%61dmin` and `/admin%2F` all bypass it"),
        PathNormalization::Base => Some("BASE keeps repeated and escaped slashes: `//admin` and `/%2Fadmin` bypass it when the upstream merges or decodes them"),
        PathNormalization::MergeSlashes => Some("MERGE_SLASHES keeps escaped slashes: `/%2Fadmin` bypasses it when the upstream decodes `%2F`"),
        PathNormalization::DecodeAndMergeSlashes => None,
    }
}

/// A request target that cannot be normalized; the HTTP layer answers 400.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PathError {
    #[error("invalid percent-escape at byte {offset} of the request path")]
    InvalidEscape { offset: usize },
    #[error("request path must start with '/' (got {0:?})")]
    NotAbsolute(String),
}

/// Ambiguous HTTP/1.1 message framing (request smuggling); the HTTP layer
/// answers 400 and closes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FramingError {
    #[error("both Content-Length and Transfer-Encoding are present")]
    ContentLengthWithTransferEncoding,
    #[error("more than one Content-Length value")]
    DuplicateContentLength,
    #[error("invalid Content-Length value {0:?}")]
    InvalidContentLength(String),
    #[error("Transfer-Encoding {0:?} does not end with a single 'chunked'")]
    BadTransferEncoding(String),
}

/// How the body of an HTTP/1.1 request is delimited, once unambiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Neither header: no body.
    None,
    ContentLength(u64),
    Chunked,
}

#[inline]
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[inline]
fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether the path is already in normal form (the common case): no escape,
/// no backslash, no `.` or `..` segment, and (when slashes are merged) no
/// empty segment.
fn is_normal(p: &str, merge: bool) -> bool {
    let b = p.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    if b.iter().any(|&c| c == b'%' || c == b'\\') {
        return false;
    }
    // Segments after the leading '/'; the last one may be empty (trailing '/').
    let mut segs = p[1..].split('/').peekable();
    while let Some(s) = segs.next() {
        let last = segs.peek().is_none();
        if (merge && s.is_empty() && !last) || s == "." || s == ".." {
            return false;
        }
    }
    true
}

/// Normalizes a request target (`/path?query#fragment`) into the path that
/// policies match and that is sent upstream, as Envoy does under `mode`.
/// Query and fragment are always dropped (the caller re-appends the query
/// upstream). From `BASE` on: unreserved escapes decoded, other escapes
/// upper-cased, `\` treated as `/`, dot segments resolved (never above
/// root), a trailing slash kept; `MERGE_SLASHES` then merges repeated
/// slashes; `DECODE_AND_MERGE_SLASHES` first turns `%2F`/`%5C` into `/`.
/// Borrows when nothing changes.
pub fn normalize_path(target: &str, mode: PathNormalization) -> Result<Cow<'_, str>, PathError> {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let p = &target[..end];
    if p.is_empty() {
        return Ok(Cow::Borrowed("/"));
    }
    if p == "*" || mode == PathNormalization::None {
        // `*`: OPTIONS * (asterisk-form); matches only `*`-style patterns.
        return Ok(Cow::Borrowed(p));
    }
    let merge = mode != PathNormalization::Base;
    let decode_slashes = mode == PathNormalization::DecodeAndMergeSlashes;
    if is_normal(p, merge) {
        return Ok(Cow::Borrowed(p));
    }
    let b = p.as_bytes();
    // Pass 1: un-escape what RFC 3986 allows (and escaped slashes when asked),
    // and read a backslash as '/'.
    let mut dec: Vec<u8> = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'%' => {
                let (h, l) = match (
                    b.get(i + 1).and_then(|&x| hex(x)),
                    b.get(i + 2).and_then(|&x| hex(x)),
                ) {
                    (Some(h), Some(l)) => (h, l),
                    _ => return Err(PathError::InvalidEscape { offset: i }),
                };
                let v = h * 16 + l;
                if decode_slashes && (v == b'/' || v == b'\\') {
                    dec.push(b'/');
                } else if is_unreserved(v) {
                    dec.push(v);
                } else {
                    // Keep the escape, in one canonical spelling.
                    dec.push(b'%');
                    dec.push(b"0123456789ABCDEF"[(v >> 4) as usize]);
                    dec.push(b"0123456789ABCDEF"[(v & 15) as usize]);
                }
                i += 3;
            }
            b'\\' => {
                dec.push(b'/');
                i += 1;
            }
            _ => {
                dec.push(c);
                i += 1;
            }
        }
    }
    if dec.first() != Some(&b'/') {
        return Err(PathError::NotAbsolute(p.to_string()));
    }
    // Pass 2: RFC 3986 remove_dot_segments (empty segments are segments).
    let mut out: Vec<&[u8]> = Vec::new();
    let mut segs = dec[1..].split(|&c| c == b'/').peekable();
    while let Some(s) = segs.next() {
        let last = segs.peek().is_none();
        match s {
            b"." => {}
            b".." => {
                out.pop();
            }
            _ => {
                out.push(s);
                continue;
            }
        }
        if last {
            out.push(b""); // `/a/.` and `/a/b/..` end with a slash
        }
    }
    let mut res: Vec<u8> = Vec::with_capacity(dec.len());
    for s in &out {
        // Pass 3 (merge): a slash never follows a slash.
        if !(merge && res.last() == Some(&b'/')) {
            res.push(b'/');
        }
        res.extend_from_slice(s);
    }
    if res.is_empty() {
        res.push(b'/');
    }
    // Only ASCII was substituted, so the path stays valid UTF-8.
    String::from_utf8(res)
        .map(Cow::Owned)
        .map_err(|_| PathError::NotAbsolute(p.to_string()))
}

/// Lower-cases a Host/`:authority` for matching, as Envoy's case-insensitive
/// header match sees it; port and trailing dot are kept (Istio: `hosts:
/// [httpbin.org]` does not match `httpbin.org:80` nor `httpbin.org.`).
pub fn normalize_host(host: &str) -> Cow<'_, str> {
    if host.bytes().any(|c| c.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Checks the framing headers of an HTTP/1.1 request (names in any case).
/// Rejects what request smuggling relies on: Content-Length together with
/// Transfer-Encoding, more than one Content-Length (even equal ones, and
/// `5, 5` lists), a non-numeric length, and a Transfer-Encoding whose last
/// coding is not a single `chunked`.
pub fn check_framing<'a, I>(headers: I) -> Result<Framing, FramingError>
where
    I: IntoIterator<Item = (&'a str, &'a [u8])>,
{
    let mut cl: Option<u64> = None;
    let mut te_seen = false;
    let mut te_chunked_last = false;
    let mut te_chunked_count = 0usize;
    let mut te_bad: Option<String> = None;
    for (name, value) in headers {
        if name.eq_ignore_ascii_case("content-length") {
            let s = String::from_utf8_lossy(value);
            let v = s.trim_matches([' ', '\t']);
            if v.is_empty() || !v.bytes().all(|c| c.is_ascii_digit()) {
                if v.contains(',') {
                    return Err(FramingError::DuplicateContentLength);
                }
                return Err(FramingError::InvalidContentLength(s.into_owned()));
            }
            let n: u64 = v
                .parse()
                .map_err(|_| FramingError::InvalidContentLength(s.to_string()))?;
            if cl.is_some() {
                return Err(FramingError::DuplicateContentLength);
            }
            cl = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            te_seen = true;
            let s = String::from_utf8_lossy(value);
            for coding in s.split(',') {
                let c = coding.trim_matches([' ', '\t']);
                if c.is_empty() {
                    te_bad.get_or_insert_with(|| s.to_string());
                    continue;
                }
                // Parameters (`;q=`) are not allowed on chunked; compare the whole token.
                if c.eq_ignore_ascii_case("chunked") {
                    te_chunked_count += 1;
                    te_chunked_last = true;
                } else {
                    te_chunked_last = false;
                    te_bad.get_or_insert_with(|| s.to_string());
                }
            }
        }
    }
    match (cl, te_seen) {
        (Some(_), true) => Err(FramingError::ContentLengthWithTransferEncoding),
        (Some(n), false) => Ok(Framing::ContentLength(n)),
        (None, true) => {
            if te_chunked_last && te_chunked_count == 1 && te_bad.is_none() {
                Ok(Framing::Chunked)
            } else {
                Err(FramingError::BadTransferEncoding(
                    te_bad.unwrap_or_else(|| "chunked (more than once)".into()),
                ))
            }
        }
        (None, false) => Ok(Framing::None),
    }
}

//! HBONE `CONNECT` request and authority parsing: what a mesh client (any
//! holder of a certificate) puts in a stream's HEADERS. Input: lines
//! `method`, `uri`, then optional `Forwarded` values; the first byte picks
//! the TCP peer's family.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use shunt_agent::fuzzing::hbone_connect;
use shunt_agent::hbone::{format_forwarded, parse_forwarded};

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let peer: SocketAddr = if first & 1 == 0 {
        "10.244.1.19:40000".parse().unwrap()
    } else {
        "[fd00::19]:40000".parse().unwrap()
    };
    let mut lines = rest.split(|&b| b == b'\n');
    let method = lines.next().unwrap_or_default();
    let uri = lines.next().unwrap_or_default();
    // As h2 hands it over: only what `http` accepts reaches the server.
    let mut b = http::Request::builder().method(method).uri(uri);
    let mut forwarded = 0;
    for v in lines {
        b = b.header(http::header::FORWARDED, v);
        forwarded += 1;
    }
    let Ok(req) = b.body(()) else { return };
    let (parts, ()) = req.into_parts();
    let Ok(t) = hbone_connect(&parts, peer) else {
        return;
    };
    assert_eq!(parts.method, http::Method::CONNECT);
    let auth = parts.uri.authority().expect("accepted without authority");
    assert_eq!(Ok(t.authority), auth.as_str().parse::<SocketAddr>());
    if forwarded == 0 {
        assert_eq!(t.source, peer);
        assert_eq!(t.forwarded_host, None);
    }
    // What the agent formats, the server reads back unchanged.
    let v = format_forwarded(t.source, None).expect("an address is a header value");
    assert_eq!(parse_forwarded(v.to_str().unwrap()), Ok(Some(t.source)));
});

//! `Forwarded` / `baggage` and identity parsing: the claimed source a
//! waypoint believes (waypoint/source.rs), SPIFFE IDs from principals and
//! certificate SANs (identity/), the baggage the agent formats. The first
//! byte picks the part; the rest is its input.
#![no_main]

use std::net::SocketAddr;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rustls_pki_types::CertificateDer;
use shunt_agent::fuzzing::{self, ConnectTarget};
use shunt_agent::hbone::{parse_forwarded, Baggage};
use shunt_agent::identity::{spiffe_ids, SpiffeId};
use shunt_agent::model::Model;

/// The seed's config: curl and admin workloads, one waypoint.
fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let ex = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/egress/");
        let files: Vec<(String, Vec<u8>)> = std::fs::read_dir(ex)
            .expect("examples/egress")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
            .map(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read(&p).unwrap())
            })
            .collect();
        let refs: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        fuzzing::model(&refs).expect("the example config builds")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 4 {
        0 => forwarded(rest),
        1 => {
            if let Ok(s) = std::str::from_utf8(rest) {
                spiffe(s)
            }
        }
        2 => {
            // Whatever the DER, at most a list of valid IDs.
            if let Ok(ids) = spiffe_ids(&CertificateDer::from(rest)) {
                for id in ids {
                    assert_eq!(id.uri().parse::<SpiffeId>().as_ref().ok(), Some(&id));
                }
            }
        }
        _ => baggage(rest),
    }
});

fn forwarded(rest: &[u8]) {
    let Ok(v) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(header) = http::HeaderValue::from_str(v) else {
        return;
    };
    let peer: SocketAddr = "10.244.1.100:50000".parse().unwrap();
    let parts = http::Request::builder()
        .method("CONNECT")
        .uri("240.240.0.1:80")
        .header(http::header::FORWARDED, header)
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let parsed = parse_forwarded(v);
    let Ok(t) = fuzzing::hbone_connect(&parts, peer) else {
        // Not visible ASCII (obs-text) is refused as a whole.
        let text = parts.headers[http::header::FORWARDED].to_str().is_ok();
        assert!(
            parsed.is_err() || !text,
            "the server refused what parse_forwarded accepts"
        );
        return;
    };
    assert_eq!(t.source, parsed.unwrap().unwrap_or(peer));
    for sa in ["curl", "admin", "other"] {
        let id = SpiffeId::new("cluster.local", "default", sa).unwrap();
        let believed = fuzzing::trusted_source(model(), id.clone(), peer, &t);
        check_believed(&t, peer, &id, believed);
    }
}

/// The waypoint believes a claim only for an address of a workload whose
/// identity is the certificate's; otherwise the TCP peer.
fn check_believed(t: &ConnectTarget, peer: SocketAddr, id: &SpiffeId, believed: SocketAddr) {
    if believed == peer {
        return;
    }
    assert_eq!(believed, t.source);
    let w = model()
        .workload_by_addr(believed.ip())
        .expect("believed an address of no workload");
    assert_eq!(&w.identity, id, "believed another identity's workload");
}

fn spiffe(s: &str) {
    if let Ok(id) = s.parse::<SpiffeId>() {
        assert_eq!(id.uri().parse::<SpiffeId>().as_ref().ok(), Some(&id));
        assert_eq!(
            SpiffeId::from_principal(&id.principal()).ok().as_ref(),
            Some(&id)
        );
    }
    if let Ok(id) = SpiffeId::from_principal(s) {
        assert_eq!(id.uri().parse::<SpiffeId>().ok().as_ref(), Some(&id));
    }
}

fn baggage(rest: &[u8]) {
    let s = String::from_utf8_lossy(rest);
    let mut f = s.split('\n').map(|p| Some(p.to_string()));
    let b = Baggage {
        cluster: f.next().flatten(),
        namespace: f.next().flatten(),
        workload_kind: f.next().flatten(),
        workload_name: f.next().flatten(),
        service_name: f.next().flatten(),
        service_version: f.next().flatten(),
    };
    // Either a header value or an error, never a panic.
    if let Ok(v) = b.to_header() {
        assert!(v.to_str().is_ok() || !v.as_bytes().is_ascii());
    }
}

//! `shunt status` on the built binary: no agent installed, broken pins, and
//! the readiness probe against the real admin server. (Live pins need the
//! kernel wiring and are covered by the lead's kernel tests.)

mod common;

use std::path::Path;
use std::process::Output;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use common::shunt;
use shunt_agent::admin::{AdminServer, Endpoints};

/// `shunt status --pin-dir PINS --state-dir STATE ARGS`.
fn status(pins: &Path, state: &Path, args: &[&str]) -> Output {
    let mut a = vec![
        "status",
        "--pin-dir",
        pins.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    shunt(&a)
}

#[test]
fn status_without_agent_is_one_sentence() {
    let pins = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let out = status(pins.path(), state.path(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("the agent is not installed"), "{err}");
    assert!(err.contains(pins.path().to_str().unwrap()), "{err}");
    // A pin dir that does not exist at all reads the same.
    let out = shunt(&["status", "--pin-dir", "/nonexistent/shunt-pins"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not installed"));
}

#[test]
fn status_with_broken_pins_is_not_healthy() {
    // Files named like shunt's pins on a non-bpf filesystem: "installed",
    // but no live link and no readable map.
    let pins = fake_pins();
    let state = tempfile::tempdir().unwrap();
    std::fs::write(pins.path().join("meta"), "").unwrap();
    std::fs::write(state.path().join("agent.pid"), "999999999\n").unwrap();
    let out = status(
        pins.path(),
        state.path(),
        &["--ready", "127.0.0.1:1", "-o", "json"],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["healthy"], false);
    assert_eq!(v["agent"]["pid"], 999999999);
    assert_eq!(v["agent"]["running"], false);
    assert!(v["ready"]["code"].is_null());
    let progs = v["programs"].as_array().unwrap();
    assert!(progs.iter().all(|p| p["alive"] == false));
    assert!(progs.iter().any(|p| p["program"] == "shunt_sk_lookup"
        && p["error"].as_str().unwrap().contains("not a live link")));
    assert!(v["maps"].is_null());
    let problems: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    assert!(
        problems.iter().any(|p| p.contains("not running")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("cannot read the pinned maps")),
        "{problems:?}"
    );
    // Text form: one headline that says so.
    let out = status(pins.path(), state.path(), &["--ready", "127.0.0.1:1"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.starts_with("shunt agent: NOT HEALTHY\n"), "{text}");
}

/// Files named like shunt's pins on a non-bpf filesystem.
fn fake_pins() -> tempfile::TempDir {
    let pins = tempfile::tempdir().unwrap();
    std::fs::write(pins.path().join("link_shunt_sk_lookup"), "").unwrap();
    pins
}

#[test]
fn ready_endpoint_answer_is_reported() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pins = fake_pins();
    let state = tempfile::tempdir().unwrap();
    for (ready, code) in [(false, 503), (true, 200)] {
        let server = rt
            .block_on(AdminServer::bind(
                "127.0.0.1:0".parse().unwrap(),
                Endpoints {
                    ready: Some(Arc::new(AtomicBool::new(ready))),
                    ..Default::default()
                },
            ))
            .unwrap();
        let addr = server.local_addr().to_string();
        let out = status(pins.path(), state.path(), &["--ready", &addr, "-o", "json"]);
        // Unhealthy either way here (no live links), but the probe result
        // is reported as the server answered.
        assert_eq!(out.status.code(), Some(1));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ready"]["code"], code, "{v}");
        let not_ready = v["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("answered 503"));
        assert_eq!(not_ready, !ready, "{v}");
        drop(server);
    }
}

#[test]
fn a_netns_that_cannot_be_entered_is_one_sentence() {
    let pins = fake_pins();
    let state = tempfile::tempdir().unwrap();
    // A bare name is one of `ip netns`' (/run/netns/NAME).
    let out = status(
        pins.path(),
        state.path(),
        &["--netns", "shunt-no-such-netns"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("cannot enter the network namespace /run/netns/shunt-no-such-netns"),
        "{err}"
    );
}

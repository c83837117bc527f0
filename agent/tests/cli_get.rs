//! `shunt get` on the seed's config with a state directory written by the
//! real allocator (as the agent would), read back by the built binary.

mod common;

use std::path::Path;

use common::{shunt, shunt_text};
use shunt_agent::{alloc::Allocator, config::Config};
use shunt_testbed::seed::dir as seed;

fn allocated_state() -> tempfile::TempDir {
    let state = tempfile::tempdir().unwrap();
    let cfg = Config::load_dir(&seed()).unwrap();
    Allocator::open(state.path())
        .unwrap()
        .allocate(&cfg)
        .unwrap();
    state
}

fn get(args: &[&str], state: &Path) -> (String, String, i32) {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    let seed = seed();
    a.extend(["--config-dir", seed.to_str().unwrap()]);
    a.extend(["--state-dir", state.to_str().unwrap()]);
    shunt_text(&a)
}

#[test]
fn se_yaml_shows_istio_status() {
    let state = allocated_state();
    let (out, err, code) = get(
        &[
            "se",
            "httpbin.org",
            "-n",
            "common-infrastructure",
            "-o",
            "yaml",
        ],
        state.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "no warnings expected: {err}");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(v["kind"].as_str(), Some("ServiceEntry"));
    assert_eq!(v["metadata"]["name"].as_str(), Some("httpbin.org"));
    let addrs: Vec<(&str, &str)> = v["status"]["addresses"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| (a["host"].as_str().unwrap(), a["value"].as_str().unwrap()))
        .collect();
    assert_eq!(
        addrs,
        vec![("httpbin.org", "240.240.0.1"), ("httpbin.org", "2001:2::1")]
    );
    let c = &v["status"]["conditions"][0];
    assert_eq!(c["type"].as_str(), Some("istio.io/WaypointBound"));
    assert_eq!(c["status"].as_str(), Some("True"));
    assert_eq!(c["reason"].as_str(), Some("WaypointAccepted"));
    assert_eq!(
        c["message"].as_str(),
        Some("Successfully attached to waypoint common-infrastructure/egress-gateway")
    );
    assert!(c["lastTransitionTime"]
        .as_str()
        .is_some_and(|t| t.ends_with('Z')));
    // Shaped like the seed's `kubectl get -oyaml` (status block in this order).
    assert!(out.contains(
        "status:\n  addresses:\n  - host: httpbin.org\n    value: 240.240.0.1\n  - host: httpbin.org\n    value: 2001:2::1\n  conditions:\n  - lastTransitionTime:"
    ), "{out}");
}

#[test]
fn se_list_table_json_and_alias() {
    let state = allocated_state();
    let (table, _, code) = get(&["serviceentries"], state.path());
    assert_eq!(code, 0);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAMESPACE"), "{table}");
    assert!(lines[1].contains("httpbin.org") && lines[1].contains("240.240.0.1,2001:2::1"));
    assert!(
        lines[1].contains("common-infrastructure/egress-gateway") && lines[1].ends_with("True")
    );

    let (json, _, code) = get(&["se", "-A", "-o", "json"], state.path());
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"], "List");
    assert_eq!(
        v["items"][0]["status"]["addresses"][0]["value"],
        "240.240.0.1"
    );

    let (wide, _, _) = get(&["se", "-o", "wide"], state.path());
    assert!(
        wide.contains("80/HTTP") && wide.contains("WaypointAccepted"),
        "{wide}"
    );

    // A namespace without entries lists nothing; a missing name is an error.
    let (out, err, code) = get(&["se", "-n", "default"], state.path());
    assert_eq!((out.as_str(), code), ("", 0));
    assert!(err.contains("No ServiceEntries found"));
    let (_, err, code) = get(&["se", "nope"], state.path());
    assert_eq!(code, 1);
    assert!(err.contains("no ServiceEntry \"nope\""), "{err}");
}

#[test]
fn never_allocated_entry_shows_no_addresses_and_says_why() {
    let state = tempfile::tempdir().unwrap();
    let (out, err, code) = get(&["se", "-o", "yaml"], state.path());
    assert_eq!(code, 0);
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert!(v["items"][0]["status"]["addresses"].is_null(), "{out}");
    // Binding does not need an allocation.
    assert_eq!(
        v["items"][0]["status"]["conditions"][0]["reason"].as_str(),
        Some("WaypointAccepted")
    );
    assert!(
        err.contains("ServiceEntry common-infrastructure/httpbin.org has no addresses yet"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("vips.json") && err.contains("shunt agent"),
        "{err}"
    );
    // Reading never allocates.
    assert!(!state.path().join("vips.json").exists());
}

#[test]
fn entry_added_after_allocation_is_named() {
    // The agent allocated for the seed; then a new entry appeared.
    let state = allocated_state();
    let cfg = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(seed()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, cfg.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        cfg.path().join("10-new.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: new\n  namespace: default\nspec:\n  hosts: [new.example.com]\n  ports:\n  - number: 443\n    name: tls\n  resolution: DNS\n",
    )
    .unwrap();
    let out = shunt(&[
        "get",
        "se",
        "--config-dir",
        cfg.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("ServiceEntry default/new has no addresses yet"),
        "{err}"
    );
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("240.240.0.1,2001:2::1"), "{table}");
}

#[test]
fn workloads_waypoints_and_policies() {
    let state = allocated_state();
    let (out, _, code) = get(&["workloadentries", "-o", "wide"], state.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("10.244.1.19") && out.contains("spiffe://cluster.local/ns/default/sa/curl"),
        "{out}"
    );
    assert!(out.contains("shunt/admin"), "{out}");

    let (out, _, code) = get(&["waypoints", "-o", "wide"], state.path());
    assert_eq!(code, 0);
    let row = out.lines().nth(1).unwrap();
    assert!(
        row.contains("egress-gateway") && row.contains("10.244.1.18:15008"),
        "{out}"
    );
    assert!(row.contains("common-infrastructure/httpbin.org"), "{out}");
    assert!(row.contains("spiffe://cluster.local/ns/common-infrastructure/sa/egress-gateway"));

    let (out, _, code) = get(&["ap"], state.path());
    assert_eq!(code, 0);
    assert!(
        out.contains("httpbin")
            && out.contains("ALLOW")
            && out.contains("ServiceEntry/httpbin.org"),
        "{out}"
    );
}

#[test]
fn invalid_config_is_one_sentence_pointing_at_config_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/config-check/bad-port");
    let state = tempfile::tempdir().unwrap();
    let out = shunt(&[
        "get",
        "se",
        "--config-dir",
        dir.to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("shunt config check"), "{err}");
}

/// A copy of the seed's config directory.
fn seed_copy() -> tempfile::TempDir {
    let cfg = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(seed()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            std::fs::copy(&p, cfg.path().join(p.file_name().unwrap())).unwrap();
        }
    }
    cfg
}

/// The agent's admin listener serving `cfg` as the config in force.
fn agent_admin(rt: &tokio::runtime::Runtime, cfg: Config) -> shunt_agent::admin::AdminServer {
    let cfg = std::sync::Arc::new(cfg);
    rt.block_on(shunt_agent::admin::AdminServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        shunt_agent::admin::Endpoints {
            config: Some(std::sync::Arc::new(move || cfg.clone())),
            ..Default::default()
        },
    ))
    .unwrap()
}

fn get_from(dir: &Path, state: &Path, admin: &str, args: &[&str]) -> (String, String, i32) {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend(["--config-dir", dir.to_str().unwrap()]);
    a.extend(["--state-dir", state.to_str().unwrap()]);
    a.extend(["--admin-addr", admin]);
    let out = shunt(&a);
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap(),
    )
}

#[test]
fn a_broken_file_in_the_directory_still_shows_the_config_in_force_and_says_so() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let state = allocated_state();
    let dir = seed_copy();
    let admin = agent_admin(&rt, Config::load_dir(dir.path()).unwrap());
    let addr = admin.local_addr().to_string();

    // Directory and agent agree: nothing on stderr.
    let (out, err, code) = get_from(dir.path(), state.path(), &addr, &["se"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    assert!(out.contains("httpbin.org"), "{out}");

    // One broken file: the agent keeps its config; `get` shows it.
    std::fs::write(
        dir.path().join("99-broken.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: broken\n  namespace: default\nspec:\n  hosts: [x.example.com]\n  ports:\n  - number: 99999\n    name: http\n",
    )
    .unwrap();
    let (out, err, code) = get_from(dir.path(), state.path(), &addr, &["se", "-o", "yaml"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_yaml_ng::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(
        v["items"][0]["metadata"]["name"].as_str(),
        Some("httpbin.org")
    );
    assert_eq!(
        v["items"][0]["status"]["addresses"][0]["value"].as_str(),
        Some("240.240.0.1")
    );
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("holds a newer, invalid version (1 problem")
            && err.contains("shunt config check")
            && err.contains("config in force"),
        "{err}"
    );

    // A valid edit the agent has not loaded: shown as in force, said on stderr.
    std::fs::remove_file(dir.path().join("99-broken.yaml")).unwrap();
    std::fs::write(
        dir.path().join("10-new.yaml"),
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: new\n  namespace: default\nspec:\n  hosts: [new.example.com]\n  ports:\n  - number: 443\n    name: tls\n  resolution: DNS\n",
    )
    .unwrap();
    let (out, err, code) = get_from(dir.path(), state.path(), &addr, &["se"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("new.example.com"), "{out}");
    assert!(err.contains("differs from the config in force"), "{err}");
}

#[test]
fn without_a_reachable_agent_a_broken_directory_says_both() {
    let state = tempfile::tempdir().unwrap();
    let dir = seed_copy();
    std::fs::write(dir.path().join("99-broken.yaml"), "kind: [unclosed\n").unwrap();
    // Port 1 on localhost: nothing listens.
    let (out, err, code) = get_from(dir.path(), state.path(), "127.0.0.1:1", &["se"]);
    assert_eq!((out.as_str(), code), ("", 1));
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("1 problem") && err.contains("127.0.0.1:1/config"),
        "{err}"
    );
}

#[test]
fn a_wildcard_entry_shows_its_addresses_and_bound_waypoint() {
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(seed()).unwrap().flatten() {
        if f.path().extension().is_some_and(|e| e == "yaml") {
            std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
        }
    }
    std::fs::copy(
        seed().join("https/05-wildcard.yaml"),
        dir.path().join("05-wildcard.yaml"),
    )
    .unwrap();
    let state = tempfile::tempdir().unwrap();
    let cfg = Config::load_dir(dir.path()).unwrap();
    Allocator::open(state.path())
        .unwrap()
        .allocate(&cfg)
        .unwrap();
    let out = shunt(&[
        "get",
        "se",
        "-n",
        "common-infrastructure",
        "--config-dir",
        dir.path().to_str().unwrap(),
        "--state-dir",
        state.path().to_str().unwrap(),
    ]);
    let table = String::from_utf8(out.stdout).unwrap();
    let line = table
        .lines()
        .find(|l| l.contains("example-wildcard"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains("*.example.com"), "{line}");
    assert!(
        line.contains("240.240.0.") && line.contains("2001:2::"),
        "{line}"
    );
    assert!(
        line.contains("common-infrastructure/egress-gateway") && line.ends_with("True"),
        "{line}"
    );
}

//! Golden-output tests for `shunt config check DIR`, run on the built binary.
//!
//! Each directory under `tests/golden/config-check/<case>/` holds a config
//! directory and `expected.txt` (stdout, then `exit: N`). A case may instead
//! name its config directory, relative to the workspace root, in
//! `config-dir.txt`. `UPDATE_GOLDEN=1 cargo test --test cli_config_check`
//! rewrites the expected files (review the diff before committing).

use std::path::{Path, PathBuf};
use std::process::Command;

fn golden_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/config-check")
}

fn run_case(case: &Path) -> String {
    let dir = match std::fs::read_to_string(case.join("config-dir.txt")) {
        Ok(rel) => Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(rel.trim()),
        Err(_) => case.to_path_buf(),
    };
    // expected.txt sits in the case directory but is not YAML, so the
    // loader skips it.
    let out = Command::new(env!("CARGO_BIN_EXE_shunt"))
        .args(["config", "check"])
        .arg(&dir)
        .env_remove("SHUNT_CONFIG_DIR")
        .output()
        .expect("run shunt");
    assert!(
        out.stderr.is_empty(),
        "{}: unexpected stderr: {}",
        case.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}exit: {}\n",
        String::from_utf8(out.stdout).expect("utf-8 output"),
        out.status.code().expect("exit code")
    )
}

#[test]
fn golden_outputs() {
    let mut cases: Vec<PathBuf> = std::fs::read_dir(golden_root())
        .expect("golden dir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    let required = [
        "yaml-syntax",
        "unknown-field",
        "bad-port",
        "bad-ip",
        "duplicate-object",
        "custom-policy",
        "unknown-when-key",
        "wildcard-waypoint",
        "many-errors",
        "valid-egress",
        "export-to-invalid",
        "fields-not-honoured",
    ];
    for r in required {
        assert!(
            cases.iter().any(|c| c.ends_with(r)),
            "golden case {r} is missing"
        );
    }
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let got = run_case(case);
        let expected_path = case.join("expected.txt");
        if update {
            std::fs::write(&expected_path, &got).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{} missing", expected_path.display()));
        if got != expected {
            failures.push(format!(
                "== {}\n-- expected\n{expected}-- got\n{got}",
                case.file_name().unwrap().to_string_lossy()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every error case exits 1 and the valid ones 0: checked apart from the
/// text so that a regenerated golden file cannot hide a wrong exit code.
#[test]
fn exit_codes() {
    for (case, code) in [
        ("yaml-syntax", 1),
        ("unknown-field", 1),
        ("bad-port", 1),
        ("bad-ip", 1),
        ("duplicate-object", 1),
        ("custom-policy", 1),
        ("unknown-when-key", 1),
        ("wildcard-waypoint", 1),
        ("many-errors", 1),
        ("unbound-waypoint", 0),
        ("valid-egress", 0),
    ] {
        let out = run_case(&golden_root().join(case));
        assert!(out.ends_with(&format!("exit: {code}\n")), "{case}: {out}");
    }
}

#[test]
fn error_lines_name_file_object_and_field() {
    let out = run_case(&golden_root().join("bad-port"));
    assert!(
        out.contains(
            "se.yaml: document 1 (ServiceEntry default/httpbin.org): spec.ports[0].number:"
        ),
        "{out}"
    );
    let out = run_case(&golden_root().join("many-errors"));
    assert_eq!(
        out.lines().filter(|l| l.starts_with("error: ")).count(),
        5,
        "{out}"
    );
}

#[test]
fn unreadable_directory_is_one_sentence() {
    let out = Command::new(env!("CARGO_BIN_EXE_shunt"))
        .args(["config", "check", "/nonexistent/shunt-config"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("shunt: ") && err.trim_end().lines().count() == 1,
        "{err}"
    );
    assert!(err.contains("/nonexistent/shunt-config"), "{err}");
}

/// Cases too large to commit as YAML: `yaml` is written to a scratch
/// directory and the output compared with
/// `tests/golden/config-check-generated/<case>.txt` (rewritten, too, by
/// `UPDATE_GOLDEN=1`).
fn generated_case(case: &str, yaml: &str) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("se.yaml"), yaml).unwrap();
    let got = run_case(dir.path());
    let expected_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/config-check-generated")
        .join(format!("{case}.txt"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::create_dir_all(expected_path.parent().unwrap()).unwrap();
        std::fs::write(&expected_path, &got).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(&expected_path)
        .unwrap_or_else(|_| panic!("{} missing", expected_path.display()));
    assert_eq!(got, expected, "{case}");
}

/// One ServiceEntry `big` in namespace `default` with `hosts` hosts
/// `h<i>.example` and TCP ports 1000, 1001, … (`ports` of them).
fn big_entry(hosts: usize, ports: u16) -> String {
    let hosts: Vec<String> = (0..hosts).map(|i| format!("h{i}.example")).collect();
    shunt_testbed::mesh::wide_entry("big", &hosts, 1000..1000 + ports)
}

#[test]
fn more_vip_ports_than_the_services_map_holds_is_an_error_naming_counts_and_limit() {
    // 400 hosts × (IPv4 + IPv6 VIP) × just enough ports to pass the limit.
    let ports = (shunt_agent::kernel::projection::Capacity::KERNEL.services / 800 + 1) as u16;
    generated_case("services-map-capacity", &big_entry(400, ports));
}

#[test]
fn an_exhausted_ipv4_vip_range_reports_how_many_hosts_were_left_without_an_address() {
    // 65,534 usable addresses in 240.240.0.0/16: three hosts too many.
    generated_case("ipv4-range-exhausted", &big_entry(65_537, 1));
}

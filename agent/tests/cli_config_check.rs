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

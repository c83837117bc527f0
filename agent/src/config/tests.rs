use std::path::{Path, PathBuf};

use super::*;

fn manifest(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A temp dir with the given files.
pub(crate) fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

#[test]
fn bad_inputs_golden() {
    // Relative path: error texts name files as the directory was given.
    let err = Config::load_dir(Path::new("tests/fixtures/config/bad")).unwrap_err();
    let got = err.to_string();
    let want = std::fs::read_to_string("tests/fixtures/config/bad/expected-errors.txt")
        .unwrap_or_default();
    assert_eq!(got.trim_end(), want.trim_end(), "\n--- got ---\n{got}\n");
}

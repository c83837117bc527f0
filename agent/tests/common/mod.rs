//! Helpers shared by the agent's integration tests that run the built
//! `shunt` binary. A test file takes them with `mod common;`; each file
//! uses only some, hence `dead_code` is allowed here.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The built `shunt` with `args`, without any `SHUNT_*` variable of the
/// caller's environment: clap takes flag defaults from them, so a
/// developer's exported `SHUNT_STATE_DIR` would change what a test sees.
pub fn shunt<S: AsRef<OsStr>>(args: &[S]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_shunt"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("SHUNT_") {
            cmd.env_remove(k);
        }
    }
    cmd.args(args).output().expect("run shunt")
}

/// [`shunt`]'s stdout, stderr (UTF-8) and exit code.
pub fn shunt_text<S: AsRef<OsStr>>(args: &[S]) -> (String, String, i32) {
    let out = shunt(args);
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap(),
    )
}

//! Where the workspace's built binaries are, seen from a test or bench
//! binary (`target/<profile>/deps/`).

use std::path::PathBuf;

/// The target profile directory: the parent of the running binary's `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("target profile dir").to_path_buf()
}

pub fn shunt_bin() -> PathBuf {
    bin_dir().join("shunt")
}

pub fn probe_bin() -> PathBuf {
    bin_dir().join("shunt-probe")
}

pub fn echo_agent_bin() -> PathBuf {
    bin_dir().join("shunt-echo-agent")
}

//! Small helpers: unique names, must-succeed commands, polling, log files.

use std::{
    io::Read as _,
    path::Path,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::Result;

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A short id unique to this process and call (interface names are limited
/// to 15 bytes, so names are built from it carefully).
pub fn unique_id() -> String {
    format!(
        "{}{}",
        std::process::id() % 100_000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Run a command that must succeed; its stderr is the error otherwise.
pub fn sh(cmd: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Poll `f` until it returns Some or the (generous) deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A finished command's exit code (-1: killed by a signal) and its stdout
/// then stderr, as one text (what a failed `curl` says is on stderr).
pub fn code_and_text(out: &Output) -> (i32, String) {
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A counter file written by `shunt-probe listen --count-file` (0 if absent).
pub fn read_count(p: &Path) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// A file's text, lossily decoded; empty if it cannot be read (logs are
/// read while their writer runs).
pub fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = std::fs::File::open(path) {
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last `n` lines of a file.
pub fn tail(path: &Path, n: usize) -> String {
    let s = read_lossy(path);
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

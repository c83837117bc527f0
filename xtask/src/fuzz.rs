//! `cargo xtask fuzz --seconds N [--target T]`: runs the cargo-fuzz targets
//! of `fuzz/` (its own workspace, built with the pinned nightly of
//! `fuzz/rust-toolchain.toml`), each for N seconds, one after another.
//!
//! Each target starts from its committed seeds (`fuzz/seeds/<target>/`)
//! plus the working corpus it grew before (`fuzz/corpus/<target>/`, not
//! committed). A crash leaves its input in `fuzz/artifacts/<target>/`;
//! replay it with `cargo fuzz run <target> <file>` in `fuzz/`, fix, and add
//! a regression test next to the code. Prints executions per target and
//! fails if any target crashed.

use std::{
    path::Path,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// The toolchain of `fuzz/rust-toolchain.toml` (the kernel crate's nightly).
const NIGHTLY: &str = "nightly-2026-07-15";
const CARGO_FUZZ: &str = "0.13.2";

pub const TARGETS: [&str; 6] = [
    "hbone_connect",
    "forwarded",
    "dns_message",
    "config_load",
    "policy_eval",
    "http1_framing",
];

#[derive(Clone, Debug)]
pub struct Options {
    pub seconds: u64,
    pub target: Option<String>,
    /// libFuzzer worker processes per target.
    pub jobs: u32,
}

/// cargo through rustup with the fuzz toolchain, without the variables the
/// outer `cargo xtask` set for the stable one.
fn nightly_cargo(dir: &Path) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", NIGHTLY, "cargo"])
        .current_dir(dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .env_remove("RUSTDOC");
    c
}

/// cargo-fuzz present, or installed (once, about two minutes).
fn ensure_cargo_fuzz(dir: &Path) -> Result<()> {
    let have = nightly_cargo(dir)
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if have {
        return Ok(());
    }
    eprintln!(
        "[fuzz] cargo-fuzz is not installed: installing cargo-fuzz {CARGO_FUZZ} into ~/.cargo/bin"
    );
    let st = Command::new("cargo")
        .args(["install", "cargo-fuzz", "--version", CARGO_FUZZ, "--locked"])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("installing cargo-fuzz failed: run `cargo install cargo-fuzz --locked` and retry");
    }
    Ok(())
}

/// `stat::number_of_executed_units: N` lines of libFuzzer's final stats.
fn executions(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .filter_map(|v| v.trim().parse::<u64>().ok())
        .sum()
}

pub fn run(root: &Path, o: &Options) -> Result<()> {
    let dir = root.join("fuzz");
    let targets: Vec<&str> = match &o.target {
        Some(t) if TARGETS.contains(&t.as_str()) => vec![t.as_str()],
        Some(t) => bail!("unknown fuzz target {t:?}; targets: {}", TARGETS.join(", ")),
        None => TARGETS.to_vec(),
    };
    ensure_cargo_fuzz(&dir)?;
    // Without AddressSanitizer (`-s none`): the code under test is safe
    // Rust, and the instrumented build is twice as fast per input; debug
    // assertions on, so overflows are findings.
    let build = ["fuzz", "build", "-s", "none", "--debug-assertions"];
    let st = nightly_cargo(&dir)
        .args(build)
        // One target, or (none named) all of them.
        .args(o.target.as_deref())
        .status()
        .context("cargo fuzz build")?;
    if !st.success() {
        bail!("building the fuzz targets failed");
    }
    let mut results = Vec::new();
    for t in &targets {
        let corpus = dir.join("corpus").join(t);
        let seeds = dir.join("seeds").join(t);
        std::fs::create_dir_all(&corpus)?;
        println!("\n== fuzz {t}: {} s ==", o.seconds);
        let out = nightly_cargo(&dir)
            .args(build.map(|a| if a == "build" { "run" } else { a }))
            .arg(t)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", o.seconds))
            .arg("-print_final_stats=1")
            .arg("-timeout=10")
            .arg("-rss_limit_mb=2048")
            .args(
                (o.jobs > 1)
                    .then(|| [format!("-jobs={}", o.jobs), format!("-workers={}", o.jobs)])
                    .into_iter()
                    .flatten(),
            )
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("cargo fuzz run {t}"))?;
        let mut log = String::from_utf8_lossy(&out.stderr).into_owned();
        // With -jobs, each worker writes fuzz-<n>.log in the current dir.
        for j in 0..o.jobs {
            let f = dir.join(format!("fuzz-{j}.log"));
            if let Ok(s) = std::fs::read_to_string(&f) {
                log.push_str(&s);
                let _ = std::fs::remove_file(f);
            }
        }
        let crashed = !out.status.success()
            || log.contains("==ERROR: libFuzzer")
            || log.contains("panicked at");
        let execs = executions(&log);
        println!(
            "{t}: {} executions in {} s{}",
            execs,
            o.seconds,
            if crashed {
                " — CRASHED (see fuzz/artifacts/)"
            } else {
                ", no crash"
            }
        );
        if crashed {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for l in tail.into_iter().rev() {
                eprintln!("  {l}");
            }
        }
        results.push((t.to_string(), execs, crashed));
    }
    println!("\n== fuzz summary ==");
    for (t, execs, crashed) in &results {
        println!(
            "{t:<14} {:>6} s {execs:>12} executions  {}",
            o.seconds,
            if *crashed { "CRASH" } else { "ok" }
        );
    }
    if results.iter().any(|r| r.2) {
        bail!("a fuzz target crashed");
    }
    Ok(())
}

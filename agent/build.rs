//! The one build path for the kernel object: aya-build compiles the
//! `shunt-ebpf` crate for bpfel-unknown-none with the pinned nightly (its
//! LLVM must match the bpf-linker's, see scripts/setup.sh) and the agent
//! embeds the result. `cargo xtask build-ebpf` runs this same script.
use anyhow::Context as _;
use aya_build::{Package, Toolchain};

/// Nightly whose LLVM (22) matches Debian's llvm-22-dev used by bpf-linker.
const EBPF_TOOLCHAIN: &str = "nightly-2026-07-15";

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf");
    println!(
        "cargo:rerun-if-changed={}",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../common/src")
    );
    aya_build::build_ebpf(
        [Package {
            name: "shunt-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Custom(EBPF_TOOLCHAIN),
    )
    .context("building the kernel programs (run scripts/setup.sh for the toolchain)")
}

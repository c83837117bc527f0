//! shunt's node agent, waypoint and tooling. One module per stage, each with
//! its own error type; `anyhow` is used only in the binary (`main.rs`).

pub mod admin;
pub mod alloc;
pub mod app;
pub mod config;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod hbone;
pub mod identity;
pub mod kernel;
pub mod model;
pub mod policy;
pub mod prereq;
pub mod proxy;
pub mod reconcile;
pub mod sockets;
pub mod telemetry;
pub mod upstream;
pub mod validate;
pub mod waypoint;

/// The kernel object built by `build.rs` (aya-build) from `ebpf/`.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/shunt-ebpf"));

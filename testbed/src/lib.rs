//! Test support for shunt, shared by the kernel tests (`tests/`), the agent's
//! loopback tests and benches (`agent/tests`, `agent/benches`) and
//! `cargo xtask demo`.
//!
//! Every resource is an RAII guard: [`Netns`], [`Veth`], [`Cgroup`],
//! [`PinDir`], [`WorkDir`], [`Proc`], and the kernel tests' [`Pod`] and
//! [`Node`] built from them. `Drop` removes what the guard made, so a test
//! that fails (panics) still leaves nothing behind; `close()` does the same
//! and reports what could not be removed. [`Enter`] says where a child
//! process runs: a cgroup first, then a network namespace, then files
//! bind-mounted over `/etc` (what `ip netns exec` does, without remounting
//! /sys and so hiding the cgroup tree). [`seed`] reads the seed's YAML from
//! `examples/egress/`, its one copy; [`mesh`] builds the Namespaces,
//! waypoints and ServiceEntries of the tests' own meshes.
//!
//! With the `mesh` feature (it depends on `shunt-agent`): a node's pinned
//! maps ([`Node::maps`] and friends) and loopback HBONE peers and PKI
//! ([`hbone`]). Integration tests and benches of `shunt-agent` may use it
//! (they link the same `shunt_agent` as this crate); the agent's unit tests
//! in `agent/src` must not, since there the crate under test is a second
//! copy of `shunt_agent` whose types would not match.

mod bins;
mod cgroup;
mod cmd;
mod internet;
pub mod mesh;
mod netns;
mod node;
mod pins;
mod pod;
mod process;
pub mod seed;
mod workdir;

#[cfg(feature = "mesh")]
pub mod hbone;
#[cfg(feature = "mesh")]
mod maps;

pub use bins::{bin_dir, echo_agent_bin, probe_bin, shunt_bin};
pub use cgroup::{cgroup2_mount, Cgroup, CgroupDriver, KubeletPod};
pub use cmd::{code_and_text, read_count, read_lossy, sh, tail, unique_id, wait_for};
pub use internet::Internet;
pub use netns::{Netns, Veth};
pub use node::Node;
pub use pins::PinDir;
pub use pod::Pod;
pub use process::{Enter, Proc};
pub use workdir::WorkDir;

pub type Result<T> = anyhow::Result<T>;

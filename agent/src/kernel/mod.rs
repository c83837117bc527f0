//! Everything shunt knows about the kernel, in one place:
//!
//! - [`registry`]: the one list of pinned maps (name, type, key and value
//!   types from `shunt-common`) and typed handles opened by pin path;
//! - [`loader`]: the object loaded with those maps pinned, and the program
//!   table (program type, attach point, link pin) attached through pinned
//!   links; [`links`] swaps programs into reused links (`BPF_LINK_UPDATE`);
//! - [`projection`]: the exact desired contents of every reconciled map plus
//!   `meta` ([`Projection`]) and [`MapSync`], which applies one with
//!   [`reconcile`] (by difference, hash maps and the LPM trie alike);
//! - [`capture`]: the capture listener and its SOCKMAP slot;
//! - [`events`]: egress reports from the `events` ring buffer, decoded;
//! - [`netlink`]: the node's network setup (VIP routes, DNS interface, route
//!   lookups for `sources`, rp_filter).
//!
//! Everything is idempotent: an agent that finds maps and links pinned
//! reuses them, so a restart never detaches a program and VIP traffic stays
//! fail-closed throughout.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

pub mod capture;
pub mod events;
pub mod links;
pub mod loader;
pub mod netlink;
pub mod projection;
pub mod reconcile;
pub mod registry;

pub use projection::{MapSync, Projection, SyncStats};
pub use registry::PinnedMaps;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("creating pin directory {0}: {1}")]
    PinDir(PathBuf, std::io::Error),
    #[error(
        "pinned maps in {dir} have layout version {found}, this shunt uses {}: run `shunt uninstall --pin-dir {dir}` first",
        shunt_common::LAYOUT_VERSION
    )]
    LayoutMismatch { dir: String, found: u32 },
    #[error("loading the kernel programs: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {0} missing from the kernel object")]
    MissingProgram(&'static str),
    #[error("map {0} missing from the kernel object")]
    MissingMap(&'static str),
    #[error("program {0}: {1}")]
    Program(&'static str, aya::programs::ProgramError),
    #[error("pinning link {0}: {1}")]
    Pin(PathBuf, aya::pin::PinError),
    #[error("opening pinned map {path}: {source} (is the agent installed with this --pin-dir?)")]
    OpenMap {
        path: PathBuf,
        source: aya::maps::MapError,
    },
    #[error("map {map}: {op}: {source}")]
    Map {
        map: &'static str,
        op: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {map}: {failed} stale entries could not be removed (they stay; retried on the next apply): {source}")]
    Remove {
        map: &'static str,
        failed: usize,
        source: aya::maps::MapError,
    },
    #[error("opening {0}: {1}")]
    Open(PathBuf, std::io::Error),
    #[error("netlink: {what}: {source}")]
    Netlink {
        what: String,
        source: rtnetlink::Error,
    },
    #[error("netlink connection: {0}")]
    NetlinkConnect(std::io::Error),
    #[error("capture socket on {0}: {1}")]
    Socket(SocketAddr, std::io::Error),
}

impl KernelError {
    /// `map_err` helper for an aya map operation.
    fn map(map: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> Self {
        move |source| KernelError::Map { map, op, source }
    }
}

/// Where the agent's kernel state lives. Every field is a flag so that tests
/// get their own.
#[derive(Clone, Debug)]
pub struct KernelPaths {
    pub pin_dir: PathBuf,
    pub cgroup_root: PathBuf,
}

impl KernelPaths {
    /// Pin path of a map (by its registry pin name).
    pub fn map(&self, spec: &registry::MapSpec) -> PathBuf {
        self.pin_dir.join(spec.pin)
    }
    /// Pin path of a program's link.
    pub fn link(&self, prog: &loader::ProgramSpec) -> PathBuf {
        link_pin(&self.pin_dir, prog)
    }
}

/// File-name prefix of link pins: `link_<program>`.
pub const LINK_PIN_PREFIX: &str = "link_";

/// `<pin_dir>/link_<program>`: the link pin of one program.
pub fn link_pin(pin_dir: &Path, prog: &loader::ProgramSpec) -> PathBuf {
    pin_dir.join(format!("{LINK_PIN_PREFIX}{}", prog.name))
}

//! Subcommands. Each module defines its clap `Args` and a `run` returning
//! the exit code; `anyhow` is used here, at the binary's edge, only.

pub mod agent;
pub mod ca;
pub mod common;
pub mod config;
pub mod controller;
pub mod get;
pub mod maps;
pub mod policy;
pub mod reach;
pub mod status;
pub mod uninstall;
pub mod waypoint;

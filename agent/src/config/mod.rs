//! The Istio object model shunt reads from a config directory.
pub mod authz;
pub mod meta;

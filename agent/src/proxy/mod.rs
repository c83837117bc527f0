//! The node agent's data path: the capture server accepting steered
//! connections and the outbound path carrying each to its waypoint.

pub mod capture;
pub mod outbound;

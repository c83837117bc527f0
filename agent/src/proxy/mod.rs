//! The node agent's data path: the capture server accepting steered
//! connections (and handing over to a successor agent), and the outbound
//! path carrying each to its waypoint.

pub mod capture;
pub mod handover;
pub mod outbound;

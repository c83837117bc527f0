//! Process wiring: each file starts one of shunt's processes from its
//! stages and owns nothing else.

pub mod node;
pub mod waypoint;

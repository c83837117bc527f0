//! A node's pinned maps, for tests that program or read them directly
//! (`mesh` feature).

use shunt_agent::kernel::{registry::tcp_key, PinnedMaps};
use shunt_common::{EnrolledValue, ServiceValue};

use crate::{node::Node, Result};

impl Node {
    pub fn maps(&self) -> Result<PinnedMaps> {
        Ok(PinnedMaps::open(&self.pin_dir)?)
    }

    /// A service entry for `dst` (`ADDR:PORT`) with no waypoint.
    pub fn add_service(&self, dst: &str, service_id: u32) -> Result<()> {
        let mut m = self.maps()?;
        let key = tcp_key(dst.parse()?);
        let v = ServiceValue {
            service_id,
            flags: 0,
            waypoint_addr: [0; 16],
            waypoint_port: 0,
            target_port: key.port,
            _pad: [0; 4],
        };
        m.services.insert(&key, &v, 0)?;
        Ok(())
    }

    /// Enroll pod `pod`'s cgroup as workload `workload_id`.
    pub fn enroll(&self, pod: &str, workload_id: u32) -> Result<()> {
        let mut m = self.maps()?;
        m.enrolled.insert(
            &self.pod(pod).cgroup.id(),
            &EnrolledValue {
                workload_id,
                flags: 0,
            },
            0,
        )?;
        Ok(())
    }

    pub fn counter(&self, c: shunt_common::Counter) -> Result<u64> {
        Ok(self
            .maps()?
            .counters()?
            .into_iter()
            .find(|(k, _)| *k == c)
            .map(|(_, v)| v)
            .unwrap_or(0))
    }
}

//! Reports from the kernel: egress events from the `events` ring buffer,
//! decoded once into [`EgressEvent`] and handed to a callback (formatting
//! and routing the lines is the caller's), and aya-log records forwarded
//! to `tracing`.

use std::{net::SocketAddr, path::Path};

use aya::{maps::RingBuf, Ebpf};
use shunt_common::{EV_DENIED, EV_PASSTHROUGH};
use tracing::warn;

use super::{
    registry::{self, addr_from_bytes, Events, EVENT_SIZE},
    KernelError,
};

/// What the connect hooks reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EgressKind {
    /// An enrolled socket connected outside the mesh (ALLOW_ANY).
    Passthrough,
    /// An enrolled socket's connect was refused (REGISTRY_ONLY).
    Denied,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// One egress report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EgressEvent {
    pub cgroup_id: u64,
    /// Id in the agent's workload table (from `enrolled`).
    pub workload_id: u32,
    pub kind: EgressKind,
    pub dst: SocketAddr,
    pub transport: Transport,
}

impl EgressEvent {
    /// Decode one ring-buffer record; `None` for a short record or an
    /// unknown kind (a newer kernel object).
    pub fn decode(record: &[u8]) -> Option<Self> {
        if record.len() < EVENT_SIZE {
            return None;
        }
        // SAFETY: at least EVENT_SIZE bytes; EgressEvent is repr(C) plain
        // data valid for any bit pattern (Pod).
        let raw: shunt_common::EgressEvent =
            unsafe { std::ptr::read_unaligned(record.as_ptr().cast()) };
        let kind = match raw.kind {
            EV_PASSTHROUGH => EgressKind::Passthrough,
            EV_DENIED => EgressKind::Denied,
            _ => return None,
        };
        Some(EgressEvent {
            cgroup_id: raw.cgroup_id,
            workload_id: raw.workload_id,
            kind,
            dst: SocketAddr::new(addr_from_bytes(raw.addr), raw.port),
            transport: if raw.proto == libc::IPPROTO_UDP as u8 {
                Transport::Udp
            } else {
                Transport::Tcp
            },
        })
    }
}

/// Read egress reports from the pinned `events` ring buffer for the life
/// of the runtime, calling `on_event` for each.
pub fn spawn_reader(
    pin_dir: &Path,
    mut on_event: impl FnMut(EgressEvent) + Send + 'static,
) -> Result<(), KernelError> {
    let ring: RingBuf<aya::maps::MapData> = registry::open::<Events, _>(pin_dir)?;
    // SAFETY: the ring buffer owns its fd and lives inside the AsyncFd.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "egress reports unavailable");
            return Ok(());
        }
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                if let Some(ev) = EgressEvent::decode(&item) {
                    on_event(ev);
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

/// Forward the kernel programs' aya-log records to `tracing`. Rare events
/// only (no capture socket, ...); failures here are not fatal.
pub fn forward_kernel_log(ebpf: &mut Ebpf) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(l) => l,
        Err(e) => return warn!(error = %e, "kernel log unavailable"),
    };
    // SAFETY: the logger owns its ring-buffer fd and lives inside the
    // AsyncFd, so the fd outlives its registration.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register(logger) } {
        Ok(fd) => fd,
        Err(e) => return warn!(error = %e, "kernel log unavailable"),
    };
    tokio::spawn(async move {
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(kind: u32, addr: [u8; 16], port: u16, proto: u8) -> Vec<u8> {
        let raw = shunt_common::EgressEvent {
            cgroup_id: 42,
            workload_id: 7,
            kind,
            addr,
            port,
            proto,
            _pad: [0; 5],
        };
        // SAFETY: repr(C) plain data viewed as its bytes.
        unsafe {
            std::slice::from_raw_parts(
                (&raw as *const shunt_common::EgressEvent).cast::<u8>(),
                EVENT_SIZE,
            )
        }
        .to_vec()
    }

    #[test]
    fn a_kernel_record_decodes_to_a_typed_event() {
        let r = record(
            EV_DENIED,
            shunt_common::v4_mapped([93, 184, 216, 34]),
            443,
            6,
        );
        assert_eq!(
            EgressEvent::decode(&r),
            Some(EgressEvent {
                cgroup_id: 42,
                workload_id: 7,
                kind: EgressKind::Denied,
                dst: "93.184.216.34:443".parse().unwrap(),
                transport: Transport::Tcp,
            })
        );
        let mut v6 = [0u8; 16];
        v6[0] = 0x20;
        v6[1] = 0x01;
        v6[15] = 1;
        let ev = EgressEvent::decode(&record(EV_PASSTHROUGH, v6, 53, 17)).unwrap();
        assert_eq!(ev.kind, EgressKind::Passthrough);
        assert_eq!(ev.transport, Transport::Udp);
        assert_eq!(ev.dst, "[2001::1]:53".parse().unwrap());
    }

    #[test]
    fn short_records_and_unknown_kinds_are_dropped() {
        let r = record(EV_DENIED, [0; 16], 1, 6);
        assert_eq!(EgressEvent::decode(&r[..EVENT_SIZE - 1]), None);
        assert_eq!(EgressEvent::decode(&record(99, [0; 16], 1, 6)), None);
    }
}

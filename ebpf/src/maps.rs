//! Maps shared with userspace. Every one is a BTF map so that
//! `bpftool map dump pinned /sys/fs/bpf/shunt/<name>` prints field names;
//! the agent pins them under its pin directory by these (lower-case) names.
#![allow(non_upper_case_globals)]

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf, SkStorage, SockMap},
    macros::btf_map,
};
use shunt_common::{
    CidrAddr, Counter, DnsOrig, EgressEvent, EnrolledValue, Meta, ServiceKey, ServiceValue,
    COUNTER_SLOTS,
};

/// (VIP, port, proto) → service and waypoint. Written only by the agent's
/// reconciler, by difference (never flushed). Sized for 100,000
/// ServiceEntries of one or two ports, each host with an IPv4 and an IPv6
/// VIP (the IPv4 range holds 65,534); without prealloc an entry costs
/// memory only once written.
#[btf_map]
pub static services: HashMap<ServiceKey, ServiceValue, 524_288, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// cgroup id → enrolled workload. Only sockets of these cgroups (and, for
/// entries flagged `ENR_F_DESCENDANTS`, of cgroups below them) are acted on
/// by the cgroup programs; `enroll::current` is the one lookup.
#[btf_map]
pub static enrolled: HashMap<u64, EnrolledValue, 65_536, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// Index 0: the agent's TCP capture socket. A new agent replaces it to take
/// over; an empty slot means "agent down" and VIP traffic is dropped.
#[btf_map]
pub static capture: SockMap<2> = SockMap::new();

/// Per-CPU event counters, indexed by `shunt_common::Counter`.
#[btf_map]
pub static counters: PerCpuArray<u64, { COUNTER_SLOTS as usize }> = PerCpuArray::new();

/// Index 0: layout version and global modes, written by the agent.
#[btf_map]
pub static meta: Array<Meta, 1> = Array::new();

/// CIDRs enrolled workloads may reach besides VIPs (cluster ranges, the
/// DNS proxy). Outside them: reported (ALLOW_ANY) or refused (REGISTRY_ONLY).
#[btf_map]
pub static egress_allow: LpmTrie<CidrAddr, u8, 4096> = LpmTrie::new();

/// Per socket: the resolver address a DNS-captured socket asked for.
#[btf_map]
pub static dns_orig: SkStorage<DnsOrig> = SkStorage::new();

/// Workload source address → the node interface it must arrive on. A SYN
/// to a VIP from a known workload address on another interface is a spoof
/// and is dropped (covers IPv6, where there is no rp_filter).
#[btf_map]
pub static sources: HashMap<CidrAddr, u32, 65_536, { BPF_F_NO_PREALLOC as usize }> = HashMap::new();

/// Egress reports for the agent's log (passthrough and denials).
#[btf_map]
pub static events: RingBuf<EgressEvent, { 256 * 1024 }> = RingBuf::new();

#[inline(always)]
pub fn count(c: Counter) {
    if let Some(p) = counters.get_ptr_mut(c as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while we run.
        unsafe { *p += 1 };
    }
}

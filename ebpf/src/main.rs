//! shunt's kernel programs. One file per program; maps and the shared
//! connect-time decision live in their own modules.
// no_std only for the kernel target: a host build (`cargo clippy
// --workspace`) links std through the workspace's unified features.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

/// Volatile load of a context field at its own width and offset.
// Not exported: the modules below see it by textual scope.
macro_rules! ctx_load {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: the kernel passes a valid context pointer.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// Volatile store to a context field at its own width and offset.
macro_rules! ctx_store {
    ($ptr:expr, $val:expr, $($field:tt)+) => {
        // SAFETY: the kernel passes a valid context pointer; the field is
        // writable for this program type.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$($field)+), $val) }
    };
}

mod connect4;
mod connect6;
mod enroll;
mod getpeername4;
mod getpeername6;
mod maps;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sk_lookup;
mod sockaddr;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Host builds exist only for lints; the programs run in the kernel.
#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("shunt-ebpf is a kernel object; load it with `shunt agent`");
}

// GPL-compatible: bpf_sk_assign and the cgroup helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

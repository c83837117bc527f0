//! shunt's kernel programs. One file per program; maps and the shared
//! connect-time decision live in their own modules.
#![no_std]
#![no_main]

/// Volatile load of a context field at its own width and offset.
#[macro_export]
macro_rules! ctx_load {
    ($ptr:expr, $($field:tt)+) => {
        // SAFETY: the kernel passes a valid context pointer.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*$ptr).$($field)+)) }
    };
}

/// Volatile store to a context field at its own width and offset.
#[macro_export]
macro_rules! ctx_store {
    ($ptr:expr, $val:expr, $($field:tt)+) => {
        // SAFETY: the kernel passes a valid context pointer; the field is
        // writable for this program type.
        unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*$ptr).$($field)+), $val) }
    };
}

mod connect4;
mod connect6;
mod getpeername4;
mod getpeername6;
mod maps;
mod recvmsg4;
mod recvmsg6;
mod sendmsg4;
mod sendmsg6;
mod sk_lookup;
mod sockaddr;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible: bpf_sk_assign and the cgroup helpers are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

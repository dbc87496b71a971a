//! nodemesh kernel programs. Entry points are thin wrappers over `try_*` functions (see each module).
#![no_std]
#![no_main]

mod connect;
mod maps;
mod sockops;
mod strict;
mod traffic;
mod workload;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach here; this only satisfies the compiler.
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";

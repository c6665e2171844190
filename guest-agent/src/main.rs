//! `vmm-agent`, PID 1 of the guest; the work is in the library (`init`).
//!
//! `no_main`: entering at C `main` skips Rust's runtime setup, which costs
//! system calls at boot (each about 0.6 ms when the guest kernel is
//! interpreted) and sets SIGPIPE to ignored, a disposition every command would
//! inherit through exec. std still gets argv and the environment from glibc.
#![no_main]

use std::ffi::{c_char, c_int};

#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    guest_agent::init::main()
}

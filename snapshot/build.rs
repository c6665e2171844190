//! Declares `cfg(fuzzing)` (set by cargo-fuzz), under which checksums are
//! not enforced so the fuzzer reaches the decoders.
fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
}

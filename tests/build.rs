//! Builds the test guest (resources/test-guest) with gcc and leaves it at
//! `<workspace>/target/test-guest.elf`, where the tests and benchmarks look
//! for it, whatever CARGO_TARGET_DIR says.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest.parent().expect("tests/ lives in the workspace");
    let src = workspace.join("resources/test-guest");
    let out = workspace.join("target/test-guest.elf");
    let obj = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo")).join("test-guest");

    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-changed={}", out.display());
    println!("cargo:rerun-if-env-changed=TEST_GUEST_CC");

    let cc = std::env::var("TEST_GUEST_CC").unwrap_or_else(|_| "gcc".into());
    if Command::new(&cc).arg("--version").output().is_err() {
        panic!(
            "the test guest (resources/test-guest) is built with gcc, and `{cc}` was not found: \
             install gcc (apt-get install gcc) or set TEST_GUEST_CC"
        );
    }
    let status = Command::new("sh")
        .arg(src.join("build.sh"))
        .arg(&out)
        .arg(&obj)
        .env("TEST_GUEST_CC", &cc)
        .status()
        .unwrap_or_else(|e| panic!("cannot run sh {}: {e}", src.join("build.sh").display()));
    if !status.success() {
        panic!(
            "building the test guest failed ({status}): see the compiler output above; \
             try `sh resources/test-guest/build.sh`"
        );
    }
}

//! Boot benchmark, cold against warm, on the default guest:
//!
//! - cold: `vmm run --cold --timings -- true`, for each milestone (first
//!   guest instruction, first console output, agent start, exit) the median
//!   and spread in ms from process start;
//! - warm: one run saves the warm image, then `vmm run -- uname -a`
//!   restores it, end to end (process start to exit) against the same
//!   command booted cold, in the same run.
//!
//!     cargo bench -p vmm-tests --bench boot   # BOOT_BENCH_RUNS=3 cold, WARM_BENCH_RUNS=10
//!
//! The warm image goes to a private cache, so the user's is untouched. On
//! hosts without hardware virtualization each cold boot takes over a minute.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use vmm_tests::bench::{env_usize, summary};

const MILESTONES: [&str; 4] = [
    "first_instruction_ms",
    "first_console_ms",
    "agent_start_ms",
    "exit_ms",
];

/// Runs `vmm args` with the private cache; returns (ms, stdout, stderr).
fn vmm(cache: &Path, args: &[&str]) -> (f64, String, String) {
    let t0 = Instant::now();
    let out = Command::new(vmm_tests::vmm_bin())
        .args(args)
        .env("VMM_CACHE_DIR", cache)
        .env("VMM_GUEST_DIR", vmm_tests::guest_dir())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .expect("run vmm");
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "vmm {args:?} failed: {stderr}");
    (
        ms,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    )
}

fn main() {
    let runs = env_usize("BOOT_BENCH_RUNS", 3);
    let warm_runs = env_usize("WARM_BENCH_RUNS", 10);
    let scratch = vmm_tests::Scratch::new("boot-bench");
    let cache = scratch.0.join("cache");

    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); MILESTONES.len()];
    let mut cold_uname = Vec::new();
    let mut cold_out = String::new();
    for i in 0..runs {
        let (_, _, stderr) = vmm(&cache, &["run", "--cold", "--timings", "--", "true"]);
        let line = stderr
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .expect("a timings line on stderr");
        let v: serde_json::Value = serde_json::from_str(line).expect("timings JSON");
        for (k, name) in MILESTONES.iter().enumerate() {
            if let Some(ms) = v[name].as_f64() {
                samples[k].push(ms);
            }
        }
        eprintln!("cold run {}/{runs}: {line}", i + 1);
        if i == 0 {
            let (ms, out, _) = vmm(&cache, &["run", "--cold", "--", "uname", "-a"]);
            cold_uname.push(ms);
            cold_out = out;
        }
    }

    // The first ephemeral run boots and saves the warm image.
    let (save_ms, _, stderr) = vmm(&cache, &["run", "--", "true"]);
    assert!(
        stderr.contains("(the next run starts from it)"),
        "no warm image saved: {stderr}"
    );
    let mut warm = Vec::new();
    for i in 0..warm_runs {
        let (ms, out, stderr) = vmm(&cache, &["run", "--", "uname", "-a"]);
        assert!(
            stderr.contains("warm image restored"),
            "run {i} was not warm: {stderr}"
        );
        assert_eq!(out, cold_out, "warm output differs from the cold boot's");
        eprintln!("warm run {}/{warm_runs}: {ms:.0} ms", i + 1);
        warm.push(ms);
    }

    println!("cold boot milestones over {runs} runs (ms from process start):");
    for (k, name) in MILESTONES.iter().enumerate() {
        summary(name, "ms", std::mem::take(&mut samples[k]));
    }
    println!("`vmm run -- uname -a`, process start to exit:");
    summary("cold (--cold)", "ms", cold_uname);
    summary("first run (boot + save)", "ms", vec![save_ms]);
    summary("warm", "ms", warm);
}

//! Boot benchmark: runs `vmm run --timings -- true` on the default guest
//! several times and prints, for each milestone (first guest instruction,
//! first console output, guest agent start, exit), the median and the spread
//! in milliseconds from process start.
//!
//!     cargo bench -p vmm-tests --bench boot            # BOOT_BENCH_RUNS=3 by default
//!
//! On hosts without hardware virtualization each boot takes over a minute.

use std::process::{Command, Stdio};

const MILESTONES: [&str; 4] = [
    "first_instruction_ms",
    "first_console_ms",
    "agent_start_ms",
    "exit_ms",
];

fn main() {
    let runs: usize = std::env::var("BOOT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bin = vmm_tests::vmm_bin();
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); MILESTONES.len()];
    for i in 0..runs {
        let out = Command::new(&bin)
            .args(["run", "--timings", "--", "true"])
            .stdin(Stdio::null())
            .output()
            .expect("run vmm");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "run {i} failed: {stderr}");
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
        eprintln!("run {}/{runs}: {line}", i + 1);
    }
    println!("boot milestones over {runs} runs (ms from process start):");
    for (k, name) in MILESTONES.iter().enumerate() {
        let s = &mut samples[k];
        if s.is_empty() {
            println!("  {name:22} never reached");
            continue;
        }
        s.sort_by(|a, b| a.total_cmp(b));
        let median = s[s.len() / 2];
        println!(
            "  {name:22} median {median:10.1}   min {:10.1}   max {:10.1}   spread {:5.1}%",
            s[0],
            s[s.len() - 1],
            100.0 * (s[s.len() - 1] - s[0]) / median.max(1e-9)
        );
    }
}

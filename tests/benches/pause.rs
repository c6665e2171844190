//! How long `vmm snapshot` pauses a running VM that carries on: the
//! default (pause to capture the state and fork a writer, which writes
//! while the VM runs) against `--full-pause` (paused for the whole write),
//! alternately in one run, on the test guest with the benchmark mix (50%
//! zero, 35% text-like, 15% random pages) rewriting a share of its filled
//! memory every second:
//!
//!     cargo bench -p vmm-tests --bench pause
//!     PAUSE_BENCH_SIZES=256,1024 PAUSE_BENCH_RATES=1,10 PAUSE_BENCH_RUNS=5 cargo bench -p vmm-tests --bench pause
//!
//! For each guest size (MiB) and rewrite rate (% of it per second): the
//! VM's pause and what it is made of, and the time until the image is
//! written. Medians and spread (min..max).

use std::time::Duration;

use vmm_tests::bench::{env_usize, summary};
use vmm_tests::test_guest::{run_with_api, snapshot};
use vmm_tests::Scratch;

fn list(var: &str, default: &str) -> Vec<u32> {
    std::env::var(var)
        .unwrap_or_else(|_| default.into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn main() {
    let sizes = list("PAUSE_BENCH_SIZES", "256,1024,4096");
    let rates = list("PAUSE_BENCH_RATES", "1,10,50");
    let runs = env_usize("PAUSE_BENCH_RUNS", 3);
    println!("pause of a snapshot of a running test guest: default (fork) against --full-pause, {runs} runs each");
    for &mib in &sizes {
        for &pct in &rates {
            let s = Scratch::new(&format!("pause-bench-{mib}-{pct}"));
            let rate = u64::from(mib) * 256 * u64::from(pct) / 100;
            let cmdline = format!("ticks=20 dirty={mib},pattern=mix,rate={rate}");
            let mut vm = run_with_api(&s.0, 1, mib + 256, &cmdline);
            assert!(
                vm.wait_for(Duration::from_secs(300), |o| o.contains("tick 2\n")),
                "{}\n{}",
                vm.output(),
                vm.stderr()
            );
            let (mut fork, mut full) = (Vec::new(), Vec::new());
            for _ in 0..runs {
                std::thread::sleep(Duration::from_secs(1));
                fork.push(snapshot(&s.0, "bench.img", &[]).expect("snapshot"));
                std::thread::sleep(Duration::from_secs(1));
                full.push(snapshot(&s.0, "bench.img", &["--full-pause"]).expect("snapshot"));
            }
            let _ = vm.kill();
            println!("guest {mib} MiB filled, {pct}% ({rate} pages) rewritten per second:");
            for (label, v) in [("fork", &fork), ("full pause", &full)] {
                let col = |k: &str| -> Vec<f64> {
                    v.iter()
                        .map(|a| a[k].as_f64().unwrap_or(f64::NAN))
                        .collect()
                };
                summary(&format!("{label}: VM paused"), "ms", col("pause_ms"));
                summary(
                    &format!("{label}:   vCPUs stopping"),
                    "ms",
                    col("pausing_ms"),
                );
                summary(
                    &format!("{label}:   state capture"),
                    "ms",
                    col("state_capture_ms"),
                );
                if label == "fork" {
                    summary(&format!("{label}:   fork"), "ms", col("fork_ms"));
                }
                summary(&format!("{label}:   resume"), "ms", col("resume_thaw_ms"));
                summary(&format!("{label}: image written"), "ms", col("total_ms"));
            }
        }
    }
}

//! Snapshot and restore benchmark on the test guest, which fills its memory
//! at native speed with the benchmark mix (50% zero, 35% text-like, 15%
//! random pages), so the figures measure the VMM, not the interpreter.
//!
//!     cargo bench -p vmm-tests --bench snapshot
//!     SNAP_BENCH_SIZES=256,1024 SNAP_BENCH_RUNS=5 cargo bench -p vmm-tests --bench snapshot
//!
//! For each guest size it measures, in the same run:
//! - cold start: `vmm run` until the guest's first tick after the fill (the
//!   baseline a restore replaces);
//! - `vmm snapshot --out FILE` (checkpoint and continue) with `none` and
//!   `zstd:1`, and the image sizes;
//! - `vmm restore` until the restored guest's first tick, from each image,
//!   lazily (the default: memory arrives as it is touched) and `--eager`;
//! - a guest that sums all of its memory on every tick: restore until it
//!   has read all of its memory again (its second `sum` line: the first
//!   ends the pass the snapshot interrupted), lazily and eagerly;
//!
//! and prints medians, spread (min..max) and ratios.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use vmm_tests::bench::until_tick;
use vmm_tests::{vmm_bin, workspace, Running, Scratch};

fn median_spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn fmt(v: &[f64]) -> String {
    let (m, lo, hi) = median_spread(v.to_vec());
    format!("{m:8.1} ms ({lo:.1}..{hi:.1})")
}

fn snapshot(dir: &Path, compress: &str, out: &str) -> f64 {
    let t = Instant::now();
    let o = Command::new(vmm_bin())
        .args([
            "snapshot",
            "--api-sock",
            "api.sock",
            "--out",
            out,
            "--compress",
            compress,
        ])
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("run vmm snapshot");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    t.elapsed().as_secs_f64() * 1000.0
}

/// Milliseconds from `vmm restore` to the second whole `sum` line of a
/// guest that sums its `mib` MiB on every tick, lazily and eagerly.
fn until_memory_read(dir: &Path, kernel: &str, mib: u64, runs: usize) -> (Vec<f64>, Vec<f64>) {
    let mem = (mib + 256).to_string();
    let cmdline = format!("ticks=100 dirty={mib},pattern=mix,rewrite=0 sum");
    let mut vm = Running::spawn(
        &[
            "run",
            "--kernel",
            kernel,
            "--mem",
            &mem,
            "--cmdline",
            &cmdline,
            "--api-sock",
            "api.sock",
        ],
        dir,
    );
    assert!(
        vm.wait_for(Duration::from_secs(300), |o| o.matches("sum ").count() >= 2),
        "{}",
        vm.stderr()
    );
    snapshot(dir, "zstd:1", "sum.img");
    let _ = vm.kill();
    let once = |args: &[&str]| {
        let start = Instant::now();
        let mut r = Running::spawn(args, dir);
        let whole = |o: &str| {
            o.split_inclusive('\n')
                .filter(|l| l.ends_with('\n') && l.starts_with("sum "))
                .count()
        };
        assert!(
            r.wait_for_every(
                Duration::from_millis(1),
                Duration::from_secs(300),
                |o| whole(o) >= 2
            ),
            "{}",
            r.stderr()
        );
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        let _ = r.kill();
        ms
    };
    let (mut lazy, mut eager) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        lazy.push(once(&["restore", "--from", "sum.img"]));
        eager.push(once(&["restore", "--eager", "--from", "sum.img"]));
    }
    (lazy, eager)
}

fn main() {
    let sizes: Vec<u64> = std::env::var("SNAP_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024,4096".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs: usize = std::env::var("SNAP_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let kernel = workspace().join("target/test-guest.elf");
    let kernel = kernel.to_str().expect("utf-8 path");
    println!("snapshot/restore of the test guest, {runs} runs each; medians (min..max)");
    for mib in sizes {
        let s = Scratch::new(&format!("bench-{mib}"));
        let mem = (mib + 256).to_string();
        let cmdline = format!("ticks=100 dirty={mib},pattern=mix,rewrite=0");
        let args = [
            "run",
            "--kernel",
            kernel,
            "--mem",
            &mem,
            "--cmdline",
            &cmdline,
            "--api-sock",
            "api.sock",
        ];
        let mut cold = Vec::new();
        let mut vm = None;
        for _ in 0..runs {
            if let Some(v) = vm.take() {
                let _ = Running::kill(v);
            }
            let start = Instant::now();
            let mut r = Running::spawn(&args, &s.0);
            cold.push(until_tick(&mut r, start));
            vm = Some(r);
        }
        let mut snap_none = Vec::new();
        let mut snap_zstd = Vec::new();
        for i in 0..runs {
            snap_none.push(snapshot(&s.0, "none", &format!("none-{i}.img")));
            snap_zstd.push(snapshot(&s.0, "zstd:1", &format!("zstd-{i}.img")));
        }
        if let Some(v) = vm.take() {
            let _ = Running::kill(v);
        }
        let size = |f: &str| std::fs::metadata(s.0.join(f)).map_or(0, |m| m.len());
        let restore = |args: &[&str]| -> Vec<f64> {
            (0..runs)
                .map(|_| {
                    let start = Instant::now();
                    let mut r = Running::spawn(args, &s.0);
                    let ms = until_tick(&mut r, start);
                    let _ = Running::kill(r);
                    ms
                })
                .collect()
        };
        let restore_none = restore(&["restore", "--from", "none-0.img"]);
        let restore_zstd = restore(&["restore", "--from", "zstd-0.img"]);
        let eager_none = restore(&["restore", "--eager", "--from", "none-0.img"]);
        let eager_zstd = restore(&["restore", "--eager", "--from", "zstd-0.img"]);
        let (lazy_sum, eager_sum) = until_memory_read(&s.0, kernel, mib, runs);
        let (cold_m, ..) = median_spread(cold.clone());
        let gb = mib as f64 / 1024.0;
        let rate = |v: &[f64]| gb / (median_spread(v.to_vec()).0 / 1000.0);
        println!("guest {mib} MiB filled (mem {mem} MiB):");
        println!("  cold start to first tick  {}", fmt(&cold));
        println!(
            "  snapshot none             {}   {:5.2} GB/s of guest memory   image {:7.1} MiB",
            fmt(&snap_none),
            rate(&snap_none),
            size("none-0.img") as f64 / 1048576.0
        );
        println!(
            "  snapshot zstd:1           {}   {:5.2} GB/s of guest memory   image {:7.1} MiB",
            fmt(&snap_zstd),
            rate(&snap_zstd),
            size("zstd-0.img") as f64 / 1048576.0
        );
        let med = |v: &[f64]| median_spread(v.to_vec()).0;
        for (what, v) in [
            ("restore from none, lazy ", &restore_none),
            ("restore from none, eager", &eager_none),
            ("restore from zstd:1, lazy ", &restore_zstd),
            ("restore from zstd:1, eager", &eager_zstd),
        ] {
            println!(
                "  {what:<27} {}   {:5.2}x cold start   (to the first tick)",
                fmt(v),
                med(v) / cold_m
            );
        }
        println!(
            "  memory read again, lazy    {}   {:5.2}x eager   (restore from zstd:1 to the guest's first whole pass over its memory)",
            fmt(&lazy_sum),
            med(&lazy_sum) / med(&eager_sum)
        );
        println!("  memory read again, eager   {}", fmt(&eager_sum));
    }
}

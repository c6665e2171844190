//! Incremental snapshots against full ones, on the test guest rewriting 1%
//! of its filled memory per second (the benchmark mix: 50% zero, 35%
//! text-like, 15% random pages), in one run:
//!
//!     cargo bench -p vmm-tests --bench increments
//!     INC_BENCH_SIZES=256,1024 INC_BENCH_RUNS=5 cargo bench -p vmm-tests --bench increments
//!
//! For each guest size:
//! - a second of rewrites, then `vmm snapshot --parent LAST` (an increment),
//!   then a second of rewrites and a full `vmm snapshot`, alternately:
//!   wall time of the command, the VM's pause, the image size;
//! - restore until the first tick from a full image and from a chain of a
//!   full image and three increments (both read eagerly: a chain restores
//!   that way), alternately.
//!
//! Prints medians and spread (min..max).

use std::path::Path;
use std::time::{Duration, Instant};

use vmm_tests::bench::{env_usize, summary, until_tick};
use vmm_tests::test_guest::run_args;
use vmm_tests::{vmm_in, Running, Scratch};

/// `vmm snapshot` into `out` with `extra` flags: (wall ms, the VMM's
/// answer).
fn snapshot(dir: &Path, out: &str, extra: &[&str]) -> (f64, serde_json::Value) {
    let mut args = vec!["snapshot", "--api-sock", "api.sock", "--out", out, "--json"];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let o = vmm_in(dir, &args);
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (
        ms,
        serde_json::from_slice(&o.stdout).expect("--json answer"),
    )
}

/// Milliseconds from `vmm restore --from image` to the guest's first tick.
fn restore_to_tick(dir: &Path, image: &str) -> f64 {
    let start = Instant::now();
    let mut r = Running::spawn(&["restore", "--eager", "--from", image], dir);
    let ms = until_tick(&mut r, start);
    let _ = r.kill();
    ms
}

/// The VM's pause (ms) and the image's size (MiB) from an answer.
fn pause_and_size(a: &serde_json::Value) -> (f64, f64) {
    (
        a["pause_ms"].as_f64().unwrap_or(f64::NAN),
        a["bytes"].as_f64().unwrap_or(f64::NAN) / 1048576.0,
    )
}

fn main() {
    let sizes: Vec<u32> = std::env::var("INC_BENCH_SIZES")
        .unwrap_or_else(|_| "256,1024".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let runs = env_usize("INC_BENCH_RUNS", 3);
    println!("incremental vs full snapshots of the test guest, 1% of memory rewritten per second, {runs} runs");
    for mib in sizes {
        let s = Scratch::new(&format!("inc-bench-{mib}"));
        let rate = u64::from(mib) * 256 / 100;
        let cmdline = format!("ticks=10 dirty={mib},pattern=mix,rate={rate}");
        let args = run_args(1, mib + 256, &cmdline);
        let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
        args.extend(["--api-sock", "api.sock"]);
        let mut vm = Running::spawn(&args, &s.0);
        assert!(
            vm.wait_for(Duration::from_secs(300), |o| o.contains("tick ")),
            "{}\n{}",
            vm.output(),
            vm.stderr()
        );
        let (mut inc, mut full) = (Vec::new(), Vec::new());
        let mut last = "full-base.img".to_string();
        snapshot(&s.0, &last, &["--track"]);
        for i in 0..runs {
            std::thread::sleep(Duration::from_secs(1));
            let out = format!("inc-{i}.img");
            inc.push(snapshot(&s.0, &out, &["--parent", &last]));
            std::thread::sleep(Duration::from_secs(1));
            last = format!("full-{i}.img");
            full.push(snapshot(&s.0, &last, &["--track"]));
        }
        // The chain to restore: a full image and three increments.
        let mut parent = last.clone();
        for k in 1..=3 {
            std::thread::sleep(Duration::from_secs(1));
            let out = format!("chain-{k}.img");
            let stop: &[&str] = if k == 3 { &["--stop"] } else { &[] };
            snapshot(
                &s.0,
                &out,
                &[&["--parent", parent.as_str()][..], stop].concat(),
            );
            parent = out;
        }
        let _ = vm.finish(Duration::from_secs(30));
        let (mut from_full, mut from_chain) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            from_full.push(restore_to_tick(&s.0, &last));
            from_chain.push(restore_to_tick(&s.0, "chain-3.img"));
        }
        println!("guest {mib} MiB filled, {rate} pages rewritten per second:");
        let column = |v: &[(f64, serde_json::Value)],
                      f: &dyn Fn(&(f64, serde_json::Value)) -> f64| {
            v.iter().map(f).collect::<Vec<f64>>()
        };
        for (label, v) in [("increment", &inc), ("full", &full)] {
            summary(&format!("{label}: vmm snapshot"), "ms", column(v, &|x| x.0));
            summary(
                &format!("{label}: VM paused"),
                "ms",
                column(v, &|x| pause_and_size(&x.1).0),
            );
            summary(
                &format!("{label}: image"),
                "MiB",
                column(v, &|x| pause_and_size(&x.1).1),
            );
            summary(
                &format!("{label}: memory pages"),
                "",
                column(v, &|x| x.1["memory_pages"].as_f64().unwrap_or(f64::NAN)),
            );
        }
        summary("restore, full image", "ms", from_full);
        summary("restore, full + 3 increments", "ms", from_chain);
    }
}

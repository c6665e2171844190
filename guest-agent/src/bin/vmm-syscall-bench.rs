//! Measures what a system call costs inside the guest: getpid, a 4 KiB write,
//! and fork + exit + wait. Prints the median and spread per call in
//! microseconds, one line each, for the README and the user-space issue.
//!
//!     vmm run -- vmm-syscall-bench [ROUNDS]

use std::io::Write;
use std::time::Instant;

fn measure(rounds: usize, mut f: impl FnMut()) -> Vec<f64> {
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

fn report(name: &str, v: &[f64]) {
    println!(
        "{name:20} median {:10.1} us   min {:10.1}   max {:10.1}   n={}",
        v[v.len() / 2],
        v[0],
        v[v.len() - 1],
        v.len()
    );
}

fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(50)
        .max(1);
    report(
        "getpid",
        &measure(rounds, || {
            std::hint::black_box(std::process::id());
        }),
    );
    let mut null = match std::fs::OpenOptions::new().write(true).open("/dev/null") {
        Ok(f) => f,
        Err(e) => {
            eprintln!("vmm-syscall-bench: cannot open /dev/null: {e}");
            std::process::exit(1);
        }
    };
    let page = [0x5au8; 4096];
    report(
        "write 4 KiB",
        &measure(rounds, || {
            let _ = null.write(&page);
        }),
    );
    let forks = (rounds / 5).max(3);
    report("fork+exit+wait", &measure(forks, fork_exit_wait));
    report(
        "fork+exec true+wait",
        &measure(forks, || {
            let _ = std::process::Command::new("/bin/true").status();
        }),
    );
}

/// One child that exits at once, and the wait for it.
fn fork_exit_wait() {
    // SAFETY: the child calls only the async-signal-safe _exit.
    let pid = unsafe { libc::fork() };
    match pid {
        // SAFETY: _exit ends the child without running the parent's destructors.
        0 => unsafe { libc::_exit(0) },
        p if p > 0 => {
            let mut status = 0;
            // SAFETY: waits for the child just created, with a valid status pointer.
            unsafe { libc::waitpid(p, &mut status, 0) };
        }
        _ => eprintln!("vmm-syscall-bench: fork failed"),
    }
}

//! Checkpoints asked for from inside the guest, and the after-restore work,
//! as medians with their spread.
//!
//!     AGENT_BENCH_RUNS=5 cargo bench -p vmm-tests --bench agent
//!
//! Boots the default guest once (256 MiB, a restore hook, one program
//! registered for the checkpoint signals), then:
//! - baseline: `vmm snapshot` from the host without the agent
//!   (`--quiesce-timeout 0`) into the snapshot directory's disk;
//! - `vmm_checkpoint()` from a program in the guest (vmm-ckpt-counter):
//!   the call's time as the program sees it, and the VMM's split of it
//!   (prepare: the registered program; freeze; capture; write; resume and
//!   thaw);
//! - restores of one of those images: from the vCPUs resuming to the
//!   after-restore work done (clock, entropy, thaw, generation, signals,
//!   hooks), and the guest's own time for each step.
//!
//! The guest kernel is interpreted here (each guest system call about
//! 0.3 ms), which the agent's steps pay in full.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use vmm_tests::bench::{env_usize as env, summary};
use vmm_tests::{rootfs_copy, vmm_bin, Running, Scratch};

const SCRIPT: &str = r#"
mkdir -p /etc/vmm/restore.d
printf '#!/bin/sh\ntrue\n' > /etc/vmm/restore.d/10-noop
chmod +x /etc/vmm/restore.d/10-noop
sh -c 'trap "echo ready $$ > /run/vmm/notify" USR1; echo register $$ > /run/vmm/notify; while :; do sleep 1000 & wait $!; done' &
echo bench-ready
exec sleep 1000000
"#;

/// The number after `key` in `line` ("prepare 1.5 ms" → 1.5).
fn number_after(line: &str, key: &str) -> Option<f64> {
    let rest = &line[line.find(key)? + key.len()..];
    let num: String = rest
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    num.parse().ok()
}

fn agent_exec(sock: &Path, script: &str) -> String {
    let o = vmm_tests::vmm_agent(sock, &["exec", "--", "sh", "-c", script], b"");
    assert!(
        o.status.success(),
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn main() {
    let runs = env("AGENT_BENCH_RUNS", 5);
    let s = Scratch::new("agent-bench");
    let snaps = s.0.join("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let rootfs = rootfs_copy(&s.0);
    let sock = s.0.join("api.sock");
    std::env::set_var("RUST_LOG", "vmm=info");
    let mut vm = Running::spawn(
        &[
            "run",
            "--mem",
            "256",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
            "--snapshot-dir",
            snaps.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            SCRIPT,
        ],
        &s.0,
    );
    assert!(
        vm.wait_for(Duration::from_secs(900), |o| o.contains("bench-ready")),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    // The agent answers once the guest idles.
    agent_exec(&sock, "true");

    println!("== checkpoints of a 256 MiB guest, {runs} runs each");
    let mut baseline = Vec::new();
    for i in 0..runs {
        let t = Instant::now();
        let o = Command::new(vmm_bin())
            .args(["snapshot", "--api-sock"])
            .arg(&sock)
            .args(["--quiesce-timeout", "0", "--out"])
            .arg(snaps.join(format!("host-{i}.vmm")))
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        baseline.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    summary("host snapshot, no agent", "ms", baseline);

    let mut call = Vec::new();
    for i in 0..runs {
        let out = agent_exec(&sock, &format!("vmm-ckpt-counter b{i} 0 0"));
        assert!(out.contains("original 0"), "{out}");
        let us = out
            .lines()
            .find_map(|l| l.strip_prefix("took-us "))
            .and_then(|n| n.trim().parse::<f64>().ok())
            .expect("took-us line");
        call.push(us / 1000.0);
    }
    summary("vmm_checkpoint() in guest", "ms", call);
    let log = vm.stderr();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("checkpoint: prepare"))
        .skip(runs) // the baseline's
        .collect();
    for key in ["prepare", "freeze", "capture", "write", "resume+thaw"] {
        let v = lines.iter().filter_map(|l| number_after(l, key)).collect();
        summary(&format!("  {key}"), "ms", v);
    }
    let _ = vmm::client::json(&sock, "PUT", "/vm/shutdown", &serde_json::json!({}));
    vm.finish(Duration::from_secs(60));

    println!("== after-restore work, {runs} restores");
    let image = snaps.join("b0.vmm");
    let mut total = Vec::new();
    let mut guest = Vec::new();
    let mut steps: Vec<(String, Vec<f64>)> = Vec::new();
    for i in 0..runs {
        let disks = s.0.join(format!("disks-{i}"));
        std::fs::create_dir_all(&disks).unwrap();
        let rsock = s.0.join(format!("r{i}.sock"));
        let r = Running::spawn(
            &[
                "restore",
                "--from",
                image.to_str().unwrap(),
                "--disk-dir",
                disks.to_str().unwrap(),
                "--api-sock",
                rsock.to_str().unwrap(),
            ],
            &s.0,
        );
        // The log has no timestamps: note when each line shows up.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut resumed = None;
        while !r.stderr().contains("after-restore work done") {
            assert!(Instant::now() < deadline, "{}", r.stderr());
            if resumed.is_none() && r.stderr().contains("vCPUs running") {
                resumed = Some(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        if let Some(t) = resumed {
            total.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        let err = r.stderr();
        let done_line = err
            .lines()
            .find(|l| l.contains("after-restore work done"))
            .unwrap();
        if let Some(us) = number_after(done_line, "guest:") {
            guest.push(us / 1000.0);
        }
        for name in ["clock", "entropy", "thaw", "generation", "signals", "hooks"] {
            if let Some(us) = number_after(done_line, &format!("{name} ")) {
                match steps.iter_mut().find(|(n, _)| n == name) {
                    Some((_, v)) => v.push(us / 1000.0),
                    None => steps.push((name.to_string(), vec![us / 1000.0])),
                }
            }
        }
        let _ = vmm::client::json(&rsock, "PUT", "/vm/shutdown", &serde_json::json!({}));
        r.finish(Duration::from_secs(60));
        let _ = std::fs::remove_dir_all(&disks);
    }
    summary("resume to work done (VMM)", "ms", total);
    summary("work in the guest", "ms", guest);
    for (name, v) in steps {
        summary(&format!("  {name}"), "ms", v);
    }
}

//! A snapshot of a running VM that carries on pauses it only to capture
//! its state and fork a writer: the child writes memory as it was at the
//! pause while the guest goes on writing. The test guest rewrites pages
//! all the time and checks them on every tick (`verify`), so an image
//! holding any page from after the pause, or a running guest disturbed by
//! the copy-on-write, says `verify BAD`.

use std::time::{Duration, Instant};

use vmm_tests::kvm_available;
use vmm_tests::test_guest::{restore_verifying, run_with_api_and, snapshot, verified};

const WAIT: Duration = Duration::from_secs(60);

fn said(vm: &vmm_tests::Running) -> String {
    format!("{}\n{}", vm.output(), vm.stderr())
}

#[test]
fn a_snapshot_taken_while_the_guest_writes_is_the_memory_of_its_pause() {
    if !kvm_available("a_snapshot_taken_while_the_guest_writes_is_the_memory_of_its_pause") {
        return;
    }
    for n in [1u32, 4] {
        let s = vmm_tests::Scratch::new(&format!("short-pause-{n}"));
        let smp = if n > 1 { " smp" } else { "" };
        // 256 MiB of the mix, 50,000 pages (200 MiB) rewritten a second:
        // the guest rewrites thousands of pages while the image is written.
        let cmdline = format!("ticks=20 regs{smp} dirty=256,pattern=mix,rate=50000 verify");
        let mut vm = run_with_api_and(&s.0, n, 512, &cmdline, &[]);
        assert!(vm.wait_for(WAIT, |o| verified(o) >= 2), "{}", said(&vm));

        let full = snapshot(&s.0, "paused.img", &["--full-pause"]).unwrap();
        assert_eq!(full["background"], false, "{full}");
        assert_eq!(full["full_pause"], "asked for (--full-pause)", "{full}");

        let seen = verified(&vm.output());
        let a = snapshot(&s.0, "running.img", &[]).unwrap();
        assert_eq!(a["background"], true, "{a}");
        assert!(a.get("full_pause").is_none(), "{a}");
        let (pause, total) = (
            a["pause_ms"].as_f64().unwrap(),
            a["total_ms"].as_f64().unwrap(),
        );
        assert!(
            pause > 0.0 && pause < total,
            "the VM was paused for the write: {a}"
        );
        // The running guest's memory is untouched by the copy-on-write.
        assert!(
            vm.wait_for(WAIT, |o| verified(o) >= seen + 3 || o.contains("BAD")),
            "{}",
            said(&vm)
        );
        let ran = vm.kill().out();
        assert!(!ran.contains("BAD"), "{n} vCPUs, the running guest:\n{ran}");

        let (ok, after) = restore_verifying(&s.0, "running.img");
        let out = after.out();
        assert!(
            ok,
            "{n} vCPUs: the guest does not run:\n{out}\n{}",
            after.stderr
        );
        assert!(
            !out.contains("BAD"),
            "{n} vCPUs: the image is not the memory of one instant:\n{out}"
        );
        assert!(!out.contains("ready"), "the guest started over:\n{out}");
        for cpu in (0..n).filter(|_| n > 1) {
            assert!(
                out.contains(&format!("cpu {cpu} regs ok")),
                "cpu {cpu}:\n{out}"
            );
        }
    }
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<i32> {
    let mut kids = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let Ok(task) = task else { continue };
        let list = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        kids.extend(
            list.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    kids
}

#[test]
fn a_writer_killed_midway_leaves_the_earlier_image_and_a_running_vm() {
    if !kvm_available("a_writer_killed_midway_leaves_the_earlier_image_and_a_running_vm") {
        return;
    }
    let s = vmm_tests::Scratch::new("short-pause-killed");
    let dir = s.0.display().to_string();
    // The VMM writes into the scratch directory itself.
    let mut vm = run_with_api_and(
        &s.0,
        1,
        1024,
        "ticks=20 dirty=768,pattern=mix,rate=2000 verify",
        &["--snapshot-dir", &dir],
    );
    assert!(vm.wait_for(WAIT, |o| verified(o) >= 2), "{}", said(&vm));
    let dest = s.0.join("vm.img");
    let first = snapshot(&s.0, &dest.display().to_string(), &[]).unwrap();
    let before = std::fs::read(&dest).unwrap();

    // zstd at its slowest level: seconds to write, time to kill the child.
    let slow = vmm_tests::Running::spawn(
        &[
            "snapshot",
            "--api-sock",
            "api.sock",
            "--out",
            &dest.display().to_string(),
            "--compress",
            "zstd:19",
        ],
        &s.0,
    );
    let t0 = Instant::now();
    let writer = loop {
        if let Some(&pid) = children(vm.pid()).first() {
            break pid;
        }
        assert!(t0.elapsed() < WAIT, "no writer appeared: {}", said(&vm));
        std::thread::sleep(Duration::from_millis(5));
    };
    std::thread::sleep(Duration::from_millis(300));
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &writer.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let o = slow.finish(WAIT);
    assert_eq!(o.status, Some(1), "{}\n{}", o.stdout, o.stderr);
    let err = o.stderr.trim();
    assert!(
        err.contains(&format!(
            "the image's writer (pid {writer}) was killed by signal 9"
        )) && err.lines().count() == 1,
        "{err}"
    );
    // The earlier image is whole, and nothing of the killed write is left.
    assert_eq!(
        std::fs::read(&dest).unwrap(),
        before,
        "the earlier image changed"
    );
    let left: Vec<_> = std::fs::read_dir(&s.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");

    // The VM ran on, and takes its next snapshot as before.
    let seen = verified(&vm.output());
    assert!(
        vm.wait_for(WAIT, |o| verified(o) >= seen + 2),
        "{}",
        said(&vm)
    );
    let next = snapshot(&s.0, "next.img", &[]).unwrap();
    assert_eq!(next["background"], true, "{next}");
    assert_ne!(next["image_id"], first["image_id"]);
    assert!(!vm.kill().out().contains("BAD"));
}

/// A lazily restored VM is snapshotted once its memory is all in (the
/// fork could not carry the pages still to come), then with the short
/// pause: the image is whole.
#[test]
fn a_lazily_restored_vm_is_snapshotted_once_its_memory_is_in() {
    if !kvm_available("a_lazily_restored_vm_is_snapshotted_once_its_memory_is_in") {
        return;
    }
    let s = vmm_tests::Scratch::new("short-pause-lazy");
    let mut vm = run_with_api_and(
        &s.0,
        1,
        1024,
        "ticks=20 dirty=512,pattern=mix,rate=20000 verify",
        &[],
    );
    assert!(vm.wait_for(WAIT, |o| verified(o) >= 2), "{}", said(&vm));
    snapshot(&s.0, "first.img", &["--stop"]).unwrap();
    let _ = vm.finish(WAIT);

    let mut r = vmm_tests::Running::spawn(
        &["restore", "--from", "first.img", "--api-sock", "api.sock"],
        &s.0,
    );
    assert!(
        r.wait_for(WAIT, |_| s.0.join("api.sock").exists()),
        "{}",
        said(&r)
    );
    let a = snapshot(&s.0, "second.img", &[]).unwrap();
    assert_eq!(a["background"], true, "{a}");
    assert!(a["fill_wait_ms"].as_f64().is_some(), "{a}");
    let ran = r.kill().out();
    assert!(!ran.contains("BAD"), "{ran}");

    let (ok, after) = restore_verifying(&s.0, "second.img");
    let out = after.out();
    assert!(ok && !out.contains("BAD"), "{out}\n{}", after.stderr);
}

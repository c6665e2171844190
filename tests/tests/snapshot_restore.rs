//! Whole-VM snapshot and restore of the default Linux guest: one boot, then
//! restores (which skip the boot) check that the guest carries on exactly
//! where it was: the container command's ticks continue, with the same boot
//! id and pid, through parallel restores, a pipe, and a chain of three.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmm_tests::{kvm_available, rootfs_copy, vmm_bin, vmm_in, Running, Scratch};

const BOOT: Duration = Duration::from_secs(900);
const RUN: Duration = Duration::from_secs(600);

/// Counts to 30, printing the boot id and its own pid with every tick.
const TICKER: &str = "read b < /proc/sys/kernel/random/boot_id; i=0; \
    while [ $i -lt 30 ]; do i=$((i+1)); echo tick $i $b $$; sleep 0.3; done; exit 3";

/// (tick number, boot id, pid) of every tick line.
fn ticks(out: &str) -> Vec<(u32, String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.trim().strip_prefix("tick ")?.split_whitespace();
            Some((w.next()?.parse().ok()?, w.next()?.into(), w.next()?.into()))
        })
        .collect()
}

/// Checks that `out` carries on the ticks of `before` with the same boot id
/// and pid, up to the last tick; returns its first tick.
fn carries_on(out: &str, after: u32, boot_id: &str, pid: &str) -> u32 {
    let t = ticks(out);
    assert!(!t.is_empty(), "no ticks after restore:\n{out}");
    assert!(
        t[0].0 > after,
        "ticks restarted at {} (last before the snapshot: {after}):\n{out}",
        t[0].0
    );
    assert!(
        t.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "ticks skip or repeat: {:?}",
        t.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    assert_eq!(t.last().map(|x| x.0), Some(30), "{out}");
    for (n, b, p) in &t {
        assert_eq!(b, boot_id, "tick {n}: boot id changed");
        assert_eq!(p, pid, "tick {n}: pid changed");
    }
    t[0].0
}

fn snapshot(dir: &Path, sock: &str, out: &str, extra: &[&str]) {
    let mut args = vec!["snapshot", "--api-sock", sock, "--out", out];
    args.extend_from_slice(extra);
    let o = vmm_in(dir, &args);
    assert!(
        o.status.success(),
        "vmm snapshot {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_ticking_container_carries_on_after_restore() {
    if !kvm_available("a_ticking_container_carries_on_after_restore") {
        return;
    }
    let s = Scratch::new("snap-ticks");
    let dir = s.0.clone();
    let rootfs = rootfs_copy(&dir);
    let mut orig = Running::spawn(
        &[
            "run",
            "--vcpus",
            "2",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--api-sock",
            "orig.sock",
            "--",
            "sh",
            "-c",
            TICKER,
        ],
        &dir,
    );
    assert!(
        orig.wait_for(BOOT, |o| ticks(o).len() >= 3),
        "the original never ticked:\n{}\n{}",
        orig.output(),
        orig.stderr()
    );
    // Checkpoint and continue, to a file and through a pipe.
    snapshot(&dir, "orig.sock", "a.img", &[]);
    let b = Command::new(vmm_bin())
        .args(["snapshot", "--api-sock", "orig.sock", "--out", "-"])
        .current_dir(&dir)
        .stdout(std::fs::File::create(dir.join("b.img")).unwrap())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(b.status.success(), "{}", String::from_utf8_lossy(&b.stderr));
    // The original carries on after both snapshots.
    let seen = ticks(&orig.output()).len();
    assert!(
        orig.wait_for(RUN, |o| ticks(o).len() > seen + 1),
        "the original stopped after the snapshot:\n{}",
        orig.output()
    );
    let orig = orig.kill();
    let t = ticks(&orig.out());
    let (boot_id, pid) = (t[0].1.clone(), t[0].2.clone());
    assert_eq!(t[0].0, 1);

    let v = vmm_in(&dir, &["inspect", "--verify", "b.img"]);
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    let report = String::from_utf8_lossy(&v.stdout);
    // One section per vCPU and per device, the disk bound to its device.
    for (kind, name) in [
        ("vcpu", "0"),
        ("vcpu", "1"),
        ("device", "serial/0"),
        ("device", "i8042/0"),
        ("device", "rtc/0"),
        ("device", "status-port/0"),
        ("device", "virtio-blk/0"),
        ("disk", "virtio-blk/0"),
    ] {
        let listed = report.lines().any(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            w.len() >= 2 && w[0] == kind && w[1] == name
        });
        assert!(listed, "no {kind} section {name:?} in:\n{report}");
    }

    // Two restores of one image, side by side, each with its own disk.
    std::fs::create_dir_all(dir.join("d1")).unwrap();
    std::fs::create_dir_all(dir.join("d2")).unwrap();
    let r1 = Running::spawn(&["restore", "--from", "a.img", "--disk-dir", "d1"], &dir);
    let r2 = Running::spawn(&["restore", "--from", "a.img", "--disk-dir", "d2"], &dir);
    let (o1, o2) = (r1.finish(RUN), r2.finish(RUN));
    for o in [&o1, &o2] {
        assert_eq!(o.status, Some(3), "{}\n{}", o.out(), o.stderr);
        carries_on(&o.out(), 2, &boot_id, &pid);
    }
    assert_eq!(ticks(&o1.out())[0].0, ticks(&o2.out())[0].0);
    for d in ["d1", "d2"] {
        let disks: Vec<_> = std::fs::read_dir(dir.join(d)).unwrap().collect();
        assert_eq!(disks.len(), 1, "{d} holds the restored disk");
    }

    // A chain of three: restore the piped image, snapshot it again with
    // --stop straight into a second restore through a pipe.
    std::fs::create_dir_all(dir.join("d3")).unwrap();
    std::fs::create_dir_all(dir.join("d4")).unwrap();
    let mut second = Running::spawn(
        &[
            "restore",
            "--from",
            "b.img",
            "--disk-dir",
            "d3",
            "--api-sock",
            "second.sock",
        ],
        &dir,
    );
    assert!(
        second.wait_for(RUN, |o| !ticks(o).is_empty()),
        "{}\n{}",
        second.output(),
        second.stderr()
    );
    let mut snap = Command::new(vmm_bin())
        .args([
            "snapshot",
            "--api-sock",
            "second.sock",
            "--out",
            "-",
            "--stop",
        ])
        .current_dir(&dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let third = Command::new(vmm_bin())
        .args(["restore", "--from", "-", "--disk-dir", "d4"])
        .current_dir(&dir)
        .stdin(snap.stdout.take().unwrap())
        .output()
        .unwrap();
    let snap = snap.wait_with_output().unwrap();
    assert!(
        snap.status.success(),
        "vmm snapshot --out - --stop: {}",
        String::from_utf8_lossy(&snap.stderr)
    );
    let second = second.finish(RUN);
    assert_eq!(
        second.status,
        Some(0),
        "--stop ends the VM: {}",
        second.stderr
    );
    let last_second = ticks(&second.out()).last().map(|t| t.0).unwrap();
    carries_on_partial(&second.out(), &boot_id, &pid);
    let third_out = String::from_utf8_lossy(&third.stdout).replace('\r', "");
    assert_eq!(
        third.status.code(),
        Some(3),
        "{third_out}\n{}",
        String::from_utf8_lossy(&third.stderr)
    );
    carries_on(&third_out, 2, &boot_id, &pid);
    // Along the chain no tick is lost or repeated. A line cut by the
    // snapshot is finished by the next VM, so check the outputs joined.
    let joined = ticks(&format!("{}{third_out}", second.out()));
    assert!(
        joined.windows(2).all(|w| w[1].0 == w[0].0 + 1),
        "ticks along the chain: {:?}",
        joined.iter().map(|x| x.0).collect::<Vec<_>>()
    );
    assert!(joined[0].0 <= last_second);
}

/// Like [`carries_on`] for a VM stopped before its last tick.
fn carries_on_partial(out: &str, boot_id: &str, pid: &str) {
    let t = ticks(out);
    assert!(t.windows(2).all(|w| w[1].0 == w[0].0 + 1), "{out}");
    assert!(t.iter().all(|x| x.1 == boot_id && x.2 == pid), "{out}");
}

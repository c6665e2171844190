//! Bad input ends in a one-line error naming the problem and a non-zero exit.

use std::time::Duration;
use vmm_tests::{kvm_available, run_vmm, Scratch};

fn assert_one_line_error(args: &[&str], needle: &str) {
    let o = run_vmm(args, b"", Duration::from_secs(30));
    assert!(!o.timed_out, "vmm {args:?} hung");
    assert_ne!(o.status, Some(0), "vmm {args:?} succeeded: {o:?}");
    assert!(o.status.is_some(), "vmm {args:?} died from a signal: {o:?}");
    let lines: Vec<&str> = o.stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "vmm {args:?}: expected one line, got {:?}",
        o.stderr
    );
    assert!(
        lines[0].contains(needle),
        "vmm {args:?}: error {:?} does not mention {needle:?}",
        lines[0]
    );
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

#[test]
fn missing_and_garbage_kernels() {
    if !kvm_available("missing_and_garbage_kernels") {
        return;
    }
    let s = Scratch::new("bad-kernel");
    assert_one_line_error(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
    let garbage = s.0.join("garbage");
    std::fs::write(&garbage, vec![0x5a; 100_000]).unwrap();
    assert_one_line_error(
        &["run", "--kernel", garbage.to_str().unwrap()],
        "not a kernel image",
    );
    let empty = s.0.join("empty");
    std::fs::write(&empty, b"").unwrap();
    assert_one_line_error(
        &["run", "--kernel", empty.to_str().unwrap()],
        "not a kernel image",
    );
}

#[test]
fn bad_sizes_and_missing_rootfs() {
    let s = Scratch::new("bad-sizes");
    let k = s.0.join("k");
    std::fs::write(&k, b"\x7fELF").unwrap();
    let k = k.to_str().unwrap();
    assert_one_line_error(&["run", "--kernel", k, "--vcpus", "0"], "--vcpus");
    assert_one_line_error(&["run", "--kernel", k, "--vcpus", "300"], "--vcpus");
    assert_one_line_error(&["run", "--kernel", k, "--mem", "1"], "--mem");
    assert_one_line_error(
        &["run", "--kernel", k, "--rootfs", "/nonexistent/rootfs.ext4"],
        "/nonexistent/rootfs.ext4",
    );
}

#[test]
fn missing_default_guest_is_reported() {
    let s = Scratch::new("no-guest");
    let o = run_vmm_env(&["run"], &[("VMM_GUEST_DIR", s.0.to_str().unwrap())]);
    assert_ne!(o.0, Some(0));
    assert!(o.1.contains("build-guest.sh"), "{}", o.1);
    assert_eq!(o.1.lines().count(), 1, "{}", o.1);
}

/// /dev/kvm replaced (in a private mount namespace) by something that is not KVM.
#[test]
fn unusable_dev_kvm_is_reported() {
    let s = Scratch::new("no-kvm");
    let k = s.0.join("k");
    std::fs::write(&k, b"\x7fELF").unwrap();
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} run --kernel {}",
        vmm_tests::vmm_bin().display(),
        k.display()
    );
    let out = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run unshare");
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("unshare failed") || err.contains("Operation not permitted") {
        assert!(
            std::env::var("CI").is_err(),
            "cannot build the test namespace under CI: {err}"
        );
        eprintln!("skipped: no permission for a private mount namespace");
        return;
    }
    assert_ne!(out.status.code(), Some(0));
    assert!(err.contains("/dev/kvm"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

fn run_vmm_env(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String) {
    let out = std::process::Command::new(vmm_tests::vmm_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run vmm");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The default kernel with 64 MiB and an API socket (plus `extra` flags),
/// once the socket is up: a real VM to snapshot, cheaply, since an image of
/// a kernel a moment after it starts is as good as any for these checks.
fn kernel_with_api(dir: &std::path::Path, sock: &str, extra: &[&str]) -> vmm_tests::Running {
    let kernel = vmm_tests::guest_dir().join("vmlinux");
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--mem", "64"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--api-sock", sock]);
    let mut vm = vmm_tests::Running::spawn(&args, dir);
    assert!(
        vm.wait_for(Duration::from_secs(30), |_| std::path::Path::new(sock)
            .exists()),
        "{}",
        vm.stderr()
    );
    vm
}

/// A VMM that is gone, an unwritable destination, and damaged images: each a
/// one-line error; the running VM survives a failed snapshot.
#[test]
fn bad_images_and_failed_snapshots() {
    if !kvm_available("bad_images_and_failed_snapshots") {
        return;
    }
    let s = Scratch::new("bad-images");
    let sock = s.0.join("api.sock");
    let sock = sock.to_str().unwrap();
    assert_one_line_error(
        &["snapshot", "--api-sock", sock, "--out", "/tmp/never.img"],
        "no VMM answers",
    );
    let vm = kernel_with_api(&s.0, sock, &[]);
    assert_one_line_error(
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            "/proc/no/such/dir/x.img",
        ],
        "/proc/no/such/dir",
    );
    let bogus = s.0.join("bogus.img");
    assert_one_line_error(
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            bogus.to_str().unwrap(),
            "--compress",
            "bogus",
        ],
        "unknown compression 'bogus'",
    );
    assert!(!bogus.exists());
    // The VM survived both failures: a good snapshot still works.
    let img = s.0.join("good.img");
    let o = vmm_tests::vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            img.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vm.kill();
    let leftovers: Vec<_> = std::fs::read_dir(&s.0)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left behind");

    let good = std::fs::read(&img).unwrap();
    assert!(good.len() > 1000);
    let write = |name: &str, bytes: &[u8]| {
        let p = s.0.join(name);
        std::fs::write(&p, bytes).unwrap();
        p.to_str().unwrap().to_string()
    };
    assert_one_line_error(
        &["restore", "--from", "/nonexistent/x.img"],
        "/nonexistent/x.img",
    );
    assert_one_line_error(
        &["restore", "--from", &write("garbage.img", &[0x42; 5000])],
        "not a vmm snapshot image",
    );
    let mut v9 = good.clone();
    v9[8] = 9;
    assert_one_line_error(
        &["restore", "--from", &write("v9.img", &v9)],
        "version 9 is not supported (this build reads version 2)",
    );
    for cut in [10, 100, good.len() / 3, good.len() / 2, good.len() - 40] {
        let p = write("cut.img", &good[..cut]);
        assert_one_line_error(&["restore", "--from", &p], "truncated");
        assert_one_line_error(&["inspect", "--verify", &p], "truncated");
    }
    let mut flipped = good.clone();
    let mid = good.len() / 2;
    flipped[mid] ^= 0x10;
    let p = write("flipped.img", &flipped);
    let o = run_vmm(&["inspect", "--verify", &p], b"", Duration::from_secs(30));
    assert_ne!(o.status, Some(0));
    assert!(
        o.stderr.contains("checksum") || o.stderr.contains("corrupt"),
        "{}",
        o.stderr
    );
    assert_eq!(o.stderr.lines().count(), 1, "{}", o.stderr);
    assert!(std::fs::read(&img).unwrap() == good);

    // An image from a host of the other CPU vendor: the header rewritten
    // (same length, so everything after it stays valid).
    let header = snapshot::ImageReader::new(&good[..])
        .unwrap()
        .header()
        .clone();
    let other = if header.cpu_vendor == "GenuineIntel" {
        "AuthenticAMD"
    } else {
        "GenuineIntel"
    };
    let mut h = header.clone();
    h.cpu_vendor = other.into();
    let fresh = snapshot::ImageWriter::new(Vec::new(), &h)
        .unwrap()
        .finish()
        .unwrap()
        .0;
    let hlen = 16 + u32::from_le_bytes(good[12..16].try_into().unwrap()) as usize + 4;
    let mut foreign = fresh[..hlen].to_vec();
    foreign.extend_from_slice(&good[hlen..]);
    assert_one_line_error(
        &["restore", "--from", &write("foreign.img", &foreign)],
        &format!("image is for CPU vendor '{other}'"),
    );
}

/// Unmounts a test mount even when the test fails.
struct Mount(std::path::PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

/// A full destination fails the snapshot with the reason, leaves the earlier
/// image there untouched and the VM running; an image taken with --no-disk
/// refuses a disk that changed since.
#[test]
fn full_destination_and_changed_disk() {
    if !kvm_available("full_destination_and_changed_disk") {
        return;
    }
    let s = Scratch::new("disk-full");
    let full = s.0.join("full");
    std::fs::create_dir_all(&full).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=512k", "none"])
        .arg(&full)
        .status()
        .expect("run mount");
    assert!(
        mounted.success(),
        "cannot mount a small tmpfs (tests run as root)"
    );
    let _mount = Mount(full.clone());
    let prev = full.join("prev.img");
    std::fs::write(&prev, b"an earlier image").unwrap();

    let disk = s.0.join("disk.img");
    let mut bytes = vec![0u8; 4 << 20];
    for (i, b) in bytes.iter_mut().enumerate().step_by(4096) {
        *b = (i >> 12) as u8 | 1;
    }
    std::fs::write(&disk, &bytes).unwrap();
    let sock = s.0.join("api.sock");
    let sock = sock.to_str().unwrap();
    let vm = kernel_with_api(&s.0, sock, &["--rootfs", disk.to_str().unwrap()]);
    assert_one_line_error(
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            prev.to_str().unwrap(),
        ],
        "No space left",
    );
    assert_eq!(std::fs::read(&prev).unwrap(), b"an earlier image");
    assert_eq!(
        std::fs::read_dir(&full).unwrap().count(),
        1,
        "temporary file left"
    );

    let img = s.0.join("nodisk.img");
    let o = vmm_tests::vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            img.to_str().unwrap(),
            "--no-disk",
        ],
    );
    assert!(
        o.status.success(),
        "the VM survived: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    vm.kill();
    let report = vmm_tests::vmm_in(&s.0, &["inspect", "--json", img.to_str().unwrap()]);
    let report: serde_json::Value = serde_json::from_slice(&report.stdout).unwrap();
    assert_eq!(
        report["disks"].as_array().map(|d| d.len()),
        Some(0),
        "{report}"
    );
    bytes[12345] ^= 0xff;
    std::fs::write(&disk, &bytes).unwrap();
    assert_one_line_error(
        &["restore", "--from", img.to_str().unwrap()],
        "no longer matches",
    );
}

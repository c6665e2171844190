//! Bad input ends in a one-line error naming the problem and a non-zero exit.

use std::os::unix::fs::FileTypeExt;
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

/// `vmm run` with `args` and an API socket at `sock`, once the socket
/// answers.
fn with_api<'a>(
    dir: &std::path::Path,
    mut args: Vec<&'a str>,
    sock: &'a str,
) -> vmm_tests::Running {
    args.extend_from_slice(&["--api-sock", sock]);
    let mut vm = vmm_tests::Running::spawn(&args, dir);
    assert!(
        vm.wait_for(Duration::from_secs(30), |_| {
            std::os::unix::net::UnixStream::connect(sock).is_ok()
        }),
        "{}",
        vm.stderr()
    );
    vm
}

/// The default kernel with 64 MiB and an API socket (plus `extra` flags),
/// once the socket is up: a real VM to snapshot, cheaply, since an image of
/// a kernel a moment after it starts is as good as any for these checks.
fn kernel_with_api(dir: &std::path::Path, sock: &str, extra: &[&str]) -> vmm_tests::Running {
    let kernel = vmm_tests::guest_dir().join("vmlinux");
    let mut args = vec!["run", "--kernel", kernel.to_str().unwrap(), "--mem", "64"];
    args.extend_from_slice(extra);
    with_api(dir, args, sock)
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
    // Bytes after the end: refused, not ignored (FORMAT.md: nothing
    // follows the footer).
    let mut longer = good.clone();
    longer.extend_from_slice(b"appended");
    let p = write("longer.img", &longer);
    assert_one_line_error(&["inspect", "--verify", &p], "data follows the image's end");
    assert_one_line_error(&["restore", "--from", &p], "data follows the image's end");
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

/// The test guest, ticking long enough for the checks below, with an API
/// socket: a running VM in well under a second.
fn test_guest_with_api(dir: &std::path::Path, sock: &str) -> vmm_tests::Running {
    let kernel = vmm_tests::workspace().join("target/test-guest.elf");
    let kernel = kernel.to_str().unwrap().to_string();
    with_api(
        dir,
        vec!["run", "--kernel", &kernel, "--cmdline", "ticks=100000"],
        sock,
    )
}

/// What is at a path the user names stays the user's: `--api-sock` takes
/// over only a stale socket, `--out` replaces only a regular file (through a
/// symbolic link, its target), a dead writer's temporary file is cleaned
/// up, a closed stdout fails `--out -`, a VMM that dies mid-request is
/// named as such.
#[test]
fn files_of_the_user_are_never_destroyed() {
    if !kvm_available("files_of_the_user_are_never_destroyed") {
        return;
    }
    let s = Scratch::new("user-files");
    let kernel = vmm_tests::workspace().join("target/test-guest.elf");
    let kernel = kernel.to_str().unwrap();
    let notes = s.0.join("notes.txt");
    std::fs::write(&notes, "data\n").unwrap();
    let notes = notes.to_str().unwrap();
    assert_one_line_error(
        &[
            "run",
            "--kernel",
            kernel,
            "--cmdline",
            "exit=0",
            "--api-sock",
            notes,
        ],
        "exists and is not a socket: refusing to replace it",
    );
    assert_eq!(std::fs::read_to_string(notes).unwrap(), "data\n");

    // A stale socket (nobody listens) is taken over, and removed at exit.
    let sock = s.0.join("api.sock");
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let sock = sock.to_str().unwrap();
    let o = run_vmm(
        &[
            "run",
            "--kernel",
            kernel,
            "--cmdline",
            "exit=0",
            "--api-sock",
            sock,
        ],
        b"",
        Duration::from_secs(60),
    );
    assert_eq!(o.status, Some(0), "{o:?}");
    assert!(!std::path::Path::new(sock).exists());
    drop(std::os::unix::net::UnixListener::bind(sock).unwrap());
    let vm = test_guest_with_api(&s.0, sock);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(sock).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the API socket is for its owner only");
    // A live one is not.
    assert_one_line_error(
        &[
            "run",
            "--kernel",
            kernel,
            "--cmdline",
            "exit=0",
            "--api-sock",
            sock,
        ],
        "another VMM is already listening",
    );

    let snapshot = |out: &str| {
        run_vmm(
            &["snapshot", "--api-sock", sock, "--out", out],
            b"",
            Duration::from_secs(60),
        )
    };
    for (out, what) in [
        ("/dev/null", "is a device, not a regular file"),
        (s.0.to_str().unwrap(), "is a directory, not a regular file"),
    ] {
        assert_one_line_error(&["snapshot", "--api-sock", sock, "--out", out], what);
    }
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    let dangling = s.0.join("dangling");
    std::os::unix::fs::symlink(s.0.join("nowhere"), &dangling).unwrap();
    assert_one_line_error(
        &[
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            dangling.to_str().unwrap(),
        ],
        "symbolic link to nothing",
    );

    // Through a link: the link stays, its target gets the image.
    let target = s.0.join("img-1");
    std::fs::write(&target, "old").unwrap();
    let latest = s.0.join("latest");
    std::os::unix::fs::symlink("img-1", &latest).unwrap();
    // A temporary file left by a writer killed midway (no such PID, no lock).
    let stale = s.0.join(".img-1.tmp.4194304");
    std::fs::write(&stale, "partial").unwrap();
    let o = snapshot(latest.to_str().unwrap());
    assert_eq!(o.status, Some(0), "{o:?}");
    assert!(std::fs::symlink_metadata(&latest)
        .unwrap()
        .file_type()
        .is_symlink());
    let image = std::fs::read(&target).unwrap();
    assert!(snapshot::ImageReader::new(&image[..]).is_ok());
    assert!(
        !stale.exists(),
        "the dead writer's temporary file is still there"
    );

    // --out - with stdout closed fails instead of losing the image.
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec '{}' snapshot --api-sock '{sock}' --out - >&-",
            vmm_tests::vmm_bin().display()
        ))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("stdout is closed"), "{err}");

    // A VMM that dies during a snapshot is named as gone.
    let pid = vm.pid();
    let stopped = std::process::Command::new("kill")
        .args(["-STOP", &pid.to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let out = s.0.join("never.img");
    let client = std::process::Command::new(vmm_tests::vmm_bin())
        .args([
            "snapshot",
            "--api-sock",
            sock,
            "--out",
            out.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let o = vm.kill();
    assert!(o.status.is_none(), "{o:?}");
    let o = client.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_ne!(o.status.code(), Some(0), "{err}");
    assert!(err.contains("went away during the snapshot"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!out.exists());
}

/// Clients that connect and say nothing (100 of them at once), a body that
/// never finishes, a 1 GiB body: the VM keeps running and a good request
/// still gets its answer within a second.
#[test]
fn the_api_survives_misbehaving_clients() {
    use std::io::Write;
    if !kvm_available("the_api_survives_misbehaving_clients") {
        return;
    }
    let s = Scratch::new("api-clients");
    let sock = s.0.join("api.sock");
    let sock = sock.to_str().unwrap();
    let vm = test_guest_with_api(&s.0, sock);
    // 100 idle connections, opened at once.
    let held: Vec<_> = (0..100)
        .map(|_| std::os::unix::net::UnixStream::connect(sock).unwrap())
        .collect();
    // Headers, then a body that stops short: its request never completes.
    let mut slow = std::os::unix::net::UnixStream::connect(sock).unwrap();
    slow.write_all(b"PUT /vm/pause HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"a\":")
        .unwrap();
    // A gigabyte announced: refused at once, before any of it is read.
    let huge = vmm_tests::http(
        sock,
        "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    assert!(huge.starts_with("HTTP/1.1 413"), "{huge}");
    for _ in 0..3 {
        let t0 = std::time::Instant::now();
        let answer = vmm_tests::http(
            sock,
            "GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("\"vcpus\""), "{answer}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "GET /vm took {:?} with misbehaving clients around",
            t0.elapsed()
        );
    }
    drop(held);
    drop(slow);
    let o = vm.kill();
    assert!(o.status.is_none(), "the VMM ended by itself: {o:?}");
    assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
}

/// A Linux boot on a host without hardware virtualization says once, on a
/// terminal, that it will be slow; --quiet and a non-terminal stderr don't.
#[test]
fn a_slow_boot_says_so_on_a_terminal() {
    if !kvm_available("a_slow_boot_says_so_on_a_terminal") {
        return;
    }
    let note = "the guest kernel is interpreted: booting takes about a minute";
    let interpreted = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let said = vmm_tests::on_a_terminal("run --cold -- true", None, &[], Duration::from_secs(3));
    assert_eq!(said.contains(note), interpreted, "{said}");
    assert!(said.matches(note).count() <= 1, "{said}");
    let quiet = vmm_tests::on_a_terminal(
        "run --cold --quiet -- true",
        None,
        &[],
        Duration::from_secs(3),
    );
    assert!(!quiet.contains(note), "{quiet}");
    // Not a terminal: nothing of the sort either.
    let s = Scratch::new("slow-boot-note");
    let mut vm = vmm_tests::Running::spawn(&["run", "--cold", "--", "true"], &s.0);
    vm.wait_for(Duration::from_secs(3), |_| false);
    let o = vm.kill();
    assert!(!o.stderr.contains(note), "{}", o.stderr);
}

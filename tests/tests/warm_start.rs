//! Warm start: `vmm run --ephemeral -- CMD` restores a cached image of the
//! booted guest (its agent waiting for a command) instead of booting, and
//! behaves as a boot would. One cold boot makes the image the other tests
//! start from; the invalidation test boots twice more.
//!
//! Every run here uses a private cache (`VMM_CACHE_DIR`) and its own copy
//! of the default rootfs, so the developer's cache and guest are untouched.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmm_tests::{guest_dir, kvm_available, rootfs_copy, Outcome, Running, Scratch};

/// A cold boot here takes about 90 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
/// A warm run: restore plus the command.
const WARM_TIMEOUT: Duration = Duration::from_secs(300);

/// The shared rootfs copy and cache, and the cold run that filled it.
struct Setup {
    /// Kept for the tests' lifetime.
    _scratch: Scratch,
    dir: PathBuf,
    rootfs: PathBuf,
    cache: PathBuf,
    /// The first, cold run of [`COMMAND`].
    cold: Outcome,
}

/// Prints something of every kind, exits with a status of its own.
const COMMAND: &[&str] = &["/bin/sh", "-c", "uname -srm; echo on-stderr >&2; exit 3"];

fn vmm(s: &Setup, extra: &[&str], command: &[&str], timeout: Duration) -> Outcome {
    let mut args = vec!["run", "--ephemeral", "--rootfs", s.rootfs.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    let mut r = Running::spawn_env(&args, &s.dir, &env(s));
    r.close_stdin();
    r.finish(timeout)
}

fn env(s: &Setup) -> [(&'static str, &Path); 3] {
    [
        ("VMM_CACHE_DIR", &s.cache),
        ("VMM_GUEST_DIR", guest_dir_static()),
        ("RUST_LOG", Path::new("info")),
    ]
}

fn guest_dir_static() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(guest_dir)
}

fn was_warm(o: &Outcome) -> bool {
    o.stderr.contains("warm image restored")
}

fn saved_warm(o: &Outcome) -> bool {
    o.stderr.contains("(the next run starts from it)")
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let scratch = Scratch::new("warm");
        let dir = scratch.0.clone();
        let rootfs = rootfs_copy(&dir);
        let cache = dir.join("cache");
        let mut s = Setup {
            _scratch: scratch,
            dir,
            rootfs,
            cache,
            cold: Outcome {
                status: None,
                stdout: String::new(),
                stderr: String::new(),
                elapsed: Duration::ZERO,
                timed_out: false,
            },
        };
        s.cold = vmm(&s, &[], COMMAND, BOOT_TIMEOUT);
        assert!(
            !was_warm(&s.cold) && saved_warm(&s.cold),
            "the first run boots and saves a warm image:\n{}\n{}",
            s.cold.out(),
            s.cold.stderr
        );
        assert_eq!(s.cold.status, Some(3), "{}", s.cold.stderr);
        s
    })
}

/// One warm run, which must have been warm.
fn warm(s: &Setup, command: &[&str]) -> Outcome {
    let o = vmm(s, &[], command, WARM_TIMEOUT);
    assert!(
        was_warm(&o),
        "expected a warm start:\n{}\n{}",
        o.out(),
        o.stderr
    );
    o
}

fn cache_names(s: &Setup) -> Vec<String> {
    let mut r = Running::spawn_env(&["cache", "ls", "--json"], &s.dir, &env(s));
    r.close_stdin();
    let o = r.finish(Duration::from_secs(30));
    let v: serde_json::Value = serde_json::from_str(&o.stdout).expect("cache ls --json");
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_warm_run_prints_and_exits_as_the_cold_one_did() {
    if !kvm_available("a_warm_run_prints_and_exits_as_the_cold_one_did") {
        return;
    }
    let s = setup();
    let w = warm(s, COMMAND);
    assert_eq!(w.status, Some(3), "{}", w.stderr);
    assert_eq!(w.out(), s.cold.out(), "the same console output");
    assert!(w.out().contains("Linux 6.1") && w.out().contains("on-stderr"));
    assert!(!saved_warm(&w), "a warm run saves nothing");
    eprintln!(
        "cold run {:.1} s, warm run {:.1} s",
        s.cold.elapsed.as_secs_f64(),
        w.elapsed.as_secs_f64()
    );

    // --cold boots even with a warm image there: its kernel command line
    // carries the command (no waiting agent) and nothing is restored.
    let r = Running::spawn_env(
        &[
            "run",
            "--cold",
            "--ephemeral",
            "--rootfs",
            s.rootfs.to_str().unwrap(),
            "--",
            "true",
        ],
        &s.dir,
        &env(s),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !r.stderr().contains("kernel command line") && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = r.kill();
    assert!(
        o.stderr.contains("vmm.cmd=") && !o.stderr.contains("vmm.start=agent") && !was_warm(&o),
        "{}",
        o.stderr
    );
}

#[test]
fn parallel_warm_runs_see_neither_each_other_nor_the_last_run() {
    if !kvm_available("parallel_warm_runs_see_neither_each_other_nor_the_last_run") {
        return;
    }
    let s = setup();
    let before = std::fs::read(&s.rootfs).unwrap();
    let script = |me: &str| {
        format!(
            "echo {me} > /root/{me}-was-here; sync; sleep 4; ls /root | grep -- -was-here | tr '\\n' ' '; echo"
        )
    };
    let (a, b) = std::thread::scope(|t| {
        let a = t.spawn(|| warm(s, &["/bin/sh", "-c", &script("a")]));
        std::thread::sleep(Duration::from_millis(300));
        let b = t.spawn(|| warm(s, &["/bin/sh", "-c", &script("b")]));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(a.out().trim(), "a-was-here", "{}", a.stderr);
    assert_eq!(b.out().trim(), "b-was-here", "{}", b.stderr);
    let later = warm(s, &["/bin/sh", "-c", "ls /root | grep -c -- -was-here"]);
    assert_eq!(
        later.out().trim(),
        "0",
        "a later run starts from the pristine disk"
    );
    assert!(
        std::fs::read(&s.rootfs).unwrap() == before,
        "the rootfs is never written by an ephemeral run"
    );
}

#[test]
fn warm_runs_get_their_own_entropy_and_the_right_time() {
    if !kvm_available("warm_runs_get_their_own_entropy_and_the_right_time") {
        return;
    }
    let s = setup();
    let probe = [
        "/bin/sh",
        "-c",
        "od -An -tx1 -N16 /dev/urandom | tr -d ' \\n'; echo; date +%s",
    ];
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    let mut seen = Vec::new();
    for _ in 0..2 {
        let t0 = now();
        let o = warm(s, &probe);
        let t1 = now();
        let out = o.out();
        let mut lines = out.lines();
        let random = lines.next().unwrap_or_default().to_string();
        let date: i64 = lines
            .next()
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(0);
        assert_eq!(random.len(), 32, "{out}\n{}", o.stderr);
        assert!(
            date >= t0 - 2 && date <= t1 + 2,
            "the guest's clock says {date}, the run was between {t0} and {t1}"
        );
        seen.push(random);
    }
    assert_ne!(
        seen[0], seen[1],
        "two runs of one image read different random bytes"
    );
}

#[test]
fn a_changed_rootfs_or_a_corrupt_image_means_a_boot_and_a_new_image() {
    if !kvm_available("a_changed_rootfs_or_a_corrupt_image_means_a_boot_and_a_new_image") {
        return;
    }
    let s = setup();
    let names = cache_names(s);
    assert_eq!(names.len(), 1, "{names:?}");
    let image = s.cache.join("warm").join(format!("{}.vmm", names[0]));

    // Damage the memory: the restore finds it, says so, and boots.
    let mut bytes = std::fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    for b in &mut bytes[mid..mid + 64] {
        *b ^= 0x5a;
    }
    std::fs::write(&image, &bytes).unwrap();
    let o = vmm(s, &[], COMMAND, BOOT_TIMEOUT);
    assert_eq!(o.status, Some(3), "{}", o.stderr);
    assert_eq!(o.out(), s.cold.out());
    assert!(
        o.stderr.contains("WARN") && o.stderr.contains("discarded") && !was_warm(&o),
        "{}",
        o.stderr
    );
    assert!(saved_warm(&o), "a new warm image replaces it: {}", o.stderr);
    warm(s, &["true"]);

    // Change the rootfs (a write anywhere changes its identity): the image
    // no longer matches; a boot makes one that does, which replaces it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&s.rootfs)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0], 0).unwrap();
    drop(f);
    let o = vmm(s, &[], &["true"], BOOT_TIMEOUT);
    assert!(!was_warm(&o) && saved_warm(&o), "{}", o.stderr);
    let after = cache_names(s);
    assert_eq!(after.len(), 1, "the old image is gone: {after:?}");
    assert_ne!(after, names);
    warm(s, &["true"]);
}

/// The numbers of the `mark N` lines in `out`.
fn marks(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("mark "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// A running ephemeral VM (its disk a copy-on-write overlay of the
/// rootfs) that keeps rewriting a file is snapshotted with the short
/// pause: the overlay in the image is the one of the pause, whatever the
/// guest wrote while the image was being written. The restored guest
/// carries on from that file's value.
#[test]
fn an_ephemeral_vm_is_snapshotted_with_its_disk_of_that_instant() {
    if !kvm_available("an_ephemeral_vm_is_snapshotted_with_its_disk_of_that_instant") {
        return;
    }
    let s = setup();
    let sock = s.dir.join("eph.sock");
    let script = "i=0; while :; do i=$((i+1)); echo $i > /root/mark; sync; echo mark $i; done";
    let mut vm = Running::spawn_env(
        &[
            "run",
            "--ephemeral",
            "--rootfs",
            s.rootfs.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
            "--",
            "/bin/sh",
            "-c",
            script,
        ],
        &s.dir,
        &env(s),
    );
    assert!(
        vm.wait_for(WARM_TIMEOUT, |o| marks(o).len() >= 2),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    // The slowest compression keeps the writer busy while the guest goes
    // on rewriting the file.
    let o = vmm_tests::vmm_in(
        &s.dir,
        &[
            "snapshot",
            "--api-sock",
            sock.to_str().unwrap(),
            "--out",
            "eph.img",
            "--compress",
            "zstd:19",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(a["background"], true, "{a}");
    // e2fsck -n and debugfs do not replay the journal: the agent's freeze
    // must have flushed it.
    assert_eq!(a["quiesced"], true, "{a}");
    assert!(
        a["disk_blocks_kept"].as_u64().unwrap_or(0) > 0,
        "the guest wrote nothing while the image was written: {a}"
    );
    let ran = vm.kill();

    let disk = s.dir.join("eph-disk.ext4");
    vmm_tests::disk::extract(&s.dir.join("eph.img"), &disk);
    let (clean, report) = vmm_tests::disk::fsck(&disk);
    let mark = vmm_tests::disk::cat(&disk, "/root/mark");
    let _ = std::fs::remove_file(&disk);
    assert!(clean, "the disk in the image is not clean:\n{report}");
    let at_pause: u64 = mark
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("/root/mark holds {mark:?}"));

    // The restored guest's loop goes on from the file's value: the line
    // it had not printed yet, or the next one.
    let disks = s.dir.join("eph-disks");
    std::fs::create_dir_all(&disks).unwrap();
    let mut r = Running::spawn_env(
        &[
            "restore",
            "--from",
            "eph.img",
            "--disk-dir",
            disks.to_str().unwrap(),
        ],
        &s.dir,
        &env(s),
    );
    let ok = r.wait_for(WARM_TIMEOUT, |o| !marks(o).is_empty());
    let after = r.kill();
    let _ = std::fs::remove_dir_all(&disks);
    assert!(ok, "{}\n{}", after.out(), after.stderr);
    let next = marks(&after.out())[0];
    assert!(
        next == at_pause || next == at_pause + 1,
        "the image's disk says {at_pause}, the restored guest went on with {next} \
         (the running guest had got to {:?})",
        marks(&ran.out()).last()
    );
}

//! The guest agent in the default Linux guest: its control channel
//! (`vmm agent ping|exec|freeze|thaw`), checkpoints a program asks for from
//! inside the guest (`vmm_checkpoint()` returning 0, then 1 in the restored
//! VM; `vmm-ckpt` exiting 0 then 1), quiesced snapshots whose disk is
//! clean, and the after-restore work: the clock, fresh entropy per clone,
//! the generation, the registered programs' signals and the restore hooks.
//!
//! One Linux boot for the whole binary ([`booted`]); the other tests
//! restore the images it left.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use vmm_tests::{kvm_available, rootfs_copy, vmm_in, Running, Scratch};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The guest's command: a restore hook, a program registered for the
/// checkpoint signals (it waits in `wait`, which a trapped signal
/// interrupts at once), a writer that never stops, then it idles. Light on
/// purpose: every fork costs a lot while the guest kernel is interpreted.
const SCRIPT: &str = r#"
mkdir -p /etc/vmm/restore.d
printf '#!/bin/sh\necho "hook-ran gen=$VMM_GENERATION image=$VMM_IMAGE"\n' > /etc/vmm/restore.d/10-mark
chmod +x /etc/vmm/restore.d/10-mark
sh -c 'trap "echo listener-before; echo ready $$ > /run/vmm/notify" USR1; trap "echo listener-after" USR2; echo register $$ > /run/vmm/notify; echo listener-registered; while :; do sleep 1000 & wait $!; done' &
sh -c 'while :; do date >> /root/loop.log; sleep 2; done' &
echo agent-test-ready
exec sleep 1000000
"#;

/// What the one boot left for the other tests.
struct Booted {
    dir: PathBuf,
    /// Checkpointed by vmm-ckpt-counter (vmm_checkpoint) and vmm-ckpt.
    t1: PathBuf,
    t2: PathBuf,
    /// Taken from the host while the guest wrote to its disk.
    base: PathBuf,
    /// When `base` was written.
    base_at: Instant,
    /// The original VM's console at its end.
    console: String,
}

static BOOTED: OnceLock<Booted> = OnceLock::new();

/// `vmm agent --api-sock SOCK ARGS...`, with `stdin`.
fn agent(sock: &Path, args: &[&str], stdin: &[u8]) -> std::process::Output {
    vmm_tests::vmm_agent(sock, args, stdin)
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `vmm agent exec -- sh -c SCRIPT`: (status, stdout, stderr).
fn sh(sock: &Path, script: &str) -> (i32, String, String) {
    let o = agent(sock, &["exec", "--", "sh", "-c", script], b"");
    (
        o.status.code().unwrap_or(-1),
        text(&o.stdout),
        text(&o.stderr),
    )
}

/// Waits until the agent answers with restore generation `generation`
/// (after a restore: once the after-restore work is done).
fn wait_for_agent(sock: &Path, generation: u64) {
    let deadline = Instant::now() + GUEST_TIMEOUT;
    let want = format!("generation {generation},");
    let mut last = String::new();
    while Instant::now() < deadline {
        let o = agent(sock, &["ping"], b"");
        last = format!("{}{}", text(&o.stdout), text(&o.stderr));
        if o.status.success() && last.contains(&want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("the agent did not answer with {want} in {GUEST_TIMEOUT:?}: {last}");
}

fn shutdown(sock: &Path) {
    let _ = vmm::client::json(sock, "PUT", "/vm/shutdown", &serde_json::json!({}));
}

/// Boots the guest with a snapshot directory, checkpoints it from inside
/// twice and from the host once, checks exec and freeze on the way.
fn booted() -> &'static Booted {
    BOOTED.get_or_init(|| {
        let scratch = Scratch::new("agent");
        let dir = scratch.0.clone();
        std::mem::forget(scratch);
        let snaps = dir.join("snaps");
        std::fs::create_dir_all(&snaps).unwrap();
        let rootfs = rootfs_copy(&dir);
        let sock = dir.join("api.sock");
        let mut vm = Running::spawn(
            &[
                "run",
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
            &dir,
        );
        assert!(
            vm.wait_for(BOOT_TIMEOUT, |o| o.contains("agent-test-ready")
                && o.contains("listener-registered")),
            "the guest did not get ready:\n{}\n{}",
            vm.output(),
            vm.stderr()
        );
        wait_for_agent(&sock, 0);

        // exec: output on the right streams, the status ours.
        let (status, out, err) = sh(&sock, "echo out; echo err >&2; exit 3");
        assert_eq!((status, out.as_str(), err.as_str()), (3, "out\n", "err\n"));

        // A program checkpoints the VM with vmm_checkpoint("t1"), and a
        // script with vmm-ckpt t2: both learn 0 here.
        let (status, _, err) = sh(&sock, "vmm-ckpt-counter t1 3 5 > /dev/console");
        assert_eq!(status, 0, "{err}\n{}", vm.output());
        let (status, out, err) = sh(
            &sock,
            "vmm-ckpt t2; echo ckpt-status $? > /dev/console; echo ok",
        );
        assert_eq!((status, out.as_str()), (0, "ok\n"), "{err}");
        assert!(
            vm.wait_for(GUEST_TIMEOUT, |o| o.contains("ckpt-status")),
            "{}",
            vm.output()
        );

        // A host snapshot while the guest writes: quiesced, and the
        // registered program hears about it first.
        let before = vm.output().matches("listener-before").count();
        let snap = vmm_in(
            &dir,
            &[
                "snapshot",
                "--api-sock",
                sock.to_str().unwrap(),
                "--out",
                "base.vmm",
            ],
        );
        assert!(snap.status.success(), "{}", text(&snap.stderr));
        let base_at = Instant::now();
        assert!(
            vm.wait_for(GUEST_TIMEOUT, |o| o.matches("listener-before").count()
                > before),
            "the registered program was not signalled:\n{}",
            vm.output()
        );

        // freeze/thaw by hand: a copy of the frozen disk is clean.
        let o = agent(&sock, &["freeze"], b"");
        assert!(o.status.success(), "{}", text(&o.stderr));
        assert!(text(&o.stdout).contains("\"/\""), "{}", text(&o.stdout));
        let frozen_copy = dir.join("frozen.ext4");
        std::fs::copy(&rootfs, &frozen_copy).unwrap();
        let o = agent(&sock, &["thaw"], b"");
        assert!(o.status.success(), "{}", text(&o.stderr));
        let (clean, report) = vmm_tests::disk::fsck(&frozen_copy);
        assert!(
            clean,
            "the disk copied while frozen is not clean:\n{report}"
        );
        let _ = std::fs::remove_file(&frozen_copy);

        shutdown(&sock);
        let o = vm.finish(GUEST_TIMEOUT);
        Booted {
            t1: snaps.join("t1.vmm"),
            t2: snaps.join("t2.vmm"),
            base: dir.join("base.vmm"),
            base_at,
            console: o.out(),
            dir,
        }
    })
}

/// A restore of `image` with its own disk directory and API socket.
struct Restored {
    vm: Running,
    sock: PathBuf,
    disks: PathBuf,
}

fn restore(image: &Path, name: &str, extra: &[&str]) -> Restored {
    let b = booted();
    let disks = b.dir.join(format!("disks-{name}"));
    std::fs::create_dir_all(&disks).unwrap();
    let sock = b.dir.join(format!("{name}.sock"));
    let mut args = vec![
        "restore",
        "--from",
        image.to_str().unwrap(),
        "--disk-dir",
        disks.to_str().unwrap(),
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let vm = Running::spawn(&args, &b.dir);
    Restored { vm, sock, disks }
}

impl Restored {
    fn end(self) -> String {
        shutdown(&self.sock);
        let o = self.vm.finish(GUEST_TIMEOUT);
        let _ = std::fs::remove_dir_all(&self.disks);
        o.out()
    }
}

/// The numbers of the "count N" lines, in order.
fn counts(console: &str) -> Vec<u32> {
    console
        .lines()
        .filter_map(|l| l.trim().strip_prefix("count "))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn a_program_checkpoints_itself_and_wakes_up_restored() {
    if !kvm_available("a_program_checkpoints_itself_and_wakes_up_restored") {
        return;
    }
    let b = booted();
    // The original run: counted, learned 0, counted on.
    let original = &b.console;
    let at = original
        .find("original 0")
        .unwrap_or_else(|| panic!("{original}"));
    assert_eq!(counts(&original[..at]), [0, 1, 2], "{original}");
    assert_eq!(counts(&original[at..])[..5], [3, 4, 5, 6, 7], "{original}");
    assert!(original.contains("ckpt-status 0"), "{original}");
    assert!(!original.contains("restored 1"), "{original}");

    // The restored VM: the same call returns 1 and the count goes on from
    // where the checkpoint was; the hook ran once, the listener heard.
    let mut r = restore(&b.t1, "t1", &[]);
    assert!(
        r.vm.wait_for(GUEST_TIMEOUT, |o| o.contains("count 7")),
        "{}\n{}",
        r.vm.output(),
        r.vm.stderr()
    );
    wait_for_agent(&r.sock, 1);
    let out = r.end();
    let at = out.find("restored 1").unwrap_or_else(|| panic!("{out}"));
    assert_eq!(counts(&out[..at]), Vec::<u32>::new(), "{out}");
    assert_eq!(counts(&out[at..]), [3, 4, 5, 6, 7], "{out}");
    assert_eq!(out.matches("hook-ran gen=1 image=").count(), 1, "{out}");
    assert!(out.contains(&format!("image={}", b.t1.display())), "{out}");
    assert!(out.contains("listener-after"), "{out}");
    assert!(!out.contains("original 0"), "{out}");
}

#[test]
fn a_script_checkpoints_itself_with_vmm_ckpt() {
    if !kvm_available("a_script_checkpoints_itself_with_vmm_ckpt") {
        return;
    }
    let b = booted();
    let mut r = restore(&b.t2, "t2", &[]);
    assert!(
        r.vm.wait_for(GUEST_TIMEOUT, |o| o.contains("ckpt-status")),
        "{}\n{}",
        r.vm.output(),
        r.vm.stderr()
    );
    let out = r.end();
    assert!(out.contains("ckpt-status 1"), "{out}");
    assert!(!out.contains("ckpt-status 0"), "{out}");
}

#[test]
fn exec_works_after_a_restore_and_checkpoints_need_a_snapshot_dir() {
    if !kvm_available("exec_works_after_a_restore_and_checkpoints_need_a_snapshot_dir") {
        return;
    }
    let b = booted();
    let r = restore(&b.base, "exec", &[]);
    wait_for_agent(&r.sock, 1);
    let (status, out, err) = sh(&r.sock, "echo out; echo err >&2; exit 3");
    assert_eq!((status, out.as_str(), err.as_str()), (3, "out\n", "err\n"));
    // stdin with -i; a missing program is 127 with a message.
    let o = agent(
        &r.sock,
        &["exec", "-i", "--", "tr", "a-z", "A-Z"],
        b"hello\n",
    );
    assert_eq!(
        (o.status.code(), text(&o.stdout)),
        (Some(0), "HELLO\n".into())
    );
    // -t: a pseudo-terminal in the guest (it echoes what it reads, ends
    // lines with \r\n) that gets our input.
    let o = agent(
        &r.sock,
        &["exec", "-t", "--", "sh", "-c", "tty; read x; echo got $x"],
        b"typed\n",
    );
    let out = text(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}{}", text(&o.stderr));
    assert!(
        out.contains("/dev/pts/") && out.contains("got typed\r\n"),
        "{out:?}"
    );
    let o = agent(&r.sock, &["exec", "--", "no-such-program"], b"");
    assert_eq!(o.status.code(), Some(127), "{}", text(&o.stderr));
    assert!(
        text(&o.stderr).contains("no-such-program"),
        "{}",
        text(&o.stderr)
    );
    // This VMM has no --snapshot-dir: the guest's requests fail, with why.
    let (status, out, _) = sh(&r.sock, "vmm-ckpt-counter t3 0 0");
    assert_eq!(status, 2, "{out}");
    assert!(out.starts_with("failed 1 "), "EPERM expected: {out}");
    let (status, _, err) = sh(&r.sock, "vmm-ckpt t3");
    assert_eq!(status, 2, "{err}");
    assert!(err.contains("--snapshot-dir"), "{err}");
    r.end();
}

#[test]
fn clones_get_fresh_entropy_the_right_time_and_count_restores() {
    if !kvm_available("clones_get_fresh_entropy_the_right_time_and_count_restores") {
        return;
    }
    let b = booted();
    // The image must be old enough for a stale clock to show.
    let age = Duration::from_secs(20);
    if let Some(wait) = age.checked_sub(b.base_at.elapsed()) {
        std::thread::sleep(wait);
    }
    let probe = "head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; date +%s; cat /run/vmm/generation";
    let mut randoms = Vec::new();
    for clone in ["clone-a", "clone-b"] {
        let r = restore(&b.base, clone, &[]);
        wait_for_agent(&r.sock, 1);
        let unix_now = || {
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        };
        // The guest reads its clock somewhere in between.
        let sent = unix_now();
        let (status, out, err) = sh(&r.sock, probe);
        let answered = unix_now();
        assert_eq!(status, 0, "{err}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        randoms.push(lines[0].to_string());
        let guest: i64 = lines[1].parse().unwrap();
        assert!(
            (sent - 1..=answered + 1).contains(&guest),
            "{clone}: guest clock {guest}, host {sent}..{answered}"
        );
        assert_eq!(lines[2], "1", "generation after one restore");
        if clone == "clone-a" {
            // A restore of a restored VM's image is the second.
            let snap = vmm_in(
                &b.dir,
                &[
                    "snapshot",
                    "--api-sock",
                    r.sock.to_str().unwrap(),
                    "--out",
                    "clone-a.vmm",
                ],
            );
            assert!(snap.status.success(), "{}", text(&snap.stderr));
        }
        let out = r.end();
        assert_eq!(out.matches("hook-ran gen=1").count(), 1, "{out}");
    }
    assert_ne!(
        randoms[0], randoms[1],
        "two clones read the same random bytes"
    );

    let r = restore(&b.dir.join("clone-a.vmm"), "gen2", &[]);
    wait_for_agent(&r.sock, 2);
    let (_, out, _) = sh(&r.sock, "cat /run/vmm/generation");
    assert_eq!(out, "2\n");
    let out = r.end();
    assert_eq!(out.matches("hook-ran gen=2").count(), 1, "{out}");
}

#[test]
fn a_snapshot_taken_while_the_guest_writes_has_a_clean_disk() {
    if !kvm_available("a_snapshot_taken_while_the_guest_writes_has_a_clean_disk") {
        return;
    }
    let b = booted();
    let inspect = vmm_in(&b.dir, &["inspect", b.base.to_str().unwrap()]);
    assert!(
        text(&inspect.stdout).contains("quiesced (the guest agent froze"),
        "{}",
        text(&inspect.stdout)
    );
    let disk = b.dir.join("base-disk.ext4");
    vmm_tests::disk::extract(&b.base, &disk);
    let (clean, report) = vmm_tests::disk::fsck(&disk);
    let _ = std::fs::remove_file(&disk);
    assert!(clean, "the quiesced image's disk is not clean:\n{report}");
}

/// What virtio-blk writes into guest memory (a file read into the page
/// cache) is in an increment, though KVM's dirty log never sees it: the
/// restored guest reads the file from its cache and gets the same bytes.
#[test]
fn an_increment_holds_what_the_disk_wrote_into_memory() {
    if !kvm_available("an_increment_holds_what_the_disk_wrote_into_memory") {
        return;
    }
    let b = booted();
    let r = restore(&b.base, "inc", &[]);
    wait_for_agent(&r.sock, 1);
    let cached = "fincore --bytes --noheadings --output RES /root/blob";
    // The size of `seq -w 1 131072` (224 pages, made in user mode: kernel code
    // is slow here).
    const BLOB: u64 = 917_504;
    // A file on the disk and not in the page cache.
    let (status, out, err) = sh(
        &r.sock,
        &format!(
            "seq -w 1 131072 > /root/blob && sync && echo 3 > /proc/sys/vm/drop_caches && {cached}"
        ),
    );
    assert_eq!((status, out.trim()), (0, "0"), "{err}");
    let snap = |out: &str, extra: &[&str]| {
        let mut args = vec![
            "snapshot",
            "--api-sock",
            r.sock.to_str().unwrap(),
            "--out",
            out,
        ];
        args.extend_from_slice(extra);
        let o = vmm_in(&b.dir, &args);
        assert!(o.status.success(), "{}", text(&o.stderr));
        text(&o.stdout)
    };
    snap("inc-full.vmm", &["--track"]);
    // Read through virtio-blk: the device fills the page cache.
    let (status, sum, err) = sh(&r.sock, &format!("md5sum /root/blob && {cached}"));
    assert_eq!(status, 0, "{err}");
    let lines: Vec<&str> = sum.lines().map(str::trim).collect();
    assert_eq!(
        lines.get(1),
        Some(&BLOB.to_string().as_str()),
        "not cached: {sum}"
    );
    let said = snap("inc-1.vmm", &["--parent", "inc-full.vmm", "--stop"]);
    assert!(said.starts_with("increment "), "{said}");
    let o = r.vm.finish(GUEST_TIMEOUT);
    assert_eq!(o.status, Some(0), "--stop ends the VM: {}", o.stderr);

    let r = restore(&b.dir.join("inc-1.vmm"), "inc-1", &[]);
    wait_for_agent(&r.sock, 2);
    // Still cached (so read from restored memory, not the disk), same bytes.
    let (status, again, err) = sh(&r.sock, &format!("{cached} && md5sum /root/blob"));
    assert_eq!(status, 0, "{err}");
    let again: Vec<&str> = again.lines().map(str::trim).collect();
    assert_eq!(
        again.first(),
        lines.get(1),
        "not cached after restore: {again:?}"
    );
    assert_eq!(again.get(1), lines.first(), "other bytes after restore");
    r.end();
}

/// A running Linux VM that keeps writing its disk is snapshotted in the
/// background (paused for the capture only): the disk in the image is the
/// disk at the pause, because the device copies each block the guest
/// overwrites meanwhile for the writer. Checked on the restored guest,
/// which reads the file the writer kept replacing from the disk (caches
/// dropped) and finds it whole, and by fsck.
#[test]
fn a_linux_guest_writing_its_disk_pauses_only_for_the_capture() {
    if !kvm_available("a_linux_guest_writing_its_disk_pauses_only_for_the_capture") {
        return;
    }
    let b = booted();
    // Eager: a VM whose memory is still arriving pauses for the whole write.
    let r = restore(&b.base, "churn", &["--eager"]);
    wait_for_agent(&r.sock, 1);
    // Replaces /root/churn with a new run of numbers, synced, without end.
    let (status, _, err) = sh(
        &r.sock,
        "nohup sh -c 'echo $$ > /root/churn.pid; i=0; while :; do i=$((i+1)); \
         seq $i $((i+20000)) > /root/churn.tmp && sync && mv /root/churn.tmp /root/churn; done' \
         > /dev/null 2>&1 & \
         while [ ! -e /root/churn ]; do sleep 0.2; done",
    );
    assert_eq!(status, 0, "{err}");
    // The slowest compression keeps the child writing for seconds.
    let o = vmm_in(
        &b.dir,
        &[
            "snapshot",
            "--api-sock",
            r.sock.to_str().unwrap(),
            "--out",
            "churn.vmm",
            "--compress",
            "zstd:19",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let a: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(a["background"], true, "{a}");
    // e2fsck -n does not replay the journal: the freeze must have run.
    assert_eq!(a["quiesced"], true, "{a}");
    assert!(
        a["disk_blocks_kept"].as_u64().unwrap_or(0) > 0,
        "the guest wrote nothing while the image was written: {a}"
    );
    r.end();

    let disk = b.dir.join("churn-disk.ext4");
    vmm_tests::disk::extract(&b.dir.join("churn.vmm"), &disk);
    let (clean, report) = vmm_tests::disk::fsck(&disk);
    let _ = std::fs::remove_file(&disk);
    assert!(clean, "the disk in the image is not clean:\n{report}");

    let r = restore(&b.dir.join("churn.vmm"), "churn-restored", &[]);
    wait_for_agent(&r.sock, 2);
    let (status, out, err) = sh(
        &r.sock,
        "kill $(cat /root/churn.pid); sync; echo 3 > /proc/sys/vm/drop_caches; \
         head -n 1 /root/churn; tail -n 1 /root/churn; wc -l < /root/churn",
    );
    assert_eq!(status, 0, "{err}");
    let v: Vec<u64> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        v.len() == 3 && v[1] == v[0] + 20000 && v[2] == 20001,
        "/root/churn is not one whole run of numbers: {out:?}"
    );
    r.end();
}

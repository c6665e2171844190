//! The default Linux guest under `vmm run`: the kernel boots from our
//! virtio-blk root, user space runs (with the stranded-SYSCALL patch on hosts
//! without hardware virtualization), and the guest agent runs the container
//! command as PID 1. Each Linux boot costs over a minute here, so each test
//! boots once and checks many things.

use std::process::Command;
use std::time::Duration;

use vmm_tests::{kvm_available, rootfs_copy, run_vmm, vmm_in, Running, Scratch};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .filter_map(|l| l.trim().strip_prefix(key))
        .find(|v| !v.contains('$'))
        .map(str::trim)
}

/// The kernel's "Memory: 241080K/261752K available" line: the total in KiB.
fn kernel_memory_total_kib(out: &str) -> Option<u64> {
    let line = out
        .lines()
        .find(|l| l.contains("Memory: ") && l.contains("K available"))?;
    let after = line.split("Memory: ").nth(1)?;
    let total = after.split('/').nth(1)?.split('K').next()?;
    total.parse().ok()
}

fn debugfs_cat(image: &std::path::Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One boot, 1 vCPU, interactive shell on the console: the kernel mounts our
/// virtio-blk root and runs init; memory matches --mem; commands typed on the
/// console run; a file written and synced lands in the image; the shell's exit
/// status becomes vmm's.
#[test]
fn linux_boots_to_an_interactive_shell() {
    if !kvm_available("linux_boots_to_an_interactive_shell") {
        return;
    }
    let s = Scratch::new("linux-shell");
    let rootfs = rootfs_copy(&s.0);
    let input = "echo MARK-$((6*7)); echo NPROC=$(nproc); echo persisted-$((1+1)) > /root/vmm-test-file; sync; exit 7\n";
    let sock = s.0.join("api.sock");
    let mut vm = Running::spawn(
        &[
            "run",
            "--vcpus",
            "1",
            "--mem",
            "256",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--api-sock",
            sock.to_str().unwrap(),
        ],
        &s.0,
    );
    // Checkpoint the kernel mid-boot (checkpoint and continue).
    assert!(
        vm.wait_for(BOOT_TIMEOUT, |o| o.contains("smp: Brought up")),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    // The kernel's clock before the snapshot is asked for: the VM pauses
    // after it, and runs on while the image is written.
    let snapshot_uptime = last_kernel_timestamp(&vm.output());
    let snap = vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            sock.to_str().unwrap(),
            "--out",
            "midboot.img",
        ],
    );
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert!(
        vm.wait_for(BOOT_TIMEOUT, at_prompt),
        "{}\n{}",
        vm.output(),
        vm.stderr()
    );
    vm.send(input);
    let o = vm.finish(BOOT_TIMEOUT);
    let out = o.out();
    assert!(
        !o.timed_out,
        "timed out after {:?}\n{out}\n{}",
        o.elapsed, o.stderr
    );
    assert_eq!(out.matches("Linux version").count(), 1, "{out}");
    assert!(
        out.contains("EXT4-fs (vda): mounted filesystem"),
        "root not mounted from virtio-blk:\n{out}"
    );
    assert!(out.contains("Run /sbin/vmm-agent as init process"), "{out}");
    assert!(
        out.contains("MARK-42"),
        "typed commands did not run:\n{out}\n{}",
        o.stderr
    );
    assert_eq!(field(&out, "NPROC="), Some("1"), "{out}");
    let total = kernel_memory_total_kib(&out).expect("kernel's Memory: line");
    assert!(
        (250 * 1024..=256 * 1024).contains(&total),
        "kernel sees {total} KiB for --mem 256"
    );
    assert_eq!(
        o.status,
        Some(7),
        "shell's exit status:\n{out}\n{}",
        o.stderr
    );
    assert_eq!(
        debugfs_cat(&rootfs, "/root/vmm-test-file").trim(),
        "persisted-2"
    );
    eprintln!("linux_boots_to_an_interactive_shell: {:?}", o.elapsed);

    // The mid-boot image, restored (lazily) after the original is gone: the
    // kernel carries on booting (no second "Linux version", its clock going
    // on from the snapshot) to a shell that works.
    let mut r = Running::spawn(&["restore", "--from", "midboot.img"], &s.0);
    assert!(
        r.wait_for(BOOT_TIMEOUT, at_prompt),
        "{}\n{}",
        r.output(),
        r.stderr()
    );
    r.send("echo RESTORED-$((40+2)); exit 9\n");
    let o = r.finish(BOOT_TIMEOUT);
    let out = o.out();
    assert!(out.contains("RESTORED-42"), "{out}\n{}", o.stderr);
    assert_eq!(o.status, Some(9), "{out}\n{}", o.stderr);
    // From a file, memory arrived on demand while the kernel booted on.
    assert!(o.stderr.contains("(arriving on demand)"), "{}", o.stderr);
    assert!(
        !out.contains("Linux version"),
        "the kernel started over:\n{out}"
    );
    let first = first_kernel_timestamp(&out).expect("kernel messages after restore");
    assert!(
        first >= snapshot_uptime,
        "restored kernel's clock went back: {first} < {snapshot_uptime}"
    );
    eprintln!("restore of the mid-boot image to a shell: {:?}", o.elapsed);
}

fn at_prompt(o: &str) -> bool {
    o.find("Run /sbin/vmm-agent as init process")
        .is_some_and(|i| o[i..].contains("# "))
}

/// Seconds in the kernel's "[   12.345678]" prefixes.
fn kernel_timestamps(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            l.trim_start()
                .strip_prefix('[')?
                .split(']')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect()
}

fn last_kernel_timestamp(out: &str) -> f64 {
    kernel_timestamps(out).last().copied().unwrap_or(0.0)
}

fn first_kernel_timestamp(out: &str) -> Option<f64> {
    kernel_timestamps(out).first().copied()
}

/// One boot, 2 vCPUs, a container command: stdout holds exactly what the
/// command printed, both CPUs are online, the agent is PID 1, and vmm exits
/// with the command's status.
#[test]
fn linux_runs_a_container_command_on_2_vcpus() {
    if !kvm_available("linux_runs_a_container_command_on_2_vcpus") {
        return;
    }
    let s = Scratch::new("linux-cmd");
    let rootfs = rootfs_copy(&s.0);
    let mut vm = Running::spawn(
        &[
            "run",
            "--vcpus",
            "2",
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "date >/dev/null; date +%s.%N; cut -d' ' -f1 /proc/uptime; nproc; uname -r; cat /proc/1/comm; (sleep 0.1 &); exit 7",
        ],
        &s.0,
    );
    // The guest's wall clock comes from the RTC at boot: compare it with
    // the host's the moment the guest prints it.
    let started = std::time::Instant::now();
    // A line counts once its newline is in.
    let line = |o: &str, n: usize| -> Option<f64> {
        let (done, _) = o.rsplit_once('\n')?;
        done.lines().nth(n)?.trim().parse().ok()
    };
    assert!(
        vm.wait_for(BOOT_TIMEOUT, |o| line(o, 0).is_some()),
        "no date:\n{}\n{}",
        vm.output(),
        vm.stderr()
    );
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let guest = line(&vm.output(), 0).unwrap();
    assert!(
        vm.wait_for(BOOT_TIMEOUT, |o| line(o, 1).is_some()),
        "no uptime:\n{}",
        vm.output()
    );
    let uptime = line(&vm.output(), 1).unwrap();
    let lag = host - guest;
    // Without an RTC the guest starts in 1970. With it alone, the guest is
    // behind by what its clock loses while the interpreted kernel boots
    // (6-10 s over a 90 s boot here); the agent sets it from the RTC again
    // as it starts, within half a second (the RTC's resolution). The rest
    // of the margin is the time between `date` reading the clock and its
    // line reaching us through the interpreted serial driver (about 0.5 s
    // measured; `date` runs once before so it is not slowed by a cold page
    // cache after reading the clock). We take the host's time when the
    // date's line arrives, not waiting for the uptime after it.
    eprintln!(
        "guest clock {lag:.1} s behind the host; guest uptime {uptime:.1} s, host time since start {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(
        (-1.0..=2.0).contains(&lag),
        "guest time {guest}, host time {host:.1}: the RTC is off"
    );
    let o = vm.finish(BOOT_TIMEOUT);
    let out = o.out();
    assert!(
        !o.timed_out,
        "timed out after {:?}\n{out}\n{}",
        o.elapsed, o.stderr
    );
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(
        lines.len(),
        5,
        "stdout should hold only the command's output: {out:?}\n{}",
        o.stderr
    );
    assert_eq!(lines[2], "2", "nproc");
    assert!(
        lines[3].starts_with("6.1.") && lines[3].ends_with("-vmm"),
        "uname -r: {}",
        lines[3]
    );
    assert_eq!(lines[4], "vmm-agent", "PID 1");
    assert_eq!(o.status, Some(7), "{out}\n{}", o.stderr);
    eprintln!("linux_runs_a_container_command_on_2_vcpus: {:?}", o.elapsed);
}

/// The same kernel as a bzImage: the VMM loads the setup header and enters
/// the decompressor, which unpacks the kernel (interpreted here: LZ4, about
/// 20 s), and the guest runs its command.
#[test]
fn linux_boots_from_a_bzimage() {
    if !kvm_available("linux_boots_from_a_bzimage") {
        return;
    }
    let s = Scratch::new("linux-bzimage");
    let rootfs = rootfs_copy(&s.0);
    let bz = vmm_tests::guest_dir().join("bzImage");
    assert!(
        bz.exists(),
        "{} is missing: run resources/build-guest.sh",
        bz.display()
    );
    let o = run_vmm(
        &[
            "run",
            "--kernel",
            bz.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "uname -r; exit 4",
        ],
        b"",
        BOOT_TIMEOUT,
    );
    let out = o.out();
    assert!(
        !o.timed_out,
        "timed out after {:?}\n{out}\n{}",
        o.elapsed, o.stderr
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("6.1.") && l.trim_end().ends_with("-vmm")),
        "{out}\n{}",
        o.stderr
    );
    assert_eq!(o.status, Some(4), "{out}\n{}", o.stderr);
    eprintln!("linux_boots_from_a_bzimage: {:?}", o.elapsed);
}

//! Fast checks of the VMM with the test guest (resources/test-guest), which
//! runs almost entirely in user mode and so boots in well under a second even
//! where guest kernel code is interpreted.

use std::time::Duration;

use vmm_tests::test_guest::{elf as test_guest, run_args, run_with_api, ticks};
use vmm_tests::{kvm_available, run_vmm, Outcome};

fn boot(vcpus: u32, mem: u32, cmdline: &str) -> Outcome {
    let args = run_args(vcpus, mem, cmdline);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_vmm(&args, b"", Duration::from_secs(120))
}

#[test]
fn ready_line_timer_and_exit_status() {
    if !kvm_available("ready_line_timer_and_exit_status") {
        return;
    }
    let o = boot(1, 64, "ticks=20 exit-after=5 exit=42");
    let out = o.out();
    assert!(!o.timed_out, "{out}\n{}", o.stderr);
    let first = out.lines().next().unwrap_or("");
    assert!(
        first.starts_with("test-guest: ready cpus=1 mem="),
        "first line: {first:?}\n{out}"
    );
    let t = ticks(&out);
    assert!(t.len() >= 5, "ticks: {t:?}\n{out}");
    assert!(
        t.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks count up by one: {t:?}"
    );
    assert_eq!(o.status, Some(42), "{out}\n{}", o.stderr);
}

#[test]
fn memory_size_reaches_the_guest() {
    if !kvm_available("memory_size_reaches_the_guest") {
        return;
    }
    for mem in [64u32, 1024, 4096, 16384] {
        let o = boot(1, mem, "exit=0");
        let out = o.out();
        assert!(
            out.lines()
                .next()
                .unwrap_or("")
                .contains(&format!("mem={mem}")),
            "--mem {mem}: {out}\n{}",
            o.stderr
        );
        assert_eq!(o.status, Some(0));
    }
}

#[test]
fn smp_brings_up_every_vcpu() {
    if !kvm_available("smp_brings_up_every_vcpu") {
        return;
    }
    for n in [2u32, 4, 8] {
        let o = boot(n, 128, "ticks=20 smp exit-after=3 exit=0");
        let out = o.out();
        assert!(!o.timed_out, "{n} vCPUs: {out}\n{}", o.stderr);
        assert!(
            out.contains(&format!("ready cpus={n} ")),
            "{n} vCPUs: {out}"
        );
        assert!(
            out.contains(&format!("smp {n} cpus online")),
            "{n} vCPUs: {out}"
        );
        for k in 0..n {
            assert!(
                out.contains(&format!("cpu {k} regs ok")),
                "cpu {k} of {n}: {out}"
            );
        }
        assert!(!out.contains("BAD"), "{out}");
        assert_eq!(o.status, Some(0), "{out}\n{}", o.stderr);
    }
}

#[test]
fn registers_survive_interrupts() {
    if !kvm_available("registers_survive_interrupts") {
        return;
    }
    let o = boot(1, 64, "ticks=20 regs exit-after=5 exit=0");
    let out = o.out();
    assert!(out.matches("regs ok").count() >= 3, "{out}\n{}", o.stderr);
    assert!(!out.contains("regs BAD"), "{out}");
    assert_eq!(o.status, Some(0));
}

#[test]
fn dirtied_memory_checksum_is_stable() {
    if !kvm_available("dirtied_memory_checksum_is_stable") {
        return;
    }
    let o = boot(
        1,
        256,
        "ticks=20 dirty=64,pattern=mix,rewrite=0 sum exit-after=4 exit=0",
    );
    let out = o.out();
    let sums: Vec<&str> = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("sum "))
        .collect();
    assert!(sums.len() >= 2, "{out}\n{}", o.stderr);
    assert!(
        sums.windows(2).all(|w| w[0] == w[1]),
        "checksum changed: {sums:?}"
    );
    assert_eq!(o.status, Some(0));
}

/// Guest memory is backed by transparent huge pages (what the guest fills
/// shows in the VMM's AnonHugePages), and by 4 KiB pages with VMM_THP=0.
#[test]
fn guest_memory_gets_huge_pages() {
    if !kvm_available("guest_memory_gets_huge_pages") {
        return;
    }
    let huge_kib = |thp: &str| {
        let mut r = vmm_tests::Running::spawn_env(
            &[
                "run",
                "--kernel",
                &test_guest(),
                "--mem",
                "256",
                "--cmdline",
                "ticks=20 dirty=64,pattern=random,rewrite=0",
            ],
            &std::env::temp_dir(),
            &[("VMM_THP", std::path::Path::new(thp))],
        );
        assert!(
            r.wait_for(Duration::from_secs(60), |o| o.contains("tick 1")),
            "{}\n{}",
            r.output(),
            r.stderr()
        );
        let rollup = std::fs::read_to_string(format!("/proc/{}/smaps_rollup", r.pid())).unwrap();
        r.kill();
        rollup
            .lines()
            .find_map(|l| l.strip_prefix("AnonHugePages:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .expect("AnonHugePages in smaps_rollup")
    };
    let on = huge_kib("1");
    assert!(on >= 64 * 1024, "64 MiB filled, {on} KiB on huge pages");
    assert_eq!(huge_kib("0"), 0, "VMM_THP=0 still got huge pages");
}

/// Snapshot mid-run with --stop (the original ends), then restore: every
/// register check still passes, the memory checksum is unchanged and the
/// tick counter carries on from where it was, on 1 and 4 vCPUs.
#[test]
fn restore_carries_on_where_it_stopped() {
    if !kvm_available("restore_carries_on_where_it_stopped") {
        return;
    }
    for n in [1u32, 4] {
        let s = vmm_tests::Scratch::new(&format!("tg-restore-{n}"));
        let smp = if n > 1 { " smp" } else { "" };
        let cmdline = format!("ticks=20 regs{smp} dirty=64,pattern=mix,rewrite=0 sum");
        let mut orig = run_with_api(&s.0, n, 256, &cmdline);
        assert!(
            orig.wait_for(Duration::from_secs(60), |o| ticks(o).len() >= 5),
            "{}\n{}",
            orig.output(),
            orig.stderr()
        );
        // One vCPU: the answer as JSON, for tools; four: the line for people.
        let json = n == 1;
        let mut args = vec![
            "snapshot",
            "--api-sock",
            "api.sock",
            "--out",
            "img",
            "--stop",
        ];
        if json {
            args.push("--json");
        }
        let snap = vmm_tests::vmm_in(&s.0, &args);
        assert!(
            snap.status.success(),
            "{}",
            String::from_utf8_lossy(&snap.stderr)
        );
        let said = String::from_utf8_lossy(&snap.stdout).into_owned();
        assert_eq!(said.lines().count(), 1, "{said}");
        if json {
            let v: serde_json::Value = serde_json::from_str(&said).unwrap();
            assert_eq!(v["memory_pages"], 65536, "{said}");
            assert!(v["bytes"].as_u64().unwrap() > 1000, "{said}");
        } else {
            assert!(
                said.starts_with("snapshot ")
                    && said.contains(&format!("written to {}", s.0.join("img").display()))
                    && said.contains("for 256.0 MiB of memory")
                    && said.contains("VM paused"),
                "{said}"
            );
        }
        let report = vmm_tests::vmm_in(&s.0, &["inspect", "img"]);
        let report = String::from_utf8_lossy(&report.stdout).into_owned();
        let created = report
            .lines()
            .find_map(|l| l.strip_prefix("created      "))
            .unwrap_or_default();
        assert!(
            created.len() == 23 && created.ends_with(" UTC") && created.starts_with("20"),
            "inspect shows the creation time as a date: {report}"
        );
        let orig = orig.finish(Duration::from_secs(30));
        assert_eq!(
            orig.status,
            Some(0),
            "--stop ends the original: {}",
            orig.stderr
        );
        let before = orig.out();
        let last = *ticks(&before).last().unwrap();
        assert!(last >= 5);
        let sum_before: Vec<&str> = before.lines().filter(|l| l.starts_with("sum ")).collect();
        assert!(!sum_before.is_empty(), "{before}");

        // Lazily (the default from a file: memory arrives as the guest
        // touches it) and eagerly (all of it read first).
        for how in [
            &["restore", "--from", "img"][..],
            &["restore", "--eager", "--from", "img"],
        ] {
            let lazy = !how.contains(&"--eager");
            let mut r = vmm_tests::Running::spawn(how, &s.0);
            // Ticks come in batches while the guest's loop is slow (its
            // first pass over lazily arriving memory): wait for the loop's
            // own lines too.
            let ok = r.wait_for(Duration::from_secs(60), |o| {
                ticks(o).len() >= 5
                    && !whole_sums(o).is_empty()
                    && o.matches("regs ok").count() >= 3
            });
            let after = r.kill();
            let out = after.out();
            assert!(
                ok,
                "{n} vCPUs, lazy {lazy}: restored guest does not tick:\n{out}\n{}",
                after.stderr
            );
            assert_eq!(
                after.stderr.contains("(arriving on demand)"),
                lazy,
                "the restore line says how memory came: {}",
                after.stderr
            );
            // The console carries on where it was: a line cut by the snapshot is
            // finished by the restored guest, so check the two outputs joined.
            let t = ticks(&format!("{before}{out}"));
            assert!(t.len() >= last as usize + 4, "{n} vCPUs: {t:?}");
            assert!(
                t.iter().enumerate().all(|(i, &x)| x == i as u64 + 1),
                "{n} vCPUs: ticks across the restore: {t:?}"
            );
            assert!(!out.contains("ready"), "the guest started over:\n{out}");
            assert!(!out.contains("BAD"), "{out}");
            assert!(out.matches("regs ok").count() >= 3, "{out}");
            // The guest was killed mid-output: its last line may be cut short.
            let sums = whole_sums(&out);
            assert!(!sums.is_empty(), "{out}");
            for l in sums {
                assert_eq!(
                    l, sum_before[0],
                    "{n} vCPUs, lazy {lazy}: memory changed across restore"
                );
            }
            if n > 1 {
                for cpu in 0..n {
                    assert!(
                        out.contains(&format!("cpu {cpu} regs ok")),
                        "cpu {cpu}:\n{out}"
                    );
                }
            }
        }
    }
}

/// The whole `sum ...` lines of a guest's output (a killed guest's last
/// line may be cut short).
fn whole_sums(out: &str) -> Vec<String> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n') && l.starts_with("sum "))
        .map(|l| l.trim_end().to_string())
        .collect()
}

/// Waits until `r` has said on stderr that it restored the VM.
fn until_restored(r: &vmm_tests::Running) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !r.stderr().contains("vmm: restored ") {
        assert!(
            std::time::Instant::now() < deadline,
            "no restore:\n{}",
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Lazy restore's edges: a snapshot of a VM whose memory has not all
/// arrived is whole (the writer's reads fault it in); an image deleted
/// under a running VM still serves it (the VMM keeps it open); a damaged
/// chunk stops the VM, naming the chunk, before the guest runs on it.
#[test]
fn lazy_restore_snapshots_deletion_and_damage() {
    if !kvm_available("lazy_restore_snapshots_deletion_and_damage") {
        return;
    }
    let s = vmm_tests::Scratch::new("tg-lazy");
    let mut orig = run_with_api(&s.0, 1, 512, "ticks=20 dirty=256,pattern=mix,rewrite=0 sum");
    assert!(
        orig.wait_for(Duration::from_secs(60), |o| whole_sums(o).len() >= 2),
        "{}\n{}",
        orig.output(),
        orig.stderr()
    );
    let snap = vmm_tests::vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            "api.sock",
            "--out",
            "img",
            "--stop",
        ],
    );
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    let before = orig.finish(Duration::from_secs(30)).out();
    let sum = whole_sums(&before)[0].clone();
    // Only faults bring memory in: the guest's and the snapshot writer's.
    let faults_only = [("VMM_LAZY_BACKGROUND", std::path::Path::new("0"))];

    // A snapshot right after a lazy restore, before the guest has touched
    // most of its memory: the new image holds all of it.
    let r = vmm_tests::Running::spawn_env(
        &["restore", "--from", "img", "--api-sock", "lazy.sock"],
        &s.0,
        &faults_only,
    );
    until_restored(&r);
    // The API says how much has arrived: not all of the 512 chunks (1 MiB
    // each), and nothing in the background.
    let sock = s.0.join("lazy.sock");
    let vm = vmm_tests::http(
        sock.to_str().unwrap(),
        "GET /vm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let body = &vm[vm.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let body: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {vm}"));
    let fill = &body["lazy_memory"];
    assert_eq!(fill["chunks"], 512, "{body}");
    assert_eq!(fill["done"], false, "{body}");
    assert_eq!(fill["in_background"], 0, "{body}");
    let snap = vmm_tests::vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            "lazy.sock",
            "--out",
            "mid.img",
            "--stop",
        ],
    );
    assert!(
        snap.status.success(),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    let o = r.finish(Duration::from_secs(30));
    assert_eq!(o.status, Some(0), "{}", o.stderr);
    let mut again = vmm_tests::Running::spawn(&["restore", "--eager", "--from", "mid.img"], &s.0);
    let ok = again.wait_for(Duration::from_secs(60), |o| whole_sums(o).len() >= 2);
    let out = again.kill();
    assert!(ok, "{}\n{}", out.out(), out.stderr);
    for l in whole_sums(&out.out()) {
        assert_eq!(l, sum, "the image of a lazily restored VM lost memory");
    }

    // The image deleted while its memory is still arriving.
    std::fs::copy(s.0.join("img"), s.0.join("gone.img")).unwrap();
    let mut r =
        vmm_tests::Running::spawn_env(&["restore", "--from", "gone.img"], &s.0, &faults_only);
    until_restored(&r);
    std::fs::remove_file(s.0.join("gone.img")).unwrap();
    let ok = r.wait_for(Duration::from_secs(60), |o| whole_sums(o).len() >= 2);
    let out = r.kill();
    assert!(ok, "{}\n{}", out.out(), out.stderr);
    for l in whole_sums(&out.out()) {
        assert_eq!(l, sum, "memory changed after the image was deleted");
    }

    // A damaged byte in the middle of the memory chunks.
    let mut bytes = std::fs::read(s.0.join("img")).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(s.0.join("bad.img"), &bytes).unwrap();
    let r = vmm_tests::Running::spawn(&["restore", "--from", "bad.img"], &s.0);
    let o = r.finish(Duration::from_secs(60));
    assert!(!o.timed_out, "a bad chunk must stop the VM:\n{}", o.stderr);
    assert_eq!(o.status, Some(1), "{}", o.stderr);
    assert!(
        o.stderr
            .contains("vmm: error: cannot restore guest memory from bad.img: ")
            && o.stderr.contains("memory chunk at guest 0x")
            && o.stderr.contains("the VM is stopped"),
        "{}",
        o.stderr
    );
    for l in whole_sums(&o.out()) {
        assert_eq!(l, sum, "the guest ran on damaged memory");
    }
}

/// The disk travels in the image: restore materializes it in --disk-dir as a
/// sparse file with the same contents, named after the image id.
#[test]
fn the_disk_is_restored_as_a_sparse_copy() {
    if !kvm_available("the_disk_is_restored_as_a_sparse_copy") {
        return;
    }
    let k = test_guest();
    let s = vmm_tests::Scratch::new("tg-disk");
    let disk = s.0.join("disk.img");
    let mut bytes = vec![0u8; 64 << 20];
    for (i, b) in bytes.iter_mut().enumerate().step_by(65536 + 7) {
        *b = (i % 251) as u8 | 1;
    }
    // A multiple of 512 but not of the 4 KiB page: the last page is partial.
    bytes.truncate((64 << 20) - 3584);
    std::fs::write(&disk, &bytes).unwrap();
    let mut vm = vmm_tests::Running::spawn(
        &[
            "run",
            "--kernel",
            &k,
            "--rootfs",
            "disk.img",
            "--cmdline",
            "ticks",
            "--api-sock",
            "api.sock",
        ],
        &s.0,
    );
    assert!(vm.wait_for(Duration::from_secs(30), |o| !ticks(o).is_empty()));
    let o = vmm_tests::vmm_in(
        &s.0,
        &["snapshot", "--api-sock", "api.sock", "--out", "img"],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    vm.kill();
    std::fs::create_dir_all(s.0.join("restored")).unwrap();
    let mut r = vmm_tests::Running::spawn(
        &["restore", "--from", "img", "--disk-dir", "restored"],
        &s.0,
    );
    assert!(r.wait_for(Duration::from_secs(30), |o| !ticks(o).is_empty()));
    r.kill();
    let files: Vec<_> = std::fs::read_dir(s.0.join("restored"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_string_lossy().ends_with("-virtio-blk-0.img"));
    assert!(
        std::fs::read(&files[0]).unwrap() == bytes,
        "restored disk differs"
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&files[0]).unwrap().blocks() * 512;
    assert!(
        allocated < bytes.len() as u64 / 2,
        "{allocated} bytes allocated: not sparse"
    );
}

/// `--checkpoint-on USR1`: each signal to `vmm` writes a checkpoint into
/// `--snapshot-dir` (the test guest has no agent: not quiesced, and no
/// wait for one); `PUT /vm/checkpoint` does the same with a name, and a
/// name that would leave the directory is refused; a checkpoint restores.
/// Without `--snapshot-dir` the option is refused.
#[test]
fn a_signal_or_the_api_checkpoints_into_the_snapshot_dir() {
    if !kvm_available("a_signal_or_the_api_checkpoints_into_the_snapshot_dir") {
        return;
    }
    let k = test_guest();
    let s = vmm_tests::Scratch::new("tg-ckpt-on");
    let snaps = s.0.join("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let mut vm = vmm_tests::Running::spawn(
        &[
            "run",
            "--kernel",
            &k,
            "--cmdline",
            "ticks",
            "--snapshot-dir",
            "snaps",
            "--checkpoint-on",
            "USR1",
            "--api-sock",
            "api.sock",
        ],
        &s.0,
    );
    assert!(vm.wait_for(Duration::from_secs(30), |o| !ticks(o).is_empty()));
    let images = || -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&snaps)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        v.sort();
        v
    };
    // SAFETY: kill takes no pointers; the pid is our child's.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGUSR1) }, 0);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while images().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let first = images();
    assert_eq!(first.len(), 1, "{first:?}\n{}", vm.stderr());
    assert!(
        first[0].starts_with("ckpt-") && first[0].ends_with(".vmm"),
        "{first:?}"
    );

    let sock = s.0.join("api.sock");
    let put = |body: serde_json::Value| vmm::client::json(&sock, "PUT", "/vm/checkpoint", &body);
    let v = put(serde_json::json!({"name": "api-1"})).unwrap();
    let dest = v["destination"].as_str().unwrap().to_string();
    assert!(
        dest.ends_with("/snaps/api-1.vmm") && dest.starts_with('/'),
        "{v}"
    );
    let e = put(serde_json::json!({"name": "../escape"})).unwrap_err();
    assert!(e.to_string().contains("bad checkpoint name"), "{e}");
    assert_eq!(images().len(), 2, "{:?}", images());
    vm.kill();

    let o = vmm_tests::vmm_in(&s.0, &["inspect", &format!("snaps/{}", first[0])]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("not quiesced"), "{report}");
    let mut r = vmm_tests::Running::spawn(&["restore", "--from", &dest], &s.0);
    assert!(r.wait_for(Duration::from_secs(30), |o| !ticks(o).is_empty()));
    r.kill();

    let o = vmm_tests::vmm_in(&s.0, &["run", "--kernel", &k, "--checkpoint-on", "USR1"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--checkpoint-on needs --snapshot-dir"),
        "{err}"
    );
}

/// `vmm run --name` puts the API socket where `vmm ps`, `vmm snapshot NAME`,
/// `vmm pause|resume|stop NAME` find it; a name in use is refused, a dead
/// VM's socket is cleaned up and its name can be used again.
#[test]
fn named_vms_are_found_by_name() {
    if !kvm_available("named_vms_are_found_by_name") {
        return;
    }
    let s = vmm_tests::Scratch::new("tg-names");
    let rt = s.0.join("rt");
    let k = test_guest();
    let run = [
        "run",
        "--kernel",
        &k,
        "--cmdline",
        "ticks=100000",
        "--name",
        "t1",
    ];
    let env = [("VMM_RUNTIME_DIR", rt.as_path())];
    let vmm = |args: &[&str]| {
        let o = std::process::Command::new(vmm_tests::vmm_bin())
            .args(args)
            .env("VMM_RUNTIME_DIR", &rt)
            .current_dir(&s.0)
            .output()
            .unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let sock = rt.join("t1.sock");
    let up = |vm: &mut vmm_tests::Running| {
        assert!(
            vm.wait_for(Duration::from_secs(30), |_| {
                std::os::unix::net::UnixStream::connect(&sock).is_ok()
            }),
            "{}",
            vm.stderr()
        );
    };
    let mut vm = vmm_tests::Running::spawn_env(&run, &s.0, &env);
    up(&mut vm);

    let (code, _, err) = vmm(&run);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("the name 't1' is taken"), "{err}");

    let (_, out, err) = vmm(&["ps", "--json"]);
    let list: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("{out}{err}"));
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{out}");
    assert_eq!(list[0]["name"], "t1");
    assert_eq!(list[0]["pid"], vm.pid());
    assert_eq!(list[0]["vcpus"], 1);
    assert_eq!(list[0]["state"], "running");
    // `vmm ps` lists t1 in `state`.
    let listed_as = |state: &str| {
        let (_, out, _) = vmm(&["ps"]);
        assert!(
            out.lines()
                .any(|l| l.starts_with("t1 ") && l.contains(state)),
            "{out}"
        );
    };
    listed_as("running");

    assert_eq!(vmm(&["pause", "t1"]).1.trim(), "paused");
    listed_as("paused");
    assert_eq!(vmm(&["resume", "t1"]).1.trim(), "running");
    let (code, out, err) = vmm(&["snapshot", "t1", "--out", "img"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("snapshot "), "{out}");
    let (code, _, err) = vmm(&["pause", "nobody"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no VM is named 'nobody'"), "{err}");

    // Killed: its socket stays behind until ps notices nobody answers.
    let o = vm.kill();
    assert!(o.status.is_none(), "{o:?}");
    assert!(sock.exists());
    let (_, out, _) = vmm(&["ps", "--json"]);
    assert_eq!(out.trim(), "[]");
    assert!(!sock.exists(), "ps removes a dead VM's socket");

    // The name is free again; stop ends that VM cleanly.
    let mut vm = vmm_tests::Running::spawn_env(&run, &s.0, &env);
    up(&mut vm);
    assert_eq!(vmm(&["stop", "t1"]).1.trim(), "stopping");
    let o = vm.finish(Duration::from_secs(30));
    assert_eq!(o.status, Some(0), "{}", o.stderr);
    assert!(!sock.exists(), "the VMM removes its socket at exit");
}

/// The threads of a running VMM and whether each is under a seccomp
/// filter and no_new_privs (which Landlock sets): (name, seccomp mode,
/// no_new_privs).
fn threads_of(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let field = |f: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(f))
                .unwrap_or_default()
                .trim()
                .to_string()
        };
        out.push((field("Name:"), field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

/// Every thread of a running VMM is confined (seccomp mode 2, and Landlock's
/// no_new_privs), whatever its kind; the VMM writes images only into its
/// --snapshot-dir, refusing another path before the VM pauses, and
/// `vmm snapshot --out` writes there itself from the VMM's stream, with the
/// same answer. --no-seccomp --no-landlock lift both.
#[test]
fn every_thread_is_confined_and_images_go_where_allowed() {
    if !kvm_available("every_thread_is_confined_and_images_go_where_allowed") {
        return;
    }
    let s = vmm_tests::Scratch::new("tg-confined");
    let snaps = s.0.join("snaps");
    std::fs::create_dir_all(&snaps).unwrap();
    let k = test_guest();
    let start = |extra: &[&str]| {
        let mut args = vec![
            "run",
            "--kernel",
            &k,
            "--vcpus",
            "2",
            "--cmdline",
            "ticks=100000",
            "--api-sock",
            "api.sock",
            "--snapshot-dir",
            "snaps",
        ];
        args.extend_from_slice(extra);
        let mut vm = vmm_tests::Running::spawn(&args, &s.0);
        assert!(
            vm.wait_for(Duration::from_secs(30), |o| ticks(o).len() >= 2),
            "{}",
            vm.stderr()
        );
        vm
    };
    // PUT /vm/snapshot over the socket: status and JSON answer.
    let http = |body: &str| -> (u32, serde_json::Value) {
        use std::io::{Read, Write};
        let mut c = std::os::unix::net::UnixStream::connect(s.0.join("api.sock")).unwrap();
        write!(
            c,
            "PUT /vm/snapshot HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        let code = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let json = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
        (code, serde_json::from_str(json).unwrap_or_default())
    };

    let vm = start(&[]);
    let threads = threads_of(vm.pid());
    let names: Vec<&str> = threads.iter().map(|t| t.0.as_str()).collect();
    for expected in [
        "vmm",
        "vcpu0",
        "vcpu1",
        "devices",
        "agent",
        "api",
        "console-in",
    ] {
        assert!(names.contains(&expected), "{threads:?}");
    }
    for (name, seccomp, nnp) in &threads {
        assert_eq!(
            (seccomp.as_str(), nnp.as_str()),
            ("2", "1"),
            "thread {name} is not confined: {threads:?}"
        );
    }
    // Into the snapshot directory: the VMM writes it.
    let inside = snaps.join("in.img");
    let (code, answer) = http(&format!(r#"{{"path":"{}"}}"#, inside.display()));
    assert_eq!(code, 200, "{answer}");
    assert!(inside.exists());
    // Elsewhere: refused up front, nothing written, the VM still runs.
    let outside = s.0.join("out.img");
    let (code, answer) = http(&format!(r#"{{"path":"{}"}}"#, outside.display()));
    assert_eq!(code, 403, "{answer}");
    let why = answer["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("writes images only into") && why.contains(&snaps.display().to_string()),
        "{why}"
    );
    assert!(std::fs::read_dir(&s.0).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains("out.img")));
    // The CLI writes it itself, and says what the VMM said.
    let o = vmm_tests::vmm_in(
        &s.0,
        &[
            "snapshot",
            "--api-sock",
            "api.sock",
            "--out",
            "out.img",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["memory_pages"], 65536, "{v}");
    assert_eq!(v["destination"], outside.display().to_string(), "{v}");
    assert!(
        v["image_id"].as_str().is_some_and(|id| id.len() == 32),
        "{v}"
    );
    assert_eq!(
        std::fs::metadata(&outside).unwrap().len(),
        v["bytes"].as_u64().unwrap(),
        "{v}"
    );
    let verify = vmm_tests::vmm_in(&s.0, &["inspect", "--verify", "out.img"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let o = vm.kill();
    assert!(o.status.is_none(), "{}", o.stderr);

    // Unconfined: no filter, and the VMM writes anywhere.
    let vm = start(&["--no-seccomp", "--no-landlock"]);
    let threads = threads_of(vm.pid());
    assert!(threads.iter().all(|t| t.1 == "0"), "{threads:?}");
    let anywhere = s.0.join("anywhere.img");
    let (code, answer) = http(&format!(r#"{{"path":"{}"}}"#, anywhere.display()));
    assert_eq!(code, 200, "{answer}");
    assert!(anywhere.exists());
    vm.kill();
}

/// On a terminal, `vmm snapshot` and `vmm restore` show a progress bar for
/// work that takes a while (here: at once, VMM_PROGRESS_AFTER_MS=0) and
/// then their one-line result; `vmm restore --json` says it as JSON, and
/// off a terminal there is no bar.
#[test]
fn snapshot_and_restore_show_progress_on_a_terminal() {
    if !kvm_available("snapshot_and_restore_show_progress_on_a_terminal") {
        return;
    }
    let s = vmm_tests::Scratch::new("tg-progress");
    let k = test_guest();
    let mut vm = vmm_tests::Running::spawn(
        &[
            "run",
            "--kernel",
            &k,
            "--mem",
            "1024",
            "--cmdline",
            "ticks=100000 dirty=256,pattern=mix,rewrite=0",
            "--api-sock",
            "api.sock",
        ],
        &s.0,
    );
    assert!(
        vm.wait_for(Duration::from_secs(60), |o| ticks(o).len() >= 2),
        "{}",
        vm.stderr()
    );
    let now = [("VMM_PROGRESS_AFTER_MS", "0")];
    let said = vmm_tests::on_a_terminal(
        "snapshot --api-sock api.sock --out img",
        Some(&s.0),
        &now,
        Duration::from_secs(8),
    );
    assert!(said.contains("snapshot ["), "a bar: {said:?}");
    assert!(said.contains("B/s, "), "a rate: {said:?}");
    assert!(
        said.contains("snapshot ") && said.contains("written to") && said.contains("VM paused"),
        "the result: {said:?}"
    );
    vm.kill();

    // Eagerly: a lazy restore reads little before the guest runs.
    let said = vmm_tests::on_a_terminal(
        "restore --eager --from img --disk-dir .",
        Some(&s.0),
        &now,
        Duration::from_secs(4),
    );
    assert!(said.contains("restoring ["), "a bar: {said:?}");
    assert!(
        said.contains("vmm: restored ") && said.contains("1024 MiB of memory, 1 vCPU, in "),
        "the result: {said:?}"
    );
    // Off a terminal: the line, no bar; --json: the answer as JSON.
    let mut r = vmm_tests::Running::spawn_env(
        &["restore", "--from", "img", "--json"],
        &s.0,
        &[("VMM_PROGRESS_AFTER_MS", std::path::Path::new("0"))],
    );
    // The line comes before the guest runs again.
    assert!(
        r.wait_for(Duration::from_secs(30), |o| !ticks(o).is_empty()),
        "{}",
        r.stderr()
    );
    let err = r.stderr();
    r.kill();
    let first = err.lines().next().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|_| panic!("{err}"));
    assert_eq!(v["mem_mib"], 1024, "{v}");
    assert_eq!(v["image_id"].as_str().map(str::len), Some(32), "{v}");
    assert!(!err.contains("restoring ["), "{err}");
}

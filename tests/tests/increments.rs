//! Incremental snapshots: a full image and increments on it, each holding
//! the pages the VM wrote since the one before, restore to exactly the
//! memory of the last one. The test guest checks its own memory on every
//! tick (`verify`: each page must hold what it last wrote there), so a page
//! an increment missed shows up as `verify BAD` in the restored guest.

use std::path::Path;
use std::time::Duration;

use vmm_tests::kvm_available;
use vmm_tests::test_guest::{restore_verifying, run_with_api, snapshot, ticks, verified};

const WAIT: Duration = Duration::from_secs(60);

/// `vmm restore --from image` in `dir`, expected to fail at once.
fn refused_restore(dir: &Path, image: &str) -> vmm_tests::Outcome {
    let o = vmm_tests::Running::spawn(&["restore", "--from", image], dir).finish(WAIT);
    assert!(
        !o.timed_out && o.status == Some(1),
        "restore from {image} ran:\n{}\n{}",
        o.stdout,
        o.stderr
    );
    o
}

#[test]
fn a_chain_of_increments_restores_to_the_last_ones_memory() {
    if !kvm_available("a_chain_of_increments_restores_to_the_last_ones_memory") {
        return;
    }
    for n in [1u32, 4] {
        let s = vmm_tests::Scratch::new(&format!("inc-chain-{n}"));
        let smp = if n > 1 { " smp" } else { "" };
        // 64 MiB of the mix, 100 pages rewritten per tick (2,000 a second).
        let cmdline = format!("ticks=20 regs{smp} dirty=64,pattern=mix,rate=2000 verify");
        let mut vm = run_with_api(&s.0, n, 256, &cmdline);
        let said = |vm: &vmm_tests::Running| format!("{}\n{}", vm.output(), vm.stderr());
        assert!(vm.wait_for(WAIT, |o| verified(o) >= 2), "{}", said(&vm));

        let full = snapshot(&s.0, "full.img", &["--track"]).unwrap();
        assert!(full["parent_id"].is_null(), "{full}");
        let mut ids = vec![full["image_id"].as_str().unwrap().to_string()];
        let mut parent = "full.img".to_string();
        for k in 1..=3 {
            // A few rounds of rewrites between images.
            let seen = verified(&vm.output());
            assert!(
                vm.wait_for(WAIT, |o| verified(o) >= seen + 3),
                "{}",
                said(&vm)
            );
            if k == 3 {
                // Only the VM's last image can be a parent: the VM cannot
                // vouch for what changed since an older one.
                let e = snapshot(&s.0, "wrong.img", &["--parent", "full.img"]).unwrap_err();
                assert!(
                    e.contains(&format!("image {} is not this VM's last image", ids[0]))
                        && e.lines().count() == 1,
                    "{e}"
                );
                assert!(!s.0.join("wrong.img").exists());
            }
            let out = format!("inc{k}.img");
            let mut extra = vec!["--parent", &parent];
            if k == 3 {
                extra.push("--stop");
            }
            let inc = snapshot(&s.0, &out, &extra).unwrap();
            assert_eq!(inc["parent_id"], ids[k - 1].as_str(), "{inc}");
            // About 100 pages a round, a few rounds: far less than the full
            // image's 16,384 pages of the fill (and their zeros).
            let pages = inc["memory_pages"].as_u64().unwrap();
            assert!((100..8192).contains(&pages), "increment {k}: {inc}");
            assert!(
                inc["bytes"].as_u64().unwrap() * 3 < full["bytes"].as_u64().unwrap(),
                "increment {k} is not small: {inc} against {full}"
            );
            ids.push(inc["image_id"].as_str().unwrap().to_string());
            parent = out;
        }
        let before = vm.finish(WAIT);
        assert_eq!(
            before.status,
            Some(0),
            "--stop ends the VM: {}",
            before.stderr
        );
        let before = before.out();
        assert!(!before.contains("BAD"), "{before}");
        // The snapshot may have cut a line: count whole lines only.
        let whole = &before[..before.rfind('\n').map_or(0, |i| i + 1)];
        let last = *ticks(whole).last().unwrap();
        assert!(last >= 5, "{before}");

        let report = vmm_tests::vmm_in(&s.0, &["inspect", "inc3.img"]);
        let report = String::from_utf8_lossy(&report.stdout).into_owned();
        assert!(
            report.contains(&format!("incremental, parent {}", ids[2])),
            "{report}"
        );
        // The chain, base first, as a restore finds it.
        let chain: Vec<&str> = report
            .lines()
            .skip_while(|l| !l.starts_with("chain "))
            .map(|l| l[13..].split(' ').next().unwrap_or_default())
            .collect();
        assert_eq!(
            chain,
            ids.iter().map(String::as_str).collect::<Vec<_>>(),
            "{report}"
        );

        let (ok, after) = restore_verifying(&s.0, "inc3.img");
        let out = after.out();
        assert!(
            ok,
            "{n} vCPUs: the chain's guest does not run:\n{out}\n{}",
            after.stderr
        );
        assert!(
            !out.contains("BAD"),
            "{n} vCPUs: memory is not the last image's:\n{out}"
        );
        assert!(!out.contains("ready"), "the guest started over:\n{out}");
        assert!(
            after
                .stderr
                .contains(&format!("restored {} from inc3.img", ids[3])),
            "{}",
            after.stderr
        );
        // A line the snapshot cut is finished by the restored guest: join.
        let t = ticks(&format!("{before}{out}"));
        assert!(t.len() > last as usize, "{t:?}");
        assert!(
            t.iter().enumerate().all(|(i, &x)| x == i as u64 + 1),
            "ticks go on across the restore: {t:?}\nbefore, its end: {:?}\nafter: {out}",
            &before[before.len().saturating_sub(200)..]
        );
        // Flattened: one full image with the same memory, restored lazily.
        let o = vmm_tests::vmm_in(&s.0, &["image", "flatten", "inc3.img", "--out", "flat.img"]);
        let said = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(
            said.contains("and the 3 image(s) below it into flat.img"),
            "{said}"
        );
        let report = vmm_tests::vmm_in(&s.0, &["inspect", "flat.img"]);
        let report = String::from_utf8_lossy(&report.stdout).into_owned();
        assert!(report.contains("kind         full"), "{report}");
        let (ok, flat) = restore_verifying(&s.0, "flat.img");
        assert!(
            ok && !flat.out().contains("BAD"),
            "flattened:\n{}\n{}",
            flat.out(),
            flat.stderr
        );
        assert!(
            flat.stderr.contains("(arriving on demand)"),
            "{}",
            flat.stderr
        );
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

#[test]
fn a_missing_or_wrong_parent_is_refused() {
    if !kvm_available("a_missing_or_wrong_parent_is_refused") {
        return;
    }
    let s = vmm_tests::Scratch::new("inc-parents");
    let mut vm = run_with_api(
        &s.0,
        1,
        128,
        "ticks=20 dirty=16,pattern=mix,rate=2000 verify",
    );
    assert!(vm.wait_for(WAIT, |o| verified(o) >= 2), "{}", vm.output());

    // Nothing to build on yet, and not an image at all.
    std::fs::write(
        s.0.join("notes.txt"),
        "these are notes, not an image of a VM",
    )
    .unwrap();
    let e = snapshot(&s.0, "inc.img", &["--parent", "notes.txt"]).unwrap_err();
    assert!(
        e.contains("--parent notes.txt") && e.contains("not a vmm snapshot image"),
        "{e}"
    );
    let e = snapshot(&s.0, "inc.img", &["--parent", "nowhere.img"]).unwrap_err();
    assert!(
        e.contains("--parent nowhere.img") && e.contains("No such file"),
        "{e}"
    );
    let other = snapshot(&s.0, "a.img", &[]).unwrap();
    std::fs::rename(s.0.join("a.img"), s.0.join("elsewhere.img")).unwrap();
    let base = snapshot(&s.0, "base.img", &["--track"]).unwrap();
    let e = snapshot(&s.0, "inc.img", &["--parent", "elsewhere.img"]).unwrap_err();
    assert!(
        e.contains(&format!(
            "image {} is not this VM's last image",
            other["image_id"].as_str().unwrap()
        )),
        "{e}"
    );
    assert!(!s.0.join("inc.img").exists());
    let seen = verified(&vm.output());
    assert!(
        vm.wait_for(WAIT, |o| verified(o) >= seen + 2),
        "{}",
        vm.output()
    );
    let inc = snapshot(&s.0, "inc.img", &["--parent", "base.img", "--stop"]).unwrap();
    assert_eq!(inc["parent_id"], base["image_id"], "{inc}");
    assert_eq!(vm.finish(WAIT).status, Some(0));

    // Restore looks for the parent where it was, then next to the
    // increment: images moved together still restore.
    let moved = s.0.join("moved");
    std::fs::create_dir(&moved).unwrap();
    for f in ["base.img", "inc.img"] {
        std::fs::rename(s.0.join(f), moved.join(f)).unwrap();
    }
    let mut r = vmm_tests::Running::spawn(
        &[
            "restore",
            "--from",
            "moved/inc.img",
            "--api-sock",
            "api.sock",
            "--track",
        ],
        &s.0,
    );
    let ok = r.wait_for(WAIT, |o| verified(o) >= 2 || o.contains("BAD"));
    // A VM restored with --track vouches for the image it came from, and
    // no other; an increment never replaces its parent.
    let e = snapshot(&s.0, "x.img", &["--parent", "moved/base.img"]).unwrap_err();
    assert!(
        e.contains(&format!(
            "is not this VM's last image ({}",
            inc["image_id"].as_str().unwrap()
        )),
        "{e}"
    );
    for image in ["moved/inc.img", "moved/base.img"] {
        let e = snapshot(&s.0, image, &["--parent", "moved/inc.img"]).unwrap_err();
        assert!(
            e.contains("the increment would replace") && e.contains(image),
            "{image}: {e}"
        );
    }
    assert!(!s.0.join("x.img").exists());
    let seen = verified(&r.output());
    assert!(
        r.wait_for(WAIT, |o| verified(o) >= seen + 2),
        "{}",
        r.output()
    );
    let on_restored = snapshot(&s.0, "x.img", &["--parent", "moved/inc.img", "--stop"]).unwrap();
    assert_eq!(on_restored["parent_id"], inc["image_id"], "{on_restored}");
    let out = r.kill();
    assert!(
        ok && !out.out().contains("BAD"),
        "{}\n{}",
        out.out(),
        out.stderr
    );

    // The chain base, inc, x restores to x's memory.
    let (ok, out) = restore_verifying(&s.0, "x.img");
    assert!(
        ok && !out.out().contains("BAD"),
        "{}\n{}",
        out.out(),
        out.stderr
    );
    // A booted VM that has written no image vouches for none.
    let fresh = s.0.join("fresh");
    std::fs::create_dir(&fresh).unwrap();
    let mut vm = run_with_api(&fresh, 1, 128, "ticks=20");
    assert!(
        vm.wait_for(WAIT, |o| o.contains("tick 2")),
        "{}",
        vm.output()
    );
    let e = snapshot(&fresh, "y.img", &["--parent", "../x.img"]).unwrap_err();
    assert!(e.contains("this VM keeps track of no image"), "{e}");
    // Nor for an image taken without --track (tracking costs the guest).
    snapshot(&fresh, "z.img", &[]).unwrap();
    let e = snapshot(&fresh, "y.img", &["--parent", "z.img"]).unwrap_err();
    assert!(e.contains("this VM keeps track of no image"), "{e}");
    assert!(!fresh.join("y.img").exists());
    let _ = vm.kill();

    // A parent that is gone, or another image in its place: one line, no VM.
    std::fs::rename(moved.join("base.img"), s.0.join("gone.img")).unwrap();
    let inspect = vmm_tests::vmm_in(&s.0, &["inspect", "moved/inc.img"]);
    let report = String::from_utf8_lossy(&inspect.stdout).into_owned();
    assert_eq!(inspect.status.code(), Some(1), "{report}");
    assert!(
        report.contains("chain        broken: increment "),
        "{report}"
    );
    let o = refused_restore(&s.0, "moved/inc.img");
    let err = o.stderr;
    assert!(
        err.contains(&format!(
            "needs its parent, image {}",
            base["image_id"].as_str().unwrap()
        )) && err.contains("No such file")
            && err.trim().lines().count() == 1,
        "{err}"
    );
    std::fs::rename(s.0.join("elsewhere.img"), moved.join("base.img")).unwrap();
    let o = refused_restore(&s.0, "moved/inc.img");
    let err = o.stderr;
    assert!(
        err.contains(&format!(
            "that file is image {}",
            other["image_id"].as_str().unwrap()
        )) && err.trim().lines().count() == 1,
        "{err}"
    );

    // Flattening a broken chain or a cut image: one line, no file.
    let bytes = std::fs::read(moved.join("inc.img")).unwrap();
    std::fs::write(s.0.join("cut.img"), &bytes[..bytes.len() / 2]).unwrap();
    for image in ["moved/inc.img", "cut.img"] {
        let o = vmm_tests::vmm_in(&s.0, &["image", "flatten", image, "--out", "flat.img"]);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success(), "{image}");
        assert!(
            err.contains(&format!("cannot flatten {image}")) && err.trim().lines().count() == 1,
            "{err}"
        );
        assert!(!s.0.join("flat.img").exists(), "{image}");
    }
}

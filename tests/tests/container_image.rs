//! `vmm run --image`: a container image the test builds itself (static
//! busybox, two layers, the second deleting a file of the first; Env,
//! WorkingDir, User, Entrypoint and Cmd in its config) runs in the default
//! guest's kernel, as an OCI layout and as a `docker save` archive. One
//! cold boot; the archive's run reuses the root disk and starts warm.
//!
//! Every run uses a private cache (`VMM_CACHE_DIR`), so the developer's
//! image and warm caches are untouched.

use std::path::{Path, PathBuf};
use std::time::Duration;

use vmm_tests::oci::{self, build_test_image, TAG};
use vmm_tests::{guest_dir, kvm_available, Outcome, Running, Scratch};

/// A cold boot here takes about 90 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

/// `vmm ARGS` with the private cache.
fn vmm(dir: &Path, cache: &Path, args: &[&str]) -> Outcome {
    let guest = guest_dir();
    let env = [
        ("VMM_CACHE_DIR", cache),
        ("VMM_GUEST_DIR", guest.as_path()),
        ("RUST_LOG", Path::new("info")),
    ];
    let mut r = Running::spawn_env(args, dir, &env);
    r.close_stdin();
    r.finish(BOOT_TIMEOUT)
}

fn run(dir: &Path, cache: &Path, args: &[&str]) -> Outcome {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    vmm(dir, cache, &full)
}

fn field<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .map(str::trim)
}

/// The image's root disks in the cache.
fn disks(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("images"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_image_runs_as_its_config_says_from_a_layout_and_an_archive() {
    if !kvm_available("an_image_runs_as_its_config_says_from_a_layout_and_an_archive") {
        return;
    }
    let s = Scratch::new("image-run");
    let cache = s.0.join("cache");
    let image = build_test_image(&s.0);

    // The OCI layout, its Cmd: a cold boot (and the root disk made).
    let o = run(&s.0, &cache, &["--image", image.layout.to_str().unwrap()]);
    let out = o.out();
    assert_eq!(o.status, Some(0), "{out}\n{}", o.stderr);
    assert!(out.contains("CMD=default"), "{out}");
    // User app: its uid, primary group and supplementary group (audio).
    assert_eq!(
        field(&out, "uid="),
        // The kernel keeps supplementary groups sorted.
        Some("1000(app) gid=1000(app) groups=29(audio),1000(app)"),
        "{out}"
    );
    // WorkingDir (made: no layer has it), Env, HOME from /etc/passwd.
    assert_eq!(field(&out, "PWD="), Some("/srv/app"), "{out}");
    assert_eq!(
        field(&out, "GREETING="),
        Some("hello from the config"),
        "{out}"
    );
    assert_eq!(field(&out, "HOME="), Some("/home/app"), "{out}");
    // The second layer's whiteout deleted old.txt; ownership and mode kept.
    assert!(out.contains("keep.txt") && out.contains("new.txt"), "{out}");
    assert!(
        !out.contains("old.txt"),
        "the whiteout was not honoured:\n{out}"
    );
    assert!(out.contains("app's secret"), "{out}");
    assert_eq!(field(&out, "OWNED="), Some("1000:1000:600"), "{out}");
    assert_eq!(disks(&cache).len(), 1, "{:?}", disks(&cache));
    assert!(o.stderr.contains("root disk of"), "{}", o.stderr);

    // The same image from `docker save`, by tag, with a command in place
    // of Cmd (Entrypoint kept): the same root disk, and a warm start.
    let reference = format!("{}:{TAG}", image.archive.display());
    let o = run(
        &s.0,
        &cache,
        &[
            "--image",
            &reference,
            "--",
            "sh",
            "-c",
            "echo ARGV0=$0; cat /data/new.txt; ls /data; exit 5",
        ],
    );
    let out = o.out();
    assert_eq!(o.status, Some(5), "{out}\n{}", o.stderr);
    assert_eq!(field(&out, "ARGV0="), Some("sh"), "{out}");
    assert!(out.contains("from layer two"), "{out}");
    assert!(
        !out.contains("old.txt") && !out.contains("CMD=default"),
        "{out}"
    );
    assert_eq!(
        disks(&cache).len(),
        1,
        "the archive's run made another disk"
    );
    assert!(
        !o.stderr.contains("root disk of"),
        "the disk was made again:\n{}",
        o.stderr
    );
    assert!(
        o.stderr.contains("warm image restored"),
        "the archive's run booted instead of starting warm:\n{}",
        o.stderr
    );
    // The disk was never written (the guests wrote to overlays): it is
    // older than the record written after it was made.
    let entry = &disks(&cache)[0];
    let mtime = |p: PathBuf| std::fs::metadata(p).unwrap().modified().unwrap();
    assert!(mtime(entry.join("rootfs.ext4")) <= mtime(entry.join("image.json")));

    // `vmm cache ls` shows the disk and what it was made of; `rm` removes it.
    let o = vmm(&s.0, &cache, &["cache", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&o.stdout).expect("cache ls --json");
    let disk = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "image")
        .unwrap_or_else(|| panic!("no image disk listed: {listed}"));
    assert_eq!(disk["id"], image.id.as_str(), "{disk}");
    assert_eq!(disk["image"], image.layout.to_str().unwrap(), "{disk}");
    let name = disk["name"].as_str().unwrap();
    assert_eq!(entry.file_name().unwrap(), name);
    let o = vmm(&s.0, &cache, &["cache", "rm", name]);
    assert_eq!(o.status, Some(0), "{}", o.stderr);
    assert!(disks(&cache).is_empty(), "{:?}", disks(&cache));
}

/// Bad images are one line naming the problem, before any VM starts.
#[test]
fn bad_images_are_refused_with_one_line() {
    let s = Scratch::new("image-bad");
    let cache = s.0.join("cache");
    let image = build_test_image(&s.0);
    let refused = |reference: &str, expect: &str| {
        let o = run(&s.0, &cache, &["--image", reference]);
        assert_eq!(o.status, Some(1), "{reference}: {}", o.stderr);
        let lines: Vec<&str> = o
            .stderr
            .lines()
            .filter(|l| l.starts_with("vmm: error"))
            .collect();
        assert_eq!(lines.len(), 1, "{}", o.stderr);
        assert!(
            lines[0].starts_with(&format!("vmm: error: cannot use the image {reference}: ")),
            "{}",
            lines[0]
        );
        assert!(lines[0].contains(expect), "{reference}: {}", lines[0]);
        assert!(!o.stderr.contains("panicked"), "{}", o.stderr);
    };

    let garbage = s.0.join("garbage.tar");
    std::fs::write(&garbage, vec![0x5a; 4096]).unwrap();
    refused(garbage.to_str().unwrap(), "is not a tar archive");

    let truncated = s.0.join("truncated.tar");
    let bytes = std::fs::read(&image.archive).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    refused(truncated.to_str().unwrap(), "");

    refused(
        &format!("{}:nope", image.archive.display()),
        "has no image tagged nope (it has: vmm-test/app:v1)",
    );
    // Compressed whole, as `docker save | gzip` makes it: read through.
    let gz = s.0.join("image.tar.gz");
    let out = std::process::Command::new("gzip")
        .args(["-c", "-1"])
        .arg(&image.archive)
        .output()
        .unwrap();
    std::fs::write(&gz, out.stdout).unwrap();
    refused(
        &format!("{}:nope", gz.display()),
        "has no image tagged nope (it has: vmm-test/app:v1)",
    );
    refused(
        s.0.join("missing").to_str().unwrap(),
        "No such file or directory",
    );

    let odd = s.0.join("odd-media-type");
    let [one, _] = oci::test_layers();
    let config = oci::test_config(&[oci::sha256(&one)]);
    oci::write_layout(
        &odd,
        &[(one.clone(), "application/vnd.example.squashfs")],
        &config,
        "v1",
    );
    refused(
        odd.to_str().unwrap(),
        "a layer has media type application/vnd.example.squashfs, which we cannot read",
    );

    // A layer whose bytes do not match its digest: found while unpacking,
    // and nothing is left in the cache.
    let damaged = s.0.join("damaged");
    let mut bad = one.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0xff;
    oci::write_layout(
        &damaged,
        &[(bad, "application/vnd.oci.image.layer.v1.tar")],
        &config,
        "v1",
    );
    // The manifest says the damaged blob's own digest; the config's
    // diff_id is the original content's.
    refused(damaged.to_str().unwrap(), "the image is damaged");
    assert!(disks(&cache).is_empty(), "{:?}", disks(&cache));
}

//! The disk inside an image, looked at from the host: extracted, checked
//! with e2fsck, a file read with debugfs.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::process::Command;

/// The disk of the first disk section of `image`, written to `out`.
pub fn extract(image: &Path, out: &Path) {
    let mut r = snapshot::ImageReader::new(BufReader::new(File::open(image).unwrap())).unwrap();
    loop {
        match r.next_section().unwrap() {
            snapshot::Section::Disk(_) => {
                let file = File::create(out).unwrap();
                let opts = snapshot::ApplyOptions {
                    threads: 0,
                    dest_is_zeroed: true,
                };
                r.read_disk_into(&file, opts).unwrap();
                return;
            }
            snapshot::Section::End => panic!("{} has no disk", image.display()),
            _ => {}
        }
    }
}

/// `e2fsck -n` (check only) of the ext4 image `disk`: (clean, its report).
pub fn fsck(disk: &Path) -> (bool, String) {
    let o = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(disk)
        .output()
        .expect("run e2fsck (e2fsprogs)");
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

/// The contents of `path` in the ext4 image `disk` (debugfs).
pub fn cat(disk: &Path, path: &str) -> String {
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("cat {path}"))
        .arg(disk)
        .output()
        .expect("run debugfs (e2fsprogs)");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

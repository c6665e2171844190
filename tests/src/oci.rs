//! Container images built by the tests themselves, from the host's static
//! busybox: an OCI image layout and the same image as `docker save` writes
//! it, two layers where the second deletes a file of the first.

use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};

/// The static busybox the image carries (Debian's busybox-static).
pub const BUSYBOX: &str = "/usr/bin/busybox";
/// The tag of the test image in both forms.
pub const TAG: &str = "vmm-test/app:v1";

/// An entry of a layer.
pub enum Entry<'a> {
    Dir(&'a str, u32, u64),
    File(&'a str, &'a [u8], u32, u64),
    Link(String, &'a str),
}

/// A tar layer of `entries` (mode, then owner uid = gid).
pub fn layer(entries: &[Entry]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mtime(1_700_000_000);
        match e {
            Entry::Dir(p, mode, owner) => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(0);
                b.append_data(&mut h, p, std::io::empty()).unwrap();
            }
            Entry::File(p, data, mode, owner) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(data.len() as u64);
                b.append_data(&mut h, p, *data).unwrap();
            }
            Entry::Link(p, target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_uid(0);
                h.set_gid(0);
                h.set_size(0);
                b.append_link(&mut h, p, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

pub fn sha256(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    format!(
        "sha256:{}",
        d.iter().map(|b| format!("{b:02x}")).collect::<String>()
    )
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut e, bytes).unwrap();
    e.finish().unwrap()
}

/// The two layers of the test image.
///
/// 1: busybox and its applets in /bin, /etc/passwd and /etc/group with a
///    user `app` (1000, in group audio too), /data with old.txt, keep.txt
///    and `owned` (app's, 0600).
/// 2: deletes /data/old.txt (a whiteout), adds /data/new.txt.
pub fn test_layers() -> [Vec<u8>; 2] {
    let busybox = std::fs::read(BUSYBOX).unwrap_or_else(|e| {
        panic!("{BUSYBOX}: {e} (install busybox-static; tests/run-all.sh does)")
    });
    let mut one = vec![
        Entry::Dir("bin/", 0o755, 0),
        Entry::File("bin/busybox", &busybox, 0o755, 0),
    ];
    for applet in ["sh", "ls", "cat", "id", "pwd", "echo", "env", "stat"] {
        one.push(Entry::Link(format!("bin/{applet}"), "busybox"));
    }
    one.extend([
        Entry::Dir("etc/", 0o755, 0),
        Entry::File(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n",
            0o644,
            0,
        ),
        Entry::File(
            "etc/group",
            b"root:x:0:\naudio:x:29:app\napp:x:1000:\n",
            0o644,
            0,
        ),
        Entry::Dir("home/", 0o755, 0),
        Entry::Dir("home/app/", 0o755, 1000),
        Entry::Dir("data/", 0o755, 0),
        Entry::File("data/old.txt", b"old\n", 0o644, 0),
        Entry::File("data/keep.txt", b"keep\n", 0o644, 0),
        Entry::File("data/owned", b"app's secret\n", 0o600, 1000),
    ]);
    let two = [
        Entry::Dir("data/", 0o755, 0),
        Entry::File("data/.wh.old.txt", b"", 0o644, 0),
        Entry::File("data/new.txt", b"from layer two\n", 0o644, 0),
    ];
    [layer(&one), layer(&two)]
}

/// The test image's config: Entrypoint busybox, a Cmd that prints what
/// the process sees, Env, WorkingDir (missing from the layers), User.
pub fn test_config(diff_ids: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": "app",
            "Env": ["PATH=/bin", "GREETING=hello from the config"],
            "Entrypoint": ["/bin/busybox"],
            "Cmd": ["sh", "-c", "echo CMD=default; id; echo PWD=$(pwd); echo GREETING=$GREETING; echo HOME=$HOME; ls /data; cat /data/owned; stat -c 'OWNED=%u:%g:%a' /data/owned"],
            "WorkingDir": "/srv/app",
        },
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
        "history": [{ "created_by": "vmm tests" }],
    }))
    .unwrap()
}

/// Writes an OCI image layout of `layers` (each with its media type) and
/// `config` to `dir`, tagged `tag`.
pub fn write_layout(dir: &Path, layers: &[(Vec<u8>, &str)], config: &[u8], tag: &str) {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| {
        let d = sha256(bytes);
        std::fs::write(blobs.join(&d["sha256:".len()..]), bytes).unwrap();
        d
    };
    let layer_descs: Vec<_> = layers
        .iter()
        .map(|(bytes, media_type)| {
            json!({ "mediaType": media_type, "digest": put(bytes), "size": bytes.len() })
        })
        .collect();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config),
            "size": config.len(),
        },
        "layers": layer_descs,
    }))
    .unwrap();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": put(&manifest),
            "size": manifest.len(),
            "annotations": { "org.opencontainers.image.ref.name": tag },
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
}

/// Writes `layers` (uncompressed) and `config` as `docker save` (before
/// docker 25) does: manifest.json, `<id>.json`, `<n>/layer.tar`.
pub fn write_docker_archive(path: &Path, layers: &[Vec<u8>], config: &[u8], tag: &str) {
    let mut b = tar::Builder::new(std::fs::File::create(path).unwrap());
    let mut add = |name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(bytes.len() as u64);
        b.append_data(&mut h, name, bytes).unwrap();
    };
    let config_name = format!("{}.json", &sha256(config)["sha256:".len()..]);
    add(&config_name, config);
    let mut names = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let name = format!("layer{i}/layer.tar");
        add(&name, l);
        names.push(name);
    }
    let manifest = json!([{ "Config": config_name, "RepoTags": [tag], "Layers": names }]);
    add("manifest.json", manifest.to_string().as_bytes());
    b.into_inner().unwrap();
}

/// The test image as an OCI layout (first layer gzip-compressed) in
/// `DIR/layout` and as a docker archive `DIR/image.tar`; both have the
/// same config, so the same id.
pub struct TestImage {
    pub layout: PathBuf,
    pub archive: PathBuf,
    pub id: String,
}

pub fn build_test_image(dir: &Path) -> TestImage {
    let [one, two] = test_layers();
    let diff_ids = [sha256(&one), sha256(&two)];
    let config = test_config(&diff_ids);
    let layout = dir.join("layout");
    write_layout(
        &layout,
        &[
            (gzip(&one), "application/vnd.oci.image.layer.v1.tar+gzip"),
            (two.clone(), "application/vnd.oci.image.layer.v1.tar"),
        ],
        &config,
        "v1",
    );
    let archive = dir.join("image.tar");
    write_docker_archive(&archive, &[one, two], &config, TAG);
    TestImage {
        layout,
        archive,
        id: sha256(&config),
    }
}

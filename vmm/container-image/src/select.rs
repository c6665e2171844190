//! Finds the image to run in a [`Source`]: through `docker save`'s
//! `manifest.json` when there is one (docker, podman, and docker 25's
//! archives, which also hold an OCI layout), else through an OCI layout's
//! `index.json`. Picks one image by tag, checks the config's digest, and
//! lists the layers with how each is compressed.

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest, MediaType};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::source::{Source, SourceError};

/// The most a JSON document of an image (index, manifest, config) may be.
const MAX_JSON: u64 = 4 << 20;
/// The platform we run (the guest is x86_64 Linux).
const OS: &str = "linux";
const ARCH: &str = "amd64";
/// Annotations that name an image in an OCI index.
const REF_NAME: &str = "org.opencontainers.image.ref.name";
const CONTAINERD_NAME: &str = "io.containerd.image.name";

#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("{image} is neither an OCI image layout (no index.json) nor a docker save archive (no manifest.json)")]
    NotAnImage { image: String },
    #[error("{image}: {name} is not a valid {what}: {why}")]
    BadJson {
        image: String,
        name: String,
        what: &'static str,
        why: String,
    },
    #[error("{image} holds no image{}", for_platform(*.platform_skipped))]
    NoImage {
        image: String,
        platform_skipped: bool,
    },
    #[error("{image} has no image tagged {tag} (it has: {})", names_or_none(.names))]
    NoSuchTag {
        image: String,
        tag: String,
        names: Vec<String>,
    },
    #[error("{image} holds {} images ({}): pick one with {image}:TAG", .names.len(), names_or_none(.names))]
    Ambiguous { image: String, names: Vec<String> },
    #[error("{image}: {what} has media type {media_type}, which we cannot read")]
    UnsupportedMediaType {
        image: String,
        what: String,
        media_type: String,
    },
    #[error(
        "{image}: digest {digest} is not sha256:<64 hex digits> (the only algorithm we check)"
    )]
    UnsupportedDigest { image: String, digest: String },
    #[error("{image}: {name} does not match its digest {expected} (it hashes to {actual}): the image is damaged")]
    DigestMismatch {
        image: String,
        name: String,
        expected: String,
        actual: String,
    },
    #[error("{image}: the image is for {os}/{arch}; we run linux/amd64 guests")]
    WrongPlatform {
        image: String,
        os: String,
        arch: String,
    },
    #[error("{image}: the config names {diff_ids} layer digests for {layers} layers")]
    LayerCount {
        image: String,
        diff_ids: usize,
        layers: usize,
    },
}

fn for_platform(skipped: bool) -> &'static str {
    if skipped {
        " for linux/amd64"
    } else {
        ""
    }
}

fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "no tags".into()
    } else {
        names.join(", ")
    }
}

/// How a layer's bytes are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    /// Not said (docker's own archives): told by the first bytes.
    Sniff,
}

/// One layer: which file of the source, how to read it, what it must hash to.
#[derive(Debug, Clone)]
pub struct LayerRef {
    pub file: String,
    pub compression: Compression,
    /// Of the bytes as stored, when the manifest gives it.
    pub digest: Option<String>,
    /// Of the uncompressed tar: the config's `rootfs.diff_ids` entry.
    pub diff_id: String,
}

/// The image chosen.
#[derive(Debug)]
pub struct Selected {
    /// `sha256:...` of the config: the image's id, as docker shows it.
    pub id: String,
    pub config: ImageConfiguration,
    pub layers: Vec<LayerRef>,
    /// The tag it was chosen by, or its only name.
    pub name: Option<String>,
}

/// One image of `docker save`'s manifest.json.
#[derive(Debug, Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

/// Picks the image tagged `tag` (or the only one) in `source`.
pub fn select(source: &Source, tag: Option<&str>) -> Result<Selected, SelectError> {
    if source.has("manifest.json") {
        select_docker(source, tag)
    } else if source.has("index.json") {
        select_oci(source, tag)
    } else {
        Err(SelectError::NotAnImage {
            image: source.display().into(),
        })
    }
}

fn bad_json(source: &Source, name: &str, what: &'static str, why: impl ToString) -> SelectError {
    SelectError::BadJson {
        image: source.display().into(),
        name: name.into(),
        what,
        why: why.to_string(),
    }
}

fn select_docker(source: &Source, tag: Option<&str>) -> Result<Selected, SelectError> {
    let text = source.read_small("manifest.json", MAX_JSON)?;
    let entries: Vec<DockerEntry> = serde_json::from_slice(&text)
        .map_err(|e| bad_json(source, "manifest.json", "docker save manifest", e))?;
    let candidates: Vec<(Vec<String>, DockerEntry)> = entries
        .into_iter()
        .map(|e| (e.repo_tags.clone().unwrap_or_default(), e))
        .collect();
    let (name, entry) = choose(source, candidates, tag, false)?;
    let bytes = source.read_small(&entry.config, MAX_JSON)?;
    let id = sha256_of(&bytes);
    // docker 25 names blobs by digest: check it as well.
    if let Some(hex) = entry.config.strip_prefix("blobs/sha256/") {
        expect_digest(source, &entry.config, &format!("sha256:{hex}"), &id)?;
    }
    let config = parse_config(source, &entry.config, &bytes)?;
    let diff_ids = diff_ids(source, &config, entry.layers.len())?;
    let layers = entry
        .layers
        .into_iter()
        .zip(diff_ids)
        .map(|(file, diff_id)| {
            let digest = file
                .strip_prefix("blobs/sha256/")
                .map(|hex| format!("sha256:{hex}"));
            LayerRef {
                file,
                compression: Compression::Sniff,
                digest,
                diff_id,
            }
        })
        .collect();
    Ok(Selected {
        id,
        config,
        layers,
        name,
    })
}

fn select_oci(source: &Source, tag: Option<&str>) -> Result<Selected, SelectError> {
    let text = source.read_small("index.json", MAX_JSON)?;
    let index = ImageIndex::from_reader(text.as_slice())
        .map_err(|e| bad_json(source, "index.json", "OCI image index", e))?;
    let mut candidates = Vec::new();
    let mut platform_skipped = false;
    for d in index.manifests() {
        let names = descriptor_names(d);
        for m in manifests_of(source, d, 0, &mut platform_skipped)? {
            candidates.push((names.clone(), m));
        }
    }
    if candidates.is_empty() && platform_skipped {
        return Err(SelectError::NoImage {
            image: source.display().into(),
            platform_skipped,
        });
    }
    let (name, descriptor) = choose(source, candidates, tag, platform_skipped)?;
    let manifest_file = blob_path(source, &descriptor)?;
    let bytes = source.read_small(&manifest_file, MAX_JSON)?;
    expect_digest(
        source,
        &manifest_file,
        descriptor.digest().as_ref(),
        &sha256_of(&bytes),
    )?;
    let manifest = ImageManifest::from_reader(bytes.as_slice())
        .map_err(|e| bad_json(source, &manifest_file, "OCI image manifest", e))?;
    let config_file = blob_path(source, manifest.config())?;
    let bytes = source.read_small(&config_file, MAX_JSON)?;
    let id = sha256_of(&bytes);
    expect_digest(
        source,
        &config_file,
        manifest.config().digest().as_ref(),
        &id,
    )?;
    let config = parse_config(source, &config_file, &bytes)?;
    let diff_ids = diff_ids(source, &config, manifest.layers().len())?;
    let mut layers = Vec::new();
    for (d, diff_id) in manifest.layers().iter().zip(diff_ids) {
        layers.push(LayerRef {
            file: blob_path(source, d)?,
            compression: layer_compression(source, d.media_type())?,
            digest: Some(d.digest().to_string()),
            diff_id,
        });
    }
    Ok(Selected {
        id,
        config,
        layers,
        name,
    })
}

/// The image manifests `d` leads to: itself, or those of the index it
/// names (for linux/amd64), at most a few indexes deep.
fn manifests_of(
    source: &Source,
    d: &Descriptor,
    depth: usize,
    platform_skipped: &mut bool,
) -> Result<Vec<Descriptor>, SelectError> {
    if let Some(p) = d.platform() {
        if p.os().to_string() != OS || p.architecture().to_string() != ARCH {
            *platform_skipped = true;
            return Ok(Vec::new());
        }
    }
    match d.media_type() {
        MediaType::ImageManifest => Ok(vec![d.clone()]),
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.v2+json" => {
            Ok(vec![d.clone()])
        }
        MediaType::ImageIndex => nested(source, d, depth, platform_skipped),
        MediaType::Other(t) if t == "application/vnd.docker.distribution.manifest.list.v2+json" => {
            nested(source, d, depth, platform_skipped)
        }
        // Attestations and other artifacts share indexes with images.
        _ => Ok(Vec::new()),
    }
}

fn nested(
    source: &Source,
    d: &Descriptor,
    depth: usize,
    platform_skipped: &mut bool,
) -> Result<Vec<Descriptor>, SelectError> {
    if depth >= 4 {
        return Ok(Vec::new());
    }
    let file = blob_path(source, d)?;
    let bytes = source.read_small(&file, MAX_JSON)?;
    expect_digest(source, &file, d.digest().as_ref(), &sha256_of(&bytes))?;
    let index = ImageIndex::from_reader(bytes.as_slice())
        .map_err(|e| bad_json(source, &file, "OCI image index", e))?;
    let mut out = Vec::new();
    for m in index.manifests() {
        out.extend(manifests_of(source, m, depth + 1, platform_skipped)?);
    }
    Ok(out)
}

fn descriptor_names(d: &Descriptor) -> Vec<String> {
    let Some(a) = d.annotations() else {
        return Vec::new();
    };
    let mut names = Vec::new();
    for key in [CONTAINERD_NAME, REF_NAME] {
        if let Some(v) = a.get(key) {
            if !names.contains(v) {
                names.push(v.clone());
            }
        }
    }
    names
}

/// The one candidate `tag` names, or the only one there is.
fn choose<T>(
    source: &Source,
    candidates: Vec<(Vec<String>, T)>,
    tag: Option<&str>,
    platform_skipped: bool,
) -> Result<(Option<String>, T), SelectError> {
    let all_names: Vec<String> = candidates.iter().flat_map(|(n, _)| n.clone()).collect();
    let image = source.display().to_string();
    match tag {
        Some(tag) => candidates
            .into_iter()
            .find(|(names, _)| names.iter().any(|n| name_matches(n, tag)))
            .map(|(_, c)| (Some(tag.to_string()), c))
            .ok_or(SelectError::NoSuchTag {
                image,
                tag: tag.into(),
                names: all_names,
            }),
        None => {
            let count = candidates.len();
            let mut it = candidates.into_iter();
            match (it.next(), count) {
                (None, _) => Err(SelectError::NoImage {
                    image,
                    platform_skipped,
                }),
                (Some((names, c)), 1) => Ok((names.into_iter().next(), c)),
                _ => Err(SelectError::Ambiguous {
                    image,
                    names: all_names,
                }),
            }
        }
    }
}

/// Whether an image named `name` in an archive is the one a user means by
/// `wanted`: the same reference once docker's defaults are filled in
/// (`busybox` is `docker.io/library/busybox:latest`), or, for the bare tags
/// OCI layouts use (`latest`, `v1`), the same tag.
pub fn name_matches(name: &str, wanted: &str) -> bool {
    if name == wanted {
        return true;
    }
    let full = |r: &str| {
        let r = r.strip_prefix("docker.io/").unwrap_or(r);
        let r = r.strip_prefix("library/").unwrap_or(r);
        let last = r.rsplit('/').next().unwrap_or(r);
        if last.contains(':') || last.contains('@') {
            r.to_string()
        } else {
            format!("{r}:latest")
        }
    };
    full(name) == full(wanted)
}

fn blob_path(source: &Source, d: &Descriptor) -> Result<String, SelectError> {
    let digest = d.digest().to_string();
    match digest.strip_prefix("sha256:") {
        Some(hex) if is_sha256_hex(hex) => Ok(format!("blobs/sha256/{hex}")),
        _ => Err(SelectError::UnsupportedDigest {
            image: source.display().into(),
            digest,
        }),
    }
}

fn is_sha256_hex(hex: &str) -> bool {
    hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit())
}

fn layer_compression(source: &Source, t: &MediaType) -> Result<Compression, SelectError> {
    Ok(match t {
        MediaType::ImageLayer | MediaType::ImageLayerNonDistributable => Compression::None,
        MediaType::ImageLayerGzip | MediaType::ImageLayerNonDistributableGzip => Compression::Gzip,
        MediaType::ImageLayerZstd | MediaType::ImageLayerNonDistributableZstd => Compression::Zstd,
        MediaType::Other(t) if t.starts_with("application/vnd.docker.image.rootfs.") => {
            match t.rsplit('.').next() {
                Some("gzip") => Compression::Gzip,
                Some("zstd") => Compression::Zstd,
                Some("tar") => Compression::None,
                _ => return Err(unsupported(source, "a layer", t)),
            }
        }
        other => return Err(unsupported(source, "a layer", other.as_ref())),
    })
}

fn unsupported(source: &Source, what: &str, media_type: &str) -> SelectError {
    SelectError::UnsupportedMediaType {
        image: source.display().into(),
        what: what.into(),
        media_type: media_type.into(),
    }
}

fn parse_config(
    source: &Source,
    name: &str,
    bytes: &[u8],
) -> Result<ImageConfiguration, SelectError> {
    let config = ImageConfiguration::from_reader(bytes)
        .map_err(|e| bad_json(source, name, "image config", e))?;
    let (os, arch) = (config.os().to_string(), config.architecture().to_string());
    if os != OS || arch != ARCH {
        return Err(SelectError::WrongPlatform {
            image: source.display().into(),
            os,
            arch,
        });
    }
    Ok(config)
}

fn diff_ids(
    source: &Source,
    config: &ImageConfiguration,
    layers: usize,
) -> Result<Vec<String>, SelectError> {
    let ids = config.rootfs().diff_ids().clone();
    if ids.len() != layers {
        return Err(SelectError::LayerCount {
            image: source.display().into(),
            diff_ids: ids.len(),
            layers,
        });
    }
    for id in &ids {
        if !id.strip_prefix("sha256:").is_some_and(is_sha256_hex) {
            return Err(SelectError::UnsupportedDigest {
                image: source.display().into(),
                digest: id.clone(),
            });
        }
    }
    Ok(ids)
}

fn expect_digest(
    source: &Source,
    name: &str,
    expected: &str,
    actual: &str,
) -> Result<(), SelectError> {
    if expected.eq_ignore_ascii_case(actual) {
        Ok(())
    } else {
        Err(SelectError::DigestMismatch {
            image: source.display().into(),
            name: name.into(),
            expected: expected.into(),
            actual: actual.into(),
        })
    }
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(bytes)))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_as_docker_fills_them_in() {
        assert!(name_matches("busybox:latest", "busybox"));
        assert!(name_matches("docker.io/library/busybox:latest", "busybox"));
        assert!(name_matches(
            "docker.io/library/busybox:1.36",
            "busybox:1.36"
        ));
        assert!(name_matches("localhost/app:v2", "localhost/app:v2"));
        assert!(name_matches("v2", "v2"));
        assert!(!name_matches("busybox:1.36", "busybox"));
        assert!(!name_matches("app:v2", "v2"));
        assert!(!name_matches("other:latest", "busybox"));
    }

    #[test]
    fn layer_media_types() {
        let d = tempfile::tempdir().unwrap();
        let s = Source::open(d.path()).unwrap();
        let c = |t: &str| layer_compression(&s, &MediaType::from(t));
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+gzip").unwrap(),
            Compression::Gzip
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar+zstd").unwrap(),
            Compression::Zstd
        );
        assert_eq!(
            c("application/vnd.oci.image.layer.v1.tar").unwrap(),
            Compression::None
        );
        assert_eq!(
            c("application/vnd.docker.image.rootfs.diff.tar.gzip").unwrap(),
            Compression::Gzip
        );
        let e = c("application/vnd.example.squashfs").unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}: a layer has media type application/vnd.example.squashfs, which we cannot read",
                d.path().display()
            )
        );
    }

    #[test]
    fn digests() {
        assert_eq!(
            sha256_of(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(is_sha256_hex(&"a".repeat(64)));
        assert!(!is_sha256_hex(&"g".repeat(64)));
        assert!(!is_sha256_hex("abc"));
    }
}

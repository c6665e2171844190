//! VM names: `vmm run --name NAME` keeps its API socket at a standard place,
//! so other commands find it by name instead of `--api-sock PATH`.
//!
//! The place is `$VMM_RUNTIME_DIR` if set, else `/run/vmm` for root and
//! `$XDG_RUNTIME_DIR/vmm` for anyone else (`/tmp/vmm-UID` without it);
//! a VM named NAME listens on `DIR/NAME.sock`. A socket nobody answers on
//! is a VM that died: `vmm run --name` takes it over and `vmm ps` removes it.

use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum NameError {
    #[error("'{0}' is not a VM name: use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    Invalid(String),
    #[error("cannot create the directory of VM sockets {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no VM is named '{name}' (no socket at {path}; `vmm ps` lists them)")]
    Unknown { name: String, path: String },
}

/// The directory of named VMs' sockets.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("VMM_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    let uid = std::fs::metadata("/proc/self").map_or(0, |m| m.uid());
    if uid == 0 {
        return PathBuf::from("/run/vmm");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => Path::new(&dir).join("vmm"),
        None => PathBuf::from(format!("/tmp/vmm-{uid}")),
    }
}

/// Checks a name: it becomes a file name, and appears in listings.
pub fn validate(name: &str) -> Result<(), NameError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(NameError::Invalid(name.to_string()))
    }
}

/// Where a VM named `name` listens; `dir` is [`runtime_dir`].
pub fn socket_path(dir: &Path, name: &str) -> Result<PathBuf, NameError> {
    validate(name)?;
    Ok(dir.join(format!("{name}.sock")))
}

/// The socket a new VM named `name` listens on, its directory created
/// (mode 0700) if need be.
pub fn socket_for_new(name: &str) -> Result<PathBuf, NameError> {
    let dir = runtime_dir();
    let path = socket_path(&dir, name)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|source| NameError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    Ok(path)
}

/// The socket of the running VM named `name`.
pub fn socket_of(name: &str) -> Result<PathBuf, NameError> {
    let path = socket_path(&runtime_dir(), name)?;
    if !path.exists() {
        return Err(NameError::Unknown {
            name: name.to_string(),
            path: path.display().to_string(),
        });
    }
    Ok(path)
}

/// The names with a socket in `dir`, sorted.
pub fn list(dir: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<(String, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let file = e.file_name().into_string().ok()?;
            let name = file.strip_suffix(".sock")?;
            validate(name).ok()?;
            Some((name.to_string(), e.path()))
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_file_names_and_nothing_more() {
        for good in ["web", "a", "vm-1.test_2", &"x".repeat(64)] {
            assert!(validate(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "-x",
            ".hidden",
            "a/b",
            "..",
            "a b",
            &"x".repeat(65),
            "é",
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
        let dir = Path::new("/run/vmm");
        assert_eq!(
            socket_path(dir, "web").unwrap(),
            Path::new("/run/vmm/web.sock")
        );
    }

    #[test]
    fn list_finds_sockets_by_name() {
        let d = std::env::temp_dir().join(format!("vmm-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        for f in ["b.sock", "a.sock", "notes.txt", ".x.sock"] {
            std::fs::write(d.join(f), "").unwrap();
        }
        let names: Vec<String> = list(&d).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["a", "b"]);
        let _ = std::fs::remove_dir_all(&d);
    }
}

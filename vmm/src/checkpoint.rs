//! Checkpoints the VMM takes on its own initiative into `--snapshot-dir`:
//! asked for from inside the guest (`vmm-ckpt`, `vmm_checkpoint()`), by a
//! signal to the `vmm` process (`--checkpoint-on`), or through the API.
//!
//! The guest supplies at most a name; the host decides the directory. A
//! name is one file-name component of safe characters, so no request from
//! the guest can reach outside the directory.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Sender};

use guest_abi::agent::local::MAX_NAME;

use crate::events::{ApiRequest, VmEvent};

/// The extension of images written into the snapshot directory.
pub const EXTENSION: &str = "vmm";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("bad checkpoint name {0:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.'")]
    BadName(String),
    #[error("--checkpoint-on {0:?}: not a signal this VMM can take (HUP, INT, QUIT, USR1, USR2, TERM, WINCH, or a number)")]
    BadSignal(String),
    #[error("cannot watch for signal {0}")]
    Watch(i32, #[source] std::io::Error),
}

/// Where the checkpoint `name` goes in `dir`: `DIR/NAME.vmm`, or
/// `DIR/ckpt-<unix ms>.vmm` without a name.
pub fn checkpoint_path(dir: &Path, name: Option<&str>) -> Result<PathBuf, CheckpointError> {
    let name = match name {
        Some(n) => check_name(n)?.to_string(),
        None => {
            let ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis());
            format!("ckpt-{ms}")
        }
    };
    Ok(dir.join(format!("{name}.{EXTENSION}")))
}

fn check_name(name: &str) -> Result<&str, CheckpointError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(name)
    } else {
        Err(CheckpointError::BadName(name.to_string()))
    }
}

/// A signal named as `kill -l` names it (with or without `SIG`), or its number.
pub fn parse_signal(s: &str) -> Result<i32, CheckpointError> {
    let bad = || CheckpointError::BadSignal(s.to_string());
    let upper = s.to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    let signal = match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "WINCH" => libc::SIGWINCH,
        n => n.parse::<i32>().map_err(|_| bad())?,
    };
    if signal_hook::consts::FORBIDDEN.contains(&signal) || !(1..=64).contains(&signal) {
        return Err(bad());
    }
    Ok(signal)
}

/// Checkpoints the VM into the snapshot directory each time `signal`
/// reaches this process, as DragonFly BSD's SIGCKPT did.
pub fn on_signal(signal: i32, events: Sender<VmEvent>) -> Result<(), CheckpointError> {
    let mut signals = signal_hook::iterator::Signals::new([signal])
        .map_err(|e| CheckpointError::Watch(signal, e))?;
    std::thread::Builder::new()
        .name("checkpoint-on".into())
        .spawn(move || {
            if !crate::seccomp::confine_or_log(crate::seccomp::ThreadKind::Relay) {
                return;
            }
            for _ in signals.forever() {
                let (tx, rx) = mpsc::channel();
                let request = ApiRequest::Checkpoint { name: None };
                if events
                    .send(VmEvent::Request { request, reply: tx })
                    .is_err()
                {
                    return;
                }
                match rx.recv() {
                    Ok(Ok(v)) => log::warn!(
                        "checkpoint on signal {signal}: written to {}",
                        v.get("destination").and_then(|d| d.as_str()).unwrap_or("?")
                    ),
                    Ok(Err(e)) => log::error!("checkpoint on signal {signal} failed: {e:?}"),
                    Err(_) => return,
                }
            }
        })
        .map_err(|e| CheckpointError::Watch(signal, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_directory() {
        let dir = Path::new("/snaps");
        assert_eq!(
            checkpoint_path(dir, Some("t1")).unwrap(),
            Path::new("/snaps/t1.vmm")
        );
        assert_eq!(
            checkpoint_path(dir, Some("run-2.a_b")).unwrap(),
            Path::new("/snaps/run-2.a_b.vmm")
        );
        let default = checkpoint_path(dir, None).unwrap();
        let file = default.file_name().unwrap().to_str().unwrap();
        assert!(
            file.starts_with("ckpt-") && file.ends_with(".vmm"),
            "{file}"
        );
        let long = "a".repeat(MAX_NAME + 1);
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "..",
            "a b",
            "x\n",
            long.as_str(),
        ] {
            assert!(
                matches!(
                    checkpoint_path(dir, Some(bad)),
                    Err(CheckpointError::BadName(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn signals_parse() {
        assert_eq!(parse_signal("USR1").unwrap(), libc::SIGUSR1);
        assert_eq!(parse_signal("sigusr2").unwrap(), libc::SIGUSR2);
        assert_eq!(parse_signal("1").unwrap(), libc::SIGHUP);
        for bad in ["KILL", "STOP", "9", "0", "65", "nope", ""] {
            assert!(parse_signal(bad).is_err(), "{bad}");
        }
    }
}

//! What the VMM tells the agent through the kernel command line.
//!
//! The VMM appends ` -- vmm.cmd=<base64url(argv joined by NUL)>` to the
//! kernel command line. Linux hands every word after `--` to init as an
//! argument, so the agent finds the command in its own argv. Words with a dot
//! before `--` would be taken for module parameters and dropped, hence the
//! `--`. Other words may reach init too (the kernel passes on unknown ones);
//! they are ignored.
//!
//! Recognised words (the last occurrence of each wins, so the VMM's own
//! appended words override anything a user put in `--cmdline`):
//! - `vmm.cmd=B64`: the container command. Absent: an interactive shell.
//! - `vmm.unshare=uts,ipc,mnt`: namespaces the command gets of its own
//!   (default none: the VM is the isolation boundary, and CRIU inside the
//!   guest is simpler when the workload shares init's namespaces).

use std::fmt;

use crate::base64;

/// Argument prefix carrying the container command.
pub const CMD_PREFIX: &[u8] = b"vmm.cmd=";
/// Argument prefix listing namespaces to unshare for the command.
pub const UNSHARE_PREFIX: &[u8] = b"vmm.unshare=";

/// Namespaces the container command is put in, beyond the guest's own.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Namespaces {
    pub uts: bool,
    pub ipc: bool,
    pub mount: bool,
}

/// The agent's instructions, decoded from its argv.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootArgs {
    /// The command's argv; `None` means run an interactive shell.
    pub command: Option<Vec<Vec<u8>>>,
    pub unshare: Namespaces,
}

/// Why the agent's arguments cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    /// `vmm.cmd=` is not base64url.
    BadEncoding(base64::DecodeError),
    /// `vmm.cmd=` decodes to nothing or to an empty program name.
    EmptyCommand,
    /// `vmm.unshare=` names something other than uts, ipc or mnt.
    UnknownNamespace(String),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadEncoding(e) => write!(f, "bad vmm.cmd= on the kernel command line: {e}"),
            Self::EmptyCommand => write!(
                f,
                "vmm.cmd= on the kernel command line holds an empty command \
                 (leave vmm.cmd= out for an interactive shell)"
            ),
            Self::UnknownNamespace(n) => write!(
                f,
                "vmm.unshare= names {n:?}; known namespaces are uts, ipc and mnt"
            ),
        }
    }
}

impl std::error::Error for CmdlineError {}

/// Parses init's arguments (without argv\[0\]).
pub fn parse<I, A>(args: I) -> Result<BootArgs, CmdlineError>
where
    I: IntoIterator<Item = A>,
    A: AsRef<[u8]>,
{
    let mut cmd: Option<Vec<u8>> = None;
    let mut unshare: Option<Vec<u8>> = None;
    for arg in args {
        let arg = arg.as_ref();
        if let Some(v) = arg.strip_prefix(CMD_PREFIX) {
            cmd = Some(v.to_vec());
        } else if let Some(v) = arg.strip_prefix(UNSHARE_PREFIX) {
            unshare = Some(v.to_vec());
        }
    }
    let command = match cmd {
        None => None,
        Some(enc) => Some(decode_command(&enc)?),
    };
    let unshare = match unshare {
        None => Namespaces::default(),
        Some(list) => parse_namespaces(&list)?,
    };
    Ok(BootArgs { command, unshare })
}

/// Decodes a `vmm.cmd=` value into argv: base64url of the arguments joined by NUL.
pub fn decode_command(encoded: &[u8]) -> Result<Vec<Vec<u8>>, CmdlineError> {
    let joined = base64::decode(encoded).map_err(CmdlineError::BadEncoding)?;
    // An empty value would be ambiguous (no argv, or one empty argument): refuse it.
    if joined.is_empty() {
        return Err(CmdlineError::EmptyCommand);
    }
    let argv: Vec<Vec<u8>> = joined.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
    if argv[0].is_empty() {
        return Err(CmdlineError::EmptyCommand);
    }
    Ok(argv)
}

fn parse_namespaces(list: &[u8]) -> Result<Namespaces, CmdlineError> {
    let mut ns = Namespaces::default();
    for name in list.split(|&b| b == b',').filter(|n| !n.is_empty()) {
        match name {
            b"uts" => ns.uts = true,
            b"ipc" => ns.ipc = true,
            b"mnt" => ns.mount = true,
            b"none" => {}
            other => {
                return Err(CmdlineError::UnknownNamespace(
                    String::from_utf8_lossy(other).into_owned(),
                ))
            }
        }
    }
    Ok(ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Vec<u8>> {
        words.iter().map(|w| w.as_bytes().to_vec()).collect()
    }

    #[test]
    fn no_command_means_interactive() {
        assert_eq!(parse(args(&[])).unwrap(), BootArgs::default());
        // Unknown words the kernel passed on are ignored.
        assert_eq!(parse(args(&["nopv", "foo"])).unwrap().command, None);
    }

    #[test]
    fn finds_the_command_among_other_words() {
        // "uname\0-r"
        let got = parse(args(&["ignored", "vmm.cmd=dW5hbWUALXI"])).unwrap();
        assert_eq!(got.command, Some(args(&["uname", "-r"])));
        assert_eq!(got.unshare, Namespaces::default());
    }

    #[test]
    fn last_command_wins() {
        // "true", then "false"
        let got = parse(args(&["vmm.cmd=dHJ1ZQ", "vmm.cmd=ZmFsc2U"])).unwrap();
        assert_eq!(got.command, Some(args(&["false"])));
    }

    #[test]
    fn keeps_empty_and_binary_arguments() {
        // "printf\0\0a b\0\xff"
        let enc = b"cHJpbnRmAABhIGIA_w";
        assert_eq!(
            decode_command(enc).unwrap(),
            vec![
                b"printf".to_vec(),
                b"".to_vec(),
                b"a b".to_vec(),
                vec![0xff]
            ]
        );
    }

    #[test]
    fn rejects_empty_and_malformed_commands() {
        assert_eq!(parse(args(&["vmm.cmd="])), Err(CmdlineError::EmptyCommand));
        // "\0x": empty program name.
        assert_eq!(decode_command(b"AHg"), Err(CmdlineError::EmptyCommand));
        assert!(matches!(
            parse(args(&["vmm.cmd=a*b"])),
            Err(CmdlineError::BadEncoding(_))
        ));
    }

    #[test]
    fn parses_namespaces() {
        let got = parse(args(&["vmm.unshare=uts,mnt"])).unwrap();
        assert_eq!(
            got.unshare,
            Namespaces {
                uts: true,
                ipc: false,
                mount: true
            }
        );
        assert_eq!(
            parse(args(&["vmm.unshare=none"])).unwrap().unshare,
            Namespaces::default()
        );
        assert_eq!(
            parse(args(&["vmm.unshare="])).unwrap().unshare,
            Namespaces::default()
        );
        assert_eq!(
            parse(args(&["vmm.unshare=uts,net"])),
            Err(CmdlineError::UnknownNamespace("net".into()))
        );
    }
}

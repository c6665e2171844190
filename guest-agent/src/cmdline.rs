//! What the VMM tells the agent through the kernel command line.
//!
//! The VMM appends ` -- vmm.cmd=...` to the kernel command line (the
//! encoding is [`guest_abi::cmdline`]'s). Other words may reach init too
//! (the kernel passes on unknown ones); they are ignored.
//!
//! Recognised words (the last occurrence of each wins, so the VMM's own
//! appended words override anything a user put in `--cmdline`):
//! - `vmm.cmd=B64`: the container command. Absent: an interactive shell.
//! - `vmm.start=agent`: no command with the boot; it comes over the
//!   control channel once the VMM has what it needs (a warm image).
//! - `vmm.root=ephemeral`: the root disk is thrown away with the VM.
//! - `vmm.net=MAC,ADDR/PREFIX[,GW]`: an interface to configure (one word
//!   per interface; all of them count).
//! - `vmm.unshare=uts,ipc,mnt`: namespaces the command gets of its own
//!   (default none: the VM is the isolation boundary, and CRIU inside the
//!   guest is simpler when the workload shares init's namespaces).

use std::fmt;

pub use guest_abi::cmdline::{decode_command, CommandError};
use guest_abi::cmdline::{CMD_PREFIX, EPHEMERAL_ROOT, START_BY_AGENT, UNSHARE_PREFIX};
use guest_abi::net::{NetSpec, NetSpecError, NET_PREFIX};

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
    /// Wait for the command over the control channel.
    pub start_by_agent: bool,
    /// The root disk ends with the VM.
    pub ephemeral_root: bool,
    /// Interfaces to configure.
    pub nets: Vec<NetSpec>,
}

/// Why the agent's arguments cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineError {
    /// `vmm.cmd=` is not base64url, or holds an empty command.
    Command(CommandError),
    /// `vmm.unshare=` names something other than uts, ipc or mnt.
    UnknownNamespace(String),
    /// `vmm.net=` does not parse.
    Net(NetSpecError),
}

impl fmt::Display for CmdlineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Command(e) => write!(f, "{e}"),
            Self::Net(e) => write!(f, "{e}"),
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
    let mut nets = Vec::new();
    let mut start_by_agent = false;
    let mut ephemeral_root = false;
    for arg in args {
        let arg = arg.as_ref();
        if arg == START_BY_AGENT.as_bytes() {
            start_by_agent = true;
            continue;
        }
        if arg == EPHEMERAL_ROOT.as_bytes() {
            ephemeral_root = true;
            continue;
        }
        if let Some(v) = arg.strip_prefix(NET_PREFIX.as_bytes()) {
            let v = String::from_utf8_lossy(v);
            nets.push(NetSpec::decode(&v).map_err(CmdlineError::Net)?);
            continue;
        }
        if let Some(v) = arg.strip_prefix(CMD_PREFIX.as_bytes()) {
            cmd = Some(v.to_vec());
        } else if let Some(v) = arg.strip_prefix(UNSHARE_PREFIX.as_bytes()) {
            unshare = Some(v.to_vec());
        }
    }
    let command = match cmd {
        None => None,
        Some(enc) => Some(decode_command(&enc).map_err(CmdlineError::Command)?),
    };
    let unshare = match unshare {
        None => Namespaces::default(),
        Some(list) => parse_namespaces(&list)?,
    };
    Ok(BootArgs {
        command,
        unshare,
        start_by_agent,
        ephemeral_root,
        nets,
    })
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
    fn start_by_agent_is_one_exact_word() {
        assert!(parse(args(&["vmm.start=agent"])).unwrap().start_by_agent);
        assert!(!parse(args(&["vmm.start=agents"])).unwrap().start_by_agent);
        assert!(!parse(args(&["vmm.cmd=dHJ1ZQ"])).unwrap().start_by_agent);
        let both = parse(args(&["vmm.root=ephemeral", "vmm.start=agent"])).unwrap();
        assert!(both.ephemeral_root && both.start_by_agent);
    }

    #[test]
    fn last_command_wins() {
        // "true", then "false"
        let got = parse(args(&["vmm.cmd=dHJ1ZQ", "vmm.cmd=ZmFsc2U"])).unwrap();
        assert_eq!(got.command, Some(args(&["false"])));
    }

    #[test]
    fn rejects_empty_and_malformed_commands() {
        assert_eq!(
            parse(args(&["vmm.cmd="])),
            Err(CmdlineError::Command(CommandError::Empty))
        );
        assert!(matches!(
            parse(args(&["vmm.cmd=a*b"])),
            Err(CmdlineError::Command(CommandError::Encoding(_)))
        ));
    }

    #[test]
    fn collects_every_interface() {
        let got = parse(args(&[
            "vmm.net=02:00:00:00:00:01,10.0.0.2/24,10.0.0.1",
            "vmm.net=02:00:00:00:00:02,10.1.0.2/16",
        ]))
        .unwrap();
        assert_eq!(got.nets.len(), 2);
        assert_eq!(got.nets[1].prefix, 16);
        assert!(matches!(
            parse(args(&["vmm.net=02:00,10.0.0.2/24"])),
            Err(CmdlineError::Net(_))
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

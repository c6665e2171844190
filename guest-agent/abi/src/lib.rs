//! What the VMM and the guest agent both need to agree on, in one place:
//! the I/O ports the agent reports on, and how the container command
//! travels on the kernel command line. Both sides use this crate, so the
//! two ends cannot drift apart.

/// I/O ports the agent writes to; each write exits straight to the VMM.
pub mod ports {
    /// One byte written here is the guest's exit status: the agent's last
    /// word, after it synced the disk and drained the console.
    pub const STATUS_PORT: u16 = 0x510;
    /// Any byte written here says the agent has started (a boot milestone
    /// for `vmm run --timings`).
    pub const PROGRESS_PORT: u16 = 0x511;
}

/// The agent's words on the kernel command line.
///
/// The VMM appends ` -- vmm.cmd=<base64url(argv joined by NUL)>`. Linux
/// hands every word after `--` to init as an argument, so the agent finds
/// the command in its own argv. Words with a dot before `--` would be taken
/// for module parameters and dropped, hence the `--`.
pub mod cmdline {
    use base64::Engine;

    /// Argument prefix carrying the container command.
    pub const CMD_PREFIX: &str = "vmm.cmd=";
    /// Argument prefix listing namespaces to unshare for the command.
    pub const UNSHARE_PREFIX: &str = "vmm.unshare=";

    const ENGINE: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    pub enum CommandError {
        #[error("bad vmm.cmd= on the kernel command line: {0}")]
        Encoding(#[source] base64::DecodeError),
        #[error(
            "vmm.cmd= on the kernel command line holds an empty command \
             (leave vmm.cmd= out for an interactive shell)"
        )]
        Empty,
    }

    /// The kernel command-line words that carry `argv` to the agent:
    /// `-- vmm.cmd=...`.
    pub fn encode_command<S: AsRef<str>>(argv: &[S]) -> String {
        let joined: Vec<&str> = argv.iter().map(AsRef::as_ref).collect();
        format!("-- {CMD_PREFIX}{}", ENGINE.encode(joined.join("\0")))
    }

    /// Decodes a `vmm.cmd=` value into argv. An empty command is refused:
    /// it would be ambiguous (no argv, or one empty argument).
    pub fn decode_command(encoded: &[u8]) -> Result<Vec<Vec<u8>>, CommandError> {
        let joined = ENGINE.decode(encoded).map_err(CommandError::Encoding)?;
        if joined.is_empty() {
            return Err(CommandError::Empty);
        }
        let argv: Vec<Vec<u8>> = joined.split(|&b| b == 0).map(<[u8]>::to_vec).collect();
        if argv[0].is_empty() {
            return Err(CommandError::Empty);
        }
        Ok(argv)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn commands_round_trip() {
            let words = encode_command(&["sh", "-c", "exit 7"]);
            let enc = words.strip_prefix("-- vmm.cmd=").unwrap();
            assert_eq!(
                decode_command(enc.as_bytes()).unwrap(),
                [b"sh".to_vec(), b"-c".to_vec(), b"exit 7".to_vec()]
            );
        }

        #[test]
        fn keeps_empty_and_binary_arguments() {
            // "printf\0\0a b\0\xff"
            assert_eq!(
                decode_command(b"cHJpbnRmAABhIGIA_w").unwrap(),
                vec![
                    b"printf".to_vec(),
                    b"".to_vec(),
                    b"a b".to_vec(),
                    vec![0xff]
                ]
            );
        }

        #[test]
        fn refuses_empty_and_malformed_commands() {
            assert_eq!(decode_command(b""), Err(CommandError::Empty));
            // "\0x": empty program name.
            assert_eq!(decode_command(b"AHg"), Err(CommandError::Empty));
            assert!(matches!(
                decode_command(b"a*b"),
                Err(CommandError::Encoding(_))
            ));
        }
    }
}

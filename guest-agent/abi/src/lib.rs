//! What the VMM and the guest agent both need to agree on, in one place:
//! the I/O ports the agent reports on, how the container command travels on
//! the kernel command line, and the control channel's messages ([`agent`]). Both sides use this crate, so the
//! two ends cannot drift apart.

pub mod agent;

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
    /// Instead of `vmm.cmd=`: the agent gets ready and waits for the
    /// command to come over the control channel (`Request::Start`), so one
    /// snapshot taken while it waits serves any command (warm start).
    pub const START_BY_AGENT: &str = "vmm.start=agent";
    /// The root disk is a copy-on-write view that ends with the VM: the
    /// agent need not make it clean at the end.
    pub const EPHEMERAL_ROOT: &str = "vmm.root=ephemeral";

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

    /// The kernel command-line word that carries `argv` to the agent:
    /// `vmm.cmd=...` (it goes after `--`, with the agent's other words).
    pub fn encode_command<S: AsRef<str>>(argv: &[S]) -> String {
        let joined: Vec<&str> = argv.iter().map(AsRef::as_ref).collect();
        format!("{CMD_PREFIX}{}", ENGINE.encode(joined.join("\0")))
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
            let enc = words.strip_prefix("vmm.cmd=").unwrap();
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

/// How the agent configures a network interface: `vmm.net=MAC,ADDR/PREFIX[,GW]`,
/// one word per interface the VMM gave an address. The agent finds the
/// interface by its MAC, so the order of devices does not matter.
pub mod net {
    use std::net::Ipv4Addr;

    /// Argument prefix of one interface's configuration.
    pub const NET_PREFIX: &str = "vmm.net=";

    /// One interface's address, as the VMM asks and the agent applies.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct NetSpec {
        pub mac: [u8; 6],
        pub addr: Ipv4Addr,
        pub prefix: u8,
        pub gateway: Option<Ipv4Addr>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
    #[error("bad vmm.net= on the kernel command line: {0:?} (expected MAC,ADDR/PREFIX[,GW])")]
    pub struct NetSpecError(pub String);

    /// A MAC as Linux prints it (`02:ab:00:01:10:ff`).
    pub fn format_mac(mac: &[u8; 6]) -> String {
        mac.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// Parses `aa:bb:cc:dd:ee:ff` (either case).
    pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
        let mut mac = [0u8; 6];
        let mut octets = s.split(':');
        for b in &mut mac {
            let o = octets.next().filter(|o| o.len() == 2)?;
            *b = u8::from_str_radix(o, 16).ok()?;
        }
        octets.next().is_none().then_some(mac)
    }

    impl NetSpec {
        /// The command-line word: `vmm.net=02:00:00:00:00:01,10.0.0.2/24,10.0.0.1`.
        pub fn encode(&self) -> String {
            let mut s = format!(
                "{NET_PREFIX}{},{}/{}",
                format_mac(&self.mac),
                self.addr,
                self.prefix
            );
            if let Some(gw) = self.gateway {
                s.push_str(&format!(",{gw}"));
            }
            s
        }

        /// Parses a `vmm.net=` value (after the prefix).
        pub fn decode(value: &str) -> Result<NetSpec, NetSpecError> {
            let bad = || NetSpecError(value.to_string());
            let mut parts = value.split(',');
            let mac = parts.next().and_then(parse_mac).ok_or_else(bad)?;
            let (addr, prefix) = parts
                .next()
                .and_then(|a| a.split_once('/'))
                .ok_or_else(bad)?;
            let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
            let prefix: u8 = prefix.parse().map_err(|_| bad())?;
            if prefix > 32 {
                return Err(bad());
            }
            let gateway = match parts.next() {
                None => None,
                Some(g) => Some(g.parse().map_err(|_| bad())?),
            };
            if parts.next().is_some() {
                return Err(bad());
            }
            Ok(NetSpec {
                mac,
                addr,
                prefix,
                gateway,
            })
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn specs_round_trip() {
            let spec = NetSpec {
                mac: [2, 0, 0, 0xab, 0, 1],
                addr: Ipv4Addr::new(10, 0, 0, 2),
                prefix: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 0, 1)),
            };
            let word = spec.encode();
            assert_eq!(word, "vmm.net=02:00:00:ab:00:01,10.0.0.2/24,10.0.0.1");
            let value = word.strip_prefix(NET_PREFIX).unwrap();
            assert_eq!(NetSpec::decode(value).unwrap(), spec);
            let no_gw = NetSpec {
                gateway: None,
                ..spec
            };
            let w = no_gw.encode();
            assert_eq!(NetSpec::decode(&w[NET_PREFIX.len()..]).unwrap(), no_gw);
        }

        #[test]
        fn macs_parse_and_print() {
            let m = parse_mac("02:ab:CD:00:01:ff").unwrap();
            assert_eq!(m, [0x02, 0xab, 0xcd, 0, 1, 0xff]);
            assert_eq!(format_mac(&m), "02:ab:cd:00:01:ff");
            for bad in [
                "",
                "02:ab:cd:00:01",
                "02:ab:cd:00:01:ff:00",
                "02:ab:cd:00:01:fg",
                "2:ab:cd:00:01:ff0",
            ] {
                assert_eq!(parse_mac(bad), None, "{bad:?}");
            }
        }

        #[test]
        fn bad_specs_are_refused() {
            for bad in [
                "",
                "02:00:00:ab:00,10.0.0.2/24",
                "02:00:00:ab:00:01",
                "02:00:00:ab:00:01,10.0.0.2",
                "02:00:00:ab:00:01,10.0.0.2/33",
                "02:00:00:ab:00:01,10.0.0.2/24,x",
                "02:00:00:ab:00:01,10.0.0.2/24,10.0.0.1,1",
            ] {
                assert!(NetSpec::decode(bad).is_err(), "{bad:?}");
            }
        }
    }
}

//! What `vmm run` boots: its configuration, checked, and the kernel command
//! line that goes with it.

use crate::arch::cpuid::{self, CpuTemplate};
use crate::arch::layout;
use devices::virtio::net::{self, MacAddr};
use guest_abi::net::NetSpec;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

/// One `--net tap=NAME[,mac=MAC][,ip=ADDR/PREFIX[,gw=GW]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// An existing TAP interface on the host.
    pub tap: String,
    /// The guest's MAC; a random locally administered one when not given.
    pub mac: Option<MacAddr>,
    /// The address the guest agent gives the interface, and its prefix.
    pub ip: Option<(Ipv4Addr, u8)>,
    /// The default route's gateway.
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    #[error("--net {0:?}: tap=NAME is required")]
    NoTap(String),
    #[error("--net: {0}")]
    TapName(String),
    #[error("--net: {0:?} is not a MAC address (expected a unicast aa:bb:cc:dd:ee:ff)")]
    Mac(String),
    #[error("--net: {0:?} is not an IPv4 address with a prefix (expected ADDR/PREFIX, e.g. 10.0.0.2/24)")]
    Ip(String),
    #[error("--net: {0:?} is not an IPv4 gateway address")]
    Gateway(String),
    #[error("--net: gw= needs ip= as well")]
    GatewayWithoutIp,
    #[error("--net: unknown key {0:?} (known: tap, mac, ip, gw)")]
    UnknownKey(String),
}

impl FromStr for NetConfig {
    type Err = NetConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut cfg = NetConfig {
            tap: String::new(),
            mac: None,
            ip: None,
            gateway: None,
        };
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "tap" => {
                    net::tap::check_name(v).map_err(|e| NetConfigError::TapName(e.to_string()))?;
                    cfg.tap = v.to_string();
                }
                // A multicast address cannot be a card's.
                "mac" => {
                    let mac = guest_abi::net::parse_mac(v).filter(|m| m[0] & 1 == 0);
                    cfg.mac = Some(mac.ok_or(NetConfigError::Mac(v.into()))?);
                }
                "ip" => {
                    let ip = v
                        .split_once('/')
                        .and_then(|(a, p)| Some((a.parse().ok()?, p.parse::<u8>().ok()?)))
                        .filter(|&(_, p)| p <= 32)
                        .ok_or(NetConfigError::Ip(v.into()))?;
                    cfg.ip = Some(ip);
                }
                "gw" => {
                    cfg.gateway = Some(v.parse().map_err(|_| NetConfigError::Gateway(v.into()))?)
                }
                other => return Err(NetConfigError::UnknownKey(other.into())),
            }
        }
        if cfg.tap.is_empty() {
            return Err(NetConfigError::NoTap(s.into()));
        }
        if cfg.gateway.is_some() && cfg.ip.is_none() {
            return Err(NetConfigError::GatewayWithoutIp);
        }
        Ok(cfg)
    }
}

impl NetConfig {
    /// What the agent needs to configure the interface with MAC `mac`.
    pub fn spec(&self, mac: MacAddr) -> Option<NetSpec> {
        let (addr, prefix) = self.ip?;
        Some(NetSpec {
            mac,
            addr,
            prefix,
            gateway: self.gateway,
        })
    }
}

/// `--vsock cid=N,uds=PATH`: the guest's context id and the host socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VsockConfigError {
    #[error("--vsock {0:?}: cid=N and uds=PATH are both required")]
    Missing(String),
    #[error("--vsock: cid {0:?} is not a number")]
    Cid(String),
    #[error("--vsock: {0}")]
    BadCid(String),
    #[error("--vsock: unknown key {0:?} (known: cid, uds)")]
    UnknownKey(String),
}

impl FromStr for VsockConfig {
    type Err = VsockConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (mut cid, mut uds) = (None, None);
        for kv in s.split(',') {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "cid" => {
                    let n: u64 = v.parse().map_err(|_| VsockConfigError::Cid(v.into()))?;
                    devices::virtio::vsock::check_cid(n)
                        .map_err(|e| VsockConfigError::BadCid(e.to_string()))?;
                    cid = Some(n);
                }
                "uds" if !v.is_empty() => uds = Some(PathBuf::from(v)),
                "uds" => return Err(VsockConfigError::Missing(s.into())),
                other => return Err(VsockConfigError::UnknownKey(other.into())),
            }
        }
        match (cid, uds) {
            (Some(cid), Some(uds)) => Ok(VsockConfig { cid, uds }),
            _ => Err(VsockConfigError::Missing(s.into())),
        }
    }
}

/// Refuses two network devices on one TAP (the second would find it busy,
/// after the first had attached).
pub fn check_distinct_taps<'a>(taps: impl IntoIterator<Item = &'a str>) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for tap in taps {
        if !seen.insert(tap) {
            return Err(ConfigError::TapTwice(tap.to_string()));
        }
    }
    Ok(())
}

/// What `vmm run` was asked to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub rootfs: Option<PathBuf>,
    pub mem_mib: u64,
    pub vcpus: u8,
    /// Replaces the default kernel command line when set.
    pub cmdline: Option<String>,
    /// The container command; empty for an interactive shell.
    pub command: Vec<String>,
    /// Network devices, in the order the guest sees them (eth0 first).
    pub nets: Vec<NetConfig>,
    pub vsock: Option<VsockConfig>,
    /// The guest writes into a copy-on-write overlay of the rootfs that
    /// ends with the VM; the rootfs itself is only read.
    pub ephemeral: bool,
    /// The command is not on the kernel command line: the agent waits for
    /// it over its channel (`vmm.start=agent`), so a snapshot taken while
    /// it waits (a warm image) serves any command.
    pub start_by_agent: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--vcpus must be between 1 and {max} (got {got})")]
    Vcpus { got: u64, max: u8 },
    #[error("--mem must be between {min} and {max} MiB (got {got})")]
    Mem { got: u64, min: u64, max: u64 },
    #[error("kernel command line is {len} bytes; the limit is {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("rootfs {0} does not exist")]
    MissingRootfs(String),
    #[error("TAP {0} is given to two network devices")]
    TapTwice(String),
}

impl VmConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return Err(ConfigError::Vcpus {
                got: u64::from(self.vcpus),
                max: layout::MAX_VCPUS,
            });
        }
        if self.mem_mib < layout::MIN_MEM_MIB || self.mem_mib > layout::MAX_MEM_MIB {
            return Err(ConfigError::Mem {
                got: self.mem_mib,
                min: layout::MIN_MEM_MIB,
                max: layout::MAX_MEM_MIB,
            });
        }
        if let Some(r) = &self.rootfs {
            if !r.exists() {
                return Err(ConfigError::MissingRootfs(r.display().to_string()));
            }
        }
        check_distinct_taps(self.nets.iter().map(|n| n.tap.as_str()))
    }
}

/// The default guest kernel's tick rate (`resources/kernel/guest.config`),
/// for `lpj=`: a kernel with a higher HZ gets longer delays than it asks
/// for, never shorter ones.
const DEFAULT_GUEST_HZ: u64 = 25;

/// The kernel command line: the caller's, or our default, plus device
/// declarations and, after `--`, the agent's words: network addresses
/// (`nets`) and the container command.
pub fn build_cmdline(
    cfg: &VmConfig,
    template: CpuTemplate,
    tsc_khz: Option<u32>,
    devices: &[String],
    nets: &[NetSpec],
) -> Result<String, ConfigError> {
    let mut parts: Vec<String> = Vec::new();
    match &cfg.cmdline {
        Some(c) => parts.push(c.clone()),
        None => {
            parts.push(
                "console=ttyS0 reboot=k panic=1 8250.nr_uarts=1 \
                 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd \
                 mitigations=off nofsgsbase init_on_alloc=0 tsc=reliable"
                    .to_string(),
            );
            if let Some(khz) = tsc_khz {
                // The TSC frequency and loops_per_jiffy skip calibrations that
                // an interpreted kernel cannot do against the PIT in time.
                let lpj = u64::from(khz) * 1000 / DEFAULT_GUEST_HZ;
                parts.push(format!("tsc_early_khz={khz} lpj={lpj}"));
            }
            if template == CpuTemplate::Interpreted {
                // The interpreted timer tick costs about its own period: keep ticks rare.
                parts.push("nopv highres=off nohz=on".into());
            }
            // Without kvmclock (nopv) nothing tells a restored guest that it
            // was stopped: its clock jumps by the image's age, and RCU took
            // that for a stalled CPU and printed stack dumps (1.7 s of
            // interpreted printk in every warm run of a 40-minute-old image).
            parts.push("rcupdate.rcu_cpu_stall_suppress=1".into());
            parts.extend(cpuid::linux_clearcpuid(template));
            if !cfg.command.is_empty() || cfg.start_by_agent {
                // Only the command's output on the console: no kernel
                // messages below KERN_CRIT (a panic still shows).
                parts.push("loglevel=2".into());
            }
            if cfg.rootfs.is_some() {
                parts.push("root=/dev/vda rw rootfstype=ext4 init=/sbin/vmm-agent".into());
            }
        }
    }
    parts.extend(devices.iter().cloned());
    let mut agent: Vec<String> = nets.iter().map(NetSpec::encode).collect();
    if cfg.ephemeral {
        agent.push(guest_abi::cmdline::EPHEMERAL_ROOT.into());
    }
    if cfg.start_by_agent {
        agent.push(guest_abi::cmdline::START_BY_AGENT.into());
    } else if !cfg.command.is_empty() {
        agent.push(guest_abi::cmdline::encode_command(&cfg.command));
    }
    if !agent.is_empty() {
        parts.push("--".into());
        parts.extend(agent);
    }
    let s = parts.join(" ");
    if s.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(ConfigError::CmdlineTooLong {
            len: s.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "k".into(),
            initrd: None,
            rootfs: Some("/".into()),
            mem_mib: 256,
            vcpus: 1,
            cmdline: None,
            command: vec![],
            nets: vec![],
            vsock: None,
            ephemeral: false,
            start_by_agent: false,
        }
    }

    #[test]
    fn bad_sizes_are_refused() {
        let mut c = cfg();
        c.vcpus = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Vcpus { .. })));
        c.vcpus = 9;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("between 1 and 8"));
        c.vcpus = 1;
        c.mem_mib = 1;
        assert!(matches!(c.validate(), Err(ConfigError::Mem { .. })));
        c.mem_mib = 16 * 1024;
        c.validate().unwrap();
    }

    #[test]
    fn cmdline_carries_the_command() {
        let mut c = cfg();
        c.command = vec!["sh".into(), "-c".into(), "exit 7".into()];
        let s = build_cmdline(
            &c,
            CpuTemplate::Interpreted,
            Some(2_000_000),
            &["virtio_mmio.device=4K@0xd0000000:5".into()],
            &[],
        )
        .unwrap();
        assert!(s.contains("nopv") && s.contains("lpj=80000000") && s.contains("root=/dev/vda"));
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 -- vmm.cmd="));
        let enc = s.rsplit("vmm.cmd=").next().unwrap();
        let argv = guest_abi::cmdline::decode_command(enc.as_bytes()).unwrap();
        assert_eq!(argv, [b"sh".to_vec(), b"-c".to_vec(), b"exit 7".to_vec()]);
    }

    #[test]
    fn a_command_started_by_the_agent_leaves_the_cmdline_alone() {
        let mut c = cfg();
        c.start_by_agent = true;
        let line = |c: &VmConfig| build_cmdline(c, CpuTemplate::Interpreted, None, &[], &[]);
        let shell = line(&c).unwrap();
        c.command = vec!["uname".into(), "-a".into()];
        let with_command = line(&c).unwrap();
        assert_eq!(shell, with_command, "one warm image serves every command");
        assert!(
            with_command.ends_with(" -- vmm.start=agent") && with_command.contains("loglevel=2")
        );
        c.ephemeral = true;
        assert!(line(&c)
            .unwrap()
            .ends_with(" -- vmm.root=ephemeral vmm.start=agent"));
        assert!(!with_command.contains("vmm.cmd="));
    }

    #[test]
    fn custom_cmdline_replaces_the_default() {
        let mut c = cfg();
        c.rootfs = None;
        c.cmdline = Some("ticks".into());
        assert_eq!(
            build_cmdline(&c, CpuTemplate::Host, None, &[], &[]).unwrap(),
            "ticks"
        );
        c.command = vec!["x".repeat(3000)];
        assert!(matches!(
            build_cmdline(&c, CpuTemplate::Host, None, &[], &[]),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
    }

    #[test]
    fn net_options_parse() {
        let n: NetConfig = "tap=tap0,mac=02:00:00:00:00:07,ip=10.0.0.2/24,gw=10.0.0.1"
            .parse()
            .unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 7]));
        assert_eq!(n.ip, Some((Ipv4Addr::new(10, 0, 0, 2), 24)));
        assert_eq!(n.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
        let bare: NetConfig = "tap=t1".parse().unwrap();
        assert_eq!((bare.mac, bare.ip, bare.spec([2; 6])), (None, None, None));
        for (bad, want) in [
            ("mac=02:00:00:00:00:01", "tap=NAME is required"),
            ("tap=", "not a valid interface name"),
            ("tap=t,mac=zz", "not a MAC address"),
            ("tap=t,mac=01:00:00:00:00:01", "not a MAC address"),
            ("tap=t,ip=10.0.0.2", "ADDR/PREFIX"),
            ("tap=t,ip=10.0.0.2/40", "ADDR/PREFIX"),
            ("tap=t,gw=10.0.0.1", "needs ip="),
            ("tap=t,ip=10.0.0.2/24,gw=x", "gateway"),
            ("tap=t,speed=10", "unknown key"),
        ] {
            let e = bad.parse::<NetConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn vsock_options_parse() {
        let v: VsockConfig = "cid=3,uds=/tmp/v.sock".parse().unwrap();
        assert_eq!((v.cid, v.uds), (3, PathBuf::from("/tmp/v.sock")));
        for (bad, want) in [
            ("cid=3", "both required"),
            ("uds=/tmp/v", "both required"),
            ("cid=2,uds=/tmp/v", "reserved"),
            ("cid=4294967295,uds=/tmp/v", "reserved"),
            ("cid=x,uds=/tmp/v", "not a number"),
            ("cid=3,uds=/tmp/v,port=1", "unknown key"),
        ] {
            let e = bad.parse::<VsockConfig>().unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn one_tap_per_device() {
        let mut c = cfg();
        c.nets = vec!["tap=a".parse().unwrap(), "tap=a".parse().unwrap()];
        assert!(matches!(c.validate(), Err(ConfigError::TapTwice(t)) if t == "a"));
    }

    #[test]
    fn agent_words_follow_one_separator() {
        let mut c = cfg();
        let spec = NetSpec {
            mac: [2, 0, 0, 0, 0, 1],
            addr: Ipv4Addr::new(10, 0, 0, 2),
            prefix: 24,
            gateway: None,
        };
        let s = build_cmdline(&c, CpuTemplate::Host, None, &[], &[spec]).unwrap();
        assert!(
            s.ends_with(" -- vmm.net=02:00:00:00:00:01,10.0.0.2/24"),
            "{s}"
        );
        c.command = vec!["true".into()];
        let s = build_cmdline(&c, CpuTemplate::Host, None, &[], &[spec]).unwrap();
        assert!(
            s.contains(" -- vmm.net=02:00:00:00:00:01,10.0.0.2/24 vmm.cmd="),
            "{s}"
        );
        assert_eq!(s.matches(" -- ").count(), 1);
    }
}

//! What `vmm run` boots: its configuration, checked, and the kernel command
//! line that goes with it.

use crate::arch::cpuid::{self, CpuTemplate};
use crate::arch::layout;
use std::path::PathBuf;

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
    pub api_sock: Option<PathBuf>,
    /// The container command; empty for an interactive shell.
    pub command: Vec<String>,
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
        Ok(())
    }
}

/// The kernel command line: the caller's, or our default, plus device
/// declarations and the container command for the guest agent.
pub fn build_cmdline(
    cfg: &VmConfig,
    template: CpuTemplate,
    tsc_khz: Option<u32>,
    devices: &[String],
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
                // The TSC frequency and loops_per_jiffy (HZ=100) skip calibrations
                // that an interpreted kernel cannot do against the PIT in time.
                parts.push(format!("tsc_early_khz={khz} lpj={}", u64::from(khz) * 10));
            }
            if template == CpuTemplate::Interpreted {
                // The interpreted timer tick costs about its own period: keep ticks rare.
                parts.push("nopv highres=off nohz=on".into());
            }
            parts.extend(cpuid::linux_clearcpuid(template));
            if !cfg.command.is_empty() {
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
    if !cfg.command.is_empty() {
        parts.push(guest_abi::cmdline::encode_command(&cfg.command));
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
            api_sock: None,
            command: vec![],
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
        )
        .unwrap();
        assert!(s.contains("nopv") && s.contains("lpj=20000000") && s.contains("root=/dev/vda"));
        assert!(s.contains(" virtio_mmio.device=4K@0xd0000000:5 -- vmm.cmd="));
        let enc = s.rsplit("vmm.cmd=").next().unwrap();
        let argv = guest_abi::cmdline::decode_command(enc.as_bytes()).unwrap();
        assert_eq!(argv, [b"sh".to_vec(), b"-c".to_vec(), b"exit 7".to_vec()]);
    }

    #[test]
    fn custom_cmdline_replaces_the_default() {
        let mut c = cfg();
        c.rootfs = None;
        c.cmdline = Some("ticks".into());
        assert_eq!(
            build_cmdline(&c, CpuTemplate::Host, None, &[]).unwrap(),
            "ticks"
        );
        c.command = vec!["x".repeat(3000)];
        assert!(matches!(
            build_cmdline(&c, CpuTemplate::Host, None, &[]),
            Err(ConfigError::CmdlineTooLong { .. })
        ));
    }
}

//! Whether this host can run an image's VM: CPU vendor, CPU features the
//! guest was given, memory. Pure checks, unit-tested on their own.

use snapshot::Header;

use crate::state::MachineState;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("image is for {what} '{image}', this host is '{host}'")]
    Mismatch {
        what: &'static str,
        image: String,
        host: String,
    },
    #[error(
        "the image's VM needs {need_mib} MiB of memory, this host has {have_mib} MiB available"
    )]
    TooLittleMemory { need_mib: u64, have_mib: u64 },
    #[error("the image's guest saw CPUID {leaf:#x}.{reg} bit {bit}, which this host's KVM does not offer")]
    MissingCpuFeature {
        leaf: u32,
        reg: &'static str,
        bit: u32,
    },
}

/// This host's CPU vendor and (family, model, stepping).
pub fn host_cpu() -> (String, (u32, u32, u32)) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let num = |k: &str| field(k).parse().unwrap_or(0);
    (
        field("vendor_id"),
        (num("cpu family"), num("model\t"), num("stepping")),
    )
}

/// Checks that this host can run the image's VM. `supported` is KVM's
/// supported CPUID here.
pub fn check(
    header: &Header,
    state: &MachineState,
    supported: &[kvm_bindings::kvm_cpuid_entry2],
) -> Result<(), HostError> {
    let (vendor, _) = host_cpu();
    if header.cpu_vendor != vendor {
        return Err(HostError::Mismatch {
            what: "CPU vendor",
            image: header.cpu_vendor.clone(),
            host: vendor,
        });
    }
    if header.arch != "x86_64" {
        return Err(HostError::Mismatch {
            what: "architecture",
            image: header.arch.clone(),
            host: "x86_64".into(),
        });
    }
    if let Some(v) = state.vcpus.first() {
        if let Some((leaf, reg, bit)) = missing_cpuid_feature(&v.cpuid, supported) {
            return Err(HostError::MissingCpuFeature { leaf, reg, bit });
        }
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(have_mib) = available_mib(&meminfo) {
        if have_mib < state.config.mem_mib {
            return Err(HostError::TooLittleMemory {
                need_mib: state.config.mem_mib,
                have_mib,
            });
        }
    }
    Ok(())
}

/// The first feature (leaf, register, bit) the image's guest was given that
/// `host` (KVM's supported CPUID) lacks, among the feature leaves 1, 7 and
/// 0x8000_0001.
fn missing_cpuid_feature(
    image: &[kvm_bindings::kvm_cpuid_entry2],
    host: &[kvm_bindings::kvm_cpuid_entry2],
) -> Option<(u32, &'static str, u32)> {
    let find = |leaf: u32| host.iter().find(|e| e.function == leaf && e.index == 0);
    for e in image.iter().filter(|e| {
        (e.function == 1 || e.function == 7 || e.function == 0x8000_0001) && e.index == 0
    }) {
        let Some(have) = find(e.function) else {
            continue;
        };
        for (reg, want, have) in [
            ("ebx", e.ebx, have.ebx),
            ("ecx", e.ecx, have.ecx),
            ("edx", e.edx, have.edx),
        ] {
            // Not features: leaf 1 EBX is topology; some leaf-1 ECX/EDX bits
            // are set per vCPU by KVM or by our template (OSXSAVE, x2APIC,
            // TSC deadline, hypervisor, APIC, HTT), and OSPKE by the guest.
            let ignore = match (e.function, reg) {
                (1, "ebx") => u32::MAX,
                (1, "ecx") => (1 << 27) | (1 << 31) | (1 << 21) | (1 << 24),
                (1, "edx") => (1 << 9) | (1 << 28),
                (7, "ecx") => 1 << 4,
                _ => 0,
            };
            let missing = want & !have & !ignore;
            if missing != 0 {
                return Some((e.function, reg, missing.trailing_zeros()));
            }
        }
    }
    None
}

/// MemAvailable + SwapFree from /proc/meminfo, in MiB; None if unreadable.
fn available_mib(meminfo: &str) -> Option<u64> {
    let kib = |k: &str| -> Option<u64> {
        meminfo
            .lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((kib("MemAvailable:")? + kib("SwapFree:").unwrap_or(0)) / 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn leaf(function: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn a_feature_the_host_lacks_is_named() {
        let host = [leaf(1, 0, 0x8000_0001, 0x0780_0000), leaf(7, 0x9, 0, 0)];
        let same = [
            leaf(1, 0x0102_0800, 0x8000_0001, 0x0780_0000),
            leaf(7, 0x1, 0, 0),
        ];
        assert_eq!(missing_cpuid_feature(&same, &host), None);
        // AVX2 (7.ebx bit 5) was given to the guest, this host lacks it.
        let avx2 = [leaf(7, 0x21, 0, 0)];
        assert_eq!(missing_cpuid_feature(&avx2, &host), Some((7, "ebx", 5)));
        // Bits our template or KVM set per vCPU are not features.
        let template = [leaf(
            1,
            0xffff_ffff,
            0x8000_0001 | (1 << 27),
            (1 << 28) | (1 << 9),
        )];
        assert_eq!(missing_cpuid_feature(&template, &host), None);
        // A leaf the host does not list is not compared.
        assert_eq!(missing_cpuid_feature(&[leaf(0xd, 7, 7, 7)], &host), None);
    }

    #[test]
    fn available_memory_counts_swap() {
        let m = "MemTotal: 100 kB\nMemAvailable:    2097152 kB\nSwapFree: 1048576 kB\n";
        assert_eq!(available_mib(m), Some(3072));
        assert_eq!(available_mib("MemTotal: 1 kB\n"), None);
    }
}

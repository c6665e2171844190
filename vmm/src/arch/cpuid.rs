//! Builds each vCPU's CPUID from what KVM supports, through a CPU template.
//!
//! On hosts whose KVM interprets guest kernel code (no VT-x/AMD-V behind
//! `/dev/kvm`), the instruction emulator cannot run a number of instructions
//! that Linux uses whenever CPUID advertises them. The `Interpreted` template
//! hides those, so the guest kernel takes its plain code paths. On a host with
//! hardware virtualization the `Host` template passes features through.

use kvm_bindings::kvm_cpuid_entry2;

/// Which features the guest may see.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuTemplate {
    /// KVM's supported set, minus what a VM must never see (VMX/SVM, monitor).
    Host,
    /// Additionally hides what KVM's instruction emulator cannot execute.
    Interpreted,
}

impl CpuTemplate {
    /// Picks the template for this host: `Interpreted` when the host runs KVM
    /// without hardware virtualization (the `kvm_pvm` module, or a CPU with
    /// neither VMX nor SVM).
    pub fn detect() -> Self {
        if std::path::Path::new("/sys/module/kvm_pvm").exists() {
            return CpuTemplate::Interpreted;
        }
        match std::fs::read_to_string("/proc/cpuinfo") {
            Ok(info) => {
                let hw = info
                    .lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
                if hw {
                    CpuTemplate::Host
                } else {
                    CpuTemplate::Interpreted
                }
            }
            Err(_) => CpuTemplate::Host,
        }
    }
}

/// A (leaf, register, bit) to clear.
#[derive(Clone, Copy)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

const fn bit(leaf: u32, reg: Reg, bit: u32) -> (u32, Reg, u32) {
    (leaf, reg, bit)
}

/// Never shown to a guest.
const ALWAYS_HIDDEN: &[(u32, Reg, u32)] = &[
    bit(1, Reg::Ecx, 3),           // monitor/mwait
    bit(1, Reg::Ecx, 5),           // vmx
    bit(1, Reg::Ecx, 15),          // pdcm (perf capabilities MSR)
    bit(0x8000_0001, Reg::Ecx, 2), // svm
];

/// Hidden when guest kernel code is interpreted: instructions KVM's emulator
/// gives up on (measured; see shared/PLATFORM.md), and what depends on them.
const INTERPRETED_HIDDEN: &[(u32, Reg, u32)] = &[
    bit(1, Reg::Ecx, 12),           // fma (needs xsave)
    bit(1, Reg::Ecx, 13),           // cmpxchg16b
    bit(1, Reg::Ecx, 23),           // popcnt
    bit(1, Reg::Ecx, 26),           // xsave
    bit(1, Reg::Ecx, 27),           // osxsave
    bit(1, Reg::Ecx, 28),           // avx
    bit(1, Reg::Ecx, 29),           // f16c
    bit(1, Reg::Ecx, 30),           // rdrand
    bit(7, Reg::Ebx, 0),            // fsgsbase
    bit(7, Reg::Ebx, 3),            // bmi1
    bit(7, Reg::Ebx, 4),            // hle
    bit(7, Reg::Ebx, 5),            // avx2
    bit(7, Reg::Ebx, 8),            // bmi2
    bit(7, Reg::Ebx, 10),           // invpcid
    bit(7, Reg::Ebx, 11),           // rtm
    bit(7, Reg::Ebx, 16),           // avx512f
    bit(7, Reg::Ebx, 17),           // avx512dq
    bit(7, Reg::Ebx, 18),           // rdseed
    bit(7, Reg::Ebx, 20),           // smap
    bit(7, Reg::Ebx, 21),           // avx512ifma
    bit(7, Reg::Ebx, 23),           // clflushopt
    bit(7, Reg::Ebx, 24),           // clwb
    bit(7, Reg::Ebx, 26),           // avx512pf
    bit(7, Reg::Ebx, 27),           // avx512er
    bit(7, Reg::Ebx, 28),           // avx512cd
    bit(7, Reg::Ebx, 30),           // avx512bw
    bit(7, Reg::Ebx, 31),           // avx512vl
    bit(7, Reg::Ecx, 1),            // avx512vbmi
    bit(7, Reg::Ecx, 2),            // umip
    bit(7, Reg::Ecx, 3),            // pku
    bit(7, Reg::Ecx, 4),            // ospke
    bit(7, Reg::Ecx, 5),            // waitpkg
    bit(7, Reg::Ecx, 6),            // avx512vbmi2
    bit(7, Reg::Ecx, 8),            // gfni
    bit(7, Reg::Ecx, 9),            // vaes
    bit(7, Reg::Ecx, 10),           // vpclmulqdq
    bit(7, Reg::Ecx, 11),           // avx512vnni
    bit(7, Reg::Ecx, 12),           // avx512bitalg
    bit(7, Reg::Ecx, 14),           // avx512vpopcntdq
    bit(7, Reg::Ecx, 16),           // la57
    bit(7, Reg::Ecx, 22),           // rdpid
    bit(7, Reg::Edx, 8),            // avx512vp2intersect
    bit(7, Reg::Edx, 14),           // serialize
    bit(7, Reg::Edx, 22),           // amx-bf16
    bit(7, Reg::Edx, 24),           // amx-tile
    bit(7, Reg::Edx, 25),           // amx-int8
    bit(0x8000_0001, Reg::Ecx, 5),  // abm/lzcnt
    bit(0x8000_0001, Reg::Ecx, 21), // tbm
    bit(0x8000_0001, Reg::Edx, 27), // rdtscp
];

/// Linux's capability word for a CPUID (leaf, register), as in
/// arch/x86/include/asm/cpufeatures.h.
fn linux_cap_word(leaf: u32, reg: Reg) -> Option<u32> {
    match (leaf, reg) {
        (1, Reg::Edx) => Some(0),
        (0x8000_0001, Reg::Edx) => Some(1),
        (1, Reg::Ecx) => Some(4),
        (0x8000_0001, Reg::Ecx) => Some(6),
        (7, Reg::Ebx) => Some(9),
        (7, Reg::Ecx) => Some(16),
        (7, Reg::Edx) => Some(18),
        _ => None,
    }
}

/// A `clearcpuid=` kernel parameter that hides the template's features from a
/// Linux guest's kernel.
///
/// Needed because on some hosts without hardware virtualization the guest's
/// CPUID instruction is not intercepted: the guest sees the host's CPUID, not
/// the table set with KVM_SET_CPUID2 (measured here: Linux reported XSAVE and
/// AVX-512 state that the filtered table did not advertise, then died on
/// `xrstor`). The kernel clears these capabilities before it patches its
/// code, so it never uses them; user space runs natively and may.
pub fn linux_clearcpuid(template: CpuTemplate) -> Option<String> {
    if template != CpuTemplate::Interpreted {
        return None;
    }
    let bits: Vec<String> = KERNEL_CLEARCPUID
        .iter()
        .filter_map(|&(leaf, reg, b)| linux_cap_word(leaf, reg).map(|w| (w * 32 + b).to_string()))
        .collect();
    Some(format!("clearcpuid={}", bits.join(",")))
}

/// The features `clearcpuid=` must name. Linux parses that parameter into a
/// 128-byte buffer, so the whole of INTERPRETED_HIDDEN does not fit (it was
/// cut off mid-list, measured). This is the shortest list that still keeps
/// the kernel off every instruction the emulator refuses: the kernel drops
/// the features that depend on XSAVE (AVX, AVX-512, AMX, FMA...) by itself
/// (cpuid_deps), and the vector extensions are never used in kernel mode
/// without them.
const KERNEL_CLEARCPUID: &[(u32, Reg, u32)] = &[
    bit(1, Reg::Ecx, 26),           // xsave
    bit(1, Reg::Ecx, 13),           // cmpxchg16b
    bit(1, Reg::Ecx, 23),           // popcnt
    bit(1, Reg::Ecx, 30),           // rdrand
    bit(7, Reg::Ebx, 18),           // rdseed
    bit(7, Reg::Ebx, 0),            // fsgsbase
    bit(7, Reg::Ebx, 3),            // bmi1
    bit(7, Reg::Ebx, 8),            // bmi2
    bit(7, Reg::Ebx, 10),           // invpcid
    bit(7, Reg::Ebx, 20),           // smap
    bit(7, Reg::Ebx, 23),           // clflushopt
    bit(7, Reg::Ebx, 24),           // clwb
    bit(7, Reg::Ecx, 2),            // umip
    bit(7, Reg::Ecx, 3),            // pku
    bit(7, Reg::Ecx, 16),           // la57
    bit(7, Reg::Ecx, 22),           // rdpid
    bit(7, Reg::Edx, 14),           // serialize
    bit(0x8000_0001, Reg::Ecx, 5),  // abm/lzcnt
    bit(0x8000_0001, Reg::Edx, 27), // rdtscp
    bit(7, Reg::Ebx, 4),            // hle
    bit(7, Reg::Ebx, 11),           // rtm
    bit(7, Reg::Ecx, 5),            // waitpkg
];

/// Topology facts written into the guest's CPUID.
#[derive(Clone, Copy, Debug)]
pub struct VcpuTopology {
    pub apic_id: u8,
    pub vcpu_count: u8,
}

/// Filters KVM's supported CPUID entries for one vCPU.
pub fn filter_cpuid(
    supported: &[kvm_cpuid_entry2],
    template: CpuTemplate,
    topo: VcpuTopology,
) -> Vec<kvm_cpuid_entry2> {
    let hide_xsave = template == CpuTemplate::Interpreted;
    let mut out: Vec<kvm_cpuid_entry2> = supported
        .iter()
        .filter(|e| !(hide_xsave && e.function == 0xd))
        .copied()
        .collect();
    let mut hidden: Vec<(u32, Reg, u32)> = ALWAYS_HIDDEN.to_vec();
    if template == CpuTemplate::Interpreted {
        hidden.extend_from_slice(INTERPRETED_HIDDEN);
    }
    for e in out.iter_mut() {
        for &(leaf, reg, b) in &hidden {
            // Leaf 7's feature bits live in subleaf 0 only.
            if e.function != leaf || (leaf == 7 && e.index != 0) {
                continue;
            }
            let r = match reg {
                Reg::Ebx => &mut e.ebx,
                Reg::Ecx => &mut e.ecx,
                Reg::Edx => &mut e.edx,
            };
            *r &= !(1 << b);
        }
        match e.function {
            1 => {
                // Initial APIC id, logical processor count, CLFLUSH line size (8 * 8 bytes).
                e.ebx = (u32::from(topo.apic_id) << 24)
                    | (u32::from(topo.vcpu_count) << 16)
                    | (8 << 8)
                    | (e.ebx & 0xff);
                e.ecx |= 1 << 31; // hypervisor present
                if topo.vcpu_count > 1 {
                    e.edx |= 1 << 28; // htt: more than one logical processor
                } else {
                    e.edx &= !(1 << 28);
                }
            }
            // Extended topology: every level reports this vCPU's x2APIC id.
            0xb | 0x1f => e.edx = u32::from(topo.apic_id),
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn find(v: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *v.iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    fn all_ones() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(1, 0, !0, !0, !0),
            entry(7, 0, !0, !0, !0),
            entry(7, 1, !0, !0, !0),
            entry(0xd, 0, !0, !0, !0),
            entry(0xb, 0, 0, 0, 0),
            entry(0x8000_0001, 0, !0, !0, !0),
        ]
    }

    const TOPO: VcpuTopology = VcpuTopology {
        apic_id: 3,
        vcpu_count: 4,
    };

    #[test]
    fn interpreted_hides_what_the_emulator_cannot_run() {
        let v = filter_cpuid(&all_ones(), CpuTemplate::Interpreted, TOPO);
        let l1 = find(&v, 1, 0);
        for b in [13, 23, 26, 27, 28, 30, 5, 3] {
            assert_eq!(l1.ecx & (1 << b), 0, "leaf 1 ecx bit {b}");
        }
        let l7 = find(&v, 7, 0);
        for b in [0, 3, 8, 18, 20] {
            assert_eq!(l7.ebx & (1 << b), 0, "leaf 7 ebx bit {b}");
        }
        assert_eq!(l7.ecx & (1 << 22), 0, "rdpid");
        // Subleaf 1 of leaf 7 is a different register set: untouched.
        assert_eq!(find(&v, 7, 1).ebx, !0);
        let ext = find(&v, 0x8000_0001, 0);
        assert_eq!(ext.ecx & (1 << 5), 0, "abm");
        assert_eq!(ext.ecx & (1 << 2), 0, "svm");
        assert!(v.iter().all(|e| e.function != 0xd), "xsave leaf dropped");
    }

    #[test]
    fn clearcpuid_uses_linux_bit_numbers() {
        assert_eq!(linux_clearcpuid(CpuTemplate::Host), None);
        let p = linux_clearcpuid(CpuTemplate::Interpreted).unwrap();
        let bits: Vec<u32> = p
            .strip_prefix("clearcpuid=")
            .unwrap()
            .split(',')
            .map(|b| b.parse().unwrap())
            .collect();
        // X86_FEATURE_XSAVE (4*32+26), CX16 (4*32+13), POPCNT (4*32+23),
        // FSGSBASE (9*32+0), SMAP (9*32+20), RDPID (16*32+22), ABM (6*32+5), RDTSCP (1*32+27).
        for b in [154, 141, 151, 288, 308, 534, 197, 59] {
            assert!(bits.contains(&b), "{b} missing from {p}");
        }
        // Linux copies the parameter into a 128-byte buffer.
        assert!(p.len() < 128, "{} bytes: {p}", p.len());
        // Every name on the short list is hidden from CPUID too.
        for &(leaf, reg, b) in KERNEL_CLEARCPUID {
            assert!(INTERPRETED_HIDDEN
                .iter()
                .any(|&(l, r, x)| l == leaf && r as u8 == reg as u8 && x == b));
        }
    }

    #[test]
    fn host_template_keeps_features_but_never_vmx() {
        let v = filter_cpuid(&all_ones(), CpuTemplate::Host, TOPO);
        let l1 = find(&v, 1, 0);
        assert_ne!(l1.ecx & (1 << 26), 0, "xsave kept");
        assert_eq!(l1.ecx & (1 << 5), 0, "vmx hidden");
        assert!(v.iter().any(|e| e.function == 0xd));
    }

    #[test]
    fn topology_is_written() {
        let v = filter_cpuid(&all_ones(), CpuTemplate::Host, TOPO);
        let l1 = find(&v, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 31), 0);
        assert_ne!(l1.edx & (1 << 28), 0);
        assert_eq!(find(&v, 0xb, 0).edx, 3);
        let one = filter_cpuid(
            &all_ones(),
            CpuTemplate::Host,
            VcpuTopology {
                apic_id: 0,
                vcpu_count: 1,
            },
        );
        assert_eq!(find(&one, 1, 0).edx & (1 << 28), 0);
    }
}

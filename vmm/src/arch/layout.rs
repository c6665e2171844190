//! Guest physical memory layout for x86_64.
//!
//! The low addresses follow the Linux boot protocol as Firecracker lays it out,
//! so an ELF kernel that boots under one boots under the other.

/// The boot GDT, and an empty IDT right after it.
pub const BOOT_GDT_START: u64 = 0x500;
pub const BOOT_IDT_START: u64 = 0x520;
/// Linux `boot_params` ("zero page"); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack of the boot vCPU (grows down, below the page tables).
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the first 1 GiB: PML4, PDPT, PD.
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Kernel command line; Linux on x86 reads at most 2048 bytes.
pub const CMDLINE_START: u64 = 0x20000;
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// The Intel MP table sits in the last KiB of base memory, where Linux scans for it.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of the low RAM reported in e820 (the MP table area above it is reserved).
pub const EBDA_START: u64 = 0x9fc00;
/// Kernels load at 1 MiB and above.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit hole for MMIO devices, LAPIC and IOAPIC.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices, one 4 KiB window each, at the start of the hole.
pub const VIRTIO_MMIO_BASE: u64 = MMIO_GAP_START;
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI given to virtio-mmio devices (0-4 are the PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM needs three pages for the TSS and one for the identity map (real mode under VMX).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// I/O ports.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_DATA_PORT: u16 = 0x60;
pub const I8042_COMMAND_PORT: u16 = 0x64;
pub const I8042_IRQ: u32 = 1;
/// The CMOS RTC: index at 0x70, data at 0x71.
pub const RTC_PORT: u16 = 0x70;
/// The guest agent's ports (exit status, start milestone).
pub use guest_abi::ports::{PROGRESS_PORT, STATUS_PORT};

/// Largest guest memory we accept, and the smallest that boots anything useful.
pub const MAX_MEM_MIB: u64 = 64 * 1024;
pub const MIN_MEM_MIB: u64 = 16;
pub const MAX_VCPUS: u8 = 8;

/// The guest RAM regions for `mem_bytes` of memory: below the MMIO hole, then above 4 GiB.
pub fn ram_regions(mem_bytes: u64) -> Vec<(u64, u64)> {
    if mem_bytes <= MMIO_GAP_START {
        vec![(0, mem_bytes)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_bytes - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_regions(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let r = ram_regions(16 << 30);
        assert_eq!(r[0], (0, MMIO_GAP_START));
        assert_eq!(r[1].0, 1 << 32);
        assert_eq!(r[0].1 + r[1].1, 16 << 30);
    }
}

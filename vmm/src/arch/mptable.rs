//! The Intel MultiProcessor table: how a guest without ACPI finds its vCPUs,
//! its IOAPIC and how ISA interrupts are wired.

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

const MPC_SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// Interrupt lines routed 1:1 from the ISA bus to IOAPIC pins (KVM's IOAPIC has 24).
const IOAPIC_PINS: u8 = 24;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |s, b| s.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer followed by the configuration table, ready to
/// be copied to `MPTABLE_START`.
pub fn build(vcpu_count: u8) -> Vec<u8> {
    let mut entries: Vec<u8> = Vec::new();
    let mut entry_count: u16 = 0;
    for id in 0..vcpu_count {
        let mut e = [0u8; 20];
        e[0] = 0; // processor
        e[1] = id;
        e[2] = APIC_VERSION;
        e[3] = 1 | if id == 0 { 2 } else { 0 }; // enabled, bootstrap processor
        e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6
        e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // fpu, apic
        entries.extend_from_slice(&e);
        entry_count += 1;
    }
    // Bus 0: ISA.
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']);
    entry_count += 1;
    let ioapic_id = vcpu_count;
    let mut ioapic = [2u8, ioapic_id, IOAPIC_VERSION, 1, 0, 0, 0, 0];
    ioapic[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&ioapic);
    entry_count += 1;
    for irq in 0..IOAPIC_PINS {
        // I/O interrupt: INT, conforming polarity/trigger, bus 0 irq -> ioapic pin.
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    // Local interrupts: ExtINT on LINT0, NMI on LINT1, to every local APIC.
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let table_addr = MPTABLE_START + 16;
    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"VMM     "); // OEM id
    table.extend_from_slice(b"000000000000"); // product id
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0, 0, 0, 0]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp = [0u8; 16];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&(table_addr as u32).to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = MPC_SPEC_REV;
    fp[10] = checksum(&fp);

    let mut out = fp.to_vec();
    out.extend_from_slice(&table);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_processor_entries() {
        for n in [1u8, 2, 8] {
            let t = build(n);
            assert_eq!(&t[0..4], b"_MP_");
            assert_eq!(sum(&t[0..16]), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            assert_eq!(16 + len, t.len());
            assert_eq!(sum(&t[16..]), 0);
            let entries = &t[16 + 44..];
            let cpus = entries[..n as usize * 20]
                .chunks(20)
                .filter(|e| e[0] == 0)
                .count();
            assert_eq!(cpus, n as usize);
            assert_eq!(entries[3] & 2, 2, "first cpu is the BSP");
            let table_ptr = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as u64;
            assert_eq!(table_ptr, MPTABLE_START + 16);
        }
    }

    #[test]
    fn fits_below_the_bios_area() {
        assert!(MPTABLE_START + build(8).len() as u64 <= 0xa0000);
    }
}

//! Completes, in user space, the few instructions that KVM's instruction
//! emulator hands back (KVM_EXIT_INTERNAL_ERROR, emulation failure) on hosts
//! where guest kernel code is interpreted. Only instructions whose effect we
//! can reproduce exactly are handled; anything else stops the VM with the
//! instruction bytes and RIP in the error.
//!
//! This module is pure: it decodes bytes and computes addresses. The vCPU code
//! reads the bytes and applies the result.

/// An x86 general register index in ModRM/SIB encoding order (RAX=0 .. R15=15).
pub type GpReg = u8;

/// A memory operand: `[base + index*scale + disp]`, or RIP-relative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemOperand {
    pub base: Option<GpReg>,
    pub index: Option<(GpReg, u8)>,
    pub disp: i64,
    pub rip_relative: bool,
    /// FS or GS override (their bases come from the segment registers).
    pub segment: Option<Segment>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Fs,
    Gs,
}

/// What to do in place of the instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fallback {
    /// `int3`: advance RIP and inject #BP, as the CPU would (a trap).
    Int3,
    /// `fwait`/`wait`: no unmasked x87 exception can be pending; a no-op.
    Fwait,
    /// `fninit`: reset the x87 control, status and tag words.
    Fninit,
    /// `ldmxcsr m32` (also VEX `vldmxcsr`).
    Ldmxcsr(MemOperand),
    /// `stmxcsr m32` (also VEX `vstmxcsr`).
    Stmxcsr(MemOperand),
}

/// A decoded instruction: what to do and how long it was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub fallback: Fallback,
    pub len: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("instruction has no user-space fallback")]
    Unsupported,
    #[error("instruction bytes end early")]
    Truncated,
}

/// Decodes one instruction in 64-bit mode.
pub fn decode(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let mut i = 0;
    let mut rex = 0u8;
    let mut segment = None;
    let at = |i: usize| bytes.get(i).copied().ok_or(DecodeError::Truncated);
    // Legacy prefixes, then at most one REX.
    loop {
        match at(i)? {
            0x66 | 0xf2 | 0xf3 | 0x2e | 0x36 | 0x3e | 0x26 | 0x67 => i += 1,
            0x64 => {
                segment = Some(Segment::Fs);
                i += 1
            }
            0x65 => {
                segment = Some(Segment::Gs);
                i += 1
            }
            _ => break,
        }
    }
    if (0x40..=0x4f).contains(&at(i)?) {
        rex = at(i)?;
        i += 1;
    }
    let done = |fallback, len: usize| {
        Ok(Decoded {
            fallback,
            len: len as u64,
        })
    };
    match at(i)? {
        0xcc => done(Fallback::Int3, i + 1),
        0x9b => {
            // `fwait` alone; `9b db e3` is `finit` (= fwait; fninit).
            if bytes.get(i + 1..i + 3) == Some(&[0xdb, 0xe3]) {
                done(Fallback::Fninit, i + 3)
            } else {
                done(Fallback::Fwait, i + 1)
            }
        }
        0xdb if at(i + 1)? == 0xe3 => done(Fallback::Fninit, i + 2),
        0x0f if at(i + 1)? == 0xae => {
            let (op, end, reg) = modrm(bytes, i + 2, rex, segment)?;
            match (reg, op) {
                (2, Some(m)) => done(Fallback::Ldmxcsr(m), end),
                (3, Some(m)) => done(Fallback::Stmxcsr(m), end),
                _ => Err(DecodeError::Unsupported),
            }
        }
        // Two-byte VEX: c5 [R vvvv L pp], opcode map 0f.
        0xc5 => {
            let vex = at(i + 1)?;
            if at(i + 2)? != 0xae {
                return Err(DecodeError::Unsupported);
            }
            let rex_r = if vex & 0x80 == 0 { 0x44 } else { 0x40 };
            let (op, end, reg) = modrm(bytes, i + 3, rex_r, segment)?;
            match (reg, op) {
                (2, Some(m)) => done(Fallback::Ldmxcsr(m), end),
                (3, Some(m)) => done(Fallback::Stmxcsr(m), end),
                _ => Err(DecodeError::Unsupported),
            }
        }
        _ => Err(DecodeError::Unsupported),
    }
}

/// Decodes ModRM (+SIB, +displacement) at `i`. Returns the memory operand (None
/// for a register operand), the index after the instruction, and ModRM.reg.
fn modrm(
    bytes: &[u8],
    i: usize,
    rex: u8,
    segment: Option<Segment>,
) -> Result<(Option<MemOperand>, usize, u8), DecodeError> {
    let at = |i: usize| bytes.get(i).copied().ok_or(DecodeError::Truncated);
    let m = at(i)?;
    let (md, reg, rm) = (m >> 6, (m >> 3) & 7, m & 7);
    let rex_b = (rex & 1) << 3;
    let rex_x = ((rex >> 1) & 1) << 3;
    let mut pos = i + 1;
    if md == 3 {
        return Ok((None, pos, reg));
    }
    let mut op = MemOperand {
        base: None,
        index: None,
        disp: 0,
        rip_relative: false,
        segment,
    };
    let mut disp_len = match md {
        1 => 1,
        2 => 4,
        _ => 0,
    };
    if rm == 4 {
        let sib = at(pos)?;
        pos += 1;
        let (scale, idx, base) = (1u8 << (sib >> 6), ((sib >> 3) & 7) | rex_x, (sib & 7));
        if idx != 4 {
            op.index = Some((idx, scale));
        }
        if base == 5 && md == 0 {
            disp_len = 4;
        } else {
            op.base = Some(base | rex_b);
        }
    } else if rm == 5 && md == 0 {
        op.rip_relative = true;
        disp_len = 4;
    } else {
        op.base = Some(rm | rex_b);
    }
    op.disp = match disp_len {
        1 => i64::from(at(pos)? as i8),
        4 => {
            let b = bytes.get(pos..pos + 4).ok_or(DecodeError::Truncated)?;
            i64::from(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        _ => 0,
    };
    pos += disp_len;
    Ok((Some(op), pos, reg))
}

/// The general registers in encoding order, for address computation.
pub fn gp_regs(r: &kvm_bindings::kvm_regs) -> [u64; 16] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ]
}

/// The linear address a memory operand refers to.
pub fn effective_address(
    op: &MemOperand,
    gp: &[u64; 16],
    next_rip: u64,
    fs_base: u64,
    gs_base: u64,
) -> u64 {
    let mut a = op.disp as u64;
    if op.rip_relative {
        a = a.wrapping_add(next_rip);
    }
    if let Some(b) = op.base {
        a = a.wrapping_add(gp[usize::from(b & 15)]);
    }
    if let Some((x, s)) = op.index {
        a = a.wrapping_add(gp[usize::from(x & 15)].wrapping_mul(u64::from(s)));
    }
    match op.segment {
        Some(Segment::Fs) => a.wrapping_add(fs_base),
        Some(Segment::Gs) => a.wrapping_add(gs_base),
        None => a,
    }
}

/// Translates a linear address through 4-level x86_64 page tables rooted at
/// `cr3`, reading page-table entries with `read_u64` (a guest-physical read).
/// Returns the guest-physical address, or None if it is not mapped.
pub fn walk_page_tables(
    cr3: u64,
    linear: u64,
    mut read_u64: impl FnMut(u64) -> Option<u64>,
) -> Option<u64> {
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut table = cr3 & ADDR;
    for level in (0..4).rev() {
        let shift = 12 + 9 * level;
        let idx = (linear >> shift) & 0x1ff;
        let e = read_u64(table + idx * 8)?;
        if e & PRESENT == 0 {
            return None;
        }
        if level == 0 || (e & HUGE != 0 && (level == 1 || level == 2)) {
            let page_mask = (1u64 << shift) - 1;
            return Some((e & ADDR & !page_mask) | (linear & page_mask));
        }
        table = e & ADDR;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(b: &[u8]) -> Decoded {
        decode(b).unwrap()
    }

    #[test]
    fn simple_instructions() {
        assert_eq!(
            d(&[0xcc, 0x90]),
            Decoded {
                fallback: Fallback::Int3,
                len: 1
            }
        );
        assert_eq!(
            d(&[0x9b, 0x90]),
            Decoded {
                fallback: Fallback::Fwait,
                len: 1
            }
        );
        assert_eq!(
            d(&[0xdb, 0xe3]),
            Decoded {
                fallback: Fallback::Fninit,
                len: 2
            }
        );
        assert_eq!(
            d(&[0x9b, 0xdb, 0xe3]),
            Decoded {
                fallback: Fallback::Fninit,
                len: 3
            }
        );
    }

    #[test]
    fn ldmxcsr_forms() {
        // ldmxcsr (%rax)
        let x = d(&[0x0f, 0xae, 0x10]);
        assert_eq!(x.len, 3);
        assert_eq!(
            x.fallback,
            Fallback::Ldmxcsr(MemOperand {
                base: Some(0),
                index: None,
                disp: 0,
                rip_relative: false,
                segment: None
            })
        );
        // ldmxcsr 0x8(%rsp): ModRM 0x54 (md=1, reg=2, rm=4) SIB 0x24, disp8
        let x = d(&[0x0f, 0xae, 0x54, 0x24, 0x08]);
        assert_eq!(x.len, 5);
        let Fallback::Ldmxcsr(m) = x.fallback else {
            panic!()
        };
        assert_eq!((m.base, m.index, m.disp), (Some(4), None, 8));
        // stmxcsr -0x4(%r13): REX.B, ModRM 0x5d (md=1 reg=3 rm=5)
        let x = d(&[0x41, 0x0f, 0xae, 0x5d, 0xfc]);
        let Fallback::Stmxcsr(m) = x.fallback else {
            panic!()
        };
        assert_eq!((m.base, m.disp, x.len), (Some(13), -4, 5));
        // ldmxcsr 0x1234(%rip)
        let x = d(&[0x0f, 0xae, 0x15, 0x34, 0x12, 0, 0]);
        let Fallback::Ldmxcsr(m) = x.fallback else {
            panic!()
        };
        assert!(m.rip_relative);
        assert_eq!((m.disp, x.len), (0x1234, 7));
        // ldmxcsr (%rax,%rbx,4) with gs override
        let x = d(&[0x65, 0x0f, 0xae, 0x14, 0x98]);
        let Fallback::Ldmxcsr(m) = x.fallback else {
            panic!()
        };
        assert_eq!(
            (m.base, m.index, m.segment),
            (Some(0), Some((3, 4)), Some(Segment::Gs))
        );
        // vldmxcsr (%rdi): c5 f8 ae 17
        let x = d(&[0xc5, 0xf8, 0xae, 0x17]);
        assert_eq!(x.len, 4);
        assert!(matches!(
            x.fallback,
            Fallback::Ldmxcsr(MemOperand { base: Some(7), .. })
        ));
    }

    #[test]
    fn rejects_what_it_cannot_complete() {
        assert_eq!(decode(&[0x0f, 0x01, 0xd0]), Err(DecodeError::Unsupported)); // xgetbv
        assert_eq!(decode(&[0x0f, 0xae, 0x20]), Err(DecodeError::Unsupported)); // xsave
        assert_eq!(decode(&[0x0f, 0xae, 0xd0]), Err(DecodeError::Unsupported)); // register form
        assert_eq!(decode(&[0x0f, 0xae]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[]), Err(DecodeError::Truncated));
        assert_eq!(decode(&[0x66; 20]), Err(DecodeError::Truncated));
    }

    #[test]
    fn effective_addresses() {
        let mut gp = [0u64; 16];
        gp[0] = 0x1000;
        gp[3] = 0x10;
        let op = MemOperand {
            base: Some(0),
            index: Some((3, 4)),
            disp: -8,
            rip_relative: false,
            segment: None,
        };
        assert_eq!(effective_address(&op, &gp, 0, 0, 0), 0x1000 + 0x40 - 8);
        let rip = MemOperand {
            base: None,
            index: None,
            disp: 0x10,
            rip_relative: true,
            segment: Some(Segment::Gs),
        };
        assert_eq!(effective_address(&rip, &gp, 0x2000, 0, 0x5000), 0x7010);
    }

    #[test]
    fn page_walk_4k_and_2m() {
        use std::collections::HashMap;
        let mut m: HashMap<u64, u64> = HashMap::new();
        // cr3=0x1000 -> PDPT 0x2000 -> PD 0x3000; PD[1] = 2 MiB page at 0x40_0000;
        // PD[0] -> PT 0x4000; PT[5] -> 0x9000.
        m.insert(0x1000, 0x2003);
        m.insert(0x2000, 0x3003);
        m.insert(0x3000 + 8, 0x40_0083);
        m.insert(0x3000, 0x4003);
        m.insert(0x4000 + 5 * 8, 0x9003);
        let read = |a: u64| Some(*m.get(&a).unwrap_or(&0));
        assert_eq!(walk_page_tables(0x1000, 0x20_1234, read), Some(0x40_1234));
        assert_eq!(walk_page_tables(0x1000, 0x5123, read), Some(0x9123));
        assert_eq!(walk_page_tables(0x1000, 0x6000, read), None);
    }
}

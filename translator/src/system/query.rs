//! Instructions that read the guest's system state without changing it (system mode): the
//! descriptor-table stores `sgdt`/`sidt`/`sldt`/`str`/`smsw` and the segment queries
//! `lar`/`lsl`/`verr`/`verw`. In user mode these are copied (the host kernel's view is the
//! guest's, `Rule::UserCopy`); a kernel-mode guest must see its own tables.
//!
//! With CR4.UMIP the stores raise #GP(0) at CPL3 (the hybrid engine relies on it: user code
//! under KVM must not read hbt's descriptor tables, and the kernel emulates what programs may
//! see). The queries never fault on a bad selector: they clear ZF, as the CPU does.

use super::descriptors::{self, Failure};
use crate::emulate::regs::{read_gpr, write_gpr};
use crate::emulate::GuestMemory;
use crate::exit::vector;
use crate::state::{flags, GuestState};
use iced_x86::{Instruction, Mnemonic, OpKind};

/// Performs one of this file's instructions on `s` (RIP already past it).
pub fn execute(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Failure> {
    let table_store = matches!(
        instr.mnemonic(),
        Mnemonic::Sgdt | Mnemonic::Sidt | Mnemonic::Sldt | Mnemonic::Str | Mnemonic::Smsw
    );
    if table_store && s.cpl == crate::state::Cpl::User && s.cr4 & super::CR4_UMIP != 0 {
        return Err(crate::exit::GuestException::gp(0).into());
    }
    match instr.mnemonic() {
        Mnemonic::Sgdt | Mnemonic::Sidt => {
            let t = if instr.mnemonic() == Mnemonic::Sgdt {
                s.sys.gdtr
            } else {
                s.sys.idtr
            };
            let mut image = [0u8; 10];
            image[..2].copy_from_slice(&t.limit.to_le_bytes());
            image[2..].copy_from_slice(&t.base.to_le_bytes());
            mem.write(super::mem_va(s, instr, 0), &image)?;
        }
        Mnemonic::Sldt => store(s, instr, mem, s.sys.ldtr.selector as u64)?,
        Mnemonic::Str => store(s, instr, mem, s.sys.tr.selector as u64)?,
        Mnemonic::Smsw => store(s, instr, mem, s.cr0)?,
        Mnemonic::Lar | Mnemonic::Lsl => {
            let selector = selector_operand(s, instr, mem, 1)?;
            match query(s, mem, selector, instr.mnemonic())? {
                Some(value) => {
                    s.rflags |= flags::ZF;
                    let dst = instr.op0_register();
                    // A 16-bit destination keeps its upper bits; 32 and 64 are zero-extended.
                    write_gpr(s, dst, value & if dst.size() == 2 { 0xffff } else { 0xffff_ffff });
                }
                None => s.rflags &= !flags::ZF,
            }
        }
        Mnemonic::Verr | Mnemonic::Verw => {
            let selector = selector_operand(s, instr, mem, 0)?;
            let ok = query(s, mem, selector, instr.mnemonic())?.is_some();
            s.rflags = if ok {
                s.rflags | flags::ZF
            } else {
                s.rflags & !flags::ZF
            };
        }
        other => return Err(Failure::Unsupported(format!("{other:?} is not a system query"))),
    }
    Ok(())
}

/// `sldt`/`str`/`smsw`: 16 bits to memory; to a register, zero-extended to its size.
fn store(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory, value: u64) -> Result<(), Failure> {
    match instr.op0_kind() {
        OpKind::Register => {
            let dst = instr.op0_register();
            let mask = match dst.size() {
                2 => 0xffff,
                4 => 0xffff_ffff,
                _ => u64::MAX,
            };
            write_gpr(s, dst, value & mask);
        }
        _ => mem.write(super::mem_va(s, instr, 0), &(value as u16).to_le_bytes())?,
    }
    Ok(())
}

fn selector_operand(
    s: &GuestState,
    instr: &Instruction,
    mem: &mut dyn GuestMemory,
    operand: u32,
) -> Result<u16, Failure> {
    Ok(match instr.op_kind(operand) {
        OpKind::Register => read_gpr(s, instr.op_register(operand)) as u16,
        _ => mem.read_le(super::mem_va(s, instr, operand), 2)? as u16,
    })
}

/// The value `lar` (access rights) or `lsl` (limit) loads, or for `verr`/`verw` any value when
/// the segment is readable/writable; None when the CPU would clear ZF.
fn query(s: &GuestState, mem: &mut dyn GuestMemory, selector: u16, what: Mnemonic) -> Result<Option<u64>, Failure> {
    if selector & 0xfffc == 0 {
        return Ok(None);
    }
    let d = match descriptors::read(s, mem, selector) {
        Ok(d) => d,
        // Beyond the table's limit: not an error for a query.
        Err(e) if e.vector == vector::GP => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let cpl = s.cpl as u16;
    let rpl = selector & 3;
    // Conforming code is visible from any privilege level; everything else needs DPL ≥
    // max(CPL, RPL).
    if !d.conforming() && d.dpl() < cpl.max(rpl) {
        return Ok(None);
    }
    if !d.code_or_data() {
        // 64-bit mode system types: LDT (2), available/busy TSS (9/11); `lar` also sees call
        // gates (12). Queries never see interrupt or trap gates.
        let valid = match d.kind() {
            2 | 9 | 11 => matches!(what, Mnemonic::Lar | Mnemonic::Lsl),
            12 => what == Mnemonic::Lar,
            _ => false,
        };
        if !valid {
            return Ok(None);
        }
    }
    Ok(match what {
        // The SDM masks the second doubleword with 00FxFF00H, bits 19:16 undefined; an Intel
        // Xeon leaves the limit's bits 19:16 there (`lar` of Linux's 0x2b natively:
        // 0xcff300), as a user-mode guest sees (it runs `lar` itself).
        Mnemonic::Lar => Some((d.0 >> 32) & 0x00ff_ff00),
        Mnemonic::Lsl => Some(d.limit() as u64),
        Mnemonic::Verr => (d.code_or_data() && (!d.code() || d.readable_or_writable())).then_some(0),
        _ => (d.code_or_data() && !d.code() && d.readable_or_writable()).then_some(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::GuestException;

    /// A GDT at 0 with Linux's user data segment at 0x2b (every other access: #PF).
    struct Gdt;

    impl GuestMemory for Gdt {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            let entry: u64 = if va == 0x28 { 0x00cf_f300_0000_ffff } else { 0 };
            buf.copy_from_slice(&entry.to_le_bytes()[..buf.len()]);
            Ok(())
        }
        fn write(&mut self, va: u64, _: &[u8]) -> Result<(), GuestException> {
            Err(GuestException::page_fault(va, 6))
        }
    }

    #[test]
    fn lar_keeps_the_limit_bits_19_16_as_the_cpu_does() {
        let mut s = GuestState {
            cpl: crate::state::Cpl::User,
            ..GuestState::default()
        };
        s.sys.gdtr.limit = 0x7f;
        assert_eq!(query(&s, &mut Gdt, 0x2b, Mnemonic::Lar).ok().flatten(), Some(0xcff300));
    }
}

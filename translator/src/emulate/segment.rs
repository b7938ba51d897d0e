//! Segment-register loads and reads, and far transfers, for user-mode guests.
//!
//! In a 64-bit Linux process the descriptor tables are the host kernel's, so a user-mode guest
//! sees exactly the host's GDT: descriptor checks ask the host CPU with `lar` (which reports
//! type, DPL, presence and the L/D bits for any selector visible at CPL3) instead of keeping a
//! copy of Linux's GDT layout. Every Linux user descriptor has base 0. Segment state itself is
//! guest state (`GuestState::seg`, `fs_base`, `gs_base`); the host's FS and GS are never touched.
//!
//! Far transfers are supported to 64-bit code segments; entering compatibility mode (a 32-bit
//! code segment such as 0x23) is refused with an error, since the translator decodes 64-bit code.

use super::regs::{read_gpr, sreg_index, write_gpr};
use super::{stack_address, GuestMemory, Outcome};
use crate::cpu::vendor::{self, Quirk};
use crate::exit::{vector, Exit, GuestException};
use crate::state::{flags, gpr, GuestState};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

/// Access rights of a selector as `lar` reports them at CPL3, or None when `lar` refuses it.
fn access_rights(selector: u16) -> Option<u32> {
    let ar: u32;
    let ok: u8;
    // SAFETY: lar only reads the descriptor tables through the CPU; it has no side effects
    // beyond its destination register and ZF.
    unsafe {
        std::arch::asm!(
            "lar {ar:e}, {sel:e}",
            "setz {ok}",
            ar = out(reg) ar,
            sel = in(reg) selector as u32,
            ok = out(reg_byte) ok,
            options(nomem, nostack),
        );
    }
    (ok != 0).then_some(ar)
}

const AR_TYPE_CODE: u32 = 1 << 11;
const AR_TYPE_RW: u32 = 1 << 9;
const AR_S: u32 = 1 << 12;
const AR_P: u32 = 1 << 15;
const AR_L: u32 = 1 << 21;

fn dpl(ar: u32) -> u16 {
    ((ar >> 13) & 3) as u16
}

fn gp(selector: u16) -> GuestException {
    selector_fault(vector::GP, selector)
}

/// A segment fault (`#NP`, `#SS`, `#GP`) whose error code is the selector without its RPL.
fn selector_fault(vector: u8, selector: u16) -> GuestException {
    GuestException {
        vector,
        error_code: Some((selector & 0xfffc) as u32),
        address: None,
    }
}

/// REX.W far pointers: m16:32 on AMD, m16:64 on Intel (`cpu::vendor`).
fn far_pointer_ignores_rex_w() -> bool {
    vendor::host_has(Quirk::FarPointerIgnoresRexW)
}

/// Loads `selector` into segment register `sreg` (index into `GuestState::seg`) at CPL3.
fn load_segment(s: &mut GuestState, sreg: usize, selector: u16) -> Result<(), GuestException> {
    const SS: usize = 2;
    if selector & !3 == 0 {
        if sreg == SS {
            return Err(GuestException::gp(0));
        }
        // What a Linux process observes: the next return from the kernel (IRET) turns a null
        // data-segment register into selector 0 with base 0, whatever RPL was loaded and
        // whatever the CPU did with the hidden base.
        s.seg[sreg] = 0;
        match sreg {
            4 => s.fs_base = 0,
            5 => s.gs_base = 0,
            _ => {}
        }
        return Ok(());
    }
    let rpl = selector & 3;
    let ar = access_rights(selector).ok_or(gp(selector))?;
    if ar & AR_S == 0 {
        return Err(gp(selector));
    }
    let code = ar & AR_TYPE_CODE != 0;
    let readable_or_writable = ar & AR_TYPE_RW != 0;
    if sreg == SS {
        if code || !readable_or_writable || rpl != 3 || dpl(ar) != 3 {
            return Err(gp(selector));
        }
        if ar & AR_P == 0 {
            return Err(selector_fault(12, selector));
        }
    } else {
        if code && !readable_or_writable {
            return Err(gp(selector));
        }
        let conforming = code && ar & (1 << 10) != 0;
        if !conforming && dpl(ar) < rpl.max(3) {
            return Err(gp(selector));
        }
        if ar & AR_P == 0 {
            return Err(selector_fault(11, selector));
        }
    }
    s.seg[sreg] = selector;
    match sreg {
        4 => s.fs_base = 0,
        5 => s.gs_base = 0,
        _ => {}
    }
    Ok(())
}

/// Checks a far-transfer target code selector at CPL3; returns whether it is 64-bit code.
/// Returns need RPL = CPL; jumps and calls accept any RPL (RPL ≤ CPL always holds at CPL3).
fn check_code_segment(selector: u16, is_return: bool) -> Result<bool, GuestException> {
    if selector & !3 == 0 {
        return Err(GuestException::gp(0));
    }
    let ar = access_rights(selector).ok_or(gp(selector))?;
    if ar & AR_S == 0 || ar & AR_TYPE_CODE == 0 {
        return Err(gp(selector));
    }
    let conforming = ar & (1 << 10) != 0;
    if (is_return && selector & 3 != 3) || (!conforming && dpl(ar) != 3) || (conforming && dpl(ar) > 3) {
        return Err(gp(selector));
    }
    if ar & AR_P == 0 {
        return Err(selector_fault(11, selector));
    }
    Ok(ar & AR_L != 0)
}

/// Why a segment instruction could not be emulated at all (not a guest fault).
pub enum Unsupported {
    CompatibilityMode(u16),
    Form,
}

/// Performs a segment load/read or far transfer at CPL3. All-or-nothing: on a fault the state is
/// unchanged.
pub fn execute(state: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Outcome, Unsupported> {
    let mut s = state.clone();
    match run(&mut s, instr, mem) {
        Ok(Some(rip)) => {
            s.rip = rip;
            *state = s;
            Ok(Outcome::Continue)
        }
        Ok(None) => {
            s.rip = instr.next_ip();
            *state = s;
            Ok(Outcome::Continue)
        }
        Err(Failure::Guest(exc)) => Ok(Outcome::Exit(Exit::Exception(exc))),
        Err(Failure::Unsupported(u)) => Err(u),
    }
}

enum Failure {
    Guest(GuestException),
    Unsupported(Unsupported),
}

impl From<GuestException> for Failure {
    fn from(e: GuestException) -> Self {
        Failure::Guest(e)
    }
}

/// Returns the new RIP for transfers, None to fall through.
fn run(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Option<u64>, Failure> {
    let mnemonic = instr.mnemonic();
    let mem_va = |s: &GuestState, op: u32| super::regs::linear_address(s, instr, op, 0).unwrap_or(0);
    match mnemonic {
        // mov Sreg, r/m16 and mov r/m, Sreg
        Mnemonic::Mov if instr.op0_kind() == OpKind::Register && instr.op0_register().is_segment_register() => {
            let sreg = instr.op0_register();
            if sreg == Register::CS {
                return Err(GuestException::new(vector::UD).into());
            }
            let selector = match instr.op1_kind() {
                OpKind::Register => read_gpr(s, instr.op1_register()) as u16,
                _ => mem.read_le(mem_va(s, 1), 2)? as u16,
            };
            load_segment(s, sreg_index(sreg), selector)?;
            Ok(None)
        }
        Mnemonic::Mov => {
            let selector = s.seg[sreg_index(instr.op1_register())] as u64;
            match instr.op0_kind() {
                OpKind::Register => {
                    let dst = instr.op0_register();
                    // 32/64-bit destinations get the selector zero-extended.
                    if dst.size() == 2 {
                        write_gpr(s, dst, selector);
                    } else {
                        s.gpr[dst.full_register().number() & 15] = selector;
                    }
                }
                _ => mem.write(mem_va(s, 0), &(selector as u16).to_le_bytes())?,
            }
            Ok(None)
        }
        Mnemonic::Push => {
            let size = instr.stack_pointer_increment().unsigned_abs() as u64;
            let selector = s.seg[sreg_index(instr.op0_register())] as u64;
            let rsp = s.gpr[gpr::RSP].wrapping_sub(size);
            mem.write(stack_address(rsp)?, &selector.to_le_bytes()[..size as usize])?;
            s.gpr[gpr::RSP] = rsp;
            Ok(None)
        }
        Mnemonic::Pop => {
            let size = instr.stack_pointer_increment().unsigned_abs() as u64;
            let rsp = s.gpr[gpr::RSP];
            let selector = mem.read_le(stack_address(rsp)?, size as usize)? as u16;
            load_segment(s, sreg_index(instr.op0_register()), selector)?;
            s.gpr[gpr::RSP] = rsp.wrapping_add(size);
            Ok(None)
        }
        Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss => {
            let dst = instr.op0_register();
            let size = if dst.size() == 8 && far_pointer_ignores_rex_w() {
                4
            } else {
                dst.size() as u64
            };
            let va = mem_va(s, 1);
            let offset = mem.read_le(va, size as usize)?;
            let selector = mem.read_le(va.wrapping_add(size), 2)? as u16;
            let sreg = match mnemonic {
                Mnemonic::Lfs => 4,
                Mnemonic::Lgs => 5,
                _ => 2,
            };
            load_segment(s, sreg, selector)?;
            if dst.size() == 8 && size == 4 {
                // AMD: a 32-bit load into the 64-bit register, zero-extended.
                s.gpr[dst.number() & 15] = offset;
            } else {
                write_gpr(s, dst, offset);
            }
            Ok(None)
        }
        Mnemonic::Retf => {
            let size = op_size(instr);
            let rsp = s.gpr[gpr::RSP];
            // The CS slot first, as the CPU reads it (`system::transfer::far_return`).
            let cs = mem.read_le(stack_address(rsp.wrapping_add(size as u64))?, size)? as u16;
            let ip = mem.read_le(stack_address(rsp)?, size)?;
            let pop = if instr.op_count() == 1 {
                instr.immediate16() as u64
            } else {
                0
            };
            let new_rsp = rsp.wrapping_add(2 * size as u64).wrapping_add(pop);
            if cs & 3 != 3 && vendor::host_has(Quirk::RetfReadsOuterStackFirst) {
                // RPL != CPL announces a return to another privilege level, for which AMD CPUs
                // pop SS:RSP above the new top (SS first) before they validate CS; Intel CPUs
                // check CS first (`cpu::vendor`).
                mem.read_le(stack_address(new_rsp.wrapping_add(size as u64))?, size)?;
                mem.read_le(stack_address(new_rsp)?, size)?;
            }
            far_target(s, cs, ip, true)?;
            s.gpr[gpr::RSP] = new_rsp;
            Ok(Some(ip))
        }
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
            let size = match mnemonic {
                Mnemonic::Iret => 2,
                Mnemonic::Iretd => 4,
                _ => 8,
            };
            // NT set: no task return in IA-32e mode (#GP(0) before anything is popped).
            if s.rflags & flags::NT != 0 {
                return Err(GuestException::gp(0).into());
            }
            let rsp = stack_address(s.gpr[gpr::RSP])?;
            let at = |i: u64| rsp.wrapping_add(i * size as u64);
            // The slots and checks in the CPU's order (`system::transfer::iret`): RFLAGS, CS,
            // RIP, check CS, SS, RSP, check SS, then RIP.
            let fl = mem.read_le(at(2), size)?;
            let cs = mem.read_le(at(1), size)? as u16;
            let ip = mem.read_le(at(0), size)?;
            check_code_segment(cs, true)?;
            let ss = mem.read_le(at(4), size)? as u16;
            let new_rsp = mem.read_le(at(3), size)?;
            let mut probe = s.clone();
            load_segment(&mut probe, 2, ss)?;
            far_target(s, cs, ip, true)?;
            // At CPL3 with IOPL 0, IF and IOPL keep their values.
            let writable = flags::STATUS | flags::TF | flags::DF | (1 << 14) | flags::AC | flags::ID | flags::RF;
            let writable = if size == 2 { writable & 0xffff } else { writable };
            s.rflags = (s.rflags & !writable) | (fl & writable) | flags::FIXED;
            s.seg = probe.seg;
            // The popped RSP is zero-extended from the operand size.
            s.gpr[gpr::RSP] = new_rsp;
            Ok(Some(ip))
        }
        Mnemonic::Jmp | Mnemonic::Call => {
            let size = match instr.memory_size().size() - 2 {
                8 if far_pointer_ignores_rex_w() => 4,
                n => n,
            };
            let va = mem_va(s, 0);
            let ip = mem.read_le(va, size)?;
            let cs = mem.read_le(va.wrapping_add(size as u64), 2)? as u16;
            let old_cs = s.seg[1];
            far_target(s, cs, ip, false)?;
            if mnemonic == Mnemonic::Call {
                // Pushes the old CS then the return RIP, each in the operand size.
                let rsp = s.gpr[gpr::RSP];
                let ret = instr.next_ip();
                let a = stack_address(rsp.wrapping_sub(size as u64))?;
                let b = stack_address(rsp.wrapping_sub(2 * size as u64))?;
                mem.write(a, &(old_cs as u64).to_le_bytes()[..size])?;
                mem.write(b, &ret.to_le_bytes()[..size])?;
                s.gpr[gpr::RSP] = b;
            }
            Ok(Some(ip))
        }
        _ => Err(Failure::Unsupported(Unsupported::Form)),
    }
}

fn op_size(instr: &Instruction) -> usize {
    match instr.code() {
        iced_x86::Code::Retfw | iced_x86::Code::Retfw_imm16 => 2,
        iced_x86::Code::Retfd | iced_x86::Code::Retfd_imm16 => 4,
        _ => 8,
    }
}

/// Validates a far-transfer target and switches CS (its RPL becomes the CPL, 3).
fn far_target(s: &mut GuestState, cs: u16, ip: u64, is_return: bool) -> Result<(), Failure> {
    let long = check_code_segment(cs, is_return)?;
    if !long {
        return Err(Failure::Unsupported(Unsupported::CompatibilityMode(cs)));
    }
    if !crate::mmu::is_canonical(ip) {
        return Err(GuestException::gp(0).into());
    }
    s.seg[1] = (cs & !3) | 3;
    Ok(())
}

//! System mode: the translator running a whole guest machine, kernel mode included
//! (`hbt run --accel bt`; later the kernel half of the hybrid engine).
//!
//! One mechanism per file: `descriptors.rs` (GDT/LDT/TSS and the checks of each segment
//! load), `delivery.rs` (exceptions and interrupts through the guest's IDT, #DF, triple
//! fault), `transfer.rs` (`iretq`, far returns/jumps/calls, `syscall`/`sysretq`), `msr.rs`
//! (the MSR table), `query.rs` (`sgdt`…`smsw`, `lar`/`lsl`/`verr`/`verw` against the guest's
//! own tables). This file holds the table of privileged and system instructions
//! ([`SYSTEM_OPS`]) and [`execute`], which performs every instruction the engine runs itself in
//! system mode. Guest RFLAGS.IF, IOPL, TF, NT and (at CPL0) AC are virtual: they live in
//! `GuestState::rflags`, never in the host's flags (the host runs at CPL3).

pub mod delivery;
pub mod descriptors;
pub mod msr;
pub mod query;
pub mod transfer;

use crate::emulate::regs::{read_gpr, sreg_index, write_gpr};
use crate::emulate::{stack_address, GuestMemory};
use crate::exit::{vector, Exit, GuestException};
use crate::platform::{Platform, PortOutcome};
use crate::rules::{EmulateOp, Rule, StackOp};
use crate::state::{flags, gpr, Cpl, GuestState};
use delivery::Event;
use descriptors::Failure;
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

/// Privileged and system instructions, by what the engine does for them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SystemOp {
    Cli,
    Sti,
    Hlt,
    /// `in` from an immediate or DX port.
    PortIn,
    /// `out` to an immediate or DX port.
    PortOut,
    Lgdt,
    Lidt,
    Lldt,
    Ltr,
    Lmsw,
    Clts,
    /// `mov` to or from CR0/CR2/CR3/CR4/CR8.
    MovCr,
    /// `mov` to or from DR0-DR7.
    MovDr,
    Rdmsr,
    Wrmsr,
    Invlpg,
    /// `wbinvd`, `invd`: nothing to do for a cache-less model.
    CacheFlush,
    Swapgs,
    Sysret,
    Xsetbv,
    /// A privileged instruction the model does not implement: #GP(0) at CPL3 (as for every
    /// privileged instruction), #UD at CPL0, counted in the statistics by name.
    Unimplemented,
}

/// The instructions [`SystemOp`] names, by mnemonic (every form of the mnemonic). Privileged
/// forms not listed here get [`SystemOp::Unimplemented`].
pub const SYSTEM_OPS: &[(Mnemonic, SystemOp)] = &[
    (Mnemonic::Cli, SystemOp::Cli),
    (Mnemonic::Sti, SystemOp::Sti),
    (Mnemonic::Hlt, SystemOp::Hlt),
    (Mnemonic::In, SystemOp::PortIn),
    (Mnemonic::Out, SystemOp::PortOut),
    (Mnemonic::Lgdt, SystemOp::Lgdt),
    (Mnemonic::Lidt, SystemOp::Lidt),
    (Mnemonic::Lldt, SystemOp::Lldt),
    (Mnemonic::Ltr, SystemOp::Ltr),
    (Mnemonic::Lmsw, SystemOp::Lmsw),
    (Mnemonic::Clts, SystemOp::Clts),
    (Mnemonic::Rdmsr, SystemOp::Rdmsr),
    (Mnemonic::Wrmsr, SystemOp::Wrmsr),
    (Mnemonic::Invlpg, SystemOp::Invlpg),
    (Mnemonic::Wbinvd, SystemOp::CacheFlush),
    (Mnemonic::Invd, SystemOp::CacheFlush),
    (Mnemonic::Swapgs, SystemOp::Swapgs),
    (Mnemonic::Sysret, SystemOp::Sysret),
    (Mnemonic::Sysretq, SystemOp::Sysret),
    (Mnemonic::Xsetbv, SystemOp::Xsetbv),
];

/// What the engine does after a system instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Deliver this through the guest's IDT (RIP already set as the CPU reports it).
    Deliver(Event),
    Exit(Exit),
}

/// Which guest translations an instruction invalidated (one instruction does at most one).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Invalidated {
    #[default]
    Nothing,
    /// All of them: CR4.PGE/PSE/PAE, CR0.WP/PG, or CR3 without CR4.PGE.
    All,
    /// The non-global ones: CR3 written with CR4.PGE set.
    NonGlobal,
    /// INVLPG of this linear address: its page's translations (whatever the page's size).
    Page(u64),
}

/// Side effects the engine must apply.
#[derive(Clone, Copy, Debug, Default)]
pub struct Effects {
    pub invalidated: Invalidated,
    /// A privileged instruction without a model (its name goes into the statistics).
    pub unimplemented: bool,
}

/// Performs `instr` (rule `rule`) in system mode on a copy of the state, committing it only
/// if nothing faults. `Err` is an instruction the translator cannot model.
pub fn execute(
    state: &mut GuestState,
    instr: &Instruction,
    rule: Rule,
    mem: &mut dyn GuestMemory,
    platform: &mut dyn Platform,
    effects: &mut Effects,
) -> Result<Next, String> {
    let mut s = state.clone();
    let here = instr.ip();
    let next = instr.next_ip();
    s.rip = next;
    let r = match rule {
        Rule::System(op) => system_op(&mut s, instr, op, mem, platform, effects),
        Rule::Stack(StackOp::Pushf) => pushf(&mut s, instr, mem),
        Rule::Stack(StackOp::Popf) => popf(&mut s, instr, mem),
        Rule::Emulate(op) => emulate_op(&mut s, instr, op, mem, platform),
        Rule::UserCopy => query::execute(&mut s, instr, mem).map(|()| Next::Continue),
        _ => return Err(format!("no system-mode implementation for {rule:?}")),
    };
    match r {
        Ok(n) => {
            *state = s;
            Ok(n)
        }
        Err(Failure::Guest(e)) => {
            // A fault: the instruction did nothing; the exception is reported at it.
            state.rip = here;
            Ok(Next::Deliver(Event::Exception(e)))
        }
        Err(Failure::Unsupported(why)) => Err(why),
    }
}

fn kernel_only(s: &GuestState) -> Result<(), Failure> {
    if s.cpl == Cpl::Kernel {
        Ok(())
    } else {
        Err(GuestException::gp(0).into())
    }
}

fn iopl(s: &GuestState) -> u16 {
    ((s.rflags & flags::IOPL) >> 12) as u16
}

/// `in`/`out`/`cli`/`sti` need CPL ≤ IOPL (the TSS I/O bitmap is not modelled: with IOPL
/// below CPL port access raises #GP, as with a TSS that has no bitmap).
fn io_allowed(s: &GuestState) -> Result<(), Failure> {
    if s.cpl as u16 <= iopl(s) {
        Ok(())
    } else {
        Err(GuestException::gp(0).into())
    }
}

fn mem_va(s: &GuestState, instr: &Instruction, operand: u32) -> u64 {
    crate::emulate::regs::linear_address(s, instr, operand, 0).unwrap_or(0)
}

fn system_op(
    s: &mut GuestState,
    instr: &Instruction,
    op: SystemOp,
    mem: &mut dyn GuestMemory,
    platform: &mut dyn Platform,
    effects: &mut Effects,
) -> Result<Next, Failure> {
    match op {
        SystemOp::Cli => {
            io_allowed(s)?;
            s.rflags &= !flags::IF;
        }
        SystemOp::Sti => {
            io_allowed(s)?;
            if s.rflags & flags::IF == 0 {
                s.sys.interrupt_shadow = true;
            }
            s.rflags |= flags::IF;
        }
        SystemOp::Hlt => {
            kernel_only(s)?;
            return Ok(Next::Exit(Exit::Halt));
        }
        SystemOp::PortIn | SystemOp::PortOut => {
            io_allowed(s)?;
            let (port_op, reg_op) = if op == SystemOp::PortIn { (1, 0) } else { (0, 1) };
            let port = match instr.op_kind(port_op) {
                OpKind::Immediate8 => instr.immediate8() as u16,
                _ => s.gpr[gpr::RDX] as u16,
            };
            let reg = instr.op_register(reg_op);
            let size = reg.size() as u8;
            if op == SystemOp::PortIn {
                let v = platform.port_in(port, size);
                write_gpr(s, reg, v as u64);
            } else {
                let v = read_gpr(s, reg) as u32;
                if platform.port_out(port, size, v) == PortOutcome::Stop {
                    return Ok(Next::Exit(Exit::Stopped));
                }
            }
        }
        SystemOp::Lgdt | SystemOp::Lidt => {
            kernel_only(s)?;
            let va = mem_va(s, instr, 0);
            let limit = mem.read_le(va, 2)? as u16;
            let base = mem.read_le(va.wrapping_add(2), 8)?;
            if !crate::mmu::is_canonical(base) {
                return Err(GuestException::gp(0).into());
            }
            let t = crate::state::DescriptorTable { base, limit };
            if op == SystemOp::Lgdt {
                s.sys.gdtr = t;
            } else {
                s.sys.idtr = t;
            }
        }
        SystemOp::Lldt | SystemOp::Ltr => {
            kernel_only(s)?;
            let selector = match instr.op0_kind() {
                OpKind::Register => read_gpr(s, instr.op0_register()) as u16,
                _ => mem.read_le(mem_va(s, instr, 0), 2)? as u16,
            };
            if op == SystemOp::Ltr {
                descriptors::load_tr(s, mem, selector)?;
            } else {
                descriptors::load_ldt(s, mem, selector)?;
            }
        }
        SystemOp::Lmsw => {
            kernel_only(s)?;
            let v = match instr.op0_kind() {
                OpKind::Register => read_gpr(s, instr.op0_register()),
                _ => mem.read_le(mem_va(s, instr, 0), 2)?,
            };
            // PE can be set, never cleared; MP, EM, TS follow.
            s.cr0 = (s.cr0 & !0xe) | (v & 0xf) | (s.cr0 & 1);
        }
        SystemOp::Clts => {
            kernel_only(s)?;
            s.cr0 &= !(1 << 3);
        }
        SystemOp::MovCr => {
            kernel_only(s)?;
            mov_cr(s, instr, effects)?;
        }
        SystemOp::MovDr => {
            kernel_only(s)?;
            let (to_dr, dr, gp_reg) = if instr.op0_register().is_dr() {
                (true, instr.op0_register(), instr.op1_register())
            } else {
                (false, instr.op1_register(), instr.op0_register())
            };
            let n = dr.number();
            // DR4/DR5 alias DR6/DR7 while CR4.DE is clear, and #UD when it is set.
            let n = match n {
                4 | 5 if s.cr4 & (1 << 3) != 0 => return Err(GuestException::new(vector::UD).into()),
                4 | 5 => n + 2,
                n => n,
            };
            if to_dr {
                s.sys.dr[n] = s.gpr[gp_reg.number() & 15];
            } else {
                s.gpr[gp_reg.number() & 15] = s.sys.dr[n];
            }
        }
        SystemOp::Rdmsr => {
            kernel_only(s)?;
            let index = s.gpr[gpr::RCX] as u32;
            let v = msr::read(s, platform, index).ok_or(GuestException::gp(0))?;
            s.gpr[gpr::RAX] = v & 0xffff_ffff;
            s.gpr[gpr::RDX] = v >> 32;
        }
        SystemOp::Wrmsr => {
            kernel_only(s)?;
            let index = s.gpr[gpr::RCX] as u32;
            let v = (s.gpr[gpr::RDX] << 32) | (s.gpr[gpr::RAX] & 0xffff_ffff);
            msr::write(s, platform, index, v).ok_or(GuestException::gp(0))?;
        }
        SystemOp::Invlpg => {
            kernel_only(s)?;
            effects.invalidated = Invalidated::Page(mem_va(s, instr, 0));
        }
        SystemOp::CacheFlush => kernel_only(s)?,
        SystemOp::Swapgs => {
            kernel_only(s)?;
            std::mem::swap(&mut s.gs_base, &mut s.kernel_gs_base);
        }
        SystemOp::Sysret => {
            let rex_w = instr.code() == iced_x86::Code::Sysretq;
            transfer::sysret(s, rex_w)?;
        }
        SystemOp::Xsetbv => {
            kernel_only(s)?;
            if s.gpr[gpr::RCX] as u32 != 0 {
                return Err(GuestException::gp(0).into());
            }
            let v = (s.gpr[gpr::RDX] << 32) | (s.gpr[gpr::RAX] & 0xffff_ffff);
            // Only components the platform's CPUID offers (leaf 0DH), as the CPU checks
            // against what it supports.
            let [eax, _, _, edx] = platform.cpuid(0xd, 0);
            let offered = (edx as u64) << 32 | eax as u64;
            if v & !offered != 0 || crate::cpu::xsave::XsaveLayout::host().check_guest_xcr0(v).is_err() {
                return Err(GuestException::gp(0).into());
            }
            s.xcr0 = v;
        }
        SystemOp::Unimplemented => {
            kernel_only(s)?;
            effects.unimplemented = true;
            s.rip = instr.ip();
            return Ok(Next::Deliver(Event::Exception(GuestException::new(vector::UD))));
        }
    }
    Ok(Next::Continue)
}

fn mov_cr(s: &mut GuestState, instr: &Instruction, effects: &mut Effects) -> Result<(), Failure> {
    let (to_cr, cr, reg) = if instr.op0_register().is_cr() {
        (true, instr.op0_register(), instr.op1_register())
    } else {
        (false, instr.op1_register(), instr.op0_register())
    };
    let r = reg.number() & 15;
    if !to_cr {
        s.gpr[r] = match cr {
            Register::CR0 => s.cr0,
            Register::CR2 => s.cr2,
            Register::CR3 => s.cr3,
            Register::CR4 => s.cr4,
            Register::CR8 => s.sys.cr8,
            _ => return Err(GuestException::new(vector::UD).into()),
        };
        return Ok(());
    }
    let v = s.gpr[r];
    match cr {
        Register::CR0 => {
            const PG: u64 = 1 << 31;
            const PE: u64 = 1;
            if v >> 32 != 0 {
                return Err(GuestException::gp(0).into());
            }
            if v & (PG | PE) != (PG | PE) {
                return Err(Failure::Unsupported("leaving paged protected (long) mode".into()));
            }
            if (v ^ s.cr0) & ((1 << 16) | PG) != 0 {
                effects.invalidated = Invalidated::All;
            }
            s.cr0 = v | 0x10; // ET reads as one
        }
        Register::CR2 => s.cr2 = v,
        Register::CR3 => {
            // PCID is not offered: bit 63 (no-flush) is reserved, so every write flushes.
            s.cr3 = v & 0x000f_ffff_ffff_f018;
            effects.invalidated = if s.cr4 & (1 << 7) != 0 {
                Invalidated::NonGlobal
            } else {
                Invalidated::All
            };
        }
        Register::CR4 => {
            const PAE: u64 = 1 << 5;
            // Bits the model supports: VME..OSXMMEXCPT, FSGSBASE? no; OSXSAVE.
            const ALLOWED: u64 = 0x0000_07ff | (1 << 18);
            if v & PAE == 0 {
                return Err(Failure::Unsupported("clearing CR4.PAE in long mode".into()));
            }
            if v & !ALLOWED != 0 {
                return Err(GuestException::gp(0).into());
            }
            if (v ^ s.cr4) & ((1 << 7) | (1 << 4) | PAE) != 0 {
                effects.invalidated = Invalidated::All; // PGE, PSE, PAE
            }
            s.cr4 = v;
        }
        Register::CR8 => {
            if v >> 4 != 0 {
                return Err(GuestException::gp(0).into());
            }
            s.sys.cr8 = v;
        }
        _ => return Err(GuestException::new(vector::UD).into()),
    }
    Ok(())
}

/// The RFLAGS value `pushf` stores: the virtual flags included, RF and VM cleared.
fn pushed_flags(s: &GuestState) -> u64 {
    (s.rflags | flags::FIXED) & !(flags::RF | flags::VM)
}

fn pushf(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Next, Failure> {
    let size = instr.stack_pointer_increment().unsigned_abs() as u64;
    let rsp = s.gpr[gpr::RSP].wrapping_sub(size);
    mem.write(stack_address(rsp)?, &pushed_flags(s).to_le_bytes()[..size as usize])?;
    s.gpr[gpr::RSP] = rsp;
    Ok(Next::Continue)
}

fn popf(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Next, Failure> {
    let size = instr.stack_pointer_increment().unsigned_abs() as u64;
    let rsp = s.gpr[gpr::RSP];
    let v = mem.read_le(stack_address(rsp)?, size as usize)?;
    let writable =
        transfer::writable_flags(s.cpl, iopl(s) as u64) & !flags::RF & if size == 2 { 0xffff } else { u64::MAX };
    s.rflags = (s.rflags & !writable) | (v & writable) | flags::FIXED;
    s.gpr[gpr::RSP] = rsp.wrapping_add(size);
    Ok(Next::Continue)
}

fn emulate_op(
    s: &mut GuestState,
    instr: &Instruction,
    op: EmulateOp,
    mem: &mut dyn GuestMemory,
    platform: &mut dyn Platform,
) -> Result<Next, Failure> {
    let here = instr.ip();
    let next = instr.next_ip();
    match op {
        EmulateOp::Cpuid => {
            let (leaf, subleaf) = (s.gpr[gpr::RAX] as u32, s.gpr[gpr::RCX] as u32);
            crate::emulate::sensitive(s, instr, op, platform);
            // OSXSAVE and OSPKE mirror the guest's CR4, not the host's.
            const CR4_OSXSAVE: u64 = 1 << 18;
            const CR4_PKE: u64 = 1 << 22;
            let mirror = |reg: &mut u64, bit: u32, on: bool| *reg = (*reg & !(1 << bit)) | (on as u64) << bit;
            if leaf == 1 {
                mirror(&mut s.gpr[gpr::RCX], 27, s.cr4 & CR4_OSXSAVE != 0);
            } else if leaf == 7 && subleaf == 0 {
                mirror(&mut s.gpr[gpr::RCX], 4, s.cr4 & CR4_PKE != 0);
            }
        }
        EmulateOp::Xgetbv | EmulateOp::Random => {
            if let crate::emulate::Outcome::Exit(Exit::Exception(e)) = crate::emulate::sensitive(s, instr, op, platform)
            {
                return Ok(Next::Deliver(Event::Exception(e)));
            }
        }
        EmulateOp::Rdpid => {
            crate::emulate::regs::write_gpr(s, instr.op0_register(), s.sys.msr.tsc_aux & 0xffff_ffff);
        }
        EmulateOp::Rdtsc | EmulateOp::Rdtscp => {
            const TSD: u64 = 1 << 2;
            if s.cpl != Cpl::Kernel && s.cr4 & TSD != 0 {
                return Err(GuestException::gp(0).into());
            }
            crate::emulate::sensitive(s, instr, op, platform);
            if op == EmulateOp::Rdtscp {
                s.gpr[gpr::RCX] = s.sys.msr.tsc_aux & 0xffff_ffff;
            }
        }
        EmulateOp::Syscall => {
            transfer::syscall(s, next)?;
        }
        EmulateOp::Int3 => {
            return Ok(Next::Deliver(Event::Software {
                vector: vector::BP,
                at: here,
            }))
        }
        EmulateOp::IntN => {
            return Ok(Next::Deliver(Event::Software {
                vector: instr.immediate8(),
                at: here,
            }))
        }
        EmulateOp::Int1 => {
            return Ok(Next::Deliver(Event::Exception(GuestException::new(vector::DB))));
        }
        EmulateOp::Ud => {
            s.rip = here;
            return Ok(Next::Deliver(Event::Exception(GuestException::new(vector::UD))));
        }
        EmulateOp::Segment => segment_op(s, instr, mem)?,
    }
    Ok(Next::Continue)
}

fn op_size(instr: &Instruction) -> usize {
    use iced_x86::Code;
    match instr.code() {
        Code::Retfw | Code::Retfw_imm16 | Code::Iretw => 2,
        Code::Retfd | Code::Retfd_imm16 | Code::Iretd => 4,
        _ => 8,
    }
}

/// Segment loads and reads, far transfers and `iret`, against the guest's descriptor tables.
fn segment_op(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Failure> {
    let va = |s: &GuestState, op: u32| mem_va(s, instr, op);
    match instr.mnemonic() {
        Mnemonic::Mov if instr.op0_kind() == OpKind::Register && instr.op0_register().is_segment_register() => {
            let sreg = instr.op0_register();
            let selector = match instr.op1_kind() {
                OpKind::Register => read_gpr(s, instr.op1_register()) as u16,
                _ => mem.read_le(va(s, 1), 2)? as u16,
            };
            load_sreg(s, mem, sreg, selector)?;
        }
        Mnemonic::Mov => {
            let selector = s.seg[sreg_index(instr.op1_register())] as u64;
            match instr.op0_kind() {
                OpKind::Register => {
                    let dst = instr.op0_register();
                    if dst.size() == 2 {
                        write_gpr(s, dst, selector);
                    } else {
                        s.gpr[dst.full_register().number() & 15] = selector;
                    }
                }
                _ => mem.write(va(s, 0), &(selector as u16).to_le_bytes())?,
            }
        }
        Mnemonic::Push => {
            let size = instr.stack_pointer_increment().unsigned_abs() as u64;
            let selector = s.seg[sreg_index(instr.op0_register())] as u64;
            let rsp = s.gpr[gpr::RSP].wrapping_sub(size);
            mem.write(stack_address(rsp)?, &selector.to_le_bytes()[..size as usize])?;
            s.gpr[gpr::RSP] = rsp;
        }
        Mnemonic::Pop => {
            let size = instr.stack_pointer_increment().unsigned_abs() as u64;
            let rsp = s.gpr[gpr::RSP];
            let selector = mem.read_le(stack_address(rsp)?, size as usize)? as u16;
            load_sreg(s, mem, instr.op0_register(), selector)?;
            s.gpr[gpr::RSP] = rsp.wrapping_add(size);
        }
        Mnemonic::Lfs | Mnemonic::Lgs | Mnemonic::Lss => {
            let dst = instr.op0_register();
            let size = far_offset_size(dst.size()) as u64;
            let a = va(s, 1);
            let offset = mem.read_le(a, size as usize)?;
            let selector = mem.read_le(a.wrapping_add(size), 2)? as u16;
            let sreg = match instr.mnemonic() {
                Mnemonic::Lfs => Register::FS,
                Mnemonic::Lgs => Register::GS,
                _ => Register::SS,
            };
            load_sreg(s, mem, sreg, selector)?;
            if dst.size() == 8 {
                // AMD's m16:32 offset goes into the 64-bit register zero-extended.
                s.gpr[dst.number() & 15] = offset;
            } else {
                write_gpr(s, dst, offset);
            }
        }
        Mnemonic::Retf => {
            let pop = if instr.op_count() == 1 {
                instr.immediate16() as u64
            } else {
                0
            };
            transfer::far_return(s, mem, op_size(instr), pop)?;
        }
        Mnemonic::Iret | Mnemonic::Iretd | Mnemonic::Iretq => {
            transfer::iret(s, mem, op_size(instr))?;
        }
        Mnemonic::Jmp | Mnemonic::Call => {
            let size = far_offset_size(instr.memory_size().size() - 2);
            let a = va(s, 0);
            let ip = mem.read_le(a, size)?;
            let cs = mem.read_le(a.wrapping_add(size as u64), 2)? as u16;
            let call = (instr.mnemonic() == Mnemonic::Call).then_some((instr.next_ip(), size));
            transfer::far_jump(s, mem, cs, ip, call)?;
        }
        _ => return Err(Failure::Unsupported(format!("segment instruction `{instr}`"))),
    }
    Ok(())
}

/// The offset size of a far pointer whose operand size is `size`: REX.W (m16:64) is m16:32 on
/// AMD (`cpu::vendor`, as in user mode).
fn far_offset_size(size: usize) -> usize {
    use crate::cpu::vendor::{host_has, Quirk};
    if size == 8 && host_has(Quirk::FarPointerIgnoresRexW) {
        4
    } else {
        size
    }
}

fn load_sreg(s: &mut GuestState, mem: &mut dyn GuestMemory, sreg: Register, selector: u16) -> Result<(), Failure> {
    match sreg {
        Register::CS => return Err(GuestException::new(vector::UD).into()),
        Register::SS => {
            let cpl = s.cpl as u16;
            descriptors::load_ss(s, mem, selector, cpl)?;
            s.sys.interrupt_shadow = true;
        }
        r => descriptors::load_data(s, mem, sreg_index(r), selector)?,
    }
    Ok(())
}

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
#[cfg(test)]
mod test_memory;
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
    /// `ins`/`outs` (with REP): string I/O between the DX port and memory.
    PortString,
    /// `rdpmc`: no performance counters are modelled, so #GP(0) for every counter (as a CPU
    /// raises for an index it does not have).
    Rdpmc,
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
    (Mnemonic::Insb, SystemOp::PortString),
    (Mnemonic::Insw, SystemOp::PortString),
    (Mnemonic::Insd, SystemOp::PortString),
    (Mnemonic::Outsb, SystemOp::PortString),
    (Mnemonic::Outsw, SystemOp::PortString),
    (Mnemonic::Outsd, SystemOp::PortString),
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

/// `cli`/`sti` need CPL ≤ IOPL (no virtual-interrupt extensions: CR4.PVI is not offered).
fn iopl_allowed(s: &GuestState) -> Result<(), Failure> {
    if s.cpl as u16 <= iopl(s) {
        Ok(())
    } else {
        Err(GuestException::gp(0).into())
    }
}

/// Where the 64-bit TSS keeps the offset of its I/O permission bitmap, and the smallest limit
/// a TSS with that field has.
const TSS_IOMAP_FIELD: u64 = 0x66;
const TSS_MIN_LIMIT: u64 = 0x67;

/// `in`/`out`/`ins`/`outs` of `size` bytes at `port`: allowed at CPL ≤ IOPL; above, only where
/// the TSS I/O permission bitmap has a clear bit for every port the access spans (SDM Vol. 1
/// §19.5.2; AMD APM Vol. 2 §13.3.3). The CPU reads the two bitmap bytes from the one holding
/// the first port's bit, both within the TSS limit — a bitmap offset at or past the limit
/// grants nothing — as supervisor reads whatever the CPL. A Linux process granted ports with
/// `ioperm` or `iopl(3)` (emulated with an all-ones grant since Linux 5.5) runs its port I/O
/// at CPL3 with IOPL 0 through this.
fn port_allowed(s: &GuestState, mem: &mut dyn GuestMemory, port: u16, size: u8) -> Result<(), Failure> {
    if s.cpl as u16 <= iopl(s) {
        return Ok(());
    }
    let denied = || Err(GuestException::gp(0).into());
    let (base, limit) = (s.sys.tr.base, s.sys.tr.limit as u64);
    if limit < TSS_MIN_LIMIT {
        return denied();
    }
    let mut field = [0u8; 2];
    mem.read_system(base.wrapping_add(TSS_IOMAP_FIELD), &mut field)?;
    let at = u16::from_le_bytes(field) as u64 + (port as u64 >> 3);
    if at + 1 > limit {
        return denied();
    }
    let mut bits = [0u8; 2];
    mem.read_system(base.wrapping_add(at), &mut bits)?;
    let mask = ((1u32 << size) - 1) << (port & 7);
    if u16::from_le_bytes(bits) as u32 & mask != 0 {
        return denied();
    }
    Ok(())
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
            iopl_allowed(s)?;
            s.rflags &= !flags::IF;
        }
        SystemOp::Sti => {
            iopl_allowed(s)?;
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
            let (port_op, reg_op) = if op == SystemOp::PortIn { (1, 0) } else { (0, 1) };
            let port = match instr.op_kind(port_op) {
                OpKind::Immediate8 => instr.immediate8() as u16,
                _ => s.gpr[gpr::RDX] as u16,
            };
            let reg = instr.op_register(reg_op);
            let size = reg.size() as u8;
            port_allowed(s, mem, port, size)?;
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
        SystemOp::PortString => return port_string(s, instr, mem, platform),
        SystemOp::Rdpmc => {
            const PCE: u64 = 1 << 8;
            if s.cpl != Cpl::Kernel && s.cr4 & PCE == 0 {
                return Err(GuestException::gp(0).into());
            }
            return Err(GuestException::gp(0).into());
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
            mov_cr(s, instr, platform, effects)?;
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
                let v = s.gpr[gp_reg.number() & 15];
                s.sys.dr[n] = if n >= 6 {
                    // The upper halves of DR6 and DR7 are reserved (#GP(0) when set).
                    if v >> 32 != 0 {
                        return Err(GuestException::gp(0).into());
                    }
                    let (volatile, fixed) = debug_register_bits(platform, n);
                    (v & volatile) | fixed
                } else {
                    v
                };
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
            if s.cr4 & CR4_OSXSAVE == 0 {
                return Err(GuestException::new(vector::UD).into());
            }
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

/// Iterations of a `rep ins`/`rep outs` performed before the dispatcher gets a turn (RIP stays
/// at the instruction and RCX counts what is left, as when the CPU takes an interrupt).
const PORT_STRING_BATCH: u64 = 4096;

/// `ins`/`outs`, with or without REP: one element per iteration between the DX port and
/// ES:RDI (`ins`, no segment override) or seg:RSI (`outs`), RDI/RSI stepping by DF. With a
/// 32-bit address size EDI/ESI and ECX are used (and written zero-extended). Iterations done
/// before a fault stay done, as on the CPU: the fault is delivered at the instruction with
/// the registers of the iteration that faulted.
fn port_string(
    s: &mut GuestState,
    instr: &Instruction,
    mem: &mut dyn GuestMemory,
    platform: &mut dyn Platform,
) -> Result<Next, Failure> {
    let here = instr.ip();
    let n = instr.memory_size().size();
    port_allowed(s, mem, s.gpr[gpr::RDX] as u16, n as u8)?;
    let input = matches!(instr.mnemonic(), Mnemonic::Insb | Mnemonic::Insw | Mnemonic::Insd);
    let (pointer, kind) = if input {
        (gpr::RDI, instr.op0_kind())
    } else {
        (gpr::RSI, instr.op1_kind())
    };
    let wide = matches!(kind, OpKind::MemoryESRDI | OpKind::MemorySegRSI);
    let width = |v: u64| if wide { v } else { v & 0xffff_ffff };
    let base = if input {
        0
    } else {
        match instr.segment_prefix() {
            Register::FS => s.fs_base,
            Register::GS => s.gs_base,
            _ => 0,
        }
    };
    let step = if s.rflags & flags::DF != 0 {
        (n as u64).wrapping_neg()
    } else {
        n as u64
    };
    let port = s.gpr[gpr::RDX] as u16;
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    for _ in 0..PORT_STRING_BATCH {
        if rep && width(s.gpr[gpr::RCX]) == 0 {
            return Ok(Next::Continue);
        }
        let at = base.wrapping_add(width(s.gpr[pointer]));
        // One element: Ok(true) when the device asks the run to stop after it.
        let mut element = |s: &mut GuestState| -> Result<bool, GuestException> {
            if s.alignment_checking() && n > 1 && !at.is_multiple_of(n as u64) {
                return Err(GuestException {
                    vector: vector::AC,
                    error_code: Some(0),
                    address: None,
                });
            }
            if input {
                // The port is read before the memory is written.
                let v = platform.port_in(port, n as u8);
                mem.write(at, &v.to_le_bytes()[..n])?;
                Ok(false)
            } else {
                let v = mem.read_le(at, n)? as u32;
                Ok(platform.port_out(port, n as u8, v) == PortOutcome::Stop)
            }
        };
        let stop = match element(s) {
            Ok(stop) => stop,
            Err(e) => {
                s.rip = here;
                return Ok(Next::Deliver(Event::Exception(e)));
            }
        };
        s.gpr[pointer] = width(s.gpr[pointer].wrapping_add(step));
        if rep {
            s.gpr[gpr::RCX] = width(s.gpr[gpr::RCX].wrapping_sub(1));
        }
        let finished = !rep || width(s.gpr[gpr::RCX]) == 0;
        if stop {
            if !finished {
                s.rip = here;
            }
            return Ok(Next::Exit(Exit::Stopped));
        }
        if finished {
            return Ok(Next::Continue);
        }
    }
    // Not finished: resume at the instruction after the dispatcher's turn.
    s.rip = here;
    Ok(Next::Continue)
}

/// The guest's physical-address width (CPUID 80000008H:EAX[7:0]; 36 where the leaf is missing,
/// as the SDM says for processors without it).
fn physical_address_bits(platform: &mut dyn Platform) -> u32 {
    let [max, ..] = platform.cpuid(0x8000_0000, 0);
    if max >= 0x8000_0008 {
        (platform.cpuid(0x8000_0008, 0)[0] & 0xff).clamp(32, 52)
    } else {
        36
    }
}

/// CR4.OSXSAVE: without it `xgetbv` and `xsetbv` raise #UD (before any privilege check).
const CR4_OSXSAVE: u64 = 1 << 18;

/// CR0 bits the CPU keeps (PE, MP, EM, TS, ET, NE, WP, AM, NW, CD, PG); writes of the other
/// bits of the low half are ignored, of the high half raise #GP.
const CR0_DEFINED: u64 = 0xe005_003f;
/// CR4 bits the model implements: VME..OSXMMEXCPT (0-10), UMIP (11: `query.rs`) and OSXSAVE.
/// The others are reserved (the CPU model hides the features that would enable them,
/// `src/vmm/cpuid.rs`).
const CR4_ALLOWED: u64 = 0x0000_0fff | (1 << 18);
/// CR4.UMIP: `sgdt`/`sidt`/`sldt`/`str`/`smsw` raise #GP(0) at CPL3.
pub const CR4_UMIP: u64 = 1 << 11;

fn mov_cr(
    s: &mut GuestState,
    instr: &Instruction,
    platform: &mut dyn Platform,
    effects: &mut Effects,
) -> Result<(), Failure> {
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
            const NW: u64 = 1 << 29;
            const CD: u64 = 1 << 30;
            // In 64-bit mode paging cannot be turned off (nor protection under paging), and
            // NW without CD is an invalid combination: all #GP(0), as are the upper 32 bits.
            if v >> 32 != 0 || v & (PG | PE) != (PG | PE) || v & (NW | CD) == NW {
                return Err(GuestException::gp(0).into());
            }
            let v = (v & CR0_DEFINED) | 0x10; // ET reads as one
            if (v ^ s.cr0) & ((1 << 16) | PG) != 0 {
                effects.invalidated = Invalidated::All;
            }
            s.cr0 = v;
        }
        Register::CR2 => s.cr2 = v,
        Register::CR3 => {
            // PCID is not offered: bits from MAXPHYADDR up (bit 63, PCID's no-flush bit,
            // included) are reserved, and every write flushes.
            if v >> physical_address_bits(platform) != 0 {
                return Err(GuestException::gp(0).into());
            }
            // Bits 2:0 and 11:5 are ignored by paging but kept (a read gives them back).
            s.cr3 = v;
            effects.invalidated = if s.cr4 & (1 << 7) != 0 {
                Invalidated::NonGlobal
            } else {
                Invalidated::All
            };
        }
        Register::CR4 => {
            const PAE: u64 = 1 << 5;
            // Long mode needs PAE: clearing it raises #GP(0), like setting a reserved bit.
            if v & PAE == 0 || v & !CR4_ALLOWED != 0 {
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

/// DR6 and DR7 as the CPU keeps them: which bits software changes, which read as one. DR6's
/// RTM and bus-lock bits are fixed at one unless the CPU has the feature (CPUID 7: EBX[11],
/// ECX[24]).
fn debug_register_bits(platform: &mut dyn Platform, dr: usize) -> (u64, u64) {
    match dr {
        6 => {
            let [_, ebx, ecx, _] = platform.cpuid(7, 0);
            let mut volatile = 0xe00f; // B0-B3, BD, BS, BT
            if ebx & (1 << 11) != 0 {
                volatile |= 1 << 16;
            }
            if ecx & (1 << 24) != 0 {
                volatile |= 1 << 11;
            }
            (volatile, 0xffff_0ff0 & !volatile)
        }
        _ => (0xffff_2bff, 0x400),
    }
}

/// The RFLAGS value `pushf` stores: the virtual flags included, RF and VM cleared.
fn pushed_flags(s: &GuestState) -> u64 {
    (s.rflags | flags::FIXED) & !(flags::RF | flags::VM)
}

fn pushf(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Next, Failure> {
    let size = instr.stack_pointer_increment().unsigned_abs() as u64;
    let rsp = s.wrap_address(s.gpr[gpr::RSP].wrapping_sub(size));
    mem.write(stack_address(rsp)?, &pushed_flags(s).to_le_bytes()[..size as usize])?;
    s.gpr[gpr::RSP] = rsp;
    Ok(Next::Continue)
}

fn popf(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Next, Failure> {
    let size = instr.stack_pointer_increment().unsigned_abs() as u64;
    let rsp = s.wrap_address(s.gpr[gpr::RSP]);
    let v = mem.read_le(stack_address(rsp)?, size as usize)?;
    let writable =
        transfer::writable_flags(s.cpl, iopl(s) as u64) & !flags::RF & if size == 2 { 0xffff } else { u64::MAX };
    s.rflags = (s.rflags & !writable) | (v & writable) | flags::FIXED;
    s.gpr[gpr::RSP] = s.wrap_address(rsp.wrapping_add(size));
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
        // CPUID faulting (MSR_MISC_FEATURES_ENABLES bit 0, `msr.rs`): #GP(0) above CPL0.
        EmulateOp::Cpuid if s.cpl != Cpl::Kernel && s.sys.msr.misc_features_enables & msr::CPUID_FAULTING != 0 => {
            s.rip = here;
            return Ok(Next::Deliver(Event::Exception(GuestException::gp(0))));
        }
        EmulateOp::Cpuid => {
            let (leaf, subleaf) = (s.gpr[gpr::RAX] as u32, s.gpr[gpr::RCX] as u32);
            crate::emulate::sensitive(s, instr, op, platform);
            // OSXSAVE and OSPKE mirror the guest's CR4, not the host's.
            const CR4_PKE: u64 = 1 << 22;
            let mirror = |reg: &mut u64, bit: u32, on: bool| *reg = (*reg & !(1 << bit)) | (on as u64) << bit;
            if leaf == 1 {
                mirror(&mut s.gpr[gpr::RCX], 27, s.cr4 & CR4_OSXSAVE != 0);
            } else if leaf == 7 && subleaf == 0 {
                mirror(&mut s.gpr[gpr::RCX], 4, s.cr4 & CR4_PKE != 0);
            }
        }
        EmulateOp::Xgetbv if s.cr4 & CR4_OSXSAVE == 0 => {
            s.rip = here;
            return Ok(Next::Deliver(Event::Exception(GuestException::new(vector::UD))));
        }
        // The machine model offers it on any host (`vmm/cpuid.rs`); nothing to order here.
        EmulateOp::Serialize => {}
        EmulateOp::Xgetbv | EmulateOp::Random | EmulateOp::Transaction => {
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
        EmulateOp::Sysenter => transfer::sysenter(s)?,
        EmulateOp::PushPopAll => push_pop_all(s, instr, mem)?,
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

/// `pusha`/`popa` (32-bit code): EAX, ECX, EDX, EBX, the stack pointer as it was, EBP, ESI,
/// EDI pushed in that order, or popped in the reverse one with the stack pointer's slot
/// skipped; 2 or 4 bytes each by operand size. `pusha` stores them one by one from the top, so
/// a #PF names the first slot that faults (the slots above it written), and no register
/// changes; `popa` reads all eight first.
fn push_pop_all(s: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<(), Failure> {
    let size = instr.stack_pointer_increment().unsigned_abs() as usize / 8;
    let mask = if size == 2 { 0xffff } else { 0xffff_ffff };
    let mut image = [0u8; 32];
    if instr.stack_pointer_increment() < 0 {
        let rsp = s.wrap_address(s.gpr[gpr::RSP].wrapping_sub(8 * size as u64));
        for reg in 0..8 {
            let at = s.wrap_address(rsp.wrapping_add(((7 - reg) * size) as u64));
            mem.write(stack_address(at)?, &s.gpr[reg].to_le_bytes()[..size])?;
        }
        s.gpr[gpr::RSP] = (s.gpr[gpr::RSP] & !mask) | (rsp & mask);
    } else {
        let rsp = s.wrap_address(s.gpr[gpr::RSP]);
        mem.read(stack_address(rsp)?, &mut image[..8 * size])?;
        for (slot, reg) in (0..8).rev().enumerate().filter(|&(_, reg)| reg != gpr::RSP) {
            let mut v = [0u8; 8];
            v[..size].copy_from_slice(&image[slot * size..(slot + 1) * size]);
            let v = u64::from_le_bytes(v);
            // A 32-bit write clears the upper half; a 16-bit one keeps the rest.
            s.gpr[reg] = if size == 4 { v } else { (s.gpr[reg] & !mask) | v };
        }
        let after = s.wrap_address(rsp.wrapping_add(8 * size as u64));
        s.gpr[gpr::RSP] = (s.gpr[gpr::RSP] & !mask) | (after & mask);
    }
    Ok(())
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
            let rsp = s.wrap_address(s.gpr[gpr::RSP].wrapping_sub(size));
            // A 4-byte push of a selector (32-bit code) is a 16-bit store into the slot: the
            // upper half of the slot keeps what it held (SDM PUSH: "all recent Core and Atom
            // processors perform a 16-bit move"; KVM's emulator does the same).
            let stored = if size == 4 { 2 } else { size as usize };
            mem.write(stack_address(rsp)?, &selector.to_le_bytes()[..stored])?;
            s.gpr[gpr::RSP] = rsp;
        }
        Mnemonic::Pop => {
            let size = instr.stack_pointer_increment().unsigned_abs() as u64;
            let rsp = s.wrap_address(s.gpr[gpr::RSP]);
            let selector = mem.read_le(stack_address(rsp)?, size as usize)? as u16;
            load_sreg(s, mem, instr.op0_register(), selector)?;
            s.gpr[gpr::RSP] = s.wrap_address(rsp.wrapping_add(size));
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
        Mnemonic::Jmp | Mnemonic::Call if instr.op0_kind() == OpKind::FarBranch32 => {
            // ptr16:32 (32-bit code): the selector and offset are in the instruction.
            let call = (instr.mnemonic() == Mnemonic::Call).then_some((instr.next_ip(), 4));
            transfer::far_jump(s, mem, instr.far_branch_selector(), instr.far_branch32() as u64, call)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// Memory of 4 KiB pages; a page not in the map faults (not present).
    #[derive(Default)]
    struct Pages(HashMap<u64, Box<[u8; 4096]>>);

    impl Pages {
        fn with(pages: &[u64]) -> Self {
            Pages(pages.iter().map(|&p| (p, Box::new([0u8; 4096]))).collect())
        }
        fn byte(&mut self, va: u64, write: bool) -> Result<&mut u8, GuestException> {
            match self.0.get_mut(&(va & !0xfff)) {
                Some(p) => Ok(&mut p[(va & 0xfff) as usize]),
                None => Err(GuestException::page_fault(va, if write { 2 } else { 0 })),
            }
        }
    }

    impl GuestMemory for Pages {
        fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = *self.byte(va + i as u64, false)?;
            }
            Ok(())
        }
        fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
            // Like the CPU: nothing is written when a byte of the access faults.
            for i in 0..data.len() {
                self.byte(va + i as u64, true)?;
            }
            for (i, &b) in data.iter().enumerate() {
                *self.byte(va + i as u64, true)? = b;
            }
            Ok(())
        }
    }

    /// Ports read `0x40 + port`; writes are recorded.
    #[derive(Default)]
    struct Ports(Vec<(u16, u8, u32)>);

    impl Platform for Ports {
        fn cpuid(&mut self, leaf: u32, _: u32) -> [u32; 4] {
            match leaf {
                0x8000_0000 => [0x8000_0008, 0, 0, 0],
                0x8000_0008 => [46, 0, 0, 0],
                _ => [0; 4],
            }
        }
        fn rdtsc(&mut self) -> u64 {
            0
        }
        fn tsc_aux(&mut self) -> u32 {
            0
        }
        fn port_in(&mut self, port: u16, _: u8) -> u32 {
            0x40 + port as u32
        }
        fn port_out(&mut self, port: u16, size: u8, value: u32) -> PortOutcome {
            self.0.push((port, size, value));
            PortOutcome::Continue
        }
    }

    fn kernel() -> GuestState {
        GuestState {
            cpl: Cpl::Kernel,
            ..GuestState::default()
        }
    }

    /// Runs the instruction `bytes` at 0x1000 on `s`: the engine's next step.
    fn run(s: &mut GuestState, bytes: &[u8], mem: &mut Pages, ports: &mut Ports) -> Next {
        let instr = iced_x86::Decoder::with_ip(64, bytes, 0x1000, iced_x86::DecoderOptions::NONE).decode();
        let rule = crate::rules::rule(instr.code()).expect("a rule");
        s.rip = 0x1000;
        execute(s, &instr, rule, mem, ports, &mut Effects::default()).expect("modelled")
    }

    fn gp(next: Next) -> bool {
        next == Next::Deliver(Event::Exception(GuestException::gp(0)))
    }

    #[test]
    fn mov_to_control_registers_faults_where_the_cpu_does_and_drops_what_it_ignores() {
        let (mut mem, mut ports) = (Pages::default(), Ports::default());
        // mov cr0,rax / mov cr3,rax / mov cr4,rax
        let (cr0, cr3, cr4) = ([0x0f, 0x22, 0xc0], [0x0f, 0x22, 0xd8], [0x0f, 0x22, 0xe0]);
        let mut with = |bytes: &[u8], rax: u64| {
            let mut s = kernel();
            s.gpr[gpr::RAX] = rax;
            let next = run(&mut s, bytes, &mut mem, &mut ports);
            (next, s)
        };
        // Paging and protection stay on in long mode; NW needs CD; the upper half is reserved.
        for v in [0x0005_0033, 0x8005_0032, 0xa005_0033, 0x1_8005_0033] {
            assert!(gp(with(&cr0, v).0), "cr0 {v:#x}");
        }
        // Reserved bits of the lower half read as zero (bit 15 here); ET reads as one.
        let (next, s) = with(&cr0, 0x8005_8023);
        assert_eq!((next, s.cr0), (Next::Continue, 0x8005_0033));
        // CR3: bits from MAXPHYADDR (46 here) up are reserved, bit 63 included; the ignored
        // low bits are kept.
        assert!(gp(with(&cr3, 0x4000_0000_1000).0));
        assert!(gp(with(&cr3, 1 << 63 | 0x1000).0));
        let (next, s) = with(&cr3, 0x3fff_ffff_f645);
        assert_eq!((next, s.cr3), (Next::Continue, 0x3fff_ffff_f645));
        // CR4: PAE stays on in long mode; bits of features the model hides are reserved.
        assert!(gp(with(&cr4, 0x0004_0680).0), "PAE clear");
        assert!(gp(with(&cr4, 0x0004_06a0 | 1 << 16).0), "FSGSBASE");
        assert!(gp(with(&cr4, 0x1_0004_06a0).0), "upper half");
    }

    #[test]
    fn mov_to_dr6_and_dr7_keeps_their_fixed_bits_and_refuses_the_upper_half() {
        let (mut mem, mut ports) = (Pages::default(), Ports::default());
        // mov dr6,rax / mov dr7,rax
        for (bytes, n, fixed) in [([0x0f, 0x23, 0xf0], 6, 0xffff_0ff0u64), ([0x0f, 0x23, 0xf8], 7, 0x400)] {
            let mut s = kernel();
            s.gpr[gpr::RAX] = 0;
            assert_eq!(run(&mut s, &bytes, &mut mem, &mut ports), Next::Continue);
            assert_eq!(s.sys.dr[n], fixed, "dr{n} after writing 0");
            s.gpr[gpr::RAX] = 1 << 32;
            assert!(gp(run(&mut s, &bytes, &mut mem, &mut ports)), "dr{n}: upper half");
        }
    }

    #[test]
    fn rdpmc_raises_gp_for_every_counter() {
        let (mut mem, mut ports) = (Pages::default(), Ports::default());
        for ecx in [0, 1, 0x4000_0000] {
            let mut s = kernel();
            s.gpr[gpr::RCX] = ecx;
            assert!(gp(run(&mut s, &[0x0f, 0x33], &mut mem, &mut ports)), "ecx {ecx:#x}");
        }
    }

    #[test]
    fn rep_ins_keeps_the_iterations_before_a_fault_and_outs_writes_the_port() {
        let mut mem = Pages::with(&[0x7000]);
        let mut ports = Ports::default();
        // rep insw: 4 elements from 0x7ffc, the third at 0x8000 faults (not present).
        let mut s = kernel();
        (s.gpr[gpr::RDX], s.gpr[gpr::RDI], s.gpr[gpr::RCX]) = (0x60, 0x7ffc, 4);
        let next = run(&mut s, &[0xf3, 0x66, 0x6d], &mut mem, &mut ports);
        assert_eq!(
            next,
            Next::Deliver(Event::Exception(GuestException::page_fault(0x8000, 2)))
        );
        assert_eq!((s.rip, s.gpr[gpr::RDI], s.gpr[gpr::RCX]), (0x1000, 0x8000, 2));
        assert_eq!(mem.read_le(0x7ffc, 4).unwrap(), 0x00a0_00a0, "two words of port 0x60");
        // outsb with DF: from 0x7010 down, port 0x80.
        let mut s = kernel();
        s.rflags |= flags::DF;
        (s.gpr[gpr::RDX], s.gpr[gpr::RSI], s.gpr[gpr::RCX]) = (0x80, 0x7010, 2);
        mem.write(0x700f, &[0x11, 0x22]).unwrap();
        assert_eq!(run(&mut s, &[0xf3, 0x6e], &mut mem, &mut ports), Next::Continue);
        assert_eq!(ports.0, [(0x80, 1, 0x22), (0x80, 1, 0x11)]);
        assert_eq!((s.rip, s.gpr[gpr::RSI], s.gpr[gpr::RCX]), (0x1002, 0x700e, 0));
        // At CPL3 with IOPL 0: #GP(0), nothing done.
        let mut s = GuestState::default();
        (s.gpr[gpr::RDX], s.gpr[gpr::RSI]) = (0x80, 0x7010);
        assert!(gp(run(&mut s, &[0x6e], &mut mem, &mut ports)));
        assert_eq!(ports.0.len(), 2);
    }

    #[test]
    fn port_io_above_iopl_needs_clear_bitmap_bits_in_two_bytes_within_the_tss_limit() {
        // A TSS at 0x3000 whose bitmap (at offset 0x68) grants ports 0x3ff and 0x400 only; the
        // CPU reads the two bitmap bytes from the first port's.
        let mut mem = Pages::with(&[0x3000, 0x4000, 0x5000]);
        mem.write(0x3066, &0x68u16.to_le_bytes()).unwrap();
        mem.write(0x3068, &[0xff; 8193]).unwrap();
        mem.write(0x3068 + 0x7f, &[0x7f, 0xfe]).unwrap();
        let mut ports = Ports::default();
        let user = |limit: u32, dx: u64| {
            let mut s = GuestState::default();
            s.sys.tr.base = 0x3000;
            s.sys.tr.limit = limit;
            s.gpr[gpr::RDX] = dx;
            s
        };
        let full = 0x68 + 8192;
        // in al,dx / in ax,dx / in eax,dx
        let (inb, inw, ind) = ([0xec], [0x66, 0xed], [0xed]);
        let ok = |next: Next| next == Next::Continue;
        assert!(ok(run(&mut user(full, 0x3ff), &inb, &mut mem, &mut ports)));
        assert!(
            ok(run(&mut user(full, 0x3ff), &inw, &mut mem, &mut ports)),
            "bits in two bytes"
        );
        assert!(gp(run(&mut user(full, 0x3fe), &inb, &mut mem, &mut ports)));
        assert!(
            gp(run(&mut user(full, 0x3fe), &inw, &mut mem, &mut ports)),
            "first port denied"
        );
        assert!(
            gp(run(&mut user(full, 0x3ff), &ind, &mut mem, &mut ports)),
            "0x401 denied"
        );
        // The limit at the first port's byte: the second is past it.
        assert!(gp(run(&mut user(0x68 + 0x7f, 0x3ff), &inb, &mut mem, &mut ports)));
        assert!(ok(run(&mut user(0x68 + 0x80, 0x3ff), &inb, &mut mem, &mut ports)));
        // No bitmap room, a TSS shorter than its I/O map field, IOPL 3.
        mem.write(0x3066, &0x2000u16.to_le_bytes()).unwrap();
        assert!(gp(run(&mut user(full, 0x3ff), &inb, &mut mem, &mut ports)));
        assert!(gp(run(&mut user(0x60, 0x3ff), &inb, &mut mem, &mut ports)));
        let mut s = user(0x60, 0x3fe);
        s.rflags |= flags::IOPL;
        assert!(ok(run(&mut s, &inb, &mut mem, &mut ports)));
    }
}

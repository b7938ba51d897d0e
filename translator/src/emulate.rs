//! Instructions the engine performs itself (DESIGN §4, "sensitive and privileged"): CPUID,
//! RDTSC(P), SYSCALL, software interrupts, HLT and privileged instructions, and — under the
//! soft-MMU — the string instructions, whose implicit RSI/RDI accesses go through the page walk.

use crate::exit::{vector, Exit, GuestException};
use crate::platform::Platform;
use crate::rules::EmulateOp;
use crate::state::{flags, gpr, Cpl, GuestState};
use iced_x86::{Instruction, Mnemonic, Register};

/// Result of emulating one instruction.
pub enum Outcome {
    /// Continue at `state.rip`.
    Continue,
    /// Stop and report to the caller.
    Exit(Exit),
}

/// Guest memory as the string instructions see it.
pub trait GuestMemory {
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException>;
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException>;
}

fn set32(state: &mut GuestState, reg: usize, value: u32) {
    state.gpr[reg] = value as u64;
}

fn raise(state: &mut GuestState, rip: u64, exc: GuestException) -> Outcome {
    state.rip = rip;
    Outcome::Exit(Exit::Exception(exc))
}

/// Emulates a sensitive instruction at `state.rip`.
pub fn sensitive(state: &mut GuestState, instr: &Instruction, op: EmulateOp, platform: &mut dyn Platform) -> Outcome {
    let next = instr.next_ip();
    let here = instr.ip();
    let user = state.cpl == Cpl::User;
    match op {
        EmulateOp::Cpuid => {
            let r = platform.cpuid(state.gpr[gpr::RAX] as u32, state.gpr[gpr::RCX] as u32);
            set32(state, gpr::RAX, r[0]);
            set32(state, gpr::RBX, r[1]);
            set32(state, gpr::RCX, r[2]);
            set32(state, gpr::RDX, r[3]);
        }
        EmulateOp::Rdtsc | EmulateOp::Rdtscp => {
            let tsc = platform.rdtsc();
            set32(state, gpr::RAX, tsc as u32);
            set32(state, gpr::RDX, (tsc >> 32) as u32);
            if op == EmulateOp::Rdtscp {
                let aux = platform.tsc_aux();
                set32(state, gpr::RCX, aux);
            }
        }
        EmulateOp::Syscall if user => {
            state.gpr[gpr::RCX] = next;
            state.gpr[gpr::R11] = state.rflags & !flags::RF;
            state.rip = next;
            return Outcome::Exit(Exit::Syscall);
        }
        EmulateOp::Int3 => return raise(state, next, GuestException::new(vector::BP)),
        EmulateOp::IntN => {
            let n = instr.immediate8();
            // Linux's IDT lets user mode raise only #BP, #OF and int 0x80; anything else is #GP
            // with the IDT-entry error code.
            return match n {
                3 | 4 | 0x80 => raise(state, next, GuestException::new(n)),
                _ if user => raise(state, here, GuestException::gp(((n as u32) << 3) | 2)),
                _ => raise(state, next, GuestException::new(n)),
            };
        }
        EmulateOp::Ud => return raise(state, here, GuestException::new(vector::UD)),
        EmulateOp::Hlt if !user => {
            state.rip = next;
            return Outcome::Exit(Exit::Halt);
        }
        EmulateOp::Syscall | EmulateOp::Hlt | EmulateOp::Privileged => {
            // In user mode all of these are #GP(0). Kernel-mode semantics come with the
            // system-mode platform; until then kernel mode refuses them the same way.
            return raise(state, here, GuestException::gp(0));
        }
    }
    state.rip = next;
    Outcome::Continue
}

/// Flags of `a - b` at `bits` width (what `cmp` computes).
pub fn sub_flags(a: u64, b: u64, bits: u32) -> u64 {
    let mask = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let (a, b) = (a & mask, b & mask);
    let r = a.wrapping_sub(b) & mask;
    let sign = 1u64 << (bits - 1);
    let mut f = 0;
    if a < b {
        f |= flags::CF;
    }
    if r == 0 {
        f |= flags::ZF;
    }
    if r & sign != 0 {
        f |= flags::SF;
    }
    if (a ^ b) & (a ^ r) & sign != 0 {
        f |= flags::OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= flags::AF;
    }
    if (r as u8).count_ones() % 2 == 0 {
        f |= flags::PF;
    }
    f
}

fn read_n(mem: &mut dyn GuestMemory, va: u64, n: usize) -> Result<u64, GuestException> {
    let mut b = [0u8; 8];
    mem.read(va, &mut b[..n])?;
    Ok(u64::from_le_bytes(b))
}

/// Emulates a string instruction (with its REP prefix) at `state.rip`. Iterations that
/// completed before a fault stay done, as on the CPU.
pub fn string(state: &mut GuestState, instr: &Instruction, mem: &mut dyn GuestMemory) -> Result<Outcome, ()> {
    if instr.code().op_code().address_size() == 32 || instr.memory_size().size() == 0 {
        return Err(());
    }
    let n = instr.memory_size().size();
    let bits = (n * 8) as u32;
    let step = if state.rflags & flags::DF != 0 { (n as u64).wrapping_neg() } else { n as u64 };
    let src_base = match instr.segment_prefix() {
        Register::FS => state.fs_base,
        Register::GS => state.gs_base,
        _ => 0,
    };
    let mnemonic = instr.mnemonic();
    let rep = instr.has_rep_prefix() || instr.has_repne_prefix();
    let mask = if n == 8 { u64::MAX } else { (1u64 << bits) - 1 };
    loop {
        if rep && state.gpr[gpr::RCX] == 0 {
            break;
        }
        let rsi = state.gpr[gpr::RSI];
        let rdi = state.gpr[gpr::RDI];
        let result: Result<(), GuestException> = (|| {
            match mnemonic {
                Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq => {
                    let v = read_n(mem, src_base.wrapping_add(rsi), n)?;
                    mem.write(rdi, &v.to_le_bytes()[..n])?;
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step);
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step);
                }
                Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq => {
                    let v = state.gpr[gpr::RAX];
                    mem.write(rdi, &v.to_le_bytes()[..n])?;
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step);
                }
                Mnemonic::Lodsb | Mnemonic::Lodsw | Mnemonic::Lodsd | Mnemonic::Lodsq => {
                    let v = read_n(mem, src_base.wrapping_add(rsi), n)?;
                    let rax = &mut state.gpr[gpr::RAX];
                    *rax = match n {
                        4 => v,
                        8 => v,
                        _ => (*rax & !mask) | v,
                    };
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step);
                }
                Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd | Mnemonic::Cmpsq => {
                    let a = read_n(mem, src_base.wrapping_add(rsi), n)?;
                    let b = read_n(mem, rdi, n)?;
                    state.rflags = (state.rflags & !flags::STATUS) | sub_flags(a, b, bits);
                    state.gpr[gpr::RSI] = rsi.wrapping_add(step);
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step);
                }
                Mnemonic::Scasb | Mnemonic::Scasw | Mnemonic::Scasd | Mnemonic::Scasq => {
                    let b = read_n(mem, rdi, n)?;
                    state.rflags = (state.rflags & !flags::STATUS) | sub_flags(state.gpr[gpr::RAX], b, bits);
                    state.gpr[gpr::RDI] = rdi.wrapping_add(step);
                }
                _ => return Err(GuestException::new(vector::UD)),
            }
            Ok(())
        })();
        if let Err(exc) = result {
            return Ok(Outcome::Exit(Exit::Exception(exc)));
        }
        if !rep {
            break;
        }
        state.gpr[gpr::RCX] -= 1;
        let compares = matches!(
            mnemonic,
            Mnemonic::Cmpsb
                | Mnemonic::Cmpsw
                | Mnemonic::Cmpsd
                | Mnemonic::Cmpsq
                | Mnemonic::Scasb
                | Mnemonic::Scasw
                | Mnemonic::Scasd
                | Mnemonic::Scasq
        );
        if compares {
            let zf = state.rflags & flags::ZF != 0;
            if (instr.has_repe_prefix() && !zf) || (instr.has_repne_prefix() && zf) {
                break;
            }
        }
    }
    state.rip = instr.next_ip();
    Ok(Outcome::Continue)
}

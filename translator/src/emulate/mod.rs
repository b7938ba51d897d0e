//! Instructions the engine performs itself (DESIGN §4, "sensitive and privileged"): CPUID,
//! RDTSC(P), SYSCALL, software interrupts, HLT and privileged instructions (this file), segment
//! loads and far transfers (`segment.rs`), and — under the soft-MMU, where implicit memory must
//! go through the page walk — string instructions (`string.rs`), xlat, enter, gathers and masked
//! stores (`implicit.rs`).

pub mod f16c;
pub mod implicit;
pub mod regs;
pub mod rtm;
pub mod segment;
pub mod string;
pub mod x87;

use crate::exit::{vector, Exit, GuestException};
use crate::platform::Platform;
use crate::rules::EmulateOp;
use crate::state::{flags, gpr, Cpl, GuestState};
use iced_x86::Instruction;

/// The engine has no implementation for this form (e.g. a 32-bit-address-size string op).
#[derive(Debug, Clone, Copy)]
pub struct NotEmulated;

/// Result of emulating one instruction.
pub enum Outcome {
    /// Continue at `state.rip`.
    Continue,
    /// Stop and report to the caller.
    Exit(Exit),
}

/// Guest memory as emulated instructions see it: non-canonical addresses raise `#GP(0)`,
/// alignment checking applies to 2/4/8-byte accesses, paging faults are precise.
pub trait GuestMemory {
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException>;
    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException>;

    /// Reads an `n`-byte (n ≤ 8) little-endian value.
    fn read_le(&mut self, va: u64, n: usize) -> Result<u64, GuestException> {
        let mut b = [0u8; 8];
        self.read(va, &mut b[..n])?;
        Ok(u64::from_le_bytes(b))
    }

    /// A supervisor access the CPU makes itself, whatever the CPL (descriptor tables, the TSS,
    /// interrupt-delivery pushes): no user/supervisor check, no alignment check.
    fn read_system(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
        self.read(va, buf)
    }
    fn write_system(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        self.write(va, data)
    }

    /// Checks that the `len` (≤ 16) bytes at `va` could be written, as a write would (alignment
    /// check, page walk, fault with a write's error code), without writing them.
    fn probe_write(&mut self, va: u64, len: usize) -> Result<(), GuestException> {
        // Without a page walk of its own, a memory can only write back what it reads.
        let mut buf = [0u8; 16];
        self.read(va, &mut buf[..len])?;
        self.write(va, &buf[..len])
    }

    /// `len` bytes from `src` to `dst`, each range within one page (a `rep movs` chunk, which
    /// the caller keeps clear of overlap that would change the result): the source is checked
    /// first, then the destination, and nothing is written if either faults.
    fn copy(&mut self, dst: u64, src: u64, len: usize) -> Result<(), GuestException> {
        let mut buf = [0u8; 4096];
        let buf = &mut buf[..len];
        self.read(src, buf)?;
        self.write(dst, buf)
    }

    /// `len` bytes at `dst` (within one page) filled with copies of `element` (a `rep stos`
    /// chunk; `len` is a multiple of its size).
    fn fill(&mut self, dst: u64, len: usize, element: &[u8]) -> Result<(), GuestException> {
        let mut buf = [0u8; 4096];
        let buf = &mut buf[..len];
        for e in buf.chunks_exact_mut(element.len()) {
            e.copy_from_slice(element);
        }
        self.write(dst, buf)
    }
}

/// A stack address: non-canonical stack references raise `#SS(0)` rather than `#GP(0)`.
pub fn stack_address(va: u64) -> Result<u64, GuestException> {
    if crate::mmu::is_canonical(va) {
        Ok(va)
    } else {
        Err(GuestException {
            vector: 12,
            error_code: Some(0),
            address: None,
        })
    }
}

/// A value from the host's RDRAND or RDSEED, if the host has the instruction (retried as Intel
/// recommends while the generator reports it has none ready).
fn host_random(mnemonic: iced_x86::Mnemonic) -> Option<u64> {
    use crate::host::features::host_has;
    use iced_x86::CpuidFeature;
    let seed = mnemonic == iced_x86::Mnemonic::Rdseed;
    if !host_has(if seed {
        CpuidFeature::RDSEED
    } else {
        CpuidFeature::RDRAND
    }) {
        return None;
    }
    let mut v = 0u64;
    for _ in 0..100 {
        // SAFETY: the host has the instruction (checked above); it only writes `v`.
        let ok = unsafe {
            if seed {
                std::arch::x86_64::_rdseed64_step(&mut v)
            } else {
                std::arch::x86_64::_rdrand64_step(&mut v)
            }
        };
        if ok == 1 {
            return Some(v);
        }
        std::hint::spin_loop();
    }
    None
}

fn set32(state: &mut GuestState, reg: usize, value: u32) {
    state.gpr[reg] = value as u64;
}

fn raise(state: &mut GuestState, rip: u64, exc: GuestException) -> Outcome {
    state.rip = rip;
    Outcome::Exit(Exit::Exception(exc))
}

/// A privileged or system instruction at CPL3 (user-mode translation): #GP(0), as the CPU
/// raises for each of them there (with IOPL 0 and no TSS I/O bitmap for `in`/`out`/`cli`/`sti`).
pub fn privileged_in_user_mode(state: &mut GuestState, instr: &Instruction) -> Outcome {
    raise(state, instr.ip(), GuestException::gp(0))
}

/// Emulates a sensitive instruction at `state.rip` (user-mode semantics).
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
        EmulateOp::Random => {
            let Some(v) = host_random(instr.mnemonic()) else {
                // The host lacks the instruction (CPUID says so to the guest too): a CPU without
                // it raises #UD.
                return raise(state, here, GuestException::new(vector::UD));
            };
            regs::write_gpr(state, instr.op0_register(), v);
            // CF=1: a value was available; OF, SF, ZF, AF, PF cleared.
            state.rflags = (state.rflags & !flags::STATUS) | flags::CF;
        }
        EmulateOp::Rdpid => {
            let aux = platform.tsc_aux();
            regs::write_gpr(state, instr.op0_register(), aux as u64);
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
        // icebp is a #DB trap; where the RIP a Linux process sees points differs by host.
        EmulateOp::Int1 => {
            let rip = if crate::host::quirks::int1_reports_rip_at_instruction() {
                here
            } else {
                next
            };
            return raise(state, rip, GuestException::new(vector::DB));
        }
        EmulateOp::Xgetbv => {
            const CR4_OSXSAVE: u64 = 1 << 18;
            if state.cr4 & CR4_OSXSAVE == 0 {
                return raise(state, here, GuestException::new(vector::UD));
            }
            let value = match state.gpr[gpr::RCX] as u32 {
                0 => state.xcr0,
                // XINUSE, where the CPU has XGETBV1: the exit glue's `xsave` recorded the
                // guest's in XSTATE_BV (the host's own XINUSE now describes hbt, not the guest).
                1 if xgetbv1_supported() => state.xsave.xstate_bv() & state.xcr0,
                _ => return raise(state, here, GuestException::gp(0)),
            };
            set32(state, gpr::RAX, value as u32);
            set32(state, gpr::RDX, (value >> 32) as u32);
        }
        EmulateOp::Transaction => return rtm::execute(state, instr, platform),
        // Translated inline where the guest has it (`Rule::runs_in_engine`); here only where
        // it does not: the guest's CPUID is the host's, which lacks it.
        EmulateOp::Serialize if !crate::host::features::host_has(iced_x86::CpuidFeature::SERIALIZE) => {
            return raise(state, here, GuestException::new(vector::UD));
        }
        EmulateOp::Serialize => {}
        EmulateOp::Segment => unreachable!("segment instructions are handled by emulate::segment"),
        // Kernel-mode guests run in system mode (`system::execute`), never here.
        EmulateOp::Syscall => return raise(state, here, GuestException::gp(0)),
        // Only 32-bit code has these rules (`rules::rule_compat`), and only system mode runs it.
        EmulateOp::Sysenter | EmulateOp::PushPopAll => return raise(state, here, GuestException::new(vector::UD)),
    }
    state.rip = next;
    Outcome::Continue
}

/// CPUID.(0DH,1):EAX bit 2: `xgetbv` with ECX = 1 reads XINUSE.
fn xgetbv1_supported() -> bool {
    std::arch::x86_64::__cpuid_count(0xd, 1).eax & (1 << 2) != 0
}

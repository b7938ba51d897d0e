//! System instructions inlined at CPL0 of a whole machine (`rules::Rule::runs_in_engine`
//! says which): each was a block end and a trip through the engine, and a Linux kernel runs
//! them on its hottest paths — `swapgs` twice per system call, CR2 in every page fault, CR3 at
//! every context switch, the TSC in the scheduler's clock. What they read or write is guest
//! state in the context, or the host's TSC where the platform says the guest's is the same.
//!
//! `serialize` is inlined in every mode: its one effect a translated guest can observe is the
//! ordering of its memory accesses (a host `mfence`); the instruction-fetch half is already
//! true here, since a write to translated code invalidates it before the next fetch
//! (`engine/smc.rs`). Linux's `sync_core` uses it where CPUID offers it — after every text
//! patch — instead of an `iretq` to itself, which the engine emulates (≈108,000 per boot).

use super::asm;
use super::BlockEmitter;
use crate::context::{off, ExitReason};
use crate::rules::{EmulateOp, Rule};
use crate::system::SystemOp;
use iced_x86::{Code, Instruction, Register};

impl BlockEmitter<'_> {
    /// Emits an engine rule that `Rule::runs_in_engine` lets translated code perform at CPL0.
    pub(super) fn inline_system(&mut self, instr: &Instruction, rule: Rule, bytes: &[u8]) {
        match rule {
            // IF is virtual, and no interrupt can become deliverable by clearing it.
            Rule::System(SystemOp::Cli) => self.asm.store_ctx_u64(off::VIRTUAL_IF, 0),
            Rule::System(SystemOp::Sti) => self.sti(instr),
            Rule::System(SystemOp::Swapgs) => self.swapgs(),
            Rule::System(SystemOp::MovCr) => self.read_cr(instr),
            Rule::Emulate(EmulateOp::Segment) => self.read_selector(instr),
            Rule::Emulate(EmulateOp::Rdtsc) => self.raw(bytes),
            Rule::Emulate(EmulateOp::Rdtscp) => {
                // The host's TSC_AUX (its CPU number) replaced by the guest's.
                self.raw(bytes);
                let aux = asm::ctx(off::TSC_AUX);
                self.asm
                    .glue(Instruction::with2(Code::Mov_r32_rm32, Register::ECX, aux));
            }
            Rule::Emulate(EmulateOp::Serialize) => self.raw(&[0x0f, 0xae, 0xf0]), // mfence
            _ => unreachable!("{rule:?} runs in the engine"),
        }
    }

    /// `mov r64, crN` (N = 0, 2, 3, 4, 8): the guest's control register, from its state.
    fn read_cr(&mut self, instr: &Instruction) {
        let field = match instr.op1_register() {
            Register::CR0 => off::CR0,
            Register::CR2 => off::CR2,
            Register::CR3 => off::CR3,
            Register::CR4 => off::CR4,
            _ => off::CR8,
        };
        self.asm.mov_from_ctx(instr.op0_register().full_register(), field);
    }

    /// `mov r, sreg`: the selector, zero-extended into a 32- or 64-bit register, or into the
    /// low 16 bits of a 16-bit one (the rest kept).
    fn read_selector(&mut self, instr: &Instruction) {
        let dst = instr.op0_register();
        let selector = asm::ctx(off::SEG + 2 * crate::emulate::regs::sreg_index(instr.op1_register()));
        let load = if dst.size() == 2 {
            Instruction::with2(Code::Mov_r16_rm16, dst, selector)
        } else {
            Instruction::with2(Code::Movzx_r32_rm16, super::memop::reg32(dst), selector)
        };
        self.asm.glue(load);
    }

    /// `sti` at CPL0: sets the virtual IF, and when the interrupt controller's INTR line is up
    /// returns to the dispatcher after it, which takes the interrupt once `sti`'s shadow has
    /// passed; otherwise goes on. Flag-free:
    ///
    /// ```text
    ///   mov qword gs:[virtual_if],0x200; spill rcx; mov rcx,line; movzx ecx,byte [rcx]
    ///   jrcxz +5; jmp window   ; (cold) reload rcx, exit InterruptWindow at the next RIP
    ///   reload rcx
    /// ```
    fn sti(&mut self, instr: &Instruction) {
        let line = self.interrupt_line.expect("sti is inlined only with an INTR line");
        self.asm.store_ctx_u64(off::VIRTUAL_IF, crate::state::flags::IF);
        self.borrow(Register::RCX);
        self.asm.mov_imm64(Register::RCX, line);
        self.exit_if_flag(
            iced_x86::MemoryOperand::with_base(Register::RCX),
            ExitReason::InterruptWindow,
            instr.next_ip(),
        );
    }

    /// `swapgs` at CPL0: the guest's GS base and KERNEL_GS_BASE trade places in its state
    /// (a Linux system call makes two; each ended a block and went through the engine).
    fn swapgs(&mut self) {
        let a = self.take_scratch(0);
        let b = self.take_scratch(1 << asm::reg_num(a));
        self.asm.mov_from_ctx(a, off::GS_BASE);
        self.asm.mov_from_ctx(b, off::KERNEL_GS_BASE);
        self.asm.mov_to_ctx(off::GS_BASE, b);
        self.asm.mov_to_ctx(off::KERNEL_GS_BASE, a);
        self.release_scratch(b);
        self.release_scratch(a);
    }
}

//! `rep stos` and `rep movs` under the soft-MMU, run in place: when the direction flag is clear and the destination (and source) stay inside
//! one page each, both pages are found through the inline TLB and the guest's own instruction
//! runs natively on their host addresses, with RDI/RSI pointing there for its duration.
//! Anything else — DF set, a range that crosses a page, a TLB miss — goes to the engine as
//! before (`emulate/string.rs`).
//!
//! Why: a Linux kernel clears and copies pages with `rep stosq`/`rep movsq` and runs memset and
//! memcpy as `rep stosb`/`rep movsb`; performed by the engine, each cost a round trip through
//! the dispatcher (≈300k of a boot's 500k engine-performed instructions).
//!
//! Why it is exact: a TLB hit for a page means the access is allowed there (the entry was filled
//! by a walk for that privilege and kind; write entries never exist for pages holding translated
//! code, so self-modifying stores still miss), so an in-page range cannot fault; the native
//! instruction then does what the CPU does on the guest's pages (overlap included: both are the
//! same host memory). It never raises #AC: at CPL0 RFLAGS.AC is virtual, and user code takes
//! this path for the wider forms only when RDI (and RSI) are aligned to the element size, so no
//! element can be misaligned (otherwise the engine performs it, checking each element). The
//! instruction is never the first of a block (the engine performs those), so a TLB miss
//! restarts it in the engine.
//!
//! 32-bit code (`Mode::compat`) counts in ECX and addresses through ESI/EDI: their upper
//! halves are cleared first, the instruction runs in its 64-bit addressing form on the host
//! addresses, and ESI/EDI are truncated after. A static i386 glibc's `memcpy` is `rep movsl`
//! plus `rep movsb`: performed by the engine, a 32-bit `qsort` of 1M ints made 3.3 million trips
//! through the dispatcher (AMD EPYC, `--accel bt`: 0.9 s, 0.5 s in place).
//!
//! User code matters too: a static glibc's `memcpy` copies 64-byte blocks with `rep movsb`
//! (busybox `sha256sum` ran one per 64 bytes hashed: ≈1M trips through the dispatcher for a
//! 64 MiB file, about half its time under `--accel bt`).
//!
//! ```text
//!   save flags; t = guest flags; bt t,10 (DF); jc engine
//!   cmp rcx,4096/n; ja engine; test rcx,rcx; jz done
//!   t = (rdi & 0xfff) + rcx*n; cmp t,4096; ja engine      (the same for rsi)
//!   user code, n > 1: test rdi|rsi, n-1; jnz engine
//!   s = host(rsi) for reading; d = host(rdi) for writing   (inline TLB; a miss exits)
//!   t = rdi; rdi = d; (u = rsi; rsi = s); rep stos/movs; rdi += t - d; (rsi += u - s)
//!   give back the scratch registers; restore flags
//! done: jmp next instruction (a chainable block exit)
//! ```

use super::asm::reg_num;
use super::{BlockEmitter, Cold};
use crate::context::off;
use crate::error::TranslateError;
use crate::mmu::Access;
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, OpKind, Register};

const PAGE: u32 = 4096;
const DF_BIT: i32 = 10;

/// Bit per hardware number.
fn bit(r: Register) -> u16 {
    1 << reg_num(r)
}

impl BlockEmitter<'_> {
    /// Whether `instr` takes the in-place path (see the module comment).
    pub(super) fn string_in_place(&self, instr: &Instruction) -> bool {
        // 64-bit code addresses through RSI/RDI, 32-bit code through ESI/EDI.
        let (source, destination) = if self.mode.compat {
            (OpKind::MemorySegESI, OpKind::MemoryESEDI)
        } else {
            (OpKind::MemorySegRSI, OpKind::MemoryESRDI)
        };
        let kind = matches!(
            instr.mnemonic(),
            Mnemonic::Stosb | Mnemonic::Stosw | Mnemonic::Stosd | Mnemonic::Stosq
        ) || (matches!(
            instr.mnemonic(),
            Mnemonic::Movsb | Mnemonic::Movsw | Mnemonic::Movsd | Mnemonic::Movsq
        ) && instr.op1_kind() == source);
        self.soft_mmu
            && !self.split_access
            && kind
            && instr.has_rep_prefix()
            && instr.op0_kind() == destination
            && !matches!(instr.segment_prefix(), Register::FS | Register::GS)
    }

    /// Emits `instr` (a `rep stos`/`rep movs` for which [`Self::string_in_place`] holds).
    pub(super) fn string(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        let n = instr.memory_size().size() as u32;
        let movs = matches!(instr.op1_kind(), OpKind::MemorySegRSI | OpKind::MemorySegESI);
        let used = bit(Register::RCX) | bit(Register::RDI) | if movs { bit(Register::RSI) } else { bit(Register::RAX) };
        let compat = self.mode.compat;
        self.save_flags();
        let t = self.pick(used);
        self.borrow(t);
        let mut to_engine = Vec::new();
        let a = &mut self.asm;
        if compat {
            // 32-bit code counts in ECX and addresses through ESI/EDI: their upper halves are
            // not the program's (the engine's path clears them too, `emulate/string.rs`).
            for r in [Register::ECX, Register::ESI, Register::EDI] {
                a.glue(Instruction::with2(Code::Mov_r32_rm32, r, r));
            }
        }
        a.mov_from_ctx(t, off::FLAG_SLOT);
        // FLAG_SLOT holds the address of the saved flags: load them.
        a.glue(Instruction::with2(Code::Mov_r64_rm64, t, MemoryOperand::with_base(t)));
        a.glue(Instruction::with2(Code::Bt_rm64_imm8, t, DF_BIT));
        to_engine.push(a.branch32_forward(Code::Jb_rel32_64));
        a.glue(Instruction::with2(
            Code::Cmp_rm64_imm32,
            Register::RCX,
            (PAGE / n) as i32,
        ));
        to_engine.push(a.branch32_forward(Code::Ja_rel32_64));
        a.glue(Instruction::with2(Code::Test_rm64_r64, Register::RCX, Register::RCX));
        let nothing = a.branch32_forward(Code::Je_rel32_64);
        for base in if movs {
            &[Register::RDI, Register::RSI][..]
        } else {
            &[Register::RDI][..]
        } {
            // t = offset in its page + the length: more than a page means it crosses.
            a.glue(Instruction::with2(Code::Mov_r64_rm64, t, *base));
            a.glue(Instruction::with2(Code::And_rm64_imm32, t, (PAGE - 1) as i32));
            a.glue(Instruction::with2(
                Code::Lea_r64_m,
                t,
                MemoryOperand::new(t, Register::RCX, n, 0, 0, false, Register::None),
            ));
            a.glue(Instruction::with2(Code::Cmp_rm64_imm32, t, PAGE as i32));
            to_engine.push(a.branch32_forward(Code::Ja_rel32_64));
        }
        if n > 1 && !self.mode.kernel {
            // User code with wider elements: only where none can be misaligned, so no #AC is
            // possible whatever CR0.AM and RFLAGS.AC (the engine checks each element).
            a.glue(Instruction::with2(Code::Mov_r64_rm64, t, Register::RDI));
            if movs {
                a.glue(Instruction::with2(Code::Or_r64_rm64, t, Register::RSI));
            }
            a.glue(Instruction::with2(Code::Test_rm64_imm32, t, (n - 1) as i32));
            to_engine.push(a.branch32_forward(Code::Jne_rel32_64));
        }
        let (spilled, guest_rip) = (self.spilled, self.guest_rip);
        self.cold.push(Cold::ToEngine {
            fields: to_engine,
            guest_rip,
            spilled,
            flags_saved: true,
        });
        // Host addresses of the two ranges (a miss exits: the engine performs the instruction).
        // The source first: the CPU reads [RSI] before it writes [RDI], so when both would
        // fault, the read's #PF is the one the guest sees.
        let src = if movs {
            let s = self.pick(used | bit(t));
            self.borrow(s);
            self.asm.glue(Instruction::with2(Code::Mov_r64_rm64, s, Register::RSI));
            self.tlb_lookup(s, Access::Read, 1, used | bit(t) | bit(s));
            Some(s)
        } else {
            None
        };
        let taken = used | bit(t) | src.map_or(0, bit);
        let d = self.pick(taken);
        self.borrow(d);
        self.asm.glue(Instruction::with2(Code::Mov_r64_rm64, d, Register::RDI));
        self.tlb_lookup(d, Access::Write, 1, taken | bit(d));
        let src = src.map(|s| {
            let u = self.pick(taken | bit(d));
            self.borrow(u);
            (s, u)
        });
        // The guest's own instruction, on the host addresses.
        let a = &mut self.asm;
        a.glue(Instruction::with2(Code::Mov_r64_rm64, t, Register::RDI));
        a.glue(Instruction::with2(Code::Mov_r64_rm64, Register::RDI, d));
        if let Some((s, u)) = src {
            a.glue(Instruction::with2(Code::Mov_r64_rm64, u, Register::RSI));
            a.glue(Instruction::with2(Code::Mov_r64_rm64, Register::RSI, s));
        }
        let mut native = *instr;
        native.set_segment_prefix(Register::None);
        if compat {
            // On the host addresses, which are 64-bit: the 64-bit addressing forms.
            native.set_op0_kind(OpKind::MemoryESRDI);
            if movs {
                native.set_op1_kind(OpKind::MemorySegRSI);
            }
        }
        a.emit(&native)?;
        a.glue(Instruction::with2(Code::Sub_r64_rm64, Register::RDI, d));
        a.glue(Instruction::with2(Code::Add_r64_rm64, Register::RDI, t));
        if compat {
            // A range ending at the top of the 4 GiB space leaves EDI at 0.
            a.glue(Instruction::with2(Code::Mov_r32_rm32, Register::EDI, Register::EDI));
        }
        if let Some((s, u)) = src {
            a.glue(Instruction::with2(Code::Sub_r64_rm64, Register::RSI, s));
            a.glue(Instruction::with2(Code::Add_r64_rm64, Register::RSI, u));
            if compat {
                a.glue(Instruction::with2(Code::Mov_r32_rm32, Register::ESI, Register::ESI));
            }
            self.give_back(u);
            self.give_back(s);
        }
        self.give_back(d);
        self.bind_here(nothing);
        self.give_back(t);
        self.restore_flags();
        // The instruction ended the block: go on at the next one (a chainable exit).
        self.exit_jump(Code::Jmp_rel32_64, instr.next_ip());
        Ok(())
    }
}

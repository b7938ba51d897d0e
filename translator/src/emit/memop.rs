//! Explicit memory operands through the memory strategy.
//!
//! Identity: the guest instruction runs as is, except RIP-relative operands (the code moved;
//! re-encoded at the new address, or through a scratch register when out of rel32 range) and
//! FS/GS overrides (the host's FS and GS are not the guest's: the guest base is added in a
//! scratch register).
//!
//! Soft-MMU: the effective address goes into a scratch register S, then the inline TLB lookup
//!
//! ```text
//!   lea T,[S+size-1]; xor T,S; shr T,12; jnz miss     ; access crosses a page: slow path
//!   mov T,S; shr T,12; movzx U,T8; shl U,4            ; T = page number, U = entry offset
//!   add T,gs:[U+tlb.tag]; jne miss                     ; the tag is −(page number)
//!   add S,gs:[U+tlb.addend]                            ; S = host address
//! ```
//!
//! and the instruction is re-encoded with `[S]`. The lookup clobbers flags, so when guest flags
//! are live there they are parked on the host flag stack around it. A miss restores every
//! borrowed register and exits; the engine walks the page tables and restarts the instruction.

use super::asm::{reg_num, Asm};
use super::{BlockEmitter, Cold};
use crate::context::{
    off, MISS_AC_SHIFT, MISS_ALIGN_PLAIN_GP, MISS_ALIGN_SHIFT, MISS_ALIGN_WAIVED_BY_MM, MISS_F16C_STORE,
    MISS_MMX_STORE, MISS_PARTIAL, MISS_WINDOW, MISS_WINDOW_SETTLED,
};
use crate::error::TranslateError;
use crate::mmu::Access;
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, OpAccess, OpKind, Register};

const GPR32: [Register; 16] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
    Register::R8D,
    Register::R9D,
    Register::R10D,
    Register::R11D,
    Register::R12D,
    Register::R13D,
    Register::R14D,
    Register::R15D,
];

pub(super) fn reg32(r: Register) -> Register {
    GPR32[reg_num(r)]
}

/// What an instruction does with the general-purpose registers (a bit per hardware number)
/// and its memory operand, from iced's `InstructionInfo` — worked out once per instruction of
/// a block ([`BlockEmitter::uses`]): the planners and the emitters asked for it up to six
/// times per instruction, ≈10% of a Linux boot's translation time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Uses {
    /// Read or written, explicitly or not.
    pub named: u16,
    /// Written, any part of them.
    pub written: u16,
    /// Read, or written only in part (an 8- or 16-bit write keeps the rest).
    pub read: u16,
    /// Only overwritten whole (a 32- or 64-bit write) and not read.
    pub overwritten: u16,
    /// How the memory operand is accessed: read, write (a read-modify-write counts as a
    /// write), or not at all (`lea`, `nop r/m`, prefetches, no memory operand).
    pub memory: Option<Access>,
}

impl Uses {
    pub(super) fn of(info: &iced_x86::InstructionInfo) -> Uses {
        let mut u = Uses {
            memory: info.used_memory().iter().find_map(|m| match m.access() {
                OpAccess::Read | OpAccess::CondRead => Some(Access::Read),
                OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite => {
                    Some(Access::Write)
                }
                _ => None,
            }),
            ..Uses::default()
        };
        let mut overwritten = 0;
        for used in info.used_registers().iter().filter(|u| u.register().is_gpr()) {
            let bit = 1 << reg_num(used.register());
            u.named |= bit;
            let access = used.access();
            if !matches!(access, OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess) {
                u.written |= bit;
            }
            if access == OpAccess::Write && used.register().size() >= 4 {
                overwritten |= bit;
            } else {
                u.read |= bit;
            }
        }
        u.overwritten = overwritten & !u.read;
        u
    }
}

/// `bt/bts/btr/btc m, r`: the register operand offsets the address.
pub(super) fn is_bit_string_op(instr: &Instruction) -> bool {
    matches!(
        instr.mnemonic(),
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
    ) && instr.op0_kind() == OpKind::Memory
        && instr.op1_kind() == OpKind::Register
}

/// The modrm form of a `moffs` move (the rewritten operand is `[S]`, which moffs cannot encode).
fn modrm_form(code: Code) -> Code {
    match code {
        Code::Mov_AL_moffs8 => Code::Mov_r8_rm8,
        Code::Mov_AX_moffs16 => Code::Mov_r16_rm16,
        Code::Mov_EAX_moffs32 => Code::Mov_r32_rm32,
        Code::Mov_RAX_moffs64 => Code::Mov_r64_rm64,
        Code::Mov_moffs8_AL => Code::Mov_rm8_r8,
        Code::Mov_moffs16_AX => Code::Mov_rm16_r16,
        Code::Mov_moffs32_EAX => Code::Mov_rm32_r32,
        Code::Mov_moffs64_RAX => Code::Mov_rm64_r64,
        other => other,
    }
}

/// Whether `instr` names AH, CH, DH or BH (then no REX prefix is allowed).
pub(super) fn uses_high8(instr: &Instruction) -> bool {
    instr.op_kinds().enumerate().any(|(n, k)| {
        k == OpKind::Register
            && matches!(
                instr.op_register(n as u32),
                Register::AH | Register::CH | Register::DH | Register::BH
            )
    })
}

/// A guest memory operand's address expression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct MemKey {
    base: Register,
    index: Register,
    scale: u32,
    displacement: u64,
    segment: Register,
}

impl MemKey {
    fn of(instr: &Instruction) -> Self {
        MemKey {
            base: instr.memory_base().full_register(),
            index: instr.memory_index().full_register(),
            scale: instr.memory_index_scale(),
            displacement: instr.memory_displacement64(),
            segment: instr.segment_prefix(),
        }
    }
}

/// The soft-MMU host address of a copied instruction's memory operand, kept in the register S
/// that was borrowed for it: the next instruction, if it is copied too and has the same operand
/// and access size (reads, or writes after a write), uses it without a second TLB lookup
/// (`add [rsi+rdx*8],rcx; add rax,[rsi+rdx*8]`). Between the two nothing can change the TLB
/// (only the engine does, and the block does not return to it) or the operand's registers (the
/// first instruction does not write them). The next instruction of any other kind gives S back.
#[derive(Clone, Copy, Debug)]
pub(super) struct HeldAddress {
    s: Register,
    key: MemKey,
    size: u64,
    write: bool,
}

impl BlockEmitter<'_> {
    /// Bytes the soft-MMU checks for `instr`'s memory operand. The XSAVE family has no size in
    /// iced: the guest's standard-format image for its XCR0 (the largest the instruction can
    /// touch).
    pub(super) fn access_size(&self, instr: &Instruction) -> u64 {
        match instr.memory_size().size() as u64 {
            0 => crate::cpu::xsave::XsaveLayout::host().size(self.guest_xcr0) as u64,
            n => n,
        }
    }

    /// Emits `instr` (which has one explicit memory operand) through the strategy. `raw` are the
    /// guest bytes when `instr` is a guest instruction that may be copied verbatim; `avoid` adds
    /// registers scratch selection must not use.
    pub(super) fn mem_instr(
        &mut self,
        instr: &Instruction,
        raw: Option<&[u8]>,
        avoid: u16,
    ) -> Result<(), TranslateError> {
        let uses = self.uses(instr);
        let key = MemKey::of(instr);
        // Whether the instruction changes a register its own address is made of (then its
        // host address cannot serve the next instruction).
        let written = uses.written;
        let writes_key = [key.base, key.index]
            .iter()
            .any(|r| r.is_gpr() && written & (1 << reg_num(*r)) != 0);
        let access = uses.memory;
        if let Some(access) = access {
            if self.narrows_xstate(instr) {
                return self.xstate_instr(instr, access);
            }
        }
        let seg = matches!(instr.segment_prefix(), Register::FS | Register::GS);
        let rip_rel = instr.is_ip_rel_memory_operand();
        let index = instr.memory_index();
        let vsib = index.is_xmm() || index.is_ymm() || index.is_zmm();
        if let Some(h) = self.held.take() {
            let used = self.used_gprs(instr) | avoid;
            let high8 = uses_high8(instr);
            let fits = self.soft_mmu
                && access.is_some_and(|a| a == Access::Read || h.write)
                && h.key == key
                && raw.is_some()
                && !rip_rel
                && !vsib
                && !is_bit_string_op(instr)
                && !self.narrows_xstate(instr)
                && self.access_size(instr) == h.size
                && !self.required_alignment.image
                && used & (1 << reg_num(h.s)) == 0
                && !(high8 && reg_num(h.s) >= 8);
            if fits {
                // The previous instruction's lookup found this operand's page (for writing,
                // when this one writes), and nothing between changed the TLB or the operand's
                // registers: S still holds the host address.
                self.emit_at_register(instr, h.s)?;
                let write = h.write;
                self.hold_or_give_back(h.s, key, h.size, write, writes_key);
                return Ok(());
            }
            if used & (1 << reg_num(h.s)) == 0 {
                self.release_scratch(h.s);
            } else {
                self.give_back(h.s);
            }
        }

        let Some(access) = access else {
            // lea, nop r/m, prefetch: no access. Only lea has an architectural result.
            if rip_rel && instr.mnemonic() == iced_x86::Mnemonic::Lea {
                let value = instr.ip_rel_memory_address();
                let dst = instr.op0_register();
                let mov = match dst.size() {
                    8 => Instruction::with2(Code::Mov_r64_imm64, dst, value),
                    4 => Instruction::with2(Code::Mov_r32_imm32, dst, value as u32),
                    _ => Instruction::with2(Code::Mov_r16_imm16, dst, value as u16 as u32),
                };
                self.asm.glue(mov);
            } else if !rip_rel {
                self.emit_guest(instr, raw)?;
            }
            return Ok(());
        };

        if !self.soft_mmu && !seg {
            if !rip_rel {
                return self.emit_guest(instr, raw);
            }
            let start = self.asm.buf.len();
            if self.asm.emit(instr).is_ok() {
                self.site_here(start);
                return Ok(());
            }
            // Out of rel32 range from the code cache, but a target in the low 2 GiB (non-PIE
            // programs) is reachable as an absolute `[disp32]`, without a scratch register.
            let target = instr.ip_rel_memory_address();
            if target as i64 == target as i32 as i64 {
                let mut absolute = *instr;
                absolute.set_memory_base(Register::None);
                absolute.set_memory_index(Register::None);
                absolute.set_memory_displacement64(target);
                absolute.set_memory_displ_size(8); // disp32 sign-extended, 64-bit addressing
                let start = self.asm.buf.len();
                self.asm.emit(&absolute)?;
                self.site_here(start);
                return Ok(());
            }
        }
        if vsib {
            return Err(TranslateError::Unsupported {
                rip: instr.ip(),
                text: instr.to_string(),
                code: format!("{:?}", instr.code()),
                bytes: "(vector-indexed operand under the soft-MMU or with FS/GS)".into(),
            });
        }
        let used = self.used_gprs(instr) | avoid;
        // With AH/CH/DH/BH in the instruction no REX prefix is allowed: S must be a legacy register.
        let high8 = uses_high8(instr);
        let s = self.take_scratch(used | if high8 { 0xff00 } else { 0 });
        if !self.soft_mmu && seg && !rip_rel {
            if let Some(rewritten) = Self::segment_base_operand(instr, s) {
                // Identity FS/GS: S = guest base, folded into the operand as base or index
                // (stack-protector and TLS accesses: one load instead of an address computation).
                let field = if instr.segment_prefix() == Register::FS {
                    off::FS_BASE
                } else {
                    off::GS_BASE
                };
                self.asm.mov_from_ctx(s, field);
                let start = self.asm.buf.len();
                self.asm.emit(&rewritten)?;
                self.site_here(start);
                self.release_scratch(s);
                return Ok(());
            }
        }
        // The flag-free lookup needs RCX (for `jrcxz`) and BMI2 (`shrx`); bit-string operands
        // compute their word offset with flag-setting arithmetic.
        let flag_free = self.soft_mmu
            && !is_bit_string_op(instr)
            && crate::host::features::host_has(iced_x86::CpuidFeature::BMI2)
            && s != Register::RCX
            && (self.spilled & (1 << 1) == 0 || self.borrowed_idle(Register::RCX));
        if self.soft_mmu && !flag_free {
            // This lookup clobbers flags; guest flags are kept even when the program no longer
            // needs them, because a fault here must show the guest its flags unchanged.
            self.save_flags();
        }
        self.address_into(s, instr, used);
        self.mem_base = instr.memory_base();
        let mut rewritten = *instr;
        let mut bit_reg = None;
        if self.soft_mmu && is_bit_string_op(instr) {
            // bt/bts/btr/btc m,r address a bit string: the register's high bits select the word.
            let d = self.pick(used | (1 << reg_num(s)));
            self.borrow(d);
            let src = instr.op1_register();
            let width = src.size() as u64 * 8;
            let a = &mut self.asm;
            match width {
                16 => a.glue(Instruction::with2(Code::Movsx_r64_rm16, d, src)),
                32 => a.glue(Instruction::with2(Code::Movsxd_r64_rm32, d, src)),
                _ => a.glue(Instruction::with2(Code::Mov_r64_rm64, d, src)),
            }
            a.glue(Instruction::with2(Code::Sar_rm64_imm8, d, width.trailing_zeros()));
            a.glue(Instruction::with2(
                Code::Lea_r64_m,
                s,
                MemoryOperand::new(s, d, (width / 8) as u32, 0, 0, false, Register::None),
            ));
            a.glue(Instruction::with2(Code::Mov_r64_rm64, d, src.full_register()));
            a.glue(Instruction::with2(Code::And_rm64_imm8, d, (width - 1) as i32));
            let sized = match width {
                16 => super::stack::sized16(d),
                32 => GPR32[reg_num(d)],
                _ => d,
            };
            rewritten.set_op1_register(sized);
            bit_reg = Some(d);
        }
        if flag_free {
            let size = self.access_size(instr);
            self.tlb_lookup_flag_free(s, access, size, used);
        } else if self.soft_mmu {
            let size = self.access_size(instr);
            self.tlb_lookup(s, access, size, used | bit_reg.map_or(0, |d| 1 << reg_num(d)));
            self.restore_flags();
        }
        self.emit_at_register(&rewritten, s)?;
        if let Some(d) = bit_reg {
            self.give_back(d);
            self.release_scratch(s);
        } else if self.soft_mmu && raw.is_some() && !rip_rel {
            let size = self.access_size(instr);
            self.hold_or_give_back(s, key, size, access == Access::Write, writes_key);
        } else {
            self.release_scratch(s);
        }
        Ok(())
    }

    /// After a copied instruction's access through S: keep S (the host address) for the next
    /// instruction if that may use it, else give it back.
    fn hold_or_give_back(&mut self, s: Register, key: MemKey, size: u64, write: bool, writes_key: bool) {
        if writes_key || self.required_alignment.image {
            self.release_scratch(s);
        } else {
            self.held = Some(HeldAddress { s, key, size, write });
        }
    }

    /// With `--stats`, counts a TLB hit (`Context::tlb_hits`) using the free register `r`,
    /// without touching flags.
    fn count_tlb_hit(&mut self, r: Register) {
        if self.count_tlb_hits {
            self.asm.mov_from_ctx(r, off::TLB_HITS);
            self.asm.glue(Instruction::with2(
                Code::Lea_r64_m,
                r,
                MemoryOperand::with_base_displ(r, 1),
            ));
            self.asm.mov_to_ctx(off::TLB_HITS, r);
        }
    }

    /// Gives back the register of a held host address (before anything but a copied
    /// instruction with the same memory operand).
    pub(super) fn release_held(&mut self) {
        if let Some(h) = self.held.take() {
            self.release_scratch(h.s);
        }
    }

    /// The borrowed register a held host address occupies (bit per hardware number).
    pub(super) fn held_mask(&self) -> u16 {
        self.held.map_or(0, |h| 1 << reg_num(h.s)) | self.window_mask() | self.loops.held
    }

    /// Emits `instr` with its memory operand replaced by `[s]` (S holds the final address), as
    /// a faulting site.
    pub(super) fn emit_at_register(&mut self, instr: &Instruction, s: Register) -> Result<(), TranslateError> {
        self.emit_at_offset(instr, s, 0)
    }

    /// Emits `instr` with its memory operand replaced by `[s + offset]`, as a faulting site.
    pub(super) fn emit_at_offset(
        &mut self,
        instr: &Instruction,
        s: Register,
        offset: i64,
    ) -> Result<(), TranslateError> {
        let mut rewritten = *instr;
        rewritten.set_code(modrm_form(instr.code()));
        rewritten.set_memory_base(s);
        rewritten.set_memory_index(Register::None);
        rewritten.set_memory_index_scale(1);
        rewritten.set_memory_displacement64(offset as u64);
        rewritten.set_memory_displ_size(if offset == 0 { 0 } else { 8 });
        rewritten.set_segment_prefix(Register::None);
        let start = self.asm.buf.len();
        self.asm.emit(&rewritten)?;
        self.site_here(start);
        Ok(())
    }

    /// `instr` with its FS/GS-relative operand rewritten to `[S + base-or-index + disp]` (S will
    /// hold the segment base), when the address has at most one register and 64-bit size.
    fn segment_base_operand(instr: &Instruction, s: Register) -> Option<Instruction> {
        let (base, index) = (instr.memory_base(), instr.memory_index());
        if base.size() == 4 || index.size() == 4 || (base != Register::None && index != Register::None) {
            return None;
        }
        let mut rewritten = *instr;
        rewritten.set_code(modrm_form(instr.code()));
        rewritten.set_segment_prefix(Register::None);
        let disp = instr.memory_displacement64();
        if base == Register::None && index == Register::None && disp as i64 != disp as i32 as i64 {
            return None; // a moffs address beyond disp32
        }
        if base == Register::RSP {
            rewritten.set_memory_index(s); // RSP cannot be an index
            rewritten.set_memory_index_scale(1);
        } else {
            rewritten.set_memory_base(s);
            if base != Register::None {
                rewritten.set_memory_index(base);
                rewritten.set_memory_index_scale(1);
            }
        }
        rewritten.set_memory_displacement64(disp);
        rewritten.set_memory_displ_size(if disp == 0 { 0 } else { 8 }); // 8: 64-bit addressing
        Some(rewritten)
    }

    /// A guest instruction emitted unchanged (verbatim bytes when available).
    fn emit_guest(&mut self, instr: &Instruction, raw: Option<&[u8]>) -> Result<(), TranslateError> {
        let start = self.asm.buf.len();
        match raw {
            Some(bytes) if !self.mode.compat => self.asm.buf.extend_from_slice(bytes),
            _ => self.asm.emit(instr)?,
        }
        self.site_here(start);
        Ok(())
    }

    /// `S = effective address` (plus the guest FS/GS base), flags untouched.
    pub(super) fn address_into(&mut self, s: Register, instr: &Instruction, used: u16) {
        let base = instr.memory_base();
        let index = instr.memory_index();
        if instr.is_ip_rel_memory_operand() {
            self.asm.mov_imm64(s, instr.ip_rel_memory_address());
        } else if base == Register::None && index == Register::None {
            let mut addr = instr.memory_displacement64();
            if instr.memory_displ_size() == 4 && instr.code().op_code().address_size() != 64 {
                addr &= 0xffff_ffff;
            }
            self.asm.mov_imm64(s, addr);
        } else {
            let disp = instr.memory_displacement64() as i64;
            let disp = if base.size() == 4 || index.size() == 4 {
                disp as i32 as i64
            } else {
                disp
            };
            let addr32 = base.size() == 4 || index.size() == 4;
            let displ_size = if addr32 { 4 } else { 8 };
            let mem = MemoryOperand::new(
                base,
                index,
                instr.memory_index_scale(),
                disp,
                displ_size,
                false,
                Register::None,
            );
            let lea = if addr32 { Code::Lea_r32_m } else { Code::Lea_r64_m };
            let dst = if lea == Code::Lea_r32_m { reg32(s) } else { s };
            self.asm.glue(Instruction::with2(lea, dst, mem));
        }
        if matches!(instr.segment_prefix(), Register::FS | Register::GS) {
            let t = self.pick(used | (1 << reg_num(s)));
            self.borrow(t);
            let field = if instr.segment_prefix() == Register::FS {
                off::FS_BASE
            } else {
                off::GS_BASE
            };
            self.asm.mov_from_ctx(t, field);
            // 32-bit code: base plus offset wraps at 4 GiB (a TLS access at %gs:-4).
            let (lea, dst) = if self.mode.compat {
                (Code::Lea_r32_m, reg32(s))
            } else {
                (Code::Lea_r64_m, s)
            };
            self.asm
                .glue(Instruction::with2(lea, dst, MemoryOperand::with_base_index(s, t)));
            self.give_back(t);
        }
    }

    /// `Context::miss_info` for an access of the current instruction.
    /// The indirect-branch table this block's lookups use: its privilege level's, or 32-bit
    /// code's (`context::ibl_set`).
    pub(super) fn ibl_set(&self) -> usize {
        let cpl = if self.mode.kernel {
            crate::state::Cpl::Kernel
        } else {
            crate::state::Cpl::User
        };
        crate::context::ibl_set(cpl, self.mode.compat)
    }

    /// The TLB set this block's lookups use: its privilege level's (`context::TlbSet`).
    pub(super) fn level_set(&self) -> usize {
        if self.mode.kernel {
            crate::context::KERNEL_SET
        } else {
            crate::context::USER_SET
        }
    }

    pub(super) fn miss_info(&self, access: Access, size: u64) -> u64 {
        // Stack-segment accesses (RSP/RBP base) raise #SS rather than #GP when non-canonical.
        let stack = matches!(self.mem_base.full_register(), Register::RSP | Register::RBP) as u64;
        size | ((access as u64) << 16)
            | (stack << 24)
            | ((self.alignment_check.granule_log2(size) as u64) << MISS_AC_SHIFT)
            | if self.mmx_store { MISS_MMX_STORE } else { 0 }
            | if self.f16c_store { MISS_F16C_STORE } else { 0 }
            | if self.partial_access { MISS_PARTIAL } else { 0 }
            | match self.window_lookup {
                Some(true) => MISS_WINDOW | MISS_WINDOW_SETTLED,
                Some(false) => MISS_WINDOW,
                None => 0,
            }
            | ((self.required_alignment.log2 as u64) << MISS_ALIGN_SHIFT)
            | if self.required_alignment.plain_gp {
                MISS_ALIGN_PLAIN_GP
            } else {
                0
            }
            | if self.required_alignment.waived_by_mm {
                MISS_ALIGN_WAIVED_BY_MM
            } else {
                0
            }
    }

    /// Queues the cold stub a TLB-lookup branch at `field` goes to on a miss.
    pub(super) fn miss_stub(&mut self, field: usize, va_reg: Register, info: u64, flags_saved: bool) {
        self.miss_stub_parked(field, va_reg, info, flags_saved, None);
    }

    fn miss_stub_parked(
        &mut self,
        field: usize,
        va_reg: Register,
        info: u64,
        flags_saved: bool,
        parked_rcx: Option<Register>,
    ) {
        let (guest_rip, spilled) = (self.guest_rip, self.spilled);
        self.cold.push(Cold::TlbMiss {
            field,
            va_reg,
            info,
            guest_rip,
            spilled,
            flags_saved,
            parked_rcx,
        });
    }

    /// The inline TLB lookup turning guest address S into a host address.
    pub(super) fn tlb_lookup(&mut self, s: Register, access: Access, size: u64, used: u16) {
        let t = self.pick(used | (1 << reg_num(s)));
        self.borrow(t);
        let u = self.pick(used | (1 << reg_num(s)) | (1 << reg_num(t)));
        self.borrow(u);
        let flags_saved = self.flags_in_slot;
        let info = self.miss_info(access, size);
        let a: &mut Asm = &mut self.asm;
        if size > 1 && !self.split_access {
            a.glue(Instruction::with2(
                Code::Lea_r64_m,
                t,
                MemoryOperand::with_base_displ(s, size as i64 - 1),
            ));
            a.glue(Instruction::with2(Code::Xor_r64_rm64, t, s));
            a.glue(Instruction::with2(Code::Shr_rm64_imm8, t, 12));
            let field = a.branch32_forward(Code::Jne_rel32_64);
            self.miss_stub(field, s, info, flags_saved);
        }
        let set = self.level_set();
        let table = if access == Access::Write {
            off::tlb_write(set)
        } else {
            off::tlb_read(set)
        };
        let a: &mut Asm = &mut self.asm;
        a.glue(Instruction::with2(Code::Mov_r64_rm64, t, s));
        a.glue(Instruction::with2(Code::Shr_rm64_imm8, t, 12));
        a.glue(Instruction::with2(
            Code::Movzx_r32_rm16,
            reg32(u),
            super::stack::sized16(t),
        ));
        a.glue(Instruction::with2(Code::Shl_rm64_imm8, u, 4));
        let entry = |disp: usize| MemoryOperand::new(u, Register::None, 1, disp as i64, 8, false, Register::GS);
        a.glue(Instruction::with2(Code::Add_r64_rm64, t, entry(table)));
        let field = a.branch32_forward(Code::Jne_rel32_64);
        a.glue(Instruction::with2(Code::Add_r64_rm64, s, entry(table + 8)));
        self.miss_stub(field, s, info, flags_saved);
        self.count_tlb_hit(u);
        self.give_back(u);
        self.give_back(t);
    }

    /// The inline TLB lookup turning guest address S into a host address without touching
    /// flags (so guest flags need no save and restore: `pushfq`/`popfq` around every access
    /// were most of the soft-MMU's cost). RCX and two more registers are borrowed:
    ///
    /// ```text
    ///   mov ecx,12; lea t,[s+size-1]; shrx t,t,rcx     ; t = page of the last byte
    ///   shrx u,s,rcx; movzx u,u16; lea u,[u*2]         ; entry of the first byte's page
    ///   mov rcx,gs:[u*8+tlb]; lea rcx,[rcx+t]; jrcxz hit  ; its tag == −t?
    ///   jmp miss
    /// hit: mov t,gs:[u*8+tlb+8]; lea s,[s+t]
    /// ```
    ///
    /// (U keeps the entry's index for the hit path, which recomputed it from T in two more
    /// instructions before: the third register is usually one the block never names, borrowed
    /// once for the whole block.)
    ///
    /// An access that crosses into the next page misses: the entry at the first byte's index
    /// can only hold pages with that index, never the next page. A one-byte access cannot
    /// cross: T is its page and U comes from T (`shrx t,s,rcx; movzx u,t16`).
    ///
    /// In a block whose guest code uses RCX, the guest's RCX is parked in another borrowed
    /// register (P) rather than in its spill slot: RCX is then often hot (a loop counter), and
    /// a store and reload of it around every access put a store-forwarding delay on its
    /// dependency chain (the memory kernel of `benches/translate.rs` ran 6× native), where P is
    /// usually a register the block does not touch. Elsewhere the plain spill is cheaper (one
    /// store and load fewer).
    pub(super) fn tlb_lookup_flag_free(&mut self, s: Register, access: Access, size: u64, used: u16) {
        let t = self.take_scratch(used | (1 << reg_num(s)) | (1 << 1));
        // RCX already borrowed and idle (its guest value in its slot) is simply taken.
        let rcx_idle = self.borrowed_idle(Register::RCX);
        let parked = (self.block_uses_rcx && !rcx_idle).then(|| {
            let p = self.take_scratch(used | (1 << reg_num(s)) | (1 << 1) | (1 << reg_num(t)));
            self.asm.mov_rr(p, Register::RCX);
            p
        });
        if parked.is_none() {
            if rcx_idle {
                self.lazy &= !(1 << 1);
                self.overwrite_pending &= !(1 << 1);
            } else {
                self.borrow(Register::RCX);
            }
        }
        let info = self.miss_info(access, size);
        let set = self.level_set();
        let table = if access == Access::Write {
            off::tlb_write(set)
        } else {
            off::tlb_read(set)
        };
        let last = if size > 1 && !self.split_access {
            size as i32 - 1
        } else {
            0
        };
        let u = self.take_scratch(
            used | (1 << reg_num(s)) | (1 << 1) | (1 << reg_num(t)) | parked.map_or(0, |p| 1 << reg_num(p)),
        );
        let field = self.asm.tlb_probe(s, t, u, table, last);
        self.miss_stub_parked(field, s, info, false, parked);
        self.asm.tlb_hit(s, t, u, table);
        self.release_scratch(u);
        self.count_tlb_hit(t);
        match parked {
            Some(p) => {
                self.asm.mov_rr(Register::RCX, p);
                self.release_scratch(p);
            }
            None => self.release_scratch(Register::RCX),
        }
        self.release_scratch(t);
    }
}

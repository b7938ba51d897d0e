//! Guest `xsave`/`xsaveopt`/`xsavec`/`xrstor` when the guest's XCR0 is narrower than the host's.
//!
//! The CPU saves or restores the requested-feature bitmap RFBM = EDX:EAX & XCR0. Running the
//! guest's instruction as is would use the *host's* XCR0: an AVX2 guest on an AVX-512 host would
//! get 2,688 bytes of AVX-512 state written into a buffer it sized as 832 from its CPUID, and a
//! guest `xrstor` could load state it was never offered. So, around the copied instruction:
//!
//! ```text
//!   S = effective address                      ; (soft-MMU: then the TLB lookup, S = host address)
//!   pushfq → host flag stack                   ; the `and`s below clobber flags
//!   xrstor only:  T = XCOMP_BV & ~bit63 | XSTATE_BV
//!                 test T, host_xcr0 & ~guest_xcr0 ; jnz #GP(0)   (what a CPU with the guest's XCR0 does)
//!   and eax, guest_xcr0[31:0] ; and edx, guest_xcr0[63:32]   (RAX/RDX spilled, given back after)
//!   xsave… [S]
//!   popfq
//! ```
//!
//! With the guest's XCR0 equal to the host's, the instruction is copied like any other. Every
//! borrowed register and the parked flags are recorded at each faulting instruction, so a #PF
//! or #GP inside shows the guest its own registers.
//!
//! Also here: the check at the start of a block that touches the extended state, which loads
//! it into the registers the first time after an entry where the glue moves it lazily (system
//! mode: `glue.rs`), and before that, for an embedder that sometimes holds that state
//! elsewhere, exits to fetch it (the hybrid VMM leaves it in KVM while the guest kernel handles a timer tick, which never
//! touches it: reading it out costs a KVM ioctl, ≈15–20 µs per tick under kvm_pvm).

use super::asm::{self, gpr64, reg_num, Asm};
use super::{BlockEmitter, Cold};
use crate::context::{off, ExitReason};
use crate::cpu::xsave::{XsaveLayout, XCOMP_BV, XSTATE_BV};
use crate::error::TranslateError;
use crate::mmu::Access;
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, Register};

/// The user-mode XSAVE family (the supervisor forms are privileged).
pub(super) fn is_xstate(instr: &Instruction) -> bool {
    matches!(
        instr.mnemonic(),
        Mnemonic::Xsave
            | Mnemonic::Xsave64
            | Mnemonic::Xsaveopt
            | Mnemonic::Xsaveopt64
            | Mnemonic::Xsavec
            | Mnemonic::Xsavec64
            | Mnemonic::Xrstor
            | Mnemonic::Xrstor64
    )
}

fn is_restore(instr: &Instruction) -> bool {
    matches!(instr.mnemonic(), Mnemonic::Xrstor | Mnemonic::Xrstor64)
}

/// log2 of the alignment an XSAVE or FXSAVE image must have, where a misaligned one raises
/// #GP(0) before any access (so before any page fault): 64 bytes and 16. 0 for everything
/// else (the other forms with a requirement: `alignment.rs`).
pub(super) fn required_alignment_log2(instr: &Instruction) -> u8 {
    match instr.mnemonic() {
        _ if is_xstate(instr) => 6,
        Mnemonic::Fxsave | Mnemonic::Fxsave64 | Mnemonic::Fxrstor | Mnemonic::Fxrstor64 => 4,
        _ => 0,
    }
}

const RAX: u16 = 1 << 0;
const RDX: u16 = 1 << 2;

impl BlockEmitter<'_> {
    /// At the start of a block that touches the extended state, with the guest's registers as
    /// they entered it. With `held_elsewhere_check` (the embedder sometimes holds that state:
    /// `Context::extended_state_stale`), first exit before anything of the block runs, so the
    /// engine can fetch it. With `lazy` (the glue moves it lazily), then load it into the
    /// registers if this entry has not yet (`Context::extended_state_in_image`,
    /// `Glue::load_extended_state`). Flag-free, as `sti`:
    ///
    /// ```text
    ///   spill rcx
    ///   movzx ecx,byte gs:[extended_state_stale]       ; held_elsewhere_check
    ///   jrcxz +5; jmp fetch      ; (cold) reload rcx, exit ExtendedState at the block's start
    ///   movzx ecx,byte gs:[extended_state_in_image]    ; lazy
    ///   jrcxz +5; jmp load       ; (cold) rcx = back; jmp glue.load_extended_state
    /// back:
    ///   reload rcx
    /// ```
    pub(super) fn extended_state_check(&mut self, held_elsewhere_check: bool, lazy: bool) {
        self.borrow(Register::RCX);
        if held_elsewhere_check {
            let field = self.jump_if_flag(asm::ctx(off::EXTENDED_STATE_STALE));
            self.cold.push(Cold::RcxExit {
                field,
                reason: ExitReason::ExtendedState,
                rip: self.block_start,
            });
        }
        if lazy {
            let field = self.jump_if_flag(asm::ctx(off::EXTENDED_STATE_IN_IMAGE));
            self.cold.push(Cold::LoadExtendedState {
                field,
                back: self.asm.here(),
            });
        }
        self.give_back(Register::RCX);
    }

    /// The jump at `field` raises #GP(0) at the current guest instruction.
    fn raise_gp0(&mut self, field: usize) {
        self.cold.push(Cold::Raise {
            field,
            vector: crate::exit::vector::GP,
            error_code: 0,
            guest_rip: self.guest_rip,
            spilled: self.spilled,
            flags_saved: self.flags_in_slot,
        });
    }

    /// `instr` is an XSAVE-family instruction and the guest's XCR0 is narrower than the host's.
    pub(super) fn narrows_xstate(&self, instr: &Instruction) -> bool {
        is_xstate(instr) && self.guest_xcr0 != XsaveLayout::host().host_xcr0()
    }

    /// Emits `instr` with RFBM narrowed to the guest's XCR0 (see the file comment).
    pub(super) fn xstate_instr(&mut self, instr: &Instruction, access: Access) -> Result<(), TranslateError> {
        let guest = self.guest_xcr0;
        let wider = XsaveLayout::host().host_xcr0() & !guest;
        let used = self.used_gprs(instr) | RAX | RDX;
        let s = self.pick(used);
        self.borrow(s);
        self.save_flags();
        self.address_into(s, instr, used);
        self.mem_base = instr.memory_base();
        let size = self.access_size(instr);
        if is_restore(instr) {
            // Alignment comes before any access, so before the header is read below: a
            // misaligned image takes the miss path, whose checks raise #AC or #GP(0).
            self.asm.glue(Instruction::with2(Code::Test_rm64_imm32, s, 63));
            let field = self.asm.branch32_forward(Code::Jne_rel32_64);
            let info = self.miss_info(access, size);
            self.miss_stub(field, s, info, self.flags_in_slot);
        }
        if self.soft_mmu {
            self.tlb_lookup(s, access, size, used);
        }
        if is_restore(instr) {
            let t = self.pick(used | (1 << reg_num(s)));
            self.borrow(t);
            let at = |off: usize| MemoryOperand::with_base_displ(s, off as i64);
            let start = self.asm.buf.len();
            self.asm.glue(Instruction::with2(Code::Mov_r64_rm64, t, at(XCOMP_BV)));
            self.asm.glue(Instruction::with2(Code::Btr_rm64_imm8, t, 63));
            self.asm.glue(Instruction::with2(Code::Or_r64_rm64, t, at(XSTATE_BV)));
            self.site_here(start);
            if wider <= i32::MAX as u64 {
                self.asm
                    .glue(Instruction::with2(Code::Test_rm64_imm32, t, wider as i32));
            } else {
                let u = self.pick(used | (1 << reg_num(s)) | (1 << reg_num(t)));
                self.borrow(u);
                self.asm.mov_imm64(u, wider);
                self.asm.glue(Instruction::with2(Code::Test_rm64_r64, t, u));
                self.give_back(u);
            }
            let field = self.asm.branch32_forward(Code::Jne_rel32_64);
            self.raise_gp0(field);
            self.give_back(t);
        }
        for r in [gpr64(0), gpr64(2)] {
            self.borrow(r);
        }
        let a: &mut Asm = &mut self.asm;
        a.glue(Instruction::with2(Code::And_rm32_imm32, Register::EAX, guest as u32));
        a.glue(Instruction::with2(
            Code::And_rm32_imm32,
            Register::EDX,
            (guest >> 32) as u32,
        ));
        self.emit_at_register(instr, s)?;
        for r in [gpr64(2), gpr64(0)] {
            self.give_back(r);
        }
        self.restore_flags();
        self.give_back(s);
        Ok(())
    }
}

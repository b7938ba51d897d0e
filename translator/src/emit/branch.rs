//! Control transfers.
//!
//! - Direct jumps, `jcc`, `jrcxz`/`loop*`: every way out of the block is a `jmp/jcc rel32` to an
//!   exit stub; the engine chains it to the successor block once that exists (patching rel32).
//! - `call`: the *guest* return address is pushed (through the memory strategy, see
//!   `push_return`), then as a jump; under identity `ret` pops it with `pop r11`. A call to a
//!   leaf in the same page is inlined by the block builder (`block::Flow`): the push, the
//!   callee, and for its `ret` only `lea rsp,[rsp+8]`.
//! - `ret`, `jmp r/m`, `call r/m`: the guest target goes to R11 and, without touching flags, a
//!   one-entry inline cache for the site, then the shared indirect-branch table, find the host
//!   block:
//!
//! ```text
//!   spill r11, rcx; r11 = target
//!   mov rcx,-cached; lea rcx,[rcx+r11]; jrcxz hit         ; the site's inline cache
//!   movzx ecx,r11w; mov rcx,gs:[rcx*8+tags]
//!   lea rcx,[rcx+r11]                                    ; tags hold −target: 0 on a hit
//!   pext rcx,rcx,rcx; lea rcx,[rcx+1]; pext rcx,rcx,[one] ; 1 on a hit, 0 on a miss
//!   jrcxz miss
//!   movzx ecx,r11w; mov r11,gs:[rcx*8+hosts]; reload rcx; jmp r11
//! miss:  jmp ibl_miss
//! hit:   reload rcx; jmp cached_prologue
//! ```
//!
//! (Without a fast `pext` the table hit is `jrcxz found` instead: see `indirect_lookup`.)
//!
//! Both ways in land on the target block's *prologue* (`mov r11, spill`, [`IBL_PROLOGUE_LEN`]
//! bytes in front of every block), so the lookup needs neither a store of the host address nor
//! a memory-indirect jump. Each site has its own copy of the lookup, so each has its own
//! indirect-branch prediction. Measured natively on an Intel Sapphire Rapids host (a rotating
//! four-target `jmp [table]` loop): the earlier tail `mov gs:[slot],rcx; ...; jmp gs:[slot]`
//! cost 46 ms per 50M iterations against 33 ms for `jmp r11`, and an `xchg rcx,r10` that kept
//! RCX in a register through the inline cache made it 131 ms (store-to-load forwarding is free
//! there; `xchg` is not).

use super::asm::{ctx, ctx_indexed};
use super::BlockEmitter;
use crate::context::off;
use crate::error::TranslateError;
use crate::rules::BranchKind;
use iced_x86::{Code, Encoder, Instruction, MemoryOperand, OpKind, Register};

/// The lookup uses R11 (the target) and RCX (for `jrcxz`): both are scratch registers in the
/// SysV ABI and never hold return values, so at typical return and call targets their reload is
/// off the critical path.
const TARGET: Register = Register::R11;
/// Registers a dispatch borrows (bit per hardware number): R11 and RCX.
const DISPATCH_MASK: u16 = (1 << 11) | (1 << 1);

/// Length of the prologue in front of every block, `mov r11, gs:[spill(r11)]`: indirect
/// branches arrive there with the host address in R11 (see the module comment); direct entry
/// (the dispatcher, chained jumps) skips it.
pub const IBL_PROLOGUE_LEN: u64 = 9;

impl BlockEmitter<'_> {
    pub(super) fn branch(&mut self, instr: &Instruction, kind: BranchKind) -> Result<(), TranslateError> {
        let next = instr.next_ip();
        let direct = matches!(
            kind,
            BranchKind::Jmp | BranchKind::Jcc | BranchKind::Call | BranchKind::CounterJump
        );
        if direct && !crate::mmu::is_canonical(instr.near_branch64()) {
            // A direct branch to a non-canonical address raises #GP(0) at the branch (taken
            // only, for a conditional one), before anything is pushed.
            return self.noncanonical_direct(instr, kind);
        }
        match kind {
            BranchKind::Jmp => self.direct_exit(Code::Jmp_rel32_64, instr.near_branch64()),
            // The taken side leaves; the block goes on with the fall-through (an extended
            // block, see `block.rs`), or `emit_block` adds its exit if the block ends here.
            BranchKind::Jcc => {
                let mut near = *instr;
                near.as_near_branch();
                self.direct_exit(near.code(), instr.near_branch64());
            }
            BranchKind::CounterJump => {
                self.counter_jump_over_next(instr)?;
                self.exit_jump(Code::Jmp_rel32_64, next);
                self.exit_jump(Code::Jmp_rel32_64, instr.near_branch64());
            }
            BranchKind::Call => {
                self.push_return(next)?;
                self.flush_lazy(u16::MAX);
                self.exit_jump(Code::Jmp_rel32_64, instr.near_branch64());
            }
            // Indirect jumps and calls go through the same per-site cache as `ret`: it is filled
            // on the site's first miss only, so a polymorphic site (interpreter dispatch) pays
            // the cache probe plus the table, and a monomorphic one (qsort's comparator) a
            // direct jump (busybox sort -n of 1e6 lines: 2.0 s -> 1.75 s).
            BranchKind::CallIndirect => {
                self.borrow_dispatch_regs();
                self.load_target(instr)?;
                self.push_return(next)?;
                self.cached_dispatch(-(self.word() as i64));
            }
            BranchKind::JmpIndirect => {
                self.borrow_dispatch_regs();
                self.load_target(instr)?;
                self.cached_dispatch(0);
            }
            BranchKind::Ret => self.ret(instr)?,
        }
        Ok(())
    }

    /// Emits a `jrcxz`/`loop*` guest instruction (it updates RCX) retargeted so that, taken, it
    /// skips the 5-byte jump that follows it (the not-taken exit).
    fn counter_jump_over_next(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        let here = self.asm.here();
        let mut probe = *instr;
        probe.set_near_branch64(here + 2);
        let len = Encoder::new(64)
            .encode(&probe, here)
            .map_err(|e| TranslateError::Encode {
                rip: instr.ip(),
                text: instr.to_string(),
                reason: e.to_string(),
            })? as u64;
        probe.set_near_branch64(here + len + 5);
        self.asm.emit(&probe)
    }

    /// A direct branch whose target is non-canonical: #GP(0) at the branch when it is taken.
    fn noncanonical_direct(&mut self, instr: &Instruction, kind: BranchKind) -> Result<(), TranslateError> {
        let raise = |e: &mut Self, field: usize| {
            e.cold.push(super::Cold::Raise {
                field,
                vector: crate::exit::vector::GP,
                error_code: 0,
                guest_rip: e.guest_rip,
                spilled: e.spilled,
                flags_saved: e.flags_in_slot,
            })
        };
        match kind {
            BranchKind::Jcc => {
                let mut near = *instr;
                near.as_near_branch();
                let field = self.asm.branch32_forward(near.code());
                raise(self, field);
            }
            BranchKind::CounterJump => {
                // The guest instruction updates RCX either way; taken, it faults.
                self.counter_jump_over_next(instr)?;
                self.exit_jump(Code::Jmp_rel32_64, instr.next_ip());
                let field = self.asm.branch32_forward(Code::Jmp_rel32_64);
                raise(self, field);
            }
            _ => {
                let field = self.asm.branch32_forward(Code::Jmp_rel32_64);
                raise(self, field);
            }
        }
        Ok(())
    }

    /// `ret`: `pop r11` (identity) or `mov r11,[rsp]; lea rsp,[rsp+8]` (soft-MMU), `lea
    /// rsp,[rsp+n]` for `ret n`, then the dispatch (returns usually go back to one caller, so the
    /// inline cache usually hits).
    fn ret(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        // Lazily given-back registers (`emit_block`) are still borrowed here: the load takes
        // them without a store, and the rest go back before the dispatch.
        self.borrow_dispatch_regs();
        let extra = if instr.op_count() == 1 {
            instr.immediate16() as i64
        } else {
            0
        };
        let pop = self.word() as i64 + extra;
        if self.soft_mmu {
            // `mov r11,[rsp]; lea rsp,[rsp+n]` (32-bit code: `mov r11d,[esp]; lea esp,[esp+n]`).
            let (mov, target, top) = if self.mode.compat {
                (Code::Mov_r32_rm32, Register::R11D, Register::ESP)
            } else {
                (Code::Mov_r64_rm64, TARGET, Register::RSP)
            };
            let mut load = Instruction::with2(mov, target, MemoryOperand::with_base(top)).expect("mov r11,[rsp]");
            load.set_ip(self.guest_rip);
            self.mem_instr(&load, None, DISPATCH_MASK)?;
            self.adjust_rsp(pop);
        } else {
            // Identity: `pop r11` is one uop where `mov r11,[rsp]; lea rsp,[rsp+8]` is two.
            let start = self.asm.buf.len();
            self.asm.glue(Instruction::with1(Code::Pop_r64, TARGET));
            self.site_here(start);
            if extra != 0 {
                self.asm.glue(Instruction::with2(
                    Code::Lea_r64_m,
                    Register::RSP,
                    MemoryOperand::with_base_displ(Register::RSP, extra),
                ));
            }
        }
        self.flush_lazy(!DISPATCH_MASK);
        self.cached_dispatch(pop);
        Ok(())
    }

    /// Jumps to guest R11 through this site's one-entry inline cache, then the table; R11 is
    /// borrowed, RCX is borrowed here. `rsp_delta` is how far the branch
    /// moved RSP (recorded on a miss, see `record_branch`).
    fn cached_dispatch(&mut self, rsp_delta: i64) {
        self.claim(Register::RCX);
        if self.dispatcher_only {
            // A one-off step (a split access's operand in the bounce buffer, a device page,
            // mapped in the TLB until the dispatcher ends the step): straight to the
            // dispatcher, so the target never runs with that mapping.
            let field = self.asm.branch32_forward(Code::Jmp_rel32_64);
            self.table_miss(field, rsp_delta);
            self.spilled &= !DISPATCH_MASK;
            return;
        }
        let a = &mut self.asm;
        a.mov_imm64(Register::RCX, super::INLINE_CACHE_EMPTY);
        let imm_field = a.buf.len() - 8;
        a.glue(Instruction::with2(
            Code::Lea_r64_m,
            Register::RCX,
            MemoryOperand::with_base_index(Register::RCX, TARGET),
        ));
        let jrcxz_at = a.buf.len();
        let placeholder = a.here() + 2;
        a.glue(Instruction::with_branch(Code::Jrcxz_rel8_64, placeholder));
        let spilled_at_branch = self.spilled;
        // Lookup path (R11 = target); its head tells the engine which cache to fill while the
        // cache is empty.
        let miss = self.asm.buf.len();
        let fill_field = self.asm.branch32_forward(Code::Jmp_rel32_64);
        self.cold.push(super::Cold::CacheFill {
            field: fill_field,
            imm_field,
            cache: self.inline_caches.len(), // pushed below
            guest_rip: self.guest_rip,
            rsp_delta,
        });
        self.indirect_lookup(rsp_delta);
        // Hit path.
        self.spilled = spilled_at_branch;
        let hit = self.asm.buf.len();
        let distance = hit - (jrcxz_at + 2);
        assert!(distance <= 127, "inline-cache lookup path too long for jrcxz");
        self.asm.buf[jrcxz_at + 1] = distance as u8;
        // The cached block's prologue gives R11 back.
        self.give_back(Register::RCX);
        self.spilled &= !(1 << 11);
        let miss_addr = self.asm.base() + miss as u64;
        let rel_field = self.asm.branch32(Code::Jmp_rel32_64, miss_addr);
        self.inline_caches.push(super::InlineCache {
            imm_field: imm_field as u32,
            rel_field: rel_field as u32,
            miss: miss as u32,
            fill_field: fill_field as u32,
            fill_stub: 0, // set when the cold code is emitted
        });
    }

    /// R11 receives the target. Under the soft-MMU RCX is borrowed later, by `cached_dispatch`,
    /// so that loading the target (and pushing a return address) can use the flag-free TLB
    /// lookup, which needs RCX for itself; under identity both spills go together (adjacent
    /// stores to one line commit in one cycle, see `context::spill_index`). Either may be lent
    /// lazily already (`ret`): taken as it is.
    fn borrow_dispatch_regs(&mut self) {
        self.claim(TARGET);
        if !self.soft_mmu {
            self.claim(Register::RCX);
        }
    }

    /// R11 = target of `jmp/call r/m64` (R11/RCX borrowed but still holding guest values).
    fn load_target(&mut self, instr: &Instruction) -> Result<(), TranslateError> {
        // 32-bit code: `jmp/call r/m32`, the target zero-extended into R11.
        let (mov, target) = if self.mode.compat {
            (Code::Mov_r32_rm32, Register::R11D)
        } else {
            (Code::Mov_r64_rm64, TARGET)
        };
        if instr.op0_kind() == OpKind::Register {
            let src = instr.op0_register();
            if src != target {
                self.asm.glue(Instruction::with2(mov, target, src));
            }
            return Ok(());
        }
        let mut load = *instr;
        load.set_code(mov);
        load.set_op1_kind(OpKind::Memory);
        load.set_op0_kind(OpKind::Register);
        load.set_op0_register(target);
        self.mem_instr(&load, None, DISPATCH_MASK)
    }

    /// Pushes the guest return address through the memory strategy, as one 8-byte store: the
    /// `ret` reads it back with one 8-byte load, and a load fed by two 4-byte stores cannot be
    /// store-forwarded (a ~10-cycle stall per call/return pair). Under identity that is one
    /// `push`, of an imm32 or, for a 64-bit address, of a literal after the block's code
    /// (`push qword [rip+literal]`): no register is borrowed (on an Intel Sapphire Rapids host
    /// the call kernel of `benches/translate.rs` went from 3.0x to 2.7x native against
    /// `mov r11,imm64; mov [rsp-8],r11; lea rsp,[rsp-8]` with R11 spilled and reloaded).
    pub(super) fn push_return(&mut self, ret: u64) -> Result<(), TranslateError> {
        let fits = (ret as i64) == (ret as i32 as i64);
        if !self.soft_mmu {
            let start = self.asm.buf.len();
            if fits {
                self.asm.glue(Instruction::with1(Code::Pushq_imm32, ret as i32));
            } else {
                // The displacement is bound to the literal when the cold code is emitted.
                self.asm.glue(Instruction::with1(
                    Code::Push_rm64,
                    MemoryOperand::with_base_displ(Register::RIP, self.asm.here() as i64),
                ));
                self.literals.push((self.asm.buf.len() - 4, ret));
            }
            self.site_here(start);
            return Ok(());
        }
        // One stack word below RSP (32-bit code: 4 bytes below ESP, and every return address
        // fits its imm32).
        let word = self.word() as i64;
        let slot = self.stack_slot(-word);
        if self.mode.compat || fits {
            let store = if self.mode.compat {
                Instruction::with2(Code::Mov_rm32_imm32, slot, ret as u32)
            } else {
                Instruction::with2(Code::Mov_rm64_imm32, slot, ret as i32)
            };
            let mut store = store.expect("mov [rsp-8],imm32");
            store.set_ip(self.guest_rip);
            self.mem_instr(&store, None, 0)?;
        } else {
            let d = if self.spilled & (1 << 11) == 0 {
                TARGET
            } else {
                self.pick(0)
            };
            self.borrow(d);
            self.asm.mov_imm64(d, ret);
            let mut store = Instruction::with2(Code::Mov_rm64_r64, slot, d).expect("mov [rsp-8],r64");
            store.set_ip(self.guest_rip);
            self.mem_instr(&store, None, 0)?;
            self.give_back(d);
        }
        self.adjust_rsp(-word);
        Ok(())
    }

    /// The `ret` of a callee inlined after its call (`block::Flow::InlinedRet`): the builder
    /// proved the return address on the stack is the one the call pushed, so only RSP moves.
    pub(super) fn inlined_ret(&mut self) {
        self.asm.glue(Instruction::with2(
            Code::Lea_r64_m,
            Register::RSP,
            MemoryOperand::with_base_displ(Register::RSP, 8),
        ));
    }

    /// On the way to the miss path: the branch's guest RIP and RSP movement, so the engine can
    /// fault at the branch if the target is non-canonical (stores only, no flags).
    pub(super) fn record_branch(&mut self, rsp_delta: i64) {
        let rip = self.guest_rip;
        self.asm.store_ctx_u64(off::BRANCH_RIP, rip);
        self.asm.store_ctx_u64(off::BRANCH_RSP_DELTA, rsp_delta as u64);
    }

    /// The inline indirect-branch lookup; R11 = guest target, R11/RCX borrowed.
    fn indirect_lookup(&mut self, rsp_delta: i64) {
        let tags = off::ibl_tags(self.ibl_set());
        let a = &mut self.asm;
        a.glue(Instruction::with2(Code::Movzx_r32_rm16, Register::ECX, Register::R11W));
        a.glue(Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            ctx_indexed(Register::RCX, 8, tags),
        ));
        a.glue(Instruction::with2(
            Code::Lea_r64_m,
            Register::RCX,
            MemoryOperand::with_base_index(Register::RCX, TARGET),
        ));
        // RCX = 0 on a hit. `jrcxz` jumps on zero, so the hit would be a taken branch right
        // before `jmp r11`, and that always-taken branch costs the indirect predictor the history
        // that tells the targets apart (measured on Intel Sapphire Rapids: a rotating
        // four-target site ran at 7x native with it, 3x without). Where `pext` is fast, turn
        // RCX into 1 on a hit and 0 on a miss, flag-free, so the hit falls through:
        // pext(d, d) is 0 only for d = 0; plus one, that is 1, else an even number (or 0);
        // pext(·, 1) keeps bit 0.
        let miss_jump = if crate::host::features::fast_pext() {
            a.glue(Instruction::with3(
                Code::VEX_Pext_r64_r64_rm64,
                Register::RCX,
                Register::RCX,
                Register::RCX,
            ));
            a.glue(Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_displ(Register::RCX, 1),
            ));
            a.glue(Instruction::with3(
                Code::VEX_Pext_r64_r64_rm64,
                Register::RCX,
                Register::RCX,
                ctx(off::ONE),
            ));
            let jrcxz_at = a.buf.len();
            let placeholder = a.here() + 2;
            a.glue(Instruction::with_branch(Code::Jrcxz_rel8_64, placeholder));
            Some(jrcxz_at)
        } else {
            let hit = a.here() + 2 + 5;
            a.glue(Instruction::with_branch(Code::Jrcxz_rel8_64, hit));
            let field = a.branch32_forward(Code::Jmp_rel32_64);
            debug_assert_eq!(a.here(), hit);
            self.table_miss(field, rsp_delta);
            None
        };
        let hosts = off::ibl_hosts(self.ibl_set());
        let a = &mut self.asm;
        a.glue(Instruction::with2(Code::Movzx_r32_rm16, Register::ECX, Register::R11W));
        a.glue(Instruction::with2(
            Code::Mov_r64_rm64,
            TARGET,
            ctx_indexed(Register::RCX, 8, hosts),
        ));
        // The target's prologue gives R11 back.
        self.give_back(Register::RCX);
        self.asm.glue(Instruction::with1(Code::Jmp_rm64, TARGET));
        if let Some(jrcxz_at) = miss_jump {
            let distance = self.asm.buf.len() - (jrcxz_at + 2);
            assert!(distance <= 127, "indirect-branch hit path too long for jrcxz");
            self.asm.buf[jrcxz_at + 1] = distance as u8;
            let field = self.asm.branch32_forward(Code::Jmp_rel32_64);
            self.table_miss(field, rsp_delta);
        }
        self.spilled &= !DISPATCH_MASK;
    }

    /// The table miss leaves through a cold stub that records the branch (see `record_branch`).
    fn table_miss(&mut self, field: usize, rsp_delta: i64) {
        self.cold.push(super::Cold::TableMiss {
            field,
            guest_rip: self.guest_rip,
            rsp_delta,
        });
    }
}

//! Loop windows: one soft-MMU lookup per entry into a counted loop, for each array it walks.
//!
//! A block that loops to its own start (`block.rs` builds SHA-256's round loop as one) pays a
//! TLB lookup (≈13 host instructions, and registers: the round loop spilled two guest registers
//! an iteration for them) for every access of every iteration, although a counted loop's
//! accesses stay in a range known when it is entered. Here a loop is *counted* when
//!
//! - one register I is written by exactly one instruction of the block, which adds a constant
//!   c > 0 (a power of two) to all 64 bits of it (`inc`, `add imm`, `lea I,[I+c]`);
//! - `cmp I, N` (N an immediate, or a register no instruction of the block writes) is followed
//!   at once by the `je` that leaves the loop, or by the `jne` back to its start that ends the
//!   block (then the fall-through leaves it);
//! - its other instructions are copied guest instructions or direct branches (which leave), so
//!   every iteration runs each of them once, in order, until a branch leaves.
//!
//! Entered with I = I0 such that the first `cmp` sees N after a whole number of steps (N − I0 −
//! c·[the step comes before the test] is a non-negative multiple of c, under [`MAX_COUNT`]),
//! I takes only values in [I0, N] before the loop leaves. An access whose address is X + k·I + d
//! (X none or a register the block never writes; I itself as the base: k = 1; no I: k = 0) then
//! stays in [X + k·I0 + d, X + k·N + d + size): accesses with the same X and k form a *stream*,
//! and when that range lies in one page that the TLB maps — or in two, mapped to host pages
//! that follow each other (the same host − guest: a file's pages in the page cache often are;
//! busybox's SHA-256 constants straddle a page) — one lookup at the loop's entry gives
//! P = X + (host − guest), held in a register the block never names, and each access becomes
//! `[P + I·k + d]` (`[I + P + d]` for I as the base) — no lookup in the loop.
//!
//! The entry check (with flags saved) runs before the loop head: the back edge jumps past it
//! with P still held (`loop_keep`). When the count does not fit, the range spans pages that
//! do not follow each other or the TLB misses, the block leaves for the engine at its start,
//! nothing of it run (`context::MISS_LOOP_WINDOW`): the engine fills the TLB only from a walk
//! that sets no accessed or dirty bit (a loop may leave before its first access: bits set at
//! the entry would be the translator's invention), and otherwise runs the first instruction
//! alone (so too when two streams' pages share a TLB slot and each fill evicts the other);
//! after a few such failures the stream is not planned again (`Translator::windowless`, keyed
//! by its first access). Nothing can change the TLB while the loop runs: only the engine
//! does, and a kick unlinks the back edge.

use super::{BlockEmitter, Cold, Rule};
use crate::block::{DecodedBlock, Flow};
use crate::context::{MISS_LOOP_KEY_SHIFT, MISS_LOOP_WINDOW};
use crate::mmu::Access;
use iced_x86::{Code, Instruction, MemoryOperand, Mnemonic, OpKind, Register};
use std::collections::HashSet;

/// The most steps one entry check admits (N − I0 over c): a range wider than a page fails
/// the page check anyway; the bound keeps k·(N − I0) from wrapping around the address space.
const MAX_COUNT: i32 = 4096;
/// Streams held at once (each holds a register for the whole loop).
const MAX_STREAMS: usize = 4;

#[derive(Clone, Copy, Debug)]
enum Bound {
    Imm(u64),
    Reg(Register),
}

/// How a stream's accesses name the counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Form {
    /// `[X + I·k + d]` (X may be none).
    Indexed,
    /// `[I + d]`: the counter is the base.
    CounterBase,
    /// `[X + d]`: no counter.
    Fixed,
}

#[derive(Clone, Copy, Debug)]
struct Stream {
    base: Register,
    form: Form,
    scale: u32,
    /// Displacements its accesses cover: `[lo, hi)` around `X + I·k`.
    lo: i64,
    hi: i64,
    access: Access,
    /// Guest address of its first access (`Translator::windowless` key).
    key: u64,
    /// P while the loop runs.
    reg: Register,
}

/// The loop windows of one block (empty for most blocks).
#[derive(Default)]
pub(super) struct LoopPlan {
    counter: Option<(Register, u64, Bound, bool)>,
    /// Index of the back edge that ends the loop (the block's length when the block falls
    /// through to its own start): the instructions after it run once, after the loop.
    end: usize,
    streams: Vec<Stream>,
    /// Per instruction of the block: the stream its access belongs to.
    at: Vec<Option<usize>>,
    /// The P registers, once the entry check has run (bit per hardware number).
    pub(super) held: u16,
    /// Streams opened and accesses they took (`--stats`).
    pub(super) opened: u32,
    pub(super) accesses: u32,
}

impl LoopPlan {
    /// The registers the plan's streams will hold (bit per hardware number).
    pub(super) fn registers(&self) -> u16 {
        self.streams.iter().fold(0, |m, s| m | 1 << super::asm::reg_num(s.reg))
    }
}

impl BlockEmitter<'_> {
    /// Plans the loop windows of `block` (see the module comment); none unless it is a counted
    /// loop with soft-MMU accesses a stream can take and registers it never names to hold them.
    pub(super) fn plan_loop_windows(
        &mut self,
        block: &DecodedBlock,
        dispatcher_only: bool,
        windowless: &HashSet<u64>,
    ) -> LoopPlan {
        let mut plan = LoopPlan {
            at: vec![None; block.instrs.len()],
            ..LoopPlan::default()
        };
        let usable = self.soft_mmu
            && !self.split_access
            && !dispatcher_only
            && crate::host::features::host_has(iced_x86::CpuidFeature::BMI2);
        if !usable {
            return plan;
        }
        let Some((counter, end, step_at, test_at)) = self.counted_loop(block) else {
            return plan;
        };
        let (i_reg, step, bound, step_first) = counter;
        let written = self.uses[..end].iter().fold(0u16, |m, (_, u)| m | u.written);
        let invariant = |r: Register| r.is_gpr64() && r != i_reg && written & (1 << super::asm::reg_num(r)) == 0;
        // Registers P may take: named by no instruction of the loop (those after it run with
        // P given back); not RSP, not RCX (the entry's lookup takes it).
        let loop_names = self.uses[..(end + 1).min(block.instrs.len())]
            .iter()
            .fold(0u16, |m, (_, u)| m | u.named);
        let mut free = super::SCRATCH_ORDER
            .iter()
            .copied()
            .filter(|&n| n != 1 && n != 4 && loop_names & (1 << n) == 0);
        let mut streams: Vec<(Stream, Vec<usize>)> = Vec::new();
        for (i, d) in block.instrs[..end].iter().enumerate() {
            let copied = d.flow == Flow::Normal && d.rule == Rule::Copy && !d.rule.runs_in_engine(&d.instr, self.mode);
            if !copied {
                continue;
            }
            let memory = self.uses[i].1.memory;
            let Some((base, form, scale, disp, size, access)) = stream_access(&d.instr, memory, i_reg, &invariant)
            else {
                continue;
            };
            // The range ends at I = N only for accesses that see the counter reach it.
            let short = if form == Form::Fixed || reaches_bound(i, step_at, test_at, step_first) {
                0
            } else {
                step as i64 * scale as i64
            };
            let disp_end = disp + size - short;
            if let Some((s, members)) = streams
                .iter_mut()
                .find(|(s, _)| s.base == base && s.form == form && s.scale == scale)
            {
                s.lo = s.lo.min(disp);
                s.hi = s.hi.max(disp_end);
                if access == Access::Write {
                    s.access = Access::Write;
                }
                members.push(i);
            } else if streams.len() < MAX_STREAMS && !windowless.contains(&d.instr.ip()) {
                let Some(n) = free.next() else { continue };
                let stream = Stream {
                    base,
                    form,
                    scale,
                    lo: disp,
                    hi: disp_end,
                    access,
                    key: d.instr.ip(),
                    reg: super::asm::gpr64(n),
                };
                streams.push((stream, vec![i]));
            }
        }
        for (stream, members) in streams {
            // The range's ends must be encodable: displacements in 32 bits.
            let (lo, hi) = (stream.lo, stream.hi - 1);
            let span_end = match (stream.form, bound) {
                (Form::Fixed, _) | (_, Bound::Reg(_)) => Some(hi),
                (_, Bound::Imm(n)) => (n as i64)
                    .checked_mul(stream.scale as i64)
                    .and_then(|v| v.checked_add(hi)),
            };
            // (Only an immediate bound without X makes the high end an immediate, not a
            // displacement: `mov t, imm64`.)
            let fits = |v: i64| i32::try_from(v).is_ok();
            let end_is_imm = matches!(bound, Bound::Imm(_)) && stream.base == Register::None;
            if !fits(lo) || !span_end.is_some_and(|v| fits(v) || end_is_imm) {
                continue;
            }
            let n = plan.streams.len();
            for i in members {
                plan.at[i] = Some(n);
            }
            plan.streams.push(stream);
        }
        if !plan.streams.is_empty() {
            plan.counter = Some(counter);
            plan.end = end;
        }
        plan
    }

    /// (counter, step, bound, the step comes before the test) of a counted loop (see the
    /// module comment), and the index of its back edge (the block's length when the block
    /// falls through to its start). A block may go on past a `jne` back edge: what follows
    /// runs once the loop is left.
    #[allow(clippy::type_complexity)]
    fn counted_loop(&mut self, block: &DecodedBlock) -> Option<((Register, u64, Bound, bool), usize, usize, usize)> {
        use crate::rules::BranchKind;
        let n = block.instrs.len();
        let to_start =
            |d: &crate::block::DecodedInstr| d.flow == Flow::Normal && d.instr.near_branch64() == block.start;
        let back_edges: Vec<usize> = (0..n)
            .filter(|&i| {
                let d = &block.instrs[i];
                matches!(d.rule, Rule::Branch(BranchKind::Jcc | BranchKind::Jmp)) && to_start(d)
            })
            .collect();
        let falls_to_start = !block.ends_in_transfer() && block.end == block.start;
        let end = match back_edges[..] {
            [] if falls_to_start => n,
            [e] if !falls_to_start => e,
            _ => return None,
        };
        let body = &block.instrs[..end.min(n)];
        // Every iteration runs each instruction once: copied ones and direct branches only.
        let simple = body.iter().all(|d| {
            d.flow == Flow::Followed
                || d.flow == Flow::Normal
                    && (d.rule == Rule::Copy && !d.rule.runs_in_engine(&d.instr, self.mode)
                        || matches!(d.rule, Rule::Branch(BranchKind::Jcc | BranchKind::Jmp)))
        });
        if !simple {
            return None;
        }
        // (The loop's instructions: the back edge itself writes no register.)
        let loop_len = end.min(n);
        let written: Vec<u16> = self.uses[..loop_len].iter().map(|(_, u)| u.written).collect();
        let all_written = written.iter().fold(0, |m, w| m | w);
        for i in 0..n.min(end + 1).saturating_sub(1) {
            let (cmp, jcc) = (&block.instrs[i], &block.instrs[i + 1]);
            let leaves_on_equal = jcc.flow == Flow::Normal
                && matches!(jcc.rule, Rule::Branch(BranchKind::Jcc))
                && match jcc.instr.mnemonic() {
                    Mnemonic::Je => !to_start(jcc),
                    Mnemonic::Jne => to_start(jcc) && i + 1 == end,
                    _ => false,
                };
            if cmp.flow != Flow::Normal || !leaves_on_equal {
                continue;
            }
            for (counter, bound) in compared(&cmp.instr) {
                if counter == Register::RSP || !counter.is_gpr64() {
                    continue;
                }
                if let Bound::Reg(r) = bound {
                    if r == counter || all_written & (1 << super::asm::reg_num(r)) != 0 {
                        continue;
                    }
                }
                let bit = 1 << super::asm::reg_num(counter);
                let writers: Vec<usize> = (0..loop_len).filter(|&k| written[k] & bit != 0).collect();
                let [step_at] = writers[..] else { continue };
                let step = super::window::constant_move(&block.instrs[step_at].instr, counter);
                let Some(step) = step.filter(|&c| c > 0 && (c as u64).is_power_of_two() && c <= 4096) else {
                    continue;
                };
                return Some(((counter, step as u64, bound, step_at < i), end, step_at, i));
            }
        }
        None
    }

    /// The entry check before the loop head: borrows the streams' registers and fills each
    /// with its P (see the module comment), or leaves for the engine at the block's start.
    pub(super) fn open_loop_windows(&mut self, block_start: u64) {
        let Some((counter, step, bound, step_first)) = self.loops.counter else {
            return;
        };
        let streams = self.loops.streams.clone();
        let held = self.loops.registers();
        self.borrow_all(held);
        let mut avoid = held | (1 << 4) | (1 << 1) | (1 << super::asm::reg_num(counter));
        for s in &streams {
            if s.base != Register::None {
                avoid |= 1 << super::asm::reg_num(s.base);
            }
        }
        if let Bound::Reg(r) = bound {
            avoid |= 1 << super::asm::reg_num(r);
        }
        let t = self.pick(avoid);
        self.borrow(t);
        let u = self.pick(avoid | (1 << super::asm::reg_num(t)));
        self.borrow(u);
        let rcx_borrowed = self.spilled & (1 << 1) != 0;
        if !rcx_borrowed {
            self.borrow(Register::RCX);
        }
        // Each P starts as its range's low end (guest): what a miss reports.
        for s in &streams {
            let lo = match s.form {
                Form::Indexed => MemoryOperand::new(s.base, counter, s.scale, s.lo, 8, false, Register::None),
                Form::CounterBase => MemoryOperand::with_base_displ(counter, s.lo),
                Form::Fixed => MemoryOperand::with_base_displ(s.base, s.lo),
            };
            self.asm.glue(Instruction::with2(Code::Lea_r64_m, s.reg, lo));
        }
        // The count: N − I0 (− c when the step comes first) a multiple of c under MAX_COUNT·c.
        self.save_flags();
        match bound {
            Bound::Imm(n) => self.asm.mov_imm64(t, n),
            Bound::Reg(r) => self.asm.mov_rr(t, r),
        }
        self.asm.glue(Instruction::with2(Code::Sub_rm64_r64, t, counter));
        if step_first {
            self.asm.glue(Instruction::with2(Code::Sub_rm64_imm32, t, step as i32));
        }
        let first = streams[0];
        let too_many = {
            self.asm
                .glue(Instruction::with2(Code::Cmp_rm64_imm32, t, MAX_COUNT * step as i32));
            self.asm.branch32_forward(Code::Jae_rel32_64)
        };
        self.loop_miss(too_many, first, block_start, true);
        if step > 1 {
            self.asm
                .glue(Instruction::with2(Code::Test_rm64_imm32, t, step as i32 - 1));
            let uneven = self.asm.branch32_forward(Code::Jne_rel32_64);
            self.loop_miss(uneven, first, block_start, true);
        }
        let set = self.level_set();
        for s in &streams {
            // T = the range's last byte (guest).
            let last = s.hi - 1;
            match (s.form, bound) {
                (Form::Fixed, _) => self.lea(t, MemoryOperand::with_base_displ(s.base, last)),
                (Form::CounterBase, Bound::Reg(r)) => self.lea(t, MemoryOperand::with_base_displ(r, last)),
                (Form::Indexed, Bound::Reg(r)) => self.lea(
                    t,
                    MemoryOperand::new(s.base, r, s.scale, last, 8, false, Register::None),
                ),
                (Form::CounterBase | Form::Indexed, Bound::Imm(n)) => {
                    let k = if s.form == Form::Indexed { s.scale as u64 } else { 1 };
                    let end = n.wrapping_mul(k).wrapping_add(last as u64);
                    if s.base == Register::None {
                        self.asm.mov_imm64(t, end);
                    } else {
                        self.lea(t, MemoryOperand::with_base_displ(s.base, end as i64));
                    }
                }
            }
            let table = if s.access == Access::Write {
                crate::context::off::tlb_write(set)
            } else {
                crate::context::off::tlb_read(set)
            };
            self.range_lookup(*s, t, u, table, block_start);
            // The lookup took RCX: its guest value back, for X, N or the counter to be read.
            self.asm
                .mov_from_ctx(Register::RCX, super::asm::spill_offset(Register::RCX));
            // U = host − guest for the range: P = X + U.
            if s.base == Register::None || s.form == Form::CounterBase {
                self.asm.mov_rr(s.reg, u);
            } else {
                self.lea(s.reg, MemoryOperand::new(s.base, u, 1, 0, 0, false, Register::None));
            }
            self.loops.opened += 1;
        }
        self.restore_flags();
        if !rcx_borrowed {
            self.give_back(Register::RCX);
        }
        self.give_back(u);
        self.give_back(t);
        self.loops.held = held;
    }

    /// With flags saved, the stream's register holding the range's first byte and T its last:
    /// leaves U = the TLB's host − guest for the range, or leaves for the engine. The range
    /// may cover two pages when the TLB maps both and their host pages follow each other (the
    /// same addend: a file's pages in the page cache often do — busybox's SHA-256 constants).
    /// RCX is taken.
    fn range_lookup(&mut self, s: Stream, t: Register, u: Register, table: usize, block_start: u64) {
        let (p, rcx, ecx) = (s.reg, Register::RCX, Register::ECX);
        let entry = |disp: usize| MemoryOperand::new(rcx, Register::None, 1, disp as i64, 8, false, Register::GS);
        let a = &mut self.asm;
        // U = page(first), T = page(last) − page(first): 0 or 1.
        a.mov_rr(u, p);
        a.glue(Instruction::with2(Code::Shr_rm64_imm8, u, 12));
        a.glue(Instruction::with2(Code::Shr_rm64_imm8, t, 12));
        a.glue(Instruction::with2(Code::Sub_rm64_r64, t, u));
        a.glue(Instruction::with2(Code::Cmp_rm64_imm8, t, 1));
        let wide = a.branch32_forward(Code::Ja_rel32_64);
        self.loop_miss(wide, s, block_start, true);
        // The first page's entry: its tag is −page.
        let a = &mut self.asm;
        a.mov_rr(rcx, u);
        a.glue(Instruction::with2(Code::Movzx_r32_rm16, ecx, Register::CX));
        a.glue(Instruction::with2(Code::Shl_rm32_imm8, ecx, 4));
        a.glue(Instruction::with2(Code::Add_r64_rm64, u, entry(table)));
        let first = a.branch32_forward(Code::Jne_rel32_64);
        self.loop_miss(first, s, block_start, true);
        let a = &mut self.asm;
        a.glue(Instruction::with2(Code::Mov_r64_rm64, u, entry(table + 8)));
        a.glue(Instruction::with2(Code::Test_rm64_r64, t, t));
        let one_page = a.branch32_forward(Code::Je_rel32_64);
        // The next page's entry (the next slot, the index wrapping): mapped, same addend. A
        // miss reports an address in that page (P moved there meanwhile).
        a.glue(Instruction::with2(Code::Add_rm32_imm8, ecx, 16));
        a.glue(Instruction::with2(Code::And_rm32_imm32, ecx, 0xf_fff0));
        a.glue(Instruction::with2(Code::Add_rm64_imm32, p, 4096));
        a.mov_rr(t, p);
        a.glue(Instruction::with2(Code::Shr_rm64_imm8, t, 12));
        a.glue(Instruction::with2(Code::Add_r64_rm64, t, entry(table)));
        let second = a.branch32_forward(Code::Jne_rel32_64);
        self.loop_miss(second, s, block_start, true);
        let a = &mut self.asm;
        a.glue(Instruction::with2(Code::Sub_rm64_imm32, p, 4096));
        a.glue(Instruction::with2(Code::Cmp_r64_rm64, u, entry(table + 8)));
        let apart = a.branch32_forward(Code::Jne_rel32_64);
        self.loop_miss(apart, s, block_start, true);
        self.bind_here(one_page);
    }

    fn lea(&mut self, dst: Register, mem: MemoryOperand) {
        self.asm.glue(Instruction::with2(Code::Lea_r64_m, dst, mem));
    }

    /// Queues the cold path of an entry check's branch at `field`: the loop leaves for the
    /// engine at its start, reporting the stream's low end (in its register).
    fn loop_miss(&mut self, field: usize, stream: Stream, block_start: u64, flags_saved: bool) {
        let info = 1 | (stream.access as u64) << 16 | MISS_LOOP_WINDOW | (stream.key & 0xfff) << MISS_LOOP_KEY_SHIFT;
        self.cold.push(Cold::TlbMiss {
            field,
            va_reg: stream.reg,
            info,
            guest_rip: block_start,
            spilled: self.spilled,
            flags_saved,
            parked_rcx: None,
        });
    }

    /// Emits instruction `index` through its stream's P if a loop window takes its access;
    /// Ok(false) if none does.
    pub(super) fn loop_access(&mut self, index: usize, instr: &Instruction) -> Result<bool, super::TranslateError> {
        let Some(n) = self.loops.at.get(index).copied().flatten() else {
            return Ok(false);
        };
        let Some((counter, ..)) = self.loops.counter else {
            return Ok(false);
        };
        if self.loops.held == 0 {
            return Ok(false);
        }
        self.release_held();
        let s = self.loops.streams[n];
        let disp = instr.memory_displacement64() as i64;
        let mut rewritten = *instr;
        match s.form {
            Form::Indexed => {
                rewritten.set_memory_base(s.reg);
                rewritten.set_memory_index(counter);
                rewritten.set_memory_index_scale(s.scale);
            }
            Form::CounterBase => {
                rewritten.set_memory_base(counter);
                rewritten.set_memory_index(s.reg);
                rewritten.set_memory_index_scale(1);
            }
            Form::Fixed => {
                rewritten.set_memory_base(s.reg);
                rewritten.set_memory_index(Register::None);
                rewritten.set_memory_index_scale(1);
            }
        }
        rewritten.set_memory_displacement64(disp as u64);
        rewritten.set_memory_displ_size(if disp == 0 { 0 } else { 8 });
        let start = self.asm.buf.len();
        self.asm.emit(&rewritten)?;
        self.site_here(start);
        self.loops.accesses += 1;
        Ok(true)
    }

    /// After instruction `index`: past the loop's back edge (the loop is left), the streams'
    /// registers go back.
    pub(super) fn close_loop_windows(&mut self, index: usize) {
        if self.loops.held != 0 && index == self.loops.end {
            // (After an unconditional back edge nothing is borrowed any more.)
            let held = self.loops.held & self.spilled;
            for n in (0..16).filter(|n| held & (1 << n) != 0) {
                self.give_back(super::asm::gpr64(n));
            }
            self.loops.held = 0;
        }
    }

    /// Whether instruction `index`'s access belongs to a loop window (plain windows leave it).
    pub(super) fn in_loop_window(&self, index: usize) -> bool {
        self.loops.at.get(index).copied().flatten().is_some()
    }
}

/// Whether the access at block index `at` may see the counter equal to the bound N: the last
/// iteration leaves at the test, so an access sees N only between the step and the test (the
/// step first) or outside them (the test first); elsewhere it sees at most N − c.
fn reaches_bound(at: usize, step_at: usize, test_at: usize, step_first: bool) -> bool {
    if step_first {
        step_at < at && at < test_at
    } else {
        at < test_at || at > step_at
    }
}

/// The (counter, bound) pairs `cmp` compares: `cmp I, imm`, `cmp I, N`, `cmp N, I` (64-bit).
fn compared(instr: &Instruction) -> Vec<(Register, Bound)> {
    let reg = |n: u32| (instr.op_kind(n) == OpKind::Register).then(|| instr.op_register(n));
    match instr.code() {
        Code::Cmp_rm64_imm8 | Code::Cmp_rm64_imm32 | Code::Cmp_RAX_imm32 => {
            reg(0).map_or(vec![], |r| vec![(r, Bound::Imm(instr.immediate(1)))])
        }
        Code::Cmp_rm64_r64 | Code::Cmp_r64_rm64 => match (reg(0), reg(1)) {
            (Some(a), Some(b)) => vec![(a, Bound::Reg(b)), (b, Bound::Reg(a))],
            _ => vec![],
        },
        _ => vec![],
    }
}

/// (X, form, k, d, size, read or write) of an access a stream can take: a plain operand
/// (`window::plain_operand_size`; an index may be the counter) whose address is X + k·I + d.
fn stream_access(
    instr: &Instruction,
    access: Option<Access>,
    counter: Register,
    invariant: &dyn Fn(Register) -> bool,
) -> Option<(Register, Form, u32, i64, i64, Access)> {
    let access = access?;
    // (P may need a REX prefix, which AH–BH cannot take.)
    if super::memop::uses_high8(instr) {
        return None;
    }
    let size = super::window::plain_operand_size(instr)?;
    let (base, index, scale) = (instr.memory_base(), instr.memory_index(), instr.memory_index_scale());
    let disp = instr.memory_displacement64() as i64;
    let none_or_invariant = |r: Register| r == Register::None || invariant(r);
    let (x, form, k) = if base == counter && index == Register::None {
        (Register::None, Form::CounterBase, 1)
    } else if index == counter && none_or_invariant(base) {
        (base, Form::Indexed, scale)
    } else if base == counter && scale == 1 && invariant(index) {
        (index, Form::Indexed, 1)
    } else if invariant(base) && index == Register::None {
        (base, Form::Fixed, 0)
    } else {
        return None;
    };
    Some((x, form, k, disp, size, access))
}

//! The block builder: decodes guest code at a RIP with iced-x86 until an unconditional control
//! transfer, an instruction the engine must emulate, a page boundary or the size cap.
//!
//! Blocks are *extended*: a conditional branch does not end one. Its taken side leaves the block
//! (a chained exit) and decoding goes on along the fall-through side, which saves the
//! `jmp` a block-ending `jcc` would need for its fall-through on every execution (measured
//! on busybox `sh`, whose hot loops are chains of short `cmp`/`jcc` runs).
//!
//! Blocks also follow control flow *within their page*, so hot short paths run without a
//! taken host branch or a return lookup:
//! - a direct `jmp` is followed (emits nothing, [`Flow::Followed`]), but never into code the
//!   block already holds: a loop closed by a `jmp` then ends the block where it comes round,
//!   so the block's exit chains to the block of the loop's head — the block itself when it
//!   was entered there. Followed further, a loop whose length does not divide the size cap
//!   was unrolled into as many distinct blocks as it has phases (48 blocks, 53 KiB of host
//!   code, for busybox's SHA-256 round loop, more than the L1 instruction cache holds);
//! - a direct `call` to a *leaf* is inlined ([`Flow::InlinedCall`]): the return address is still
//!   pushed, the callee's code follows in the block, and its `ret` ([`Flow::InlinedRet`]) only
//!   moves RSP back and decoding goes on at the return address. That is exact only because the
//!   callee is checked first ([`inlinable_leaf`]): every instruction on the path from the call to
//!   the `ret` is copied code that neither writes memory nor touches RSP, so the `ret` pops
//!   exactly the address the `call` pushed. Faults inside the callee stay precise (each
//!   instruction keeps its own guest RIP), the callee's `jcc`s leave the block as usual, and a
//!   block is entered only at its start, so nothing resumes between the push and the pop.

use crate::exit::{vector, GuestException};
use crate::rules::{rule, BranchKind, Rule};
use iced_x86::{Code, Decoder, DecoderOptions, Instruction, InstructionInfoFactory, OpAccess, Register};
use std::collections::BTreeSet;

/// Most instructions in one block.
pub const MAX_BLOCK_INSTRUCTIONS: usize = 64;
/// Most instructions of a callee that is inlined (its `ret` included).
pub const MAX_INLINED_CALLEE: usize = 16;
/// Most direct jumps and inlined calls one block follows (each duplicates the code it reaches).
const MAX_FOLLOWED: usize = 4;
const PAGE: u64 = 4096;

/// How an instruction takes part in the block's control flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// Emitted by its rule.
    Normal,
    /// A direct `jmp` whose target follows it in the block: nothing is emitted.
    Followed,
    /// A direct `call` whose leaf callee follows it in the block: only the push is emitted.
    InlinedCall,
    /// The inlined callee's `ret`: RSP moves past the return address the call pushed.
    InlinedRet,
}

pub struct DecodedInstr {
    pub instr: Instruction,
    pub rule: Rule,
    /// The guest bytes, `instr.len()` of them (inline: no allocation per instruction).
    raw: [u8; 15],
    pub flow: Flow,
}

impl DecodedInstr {
    pub fn bytes(&self) -> &[u8] {
        &self.raw[..self.instr.len()]
    }
}

pub struct DecodedBlock {
    pub start: u64,
    /// Guest address the block falls through to after its last instruction.
    pub end: u64,
    /// Lowest and highest (exclusive) guest address the block's instructions occupy: followed
    /// jumps and inlined calls may place code on either side of `start`, never outside its page
    /// (except an instruction straddling into the next one).
    pub span: (u64, u64),
    pub instrs: Vec<DecodedInstr>,
    /// The last instruction leaves the block itself (unconditional branch or engine exit); a
    /// block ending in a `jcc` still needs its fall-through exit.
    pub terminated: bool,
}

impl DecodedBlock {
    pub fn ends_in_transfer(&self) -> bool {
        self.terminated
    }

    /// Everything emission takes from the block, as bytes: its addresses, and each
    /// instruction's address, bytes and part in the control flow (the decoded instruction and
    /// its rule follow from those). Two blocks with equal signatures, emitted with equal
    /// options, get the same host code (`engine/cache.rs`, `Translator::revive`).
    pub fn signature(&self) -> Box<[u8]> {
        let mut sig = Vec::with_capacity(33 + self.instrs.len() * 12);
        for v in [self.start, self.end, self.span.0, self.span.1] {
            sig.extend_from_slice(&v.to_le_bytes());
        }
        sig.push(self.terminated as u8);
        for d in &self.instrs {
            // Within the block's page (or just past it): 16 bits of offset from the start.
            sig.extend_from_slice(&(d.instr.ip().wrapping_sub(self.start) as u16).to_le_bytes());
            sig.push(d.flow as u8);
            sig.push(d.instr.len() as u8);
            sig.extend_from_slice(d.bytes());
        }
        sig.into_boxed_slice()
    }
}

/// Why no block could be built at a RIP.
pub enum BuildError {
    /// The guest would take this exception fetching or decoding the first instruction.
    Fault(GuestException),
    /// The first instruction has no rule.
    Unsupported(Instruction, Vec<u8>),
}

/// Fetches guest code: fills as much of `buf` from guest address `addr` as is readable and
/// returns the count, or the fetch fault if nothing at `addr` is readable.
pub trait CodeFetch {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GuestException>;
}

use crate::supported::is_supported;

/// What the builder needs to know besides the code.
#[derive(Clone, Copy, Debug)]
pub struct BuildOptions<'a> {
    /// The soft-MMU strategy and system mode decide which rules end a block.
    pub soft_mmu: bool,
    pub system: bool,
    /// System mode: the block is translated for CPL0.
    pub kernel: bool,
    /// See `rules::Mode::interrupt_line`.
    pub interrupt_line: bool,
    /// See `rules::Mode::host_tsc`.
    pub host_tsc: bool,
    /// 32-bit code (compatibility mode): decoded as IA-32, with [`crate::rules::rule_compat`].
    pub compat: bool,
    pub verified_only: bool,
    pub max_instructions: usize,
    /// The guest's XCR0: a vector instruction whose state it does not enable is #UD
    /// (`cpu::xsave::components_needed`).
    pub xcr0: u64,
    /// Debugger breakpoints (guest virtual addresses, `engine/debug.rs`): a block ends before
    /// one (it becomes the block's fall-through) and a callee holding one is not inlined, so
    /// code at a breakpoint only ever starts a block.
    pub breakpoints: &'a BTreeSet<u64>,
}

impl BuildOptions<'_> {
    pub fn mode(&self) -> crate::rules::Mode {
        crate::rules::Mode {
            soft_mmu: self.soft_mmu,
            system: self.system,
            kernel: self.kernel,
            interrupt_line: self.interrupt_line,
            host_tsc: self.host_tsc,
            compat: self.compat,
        }
    }
}

/// No breakpoints (what every block is built with unless a debugger set some).
pub static NO_BREAKPOINTS: BTreeSet<u64> = BTreeSet::new();

/// The guest code of one page, as far as it was read: from the block's start to the page end,
/// 15 bytes into the next page only once an instruction straddles it ([`PageCode::read_next`]),
/// and the part before the start only once a jump or call backwards needs it
/// ([`PageCode::read_low`]).
struct PageCode<'a> {
    /// `PAGE_BUFFER` bytes: the page, then 15 of the next.
    buf: &'a mut [u8],
    /// 64, or 32 for compatibility mode.
    bitness: u32,
    page: u64,
    /// Readable bytes are `buf[low..avail]` (guest addresses `page + low ..`).
    low: usize,
    avail: usize,
    /// The part before the block's start was asked for (whether or not it could be read).
    low_tried: bool,
    /// The next page was asked for (whether or not it could be read).
    next_tried: bool,
    /// Why the next page could not be read, if it could not.
    next_page_fault: Option<GuestException>,
}

/// A page of code and 15 bytes more.
const PAGE_BUFFER: usize = PAGE as usize + 15;

thread_local! {
    /// The buffer [`PageCode`] reads into, kept from block to block: allocating and clearing a
    /// fresh one for each block was ≈2% of a Linux boot's translation time. Only bytes read
    /// for the block being built are looked at (`low..avail`), never what an earlier one left.
    static CODE_PAGE: std::cell::RefCell<Box<[u8; PAGE_BUFFER]>> =
        std::cell::RefCell::new(Box::new([0; PAGE_BUFFER]));
}

impl<'a> PageCode<'a> {
    /// Reads from `rip` to the end of its page. The next page is read only when an instruction
    /// at a block's start runs into it ([`PageCode::read_next`]): a CPU walks the next page's
    /// translation (setting its accessed bit, or faulting) only for an instruction that needs
    /// its bytes.
    fn read(fetch: &mut dyn CodeFetch, rip: u64, buf: &'a mut [u8], bitness: u32) -> Result<Self, GuestException> {
        debug_assert_eq!(buf.len(), PAGE_BUFFER);
        let page = rip & !(PAGE - 1);
        let at = (rip - page) as usize;
        let avail = at + fetch.fetch(rip, &mut buf[at..PAGE as usize])?;
        Ok(PageCode {
            buf,
            bitness,
            page,
            low: at,
            avail,
            low_tried: false,
            next_tried: false,
            next_page_fault: None,
        })
    }

    /// Reads the first 15 bytes of the next page (for an instruction that straddles into it).
    fn read_next(&mut self, fetch: &mut dyn CodeFetch) {
        self.next_tried = true;
        if self.avail == PAGE as usize {
            let avail = self.avail;
            match fetch.fetch(self.page + PAGE, &mut self.buf[avail..avail + 15]) {
                Ok(n) => self.avail += n,
                Err(e) => self.next_page_fault = Some(e),
            }
        }
    }

    /// Reads the page before the block's start (same page, so it reads as the rest of it does;
    /// if not, jumps there are simply not followed).
    fn read_low(&mut self, fetch: &mut dyn CodeFetch) {
        self.low_tried = true;
        let at = self.low;
        if matches!(fetch.fetch(self.page, &mut self.buf[..at]), Ok(n) if n == at) {
            self.low = 0;
        }
    }

    fn page_end(&self) -> u64 {
        self.page + PAGE
    }

    /// A decoder positioned at `ip`, which must be readable.
    fn decoder_at(&self, ip: u64) -> Decoder<'_> {
        let pos = (ip - self.page) as usize;
        Decoder::with_ip(self.bitness, &self.buf[pos..self.avail], ip, DecoderOptions::NONE)
    }

    /// `ip` starts inside the page, in what was read.
    fn holds(&self, ip: u64) -> bool {
        ip >= self.page + self.low as u64 && ip < self.page_end() && ((ip - self.page) as usize) < self.avail
    }

    /// `ip` is in the part of the page before the block's start, not read yet.
    fn wants_low(&self, ip: u64) -> bool {
        !self.low_tried && ip >= self.page && ip < self.page + self.low as u64
    }
}

/// The rule the builder uses for `instr`, if it has one (and, with `verified_only`, it is
/// verified). In 32-bit code, an operand with 16-bit addressing has none.
fn rule_for(instr: &Instruction, o: &BuildOptions) -> Option<Rule> {
    if o.compat {
        use iced_x86::OpKind;
        let addr16 = instr.memory_base().size() == 2
            || instr.memory_index().size() == 2
            || instr
                .op_kinds()
                .any(|k| matches!(k, OpKind::MemorySegSI | OpKind::MemorySegDI | OpKind::MemoryESDI));
        return crate::rules::rule_compat(instr.code()).filter(|_| !addr16);
    }
    rule(instr.code()).filter(|_| !o.verified_only || is_supported(instr.code()))
}

/// Whether the block can go on after `instr` (rule `r`) at all.
fn ends_block(r: Rule, instr: &Instruction, o: &BuildOptions) -> bool {
    match r {
        Rule::Branch(BranchKind::Jcc) => false,
        Rule::Branch(_) => true,
        _ => r.runs_in_engine(instr, o.mode()),
    }
}

/// Whether a call to the leaf at `target` can be inlined: within `limit` instructions (its
/// `ret` included), in this page, every instruction up to a plain `ret` is copied code (or a
/// `jcc`, whose taken side leaves the block) that writes no memory and does not use RSP — so the
/// `ret` pops exactly what the call pushed.
fn inlinable_leaf(code: &PageCode, target: u64, limit: usize, o: &BuildOptions) -> bool {
    if !code.holds(target) {
        return false;
    }
    let mut decoder = code.decoder_at(target);
    let mut info = InstructionInfoFactory::new();
    for _ in 0..limit.min(MAX_INLINED_CALLEE) {
        if !decoder.can_decode() || decoder.ip() >= code.page_end() {
            return false;
        }
        let instr = crate::rules::decode(&mut decoder);
        if instr.is_invalid() || o.breakpoints.contains(&instr.ip()) {
            return false;
        }
        let Some(r) = rule_for(&instr, o) else {
            return false;
        };
        match r {
            Rule::Branch(BranchKind::Ret) if instr.code() == Code::Retnq => return true,
            Rule::Branch(BranchKind::Jcc) => {}
            Rule::Copy if !ends_block(r, &instr, o) => {
                let i = info.info(&instr);
                let writes = i
                    .used_memory()
                    .iter()
                    .any(|m| !matches!(m.access(), OpAccess::Read | OpAccess::CondRead | OpAccess::NoMemAccess));
                let stack = i
                    .used_registers()
                    .iter()
                    .any(|u| u.register().is_gpr() && u.register().full_register() == Register::RSP);
                if writes || stack {
                    return false;
                }
            }
            _ => return false,
        }
    }
    false
}

/// What [`decode`] needs read before it can build the block.
enum Need {
    /// The part of the page before the block's start (a jump or call backwards).
    Low,
    /// The start of the next page (the block's first instruction straddles into it).
    Next,
}

/// Decodes one block at `rip`.
pub fn build(fetch: &mut dyn CodeFetch, rip: u64, o: BuildOptions) -> Result<DecodedBlock, BuildError> {
    // (Not reentrant: fetching code builds no block.)
    CODE_PAGE.with_borrow_mut(|buf| {
        let bitness = if o.compat { 32 } else { 64 };
        let mut code = PageCode::read(fetch, rip, &mut buf[..], bitness).map_err(BuildError::Fault)?;
        loop {
            match decode(&code, rip, &o)? {
                Ok(block) => return Ok(block),
                // Each is asked for once (`low_tried`, `next_tried`), so this ends.
                Err(Need::Low) => code.read_low(fetch),
                Err(Need::Next) => code.read_next(fetch),
            }
        }
    })
}

/// Whether the block decoded so far holds an instruction at `ip`.
fn decoded(instrs: &[DecodedInstr], ip: u64) -> bool {
    instrs.iter().any(|d| d.instr.ip() == ip)
}

/// [`build`] over the code read so far, or what must be read first: the part of the page
/// before `rip` (a jump or call the block would follow goes there) or the next page.
fn decode(code: &PageCode, rip: u64, o: &BuildOptions) -> Result<Result<DecodedBlock, Need>, BuildError> {
    let (page, page_end, avail) = (code.page, code.page_end(), code.avail);
    let cap = o.max_instructions.min(MAX_BLOCK_INSTRUCTIONS);
    let mut decoder = code.decoder_at(rip);
    let mut instrs: Vec<DecodedInstr> = Vec::with_capacity(16);
    let mut terminated = false;
    let mut end = rip;
    let mut span = (rip, rip);
    let mut followed = 0;
    // The return address of the inlined call whose callee is being decoded.
    let mut inlined_return: Option<u64> = None;
    while decoder.can_decode() && end < page_end && instrs.len() < cap {
        let pos = (decoder.ip() - page) as usize;
        if !instrs.is_empty() && o.breakpoints.contains(&decoder.ip()) {
            // Falls through to the breakpoint (`end` is already its address), where the
            // dispatcher stops.
            break;
        }
        if followed > 0 && inlined_return.is_none() && decoded(&instrs, decoder.ip()) {
            // Straight-line decoding after a followed backward jump came round to code this
            // block already holds: a loop. The block ends there and falls through to it,
            // which chains to the block that starts at it (this one, when the loop was
            // entered at the block's start) instead of unrolling the loop into the block.
            break;
        }
        let instr = crate::rules::decode(&mut decoder);
        let state_disabled = crate::cpu::xsave::components_needed(&instr) & !o.xcr0 != 0;
        if state_disabled {
            // What a CPU whose XCR0 lacks the instruction's state does; translated, it would
            // run on the host's registers of that state.
            if instrs.is_empty() {
                return Err(BuildError::Fault(GuestException::new(vector::UD)));
            }
            break;
        }
        if instr.is_invalid() {
            if instrs.is_empty() {
                let truncated = avail - pos < 15 && decoder.last_error() == iced_x86::DecoderError::NoMoreBytes;
                if truncated && !code.next_tried {
                    return Ok(Err(Need::Next));
                }
                return Err(BuildError::Fault(match (truncated, code.next_page_fault) {
                    (true, Some(f)) => f,
                    _ => GuestException::new(vector::UD),
                }));
            }
            break;
        }
        let bytes = &code.buf[pos..pos + instr.len()];
        let Some(r) = rule_for(&instr, o) else {
            if instrs.is_empty() {
                return Err(BuildError::Unsupported(instr, bytes.to_vec()));
            }
            break;
        };
        let mut raw = [0u8; 15];
        raw[..bytes.len()].copy_from_slice(bytes);
        span = (span.0.min(instr.ip()), span.1.max(instr.next_ip()));
        end = instr.next_ip();
        let room = cap - instrs.len() - 1;
        let follows = matches!(
            instr.code(),
            Code::Jmp_rel8_64 | Code::Jmp_rel32_64 | Code::Call_rel32_64
        );
        if follows && followed < MAX_FOLLOWED && room > 0 && code.wants_low(instr.near_branch64()) {
            return Ok(Err(Need::Low));
        }
        let mut flow = Flow::Normal;
        let mut next = None;
        match r {
            Rule::Branch(BranchKind::Jmp)
                if matches!(instr.code(), Code::Jmp_rel8_64 | Code::Jmp_rel32_64)
                    && followed < MAX_FOLLOWED
                    && room > 0
                    && code.holds(instr.near_branch64())
                    && instr.near_branch64() != instr.ip()
                    && !decoded(&instrs, instr.near_branch64()) =>
            {
                flow = Flow::Followed;
                next = Some(instr.near_branch64());
            }
            Rule::Branch(BranchKind::Call)
                if instr.code() == Code::Call_rel32_64
                    && inlined_return.is_none()
                    && followed < MAX_FOLLOWED
                    && code.holds(end)
                    && inlinable_leaf(code, instr.near_branch64(), room, o) =>
            {
                flow = Flow::InlinedCall;
                inlined_return = Some(end);
                next = Some(instr.near_branch64());
            }
            Rule::Branch(BranchKind::Ret) if instr.code() == Code::Retnq && inlined_return.is_some() => {
                flow = Flow::InlinedRet;
                next = inlined_return.take();
            }
            _ => {}
        }
        instrs.push(DecodedInstr {
            instr,
            rule: r,
            raw,
            flow,
        });
        if let Some(target) = next {
            if flow != Flow::InlinedRet {
                followed += 1;
            }
            end = target;
            decoder = code.decoder_at(target);
            continue;
        }
        if ends_block(r, &instr, o) {
            terminated = true;
            break;
        }
    }
    if instrs.is_empty() {
        // Only possible when nothing was decodable before the page end.
        return Err(BuildError::Fault(
            code.next_page_fault.unwrap_or(GuestException::new(vector::UD)),
        ));
    }
    Ok(Ok(DecodedBlock {
        start: rip,
        end,
        span,
        instrs,
        terminated,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One page of guest code at `BASE`; everything else faults.
    struct Page(Vec<u8>);
    const BASE: u64 = 0x40_0000;

    impl CodeFetch for Page {
        fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GuestException> {
            if !(BASE..BASE + PAGE).contains(&addr) {
                return Err(GuestException::page_fault(addr, 0x10));
            }
            let at = (addr - BASE) as usize;
            let n = buf.len().min(PAGE as usize - at);
            buf[..n].copy_from_slice(&self.0[at..at + n]);
            Ok(n)
        }
    }

    fn page(pieces: &[(usize, &[u8])]) -> Page {
        let mut p = vec![0xf4; PAGE as usize]; // hlt
        for (at, code) in pieces {
            p[*at..*at + code.len()].copy_from_slice(code);
        }
        Page(p)
    }

    fn build_at(p: &mut Page, offset: u64) -> DecodedBlock {
        let o = BuildOptions {
            soft_mmu: false,
            system: false,
            kernel: false,
            interrupt_line: false,
            host_tsc: false,
            compat: false,
            verified_only: false,
            max_instructions: MAX_BLOCK_INSTRUCTIONS,
            xcr0: u64::MAX,
            breakpoints: &NO_BREAKPOINTS,
        };
        match build(p, BASE + offset, o) {
            Ok(b) => b,
            Err(_) => panic!("no block at {offset:#x}"),
        }
    }

    /// Counts the fetches that reach into the page after `BASE`.
    struct Counting(Page, usize);

    impl CodeFetch for Counting {
        fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GuestException> {
            if addr >= BASE + PAGE {
                self.1 += 1;
            }
            self.0.fetch(addr, buf)
        }
    }

    #[test]
    fn the_next_page_is_read_only_for_an_instruction_that_straddles_it() {
        let o = BuildOptions {
            soft_mmu: true,
            system: true,
            kernel: true,
            interrupt_line: false,
            host_tsc: false,
            compat: false,
            verified_only: false,
            max_instructions: MAX_BLOCK_INSTRUCTIONS,
            xcr0: u64::MAX,
            breakpoints: &NO_BREAKPOINTS,
        };
        // `inc rax; hlt` ending exactly at the page end: the next page is never walked (a CPU
        // would not set its accessed bit).
        let mut p = Counting(page(&[(0xffc, &[0x48, 0xff, 0xc0, 0xf4])]), 0);
        let b = build(&mut p, BASE + 0xffc, o).ok().expect("a block");
        assert_eq!(b.instrs.len(), 2);
        assert_eq!(p.1, 0);
        // `mov eax, imm32` straddling into a page that faults: the fault is the next page's.
        let mut p = Counting(page(&[(0xffe, &[0xb8, 0x01])]), 0);
        match build(&mut p, BASE + 0xffe, o) {
            Err(BuildError::Fault(e)) => assert_eq!(e, GuestException::page_fault(BASE + PAGE, 0x10)),
            _ => panic!("no fault"),
        }
        assert_eq!(p.1, 1);
    }

    fn flows(b: &DecodedBlock) -> Vec<(u64, Flow)> {
        b.instrs.iter().map(|d| (d.instr.ip() - BASE, d.flow)).collect()
    }

    #[test]
    fn a_leaf_call_backwards_in_the_page_is_inlined_and_the_span_covers_it() {
        // 0x10: f: add rax,rcx; ret      0x100: call f; inc rdx; hlt
        let mut p = page(&[
            (0x10, &[0x48, 0x01, 0xc8, 0xc3]),
            (0x100, &[0xe8, 0x0b, 0xff, 0xff, 0xff, 0x48, 0xff, 0xc2]),
        ]);
        let b = build_at(&mut p, 0x100);
        assert_eq!(
            flows(&b),
            [
                (0x100, Flow::InlinedCall),
                (0x10, Flow::Normal),
                (0x13, Flow::InlinedRet),
                (0x105, Flow::Normal),
                (0x108, Flow::Normal)
            ]
        );
        assert_eq!(b.span, (BASE + 0x10, BASE + 0x109));
        assert!(b.terminated, "ends at the hlt");
    }

    #[test]
    fn calls_that_cannot_be_proven_to_return_to_their_site_end_the_block() {
        for (callee, why) in [
            (&[0x48, 0x89, 0x07, 0xc3][..], "mov [rdi],rax writes memory"),
            (&[0x50, 0x58, 0xc3][..], "push/pop move RSP"),
            (&[0x48, 0x8b, 0x04, 0x24, 0xc3][..], "mov rax,[rsp] uses RSP"),
            (&[0xe8, 0, 0, 0, 0, 0xc3][..], "a nested call"),
            (&[0xc2, 0x08, 0x00][..], "ret 8"),
            (&[0xeb, 0xfe][..], "no ret"),
        ] {
            let mut p = page(&[(0, &[0xe8, 0x0b, 0, 0, 0]), (0x10, callee)]);
            let b = build_at(&mut p, 0);
            assert_eq!(flows(&b), [(0, Flow::Normal)], "{why}");
            assert_eq!(b.end, BASE + 5);
        }
        // A callee in another page is not inlined either.
        let mut p = page(&[(0, &[0xe8, 0x00, 0x10, 0, 0])]);
        assert_eq!(flows(&build_at(&mut p, 0)), [(0, Flow::Normal)]);
    }

    #[test]
    fn jumps_are_followed_a_bounded_number_of_times() {
        // 0: jmp 2; 2: jmp 4; ... each to the next one
        let chain: Vec<u8> = [0xeb, 0x00].repeat(MAX_FOLLOWED + 2);
        let mut p = page(&[(0, &chain)]);
        let b = build_at(&mut p, 0);
        assert_eq!(b.instrs.len(), MAX_FOLLOWED + 1);
        assert!(b.instrs[..MAX_FOLLOWED].iter().all(|d| d.flow == Flow::Followed));
        assert_eq!(b.instrs[MAX_FOLLOWED].flow, Flow::Normal, "the last one is a real exit");
        assert!(b.terminated);
        // A jump out of the page is not followed.
        let mut p = page(&[(0, &[0xe9, 0x00, 0x10, 0, 0])]);
        assert_eq!(flows(&build_at(&mut p, 0)), [(0, Flow::Normal)]);
    }

    #[test]
    fn a_loop_closed_by_a_jump_is_not_unrolled_into_the_block() {
        // 0: jmp 0 (to itself): an exit, not a followed jump.
        let mut p = page(&[(0, &[0xeb, 0xfe])]);
        let b = build_at(&mut p, 0);
        assert_eq!(flows(&b), [(0, Flow::Normal)]);
        assert!(b.terminated);
        // 0: inc rax; 3: inc rcx; 6: jne 0xa; 8: jmp 0
        let body = [0x48, 0xff, 0xc0, 0x48, 0xff, 0xc1, 0x75, 0x02, 0xeb, 0xf6];
        let mut p = page(&[(0, &body)]);
        // Entered at its head, the loop is the block, closed by a real exit to itself.
        let b = build_at(&mut p, 0);
        assert_eq!(
            flows(&b),
            [
                (0, Flow::Normal),
                (3, Flow::Normal),
                (6, Flow::Normal),
                (8, Flow::Normal)
            ]
        );
        assert_eq!(b.instrs[3].instr.near_branch64(), BASE);
        // Entered in the middle, the block follows the jump back to the head and ends where
        // it came round, falling through to its own start.
        let b = build_at(&mut p, 3);
        assert_eq!(
            flows(&b),
            [
                (3, Flow::Normal),
                (6, Flow::Normal),
                (8, Flow::Followed),
                (0, Flow::Normal)
            ]
        );
        assert_eq!((b.end, b.terminated), (BASE + 3, false));
    }

    #[test]
    fn a_block_cut_by_the_cap_after_an_inlined_return_falls_through_to_the_return_address() {
        // call f; f: ret   with room for exactly the call and its ret
        let mut p = page(&[(0, &[0xe8, 0x0b, 0, 0, 0]), (0x10, &[0xc3])]);
        let o = BuildOptions {
            soft_mmu: false,
            system: false,
            kernel: false,
            interrupt_line: false,
            host_tsc: false,
            compat: false,
            verified_only: false,
            max_instructions: 2,
            xcr0: u64::MAX,
            breakpoints: &NO_BREAKPOINTS,
        };
        let Ok(b) = build(&mut p, BASE, o) else {
            panic!("no block")
        };
        assert_eq!(flows(&b), [(0, Flow::InlinedCall), (0x10, Flow::InlinedRet)]);
        assert_eq!((b.end, b.terminated), (BASE + 5, false));
        // With room for one instruction nothing is followed.
        let Ok(b) = build(
            &mut p,
            BASE,
            BuildOptions {
                max_instructions: 1,
                ..o
            },
        ) else {
            panic!("no block")
        };
        assert_eq!(flows(&b), [(0, Flow::Normal)]);
    }

    #[test]
    fn a_breakpoint_ends_the_block_before_it_and_is_never_inlined_or_followed_into() {
        fn built(p: &mut Page, breakpoints: &BTreeSet<u64>) -> DecodedBlock {
            let o = BuildOptions {
                soft_mmu: false,
                system: false,
                kernel: false,
                interrupt_line: false,
                host_tsc: false,
                compat: false,
                verified_only: false,
                max_instructions: MAX_BLOCK_INSTRUCTIONS,
                xcr0: u64::MAX,
                breakpoints,
            };
            match build(p, BASE, o) {
                Ok(b) => b,
                Err(_) => panic!("no block"),
            }
        }
        // 0: inc rax; inc rcx; inc rdx; hlt
        let mut p = page(&[(0, &[0x48, 0xff, 0xc0, 0x48, 0xff, 0xc1, 0x48, 0xff, 0xc2])]);
        let b = built(&mut p, &BTreeSet::from([BASE + 6]));
        assert_eq!(flows(&b), [(0, Flow::Normal), (3, Flow::Normal)]);
        assert_eq!(
            (b.end, b.terminated),
            (BASE + 6, false),
            "falls through to the breakpoint"
        );
        // A breakpoint at the block's own start does not cut it: the dispatcher stops there.
        assert_eq!(built(&mut p, &BTreeSet::from([BASE])).instrs.len(), 4);
        // 0: jmp 0x10; 0x10: inc rax; hlt — a followed jump to a breakpoint exits to it.
        let mut p = page(&[(0, &[0xeb, 0x0e]), (0x10, &[0x48, 0xff, 0xc0])]);
        let b = built(&mut p, &BTreeSet::from([BASE + 0x10]));
        assert_eq!((b.end, b.terminated), (BASE + 0x10, false));
        assert!(b.instrs.iter().all(|d| d.instr.ip() != BASE + 0x10));
        // 0: call f; f (0x10): add rax,rcx; ret — a callee holding a breakpoint is not inlined.
        let mut p = page(&[(0, &[0xe8, 0x0b, 0, 0, 0]), (0x10, &[0x48, 0x01, 0xc8, 0xc3])]);
        assert_eq!(built(&mut p, &NO_BREAKPOINTS).instrs[0].flow, Flow::InlinedCall);
        let b = built(&mut p, &BTreeSet::from([BASE + 0x13]));
        assert_eq!(flows(&b), [(0, Flow::Normal)]);
        assert!(b.terminated, "the call is a real exit");
    }
}

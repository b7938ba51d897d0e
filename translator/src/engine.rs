//! The engine: block cache, dispatcher loop, chaining, TLB misses, emulation and invalidation.
//!
//! `run` enters translated code through the entry glue and gets control back only on block
//! exits that are not chained yet, indirect-branch misses, soft-MMU TLB misses, instructions the
//! engine emulates, and guest faults. Each of those is handled here; everything else stays in
//! the code cache.

use crate::block::{self, BuildError, CodeFetch, DecodedBlock};
use crate::context::{
    ContextBox, ExitReason, IBL_EMPTY_TAG, IBL_ENTRIES, MISS_ALIGN_SHIFT, MISS_MMX_STORE, TLB_ENTRIES,
};
use crate::cpu::vendor::{self, Quirk};
use crate::cpu::xsave::XsaveLayout;
use crate::emit::{self, glue::Glue, ExitPatch, HostSite};
use crate::emulate::{self, GuestMemory, Outcome};
use crate::error::TranslateError;
use crate::exit::{Exit, GuestException};
use crate::host::codebuf::CodeBuffer;
use crate::host::gsbase::GsBaseGuard;
use crate::host::signals::{CodeWrite, FaultSite, TranslatedFaults, TranslatedGuard};
use crate::mmu::{self, soft_mmu, Access, MemoryStrategy};
use crate::platform::Platform;
use crate::rules::Rule;
use crate::state::GuestState;
use std::collections::{BTreeMap, HashMap};

const PAGE: u64 = 4096;
/// Default size of the code cache.
pub const DEFAULT_CODE_CACHE: usize = 64 << 20;
/// Consecutive TLB misses at one instruction before the engine gives up (two accesses of one
/// instruction evicting each other forever).
const TLB_RETRY_LIMIT: u32 = 16;

/// Counters for `--stats`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub blocks_translated: u64,
    pub guest_instructions_translated: u64,
    pub block_exits: u64,
    pub chained: u64,
    pub indirect_misses: u64,
    pub tlb_misses: u64,
    pub emulated: u64,
    pub invalidated_blocks: u64,
    pub flushes: u64,
    /// Time spent decoding and emitting blocks.
    pub translate_time: std::time::Duration,
}

/// Something in another block that jumps straight into this one.
enum Incoming {
    /// A chained `jmp/jcc rel32` at `field`; `original` is its exit stub.
    Jump { field: u64, original: u64 },
    /// A filled return cache (absolute addresses of its fields and of its lookup path).
    InlineCache {
        imm: u64,
        rel: u64,
        miss: u64,
        fill: u64,
        fill_stub: u64,
    },
}

impl Incoming {
    /// Puts the link back to its unlinked form (exit stub; empty cache that fills on its next
    /// miss). Allocation-free: the signal handlers call it too.
    ///
    /// `anywhere`: translated code may be stopped at *any* instruction (an asynchronous
    /// signal), possibly in a cache's hit path after the guest registers were put back, so the
    /// hit jump must keep its target; emptying the cache's tag is enough to send the next probe
    /// to the dispatcher.
    ///
    /// # Safety
    /// The recorded fields must lie in the live code buffer and no translated code may run.
    unsafe fn undo(&self, anywhere: bool) {
        let rel32 = |field: u64, target: u64| {
            // SAFETY: the caller guarantees `field` is a rel32 inside the code buffer.
            unsafe { std::ptr::write_unaligned(field as *mut i32, target.wrapping_sub(field + 4) as i32) }
        };
        match *self {
            Incoming::Jump { field, original } => rel32(field, original),
            Incoming::InlineCache {
                imm,
                rel,
                miss,
                fill,
                fill_stub,
            } => {
                // SAFETY: as above, for the cache's imm64 field.
                unsafe { std::ptr::write_unaligned(imm as *mut u64, crate::emit::INLINE_CACHE_EMPTY) };
                if !anywhere {
                    rel32(rel, miss);
                }
                rel32(fill, fill_stub);
            }
        }
    }
}

struct Block {
    guest_start: u64,
    host: u64,
    host_len: u32,
    sites: Vec<HostSite>,
    exits: Vec<ExitPatch>,
    /// Chained jumps and return caches that lead into this block (undone on invalidation).
    incoming: Vec<Incoming>,
    inline_caches: Vec<crate::emit::InlineCache>,
    valid: bool,
}

/// Configuration of a translator instance.
pub struct Config {
    pub strategy: MemoryStrategy,
    pub code_cache_bytes: usize,
    /// Refuse instruction forms that have a rule but are not in the verified supported set
    /// (`supported.txt`). The harness itself needs them allowed.
    pub verified_only: bool,
}

/// One vCPU's binary translator.
pub struct Translator {
    ctx: ContextBox,
    code: CodeBuffer,
    glue: Glue,
    glue_len: usize,
    strategy: MemoryStrategy,
    verified_only: bool,
    blocks: Vec<Block>,
    by_guest: HashMap<u64, usize>,
    by_host: BTreeMap<u64, usize>,
    code_pages: HashMap<u64, Vec<usize>>,
    /// Identity strategy: decoded instructions the engine performs (SYSCALL, CPUID…) by guest
    /// RIP, so a program that makes 10^5 system calls does not re-fetch and re-decode each one.
    /// Their pages are in `code_pages`, so writes and unmaps drop them like blocks.
    emulated_at: HashMap<u64, (iced_x86::Instruction, Rule)>,
    /// Set by the asynchronous-signal handler; `run` returns `Exit::Interrupted` at its next
    /// dispatch. (A signal landing between this check and entering translated code, outside
    /// the code buffer, is seen at the next natural exit.)
    interrupted: std::sync::atomic::AtomicBool,
    /// Identity strategy: write-protect host pages holding translated code, to notice
    /// self-modifying code (off for multi-threaded guests, whose other threads' translators
    /// do not know this one's protections).
    write_protect_code: bool,
    /// An instruction that writes the page holding its own code: it runs once from an uncached,
    /// unregistered one-instruction block (otherwise the write-protect/invalidate cycle would
    /// never end), as QEMU does for self-modifying code.
    uncached_step: Option<u64>,
    /// Identity strategy: host pages write-protected because they hold translated code. Boxed
    /// and reached by raw pointer from the signal handler.
    protected: Box<crate::host::pages::ProtectedPages>,
    /// Soft-MMU access crossing into a page that is not host-contiguous: both pages are copied
    /// into `bounce_buffer`, the instruction runs once against the copy, and written bytes go back.
    bounce: Option<Bounce>,
    bounce_buffer: Option<memmap2_free::PageBuffer>,
    /// The guest XCR0 the code cache was translated for (0: none yet).
    translated_xcr0: u64,
    /// Identity strategy: host mappings, for no-execute (code is fetched only from PROT_EXEC
    /// pages, as the CPU would) and for the protections SMC detection changes.
    maps: crate::host::pages::HostMaps,
    stats: Stats,
}

/// An in-flight split access (see `Translator::bounce`).
#[derive(Clone, Copy)]
struct Bounce {
    page_va: u64,
    hosts: [u64; 2],
    pas: [u64; 2],
    write: bool,
}

mod memmap2_free {
    /// Two page-aligned host pages for split accesses (alignment faults must see the guest's
    /// offsets).
    pub struct PageBuffer(pub *mut u8);

    impl PageBuffer {
        pub fn new() -> Option<Self> {
            crate::host::map_anonymous(8192, libc::PROT_READ | libc::PROT_WRITE).map(PageBuffer)
        }
    }

    impl Drop for PageBuffer {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`.
            unsafe { libc::munmap(self.0 as *mut libc::c_void, 8192) };
        }
    }
}

impl Drop for Translator {
    fn drop(&mut self) {
        self.protected.release_all();
    }
}

impl Translator {
    pub fn new(config: Config) -> Result<Self, TranslateError> {
        let mut code = CodeBuffer::new(config.code_cache_bytes)?;
        let (glue_code, glue) = emit::glue::emit(code.cursor(), std::arch::is_x86_feature_detected!("avx"));
        code.append(&glue_code)?;
        let glue_len = code.used();
        let mut ctx = ContextBox::new();
        ctx.get_mut().flush_ibl(glue.ibl_empty);
        Ok(Translator {
            ctx,
            code,
            glue,
            glue_len,
            strategy: config.strategy,
            verified_only: config.verified_only,
            blocks: Vec::new(),
            by_guest: HashMap::new(),
            emulated_at: HashMap::new(),
            interrupted: std::sync::atomic::AtomicBool::new(false),
            write_protect_code: true,
            by_host: BTreeMap::new(),
            code_pages: HashMap::new(),
            uncached_step: None,
            protected: Box::default(),
            bounce: None,
            bounce_buffer: None,
            translated_xcr0: 0,
            maps: Default::default(),
            stats: Stats::default(),
        })
    }

    pub fn state(&self) -> &GuestState {
        &self.ctx.get().state
    }

    pub fn state_mut(&mut self) -> &mut GuestState {
        &mut self.ctx.get_mut().state
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Bytes of translated code in the cache.
    pub fn code_cache_used(&self) -> usize {
        self.code.used() - self.glue_len
    }

    /// Forgets every translation and TLB entry (after the guest changed code or page tables
    /// behind the translator's back, e.g. the harness writing a new test instruction).
    pub fn flush(&mut self) {
        self.blocks.clear();
        self.by_guest.clear();
        self.emulated_at.clear();
        self.by_host.clear();
        self.code_pages.clear();
        self.protected.release_all();
        self.code.reset_to(self.glue_len);
        let ctx = self.ctx.get_mut();
        ctx.flush_tlb();
        ctx.flush_ibl(self.glue.ibl_empty);
        self.stats.flushes += 1;
    }

    /// Forgets translations of code in `[start, start+len)` (identity strategy: the guest
    /// unmapped, remapped or reprotected that memory).
    pub fn invalidate_range(&mut self, start: u64, len: u64) {
        self.maps.invalidate();
        let end = start.saturating_add(len);
        let pages: Vec<u64> = self
            .code_pages
            .keys()
            .copied()
            .filter(|&p| p + PAGE > start && p < end)
            .collect();
        for page in pages {
            self.invalidate_phys_page(page);
            self.protected.forget(page);
        }
    }

    /// A shared mapping appeared (identity strategy): code pages in shared file mappings may
    /// have new aliases, which must be write-protected too.
    pub fn shared_mapping_added(&mut self) {
        self.maps.invalidate();
        if !self.write_protect_code {
            return;
        }
        let pages: Vec<u64> = self.code_pages.keys().copied().collect();
        for page in pages {
            // Cheap for pages that are not in a shared file mapping (a binary search).
            self.protected.protect_aliases(page, &mut self.maps);
        }
    }

    /// Turns write-protection of translated code pages (identity strategy) on or off; off also
    /// releases the pages protected so far. With it off, only `invalidate_range` (the guest's
    /// munmap/mprotect/mmap) drops stale translations.
    pub fn set_write_protect_code(&mut self, on: bool) {
        self.write_protect_code = on;
        if !on {
            self.protected.release_all();
        }
    }

    /// Drops the soft-MMU TLB (guest CR3 write, INVLPG, privilege change).
    pub fn flush_tlb(&mut self) {
        self.ctx.get_mut().flush_tlb();
    }

    /// Runs guest code from `state().rip` until an exit that needs the caller, or until
    /// `block_budget` dispatcher rounds have passed.
    pub fn run(&mut self, platform: &mut dyn Platform, block_budget: u64) -> Result<Exit, TranslateError> {
        self.check_extended_state()?;
        let _gs = GsBaseGuard::install(self.ctx.as_ptr() as u64)?;
        let faults = TranslatedFaults {
            ctx: self.ctx.as_ptr(),
            lookup: lookup_site,
            data: self as *const Translator as *const (),
            fault_exit: self.glue.exit,
            code_write,
            interrupt,
            code_range: self.code.range(),
        };
        let _armed = TranslatedGuard::arm(&faults);
        let mut pending_link = 0u64;
        let mut last_miss = (0u64, 0u32);
        for _ in 0..block_budget {
            // A plain load first: the locked swap only when a signal did arrive.
            if self.interrupted.load(std::sync::atomic::Ordering::Relaxed)
                && self.interrupted.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(Exit::Interrupted);
            }
            let rip = self.ctx.get().state.rip;
            let host = match self.block_for(rip, platform)? {
                Lookup::Host(h) => h,
                Lookup::Exit(exit) => return Ok(exit),
                Lookup::Emulated => {
                    pending_link = 0;
                    continue;
                }
            };
            if pending_link != 0 {
                self.chain(pending_link, host);
                pending_link = 0;
            }
            self.enter(host);
            self.stats.block_exits += 1;
            self.invalidate_written_pages();
            if let Some(b) = self.bounce.take() {
                self.finish_bounce(b);
            }
            let ctx = self.ctx.get_mut();
            match ctx.exit_reason {
                r if r == ExitReason::Branch as u32 => pending_link = ctx.exit_link,
                r if r == ExitReason::IndirectMiss as u32 => {
                    self.stats.indirect_misses += 1;
                    let target = self.ctx.get().state.rip;
                    if !mmu::is_canonical(target) {
                        // The CPU raises #GP(0) at the branch, with RSP as before it.
                        let ctx = self.ctx.get_mut();
                        ctx.state.rip = ctx.branch_rip;
                        ctx.state.gpr[4] = ctx.state.gpr[4].wrapping_sub(ctx.branch_rsp_delta);
                        return Ok(Exit::Exception(GuestException::gp(0)));
                    }
                    // Only a return cache's first miss sets the link; clear it so a later
                    // table miss elsewhere does not refill that cache.
                    let site = std::mem::take(&mut self.ctx.get_mut().exit_link);
                    if let Lookup::Host(h) = self.block_for(target, platform)? {
                        self.ibl_insert(target, h);
                        if site != 0 {
                            self.fill_inline_cache(site, target, h);
                        }
                    }
                }
                r if r == ExitReason::TlbMiss as u32 => {
                    self.stats.tlb_misses += 1;
                    let rip = self.ctx.get().state.rip;
                    last_miss = if last_miss.0 == rip {
                        (rip, last_miss.1 + 1)
                    } else {
                        (rip, 1)
                    };
                    if last_miss.1 > TLB_RETRY_LIMIT {
                        return Err(TranslateError::Host(format!(
                            "soft-MMU TLB thrashing at guest RIP {rip:#x} (two accesses of one instruction evict each other)"
                        )));
                    }
                    if let Some(exc) = self.tlb_miss()? {
                        let ctx = self.ctx.get_mut();
                        if ctx.miss_info & MISS_MMX_STORE != 0 && vendor::host_has(Quirk::FaultingMmxStoreResetsTop) {
                            ctx.state.xsave.set_x87_top(0);
                        }
                        return Ok(Exit::Exception(exc));
                    }
                }
                r if r == ExitReason::Emulate as u32 => {}
                r if r == ExitReason::SelfModify as u32 => {
                    // The store's page is writable and its blocks are gone: run the store once
                    // from an uncached block, then go on from fresh translations.
                    self.uncached_step = Some(self.ctx.get().state.rip);
                }
                r if r == ExitReason::Fault as u32 => {
                    let ctx = self.ctx.get();
                    let vector = ctx.fault_vector as u8;
                    let exc = match vector {
                        14 => GuestException::page_fault(ctx.fault_address, ctx.fault_error_code),
                        13 | 17 => GuestException {
                            vector,
                            error_code: Some(ctx.fault_error_code),
                            address: None,
                        },
                        _ => GuestException::new(vector),
                    };
                    return Ok(Exit::Exception(exc));
                }
                other => return Err(TranslateError::Host(format!("unknown exit reason {other}"))),
            }
        }
        Ok(Exit::BlockLimit)
    }

    /// The entry glue `xrstor`s the guest's XSAVE image with its XCR0 as the mask: refuse a state
    /// the host would fault on (an XCR0 outside the managed set, a malformed header or MXCSR),
    /// and drop translations made for another XCR0 (copied `xsave`/`xrstor` are specialized to it).
    fn check_extended_state(&mut self) -> Result<(), TranslateError> {
        let state = &self.ctx.get().state;
        let xcr0 = state.xcr0;
        if xcr0 != self.translated_xcr0 {
            XsaveLayout::host()
                .check_guest_xcr0(xcr0)
                .map_err(TranslateError::Host)?;
            self.flush();
            self.translated_xcr0 = xcr0;
        }
        let state = &self.ctx.get().state;
        state
            .xsave
            .check(XsaveLayout::host().host_xcr0())
            .map_err(|why| TranslateError::Host(format!("guest extended state cannot be loaded: {why}")))
    }

    /// Invalidates the blocks of host pages the guest wrote since the last exit (identity
    /// strategy; the signal handler already unlinked them and made the pages writable).
    fn invalidate_written_pages(&mut self) {
        if self.protected.dirty_count == 0 && !self.protected.dirty_overflow {
            return;
        }
        if self.protected.dirty_overflow {
            self.flush();
            return;
        }
        let dirty: Vec<u64> = self.protected.dirty[..self.protected.dirty_count].to_vec();
        self.protected.dirty_count = 0;
        for written in dirty {
            let page = self.protected.code_page_of(written);
            self.protected.forget(written);
            self.invalidate_phys_page(page);
            self.protected.forget(page);
        }
    }

    fn enter(&mut self, host: u64) {
        self.ctx.get_mut().entry_target = host;
        self.ctx.get_mut().exit_link = 0;
        // SAFETY: `glue.entry` is the entry glue emitted into our executable buffer; it follows
        // the C ABI (saves callee-saved registers, MXCSR and FCW, returns normally) and runs guest
        // code only through translations whose every memory access goes through the strategy. The
        // GS base points at our context for the duration (installed in `run`).
        let entry: extern "C" fn() = unsafe { std::mem::transmute(self.glue.entry as usize) };
        entry();
    }

    fn chain(&mut self, field: u64, host: u64) {
        // The source block may have been invalidated since it exited.
        let Some(src) = self.block_at_host(field) else { return };
        if !self.blocks[src].valid {
            return;
        }
        let Some(&dst) = self.by_host.get(&host) else { return };
        if !self.blocks[dst].valid {
            return;
        }
        let original = {
            let block = &self.blocks[src];
            let off = (field - block.host) as u32;
            match block.exits.iter().find(|e| e.field == off) {
                Some(_) => read_rel32_target(field),
                None => return,
            }
        };
        self.code.patch_rel32(field, host);
        self.blocks[dst].incoming.push(Incoming::Jump { field, original });
        self.stats.chained += 1;
    }

    /// Points the return cache whose `mov rax, imm64` field is at `site` at `target`/`host`.
    fn fill_inline_cache(&mut self, site: u64, target: u64, host: u64) {
        let Some(src) = self.block_at_host(site) else { return };
        let block = &self.blocks[src];
        let base = block.host;
        let Some(cache) = block
            .inline_caches
            .iter()
            .find(|c| base + c.imm_field as u64 == site)
            .copied()
        else {
            return;
        };
        let Some(&dst) = self.by_host.get(&host) else { return };
        if !self.blocks[src].valid || !self.blocks[dst].valid {
            return;
        }
        let (imm, rel, miss, fill, fill_stub) = (
            base + cache.imm_field as u64,
            base + cache.rel_field as u64,
            base + cache.miss as u64,
            base + cache.fill_field as u64,
            base + cache.fill_stub as u64,
        );
        self.code.patch_u64(imm, target.wrapping_neg());
        self.code.patch_rel32(rel, host);
        // Later misses use the table (the site is polymorphic) instead of the dispatcher.
        self.code.patch_rel32(fill, fill + 4);
        self.blocks[dst].incoming.push(Incoming::InlineCache {
            imm,
            rel,
            miss,
            fill,
            fill_stub,
        });
        self.stats.chained += 1;
    }

    fn ibl_insert(&mut self, target: u64, host: u64) {
        let ctx = self.ctx.get_mut();
        let i = (target & (IBL_ENTRIES as u64 - 1)) as usize;
        ctx.ibl_tags[i] = target.wrapping_neg();
        ctx.ibl_hosts[i] = host;
    }

    fn block_at_host(&self, addr: u64) -> Option<usize> {
        let (_, &i) = self.by_host.range(..=addr).next_back()?;
        let b = &self.blocks[i];
        (addr < b.host + b.host_len as u64).then_some(i)
    }

    /// The host address of the block at `rip`, translating it if needed. Instructions the
    /// engine emulates are handled here directly when a block would start with one.
    fn block_for(&mut self, rip: u64, platform: &mut dyn Platform) -> Result<Lookup, TranslateError> {
        let uncached = self.uncached_step == Some(rip);
        if uncached {
            self.uncached_step = None;
        } else if let Some(&i) = self.by_guest.get(&rip) {
            return Ok(Lookup::Host(self.blocks[i].host));
        } else if let Some(&(instr, rule)) = self.emulated_at.get(&rip) {
            self.stats.emulated += 1;
            return self.emulate(&instr, rule, platform);
        }
        let translate_started = std::time::Instant::now();
        let soft = self.strategy.is_soft_mmu();
        let mut fetch = Fetcher {
            strategy: &self.strategy,
            state: &self.ctx.get().state,
            pages: Vec::new(),
            maps: &mut self.maps,
        };
        let cap = if uncached { 1 } else { block::MAX_BLOCK_INSTRUCTIONS };
        let user = self.ctx.get().state.cpl == crate::state::Cpl::User;
        let block = match block::build(&mut fetch, rip, soft, user, self.verified_only, cap) {
            Ok(b) => b,
            Err(BuildError::Fault(exc)) => return Ok(Lookup::Exit(Exit::Exception(exc))),
            Err(BuildError::Unsupported(instr, bytes)) => {
                return Err(TranslateError::Unsupported {
                    rip,
                    text: instr.to_string(),
                    code: format!("{:?}", instr.code()),
                    bytes: hex(&bytes),
                })
            }
        };
        // Only pages the block's instructions occupy hold its code (the builder peeks 15 bytes
        // into the next page in case an instruction straddles it).
        let pages = if uncached {
            Vec::new()
        } else if !soft {
            // Identity: the host pages the block's bytes occupy, write-protected (if writable)
            // so a guest write to them is noticed; all of them are recorded so an unmap or
            // remap of the range drops the block.
            let mut pages = Vec::new();
            let mut page = block.start & !(PAGE - 1);
            while page < block.end {
                if self.write_protect_code {
                    self.protected.protect(page, &mut self.maps);
                }
                pages.push(page);
                page += PAGE;
            }
            pages
        } else {
            fetch
                .pages
                .into_iter()
                .filter(|&(va, _)| va < block.end && va + PAGE > block.start)
                .map(|(_, pa)| pa)
                .collect()
        };
        if let Some(first) = block.instrs.first() {
            let fs_gs = matches!(
                first.instr.segment_prefix(),
                iced_x86::Register::FS | iced_x86::Register::GS
            );
            if first.rule.runs_in_engine(soft, fs_gs) {
                self.stats.translate_time += translate_started.elapsed();
                self.stats.emulated += 1;
                let instr = first.instr;
                if !soft && !uncached {
                    self.emulated_at.insert(rip, (instr, first.rule));
                    for page in pages {
                        self.code_pages.entry(page).or_default();
                    }
                }
                return self.emulate(&instr, first.rule, platform);
            }
        }
        let host = self.install(block, pages, !uncached)?;
        self.stats.translate_time += translate_started.elapsed();
        Ok(Lookup::Host(host))
    }

    fn emulate(
        &mut self,
        instr: &iced_x86::Instruction,
        rule: Rule,
        platform: &mut dyn Platform,
    ) -> Result<Lookup, TranslateError> {
        use crate::rules::{EmulateOp, ImplicitOp};
        let unsupported = |why: &str| TranslateError::Unsupported {
            rip: instr.ip(),
            text: instr.to_string(),
            code: format!("{:?}", instr.code()),
            bytes: why.to_string(),
        };
        let outcome = match rule {
            Rule::Emulate(EmulateOp::Segment) | Rule::Implicit(_) => {
                let mut written = Vec::new();
                let result = {
                    let ctx = self.ctx.get_mut();
                    let mut state = ctx.state.clone();
                    let alignment_checks = rule != Rule::Implicit(ImplicitOp::Gather);
                    let mut mem = Memory {
                        strategy: &self.strategy,
                        state: state.clone(),
                        written: &mut written,
                        alignment_checks,
                    };
                    let r = match rule {
                        Rule::Implicit(ImplicitOp::String) => emulate::string::execute(&mut state, instr, &mut mem)
                            .map_err(|_| unsupported("(32-bit address size string instruction)")),
                        Rule::Implicit(_) => emulate::implicit::execute(&mut state, instr, &mut mem)
                            .map_err(|_| unsupported("(no engine implementation for this form)")),
                        _ => emulate::segment::execute(&mut state, instr, &mut mem).map_err(|u| match u {
                            emulate::segment::Unsupported::CompatibilityMode(cs) => unsupported(&format!(
                                "(far transfer to 32-bit code segment {cs:#x}: compatibility mode)"
                            )),
                            emulate::segment::Unsupported::Form => unsupported("(segment form)"),
                        }),
                    };
                    ctx.state = state;
                    r
                };
                for page in written {
                    self.invalidate_phys_page(page);
                }
                result?
            }
            Rule::Emulate(op) => emulate::sensitive(&mut self.ctx.get_mut().state, instr, op, platform),
            _ => return Err(unsupported("(rule has no engine implementation)")),
        };
        Ok(match outcome {
            Outcome::Continue => Lookup::Emulated,
            Outcome::Exit(exit) => Lookup::Exit(exit),
        })
    }

    fn install(&mut self, block: DecodedBlock, phys_pages: Vec<u64>, cached: bool) -> Result<u64, TranslateError> {
        let options = emit::EmitOptions {
            soft_mmu: self.strategy.is_soft_mmu(),
            split_access: self.bounce.is_some(),
            guest_xcr0: self.translated_xcr0,
        };
        let emitted = match emit::emit_block(&block, self.code.cursor(), &self.glue, options) {
            Ok(e) if e.code.len() <= self.code.remaining() => e,
            Ok(_) | Err(TranslateError::CodeCacheFull) => {
                self.flush();
                emit::emit_block(&block, self.code.cursor(), &self.glue, options)?
            }
            Err(e) => return Err(e),
        };
        let host = self.code.append(&emitted.code)?;
        if trace_blocks() {
            dump_block(&block, host, &emitted.code);
        }
        let index = self.blocks.len();
        self.stats.blocks_translated += 1;
        self.stats.guest_instructions_translated += block.instrs.len() as u64;
        for &page in &phys_pages {
            let entry = self.code_pages.entry(page).or_default();
            if entry.is_empty() {
                // Writes to this page must now miss so they can invalidate its blocks.
                self.ctx.get_mut().tlb_write.fill(crate::context::TlbEntry {
                    vpn: crate::context::TLB_EMPTY,
                    addend: 0,
                });
            }
            entry.push(index);
        }
        self.blocks.push(Block {
            guest_start: block.start,
            host,
            host_len: emitted.code.len() as u32,
            sites: emitted.sites,
            exits: emitted.exits,
            incoming: Vec::new(),
            inline_caches: emitted.inline_caches,
            valid: cached,
        });
        if cached {
            self.by_guest.insert(block.start, index);
        }
        self.by_host.insert(host, index);
        Ok(host)
    }

    /// Invalidates every block whose code lies in guest physical page `page` (self-modifying
    /// code): unlinks chained jumps into it and removes it from the lookups.
    fn invalidate_phys_page(&mut self, page: u64) {
        let Some(list) = self.code_pages.remove(&page) else {
            return;
        };
        if !self.strategy.is_soft_mmu() {
            // An instruction may straddle into `page` from the one before.
            self.emulated_at
                .retain(|&rip, _| !(rip + 15 > page && rip < page + PAGE));
        }
        for i in list {
            if !self.blocks[i].valid {
                continue;
            }
            self.blocks[i].valid = false;
            self.stats.invalidated_blocks += 1;
            let (start, host) = (self.blocks[i].guest_start, self.blocks[i].host);
            if self.by_guest.get(&start) == Some(&i) {
                self.by_guest.remove(&start);
            }
            for link in std::mem::take(&mut self.blocks[i].incoming) {
                // SAFETY: links are recorded inside the code buffer; translated code is stopped.
                unsafe { link.undo(false) };
            }
            let empty = self.glue.ibl_empty;
            let ctx = self.ctx.get_mut();
            for slot in 0..IBL_ENTRIES {
                if ctx.ibl_hosts[slot] == host {
                    ctx.ibl_hosts[slot] = empty;
                    ctx.ibl_tags[slot] = IBL_EMPTY_TAG;
                }
            }
        }
    }

    /// Sets up a split access: both pages copied into the bounce buffer, the first page's TLB
    /// entry pointed at it, and the instruction scheduled as an uncached one-instruction block
    /// without the crossing check.
    fn start_bounce(
        &mut self,
        fills: &[(u64, u64, u64)],
        access: Access,
        rip: u64,
        va: u64,
        size: u64,
    ) -> Result<(), TranslateError> {
        if self.bounce_buffer.is_none() {
            self.bounce_buffer = memmap2_free::PageBuffer::new();
        }
        let Some(buffer) = self.bounce_buffer.as_ref().map(|b| b.0) else {
            return Err(TranslateError::SplitAccess { rip, va, size });
        };
        let write = access == Access::Write;
        if write {
            self.invalidate_phys_page(fills[0].1);
            self.invalidate_phys_page(fills[1].1);
        }
        for (i, fill) in fills.iter().enumerate() {
            // SAFETY: fill.2 is a page of guest RAM; the buffer has two pages.
            unsafe { std::ptr::copy_nonoverlapping(fill.2 as *const u8, buffer.add(i * PAGE as usize), PAGE as usize) };
        }
        let page_va = fills[0].0;
        let ctx = self.ctx.get_mut();
        let index = ((page_va >> 12) as usize) & (TLB_ENTRIES - 1);
        let entry = crate::context::TlbEntry {
            vpn: page_va >> 12,
            addend: (buffer as u64).wrapping_sub(page_va),
        };
        if write {
            ctx.tlb_write[index] = entry;
        } else {
            ctx.tlb_read[index] = entry;
        }
        self.bounce = Some(Bounce {
            page_va,
            hosts: [fills[0].2, fills[1].2],
            pas: [fills[0].1, fills[1].1],
            write,
        });
        self.uncached_step = Some(rip);
        Ok(())
    }

    /// Ends a split access: written bytes go back to guest memory, the TLB forgets the buffer.
    fn finish_bounce(&mut self, b: Bounce) {
        let Some(buffer) = self.bounce_buffer.as_ref().map(|b| b.0) else {
            return;
        };
        if b.write {
            for (i, &host) in b.hosts.iter().enumerate() {
                // SAFETY: as in start_bounce.
                unsafe { std::ptr::copy_nonoverlapping(buffer.add(i * PAGE as usize), host as *mut u8, PAGE as usize) };
            }
            for pa in b.pas {
                self.invalidate_phys_page(pa);
            }
        }
        let ctx = self.ctx.get_mut();
        let index = ((b.page_va >> 12) as usize) & (TLB_ENTRIES - 1);
        let empty = crate::context::TlbEntry {
            vpn: crate::context::TLB_EMPTY,
            addend: 0,
        };
        ctx.tlb_write[index] = empty;
        ctx.tlb_read[index] = empty;
    }

    /// Handles a soft-MMU TLB miss: walk, set A/D bits, fill the TLB, or report the fault.
    fn tlb_miss(&mut self) -> Result<Option<GuestException>, TranslateError> {
        let ctx = self.ctx.get();
        let va = ctx.miss_va;
        let size = (ctx.miss_info & 0xffff).max(1);
        let access = Access::from_bits((ctx.miss_info >> 16) & 0xff);
        let stack = ctx.miss_info & (1 << 24) != 0;
        let rip = ctx.state.rip;
        let state = ctx.state.clone();
        // Alignment checking comes before paging (CPL3 with CR0.AM and RFLAGS.AC).
        let alignment = match size {
            2 | 4 | 8 => size,
            10 => 8,
            _ => 1,
        };
        let ac = state.alignment_checking();
        let exempt = ctx.miss_info & (1 << 25) != 0;
        if !mmu::is_canonical(va) {
            // Non-canonical addresses fault before alignment or paging: #SS for stack accesses.
            let vector = if stack { 12 } else { crate::exit::vector::GP };
            return Ok(Some(GuestException {
                vector,
                error_code: Some(0),
                address: None,
            }));
        }
        let required = 1u64 << ((ctx.miss_info >> MISS_ALIGN_SHIFT) & 0xf);
        let ac_fault = GuestException {
            vector: crate::exit::vector::AC,
            error_code: Some(0),
            address: None,
        };
        if !va.is_multiple_of(required) {
            // Instructions that require alignment (the XSAVE/FXSAVE families) check it before
            // paging. With alignment checking on, an image that is not even 4-byte aligned
            // raises #AC; otherwise a misaligned one raises #GP(0) (measured on Intel Xeon:
            // `xsave`/`fxsave` at offsets 1, 2, 3, 6 give #AC, at 4, 8, 12 #GP).
            let ac_first = ac && !va.is_multiple_of(4);
            return Ok(Some(if ac_first { ac_fault } else { GuestException::gp(0) }));
        }
        if ac && !exempt && !va.is_multiple_of(alignment) {
            return Ok(Some(ac_fault));
        }
        // Identity glue takes this path only for the alignment checks above.
        let MemoryStrategy::SoftMmu(ram) = &self.strategy else {
            return Err(TranslateError::Host(format!(
                "TLB miss under the identity strategy at guest RIP {rip:#x}"
            )));
        };
        let last = va.wrapping_add(size - 1);
        let mut fills = Vec::new();
        for (n, addr) in [va, last & !(PAGE - 1)].into_iter().enumerate() {
            if n == 1 && addr <= va {
                break;
            }
            let pa = match soft_mmu::walk(ram, &state, addr, access) {
                Ok(pa) => pa,
                Err(exc) if stack && exc.vector == crate::exit::vector::GP => {
                    return Ok(Some(GuestException {
                        vector: 12,
                        error_code: Some(0),
                        address: None,
                    }))
                }
                Err(exc) => return Ok(Some(exc)),
            };
            let host = ram
                .host(pa & !(PAGE - 1), PAGE)
                .ok_or_else(|| TranslateError::Host(format!("guest physical {pa:#x} outside guest RAM")))?;
            fills.push((addr & !(PAGE - 1), pa & !(PAGE - 1), host));
        }
        if fills.len() == 2 {
            return self.start_bounce(&fills, access, rip, va, size).map(|()| None);
        }
        let (page_va, page_pa, host) = fills[0];
        if access == Access::Write && self.code_pages.contains_key(&page_pa) {
            let own_page = soft_mmu::walk(ram, &state, rip, Access::Fetch).map(|pa| pa & !(PAGE - 1));
            self.invalidate_phys_page(page_pa);
            if own_page == Ok(page_pa) {
                self.uncached_step = Some(rip);
            }
        }
        let ctx = self.ctx.get_mut();
        let index = ((page_va >> 12) as usize) & (TLB_ENTRIES - 1);
        let entry = crate::context::TlbEntry {
            vpn: page_va >> 12,
            addend: host.wrapping_sub(page_va),
        };
        if access == Access::Write {
            ctx.tlb_write[index] = entry;
        } else {
            ctx.tlb_read[index] = entry;
        }
        Ok(None)
    }
}

enum Lookup {
    Host(u64),
    Exit(Exit),
    Emulated,
}

fn read_rel32_target(field: u64) -> u64 {
    // SAFETY: `field` is the rel32 of a jump inside our code buffer (checked by the caller
    // through the block's exit list).
    let rel = unsafe { std::ptr::read_unaligned(field as *const i32) };
    (field + 4).wrapping_add(rel as i64 as u64)
}

/// `HBT_TRACE_BLOCKS=1`: print every translated block (guest and host code) to stderr.
fn trace_blocks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HBT_TRACE_BLOCKS").is_some())
}

fn dump_block(block: &DecodedBlock, host: u64, code: &[u8]) {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut f = IntelFormatter::new();
    let mut text = String::new();
    let mut out = format!("block {:#x}..{:#x} -> host {host:#x}\n", block.start, block.end);
    for d in &block.instrs {
        text.clear();
        f.format(&d.instr, &mut text);
        out += &format!("  guest {:#x}  {text}\n", d.instr.ip());
    }
    let mut dec = Decoder::with_ip(64, code, host, DecoderOptions::NONE);
    for i in &mut dec {
        text.clear();
        f.format(&i, &mut text);
        out += &format!("    host +{:#05x}  {text}\n", i.ip() - host);
    }
    eprint!("{out}");
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
}

/// Signal-handler callback for a write fault: if `addr` lies in a page the translator
/// write-protected, unlink every jump into that page's blocks (so none runs again before the
/// dispatcher invalidates them), make the page writable and record it. Allocation-free.
fn code_write(data: *const (), addr: u64, pc: u64) -> CodeWrite {
    // SAFETY: `data` is the Translator registered by `run`; translated code is stopped in the
    // signal handler, so its tables are not being changed. The handler writes only to the
    // boxed page set (through its raw pointer), to code-buffer bytes and to the context, none
    // of which the interrupted code holds references into.
    let t = unsafe { &*(data as *const Translator) };
    let written = addr & !(PAGE - 1);
    let protected =
        &*t.protected as *const crate::host::pages::ProtectedPages as *mut crate::host::pages::ProtectedPages;
    // SAFETY: see above; the engine reads the dirty list only after translated code returns.
    if !unsafe { (*protected).is_protected(written) } {
        return CodeWrite::NotCode;
    }
    // A write through an alias (a second mapping of a shared file page) modifies the code page.
    let page = t.protected.code_page_of(written);
    let writer = t.block_at_host(pc);
    let mut own_page = false;
    if let Some(list) = t.code_pages.get(&page) {
        own_page = writer.is_some_and(|w| list.contains(&w));
        let ctx = t.ctx.as_ptr();
        for &i in list {
            let block = &t.blocks[i];
            for link in &block.incoming {
                // SAFETY: fields recorded when the links were made, inside the code buffer;
                // translated code is stopped in the fault handler.
                unsafe { link.undo(false) };
            }
            // SAFETY: ctx is the live context; translated code is stopped.
            unsafe {
                for slot in 0..IBL_ENTRIES {
                    if (*ctx).ibl_hosts[slot] == block.host {
                        (*ctx).ibl_hosts[slot] = t.glue.ibl_empty;
                        (*ctx).ibl_tags[slot] = IBL_EMPTY_TAG;
                    }
                }
            }
        }
    }
    // SAFETY: see above.
    match unsafe { (*protected).on_write_fault(written) } {
        false => CodeWrite::NotCode,
        true if own_page => CodeWrite::Stop,
        true => CodeWrite::Resume,
    }
}

/// Asynchronous-signal callback: flag the interrupt and, when translated code is running,
/// undo every chained jump, return cache and table entry so it leaves at its next block end
/// (the dispatcher re-links lazily). Allocation-free.
fn interrupt(data: *const (), in_code: bool) {
    // SAFETY: `data` is the Translator registered by `run`. With `in_code`, translated code is
    // stopped in the signal handler and the engine is not mutating its tables.
    let t = unsafe { &*(data as *const Translator) };
    t.interrupted.store(true, std::sync::atomic::Ordering::SeqCst);
    if !in_code {
        return;
    }
    for block in t.blocks.iter().filter(|b| b.valid) {
        for link in &block.incoming {
            // SAFETY: fields recorded when the links were made, inside the code buffer.
            unsafe { link.undo(true) };
        }
    }
    let ctx = t.ctx.as_ptr();
    // Tags only: a lookup stopped between its tag check and its host load must still find the
    // (valid) host it matched.
    // SAFETY: ctx is the live context; translated code is stopped.
    unsafe { (*ctx).ibl_tags.fill(IBL_EMPTY_TAG) };
}

/// Signal-handler callback: maps a host PC inside translated code to its fault site.
fn lookup_site(data: *const (), pc: u64) -> Option<FaultSite> {
    // SAFETY: `data` is the Translator registered by `run`, alive and not being mutated while
    // translated code runs.
    let t = unsafe { &*(data as *const Translator) };
    let i = t.block_at_host(pc)?;
    let b = &t.blocks[i];
    let off = (pc - b.host) as u32;
    b.sites.iter().find(|s| s.start <= off && off < s.end).map(|s| s.site)
}

/// Guest code fetch for the block builder.
struct Fetcher<'a> {
    strategy: &'a MemoryStrategy,
    state: &'a GuestState,
    /// (guest virtual page, guest physical page) of every page read.
    pages: Vec<(u64, u64)>,
    maps: &'a mut crate::host::pages::HostMaps,
}

/// #PF error code of a user-mode instruction fetch: not present (0x14) or no-execute (0x15).
const FETCH_NOT_PRESENT: u32 = 0x14;
const FETCH_NX: u32 = 0x15;

impl CodeFetch for Fetcher<'_> {
    fn fetch(&mut self, addr: u64, buf: &mut [u8]) -> Result<usize, GuestException> {
        match self.strategy {
            MemoryStrategy::Identity => {
                mmu::read_host_checked(addr, buf).ok_or(GuestException::page_fault(addr, FETCH_NOT_PRESENT))?;
                // No-execute: the guest's protections are the host's.
                if !self.maps.executable(addr) {
                    return Err(GuestException::page_fault(addr, FETCH_NX));
                }
                Ok(buf.len())
            }
            MemoryStrategy::SoftMmu(ram) => {
                let pa = soft_mmu::walk(ram, self.state, addr, Access::Fetch)?;
                let host = ram
                    .host(pa, buf.len() as u64)
                    .ok_or(GuestException::page_fault(addr, 0x11))?;
                // SAFETY: host..host+len is inside guest RAM (checked by `host`).
                unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
                let page = (addr & !(PAGE - 1), pa & !(PAGE - 1));
                if !self.pages.contains(&page) {
                    self.pages.push(page);
                }
                Ok(buf.len())
            }
        }
    }
}

/// Guest memory for instructions the engine performs in Rust.
struct Memory<'a> {
    strategy: &'a MemoryStrategy,
    /// Guest state at the instruction (page walks and alignment checking).
    state: GuestState,
    written: &'a mut Vec<u64>,
    /// Apply alignment checking to 2/4/8-byte accesses (not for gather elements).
    alignment_checks: bool,
}

impl Memory<'_> {
    fn each_page(
        &mut self,
        va: u64,
        len: usize,
        access: Access,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), GuestException> {
        let mut done = 0usize;
        while done < len {
            let addr = va.wrapping_add(done as u64);
            let chunk = ((PAGE - (addr & (PAGE - 1))) as usize).min(len - done);
            let host = match self.strategy {
                MemoryStrategy::Identity => addr,
                MemoryStrategy::SoftMmu(ram) => {
                    let pa = soft_mmu::walk(ram, &self.state, addr, access)?;
                    if access == Access::Write {
                        self.written.push(pa & !(PAGE - 1));
                    }
                    ram.host(pa, chunk as u64).ok_or(GuestException::page_fault(addr, 0))?
                }
            };
            f(host, done, chunk);
            done += chunk;
        }
        Ok(())
    }
}

impl Memory<'_> {
    /// Alignment checking (CPL3, CR0.AM, RFLAGS.AC) for a 2-, 4- or 8-byte access.
    fn check_alignment(&self, va: u64, len: usize) -> Result<(), GuestException> {
        if !mmu::is_canonical(va) {
            return Err(GuestException::gp(0));
        }
        let ac = self.alignment_checks && self.state.alignment_checking();
        if ac && matches!(len, 2 | 4 | 8) && !va.is_multiple_of(len as u64) {
            return Err(GuestException {
                vector: crate::exit::vector::AC,
                error_code: Some(0),
                address: None,
            });
        }
        Ok(())
    }
}

impl GuestMemory for Memory<'_> {
    fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
        self.check_alignment(va, buf.len())?;
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return mmu::read_host_checked(va, buf).ok_or(GuestException::page_fault(va, 4));
        }
        let len = buf.len();
        self.each_page(va, len, Access::Read, |host, at, n| {
            // SAFETY: host..host+n lies in guest RAM (checked by the walk and `host`).
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf[at..].as_mut_ptr(), n) }
        })
    }

    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        self.check_alignment(va, data.len())?;
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return mmu::write_host_checked(va, data)
                .then_some(())
                .ok_or(GuestException::page_fault(va, 6));
        }
        // Check every page first so a faulting write leaves memory untouched.
        self.each_page(va, data.len(), Access::Write, |_, _, _| {})?;
        self.each_page(va, data.len(), Access::Write, |host, at, n| {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), host as *mut u8, n) }
        })
    }
}

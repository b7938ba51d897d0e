//! The engine: the dispatcher loop and what it hands work to.
//!
//! One mechanism per file: `cache.rs` (blocks, chaining, inline caches, the indirect-branch
//! table), `smc.rs` (self-modifying code under the identity strategy: write protection and
//! invalidation), `softmmu.rs` (the soft-MMU slow path: TLB misses and split accesses),
//! `memory.rs` (guest code fetch and guest memory for emulated instructions), `callbacks.rs`
//! (what the host signal handler calls back into), `debug.rs` (breakpoints and single-step for
//! a debugger).
//!
//! `run` enters translated code through the entry glue and gets control back only on block
//! exits that are not chained yet, indirect-branch misses, soft-MMU TLB misses, instructions the
//! engine emulates, and guest faults. Each of those is handled here; everything else stays in
//! the code cache.

use crate::block::{self, BuildError, CodeFetch, DecodedBlock};
use crate::context::{
    ContextBox, ExitReason, TlbKind, IBL_EMPTY_TAG, IBL_ENTRIES, MISS_ALIGN_PLAIN_GP, MISS_ALIGN_SHIFT,
    MISS_ALIGN_WAIVED_BY_MM, MISS_F16C_STORE, MISS_MMX_STORE, MISS_PARTIAL,
};
use crate::cpu::vendor::{self, Quirk};
use crate::cpu::xsave::XsaveLayout;
use crate::emit::{self, glue::Glue, ExitPatch, HostSite, IBL_PROLOGUE_LEN};
use crate::emulate::{self, GuestMemory, Outcome};
use crate::error::TranslateError;
use crate::exit::{Exit, GuestException};
use crate::host::codebuf::CodeBuffer;
use crate::host::gsbase::GsBaseGuard;
use crate::host::signals::{CodeWrite, FaultSite, TranslatedFaults, TranslatedGuard};
use crate::mmu::{self, soft_mmu, Access, MemoryStrategy};
use crate::platform::{Platform, PortOutcome};
use crate::rules::Rule;
use crate::state::GuestState;
use addr_map::AddrMap;
use softmmu::WindowFill;
use std::collections::BTreeMap;

const PAGE: u64 = 4096;
/// Default size of the code cache.
pub const DEFAULT_CODE_CACHE: usize = 64 << 20;

mod addr_map;
mod block_map;
mod cache;
mod callbacks;
pub mod census;
mod debug;
mod handover;
mod host_index;
mod memory;
mod smc;
mod softmmu;
mod system;
mod watch;
pub use system::DeliveredEvent;

use cache::Block;
use callbacks::{interrupt, lookup_site};
use memory::{Fetcher, Memory};
use smc::code_write;
use softmmu::{Bounce, MmioAccess, PageBuffer};
/// Counters for `--stats`.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub blocks_translated: u64,
    /// Invalidated blocks brought back because their code came back unchanged
    /// (`Translator::revive`): not translated again, not counted in `blocks_translated`.
    pub blocks_revived: u64,
    pub guest_instructions_translated: u64,
    pub block_exits: u64,
    /// System mode, with [`Translator::set_detailed_stats`]: entries into translated code (one
    /// per block exit) that loaded the guest's extended state into the registers — there the
    /// glue moves it only for code that touches it (`emit/glue.rs`).
    pub extended_state_loads: u64,
    pub chained: u64,
    pub indirect_misses: u64,
    pub tlb_misses: u64,
    /// Soft-MMU windows (`emit/window.rs`): translated, the accesses they took, lookups that
    /// missed, and misses that ran the first access alone (the places where no window opens
    /// now: [`Translator::windowless_places`]).
    pub windows: u64,
    pub window_accesses: u64,
    pub window_misses: u64,
    pub window_fallbacks: u64,
    /// Loop windows (`emit/loop_window.rs`): streams translated, the accesses they took, entry
    /// checks that missed, and misses that went on without the window.
    pub loop_windows: u64,
    pub loop_window_accesses: u64,
    pub loop_window_misses: u64,
    pub loop_window_fallbacks: u64,
    pub emulated: u64,
    /// The same, by mnemonic (what leaves translated code most).
    pub emulated_by_mnemonic: BTreeMap<iced_x86::Mnemonic, u64>,
    pub invalidated_blocks: u64,
    pub flushes: u64,
    /// System mode: guest address-space changes (links and TLBs dropped, blocks revalidated).
    pub remaps: u64,
    /// System mode: INVLPGs that only dropped the data TLBs (no translated code nearby).
    pub page_invalidations: u64,
    /// Soft-MMU: accesses to guest-physical memory outside RAM (sent to the platform's devices).
    pub mmio_accesses: u64,
    /// Time spent decoding and emitting blocks.
    pub translate_time: std::time::Duration,
    /// With [`Translator::set_detailed_stats`]: time in translated code, and soft-MMU accesses
    /// the inline TLB served.
    pub translated_code_time: std::time::Duration,
    pub tlb_hits: u64,
    /// System mode: exceptions and external interrupts delivered, by vector.
    pub exceptions: BTreeMap<u8, u64>,
    pub interrupts: BTreeMap<u8, u64>,
    /// System mode: instructions that raised #UD for lack of a rule or a model, by name.
    pub unimplemented: BTreeMap<String, u64>,
}

/// Configuration of a translator instance.
pub struct Config {
    pub strategy: MemoryStrategy,
    pub code_cache_bytes: usize,
    /// Refuse instruction forms that have a rule but are not in the verified supported set
    /// (`supported.txt`). The harness itself needs them allowed.
    pub verified_only: bool,
    /// System mode: the guest is a whole machine (kernel and user mode) and the engine performs
    /// privileged instructions, delivers exceptions and interrupts through the guest's IDT and
    /// keeps RFLAGS.IF/IOPL/TF virtual (`system/`). Requires the soft-MMU.
    pub system: bool,
}

/// A one-instruction step the dispatcher runs next (`Translator::one_step`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct OneStep {
    pub(super) rip: u64,
    /// Its translation is kept, under a key of its own (`Translator::one_off_key`), for the
    /// next time the instruction needs the same: a kernel's device register writes and
    /// unaligned copies recur (a local-APIC EOI at every timer tick was a fresh translation
    /// each time, ≈50 µs). A store into its own code page is not kept: it invalidates itself.
    pub(super) kept: bool,
}

/// One vCPU's binary translator.
pub struct Translator {
    ctx: ContextBox,
    code: CodeBuffer,
    glue: Glue,
    glue_len: usize,
    strategy: MemoryStrategy,
    verified_only: bool,
    system: bool,
    /// Translated instances per instruction form, while a census is recorded (`census.rs`).
    census: Option<std::sync::Arc<census::CensusCounts>>,
    blocks: Vec<Block>,
    by_guest: block_map::BlockMap,
    /// Blocks by host address (`host_index.rs`).
    by_host: host_index::HostIndex,
    code_pages: AddrMap<Vec<usize>>,
    /// Block keys whose last block was invalidated, and that block (`Translator::revive`).
    revivable: AddrMap<usize>,
    /// The emitter's buffers, kept from block to block.
    emit_scratch: crate::emit::EmitScratch,
    /// The code cache's TLB-miss sites (`emit/miss_site.rs`), emptied with it.
    miss_sites: crate::emit::miss_site::MissSites,
    /// System mode: the blocks on each 4 KiB page of guest virtual addresses (by page number),
    /// which an INVLPG of the page reaches (see `invalidate_page`).
    code_vpages: AddrMap<Vec<usize>>,
    /// The 2 MiB regions where some block's code was mapped by a 2 MiB page: INVLPG of any
    /// address there may have remapped all of it (`cache.rs`, `invalidate_page`).
    large_code_regions: std::collections::HashSet<u64>,
    /// Indirect-branch slots filled since the table was last emptied (see `flush_ibl`), by
    /// whether the block they hold is global (index 1) or not (index 0); at `IBL_ENTRIES / 16`
    /// entries in either list the next flush clears the whole table instead.
    ibl_used: [[Vec<u32>; 2]; crate::context::IBL_SETS],
    /// Per indirect-branch slot: it holds a global block (kept by a CR3 write, see
    /// `flush_ibl_keeping`).
    ibl_global: [Vec<bool>; crate::context::IBL_SETS],
    /// Identity strategy: decoded instructions the engine performs (SYSCALL, CPUID…) by guest
    /// RIP, so a program that makes 10^5 system calls does not re-fetch and re-decode each one.
    /// Their pages are in `code_pages`, so writes and unmaps drop them like blocks.
    emulated_at: AddrMap<(iced_x86::Instruction, Rule)>,
    /// Set by the asynchronous-signal handler; `run` returns `Exit::Interrupted` at its next
    /// dispatch. (A signal landing between this check and entering translated code, outside
    /// the code buffer, is seen at the next natural exit.)
    interrupted: std::sync::atomic::AtomicBool,
    /// Asked by the kick handler whether the embedder wants the run to end (see
    /// [`Translator::set_stop_check`]); must be async-signal-safe.
    stop_check: fn() -> bool,
    /// Identity strategy: write-protect host pages holding translated code, to notice
    /// self-modifying code (off for multi-threaded guests, whose other threads' translators
    /// do not know this one's protections).
    write_protect_code: bool,
    /// The next dispatch at this RIP runs that one instruction alone, from a one-instruction
    /// block: a split or device access (its page mapped to the bounce buffer in the TLB), a
    /// window's fallback, or an instruction that writes the page holding its own code (from an
    /// unregistered block: otherwise the write-protect/invalidate cycle would never end, as in
    /// QEMU's handling of self-modifying code).
    one_step: Option<OneStep>,
    /// Identity strategy: host pages write-protected because they hold translated code. Boxed
    /// and reached by raw pointer from the signal handler.
    protected: Box<crate::host::pages::ProtectedPages>,
    /// Soft-MMU access crossing into a page that is not host-contiguous: both pages are copied
    /// into `bounce_buffer`, the instruction runs once against the copy, and written bytes go back.
    bounce: Option<Bounce>,
    /// A device access set up by a TLB miss (`softmmu.rs`), finished after its instruction ran.
    mmio: Option<MmioAccess>,
    bounce_buffer: Option<PageBuffer>,
    /// The guest XCR0 the code cache was translated for (0: none yet).
    translated_xcr0: u64,
    /// Blocks with links into them (what [`Translator::remap`] must undo).
    linked: Vec<usize>,
    /// The same for blocks whose code was global when first linked (kept by a CR3 write).
    linked_global: Vec<usize>,
    /// Bumped by every guest address-space change (see `Block::epoch`).
    mapping_epoch: u64,
    /// Bumped by the address-space changes that drop global translations too (CR4, CR0,
    /// INVLPG near code); a CR3 write bumps only `mapping_epoch`.
    global_epoch: u64,
    /// System mode: the last events delivered (`system::RECENT_EVENTS`).
    recent_events: std::collections::VecDeque<system::DeliveredEvent>,
    /// System mode: the CPL the TLBs and the indirect-branch table were filled at.
    code_cpl: Option<crate::state::Cpl>,
    /// Breakpoints and single-step (`debug.rs`).
    debug: debug::DebugState,
    /// The instruction being dispatched runs alone: it started with the guest's RFLAGS.TF set
    /// (a single-step trap follows it: `system.rs` `debug_trap`), or the guest has an
    /// instruction breakpoint enabled (`watch.rs`).
    one_instruction_blocks: bool,
    /// The guest's data breakpoints (DR0–DR3, DR7: `watch.rs`), and DR6's B0–B3 bits for the
    /// ones the instruction being dispatched has hit so far.
    guest_breakpoints: watch::GuestBreakpoints,
    watch_hits: u64,
    /// The instruction resuming past an instruction breakpoint (RFLAGS.RF was set as it was
    /// dispatched), until it retires.
    resuming_at: Option<u64>,
    /// Events delivered through the guest's IDT so far (whether an instruction raised one).
    events_delivered: u64,
    /// Identity strategy: host mappings, for no-execute (code is fetched only from PROT_EXEC
    /// pages, as the CPU would) and for the protections SMC detection changes.
    maps: crate::host::pages::HostMaps,
    stats: Stats,
    /// See [`Translator::set_detailed_stats`].
    detailed_stats: bool,
    /// See [`Translator::set_interrupt_line`].
    interrupt_line: Option<u64>,
    /// See [`Translator::set_host_tsc`].
    host_tsc: bool,
    /// Guest RIPs where no window of accesses opens (`emit/window.rs`): its lookup kept
    /// failing there (`softmmu.rs`, `window_miss`).
    windowless: std::collections::HashSet<u64>,
    /// Failed window lookups by the RIP of the window's first access.
    window_failures: AddrMap<u32>,
    /// The last window miss the TLB was filled for, and how many fills at its RIP came one
    /// right after the other (`window_miss`).
    last_window_fill: Option<WindowFill>,
    /// System mode: return `Exit::UserMode` when the guest enters CPL3 (`handover.rs`).
    user_exit: bool,
    /// System mode: return `Exit::KernelMode` when the guest enters CPL0 from CPL3.
    kernel_exit: bool,
    /// Bumped by every guest invalidation of translations (`handover.rs`).
    invalidations: u64,
    /// Pages that gained translated code while `user_exit` is on (`handover.rs`).
    new_code_pages: Vec<u64>,
    /// Translations check that the extended state is here before touching it (`handover.rs`).
    extended_state_handover: bool,
}

impl Drop for Translator {
    fn drop(&mut self) {
        self.protected.release_all();
    }
}

impl Translator {
    pub fn new(config: Config) -> Result<Self, TranslateError> {
        let mut code = CodeBuffer::new(config.code_cache_bytes)?;
        let (glue_code, glue) = emit::glue::emit(
            code.cursor(),
            std::arch::is_x86_feature_detected!("avx"),
            std::arch::is_x86_feature_detected!("xsaveopt"),
        );
        code.append(&glue_code)?;
        let glue_len = code.used();
        let by_host = host_index::HostIndex::new(code.range().0);
        let mut ctx = ContextBox::new();
        for set in 0..2 {
            ctx.get_mut().flush_ibl(set, glue.ibl_empty);
        }
        Ok(Translator {
            ctx,
            code,
            glue,
            glue_len,
            strategy: config.strategy,
            verified_only: config.verified_only,
            census: None,
            system: config.system,
            // Room for as many blocks as the code cache holds at ≈1 KiB each, reserved (not
            // touched): growing it copied the whole table at each doubling.
            blocks: Vec::with_capacity(config.code_cache_bytes / 1024),
            by_guest: Default::default(),
            emulated_at: AddrMap::default(),
            interrupted: std::sync::atomic::AtomicBool::new(false),
            stop_check: || false,
            write_protect_code: true,
            by_host,
            code_pages: AddrMap::default(),
            revivable: AddrMap::default(),
            emit_scratch: Default::default(),
            miss_sites: Default::default(),
            code_vpages: Default::default(),
            large_code_regions: Default::default(),
            ibl_used: Default::default(),
            ibl_global: std::array::from_fn(|_| vec![false; IBL_ENTRIES]),
            one_step: None,
            protected: Box::default(),
            bounce: None,
            mmio: None,
            bounce_buffer: None,
            translated_xcr0: 0,
            code_cpl: None,
            debug: Default::default(),
            one_instruction_blocks: false,
            guest_breakpoints: Default::default(),
            watch_hits: 0,
            resuming_at: None,
            events_delivered: 0,
            recent_events: Default::default(),
            linked: Vec::new(),
            linked_global: Vec::new(),
            mapping_epoch: 0,
            global_epoch: 0,
            maps: Default::default(),
            stats: Stats::default(),
            detailed_stats: false,
            interrupt_line: None,
            host_tsc: false,
            windowless: Default::default(),
            window_failures: Default::default(),
            last_window_fill: None,
            user_exit: false,
            kernel_exit: false,
            invalidations: 0,
            new_code_pages: Vec::new(),
            extended_state_handover: false,
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

    /// Places (guest RIPs) where windows of accesses kept failing and no longer open.
    pub fn windowless_places(&self) -> usize {
        self.windowless.len()
    }

    /// System mode: lets translated code read the interrupt controller's INTR line (the byte
    /// at `line`, nonzero while an interrupt waits for the CPU), so `sti` at CPL0 is inlined and
    /// returns to the dispatcher only when an interrupt is waiting (a Linux boot executes ≈100k
    /// `sti`s). Affects blocks translated from now on.
    ///
    /// # Safety
    /// `line` must stay readable (a live `AtomicBool`, say) whenever translated code runs: in
    /// every later call of [`Translator::run`].
    pub unsafe fn set_interrupt_line(&mut self, line: *const std::sync::atomic::AtomicBool) {
        self.interrupt_line = Some(line as u64);
    }

    /// System mode: the platform's `rdtsc` is the host's time-stamp counter, unscaled and
    /// without offset, so translated code at CPL0 may execute `rdtsc`/`rdtscp` itself (with
    /// the guest's TSC_AUX in ECX) instead of leaving for the engine — a fork/exec-heavy Linux
    /// guest reads the TSC ≈120 times per fork+exec. Affects blocks translated from now on.
    pub fn set_host_tsc(&mut self, host: bool) {
        self.host_tsc = host;
    }

    /// Also measure what costs a little (for `--stats`): time in translated code, and TLB
    /// hits, which blocks translated from now on count (three instructions per hit).
    pub fn set_detailed_stats(&mut self, on: bool) {
        self.detailed_stats = on;
    }

    /// Bytes of translated code in the cache.
    pub fn code_cache_used(&self) -> usize {
        self.code.used() - self.glue_len
    }

    /// Drops the soft-MMU TLB (guest CR3 write, INVLPG, privilege change).
    pub fn flush_tlb(&mut self) {
        self.ctx.get_mut().flush_tlb();
    }

    /// Installs the check the kick handler makes before leaving chains linked while a system
    /// guest has IF=0: `true` means the embedder wants the run to end, so translated code must
    /// return to the dispatcher now. Called from a signal handler: it must be async-signal-safe
    /// (an atomic load, say).
    pub fn set_stop_check(&mut self, check: fn() -> bool) {
        self.stop_check = check;
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
        let stepping = self.debug.single_step;
        // Set while the instruction being dispatched started with the guest's TF set.
        let mut trap_check: Option<system::TrapCheck>;
        // A guest instruction completed, or the exception it raised was delivered: the guest
        // has moved, the guest's single-step trap follows an instruction that completed, and a
        // debugger's single step ends (`debug.rs`).
        macro_rules! retired {
            () => {
                self.debug.moved();
                self.resuming_at = None;
                if let Some(check) = trap_check.take() {
                    if self.debug_trap(check) {
                        pending_link = 0;
                        if let Some(exit) = self.deliver(system::Event::Exception(GuestException::new(
                            crate::exit::vector::DB,
                        )))? {
                            return Ok(exit);
                        }
                    }
                }
                if stepping {
                    return Ok(Exit::Stepped);
                }
            };
        }
        // Some(exit): return it; None: go on at the (new) guest RIP.
        macro_rules! guest_exception {
            ($exc:expr) => {{
                pending_link = 0;
                if let Some(exit) = self.guest_exception($exc)? {
                    return Ok(exit);
                }
                retired!();
                continue;
            }};
        }
        for _ in 0..block_budget {
            // A plain load first: the locked swap only when a signal did arrive.
            if self.interrupted.load(std::sync::atomic::Ordering::Relaxed)
                && self.interrupted.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                return Ok(Exit::Interrupted);
            }
            if self.system {
                match self.system_boundary(platform)? {
                    system::Boundary::Continue => {}
                    system::Boundary::Delivered => {
                        pending_link = 0;
                        self.debug.moved();
                    }
                    system::Boundary::Exit(exit) => return Ok(exit),
                }
            }
            trap_check = self.trap_check();
            // One instruction per block while the guest single-steps or has an instruction
            // breakpoint (`watch.rs`).
            self.one_instruction_blocks =
                trap_check.is_some_and(|c| c.single_step()) || self.guest_breakpoints.has_instruction_breakpoints();
            let rip = self.ctx.get().state.rip;
            if self.debug.stops_at(rip) {
                return Ok(Exit::Breakpoint);
            }
            if self.instruction_breakpoint(rip) {
                guest_exception!(GuestException::new(crate::exit::vector::DB));
            }
            let lookup = match self.block_for(rip, platform) {
                Err(TranslateError::Unsupported { code, .. }) if self.system => {
                    pending_link = 0;
                    if let Some(exit) = self.undefined_instruction(&code)? {
                        return Ok(exit);
                    }
                    retired!();
                    continue;
                }
                other => other?,
            };
            let host = match lookup {
                Lookup::Host(h) => h,
                Lookup::Exit(Exit::Exception(exc)) => guest_exception!(exc),
                Lookup::Exit(exit) => return Ok(exit),
                Lookup::Emulated => {
                    pending_link = 0;
                    retired!();
                    continue;
                }
            };
            // Code at a breakpoint is entered only from here (`debug.rs`).
            if pending_link != 0 && !self.debug.is_breakpoint(rip) {
                self.chain(pending_link, host);
            }
            pending_link = 0;
            self.enter(host);
            self.stats.block_exits += 1;
            self.invalidate_written_pages();
            if let Some(b) = self.bounce.take() {
                self.finish_bounce(b);
            }
            if let Some(m) = self.mmio.take() {
                if self.finish_mmio(m, platform) == PortOutcome::Stop {
                    return Ok(Exit::Stopped);
                }
            }
            let ctx = self.ctx.get_mut();
            match ctx.exit_reason {
                r if r == ExitReason::Branch as u32 => {
                    pending_link = ctx.exit_link;
                    retired!();
                }
                r if r == ExitReason::IndirectMiss as u32 => {
                    self.stats.indirect_misses += 1;
                    let target = self.ctx.get().state.rip;
                    if !mmu::is_canonical(target) {
                        // The CPU raises #GP(0) at the branch, with RSP as before it.
                        let ctx = self.ctx.get_mut();
                        ctx.state.rip = ctx.branch_rip;
                        ctx.state.gpr[4] = ctx.state.gpr[4].wrapping_sub(ctx.branch_rsp_delta);
                        guest_exception!(GuestException::gp(0));
                    }
                    // Only a return cache's first miss sets the link; clear it so a later
                    // table miss elsewhere does not refill that cache.
                    let site = std::mem::take(&mut self.ctx.get_mut().exit_link);
                    retired!();
                    // (A target that cannot be translated is met again at the next dispatch.
                    // Code at a breakpoint is entered only through the dispatcher.)
                    if self.debug.is_breakpoint(target) {
                        continue;
                    }
                    if let Ok(Lookup::Host(h)) = self.block_for(target, platform) {
                        self.ibl_insert(target, h);
                        if site != 0 {
                            self.fill_inline_cache(site, target, h);
                        }
                    }
                }
                r if r == ExitReason::TlbMiss as u32 => {
                    self.stats.tlb_misses += 1;
                    if let Some(exc) = self.tlb_miss(platform)? {
                        let ctx = self.ctx.get_mut();
                        if ctx.miss_info & MISS_MMX_STORE != 0 && vendor::host_has(Quirk::FaultingMmxStoreResetsTop) {
                            ctx.state.xsave.set_x87_top(0);
                        }
                        let memory_fault = matches!(exc.vector, 12..=14);
                        let exc = if ctx.miss_info & MISS_F16C_STORE != 0 && memory_fault {
                            let rip = ctx.state.rip;
                            let instr = self.instruction_at(rip)?;
                            emulate::f16c::faulting_store(&mut self.ctx.get_mut().state, &instr, exc)
                        } else {
                            exc
                        };
                        guest_exception!(exc);
                    }
                }
                r if r == ExitReason::Emulate as u32 => {}
                r if r == ExitReason::ExtendedState as u32 => return Ok(Exit::ExtendedStateNeeded),
                r if r == ExitReason::InterruptWindow as u32 => {
                    // An inlined `sti` (IF is set, merged back by `enter`): the interrupt waits
                    // for the end of its shadow, the next instruction.
                    self.ctx.get_mut().state.sys.interrupt_shadow = true;
                }
                r if r == ExitReason::SelfModify as u32 => {
                    // The store's page is writable and its blocks are gone: run the store once
                    // from an uncached block, then go on from fresh translations.
                    self.one_step = Some(OneStep {
                        rip: self.ctx.get().state.rip,
                        kept: false,
                    });
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
                    guest_exception!(exc);
                }
                other => return Err(TranslateError::Host(format!("unknown exit reason {other}"))),
            }
        }
        Ok(Exit::BlockLimit)
    }

    /// The entry glue `xrstor`s the guest's XSAVE image with its XCR0 as the mask: refuse a state
    /// the host would fault on (an XCR0 outside the managed set, a malformed header or MXCSR),
    /// and drop translations made for another XCR0 (see [`Translator::follow_guest_xcr0`]).
    fn check_extended_state(&mut self) -> Result<(), TranslateError> {
        self.follow_guest_xcr0()?;
        self.ctx
            .get()
            .state
            .xsave
            .check(XsaveLayout::host().host_xcr0())
            .map_err(|why| TranslateError::Host(format!("guest extended state cannot be loaded: {why}")))
    }

    /// Copied `xsave`/`xrstor` are specialized to the guest's XCR0: when it has changed (a new
    /// run, or XSETBV in system mode), the code cache goes.
    pub(super) fn follow_guest_xcr0(&mut self) -> Result<(), TranslateError> {
        let xcr0 = self.ctx.get().state.xcr0;
        if xcr0 != self.translated_xcr0 {
            XsaveLayout::host()
                .check_guest_xcr0(xcr0)
                .map_err(TranslateError::Host)?;
            self.flush();
            self.translated_xcr0 = xcr0;
        }
        Ok(())
    }

    /// RFLAGS bits that live in the host's flags while translated code runs: the status flags
    /// and DF, and AC where it means alignment checking (user mode; in system mode only at CPL3
    /// with CR0.AM). IF, IOPL, TF, NT and the rest are virtual: the host runs at CPL3 and could
    /// not hold them (a host TF would single-step hbt itself).
    fn host_flags_mask(&self) -> u64 {
        use crate::state::flags;
        let s = &self.ctx.get().state;
        let ac = !self.system || (s.cpl == crate::state::Cpl::User && s.cr0 & (1 << 18) != 0);
        flags::STATUS | flags::DF | if ac { flags::AC } else { 0 }
    }

    /// Runs translated code at `host`. The RFLAGS bits the host cannot hold wait in the
    /// context meanwhile (`Context::virtual_flags`/`virtual_if`), where inlined `cli`/`pushfq`
    /// and the kick handler find them, and are merged back when it returns.
    fn enter(&mut self, host: u64) {
        use crate::state::flags;
        let mask = self.host_flags_mask();
        let ctx = self.ctx.get_mut();
        // RF is cleared as an instruction starts (see `emulate`).
        let virtual_flags = ctx.state.rflags & !mask & !flags::RF;
        ctx.virtual_if = virtual_flags & flags::IF;
        ctx.virtual_flags = virtual_flags & !flags::IF & !flags::FIXED;
        ctx.state.rflags = (ctx.state.rflags & mask) | flags::FIXED;
        if self.detailed_stats {
            let started = std::time::Instant::now();
            self.run_translated(host);
            self.stats.translated_code_time += started.elapsed();
            self.stats.tlb_hits = self.ctx.get().tlb_hits;
            self.stats.extended_state_loads = self.ctx.get().extended_state_loads;
        } else {
            self.run_translated(host);
        }
        let ctx = self.ctx.get_mut();
        if ctx.exit_reason == ExitReason::TlbMiss as u32 {
            // The stub left the guest state to its site (`emit/miss_site.rs`). Every stub's
            // number was recorded when its block was emitted, and only a flush forgets them.
            let site = self.miss_sites.get(ctx.miss_site as u32).copied();
            site.expect("a TLB-miss stub's site is recorded").restore(ctx);
        }
        ctx.state.rflags = (ctx.state.rflags & mask) | ctx.virtual_flags | ctx.virtual_if | flags::FIXED;
    }

    fn run_translated(&mut self, host: u64) {
        self.ctx.get_mut().entry_target = host;
        self.ctx.get_mut().exit_link = 0;
        // System mode moves the extended state lazily, user mode eagerly (`emit/glue.rs`).
        let entry_point = if self.system {
            self.glue.entry
        } else {
            self.glue.entry_loaded
        };
        // SAFETY: both entries are glue emitted into our executable buffer; they follow the C
        // ABI (save callee-saved registers, MXCSR and FCW, return normally) and run guest code
        // only through translations whose every memory access goes through the strategy. The
        // GS base points at our context for the duration (installed in `run`).
        let entry: extern "C" fn() = unsafe { std::mem::transmute(entry_point as usize) };
        entry();
    }

    /// The host address of the block at `rip`, translating it if needed. Instructions the
    /// engine emulates are handled here directly when a block would start with one.
    fn block_for(&mut self, rip: u64, platform: &mut dyn Platform) -> Result<Lookup, TranslateError> {
        let step = self.one_step.filter(|s| s.rip == rip);
        if step.is_some() {
            self.one_step = None;
        }
        // The instruction alone, never under its block's key: a one-off step, or
        // single-stepping (one-instruction blocks, never cached: `debug.rs`).
        let alone = step.is_some() || self.debug.single_step || self.one_instruction_blocks;
        let one_off_key = step
            .filter(|s| s.kept && !self.debug.single_step && !self.one_instruction_blocks)
            .map(|_| self.one_off_key(rip));
        if let Some(key) = one_off_key {
            if let Some(i) = self.by_guest.get(key) {
                if self.mapping_current(i) {
                    return Ok(Lookup::Host(self.blocks[i].host + IBL_PROLOGUE_LEN));
                }
                self.invalidate_block(i);
            }
        }
        if !alone {
            if let Some(i) = self.by_guest.get(self.block_key(rip)) {
                if self.mapping_current(i) {
                    if let Some((instr, rule)) = self.blocks[i].emulated {
                        self.stats.emulated += 1;
                        return self.emulate(&instr, rule, platform);
                    }
                    return Ok(Lookup::Host(self.blocks[i].host + IBL_PROLOGUE_LEN));
                }
                // Not executable at all now — a new process before its first fault on the page:
                // the fault goes to the guest and the block stays for when the page maps the
                // same frame again (each exec of a busybox applet translated its code anew).
                if let Some(fault) = self.fetch_fault(rip) {
                    return Ok(Lookup::Exit(Exit::Exception(fault)));
                }
                // The code's page maps elsewhere now: translate what is there.
                self.invalidate_block(i);
            } else if let Some(&(instr, rule)) = self.emulated_at.get(&rip) {
                self.stats.emulated += 1;
                return self.emulate(&instr, rule, platform);
            }
        }
        let translate_started = std::time::Instant::now();
        let soft = self.strategy.is_soft_mmu();
        let mut fetch = Fetcher::new(&self.strategy, &self.ctx.get().state, &mut self.maps);
        let cap = if alone { 1 } else { block::MAX_BLOCK_INSTRUCTIONS };
        let options = block::BuildOptions {
            soft_mmu: soft,
            system: self.system,
            kernel: self.system && self.ctx.get().state.cpl == crate::state::Cpl::Kernel,
            interrupt_line: self.interrupt_line.is_some(),
            host_tsc: self.host_tsc,
            compat: self.ctx.get().state.code32,
            verified_only: self.verified_only,
            max_instructions: cap,
            xcr0: self.translated_xcr0,
            breakpoints: &self.debug.breakpoints,
        };
        let block = match block::build(&mut fetch, rip, options) {
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
        census::count_block(&self.census, &block);
        // Only pages the block's instructions occupy hold its code (the builder peeks 15 bytes
        // into the next page in case an instruction straddles it).
        let kept = !alone || one_off_key.is_some();
        let mapping: Vec<(u64, u64)> = if soft && kept {
            fetch
                .pages
                .iter()
                .copied()
                .filter(|&(va, _)| va < block.span.1 && va + PAGE > block.span.0)
                .collect()
        } else {
            Vec::new()
        };
        // Code whose every page is global survives CR3 writes (see `remap`).
        let global = !mapping.is_empty() && mapping.iter().all(|(va, _)| !fetch.nonglobal.contains(va));
        if fetch.large {
            self.large_code_regions.extend(mapping.iter().map(|&(va, _)| va >> 21));
        }
        let pages = if !kept {
            Vec::new()
        } else if !soft {
            // Identity: the host pages the block's bytes occupy, write-protected (if writable)
            // so a guest write to them is noticed; all of them are recorded so an unmap or
            // remap of the range drops the block.
            let mut pages = Vec::new();
            let mut page = block.span.0 & !(PAGE - 1);
            while page < block.span.1 {
                if self.write_protect_code {
                    self.protected.protect(page, &mut self.maps);
                }
                pages.push(page);
                page += PAGE;
            }
            pages
        } else {
            mapping.iter().map(|&(_, pa)| pa).collect()
        };
        if let Some(first) = block.instrs.first() {
            if first.rule.runs_in_engine(&first.instr, options.mode()) {
                self.stats.translate_time += translate_started.elapsed();
                self.stats.emulated += 1;
                let instr = first.instr;
                if !alone {
                    if soft {
                        self.install_emulated(rip, instr, first.rule, pages, mapping, global);
                    } else {
                        self.emulated_at.insert(rip, (instr, first.rule));
                        for page in pages {
                            self.code_pages.entry(page).or_default();
                        }
                    }
                }
                return self.emulate(&instr, first.rule, platform);
            }
        }
        let key = match one_off_key {
            Some(key) => Some(key),
            None => (!alone).then(|| self.block_key(rip)),
        };
        // Only a block cached under its own key can be brought back (`Translator::revive`).
        let revivable_key = key.filter(|_| one_off_key.is_none());
        let signature = if revivable_key.is_some() {
            block.signature()
        } else {
            Box::default()
        };
        if let Some(host) = revivable_key.and_then(|key| self.revive(&block, &signature, &pages, &mapping, global, key))
        {
            self.stats.translate_time += translate_started.elapsed();
            return Ok(Lookup::Host(host));
        }
        let host = self.install(block, signature, pages, mapping, global, key)?;
        self.stats.translate_time += translate_started.elapsed();
        Ok(Lookup::Host(host))
    }

    fn emulate(
        &mut self,
        instr: &iced_x86::Instruction,
        rule: Rule,
        platform: &mut dyn Platform,
    ) -> Result<Lookup, TranslateError> {
        use crate::rules::EmulateOp;
        if self.extended_state_stale() && crate::cpu::xsave::touches_extended_state(instr) {
            return Ok(Lookup::Exit(Exit::ExtendedStateNeeded));
        }
        *self.stats.emulated_by_mnemonic.entry(instr.mnemonic()).or_default() += 1;
        let unsupported = |why: &str| TranslateError::Unsupported {
            rip: instr.ip(),
            text: instr.to_string(),
            code: format!("{:?}", instr.code()),
            bytes: why.to_string(),
        };
        if self.system {
            // RF (resume flag) lives from the `iret` that restores it to the start of the next
            // instruction (SDM vol. 3 §17.3.1.1); a fault pushes it set again (`delivery.rs`).
            self.ctx.get_mut().state.rflags &= !crate::state::flags::RF;
        }
        let outcome = match rule {
            Rule::Emulate(EmulateOp::Segment) if !self.system => self.emulate_with_memory(instr, rule)?,
            Rule::Implicit(_) => self.emulate_with_memory(instr, rule)?,
            _ if self.system => return self.execute_system(instr, rule, platform),
            Rule::Emulate(op) => emulate::sensitive(&mut self.ctx.get_mut().state, instr, op, platform),
            Rule::System(_) => emulate::privileged_in_user_mode(&mut self.ctx.get_mut().state, instr),
            _ => return Err(unsupported("(rule has no engine implementation)")),
        };
        Ok(match outcome {
            Outcome::Continue => Lookup::Emulated,
            Outcome::Exit(exit) => Lookup::Exit(exit),
        })
    }

    /// Segment instructions (user mode) and implicit-memory instructions: performed against
    /// guest memory; pages they write lose their translations.
    fn emulate_with_memory(&mut self, instr: &iced_x86::Instruction, rule: Rule) -> Result<Outcome, TranslateError> {
        use crate::rules::ImplicitOp;
        let unsupported = |why: &str| TranslateError::Unsupported {
            rip: instr.ip(),
            text: instr.to_string(),
            code: format!("{:?}", instr.code()),
            bytes: why.to_string(),
        };
        // Neither gathers, scatters nor masked moves raise #AC (SDM exception classes 12, E12
        // and 6).
        let alignment_checks = !matches!(
            rule,
            Rule::Implicit(ImplicitOp::Gather | ImplicitOp::Scatter | ImplicitOp::MaskedMove)
        );
        let (result, written) = self.with_memory(alignment_checks, |state, mem| match rule {
            Rule::Implicit(ImplicitOp::String) => emulate::string::execute(state, instr, mem)
                .map_err(|_| unsupported("(32-bit address size string instruction)")),
            Rule::Implicit(_) => emulate::implicit::execute(state, instr, mem)
                .map_err(|_| unsupported("(no engine implementation for this form)")),
            _ => emulate::segment::execute(state, instr, mem).map_err(|u| match u {
                emulate::segment::Unsupported::CompatibilityMode(cs) => unsupported(&format!(
                    "(far transfer to 32-bit code segment {cs:#x}: compatibility mode)"
                )),
                emulate::segment::Unsupported::Form => unsupported("(segment form)"),
            }),
        });
        for page in written {
            self.invalidate_phys_page(page);
        }
        result
    }

    /// Runs `f` on the guest state with guest memory for it (page walks and alignment checks
    /// with the paging registers as they were when `f` began). Returns `f`'s result and the
    /// guest physical pages written (their translations must go).
    fn with_memory<R>(
        &mut self,
        alignment_checks: bool,
        f: impl FnOnce(&mut GuestState, &mut Memory) -> R,
    ) -> (R, Vec<u64>) {
        let mut written = Vec::new();
        let state = &mut self.ctx.get_mut().state;
        let mut mem = Memory {
            strategy: &self.strategy,
            state: state.paging(),
            written: &mut written,
            alignment_checks,
            guest_breakpoints: &self.guest_breakpoints,
            watch_hits: 0,
        };
        let r = f(state, &mut mem);
        self.watch_hits |= mem.watch_hits;
        (r, written)
    }
}

enum Lookup {
    Host(u64),
    Exit(Exit),
    Emulated,
}

/// `HBT_TRACE_BLOCKS=1`: print every translated block (guest and host code) to stderr.
fn trace_blocks() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("HBT_TRACE_BLOCKS").is_some())
}

/// With `HBT_PERF_MAP` set, each translated block is named in `/tmp/perf-<pid>.map` (the
/// format `perf report` reads for JIT code): `hbt:k:<guest rip>` for a block translated at CPL0
/// (system mode), `hbt:u:<guest rip>` otherwise — a profile of translated code by guest
/// address. A flush of the code cache empties the file: the addresses are reused, and perf
/// cannot tell an old name from a new one (samples before the last flush go unnamed).
fn perf_map() -> Option<&'static std::sync::Mutex<std::fs::File>> {
    static MAP: std::sync::OnceLock<Option<std::sync::Mutex<std::fs::File>>> = std::sync::OnceLock::new();
    MAP.get_or_init(|| {
        std::env::var_os("HBT_PERF_MAP")?;
        let path = format!("/tmp/perf-{}.map", std::process::id());
        std::fs::File::create(path).ok().map(std::sync::Mutex::new)
    })
    .as_ref()
}

fn perf_map_block(block: &DecodedBlock, host: u64, len: usize, kernel: bool) {
    use std::io::Write;
    if let Some(file) = perf_map() {
        let level = if kernel { 'k' } else { 'u' };
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        // Best effort: a profile missing a name is still a profile.
        let _ = writeln!(file, "{host:x} {len:x} hbt:{level}:{:x}", block.start);
    }
}

fn perf_map_flush() {
    use std::io::Seek;
    if let Some(file) = perf_map() {
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        let _ = file.set_len(0).and_then(|()| file.rewind());
    }
}

fn dump_block(block: &DecodedBlock, host: u64, code: &[u8]) {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut f = IntelFormatter::new();
    let mut text = String::new();
    let mut out = format!("block {:#x}..{:#x} -> host {host:#x}\n", block.start, block.end);
    for d in &block.instrs {
        text.clear();
        f.format(&d.instr, &mut text);
        let flow = match d.flow {
            block::Flow::Normal => "",
            block::Flow::Followed => "   (followed)",
            block::Flow::InlinedCall => "   (inlined call)",
            block::Flow::InlinedRet => "   (inlined ret)",
        };
        out += &format!("  guest {:#x}  {text}{flow}\n", d.instr.ip());
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

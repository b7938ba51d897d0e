//! The block cache: translated blocks by guest address and by host address, chaining of
//! direct exits, the per-site inline caches and the indirect-branch table, and invalidation of
//! a page's blocks (unlinking everything that jumps into them).

use super::*;

/// Something in another block that jumps straight into this one.
pub(super) enum Incoming {
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
    /// The link an exit of the block whose code starts at `base` makes: its rel32 jump and the
    /// stub it goes to unlinked.
    fn exit(base: u64, exit: &crate::emit::ExitPatch) -> Incoming {
        Incoming::Jump {
            field: base + exit.field as u64,
            original: base + exit.stub as u64,
        }
    }

    /// The return cache `cache` of the block whose code starts at `base`, by absolute address.
    fn inline_cache(base: u64, cache: &crate::emit::InlineCache) -> Incoming {
        Incoming::InlineCache {
            imm: base + cache.imm_field as u64,
            rel: base + cache.rel_field as u64,
            miss: base + cache.miss as u64,
            fill: base + cache.fill_field as u64,
            fill_stub: base + cache.fill_stub as u64,
        }
    }

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
    pub(super) unsafe fn undo(&self, anywhere: bool) {
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
                // The fill jump was turned into a NOP: make it a jump again. (Stopped anywhere,
                // translated code sits at an instruction boundary, never inside these 5 bytes.)
                // SAFETY: as above; the opcode byte precedes the rel32 field.
                unsafe { std::ptr::write((fill - 1) as *mut u8, crate::emit::asm::JMP_REL32) };
                rel32(fill, fill_stub);
            }
        }
    }
}

/// Soft-MMU: the (guest virtual page, guest physical page) pairs of a block's code, the first
/// held inline. Revalidating a block after a CR3 write then reads only the block itself: the
/// load of a heap `Vec`'s first element, usually a cache miss, was most of `mapping_current`'s
/// time (≈11% of a fork/exec-heavy Linux guest under bt, perf on an Intel SPR host).
#[derive(Default)]
pub(super) struct CodeMapping {
    first: Option<(u64, u64)>,
    rest: Vec<(u64, u64)>,
}

impl From<Vec<(u64, u64)>> for CodeMapping {
    fn from(pages: Vec<(u64, u64)>) -> Self {
        let mut pages = pages.into_iter();
        CodeMapping {
            first: pages.next(),
            rest: pages.collect(),
        }
    }
}

impl CodeMapping {
    pub(super) fn iter(&self) -> impl Iterator<Item = &(u64, u64)> {
        self.first.iter().chain(self.rest.iter())
    }
}

pub(super) struct Block {
    /// Its key in `by_guest` (see [`Translator::block_key`]).
    pub(super) key: u64,
    pub(super) host: u64,
    pub(super) host_len: u32,
    pub(super) sites: Vec<HostSite>,
    pub(super) exits: Vec<ExitPatch>,
    /// Chained jumps and return caches that lead into this block (undone on invalidation and
    /// by an address-space change, [`Translator::remap`]).
    pub(super) incoming: Vec<Incoming>,
    /// The same, from blocks whose code occupies every (virtual, physical) page this block's
    /// does: undone on invalidation only. The source runs only while its pages map as
    /// translated (it was revalidated, or entered through such a link itself), so this
    /// block's code is then current too. Most links are of this kind (a loop, the arms of an
    /// `if`); undoing them at each CR3 write made the dispatcher chain them again (≈35% of a
    /// fork/exec-heavy guest's block exits).
    pub(super) incoming_same_pages: Vec<Incoming>,
    pub(super) inline_caches: Vec<crate::emit::InlineCache>,
    pub(super) valid: bool,
    /// Lowest and highest (exclusive) guest virtual address its instructions occupy
    /// (`DecodedBlock::span`; what a new breakpoint is checked against).
    pub(super) span: (u64, u64),
    /// Soft-MMU: (guest virtual page, guest physical page) of its code when it was translated.
    pub(super) mapping: CodeMapping,
    /// The `Translator::mapping_epoch` in which `mapping` was last found current.
    pub(super) epoch: u64,
    /// Soft-MMU: every page of its code was mapped global, as of `global_epoch`.
    pub(super) global: bool,
    pub(super) global_epoch: u64,
    /// Soft-MMU: not translated code but one instruction the engine performs (a system
    /// instruction, a string instruction, `pushf`…), decoded once. It has no host code and no
    /// links; it is found, revalidated and invalidated like a block, so the dispatcher does not
    /// fetch and decode it again each time (a Linux boot performs ≈900k of them).
    pub(super) emulated: Option<(iced_x86::Instruction, Rule)>,
    /// A one-off step's block (`Translator::one_off_key`): entered only by the dispatcher for
    /// such a step, and left only to it (never chained, its indirect branches skip the table:
    /// `emit/branch.rs`) — the dispatcher ends the step (a bounce buffer or device page is
    /// mapped in the TLB until then).
    pub(super) dispatcher_only: bool,
    /// What it was translated from and with ([`DecodedBlock::signature`], the emit options):
    /// an invalidated block whose code comes back unchanged is revived
    /// ([`Translator::revive`]). Empty for an emulated instruction and a block that is not
    /// cached under its own key (a one-off step's, an uncached one).
    pub(super) signature: Box<[u8]>,
    pub(super) options: emit::EmitOptions,
}

impl Translator {
    /// The key of the block at guest `rip` for the current privilege: in system mode a block
    /// translated at CPL0 is never found from CPL3 and the reverse (the rules differ, and the
    /// code's permissions were checked at one privilege). Bit 62 is flipped for CPL0: the key
    /// is then non-canonical, so it cannot equal a CPL3 one.
    pub(super) fn block_key(&self, rip: u64) -> u64 {
        let state = &self.ctx.get().state;
        if self.system && state.cpl == crate::state::Cpl::Kernel {
            rip ^ (1 << 62)
        } else if state.code32 {
            // 32-bit code at an address 64-bit code may use too (a process that far-jumps
            // between the two, or a 64-bit program after a 32-bit one at the same CR3).
            rip ^ (1 << 59)
        } else {
            rip
        }
    }

    /// The key of the one-instruction block that runs the instruction at `rip` alone for a
    /// one-off step (`OneStep`): bit 61 flipped for a split access's variant (translated
    /// without the page-crossing check, its operand in the bounce buffer), bit 60 for the plain
    /// one (a device access, a window's fallback). Non-canonical either way, so never a block's
    /// own key; such a block is entered only by the dispatcher and leaves only to it
    /// (`Block::dispatcher_only`).
    pub(super) fn one_off_key(&self, rip: u64) -> u64 {
        let bit = if self.bounce.is_some() { 61 } else { 60 };
        self.block_key(rip) ^ (1 << bit)
    }

    /// Forgets every translation and TLB entry (after the guest changed code or page tables
    /// behind the translator's back, e.g. the harness writing a new test instruction).
    pub fn flush(&mut self) {
        self.blocks.clear();
        self.revivable.clear();
        self.by_guest.clear();
        self.emulated_at.clear();
        self.by_host.clear();
        self.code_pages.clear();
        self.code_vpages.clear();
        self.large_code_regions.clear();
        self.protected.release_all();
        self.code.reset_to(self.glue_len);
        self.miss_sites.clear();
        self.linked.clear();
        self.linked_global.clear();
        self.ctx.get_mut().flush_tlb();
        self.flush_ibl();
        self.stats.flushes += 1;
        perf_map_flush();
    }

    /// The block whose entry (see [`Translator::install`]) is `entry`.
    pub(super) fn block_at_entry(&self, entry: u64) -> Option<usize> {
        self.by_host.starting_at(entry.wrapping_sub(IBL_PROLOGUE_LEN))
    }

    pub(super) fn chain(&mut self, field: u64, host: u64) {
        // The source block may have been invalidated since it exited.
        let Some(src) = self.block_at_host(field) else { return };
        // A one-off step's block returns to the dispatcher, which ends the step (its bounce
        // buffer or device page is mapped in the TLB until then): it is neither chained from nor to.
        if !self.blocks[src].valid || self.blocks[src].dispatcher_only {
            return;
        }
        let Some(dst) = self.block_at_entry(host) else { return };
        if !self.blocks[dst].valid || self.blocks[dst].dispatcher_only {
            return;
        }
        let (original, to) = {
            let block = &self.blocks[src];
            let off = (field - block.host) as u32;
            let Some(exit) = block.exits.iter().find(|e| e.field == off) else {
                return;
            };
            // A back edge that keeps registers borrowed goes to its own loop head, past the
            // entry's stores, and into no other block (`emit::emit_block`).
            let to = match exit.link_at {
                None => host,
                Some(head) if dst == src => block.host + head as u64,
                Some(_) => return,
            };
            (read_rel32_target(field), to)
        };
        self.code.patch_rel32(field, to);
        self.link_into(src, dst, Incoming::Jump { field, original });
        self.stats.chained += 1;
    }

    /// Points the inline cache whose `mov rcx, imm64` field is at `site` at `target`, whose block
    /// is entered at `host`; the cache's hit path jumps to that block's prologue.
    pub(super) fn fill_inline_cache(&mut self, site: u64, target: u64, host: u64) {
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
        let Some(dst) = self.block_at_entry(host) else { return };
        if !self.blocks[src].valid || !self.blocks[dst].valid {
            return;
        }
        self.code
            .patch_u64(base + cache.imm_field as u64, target.wrapping_neg());
        self.code
            .patch_rel32(base + cache.rel_field as u64, self.blocks[dst].host);
        // Later misses use the table (the site is polymorphic) instead of the dispatcher.
        self.code.patch_jmp_to_nop(base + cache.fill_field as u64);
        self.link_into(src, dst, Incoming::inline_cache(base, &cache));
        self.stats.chained += 1;
    }

    /// Empties the indirect-branch tables. Only the slots filled since the last flush are
    /// cleared while they are few: system mode flushes at every address-space switch, and a
    /// full 1 MiB fill each time cost 7% of a Linux boot.
    pub(super) fn flush_ibl(&mut self) {
        self.flush_ibl_keeping(false);
    }

    /// [`Translator::flush_ibl`], but with `keep_global` the entries of global blocks stay: a
    /// CR3 write keeps those blocks valid and linked (see `remap`), and refilling their
    /// entries through the dispatcher after each of a Linux boot's ≈17,600 CR3 writes made
    /// most of its indirect-branch misses.
    ///
    /// The slots of global and non-global blocks are listed apart, so a CR3 write visits only
    /// the non-global ones: the kernel's entries stay, and going over them at each of a
    /// fork/exec-heavy guest's CR3 writes was ≈2% of its time.
    fn flush_ibl_keeping(&mut self, keep_global: bool) {
        let empty = self.glue.ibl_empty;
        let ctx = self.ctx.get_mut();
        for set in 0..crate::context::IBL_SETS {
            let [local, global_slots] = &mut self.ibl_used[set];
            if local.len() >= IBL_ENTRIES / 16 || global_slots.len() >= IBL_ENTRIES / 16 {
                // Slots filled past a list's end are not known: all go.
                ctx.flush_ibl(set, empty);
                local.clear();
                global_slots.clear();
                continue;
            }
            let global = &self.ibl_global[set];
            let table = &mut ctx.ibls[set];
            let mut clear = |slot: u32| {
                table.hosts[slot as usize] = empty;
                table.tags[slot as usize] = IBL_EMPTY_TAG;
            };
            // A slot refilled with a non-global block is in `local` too (see `ibl_insert`).
            for &slot in local.iter().filter(|&&slot| !(keep_global && global[slot as usize])) {
                clear(slot);
            }
            local.clear();
            if !keep_global {
                global_slots.drain(..).for_each(&mut clear);
            }
        }
    }

    /// Makes the running privilege level's table send `target` to the block entered at `host`
    /// (through its prologue).
    pub(super) fn ibl_insert(&mut self, target: u64, host: u64) {
        // Only system mode has global blocks (and CR3 writes that keep them).
        let global = self.system && self.block_at_entry(host).is_some_and(|b| self.blocks[b].global);
        let ctx = self.ctx.get_mut();
        let set = crate::context::ibl_set(ctx.state.cpl, ctx.state.code32);
        let i = crate::context::Context::ibl_slot(target);
        let table = &mut ctx.ibls[set];
        // Each filled slot is in the list of its block's kind (an empty one, or one that held
        // the other kind, is not yet).
        let listed = table.tags[i] != IBL_EMPTY_TAG && self.ibl_global[set][i] == global;
        let list = &mut self.ibl_used[set][global as usize];
        if !listed && list.len() < IBL_ENTRIES / 16 {
            list.push(i as u32);
        }
        // A slot refilled with another block takes that block's bit.
        self.ibl_global[set][i] = global;
        table.tags[i] = target.wrapping_neg();
        table.hosts[i] = host - IBL_PROLOGUE_LEN;
    }

    pub(super) fn block_at_host(&self, addr: u64) -> Option<usize> {
        let i = self.by_host.at_or_before(addr)?;
        let b = &self.blocks[i];
        (addr < b.host + b.host_len as u64).then_some(i)
    }

    /// How a block is emitted now (`dispatcher_only`: a one-off step's block).
    fn emit_options(&self, dispatcher_only: bool) -> emit::EmitOptions {
        emit::EmitOptions {
            soft_mmu: self.strategy.is_soft_mmu(),
            split_access: self.bounce.is_some(),
            dispatcher_only,
            guest_xcr0: self.translated_xcr0,
            system: self.system,
            kernel: self.system && self.ctx.get().state.cpl == crate::state::Cpl::Kernel,
            count_tlb_hits: self.detailed_stats,
            interrupt_line: self.interrupt_line,
            host_tsc: self.host_tsc,
            compat: self.ctx.get().state.code32,
            extended_state_check: self.extended_state_handover,
            lazy_extended_state: self.system,
        }
    }

    /// Brings back the block last invalidated under `key` if `block` is the code it was
    /// translated from, emitted with the same options, and none of its accesses was made
    /// windowless since (its windows would miss on): its host code is then what translating
    /// `block` would emit, and it goes back into the lookups over `phys_pages` and `mapping`
    /// as found now, with its exits unlinked. Returns its entry (after the prologue).
    ///
    /// Linux patches its own text while it boots (alternatives, ftrace's NOPs, static keys,
    /// page by page through `text_poke`), and each write invalidates every block on the page:
    /// a bt boot brings back ≈6,200 blocks this way and translates 46,500 instead of 52,500
    /// (AMD EPYC host). A dead block's links into it were undone when it died, and its own
    /// jumps out are undone here (a target that did not die may hold another mapping's code),
    /// so it re-enters the lookups unlinked, as a new one. `signature` is `block`'s
    /// ([`DecodedBlock::signature`]).
    pub(super) fn revive(
        &mut self,
        block: &DecodedBlock,
        signature: &[u8],
        phys_pages: &[u64],
        mapping: &[(u64, u64)],
        global: bool,
        key: u64,
    ) -> Option<u64> {
        let i = self.revivable.remove(&key)?;
        let options = self.emit_options(false);
        let b = &self.blocks[i];
        // (Listed when it died under `key`; taken off the list by a new block there.)
        debug_assert!(!b.valid && b.key == key);
        if b.options != options
            || *b.signature != *signature
            || block.instrs.iter().any(|d| self.windowless.contains(&d.instr.ip()))
        {
            return None;
        }
        let epoch = self.mapping_epoch;
        let global_epoch = self.global_epoch;
        let b = &mut self.blocks[i];
        b.valid = true;
        b.mapping = mapping.to_vec().into();
        b.epoch = epoch;
        b.global = global;
        b.global_epoch = global_epoch;
        let host = b.host;
        // Its links out were made in the mapping it died in: a link into a block on its own
        // pages (`Block::incoming_same_pages`) is never checked again, so one kept here would
        // run the code that page held before (a static binary's exit ran the previous
        // program's translation of its own address, and jumped into the padding after its text).
        self.unlink_exits(i, false);
        self.register_code_pages(phys_pages, i);
        self.by_guest.insert(key, i);
        self.stats.blocks_revived += 1;
        Some(host + IBL_PROLOGUE_LEN)
    }

    /// Emits `block` for the code cache's cursor.
    fn emit(&mut self, block: &DecodedBlock, options: emit::EmitOptions) -> Result<emit::EmittedBlock, TranslateError> {
        let at = self.code.cursor();
        emit::emit_block(
            block,
            at,
            &self.glue,
            options,
            &self.windowless,
            &mut self.emit_scratch,
            &mut self.miss_sites,
        )
    }

    /// `signature`: `block`'s, for a block that may be revived (cached under its own key),
    /// else empty.
    pub(super) fn install(
        &mut self,
        block: DecodedBlock,
        signature: Box<[u8]>,
        phys_pages: Vec<u64>,
        mapping: Vec<(u64, u64)>,
        global: bool,
        key: Option<u64>,
    ) -> Result<u64, TranslateError> {
        // `key`: where `by_guest` finds it; None for an uncached one-instruction block.
        // Returns the block's entry (after its indirect-branch prologue).
        // Any key but the block's own marks a one-off step's block (`one_off_key`).
        let dispatcher_only = key != Some(self.block_key(block.start));
        let options = self.emit_options(dispatcher_only);
        let emitted = match self.emit(&block, options) {
            Ok(e) if e.code.len() <= self.code.remaining() => e,
            Ok(_) | Err(TranslateError::CodeCacheFull) => {
                self.flush();
                self.emit(&block, options)?
            }
            Err(e) => return Err(e),
        };
        let host = self.code.append(&emitted.code)?;
        if trace_blocks() {
            dump_block(&block, host, &emitted.code);
        }
        perf_map_block(&block, host, emitted.code.len(), options.kernel);
        let host_len = emitted.code.len() as u32;
        self.emit_scratch.recycle(emitted.code);
        let index = self.blocks.len();
        self.stats.blocks_translated += 1;
        self.stats.guest_instructions_translated += block.instrs.len() as u64;
        self.stats.windows += emitted.windows as u64;
        self.stats.window_accesses += emitted.window_accesses as u64;
        self.stats.loop_windows += emitted.loop_windows as u64;
        self.stats.loop_window_accesses += emitted.loop_window_accesses as u64;
        self.register_code_pages(&phys_pages, index);
        let cached = key.is_some();
        let key = key.unwrap_or_else(|| self.block_key(block.start));
        if cached {
            // A block dead under this key is not this code: it stays dead.
            self.revivable.remove(&key);
        }
        for page in block.span.0 >> 12..=(block.span.1 - 1) >> 12 {
            self.code_vpages.entry(page).or_default().push(index);
        }
        self.blocks.push(Block {
            key,
            host,
            host_len,
            sites: emitted.sites,
            exits: emitted.exits,
            incoming: Vec::new(),
            incoming_same_pages: Vec::new(),
            inline_caches: emitted.inline_caches,
            valid: cached,
            span: block.span,
            mapping: mapping.into(),
            epoch: self.mapping_epoch,
            global,
            global_epoch: self.global_epoch,
            emulated: None,
            dispatcher_only,
            signature,
            options,
        });
        if cached {
            self.by_guest.insert(key, index);
        }
        // The code buffer only grows between flushes, so appending keeps the index sorted.
        self.by_host.push(host, index);
        Ok(host + IBL_PROLOGUE_LEN)
    }

    /// Records the instruction the engine performs at `start` (soft-MMU) as a block without
    /// host code (see [`Block::emulated`]).
    pub(super) fn install_emulated(
        &mut self,
        start: u64,
        instr: iced_x86::Instruction,
        rule: Rule,
        phys_pages: Vec<u64>,
        mapping: Vec<(u64, u64)>,
        global: bool,
    ) {
        let index = self.blocks.len();
        self.register_code_pages(&phys_pages, index);
        let key = self.block_key(start);
        self.blocks.push(Block {
            key,
            host: 0,
            host_len: 0,
            sites: Vec::new(),
            exits: Vec::new(),
            incoming: Vec::new(),
            incoming_same_pages: Vec::new(),
            inline_caches: Vec::new(),
            valid: true,
            mapping: mapping.into(),
            epoch: self.mapping_epoch,
            global,
            global_epoch: self.global_epoch,
            span: (start, start + instr.len() as u64),
            emulated: Some((instr, rule)),
            dispatcher_only: false,
            signature: Box::default(),
            options: emit::EmitOptions::default(),
        });
        self.by_guest.insert(key, index);
    }

    /// Records that block `index` has code in `pages` (guest physical, or host under identity).
    fn register_code_pages(&mut self, pages: &[u64], index: usize) {
        for &page in pages {
            let entry = self.code_pages.entry(page).or_default();
            if entry.is_empty() {
                if self.user_exit {
                    self.new_code_pages.push(page);
                }
                // Writes to this page must now miss so they can invalidate its blocks.
                if let MemoryStrategy::SoftMmu(ram) = &self.strategy {
                    if let Some(host) = ram.host(page, PAGE) {
                        self.ctx.get_mut().forget_write_tlb_host(host);
                    }
                }
            }
            entry.push(index);
        }
    }

    /// Invalidates every block whose code lies in guest physical page `page` (self-modifying
    /// code): unlinks chained jumps into it and removes it from the lookups.
    pub(super) fn invalidate_phys_page(&mut self, page: u64) {
        let Some(list) = self.code_pages.remove(&page) else {
            return;
        };
        if !self.strategy.is_soft_mmu() {
            // An instruction may straddle into `page` from the one before.
            self.emulated_at
                .retain(|&rip, _| !(rip + 15 > page && rip < page + PAGE));
        }
        for i in list {
            self.invalidate_block(i);
        }
    }

    /// Takes block `i` out of every lookup and unlinks everything that jumps into it.
    pub(super) fn invalidate_block(&mut self, i: usize) {
        if !self.blocks[i].valid {
            return;
        }
        self.blocks[i].valid = false;
        self.stats.invalidated_blocks += 1;
        let (key, host) = (self.blocks[i].key, self.blocks[i].host);
        if self.by_guest.get(key) == Some(i) {
            self.by_guest.remove(key);
            if !self.blocks[i].signature.is_empty() {
                self.revivable.insert(key, i);
            }
        }
        let b = &mut self.blocks[i];
        undo_links(&mut b.incoming);
        undo_links(&mut b.incoming_same_pages);
        let empty = self.glue.ibl_empty;
        self.ctx.get_mut().ibl_forget(key, host, empty);
    }

    /// Points every exit and inline cache of block `i` back at the dispatcher. `anywhere`: as
    /// for [`Incoming::undo`] (translated code stopped by a signal at any instruction). The
    /// targets keep their records of these links; undoing one again later only sends that exit
    /// to the dispatcher once more.
    pub(super) fn unlink_exits(&self, i: usize, anywhere: bool) {
        let b = &self.blocks[i];
        let exits = b.exits.iter().map(|e| Incoming::exit(b.host, e));
        for link in exits.chain(b.inline_caches.iter().map(|c| Incoming::inline_cache(b.host, c))) {
            // SAFETY: the exit's rel32 field and stub, and the cache's fields, lie in the block,
            // in the code buffer; the callers run with translated code stopped.
            unsafe { link.undo(anywhere) };
        }
    }

    /// Records a link from block `src` into block `dst` (so invalidation and
    /// [`Translator::remap`] can undo it).
    fn link_into(&mut self, src: usize, dst: usize, link: Incoming) {
        let (from, to) = (&self.blocks[src].mapping, &self.blocks[dst].mapping);
        if to.iter().next().is_some() && to.iter().all(|p| from.iter().any(|q| q == p)) {
            self.blocks[dst].incoming_same_pages.push(link);
            return;
        }
        let b = &self.blocks[dst];
        if b.incoming.is_empty() {
            if b.global && b.global_epoch == self.global_epoch {
                self.linked_global.push(dst);
            } else {
                self.linked.push(dst);
            }
        }
        self.blocks[dst].incoming.push(link);
    }

    /// The guest's address space changed (CR3, INVLPG, paging controls): the TLBs and the
    /// links between blocks go (but those within the same pages, `Block::incoming_same_pages`),
    /// and the blocks stay. Each is revalidated (its code pages walked
    /// again) the next time the dispatcher looks it up, and kept if they still map to the same
    /// physical pages: kernel text survives the address-space switches that would otherwise
    /// retranslate it all.
    ///
    /// `keep_global`: a CR3 write with CR4.PGE, which leaves global translations in the TLB,
    /// so links into blocks whose code is all global stay and those blocks need no
    /// revalidation. (Linux writes CR3 thousands of times while it boots without PCID — each
    /// text_poke switches to a temporary mm and back — and its text is global.)
    ///
    /// Blocks with links into them are listed by whether their code was global when first
    /// linked (`linked_global`), so a CR3 write visits only the others: walking every linked
    /// block at each of a boot's CR3 writes was 5% of it.
    pub(super) fn remap(&mut self, keep_global: bool) {
        let mut undo = std::mem::take(&mut self.linked);
        if !keep_global {
            undo.append(&mut self.linked_global);
        }
        for i in undo {
            let b = &self.blocks[i];
            if keep_global && b.global && b.global_epoch == self.global_epoch {
                // Became global when it was revalidated.
                self.linked_global.push(i);
                continue;
            }
            undo_links(&mut self.blocks[i].incoming);
        }
        if keep_global {
            self.ctx.get_mut().flush_tlb_nonglobal();
        } else {
            self.ctx.get_mut().flush_tlb();
        }
        self.flush_ibl_keeping(keep_global);
        self.mapping_epoch += 1;
        self.invalidations += 1;
        if !keep_global {
            self.global_epoch += 1;
        }
        self.stats.remaps += 1;
    }

    /// INVLPG: the data TLB entries of `va`'s 2 MiB region go (the page may be a large one,
    /// cached as 4 KiB entries), and so does whatever lets translated code enter the blocks on
    /// `va`'s page without the dispatcher revalidating them: links from other pages, their
    /// indirect-branch entries, their validation — for every block of the 2 MiB region if a
    /// 2 MiB page mapped code there. Links within one page stay (see
    /// `Block::incoming_same_pages`: every way into the page now goes through the
    /// dispatcher). Everything else stays: Linux invalidates single pages all the time —
    /// copy-on-write, unmap, kmap — often next to a program's code (its data follows it), and
    /// undoing the links of every block of the region each time (a static busybox's whole
    /// text) was ≈4% of a fork/exec-heavy guest; a full remap each time undid every chain into
    /// the kernel too (≈5,000 times in 600 fork+exec). There are no 1 GiB pages to track: the
    /// VMM does not offer them (`pdpe1gb` hidden) and the page walk treats PS in a PDPTE as a
    /// reserved bit.
    pub(super) fn invalidate_page(&mut self, va: u64) {
        // Other pages' translations may stay cached, as on a CPU (an OS invalidates each page
        // whose translation it changed); a whole-TLB flush here refilled ≈1,750 entries per
        // fork+exec of a Linux guest.
        self.ctx.get_mut().forget_tlb_region(va);
        self.stats.page_invalidations += 1;
        self.invalidations += 1;
        // Blocks on other 4 KiB pages keep their links unless a 2 MiB page mapped code here
        // (the INVLPG may have remapped all of it). Blocks are listed by page, so an INVLPG
        // visits only the blocks it concerns (listing them by 2 MiB region made each of a
        // fork/exec-heavy guest's INVLPGs next to a program's text walk all of its blocks).
        let region = va >> 21;
        let pages = if self.large_code_regions.contains(&region) {
            region << 9..(region + 1) << 9
        } else {
            va >> 12..(va >> 12) + 1
        };
        let empty = self.glue.ibl_empty;
        let ctx = self.ctx.get_mut();
        for page in pages {
            let Some(on_page) = self.code_vpages.get_mut(&page) else {
                continue;
            };
            on_page.retain(|&i| {
                let b = &mut self.blocks[i];
                if !b.valid {
                    return false;
                }
                undo_links(&mut b.incoming);
                ctx.ibl_forget(b.key, b.host, empty);
                b.epoch = NEVER_VALIDATED;
                b.global = false;
                true
            });
        }
    }

    /// Whether block `i` may run in the current address space: translated or revalidated in
    /// this mapping epoch, or its code pages still map (and are executable) as when it was
    /// translated.
    pub(super) fn mapping_current(&mut self, i: usize) -> bool {
        let b = &self.blocks[i];
        if b.epoch == self.mapping_epoch || (b.global && b.global_epoch == self.global_epoch) {
            return true;
        }
        let MemoryStrategy::SoftMmu(ram) = &self.strategy else {
            return true;
        };
        let state = &self.ctx.get().state.paging();
        let mut global = true;
        let current = self.blocks[i].mapping.iter().all(|&(va, pa)| {
            soft_mmu::walk_leaf(ram, state, va, Access::Fetch).is_ok_and(|(p, g)| {
                global &= g;
                p & !(PAGE - 1) == pa
            })
        });
        if current {
            let b = &mut self.blocks[i];
            b.epoch = self.mapping_epoch;
            b.global = global;
            b.global_epoch = self.global_epoch;
        }
        current
    }
}

impl Translator {
    /// The fault a fetch at `rip` takes under the guest's page tables now, if any (soft-MMU).
    pub(super) fn fetch_fault(&self, rip: u64) -> Option<GuestException> {
        let MemoryStrategy::SoftMmu(ram) = &self.strategy else {
            return None;
        };
        soft_mmu::walk_leaf(ram, &self.ctx.get().state.paging(), rip, Access::Fetch).err()
    }
}

/// Undoes every link in `links` and empties it. Drained, not taken: the block keeps the
/// list's allocation for the links it gets again after a CR3 write (freeing and reallocating
/// them was ≈5% of a fork/exec-heavy Linux guest). Translated code must be stopped.
fn undo_links(links: &mut Vec<Incoming>) {
    for link in links.drain(..) {
        // SAFETY: links are recorded inside the code buffer when made; the engine calls this
        // only while translated code is stopped.
        unsafe { link.undo(false) };
    }
}

/// A `Block::epoch` no mapping epoch equals: the block is revalidated when next looked up.
const NEVER_VALIDATED: u64 = u64::MAX;

pub(super) fn read_rel32_target(field: u64) -> u64 {
    // SAFETY: `field` is the rel32 of a jump inside our code buffer (checked by the caller
    // through the block's exit list).
    let rel = unsafe { std::ptr::read_unaligned(field as *const i32) };
    (field + 4).wrapping_add(rel as i64 as u64)
}

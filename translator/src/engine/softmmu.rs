//! The soft-MMU slow path: a TLB miss walks the guest page tables (alignment and canonical
//! checks first, as the CPU orders them), fills the inline TLB or raises the guest fault; an
//! access that crosses into a non-contiguous page runs once against a bounce buffer, and so
//! does an access to guest-physical memory that is not RAM (device memory): the platform's
//! `mmio_read` fills the bytes the instruction reads, the bytes it writes go to `mmio_write`
//! after it ran. Translated code never gets a host pointer outside guest RAM.

use super::*;
use crate::context::{MISS_AC_SHIFT, MISS_LOOP_KEY_SHIFT, MISS_LOOP_WINDOW, MISS_WINDOW, MISS_WINDOW_SETTLED};

/// An in-flight device access (see `Translator::mmio`): the instruction at `rip` runs once
/// with the page at `page_va` mapped to the bounce buffer's first page.
#[derive(Clone, Copy)]
pub(super) struct MmioAccess {
    pub(super) rip: u64,
    pub(super) page_va: u64,
    pub(super) pa: u64,
    pub(super) size: usize,
    pub(super) writes: bool,
}

/// An in-flight split access (see `Translator::bounce`).
#[derive(Clone, Copy)]
pub(super) struct Bounce {
    pub(super) page_va: u64,
    pub(super) hosts: [u64; 2],
    pub(super) pas: [u64; 2],
    pub(super) write: bool,
    /// The two pages were copied into the bounce buffer (they are not consecutive in guest
    /// RAM); otherwise the access runs on guest RAM itself.
    pub(super) copied: bool,
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

pub(super) use memmap2_free::PageBuffer;

/// The guest-physical address of a bounce-buffer page that stands for no guest page (host 0):
/// one holding no byte of a partial access ([`PartialAccess`]).
const NO_PAGE: u64 = u64::MAX;

/// An access that may touch only part of its operand (`context::MISS_PARTIAL`): the miss path
/// walks only the pages holding a byte it touches, so the others may fault.
enum PartialAccess {
    /// An EVEX access under an opmask (the mask's value): its active elements (`mmu::masked`).
    Masked(iced_x86::Instruction, u64),
    /// An XSAVE-family image (the mnemonic, RFBM): its first bytes, as many as RFBM (and an
    /// `xrstor`'s header) say (`XsaveLayout::touched_bytes`).
    XsaveImage(iced_x86::Mnemonic, u64),
}

impl PartialAccess {
    fn of(instr: iced_x86::Instruction, state: &GuestState) -> PartialAccess {
        if crate::mmu::masked::is_masked_access(&instr) {
            let mask =
                emulate::regs::opmask_index(&instr).map_or(u64::MAX, |k| state.xsave.opmask(k).unwrap_or(u64::MAX));
            PartialAccess::Masked(instr, mask)
        } else {
            let rfbm = (state.gpr[2] << 32 | state.gpr[0] & 0xffff_ffff) & state.xcr0;
            PartialAccess::XsaveImage(instr.mnemonic(), rfbm)
        }
    }

    /// For a store that touches both its pages and faults in the second (`both_pages`): the
    /// offset CR2 names instead of the first byte touched there, if the host is an Intel CPU
    /// and this is a vector store under an opmask (`Quirk::MaskedStoreFaultAtLastByte`: the
    /// last byte of its last active element; a scalar's one element faults at the page's
    /// start, as an unmasked store does).
    fn store_fault_at_last_byte(&self, both_pages: bool) -> Option<u64> {
        let PartialAccess::Masked(instr, mask) = self else {
            return None;
        };
        let opmask = instr.op_mask() != iced_x86::Register::None;
        let vector = instr.memory_size().size() as u64 > mmu::masked::element_size(instr);
        let quirk = both_pages && opmask && vector && vendor::host_has(Quirk::MaskedStoreFaultAtLastByte);
        quirk.then(|| mmu::masked::last_touched(instr, *mask)).flatten()
    }

    /// The offset of the first byte in `from..to` of the operand the access touches, if any;
    /// `header` reads an `xrstor` image's header when it can.
    fn first_touched(&self, from: u64, to: u64, header: impl FnOnce() -> Option<[u64; 2]>) -> Option<u64> {
        match self {
            PartialAccess::Masked(instr, mask) => mmu::masked::first_touched(instr, *mask, from, to),
            PartialAccess::XsaveImage(mnemonic, rfbm) => {
                let touched = XsaveLayout::host()
                    .touched_bytes(*mnemonic, *rfbm, header())
                    .map_or(to, |n| n as u64);
                (from < touched.min(to)).then_some(from)
            }
        }
    }
}

impl Translator {
    /// Sets up a split access: both pages copied into the bounce buffer, the first page's TLB
    /// entry pointed at it, and the instruction scheduled as an uncached one-instruction block
    /// without the crossing check. A fill with host address 0 is a page the access must not
    /// touch ([`PartialAccess`]): zeros in the buffer, never written back.
    pub(super) fn start_bounce(
        &mut self,
        fills: &[(u64, u64, u64, bool)],
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
            for fill in fills.iter().filter(|f| f.2 != 0) {
                self.invalidate_phys_page(fill.1);
            }
        }
        // Pages that follow each other in guest RAM follow each other in the host mapping too:
        // the access can run on them in place (most split accesses are a kernel's, on its
        // direct map or its image, where consecutive virtual pages are consecutive physical
        // ones). Only scattered pages are copied.
        let consecutive =
            fills[0].2 != 0 && fills[1].2 != 0 && fills[1].1 == fills[0].1 + PAGE && fills[1].2 == fills[0].2 + PAGE;
        let host = if consecutive {
            fills[0].2
        } else {
            for (i, fill) in fills.iter().enumerate() {
                // SAFETY: fill.2 is a page of guest RAM (or 0: none); the buffer has two pages.
                unsafe {
                    if fill.2 == 0 {
                        std::ptr::write_bytes(buffer.add(i * PAGE as usize), 0, PAGE as usize);
                    } else {
                        std::ptr::copy_nonoverlapping(fill.2 as *const u8, buffer.add(i * PAGE as usize), PAGE as usize)
                    }
                };
            }
            buffer as u64
        };
        let page_va = fills[0].0;
        let kind = if write { TlbKind::Write } else { TlbKind::Read };
        let set = crate::context::level_set(self.ctx.get().state.cpl);
        self.ctx.get_mut().fill_tlb(set, kind, page_va, host, false);
        self.bounce = Some(Bounce {
            page_va,
            hosts: [fills[0].2, fills[1].2],
            pas: [fills[0].1, fills[1].1],
            write,
            copied: !consecutive,
        });
        self.one_step = Some(OneStep { rip, kept: true });
        Ok(())
    }

    /// Ends a split access: written bytes go back to guest memory (when copied), the TLB
    /// forgets the page.
    pub(super) fn finish_bounce(&mut self, b: Bounce) {
        let Some(buffer) = self.bounce_buffer.as_ref().map(|b| b.0) else {
            return;
        };
        if b.write && b.copied {
            for (i, &host) in b.hosts.iter().enumerate().filter(|(_, &h)| h != 0) {
                // SAFETY: as in start_bounce.
                unsafe { std::ptr::copy_nonoverlapping(buffer.add(i * PAGE as usize), host as *mut u8, PAGE as usize) };
            }
        }
        if b.write {
            for (pa, _) in b.pas.into_iter().zip(b.hosts).filter(|(_, h)| *h != 0) {
                self.invalidate_phys_page(pa);
            }
        }
        self.ctx.get_mut().forget_tlb_page(b.page_va);
    }

    /// Sets up a device access of `size` bytes at guest physical `pa` (virtual `va`) by the
    /// instruction at `rip`: its bytes in the bounce buffer hold what the device returns (if the
    /// instruction reads memory), the TLB maps the page there for reads and writes, and the
    /// instruction runs as an uncached one-instruction block; `finish_mmio` sends what it wrote.
    fn start_mmio(
        &mut self,
        platform: &mut dyn Platform,
        rip: u64,
        va: u64,
        pa: u64,
        size: u64,
    ) -> Result<(), TranslateError> {
        let (reads, writes) = self.memory_kinds_at(rip)?;
        if self.bounce_buffer.is_none() {
            self.bounce_buffer = memmap2_free::PageBuffer::new();
        }
        let Some(buffer) = self.bounce_buffer.as_ref().map(|b| b.0) else {
            return Err(TranslateError::Host(format!(
                "guest RIP {rip:#x}: no bounce page for a device access at {va:#x}"
            )));
        };
        let offset = (va & (PAGE - 1)) as usize;
        // SAFETY: the buffer is two pages; offset + size stays in the first (the caller checked
        // the access does not cross a page), and nothing else refers to it now.
        let bytes = unsafe {
            std::ptr::write_bytes(buffer, 0xff, PAGE as usize);
            std::slice::from_raw_parts_mut(buffer.add(offset), size as usize)
        };
        if reads {
            platform.mmio_read(pa, bytes);
        }
        let page_va = va & !(PAGE - 1);
        let ctx = self.ctx.get_mut();
        let set = crate::context::level_set(ctx.state.cpl);
        ctx.fill_tlb(set, TlbKind::Read, page_va, buffer as u64, false);
        ctx.fill_tlb(set, TlbKind::Write, page_va, buffer as u64, false);
        self.stats.mmio_accesses += 1;
        self.mmio = Some(MmioAccess {
            rip,
            page_va,
            pa,
            size: size as usize,
            writes,
        });
        self.one_step = Some(OneStep { rip, kept: true });
        Ok(())
    }

    /// Ends a device access: if the instruction completed, the bytes it wrote go to the
    /// device; the TLB forgets the buffer. `Stop` if the device asked to end the run.
    pub(super) fn finish_mmio(&mut self, m: MmioAccess, platform: &mut dyn Platform) -> PortOutcome {
        let ctx = self.ctx.get_mut();
        ctx.forget_tlb_page(m.page_va);
        let completed = ctx.state.rip != m.rip;
        let Some(buffer) = self.bounce_buffer.as_ref().map(|b| b.0) else {
            return PortOutcome::Continue;
        };
        if !(m.writes && completed) {
            return PortOutcome::Continue;
        }
        // SAFETY: the range `start_mmio` handed out, inside the buffer's first page.
        let bytes = unsafe { std::slice::from_raw_parts(buffer.add((m.pa & (PAGE - 1)) as usize), m.size) };
        platform.mmio_write(m.pa, bytes)
    }

    /// Whether the instruction at guest `rip` reads and whether it writes memory.
    fn memory_kinds_at(&mut self, rip: u64) -> Result<(bool, bool), TranslateError> {
        use iced_x86::OpAccess;
        let instr = self.instruction_at(rip)?;
        let mut info = iced_x86::InstructionInfoFactory::new();
        let (mut reads, mut writes) = (false, false);
        for m in info.info(&instr).used_memory() {
            match m.access() {
                OpAccess::Read | OpAccess::CondRead => reads = true,
                OpAccess::Write | OpAccess::CondWrite => writes = true,
                OpAccess::ReadWrite | OpAccess::ReadCondWrite => (reads, writes) = (true, true),
                _ => {}
            }
        }
        Ok((reads, writes))
    }

    /// The instruction at guest `rip` (one the engine met translated code at: its code is
    /// there).
    pub(super) fn instruction_at(&mut self, rip: u64) -> Result<iced_x86::Instruction, TranslateError> {
        let mut fetch = Fetcher::new(&self.strategy, &self.ctx.get().state, &mut self.maps);
        let mut bytes = [0u8; 15];
        // The instruction was just fetched for its block; only its own bytes matter, so a
        // fetch cut short at a page boundary retries with what fits in this page.
        let room = (PAGE - (rip & (PAGE - 1))).min(15) as usize;
        let n = if fetch.fetch(rip, &mut bytes).is_ok() {
            15
        } else {
            fetch
                .fetch(rip, &mut bytes[..room])
                .map_err(|_| TranslateError::Host(format!("guest RIP {rip:#x}: its code is gone")))?;
            room
        };
        let bitness = self.ctx.get().state.bitness();
        let mut decoder = iced_x86::Decoder::with_ip(bitness, &bytes[..n], rip, iced_x86::DecoderOptions::NONE);
        Ok(crate::rules::decode(&mut decoder))
    }

    /// The first piece of an `fstp m80fp`/`fbstp m80bcd` at `va` whose second piece faults:
    /// its low 8 bytes go to the first page (guest physical page `page_pa`, host page `host`),
    /// as the CPU's first store put them there. Other 10-byte stores write nothing.
    fn store_m80_low_qword(&mut self, rip: u64, va: u64, page_pa: u64, host: u64) -> Result<(), TranslateError> {
        let instr = self.instruction_at(rip)?;
        if !matches!(instr.mnemonic(), iced_x86::Mnemonic::Fstp | iced_x86::Mnemonic::Fbstp) {
            return Ok(());
        }
        let Some(low) = emulate::x87::low_qword_of_m80_store(&self.ctx.get().state, instr.mnemonic()) else {
            return Ok(());
        };
        // SAFETY: `host` is the first page's host address in guest RAM (from the walk) and
        // va's offset + 8 stays inside that page (checked by the caller).
        unsafe { std::ptr::copy_nonoverlapping(low.as_ptr(), (host + (va & (PAGE - 1))) as *mut u8, 8) };
        self.invalidate_phys_page(page_pa);
        Ok(())
    }

    /// Handles a soft-MMU TLB miss: walk, set A/D bits, fill the TLB, or report the fault.
    pub(super) fn tlb_miss(&mut self, platform: &mut dyn Platform) -> Result<Option<GuestException>, TranslateError> {
        let miss_info = self.ctx.get().miss_info;
        if miss_info & (MISS_WINDOW | MISS_LOOP_WINDOW) != 0 {
            self.window_miss();
            return Ok(None);
        }
        // A masked AVX-512 access or an XSAVE image walks only the pages it touches.
        let partial = if miss_info & MISS_PARTIAL != 0 {
            let instr = self.instruction_at(self.ctx.get().state.rip)?;
            Some(PartialAccess::of(instr, &self.ctx.get().state))
        } else {
            None
        };
        let ctx = self.ctx.get();
        let va = ctx.miss_va;
        let size = (ctx.miss_info & 0xffff).max(1);
        let access = Access::from_bits((ctx.miss_info >> 16) & 0xff);
        let stack = ctx.miss_info & (1 << 24) != 0;
        let rip = ctx.state.rip;
        let state = ctx.state.paging();
        // Alignment checking comes before paging (CPL3 with CR0.AM and RFLAGS.AC), at the
        // granule the emitter chose for the instruction (`emit/alignment.rs`: by size, or per
        // element of a masked access on AMD), and not at all with every element masked off.
        let alignment = 1u64 << ((ctx.miss_info >> MISS_AC_SHIFT) & 0xf);
        let ac = state.alignment_checking();
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
        const MXCSR_MM: u32 = 1 << 17;
        let waived = ctx.miss_info & MISS_ALIGN_WAIVED_BY_MM != 0 && ctx.state.xsave.mxcsr() & MXCSR_MM != 0;
        // A masked access with every element masked off is not checked (measured: a misaligned
        // `vmovdqa64` with k1 = 0 completes).
        let any_active = partial
            .as_ref()
            .is_none_or(|p| p.first_touched(0, size, || None).is_some());
        if !va.is_multiple_of(required) && !waived && any_active {
            // Instructions that require alignment (`emit/alignment.rs`) check it before paging.
            // With alignment checking on, an FXSAVE/XSAVE image that is not even 4-byte aligned
            // raises #AC; otherwise a misaligned operand raises #GP(0) (measured on Intel Xeon:
            // `xsave`/`fxsave` at offsets 1, 2, 3, 6 give #AC, at 4, 8, 12 #GP; `movaps` at 1
            // gives #GP).
            let ac_first = ac && !va.is_multiple_of(4) && ctx.miss_info & MISS_ALIGN_PLAIN_GP == 0;
            return Ok(Some(if ac_first { ac_fault } else { GuestException::gp(0) }));
        }
        if ac && !va.is_multiple_of(alignment) && any_active {
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
            // A masked access faults at its first active element in the page (measured: CR2 is
            // that element's address, or the page's start when the element straddles into it).
            let mut fault_at = addr;
            if let Some(p) = &partial {
                let (from, to) = if n == 0 {
                    (0, (PAGE - (va & (PAGE - 1))).min(size))
                } else {
                    (addr - va, size)
                };
                // An `xrstor`'s header, when it lies in the first page (already walked).
                let header = || {
                    let at = (va & (PAGE - 1)) + crate::cpu::xsave::XSTATE_BV as u64;
                    let host = fills.first().map_or(0, |f: &(u64, u64, u64, bool)| f.2);
                    (host != 0 && at + 16 <= PAGE).then(|| {
                        // SAFETY: `host` is the first page's host address in guest RAM (from
                        // its walk) and the 16 bytes at `at` lie inside that page.
                        unsafe {
                            let p = (host + at) as *const u64;
                            [p.read_unaligned(), p.add(1).read_unaligned()]
                        }
                    })
                };
                match p.first_touched(from, to, header) {
                    Some(offset) => fault_at = va + offset,
                    None => {
                        fills.push((addr & !(PAGE - 1), NO_PAGE, 0, false));
                        continue;
                    }
                }
            }
            let (pa, global) = match soft_mmu::walk_leaf(ram, &state, addr, access) {
                Ok(leaf) => leaf,
                Err(exc) if stack && exc.vector == crate::exit::vector::GP => {
                    return Ok(Some(GuestException {
                        vector: 12,
                        error_code: Some(0),
                        address: None,
                    }))
                }
                Err(mut exc) => {
                    if exc.vector == crate::exit::vector::PF {
                        exc.address = Some(fault_at);
                        // The second page of a store whose first page it touches too.
                        let both_pages = n == 1 && access == Access::Write && fills[0].2 != 0;
                        if let Some(last) = partial.as_ref().and_then(|p| p.store_fault_at_last_byte(both_pages)) {
                            exc.address = Some(va + last);
                        }
                    }
                    // A 10-byte store whose low 8 bytes lie in the first page: the x87 m80
                    // stores have written those when the top 2 fault (`emulate/x87.rs`).
                    let low_fits = va & (PAGE - 1) <= PAGE - 8;
                    if n == 1
                        && access == Access::Write
                        && size == 10
                        && low_fits
                        && exc.vector == crate::exit::vector::PF
                    {
                        let (_, page_pa, host, _) = fills[0];
                        self.store_m80_low_qword(rip, va, page_pa, host)?;
                    }
                    return Ok(Some(exc));
                }
            };
            let Some(host) = ram.host(pa & !(PAGE - 1), PAGE) else {
                if n == 0 && (last & !(PAGE - 1)) == (va & !(PAGE - 1)) {
                    return self.start_mmio(platform, rip, va, pa, size).map(|()| None);
                }
                return Err(TranslateError::Host(format!(
                    "guest RIP {rip:#x}: a {size}-byte access at {va:#x} crosses a page boundary into or out of device memory (guest physical {pa:#x}), which is not supported"
                )));
            };
            fills.push((addr & !(PAGE - 1), pa & !(PAGE - 1), host, global));
        }
        // The guest's data breakpoints: a hit is reported once the instruction completes, and
        // a page holding a watched byte is never entered in the TLB (`watch.rs`).
        self.watch_hits |= self.guest_breakpoints.hits(va, size, access);
        let watched = fills
            .iter()
            .any(|f| f.2 != 0 && self.guest_breakpoints.watches_page(f.0));
        if watched || fills.iter().any(|f| f.2 == 0) {
            // Some page holds no byte the access touches, or a watched one: the instruction
            // runs once against the bounce buffer (a page not touched: zeros, never written
            // back).
            if fills.len() == 1 {
                fills.push((fills[0].0 + PAGE, NO_PAGE, 0, false));
            }
            return self.start_bounce(&fills, access, rip, va, size).map(|()| None);
        }
        if fills.len() == 2 {
            return self.start_bounce(&fills, access, rip, va, size).map(|()| None);
        }
        let (page_va, page_pa, host, global) = fills[0];
        if access == Access::Write && self.code_pages.contains_key(&page_pa) {
            let own_page = soft_mmu::walk(ram, &state, rip, Access::Fetch).map(|pa| pa & !(PAGE - 1));
            self.invalidate_phys_page(page_pa);
            if own_page == Ok(page_pa) {
                self.one_step = Some(OneStep { rip, kept: false });
            }
        }
        self.fill_tlbs(access, page_va, host, global);
        Ok(None)
    }

    /// Enters a walked page in the running privilege level's TLBs: the read TLB, and the write
    /// TLB too for a write — a page that may be written may be read (x86 has no write-only
    /// pages, and protection keys only ever take away write before read).
    fn fill_tlbs(&mut self, access: Access, page_va: u64, host: u64, global: bool) {
        let ctx = self.ctx.get_mut();
        let set = crate::context::level_set(ctx.state.cpl);
        if access == Access::Write {
            ctx.fill_tlb(set, TlbKind::Write, page_va, host, global);
        }
        ctx.fill_tlb(set, TlbKind::Read, page_va, host, global);
    }
}

/// Failed window lookups at one place after which no window opens there again.
const WINDOW_RETRIES: u32 = 8;

/// TLB fills for window misses at one RIP, each the exit right after the last, after which
/// the next miss there is a failure: a loop window's entry check needs at most two pages for
/// each of its streams, and fills beyond that are two of its pages evicting each other from
/// one TLB slot (pages 256 MiB apart: `memcmp` of a heap object against kernel rodata under
/// KASLR), which would go on for ever.
const WINDOW_FILL_STREAK: u32 = 8;

/// A window miss the TLB was filled for (`Translator::window_miss`).
#[derive(Clone, Copy, Debug)]
pub(super) struct WindowFill {
    rip: u64,
    va: u64,
    /// `stats.block_exits` when it was filled: the next miss is right after it when it comes
    /// from the next exit.
    exit: u64,
    /// Fills at `rip` one right after the other, this one included.
    streak: u32,
}

impl Translator {
    /// A window's lookup missed (`emit/window.rs`), or a loop window's entry check failed
    /// (`emit/loop_window.rs`, `MISS_LOOP_WINDOW`): never a fault. When the window's page
    /// translates for the window's kind of access, the TLB is filled and execution goes on —
    /// at the window's first access, which runs next and sets the same accessed/dirty bits;
    /// a loop window's at the loop block's start, nothing of it run, so only from a walk that
    /// sets no bit at all (the loop may leave before its first access). Otherwise (a page not
    /// present or not permitting it, device memory, a window straddling two pages, a code page
    /// a write window would write, alignment checking on, a count that does not fit, or a fill
    /// that did not help — the same miss again, or more than [`WINDOW_FILL_STREAK`] fills in a
    /// row at one RIP) the instruction at the guest RIP runs alone, through its own lookup,
    /// which faults or crosses pages exactly as the CPU would; after [`WINDOW_RETRIES`] such
    /// failures of one window (keyed by its place; a loop window's by its first access), its
    /// blocks are retranslated without it.
    fn window_miss(&mut self) {
        let ctx = self.ctx.get();
        let (va, info, rip) = (ctx.miss_va, ctx.miss_info, ctx.state.rip);
        let size = (info & 0xffff).max(1);
        let access = Access::from_bits((info >> 16) & 0xff);
        let in_loop = info & MISS_LOOP_WINDOW != 0;
        let key = if in_loop {
            (rip & !(PAGE - 1)) | ((info >> MISS_LOOP_KEY_SHIFT) & (PAGE - 1))
        } else {
            rip
        };
        if in_loop {
            self.stats.loop_window_misses += 1;
        } else {
            self.stats.window_misses += 1;
        }
        // A fill that did not help: the same miss again, or too many fills in a row.
        let exit = self.stats.block_exits;
        let streak = match self.last_window_fill {
            Some(f) if f.rip == rip && f.exit + 1 == exit => f.streak + 1,
            _ => 1,
        };
        let repeated = streak > WINDOW_FILL_STREAK || self.last_window_fill.is_some_and(|f| f.rip == rip && f.va == va);
        let settled = in_loop || info & MISS_WINDOW_SETTLED != 0;
        let page = if repeated {
            None
        } else {
            self.window_page(va, size, access, settled)
        };
        if let Some((page_va, host, global)) = page {
            self.last_window_fill = Some(WindowFill { rip, va, exit, streak });
            self.fill_tlbs(access, page_va, host, global);
            return;
        }
        if in_loop {
            self.stats.loop_window_fallbacks += 1;
        } else {
            self.stats.window_fallbacks += 1;
        }
        self.last_window_fill = None;
        self.one_step = Some(OneStep { rip, kept: true });
        let failures = self.window_failures.entry(key).or_default();
        *failures += 1;
        if *failures >= WINDOW_RETRIES && self.windowless.insert(key) {
            let on_page = self.code_vpages.get(&(rip >> 12)).cloned().unwrap_or_default();
            for i in on_page {
                let (from, to) = self.blocks[i].span;
                if (from..to).contains(&rip) {
                    self.invalidate_block(i);
                }
            }
        }
    }

    /// The page a window of `size` bytes at `va` lies in, as (guest page, host page, global),
    /// when one RAM page holds it all and permits `access` (not a code page, for a write)
    /// with alignment checking off — what [`Translator::window_miss`] may enter in the TLB;
    /// `settled`: only if walking it sets no accessed or dirty bit (`soft_mmu::walk_settled`).
    fn window_page(&self, va: u64, size: u64, access: Access, settled: bool) -> Option<(u64, u64, bool)> {
        let state = self.ctx.get().state.paging();
        let last = va.wrapping_add(size - 1);
        if va & !(PAGE - 1) != last & !(PAGE - 1) || !mmu::is_canonical(va) || state.alignment_checking() {
            return None;
        }
        let MemoryStrategy::SoftMmu(ram) = &self.strategy else {
            return None;
        };
        let (pa, global) = if settled {
            soft_mmu::walk_settled(ram, &state, va, access)?
        } else {
            soft_mmu::walk_leaf(ram, &state, va, access).ok()?
        };
        let page_pa = pa & !(PAGE - 1);
        let host = ram.host(page_pa, PAGE)?;
        if access == Access::Write && self.code_pages.contains_key(&page_pa) {
            return None;
        }
        if self.guest_breakpoints.watches_page(va) {
            return None;
        }
        Some((va & !(PAGE - 1), host, global))
    }
}

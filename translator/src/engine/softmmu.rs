//! The soft-MMU slow path: a TLB miss walks the guest page tables (alignment and canonical
//! checks first, as the CPU orders them), fills the inline TLB or raises the guest fault; an
//! access that crosses into a non-contiguous page runs once against a bounce buffer.

use super::*;

/// An in-flight split access (see `Translator::bounce`).
#[derive(Clone, Copy)]
pub(super) struct Bounce {
    pub(super) page_va: u64,
    pub(super) hosts: [u64; 2],
    pub(super) pas: [u64; 2],
    pub(super) write: bool,
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

impl Translator {
    /// Sets up a split access: both pages copied into the bounce buffer, the first page's TLB
    /// entry pointed at it, and the instruction scheduled as an uncached one-instruction block
    /// without the crossing check.
    pub(super) fn start_bounce(
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
    pub(super) fn finish_bounce(&mut self, b: Bounce) {
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
    pub(super) fn tlb_miss(&mut self) -> Result<Option<GuestException>, TranslateError> {
        let ctx = self.ctx.get();
        let va = ctx.miss_va;
        let size = (ctx.miss_info & 0xffff).max(1);
        let access = Access::from_bits((ctx.miss_info >> 16) & 0xff);
        let stack = ctx.miss_info & (1 << 24) != 0;
        let rip = ctx.state.rip;
        let state = ctx.state.paging();
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

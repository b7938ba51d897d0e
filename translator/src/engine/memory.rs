//! Guest memory as the engine itself touches it: fetching code for the block builder
//! ([`Fetcher`]: identity reads with no-execute checks, soft-MMU walks recording the physical
//! pages) and [`Memory`] for the instructions the engine performs (page-by-page, alignment
//! checked, writes all-or-nothing, supervisor accesses for the CPU's own structures).

use super::*;

/// Guest code fetch for the block builder.
pub(super) struct Fetcher<'a> {
    pub(super) strategy: &'a MemoryStrategy,
    pub(super) state: &'a GuestState,
    /// (guest virtual page, guest physical page) of every page read.
    pub(super) pages: Vec<(u64, u64)>,
    /// The guest virtual pages among them whose translation is not global.
    pub(super) nonglobal: Vec<u64>,
    /// Some page among them is part of a 2 MiB page.
    pub(super) large: bool,
    pub(super) maps: &'a mut crate::host::pages::HostMaps,
}

impl<'a> Fetcher<'a> {
    pub(super) fn new(
        strategy: &'a MemoryStrategy,
        state: &'a GuestState,
        maps: &'a mut crate::host::pages::HostMaps,
    ) -> Self {
        Fetcher {
            strategy,
            state,
            pages: Vec::new(),
            nonglobal: Vec::new(),
            large: false,
            maps,
        }
    }
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
                let (pa, global) = soft_mmu::walk_leaf(ram, &self.state.paging(), addr, Access::Fetch)?;
                let host = ram
                    .host(pa, buf.len() as u64)
                    .ok_or(GuestException::page_fault(addr, 0x11))?;
                if !global && !self.nonglobal.contains(&(addr & !(PAGE - 1))) {
                    self.nonglobal.push(addr & !(PAGE - 1));
                }
                // SAFETY: host..host+len is inside guest RAM (checked by `host`).
                unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf.as_mut_ptr(), buf.len()) };
                let page = (addr & !(PAGE - 1), pa & !(PAGE - 1));
                if !self.pages.contains(&page) {
                    self.pages.push(page);
                    self.large |= soft_mmu::is_large_page(ram, &self.state.paging(), addr);
                }
                Ok(buf.len())
            }
        }
    }
}

/// Guest memory for instructions the engine performs in Rust.
pub(super) struct Memory<'a> {
    pub(super) strategy: &'a MemoryStrategy,
    /// The guest's paging registers at the instruction (page walks and alignment checking).
    pub(super) state: crate::state::Paging,
    pub(super) written: &'a mut Vec<u64>,
    /// Apply alignment checking to 2/4/8-byte accesses (not for gather elements).
    pub(super) alignment_checks: bool,
    /// The guest's data breakpoints, and DR6's bits for those the accesses hit (`watch.rs`).
    pub(super) guest_breakpoints: &'a super::watch::GuestBreakpoints,
    pub(super) watch_hits: u64,
}

impl Memory<'_> {
    pub(super) fn each_page(
        &mut self,
        va: u64,
        len: usize,
        access: Access,
        f: impl FnMut(u64, usize, usize),
    ) -> Result<(), GuestException> {
        self.each_page_as(va, len, access, self.state.cpl, f)
    }

    /// Like `each_page`, with the page walk's privilege `cpl` (the CPU's own supervisor
    /// accesses use `Cpl::Kernel` whatever the current CPL).
    pub(super) fn each_page_as(
        &mut self,
        va: u64,
        len: usize,
        access: Access,
        cpl: crate::state::Cpl,
        mut f: impl FnMut(u64, usize, usize),
    ) -> Result<(), GuestException> {
        let saved = std::mem::replace(&mut self.state.cpl, cpl);
        let r = self.each_page_inner(va, len, access, &mut f);
        self.state.cpl = saved;
        r
    }

    pub(super) fn each_page_inner(
        &mut self,
        va: u64,
        len: usize,
        access: Access,
        f: &mut dyn FnMut(u64, usize, usize),
    ) -> Result<(), GuestException> {
        let mut done = 0usize;
        while done < len {
            let addr = va.wrapping_add(done as u64);
            let chunk = ((PAGE - (addr & (PAGE - 1))) as usize).min(len - done);
            self.watch_hits |= self.guest_breakpoints.hits(addr, chunk as u64, access);
            let host = match self.strategy {
                MemoryStrategy::Identity => addr,
                MemoryStrategy::SoftMmu(ram) => {
                    let pa = soft_mmu::walk(ram, &self.state, addr, access)?;
                    let page = pa & !(PAGE - 1);
                    if access == Access::Write && self.written.last() != Some(&page) {
                        self.written.push(page);
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
    pub(super) fn check_alignment(&self, va: u64, len: usize) -> Result<(), GuestException> {
        canonical(va)?;
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
        self.read_elements(va, buf)
    }

    fn write(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        self.check_alignment(va, data.len())?;
        self.write_elements(va, data)
    }

    fn read_system(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return self.read(va, buf);
        }
        let len = buf.len();
        self.each_page_as(va, len, Access::Read, crate::state::Cpl::Kernel, |host, at, n| {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf[at..].as_mut_ptr(), n) }
        })
    }

    fn write_system(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return self.write(va, data);
        }
        self.write_soft(va, data, crate::state::Cpl::Kernel)
    }

    fn probe_write(&mut self, va: u64, len: usize) -> Result<(), GuestException> {
        if matches!(self.strategy, MemoryStrategy::Identity) {
            let mut buf = [0u8; 16];
            self.read(va, &mut buf[..len])?;
            return self.write(va, &buf[..len]);
        }
        self.check_alignment(va, len)?;
        self.each_page(va, len, Access::Write, |_, _, _| {})
    }

    // Soft-MMU string chunks run on guest RAM in place: one page walk per range and one
    // host memmove/memset, instead of a copy through a buffer (a Linux boot clears ≈1 GB of
    // pages with `rep stosq`).
    fn copy(&mut self, dst: u64, src: u64, len: usize) -> Result<(), GuestException> {
        canonical(src)?;
        canonical(dst)?;
        if let (Some(from), Some(to)) = (
            self.page_span(src, len, Access::Read)?,
            self.page_span(dst, len, Access::Write)?,
        ) {
            // SAFETY: both ranges lie in guest RAM (checked by the walks); `copy` has memmove
            // semantics for the overlap the caller allows.
            unsafe { std::ptr::copy(from as *const u8, to as *mut u8, len) };
            return Ok(());
        }
        let mut buf = [0u8; 4096];
        let buf = &mut buf[..len];
        self.read_elements(src, buf)?;
        self.write_elements(dst, buf)
    }

    fn fill(&mut self, dst: u64, len: usize, element: &[u8]) -> Result<(), GuestException> {
        canonical(dst)?;
        if let Some(to) = self.page_span(dst, len, Access::Write)? {
            // SAFETY: the range lies in guest RAM (checked by the walk).
            let bytes = unsafe { std::slice::from_raw_parts_mut(to as *mut u8, len) };
            if element.iter().all(|&b| b == element[0]) {
                bytes.fill(element[0]);
            } else {
                for e in bytes.chunks_exact_mut(element.len()) {
                    e.copy_from_slice(element);
                }
            }
            return Ok(());
        }
        let mut buf = [0u8; 4096];
        let buf = &mut buf[..len];
        for e in buf.chunks_exact_mut(element.len()) {
            e.copy_from_slice(element);
        }
        self.write_elements(dst, buf)
    }
}

/// #GP(0) for a non-canonical address.
fn canonical(va: u64) -> Result<(), GuestException> {
    if mmu::is_canonical(va) {
        Ok(())
    } else {
        Err(GuestException::gp(0))
    }
}

impl Memory<'_> {
    /// Reads `buf.len()` bytes at `va` with no alignment check: one access, or a run of string
    /// elements whose alignment the caller checked (`copy`/`fill` chunks hold many).
    fn read_elements(&mut self, va: u64, buf: &mut [u8]) -> Result<(), GuestException> {
        canonical(va)?;
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return mmu::read_host_checked(va, buf).ok_or(GuestException::page_fault(va, 4));
        }
        let len = buf.len();
        self.each_page(va, len, Access::Read, |host, at, n| {
            // SAFETY: host..host+n lies in guest RAM (checked by the walk and `host`).
            unsafe { std::ptr::copy_nonoverlapping(host as *const u8, buf[at..].as_mut_ptr(), n) }
        })
    }

    /// The write counterpart of [`Memory::read_elements`].
    fn write_elements(&mut self, va: u64, data: &[u8]) -> Result<(), GuestException> {
        canonical(va)?;
        if matches!(self.strategy, MemoryStrategy::Identity) {
            return mmu::write_host_checked(va, data)
                .then_some(())
                .ok_or(GuestException::page_fault(va, 6));
        }
        let cpl = self.state.cpl;
        self.write_soft(va, data, cpl)
    }

    /// Soft-MMU: the host address of `len` bytes at `va` when they lie in one page of guest
    /// RAM (walked for `access`, a written page recorded); None under the identity strategy
    /// or when the range spans pages. Faults as the access would.
    fn page_span(&mut self, va: u64, len: usize, access: Access) -> Result<Option<u64>, GuestException> {
        if matches!(self.strategy, MemoryStrategy::Identity) || len == 0 {
            return Ok(None);
        }
        let mut span = None;
        self.each_page(va, len, access, |host, at, n| {
            if at == 0 && n == len {
                span = Some(host);
            }
        })?;
        Ok(span)
    }

    /// A soft-MMU write at privilege `cpl`: every page checked first, so a faulting write
    /// leaves memory untouched.
    pub(super) fn write_soft(&mut self, va: u64, data: &[u8], cpl: crate::state::Cpl) -> Result<(), GuestException> {
        self.each_page_as(va, data.len(), Access::Write, cpl, |_, _, _| {})?;
        self.each_page_as(va, data.len(), Access::Write, cpl, |host, at, n| {
            // SAFETY: as in `read`.
            unsafe { std::ptr::copy_nonoverlapping(data[at..].as_ptr(), host as *mut u8, n) }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulate::GuestMemory;
    use crate::mmu::soft_mmu::{GuestRam, P, RW, US};
    use crate::state::{flags, Cpl, Paging};

    /// 64 KiB of guest RAM (page-aligned, as `GuestRam` requires): PML4 at 0x1000, PDPT at
    /// 0x2000, PD at 0x3000, PT at 0x4000 mapping 0x8000–0xffff to itself, user-writable.
    #[repr(C, align(4096))]
    struct Ram([u64; 8192]);

    #[test]
    fn string_chunks_are_not_alignment_checked_as_one_access() {
        let mut ram = Box::new(Ram([0; 8192]));
        for (table, next) in [(0x1000, 0x2000), (0x2000, 0x3000), (0x3000, 0x4000)] {
            ram.0[table / 8] = next | P | RW | US;
        }
        for page in 8..16u64 {
            ram.0[0x4000 / 8 + page as usize] = (page << 12) | P | RW | US;
        }
        // SAFETY: the array is page-aligned and outlives `strategy`, dropped at the end of the
        // test; nothing else touches it meanwhile.
        let strategy = MemoryStrategy::SoftMmu(unsafe { GuestRam::new(ram.0.as_mut_ptr() as *mut u8, 64 << 10) });
        let mut written = Vec::new();
        // CPL3 with CR0.AM and RFLAGS.AC: alignment checking on.
        let state = Paging {
            cr0: 1 << 18,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
            rflags: flags::AC | flags::FIXED,
            cpl: Cpl::User,
        };
        let mut mem = Memory {
            strategy: &strategy,
            state,
            written: &mut written,
            alignment_checks: true,
            guest_breakpoints: &Default::default(),
            watch_hits: 0,
        };
        // A chunk of 8 byte elements (`rep movsb`/`rep stosb` with AC set: no element can be
        // misaligned) at odd addresses, in one page and across two.
        mem.copy(0x9001, 0x8003, 8).unwrap();
        mem.copy(0x9ffd, 0x8003, 8).unwrap();
        mem.fill(0xa003, 8, &[0x5a]).unwrap();
        mem.fill(0xaffd, 8, &[0x5a]).unwrap();
        // One misaligned 4-byte access still raises #AC.
        let mut word = [0u8; 4];
        assert_eq!(mem.read(0x9001, &mut word).unwrap_err().vector, crate::exit::vector::AC);
        assert_eq!(mem.write(0x9001, &word).unwrap_err().vector, crate::exit::vector::AC);
        // Non-canonical addresses are #GP(0) either way.
        assert_eq!(mem.fill(1 << 63, 8, &[0]).unwrap_err(), GuestException::gp(0));
    }
}

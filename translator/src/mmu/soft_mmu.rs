//! The soft-MMU slow path: guest physical memory and the 4-level page walk.
//!
//! The fast path is inline in translated code (`emit/memop.rs`): a direct-mapped TLB per access
//! kind keyed by guest page number, holding `host − guest` for the page. This file fills it.

use super::{is_canonical, Access};
use crate::exit::GuestException;
use crate::state::{Cpl, Paging};

/// Guest physical memory `[0, size)`, backed by host memory at `base`; optionally with a hole
/// `[hole, hole_end)` (a PC's MMIO window below 4 GiB): RAM from `hole` on is backed by the host
/// bytes after the first `hole` and appears at `hole_end` and above.
pub struct GuestRam {
    base: *mut u8,
    size: u64,
    hole: Option<(u64, u64)>,
}

// SAFETY: GuestRam is a view of memory the creator guarantees to outlive it; moving it to
// another thread moves that guarantee with it.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// # Safety
    /// `base..base+size` must stay mapped, readable and writable for the life of the value, and
    /// nothing else may assume its contents stay unchanged (the guest writes it).
    ///
    /// # Panics
    /// If `base` is not page-aligned: host addresses must keep the guest's alignment, or
    /// alignment faults (`movaps`, `#AC`) would differ from the CPU's.
    pub unsafe fn new(base: *mut u8, size: u64) -> Self {
        assert_eq!(base as usize % 4096, 0, "guest RAM must be page-aligned in host memory");
        GuestRam { base, size, hole: None }
    }

    /// Like [`GuestRam::new`], with the guest-physical hole `[hole, hole_end)` (see the type).
    ///
    /// # Safety
    /// As for [`GuestRam::new`].
    pub unsafe fn with_hole(base: *mut u8, size: u64, hole: u64, hole_end: u64) -> Self {
        // SAFETY: the caller's guarantee, passed on.
        let mut ram = unsafe { GuestRam::new(base, size) };
        assert!(hole <= hole_end && hole.is_multiple_of(4096) && hole_end.is_multiple_of(4096));
        ram.hole = Some((hole, hole_end));
        ram
    }

    /// Host address of guest physical `pa..pa+len`, if it lies in RAM (not across the hole).
    pub fn host(&self, pa: u64, len: u64) -> Option<u64> {
        let end = pa.checked_add(len)?;
        let offset = match self.hole {
            Some((hole, _)) if end <= hole => pa,
            Some((hole, hole_end)) if pa >= hole_end => pa - hole_end + hole,
            Some(_) => return None,
            None => pa,
        };
        (offset + len <= self.size).then(|| self.base as u64 + offset)
    }

    /// Copies `bytes` to guest physical `pa` (a device or hbt itself writing guest RAM; the
    /// caller tells the translator, which may hold code from the range). False, and nothing
    /// written, when the range is not all RAM.
    pub fn write(&self, pa: u64, bytes: &[u8]) -> bool {
        let Some(h) = self.host(pa, bytes.len() as u64) else {
            return false;
        };
        // SAFETY: `h..h+len` lies inside the mapping (checked by host()), which the creator
        // keeps mapped and writable; the guest holds no Rust references into it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), h as *mut u8, bytes.len()) };
        true
    }

    /// The 8 bytes at guest-physical `pa`, if they lie in RAM.
    pub fn read_u64(&self, pa: u64) -> Option<u64> {
        let h = self.host(pa, 8)?;
        // SAFETY: in range (checked by host()); page-table entries are 8-byte aligned in
        // guest memory but read unaligned to be safe against hostile CR3 values.
        Some(unsafe { std::ptr::read_unaligned(h as *const u64) })
    }

    /// Writes 8 bytes at guest-physical `pa` (dropped unless they lie in RAM).
    pub fn write_u64(&self, pa: u64, v: u64) {
        if let Some(h) = self.host(pa, 8) {
            // SAFETY: in range, see read_u64.
            unsafe { std::ptr::write_unaligned(h as *mut u64, v) };
        }
    }
}

/// Page-table entry bits (also used by the VMM to build its boot page tables).
pub const P: u64 = 1 << 0;
pub const RW: u64 = 1 << 1;
pub const US: u64 = 1 << 2;
pub const A: u64 = 1 << 5;
pub const D: u64 = 1 << 6;
pub const PS: u64 = 1 << 7;
pub const NX: u64 = 1 << 63;
pub const ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The page-fault error code bit for a reserved bit set in a paging-structure entry.
const RSVD: u32 = 1 << 3;

/// The global bit of a leaf entry (meaningful with CR4.PGE).
const G: u64 = 1 << 8;

/// Walks the guest page tables for `va`. Returns the guest physical address of `va`, having set
/// accessed (and, for writes, dirty) bits as the CPU does; or the exception the CPU would raise.
pub fn walk(ram: &GuestRam, state: &Paging, va: u64, access: Access) -> Result<u64, GuestException> {
    walk_leaf(ram, state, va, access).map(|(pa, _)| pa)
}

/// [`walk`], also telling whether the translation is global (the leaf's G bit with CR4.PGE
/// set): a CR3 write leaves such translations in the TLB.
pub fn walk_leaf(ram: &GuestRam, state: &Paging, va: u64, access: Access) -> Result<(u64, bool), GuestException> {
    if !is_canonical(va) {
        return Err(GuestException::gp(0));
    }
    let user = state.cpl == Cpl::User;
    let wp = state.cr0 & (1 << 16) != 0;
    let nxe = state.efer & (1 << 11) != 0;
    // `rsvd`: a reserved bit was set in an entry (which implies present).
    let fault = |present: bool, rsvd: bool| {
        let mut ec = present as u32;
        if rsvd {
            ec |= RSVD;
        }
        if access == Access::Write {
            ec |= 2;
        }
        if user {
            ec |= 4;
        }
        if access == Access::Fetch && nxe {
            ec |= 16;
        }
        GuestException::page_fault(va, ec)
    };
    let mut table = state.cr3 & ADDR;
    let mut writable = true;
    let mut user_ok = true;
    let mut exec_ok = true;
    for level in (0..4).rev() {
        let index = (va >> (12 + 9 * level)) & 511;
        let entry_pa = table + index * 8;
        let entry = ram.read_u64(entry_pa).ok_or_else(|| fault(false, false))?;
        if entry & P == 0 {
            return Err(fault(false, false));
        }
        writable &= entry & RW != 0;
        user_ok &= entry & US != 0;
        exec_ok &= !(nxe && entry & NX != 0);
        if level == 2 && entry & PS != 0 {
            // 1 GiB pages are not offered (`pdpe1gb` is hidden from the guest's CPUID), so PS
            // in a PDPTE is a reserved bit: #PF with P and RSVD set, nothing marked accessed.
            return Err(fault(true, true));
        }
        let leaf = level == 0 || (level == 1 && entry & PS != 0);
        if leaf {
            let denied = (user && !user_ok)
                || (access == Access::Write && !writable && (user || wp))
                || (access == Access::Fetch && !exec_ok);
            if denied {
                return Err(fault(true, false));
            }
            let mut new = entry | A;
            if access == Access::Write {
                new |= D;
            }
            if new != entry {
                ram.write_u64(entry_pa, new);
            }
            let page_size = 1u64 << (12 + 9 * level);
            let frame = entry & ADDR & !(page_size - 1);
            let global = entry & G != 0 && state.cr4 & (1 << 7) != 0;
            return Ok((frame | (va & (page_size - 1)), global));
        }
        if entry & A == 0 {
            ram.write_u64(entry_pa, entry | A);
        }
        table = entry & ADDR;
    }
    unreachable!("the loop returns at level 0")
}

/// [`walk_leaf`] without side effects: the translation of `va` for `access` only if the CPU
/// would set no accessed or dirty bit walking it now (every entry on the way accessed, the
/// leaf dirty for a write) — what may be entered in the TLB ahead of any access. `None` when
/// it is not mapped so, not permitted or not canonical.
pub fn walk_settled(ram: &GuestRam, state: &Paging, va: u64, access: Access) -> Option<(u64, bool)> {
    if !is_canonical(va) {
        return None;
    }
    let user = state.cpl == Cpl::User;
    let wp = state.cr0 & (1 << 16) != 0;
    let nxe = state.efer & (1 << 11) != 0;
    let (mut writable, mut user_ok, mut exec_ok) = (true, true, true);
    let mut table = state.cr3 & ADDR;
    for level in (0..4).rev() {
        let entry = ram.read_u64(table + ((va >> (12 + 9 * level)) & 511) * 8)?;
        if entry & (P | A) != (P | A) || (level == 2 && entry & PS != 0) {
            return None;
        }
        writable &= entry & RW != 0;
        user_ok &= entry & US != 0;
        exec_ok &= !(nxe && entry & NX != 0);
        if level == 0 || (level == 1 && entry & PS != 0) {
            let denied = (user && !user_ok)
                || (access == Access::Write && (!writable && (user || wp) || entry & D == 0))
                || (access == Access::Fetch && !exec_ok);
            if denied {
                return None;
            }
            let page_size = 1u64 << (12 + 9 * level);
            let frame = entry & ADDR & !(page_size - 1);
            let global = entry & G != 0 && state.cr4 & (1 << 7) != 0;
            return Some((frame | (va & (page_size - 1)), global));
        }
        table = entry & ADDR;
    }
    None
}

/// Translates `va` for a debugger: the guest-physical address it maps to in the current page
/// tables, without the side effects or checks of a guest access — no accessed or dirty bit is
/// set, and U/S, R/W and NX are ignored (a debugger reads kernel memory while the guest is at
/// CPL3 and writes read-only kernel text, as with QEMU's gdb stub). `None` when `va` is not
/// canonical or not mapped.
pub fn translate_for_debugger(ram: &GuestRam, state: &Paging, va: u64) -> Option<u64> {
    peek(ram, state, va).map(|(pa, _)| pa)
}

/// Whether `va` is mapped by a 2 MiB page in the current tables (no side effects; `false` when
/// not mapped).
pub fn is_large_page(ram: &GuestRam, state: &Paging, va: u64) -> bool {
    peek(ram, state, va).is_some_and(|(_, size)| size > 4096)
}

/// The walk without side effects or permission checks: `va`'s guest-physical address and the
/// size of the page mapping it.
fn peek(ram: &GuestRam, state: &Paging, va: u64) -> Option<(u64, u64)> {
    if !is_canonical(va) {
        return None;
    }
    let mut table = state.cr3 & ADDR;
    for level in (0..4).rev() {
        let entry = ram.read_u64(table + ((va >> (12 + 9 * level)) & 511) * 8)?;
        if entry & P == 0 || (level == 2 && entry & PS != 0) {
            return None;
        }
        if level == 0 || (level == 1 && entry & PS != 0) {
            let page_size = 1u64 << (12 + 9 * level);
            return Some(((entry & ADDR & !(page_size - 1)) | (va & (page_size - 1)), page_size));
        }
        table = entry & ADDR;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest RAM of 64 KiB (page-aligned, as `GuestRam` requires) with the PML4 at 0x1000
    /// pointing to a PDPT at 0x2000; tests fill in the rest.
    #[repr(C, align(4096))]
    struct Tables([u64; 8192]);

    impl Tables {
        fn new() -> Box<Self> {
            let mut t = Box::new(Tables([0; 8192]));
            t.set(0x1000, 0x2000 | P | RW | US);
            t
        }
        fn set(&mut self, pa: u64, v: u64) {
            self.0[(pa / 8) as usize] = v;
        }
        fn get(&self, pa: u64) -> u64 {
            self.0[(pa / 8) as usize]
        }
        fn walk(&mut self, va: u64, access: Access, cpl: Cpl) -> Result<u64, GuestException> {
            // SAFETY: the 64 KiB array is page-aligned and outlives `ram`, which is dropped at
            // the end of this call; nothing else touches the array meanwhile.
            let ram = unsafe { GuestRam::new(self.0.as_mut_ptr() as *mut u8, 64 << 10) };
            let paging = Paging {
                cr0: 1 << 16, // WP
                cr3: 0x1000,
                cr4: 0,
                efer: 1 << 11, // NXE
                rflags: 2,
                cpl,
            };
            walk(&ram, &paging, va, access)
        }
    }

    #[test]
    fn a_1gib_page_is_a_reserved_bit_fault() {
        let mut t = Tables::new();
        t.set(0x2000, P | RW | US | PS);
        let e = t.walk(0x1234, Access::Write, Cpl::User).unwrap_err();
        assert_eq!(e, GuestException::page_fault(0x1234, 1 | 2 | 4 | RSVD));
        assert_eq!(t.get(0x2000) & A, 0, "a faulting walk marks nothing accessed");
    }

    #[test]
    fn two_mib_and_4kib_pages_translate_and_set_accessed_and_dirty() {
        let mut t = Tables::new();
        t.set(0x2000, 0x3000 | P | RW | US);
        t.set(0x3000, 0x20_0000 | P | RW | US | PS); // va [0, 2M) -> pa [2M, 4M)
        t.set(0x3008, 0x4000 | P | RW | US); // va [2M, 4M) -> PT
        t.set(0x4008, 0x9000 | P | US); // va 2M+4K -> pa 0x9000, read-only
        assert_eq!(t.walk(0x1_2345, Access::Write, Cpl::User), Ok(0x21_2345));
        assert_eq!(t.get(0x3000) & (A | D), A | D);
        assert_eq!(t.walk(0x20_1010, Access::Read, Cpl::User), Ok(0x9010));
        assert_eq!(t.get(0x4008) & (A | D), A);
        // Read-only: a write faults at CPL3 and, with CR0.WP, at CPL0 too.
        for cpl in [Cpl::User, Cpl::Kernel] {
            let ec = 1 | 2 | if cpl == Cpl::User { 4 } else { 0 };
            assert_eq!(
                t.walk(0x20_1010, Access::Write, cpl),
                Err(GuestException::page_fault(0x20_1010, ec))
            );
        }
    }

    #[test]
    fn the_debugger_translation_sets_no_bits_and_ignores_permissions() {
        let mut t = Tables::new();
        t.set(0x2000, 0x3000 | P | RW | US);
        t.set(0x3000, 0x4000 | P); // supervisor-only, read-only PT
        t.set(0x4008, 0x9000 | P | NX); // va 0x1000 -> pa 0x9000
        let paging = Paging {
            cr0: 1 << 16,
            cr3: 0x1000,
            cr4: 0,
            efer: 1 << 11,
            rflags: 2,
            cpl: Cpl::User,
        };
        {
            let ram = unsafe_ram(&mut t);
            assert_eq!(translate_for_debugger(&ram, &paging, 0x1234), Some(0x9234));
            assert_eq!(translate_for_debugger(&ram, &paging, 0x2000), None, "not present");
            assert_eq!(translate_for_debugger(&ram, &paging, 1 << 47), None, "not canonical");
        }
        assert_eq!(t.get(0x1000) & A, 0, "nothing marked accessed");
        assert_eq!(t.get(0x4008) & A, 0);
    }

    /// A `GuestRam` over the tables (the caller lets it go before touching them again).
    fn unsafe_ram(t: &mut Tables) -> GuestRam {
        // SAFETY: the 64 KiB array is page-aligned and outlives the returned view, which the
        // caller lets go before using the array again.
        unsafe { GuestRam::new(t.0.as_mut_ptr() as *mut u8, 64 << 10) }
    }

    #[test]
    fn a_settled_walk_translates_only_what_needs_no_accessed_or_dirty_bit() {
        let mut t = Tables::new();
        t.set(0x1000, 0x2000 | P | RW | US | A);
        t.set(0x2000, 0x3000 | P | RW | US | A);
        t.set(0x3000, 0x4000 | P | RW | US | A);
        t.set(0x4000, 0x9000 | P | RW | US | A); // va 0: accessed, clean
        t.set(0x4008, 0xa000 | P | RW | US | A | D); // va 0x1000: dirty
        t.set(0x4010, 0xb000 | P | RW | US); // va 0x2000: never accessed
        t.set(0x4018, 0xc000 | P | US | A | D); // va 0x3000: read-only
        let paging = Paging {
            cr0: 1 << 16,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
            rflags: 2,
            cpl: Cpl::User,
        };
        let before = t.0.to_vec();
        {
            let ram = unsafe_ram(&mut t);
            let settled = |va, access| walk_settled(&ram, &paging, va, access).map(|(pa, _)| pa);
            assert_eq!(settled(0x10, Access::Read), Some(0x9010));
            assert_eq!(settled(0x10, Access::Write), None, "a write would set D");
            assert_eq!(settled(0x1010, Access::Write), Some(0xa010));
            assert_eq!(settled(0x2010, Access::Read), None, "a read would set A");
            assert_eq!(settled(0x3010, Access::Write), None, "read-only");
            assert_eq!(settled(0x3010, Access::Read), Some(0xc010));
        }
        assert_eq!(t.0.to_vec(), before, "nothing written");
        // An intermediate entry not accessed: nothing translates through it.
        t.set(0x2000, 0x3000 | P | RW | US);
        let ram = unsafe_ram(&mut t);
        assert_eq!(walk_settled(&ram, &paging, 0x1010, Access::Read), None);
    }

    #[test]
    fn a_supervisor_page_faults_from_cpl3_with_error_code_5() {
        let mut t = Tables::new();
        t.set(0x2000, 0x3000 | P | RW | US);
        t.set(0x3000, 0x20_0000 | P | RW | PS); // supervisor-only 2 MiB page
        assert_eq!(t.walk(0x100, Access::Read, Cpl::Kernel), Ok(0x20_0100));
        assert_eq!(
            t.walk(0x100, Access::Read, Cpl::User),
            Err(GuestException::page_fault(0x100, 5))
        );
    }
}

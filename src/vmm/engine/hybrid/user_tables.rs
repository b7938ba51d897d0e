//! The page tables KVM runs guest user code on, and how they stay coherent with the guest's.
//!
//! KVM (kvm_pvm: shadow paging) does not see page-table writes made through hbt's mapping of
//! guest RAM — and the translated guest kernel makes all of its writes that way. Measured with a
//! probe on an Intel Xeon (SPR) host: KVM sees an entry go from not-present to present, or from
//! read-only to writable, made in place (the access faults into KVM, which walks the tables
//! again); it does *not* see an entry removed, made read-only or re-pointed (its shadow still
//! allows the access, so it never looks); a table frame it has shadowed before keeps its old
//! shadow even when reused with new contents, until the memory slot holding it is deleted and
//! re-added.
//!
//! So KVM never runs on the guest's own tables. hbt copies the user half of the guest's
//! address space into tables of its own, in frames of the hbt region (`host_region.rs`), and:
//! - **changes them in place only to widen access**: a user fault KVM reports whose access the
//!   guest's tables allow (the guest mapped a page, or a write set a page's dirty bit) fills
//!   the missing entries or sets the write bit in place ([`UserTables::widen`]);
//! - **narrows by starting over**: whenever the guest invalidated translations (a CR3 write,
//!   INVLPG, INVPCID: the translator's invalidation generation moved) or switched to another
//!   address space, the next entry to user mode builds a new tree in frames no tree used since
//!   the pool last wrapped ([`UserTables::root_for`]) — an OS must invalidate after narrowing
//!   a mapping, so the guest cannot see the difference between this and a CPU's TLB;
//! - **recycles frames only after a slot reset**: when the pool runs out, the region's memory
//!   slot is deleted and re-added (KVM drops every shadow) and allocation starts over.
//!
//! What is copied: user-accessible entries of the lower half (PML4 slots 0–255; Linux maps
//! nothing user-accessible above), leaves whose frame lies in guest RAM (anything else stays
//! not-present, so the access faults out and the translator performs it against the device
//! bus). A leaf is writable here only if the guest's is writable *and dirty* (a write to a
//! clean page faults out once and sets its dirty bit, as the CPU would), and never if the page
//! holds code the translator has translated (a write faults out and drops those translations
//! first: self-modifying code across engines). Accessed bits are set in the guest's entries as
//! they are copied (the SDM lets a CPU set them for entries it merely caches).

use hbt_translator::mmu::soft_mmu::{GuestRam, A, ADDR, D, NX, P, PS, RW, US};

/// What a copied non-leaf entry keeps of the guest's (present, write, user, PWT, PCD, accessed, NX).
const TABLE_BITS: u64 = P | RW | US | (1 << 3) | (1 << 4) | A | NX;
/// What a copied leaf keeps (as above, plus PAT (bit 7 in a PTE, bit 12 in a 2 MiB entry); the
/// global bit is dropped: user pages here are never global).
const LEAF_BITS: u64 = P | US | (1 << 3) | (1 << 4) | A | NX;
const PAGE: u64 = 4096;
const ENTRIES: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum TablesError {
    /// The pool has no frame left for this tree (the caller resets the slot and builds again).
    #[error("the hbt region's page-table pool is exhausted")]
    Exhausted,
}

/// Where the tree's frames come from: a range of the hbt region, by guest-physical address.
pub struct FramePool {
    /// Host address of the region's first byte, and its guest-physical address.
    host: u64,
    gpa: u64,
    first: u64,
    end: u64,
    next: u64,
}

impl FramePool {
    /// Frames `[first, end)` of a region mapped at `host` (guest-physical `gpa`); offsets are
    /// relative to the region's start.
    ///
    /// # Safety
    /// `host..host+end` must stay mapped and writable for the pool's life, and be used by
    /// nothing else (KVM reads it as guest memory, which is the point).
    pub unsafe fn new(host: u64, gpa: u64, first: u64, end: u64) -> Self {
        FramePool {
            host,
            gpa,
            first,
            end,
            next: first,
        }
    }

    fn alloc(&mut self) -> Result<u64, TablesError> {
        if self.next + PAGE > self.end {
            return Err(TablesError::Exhausted);
        }
        let gpa = self.gpa + self.next;
        self.next += PAGE;
        self.table(gpa).fill(0);
        Ok(gpa)
    }

    /// Starts over from the first frame (only after the slot was reset).
    fn recycle(&mut self) {
        self.next = self.first;
    }

    fn table(&mut self, gpa: u64) -> &mut [u64] {
        debug_assert!(gpa >= self.gpa + self.first && gpa + PAGE <= self.gpa + self.end);
        // SAFETY: `gpa` is a frame of the pool (checked by callers' construction: only
        // addresses `alloc` returned are passed here), inside the mapping `new` was given,
        // page-aligned, and no other reference to it is live.
        unsafe { std::slice::from_raw_parts_mut((self.host + gpa - self.gpa) as *mut u64, ENTRIES as usize) }
    }

    /// Frames in use.
    pub fn used(&self) -> u64 {
        (self.next - self.first) / PAGE
    }
}

/// What the tree was built from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Source {
    guest_cr3: u64,
    generation: u64,
}

/// Counters for `--stats`.
#[derive(Default, Clone, Copy)]
pub struct TableStats {
    pub builds: u64,
    pub widened: u64,
    pub slot_resets: u64,
}

/// The tree KVM runs user code on (see the module comment).
pub struct UserTables {
    pool: FramePool,
    /// Root and source of the current tree.
    current: Option<(u64, Source)>,
    /// Guest frames the current tree maps writable (a page that gains translated code must not
    /// stay among them).
    writable: std::collections::HashSet<u64>,
    /// The region's own mapping, installed in every root's PML4 slot `hbt_slot`.
    hbt_slot: usize,
    hbt_entry: u64,
    pub stats: TableStats,
}

/// Whether a guest page holds translated code (a write to it must fault out).
pub trait CodePages {
    fn has_code(&self, page: u64) -> bool;
}

impl UserTables {
    pub fn new(pool: FramePool, hbt_slot: usize, hbt_entry: u64) -> Self {
        UserTables {
            pool,
            current: None,
            writable: Default::default(),
            hbt_slot,
            hbt_entry,
            stats: TableStats::default(),
        }
    }

    /// The root for guest CR3 `guest_cr3` at invalidation generation `generation`: the current
    /// tree if it was built from the same, a new one otherwise. `Err(Exhausted)` asks the
    /// caller to reset the region's slot, call [`UserTables::after_slot_reset`] and ask again.
    pub fn root_for(
        &mut self,
        ram: &GuestRam,
        guest_cr3: u64,
        generation: u64,
        code: &dyn CodePages,
    ) -> Result<u64, TablesError> {
        let source = Source { guest_cr3, generation };
        if let Some((root, s)) = self.current {
            if s == source {
                return Ok(root);
            }
        }
        self.current = None;
        self.writable.clear();
        let root = self.pool.alloc()?;
        let guest_root = guest_cr3 & ADDR;
        for i in 0..256 {
            let Some(e) = read_entry(ram, guest_root, i) else { break };
            if let Some(copy) = self.copy_entry(ram, guest_root, i, e, 4, code)? {
                self.pool.table(root)[i as usize] = copy;
            }
        }
        self.pool.table(root)[self.hbt_slot] = self.hbt_entry;
        self.current = Some((root, source));
        self.stats.builds += 1;
        Ok(root)
    }

    /// Forgets the tree and recycles the pool: the caller deleted and re-added the slot.
    pub fn after_slot_reset(&mut self) {
        self.current = None;
        self.writable.clear();
        self.pool.recycle();
        self.stats.slot_resets += 1;
    }

    /// Drops the tree: the next root is built anew.
    pub fn forget(&mut self) {
        self.current = None;
        self.writable.clear();
    }

    /// Drops the tree if it maps any of `pages` writable (they gained translated code).
    pub fn code_appeared(&mut self, pages: &[u64]) {
        if pages.iter().any(|p| self.writable.contains(&(p & ADDR))) {
            self.forget();
        }
    }

    /// A user access to `va` faulted under KVM but the guest's tables allow it: makes the tree
    /// allow it too, in place (filling entries that were not present, or setting the write bit
    /// of a leaf whose guest entry is now dirty). `Ok(false)` when that is not a widening (the
    /// guest re-pointed the page without invalidating, which an OS does not do): the caller
    /// builds a new tree.
    pub fn widen(&mut self, ram: &GuestRam, va: u64, code: &dyn CodePages) -> Result<bool, TablesError> {
        let Some((root, source)) = self.current else {
            return Ok(false);
        };
        let mut ours = root;
        let mut theirs = source.guest_cr3 & ADDR;
        for level in (1..=4u32).rev() {
            let i = (va >> (12 + 9 * (level - 1))) & 511;
            let Some(g) = read_entry(ram, theirs, i) else {
                return Ok(false);
            };
            let e = self.pool.table(ours)[i as usize];
            if e & P == 0 {
                let Some(copy) = self.copy_entry(ram, theirs, i, g, level, code)? else {
                    return Ok(false);
                };
                self.pool.table(ours)[i as usize] = copy;
                self.stats.widened += 1;
                return Ok(true);
            }
            if level == 2 && g & PS != 0 {
                // A 2 MiB guest page, split into 4 KiB entries here.
                let j = (va >> 12) & 511;
                let Some(want) = self.small_leaf(g, j, code) else {
                    return Ok(false);
                };
                return Ok(self.widen_leaf(e & ADDR, j, want));
            }
            if level == 1 {
                let Some(want) = self.leaf(ram, theirs, i, g, code) else {
                    return Ok(false);
                };
                return Ok(self.widen_leaf(ours, i, want));
            }
            ours = e & ADDR;
            theirs = g & ADDR;
        }
        Ok(false)
    }

    /// Replaces leaf `i` of our table `table` with `want` if that only adds the write right.
    fn widen_leaf(&mut self, table: u64, i: u64, want: u64) -> bool {
        let e = self.pool.table(table)[i as usize];
        let widening = e & P != 0 && want != e && want & !RW & !D == e & !RW & !D;
        if widening {
            self.pool.table(table)[i as usize] = want;
            self.stats.widened += 1;
        }
        widening
    }

    /// The copy of guest entry `e` (slot `i` of the guest table at `table`) at `level` (4 =
    /// PML4), building the tables below it; `None` when it stays not-present. 2 MiB guest
    /// pages become a table of 4 KiB entries, so a page holding translated code is read-only
    /// on its own.
    fn copy_entry(
        &mut self,
        ram: &GuestRam,
        table: u64,
        i: u64,
        e: u64,
        level: u32,
        code: &dyn CodePages,
    ) -> Result<Option<u64>, TablesError> {
        if e & P == 0 || e & US == 0 {
            return Ok(None);
        }
        if level == 3 && e & PS != 0 {
            // 1 GiB pages: the CPU model does not offer them (a reserved bit, which the
            // translator reports).
            return Ok(None);
        }
        if level == 1 {
            return Ok(self.leaf(ram, table, i, e, code));
        }
        if level == 2 && e & PS != 0 {
            let frame = e & ADDR & !(ENTRIES * PAGE - 1);
            if ram.host(frame, ENTRIES * PAGE).is_none() {
                return Ok(None);
            }
            set_accessed(ram, table, i, e);
            let split = self.pool.alloc()?;
            for j in 0..ENTRIES {
                if let Some(leaf) = self.small_leaf(e, j, code) {
                    self.pool.table(split)[j as usize] = leaf;
                }
            }
            return Ok(Some((e & TABLE_BITS & !NX) | A | RW | split));
        }
        let child_guest = e & ADDR;
        if ram.host(child_guest, PAGE).is_none() {
            return Ok(None);
        }
        set_accessed(ram, table, i, e);
        let child = self.pool.alloc()?;
        for j in 0..ENTRIES {
            let Some(ce) = read_entry(ram, child_guest, j) else {
                break;
            };
            if let Some(copy) = self.copy_entry(ram, child_guest, j, ce, level - 1, code)? {
                self.pool.table(child)[j as usize] = copy;
            }
        }
        Ok(Some((e & TABLE_BITS) | A | child))
    }

    /// Our copy of the 4 KiB guest leaf `e` (slot `i` of the guest table at `table`), setting
    /// its accessed bit.
    fn leaf(&mut self, ram: &GuestRam, table: u64, i: u64, e: u64, code: &dyn CodePages) -> Option<u64> {
        if e & P == 0 || e & US == 0 {
            return None;
        }
        let frame = e & ADDR;
        ram.host(frame, PAGE)?;
        set_accessed(ram, table, i, e);
        // PAT is bit 7 in a 4 KiB entry.
        Some(self.mapped(frame, (e & (LEAF_BITS | PS)) | A, e, code))
    }

    /// Our 4 KiB entry for page `j` of the 2 MiB guest leaf `e` (its accessed bit is set when
    /// the split table is built).
    fn small_leaf(&mut self, e: u64, j: u64, code: &dyn CodePages) -> Option<u64> {
        if e & P == 0 || e & US == 0 {
            return None;
        }
        let frame = (e & ADDR & !(ENTRIES * PAGE - 1)) + j * PAGE;
        // PAT moves from bit 12 of a 2 MiB entry to bit 7 of a 4 KiB one.
        let pat = (e >> 12 & 1) << 7;
        Some(self.mapped(frame, (e & LEAF_BITS) | A | pat, e, code))
    }

    /// A leaf mapping `frame` with `bits`, writable when guest entry `e` is writable and dirty
    /// and the page holds no translated code.
    fn mapped(&mut self, frame: u64, bits: u64, e: u64, code: &dyn CodePages) -> u64 {
        let mut leaf = bits | frame;
        if e & RW != 0 && e & D != 0 && !code.has_code(frame) {
            leaf |= RW | D;
            self.writable.insert(frame);
        }
        leaf
    }

    pub fn frames_in_use(&self) -> u64 {
        self.pool.used()
    }
}

fn read_entry(ram: &GuestRam, table: u64, i: u64) -> Option<u64> {
    ram.read_u64(table + 8 * i)
}

fn set_accessed(ram: &GuestRam, table: u64, i: u64, e: u64) {
    if e & A == 0 {
        ram.write(table + 8 * i, &(e | A).to_le_bytes());
    }
}

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
//!   INVLPG, INVPCID: the translator's invalidation generation moved), the next entry to user
//!   mode checks the address space's tree against the guest's tables ([`UserTables::root_for`]):
//!   if every entry of the tree still grants no more than the guest's does now, the tree (and
//!   KVM's shadow of it) stays; otherwise a new tree is built in frames no tree used since the
//!   pool last wrapped — an OS must invalidate after narrowing a mapping, so the guest cannot
//!   see the difference between this and a CPU's TLB. Trees are kept per address space (the
//!   last [`KEPT_TREES`] used), so a process switch does not cost KVM a fresh shadow: measured
//!   on an Intel SPR host, `gzip | wc` under KVM paid ≈ 300 µs more per stretch while every
//!   switch between the two rebuilt the tree;
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
/// Trees kept for address spaces not running (least recently used dropped first).
pub const KEPT_TREES: usize = 32;

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

/// One address space's tree.
struct Tree {
    root: u64,
    /// The invalidation generation it was built or last checked at.
    generation: u64,
    /// Guest frames it maps writable (a page that gains translated code must not stay among
    /// them).
    writable: Writable,
    /// When it was last used (a counter), for dropping the least recently used.
    used: u64,
}

/// Counters for `--stats`.
#[derive(Default, Clone, Copy)]
pub struct TableStats {
    pub builds: u64,
    /// Trees checked against the guest's tables after an invalidation, and kept.
    pub kept: u64,
    /// Checks made (kept or not), and the time they took.
    pub checks: u64,
    pub check_time: std::time::Duration,
    pub widened: u64,
    pub slot_resets: u64,
}

/// The trees KVM runs user code on (see the module comment).
pub struct UserTables {
    pool: FramePool,
    /// Trees by guest CR3, and the one in use.
    trees: std::collections::HashMap<u64, Tree>,
    current: Option<u64>,
    uses: u64,
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
            trees: Default::default(),
            current: None,
            uses: 0,
            hbt_slot,
            hbt_entry,
            stats: TableStats::default(),
        }
    }

    /// The root for guest CR3 `guest_cr3` at invalidation generation `generation`: the
    /// address space's tree if it was built or checked at the same generation, or still grants
    /// nothing the guest's tables do not; a new one otherwise. `Err(Exhausted)` asks the caller
    /// to reset the region's slot, call [`UserTables::after_slot_reset`] and ask again.
    pub fn root_for(
        &mut self,
        ram: &GuestRam,
        guest_cr3: u64,
        generation: u64,
        code: &dyn CodePages,
    ) -> Result<u64, TablesError> {
        self.uses += 1;
        let guest_root = guest_cr3 & ADDR;
        if let Some(tree) = self.trees.get(&guest_cr3) {
            let (root, at) = (tree.root, tree.generation);
            let kept = at == generation || {
                let started = std::time::Instant::now();
                let granted = self.still_granted(ram, root, guest_root);
                self.stats.checks += 1;
                self.stats.check_time += started.elapsed();
                granted
            };
            if kept {
                if at != generation {
                    self.stats.kept += 1;
                }
                let tree = self.trees.get_mut(&guest_cr3).expect("looked up above");
                tree.generation = generation;
                tree.used = self.uses;
                self.current = Some(guest_cr3);
                return Ok(root);
            }
            self.trees.remove(&guest_cr3);
        }
        self.current = None;
        if self.trees.len() >= KEPT_TREES {
            let oldest = self.trees.iter().min_by_key(|(_, t)| t.used).map(|(&cr3, _)| cr3);
            if let Some(cr3) = oldest {
                self.trees.remove(&cr3);
            }
        }
        let root = self.pool.alloc()?;
        let mut writable = Writable::default();
        let mut leaves = Leaves {
            code,
            writable: &mut writable,
        };
        for i in 0..256 {
            let Some(e) = read_entry(ram, guest_root, i) else { break };
            if let Some(copy) = self.copy_entry(ram, guest_root, i, e, 4, &mut leaves)? {
                self.pool.table(root)[i as usize] = copy;
            }
        }
        self.pool.table(root)[self.hbt_slot] = self.hbt_entry;
        self.trees.insert(
            guest_cr3,
            Tree {
                root,
                generation,
                writable,
                used: self.uses,
            },
        );
        self.current = Some(guest_cr3);
        self.stats.builds += 1;
        Ok(root)
    }

    /// Whether every entry of our tree at `root` grants no more than the guest's tables at
    /// `guest_root` do now: the same frame, no write right the guest's entry (and dirty bit)
    /// withholds, no execute right its NX bit withholds, the same caching bits.
    fn still_granted(&mut self, ram: &GuestRam, root: u64, guest_root: u64) -> bool {
        self.granted_below(ram, root, GuestNode::Table(guest_root), 4)
    }

    fn granted_below(&mut self, ram: &GuestRam, ours: u64, theirs: GuestNode, level: u32) -> bool {
        let span = if level == 4 { 256 } else { ENTRIES as usize };
        for i in 0..span {
            let e = self.pool.table(ours)[i];
            if e & P == 0 {
                continue;
            }
            let g = match theirs {
                GuestNode::Table(table) => match read_entry(ram, table, i as u64) {
                    Some(g) => g,
                    None => return false,
                },
                // Our split of a 2 MiB guest page: its 4 KiB leaves.
                GuestNode::Big(g) => {
                    if small_leaf_bits(g, i as u64) != Some(e & !RW & !D) || (e & RW != 0 && g & (RW | D) != RW | D) {
                        return false;
                    }
                    continue;
                }
            };
            if g & P == 0 || g & US == 0 {
                return false;
            }
            if level == 2 && g & PS != 0 {
                // Our split of it: its leaves carry the rights.
                if !self.granted_below(ram, e & ADDR, GuestNode::Big(g), 1) {
                    return false;
                }
                continue;
            }
            if (e & RW != 0 && g & RW == 0) || (e & NX == 0 && g & NX != 0) {
                return false;
            }
            if level == 1 {
                if e & !RW & !D != leaf_bits(g) || (e & RW != 0 && g & D == 0) {
                    return false;
                }
                continue;
            }
            if !self.granted_below(ram, e & ADDR, GuestNode::Table(g & ADDR), level - 1) {
                return false;
            }
        }
        true
    }

    /// Forgets every tree and recycles the pool: the caller deleted and re-added the slot.
    pub fn after_slot_reset(&mut self) {
        self.trees.clear();
        self.current = None;
        self.pool.recycle();
        self.stats.slot_resets += 1;
    }

    /// Drops the current tree: the next root is built anew.
    pub fn forget(&mut self) {
        if let Some(cr3) = self.current.take() {
            self.trees.remove(&cr3);
        }
    }

    /// Drops the trees that map any of `pages` writable (they gained translated code).
    pub fn code_appeared(&mut self, pages: &[u64]) {
        if pages.is_empty() {
            return;
        }
        self.trees
            .retain(|_, t| !pages.iter().any(|p| t.writable.contains(&(p & ADDR))));
        if self.current.is_some_and(|cr3| !self.trees.contains_key(&cr3)) {
            self.current = None;
        }
    }

    /// A user access to `va` faulted under KVM but the guest's tables allow it: makes the tree
    /// allow it too, in place (filling entries that were not present, or setting the write bit
    /// of a leaf whose guest entry is now dirty). `false` when that is not a widening (the
    /// guest re-pointed the page without invalidating, which an OS does not do) or the pool has
    /// no frame left for it: the caller builds a new tree (which resets the slot if need be).
    pub fn widen(&mut self, ram: &GuestRam, va: u64, code: &dyn CodePages) -> bool {
        let Some(cr3) = self.current else {
            return false;
        };
        let Some(tree) = self.trees.get_mut(&cr3) else {
            return false;
        };
        let root = tree.root;
        let mut writable = std::mem::take(&mut tree.writable);
        let mut leaves = Leaves {
            code,
            writable: &mut writable,
        };
        let widened = self.widen_in(ram, root, cr3 & ADDR, va, &mut leaves);
        if let Some(tree) = self.trees.get_mut(&cr3) {
            tree.writable = writable;
        }
        widened.unwrap_or(false)
    }

    fn widen_in(
        &mut self,
        ram: &GuestRam,
        root: u64,
        guest_root: u64,
        va: u64,
        leaves: &mut Leaves,
    ) -> Result<bool, TablesError> {
        let mut ours = root;
        let mut theirs = guest_root;
        for level in (1..=4u32).rev() {
            let i = (va >> (12 + 9 * (level - 1))) & 511;
            let Some(g) = read_entry(ram, theirs, i) else {
                return Ok(false);
            };
            let e = self.pool.table(ours)[i as usize];
            if e & P == 0 {
                let Some(copy) = self.copy_entry(ram, theirs, i, g, level, leaves)? else {
                    return Ok(false);
                };
                self.pool.table(ours)[i as usize] = copy;
                self.stats.widened += 1;
                if level == 1 {
                    // The guest mapped pages here since the tree was built: take its
                    // neighbours too (Linux maps file pages 16 at a time around a fault), each
                    // a KVM round trip saved.
                    for j in (0..ENTRIES).filter(|&j| j != i) {
                        if self.pool.table(ours)[j as usize] & P != 0 {
                            continue;
                        }
                        let Some(gj) = read_entry(ram, theirs, j) else { break };
                        if let Some(leaf) = self.leaf(ram, theirs, j, gj, leaves) {
                            self.pool.table(ours)[j as usize] = leaf;
                        }
                    }
                }
                return Ok(true);
            }
            if level == 2 && g & PS != 0 {
                // A 2 MiB guest page, split into 4 KiB entries here.
                let j = (va >> 12) & 511;
                let Some(want) = self.small_leaf(g, j, leaves) else {
                    return Ok(false);
                };
                return Ok(self.widen_leaf(e & ADDR, j, want));
            }
            if level == 1 {
                let Some(want) = self.leaf(ram, theirs, i, g, leaves) else {
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
        leaves: &mut Leaves,
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
            return Ok(self.leaf(ram, table, i, e, leaves));
        }
        if level == 2 && e & PS != 0 {
            let frame = e & ADDR & !(ENTRIES * PAGE - 1);
            if ram.host(frame, ENTRIES * PAGE).is_none() {
                return Ok(None);
            }
            set_accessed(ram, table, i, e);
            let split = self.pool.alloc()?;
            for j in 0..ENTRIES {
                if let Some(leaf) = self.small_leaf(e, j, leaves) {
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
            if let Some(copy) = self.copy_entry(ram, child_guest, j, ce, level - 1, leaves)? {
                self.pool.table(child)[j as usize] = copy;
            }
        }
        Ok(Some((e & TABLE_BITS) | A | child))
    }

    /// Our copy of the 4 KiB guest leaf `e` (slot `i` of the guest table at `table`), setting
    /// its accessed bit.
    fn leaf(&mut self, ram: &GuestRam, table: u64, i: u64, e: u64, leaves: &mut Leaves) -> Option<u64> {
        if e & P == 0 || e & US == 0 {
            return None;
        }
        let frame = e & ADDR;
        ram.host(frame, PAGE)?;
        set_accessed(ram, table, i, e);
        let bits = leaf_bits(e);
        Some(leaves.mapped(frame, bits & !ADDR, e))
    }

    /// Our 4 KiB entry for page `j` of the 2 MiB guest leaf `e` (its accessed bit is set when
    /// the split table is built).
    fn small_leaf(&mut self, e: u64, j: u64, leaves: &mut Leaves) -> Option<u64> {
        let bits = small_leaf_bits(e, j)?;
        Some(leaves.mapped(bits & ADDR, bits & !ADDR, e))
    }

    pub fn frames_in_use(&self) -> u64 {
        self.pool.used()
    }
}

/// Guest frames a tree maps writable.
type Writable = std::collections::HashSet<u64>;

/// The guest side of a table being checked: a guest table, or a 2 MiB guest leaf (which our
/// tree splits into 4 KiB entries).
#[derive(Clone, Copy)]
enum GuestNode {
    Table(u64),
    Big(u64),
}

/// Our entry for the 4 KiB guest leaf `e`, without the write right (PAT is bit 7 there).
fn leaf_bits(e: u64) -> u64 {
    (e & (LEAF_BITS | PS | ADDR)) | A
}

/// Our 4 KiB entry for page `j` of the 2 MiB guest leaf `e`, without the write right.
fn small_leaf_bits(e: u64, j: u64) -> Option<u64> {
    if e & P == 0 || e & US == 0 {
        return None;
    }
    let frame = (e & ADDR & !(ENTRIES * PAGE - 1)) + j * PAGE;
    // PAT moves from bit 12 of a 2 MiB entry to bit 7 of a 4 KiB one.
    let pat = (e >> 12 & 1) << 7;
    Some((e & LEAF_BITS) | A | pat | frame)
}

/// What making leaves needs: which pages hold translated code, and the tree's writable frames.
struct Leaves<'a> {
    code: &'a dyn CodePages,
    writable: &'a mut Writable,
}

impl Leaves<'_> {
    /// A leaf mapping `frame` with `bits`, writable when guest entry `e` is writable and dirty
    /// and the page holds no translated code.
    fn mapped(&mut self, frame: u64, bits: u64, e: u64) -> u64 {
        let mut leaf = bits | frame;
        if e & RW != 0 && e & D != 0 && !self.code.has_code(frame) {
            leaf |= RW | D;
            self.writable.insert(frame);
        }
        leaf
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

//! Host page protection for self-modifying-code detection under the identity strategy.
//!
//! A host page that holds translated guest code and is writable is made read-only; a guest write
//! to it faults, the signal handler unlinks every jump into that page's blocks (so none of them
//! can run again without passing the dispatcher), gives the page its write permission back,
//! records it as dirty, and lets the write run again. The engine then invalidates the dirty
//! pages' blocks before it runs the next block.

use std::collections::HashMap;

pub const PAGE: u64 = 4096;
/// Dirty pages the handler can record before the engine must flush everything.
pub const MAX_DIRTY: usize = 32;

/// The process's mappings and their protections, from /proc/self/maps, parsed once and kept
/// until [`HostMaps::invalidate`] (the guest mapped, unmapped or reprotected memory) or a
/// lookup misses (a mapping appeared since).
#[derive(Default)]
pub struct HostMaps {
    /// (start, end, PROT_* bits), sorted by start.
    ranges: Vec<(u64, u64, i32)>,
    fresh: bool,
}

impl HostMaps {
    pub fn invalidate(&mut self) {
        self.fresh = false;
    }

    fn refresh(&mut self) {
        self.ranges.clear();
        self.fresh = true;
        let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
            return;
        };
        for line in maps.lines() {
            let mut fields = line.split_whitespace();
            let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
                continue;
            };
            let Some((lo, hi)) = range.split_once('-') else {
                continue;
            };
            let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) else {
                continue;
            };
            let b = perms.as_bytes();
            let mut prot = 0;
            if b.first() == Some(&b'r') {
                prot |= libc::PROT_READ;
            }
            if b.get(1) == Some(&b'w') {
                prot |= libc::PROT_WRITE;
            }
            if b.get(2) == Some(&b'x') {
                prot |= libc::PROT_EXEC;
            }
            self.ranges.push((lo, hi, prot));
        }
        self.ranges.sort_unstable();
    }

    fn find(&self, addr: u64) -> Option<i32> {
        let i = self.ranges.partition_point(|r| r.0 <= addr);
        let (lo, hi, prot) = *self.ranges.get(i.checked_sub(1)?)?;
        (addr >= lo && addr < hi).then_some(prot)
    }

    /// Protection of the mapping holding `addr` (PROT_* bits), or None if nothing is mapped.
    pub fn protection(&mut self, addr: u64) -> Option<i32> {
        if !self.fresh {
            self.refresh();
        }
        match self.find(addr) {
            Some(p) => Some(p),
            None => {
                self.refresh();
                self.find(addr)
            }
        }
    }

    /// Whether code at `addr` may be fetched (PROT_EXEC), looking again if the snapshot says no.
    pub fn executable(&mut self, addr: u64) -> bool {
        if self.protection(addr).is_some_and(|p| p & libc::PROT_EXEC != 0) {
            return true;
        }
        self.refresh();
        self.find(addr).is_some_and(|p| p & libc::PROT_EXEC != 0)
    }
}

fn mprotect(page: u64, prot: i32) -> bool {
    // SAFETY: changes the protection of one page the guest's code lives on; the engine only
    // removes and restores PROT_WRITE on pages that were writable before.
    unsafe { libc::mprotect(page as *mut libc::c_void, PAGE as usize, prot) == 0 }
}

/// Pages the translator has write-protected, with their original protection.
#[derive(Default)]
pub struct ProtectedPages {
    original: HashMap<u64, i32>,
    /// Pages already checked and found not writable (nothing to protect).
    read_only: HashMap<u64, ()>,
    /// Written by the signal handler: pages whose protection was dropped by a guest write.
    pub dirty: [u64; MAX_DIRTY],
    pub dirty_count: usize,
    pub dirty_overflow: bool,
}

impl ProtectedPages {
    /// Write-protects `page` if it is writable; returns whether it is (now) protected.
    pub fn protect(&mut self, page: u64, maps: &mut HostMaps) -> bool {
        if self.original.contains_key(&page) {
            return true;
        }
        if self.read_only.contains_key(&page) {
            return false;
        }
        match maps.protection(page) {
            Some(prot) if prot & libc::PROT_WRITE != 0 && mprotect(page, prot & !libc::PROT_WRITE) => {
                self.original.insert(page, prot);
                true
            }
            _ => {
                self.read_only.insert(page, ());
                false
            }
        }
    }

    pub fn is_protected(&self, page: u64) -> bool {
        self.original.contains_key(&page)
    }

    /// From the signal handler: a write hit protected `page`. Restores write access and records
    /// the page. Allocation-free.
    pub fn on_write_fault(&mut self, page: u64) -> bool {
        let Some(&prot) = self.original.get(&page) else {
            return false;
        };
        if !mprotect(page, prot) {
            return false;
        }
        if self.dirty_count < MAX_DIRTY {
            self.dirty[self.dirty_count] = page;
            self.dirty_count += 1;
        } else {
            self.dirty_overflow = true;
        }
        true
    }

    /// Forgets `page` after its blocks were invalidated (its protection is already restored,
    /// or the guest replaced the mapping).
    pub fn forget(&mut self, page: u64) {
        self.original.remove(&page);
        self.read_only.remove(&page);
    }

    /// Restores every page's original protection.
    pub fn release_all(&mut self) {
        for (&page, &prot) in &self.original {
            mprotect(page, prot);
        }
        self.original.clear();
        self.read_only.clear();
        self.dirty_count = 0;
        self.dirty_overflow = false;
    }
}

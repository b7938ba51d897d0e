//! Host page protection for self-modifying-code detection under the identity strategy.
//!
//! A host page that holds translated guest code and is writable is made read-only; a guest write
//! to it faults, the signal handler unlinks every jump into that page's blocks (so none of them
//! can run again without passing the dispatcher), gives the page its write permission back,
//! records it as dirty, and lets the write run again. The engine then invalidates the dirty
//! pages' blocks before it runs the next block.
//!
//! Code in a *shared* file mapping (a memfd mapped twice, a JIT's dual mapping) can also be
//! written through another mapping of the same file pages: every such alias known when the
//! code is translated (or when a shared mapping appears later) is write-protected too, and a
//! write to it counts as a write to the code page.

use std::collections::HashMap;

pub const PAGE: u64 = 4096;
/// Dirty pages the handler can record before the engine must flush everything.
pub const MAX_DIRTY: usize = 32;

/// The process's mappings and their protections, from /proc/self/maps, parsed once and kept
/// until [`HostMaps::invalidate`] (the guest mapped, unmapped or reprotected memory) or a
/// lookup misses (a mapping appeared since).
#[derive(Default)]
pub struct HostMaps {
    /// Sorted by start.
    ranges: Vec<Mapping>,
    fresh: bool,
}

/// One line of /proc/self/maps.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    start: u64,
    end: u64,
    prot: i32,
    shared: bool,
    /// File offset of `start`, device and inode (0 for anonymous memory).
    offset: u64,
    dev: u64,
    inode: u64,
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
            let (Some(offset), Some(dev), Some(inode)) = (fields.next(), fields.next(), fields.next()) else {
                continue;
            };
            let offset = u64::from_str_radix(offset, 16).unwrap_or(0);
            let dev = dev
                .split_once(':')
                .and_then(|(a, b)| Some((u64::from_str_radix(a, 16).ok()? << 32) | u64::from_str_radix(b, 16).ok()?))
                .unwrap_or(0);
            let inode = inode.parse().unwrap_or(0);
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
            self.ranges.push(Mapping {
                start: lo,
                end: hi,
                prot,
                shared: b.get(3) == Some(&b's'),
                offset,
                dev,
                inode,
            });
        }
        self.ranges.sort_unstable_by_key(|m| m.start);
    }

    fn mapping(&self, addr: u64) -> Option<Mapping> {
        let i = self.ranges.partition_point(|m| m.start <= addr);
        let m = *self.ranges.get(i.checked_sub(1)?)?;
        (addr >= m.start && addr < m.end).then_some(m)
    }

    fn find(&self, addr: u64) -> Option<i32> {
        self.mapping(addr).map(|m| m.prot)
    }

    /// Other pages of this process mapping the same shared file page as `page`.
    pub fn aliases(&mut self, page: u64) -> Vec<u64> {
        if !self.fresh {
            self.refresh();
        }
        let Some(m) = self.mapping(page).filter(|m| m.shared && m.inode != 0) else {
            return Vec::new();
        };
        let file_offset = m.offset + (page - m.start);
        self.ranges
            .iter()
            .filter(|r| r.shared && r.dev == m.dev && r.inode == m.inode && r.start != m.start)
            .filter(|r| file_offset >= r.offset && file_offset < r.offset + (r.end - r.start))
            .map(|r| r.start + (file_offset - r.offset))
            .collect()
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
    /// Write-protected aliases of code pages (another mapping of the same shared file page):
    /// alias page → code page.
    alias_of: HashMap<u64, u64>,
    /// Pages already checked and found not writable (nothing to protect).
    read_only: HashMap<u64, ()>,
    /// Written by the signal handler: pages whose protection was dropped by a guest write.
    pub dirty: [u64; MAX_DIRTY],
    pub dirty_count: usize,
    pub dirty_overflow: bool,
}

impl ProtectedPages {
    /// Write-protects code page `page` if it is writable, and every writable alias of it;
    /// returns whether the page itself is (now) protected.
    pub fn protect(&mut self, page: u64, maps: &mut HostMaps) -> bool {
        if self.original.contains_key(&page) {
            return true;
        }
        if self.read_only.contains_key(&page) {
            return false;
        }
        self.protect_aliases(page, maps);
        self.protect_one(page, maps)
    }

    /// Write-protects the aliases of `page` not protected yet (a shared mapping may have
    /// appeared since `page` was translated).
    pub fn protect_aliases(&mut self, page: u64, maps: &mut HostMaps) {
        for alias in maps.aliases(page) {
            if !self.original.contains_key(&alias) && self.protect_one(alias, maps) {
                self.alias_of.insert(alias, page);
            }
        }
    }

    /// The code page a write to `page` modifies (`page` itself unless it is an alias).
    pub fn code_page_of(&self, page: u64) -> u64 {
        self.alias_of.get(&page).copied().unwrap_or(page)
    }

    fn protect_one(&mut self, page: u64, maps: &mut HostMaps) -> bool {
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
        self.alias_of.remove(&page);
        // The aliases of a forgotten code page go back to their own protection.
        let aliases: Vec<u64> = self
            .alias_of
            .iter()
            .filter(|(_, &c)| c == page)
            .map(|(&a, _)| a)
            .collect();
        for a in aliases {
            if let Some(prot) = self.original.remove(&a) {
                mprotect(a, prot);
            }
            self.alias_of.remove(&a);
        }
    }

    /// Restores every page's original protection.
    pub fn release_all(&mut self) {
        for (&page, &prot) in &self.original {
            mprotect(page, prot);
        }
        self.original.clear();
        self.read_only.clear();
        self.alias_of.clear();
        self.dirty_count = 0;
        self.dirty_overflow = false;
    }
}

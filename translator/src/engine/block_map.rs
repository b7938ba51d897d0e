//! Blocks by guest key (`Translator::block_key`): a hash map behind a small direct-mapped
//! cache of the keys looked up last.
//!
//! The dispatcher looks a block up at every exit it handles (a jump to chain, an
//! indirect-branch miss, the instruction after an emulated one). With ≈50,000 blocks after a
//! Linux boot the map's control bytes and buckets are mostly out of the host's caches: two
//! dependent misses per lookup, about half of the dispatcher's own time in a fork/exec-heavy
//! guest (perf, Intel SPR). The keys a guest dispatches to in a loop are few, and a 64 KiB
//! array of them stays cached.

use super::addr_map::AddrMap;

/// Entries of the direct-mapped cache (a power of two).
const RECENT: usize = 4096;

pub(super) struct BlockMap {
    map: AddrMap<usize>,
    /// (key, block index + 1); index 0 marks an empty slot.
    recent: Box<[(u64, usize)]>,
}

impl Default for BlockMap {
    fn default() -> Self {
        BlockMap {
            map: AddrMap::default(),
            recent: vec![(0, 0); RECENT].into_boxed_slice(),
        }
    }
}

impl BlockMap {
    fn slot(key: u64) -> usize {
        // Block keys differ in their low bits; fold the page number in so that the same
        // offsets in different pages spread.
        ((key ^ (key >> 12)) as usize) & (RECENT - 1)
    }

    /// The block at `key`.
    pub(super) fn get(&mut self, key: u64) -> Option<usize> {
        let slot = &mut self.recent[Self::slot(key)];
        if slot.0 == key && slot.1 != 0 {
            return Some(slot.1 - 1);
        }
        let index = *self.map.get(&key)?;
        *slot = (key, index + 1);
        Some(index)
    }

    pub(super) fn insert(&mut self, key: u64, index: usize) {
        self.map.insert(key, index);
        self.recent[Self::slot(key)] = (key, index + 1);
    }

    pub(super) fn remove(&mut self, key: u64) {
        self.map.remove(&key);
        let slot = &mut self.recent[Self::slot(key)];
        if slot.0 == key {
            *slot = (0, 0);
        }
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.recent.fill((0, 0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_never_answers_for_a_removed_or_replaced_key() {
        let mut m = BlockMap::default();
        assert_eq!(m.get(0x1000), None);
        m.insert(0x1000, 0);
        assert_eq!(m.get(0x1000), Some(0));
        // A key that shares the slot evicts it; both still resolve through the map.
        let other = (0x2000..)
            .find(|&k| BlockMap::slot(k) == BlockMap::slot(0x1000))
            .unwrap();
        m.insert(other, 1);
        assert_eq!(m.get(0x1000), Some(0));
        assert_eq!(m.get(other), Some(1));
        m.insert(0x1000, 2);
        assert_eq!(m.get(0x1000), Some(2));
        m.remove(0x1000);
        assert_eq!(m.get(0x1000), None);
        assert_eq!(m.get(other), Some(1));
        m.clear();
        assert_eq!(m.get(other), None);
        // Key 0 in an empty slot is not block 0.
        assert_eq!(m.get(0), None);
        m.insert(u64::MAX, 3);
        assert_eq!(m.get(u64::MAX), Some(3));
    }
}

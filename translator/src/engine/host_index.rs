//! Translated blocks by host address: which block holds a host code address (a chained exit's
//! field, an inline cache, a signal's PC) and which block a host entry point belongs to.
//!
//! Blocks are appended to the code buffer, so their start addresses come in increasing order
//! and a sorted list needs no insertion. A binary search over the whole list (≈50,000 blocks
//! after a Linux boot, 800 KB) took some sixteen dependent cache misses, and the dispatcher
//! asks two or three times per chained exit, indirect-branch miss and inline-cache fill. Per
//! 4 KiB of code the position of the first block that starts there is kept too, so a lookup
//! searches only the few blocks of one chunk. (The signal handler looks blocks up too: the
//! lookups allocate nothing.)

/// log2 of the code chunk each `chunk_start` entry covers.
const CHUNK_SHIFT: u32 = 12;

#[derive(Default)]
pub(super) struct HostIndex {
    /// Start of the code buffer (chunk 0).
    base: u64,
    /// (host start, block index), in address order.
    blocks: Vec<(u64, usize)>,
    /// For each chunk of the code buffer up to the last block's: the position in `blocks` of
    /// the first block that starts in it or after it.
    chunk_start: Vec<u32>,
}

impl HostIndex {
    pub(super) fn new(base: u64) -> Self {
        HostIndex {
            base,
            ..HostIndex::default()
        }
    }

    pub(super) fn clear(&mut self) {
        self.blocks.clear();
        self.chunk_start.clear();
    }

    /// Records block `index`, starting at `host`, past every block recorded so far.
    pub(super) fn push(&mut self, host: u64, index: usize) {
        debug_assert!(host >= self.base && self.blocks.last().is_none_or(|&(h, _)| h < host));
        let chunk = ((host - self.base) >> CHUNK_SHIFT) as usize;
        let position = self.blocks.len() as u32;
        while self.chunk_start.len() <= chunk {
            self.chunk_start.push(position);
        }
        self.blocks.push((host, index));
    }

    /// The blocks that may hold `addr`: the last one starting before `addr`'s chunk, then
    /// those starting in it.
    fn candidates(&self, addr: u64) -> &[(u64, usize)] {
        let Some(offset) = addr.checked_sub(self.base) else {
            return &[];
        };
        let chunk = (offset >> CHUNK_SHIFT) as usize;
        let end = self.blocks.len();
        let at = |c: usize| self.chunk_start.get(c).map_or(end, |&p| p as usize);
        &self.blocks[at(chunk).saturating_sub(1)..at(chunk + 1)]
    }

    /// The last block whose code starts at or before `addr`. Whether `addr` lies inside it is
    /// the caller's to check (it knows the block's length).
    pub(super) fn at_or_before(&self, addr: u64) -> Option<usize> {
        let candidates = self.candidates(addr);
        let at = candidates.partition_point(|&(h, _)| h <= addr).checked_sub(1)?;
        Some(candidates[at].1)
    }

    /// The block whose code starts exactly at `host`.
    pub(super) fn starting_at(&self, host: u64) -> Option<usize> {
        let candidates = self.candidates(host);
        let at = candidates.partition_point(|&(h, _)| h < host);
        candidates.get(at).filter(|&&(h, _)| h == host).map(|&(_, i)| i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_block_holding_an_address_across_chunks() {
        let base = 0x10_0000;
        let mut index = HostIndex::new(base);
        assert_eq!(index.at_or_before(base + 5), None);
        // Blocks at 0, 0x100, 0x3000 (spanning chunks 0..3), 0x3010, 0x9000.
        let starts = [0u64, 0x100, 0x3000, 0x3010, 0x9000];
        for (i, &s) in starts.iter().enumerate() {
            index.push(base + s, i);
        }
        let expect = |addr: u64| starts.iter().rposition(|&s| base + s <= addr);
        for offset in (0..0xa000)
            .step_by(0x10)
            .chain([0xff, 0x100, 0x2fff, 0x3000, 0x300f, 0x9000, 0xffff])
        {
            let addr = base + offset;
            assert_eq!(index.at_or_before(addr), expect(addr), "{offset:#x}");
            let exact = starts.iter().position(|&s| base + s == addr);
            assert_eq!(index.starting_at(addr), exact, "{offset:#x}");
        }
        assert_eq!(index.at_or_before(base - 1), None);
        assert_eq!(index.starting_at(base - 1), None);
        index.clear();
        assert_eq!(index.at_or_before(base + 0x9000), None);
    }
}

//! Hash maps keyed by guest addresses (block entry points, physical pages): the engine looks
//! them up on every dispatcher miss and every emulated write, where SipHash (std's default,
//! built to resist chosen keys from a network peer) cost a tenth of a Linux boot. A guest
//! choosing colliding addresses only slows its own translator down, so a multiplicative hash
//! is enough.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` keyed by a guest address.
pub type AddrMap<V> = HashMap<u64, V, BuildHasherDefault<AddrHasher>>;

/// Fibonacci hashing of one u64 (the top bits, which `HashMap` uses, mix every key bit).
#[derive(Default)]
pub struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64 keys are hashed here; fold anything else in 8-byte pieces.
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(b));
        }
    }
    fn write_u64(&mut self, key: u64) {
        self.0 = (self.0 ^ key).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(26);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_aligned_keys_spread_over_buckets() {
        // Page numbers differ only above bit 12; the low bits of the hash must still differ.
        let mut low = std::collections::HashSet::new();
        for page in 0..4096u64 {
            let mut h = AddrHasher::default();
            h.write_u64(page << 12);
            low.insert(h.finish() & 0xfff);
        }
        assert!(low.len() > 2500, "{} distinct of 4096", low.len());
        let mut m = AddrMap::default();
        m.insert(0x1000u64, 1);
        assert_eq!(m.get(&0x1000), Some(&1));
    }
}

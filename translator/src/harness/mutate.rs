//! Seeded, structure-aware byte mutations for the fuzz tests of every parser hbt has (ELF and
//! bzImage loaders, the ELF sweep, the `.deb` reader, the scan cache, exec's ELF checks): bit
//! flips, byte stores, edge values, truncations, and 8-byte overwrites concentrated on the
//! region where the format keeps its offsets and counts. Deterministic, so a failing input is
//! reproduced by its seed and index.

use super::rng::Rng;

/// A mutator over one seed input.
pub struct Mutator {
    rng: Rng,
    /// Byte range holding the format's header fields (most overwrites land here).
    header: std::ops::Range<usize>,
}

impl Mutator {
    pub fn new(seed: u64, header: std::ops::Range<usize>) -> Self {
        Mutator {
            rng: Rng::new(seed),
            header,
        }
    }

    /// One mutant of `input`: 1 to 8 mutations.
    pub fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut b = input.to_vec();
        let rounds = 1 + self.rng.below(8);
        for _ in 0..rounds {
            if b.is_empty() {
                break;
            }
            let len = b.len() as u64;
            let hot = self.header.start.min(b.len())..self.header.end.min(b.len());
            let at = |rng: &mut Rng| {
                if !hot.is_empty() && rng.chance(70) {
                    hot.start + rng.below(hot.len() as u64) as usize
                } else {
                    rng.below(len) as usize
                }
            };
            match self.rng.below(6) {
                0 => {
                    let i = at(&mut self.rng);
                    b[i] ^= 1 << self.rng.below(8);
                }
                1 => {
                    let i = at(&mut self.rng);
                    b[i] = self.rng.next_u64() as u8;
                }
                2 => {
                    let i = at(&mut self.rng);
                    b[i] = self.rng.pick(&[0u8, 0xff, 0x7f, 0x80, 1]);
                }
                3 => {
                    // An 8-byte field overwritten with an edge value (sizes, offsets, counts).
                    let i = at(&mut self.rng).min(b.len().saturating_sub(8));
                    let v = self.rng.interesting();
                    let n = (b.len() - i).min(8);
                    b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
                4 => {
                    // A 2- or 4-byte field (counts, entry sizes).
                    let w = if self.rng.chance(50) { 2 } else { 4 };
                    let i = at(&mut self.rng).min(b.len().saturating_sub(w));
                    let v = self.rng.interesting();
                    let n = (b.len() - i).min(w);
                    b[i..i + n].copy_from_slice(&v.to_le_bytes()[..n]);
                }
                _ => {
                    let n = self.rng.below(len) as usize;
                    b.truncate(n.max(1));
                }
            }
        }
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutants_are_reproducible_and_differ() {
        let seed: Vec<u8> = (0..200u8).collect();
        let a: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7, 0..64);
            (0..50).map(|_| m.mutate(&seed)).collect()
        };
        let b: Vec<Vec<u8>> = {
            let mut m = Mutator::new(7, 0..64);
            (0..50).map(|_| m.mutate(&seed)).collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().filter(|m| **m != seed).count() > 40);
    }
}

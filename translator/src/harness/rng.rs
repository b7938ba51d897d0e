//! A small deterministic generator (SplitMix64): every harness case is reproducible from its
//! seed, with no dependency.

#[derive(Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }

    /// Random 64-bit value, biased towards the edges that find bugs: 0, ±1, sign boundaries,
    /// shift counts around operand widths.
    pub fn interesting(&mut self) -> u64 {
        const EDGES: [u64; 16] = [
            0,
            1,
            u64::MAX,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            i64::MAX as u64,
            i64::MIN as u64,
            0x1_0000_0000,
            0xffff_ffff_0000_0000,
        ];
        match self.below(10) {
            0..=2 => EDGES[self.below(EDGES.len() as u64) as usize],
            3 => self.below(72),
            4 => self.next_u64() & 0xff,
            _ => self.next_u64(),
        }
    }
}

//! Mutation fuzzing of the ELF sweep and the .deb reader: thousands of corrupted versions of
//! real files (bit flips, byte stores, truncations, header field overwrites) must each give
//! a result or an error — never a panic or a hang. Deterministic (seeded), so a failure
//! reproduces; the seed and mutation are printed on failure.

use hbt_coverage::corpus::deb::read_deb;
use hbt_coverage::sweep::Sweeper;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(8) {
        match rng.below(5) {
            0 => {
                let i = rng.below(b.len());
                b[i] ^= 1 << rng.below(8);
            }
            1 => {
                let i = rng.below(b.len());
                b[i] = rng.next() as u8;
            }
            2 => {
                let n = rng.below(b.len());
                b.truncate(n.max(4));
            }
            3 => {
                // Overwrite a header field (the first 64 bytes hold every offset and count).
                if b.len() >= 16 {
                    let i = rng.below(b.len().min(64) - 8);
                    b[i..i + 8].copy_from_slice(&rng.next().to_le_bytes());
                }
            }
            _ => {
                let i = rng.below(b.len());
                let v = [0u8, 0xff, 0x7f, 0x80][rng.below(4)];
                b[i] = v;
            }
        }
    }
    b
}

fn seeds() -> Vec<Vec<u8>> {
    ["/usr/bin/true", "/usr/bin/ls", "/usr/lib/x86_64-linux-gnu/libz.so.1"]
        .iter()
        .filter_map(|p| std::fs::read(p).ok())
        .collect()
}

#[test]
fn mutated_elf_files_never_panic() {
    let seeds = seeds();
    assert!(!seeds.is_empty(), "no seed binaries found");
    let mut sweeper = Sweeper::default();
    let mut rng = Rng(0x5eed_0001);
    for i in 0..3000 {
        let seed = &seeds[i % seeds.len()];
        let input = mutate(&mut rng, seed);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _ = sweeper.sweep_elf(&input);
        }));
        assert!(
            r.is_ok(),
            "sweep_elf panicked on mutation {i} (seed 0x5eed0001, {} bytes)",
            input.len()
        );
    }
}

#[test]
fn mutated_debs_never_panic() {
    // A tiny but real .deb built with dpkg-deb.
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(tree.join("usr/bin")).unwrap();
    std::fs::copy("/usr/bin/true", tree.join("usr/bin/true")).unwrap();
    std::fs::write(
        tree.join("DEBIAN/control"),
        "Package: t\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@example.org>\nDescription: t\n",
    )
    .unwrap();
    let deb = dir.path().join("t.deb");
    let st = std::process::Command::new("dpkg-deb")
        .args(["-Zgzip", "--root-owner-group", "--build"])
        .arg(&tree)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(st.status.success());
    let seed = std::fs::read(&deb).unwrap();
    let mut sweeper = Sweeper::default();
    assert!(read_deb(&seed, &mut sweeper).is_ok());
    let mut rng = Rng(0x5eed_0002);
    for i in 0..1500 {
        let input = mutate(&mut rng, &seed);
        let r = catch_unwind(AssertUnwindSafe(|| {
            let _ = read_deb(&input, &mut sweeper);
        }));
        assert!(r.is_ok(), "read_deb panicked on mutation {i} (seed 0x5eed0002)");
    }
}

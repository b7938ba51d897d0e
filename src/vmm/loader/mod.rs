//! Guest images, recognized by their contents: a bare-metal x86-64 ELF, a Linux bzImage, or
//! (only when `--load-addr` says where) a flat binary.

pub mod bzimage;
pub mod elf;
pub mod error;

use super::memory::GuestMemory;
pub use error::{LoadError, Result};
use std::path::Path;

/// Where to start the vCPU.
pub struct Entry {
    pub rip: u64,
    pub rsp: u64,
    /// RSI at entry (Linux: the boot_params address).
    pub rsi: u64,
    pub kind: &'static str,
}

pub struct LoadOptions<'a> {
    pub load_addr: Option<u64>,
    pub entry: Option<u64>,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
}

pub fn load(path: &Path, mem: &mut GuestMemory, opts: &LoadOptions) -> Result<Entry> {
    // No image can be larger than the guest's RAM.
    let bytes = hbt_translator::host::files::read_regular(path, mem.size(), "a guest image (at most --mem)")?;
    load_bytes(&bytes, mem, opts)
}

/// Loads an image already read into memory (the part of [`load`] the fuzz test drives).
pub fn load_bytes(bytes: &[u8], mem: &mut GuestMemory, opts: &LoadOptions) -> Result<Entry> {
    if bytes.starts_with(b"\x7fELF") {
        return elf::load(bytes, mem);
    }
    if bzimage::is_bzimage(bytes) {
        return bzimage::load(bytes, mem, opts);
    }
    match opts.load_addr {
        Some(addr) => {
            error::fits("flat binary at --load-addr", mem.write(addr, bytes))?;
            Ok(Entry {
                rip: opts.entry.unwrap_or(addr),
                rsp: super::boot::BOOT_STACK,
                rsi: 0,
                kind: "flat binary",
            })
        }
        None => Err(LoadError::Unrecognized { len: bytes.len() }),
    }
}

#[cfg(test)]
mod fuzz {
    //! Fuzz targets for the image loaders: 20,000 seeded mutants each of the test guests (ELF)
    //! and of a real Debian bzImage's first 128 KiB, loaded into one 64 MiB guest. Every mutant
    //! gives an entry point or an error — never a panic, and never a write outside guest RAM
    //! (the loaders only write through `GuestMemory`, which checks every range).
    use super::*;
    use hbt_translator::harness::{ci_summary, mutate::Mutator};

    const RUNS: usize = 20_000;

    fn drive(name: &str, seeds: &[Vec<u8>], header: std::ops::Range<usize>, seed: u64) {
        let mut mem = GuestMemory::new(64 << 20).unwrap();
        let opts = LoadOptions {
            load_addr: None,
            entry: None,
            initrd: None,
            cmdline: "console=ttyS0",
        };
        let mut m = Mutator::new(seed, header);
        let (mut loaded, mut refused) = (0, 0);
        for i in 0..RUNS {
            let input = m.mutate(&seeds[i % seeds.len()]);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load_bytes(&input, &mut mem, &opts).is_ok()
            }));
            match r {
                Ok(true) => loaded += 1,
                Ok(false) => refused += 1,
                Err(_) => panic!(
                    "{name} loader panicked on mutant {i} (seed {seed:#x}, {} bytes)",
                    input.len()
                ),
            }
        }
        ci_summary(&format!(
            "fuzz: {name} loader, {RUNS} mutants: {loaded} loaded, {refused} refused, no panic"
        ));
    }

    #[test]
    fn fuzz_elf_loader() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let seeds: Vec<Vec<u8>> = ["hello", "exceptions", "timer"]
            .iter()
            .map(|n| std::fs::read(root.join(format!("test-images/{n}.img"))).unwrap())
            .collect();
        drive("ELF", &seeds, 0..0x200, 0xe1f);
    }

    #[test]
    fn fuzz_bzimage_loader() {
        let kernel = std::fs::read_dir("/boot")
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("vmlinuz-"))
            .expect("a Debian kernel in /boot (.ci/run installs linux-image-cloud-amd64)");
        let mut image = std::fs::read(kernel).unwrap();
        image.truncate(128 << 10);
        drive("bzImage", &[image], 0x1f0..0x270, 0xb2);
    }
}

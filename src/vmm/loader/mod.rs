//! Guest images, recognized by their contents: a bare-metal x86-64 ELF, a Linux bzImage, or
//! (only when `--load-addr` says where) a flat binary.

pub mod bzimage;
pub mod elf;
pub mod error;
pub mod lz4;
pub mod vmlinux;

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
    /// A Linux kernel hbt placed itself: where (`vmlinux.rs`).
    pub kernel: Option<Placement>,
}

/// Where hbt put a Linux kernel.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    /// Its KASLR virtual offset (0 with `nokaslr`).
    pub virtual_offset: u64,
    /// Its physical load address.
    pub physical: u64,
}

impl Entry {
    /// What was loaded, for --stats.
    pub fn describe(&self) -> String {
        match self.kernel {
            Some(k) => format!(
                "{}, KASLR offset {:#x}, at physical {:#x}",
                self.kind, k.virtual_offset, k.physical
            ),
            None => self.kind.to_string(),
        }
    }
}

/// Who decompresses a Linux bzImage's kernel (`--decompress`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Decompress {
    /// hbt decompresses an LZ4 payload natively and places the kernel
    Hbt,
    /// the bzImage's own decompressor runs in the guest
    Guest,
}

pub struct LoadOptions<'a> {
    pub load_addr: Option<u64>,
    pub entry: Option<u64>,
    pub initrd: Option<&'a Path>,
    pub cmdline: &'a str,
    pub decompress: Decompress,
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
                kernel: None,
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

    /// What the fuzz targets load with: no flat binary, no initrd, hbt decompressing.
    const OPTS: LoadOptions = LoadOptions {
        load_addr: None,
        entry: None,
        initrd: None,
        cmdline: "console=ttyS0",
        decompress: Decompress::Hbt,
    };

    fn drive(name: &str, seeds: &[Vec<u8>], header: std::ops::Range<usize>, seed: u64) {
        let mut mem = GuestMemory::new(64 << 20).unwrap();
        let mut m = Mutator::new(seed, header);
        let (mut loaded, mut refused) = (0, 0);
        for i in 0..RUNS {
            let input = m.mutate(&seeds[i % seeds.len()]);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                load_bytes(&input, &mut mem, &OPTS).is_ok()
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
        let synthetic = lz4_bzimage(&image);
        // The synthetic kernel loads the way hbt loads Debian's: decompressed and placed.
        let mut mem = GuestMemory::new(64 << 20).unwrap();
        let entry = load_bytes(&synthetic, &mut mem, &OPTS).unwrap();
        assert_eq!(entry.kind, "Linux bzImage, LZ4 kernel decompressed by hbt");
        // Linked at 2 MiB (its entry there too), placed at a random 2 MiB multiple from there.
        let physical = entry.kernel.expect("placed by hbt").physical;
        assert!(
            physical >= 0x20_0000 && physical.is_multiple_of(0x20_0000),
            "{physical:#x}"
        );
        assert_eq!(entry.rip, physical);
        let hello = std::fs::read(test_image("hello")).unwrap();
        let mut loaded = vec![0u8; 0x99f];
        mem.read(physical, &mut loaded).unwrap();
        assert!(
            loaded == hello[0x1000..0x199f],
            "the ELF's segment is not where the kernel went"
        );
        drive("bzImage", &[image, synthetic], 0x1f0..0x270, 0xb2);
    }

    fn test_image(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("test-images/{name}.img"))
    }

    /// A bzImage with the setup of `real` and an LZ4 payload (one block of literals) holding
    /// a test guest's ELF as its kernel and an empty relocation table: the path where hbt
    /// decompresses, parses the ELF and reads the relocations, small enough to mutate.
    fn lz4_bzimage(real: &[u8]) -> Vec<u8> {
        let mut kernel = std::fs::read(test_image("hello")).unwrap();
        kernel.extend([0u8; 12]); // the relocation table: three empty lists
        let mut block = vec![0xf0];
        let mut n = kernel.len() - 15;
        while n >= 255 {
            block.push(255);
            n -= 255;
        }
        block.push(n as u8);
        block.extend_from_slice(&kernel);
        let mut payload = 0x184c_2102u32.to_le_bytes().to_vec();
        payload.extend((block.len() as u32).to_le_bytes());
        payload.extend(block);
        payload.extend((kernel.len() as u32).to_le_bytes());
        let setup = (real[0x1f1] as usize + 1) * 512;
        let mut image = real[..setup].to_vec();
        image.extend_from_slice(&payload);
        image[0x248..0x24c].copy_from_slice(&0u32.to_le_bytes()); // payload_offset
        image[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        image[0x258..0x260].copy_from_slice(&0x20_0000u64.to_le_bytes()); // pref_address
        image[0x260..0x264].copy_from_slice(&0x10_0000u32.to_le_bytes()); // init_size
        image
    }
}

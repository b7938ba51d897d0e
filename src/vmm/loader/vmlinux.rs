//! The kernel inside a bzImage, taken out by hbt instead of by the bzImage's own decompressor.
//!
//! A bzImage is a small decompressor with the real kernel (an ELF, `vmlinux`, followed by its
//! relocation table) as a compressed payload. Run in the guest, the decompressor costs a Linux
//! boot under the translator 0.11–0.14 s of ≈1.2 s (the Debian cloud kernel's 14 MB LZ4
//! payload, AMD EPYC host); natively it takes ≈0.045 s. So hbt does its work when the payload
//! is LZ4 (the only format decompressed here; any other payload is left to the guest):
//! - the ELF's PT_LOAD segments go to their physical addresses (the kernel's preferred load
//!   address, `pref_address`), entered at its 64-bit `startup_64` (e_entry, physical) with the
//!   same boot_params, GDT and identity page tables as the bzImage's entry — what the 64-bit
//!   boot protocol gives either;
//! - KASLR as the decompressor does it (`arch/x86/boot/compressed/kaslr.c`, `misc.c`): unless
//!   the command line says `nokaslr`, a random virtual offset in `kernel_alignment` steps that
//!   keeps the kernel (`init_size`, or the decompressed size if larger) below 1 GiB, applied
//!   through the relocation table, and
//!   `KASLR_FLAG` in boot_params' loadflags. The physical address stays `pref_address` (the
//!   decompressor would also randomize it). A kernel built without `CONFIG_RANDOMIZE_BASE`
//!   has no relocation table on x86-64 and is loaded unrelocated.
//!
//! The relocation table, read from the end of the decompressed payload backwards: 32-bit
//! relocations to 0, inverse 32-bit relocations to 0, 64-bit relocations to 0; each entry the
//! kernel virtual address (sign-extended from 32 bits) of a field to adjust by the offset.

use super::elf;
use super::error::{LoadError, Result};
use super::lz4;
use crate::vmm::memory::GuestMemory;

/// The kernel's virtual base without KASLR (`__START_KERNEL_map`).
const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
/// The span KASLR places the kernel image in (`KERNEL_IMAGE_SIZE` with RANDOMIZE_BASE).
const KERNEL_IMAGE_SIZE: u64 = 1 << 30;

/// The setup-header fields the kernel's placement depends on.
pub struct Header {
    pub payload_offset: usize,
    pub payload_length: usize,
    pub pref_address: u64,
    pub kernel_alignment: u64,
    pub init_size: u64,
}

/// Where the kernel went.
pub struct Kernel {
    pub entry: u64,
    /// The end of the memory the kernel may use from its load address (init_size).
    pub end: u64,
    /// The KASLR virtual offset applied, or None (`nokaslr`, or no relocation table).
    pub kaslr_offset: Option<u64>,
}

/// The payload within the protected-mode kernel `kernel`, when hbt decompresses it (LZ4).
pub fn lz4_payload<'a>(kernel: &'a [u8], h: &Header) -> Option<&'a [u8]> {
    let payload = kernel.get(h.payload_offset..h.payload_offset.checked_add(h.payload_length)?)?;
    lz4::is_legacy(payload).then_some(payload)
}

/// Decompresses `payload` (from the protected-mode kernel at file offset `file_offset`) and
/// loads the kernel it holds: block by block as they come out of the decompressor (the ELF's
/// segments to guest RAM, what follows the ELF kept as the relocation table).
pub fn load(payload: &[u8], file_offset: usize, h: &Header, mem: &mut GuestMemory, cmdline: &str) -> Result<Kernel> {
    let end = h.pref_address.saturating_add(h.init_size);
    if !mem.contains(h.pref_address, h.init_size) {
        return Err(LoadError::KernelTooLarge {
            start: h.pref_address,
            end,
            ram: mem.size(),
        });
    }
    let trailer = payload.len().checked_sub(4).map(|at| &payload[at..]);
    let expected = trailer.map_or(0, |t| u32::from_le_bytes(t.try_into().expect("4 bytes")) as usize);
    let mut layout: Option<elf::Layout> = None;
    let mut table = Vec::new();
    let mut at = 0;
    let produced = lz4::decompress_legacy_blocks(payload, expected.min(mem.size() as usize), |block| {
        let l = match &layout {
            Some(l) => l,
            // The ELF header and program headers are in the first block.
            None => layout.insert(elf::layout(block, expected, mem)?),
        };
        l.place(at, block, mem)?;
        table.extend_from_slice(&block[l.file_end.saturating_sub(at).min(block.len())..]);
        at += block.len();
        Ok(())
    })
    .map_err(|e| match e {
        lz4::BlockError::Lz4(source) => LoadError::Payload {
            offset: file_offset,
            source,
        },
        lz4::BlockError::Sink(e) => e,
    })?;
    if produced != expected {
        return Err(LoadError::PayloadSize {
            got: produced,
            expected,
        });
    }
    let Some(loaded) = layout else {
        return Err(LoadError::Elf("the payload holds no kernel (no LZ4 block)".into()));
    };
    loaded.zero_tails(mem)?;
    if loaded.low != h.pref_address || !(loaded.low..loaded.high).contains(&loaded.entry) || loaded.high > end {
        return Err(LoadError::Elf(format!(
            "the kernel in the payload spans {:#x}..{:#x} with entry {:#x}, not from its preferred address {:#x} within its init_size {:#x}",
            loaded.low, loaded.high, loaded.entry, h.pref_address, h.init_size
        )));
    }
    let relocations = Relocations::parse(&table)?;
    let randomize = !cmdline.split_ascii_whitespace().any(|w| w == "nokaslr");
    let kaslr_offset = match relocations {
        Some(r) if randomize => {
            let offset = random_offset(h, expected as u64);
            r.apply(offset, loaded.low, loaded.high, mem)?;
            Some(offset)
        }
        _ => None,
    };
    Ok(Kernel {
        entry: loaded.entry,
        end,
        kaslr_offset,
    })
}

/// A KASLR virtual offset: a random multiple of the alignment that keeps the image below
/// `KERNEL_IMAGE_SIZE` (the decompressor's `find_random_virt_addr`, for an image of
/// init_size or the `decompressed` size, whichever is larger).
fn random_offset(h: &Header, decompressed: u64) -> u64 {
    let align = h.kernel_alignment.max(4096);
    let size = h.init_size.max(decompressed);
    let room = KERNEL_IMAGE_SIZE.saturating_sub(h.pref_address.saturating_add(size));
    let slots = room / align + 1;
    (hbt_translator::host::random_u64() % slots) * align
}

/// The three lists of the relocation table.
struct Relocations {
    add32: Vec<u32>,
    sub32: Vec<u32>,
    add64: Vec<u32>,
}

impl Relocations {
    /// The table at the end of `tail` (what follows the ELF in the payload); None when there is
    /// none (a kernel without RANDOMIZE_BASE).
    fn parse(tail: &[u8]) -> Result<Option<Relocations>> {
        if tail.is_empty() {
            return Ok(None);
        }
        let mut words = tail
            .rchunks_exact(4)
            .map(|w| u32::from_le_bytes(w.try_into().expect("4 bytes")));
        let mut list = |name: &str| -> Result<Vec<u32>> {
            let mut v = Vec::new();
            loop {
                match words.next() {
                    Some(0) => return Ok(v),
                    Some(w) => v.push(w),
                    None => return Err(LoadError::Relocations(format!("its {name} list has no end"))),
                }
            }
        };
        Ok(Some(Relocations {
            add32: list("32-bit")?,
            sub32: list("inverse 32-bit")?,
            add64: list("64-bit")?,
        }))
    }

    /// Adds `offset` to every field the table lists (subtracts it for inverse relocations),
    /// each inside the loaded image `low..high`.
    fn apply(&self, offset: u64, low: u64, high: u64, mem: &mut GuestMemory) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        let image = super::error::fits("the kernel", mem.slice_mut(low, (high - low) as usize))?;
        let len = image.len();
        // Where in the image the field an entry names starts.
        let field = |entry: u32, width: usize| -> Result<usize> {
            // The entry is a kernel virtual address (sign-extended); the image sits at its
            // link-time physical address (`low` is `pref_address`), so the field is at the
            // virtual address less the kernel map's base.
            let at = (entry as i32 as i64 as u64)
                .wrapping_sub(START_KERNEL_MAP)
                .wrapping_sub(low);
            match usize::try_from(at) {
                Ok(at) if at.checked_add(width).is_some_and(|end| end <= len) => Ok(at),
                _ => Err(LoadError::Relocations(format!(
                    "entry {entry:#x} is outside the kernel ({low:#x}..{high:#x})"
                ))),
            }
        };
        for &e in &self.add32 {
            let f = &mut image[field(e, 4)?..][..4];
            let v = u32::from_le_bytes(f[..].try_into().expect("4 bytes")).wrapping_add(offset as u32);
            f.copy_from_slice(&v.to_le_bytes());
        }
        for &e in &self.sub32 {
            let f = &mut image[field(e, 4)?..][..4];
            let v = u32::from_le_bytes(f[..].try_into().expect("4 bytes")).wrapping_sub(offset as u32);
            f.copy_from_slice(&v.to_le_bytes());
        }
        for &e in &self.add64 {
            let f = &mut image[field(e, 8)?..][..8];
            let v = u64::from_le_bytes(f[..].try_into().expect("8 bytes")).wrapping_add(offset);
            f.copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(w: &[u32]) -> Vec<u8> {
        w.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The table as the kernel's build writes it (`0, 64-bit…, 0, inverse…, 0, 32-bit…`),
    /// read from its end and applied to fields of an image at 16 MiB.
    #[test]
    fn relocations_are_read_from_the_end_and_move_their_fields() {
        let (low, high) = (0x100_0000u64, 0x100_2000u64);
        let virt = |phys: u64| (phys + START_KERNEL_MAP) as u32;
        let mut mem = GuestMemory::new(64 << 20).unwrap();
        mem.write(0x100_0100, &0x8100_0040u32.to_le_bytes()).unwrap();
        mem.write(0x100_0200, &0x0000_1000u32.to_le_bytes()).unwrap();
        mem.write(0x100_0300, &0xffff_ffff_8100_0080u64.to_le_bytes()).unwrap();
        // Garbage before the table (the ELF's last bytes) is never read.
        let mut tail = vec![0xaa; 3];
        tail.extend(words(&[0, virt(0x100_0300), 0, virt(0x100_0200), 0, virt(0x100_0100)]));
        let r = Relocations::parse(&tail).unwrap().unwrap();
        assert_eq!((r.add32.len(), r.sub32.len(), r.add64.len()), (1, 1, 1));
        r.apply(0x40_0000, low, high, &mut mem).unwrap();
        let mut b = [0u8; 8];
        mem.read(0x100_0100, &mut b[..4]).unwrap();
        assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 0x8140_0040);
        mem.read(0x100_0200, &mut b[..4]).unwrap();
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            0x1000u32.wrapping_sub(0x40_0000)
        );
        mem.read(0x100_0300, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xffff_ffff_8140_0080);

        // No table: no relocation. A list without its end, or an entry outside the image: errors.
        assert!(Relocations::parse(&[]).unwrap().is_none());
        assert!(matches!(
            Relocations::parse(&words(&[virt(0x100_0100), 0, 5])),
            Err(LoadError::Relocations(_))
        ));
        let outside = Relocations::parse(&words(&[0, 0, 0, virt(0x100_2000)]))
            .unwrap()
            .unwrap();
        assert!(matches!(
            outside.apply(0x20_0000, low, high, &mut mem),
            Err(LoadError::Relocations(_))
        ));
    }

    #[test]
    fn kaslr_offsets_are_aligned_and_keep_the_image_below_1_gib() {
        let h = Header {
            payload_offset: 0,
            payload_length: 0,
            pref_address: 0x100_0000,
            kernel_alignment: 0x20_0000,
            init_size: 0x337_8000,
        };
        let offsets: std::collections::BTreeSet<u64> = (0..2000).map(|_| random_offset(&h, 0x300_0000)).collect();
        for &o in &offsets {
            assert_eq!(o % h.kernel_alignment, 0);
            assert!(h.pref_address + o + h.init_size <= KERNEL_IMAGE_SIZE, "{o:#x}");
        }
        // A decompressed image larger than init_size is what must fit.
        for _ in 0..2000 {
            let o = random_offset(&h, 0x1000_0000);
            assert!(h.pref_address + o + 0x1000_0000 <= KERNEL_IMAGE_SIZE, "{o:#x}");
        }
        assert!(offsets.len() > 100, "hardly random: {} distinct offsets", offsets.len());
    }
}

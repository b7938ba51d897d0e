//! The kernel inside a bzImage, taken out by hbt instead of by the bzImage's own decompressor.
//!
//! A bzImage is a small decompressor with the real kernel (an ELF, `vmlinux`, followed by its
//! relocation table) as a compressed payload. Run in the guest, the decompressor costs a Linux
//! boot under the translator 0.11–0.14 s of ≈1.2 s (the Debian cloud kernel's 14 MB LZ4
//! payload, AMD EPYC host); natively it takes ≈0.045 s. So hbt does its work when the payload
//! is LZ4 (the only format decompressed here; any other payload is left to the guest):
//! - the ELF's PT_LOAD segments go to guest RAM at their physical addresses moved by one
//!   delta, entered at its 64-bit `startup_64` (e_entry, moved too) with the same boot_params,
//!   GDT and identity page tables as the bzImage's entry — what the 64-bit boot protocol gives
//!   either (the kernel finds where it runs from its own RIP);
//! - KASLR as the decompressor does it (`arch/x86/boot/compressed/kaslr.c`, `misc.c`): unless
//!   the command line says `nokaslr`, a random physical address (a `kernel_alignment` multiple
//!   from `pref_address` on, in RAM below 3 GiB, clear of the initrd; for a relocatable kernel)
//!   and a random virtual offset in the same steps that keeps the kernel (`init_size`, or the
//!   decompressed size if larger) below 1 GiB, applied through the relocation table, and
//!   `KASLR_FLAG` in boot_params' loadflags. A kernel built without `CONFIG_RANDOMIZE_BASE` has
//!   no relocation table on x86-64 and keeps its link-time virtual addresses.
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
    /// The kernel may run at any aligned physical address (`relocatable_kernel`).
    pub relocatable: bool,
}

/// Where the kernel went.
pub struct Kernel {
    pub entry: u64,
    /// Its physical load address.
    pub physical: u64,
    /// The KASLR virtual offset applied, or None (`nokaslr`, or no relocation table).
    pub kaslr_offset: Option<u64>,
}

/// Where the placement may put the kernel: RAM below this (hbt's boot page tables map the
/// first 4 GiB; RAM ends at the 3 GiB hole there).
const PLACEMENT_TOP: u64 = 3 << 30;

/// The payload within the protected-mode kernel `kernel`, when hbt decompresses it (LZ4).
pub fn lz4_payload<'a>(kernel: &'a [u8], h: &Header) -> Option<&'a [u8]> {
    let payload = kernel.get(h.payload_offset..h.payload_offset.checked_add(h.payload_length)?)?;
    lz4::is_legacy(payload).then_some(payload)
}

/// Decompresses `payload` (from the protected-mode kernel at file offset `file_offset`) and
/// loads the kernel it holds, clear of `avoid` (where the initrd goes): block by block as they
/// come out of the decompressor (the ELF's segments to guest RAM, what follows the ELF kept as
/// the relocation table).
pub fn load(
    payload: &[u8],
    file_offset: usize,
    h: &Header,
    mem: &mut GuestMemory,
    cmdline: &str,
    avoid: Option<std::ops::Range<u64>>,
) -> Result<Kernel> {
    let trailer = payload.len().checked_sub(4).map(|at| &payload[at..]);
    let expected = trailer.map_or(0, |t| u32::from_le_bytes(t.try_into().expect("4 bytes")) as usize);
    let randomize = !cmdline.split_ascii_whitespace().any(|w| w == "nokaslr");
    // The memory the kernel takes from its load address (the decompressor's `needed_size`).
    let size = h.init_size.max(expected as u64);
    let physical = physical_address(h, size, mem, avoid, randomize && h.relocatable)?;
    let end = h.pref_address.saturating_add(h.init_size);
    let mut layout: Option<elf::Layout> = None;
    let mut table = Vec::new();
    let mut at = 0;
    let produced = lz4::decompress_legacy_blocks(payload, expected.min(mem.size() as usize), |block| {
        let l = match &layout {
            Some(l) => l,
            // The ELF header and program headers are in the first block: checked as linked,
            // then moved to where the kernel goes, before anything is written.
            None => {
                let mut l = elf::layout(block, expected, mem)?;
                if l.low != h.pref_address || !(l.low..l.high).contains(&l.entry) || l.high > end {
                    return Err(LoadError::Elf(format!(
                        "the kernel in the payload spans {:#x}..{:#x} with entry {:#x}, not from its preferred address {:#x} within its init_size {:#x}",
                        l.low, l.high, l.entry, h.pref_address, h.init_size
                    )));
                }
                l.shift(physical - h.pref_address);
                layout.insert(l)
            }
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
    let relocations = Relocations::parse(&table)?;
    let kaslr_offset = match relocations {
        Some(r) if randomize => {
            let offset = random_offset(h, expected as u64);
            r.apply(offset, h.pref_address, loaded.low, loaded.high - loaded.low, mem)?;
            Some(offset)
        }
        _ => None,
    };
    Ok(Kernel {
        entry: loaded.entry,
        physical,
        kaslr_offset,
    })
}

/// Where the kernel goes: its preferred address, or with `randomize` (KASLR on, a relocatable
/// kernel) a random `kernel_alignment` multiple from there on with `size` bytes of RAM below
/// `PLACEMENT_TOP` clear of `avoid` (the decompressor's `find_random_phys_addr`, without
/// memory above 4 GiB).
fn physical_address(
    h: &Header,
    size: u64,
    mem: &GuestMemory,
    avoid: Option<std::ops::Range<u64>>,
    randomize: bool,
) -> Result<u64> {
    let align = h.kernel_alignment.max(4096);
    let fits = |at: u64| {
        at.checked_add(size).is_some_and(|end| {
            end <= PLACEMENT_TOP
                && mem.contains(at, size)
                && avoid.as_ref().is_none_or(|a| end <= a.start || at >= a.end)
        })
    };
    if !h.pref_address.is_multiple_of(align) || !fits(h.pref_address) {
        return Err(LoadError::KernelTooLarge {
            start: h.pref_address,
            end: h.pref_address.saturating_add(size),
            ram: mem.size(),
        });
    }
    if !randomize {
        return Ok(h.pref_address);
    }
    let candidates = || {
        (h.pref_address..PLACEMENT_TOP.min(mem.size()))
            .step_by(align as usize)
            .filter(|&at| fits(at))
    };
    let pick = hbt_translator::host::random_u64() % candidates().count() as u64;
    Ok(candidates().nth(pick as usize).expect("one of those counted"))
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
    /// each inside the image linked at physical `linked` and placed at `placed` (`len` bytes).
    fn apply(&self, offset: u64, linked: u64, placed: u64, len: u64, mem: &mut GuestMemory) -> Result<()> {
        if offset == 0 {
            return Ok(());
        }
        let image = super::error::fits("the kernel", mem.slice_mut(placed, len as usize))?;
        let size = image.len();
        // Where in the image the field an entry names starts.
        let field = |entry: u32, width: usize| -> Result<usize> {
            // The entry is a kernel virtual address (sign-extended): less the kernel map's
            // base, the field's link-time physical address.
            let at = (entry as i32 as i64 as u64)
                .wrapping_sub(START_KERNEL_MAP)
                .wrapping_sub(linked);
            match usize::try_from(at) {
                Ok(at) if at.checked_add(width).is_some_and(|end| end <= size) => Ok(at),
                _ => Err(LoadError::Relocations(format!(
                    "entry {entry:#x} is outside the kernel ({linked:#x}..{:#x} as linked)",
                    linked + len
                ))),
            }
        };
        // Each list: its fields' width and what moving the kernel by `offset` adds to them
        // (the inverse list's fields hold negated addresses; a 32-bit field wraps).
        let lists = [
            (&self.add32, 4, offset),
            (&self.sub32, 4, offset.wrapping_neg()),
            (&self.add64, 8, offset),
        ];
        for (entries, width, delta) in lists {
            for &e in entries {
                let f = &mut image[field(e, width)?..][..width];
                let mut v = [0u8; 8];
                v[..width].copy_from_slice(f);
                let moved = u64::from_le_bytes(v).wrapping_add(delta);
                f.copy_from_slice(&moved.to_le_bytes()[..width]);
            }
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
        // Placed 32 MiB above where it was linked: the fields are found at their new place.
        let placed = low + 0x200_0000;
        for at in [0x100_0100u64, 0x100_0200, 0x100_0300] {
            let mut b = [0u8; 8];
            mem.read(at, &mut b).unwrap();
            mem.write(at + 0x200_0000, &b).unwrap();
        }
        r.apply(0x40_0000, low, placed, high - low, &mut mem).unwrap();
        let mut b = [0u8; 8];
        mem.read(0x300_0100, &mut b[..4]).unwrap();
        assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 0x8140_0040);
        mem.read(0x300_0200, &mut b[..4]).unwrap();
        assert_eq!(
            u32::from_le_bytes(b[..4].try_into().unwrap()),
            0x1000u32.wrapping_sub(0x40_0000)
        );
        mem.read(0x300_0300, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xffff_ffff_8140_0080);
        // (Where it was linked, nothing moved.)
        mem.read(0x100_0100, &mut b[..4]).unwrap();
        assert_eq!(u32::from_le_bytes(b[..4].try_into().unwrap()), 0x8100_0040);

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
            outside.apply(0x20_0000, low, placed, high - low, &mut mem),
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
            relocatable: true,
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
        // Physically: aligned, in RAM, clear of the initrd; at the preferred address when not
        // randomized; an error when nothing fits.
        let mem = GuestMemory::new(256 << 20).unwrap();
        let initrd = 0x800_0000..0x900_0000;
        let mut places = std::collections::BTreeSet::new();
        for _ in 0..500 {
            let at = physical_address(&h, h.init_size, &mem, Some(initrd.clone()), true).unwrap();
            assert_eq!(at % h.kernel_alignment, 0);
            assert!(at >= h.pref_address && at + h.init_size <= 256 << 20, "{at:#x}");
            assert!(at + h.init_size <= initrd.start || at >= initrd.end, "{at:#x}");
            places.insert(at);
        }
        assert!(places.len() > 20, "hardly random: {places:x?}");
        assert_eq!(
            physical_address(&h, h.init_size, &mem, None, false).unwrap(),
            h.pref_address
        );
        let clash = Some(0x200_0000..0x300_0000);
        assert!(physical_address(&h, h.init_size, &mem, clash, false).is_err());
        let small = GuestMemory::new(64 << 20).unwrap();
        assert!(physical_address(&h, h.init_size, &small, None, true).is_err());
        assert!(offsets.len() > 100, "hardly random: {} distinct offsets", offsets.len());
    }
}

//! Bare-metal x86-64 ELF (the test guests; also the kernel hbt takes out of a bzImage,
//! `vmlinux.rs`): PT_LOAD segments at their physical addresses, entered in long mode at
//! e_entry.

use super::error::{fits, LoadError, Result};
use super::Entry;
use crate::vmm::memory::GuestMemory;
use goblin::elf::{header, program_header::PT_LOAD, Elf};

pub fn load(bytes: &[u8], mem: &mut GuestMemory) -> Result<Entry> {
    let loaded = load_segments(bytes, mem)?;
    Ok(Entry {
        rip: loaded.entry,
        rsp: crate::vmm::boot::BOOT_STACK,
        rsi: 0,
        kind: "ELF",
        kernel_offset: None,
    })
}

/// Where [`load_segments`] put an ELF.
pub struct Loaded {
    pub entry: u64,
    /// The lowest and the end of the highest physical address a PT_LOAD covers.
    pub low: u64,
    pub high: u64,
    /// Where the ELF ends in its file (what follows is not part of it: the relocation table
    /// Linux appends to its kernel).
    pub file_end: usize,
}

/// Writes the PT_LOAD segments of `bytes` (and their zero-filled tails) into guest memory.
pub fn load_segments(bytes: &[u8], mem: &mut GuestMemory) -> Result<Loaded> {
    let elf = Elf::parse(bytes).map_err(|e| LoadError::Elf(e.to_string()))?;
    if elf.header.e_machine != header::EM_X86_64 || !elf.is_64 {
        return Err(LoadError::NotX86_64(elf.header.e_machine));
    }
    let h = &elf.header;
    let mut loaded = Loaded {
        entry: elf.entry,
        low: u64::MAX,
        high: 0,
        file_end: (h.e_phoff.saturating_add(h.e_phnum as u64 * h.e_phentsize as u64))
            .max(h.e_shoff.saturating_add(h.e_shnum as u64 * h.e_shentsize as u64))
            .min(bytes.len() as u64) as usize,
    };
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_offset as usize;
        let end = start.checked_add(ph.p_filesz as usize).filter(|&e| e <= bytes.len());
        let Some(end) = end else {
            return Err(LoadError::SegmentPastEnd { offset: ph.p_offset });
        };
        if ph.p_memsz < ph.p_filesz {
            return Err(LoadError::SegmentSizes { addr: ph.p_paddr });
        }
        // Check the segment fits before anything is sized from the header.
        if !mem.contains(ph.p_paddr, ph.p_memsz) {
            return Err(LoadError::SegmentTooLarge {
                addr: ph.p_paddr,
                memsz: ph.p_memsz,
                ram: mem.size(),
            });
        }
        let what = format!("PT_LOAD at {:#x} ({} bytes)", ph.p_paddr, ph.p_memsz);
        fits(&what, mem.write(ph.p_paddr, &bytes[start..end]))?;
        fits(&what, mem.fill_zero(ph.p_paddr + ph.p_filesz, ph.p_memsz - ph.p_filesz))?;
        loaded.low = loaded.low.min(ph.p_paddr);
        loaded.high = loaded.high.max(ph.p_paddr + ph.p_memsz);
        loaded.file_end = loaded.file_end.max(end);
    }
    if loaded.low > loaded.high {
        return Err(LoadError::NoLoadSegment);
    }
    Ok(loaded)
}

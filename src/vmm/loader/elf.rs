//! Bare-metal x86-64 ELF (the test guests): PT_LOAD segments at their physical addresses,
//! entered in long mode at e_entry.

use super::error::{fits, LoadError, Result};
use super::Entry;
use crate::vmm::memory::GuestMemory;
use goblin::elf::{header, program_header::PT_LOAD, Elf};

pub fn load(bytes: &[u8], mem: &mut GuestMemory) -> Result<Entry> {
    let elf = Elf::parse(bytes).map_err(|e| LoadError::Elf(e.to_string()))?;
    if elf.header.e_machine != header::EM_X86_64 || !elf.is_64 {
        return Err(LoadError::NotX86_64(elf.header.e_machine));
    }
    let mut loaded = 0;
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
        loaded += 1;
    }
    if loaded == 0 {
        return Err(LoadError::NoLoadSegment);
    }
    Ok(Entry {
        rip: elf.entry,
        rsp: crate::vmm::boot::BOOT_STACK,
        rsi: 0,
        kind: "ELF",
    })
}

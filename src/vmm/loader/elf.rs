//! Bare-metal x86-64 ELF (the test guests; also the kernel hbt takes out of a bzImage,
//! `vmlinux.rs`): PT_LOAD segments at their physical addresses, entered in long mode at
//! e_entry. The file may arrive in pieces ([`Layout::place`]): the kernel's is placed block by
//! block as it is decompressed, and never exists whole.

use super::error::{fits, LoadError, Result};
use super::Entry;
use crate::vmm::memory::GuestMemory;
use goblin::container::{Container, Ctx};
use goblin::elf::program_header::{ProgramHeader, PT_LOAD};
use goblin::elf::{header, Elf};

pub fn load(bytes: &[u8], mem: &mut GuestMemory) -> Result<Entry> {
    let layout = layout(bytes, bytes.len(), mem)?;
    layout.place(0, bytes, mem)?;
    layout.zero_tails(mem)?;
    Ok(Entry {
        rip: layout.entry,
        rsp: crate::vmm::boot::BOOT_STACK,
        rsi: 0,
        kind: "ELF",
        kernel: None,
    })
}

/// A PT_LOAD segment: file bytes `offset..offset + filesz` at physical `paddr`, zeroes up to
/// `memsz`.
struct Segment {
    offset: usize,
    filesz: usize,
    paddr: u64,
    memsz: u64,
}

impl Segment {
    /// The segment, as an error names it.
    fn name(&self) -> String {
        format!("PT_LOAD at {:#x} ({} bytes)", self.paddr, self.memsz)
    }
}

/// Where an ELF's segments go, checked against its file and guest RAM.
pub struct Layout {
    pub entry: u64,
    /// The lowest and the end of the highest physical address a PT_LOAD covers.
    pub low: u64,
    pub high: u64,
    /// Where the ELF ends in its file (what follows is not part of it: the relocation table
    /// Linux appends to its kernel).
    pub file_end: usize,
    segments: Vec<Segment>,
}

/// The layout of an ELF of `file_len` bytes whose first bytes (its header and program
/// headers at least) are `head`.
pub fn layout(head: &[u8], file_len: usize, mem: &GuestMemory) -> Result<Layout> {
    let h = Elf::parse_header(head).map_err(|e| LoadError::Elf(e.to_string()))?;
    if h.e_machine != header::EM_X86_64 || h.container().ok() != Some(Container::Big) {
        return Err(LoadError::NotX86_64(h.e_machine));
    }
    let ctx = Ctx::new(Container::Big, goblin::container::Endian::Little);
    let headers = ProgramHeader::parse(head, h.e_phoff as usize, h.e_phnum as usize, ctx)
        .map_err(|e| LoadError::Elf(format!("program headers: {e}")))?;
    let mut layout = Layout {
        entry: h.e_entry,
        low: u64::MAX,
        high: 0,
        file_end: (h.e_phoff.saturating_add(h.e_phnum as u64 * h.e_phentsize as u64))
            .max(h.e_shoff.saturating_add(h.e_shnum as u64 * h.e_shentsize as u64))
            .min(file_len as u64) as usize,
        segments: Vec::new(),
    };
    for ph in headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let start = ph.p_offset as usize;
        let end = start.checked_add(ph.p_filesz as usize).filter(|&e| e <= file_len);
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
        layout.segments.push(Segment {
            offset: start,
            filesz: end - start,
            paddr: ph.p_paddr,
            memsz: ph.p_memsz,
        });
        layout.low = layout.low.min(ph.p_paddr);
        layout.high = layout.high.max(ph.p_paddr + ph.p_memsz);
        layout.file_end = layout.file_end.max(end);
    }
    if layout.segments.is_empty() {
        return Err(LoadError::NoLoadSegment);
    }
    Ok(layout)
}

impl Layout {
    /// Moves every segment (and the entry) `delta` bytes up in physical memory: a relocatable
    /// kernel placed away from its link-time address. The caller checks the new range is RAM.
    pub fn shift(&mut self, delta: u64) {
        for s in &mut self.segments {
            s.paddr += delta;
        }
        self.entry += delta;
        self.low += delta;
        self.high += delta;
    }

    /// Writes what the segments hold of the file's bytes `at..at + chunk.len()`.
    pub fn place(&self, at: usize, chunk: &[u8], mem: &mut GuestMemory) -> Result<()> {
        for s in &self.segments {
            let from = s.offset.max(at);
            let to = (s.offset + s.filesz).min(at + chunk.len());
            if from < to {
                let gpa = s.paddr + (from - s.offset) as u64;
                fits(&s.name(), mem.write(gpa, &chunk[from - at..to - at]))?;
            }
        }
        Ok(())
    }

    /// Zeroes each segment's memory past its file bytes (its bss).
    pub fn zero_tails(&self, mem: &mut GuestMemory) -> Result<()> {
        for s in &self.segments {
            let bss = s.paddr + s.filesz as u64;
            fits(&s.name(), mem.fill_zero(bss, s.memsz - s.filesz as u64))?;
        }
        Ok(())
    }
}

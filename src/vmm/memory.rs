//! Guest RAM: one anonymous mapping, laid out as a PC: RAM below the 3 GiB MMIO hole, the rest
//! above 4 GiB. The e820 map describes it to the guest (legacy BIOS area reserved).

use memmap2::MmapMut;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("--mem must be at least 2 MiB (got {0} bytes)")]
    TooSmall(u64),
    #[error("cannot map {bytes} bytes of guest RAM: {source}")]
    Map { bytes: u64, source: std::io::Error },
    #[error("guest-physical range {gpa:#x}+{len:#x} is outside guest RAM ({ram_mib} MiB)")]
    OutOfRange { gpa: u64, len: usize, ram_mib: u64 },
}

type Result<T> = std::result::Result<T, MemoryError>;

pub const MMIO_HOLE_START: u64 = 3 << 30;
pub const MMIO_HOLE_END: u64 = 4 << 30;
/// hbt's own guest-physical region in the MMIO hole, reserved in the e820 map for every
/// engine: the hybrid engine keeps the descriptor tables, entry stubs and page tables KVM runs
/// guest user code with there (`engine/hybrid/host_region.rs`). It is never guest RAM: the
/// guest reads it as unclaimed device memory.
pub const HBT_REGION_START: u64 = 0xd000_0000;
pub const HBT_REGION_SIZE: u64 = 32 << 20;
pub const E820_RAM: u32 = 1;
pub const E820_RESERVED: u32 = 2;

pub struct GuestMemory {
    map: MmapMut,
}

/// A guest-physical RAM region and where it sits in the mapping.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    pub guest: u64,
    pub size: u64,
    pub offset: u64,
}

impl GuestMemory {
    pub fn new(bytes: u64) -> Result<Self> {
        if bytes < (2 << 20) {
            return Err(MemoryError::TooSmall(bytes));
        }
        let map = MmapMut::map_anon(bytes as usize).map_err(|source| MemoryError::Map { bytes, source })?;
        // Left on 4 KiB host pages, unlike the code cache and the translator's tables
        // (`advise_huge_pages`): a guest touches its RAM sparsely, and a huge page costs its
        // whole 2 MiB at the first touch — 1.6–10.6 ms on a fresh one where a 4 KiB page took
        // 1.6 µs (AMD EPYC host, itself a VM). Advised, a hybrid boot to `/init` took 1.5–2.0 s
        // against 1.2–1.4 s, and a static program's first 40 ms in the guest 5–15 ms more; the
        // soft-MMU's host TLB misses it saves did not show (300 fork+exec under bt 0.44–0.56 s
        // either way, sha256sum of 64 MiB under hybrid within noise).
        Ok(GuestMemory { map })
    }

    pub fn size(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn host_base(&self) -> u64 {
        self.map.as_ptr() as u64
    }

    /// The RAM regions (below the hole, and above 4 GiB when RAM is larger than 3 GiB).
    pub fn regions(&self) -> Vec<Region> {
        let low = self.size().min(MMIO_HOLE_START);
        let mut r = vec![Region {
            guest: 0,
            size: low,
            offset: 0,
        }];
        if self.size() > low {
            r.push(Region {
                guest: MMIO_HOLE_END,
                size: self.size() - low,
                offset: low,
            });
        }
        r
    }

    /// The e820 map: (address, size, type).
    pub fn e820(&self) -> Vec<(u64, u64, u32)> {
        let mut map = vec![(0, 0x9fc00, E820_RAM), (0x9fc00, 0x100000 - 0x9fc00, E820_RESERVED)];
        for r in self.regions() {
            let start = r.guest.max(0x100000);
            if r.guest + r.size > start {
                map.push((start, r.guest + r.size - start, E820_RAM));
            }
        }
        map.push((HBT_REGION_START, HBT_REGION_SIZE, E820_RESERVED));
        map.sort_by_key(|e| e.0);
        map
    }

    fn offset_of(&self, gpa: u64, len: usize) -> Result<usize> {
        for r in self.regions() {
            if gpa >= r.guest && gpa.checked_add(len as u64).is_some_and(|end| end <= r.guest + r.size) {
                return Ok((r.offset + gpa - r.guest) as usize);
            }
        }
        Err(MemoryError::OutOfRange {
            gpa,
            len,
            ram_mib: self.size() >> 20,
        })
    }

    pub fn write(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        let off = self.offset_of(gpa, data.len())?;
        self.map[off..off + data.len()].copy_from_slice(data);
        Ok(())
    }

    /// `[gpa, gpa+len)` to work on in place (a loader's pass over what it placed).
    pub fn slice_mut(&mut self, gpa: u64, len: usize) -> Result<&mut [u8]> {
        let off = self.offset_of(gpa, len)?;
        Ok(&mut self.map[off..off + len])
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let off = self.offset_of(gpa, buf.len())?;
        buf.copy_from_slice(&self.map[off..off + buf.len()]);
        Ok(())
    }

    /// Zeroes `[gpa, gpa+len)` (an ELF segment's bss): checked before anything is touched.
    pub fn fill_zero(&mut self, gpa: u64, len: u64) -> Result<()> {
        let off = self.offset_of(gpa, len as usize)?;
        self.map[off..off + len as usize].fill(0);
        Ok(())
    }

    /// Whether `[gpa, gpa+len)` lies in one RAM region.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        self.offset_of(gpa, len as usize).is_ok()
    }

    pub fn write_u64(&mut self, gpa: u64, v: u64) -> Result<()> {
        self.write(gpa, &v.to_le_bytes())
    }
}

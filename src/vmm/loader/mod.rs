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
    if bytes.starts_with(b"\x7fELF") {
        return elf::load(&bytes, mem);
    }
    if bzimage::is_bzimage(&bytes) {
        return bzimage::load(&bytes, mem, opts);
    }
    match opts.load_addr {
        Some(addr) => {
            error::fits("flat binary at --load-addr", mem.write(addr, &bytes))?;
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

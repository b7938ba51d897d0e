//! Guest images, recognized by their contents: a bare-metal x86-64 ELF, a Linux bzImage, or
//! (only when `--load-addr` says where) a flat binary.

pub mod bzimage;
pub mod elf;

use super::memory::GuestMemory;
use anyhow::{bail, Context, Result};
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
    let bytes = std::fs::read(path).with_context(|| format!("cannot read guest image {}", path.display()))?;
    let what = |e: anyhow::Error| e.context(format!("guest image {}", path.display()));
    if bytes.starts_with(b"\x7fELF") {
        return elf::load(&bytes, mem).map_err(what);
    }
    if bzimage::is_bzimage(&bytes) {
        return bzimage::load(&bytes, mem, opts).map_err(what);
    }
    match opts.load_addr {
        Some(addr) => {
            mem.write(addr, &bytes)
                .map_err(|e| what(e.context("flat binary does not fit in guest RAM at --load-addr")))?;
            Ok(Entry {
                rip: opts.entry.unwrap_or(addr),
                rsp: super::boot::BOOT_STACK,
                rsi: 0,
                kind: "flat binary",
            })
        }
        None => bail!(
            "{}: not an ELF or a Linux bzImage ({} bytes); for a flat binary give --load-addr (and --entry)",
            path.display(),
            bytes.len()
        ),
    }
}

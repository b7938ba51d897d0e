//! What can be wrong with a guest image (each message names the problem and, where it helps,
//! what to do).

use crate::vmm::memory::MemoryError;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    File(#[from] hbt_translator::host::files::FileError),
    #[error("not an ELF or a Linux bzImage ({len} bytes); for a flat binary give --load-addr (and --entry)")]
    Unrecognized { len: usize },
    #[error("malformed ELF: {0}")]
    Elf(String),
    #[error("not an x86-64 ELF (e_machine {0})")]
    NotX86_64(u16),
    #[error("ELF has no PT_LOAD segment")]
    NoLoadSegment,
    #[error("PT_LOAD at file offset {offset:#x} runs past the end of the file")]
    SegmentPastEnd { offset: u64 },
    #[error("PT_LOAD at {addr:#x} has memsz < filesz")]
    SegmentSizes { addr: u64 },
    #[error("PT_LOAD at {addr:#x} ({memsz:#x} bytes) does not fit in guest RAM ({ram:#x} bytes); give more --mem")]
    SegmentTooLarge { addr: u64, memsz: u64, ram: u64 },
    #[error("bzImage boot protocol {major}.{minor} is older than 2.12")]
    OldProtocol { major: u8, minor: u8 },
    #[error("bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)")]
    No64BitEntry,
    #[error("bzImage is truncated: setup claims {setup_sects} sectors, the file has {len} bytes")]
    Truncated { setup_sects: usize, len: usize },
    #[error("--append is {len} bytes; the kernel command line holds at most {max} (plus its NUL)")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--initrd ({len} bytes) does not fit in guest RAM below {top:#x}; give more --mem")]
    InitrdTooBig { len: usize, top: u64 },
    #[error("e820 map has more than {0} entries")]
    E820TooLong(usize),
    #[error("bzImage payload (at file offset {offset:#x}): {source}")]
    Payload {
        offset: usize,
        source: super::lz4::Lz4Error,
    },
    #[error("bzImage payload decompressed to {got} bytes, but its trailer says {expected}")]
    PayloadSize { got: usize, expected: usize },
    #[error("the kernel's relocation table is malformed: {0}")]
    Relocations(String),
    #[error("the kernel needs RAM up to {end:#x} (its init_size from {start:#x}), clear of the initrd; guest RAM is {ram:#x} bytes: give more --mem")]
    KernelTooLarge { start: u64, end: u64, ram: u64 },
    #[error("{what} does not fit in guest RAM: {source}")]
    DoesNotFit { what: String, source: MemoryError },
}

pub type Result<T> = std::result::Result<T, LoadError>;

/// `mem.write` for a named piece of the image.
pub fn fits<T>(what: &str, r: std::result::Result<T, MemoryError>) -> Result<T> {
    r.map_err(|source| LoadError::DoesNotFit {
        what: what.to_string(),
        source,
    })
}

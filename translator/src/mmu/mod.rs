//! Memory translation as a strategy (DESIGN §4): every guest memory access — explicit operands
//! and the implicit ones of push/pop/call/ret/string instructions — goes through one of these.
//!
//! - [`MemoryStrategy::Identity`]: guest virtual = host virtual (user-mode programs, harness).
//!   Translated code accesses memory directly; host faults become guest faults.
//! - [`MemoryStrategy::SoftMmu`]: guest page tables over guest physical memory ([`GuestRam`]).
//!   Translated code looks the page up in an inline TLB; misses come back to the engine, which
//!   walks the tables (`soft_mmu.rs`), sets accessed/dirty bits and fills the TLB or raises `#PF`.

pub mod masked;
pub mod soft_mmu;

pub use soft_mmu::GuestRam;

/// Kind of a memory access.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read = 0,
    Write = 1,
    Fetch = 2,
}

impl Access {
    pub fn from_bits(bits: u64) -> Access {
        match bits {
            1 => Access::Write,
            2 => Access::Fetch,
            _ => Access::Read,
        }
    }
}

/// How guest addresses become host addresses.
pub enum MemoryStrategy {
    Identity,
    SoftMmu(GuestRam),
}

impl MemoryStrategy {
    pub fn is_soft_mmu(&self) -> bool {
        matches!(self, MemoryStrategy::SoftMmu(_))
    }
}

/// True when `va` is canonical (bits 63..47 all equal).
pub fn is_canonical(va: u64) -> bool {
    ((va as i64) << 16 >> 16) as u64 == va
}

/// Writes host memory without trusting the address: false instead of a host fault when the
/// range is not writable.
pub fn write_host_checked(addr: u64, data: &[u8]) -> bool {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: process_vm_writev on our own pid only reads `data` and reports EFAULT instead of
    // faulting when `addr` is not writable.
    let n = unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
    n == data.len() as isize
}

/// Reads host memory without trusting the address: unmapped or unreadable ranges come back as
/// `None` instead of a host fault (used for fetching guest code in the identity strategy).
pub fn read_host_checked(addr: u64, buf: &mut [u8]) -> Option<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: process_vm_readv on our own pid only writes `buf` (valid for its length) and
    // reports EFAULT instead of faulting when `addr` is not readable.
    let n = unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) };
    (n == buf.len() as isize).then_some(())
}

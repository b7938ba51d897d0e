//! Host-side plumbing the engine stands on: executable memory, the GS base that points at the
//! context, the host signal handler that turns faults in translated code into guest exceptions,
//! host CPU feature queries, measured implementation choices (`quirks.rs`), and reading user-named files safely (`files.rs`).

pub mod codebuf;
pub mod features;
pub mod files;
pub mod gsbase;
pub mod pages;
pub mod quirks;
pub mod signals;

/// The host's transparent huge page size (x86-64: 2 MiB).
pub const HUGE_PAGE: usize = 2 << 20;

/// Asks the host kernel to back `[addr, addr+len)` with transparent huge pages where it can
/// (the 2 MiB-aligned part; best effort: a host with THP set to `never` ignores it). For the
/// big, randomly indexed memory translated code runs on — the code cache, the context's TLB and
/// indirect-branch tables — where 4 KiB pages cost a host TLB miss on most lookups: with guest
/// RAM advised too, 300 fork+exec in a Linux guest under `--accel bt` ran in 0.79–0.91 s
/// instead of 0.94–1.18 s (Intel Sapphire Rapids host, six interleaved rounds). Guest RAM is no
/// longer advised (`vmm/memory.rs` says why). Call it before the memory is first touched: pages
/// faulted in before stay 4 KiB.
pub fn advise_huge_pages(addr: u64, len: usize) {
    const HUGE: u64 = HUGE_PAGE as u64;
    let start = addr.next_multiple_of(HUGE);
    let end = (addr + len as u64) & !(HUGE - 1);
    if end <= start {
        return;
    }
    // SAFETY: madvise only changes how the kernel backs pages of a mapping the caller owns;
    // MADV_HUGEPAGE keeps their contents. A failure (THP disabled) changes nothing.
    unsafe { libc::madvise(start as *mut libc::c_void, (end - start) as usize, libc::MADV_HUGEPAGE) };
}

/// A random u64 from the kernel (`getrandom`): address-space randomization for guests.
pub fn random_u64() -> u64 {
    let mut r = [0u8; 8];
    // SAFETY: getrandom writes at most 8 bytes into the 8-byte buffer. (It does not fail for
    // 8 bytes once the kernel's pool is ready; a failure leaves the zeros: no randomization.)
    unsafe { libc::getrandom(r.as_mut_ptr() as *mut libc::c_void, 8, 0) };
    u64::from_le_bytes(r)
}

/// A fresh anonymous private mapping of `len` bytes with protection `prot`, or None.
pub fn map_anonymous(len: usize, prot: i32) -> Option<*mut u8> {
    // SAFETY: anonymous private mapping at a kernel-chosen address; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

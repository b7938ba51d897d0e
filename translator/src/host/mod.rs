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

//! Pointing the host GS base at the translator context for the duration of a run.

use crate::error::TranslateError;

const ARCH_SET_GS: libc::c_int = 0x1001;
const ARCH_GET_GS: libc::c_int = 0x1004;

fn get() -> u64 {
    let mut value: u64 = 0;
    // SAFETY: ARCH_GET_GS writes one u64 through the pointer, which is valid.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_GS, &mut value as *mut u64) };
    value
}

fn set(value: u64) -> Result<(), TranslateError> {
    // SAFETY: ARCH_SET_GS only changes this thread's GS base, which Rust and glibc do not use
    // on x86-64 (TLS is FS-based).
    let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_SET_GS, value) };
    if rc != 0 {
        return Err(TranslateError::Host(format!(
            "arch_prctl(ARCH_SET_GS) failed: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Sets the GS base on creation and puts the previous value back on drop.
pub struct GsBaseGuard {
    previous: u64,
}

impl GsBaseGuard {
    pub fn install(value: u64) -> Result<Self, TranslateError> {
        let previous = get();
        if previous != value {
            set(value)?;
        }
        Ok(GsBaseGuard { previous })
    }
}

impl Drop for GsBaseGuard {
    fn drop(&mut self) {
        let _ = set(self.previous);
    }
}

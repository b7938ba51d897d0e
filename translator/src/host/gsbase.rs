//! Pointing the host GS base at the translator context for the duration of a run.

use crate::error::TranslateError;

const ARCH_SET_GS: libc::c_int = 0x1001;
const ARCH_GET_GS: libc::c_int = 0x1004;
/// `AT_HWCAP2` bit: the kernel lets user code run RDGSBASE/WRGSBASE (Linux 5.9+ on CPUs with
/// FSGSBASE).
const HWCAP2_FSGSBASE: u64 = 1 << 1;

/// Whether this thread may read and write its GS base directly. Each `Translator::run` installs
/// and restores the GS base, and the hybrid engine calls it twice per user stretch it leaves to
/// the translator: three `arch_prctl` system calls a call were ≈5% of a read-heavy program's time
/// there (Intel Sapphire Rapids host); the instructions take nanoseconds.
fn direct() -> bool {
    static DIRECT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    // SAFETY: getauxval only reads the process's auxiliary vector.
    *DIRECT.get_or_init(|| unsafe { libc::getauxval(libc::AT_HWCAP2) } & HWCAP2_FSGSBASE != 0)
}

fn get() -> u64 {
    let mut value: u64 = 0;
    if direct() {
        // SAFETY: RDGSBASE only reads this thread's GS base; the kernel enabled it (`direct`).
        unsafe { std::arch::asm!("rdgsbase {}", out(reg) value, options(nomem, nostack, preserves_flags)) };
        return value;
    }
    // SAFETY: ARCH_GET_GS writes one u64 through the pointer, which is valid.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_GET_GS, &mut value as *mut u64) };
    value
}

fn set(value: u64) -> Result<(), TranslateError> {
    if direct() {
        // SAFETY: as below, through WRGSBASE (enabled by the kernel: `direct`). It would fault
        // on a non-canonical value; the values set are a context's address or one `get` read.
        unsafe { std::arch::asm!("wrgsbase {}", in(reg) value, options(nomem, nostack, preserves_flags)) };
        return Ok(());
    }
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

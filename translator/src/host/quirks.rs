//! Behaviours where CPUs differ and the manuals leave the choice to the implementation, measured
//! on the host at first use instead of assumed per vendor. The engine models the host's choice,
//! so the differential harness (native vs translated, on the same host) holds on every CPU.
//!
//! `maskmovdqu` (measured on an Intel Xeon Sapphire Rapids, and probed here on every host):
//! - with alignment checking on (CR0.AM, RFLAGS.AC, CPL3) it raises #AC whenever RDI is not
//!   8-byte aligned, even when the mask selects no byte; an earlier host raised it only when some
//!   byte was stored and RDI was not 16-byte aligned;
//! - it faults on a page it may not write even where the mask selects no byte of it (so a mask
//!   of zero still faults), and stores nothing then; the Xeon checks the high 8 bytes before
//!   the low 8 (CR2 is RDI+8 when both halves are unmapped).
//!
//! Each probe runs one `maskmovdqu` in a forked child and reads how the child ended: SIGBUS is
//! the kernel's signal for #AC, SIGSEGV for #PF.

use std::sync::OnceLock;

/// How `maskmovdqu` (and `vmaskmovdqu`) checks its destination on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskMoveRule {
    /// With alignment checking on, RDI must be a multiple of this (1: never checked).
    pub align: u64,
    /// Whether a misaligned RDI raises #AC even when the mask selects no byte.
    pub misaligned_without_store: bool,
    /// Whether bytes the mask does not select are checked for write access too.
    pub unselected_bytes_fault: bool,
}

impl MaskMoveRule {
    /// Whether the store raises #AC at `rdi` when `any_byte` is selected (alignment checking
    /// being on).
    pub fn alignment_fault(&self, rdi: u64, any_byte: bool) -> bool {
        !rdi.is_multiple_of(self.align) && (any_byte || self.misaligned_without_store)
    }
}

/// The host's `maskmovdqu` rule (probed once).
pub fn mask_move_rule() -> MaskMoveRule {
    static RULE: OnceLock<MaskMoveRule> = OnceLock::new();
    *RULE.get_or_init(|| {
        let Some(pages) = ProbePages::new() else {
            return MaskMoveRule::MEASURED_ON_XEON;
        };
        let at = |offset: u64| pages.writable + offset;
        // The largest misalignment that still faults with every byte selected gives the
        // granule; the host kernel keeps CR0.AM set (the harness's #AC cases rely on it too).
        let align = [8u64, 4, 2, 1]
            .into_iter()
            .find(|&offset| mask_move_ends(at(offset), u16::MAX, true) == Some(libc::SIGBUS))
            .map_or(1, |offset| offset * 2);
        let misaligned_without_store = align > 1 && mask_move_ends(at(align / 2), 0, true) == Some(libc::SIGBUS);
        let unselected_bytes_fault = mask_move_ends(pages.unmapped - 4, 0, false) == Some(libc::SIGSEGV);
        MaskMoveRule {
            align,
            misaligned_without_store,
            unselected_bytes_fault,
        }
    })
}

impl MaskMoveRule {
    /// The Intel Xeon's rule, used if the probe cannot run.
    const MEASURED_ON_XEON: MaskMoveRule = MaskMoveRule {
        align: 8,
        misaligned_without_store: true,
        unselected_bytes_fault: true,
    };
}

/// A writable page followed by an unmapped one, for the probes.
struct ProbePages {
    writable: u64,
    unmapped: u64,
}

impl ProbePages {
    fn new() -> Option<ProbePages> {
        let page = 4096;
        let base = super::map_anonymous(2 * page, libc::PROT_READ | libc::PROT_WRITE)? as u64;
        // SAFETY: unmaps the second page of the private mapping made just above.
        unsafe { libc::munmap((base + page as u64) as *mut libc::c_void, page) };
        Some(ProbePages {
            writable: base,
            unmapped: base + page as u64,
        })
    }
}

impl Drop for ProbePages {
    fn drop(&mut self) {
        // SAFETY: unmaps the first page of the mapping made in `new`, which nothing else uses.
        unsafe { libc::munmap(self.writable as *mut libc::c_void, 4096) };
    }
}

/// Runs `maskmovdqu` at `rdi`, selecting byte `i` where bit `i` of `mask` is set, with RFLAGS.AC
/// set if `ac`, in a forked child: the signal that ended it (0 if it completed), or None if the
/// probe could not run.
fn mask_move_ends(rdi: u64, mask: u16, ac: bool) -> Option<i32> {
    let mut selector = [0u8; 16];
    for (i, byte) in selector.iter_mut().enumerate() {
        *byte = if mask & (1 << i) != 0 { 0x80 } else { 0 };
    }
    let ac_bit: u64 = if ac { 0x40000 } else { 0 };
    // SAFETY: fork duplicates this process; the child runs only async-signal-safe code
    // (`signal`, inline assembly, `_exit`) and never returns.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return None;
    }
    if pid == 0 {
        // SAFETY: in the child: restore the default SIGBUS/SIGSEGV actions (the parent's
        // handlers are for translated code), then store through `maskmovdqu` into the child's
        // copy of the probe pages (or fault, which ends the child) with AC as asked, clear AC
        // and exit.
        unsafe {
            libc::signal(libc::SIGBUS, libc::SIG_DFL);
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
            std::arch::asm!(
                "movdqu xmm1, [{sel}]",
                "pushfq",
                "or qword ptr [rsp], {ac}",
                "popfq",
                "maskmovdqu xmm0, xmm1",
                "pushfq",
                "and dword ptr [rsp], 0xfffbffff",
                "popfq",
                sel = in(reg) selector.as_ptr(),
                ac = in(reg) ac_bit,
                in("rdi") rdi,
                out("xmm0") _,
                out("xmm1") _,
            );
            libc::_exit(0);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    if waited != pid {
        return None;
    }
    Some(if libc::WIFSIGNALED(status) {
        libc::WTERMSIG(status)
    } else {
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probed_rule_is_one_a_cpu_could_have() {
        let rule = mask_move_rule();
        eprintln!("{rule:?}");
        assert!(matches!(rule.align, 1 | 2 | 4 | 8 | 16), "{rule:?}");
        // A store at an aligned address never faults; with a byte selected a misaligned one
        // does whenever the host checks at all.
        assert!(!rule.alignment_fault(0x1000, true));
        if rule.align > 1 {
            assert!(rule.alignment_fault(0x1001, true));
            assert_eq!(rule.alignment_fault(0x1001, false), rule.misaligned_without_store);
        }
    }
}

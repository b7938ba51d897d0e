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
//!   the low 8 (CR2 is RDI+8 when both halves are unmapped), an AMD EPYC the low 8 first.
//!
//! Each probe runs one `maskmovdqu` in a forked child and reads how the child ended: SIGBUS is
//! the kernel's signal for #AC, SIGSEGV for #PF.
//!
//! `repe cmpsb` where both operands fault: which address the #PF names (below).
//!
//! `int1` (icebp): the RIP in the SIGTRAP frame a Linux process receives. The CPU reports the
//! #DB trap after the instruction; an AMD EPYC host (issue 3) delivered the instruction's own
//! RIP and Intel Xeon hosts (issue 10) and an AMD EPYC with AVX-512 (2026-12-06) the next one,
//! so it is neither the vendor's nor the architecture's choice alone: it is probed too.

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
    /// Whether the high 8 bytes are checked before the low 8 (when both fault, the #PF names
    /// RDI+8).
    pub high_half_first: bool,
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
        let high_half_first =
            mask_move_high_half_first(&pages).unwrap_or(MaskMoveRule::MEASURED_ON_XEON.high_half_first);
        MaskMoveRule {
            align,
            misaligned_without_store,
            unselected_bytes_fault,
            high_half_first,
        }
    })
}

impl MaskMoveRule {
    /// The Intel Xeon's rule, used if the probe cannot run.
    const MEASURED_ON_XEON: MaskMoveRule = MaskMoveRule {
        align: 8,
        misaligned_without_store: true,
        unselected_bytes_fault: true,
        high_half_first: true,
    };
}

/// Whether `int1` reaches a Linux process with RIP at the instruction rather than after it
/// (probed once; the trap's architectural RIP, after it, if the probe cannot run).
pub fn int1_reports_rip_at_instruction() -> bool {
    static AT_INSTRUCTION: OnceLock<bool> = OnceLock::new();
    *AT_INSTRUCTION.get_or_init(|| int1_rip_offset() == Some(0))
}

/// Where the probe's `int1` stands, for its SIGTRAP handler.
static INT1_AT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The SIGTRAP frame's RIP minus the `int1`'s address, as the forked child's exit status.
extern "C" fn exit_with_int1_offset(_: libc::c_int, _: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `ucontext_t` to an SA_SIGINFO handler.
    let rip = unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RIP as usize] } as u64;
    let offset = rip.wrapping_sub(INT1_AT.load(std::sync::atomic::Ordering::Relaxed));
    // SAFETY: `_exit` is async-signal-safe and ends the probe's child.
    unsafe { libc::_exit(if offset <= 1 { offset as i32 } else { 2 }) }
}

/// Runs `int1` in a forked child: the SIGTRAP frame's RIP minus the instruction's address, or
/// None if the probe could not run or the offset was neither 0 nor 1.
fn int1_rip_offset() -> Option<u64> {
    let end = in_child(|| {
        on_signal(libc::SIGTRAP, exit_with_int1_offset);
        // SAFETY: records where the `int1` is and runs it; the SIGTRAP handler exits.
        unsafe {
            std::arch::asm!(
                "lea {t}, [rip + 2f]",
                "mov [{at}], {t}",
                "2:",
                ".byte 0xf1", // int1 (the assembler does not know the mnemonic)
                t = out(reg) _,
                at = in(reg) INT1_AT.as_ptr(),
            )
        }
    });
    match end? {
        ChildEnd::Exited(offset @ (0 | 1)) => Some(offset as u64),
        _ => None,
    }
}

/// Whether `repe cmpsb` reads DS:[RSI] before ES:[RDI] (probed once; when both fault, the #PF
/// names the first read). Intel Xeons read RDI first, as every other `cmps` form does on both
/// vendors; an AMD EPYC with AVX-512 reads RSI first for `repe cmpsb` alone (measured
/// natively: `cmpsb`, `repne cmpsb`, `repe cmpsw/d/q` read RDI first there, at counts 1-64 and
/// either direction).
pub fn repe_cmpsb_reads_source_first() -> bool {
    static SOURCE_FIRST: OnceLock<bool> = OnceLock::new();
    *SOURCE_FIRST.get_or_init(|| ProbePages::new().and_then(|pages| repe_cmpsb_reads_rdi_first(&pages)) == Some(false))
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

/// Whether a `maskmovdqu` straddling a read-only page (its low 8 bytes) and an unmapped one
/// (its high 8) faults on the unmapped one first, or None if the probe could not run.
fn mask_move_high_half_first(pages: &ProbePages) -> Option<bool> {
    second_page_faults_first(pages, libc::PROT_READ, |second| {
        // SAFETY: stores all 16 bytes at 8 bytes before `second`, which faults.
        unsafe {
            std::arch::asm!(
                "pcmpeqb xmm1, xmm1",
                "maskmovdqu xmm0, xmm1",
                in("rdi") second - 8,
                out("xmm0") _,
                out("xmm1") _,
            )
        }
    })
}

/// Whether `repe cmpsb` with DS:[RSI] and ES:[RDI] both unmapped faults at RDI (its source in
/// the first probe page, its destination in the second), or None if the probe could not run.
fn repe_cmpsb_reads_rdi_first(pages: &ProbePages) -> Option<bool> {
    second_page_faults_first(pages, libc::PROT_NONE, |second| {
        // SAFETY: compares three bytes of two unmapped pages, which faults.
        unsafe {
            std::arch::asm!(
                "repe cmpsb",
                inout("rsi") second - 4096 + 0x123 => _,
                inout("rdi") second + 0x456 => _,
                inout("rcx") 3u64 => _,
            )
        }
    })
}

/// Runs `fault(second)` in a forked child whose copy of the probe's first page has protection
/// `first_protection` (`second` is the unmapped page after it); `fault` must raise SIGSEGV.
/// Whether the fault's address was in the second page, or None if the probe could not run.
fn second_page_faults_first(pages: &ProbePages, first_protection: i32, fault: impl FnOnce(u64)) -> Option<bool> {
    let end = in_child(|| {
        // SAFETY: changes the protection of the child's copy of the probe's first page.
        unsafe { libc::mprotect(pages.writable as *mut libc::c_void, 4096, first_protection) };
        FAULT_BOUNDARY.store(pages.unmapped, std::sync::atomic::Ordering::Relaxed);
        on_signal(libc::SIGSEGV, exit_with_fault_side);
        fault(pages.unmapped);
    });
    match end? {
        ChildEnd::Exited(side @ (0 | 1)) => Some(side == 1),
        _ => None,
    }
}

/// The first address past the probe's read-only page, for [`exit_with_fault_side`].
static FAULT_BOUNDARY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Exits the probe's child with 1 if the SIGSEGV's address is at or past
/// [`FAULT_BOUNDARY`], 0 if before it.
extern "C" fn exit_with_fault_side(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid `siginfo_t` to an SA_SIGINFO handler.
    let at = unsafe { (*info).si_addr() } as u64;
    let past = at >= FAULT_BOUNDARY.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: `_exit` is async-signal-safe and ends the probe's child.
    unsafe { libc::_exit(past as i32) }
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
    let end = in_child(|| {
        // The default SIGBUS/SIGSEGV actions (the parent's handlers are for translated code):
        // a fault ends the child.
        // SAFETY: SIG_DFL is a valid disposition for both.
        unsafe {
            libc::signal(libc::SIGBUS, libc::SIG_DFL);
            libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        }
        // SAFETY: stores through `maskmovdqu` into the child's copy of the probe pages (or
        // faults) with AC as asked, then clears AC.
        unsafe {
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
            )
        }
        // SAFETY: ends the child, which completed the store.
        unsafe { libc::_exit(0) }
    });
    Some(match end? {
        ChildEnd::Signaled(signal) => signal,
        ChildEnd::Exited(_) => 0,
    })
}

/// How a probe's forked child ended.
enum ChildEnd {
    Exited(i32),
    Signaled(i32),
}

/// Runs `body` in a forked child and waits for it: how the child ended (exit status 3 if `body`
/// returned), or None if it could not be forked or waited for. `body` must do only what is
/// async-signal-safe (the child of a threaded process): system calls, inline assembly, `_exit`.
fn in_child(body: impl FnOnce()) -> Option<ChildEnd> {
    // SAFETY: fork duplicates this process; the child runs `body` (async-signal-safe, as
    // required above) and `_exit`s, never returning into the parent's code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return None;
    }
    if pid == 0 {
        body();
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(3) }
    }
    let mut status = 0;
    // SAFETY: waits for the child forked above; `status` is a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    if waited != pid {
        return None;
    }
    if libc::WIFSIGNALED(status) {
        Some(ChildEnd::Signaled(libc::WTERMSIG(status)))
    } else {
        Some(ChildEnd::Exited(libc::WEXITSTATUS(status)))
    }
}

/// Routes `signal` to `handler` (SA_SIGINFO), in a probe's child.
fn on_signal(signal: libc::c_int, handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)) {
    // SAFETY: a zeroed sigaction with a handler, SA_SIGINFO and an empty mask is valid; the
    // handlers only read their arguments and `_exit`.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = handler as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigaction(signal, &action, std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn int1_probe_sees_the_trap() {
        // The kernel reports the trap at the instruction or after it; anything else (no signal,
        // another offset) means the probe itself is broken.
        let offset = int1_rip_offset();
        eprintln!("int1 RIP offset: {offset:?}");
        assert!(matches!(offset, Some(0 | 1)), "{offset:?}");
    }

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

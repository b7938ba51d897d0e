//! What a call to [`crate::Translator::run`] ends with.

/// Exception vectors the translator raises or reports.
pub mod vector {
    pub const DE: u8 = 0;
    pub const DB: u8 = 1;
    pub const NMI: u8 = 2;
    pub const BP: u8 = 3;
    pub const OF: u8 = 4;
    pub const UD: u8 = 6;
    pub const DF: u8 = 8;
    pub const GP: u8 = 13;
    pub const PF: u8 = 14;
    pub const AC: u8 = 17;
    pub const XM: u8 = 19;
}

/// A guest exception, with guest state as the CPU leaves it when it delivers the exception:
/// RIP at the faulting instruction for faults, after it for traps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestException {
    pub vector: u8,
    pub error_code: Option<u32>,
    /// Faulting linear address (CR2) for `#PF`.
    pub address: Option<u64>,
}

impl GuestException {
    pub fn new(vector: u8) -> Self {
        GuestException {
            vector,
            error_code: None,
            address: None,
        }
    }
    pub fn gp(error_code: u32) -> Self {
        GuestException {
            vector: vector::GP,
            error_code: Some(error_code),
            address: None,
        }
    }
    pub fn page_fault(address: u64, error_code: u32) -> Self {
        GuestException {
            vector: vector::PF,
            error_code: Some(error_code),
            address: Some(address),
        }
    }
}

impl std::fmt::Display for GuestException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self.vector {
            0 => "#DE",
            1 => "#DB",
            3 => "#BP",
            4 => "#OF",
            6 => "#UD",
            7 => "#NM",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            19 => "#XM",
            _ => return write!(f, "vector {:#x}", self.vector),
        };
        write!(f, "{name}")?;
        if let Some(addr) = self.address {
            write!(f, " at {addr:#x}")?;
        }
        Ok(())
    }
}

/// Why [`crate::Translator::run`] returned. Guest state is up to date in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest raised an exception; for software interrupts `int n` the vector is `n`.
    Exception(GuestException),
    /// User-mode `syscall`: RIP is after it, RCX/R11 hold what the CPU puts there. The caller
    /// performs the call and runs again.
    Syscall,
    /// Kernel-mode `hlt`.
    Halt,
    /// The block budget given to `run` was used up.
    BlockLimit,
    /// An asynchronous host signal the embedder asked for ([`crate::host::signals::catch_async`])
    /// arrived; guest state is at a block boundary.
    Interrupted,
    /// System mode: the platform asked to stop (a port write returned `PortOutcome::Stop`).
    Stopped,
    /// System mode: a fault while delivering a double fault (the CPU shuts down).
    TripleFault(GuestException),
    /// A debugger breakpoint ([`crate::Translator::add_breakpoint`]) at the guest RIP: nothing
    /// there has run yet.
    Breakpoint,
    /// System mode with [`crate::Translator::set_user_exit`]: the guest has just entered CPL3;
    /// nothing of the user code has run yet.
    UserMode,
    /// System mode with [`crate::Translator::set_kernel_exit`]: the guest has just entered
    /// CPL0 from CPL3 (a system call, an exception or an interrupt was delivered); nothing of
    /// the kernel code has run yet.
    KernelMode,
    /// System mode with [`crate::Translator::set_extended_state_stale`]: the instruction at the
    /// guest RIP (or the block it starts) reads or writes the extended state (x87, SSE, AVX,
    /// MXCSR, XSAVE…), whose live copy the embedder holds. Nothing of it has run; the
    /// embedder puts the live state into `state_mut().xsave`, clears the mark and runs again.
    ExtendedStateNeeded,
    /// Single-stepping ([`crate::Translator::set_single_step`]): one guest instruction
    /// completed, or the exception it raised was delivered (system mode: RIP is at the
    /// handler's first instruction, which has not run).
    Stepped,
}

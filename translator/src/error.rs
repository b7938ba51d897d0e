//! Errors the translator reports to its caller. Guest faults are not errors (they are
//! [`crate::Exit::Exception`]); these are conditions the engine cannot handle.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum TranslateError {
    #[error("unsupported instruction `{text}` ({code}) at guest RIP {rip:#x}, bytes {bytes}")]
    Unsupported {
        rip: u64,
        text: String,
        code: String,
        bytes: String,
    },
    #[error("failed to re-encode `{text}` at guest RIP {rip:#x}: {reason}")]
    Encode { rip: u64, text: String, reason: String },
    #[error(
        "access of {size} bytes at guest address {va:#x} (guest RIP {rip:#x}) crosses a page boundary into \
         non-contiguous host memory; the soft-MMU does not split accesses yet"
    )]
    SplitAccess { rip: u64, va: u64, size: u64 },
    #[error("the code cache is full")]
    CodeCacheFull,
    #[error("host: {0}")]
    Host(String),
}

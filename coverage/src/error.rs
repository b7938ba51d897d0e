//! Errors of the coverage pipeline.
//!
//! Per-file problems during a scan (a truncated ELF, a broken `.deb`) are *not* errors: they
//! become [`crate::corpus::ScanWarning`]s so that one bad file never stops a distribution-wide
//! scan. `CoverageError` is for things that stop the whole run: an unreadable root, a popcon file
//! that does not exist, an unknown instruction name in a supported-set file.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum CoverageError {
    /// The message already holds the OS error; the field is not a `source` (a printed error
    /// chain would repeat it).
    #[error("cannot read {path}: {}", hbt_translator::host::files::os_message(error))]
    Io { path: PathBuf, error: std::io::Error },
    #[error(transparent)]
    File(#[from] hbt_translator::host::files::FileError),
    #[error("{path}: no usable popularity records (is this a popcon by_inst file?)")]
    EmptyPopcon { path: PathBuf },
    #[error("{path}:{line}: unknown instruction `{name}` (expected an iced Code name such as `Add_rm32_r32` or a mnemonic such as `add`)")]
    UnknownInstruction { path: PathBuf, line: usize, name: String },
    #[error("{path}: not an hbt coverage part file: {detail}")]
    BadPart { path: PathBuf, detail: String },
    #[error("part files disagree: {0}")]
    IncompatibleParts(String),
    #[error("invalid shard `{0}`: expected K/N with 1 <= K <= N, e.g. 2/8")]
    BadShard(String),
    #[error("{0}")]
    Invalid(String),
}

impl CoverageError {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        CoverageError::Io {
            path: path.into(),
            error,
        }
    }
}

pub type Result<T, E = CoverageError> = std::result::Result<T, E>;

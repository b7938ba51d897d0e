//! `hbt exec --census FILE`: every translator of the process (one per guest thread) counts the
//! forms it translates into one shared table, which is added to FILE when the process ends —
//! by exit, by a fatal signal, or by `execve` (the new program, re-executed under `hbt exec`,
//! is told the same FILE and adds its own). A forked child starts from zero: its parent reports
//! what came before the fork. See `hbt_coverage::census` for the file.

use hbt_translator::CensusCounts;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

struct Census {
    path: PathBuf,
    what: String,
    counts: Arc<CensusCounts>,
}

static CENSUS: OnceLock<Census> = OnceLock::new();

/// Starts the process's census into `path`, described as `what` if the file is new.
pub fn start(path: &Path, what: String) -> std::io::Result<()> {
    // Absolute: the guest may change directory before it ends.
    let path = std::path::absolute(path)?;
    // A file that cannot be written, or is something else, is an error now, not at the end.
    hbt_coverage::census::add_to_file(&path, &what, &[])?;
    let _ = CENSUS.set(Census {
        path,
        what,
        counts: CensusCounts::new(),
    });
    Ok(())
}

/// The shared table, when a census is recorded (for each new translator).
pub fn counts() -> Option<Arc<CensusCounts>> {
    CENSUS.get().map(|c| Arc::clone(&c.counts))
}

/// The census file, for the `hbt exec` that an `execve` starts.
pub fn path() -> Option<&'static Path> {
    CENSUS.get().map(|c| c.path.as_path())
}

/// Adds what this process translated so far to the file and starts from zero.
pub fn flush() {
    let Some(c) = CENSUS.get() else { return };
    let forms = c.counts.forms();
    c.counts.clear();
    if let Err(e) = hbt_coverage::census::add_to_file(&c.path, &c.what, &forms) {
        diag!("hbt: --census {}: {e}", c.path.display());
    }
}

/// In a forked child: its parent reports what was translated before the fork.
pub fn forked() {
    if let Some(c) = CENSUS.get() {
        c.counts.clear();
    }
}

//! The engines that run a loaded guest: [`kvm`] (hardware virtualization through /dev/kvm) and
//! [`bt`] (hbt's binary translator in system mode, no /dev/kvm needed). Both start from the
//! same loaded RAM and long-mode entry state (`boot.rs`), drive the same device models
//! (`devices/`) and end with a [`Finished`]: how the run ended, where the guest was, and the
//! engine's counters for `--stats`. [`debug`] is the interface a debugger (`--gdb`) drives.

pub mod bt;
pub mod debug;
pub mod hybrid;
pub mod kvm;

use super::devices::{progress, Action, Buses};
use super::loader::Entry;
use super::memory::GuestMemory;
use std::time::Instant;

/// What every engine starts from.
pub struct Setup<'a> {
    pub mem: &'a mut GuestMemory,
    pub entry: &'a Entry,
    /// When `hbt run` started (boot-progress marks are relative to it).
    pub started: Instant,
    /// stdin is a terminal (the serial port's input is interactive).
    pub interactive: bool,
    /// `--gdb`: the guest waits at its first instruction for a debugger on this socket.
    pub gdb: Option<super::gdb::Listener>,
    /// `--stats`/`--stats-json`: collect what costs a little to measure (time in translated
    /// code, soft-MMU TLB hits).
    pub detailed_stats: bool,
    /// `--hybrid-policy`: which engine runs guest user code under `--accel hybrid`.
    pub hybrid_policy: hybrid::policy::Mode,
    /// `--hybrid-table-frames`: the page-table pool's size (None: the whole region).
    pub hybrid_table_frames: Option<u64>,
    /// `--census`: the translator counts the forms it translates here.
    pub census: Option<std::sync::Arc<hbt_translator::CensusCounts>>,
}

/// Why a run ended.
#[derive(Debug)]
pub enum End {
    ExitPort(u32),
    Reset,
    /// ACPI soft-off (S5).
    PowerOff,
    Halted,
    Timeout,
    /// SIGINT (Ctrl-C), SIGTERM or SIGHUP: the signal number.
    Interrupted(i32),
    /// stdout was closed (EPIPE on the console).
    OutputClosed,
    /// The debugger killed the guest (gdb's `kill`).
    Killed,
}

/// How a run ended, with what `--stats` reports.
pub struct Finished {
    pub end: End,
    /// Registers and the instruction at RIP when the run ended (for the end message).
    pub location: String,
    pub buses: Buses,
    pub marks: progress::Marks,
    /// Seconds in the engine's run loop.
    pub seconds_run_loop: f64,
    /// Engine counters: lines for `--stats` and fields for `--stats-json`.
    pub stats_lines: Vec<String>,
    pub stats_json: serde_json::Map<String, serde_json::Value>,
}

/// How a device's request ends the run (`None`: it does not).
pub fn ending(action: Action) -> Option<End> {
    match action {
        Action::Continue => None,
        Action::Exit(v) => Some(End::ExitPort(v)),
        Action::Reset => Some(End::Reset),
        Action::PowerOff => Some(End::PowerOff),
        Action::OutputClosed => Some(End::OutputClosed),
    }
}

/// `(name, count)` pairs as `name 3, other 5`, or `none`.
pub fn fmt_counts(it: impl Iterator<Item = (String, u64)>) -> String {
    let v: Vec<String> = it.map(|(k, n)| format!("{k} {n}")).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

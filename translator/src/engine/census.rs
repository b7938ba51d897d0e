//! The run-time census (`hbt exec --census`, `hbt run --census`): which instruction forms the
//! translator translated during a run, and how many translated instances of each. It answers
//! what static analysis of a distribution cannot: which instructions a workload actually
//! reaches (`hbt coverage --compare` reads the file).
//!
//! Counting costs one relaxed atomic add per translated instruction and nothing per execution:
//! translation is rare next to running translated code (an execution count per block would need
//! a counter update in every block's code). The counts are shared, so every thread's translator
//! of a process adds to one table.

use super::*;
use iced_x86::Code;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Translated instances per instruction form (indexed by `Code as usize`).
pub struct CensusCounts(Vec<AtomicU64>);

impl CensusCounts {
    pub fn new() -> Arc<Self> {
        Arc::new(CensusCounts(Code::values().map(|_| AtomicU64::new(0)).collect()))
    }

    /// The forms counted so far with their counts, most first.
    pub fn forms(&self) -> Vec<(Code, u64)> {
        let mut forms: Vec<(Code, u64)> = Code::values()
            .map(|c| (c, self.0[c as usize].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        forms.sort_by_key(|&(c, n)| (std::cmp::Reverse(n), c as usize));
        forms
    }

    /// Forgets every count (a forked child starts from zero: its parent reports its own).
    pub fn clear(&self) {
        self.0.iter().for_each(|n| n.store(0, Ordering::Relaxed));
    }

    fn add(&self, code: Code) {
        self.0[code as usize].fetch_add(1, Ordering::Relaxed);
    }
}

impl Translator {
    /// Counts the forms translated from now on into `counts`.
    pub fn record_census(&mut self, counts: Arc<CensusCounts>) {
        self.census = Some(counts);
    }
}

/// Counts the instructions of a block just decoded for translation into `census` (the
/// translator's, when recording).
pub(super) fn count_block(census: &Option<Arc<CensusCounts>>, block: &block::DecodedBlock) {
    if let Some(counts) = census {
        for d in &block.instrs {
            counts.add(d.instr.code());
        }
    }
}

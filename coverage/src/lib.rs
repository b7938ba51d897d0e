//! Popularity-weighted x86-64 instruction usage of a Linux distribution.
//!
//! The pipeline (see `DESIGN.md` §3) runs in one direction:
//!
//! 1. [`corpus`] discovers ELF files in an installed root or a directory of `.deb`s and
//!    attributes each to its package;
//! 2. [`sweep`] linearly decodes every executable section with iced-x86 and counts
//!    instruction forms (`iced_x86::Code`) per binary — [`cache`] remembers the result per file;
//! 3. [`footprint`] resolves each package's executables plus their `DT_NEEDED` closure into the
//!    set of instructions the package needs, filtered by a [`cpu_model`];
//! 4. [`popcon`] turns Debian popularity-contest installs into package weights;
//! 5. [`metrics`] computes importance, weighted completeness and the implementation plan;
//! 6. [`report`] renders a table, JSON, CSV or a self-contained HTML page.
//!
//! [`analysis`] composes steps 3–6; [`part`] carries the raw scan of one shard between machines.

pub mod analysis;
pub mod cache;
pub mod census;
pub mod corpus;
pub mod cpu_model;
pub mod error;
pub mod fnv;
pub mod footprint;
pub mod instr_set;
pub mod keys;
pub mod metrics;
pub mod part;
pub mod popcon;
pub mod report;
pub mod sweep;

pub use analysis::{analyze, AnalysisOptions, Granularity};
pub use error::CoverageError;

//! hbt's basic-block x86-64 binary translator.
//!
//! Today this crate holds only the supported-instruction table, which `hbt coverage` consumes
//! (DESIGN §2: coverage asks the translator for its supported set and nothing else). The block
//! builder, rules, emitter, code cache and memory strategies arrive with the translator core.

pub mod supported;

pub use supported::supported_codes;

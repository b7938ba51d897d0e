//! hbt's basic-block x86-64 binary translator (DESIGN §4).
//!
//! Same-ISA translation: guest instructions are re-emitted nearly unchanged with guest GPRs in
//! host GPRs and guest flags in host flags; glue reaches the translator's context through the
//! host GS base. Memory is translated by a strategy — identity or soft-MMU — so the same engine
//! runs user programs (`hbt exec`) and, later, guest kernels inside the VMM.
//!
//! Layout: `state.rs` (guest CPU state), `context.rs` (what glue addresses), `block.rs` (decoder
//! → block), `rules/` (the rule table), `emit/` (host code), `mmu/` (memory strategies),
//! `engine.rs` (dispatcher, cache, chaining), `emulate.rs` (sensitive instructions),
//! `host/` (executable memory, GS base, signals), `harness/` (the differential tester),
//! `supported.rs` (the supported set).

pub mod block;
pub mod context;
pub mod cpu;
pub mod emit;
pub mod emulate;
pub mod engine;
pub mod error;
pub mod exit;
pub mod harness;
pub mod host;
pub mod mmu;
pub mod platform;
pub mod rules;
pub mod state;
pub mod supported;
pub mod system;

pub use engine::census::CensusCounts;
pub use engine::{Config, Stats, Translator};
pub use error::TranslateError;
pub use exit::{Exit, GuestException};
pub use mmu::{GuestRam, MemoryStrategy};
pub use platform::{HostPlatform, Platform, PortOutcome};
pub use state::GuestState;
pub use supported::supported_codes;

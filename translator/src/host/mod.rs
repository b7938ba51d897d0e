//! Host-side plumbing the engine stands on: executable memory, the GS base that points at the
//! context, the host signal handler that turns faults in translated code into guest exceptions,
//! and host CPU feature queries.

pub mod codebuf;
pub mod features;
pub mod gsbase;
pub mod pages;
pub mod signals;

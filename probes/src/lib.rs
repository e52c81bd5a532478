//! The ABI shared by the tracer, the agent and probe packs, and the API probes are written
//! with.
//!
//! Everything here is `#[repr(C)]`: the trampolines the agent JITs lay registers out in
//! memory exactly as these structs say, and the tracer reads the shared counters from
//! outside the target with the same layout. A probe pack needs only this crate.

#[doc(hidden)]
pub mod abi;
pub mod context;
pub mod fork;
pub mod latency;
pub mod mem;
pub mod pack;
pub mod pod;
pub mod prelude;
pub mod trace;

extern crate self as probes;

pub use probes_macros::{at, entry, exit, map};

pub use abi::shared::{ProbeCounters, ProbeKind};
pub use context::{EntryContext, ExitContext, Xmm};

/// A handler run at a function entry (or an instruction, for offset probes).
pub type EntryHandler = fn(&mut EntryContext);

/// A handler run when a probed function returns.
pub type ExitHandler = fn(&mut ExitContext);

//! Probe packs: handlers, maps and events written in Rust, compiled into a cdylib that
//! the tracer loads into a target. Authors use [`crate::prelude`]; [`abi`] is what the
//! tracer, the agent and the macros agree on.

#[doc(hidden)]
pub mod abi;
pub mod ctx;
pub mod emit;
pub mod maps;
pub mod ring;
pub mod shim;

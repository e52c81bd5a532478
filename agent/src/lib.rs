//! The runtime that lives inside the target.
pub mod allocator;
pub mod emitter;
pub mod jit;
pub mod maps;
pub mod relocator;

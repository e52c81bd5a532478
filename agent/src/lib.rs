//! The runtime that lives inside the target: near-code allocation, call emission,
//! prologue relocation, trampolines and the hot path they call.
pub mod allocator;
pub mod api;
pub mod builtin;
pub mod clobbers;
pub mod counting_entry;
pub mod dispatch;
pub mod emitter;
pub mod follow;
pub mod interceptor;
pub mod jit;
pub mod maps;
pub mod memfd;
pub mod pack_loader;
pub mod pack_region;
pub mod relocator;
pub mod shared;
pub mod shared_general;
pub mod thread_state;
pub mod trampoline;

//! The agent cdylib (`libagent.so`), embedded in the tracer at build time.
//!
//! `build.rs` builds it with a nested `cargo build -p agent --lib` in the same profile as
//! the tracer and into its own target directory under `OUT_DIR`, so that `cargo check`,
//! `cargo clippy`, `cargo test` and `cargo build --release` all embed a current agent.

static AGENT_SO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libagent.so"));

/// Bytes of the agent shared object, ready for [`crate::inject::inject`].
pub fn agent_so() -> &'static [u8] {
    AGENT_SO
}

/// A hash of [`agent_so`]'s bytes, computed when the tracer was built (16 hex digits):
/// names the agent's file in the target (see [`crate::library_file::place_hashed`]).
pub fn agent_hash() -> &'static str {
    include_str!(concat!(env!("OUT_DIR"), "/libagent.so.hash"))
}

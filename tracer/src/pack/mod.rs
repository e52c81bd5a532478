//! Probe packs from the tracer's side: reading a pack's descriptors from its ELF file,
//! reading its maps and draining its event ring from the shared region, printing them,
//! and scaffolding a new pack (`tracer new`).
//!
//! `load` gets a pack ready before the target is touched (build, read, resolve); the
//! session loads it next to the agent; `live` prints its events while the target runs
//! and its maps at the end.

pub mod builds;
pub mod descriptors;
pub mod format;
pub mod live;
pub mod load;
pub mod maps;
pub mod pace;
pub mod region;
pub mod report;
pub mod ring;
pub mod scaffold;
pub mod view;

pub use descriptors::{read_pack, PackError, PackInfo};

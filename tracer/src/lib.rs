//! tracer: everything done from outside the target.
pub mod agent_blob;
pub mod agent_thread;
pub mod detached;
pub mod inject;
pub mod launch;
pub mod library_file;
pub mod names;
pub mod pack;
pub mod probeable;
pub mod process_kind;
pub mod refusals;
pub mod remote_call;
pub mod session;
pub mod session_lock;
pub mod spec;
pub mod symbols;
pub mod threads;

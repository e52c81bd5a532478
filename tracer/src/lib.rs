//! tracer: everything done from outside the target.
pub mod agent_blob;
pub mod agent_thread;
pub mod inject;
pub mod launch;
pub mod probeable;
pub mod remote_call;
pub mod session;
pub mod spec;
pub mod symbols;
pub mod threads;

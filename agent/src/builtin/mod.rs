//! Actions built into the agent that run at every probe of a session instead of a
//! pack's handlers, reached through the same handler slots.
pub mod trace;

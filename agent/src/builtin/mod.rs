//! Actions built into the agent for the tracer's built-in options (`--trace`, `--hist`,
//! `--summary`), run with no pack loaded and reached through the same handler slots a
//! pack's handlers use.
pub mod latency;
pub mod trace;

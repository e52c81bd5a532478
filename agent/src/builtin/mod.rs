//! What the agent does by itself for the tracer's built-in options, with no pack loaded.
pub mod latency;

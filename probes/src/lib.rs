//! The ABI shared by tracer, agent and probe packs.

//! tracer: everything done from outside the target.

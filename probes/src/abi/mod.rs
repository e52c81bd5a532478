//! What the tracer and the agent agree on, which a probe pack never imports: the records
//! of the tracer's remote calls into the agent ([`remote`]) and the layout of the shared
//! counter region ([`shared`]). A pack author's API is [`crate::prelude`]; the records a
//! pack's macros expand to are in [`crate::pack::abi`].

pub mod remote;
pub mod shared;

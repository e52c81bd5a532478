//! What a probe pack imports: `use probes::prelude::*;`.

pub use crate::emit;
pub use crate::mem::{read, read_bytes, read_str, StrBuf};
pub use crate::pack::ctx::{EntryCtx, ExitCtx, FullCtx, Reg};
pub use crate::pack::maps::{Counter, HashMap, Histogram, MapKey, MapValue};
pub use crate::pod::Pod;
pub use probes_macros::{at, entry, exit, map};

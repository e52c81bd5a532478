//! Placing emitted code: the glue between the near allocator and the emitter.
//!
//! The emitter needs the final address before the first byte is written, and the
//! allocator needs the size before handing out an address. A block is reserved with a
//! capacity guess, emitted at its address, committed at its real length; code that
//! outgrows the guess is emitted again into a larger block.

use crate::allocator::{AllocError, Block, NearAllocator};
use crate::emitter::{EmitError, Emitter, EncodingCounts, LiteralPool, Policy};
use std::fmt;

/// Why code could not be placed.
#[derive(Debug)]
pub enum JitError {
    Alloc(AllocError),
    Emit(EmitError),
}

impl fmt::Display for JitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JitError::Alloc(e) => e.fmt(f),
            JitError::Emit(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for JitError {}

impl From<AllocError> for JitError {
    fn from(e: AllocError) -> Self {
        JitError::Alloc(e)
    }
}

impl From<EmitError> for JitError {
    fn from(e: EmitError) -> Self {
        JitError::Emit(e)
    }
}

/// Code that was placed and is ready to run.
#[derive(Debug, Clone)]
pub struct Placed<T> {
    /// Address of the first byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: usize,
    /// Encodings the calls and jumps got.
    pub counts: EncodingCounts,
    /// Whatever the builder returned.
    pub value: T,
}

/// The literal slots of a reserved block's chunk, shared between blocks by value.
struct ChunkSlots<'a> {
    alloc: &'a mut NearAllocator,
    block: Block,
}

impl LiteralPool for ChunkSlots<'_> {
    fn slot(&mut self, value: u64) -> Option<u64> {
        self.alloc.slot(&self.block, value, true)
    }
}

/// Emit code with `build` into a block that reaches every address in `near` (anywhere when
/// empty), calls and jumps getting encodings by `policy`. `build` may run more than once.
pub fn place<T>(
    alloc: &mut NearAllocator,
    near: &[u64],
    policy: Policy,
    mut build: impl FnMut(&mut Emitter) -> Result<T, EmitError>,
) -> Result<Placed<T>, JitError> {
    let mut capacity = 256;
    loop {
        let block = alloc.reserve(near, capacity)?;
        let mut slots = ChunkSlots {
            alloc: &mut *alloc,
            block,
        };
        let mut e = Emitter::new(block.addr)
            .with_pool(&mut slots)
            .with_policy(policy);
        let value = match build(&mut e) {
            Ok(v) => v,
            Err(err) => {
                drop(e);
                alloc.cancel(block);
                return Err(err.into());
            }
        };
        let counts = *e.counts();
        let code = e.finish();
        let code = match code {
            Ok(c) => c,
            Err(err) => {
                alloc.cancel(block);
                return Err(err.into());
            }
        };
        if code.len() as u64 > block.capacity {
            alloc.cancel(block);
            capacity = (code.len() as u64).next_power_of_two();
            continue;
        }
        alloc.commit(block, &code);
        return Ok(Placed {
            addr: block.addr,
            len: code.len(),
            counts,
            value,
        });
    }
}

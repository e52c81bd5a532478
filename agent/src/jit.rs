//! Placing emitted code: the glue between the near allocator and the emitter.
//!
//! The emitter needs the final address before the first byte is written, and the
//! allocator needs the size before handing out an address. As LuaJIT's `lj_mcode.c`
//! does, the rest of a chunk is reserved (nothing else is carved from it meanwhile), the
//! code is emitted at its address and committed at its real length. Only code that does
//! not fit what is left of the chunk is emitted again, into a chunk with room for it.

use crate::allocator::{AllocError, Block, NearAllocator};
use crate::emitter::{EmitError, Emitter, EncodingCounts, LiteralPool, Policy};
use crate::relocator::Refusal;

/// Why code could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum JitError {
    #[error(transparent)]
    Alloc(#[from] AllocError),
    #[error(transparent)]
    Emit(#[from] EmitError),
    /// The relocator cannot re-encode the stolen instructions at the address the code
    /// got (a RIP-relative operand beyond reach from there, for instance).
    #[error(transparent)]
    Refused(#[from] Refusal),
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
/// empty), calls and jumps getting encodings by `policy`. `build` runs again only when
/// the code did not fit the rest of the chunk it was emitted for.
pub fn place<T>(
    alloc: &mut NearAllocator,
    near: &[u64],
    policy: Policy,
    mut build: impl FnMut(&mut Emitter) -> Result<T, JitError>,
) -> Result<Placed<T>, JitError> {
    // The least room the chunk must have: grows to the code's length when a chunk
    // turns out too full for it.
    let mut min = 1;
    loop {
        let block = alloc.reserve_rest(near, min)?;
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
                return Err(err);
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
        if code.len() as u64 > alloc.room(&block) {
            alloc.cancel(block);
            min = code.len() as u64;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::{CHUNK_SIZE, LINE};
    use crate::emitter::CallEncoding;
    use iced_x86::{Code, Decoder, DecoderOptions};

    fn near() -> u64 {
        near as *const () as u64
    }

    /// The placed code, read back through its executable view.
    fn read(p: &Placed<()>) -> Vec<u8> {
        // SAFETY: `p.addr..p.addr + p.len` is committed code in an r-x mapping the
        // allocator, alive for the caller, owns.
        unsafe { std::slice::from_raw_parts(p.addr as *const u8, p.len) }.to_vec()
    }

    /// `slots` calls through distinct literal slots, then `int3` up to `len` bytes.
    fn with_slots(e: &mut Emitter, slots: u64, len: usize) -> Result<(), EmitError> {
        for i in 0..slots {
            e.call(0x1000 + i)?;
        }
        e.bytes(&vec![0xcc; len - e.len()]);
        Ok(())
    }

    /// Commits `len` bytes into a fresh allocator's first chunk, leaving the rest.
    fn chunk_with_room(room: u64) -> NearAllocator {
        let mut a = NearAllocator::new().unwrap();
        let used = CHUNK_SIZE - room;
        let b = a.reserve(&[near()], used).unwrap();
        a.commit(b, &vec![0x90; used as usize]);
        assert_eq!(a.chunks().len(), 1);
        a
    }

    #[test]
    fn code_of_any_size_is_emitted_once() {
        // 256 bytes was the old first guess: code beyond it was emitted twice.
        for len in [16, 1000, 20_000] {
            let mut a = NearAllocator::new().unwrap();
            let mut runs = 0;
            let p = place(&mut a, &[near()], Policy::Best, |e| {
                runs += 1;
                e.bytes(&vec![0x90; len]);
                Ok(())
            })
            .unwrap();
            assert_eq!((runs, p.len), (1, len));
            assert_eq!(read(&p), vec![0x90; len]);
        }
    }

    /// Places 150 bytes of code with five `call [rip+slot]`s; returns it and how many
    /// times it was emitted.
    fn place_five_slot_calls(a: &mut NearAllocator) -> (Placed<()>, u32) {
        let mut runs = 0;
        let p = place(a, &[near()], Policy::Force(CallEncoding::RipSlot), |e| {
            runs += 1;
            Ok(with_slots(e, 5, 150)?)
        })
        .unwrap();
        (p, runs)
    }

    #[test]
    fn slots_taken_while_emitting_keep_their_own_lines() {
        // 300 bytes left: 150 bytes of code and one literal line fit.
        let mut a = chunk_with_room(300);
        let (start, end) = a.chunks()[0];
        let (p, runs) = place_five_slot_calls(&mut a);
        assert_eq!(runs, 1);
        assert!(start <= p.addr && p.addr + p.len as u64 <= end);
        check_slots(&p, 5);
    }

    #[test]
    fn code_the_rest_of_the_chunk_cannot_hold_moves_to_another() {
        // 208 bytes left, but the literal line the code asks for takes 64 of them.
        let mut a = chunk_with_room(208);
        let (start, end) = a.chunks()[0];
        let (p, runs) = place_five_slot_calls(&mut a);
        assert_eq!(runs, 2, "emitted again for the new chunk");
        assert!(p.addr + p.len as u64 <= start || p.addr >= end);
        check_slots(&p, 5);
        // The first chunk is still usable for code that fits.
        let small = place(&mut a, &[near()], Policy::Best, |e| {
            e.bytes(&[0xc3; 16]);
            Ok(())
        })
        .unwrap();
        assert!(start <= small.addr && small.addr < end);
    }

    /// Each `call [rip+slot]` of `p` reads its own target from a slot outside the code's
    /// 64-byte lines.
    fn check_slots(p: &Placed<()>, n: u64) {
        let code = read(p);
        let calls: Vec<_> = Decoder::with_ip(64, &code, p.addr, DecoderOptions::NONE)
            .into_iter()
            .filter(|i| i.code() == Code::Call_rm64)
            .collect();
        assert_eq!(calls.len() as u64, n);
        let code_lines = (p.addr / LINE)..=((p.addr + p.len as u64 - 1) / LINE);
        for (i, c) in calls.iter().enumerate() {
            let slot = c.ip_rel_memory_address();
            assert!(
                !code_lines.contains(&(slot / LINE)),
                "slot {slot:#x} in code"
            );
            // SAFETY: the slot is an aligned 8-byte word of a chunk the allocator owns.
            let v = unsafe { (slot as *const u64).read_volatile() };
            assert_eq!(v, 0x1000 + i as u64);
        }
    }
}

//! The trampoline of a handler-less entry probe, written as bytes: count the hit inline,
//! run the relocated instructions, jump back. Nothing is called, so nothing else is
//! needed: the general path (every register saved around `on_entry`) that such a probe
//! used to carry could never be reached from its fast path.
//!
//! Its shape is fixed, so it is written without an assembler (iced's was a large part of
//! the time to prepare 10,000 probes) and checked by golden listings (bytes beside their
//! disassembly) in `agent/tests/counting_entry_golden.rs`:
//!
//! ```text
//! push rax                                  ; kept below rsp, in the callee's red zone
//! movabs rax, counters
//! cmp qword ptr fs:[tls+BUSY], 0            ; inside a handler of this thread?
//! jne skipped
//! test byte ptr [rax+flags], ENABLED
//! je done
//! push rcx                                  ; with shards (see crate::shared):
//! mov ecx, dword ptr fs:[rseq cpu_id]       ;   the CPU's shard of the slot
//! and ecx, shards-1
//! shl ecx, 6
//! lock inc qword ptr [rax+rcx+64+hits]
//! pop rcx                                   ; without: lock inc qword ptr [rax+hits]
//! done:
//! pop rax
//! <relocated stolen instructions>
//! jmp site+len
//! skipped:
//! lock inc qword ptr [rax+skipped]
//! jmp done
//! ```
//!
//! 64 bytes with shards, 47 without, relocated instructions aside. Every register and
//! `rsp` are as at the site when the relocated instructions run; the bytes below `rsp`
//! it writes are the callee's red zone, not yet used at a function entry, and only the
//! flags change, which are dead at a call boundary (the rule of `crate::trampoline`).

use crate::emitter::{CallEncoding, EmitError, Emitter};
use crate::relocator::{self, Relocated, Stolen};
use crate::shared::Sharding;
use crate::thread_state::layout as tl;
use probes::abi::shared::{flags, ProbeCounters, Shard};
use std::mem::offset_of;

/// What the counting path needs, all fixed for the process but `counters`.
#[derive(Clone, Copy, Debug)]
pub struct CountingEntry {
    /// The thread state's offset from the thread pointer.
    pub tls: i32,
    pub counters: *const ProbeCounters,
    /// None when the region has no shards (no rseq area).
    pub sharding: Option<Sharding>,
}

const C_HITS: u8 = offset_of!(ProbeCounters, hits) as u8;
const C_SKIPPED: u8 = offset_of!(ProbeCounters, skipped) as u8;
const C_FLAGS: u8 = offset_of!(ProbeCounters, flags) as u8;
/// Shard `i` of a slot is at `(i << 6) + SHARDS` from its first line.
const SHARDS: usize = std::mem::size_of::<ProbeCounters>();
const _: () = assert!(std::mem::size_of::<Shard>() == 64);
const _: () = assert!(offset_of!(Shard, hits) == offset_of!(ProbeCounters, hits));
const _: () = assert!(
    SHARDS + offset_of!(Shard, hits) < 128,
    "disp8 of the shard's hits"
);
const _: () = assert!(flags::ENABLED < 256);

const PUSH_RAX: u8 = 0x50;
const PUSH_RCX: u8 = 0x51;
const POP_RCX: u8 = 0x59;
const POP_RAX: u8 = 0x58;

/// Emit the trampoline at the emitter's address; a refusal from the relocator comes back
/// as the inner error. Returns the relocated instructions.
pub fn emit(
    e: &mut Emitter,
    c: CountingEntry,
    stolen: &Stolen,
) -> Result<Result<Relocated, relocator::Refusal>, EmitError> {
    let start = e.ip();
    // The jump to `skipped` crosses the relocated bytes: short when they are short.
    for short in [true, false] {
        let head = head(c, short);
        let tail_ip = start + head.bytes.len() as u64;
        let relocated = match relocator::relocate(stolen, tail_ip) {
            Ok(r) => r,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let back = if relocated.falls_through { 5 } else { 0 };
        let skipped = head.bytes.len() + relocated.bytes.len() + back;
        let Some(jne) = head.jne_skipped(skipped, short) else {
            continue;
        };
        let mut code = head.bytes;
        code[head.jne_at..head.jne_at + jne.len()].copy_from_slice(&jne);
        e.bytes(&code);
        e.bytes(&relocated.bytes);
        if let Some(encoding) = relocated.call_jump {
            e.record(encoding);
        }
        if relocated.falls_through {
            e.branch_with(relocated.resume, false, CallEncoding::Rel32)?;
        }
        // skipped: lock inc qword ptr [rax+skipped] ; jmp done
        e.bytes(&[0xf0, 0x48, 0xff, 0x40, C_SKIPPED]);
        let done_ip = start + head.done as u64;
        let rel8 = done_ip as i64 - (e.ip() + 2) as i64;
        match i8::try_from(rel8) {
            Ok(r) => e.bytes(&[0xeb, r as u8]),
            Err(_) => {
                let rel32 = done_ip as i64 - (e.ip() + 5) as i64;
                e.bytes(&[0xe9]);
                e.bytes(&(rel32 as i32).to_le_bytes());
            }
        }
        return Ok(Ok(relocated));
    }
    unreachable!("a rel32 jump reaches any trampoline length")
}

/// The code up to the relocated instructions, with the jump to `skipped` left blank.
struct Head {
    bytes: Vec<u8>,
    /// Offset of the `jne skipped`, and of `done` (the `pop rax`).
    jne_at: usize,
    done: usize,
}

impl Head {
    /// `jne skipped` for `skipped` at that offset from the trampoline's start, or None
    /// when the short form does not reach.
    fn jne_skipped(&self, skipped: usize, short: bool) -> Option<Vec<u8>> {
        if short {
            let rel = skipped as i64 - (self.jne_at + 2) as i64;
            let r = i8::try_from(rel).ok()?;
            Some(vec![0x75, r as u8])
        } else {
            let rel = (skipped as i64 - (self.jne_at + 6) as i64) as i32;
            let mut v = vec![0x0f, 0x85];
            v.extend_from_slice(&rel.to_le_bytes());
            Some(v)
        }
    }
}

fn head(c: CountingEntry, short: bool) -> Head {
    let mut b = Vec::with_capacity(64);
    b.push(PUSH_RAX);
    // movabs rax, counters
    b.extend_from_slice(&[0x48, 0xb8]);
    b.extend_from_slice(&(c.counters as u64).to_le_bytes());
    // cmp qword ptr fs:[tls+BUSY], 0
    b.extend_from_slice(&[0x64, 0x48, 0x83, 0x3c, 0x25]);
    b.extend_from_slice(&(c.tls + tl::BUSY).to_le_bytes());
    b.push(0);
    let jne_at = b.len();
    b.extend_from_slice(if short {
        &[0x75, 0][..]
    } else {
        &[0x0f, 0x85, 0, 0, 0, 0]
    });
    // test byte ptr [rax+flags], ENABLED ; je done
    b.extend_from_slice(&[0xf6, 0x40, C_FLAGS, flags::ENABLED as u8]);
    let je_at = b.len();
    b.extend_from_slice(&[0x74, 0]);
    match c.sharding {
        Some(s) => {
            b.push(PUSH_RCX);
            // mov ecx, dword ptr fs:[cpu_id]
            b.extend_from_slice(&[0x64, 0x8b, 0x0c, 0x25]);
            b.extend_from_slice(&s.cpu_offset.to_le_bytes());
            // and ecx, mask (the mask is below 128: at most MAX_SHARDS shards)
            b.extend_from_slice(&[0x83, 0xe1, s.mask() as u8]);
            // shl ecx, 6
            b.extend_from_slice(&[0xc1, 0xe1, 6]);
            // lock inc qword ptr [rax+rcx+SHARDS+hits]
            b.extend_from_slice(&[0xf0, 0x48, 0xff, 0x44, 0x08, (SHARDS as u8) + C_HITS]);
            b.push(POP_RCX);
        }
        // lock inc qword ptr [rax+hits]
        None => b.extend_from_slice(&[0xf0, 0x48, 0xff, 0x40, C_HITS]),
    }
    let done = b.len();
    b[je_at + 1] = (done - (je_at + 2)) as u8;
    b.push(POP_RAX);
    Head {
        bytes: b,
        jne_at,
        done,
    }
}

const _: () = assert!(crate::shared::MAX_SHARDS <= 128);

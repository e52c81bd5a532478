//! The call tracer (`tracer --trace`): at each entry and return of a probed function, a
//! compact binary record (probe id, thread, timestamp counter, argument or return
//! registers, and bounded copies of the `char *` arguments the tracer's prototypes name)
//! goes into an event ring the tracer drains and formats. Layouts: `probes::trace`.
//!
//! The two actions have the pack shim signature, so the hot path runs them from a
//! probe's handler slots like a pack's handlers (re-entrancy guard held: a probed
//! function they reach is skipped, not traced). They call no libc: strings are copied
//! with `process_vm_readv` through a raw system call (`probes::mem`), so a wild pointer
//! argument is shown as such and never faults.

use crate::dispatch::Probe;
use crate::pack_region;
use crate::thread_state::BUSY_OFF_FRAME;
use probes::pack::abi::{self, HitInfo, SHIM_OK};
use probes::pack::ring::Ring;
use probes::trace::{
    mask, str_flags, RecordHead, RecordKind, StartResult, StrHead, MASK_SLOTS, RECORD_HEAD,
    RECORD_MAX, STR_HEAD, STR_MAX, STR_RETURN,
};
use probes::{EntryContext, ExitContext};
use std::arch::{asm, global_asm};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Mutex;

static RING: Ring = Ring::new();
/// The per-probe string masks in the region (null before the first start).
static MASKS: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// The region of the last session, reused (emptied) by the next one with the same ring
/// size: a region cannot be unmapped while a thread may still be in an action.
static REGION: Mutex<Option<Region>> = Mutex::new(None);

/// The trace region: its memfd, where it is mapped, its length and its ring's size.
struct Region {
    fd: i32,
    /// The file `fd` named when made ([`crate::memfd`]).
    id: crate::memfd::Identity,
    base: usize,
    total: usize,
    ring_bytes: usize,
}

const SYS_GETTID: u64 = 186;

// The calling thread's id, cached in static TLS (initial-exec, as `thread_state`
// explains: no `__tls_get_addr`, no malloc) with the fork generation (`probes::fork`) it
// was read in:
// `gettid` is a system call, which this kind of guest makes expensive (hundreds of ns).
global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 3",
    ".globl tracer_agent_trace_tid",
    ".type tracer_agent_trace_tid,@object",
    ".size tracer_agent_trace_tid, 8",
    "tracer_agent_trace_tid:",
    ".zero 8",
    ".popsection",
);

/// This thread's id: cached, read again after a fork.
fn tid() -> u32 {
    let Some(generation) = probes::fork::generation() else {
        return gettid();
    };
    let slot: *mut u64;
    // SAFETY: `fs:0` is the thread pointer; the variable's TLS offset comes from the GOT,
    // as in `thread_state::current`.
    unsafe {
        asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + tracer_agent_trace_tid@GOTTPOFF]",
            p = out(reg) slot,
            options(nostack, readonly, preserves_flags),
        );
    }
    // SAFETY: this thread's own 8 bytes of static TLS.
    let cached = unsafe { slot.read() };
    if cached as u32 != 0 && (cached >> 32) as u32 == generation {
        return cached as u32;
    }
    let t = gettid();
    // SAFETY: as above.
    unsafe { slot.write((generation as u64) << 32 | t as u64) };
    t
}

fn gettid() -> u32 {
    let tid: u64;
    // SAFETY: gettid takes no argument; the syscall clobbers rcx and r11, declared.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_GETTID => tid,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    tid as u32
}

#[inline(always)]
fn tsc() -> u64 {
    // SAFETY: rdtsc is available on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn mask_of(probe: u32) -> u8 {
    let m = MASKS.load(Ordering::Acquire);
    if m.is_null() || probe as usize >= MASK_SLOTS {
        return 0;
    }
    // SAFETY: the table has MASK_SLOTS bytes and stays mapped (regions are never
    // unmapped); a byte read races only with the tracer's writes before the probes go live.
    unsafe { m.add(probe as usize).read_volatile() }
}

/// Strings gathered for one record: `StrHead`s and bytes back to back.
struct Strings {
    buf: [u8; 7 * (STR_HEAD + STR_MAX)],
    len: usize,
    count: u8,
}

impl Strings {
    fn new() -> Self {
        Strings {
            buf: [0; 7 * (STR_HEAD + STR_MAX)],
            len: 0,
            count: 0,
        }
    }

    /// Copy the C string at `addr` (at most STR_MAX bytes) without ever faulting.
    fn add(&mut self, arg: u8, addr: u64) {
        let (bytes, flags) = match probes::mem::read_str(addr, STR_MAX) {
            Some(s) => {
                let f = if s.truncated { str_flags::TRUNCATED } else { 0 };
                (s, f)
            }
            None => {
                let head = StrHead {
                    arg,
                    flags: str_flags::UNREADABLE,
                    len: 0,
                };
                self.push(head, &[]);
                return;
            }
        };
        let b = bytes.as_bytes();
        let b = &b[..b.len().min(STR_MAX)];
        let head = StrHead {
            arg,
            flags,
            len: b.len() as u16,
        };
        self.push(head, b);
    }

    fn push(&mut self, head: StrHead, bytes: &[u8]) {
        let end = self.len + STR_HEAD + bytes.len();
        let Some(dst) = self.buf.get_mut(self.len..end) else {
            return;
        };
        dst[0] = head.arg;
        dst[1] = head.flags;
        dst[2..4].copy_from_slice(&head.len.to_le_bytes());
        dst[STR_HEAD..].copy_from_slice(bytes);
        self.len = end;
        self.count += 1;
    }

    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Reserve, fill and commit one record; a full ring drops it (the ring counts drops).
fn emit(mut head: RecordHead, strings: &Strings) {
    head.strings = strings.count;
    let s = strings.bytes();
    let len = RECORD_HEAD + s.len();
    debug_assert!(len <= RECORD_MAX);
    let Some(mut e) = RING.reserve(len) else {
        return;
    };
    let out = e.bytes();
    if out.len() < len {
        e.discard();
        return;
    }
    out[..RECORD_HEAD].copy_from_slice(probes::pod::bytes_of(&head_words(&head)));
    out[RECORD_HEAD..len].copy_from_slice(s);
    e.commit();
}

/// The head as plain words (`RecordHead` has no padding; this keeps the copy within
/// `Pod`'s promise).
fn head_words(h: &RecordHead) -> [u64; RECORD_HEAD / 8] {
    let mut w = [0u64; RECORD_HEAD / 8];
    w[0] = h.kind as u64 | (h.strings as u64) << 8 | (h.probe as u64) << 32;
    w[1] = h.tid as u64 | (h.depth as u64) << 32;
    w[2] = h.tsc;
    w[3..9].copy_from_slice(&h.regs);
    w[9..13].copy_from_slice(&h.fregs);
    w
}

/// The call depth of probe `probe`'s call whose entry `rsp` is `entry_rsp`, the same at
/// its entry and its return whichever path runs the action: the general path
/// (`dispatch`, the thread marked [`BUSY_OFF_FRAME`]) runs an entry action before pushing
/// the call's shadow entry and a return action after popping it; the direct path of a
/// pack handler call pushes before and pops after, so there the call's own entry is on
/// top. A call entered by a tail call (`jmp`) from a probed function shares its entry
/// `rsp` with the caller's entry, so the probe tells them apart.
fn depth_of(entry_rsp: u64, probe: u32) -> u32 {
    let t = crate::thread_state::current();
    let off_frame = t.busy == BUSY_OFF_FRAME;
    let frames = t.entries();
    let own_on_top = frames.last().is_some_and(|top| {
        // SAFETY: entries hold pointers to probes, which are never freed.
        top.entry_rsp == entry_rsp && unsafe { (*(top.probe as *const Probe)).id } == probe
    });
    (frames.len() - (own_on_top && !off_frame) as usize) as u32
}

/// Entry action: registers and the `char *` arguments the probe's mask names.
///
/// # Safety
/// `ctx` points at an `EntryContext` and `hit` at a `HitInfo`, valid for the call.
pub unsafe extern "C" fn trace_entry(ctx: *mut u8, hit: *const HitInfo) -> u32 {
    // SAFETY: per the contract.
    let (c, hit) = unsafe { (&*(ctx as *const EntryContext), &*hit) };
    let head = RecordHead {
        kind: RecordKind::Entry as u8,
        probe: hit.probe,
        tid: tid(),
        depth: depth_of(c.rsp, hit.probe),
        tsc: tsc(),
        regs: [c.rdi, c.rsi, c.rdx, c.rcx, c.r8, c.r9],
        fregs: [c.xmm[0].0[0], c.xmm[1].0[0], c.xmm[2].0[0], c.xmm[3].0[0]],
        ..RecordHead::default()
    };
    let m = mask_of(hit.probe) & mask::ARGS;
    let mut strings = Strings::new();
    for (i, &r) in head.regs.iter().enumerate() {
        if m & (1 << i) != 0 {
            strings.add(i as u8, r);
        }
    }
    emit(head, &strings);
    SHIM_OK
}

/// Exit action: the return registers, and the returned string when the mask says so.
///
/// # Safety
/// `ctx` points at an `ExitContext` and `hit` at a `HitInfo`, valid for the call.
pub unsafe extern "C" fn trace_exit(ctx: *mut u8, hit: *const HitInfo) -> u32 {
    // SAFETY: per the contract.
    let (c, hit) = unsafe { (&*(ctx as *const ExitContext), &*hit) };
    let head = RecordHead {
        kind: RecordKind::Exit as u8,
        probe: hit.probe,
        tid: tid(),
        depth: depth_of(c.entry_rsp, hit.probe),
        tsc: tsc(),
        regs: [c.rax, c.rdx, 0, 0, 0, 0],
        fregs: [c.xmm0.0[0], 0, 0, 0],
        ..RecordHead::default()
    };
    let mut strings = Strings::new();
    if mask_of(hit.probe) & mask::RETURN != 0 {
        strings.add(STR_RETURN, c.rax);
    }
    emit(head, &strings);
    SHIM_OK
}

/// The region for a session: the last one emptied when its ring has the same size, else
/// a new one.
fn region(ring_bytes: usize) -> Result<StartResult, pack_region::PackLoadError> {
    probes::fork::watch();
    let layout = probes::trace::layout(ring_bytes)?;
    let mut g = REGION.lock().unwrap_or_else(|p| p.into_inner());
    match g.as_ref() {
        // Reused only while its descriptor is still ours: the program may have closed it
        // (or reused the number), and the tracer opens the region through it.
        Some(r) if r.ring_bytes == ring_bytes && crate::memfd::is(r.fd, r.id) => {
            // SAFETY: the region is mapped, `total` bytes; the last session's probes were
            // removed, so only a thread still finishing an action may write to it.
            unsafe {
                std::ptr::write_bytes(r.base as *mut u8, 0, r.total);
                abi::init_region(r.base as *mut u8, &layout.ring, &[]);
            }
        }
        _ => {
            let r =
                pack_region::create_with_tail(&[], ring_bytes, layout.total - layout.ring.total)?;
            *g = Some(Region {
                fd: r.fd,
                id: r.id,
                base: r.base as usize,
                total: r.plan.total,
                ring_bytes,
            });
        }
    }
    let r = g.as_ref().expect("set above");
    let base = r.base as *mut u8;
    // SAFETY: the ring's control block is inside the region, laid out for `ring_bytes`,
    // and the region is never unmapped.
    unsafe { RING.attach(base.add(layout.ring.ring_offset), ring_bytes) };
    // SAFETY: the masks follow the ring part, inside the region.
    MASKS.store(unsafe { base.add(layout.masks) }, Ordering::Release);
    Ok(StartResult {
        fd: r.fd,
        total: r.total as u64,
        entry_shim: trace_entry as *const () as u64,
        exit_shim: trace_exit as *const () as u64,
        ..StartResult::default()
    })
}

/// Create (or empty) the trace region with a ring of `ring_bytes` and return its memfd
/// and the two actions, written to `out`. Returns 1, or 0 with nothing written.
///
/// # Safety
/// `out` has room for a `StartResult`.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_trace_start(
    _input: *const u8,
    ring_bytes: u64,
    out: *mut StartResult,
) -> u64 {
    let r = catch_unwind(AssertUnwindSafe(|| region(ring_bytes as usize)));
    match r {
        Ok(Ok(res)) => {
            // SAFETY: per the contract.
            unsafe { out.write_unaligned(res) };
            1
        }
        _ => 0,
    }
}

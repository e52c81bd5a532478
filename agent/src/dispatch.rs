//! The hot path: what a trampoline calls on every hit.
//!
//! Trampolines save registers and call [`on_entry`] (entry and offset probes) or
//! [`on_exit`] (the shared exit trampoline). These take the per-thread re-entrancy guard,
//! count, run the handler with panics caught, and for exit probes swap the return address
//! for the exit trampoline's. Nothing here allocates, locks, or calls into libc or the
//! dynamic loader: any of those may be probed themselves.

use crate::shared::current_cpu;
use crate::thread_state::{self, ShadowEntry};
use probes::abi::shared::{flags, Counts};
use probes::context::{OffsetContext, OffsetHandler};
use probes::pack::abi::{HitInfo, Shim, SHIM_PANICKED};
use probes::{EntryContext, EntryHandler, ExitContext, ExitHandler};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::{Acquire, Relaxed};
use std::sync::OnceLock;

/// One installed probe, as the trampoline sees it. Boxed by the interceptor so its
/// address is stable; never freed, since a thread may be inside a trampoline referring
/// to it at any time.
#[repr(C)]
pub struct Probe {
    /// Counters in the shared region. First field: trampolines load `counters.line`.
    pub counters: Counts<'static>,
    pub on_entry: Option<EntryHandler>,
    pub on_exit: Option<ExitHandler>,
    /// Address of the exit trampoline when returns are probed, else 0.
    pub exit_trampoline: u64,
    /// Index of the probe (its counter slot).
    pub id: u32,
    /// Handler of an offset probe.
    pub on_offset: Option<OffsetHandler>,
    /// Where the body of a handler-less exit probe returns to in its own trampoline
    /// (which calls the body rather than redirecting through the exit trampoline); 0
    /// until the trampoline is emitted, and for other probes.
    pub return_point: AtomicU64,
    /// A pack handler's shim (`probes::pack::abi::Shim`) run at entry (or at the offset),
    /// 0 for none. A slot, read at every hit: swapping handlers is a store.
    pub pack_entry: AtomicU64,
    /// The same handler as `pack_entry` for trampolines that call it directly: its stub
    /// then fills what the handler uses of the context (see
    /// `trampoline::emit_pack_direct_stub`). 0 for none.
    pub pack_entry_direct: AtomicU64,
    /// A pack handler's shim run at return, 0 for none.
    pub pack_exit: AtomicU64,
    /// Whether that handler reads the time since the entry (`elapsed_ns`).
    pub pack_exit_timed: std::sync::atomic::AtomicBool,
    /// What a pack handler's `probe_name()` says: `module:symbol[+offset]`.
    pub name: &'static str,
}

impl Probe {
    #[inline]
    fn enabled(&self) -> bool {
        self.counters.line.flags.load(Relaxed) & flags::ENABLED != 0
    }

    #[cold]
    fn panicked(&self) {
        let line = self.counters.line;
        line.panics.fetch_add(1, Relaxed);
        line.flags
            .fetch_and(!flags::ENABLED, std::sync::atomic::Ordering::Release);
        line.flags.fetch_or(flags::DISABLED_BY_PANIC, Relaxed);
    }

    /// Count a hit in the calling CPU's shard (see `crate::shared`).
    #[inline(always)]
    fn bump_hits(&self) {
        match self.shard() {
            Some(s) => bump(&s.hits),
            None => bump(&self.counters.line.hits),
        }
    }

    #[inline(always)]
    fn bump_exits(&self) {
        match self.shard() {
            Some(s) => bump(&s.exits),
            None => bump(&self.counters.line.exits),
        }
    }

    /// The calling CPU's shard; None when the region has none (no rseq).
    #[inline(always)]
    fn shard(&self) -> Option<&'static probes::abi::shared::Shard> {
        let shards = self.counters.shards;
        if shards.is_empty() {
            return None;
        }
        // A power of two: any CPU number, stale or not, names a shard.
        shards.get(current_cpu() & (shards.len() - 1))
    }
}

/// Add one to a counter, exactly, whatever the number of threads hitting the probe.
///
/// Users compare these counts with their program's own: a plain load and store would
/// lose increments when threads hit one probe at once, or when a thread migrates between
/// reading its CPU number and counting in that CPU's shard. On a shard the line is the
/// local CPU's, so the lock costs what it does single-threaded. The locked add costs
/// most right after the trampoline saved its registers (the store buffer drains); probes
/// without handlers count in the trampoline instead, before saving anything, where `lock
/// inc` measured no slower than a plain one (`bench/probe_overhead.md`).
#[inline(always)]
fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Count a hit; false when the handlers must not run: the thread is inside one already
/// (counted as skipped: only the original code runs) or the probe is disabled.
#[inline(always)]
fn count_hit(probe: &Probe, t: &thread_state::ThreadState) -> bool {
    if t.busy != 0 {
        // Rare (hits inside a handler): the first line is enough.
        bump(&probe.counters.line.skipped);
        return false;
    }
    if !probe.enabled() {
        return false;
    }
    probe.bump_hits();
    true
}

/// Called by entry and offset trampolines with the probe and the saved registers.
///
/// # Safety
/// `probe` and `ctx` come from a trampoline: valid and exclusive for the call.
pub unsafe extern "C" fn on_entry(probe: *const Probe, ctx: *mut EntryContext) {
    // SAFETY: see the function's contract.
    let probe = unsafe { &*probe };
    let t = thread_state::current();
    if !count_hit(probe, t) {
        return;
    }
    if let Some(h) = probe.on_entry {
        t.busy = thread_state::BUSY_OFF_FRAME;
        // SAFETY: see the function's contract.
        run_entry_handler(probe, h, unsafe { &mut *ctx });
        t.busy = 0;
    }
    let shim = probe.pack_entry.load(Acquire);
    if shim != 0 {
        t.busy = thread_state::BUSY_OFF_FRAME;
        // SAFETY: the slot holds a pack shim taking an entry context (entry probe).
        unsafe { run_shim(probe, shim, ctx as *mut u8) };
        t.busy = 0;
    }
    if probe.exit_trampoline != 0 {
        // SAFETY: at an entry probe ctx.rsp points at the return address slot.
        let slot = unsafe { (*ctx).rsp } as *mut u64;
        // SAFETY: as above.
        let return_address = unsafe { *slot };
        let entry = ShadowEntry {
            return_address,
            entry_rsp: slot as u64,
            probe: probe as *const Probe as u64,
            // The timestamp counter costs tens of cycles: read it only for a handler
            // that receives the duration.
            tsc: if probe.on_exit.is_some() || probe.pack_exit_timed.load(Relaxed) {
                tsc()
            } else {
                0
            },
        };
        drop_stale(t, entry.entry_rsp, return_address);
        if t.push(entry) {
            // SAFETY: the return address slot, as above.
            unsafe { *slot = probe.exit_trampoline };
        } else {
            bump(&probe.counters.line.lost_exits);
        }
    }
}

/// Called by offset trampolines with the probe and the full register context.
///
/// # Safety
/// `probe` and `ctx` come from a trampoline: valid and exclusive for the call.
pub unsafe extern "C" fn on_offset(probe: *const Probe, ctx: *mut OffsetContext) {
    // SAFETY: see the function's contract.
    let probe = unsafe { &*probe };
    let t = thread_state::current();
    if !count_hit(probe, t) {
        return;
    }
    if let Some(h) = probe.on_offset {
        t.busy = thread_state::BUSY_OFF_FRAME;
        // SAFETY: see the function's contract.
        let ctx = unsafe { &mut *ctx };
        if catch_unwind(AssertUnwindSafe(|| h(ctx))).is_err() {
            probe.panicked();
        }
        t.busy = 0;
    }
    let shim = probe.pack_entry.load(Acquire);
    if shim != 0 {
        t.busy = thread_state::BUSY_OFF_FRAME;
        // SAFETY: the slot holds a pack shim taking an offset context (offset probe).
        unsafe { run_shim(probe, shim, ctx as *mut u8) };
        t.busy = 0;
    }
}

/// Run a pack handler through its shim, which catches the handler's panics in the pack:
/// a panic disables the probe and is counted, as for the agent's own handlers.
///
/// # Safety
/// `shim` is a live pack shim for the kind of context `ctx` points at.
#[cold]
#[inline(never)]
unsafe fn run_shim(probe: &Probe, shim: u64, ctx: *mut u8) {
    let hit = HitInfo {
        probe: probe.id,
        tid: 0,
        name: probe.name.as_ptr(),
        name_len: probe.name.len(),
    };
    // SAFETY: a nonzero slot holds the address of a `Shim` exported by a loaded pack.
    let f: Shim = unsafe { std::mem::transmute::<u64, Shim>(shim) };
    // SAFETY: per the contract; `hit` lives for the call.
    if unsafe { f(ctx, &hit) } == SHIM_PANICKED {
        probe.panicked();
    }
}

/// How far below a new entry's frame a shadow entry is still taken for a frame of the
/// same stack that was abandoned (`longjmp`). Entries further away may belong to another
/// stack (a signal handler on an alternate stack) and are left alone.
const STALE_WINDOW: u64 = 1 << 20;

/// Drop entries whose frames were abandoned without returning: a new frame whose return
/// slot is at or above theirs means their slots are gone. Without this a `longjmp` out of
/// probed frames would leave entries behind until the stack filled.
///
/// One exception: a probed function that tail-calls another probed function (`jmp` to
/// it) hands over its frame, and the new entry lands on the very same slot, which still
/// holds the address the first probe redirected it to. That frame is alive: the new entry
/// keeps the redirect as its return address, and both returns are seen in turn.
#[inline]
fn drop_stale(t: &mut thread_state::ThreadState, entry_rsp: u64, slot_value: u64) {
    while let Some(top) = t.entries().last() {
        if top.entry_rsp > entry_rsp || entry_rsp - top.entry_rsp >= STALE_WINDOW {
            break;
        }
        // SAFETY: entries hold pointers to probes, which are never freed.
        let probe = unsafe { &*(top.probe as *const Probe) };
        let redirected =
            slot_value == probe.exit_trampoline || slot_value == probe.return_point.load(Relaxed);
        if top.entry_rsp == entry_rsp && redirected {
            break;
        }
        bump(&probe.counters.line.lost_exits);
        t.pop();
    }
}

/// Entry handler of the internal probes on the unwinder's entry points
/// (`_Unwind_RaiseException`, `_Unwind_ForcedUnwind`, `_Unwind_Resume_or_Rethrow`).
///
/// An unwinder walking the stack finds return addresses in the frames' slots; where an
/// exit probe put the exit trampoline's address it would find no unwind information and
/// terminate the program. Before it walks, every redirected slot of this thread gets its
/// real return address back and the shadow stack is emptied. The frames the exception
/// passes through never return; the others return directly to their callers: either way
/// those exits are not reported, and each counts as a lost exit.
pub fn unwind_hook(_ctx: &mut EntryContext) {
    let t = thread_state::current();
    while let Some(e) = t.pop() {
        // SAFETY: entries hold pointers to probes, which are never freed.
        let probe = unsafe { &*(e.probe as *const Probe) };
        let slot = e.entry_rsp as *mut u64;
        // SAFETY: the slot is in this thread's stack, which stays mapped. It is written
        // only while it still holds the address we put there (the exit trampoline's or
        // the probe's own return point), i.e. while it is the redirected return slot and
        // not memory a later frame reused.
        unsafe {
            let redirect = slot.read_volatile();
            if redirect == probe.exit_trampoline || redirect == probe.return_point.load(Relaxed) {
                slot.write_volatile(e.return_address);
            }
        }
        bump(&probe.counters.line.lost_exits);
    }
}

/// Out of line so that the hot path needs no unwinding landing pad nor the registers
/// it keeps across one.
#[cold]
#[inline(never)]
fn run_entry_handler(probe: &Probe, h: EntryHandler, ctx: &mut EntryContext) {
    if catch_unwind(AssertUnwindSafe(|| h(ctx))).is_err() {
        probe.panicked();
    }
}

#[cold]
#[inline(never)]
fn run_exit_handler(probe: &Probe, h: ExitHandler, ctx: &mut ExitContext, tsc0: u64) {
    ctx.duration_ns = ticks_to_ns(tsc().wrapping_sub(tsc0));
    if catch_unwind(AssertUnwindSafe(|| h(ctx))).is_err() {
        probe.panicked();
    }
}

/// Called by the exit trampoline when a redirected function returns, with its saved
/// registers and the return slot the function's `ret` popped. Returns the real return
/// address, which the trampoline jumps to.
///
/// # Safety
/// `ctx` comes from the exit trampoline: valid and exclusive for the call.
pub unsafe extern "C" fn on_exit(ctx: *mut ExitContext, slot: u64) -> u64 {
    // SAFETY: see the function's contract.
    let ctx = unsafe { &mut *ctx };
    let t = thread_state::current();
    loop {
        let Some(e) = t.pop() else {
            // Every redirect pushed an entry first, so this cannot happen; there is no
            // address to return to, and no safe way on.
            std::process::abort();
        };
        // SAFETY: entries hold pointers to probes, which are never freed.
        let probe = unsafe { &*(e.probe as *const Probe) };
        if e.entry_rsp < slot {
            // A frame the stack was unwound past (longjmp, exception): it never returned.
            bump(&probe.counters.line.lost_exits);
            continue;
        }
        if t.busy == 0 && probe.enabled() {
            probe.bump_exits();
            let shim = probe.pack_exit.load(Acquire);
            if shim != 0 {
                ctx.return_address = e.return_address;
                ctx.entry_rsp = e.entry_rsp;
                ctx.probe = probe.id;
                // 0 at entry: the handler does not read the time (or it was swapped in
                // for one that did not while this call ran).
                ctx.duration_ns = match e.tsc {
                    0 => 0,
                    t0 => ticks_to_ns(tsc().wrapping_sub(t0)),
                };
                t.busy = thread_state::BUSY_OFF_FRAME;
                // SAFETY: the slot holds a pack shim taking an exit context.
                unsafe { run_shim(probe, shim, ctx as *mut ExitContext as *mut u8) };
                t.busy = 0;
                return ctx.return_address;
            }
            if let Some(h) = probe.on_exit {
                ctx.return_address = e.return_address;
                ctx.entry_rsp = e.entry_rsp;
                ctx.probe = probe.id;
                t.busy = thread_state::BUSY_OFF_FRAME;
                run_exit_handler(probe, h, ctx, e.tsc);
                t.busy = 0;
                // A handler may redirect the return.
                return ctx.return_address;
            }
        }
        return e.return_address;
    }
}

#[inline(always)]
fn tsc() -> u64 {
    // SAFETY: rdtsc is available on every x86-64 CPU and has no side effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

static TSC_NS_PER_TICK_X2_32: OnceLock<u64> = OnceLock::new();
/// The monotonic clock and the timestamp counter when calibration started.
static TSC_ORIGIN: OnceLock<(std::time::Instant, u64)> = OnceLock::new();

/// Start measuring the timestamp counter against the monotonic clock (at agent init).
pub fn calibrate_tsc() {
    TSC_ORIGIN.get_or_init(|| (std::time::Instant::now(), tsc()));
}

/// Finish the measurement, before any probe is live (the hot path only reads the result):
/// over the time since [`calibrate_tsc`], which the tracer's other remote calls already
/// spent, spinning only for what is missing of 1 ms (it spun 2 ms at every first attach).
pub fn finish_tsc_calibration() {
    TSC_NS_PER_TICK_X2_32.get_or_init(|| {
        calibrate_tsc();
        let (t0, c0) = *TSC_ORIGIN.get().expect("set just above");
        while t0.elapsed() < std::time::Duration::from_millis(1) {
            std::hint::spin_loop();
        }
        let ns = t0.elapsed().as_nanos() as u64;
        let ticks = tsc().wrapping_sub(c0).max(1);
        ((ns as u128) << 32).div_ceil(ticks as u128) as u64
    });
}

/// Nanoseconds per timestamp tick times 2^32, for generated code converting durations
/// as [`ticks_to_ns`] does. Calibrated by [`finish_tsc_calibration`] first.
pub fn tsc_scale() -> u64 {
    finish_tsc_calibration();
    TSC_NS_PER_TICK_X2_32.get().copied().unwrap_or(1 << 32)
}

#[inline]
fn ticks_to_ns(ticks: u64) -> u64 {
    let scale = TSC_NS_PER_TICK_X2_32.get().copied().unwrap_or(1 << 32);
    ((ticks as u128 * scale as u128) >> 32) as u64
}

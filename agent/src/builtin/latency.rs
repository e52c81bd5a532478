//! `--hist` and `--summary` inside the target: an exit shim that records each return's
//! duration (from the entry's timestamp, which the shadow stack keeps) into its probe's
//! slot of a sealed memfd the tracer maps (layout: `probes::latency`).
//!
//! The shim goes in the probe's pack exit slot, so the hot path is the one a pack's
//! return handler takes (`dispatch::on_exit`, which already converts the duration to ns);
//! nothing in the trampolines knows about it.

use probes::context::ExitContext;
use probes::latency::{self, LatencyInfo, LatencySlot, MAGIC, MAX_SHARDS};
use probes::pack::abi::{HitInfo, SHIM_OK};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

/// The current region: its header holds the magic, the slot count and the shards per
/// slot, so that one load gives a pointer and its bounds together.
static REGION: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// The current region's memfd and length, under a lock: only the tracer's remote calls
/// change them.
/// The memfd's identity ([`crate::memfd`]) goes with it.
static CURRENT: Mutex<Option<(i32, usize, crate::memfd::Identity)>> = Mutex::new(None);
static mut INFO: LatencyInfo = LatencyInfo {
    magic: 0,
    fd: -1,
    _pad: 0,
    len: 0,
    slots: 0,
    shards: 0,
};

/// The header's words after the magic.
const H_SLOTS: usize = 8;
const H_SHARDS: usize = 16;

/// Read header word `at` of a published region.
///
/// # Safety
/// `base` is a region [`create`] made.
unsafe fn header(base: *const u8, at: usize) -> usize {
    // SAFETY: per the contract; the header is written before the region is published.
    unsafe { (*(base.add(at) as *const AtomicU64)).load(Ordering::Relaxed) as usize }
}

/// Shard `shard` (masked) of probe `id` in the current region, if there is one and it
/// has that probe.
pub fn slot(id: u32, shard: usize) -> Option<&'static LatencySlot> {
    slot_with(id, |_| shard)
}

/// Probe `id`'s slot in the shard `shard(shards)` picks.
#[inline(always)]
fn slot_with(id: u32, shard: impl Fn(usize) -> usize) -> Option<&'static LatencySlot> {
    let base = REGION.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // SAFETY: a published region is one `create` made, never unmapped.
    let (slots, shards) = unsafe { (header(base, H_SLOTS), header(base, H_SHARDS)) };
    if id as usize >= slots {
        return None;
    }
    let shard = shard(shards);
    // A power of two: any CPU number, stale or not, names a shard.
    let at = latency::slot_offset(id as usize, shard & (shards.max(1) - 1), shards);
    // SAFETY: in bounds (checked above), 64-aligned (page-aligned base, 64-byte header
    // and slots), atomics.
    Some(unsafe { &*(base.add(at) as *const LatencySlot) })
}

/// Shards per probe for this process: one per CPU as the hit counters have (a power of
/// two), at most [`MAX_SHARDS`]; one without rseq.
fn shard_count() -> usize {
    crate::shared::sharding().map_or(1, |s| (s.shards as usize).min(MAX_SHARDS))
}

/// Record one return of probe `id` that took `ns`.
#[inline(always)]
pub fn record(id: u32, ns: u64) {
    // A region with one shard was made without rseq: the CPU number is not read then.
    let on_this_cpu = |shards: usize| match shards {
        1 => 0,
        _ => crate::shared::current_cpu(),
    };
    if let Some(s) = slot_with(id, on_this_cpu) {
        s.record(ns);
    }
}

/// The exit shim (`probes::pack::abi::Shim`): `ctx` is the return's `ExitContext`,
/// whose `duration_ns` and `probe` the dispatcher filled in.
///
/// # Safety
/// `ctx` points at a valid `ExitContext` for the call.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_latency_exit(ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    // SAFETY: per the contract.
    let ctx = unsafe { &*(ctx as *const ExitContext) };
    record(ctx.probe, ctx.duration_ns);
    SHIM_OK
}

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A new sealed memfd of `slots` probes of `shards` shards, mapped here, empty (zeroed:
/// its pages are only allocated where written).
type Created = (i32, crate::memfd::Identity, *mut u8, usize);

fn create(slots: usize, shards: usize) -> Result<Created, String> {
    let len = latency::region_size(slots, shards).next_multiple_of(4096);
    let (fd, id) = crate::memfd::create(c"tracer-latency", libc::MFD_ALLOW_SEALING)
        .map_err(|e| format!("memfd_create: {e}"))?;
    let fail = |what: &str| {
        let e = os(what);
        // The fd created above, on the error path only.
        crate::memfd::close_if(fd, id);
        Err(e)
    };
    // SAFETY: plain syscalls on our own fd.
    if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
        return fail("ftruncate");
    }
    // The tracer maps only a region that cannot shrink under it (see tracer's
    // pack::region).
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return fail("sealing the latency region");
    }
    // SAFETY: a new shared mapping of the whole file, which can no longer change size.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return fail("mmap of the latency region");
    }
    let base = base as *mut u8;
    // A forked child gets a private copy (its returns are not the parent's).
    crate::follow::note_shared(base, len, fd, id);
    // SAFETY: the mapping is page-aligned, `len` bytes, zeroed; the header is inside.
    unsafe {
        (base as *mut u64).write(MAGIC);
        (base.add(H_SLOTS) as *mut u64).write(slots as u64);
        (base.add(H_SHARDS) as *mut u64).write(shards as u64);
    }
    Ok((fd, id, base, len))
}

/// Empty every slot of a region `create` made.
fn reset(base: *mut u8) {
    // SAFETY: `base` is such a region.
    let (slots, shards) = unsafe { (header(base, H_SLOTS), header(base, H_SHARDS)) };
    for i in 0..slots * shards {
        let at = latency::slot_offset(0, i, 1);
        // SAFETY: slot i is inside the region (sized for its header), 64-aligned.
        unsafe { &*(base.add(at) as *const LatencySlot) }.reset();
    }
}

/// The region for probe ids below `slots`, every slot zeroed.
fn ensure(slots: usize) -> Result<LatencyInfo, String> {
    let mut cur = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let base = REGION.load(Ordering::Acquire);
    // SAFETY: a published region is one `create` made.
    let have = (!base.is_null()).then(|| unsafe { header(base, H_SLOTS) });
    match (*cur, have) {
        // Reused only while its descriptor is still ours (the program may have closed it
        // or reused the number): the tracer opens the region through it.
        (Some((fd, len, id)), Some(have)) if have >= slots && crate::memfd::is(fd, id) => {
            reset(base);
            // SAFETY: as above.
            Ok(info(fd, len, have, unsafe { header(base, H_SHARDS) }))
        }
        (old, _) => {
            let shards = shard_count();
            let (fd, id, base, len) = create(slots, shards)?;
            REGION.store(base, Ordering::Release);
            *cur = Some((fd, len, id));
            if let Some((old_fd, _, old_id)) = old {
                // Its mapping stays (a thread may be recording into it); the tracer
                // maps the new one. The number is closed only while it is still ours.
                crate::memfd::close_if(old_fd, old_id);
            }
            Ok(info(fd, len, slots, shards))
        }
    }
}

fn info(fd: i32, len: usize, slots: usize, shards: usize) -> LatencyInfo {
    LatencyInfo {
        magic: MAGIC,
        fd,
        _pad: 0,
        len: len as u64,
        slots: slots as u64,
        shards: shards as u64,
    }
}

/// Remote entry point: see `probes::latency::REGION_SYMBOL`.
#[no_mangle]
pub extern "C" fn tracer_agent_latency(slots: u64) -> *const LatencyInfo {
    let r = catch_unwind(AssertUnwindSafe(
        || ensure(slots.clamp(1, 1 << 20) as usize),
    ));
    match r {
        Ok(Ok(i)) => {
            // SAFETY: written under the tracer's stop of the target (one remote call at
            // a time), read by the tracer after this returns.
            unsafe { INFO = i };
            &raw const INFO
        }
        _ => std::ptr::null(),
    }
}

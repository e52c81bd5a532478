//! `--hist` and `--summary` inside the target: an exit shim that records each return's
//! duration (from the entry's timestamp, which the shadow stack keeps) into its probe's
//! slot of a sealed memfd the tracer maps (layout: `probes::latency`).
//!
//! The shim goes in the probe's pack exit slot, so the hot path is the one a pack's
//! return handler takes (`dispatch::on_exit`, which already converts the duration to ns);
//! nothing in the trampolines knows about it.

use probes::context::ExitContext;
use probes::latency::{self, LatencyInfo, LatencySlot, HEADER, MAGIC, SLOT_SIZE};
use probes::pack::abi::{HitInfo, SHIM_OK};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::Mutex;

/// The current region: its header holds the magic and the slot count, so that one load
/// gives a pointer and its bound together.
static REGION: AtomicPtr<u8> = AtomicPtr::new(std::ptr::null_mut());
/// The current region's memfd and length, under a lock: only the tracer's remote calls
/// change them.
static CURRENT: Mutex<Option<(i32, usize)>> = Mutex::new(None);
static mut INFO: LatencyInfo = LatencyInfo {
    magic: 0,
    fd: -1,
    _pad: 0,
    len: 0,
    slots: 0,
};

/// The slot of probe `id` in the current region, if there is one and it has that slot.
#[inline(always)]
pub fn slot(id: u32) -> Option<&'static LatencySlot> {
    let base = REGION.load(Ordering::Acquire);
    if base.is_null() {
        return None;
    }
    // SAFETY: a published region starts with its header (magic, slots) and is never
    // unmapped.
    let slots = unsafe { &*(base.add(8) as *const AtomicU64) }.load(Ordering::Relaxed);
    if id as u64 >= slots {
        return None;
    }
    // SAFETY: in bounds (checked above), 64-aligned (page-aligned base, 64-byte header
    // and slots), zero-initialised then reset atomics.
    Some(unsafe { &*(base.add(HEADER + id as usize * SLOT_SIZE) as *const LatencySlot) })
}

/// Record one return of probe `id` that took `ns`.
#[inline(always)]
pub fn record(id: u32, ns: u64) {
    if let Some(s) = slot(id) {
        s.record(ns);
    }
}

/// The exit shim (`probes::pack::abi::Shim`): `ctx` is the return's `ExitContext`,
/// whose `duration_ns` and `probe` the dispatcher filled in.
///
/// # Safety
/// `ctx` points at a valid `ExitContext` for the call.
#[no_mangle]
pub unsafe extern "C" fn tracer_builtin_latency_exit(ctx: *mut u8, _hit: *const HitInfo) -> u32 {
    // SAFETY: per the contract.
    let ctx = unsafe { &*(ctx as *const ExitContext) };
    record(ctx.probe, ctx.duration_ns);
    SHIM_OK
}

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// A new sealed memfd of `slots` slots, mapped here, every slot reset.
fn create(slots: usize) -> Result<(i32, *mut u8, usize), String> {
    let len = latency::region_size(slots).next_multiple_of(4096);
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd.
    let fd = unsafe {
        libc::memfd_create(
            c"tracer-latency".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(os("memfd_create"));
    }
    let fail = |what: &str| {
        let e = os(what);
        // SAFETY: closing the fd created above, on the error path only.
        unsafe { libc::close(fd) };
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
    // SAFETY: the mapping is page-aligned, `len` bytes, zeroed; the header's two words
    // and every slot are inside.
    unsafe {
        (base as *mut u64).write(MAGIC);
        (base.add(8) as *mut u64).write(slots as u64);
    }
    reset(base, slots);
    Ok((fd, base, len))
}

fn reset(base: *mut u8, slots: usize) {
    for i in 0..slots {
        // SAFETY: slot i is inside the region (sized for `slots`), 64-aligned.
        unsafe { &*(base.add(HEADER + i * SLOT_SIZE) as *const LatencySlot) }.reset();
    }
}

/// The region for probe ids below `slots`, every slot zeroed.
fn ensure(slots: usize) -> Result<LatencyInfo, String> {
    let mut cur = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    let base = REGION.load(Ordering::Acquire);
    // SAFETY: a published region starts with its header.
    let have = (!base.is_null()).then(|| unsafe { *(base.add(8) as *const u64) } as usize);
    match (*cur, have) {
        (Some((fd, len)), Some(have)) if have >= slots => {
            reset(base, have);
            Ok(info(fd, len, have))
        }
        (old, _) => {
            let (fd, base, len) = create(slots)?;
            REGION.store(base, Ordering::Release);
            *cur = Some((fd, len));
            if let Some((old_fd, _)) = old {
                // Its mapping stays (a thread may be recording into it); the tracer
                // maps the new one.
                // SAFETY: closing our own fd.
                unsafe { libc::close(old_fd) };
            }
            Ok(info(fd, len, slots))
        }
    }
}

fn info(fd: i32, len: usize, slots: usize) -> LatencyInfo {
    LatencyInfo {
        magic: MAGIC,
        fd,
        _pad: 0,
        len: len as u64,
        slots: slots as u64,
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

//! Bodies of the `extern "C"` shims the attribute macros generate: rebuild the typed view
//! and run the handler, catching a panic so it never unwinds into the target.

use super::abi::{HitInfo, SHIM_OK, SHIM_PANICKED};
use super::ctx::{EntryCtx, ExitCtx, FullCtx};
use crate::context::{EntryContext, ExitContext, OffsetContext};
use std::panic::{catch_unwind, AssertUnwindSafe};

fn guarded(f: impl FnOnce()) -> u32 {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(()) => SHIM_OK,
        Err(payload) => {
            // Dropping the payload runs the pack's code again (its Drop could panic, which
            // would abort the target): leak it, once per probe, as the probe is disabled.
            std::mem::forget(payload);
            SHIM_PANICKED
        }
    }
}

/// # Safety
/// `ctx` points at an `EntryContext` and `hit` at a `HitInfo`, both valid for the call.
pub unsafe fn run_entry(ctx: *mut u8, hit: *const HitInfo, f: fn(&mut EntryCtx<'_>)) -> u32 {
    // SAFETY: as the caller promises.
    let (regs, hit) = unsafe { (&mut *(ctx as *mut EntryContext), &*hit) };
    guarded(|| f(&mut EntryCtx::new(regs, hit)))
}

/// # Safety
/// `ctx` points at an `ExitContext` and `hit` at a `HitInfo`, both valid for the call.
pub unsafe fn run_exit(ctx: *mut u8, hit: *const HitInfo, f: fn(&mut ExitCtx<'_>)) -> u32 {
    // SAFETY: as the caller promises.
    let (regs, hit) = unsafe { (&mut *(ctx as *mut ExitContext), &*hit) };
    guarded(|| f(&mut ExitCtx::new(regs, hit)))
}

/// # Safety
/// `ctx` points at an `OffsetContext` and `hit` at a `HitInfo`, both valid for the call.
pub unsafe fn run_at(ctx: *mut u8, hit: *const HitInfo, f: fn(&mut FullCtx<'_>)) -> u32 {
    // SAFETY: as the caller promises.
    let (regs, hit) = unsafe { (&mut *(ctx as *mut OffsetContext), &*hit) };
    guarded(|| f(&mut FullCtx::new(regs, hit)))
}

/// Exported symbol the agent calls once after loading a pack, before any handler runs.
pub const INIT_SYMBOL: &str = "__tracer_pack_init";

/// Prepare the pack to run inside a target: std's default panic hook would print the
/// message on the target's stderr (and allocate) before the shim catches the panic, so
/// the hook is replaced by a silent one. The pack links its own copy of std, so this does
/// not touch the target's hooks even when the target is a Rust program. The fork hook is
/// registered here, outside any handler, so that fault-free reads can cache the pid
/// (`crate::mem`). Returns the ABI version the pack was built against.
#[cfg_attr(feature = "pack-exports", unsafe(export_name = "__tracer_pack_init"))]
pub extern "C" fn pack_init() -> u32 {
    std::panic::set_hook(Box::new(|_| {}));
    crate::fork::watch();
    super::abi::ABI_VERSION
}

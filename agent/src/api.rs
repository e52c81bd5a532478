//! The agent's exported entry points, called by the tracer through remote calls.
//!
//! Each runs with every thread of the target stopped except the calling one, and catches
//! panics: nothing may unwind into the target.

use crate::interceptor::{Interceptor, PackHandlers, ProbeRequest};
use crate::relocator::Function;
use probes::abi::remote::{
    result_flags, status, AgentInfo, PackLoadResult, PrepareRequest, PrepareResult, AGENT_MAGIC,
    LIVE_CAP_WITH_PREPARE,
};
use probes::ProbeKind;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

pub(crate) static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);
/// What the last init returned, exported so that a later session reads it from memory
/// (`probes::abi::remote::INFO_SYMBOL`) instead of making a remote call for it.
#[export_name = "tracer_agent_info"]
static mut INFO: AgentInfo = AgentInfo {
    magic: 0,
    shared_fd: -1,
    _pad: 0,
    shared_len: 0,
    capacity: 0,
};

/// Runs an entry point's body with panics caught and the thread marked busy: probes it
/// hits (the agent's own `malloc`s, say, while an earlier session's probes are live)
/// count it as skipped, not as the program's calls.
pub(crate) fn agent_call<R>(f: impl FnOnce() -> R) -> std::thread::Result<R> {
    crate::thread_state::as_agent(|| catch_unwind(AssertUnwindSafe(f)))
}

/// Create the interceptor with room for `capacity` probes; returns its description, or
/// null when memory could not be had.
#[no_mangle]
pub extern "C" fn tracer_agent_init(capacity: u64) -> *const AgentInfo {
    let r = agent_call(|| {
        let mut g = INTERCEPTOR.lock().unwrap_or_else(|p| p.into_inner());
        if g.is_none() {
            // A panicking handler is counted and its probe disabled; the default hook
            // would also print into the target's stderr.
            std::panic::set_hook(Box::new(|_| {}));
            let i = Interceptor::new(capacity.clamp(1, 1 << 20) as usize).ok()?;
            *g = Some(i);
        }
        // The region may have grown since the last session.
        let i = g.as_ref()?;
        let info = AgentInfo {
            magic: AGENT_MAGIC,
            shared_fd: i.shared().fd(),
            _pad: 0,
            shared_len: i.shared().len() as u64,
            capacity: i.shared().capacity() as u64,
        };
        // SAFETY: written under the interceptor lock, read by the tracer only after
        // this call returned.
        unsafe { INFO = info };
        Some(())
    });
    match r {
        Ok(Some(())) => &raw const INFO,
        _ => std::ptr::null(),
    }
}

/// Prepare `n` probes; results go to `out`. Returns how many were prepared. A probe
/// asked for in an earlier session comes back with the same trampoline, patch and
/// counter slot, its counters zeroed. The shared region grows as needed: its current
/// length is the memfd's.
///
/// # Safety
/// `reqs` and `out` point at `n` records in this process's memory.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_prepare(
    reqs: *const PrepareRequest,
    n: u64,
    out: *mut PrepareResult,
) -> u64 {
    // SAFETY: per the contract.
    let (reqs, out) = unsafe {
        (
            std::slice::from_raw_parts(reqs, n as usize),
            std::slice::from_raw_parts_mut(out, n as usize),
        )
    };
    let r = agent_call(AssertUnwindSafe(|| {
        let mut g = INTERCEPTOR.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = g.as_mut() else {
            not_initialised(out);
            return 0;
        };
        // Patches a killed tracer left must not be read as the code they replaced.
        i.refresh_live();
        prepare_batch(i, reqs, out)
    }));
    r.unwrap_or(0)
}

/// Every result says the agent has no interceptor yet.
fn not_initialised(out: &mut [PrepareResult]) {
    for o in out.iter_mut() {
        *o = PrepareResult::default();
        o.set_message("agent not initialised");
    }
}

/// Prepares `reqs` as one batch (live patches refreshed before); returns how many were
/// prepared.
fn prepare_batch(i: &mut Interceptor, reqs: &[PrepareRequest], out: &mut [PrepareResult]) -> u64 {
    let functions: Vec<Function> = reqs
        .iter()
        .map(|r| Function {
            address: r.function,
            size: (r.size != 0).then_some(r.size),
        })
        .collect();
    i.plan_batch(&functions);
    let mut ok = 0;
    for (req, o) in reqs.iter().zip(out.iter_mut()) {
        *o = prepare_one(i, req);
        if o.status == status::PREPARED {
            ok += 1;
        }
    }
    i.end_batch();
    ok
}

/// [`tracer_agent_live`] then [`tracer_agent_prepare`] in one call, the patches in the
/// code read once: `out` has [`LIVE_CAP_WITH_PREPARE`] records for the live probes, then
/// `n` for the results. Returns how many probes were live (see
/// `probes::abi::remote::PREPARE_LIVE_SYMBOL`).
///
/// # Safety
/// `reqs` points at `n` records and `out` at `LIVE_CAP_WITH_PREPARE + n`, in this
/// process's memory.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_prepare_live(
    reqs: *const PrepareRequest,
    n: u64,
    out: *mut PrepareResult,
) -> u64 {
    // SAFETY: per the contract.
    let (reqs, out) = unsafe {
        (
            std::slice::from_raw_parts(reqs, n as usize),
            std::slice::from_raw_parts_mut(out, LIVE_CAP_WITH_PREPARE + n as usize),
        )
    };
    let (live_out, out) = out.split_at_mut(LIVE_CAP_WITH_PREPARE);
    let r = agent_call(AssertUnwindSafe(|| {
        let mut g = INTERCEPTOR.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = g.as_mut() else {
            not_initialised(out);
            return 0;
        };
        i.refresh_live();
        let live = write_live(i, live_out);
        prepare_batch(i, reqs, out);
        live
    }));
    r.unwrap_or(0)
}

fn prepared_result(p: &crate::interceptor::Prepared) -> PrepareResult {
    let mut o = PrepareResult {
        status: status::PREPARED,
        id: p.id,
        site: p.site,
        trampoline: p.trampoline,
        stolen_len: p.stolen_len as u32,
        encoding: p.encoding as u32,
        ..PrepareResult::default()
    };
    o.patch[..5].copy_from_slice(&p.patch);
    o.original[..5].copy_from_slice(&p.original);
    o
}

fn prepare_one(i: &mut Interceptor, req: &PrepareRequest) -> PrepareResult {
    let mut o = PrepareResult::default();
    let kind = match ProbeKind::try_from(req.kind) {
        Ok(k) => k,
        Err(k) => {
            o.set_message(&format!(
                "unknown probe kind {k}: the tracer and its agent were built apart"
            ));
            return o;
        }
    };
    let r = ProbeRequest {
        function: Function {
            address: req.function,
            size: (req.size != 0).then_some(req.size),
        },
        kind,
        offset: req.offset,
        on_entry: None,
        on_exit: None,
        pack: req.has_shim().then(|| PackHandlers {
            entry: req.entry_shim,
            exit: req.exit_shim,
            exit_timed: crate::pack_loader::shim_needs_time(req.exit_shim),
            name: leak_label(req),
        }),
    };
    match i.prepare_reusing(&r) {
        Ok((p, reused)) => {
            i.enable(p.id);
            o = prepared_result(&p);
            if !reused {
                o.code_len = p.code_len.min(u16::MAX as usize) as u16;
                o.relocated_len = p.relocated_len.min(u16::MAX as usize) as u16;
            }
        }
        Err(crate::interceptor::PrepareError::Refused(r)) => {
            o.status = status::REFUSED;
            o.set_message(&r.to_string());
        }
        Err(e) => {
            o.status = status::FAILED;
            o.set_message(&e.to_string());
        }
    }
    o
}

/// The probe's label, kept for as long as the probe (which is never freed); each label
/// is kept once, however many sessions ask for it.
fn leak_label(req: &PrepareRequest) -> &'static str {
    static LABELS: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    let n = (req.label_len as usize).min(req.label.len());
    let s = String::from_utf8_lossy(&req.label[..n]);
    let mut labels = LABELS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(l) = labels.iter().find(|l| **l == s) {
        return l;
    }
    let l: &'static str = Box::leak(s.into_owned().into_boxed_str());
    labels.push(l);
    l
}

/// Create a loaded pack's shared region, bind its maps and ring, call its init, and look
/// up its shims; or swap a running pack's handlers for a new build's: see
/// `probes::abi::remote::LOAD_PACK_SYMBOL` for the records.
///
/// # Safety
/// `input` holds a `PackLoadRequest` followed by its `PackSymbol`s; `out` has room for a
/// `PackLoadResult` followed by one `u64` per shim.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_load_pack(input: *const u8, _n: u64, out: *mut u8) -> u64 {
    let r = agent_call(AssertUnwindSafe(|| {
        // SAFETY: per the contract.
        unsafe { crate::pack_loader::load(input, out, &INTERCEPTOR) }
    }));
    let message = match r {
        Ok(Ok(())) => return 1,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "the agent panicked while loading the pack".to_string(),
    };
    let mut res = PackLoadResult::default();
    res.set_message(&message);
    // SAFETY: `out` has room for a result (the contract).
    unsafe { (out as *mut PackLoadResult).write_unaligned(res) };
    0
}

/// Resolve `n` NUL-terminated names, stored back to back at `names`, in the global scope.
///
/// # Safety
/// `names` holds `n` NUL-terminated strings back to back; `out` has room for `n` values.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_resolve(
    names: *const libc::c_char,
    n: u64,
    out: *mut u64,
) -> u64 {
    // SAFETY: the caller's contract is `resolve`'s.
    agent_call(|| unsafe { resolve(names, n, out) }).unwrap_or(0)
}

/// [`tracer_agent_resolve`] without the panic guard.
///
/// # Safety
/// As for [`tracer_agent_resolve`].
unsafe fn resolve(names: *const libc::c_char, n: u64, out: *mut u64) -> u64 {
    if !out.is_aligned() {
        return 0;
    }
    let mut p = names;
    let mut found = 0;
    for i in 0..n as usize {
        // SAFETY: per the contract, `p` points at the next NUL-terminated name.
        let name = unsafe { std::ffi::CStr::from_ptr(p) };
        // SAFETY: dlsym with RTLD_DEFAULT and a valid C string; IFUNCs come back resolved.
        let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as u64;
        // SAFETY: `out` has room for `n` values.
        unsafe { *out.add(i) = addr };
        found += (addr != 0) as u64;
        // SAFETY: the next name starts after this one's NUL.
        p = unsafe { p.add(name.to_bytes().len() + 1) };
    }
    found
}

/// The agent's own probes (the unwinder hooks exit probes need), enabled, up to `cap` of
/// them written to `out`. The tracer writes their patches with the others, every session
/// that has exit probes, and restores them at detach. Returns how many there are.
///
/// # Safety
/// `out` has room for `cap` records.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_internal(
    _unused: *const u8,
    cap: u64,
    out: *mut PrepareResult,
) -> u64 {
    let r = agent_call(AssertUnwindSafe(|| {
        let g = INTERCEPTOR.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = g.as_ref() else { return 0 };
        let internal = i.internal();
        for (k, p) in internal.iter().take(cap as usize).enumerate() {
            i.enable(p.id);
            // SAFETY: k < cap, per the contract.
            unsafe { out.add(k).write(prepared_result(p)) };
        }
        internal.len() as u64
    }));
    r.unwrap_or(0)
}

/// The prepared probes whose patch is in the code now, one per site, up to `cap` of them
/// written to `out`: at the start of a session, the patches an earlier tracer left
/// behind (it was killed before it could restore them). The agent's own probes carry
/// [`result_flags::INTERNAL`]. Returns how many there are.
///
/// # Safety
/// `out` has room for `cap` records.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_live(
    _unused: *const u8,
    cap: u64,
    out: *mut PrepareResult,
) -> u64 {
    // SAFETY: per the contract.
    let out = unsafe { std::slice::from_raw_parts_mut(out, cap as usize) };
    let r = agent_call(AssertUnwindSafe(|| {
        let mut g = INTERCEPTOR.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = g.as_mut() else { return 0 };
        i.refresh_live();
        write_live(i, out)
    }));
    r.unwrap_or(0)
}

/// The live probes (as of the last refresh), as many as fit written to `out`; returns how
/// many there are.
fn write_live(i: &Interceptor, out: &mut [PrepareResult]) -> u64 {
    let live = i.live();
    for (o, p) in out.iter_mut().zip(&live) {
        *o = prepared_result(p);
        if i.is_internal(p.id) {
            o.flags |= result_flags::INTERNAL;
        }
    }
    live.len() as u64
}

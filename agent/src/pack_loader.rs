//! Loading a probe pack from the agent's side, as asked by the tracer in one remote
//! call: the pack's shared region (one per pack, reused by later sessions), its maps and
//! ring bound to it, its shims looked up; and the hot swap of a running pack's handlers
//! for a new build's, its maps kept.

use crate::interceptor::Interceptor;
use crate::pack_region::PackLoadError;
use probes::abi::remote::{PackLoadRequest, PackLoadResult, PackSymbol};
use probes::pack::abi::{self, Plan};
use std::ffi::{CStr, CString};
use std::sync::Mutex;

/// A pack's region and what was bound to it: a later session with the same pack gets
/// the region back, emptied, rather than a new one (a region cannot be unmapped: the
/// pack may use it until the process ends); a new build of the pack (same name) can be
/// swapped in with the region kept.
struct Known {
    name: Vec<u8>,
    handle: u64,
    kinds: Vec<(u32, [u64; 4])>,
    map_symbols: Vec<Vec<u8>>,
    /// Shim symbol and address of the build whose handlers the slots hold.
    shims: Vec<(Vec<u8>, u64)>,
    fd: i32,
    /// The file `fd` named when the region was made (see [`crate::memfd`]).
    id: crate::memfd::Identity,
    base: usize,
    plan: Plan,
}

impl Known {
    fn region(&self) -> crate::pack_region::PackRegion {
        crate::pack_region::PackRegion {
            fd: self.fd,
            id: self.id,
            base: self.base as *mut u8,
            plan: self.plan.clone(),
        }
    }
}

static KNOWN: Mutex<Vec<Known>> = Mutex::new(Vec::new());

/// The `probe_flags` of loaded packs' shims, from their descriptors: what their
/// handlers never use (the time since the entry, the context's registers), which their
/// probes then need not provide.
static FLAGS: Mutex<std::collections::BTreeMap<u64, u64>> =
    Mutex::new(std::collections::BTreeMap::new());

/// Record the descriptor's `probe_flags` of the shim at `shim` (done at pack load; the
/// benches, which load packs themselves, call it too).
pub fn set_shim_flags(shim: u64, flags: u64) {
    FLAGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(shim, flags);
}

/// The `probe_flags` of the shim at `shim`; 0 (it may use everything) when unknown.
pub fn shim_flags(shim: u64) -> u64 {
    FLAGS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&shim)
        .copied()
        .unwrap_or(0)
}

/// Whether the return handler whose shim is at `shim` may read the time since the
/// entry: yes unless its pack's descriptor said otherwise.
pub fn shim_needs_time(shim: u64) -> bool {
    shim_flags(shim) & abi::probe_flags::NO_TIME == 0
}

/// What the tracer sent.
struct Request {
    head: PackLoadRequest,
    name: Vec<u8>,
    kinds: Vec<(u32, [u64; 4])>,
    map_symbols: Vec<Vec<u8>>,
    shim_symbols: Vec<Vec<u8>>,
    /// Each shim's `probe_flags`.
    shim_flags: Vec<u64>,
}

/// # Safety
/// `input` holds a `PackLoadRequest` followed by its `PackSymbol`s.
unsafe fn read_request(input: *const u8) -> Request {
    // SAFETY: per the contract.
    let head = unsafe { (input as *const PackLoadRequest).read_unaligned() };
    let sym = |i: usize| {
        // SAFETY: the request is followed by `maps + shims` symbols.
        unsafe {
            (input.add(size_of::<PackLoadRequest>()) as *const PackSymbol)
                .add(i)
                .read_unaligned()
        }
    };
    let maps: Vec<PackSymbol> = (0..head.maps as usize).map(sym).collect();
    let shims: Vec<PackSymbol> = (head.maps as usize..(head.maps + head.shims) as usize)
        .map(sym)
        .collect();
    let end = head
        .name
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(head.name.len());
    Request {
        name: head.name[..end].to_vec(),
        kinds: maps.iter().map(|m| (m.kind, m.params)).collect(),
        map_symbols: maps.iter().map(|m| m.symbol().to_vec()).collect(),
        shim_symbols: shims.iter().map(|s| s.symbol().to_vec()).collect(),
        shim_flags: shims.iter().map(|s| s.params[0]).collect(),
        head,
    }
}

fn c_strings(v: &[Vec<u8>]) -> Result<Vec<CString>, PackLoadError> {
    v.iter().map(|s| Ok(CString::new(s.clone())?)).collect()
}

/// Each shim's address in the pack behind `handle`, in order.
fn look_up(handle: u64, symbols: &[Vec<u8>]) -> Result<Vec<u64>, PackLoadError> {
    c_strings(symbols)?
        .iter()
        .map(|name| {
            // SAFETY: a live dlopen handle and a NUL-terminated name.
            let addr = unsafe { libc::dlsym(handle as *mut libc::c_void, name.as_ptr()) };
            if addr.is_null() {
                Err(PackLoadError::NotExported(
                    name.to_string_lossy().into_owned(),
                ))
            } else {
                Ok(addr as u64)
            }
        })
        .collect()
}

/// Bind the maps and ring of the pack behind `handle` to `region` and run its init.
fn bind(
    region: &crate::pack_region::PackRegion,
    handle: u64,
    map_symbols: &[Vec<u8>],
) -> Result<u32, PackLoadError> {
    let names = c_strings(map_symbols)?;
    let names: Vec<&CStr> = names.iter().map(|c| c.as_c_str()).collect();
    // SAFETY: the tracer passes the handle `dlopen` returned for this pack, whose
    // descriptors list these maps in this order; regions are never unmapped.
    unsafe { crate::pack_region::bind_pack(region, handle as *mut libc::c_void, &names) }
}

/// Serve `tracer_agent_load_pack`: load, or swap when asked.
///
/// # Safety
/// `input` holds a `PackLoadRequest` followed by its `PackSymbol`s; `out` has room for a
/// `PackLoadResult` followed by one `u64` per shim.
pub unsafe fn load(
    input: *const u8,
    out: *mut u8,
    interceptor: &Mutex<Option<Interceptor>>,
) -> Result<(), PackLoadError> {
    // SAFETY: per the contract.
    let req = unsafe { read_request(input) };
    let shims = look_up(req.head.handle, &req.shim_symbols)?;
    for (s, f) in shims.iter().zip(&req.shim_flags) {
        set_shim_flags(*s, *f);
    }
    let mut known = KNOWN.lock().unwrap_or_else(|p| p.into_inner());
    let res = if req.head.swap != 0 {
        swap(&mut known, &req, &shims, interceptor)?
    } else {
        fresh(&mut known, &req, &shims)?
    };
    // SAFETY: `out` has room for the result and one address per shim (the contract).
    unsafe {
        (out as *mut PackLoadResult).write_unaligned(res);
        for (i, a) in shims.iter().enumerate() {
            (out.add(size_of::<PackLoadResult>()) as *mut u64)
                .add(i)
                .write_unaligned(*a);
        }
    }
    Ok(())
}

/// A session's pack: its region (the one of an earlier session with the same library,
/// emptied, or a new one), bound.
fn fresh(
    known: &mut Vec<Known>,
    req: &Request,
    shims: &[u64],
) -> Result<PackLoadResult, PackLoadError> {
    let ring_bytes = req.head.ring_bytes as usize;
    // A region whose descriptor the program closed (or reused) cannot be handed to the
    // tracer again: a new one is made and the old one stays mapped, unused.
    let at = known.iter().position(|k| {
        k.handle == req.head.handle
            && k.kinds == req.kinds
            && k.plan.ring_bytes == ring_bytes
            && crate::memfd::is(k.fd, k.id)
    });
    let region = match at {
        Some(i) => {
            let k = &known[i];
            // SAFETY: the region is still mapped, `plan.total` bytes; its probes were
            // removed at the end of the last session, so only a thread still finishing
            // a handler can write to it meanwhile (its update is lost).
            unsafe {
                std::ptr::write_bytes(k.base as *mut u8, 0, k.plan.total);
                abi::init_region(k.base as *mut u8, &k.plan, &req.kinds);
            }
            k.region()
        }
        None => crate::pack_region::create(&req.kinds, ring_bytes)?,
    };
    let abi = bind(&region, req.head.handle, &req.map_symbols)?;
    let entry = Known {
        name: req.name.clone(),
        handle: req.head.handle,
        kinds: req.kinds.clone(),
        map_symbols: req.map_symbols.clone(),
        shims: req
            .shim_symbols
            .iter()
            .cloned()
            .zip(shims.iter().copied())
            .collect(),
        fd: region.fd,
        id: region.id,
        base: region.base as usize,
        plan: region.plan.clone(),
    };
    match at {
        Some(i) => known[i] = entry,
        None => known.push(entry),
    }
    Ok(PackLoadResult {
        fd: region.fd,
        abi,
        total: region.plan.total as u64,
        ..PackLoadResult::default()
    })
}

/// Swap in a new build of the pack loaded last under the same name: checked first (same
/// maps, every running handler present), then its maps and ring bound to the running
/// region, its init run, and each slot moved to the new build's shim.
fn swap(
    known: &mut [Known],
    req: &Request,
    shims: &[u64],
    interceptor: &Mutex<Option<Interceptor>>,
) -> Result<PackLoadResult, PackLoadError> {
    let name = String::from_utf8_lossy(&req.name).into_owned();
    let k = known
        .iter_mut()
        .rev()
        .find(|k| k.name == req.name)
        .ok_or_else(|| PackLoadError::NotRunning(name.clone()))?;
    if k.handle == req.head.handle {
        return Err(PackLoadError::SameBuild(name));
    }
    if k.kinds != req.kinds || k.map_symbols != req.map_symbols {
        return Err(PackLoadError::MapsChanged(name));
    }
    let mut pairs = Vec::new();
    for (sym, old) in &k.shims {
        let new = req
            .shim_symbols
            .iter()
            .position(|s| s == sym)
            .map(|i| shims[i])
            .ok_or_else(|| PackLoadError::MissingHandler {
                name: name.clone(),
                handler: String::from_utf8_lossy(sym).into_owned(),
            })?;
        pairs.push((*old, new));
    }
    let abi = bind(&k.region(), req.head.handle, &req.map_symbols)?;
    let mut g = interceptor.lock().unwrap_or_else(|p| p.into_inner());
    let swapped = match g.as_mut() {
        Some(i) => i.swap_pack_shims(&pairs)?,
        None => 0,
    };
    k.handle = req.head.handle;
    k.shims = req
        .shim_symbols
        .iter()
        .cloned()
        .zip(shims.iter().copied())
        .collect();
    Ok(PackLoadResult {
        fd: k.fd,
        abi,
        total: k.plan.total as u64,
        swapped,
        ..PackLoadResult::default()
    })
}

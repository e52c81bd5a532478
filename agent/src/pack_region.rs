//! The shared region of a loaded probe pack: a sealed memfd holding its maps and event
//! ring, laid out by `probes::pack::abi::plan` from the pack's descriptors.
//!
//! The memfd is sealed against shrinking and growing before the tracer maps it: a
//! mapping whose file shrinks turns reads into SIGBUS, and the tracer refuses an unsealed
//! region. Handles in the pack are bound by writing the storage address into them.

use probes::pack::abi::{self, Binding, Plan};
use probes::pack::ring::Ring;

/// A created region, mapped in this process.
pub struct PackRegion {
    /// The memfd, kept at a high number ([`crate::memfd`]) for the tracer to open.
    pub fd: i32,
    /// The file `fd` names: a later session checks it still does before handing it out.
    pub id: crate::memfd::Identity,
    pub base: *mut u8,
    pub plan: Plan,
}

/// Why a pack could not be loaded, bound or swapped; its text goes back to the tracer.
#[derive(Debug, thiserror::Error)]
pub enum PackLoadError {
    /// The maps and ring do not make a region (`probes::pack::abi::plan` says why).
    #[error(transparent)]
    Plan(#[from] abi::PlanError),
    /// The kernel refused a step of creating the region.
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    /// A symbol the tracer named is not exported by the pack.
    #[error("the pack does not export {0}")]
    NotExported(String),
    /// A symbol name the tracer sent holds a NUL byte.
    #[error(transparent)]
    Nul(#[from] std::ffi::NulError),
    /// A swap names a pack no session loaded.
    #[error("no pack named {0} runs in this process")]
    NotRunning(String),
    /// A swap of the build already running.
    #[error("this build of {0} is the one running")]
    SameBuild(String),
    /// A swap whose build changes the maps the running one has.
    #[error(
        "the new build of {0} changes its maps (names, types or sizes); a swap keeps the \
         running maps, so it is refused: end the running session and attach again"
    )]
    MapsChanged(String),
    /// A swap whose build lacks a handler the running one has.
    #[error("the new build of {name} lacks the handler {handler} the running one has")]
    MissingHandler { name: String, handler: String },
    /// The new build's handlers could not get their stubs.
    #[error(transparent)]
    Stubs(#[from] crate::interceptor::PrepareError),
}

fn os(what: &'static str) -> PackLoadError {
    PackLoadError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// Create, size, seal, map and initialise the region for `maps` and a ring of
/// `ring_bytes`.
pub fn create(maps: &[(u32, [u64; 4])], ring_bytes: usize) -> Result<PackRegion, PackLoadError> {
    create_with_tail(maps, ring_bytes, 0)
}

/// [`create`] with `tail` more zeroed bytes after the planned ones (the built-in tracer's
/// per-probe table); `plan.total` then counts them.
pub fn create_with_tail(
    maps: &[(u32, [u64; 4])],
    ring_bytes: usize,
    tail: usize,
) -> Result<PackRegion, PackLoadError> {
    let mut plan = abi::plan(maps, ring_bytes).map_err(PackLoadError::Plan)?;
    plan.total += tail.next_multiple_of(4096);
    let (fd, id) =
        crate::memfd::create(c"tracer-pack", libc::MFD_ALLOW_SEALING).map_err(|source| {
            PackLoadError::Os {
                what: "memfd_create",
                source,
            }
        })?;
    let fail = |what: &'static str| {
        let e = os(what);
        // The fd created above, on the error path only.
        crate::memfd::close_if(fd, id);
        Err(e)
    };
    // SAFETY: plain syscalls on our own fd.
    if unsafe { libc::ftruncate(fd, plan.total as libc::off_t) } != 0 {
        return fail("ftruncate");
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_ADD_SEALS, seals) } != 0 {
        return fail("sealing the pack region");
    }
    // SAFETY: a new shared mapping of the whole file, which can no longer change size.
    let base = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            plan.total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return fail("mmap of the pack region");
    }
    let base = base as *mut u8;
    // A forked child gets a private copy: what its handlers write is not the parent's.
    crate::follow::note_shared(base, plan.total, fd, id);
    // SAFETY: the mapping is page-aligned, zeroed (a fresh memfd) and `plan.total` bytes.
    unsafe { abi::init_region(base, &plan, maps) };
    Ok(PackRegion { fd, id, base, plan })
}

impl PackRegion {
    /// Bind map handle `i` (in the order given to [`create`]).
    ///
    /// # Safety
    /// `handle` is the exported handle of the map described by entry `i`, and the region
    /// stays mapped while the pack can use it (it is never unmapped once bound).
    pub unsafe fn bind_map(&self, i: usize, handle: &Binding) {
        // SAFETY: `plan.maps[i]` is inside the mapping; the caller vouches for the rest.
        unsafe { handle.bind(self.base.add(self.plan.maps[i])) }
    }

    /// Bind the pack's event ring handle.
    ///
    /// # Safety
    /// As [`Self::bind_map`], for the pack's exported ring.
    pub unsafe fn bind_ring(&self, ring: &Ring) {
        // SAFETY: the ring's control block is inside the mapping, laid out for
        // `plan.ring_bytes`.
        unsafe { ring.attach(self.base.add(self.plan.ring_offset), self.plan.ring_bytes) }
    }
}

/// Bind a loaded pack to `region`: each map handle (reached through its exported pointer
/// `__tracer_map_<NAME>`, in the region's map order), the event ring, then call the
/// pack's `__tracer_pack_init`. Returns the ABI version the pack reports.
///
/// # Safety
/// `lib` is a handle from `dlopen` of a pack whose descriptors list its maps as
/// `map_symbols` in this order (the order `create` was given), and `region` is never
/// unmapped while the pack is loaded.
pub unsafe fn bind_pack(
    region: &PackRegion,
    lib: *mut libc::c_void,
    map_symbols: &[&std::ffi::CStr],
) -> Result<u32, PackLoadError> {
    let sym = |name: &std::ffi::CStr| {
        // SAFETY: `lib` is a live dlopen handle; the name is NUL-terminated.
        let p = unsafe { libc::dlsym(lib, name.as_ptr()) };
        if p.is_null() {
            Err(PackLoadError::NotExported(
                name.to_string_lossy().into_owned(),
            ))
        } else {
            Ok(p)
        }
    };
    let handle = |name: &std::ffi::CStr| -> Result<&Binding, PackLoadError> {
        // SAFETY: the symbol is a `&'static` handle whose first field is its Binding.
        Ok(unsafe { &**(sym(name)? as *const *const Binding) })
    };
    for (i, name) in map_symbols.iter().enumerate() {
        // SAFETY: entry i of the region is this map's storage (the caller's promise).
        unsafe { region.bind_map(i, handle(name)?) };
    }
    // SAFETY: `__tracer_ring` points at the pack's `Ring` (same probes ABI, checked by
    // the tracer before loading).
    unsafe { region.bind_ring(&**(sym(c"__tracer_ring")? as *const *const Ring)) };
    let init = sym(c"__tracer_pack_init")?;
    // SAFETY: `__tracer_pack_init` is `extern "C" fn() -> u32` in every pack.
    let init: extern "C" fn() -> u32 = unsafe { std::mem::transmute(init) };
    Ok(init())
}

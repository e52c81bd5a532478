//! The shared region of a loaded probe pack: a sealed memfd holding its maps and event
//! ring, laid out by `probes::pack::abi::plan` from the pack's descriptors.
//!
//! The memfd is sealed against shrinking and growing before the tracer maps it: a
//! mapping whose file shrinks turns reads into SIGBUS, and the tracer refuses an unsealed
//! region. Handles in the pack are bound by writing the storage address into them.

use probes::pack::abi::{self, Binding, Plan};

/// A created region, mapped in this process.
pub struct PackRegion {
    pub fd: i32,
    pub base: *mut u8,
    pub plan: Plan,
}

fn os(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

/// Create, size, seal, map and initialise the region for `maps` and a ring of
/// `ring_bytes`.
pub fn create(maps: &[(u32, [u64; 4])], ring_bytes: usize) -> Result<PackRegion, String> {
    let plan = abi::plan(maps, ring_bytes)?;
    // SAFETY: memfd_create takes a NUL-terminated name and flags, and returns a new fd.
    let fd = unsafe {
        libc::memfd_create(
            c"tracer-pack".as_ptr(),
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
    // SAFETY: the mapping is page-aligned, zeroed (a fresh memfd) and `plan.total` bytes.
    unsafe { abi::init_region(base, &plan, maps) };
    Ok(PackRegion { fd, base, plan })
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
    pub unsafe fn bind_ring(&self, handle: &Binding) {
        // SAFETY: the ring's control block is inside the mapping.
        unsafe { handle.bind(self.base.add(self.plan.ring_offset)) }
    }
}

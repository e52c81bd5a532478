//! The region shared with the tracer: a header and one [`ProbeCounters`] per probe.
//!
//! It is a memfd so that the tracer can map the same pages through `/proc/PID/fd/N` and
//! read counters while the target runs and after it exits.
//!
//! Trampolines hold the addresses of their counters, so counters never move: the region
//! reserves address space for [`MAX_CAPACITY`] slots up front (a shared mapping longer
//! than the file, which costs nothing until touched) and grows by extending the memfd.
//! The tracer maps the file at its current length.

use probes::shared::{ProbeCounters, SharedHeader, MAGIC};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

/// Most counter slots one process can have.
pub const MAX_CAPACITY: usize = 1 << 20;

pub struct SharedRegion {
    fd: OwnedFd,
    base: *mut u8,
    len: usize,
    capacity: usize,
}

// SAFETY: the region holds only atomics and a header written once before sharing.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; all mutation after creation goes through atomics.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// A zeroed region with room for `capacity` probes (at most [`MAX_CAPACITY`]), able
    /// to grow to [`MAX_CAPACITY`].
    pub fn create(capacity: usize) -> io::Result<Self> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        // SAFETY: memfd_create with a NUL-terminated name.
        let fd = unsafe { libc::memfd_create(c"tracer-shared".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new fd owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = SharedHeader::region_size(capacity);
        // SAFETY: ftruncate on our own memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a new shared mapping of the file and of the room it may grow into; the
        // part past the end of the file is never touched before the file covers it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SharedHeader::region_size(MAX_CAPACITY),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let region = SharedRegion {
            fd,
            base: base as *mut u8,
            len,
            capacity,
        };
        let h = region.base as *mut SharedHeader;
        // SAFETY: the mapping starts with a header; nobody else sees it yet.
        unsafe {
            (*h).magic = MAGIC;
            (*h).capacity = capacity as u32;
        }
        Ok(region)
    }

    /// The memfd, for the tracer to find as `/proc/PID/fd/N`.
    pub fn fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn header(&self) -> &SharedHeader {
        // SAFETY: the mapping starts with a header and lives as long as self.
        unsafe { &*(self.base as *const SharedHeader) }
    }

    /// Take the next free counter slot, growing the region when it is full; an error
    /// past [`MAX_CAPACITY`] or when the memfd cannot grow.
    pub fn claim(&mut self) -> io::Result<usize> {
        let used = &self.header().used;
        let id = used.load(Ordering::Acquire) as usize;
        if id >= self.capacity {
            self.grow()?;
        }
        self.header().used.store(id as u32 + 1, Ordering::Release);
        Ok(id)
    }

    /// Double the capacity (up to [`MAX_CAPACITY`]) by extending the memfd under the
    /// mapping reserved for it; existing counters stay where they are.
    fn grow(&mut self) -> io::Result<()> {
        let capacity = (self.capacity * 2).min(MAX_CAPACITY);
        if capacity == self.capacity {
            return Err(io::Error::other("the counter region is at its maximum"));
        }
        let len = SharedHeader::region_size(capacity);
        // SAFETY: ftruncate on our own memfd, only ever extended, so no mapped page
        // loses its backing.
        if unsafe { libc::ftruncate(self.fd.as_raw_fd(), len as libc::off_t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.len = len;
        self.capacity = capacity;
        let h = self.base as *mut SharedHeader;
        // SAFETY: the header's capacity is only written here, under `&mut self`; the
        // tracer reads it only while every thread of the target is stopped.
        unsafe { (*h).capacity = capacity as u32 };
        Ok(())
    }

    /// Zero the counters of slot `id` (a slot reused by a new session), keeping its
    /// flags and encoding.
    pub fn reset(&self, id: usize) {
        let c = self.counters(id);
        for a in [&c.hits, &c.exits, &c.skipped, &c.panics, &c.lost_exits] {
            a.store(0, Ordering::Relaxed);
        }
    }

    pub fn counters(&self, id: usize) -> &ProbeCounters {
        self.counters_static(id)
    }

    /// Counters that live as long as the process: the region is never unmapped while
    /// probes may run, since trampolines stay mapped too.
    pub fn counters_static(&self, id: usize) -> &'static ProbeCounters {
        assert!(id < self.capacity);
        // SAFETY: in bounds (checked), aligned (64-byte header, 64-byte aligned
        // counters), zero-initialised atomics are valid.
        unsafe {
            &*(self
                .base
                .add(SharedHeader::COUNTERS_OFFSET + id * std::mem::size_of::<ProbeCounters>())
                as *const ProbeCounters)
        }
    }
}

//! The region shared with the tracer: a header and one counter slot per probe.
//!
//! It is a memfd so that the tracer can map the same pages through `/proc/PID/fd/N` and
//! read counters while the target runs and after it exits.
//!
//! # Counting that scales with threads
//!
//! One counter per probe, bumped with `lock inc`, made every thread that hits the probe
//! fight for one cache line: with 4 threads running at once on this 2-core machine a
//! hit cost about 9 ns more than with one thread (`bench/probe_overhead.md`). So each
//! slot is a [`probes::abi::shared::ProbeCounters`] line followed by one
//! [`probes::abi::shared::Shard`] line per CPU, and a hit bumps the shard of the CPU it runs
//! on, still with `lock inc`; readers sum the lines ([`probes::abi::shared::Counts`]).
//!
//! The CPU number comes from the `rseq` area glibc (>= 2.35) registers for every thread:
//! the kernel keeps `cpu_id` there current, one load at `fs:[__rseq_offset + 4]`. The
//! index is `cpu_id & (shards - 1)`, so any value (a stale one right after a migration,
//! -1 or -2 in a thread whose registration failed, a CPU beyond the shard count) still
//! names a real shard; and since every increment is atomic, the totals are exact
//! whatever shard a hit lands in: the CPU number only decides which line is local.
//! Nothing is per thread, so nothing is lost or needs recycling when threads exit, and
//! the tracer reads the totals from the memfd, live or after the target died. Without
//! `rseq` (glibc < 2.35, `glibc.pthread.rseq=0`) the region has no shards and every hit
//! bumps the first line, as before.
//!
//! Weighed against it, measured here (tight loop, ns per count, one thread): `lock inc`
//! alone 2.1-2.2; with the rseq load 2.0-2.2; with `rdpid` 2.7-2.9; with `rdtscp` 26
//! (slow in this KVM guest). Per-thread blocks reached through the agent's static TLS
//! would need no `lock`, but every block must be found by the tracer and folded into
//! the totals when its thread exits, which needs a hook at thread exit that a
//! `dlopen`ed agent cannot get without calling into libc, and memory per thread and
//! probe. A locked add on a line the CPU already owns costs what a plain one does in
//! the counting paths (see `dispatch::bump`), so per-CPU lines lose nothing to them.
//!
//! Trampolines hold the addresses of their counters, so counters never move: the region
//! reserves address space for [`MAX_CAPACITY`] slots up front (a shared mapping longer
//! than the file, which costs nothing until touched) and grows by extending the memfd.
//! The tracer maps the file at its current length.
//!
//! The memfd is kept at a high descriptor number ([`crate::memfd`]) and checked before it
//! is extended: when the program closed it (or closed it and opened a file of its own
//! there), the region keeps its current capacity and probes beyond it are refused with
//! [`crate::memfd::SHARED_LOST`]; the program's descriptor is never touched.

use probes::abi::shared::{Counts, SharedHeader, MAGIC};
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::OnceLock;

/// Most counter slots one process can have.
pub const MAX_CAPACITY: usize = 1 << 20;

/// Most shards per slot. CPUs beyond it share shards (two CPUs per line rather than
/// all of them), which keeps a slot within 2 KiB on large machines.
pub const MAX_SHARDS: usize = 32;

/// How hits find their shard, the same for every thread of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sharding {
    /// Offset of the rseq area's `cpu_id` from the thread pointer: `fs:[cpu_offset]`.
    pub cpu_offset: i32,
    /// Shards per slot, a power of two.
    pub shards: u32,
}

impl Sharding {
    pub fn mask(&self) -> u32 {
        self.shards - 1
    }
}

std::arch::global_asm!(
    // Weak: a glibc older than 2.35 lacks them and the agent still loads, unsharded.
    ".weak __rseq_offset",
    ".weak __rseq_size",
    ".pushsection .text.tracer_agent_rseq,\"ax\",@progbits",
    ".globl tracer_agent_rseq",
    ".hidden tracer_agent_rseq",
    ".type tracer_agent_rseq,@function",
    // (offset address or 0, size address or 0) in (rax, rdx).
    "tracer_agent_rseq:",
    "mov rax, qword ptr [rip + __rseq_offset@GOTPCREL]",
    "mov rdx, qword ptr [rip + __rseq_size@GOTPCREL]",
    "ret",
    ".popsection",
);

/// This process's sharding: None when glibc registered no `rseq` area.
pub fn sharding() -> Option<Sharding> {
    static S: OnceLock<Option<Sharding>> = OnceLock::new();
    *S.get_or_init(detect_sharding)
}

fn detect_sharding() -> Option<Sharding> {
    let (offset, size): (*const isize, *const u32);
    // SAFETY: a function of our own that only loads two GOT entries.
    unsafe {
        std::arch::asm!("call tracer_agent_rseq", out("rax") offset, out("rdx") size,
            clobber_abi("C"));
    }
    if offset.is_null() || size.is_null() {
        return None;
    }
    // SAFETY: glibc's exported variables, set before any user code runs.
    let (offset, size) = unsafe { (*offset, *size) };
    // Size 0: registration disabled (or done by someone else); cpu_id is not kept.
    if size == 0 {
        return None;
    }
    let cpu_offset = i32::try_from(offset.checked_add(4)?).ok()?;
    CPU_OFFSET.store(cpu_offset, Ordering::Relaxed);
    Some(Sharding {
        cpu_offset,
        shards: shard_count(),
    })
}

/// One shard per configured CPU (rounded up to a power of two), at most [`MAX_SHARDS`].
fn shard_count() -> u32 {
    // SAFETY: sysconf has no preconditions.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_CONF) };
    (cpus.max(1) as usize).next_power_of_two().min(MAX_SHARDS) as u32
}

/// [`Sharding::cpu_offset`] once detected, for the Rust hot path (a plain load).
static CPU_OFFSET: AtomicI32 = AtomicI32::new(0);

/// The calling thread's CPU number from its rseq area, to be masked. Only meaningful
/// once [`sharding`] returned Some, which every region with shards implies.
#[inline(always)]
pub fn current_cpu() -> usize {
    let cpu: u32;
    // SAFETY: `fs:[offset]` is the calling thread's rseq `cpu_id`, inside its TCB.
    unsafe {
        std::arch::asm!("mov {c:e}, dword ptr fs:[{o}]",
            o = in(reg) CPU_OFFSET.load(Ordering::Relaxed) as isize,
            c = out(reg) cpu, options(nostack, readonly, preserves_flags));
    }
    cpu as usize
}

pub struct SharedRegion {
    /// The memfd: never closed (the tracer opens it for as long as the process lives).
    fd: i32,
    /// The memfd's identity when created; a forked child's copy of the region is another
    /// file under the same number ([`crate::follow::region_identity`]).
    id: crate::memfd::Identity,
    base: *mut u8,
    len: usize,
    capacity: usize,
    shards: usize,
}

// SAFETY: the region holds only atomics and a header written once before sharing.
unsafe impl Send for SharedRegion {}
// SAFETY: as above; all mutation after creation goes through atomics.
unsafe impl Sync for SharedRegion {}

impl SharedRegion {
    /// A zeroed region with room for `capacity` probes (at most [`MAX_CAPACITY`]), able
    /// to grow to [`MAX_CAPACITY`], sharded as [`sharding`] says.
    pub fn create(capacity: usize) -> io::Result<Self> {
        Self::create_with_shards(capacity, sharding().map_or(0, |s| s.shards as usize))
    }

    fn create_with_shards(capacity: usize, shards: usize) -> io::Result<Self> {
        let capacity = capacity.clamp(1, MAX_CAPACITY);
        let (fd, id) = crate::memfd::create(c"tracer-shared", 0)?;
        let fail = || {
            let e = io::Error::last_os_error();
            crate::memfd::close_if(fd, id);
            Err(e)
        };
        let len = SharedHeader::region_size(capacity, shards);
        // SAFETY: ftruncate on our own new memfd.
        if unsafe { libc::ftruncate(fd, len as libc::off_t) } != 0 {
            return fail();
        }
        // SAFETY: a new shared mapping of the file and of the room it may grow into; the
        // part past the end of the file is never touched before the file covers it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                SharedHeader::region_size(MAX_CAPACITY, shards),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return fail();
        }
        let region = SharedRegion {
            fd,
            id,
            base: base as *mut u8,
            len,
            capacity,
            shards,
        };
        let h = region.base as *mut SharedHeader;
        // SAFETY: the mapping starts with a header; nobody else sees it yet.
        unsafe {
            (*h).magic = MAGIC;
            (*h).capacity = capacity as u32;
            (*h).shards = shards as u32;
        }
        crate::follow::note_region(region.base, region.fd(), id, shards);
        Ok(region)
    }

    /// The memfd's number, for the tracer to find as `/proc/PID/fd/N` (which it checks
    /// names this region's file: the program may have closed or reused it).
    pub fn fd(&self) -> i32 {
        self.fd
    }

    /// Whether the memfd is still open under its number (not closed or reused by the
    /// program).
    pub fn fd_is_ours(&self) -> bool {
        crate::memfd::identity(self.fd).is_some_and(|now| {
            now == self.id
                || crate::follow::region_identity(self.base).is_some_and(|child| now == child)
        })
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
        let len = SharedHeader::region_size(capacity, self.shards);
        // The program may have closed the number, or closed it and opened a file of its
        // own there: extending that would cut or grow the program's file.
        if !self.fd_is_ours() {
            return Err(io::Error::other(crate::memfd::SHARED_LOST));
        }
        // SAFETY: ftruncate on our own memfd (checked just above), only ever extended, so
        // no mapped page loses its backing.
        if unsafe { libc::ftruncate(self.fd, len as libc::off_t) } != 0 {
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

    /// Shards per slot (0: not sharded).
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Zero the counters of slot `id` (a slot reused by a new session), keeping its
    /// flags and encoding.
    pub fn reset(&self, id: usize) {
        self.counters(id).reset();
    }

    /// The counts of slot `id`, summed over its shards.
    pub fn counters(&self, id: usize) -> Counts<'_> {
        self.counters_static(id)
    }

    /// Counters that live as long as the process: the region is never unmapped while
    /// probes may run, since trampolines stay mapped too.
    pub fn counters_static(&self, id: usize) -> Counts<'static> {
        assert!(id < self.capacity);
        // SAFETY: in bounds (checked), aligned (64-byte header, slots a multiple of 64
        // bytes), zero-initialised atomics are valid, and the header says `shards`.
        unsafe {
            Counts::from_slot(
                self.base.add(SharedHeader::slot_offset(id, self.shards)),
                self.shards,
            )
        }
    }
}

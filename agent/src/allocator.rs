//! Near-code allocator: executable memory within `rel32` reach of given addresses.
//!
//! A trampoline is entered by a 5-byte `jmp rel32` written over a probe site, and it
//! re-encodes RIP-relative operands of the instructions it steals, so it must lie within
//! +-2 GiB of the site. It may also want to reach its handler with `call rel32`. Those
//! addresses are the *targets* of an allocation: every byte of the block handed out
//! reaches every target with a 32-bit displacement.
//!
//! Strategy, in the spirit of LuaJIT's `lj_mcode.c`:
//! 1. Compute the window of start addresses that keep every byte of the block in reach
//!    of every target, clamped to `[vm.mmap_min_addr, 47-bit user limit)`.
//! 2. Reuse a chunk we already own when it lies wholly inside that window and has room.
//! 3. Else grow: map a new chunk directly above or below an owned chunk that is in the
//!    window, so our code stays dense and the address space unfragmented.
//! 4. Else search: read `/proc/self/maps`, intersect the free gaps with the window, try
//!    page-aligned candidates at the gap edges, nearest to the targets first.
//! 5. Map candidates with `MAP_FIXED_NOREPLACE`. `EEXIST` means another thread mapped
//!    there since we read the listing: try the next candidate. Kernels before 4.17 treat
//!    the flag as a mere hint, so a mapping that lands elsewhere is unmapped and skipped.
//! 6. No candidate in range: a typed [`AllocError::OutOfRange`] (counted), so callers can
//!    place code elsewhere and reach the targets with far encodings.
//!
//! W^X: each chunk is one memfd of its own mapped twice, `r-x` near the targets and `rw-`
//! wherever the kernel likes. No page is ever writable and executable through the same
//! mapping. The alternative, writing through `rw-` and flipping to `r-x` with
//! `mprotect`, would fault any other thread executing an older trampoline on the same
//! page at the moment a new one is written; with two views, new code is written while old
//! code runs. x86 keeps instruction fetch coherent with stores to the same physical page.
//! The memfd is closed once both views exist (the mappings keep the file): nothing is
//! written or mapped through a descriptor later, so none stays in the program's fd table
//! for it to close or reuse (see [`crate::memfd`]).
//!
//! Forks: a forked child shares every chunk's pages with its parent (both views are
//! `MAP_SHARED`) but has its own copy of this bookkeeping, so the two would each carve
//! the same free offsets for code and literal lines, one overwriting the other's live
//! trampolines. A chunk therefore remembers the process that mapped it (pid and fork
//! generation, see [`Owner`]), and only that process writes into it: in any other, an
//! inherited chunk is full. Its trampolines still run there (they are only executed),
//! and new code goes into chunks the child maps itself, which the maps search places
//! around the inherited ones. The check costs a `getpid` per reservation, never a hit.
//!
//! Layout of a chunk: code grows up from its start in 16-byte aligned blocks; literal
//! slots (8-byte addresses read by `call qword [rip+slot]`) are carved from the top down in
//! whole 64-byte lines, so a slot never shares a cache line with code.

use crate::maps::{self, MapEntry};
use std::collections::HashMap;
use std::fmt;
use std::io;

/// Page size on x86-64 Linux.
pub const PAGE: u64 = 4096;
/// Exclusive upper bound of user space with 4-level paging (`TASK_SIZE`): the kernel never
/// maps user memory above it without an explicit hint for 5-level paging.
pub const USER_TOP: u64 = 0x7fff_ffff_f000;
/// Maximum distance between any byte of a block and a target. A `rel32` operand counts
/// from the end of its instruction, so keep a page of slack below 2 GiB.
pub const REACH: u64 = (1 << 31) - PAGE;
/// Default size of a chunk: many trampolines are carved from one.
pub const CHUNK_SIZE: u64 = 64 * 1024;
/// Alignment of code blocks: one decode window, cheap and keeps loops aligned.
pub const CODE_ALIGN: u64 = 16;
/// A literal pool line.
pub const LINE: u64 = 64;
/// Room left free below a `[stack]` mapping so the main stack can still grow into it.
const STACK_ROOM: u64 = 8 << 20;
/// Room left free above `[heap]` so `brk` can still grow.
const HEAP_ROOM: u64 = 256 << 20;

/// Bounds of the address space an allocation may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Lowest address user mappings may start at (`vm.mmap_min_addr`).
    pub min_addr: u64,
    /// Exclusive upper bound.
    pub max_addr: u64,
}

impl Limits {
    /// The limits of this machine: `vm.mmap_min_addr` (64 KiB when unreadable) and the
    /// 47-bit user limit.
    pub fn current() -> Self {
        let min = std::fs::read_to_string("/proc/sys/vm/mmap_min_addr")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(65536);
        Limits {
            min_addr: align_up(min.max(PAGE), PAGE),
            max_addr: USER_TOP,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::current()
    }
}

/// Why an allocation failed.
#[derive(Debug)]
pub enum AllocError {
    /// No free gap of the address space lies within reach of every target. Callers fall
    /// back to placing code anywhere and reaching targets with far encodings.
    OutOfRange { targets: Vec<u64>, size: u64 },
    /// The targets are further apart than a block can bridge (more than ~4 GiB).
    TargetsTooFarApart { targets: Vec<u64> },
    /// The kernel refused memory (memfd, mmap, ftruncate): the target is out of memory or
    /// forbids these calls (seccomp).
    Os {
        call: &'static str,
        error: io::Error,
    },
}

impl fmt::Display for AllocError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AllocError::OutOfRange { targets, size } => write!(
                f,
                "no free address range of {size} bytes within +-2 GiB of {}",
                hex_list(targets)
            ),
            AllocError::TargetsTooFarApart { targets } => write!(
                f,
                "addresses {} are too far apart for one block to reach all of them with rel32",
                hex_list(targets)
            ),
            AllocError::Os { call, error } => write!(f, "{call} failed: {error}"),
        }
    }
}

impl std::error::Error for AllocError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AllocError::Os { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn hex_list(v: &[u64]) -> String {
    v.iter()
        .map(|a| format!("{a:#x}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

pub fn align_down(x: u64, a: u64) -> u64 {
    x / a * a
}

/// The half-open range `[lo, hi)` a block of `size` bytes must lie in so that every one of
/// its bytes is within [`REACH`] of every target. `None` when empty.
pub fn window(targets: &[u64], size: u64, limits: &Limits) -> Option<(u64, u64)> {
    let (lo, hi) = match (targets.iter().max(), targets.iter().min()) {
        (Some(&max_t), Some(&min_t)) => (
            max_t.saturating_sub(REACH),
            min_t.saturating_add(REACH).saturating_add(1),
        ),
        _ => (limits.min_addr, limits.max_addr),
    };
    let lo = lo.max(limits.min_addr);
    let hi = hi.min(limits.max_addr);
    (hi > lo && hi - lo >= size).then_some((lo, hi))
}

/// Free gaps of a maps listing within `limits`, with room kept for the main stack and the
/// heap to grow. Returned sorted by address.
pub fn free_gaps(maps: &[MapEntry], limits: &Limits) -> Vec<(u64, u64)> {
    let mut taken: Vec<(u64, u64)> = maps
        .iter()
        .map(|e| match e.path.as_str() {
            "[stack]" => (e.start.saturating_sub(STACK_ROOM), e.end),
            "[heap]" => (e.start, e.end.saturating_add(HEAP_ROOM)),
            _ => (e.start, e.end),
        })
        .collect();
    taken.sort_unstable();
    let mut gaps = Vec::new();
    let mut cursor = limits.min_addr;
    for (start, end) in taken {
        if start >= limits.max_addr {
            break;
        }
        if start > cursor {
            gaps.push((cursor, start));
        }
        cursor = cursor.max(end);
    }
    if cursor < limits.max_addr {
        gaps.push((cursor, limits.max_addr));
    }
    gaps
}

/// Page-aligned start addresses for a block of `size` bytes (a multiple of [`PAGE`]) that
/// reach every target, nearest first: the two edges of each free gap clipped to the
/// window. Gap edges keep the address space dense; nearest first keeps later, larger
/// windows (say, a handler's) satisfiable from the same chunk.
pub fn candidates(maps: &[MapEntry], targets: &[u64], size: u64, limits: &Limits) -> Vec<u64> {
    let Some((lo, hi)) = window(targets, size, limits) else {
        return Vec::new();
    };
    let center = match targets {
        [] => lo + (hi - lo) / 2,
        _ => {
            let (min_t, max_t) = (
                *targets.iter().min().unwrap(),
                *targets.iter().max().unwrap(),
            );
            min_t + (max_t - min_t) / 2
        }
    };
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (g0, g1) in free_gaps(maps, limits) {
        let c0 = align_up(g0.max(lo), PAGE);
        let c1 = g1.min(hi);
        if c1 < c0 || c1 - c0 < size {
            continue;
        }
        let low = c0;
        let high = align_down(c1 - size, PAGE);
        // A target inside the gap itself (an unmapped address given as a hint).
        let inside = align_down(center.saturating_sub(size / 2), PAGE).clamp(low, high);
        for a in [low, high, inside] {
            if a >= c0 && a + size <= c1 && !out.iter().any(|&(x, _)| x == a) {
                let mid = a + size / 2;
                out.push((a, mid.abs_diff(center)));
            }
        }
    }
    out.sort_by_key(|&(a, d)| (d, a));
    out.into_iter().map(|(a, _)| a).collect()
}

/// Which encoding-independent facts the allocator counted, for users and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Chunks mapped after a maps search.
    pub searched: u64,
    /// Chunks mapped adjacent to an owned chunk.
    pub grown: u64,
    /// Candidates lost to a concurrent mapping (`EEXIST`) or a kernel that ignored the
    /// placement (hint-only `MAP_FIXED_NOREPLACE`).
    pub collisions: u64,
    /// Requests that found no range in reach: callers fell back to far encodings.
    pub out_of_range: u64,
    /// Blocks handed out.
    pub blocks: u64,
    /// Bytes of code committed.
    pub code_bytes: u64,
}

/// The process a chunk was mapped in: only that process writes into it.
///
/// The pid tells a child made by any kind of fork (a raw `clone` or `_Fork` runs no
/// atfork handler); the fork generation ([`probes::fork::generation`], bumped by an atfork
/// handler) tells a child that got the pid of an ancestor that has exited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Owner {
    pid: i32,
    generation: Option<u32>,
}

impl Owner {
    fn current() -> Self {
        Owner {
            // SAFETY: getpid has no preconditions (glibc does not cache it).
            pid: unsafe { libc::getpid() },
            generation: probes::fork::generation(),
        }
    }
}

/// A reserved block of code, to be filled with [`NearAllocator::commit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Block {
    /// Address the code will execute at.
    pub addr: u64,
    /// Bytes reserved. Literal lines carved while the block is reserved may take back
    /// what lies above its floor (see [`NearAllocator::reserve_rest`]).
    pub capacity: u64,
    chunk: usize,
    /// Chunk offset literal lines stay above while the block is reserved.
    floor: u64,
}

impl Block {
    /// Whether every byte of the block is within rel32 reach of `target`.
    pub fn reaches(&self, target: u64) -> bool {
        target.abs_diff(self.addr) <= REACH
            && target.abs_diff(self.addr + self.capacity.max(1) - 1) <= REACH
    }
}

struct Chunk {
    /// The process that mapped it, the only one that writes into it.
    owner: Owner,
    /// Executable view.
    rx: u64,
    /// Writable view of the same pages.
    rw: *mut u8,
    size: u64,
    /// Offset of the first free code byte.
    code_end: u64,
    /// Offset of the lowest literal line.
    lines_start: u64,
    /// Free 8-byte slots left in the lowest literal line.
    line_free: u64,
    /// Slot already holding a value, for sharing.
    shared: HashMap<u64, u64>,
    /// End offset of a block reserved and not yet committed: no other code block is carved
    /// meanwhile, and literal lines stay above it.
    reserved: Option<u64>,
}

impl Chunk {
    fn code_room(&self) -> u64 {
        self.lines_start
            .saturating_sub(align_up(self.code_end, CODE_ALIGN))
    }

    /// Lowest offset literal lines may not go below.
    fn code_floor(&self) -> u64 {
        self.reserved
            .unwrap_or(0)
            .max(align_up(self.code_end, CODE_ALIGN))
    }

    fn within(&self, lo: u64, hi: u64) -> bool {
        self.rx >= lo && self.rx + self.size <= hi
    }
}

/// Hands out executable blocks near given addresses, and literal slots in the same chunks.
pub struct NearAllocator {
    chunks: Vec<Chunk>,
    limits: Limits,
    stats: AllocStats,
    /// This process, as of the last reservation: blocks are handed out from chunks it
    /// owns only.
    owner: Owner,
    /// Ask the pid again at the next reservation (see [`Self::recheck_owner`]).
    recheck: bool,
}

// SAFETY: the raw pointers are views of mappings the allocator owns exclusively; moving the
// allocator between threads moves that ownership with it.
unsafe impl Send for NearAllocator {}

impl NearAllocator {
    /// An allocator for this process with the machine's limits.
    pub fn new() -> Result<Self, AllocError> {
        Self::with_limits(Limits::current())
    }

    /// An allocator confined to `limits` (tests use this to force placements).
    pub fn with_limits(limits: Limits) -> Result<Self, AllocError> {
        // Count forks from now on, so that a chunk knows the generation it was mapped in.
        probes::fork::watch();
        Ok(NearAllocator {
            chunks: Vec::new(),
            limits,
            stats: AllocStats::default(),
            owner: Owner::current(),
            recheck: false,
        })
    }

    /// The next reservation asks this process's pid again instead of trusting the fork
    /// generation alone: a child made by a raw `clone` or `_Fork` runs no fork handler, so
    /// only its pid tells it from its parent. Called at the start of each batch the
    /// tracer asks for: a process can only have changed between calls into the agent.
    pub fn recheck_owner(&mut self) {
        self.recheck = true;
    }

    pub fn stats(&self) -> AllocStats {
        self.stats
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Executable ranges of the chunks, as `(start, end)`: those this process mapped and
    /// those it inherited from the process that forked it.
    pub fn chunks(&self) -> Vec<(u64, u64)> {
        self.chunks.iter().map(|c| (c.rx, c.rx + c.size)).collect()
    }

    /// Reserve `size` bytes of code that reach every address in `near`. An empty `near`
    /// means anywhere. Commit the code with [`commit`](Self::commit); until then the
    /// chunk hands out literal slots but no other code block.
    pub fn reserve(&mut self, near: &[u64], size: u64) -> Result<Block, AllocError> {
        let size = align_up(size.max(1), CODE_ALIGN);
        let need = align_up(size + LINE, PAGE).max(CHUNK_SIZE);
        let Some((lo, hi)) = window(near, need, &self.limits) else {
            self.stats.out_of_range += 1;
            let unlimited = Limits {
                min_addr: 0,
                max_addr: u64::MAX,
            };
            return Err(if window(near, need, &unlimited).is_none() {
                AllocError::TargetsTooFarApart {
                    targets: near.to_vec(),
                }
            } else {
                AllocError::OutOfRange {
                    targets: near.to_vec(),
                    size,
                }
            });
        };
        // A forked child writes nothing into the chunks it shares with its parent.
        // `getpid` is a system call (about 0.5 us in this guest: a third of a probe's
        // prepare), so it is asked again only when the fork generation moved, without a
        // generation, or once per batch ([`recheck_owner`](Self::recheck_owner)).
        let generation = probes::fork::generation();
        if self.recheck || generation.is_none() || generation != self.owner.generation {
            self.owner = Owner::current();
            self.recheck = false;
        }
        let me = self.owner;
        let fits = |c: &Chunk| {
            c.owner == me && c.reserved.is_none() && c.within(lo, hi) && c.code_room() >= size
        };
        let index = match self.chunks.iter().position(fits) {
            Some(i) => i,
            None => self.map_chunk(near, need, lo, hi)?,
        };
        let c = &mut self.chunks[index];
        let off = align_up(c.code_end, CODE_ALIGN);
        c.reserved = Some(off + size);
        Ok(Block {
            addr: c.rx + off,
            capacity: size,
            chunk: index,
            floor: off + size,
        })
    }

    /// Reserve the rest of a chunk, at least `min` bytes, for code whose size is known
    /// only once emitted (as LuaJIT's `lj_mcode.c` reserves its whole area): no other
    /// code block is carved from the chunk meanwhile, so nothing else competes for the
    /// room. Literal slots handed out meanwhile still take whole lines from the top, down
    /// to `min` bytes above the block; [`room`](Self::room) says how much is left for the
    /// code, and [`commit`](Self::commit) takes what was used.
    pub fn reserve_rest(&mut self, near: &[u64], min: u64) -> Result<Block, AllocError> {
        let mut block = self.reserve(near, min)?;
        let c = &self.chunks[block.chunk];
        block.capacity = c.lines_start - (block.addr - c.rx);
        Ok(block)
    }

    /// How many bytes of code the reserved `block` can hold now: its capacity, less any
    /// literal line carved into it since it was reserved.
    pub fn room(&self, block: &Block) -> u64 {
        let c = &self.chunks[block.chunk];
        let off = block.addr - c.rx;
        c.lines_start.saturating_sub(off).min(block.capacity)
    }

    /// Write `code` into a reserved block and release the rest of the reservation.
    /// Panics if `code` exceeds the block's [`room`](Self::room): callers check that first.
    pub fn commit(&mut self, block: Block, code: &[u8]) {
        assert!(
            code.len() as u64 <= self.room(&block),
            "code exceeds its reservation"
        );
        let c = &mut self.chunks[block.chunk];
        assert_eq!(
            c.owner, self.owner,
            "commit into a chunk of another process"
        );
        let off = block.addr - c.rx;
        assert_eq!(
            c.reserved,
            Some(block.floor),
            "commit without a reservation"
        );
        // SAFETY: [off, off + len) lies inside the chunk's writable view (checked above)
        // and no other Rust reference to it exists.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), c.rw.add(off as usize), code.len()) };
        c.code_end = off + code.len() as u64;
        c.reserved = None;
        self.stats.blocks += 1;
        self.stats.code_bytes += code.len() as u64;
    }

    /// Give a reservation back unused.
    pub fn cancel(&mut self, block: Block) {
        self.chunks[block.chunk].reserved = None;
    }

    /// An 8-byte literal slot holding `value`, in the chunk of `block`. Slots are shared
    /// between blocks when `shared`. `None` when the chunk has no room left, or is not
    /// this process's (a block reserved before a fork).
    pub fn slot(&mut self, block: &Block, value: u64, shared: bool) -> Option<u64> {
        let c = &mut self.chunks[block.chunk];
        if c.owner != self.owner {
            return None;
        }
        if shared {
            if let Some(&a) = c.shared.get(&value) {
                return Some(a);
            }
        }
        if c.line_free == 0 {
            if c.lines_start < LINE || c.lines_start - LINE < c.code_floor() {
                return None;
            }
            c.lines_start -= LINE;
            c.line_free = LINE / 8;
        }
        c.line_free -= 1;
        let off = c.lines_start + c.line_free * 8;
        // SAFETY: off is 8-aligned and inside the chunk's writable view; aligned 8-byte
        // stores are atomic on x86-64, so a concurrent reader sees the old or new value.
        unsafe { (c.rw.add(off as usize) as *mut u64).write_volatile(value) };
        let addr = c.rx + off;
        if shared {
            c.shared.insert(value, addr);
        }
        Some(addr)
    }

    /// Map a new chunk of `size` bytes in `[lo, hi)`, backed by a memfd of its own that
    /// is closed once mapped.
    fn map_chunk(
        &mut self,
        near: &[u64],
        size: u64,
        lo: u64,
        hi: u64,
    ) -> Result<usize, AllocError> {
        let (fd, id) = crate::memfd::create(c"tracer-code", 0).map_err(|error| AllocError::Os {
            call: "memfd_create",
            error,
        })?;
        // SAFETY: ftruncate on the memfd just created.
        let r = if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            Err(os("ftruncate"))
        } else {
            self.place_chunk(fd, near, size, lo, hi)
        };
        crate::memfd::close_if(fd, id);
        r
    }

    /// [`Self::map_chunk`] with the chunk's memfd `fd`, `size` bytes long.
    fn place_chunk(
        &mut self,
        fd: i32,
        near: &[u64],
        size: u64,
        lo: u64,
        hi: u64,
    ) -> Result<usize, AllocError> {
        // Grow next to a chunk we own: above first, then below.
        let adjacent: Vec<u64> = self
            .chunks
            .iter()
            .flat_map(|c| [c.rx + c.size, c.rx.wrapping_sub(size)])
            .filter(|&a| a >= lo && a.checked_add(size).is_some_and(|e| e <= hi))
            .collect();
        for a in adjacent {
            if let Some(i) = self.try_map(fd, a, size)? {
                self.stats.grown += 1;
                return Ok(i);
            }
        }
        let maps = maps::read_self().map_err(|error| AllocError::Os {
            call: "read /proc/self/maps",
            error,
        })?;
        for a in candidates(&maps, near, size, &self.limits) {
            if let Some(i) = self.try_map(fd, a, size)? {
                self.stats.searched += 1;
                return Ok(i);
            }
        }
        self.stats.out_of_range += 1;
        Err(AllocError::OutOfRange {
            targets: near.to_vec(),
            size,
        })
    }

    /// Map the `size` bytes of memfd `fd` at exactly `addr`. `Ok(None)`: the range is
    /// not available.
    fn try_map(&mut self, fd: i32, addr: u64, size: u64) -> Result<Option<usize>, AllocError> {
        let Some(rx) = self.map_exec_view(fd, addr, size)? else {
            return Ok(None);
        };
        let rw = match map_write_view(fd, size) {
            Ok(rw) => rw,
            Err(error) => {
                // SAFETY: undo the executable view created above.
                unsafe { libc::munmap(rx, size as usize) };
                return Err(error);
            }
        };
        self.chunks.push(Chunk {
            owner: self.owner,
            rx: addr,
            rw,
            size,
            code_end: 0,
            lines_start: size,
            line_free: 0,
            shared: HashMap::new(),
            reserved: None,
        });
        Ok(Some(self.chunks.len() - 1))
    }

    /// The executable view of memfd `fd`'s `size` bytes, at exactly `addr`; `Ok(None)` (a
    /// collision) when something is mapped there.
    fn map_exec_view(
        &mut self,
        fd: i32,
        addr: u64,
        size: u64,
    ) -> Result<Option<*mut libc::c_void>, AllocError> {
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping; the result is
        // checked below.
        let rx = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                size as usize,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_SHARED | libc::MAP_FIXED_NOREPLACE,
                fd,
                0,
            )
        };
        if rx == libc::MAP_FAILED {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EEXIST) | Some(libc::ENOMEM) | Some(libc::EPERM) => {
                    self.stats.collisions += 1;
                    Ok(None)
                }
                _ => Err(AllocError::Os {
                    call: "mmap",
                    error: e,
                }),
            };
        }
        if rx as u64 != addr {
            // A kernel before 4.17 took the flag as a hint and put the mapping elsewhere.
            // SAFETY: unmapping the mapping just created, which nothing references.
            unsafe { libc::munmap(rx, size as usize) };
            self.stats.collisions += 1;
            return Ok(None);
        }
        Ok(Some(rx))
    }
}

/// The writable view of memfd `fd`'s `size` bytes, anywhere.
fn map_write_view(fd: i32, size: u64) -> Result<*mut u8, AllocError> {
    // SAFETY: a fresh shared mapping of the same file, anywhere.
    let rw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        )
    };
    if rw == libc::MAP_FAILED {
        return Err(os("mmap"));
    }
    Ok(rw as *mut u8)
}

fn os(call: &'static str) -> AllocError {
    AllocError::Os {
        call,
        error: io::Error::last_os_error(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::parse;

    const LIM: Limits = Limits {
        min_addr: 0x10000,
        max_addr: USER_TOP,
    };
    const GIB: u64 = 1 << 30;

    fn reaches_all(a: u64, size: u64, targets: &[u64]) -> bool {
        targets
            .iter()
            .all(|&t| t.abs_diff(a) <= REACH && t.abs_diff(a + size - 1) <= REACH)
    }

    #[test]
    fn empty_listing_places_next_to_target() {
        let t = 0x5555_5555_4000;
        let c = candidates(&[], &[t], CHUNK_SIZE, &LIM);
        assert!(!c.is_empty());
        assert!(reaches_all(c[0], CHUNK_SIZE, &[t]));
        // Nearest first: the first candidate is within a chunk of the target.
        assert!(c[0].abs_diff(t) <= CHUNK_SIZE);
    }

    #[test]
    fn fragmented_listing_picks_nearest_gap_edge() {
        let maps = parse(
            "\
555555554000-555555556000 r--p 00000000 fd:01 1 /bin/prog
555555556000-555555558000 r-xp 00002000 fd:01 1 /bin/prog
555555558000-555555560000 rw-p 00000000 00:00 0
555555561000-555555562000 rw-p 00000000 00:00 0
555555600000-555555700000 rw-p 00000000 00:00 0
7ffff7d00000-7ffff7f00000 r-xp 00000000 fd:01 2 /lib/libc.so.6
",
        )
        .unwrap();
        let site = 0x555555556100;
        let c = candidates(&maps, &[site], CHUNK_SIZE, &LIM);
        assert!(!c.is_empty());
        for &a in &c {
            assert!(reaches_all(a, CHUNK_SIZE, &[site]), "{a:#x}");
            assert_eq!(a % PAGE, 0);
            assert!(
                maps.iter().all(|e| a + CHUNK_SIZE <= e.start || a >= e.end),
                "{a:#x} overlaps"
            );
        }
        // The 4 KiB hole at 0x555555560000 is too small; the nearest fitting edge is right
        // below the executable.
        assert_eq!(c[0], 0x555555554000 - CHUNK_SIZE);
    }

    #[test]
    fn no_gap_in_range() {
        // One mapping covering +-3 GiB around the target.
        let t = 0x4000_0000_0000u64;
        let text = format!(
            "{:x}-{:x} rw-p 00000000 00:00 0\n",
            t - 3 * GIB,
            t + 3 * GIB
        );
        let maps = parse(&text).unwrap();
        assert!(candidates(&maps, &[t], CHUNK_SIZE, &LIM).is_empty());
    }

    #[test]
    fn targets_too_far_apart_have_no_window() {
        assert!(window(&[0x1000_0000, 0x1000_0000 + 5 * GIB], PAGE, &LIM).is_none());
        // Two targets 3 GiB apart: the window lies between them.
        let (lo, hi) = window(&[0x10_0000_0000, 0x10_0000_0000 + 3 * GIB], PAGE, &LIM).unwrap();
        assert!(lo >= 0x10_0000_0000 + 3 * GIB - REACH);
        assert!(hi <= 0x10_0000_0000 + REACH + 1);
    }

    #[test]
    fn near_the_47_bit_top() {
        let t = USER_TOP - 0x2000;
        let c = candidates(&[], &[t], CHUNK_SIZE, &LIM);
        assert!(!c.is_empty());
        for a in c {
            assert!(a + CHUNK_SIZE <= USER_TOP, "{a:#x} crosses the user limit");
            assert!(reaches_all(a, CHUNK_SIZE, &[t]));
        }
    }

    #[test]
    fn near_mmap_min_addr() {
        let lim = Limits {
            min_addr: 0x10000,
            max_addr: USER_TOP,
        };
        let maps = parse("400000-401000 r-xp 00000000 fd:01 3 /bin/nopie\n").unwrap();
        let c = candidates(&maps, &[0x400100], CHUNK_SIZE, &lim);
        assert!(!c.is_empty());
        for a in &c {
            assert!(*a >= 0x10000, "{a:#x} below mmap_min_addr");
        }
        // A target below mmap_min_addr itself leaves only addresses above the floor.
        let c = candidates(&[], &[0x1000], CHUNK_SIZE, &lim);
        assert_eq!(c[0], 0x10000);
    }

    #[test]
    fn keeps_room_for_stack_and_heap_growth() {
        let maps = parse(
            "\
555555554000-555555556000 r-xp 00000000 fd:01 1 /bin/prog
555555560000-555555581000 rw-p 00000000 00:00 0 [heap]
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0 [stack]
",
        )
        .unwrap();
        let heap_end = 0x555555581000u64;
        for a in candidates(&maps, &[heap_end], CHUNK_SIZE, &LIM) {
            assert!(!(heap_end..heap_end + HEAP_ROOM).contains(&a));
        }
        let stack = 0x7ffffffde000u64;
        for a in candidates(&maps, &[stack], CHUNK_SIZE, &LIM) {
            assert!(a + CHUNK_SIZE <= stack - STACK_ROOM || a >= 0x7ffffffff000);
        }
    }

    fn probe_fn() -> u64 {
        probe_fn as *const () as u64
    }

    fn assert_mapped_rx(block: &Block) {
        let maps = maps::read_self().unwrap();
        let e = maps.iter().find(|e| e.contains(block.addr)).unwrap();
        assert!(e.perms.exec && !e.perms.write, "{}", e.perms);
    }

    #[test]
    fn real_allocation_near_own_function_and_malloc() {
        let mut a = NearAllocator::new().unwrap();
        for target in [probe_fn(), libc::malloc as *const () as u64] {
            let b = a.reserve(&[target], 256).unwrap();
            assert!(b.reaches(target), "{:#x} vs {target:#x}", b.addr);
            assert_mapped_rx(&b);
            a.commit(b, &[0xc3]);
        }
        // Both targets at once: the window between them when they are close enough.
        let (f, m) = (probe_fn(), libc::malloc as *const () as u64);
        match a.reserve(&[f, m], 256) {
            Ok(b) => assert!(b.reaches(f) && b.reaches(m)),
            Err(AllocError::TargetsTooFarApart { .. }) => assert!(f.abs_diff(m) > 2 * REACH),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn many_blocks_share_a_chunk_and_slots_stay_in_their_own_lines() {
        let mut a = NearAllocator::new().unwrap();
        let t = probe_fn();
        let mut blocks = Vec::new();
        for i in 0..100u64 {
            let b = a.reserve(&[t], 200).unwrap();
            let s = a.slot(&b, 0x1000 + i, true).unwrap();
            assert_eq!(a.slot(&b, 0x1000 + i, true), Some(s), "shared slots dedupe");
            a.commit(b, &[0x90; 200]);
            blocks.push((b, s));
        }
        assert_eq!(a.chunks().len(), 1, "{:?}", a.chunks());
        let code_lines: Vec<u64> = blocks
            .iter()
            .flat_map(|(b, _)| (b.addr / LINE)..=((b.addr + 199) / LINE))
            .collect();
        for (_, s) in &blocks {
            assert_eq!(s % 8, 0);
            assert!(
                !code_lines.contains(&(s / LINE)),
                "slot {s:#x} in a code line"
            );
            // SAFETY: the slot lies in an r-x mapping we own.
            let v = unsafe { (*s as *const u64).read_volatile() };
            assert!((0x1000..0x1000 + 100).contains(&v));
        }
    }

    #[test]
    fn a_full_chunk_grows_contiguously() {
        let mut a = NearAllocator::new().unwrap();
        // A target in empty address space, far from the test binary: the other tests of
        // this process place chunks near their own functions in parallel and could take
        // the space this chunk grows into.
        let t = 0x2000_0000_0000;
        let big = CHUNK_SIZE - 2 * LINE;
        for _ in 0..3 {
            let b = a.reserve(&[t], big).unwrap();
            a.commit(b, &vec![0xcc; big as usize]);
        }
        let chunks = a.chunks();
        assert_eq!(chunks.len(), 3, "{chunks:x?}");
        let s = a.stats();
        assert_eq!(s.grown, 2, "{s:?}");
        // Every chunk touches another one: the region is contiguous.
        for &(start, end) in &chunks {
            assert!(chunks.iter().any(|&(s2, e2)| s2 == end || e2 == start));
        }
    }

    /// A chunk mapped before a fork is shared with the child: the child carves no code
    /// and no literal line from it (it maps a chunk of its own), and the parent's later
    /// code, in the free space the child inherited, is untouched by the child's.
    #[test]
    fn a_forked_child_writes_nothing_into_inherited_chunks() {
        let mut a = NearAllocator::new().unwrap();
        let t = 0x2400_0000_0000;
        let first = a.reserve(&[t], 64).unwrap();
        a.commit(first, &[0xc3; 64]);
        let (start, end) = a.chunks()[0];
        let mut pipe = [0i32; 2];
        // SAFETY: a pipe, a fork whose child only runs the allocator and exits.
        let child = unsafe {
            assert_eq!(libc::pipe(pipe.as_mut_ptr()), 0);
            libc::fork()
        };
        assert!(child >= 0);
        if child == 0 {
            // The child: new code and a literal slot, reported to the parent; it never
            // returns into the test harness, even on a panic.
            let got = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let b = a.reserve(&[t], 64).unwrap();
                let s = a.slot(&b, 0x1234_5678, false).unwrap_or(0);
                a.commit(b, &[0xcc; 64]);
                [b.addr, s]
            }));
            // SAFETY: writing 16 bytes to our pipe, then leaving without unwinding.
            unsafe {
                if let Ok(got) = got {
                    libc::write(pipe[1], got.as_ptr().cast(), 16);
                }
                libc::_exit(got.is_err() as i32);
            }
        }
        // SAFETY: the parent's copy of the write end: the read below ends if the child
        // wrote nothing.
        unsafe { libc::close(pipe[1]) };
        // The parent carves its next block meanwhile, from its own chunk.
        let mine = a.reserve(&[t], 64).unwrap();
        let slot = a.slot(&mine, 0x8765_4321, false).unwrap();
        a.commit(mine, &[0x90; 64]);
        let mut got = [0u64; 2];
        let mut status = 0;
        // SAFETY: reading 16 bytes from our pipe; waiting for our child.
        unsafe {
            let n = libc::read(pipe[0], got.as_mut_ptr().cast(), 16);
            assert_eq!(libc::waitpid(child, &mut status, 0), child);
            libc::close(pipe[0]);
            assert_eq!((n, status), (16, 0), "the child failed");
        }
        let [code, lit] = got;
        assert!(lit != 0, "the child got no slot");
        for x in [code, lit] {
            assert!(!(start..end).contains(&x), "{x:#x} in the inherited chunk");
        }
        assert!((start..end).contains(&mine.addr) && (start..end).contains(&slot));
        // SAFETY: reading the parent's committed code and slot through the r-x view.
        let (bytes, value) = unsafe {
            (
                std::slice::from_raw_parts(mine.addr as *const u8, 64).to_vec(),
                (slot as *const u64).read_volatile(),
            )
        };
        assert_eq!(bytes, [0x90; 64]);
        assert_eq!(value, 0x8765_4321);
    }

    #[test]
    fn out_of_range_is_typed_and_counted() {
        // Limits that exclude everything within 2 GiB of the target.
        let t = probe_fn();
        let lim = Limits {
            min_addr: align_up(t + 3 * GIB, PAGE),
            max_addr: USER_TOP,
        };
        let mut a = NearAllocator::with_limits(lim).unwrap();
        match a.reserve(&[t], 64) {
            Err(AllocError::OutOfRange { .. }) | Err(AllocError::TargetsTooFarApart { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(a.stats().out_of_range, 1);
    }
}

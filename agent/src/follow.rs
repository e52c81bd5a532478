//! Following a program's children from inside, without ptrace while they run.
//!
//! `tracer run` (with `--follow`) puts this agent's file first in the program's
//! `LD_PRELOAD` and names a rendezvous, an abstract unix socket, in [`FOLLOW_ENV`]. Then:
//!
//! - **exec**: the new image loads the agent before its own code; the agent's constructor
//!   ([`on_load`]) says "exec" on the rendezvous and waits (at most [`FOLLOW_WAIT_MS`]) while
//!   the tracer seizes the process, installs the probes through the usual attach path (the
//!   agent is already loaded, so nothing is `dlopen`ed) and detaches; its "go" lets the
//!   program go on to `main`. With the rendezvous gone (the tracer ended or was killed) the
//!   connect fails at once and the agent does nothing at all.
//! - **fork**: the child's copy of the code holds the same trampolines, and its copy of
//!   the counter mapping is the same memfd as its parent's (`MAP_SHARED`). A `pthread_atfork`
//!   child handler ([`in_child`]) gives the child counters of its own: a new memfd holding a
//!   copy of the region with every count zeroed, moved over the old mapping with `mremap`
//!   (the trampolines hold counter addresses, which do not change), then sent to the tracer
//!   with `SCM_RIGHTS` so that it can read the child's counts, also after it exited.
//!   `vfork` and `clone` without fork semantics (`posix_spawn`, `system`) run no handler:
//!   such a child shares its parent's memory anyway, and counts in its parent's counters
//!   until it execs.
//! - **fork, not following** (`--no-follow`, `attach`, `--trace`, `--hist`, a pack): the
//!   same handler, registered as soon as the counter region exists, still gives the child
//!   counters of its own (not sent anywhere: nobody reads them), and moves every other
//!   region the parent's tracer reads (the `--hist`/`--summary` latency region, the
//!   `--trace` region, each pack's maps and ring: [`note_shared`]) off the shared file:
//!   a private anonymous copy goes over the same addresses, so the inherited trampolines
//!   and handlers keep working in the child and its calls stay out of the parent's
//!   report. Their descriptors are closed in the child (see [`quiet_regions`]).
//!
//! The fork handler runs in a child of a possibly multithreaded process and may itself be
//! probed (`-p 'libc:*'`): it makes raw system calls only and calls no libc function, so
//! no hit lands in the parent's counters from here.

use crate::memfd::Identity;
use crate::shared::MAX_CAPACITY;
use probes::abi::remote::{FOLLOW_ENV, FOLLOW_EXEC, FOLLOW_FORK, FOLLOW_GO, FOLLOW_WAIT_MS};
use probes::abi::shared::{Counts, SharedHeader};
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Once;

/// Room for an abstract socket name (`sun_path` is 108 bytes, the first is the NUL).
const NAME_MAX: usize = 100;

/// The rendezvous name, set once (constructor or [`tracer_agent_follow`]) before the
/// process forks; `NAME_LEN` 0 means "not following".
static NAME: [AtomicU8; NAME_MAX] = [const { AtomicU8::new(0) }; NAME_MAX];
static NAME_LEN: AtomicUsize = AtomicUsize::new(0);

/// The counter region: its address, its memfd, and its shards (see
/// [`crate::shared::SharedRegion`]); base 0 until one exists.
static REGION_BASE: AtomicUsize = AtomicUsize::new(0);
static REGION_FD: AtomicI32 = AtomicI32::new(-1);
static REGION_SHARDS: AtomicUsize = AtomicUsize::new(0);
/// The file `REGION_FD` names (`st_dev`, `st_ino`): the parent's at first, the child's own
/// once [`own_region`] replaced it. A number that names another file was closed or reused
/// by the program and is never touched.
static REGION_DEV: AtomicU64 = AtomicU64::new(0);
static REGION_INO: AtomicU64 = AtomicU64::new(0);

static ATFORK: Once = Once::new();

/// Called when the counter region is created: what a forked child needs to take a copy.
/// Registers the fork handler, following or not.
pub fn note_region(base: *mut u8, fd: i32, id: Identity, shards: usize) {
    REGION_FD.store(fd, Ordering::Relaxed);
    REGION_DEV.store(id.dev, Ordering::Relaxed);
    REGION_INO.store(id.ino, Ordering::Relaxed);
    REGION_SHARDS.store(shards, Ordering::Relaxed);
    REGION_BASE.store(base as usize, Ordering::Release);
    register_atfork();
}

/// Most regions besides the counters a forked child is kept from sharing ([`note_shared`]).
/// When more are made (a long-lived process loading many pack builds), the oldest entry is
/// forgotten: by then its region is one a later session replaced, which nothing writes.
const QUIET_MAX: usize = 64;

/// A shared region of the agent's, other than the counters, that a forked child must not
/// write through: where it is mapped, its length, and the memfd (number and identity)
/// behind it. `base` 0: a free entry. `base` is written last, so a child forked while an
/// entry is being written sees it whole or not at all.
struct Quiet {
    base: AtomicUsize,
    len: AtomicUsize,
    fd: AtomicI32,
    dev: AtomicU64,
    ino: AtomicU64,
}

static QUIET: [Quiet; QUIET_MAX] = [const {
    Quiet {
        base: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        fd: AtomicI32::new(-1),
        dev: AtomicU64::new(0),
        ino: AtomicU64::new(0),
    }
}; QUIET_MAX];
/// The entry taken next when none is free.
static QUIET_NEXT: AtomicUsize = AtomicUsize::new(0);
/// Serialises [`note_shared`] (the fork handler only reads, in a one-thread child).
static QUIET_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Called when a region the tracer reads (latency, trace, a pack's) is mapped at `base`
/// (`len` bytes of memfd `fd`, `id`), before any handler can write to it: a forked child
/// gets a private copy of it instead (see [`quiet_regions`]). Registers the fork handler.
pub fn note_shared(base: *mut u8, len: usize, fd: i32, id: Identity) {
    register_atfork();
    let _g = QUIET_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let base = base as usize;
    let at = QUIET
        .iter()
        .position(|q| q.base.load(Ordering::Relaxed) == base)
        .or_else(|| {
            QUIET
                .iter()
                .position(|q| q.base.load(Ordering::Relaxed) == 0)
        })
        .unwrap_or_else(|| QUIET_NEXT.fetch_add(1, Ordering::Relaxed) % QUIET_MAX);
    let q = &QUIET[at];
    q.base.store(0, Ordering::Release);
    q.len.store(len, Ordering::Relaxed);
    q.fd.store(fd, Ordering::Relaxed);
    q.dev.store(id.dev, Ordering::Relaxed);
    q.ino.store(id.ino, Ordering::Relaxed);
    q.base.store(base, Ordering::Release);
}

/// The identity of the counter region's memfd now, when `base` is the region's (a forked
/// child's is not the one it was created with).
pub fn region_identity(base: *mut u8) -> Option<Identity> {
    (REGION_BASE.load(Ordering::Acquire) == base as usize).then(|| Identity {
        dev: REGION_DEV.load(Ordering::Relaxed),
        ino: REGION_INO.load(Ordering::Relaxed),
    })
}

/// A raw system call: never through libc, whose functions may be probed.
///
/// # Safety
/// The arguments must be valid for system call `n`.
unsafe fn sys(n: i64, a: [u64; 6]) -> i64 {
    let ret: i64;
    // SAFETY: per the contract; the kernel clobbers rcx and r11 only.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") n => ret, in("rdi") a[0], in("rsi") a[1],
            in("rdx") a[2], in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    ret
}

fn close(fd: i64) {
    // SAFETY: closing a descriptor this module opened.
    unsafe { sys(libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0]) };
}

fn set_name(name: &[u8]) -> bool {
    if name.is_empty() || name.len() > NAME_MAX || NAME_LEN.load(Ordering::Acquire) != 0 {
        return NAME_LEN.load(Ordering::Acquire) != 0;
    }
    for (d, s) in NAME.iter().zip(name) {
        d.store(*s, Ordering::Relaxed);
    }
    NAME_LEN.store(name.len(), Ordering::Release);
    true
}

/// A stream socket connected to the rendezvous, or None (not following, or the tracer is
/// gone).
fn connect() -> Option<i64> {
    let len = NAME_LEN.load(Ordering::Acquire);
    if len == 0 {
        return None;
    }
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path[1..].iter_mut().zip(&NAME[..len]) {
        *d = s.load(Ordering::Relaxed) as libc::c_char;
    }
    let addr_len = (std::mem::size_of::<u16>() + 1 + len) as u64;
    let flags = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64;
    // SAFETY: socket with constant arguments.
    let fd = unsafe { sys(libc::SYS_socket, [libc::AF_UNIX as u64, flags, 0, 0, 0, 0]) };
    if fd < 0 {
        return None;
    }
    // SAFETY: `addr` is a valid sockaddr_un of `addr_len` bytes.
    let r = unsafe {
        sys(
            libc::SYS_connect,
            [fd as u64, &addr as *const _ as u64, addr_len, 0, 0, 0],
        )
    };
    if r < 0 {
        close(fd);
        return None;
    }
    Some(fd)
}

/// Sends `msg`, with `fd` attached when it is not negative. Best effort.
fn send(sock: i64, msg: &[u8], fd: i32) {
    let mut iov = libc::iovec {
        iov_base: msg.as_ptr() as *mut _,
        iov_len: msg.len(),
    };
    // Room for one cmsghdr and one descriptor, 8-byte aligned.
    let mut control = [0u64; 4];
    // SAFETY: msghdr is plain data.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if fd >= 0 {
        // SAFETY: CMSG_* compute sizes; `control` has room for CMSG_SPACE(4) bytes.
        unsafe {
            hdr.msg_control = control.as_mut_ptr().cast();
            hdr.msg_controllen = libc::CMSG_SPACE(4) as usize;
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(4) as usize;
            (libc::CMSG_DATA(c) as *mut i32).write_unaligned(fd);
        }
    }
    // SAFETY: `hdr` describes valid buffers for the call.
    unsafe {
        sys(
            libc::SYS_sendmsg,
            [
                sock as u64,
                &hdr as *const _ as u64,
                libc::MSG_NOSIGNAL as u64,
                0,
                0,
                0,
            ],
        )
    };
}

/// Waits for the tracer's answer (or its end, or the time limit). Returns whether it
/// said "go".
fn wait_for_go(sock: i64) -> bool {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let ms = |t: &libc::timespec| t.tv_sec as u64 * 1000 + t.tv_nsec as u64 / 1_000_000;
    let clock = |t: &mut libc::timespec| {
        // SAFETY: writes one timespec.
        unsafe {
            sys(
                libc::SYS_clock_gettime,
                [libc::CLOCK_MONOTONIC as u64, t as *mut _ as u64, 0, 0, 0, 0],
            )
        };
    };
    clock(&mut now);
    let deadline = ms(&now) + FOLLOW_WAIT_MS;
    let mut buf = [0u8; 8];
    loop {
        clock(&mut now);
        let left = deadline.saturating_sub(ms(&now));
        if left == 0 {
            return false;
        }
        let mut pfd = libc::pollfd {
            fd: sock as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd. The tracer stopping this thread interrupts the wait
        // (EINTR or a restart): either way the loop goes round.
        let n = unsafe {
            sys(
                libc::SYS_poll,
                [&mut pfd as *mut _ as u64, 1, left, 0, 0, 0],
            )
        };
        if n <= 0 {
            continue;
        }
        // SAFETY: reads into a local buffer.
        let r = unsafe {
            sys(
                libc::SYS_recvfrom,
                [
                    sock as u64,
                    buf.as_mut_ptr() as u64,
                    buf.len() as u64,
                    0,
                    0,
                    0,
                ],
            )
        };
        if r == -(libc::EINTR as i64) {
            continue;
        }
        return r > 0 && buf[..r as usize].starts_with(FOLLOW_GO);
    }
}

/// Whether a debugger or a tracer has this process under ptrace now (`TracerPid` in
/// `/proc/self/status`): then the agent was loaded by a tracer's own `dlopen`, which is
/// in charge, and must not wait for a rendezvous.
fn traced() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .map(|v| v.trim() != "0")
        })
        .unwrap_or(false)
}

fn register_atfork() {
    ATFORK.call_once(|| {
        // SAFETY: registers a child handler that makes raw system calls only.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
}

/// The agent's constructor: a program image started under a following `tracer run`
/// checks in and waits for its probes (see the module documentation).
extern "C" fn on_load() {
    let Ok(name) = std::env::var(FOLLOW_ENV) else {
        return;
    };
    if traced() || !set_name(name.as_bytes()) {
        return;
    }
    let Some(sock) = connect() else {
        // The rendezvous is gone: behave as if never loaded.
        NAME_LEN.store(0, Ordering::Release);
        return;
    };
    register_atfork();
    send(sock, FOLLOW_EXEC, -1);
    wait_for_go(sock);
    close(sock);
}

#[used]
#[link_section = ".init_array"]
static ON_LOAD: extern "C" fn() = on_load;

/// Gives the child of a fork counters of its own and, when following, hands them to the
/// tracer; moves every other region the parent's tracer reads off the shared files.
extern "C" fn in_child() {
    let base = REGION_BASE.load(Ordering::Acquire);
    if base != 0 {
        // Some only while following (and the tracer is there).
        let sock = connect();
        match own_region(base) {
            Some((fd, parent_inode)) => {
                if let Some(sock) = sock {
                    let mut msg = [0u8; 32];
                    let n = FOLLOW_FORK.len();
                    msg[..n].copy_from_slice(FOLLOW_FORK);
                    msg[n] = b' ';
                    let len = n + 1 + write_decimal(&mut msg[n + 1..], parent_inode);
                    send(sock, &msg[..len], fd);
                }
            }
            // The program closed (or reused) the region's descriptor: no memfd of its own
            // for the child, but its counts still stay out of the parent's.
            None => private_counters(base),
        }
        if let Some(sock) = sock {
            close(sock);
        }
    }
    quiet_regions();
}

/// In a forked child: puts a private copy of each region [`note_shared`] named over its
/// mapping, and closes its descriptor when that still names the region's file. Closed,
/// not left: the number would hand the parent's file to whatever uses it next in the
/// child (a later `tracer attach` to the child, whose session reuses a region while its
/// number names its file, would give the tracer the parent's file and write into it);
/// with the number closed that session makes regions of its own. The entry is dropped:
/// the copy is already private to any grandchild.
fn quiet_regions() {
    for q in &QUIET {
        let base = q.base.load(Ordering::Acquire);
        if base == 0 {
            continue;
        }
        if !private_copy(base, q.len.load(Ordering::Relaxed) as u64) {
            continue;
        }
        let fd = q.fd.load(Ordering::Relaxed);
        let ours = Identity {
            dev: q.dev.load(Ordering::Relaxed),
            ino: q.ino.load(Ordering::Relaxed),
        };
        if size_and_identity(fd).is_some_and(|(_, id)| id == ours) {
            close(fd as i64);
        }
        q.base.store(0, Ordering::Relaxed);
    }
}

/// Replaces the shared mapping of `len` bytes at `base` by a private anonymous one
/// holding the same bytes, in one step (`mremap`); false, with nothing changed, when it
/// cannot. Only the pages the file has are copied (`mincore`): reading a hole would
/// allocate it in the parent's file, and the rest is zero in a new mapping anyway.
fn private_copy(base: usize, len: u64) -> bool {
    const PAGE: u64 = 4096;
    let len = len.next_multiple_of(PAGE);
    if len == 0 {
        return false;
    }
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    // SAFETY: a new anonymous mapping.
    let tmp = unsafe { sys(libc::SYS_mmap, [0, len, prot, flags, u64::MAX, 0]) };
    if tmp < 0 {
        return false;
    }
    let tmp = tmp as u64;
    // Not zeroed first: that could be a call of libc's `memset`.
    let mut present = std::mem::MaybeUninit::<[u8; 256]>::uninit();
    let vec = present.as_mut_ptr().cast::<u8>();
    let mut off = 0;
    while off < len {
        let n = ((len - off) / PAGE).min(256);
        // SAFETY: mincore of our own mapped range into a local vector of `n` bytes.
        let r = unsafe {
            sys(
                libc::SYS_mincore,
                [base as u64 + off, n * PAGE, vec as u64, 0, 0, 0],
            )
        };
        for i in 0..n {
            // Without mincore's answer, every page is copied. SAFETY: when it succeeded,
            // mincore wrote `n` bytes.
            if r < 0 || unsafe { vec.add(i as usize).read() } & 1 != 0 {
                let at = off + i * PAGE;
                // SAFETY: both ranges are mapped, `len` bytes each, and do not overlap.
                unsafe { copy_bytes(tmp + at, base as u64 + at, PAGE) };
            }
        }
        off += n * PAGE;
    }
    move_over(tmp, len, base)
}

/// `rep movsb`: a copy that calls nothing (libc's `memcpy` may be probed).
///
/// # Safety
/// `n` bytes are mapped at `src` (readable) and `dst` (writable), not overlapping.
unsafe fn copy_bytes(dst: u64, src: u64, n: u64) {
    // SAFETY: per the contract; the direction flag is clear at calls (ABI).
    unsafe {
        std::arch::asm!("rep movsb", inout("rcx") n => _, inout("rdi") dst => _,
            inout("rsi") src => _, options(nostack, preserves_flags));
    }
}

/// The counter region without its descriptor (the program closed it): a private copy of
/// the file's part of the reservation goes over it, counts zeroed. The rest of the
/// reservation, past the file's end, is never touched in the child: its region cannot
/// grow without the descriptor.
fn private_counters(base: usize) {
    let shards = REGION_SHARDS.load(Ordering::Relaxed);
    // SAFETY: the region starts with its header.
    let (capacity, used) = unsafe {
        let h = &*(base as *const SharedHeader);
        (h.capacity as usize, h.used.load(Ordering::Relaxed) as usize)
    };
    let len = SharedHeader::region_size(capacity, shards) as u64;
    if private_copy(base, len) {
        zero_counts(base as u64, len, used, shards);
    }
}

/// Zero the counts of the `used` slots of the region copy mapped at `at` (`len` bytes).
fn zero_counts(at: u64, len: u64, used: usize, shards: usize) {
    // SAFETY: the copy holds the header and the `used` slots, within `len` bytes.
    unsafe {
        for id in 0..used {
            let slot = SharedHeader::slot_offset(id, shards);
            if (slot + SharedHeader::slot_size(shards)) as u64 <= len {
                Counts::from_slot((at as *const u8).add(slot), shards).reset();
            }
        }
    }
}

/// `v` in decimal at the start of `out`; returns the digits written.
fn write_decimal(out: &mut [u8], mut v: u64) -> usize {
    let mut digits = [0u8; 20];
    let mut n = 0;
    loop {
        digits[n] = b'0' + (v % 10) as u8;
        n += 1;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for i in 0..n {
        out[i] = digits[n - 1 - i];
    }
    n
}

/// Replaces the counter mapping at `base` by a zeroed copy in a new memfd, which takes
/// the old descriptor's number. Returns that descriptor and the inode of the region it
/// copied, or None with nothing changed: also when the program closed the descriptor or
/// reused its number (then the child counts in its parent's counters, and the
/// program's file under that number is left alone).
fn own_region(base: usize) -> Option<(i32, u64)> {
    let old_fd = REGION_FD.load(Ordering::Relaxed);
    let shards = REGION_SHARDS.load(Ordering::Relaxed);
    let reserve = SharedHeader::region_size(MAX_CAPACITY, shards) as u64;
    let (len, old) = size_and_identity(old_fd)?;
    let inode = old.ino;
    if old.dev != REGION_DEV.load(Ordering::Relaxed) || inode != REGION_INO.load(Ordering::Relaxed)
    {
        return None;
    }
    let fd = new_memfd(len)?;
    let fail = |fd| {
        close(fd);
        None
    };
    // The slots in use, not the whole file: the rest is zero in a new memfd anyway.
    // SAFETY: the region starts with its header.
    let used = unsafe {
        (*(base as *const SharedHeader))
            .used
            .load(Ordering::Relaxed)
    } as usize;
    let copy = (SharedHeader::slot_offset(used, shards) as u64).min(len);
    if !write_from(fd, base, copy) {
        return fail(fd);
    }
    let Some(tmp) = map_zeroed_counts(fd, reserve, len, used, shards) else {
        return fail(fd);
    };
    if !move_over(tmp, reserve, base) {
        return fail(fd);
    }
    // The region's descriptor now names the child's memfd: growth extends it, and a
    // later `tracer attach` to the child finds it there.
    // SAFETY: dup3 over our own region's descriptor.
    unsafe {
        sys(
            libc::SYS_dup3,
            [fd as u64, old_fd as u64, libc::O_CLOEXEC as u64, 0, 0, 0],
        )
    };
    close(fd);
    if let Some((_, new)) = size_and_identity(old_fd) {
        REGION_DEV.store(new.dev, Ordering::Relaxed);
        REGION_INO.store(new.ino, Ordering::Relaxed);
    }
    Some((old_fd, inode))
}

/// The size and identity of the file `fd` names.
fn size_and_identity(fd: i32) -> Option<(u64, Identity)> {
    // SAFETY: stat is plain data.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat of our region's descriptor into a local.
    if unsafe {
        sys(
            libc::SYS_fstat,
            [fd as u64, &mut st as *mut _ as u64, 0, 0, 0, 0],
        )
    } < 0
    {
        return None;
    }
    Some((
        st.st_size as u64,
        Identity {
            dev: st.st_dev,
            ino: st.st_ino,
        },
    ))
}

/// A new memfd of `len` bytes (zero), close-on-exec.
fn new_memfd(len: u64) -> Option<i64> {
    // SAFETY: memfd_create with a NUL-terminated name.
    let fd = unsafe {
        sys(
            libc::SYS_memfd_create,
            [
                c"tracer-shared".as_ptr() as u64,
                libc::MFD_CLOEXEC as u64,
                0,
                0,
                0,
                0,
            ],
        )
    };
    if fd < 0 {
        return None;
    }
    // SAFETY: ftruncate of our new memfd.
    if unsafe { sys(libc::SYS_ftruncate, [fd as u64, len, 0, 0, 0, 0]) } < 0 {
        close(fd);
        return None;
    }
    Some(fd)
}

/// Write the first `n` bytes mapped at `base` to the start of `fd`.
fn write_from(fd: i64, base: usize, n: u64) -> bool {
    let mut off = 0;
    while off < n {
        // SAFETY: the caller's `n` bytes are mapped at `base`.
        let w = unsafe {
            sys(
                libc::SYS_pwrite64,
                [fd as u64, base as u64 + off, n - off, off, 0, 0],
            )
        };
        if w <= 0 {
            return false;
        }
        off += w as u64;
    }
    true
}

/// A new shared mapping of `fd` (`len` bytes, holding a copy of the region), `reserve`
/// bytes long, with the counts of its `used` slots zeroed; None when it cannot be mapped.
fn map_zeroed_counts(fd: i64, reserve: u64, len: u64, used: usize, shards: usize) -> Option<u64> {
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    // SAFETY: a new shared mapping of our memfd, as long as the reservation.
    let tmp = unsafe {
        sys(
            libc::SYS_mmap,
            [0, reserve, prot, libc::MAP_SHARED as u64, fd as u64, 0],
        )
    };
    if tmp < 0 {
        return None;
    }
    zero_counts(tmp as u64, len, used, shards);
    Some(tmp as u64)
}

/// Move the `reserve` bytes mapped at `tmp` over the region's reservation at `base`, in
/// one step; on failure unmap `tmp` and leave the region alone.
fn move_over(tmp: u64, reserve: u64, base: usize) -> bool {
    let flags = (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64;
    // SAFETY: moves our new mapping over the region's reservation, replacing it in one
    // step (this process has one thread now; a failure leaves the old mapping alone).
    let moved = unsafe {
        sys(
            libc::SYS_mremap,
            [tmp, reserve, reserve, flags, base as u64, 0],
        )
    };
    if moved != base as i64 {
        // SAFETY: unmapping our own temporary mapping.
        unsafe { sys(libc::SYS_munmap, [tmp, reserve, 0, 0, 0, 0]) };
        return false;
    }
    true
}

/// Remote entry point ([`probes::abi::remote::FOLLOW_SYMBOL`]): the process the tracer
/// launched starts following. Runs with every other thread stopped.
///
/// # Safety
/// `input` points at `n` bytes: the rendezvous name, a NUL, the agent's path, a NUL.
#[no_mangle]
pub unsafe extern "C" fn tracer_agent_follow(input: *const u8, n: u64, _out: *mut u8) -> u64 {
    // SAFETY: per the contract.
    let input = unsafe { std::slice::from_raw_parts(input, n as usize) };
    // The probes are live by now: `set_var` allocates, and the program's counts must
    // not show it.
    let r = crate::api::agent_call(|| {
        let mut parts = input.split(|&b| b == 0);
        let (Some(name), Some(path)) = (parts.next(), parts.next()) else {
            return 0;
        };
        let (Ok(name), Ok(path)) = (std::str::from_utf8(name), std::str::from_utf8(path)) else {
            return 0;
        };
        if !set_name(name.as_bytes()) {
            return 0;
        }
        let preload = match std::env::var("LD_PRELOAD") {
            Ok(old) if old.split([':', ' ']).any(|p| p == path) => old,
            Ok(old) if !old.is_empty() => format!("{path}:{old}"),
            _ => path.to_string(),
        };
        // SAFETY (of set_var): every other thread of the process is stopped.
        std::env::set_var("LD_PRELOAD", preload);
        std::env::set_var(FOLLOW_ENV, name);
        register_atfork();
        1
    });
    r.unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{private_copy, write_decimal};

    /// A shared memfd mapping replaced by its private copy: same bytes at the same
    /// address, and from then on neither side sees the other's writes.
    #[test]
    fn private_copy_keeps_the_bytes_and_stops_sharing() {
        const PAGE: usize = 4096;
        let len = 5 * PAGE;
        let (fd, _) = crate::memfd::create(c"private-copy-test", 0).unwrap();
        // SAFETY: plain calls on our own memfd and mapping.
        unsafe {
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let base = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            ) as *mut u8;
            assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
            base.write(7);
            base.add(3 * PAGE + 5).write(9);
            assert!(private_copy(base as usize, len as u64));
            let got: Vec<u8> = (0..len).map(|i| base.add(i).read()).collect();
            let mut want = vec![0u8; len];
            want[0] = 7;
            want[3 * PAGE + 5] = 9;
            assert!(got == want);
            // The file changes: the copy does not.
            assert_eq!(libc::pwrite(fd, [1u8].as_ptr().cast(), 1, 0), 1);
            assert_eq!(base.read(), 7);
            // The copy changes: the file does not.
            base.add(PAGE).write(4);
            let mut b = [0u8; 1];
            assert_eq!(libc::pread(fd, b.as_mut_ptr().cast(), 1, PAGE as i64), 1);
            assert_eq!(b[0], 0);
            libc::munmap(base.cast(), len);
            libc::close(fd);
        }
    }

    #[test]
    fn decimal_without_allocating() {
        for v in [0u64, 7, 10, 1234567890, u64::MAX] {
            let mut out = [0u8; 20];
            let n = write_decimal(&mut out, v);
            assert_eq!(&out[..n], v.to_string().as_bytes());
        }
    }
}

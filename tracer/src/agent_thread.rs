//! The agent's own thread in the target: where every remote call that may take a lock runs.
//!
//! `dlopen`, `dlsym` and the agent's entry points allocate and take the loader lock, so the
//! thread that runs them must hold no lock of malloc or of the loader. A thread of the program,
//! stopped wherever it happened to be, gives no such guarantee: all of them may wait in
//! `futex` (`pthread_join`, `pthread_cond_wait`), sit in `sigtimedwait`, or spin in `malloc`.
//! So, as Frida's Linux injector does, we make a thread of our own:
//!
//! 1. Raw system calls are safe on any stopped thread (they take no user-space lock): the
//!    scratch page, and a *park page* (a private mapping of a memfd named [`PARK_NAME`], so
//!    that maps shows it; code page `r-x`, control page `rw-`, then 64 KiB of scratch data
//!    that later sessions use for their remote calls instead of mapping and unmapping a
//!    scratch page of their own) are mapped with them.
//! 2. One thread is hijacked just long enough to call `pthread_create(stub, ctl)`. It must not
//!    hold the locks `pthread_create` takes (malloc's for the DTV, the stack cache lock), so
//!    it is chosen in this order: a thread created under our trace that has not run yet; a
//!    thread whose `rip` is outside libc and ld.so; a thread interrupted while asleep in any
//!    system call (rax is `-ERESTART*`: a lock waiter holds nothing, and glibc never sleeps
//!    in the kernel while holding a malloc or loader lock). If every thread runs inside libc,
//!    each in turn runs alone back to its innermost caller outside libc (a return address
//!    on its stack, after a `call`, with a hardware breakpoint there; 50 ms at most, after which a
//!    thread asleep in a lock wait also qualifies), then, if none got out, is single-stepped
//!    a bounded number of steps (a step into a sleeping system call is interrupted and then
//!    counts as asleep); failing that the process runs a millisecond and we look again.
//!    The other threads stay stopped during the `pthread_create` call (the call then has
//!    the CPUs to itself) unless it takes longer than 20 ms: then they run, so that a lock
//!    held by one of them only delays it (except a launched program's main thread still at
//!    its entry point: it holds nothing and must not start before the probes are live).
//! 3. The new thread starts in the stub, publishes its tid and `PARKED` in the control page,
//!    then loops on a raw `futex` wait: its `rip` is in our page, it has called nothing and
//!    holds no lock, and its signals are all blocked (it inherits the mask of the remote call).
//!    It was created under trace (`PTRACE_O_TRACECLONE`): its first stop is serviced like any
//!    new thread's. It detaches itself first (`pthread_detach(pthread_self())`, so that it
//!    leaves nothing when it ends).
//! 4. Every later call (`dlopen`, `dlerror` on the same thread, `dlsym`, the agent's init,
//!    prepare and IFUNC resolution) is made on that parked thread, the other threads
//!    released after 20 ms in the same way; restoring its registers restarts its `futex`
//!    wait.
//! 5. When the tracer lets the program go ([`Process::resume_all`], detach) the thread is
//!    dismissed: its state word is set to `DISMISSED`, and the restarted `futex` wait sees the
//!    changed word and returns, the stub returns from the start routine, and the thread ends
//!    like any detached thread of the program. So the program runs with exactly its own
//!    threads (a program whose main thread calls `pthread_exit` still ends when its last
//!    worker does; debuggers and `ps -L` see no extra thread), and each attach starts its own
//!    agent thread. A thread left parked by a tracer that was killed is found again through
//!    the page's control block and reused. The page stays (72 KiB of address space, a few
//!    pages resident; reused next time).
//! 6. A program started by `tracer run`, stopped at its entry point with its main thread
//!    alone, needs no such thread: that thread has run none of the program's code, holds no
//!    lock, and the calls run on it directly.
//!
//! Every wait is capped (about 5 s, as Frida); a failure before the thread exists leaves the
//! target exactly as it was (park page unmapped, hijacked thread restored).

use std::time::{Duration, Instant};

use agent::maps;
use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::inject::{InjectError, LibcFunctions};
use crate::remote_call::{self, RemoteCallError};
use crate::threads::{wait_tid, AttachError, Handled, Process};

/// Name of the memfd holding the parked thread's code and control block.
pub const PARK_NAME: &str = "tracer-park";
const PAGE: u64 = 4096;
/// The park page's scratch area for remote calls (see [`park_scratch`]): its code in the
/// code page at this offset, its data in the pages after the control page.
const SCRATCH_CODE_AT: u64 = 0x800;
const SCRATCH_DATA_AT: u64 = 2 * PAGE;
/// Code page, control page, scratch data.
const PARK_LEN: u64 = SCRATCH_DATA_AT + remote_call::SCRATCH_DATA_LEN;
/// The control page: at +0 the index of the current thread's slot (u32); from +64, slots
/// of 64 bytes, one per thread started, used in turn so that a thread still on its way out
/// never reads the next one's word: `state` (u32 at +0, `PARKED` written by the thread),
/// `tid` (u32 at +8, written by the thread), `pthread_t` (u64 at +16, from `pthread_create`),
/// the address of `pthread_detach` (u64 at +24, for the thread) and what it returned (u32 at
/// +32, written by the thread; [`DETACH_NOT_RUN`] until then).
const CTL: u64 = PAGE;
/// At +8 of the control page: libc's base address, then `dlopen`, `dlsym`, `dlerror`,
/// the `dlopen` mode bits, `pthread_create` and `pthread_detach` (u64 each, 0 for none),
/// written by the session that made the thread, read by the next one instead of libc's
/// file.
const CTL_LIBC: u64 = 8;
const SLOTS: u64 = 64;
const SLOT_LEN: u64 = 64;
const NSLOTS: u64 = 63;
const SLOT_PTHREAD: u64 = 16;
const SLOT_DETACH_FN: u64 = 24;
const SLOT_DETACH_RC: u64 = 32;
/// No `pthread_detach` result yet: the page's stub is an older one that does not call it
/// (a page an older tracer made), so the tracer calls it remotely.
const DETACH_NOT_RUN: u32 = u32::MAX;
const STATE_PARKED: u32 = 1;
/// Any value but `PARKED` makes the thread leave; this one says why.
const STATE_DISMISSED: u32 = 2;
/// Steps tried on one thread spinning inside libc before letting the process run again.
const STEPS_PER_ROUND: usize = 400;
/// A call on a thread of ours (`pthread_create`, `dlopen`, the agent's) runs with the other
/// threads stopped, so that it has the CPUs to itself; after this long it may be waiting for
/// a lock one of them holds, and they are resumed.
pub const RELEASE_OTHERS_AFTER: Duration = Duration::from_millis(20);
/// How long a thread may run alone back to its caller outside libc.
const RUN_TO_CALLER_WAIT: Duration = Duration::from_millis(50);
/// A single step that takes longer than this entered a sleeping system call.
const STEP_WAIT: Duration = Duration::from_millis(20);

/// The thread's code. `rdi` = its slot.
///
/// ```text
///     push rbx
///     mov rbx, rdi
///     mov rdi, fs:[0x10]            ; pthread_self() (glibc's THREAD_SELF)
///     call [rbx+24]                 ; pthread_detach: it leaves nothing when it ends
///     mov [rbx+32], eax             ; its result
///     mov eax, SYS_gettid ; syscall
///     mov [rbx+8], eax              ; tid
///     xor eax, eax ; mov ecx, 1
///     lock cmpxchg [rbx], ecx       ; PARKED, unless the tracer gave up on it first
///     jne out                       ; (stores are seen in program order)
/// park:
///     mov rdi, rbx ; mov esi, FUTEX_WAIT_PRIVATE ; mov edx, 1 ; xor r10d, r10d
///     mov eax, SYS_futex ; syscall  ; returns at once once the word is not PARKED
///     cmp dword [rbx], 1
///     je park
/// out:
///     xor eax, eax ; pop rbx ; ret  ; dismissed: end the thread
/// ```
///
/// Detaching from the thread itself saves a remote call after it parks (0.1 to 0.4 ms).
const STUB: &[u8] = &[
    0x53, // push rbx
    0x48, 0x89, 0xfb, // mov rbx, rdi
    0x64, 0x48, 0x8b, 0x3c, 0x25, 0x10, 0x00, 0x00, 0x00, // mov rdi, fs:[0x10]
    0xff, 0x53, 0x18, // call [rbx+24]
    0x89, 0x43, 0x20, // mov [rbx+32], eax
    0xb8, 0xba, 0x00, 0x00, 0x00, // mov eax, 186 (gettid)
    0x0f, 0x05, // syscall
    0x89, 0x43, 0x08, // mov [rbx+8], eax
    0x31, 0xc0, // xor eax, eax
    0xb9, 0x01, 0x00, 0x00, 0x00, // mov ecx, 1
    0xf0, 0x0f, 0xb1, 0x0b, // lock cmpxchg [rbx], ecx
    0x75, 0x1c, // jne out (the 28 bytes of the park loop)
    0x48, 0x89, 0xdf, // park: mov rdi, rbx
    0xbe, 0x80, 0x00, 0x00, 0x00, // mov esi, 128 (FUTEX_WAIT_PRIVATE)
    0xba, 0x01, 0x00, 0x00, 0x00, // mov edx, 1
    0x45, 0x31, 0xd2, // xor r10d, r10d
    0xb8, 0xca, 0x00, 0x00, 0x00, // mov eax, 202 (futex)
    0x0f, 0x05, // syscall
    0x83, 0x3b, 0x01, // cmp dword [rbx], 1
    0x74, 0xe4, // je park
    0x31, 0xc0, // xor eax, eax
    0x5b, // pop rbx
    0xc3, // ret
];

/// Where a stopped thread is, as far as running `pthread_create` on it is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    /// Created under our trace, no instruction run yet.
    Fresh,
    /// `rip` outside libc and ld.so.
    OutsideLibc,
    /// Interrupted while asleep in a system call.
    Asleep,
    /// Running code of libc or ld.so: may be inside malloc, holding its lock.
    InsideLibc,
}

fn classify(proc: &Process, tid: i32, unsafe_ranges: &[(u64, u64)]) -> Result<Place, AttachError> {
    if proc.is_fresh(tid) {
        return Ok(Place::Fresh);
    }
    let r = proc.regs(tid)?;
    if !unsafe_ranges.iter().any(|&(s, e)| (s..e).contains(&r.rip)) {
        return Ok(Place::OutsideLibc);
    }
    // -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK, -EINTR: the
    // system call was sleeping when we interrupted it. A call that had merely completed
    // (an mmap inside malloc, say) shows its result instead.
    let asleep = matches!(r.rax as i64, -516..=-512 | -4) && (r.orig_rax as i64) >= 0;
    if asleep {
        // orig_rax also holds exception error codes: check that a `syscall` just ran.
        let mut insn = [0u8; 2];
        if proc.read_memory(r.rip.wrapping_sub(2), &mut insn).is_ok() && insn == [0x0f, 0x05] {
            return Ok(Place::Asleep);
        }
    }
    Ok(Place::InsideLibc)
}

/// Resumes every stopped thread but `except`, so that a lock one of them holds gets
/// released while `except` works. A launched program's main thread still at the program's
/// entry point stays stopped: it has run none of the program's code, so it holds nothing,
/// and running it would start the program before its probes are live.
pub(crate) fn resume_others(proc: &mut Process, except: Option<i32>) -> Result<(), AttachError> {
    let pid = proc.pid();
    let at_entry = proc.is_launched()
        && proc.is_stopped(pid)
        && crate::launch::entry_point(pid).is_ok_and(|e| proc.regs(pid).is_ok_and(|r| r.rip == e));
    for t in proc.threads() {
        if Some(t) != except && !(at_entry && t == pid) {
            proc.resume_thread(t)?;
        }
    }
    Ok(())
}

/// The main thread of a program we launched, when it is the only thread and still stopped
/// at the program's entry point: it has run none of the program's code and the loader
/// has finished, so it holds no lock, and the calls can run on it directly. That saves
/// making a thread (about 1 ms of `tracer run`) and leaves no park page behind.
fn launched_and_at_entry_alone(proc: &Process) -> Option<i32> {
    let pid = proc.pid();
    if !proc.is_launched() || proc.threads() != [pid] || !proc.is_stopped(pid) {
        return None;
    }
    let entry = crate::launch::entry_point(pid).ok()?;
    (proc.regs(pid).ok()?.rip == entry).then_some(pid)
}

/// The park page of the target, if an earlier session made one: its base address.
pub fn find_page(pid: i32) -> Option<u64> {
    page_in(&maps::read_pid(pid).ok()?)
}

/// The park page's base address among `entries` (a process's maps).
fn page_in(entries: &[maps::MapEntry]) -> Option<u64> {
    let prefix = format!("/memfd:{PARK_NAME}");
    entries
        .iter()
        .filter(|m| m.path.starts_with(&prefix) && m.offset == 0)
        .map(|m| m.start)
        .min()
}

/// Writes `fns` into the control page's header (see [`CTL_LIBC`]) for the next session.
fn remember_functions(proc: &Process, base: u64, fns: &LibcFunctions) {
    let words = [
        fns.libc_base,
        fns.dlopen,
        fns.dlsym,
        fns.dlerror.unwrap_or(0),
        fns.mode_extra,
        fns.pthread_create,
        fns.pthread_detach,
    ];
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    // Best effort: without it the next session reads libc's file again.
    let _ = proc.write_memory(base + CTL + CTL_LIBC, &bytes);
}

/// The libc functions an earlier session wrote into the park page of the process whose
/// `/proc` directory is `dir` and maps are `entries`, if libc is still mapped at
/// `libc_base` (it never moves within a process; an exec takes the page away). Their
/// `unsafe_ranges` are left empty for the caller.
pub(crate) fn remembered_functions(
    dir: &str,
    entries: &[maps::MapEntry],
    libc_base: u64,
) -> Option<LibcFunctions> {
    use std::os::unix::fs::FileExt;
    let base = page_in(entries)?;
    let mem = std::fs::File::open(format!("{dir}/mem")).ok()?;
    let mut b = [0u8; 56];
    mem.read_exact_at(&mut b, base + CTL + CTL_LIBC).ok()?;
    let w = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
    let f = LibcFunctions {
        libc_base: w(0),
        dlopen: w(1),
        dlsym: w(2),
        dlerror: Some(w(3)).filter(|&a| a != 0),
        mode_extra: w(4),
        pthread_create: w(5),
        pthread_detach: w(6),
        unsafe_ranges: Vec::new(),
    };
    let whole = [f.dlopen, f.dlsym, f.pthread_create, f.pthread_detach];
    (libc_base != 0 && f.libc_base == libc_base && whole.iter().all(|&a| a != 0)).then_some(f)
}

/// Remembers the park page found in `entries` (the maps of `proc`, read just now), so that
/// the agent thread's set-up reads the maps no more; a later attach then reads them once.
pub(crate) fn note_page(proc: &Process, entries: &[maps::MapEntry]) {
    if let Some(base) = page_in(entries) {
        proc.park_page.set(Some(base));
    }
}

/// [`find_page`], remembered by `proc` once found.
fn page(proc: &Process) -> Option<u64> {
    if let Some(base) = proc.park_page.get() {
        return Some(base);
    }
    let base = find_page(proc.pid());
    proc.park_page.set(base);
    base
}

/// The scratch area of the target's park page, when an earlier session left one: a later
/// attach then maps no scratch page of its own (and unmaps none at detach). A page made by
/// an older tracer, without that area, gives None.
pub(crate) fn park_scratch(proc: &Process) -> Option<crate::threads::Scratch> {
    let base = page(proc)?;
    let mut code = [0u8; 16];
    proc.read_memory(base + SCRATCH_CODE_AT, &mut code).ok()?;
    let data_end = base + PARK_LEN - 1;
    let mapped = proc.read_memory(data_end, &mut [0u8]).is_ok();
    (code == remote_call::scratch_code() && mapped).then_some(crate::threads::Scratch {
        base: base + SCRATCH_CODE_AT,
        data: base + SCRATCH_DATA_AT,
        data_len: remote_call::SCRATCH_DATA_LEN,
        len: 0,
        borrowed: true,
    })
}

/// Address of the current slot of the park page at `base`.
fn current_slot(proc: &Process, base: u64) -> Option<u64> {
    let mut i = [0u8; 4];
    proc.read_memory(base + CTL, &mut i).ok()?;
    let i = u32::from_le_bytes(i) as u64;
    (i < NSLOTS).then_some(base + CTL + SLOTS + i * SLOT_LEN)
}

/// `state` and `tid` of the slot at `slot`.
fn read_slot(proc: &Process, slot: u64) -> Result<(u32, i32), RemoteCallError> {
    let mut b = [0u8; 12];
    proc.read_memory(slot, &mut b)
        .map_err(|error| RemoteCallError::Memory { addr: slot, error })?;
    Ok((
        u32::from_le_bytes(b[0..4].try_into().expect("4 bytes")),
        i32::from_le_bytes(b[8..12].try_into().expect("4 bytes")),
    ))
}

/// The parked thread of the target, if it exists and is stopped in its park loop, with
/// its slot.
fn parked(proc: &Process) -> Option<(i32, u64)> {
    let base = page(proc)?;
    let slot = current_slot(proc, base)?;
    let (state, tid) = read_slot(proc, slot).ok()?;
    if state != STATE_PARKED || !proc.threads().contains(&tid) || !proc.is_stopped(tid) {
        return None;
    }
    let rip = proc.regs(tid).ok()?.rip;
    (base..base + STUB.len() as u64)
        .contains(&rip)
        .then_some((tid, slot))
}

/// The parked thread of the target, if it exists and is stopped in its park loop.
pub fn parked_thread(proc: &Process) -> Option<i32> {
    parked(proc).map(|(tid, _)| tid)
}

/// Lets the parked thread end as soon as it runs again (see the module documentation), and
/// returns its tid. Best effort: a thread that cannot be told stays parked and is reused
/// next time.
pub fn dismiss(proc: &mut Process) -> Option<i32> {
    let (tid, slot) = parked(proc)?;
    let _ = proc.write_memory(slot, &STATE_DISMISSED.to_le_bytes());
    Some(tid)
}

/// The parked thread, made first if there is none. Needs every thread stopped; leaves every
/// thread stopped.
pub fn ensure(
    proc: &mut Process,
    fns: &LibcFunctions,
    timeout: Duration,
) -> Result<i32, InjectError> {
    if !proc.all_stopped() {
        proc.stop_all()?;
    }
    // First: it reads no maps (a launched program has no park page yet).
    if let Some(tid) = launched_and_at_entry_alone(proc) {
        return Ok(tid);
    }
    if let Some(tid) = parked_thread(proc) {
        return Ok(tid);
    }
    let deadline = Instant::now() + timeout;
    let hijack = crate::timings::time("  thread to hijack chosen", || {
        choose_hijacked_thread(proc, &fns.unsafe_ranges, deadline, timeout)
    })?;
    let page = match page(proc) {
        Some(base) => (base, false),
        None => {
            let base = crate::timings::time("  park page made", || create_page(proc, hijack))?;
            proc.park_page.set(Some(base));
            (base, true)
        }
    };
    remember_functions(proc, page.0, fns);
    let r = spawn(proc, fns, hijack, page.0, deadline, timeout);
    let thread_made = matches!(r, Ok(_) | Err(InjectError::ThreadNotParked { .. }));
    if !thread_made && page.1 {
        // Nothing runs in the page unless the thread was made: leave no trace.
        if proc.all_stopped() || proc.stop_all().is_ok() {
            // Not through the page's own scratch area: its `int3` goes with the page.
            if proc.scratch().is_some_and(|s| s.borrowed) {
                proc.scratch = None;
            }
            let _ = remote_call::syscall(proc, hijack, libc::SYS_munmap, &[page.0, PARK_LEN]);
            proc.park_page.set(None);
        }
    }
    r
}

/// A thread that can run `pthread_create` now, or `NoSafeThread` at the deadline. Leaves
/// every thread stopped.
fn choose_hijacked_thread(
    proc: &mut Process,
    unsafe_ranges: &[(u64, u64)],
    deadline: Instant,
    timeout: Duration,
) -> Result<i32, InjectError> {
    loop {
        if !proc.all_stopped() {
            proc.stop_all()?;
        }
        if let Some(tid) = thread_outside_libc(proc, unsafe_ranges)? {
            return Ok(tid);
        }
        // Everything runs inside libc. Let each thread alone run back to its caller
        // outside libc (a lock it waits for sends it to sleep: also fine); failing that,
        // walk it out one step at a time.
        if let Some(tid) = run_one_to_its_caller(proc, unsafe_ranges)? {
            return Ok(tid);
        }
        for tid in proc.threads() {
            if let Some(tid) = step_out_of_libc(proc, tid, unsafe_ranges, deadline)? {
                return Ok(tid);
            }
        }
        if Instant::now() >= deadline {
            return Err(InjectError::NoSafeThread {
                pid: proc.pid(),
                waited: timeout,
            });
        }
        resume_others(proc, None)?;
        proc.service(Duration::from_millis(1))?;
    }
}

/// The stopped thread best placed to run `pthread_create`, if one is outside libc.
fn thread_outside_libc(
    proc: &mut Process,
    unsafe_ranges: &[(u64, u64)],
) -> Result<Option<i32>, InjectError> {
    let mut best: Option<(Place, i32)> = None;
    for tid in proc.threads() {
        let p = classify(proc, tid, unsafe_ranges)?;
        if best.is_none_or(|(b, _)| p < b) {
            best = Some((p, tid));
        }
    }
    match best {
        Some((p, tid)) if p != Place::InsideLibc => Ok(Some(tid)),
        Some(_) => Ok(None),
        None => Err(AttachError::Exited {
            pid: proc.pid(),
            status: proc.exit_status(),
        }
        .into()),
    }
}

/// Lets each thread in turn run alone back to its caller; the first that comes out of
/// libc.
fn run_one_to_its_caller(
    proc: &mut Process,
    unsafe_ranges: &[(u64, u64)],
) -> Result<Option<i32>, InjectError> {
    let exec: Vec<(u64, u64)> = maps::read_pid(proc.pid())
        .map_err(|error| InjectError::Maps {
            pid: proc.pid(),
            error,
        })?
        .iter()
        .filter(|m| m.perms.exec)
        .map(|m| (m.start, m.end))
        .collect();
    for tid in proc.threads() {
        if !proc.threads().contains(&tid) {
            continue;
        }
        run_to_caller(proc, tid, unsafe_ranges, &exec, RUN_TO_CALLER_WAIT)?;
        if proc.threads().contains(&tid) && classify(proc, tid, unsafe_ranges)? != Place::InsideLibc
        {
            return Ok(Some(tid));
        }
    }
    Ok(None)
}

/// Single-steps `tid` until it is outside libc or asleep in a system call; Some(tid) then.
fn step_out_of_libc(
    proc: &mut Process,
    tid: i32,
    unsafe_ranges: &[(u64, u64)],
    deadline: Instant,
) -> Result<Option<i32>, InjectError> {
    for _ in 0..STEPS_PER_ROUND {
        if Instant::now() >= deadline || !proc.threads().contains(&tid) {
            return Ok(None);
        }
        if !step_once(proc, tid)? {
            return Ok(None);
        }
        if classify(proc, tid, unsafe_ranges)? != Place::InsideLibc {
            return Ok(Some(tid));
        }
    }
    Ok(None)
}

/// How a thread that runs alone is set going: one instruction, or up to a breakpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Going {
    Step,
    Cont,
}

/// Sets the stopped `tid` going (`how`), nothing delivered.
fn set_going(tid: i32, how: Going) -> Result<(), AttachError> {
    let (r, op) = match how {
        Going::Step => (ptrace::step(Pid::from_raw(tid), None), "PTRACE_SINGLESTEP"),
        Going::Cont => (ptrace::cont(Pid::from_raw(tid), None), "PTRACE_CONT"),
    };
    r.map_err(|errno| AttachError::Ptrace { tid, op, errno })
}

/// One instruction of `tid`, bounded in time: a step into a sleeping system call is
/// interrupted (the thread is then asleep there). A signal that arrives is kept pending.
/// Ok(false) when the thread is gone.
fn step_once(proc: &mut Process, tid: i32) -> Result<bool, InjectError> {
    set_going(tid, Going::Step)?;
    Ok(run_bounded(proc, tid, STEP_WAIT, Going::Step)?.is_some())
}

/// After `tid` was set going (`how`): waits for its next stop, for at most `limit`, then
/// interrupts it (a thread asleep in a system call stays so: see [`classify`]). A SIGTRAP
/// (our step or breakpoint) is not kept for delivery; any other signal is. Returns the
/// stop, or None when the thread is gone.
///
/// A thread it creates meanwhile (the thread ran `clone`) is stopped too before this
/// returns: every thread is stopped afterwards, as the callers' own callers need (a
/// remote system call written over code must find no thread running). The `clone` itself
/// is not where the thread is left: that stop is halfway through the system call (the
/// kernel still writes the call's result into `rax` when it goes on), so the thread goes
/// on (`how`) to finish the call.
fn run_bounded(
    proc: &mut Process,
    tid: i32,
    limit: Duration,
    how: Going,
) -> Result<Option<WaitStatus>, InjectError> {
    let stop = run_bounded_alone(proc, tid, limit, how)?;
    if !proc.all_stopped() {
        proc.stop_all()?;
    }
    Ok(stop)
}

/// [`run_bounded`] without stopping the threads born meanwhile.
fn run_bounded_alone(
    proc: &mut Process,
    tid: i32,
    limit: Duration,
    how: Going,
) -> Result<Option<WaitStatus>, InjectError> {
    let pe = |op| move |errno| AttachError::Ptrace { tid, op, errno };
    let set_running = |proc: &mut Process| {
        if let Some(t) = proc.threads.get_mut(&tid) {
            t.stop = None;
        }
    };
    set_running(proc);
    let mut interrupted = false;
    let mut deadline = Instant::now() + limit;
    loop {
        match wait_tid(tid, Some(deadline)) {
            Ok(Some(st)) => {
                if proc.handle(tid, st)? == Handled::Gone {
                    return Ok(None);
                }
                let clone = ptrace::Event::PTRACE_EVENT_CLONE as i32;
                if matches!(st, WaitStatus::PtraceEvent(_, _, ev) if ev == clone) {
                    // The new thread is registered (its first stop comes by itself).
                    set_going(tid, how)?;
                    set_running(proc);
                    continue;
                }
                // After an interrupt, whichever stop comes first will do: a late interrupt
                // trap is taken as a spurious stop by whoever resumes the thread next.
                if matches!(st, WaitStatus::Stopped(_, Signal::SIGTRAP)) {
                    if let Some(t) = proc.threads.get_mut(&tid) {
                        t.pending = None;
                    }
                }
                return Ok(Some(st));
            }
            Ok(None) if !interrupted => {
                ptrace::interrupt(Pid::from_raw(tid)).map_err(pe("PTRACE_INTERRUPT"))?;
                interrupted = true;
                deadline = Instant::now() + crate::threads::STOP_TIMEOUT;
            }
            Ok(None) => {
                return Err(AttachError::Timeout {
                    pid: proc.pid(),
                    tid,
                    what: "stop after running alone",
                    state: crate::threads::describe_thread(proc.pid(), tid),
                }
                .into())
            }
            Err(Errno::ECHILD) => return Ok(None),
            Err(e) => return Err(pe("waitpid")(e).into()),
        }
    }
}

/// Whether the bytes just before `ret` end with a `call` instruction (`e8 rel32`, or `ff /2`
/// with a register, `[reg]`, `[reg+disp]`, `[rip+disp32]` or SIB operand).
fn follows_call(proc: &Process, ret: u64) -> bool {
    let mut b = [0u8; 7];
    if proc.read_memory(ret.wrapping_sub(7), &mut b).is_err() {
        return false;
    }
    let at = |n: usize| b[7 - n];
    let ff2 = |n: usize, pred: &dyn Fn(u8) -> bool| at(n) == 0xff && pred(at(n - 1));
    at(5) == 0xe8
        || ff2(2, &|m| {
            m & 0xf8 == 0xd0 || (m & 0xf8 == 0x10 && m & 7 != 4 && m & 7 != 5)
        })
        || ff2(3, &|m| m & 0xf8 == 0x50 && m & 7 != 4 || m == 0x14)
        || ff2(4, &|m| m == 0x54)
        || ff2(6, &|m| m == 0x15 || (m & 0xf8 == 0x90 && m & 7 != 4))
        || ff2(7, &|m| m == 0x94)
}

/// The innermost return address on `tid`'s stack that lies in executable code outside libc
/// and ld.so right after a call: where the thread goes back to code that holds no libc lock.
fn caller_outside_libc(
    proc: &Process,
    tid: i32,
    unsafe_ranges: &[(u64, u64)],
    exec: &[(u64, u64)],
) -> Option<u64> {
    let rsp = proc.regs(tid).ok()?.rsp;
    let mut stack = vec![0u8; 4096];
    // A short read at the top of the stack mapping still gives a prefix worth scanning.
    let n = (1..=8)
        .rev()
        .map(|k| k * 512)
        .find(|&len| proc.read_memory(rsp, &mut stack[..len]).is_ok())?;
    stack[..n]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
        .find(|&w| {
            exec.iter().any(|&(s, e)| (s..e).contains(&w))
                && !unsafe_ranges.iter().any(|&(s, e)| (s..e).contains(&w))
                && follows_call(proc, w)
        })
}

/// Offset of `u_debugreg` in `struct user` (x86-64), for `PTRACE_POKEUSER`.
const DEBUGREG: usize = 848;

fn set_debugreg(tid: i32, n: usize, value: u64) -> Result<(), AttachError> {
    // SAFETY: PTRACE_POKEUSER of a debug register of a stopped tracee; no pointers.
    let rc = unsafe { libc::ptrace(libc::PTRACE_POKEUSER, tid, DEBUGREG + 8 * n, value as usize) };
    if rc == -1 {
        return Err(AttachError::Ptrace {
            tid,
            op: "PTRACE_POKEUSER(debug register)",
            errno: Errno::last(),
        });
    }
    Ok(())
}

/// Runs `tid` alone (the others stay stopped) until it returns to its innermost caller
/// outside libc, for at most `limit`. The stop there is a hardware execution breakpoint
/// (DR0, enabled in DR7) rather than an `int3` in memory: it belongs to this thread only,
/// so a `fork` made meanwhile leaves no trap behind in the child. Afterwards the thread
/// is stopped and the breakpoint cleared.
fn run_to_caller(
    proc: &mut Process,
    tid: i32,
    unsafe_ranges: &[(u64, u64)],
    exec: &[(u64, u64)],
    limit: Duration,
) -> Result<(), InjectError> {
    let Some(ret) = caller_outside_libc(proc, tid, unsafe_ranges, exec) else {
        return Ok(());
    };
    set_debugreg(tid, 0, ret)?;
    // DR7: L0 (local enable of DR0); R/W0 = 00 and LEN0 = 00: instruction execution.
    let ran = set_debugreg(tid, 7, 1)
        .and_then(|()| set_going(tid, Going::Cont))
        .map_err(InjectError::from)
        .and_then(|()| run_bounded(proc, tid, limit, Going::Cont));
    if proc.threads().contains(&tid) {
        set_debugreg(tid, 7, 0)?;
        set_debugreg(tid, 0, 0)?;
    }
    ran?;
    Ok(())
}

/// Maps the park page (raw system calls on `tid`) and writes the stub into it.
fn create_page(proc: &mut Process, tid: i32) -> Result<u64, RemoteCallError> {
    if proc.scratch().is_none() {
        // The park page brings its own scratch area: a scratch page made for making it
        // would cost three remote system calls more (map, protect, unmap at detach).
        match memfd_named_on_stack(proc, tid) {
            Ok(fd) => return map_page(proc, tid, fd),
            // Nothing ran: `tid`'s code (or stack) could not be written, as in a shared
            // mapping. The scratch page's way below takes another thread if need be.
            Err(RemoteCallError::Memory { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    crate::timings::time("  scratch page made", || {
        remote_call::ensure_scratch(proc, tid)
    })?;
    // At the end of the scratch area: callers keep their own strings at its start.
    let name = remote_call::put_c_string(proc, remote_call::SCRATCH_DATA_LEN - 64, PARK_NAME)?;
    let fd = remote_call::syscall_ok(
        proc,
        tid,
        libc::SYS_memfd_create,
        &[name, libc::MFD_CLOEXEC as u64],
    )?;
    map_page(proc, tid, fd)
}

/// `memfd_create(PARK_NAME)` on the stopped `tid` without a scratch page: the name goes on
/// its stack, below the red zone (memory the program's code does not use while it is
/// stopped; put back as it was), and the system call is written over its `rip` for the
/// call (every thread is stopped).
fn memfd_named_on_stack(proc: &mut Process, tid: i32) -> Result<u64, RemoteCallError> {
    let rsp = proc.regs(tid)?.rsp;
    let at = (rsp - 128 - 64) & !15;
    let mut name = [0u8; 32];
    name[..PARK_NAME.len()].copy_from_slice(PARK_NAME.as_bytes());
    let mut saved = [0u8; 32];
    let mem = |addr| move |error| RemoteCallError::Memory { addr, error };
    proc.read_memory(at, &mut saved).map_err(mem(at))?;
    proc.write_memory(at, &name).map_err(mem(at))?;
    let fd = remote_call::syscall_ok(
        proc,
        tid,
        libc::SYS_memfd_create,
        &[at, libc::MFD_CLOEXEC as u64],
    );
    let put_back = proc.write_memory(at, &saved).map_err(mem(at));
    let fd = fd?;
    if let Err(e) = put_back {
        let _ = remote_call::syscall(proc, tid, libc::SYS_close, &[fd]);
        return Err(e);
    }
    Ok(fd)
}

/// Sizes and maps the park page from memfd `fd` (closed after) and writes its code.
fn map_page(proc: &mut Process, tid: i32, fd: u64) -> Result<u64, RemoteCallError> {
    let mapped = (|| {
        remote_call::syscall_ok(proc, tid, libc::SYS_ftruncate, &[fd, PARK_LEN])?;
        let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
        let base = remote_call::syscall_ok(
            proc,
            tid,
            libc::SYS_mmap,
            // Private: /proc/PID/mem can then write the code page (copy on write) when a
            // remote syscall borrows the parked thread's rip; it cannot force a shared one.
            &[0, PARK_LEN, rw, libc::MAP_PRIVATE as u64, fd, 0],
        )?;
        Ok::<u64, RemoteCallError>(base)
    })();
    // The mapping keeps the memfd alive.
    let _ = remote_call::syscall(proc, tid, libc::SYS_close, &[fd]);
    let base = mapped?;
    let finish = (|| {
        proc.write_memory(base, STUB)
            .map_err(|error| RemoteCallError::Memory { addr: base, error })?;
        let code = base + SCRATCH_CODE_AT;
        proc.write_memory(code, &remote_call::scratch_code())
            .map_err(|error| RemoteCallError::Memory { addr: code, error })?;
        let rx = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        remote_call::syscall_ok(proc, tid, libc::SYS_mprotect, &[base, PAGE, rx])?;
        Ok(())
    })();
    if let Err(e) = finish {
        let _ = remote_call::syscall(proc, tid, libc::SYS_munmap, &[base, PARK_LEN]);
        return Err(e);
    }
    Ok(base)
}

/// Makes this thread's short sleeps as short as asked: with the default timer slack
/// (50 us) the 10 us naps of the park wait took 60 to 100 us each.
fn fine_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain value and affects this thread only.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
}

/// Calls `pthread_create` on `hijack` with the other threads running, waits for the new
/// thread to park (the hijacked thread stays stopped), stops every thread again and
/// detaches the new thread (so that it leaves nothing behind when it ends).
fn spawn(
    proc: &mut Process,
    fns: &LibcFunctions,
    hijack: i32,
    base: u64,
    deadline: Instant,
    timeout: Duration,
) -> Result<i32, InjectError> {
    let slot = claim_slot(proc, fns, base)?;
    crate::timings::time("  scratch page made", || {
        remote_call::ensure_scratch(proc, hijack)
    })?;
    let remaining = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(500));
    if let Err(e) = create_thread(proc, fns, hijack, base, slot, remaining) {
        let _ = proc.stop_all();
        return Err(e);
    }
    fine_timer_slack();
    let waited = Instant::now();
    let parked_tid = wait_parked(proc, slot, deadline)?;
    proc.stop_all()?;
    crate::timings::add("  parked and stopped", waited.elapsed());
    let tid = match parked_tid {
        Some(tid) if parked_thread(proc) == Some(tid) => tid,
        _ => {
            // A thread that starts later (the process was stopped, or overloaded) finds
            // the word taken and ends at once instead of parking for good; one that
            // parked meanwhile is stopped now and sees it when it is resumed.
            let _ = proc.write_memory(slot, &STATE_DISMISSED.to_le_bytes());
            return Err(InjectError::ThreadNotParked {
                pid: proc.pid(),
                waited: timeout,
            });
        }
    };
    detach_thread(proc, fns, tid, slot, remaining)?;
    Ok(tid)
}

fn slot_memory(addr: u64) -> impl FnOnce(std::io::Error) -> RemoteCallError {
    move |error| RemoteCallError::Memory { addr, error }
}

/// Takes the park page's next slot for a new thread: `pthread_detach`'s address in it,
/// its detach result marked not run, and the page's control word pointing at it.
fn claim_slot(proc: &mut Process, fns: &LibcFunctions, base: u64) -> Result<u64, InjectError> {
    let next =
        current_slot(proc, base).map_or(0, |s| (s - base - CTL - SLOTS) / SLOT_LEN + 1) % NSLOTS;
    let slot = base + CTL + SLOTS + next * SLOT_LEN;
    let mut init = [0u8; SLOT_LEN as usize];
    let detach_fn = SLOT_DETACH_FN as usize;
    init[detach_fn..detach_fn + 8].copy_from_slice(&fns.pthread_detach.to_le_bytes());
    let detach_rc = SLOT_DETACH_RC as usize;
    init[detach_rc..detach_rc + 4].copy_from_slice(&DETACH_NOT_RUN.to_le_bytes());
    proc.write_memory(slot, &init).map_err(slot_memory(slot))?;
    proc.write_memory(base + CTL, &(next as u32).to_le_bytes())
        .map_err(slot_memory(base + CTL))?;
    Ok(slot)
}

/// Calls `pthread_create` on `hijack` for a thread that starts in the park loop with
/// `slot` as its argument, the other threads released while it runs.
fn create_thread(
    proc: &mut Process,
    fns: &LibcFunctions,
    hijack: i32,
    base: u64,
    slot: u64,
    timeout: Duration,
) -> Result<(), InjectError> {
    let opts = remote_call::CallOptions {
        timeout,
        block_signals: true,
        release_others_after: Some(RELEASE_OTHERS_AFTER),
    };
    let rc = crate::timings::time("  pthread_create call", || {
        remote_call::call_with(
            proc,
            hijack,
            fns.pthread_create,
            &[slot + SLOT_PTHREAD, 0, base, slot],
            opts,
        )
    })?;
    match rc {
        0 => Ok(()),
        errno => Err(InjectError::ThreadCreate {
            errno: Errno::from_raw(errno as i32),
        }),
    }
}

/// The new thread's id once it has parked in `slot`, or None at the deadline.
///
/// The new thread runs to its park loop (it takes no lock on the way); its first stop is
/// serviced like any new thread's. Parking is a store to memory, not a ptrace event: look
/// often at first (it takes microseconds once the thread's first stop is serviced), less
/// so later.
fn wait_parked(
    proc: &mut Process,
    slot: u64,
    deadline: Instant,
) -> Result<Option<i32>, InjectError> {
    let mut nap = Duration::from_micros(10);
    loop {
        // First: the new thread's first stop is there already, and it runs only once
        // serviced.
        if proc.service(Duration::ZERO)?.is_some() {
            return Err(AttachError::Exited {
                pid: proc.pid(),
                status: proc.exit_status(),
            }
            .into());
        }
        let (state, tid) = read_slot(proc, slot)?;
        if state == STATE_PARKED && proc.threads().contains(&tid) {
            return Ok(Some(tid));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(1));
    }
}

/// Detaches the parked thread `tid` unless it already did so itself (its slot says).
fn detach_thread(
    proc: &mut Process,
    fns: &LibcFunctions,
    tid: i32,
    slot: u64,
    timeout: Duration,
) -> Result<(), InjectError> {
    let mut rc = [0u8; 4];
    proc.read_memory(slot + SLOT_DETACH_RC, &mut rc)
        .map_err(slot_memory(slot + SLOT_DETACH_RC))?;
    let rc = match u32::from_le_bytes(rc) {
        DETACH_NOT_RUN => {
            let mut pthread = [0u8; 8];
            proc.read_memory(slot + SLOT_PTHREAD, &mut pthread)
                .map_err(slot_memory(slot + SLOT_PTHREAD))?;
            // pthread_detach takes no lock: the other threads may stay stopped.
            remote_call::call(
                proc,
                tid,
                fns.pthread_detach,
                &[u64::from_le_bytes(pthread)],
                timeout,
            )?
        }
        rc => u64::from(rc),
    };
    if rc != 0 {
        return Err(InjectError::ThreadCreate {
            errno: Errno::from_raw(rc as i32),
        });
    }
    Ok(())
}

//! Calling functions and making system calls inside a stopped thread of the target.
//!
//! A call saves the thread's complete state (general registers, the `NT_X86_XSTATE`
//! FP/vector state, the signal mask), builds a System V call frame below the red zone,
//! returns into an `int3` in our scratch page, checks that the stop is there, and restores
//! everything. `orig_rax = -1` during the call keeps the kernel from "restarting" an
//! interrupted syscall into the middle of our call; restoring the saved `orig_rax`/`rax`
//! afterwards restarts it correctly (e.g. a `clock_nanosleep` continues its sleep).
//!
//! The scratch page is one private mapping per [`Process`], created by the first call with
//! a remote `mmap` (executed by writing `syscall; int3` over the thread's `rip` while every
//! thread is stopped, then restoring those bytes). It holds `syscall; int3` and an `int3`
//! return pad (r-x page) and a data area for strings and buffers (rw- pages). A target an
//! earlier session left a park page in (see [`crate::agent_thread`]) lends its scratch area
//! instead, which stays after detach.

use std::fmt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::threads::{wait_tid, AttachError, Handled, Process, Regs, Scratch, Stop};

/// Size of the data area of the scratch mapping.
pub const SCRATCH_DATA_LEN: u64 = 64 * 1024;
const PAGE: u64 = 4096;
/// Offset of `syscall; int3` in the scratch code page.
const SYSCALL_PAD: u64 = 0;
/// Offset of the `int3` that called functions return into.
const RETURN_PAD: u64 = 8;
/// `NT_X86_XSTATE` (not exported by libc for every target).
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Enough for the largest XSAVE area of current CPUs (AVX-512 + AMX is about 11 KiB).
const XSTATE_MAX: usize = 16 * 1024;
/// Timeout for remote syscalls (they never block in our use).
const SYSCALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a remote call or syscall failed. The thread's state has been restored in every case
/// except `Lost`.
#[derive(Debug)]
pub enum RemoteCallError {
    /// Attaching/stopping/waiting failed underneath.
    Attach(AttachError),
    /// The function did not return within the time limit; the thread was interrupted and
    /// its state restored (locks the function took may still be held).
    Timeout {
        tid: i32,
        function: u64,
        timeout: Duration,
    },
    /// The function crashed (SIGSEGV, SIGBUS, ...) at `rip`; state restored, signal dropped.
    Crashed {
        tid: i32,
        function: u64,
        signal: Signal,
        rip: u64,
    },
    /// The thread stopped somewhere else than our return pad.
    UnexpectedStop { tid: i32, rip: u64, expected: u64 },
    /// More than six integer arguments (only register arguments are supported).
    TooManyArgs(usize),
    /// The process exited during the call.
    Exited { pid: i32 },
    /// Reading or writing target memory failed.
    Memory { addr: u64, error: std::io::Error },
    /// A remote syscall returned an error.
    Syscall { name: &'static str, errno: Errno },
    /// The thread's state could not be restored; the target is probably broken.
    Lost {
        tid: i32,
        /// The step that failed (empty when the error says it).
        step: &'static str,
        error: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl fmt::Display for RemoteCallError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteCallError::Attach(e) => e.fmt(f),
            RemoteCallError::Timeout { tid, function, timeout } => write!(
                f,
                "remote call of {function:#x} on thread {tid} did not return within {timeout:?} (deadlock in the target?); thread state restored"
            ),
            RemoteCallError::Crashed { tid, function, signal, rip } => write!(
                f,
                "remote call of {function:#x} on thread {tid} crashed with {signal} at {rip:#x}; thread state restored"
            ),
            RemoteCallError::UnexpectedStop { tid, rip, expected } => write!(
                f,
                "thread {tid} stopped at {rip:#x} instead of the return pad {expected:#x}; thread state restored"
            ),
            RemoteCallError::TooManyArgs(n) => {
                write!(f, "remote call with {n} arguments: at most 6 are supported")
            }
            RemoteCallError::Exited { pid } => write!(f, "PID {pid} exited during a remote call"),
            RemoteCallError::Memory { addr, error } => {
                write!(f, "cannot access target memory at {addr:#x}: {error}")
            }
            RemoteCallError::Syscall { name, errno } => {
                write!(f, "remote {name} failed in the target: {errno}")
            }
            RemoteCallError::Lost { tid, step, error } => {
                let cause = match (*step, error) {
                    ("", Some(e)) => e.to_string(),
                    (s, Some(e)) => format!("{s}: {e}"),
                    (s, None) => s.to_string(),
                };
                write!(
                    f,
                    "could not restore thread {tid} after a remote call ({cause}); the target may be broken"
                )
            }
        }
    }
}

impl std::error::Error for RemoteCallError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Shown as the inner error itself: its cause is this one's.
            RemoteCallError::Attach(e) => e.source(),
            RemoteCallError::Memory { error, .. } => Some(error),
            RemoteCallError::Syscall { errno, .. } => Some(errno),
            RemoteCallError::Lost { error: Some(e), .. } => Some(e.as_ref()),
            _ => None,
        }
    }
}

impl From<AttachError> for RemoteCallError {
    fn from(e: AttachError) -> Self {
        match e {
            AttachError::Exited { pid, .. } => RemoteCallError::Exited { pid },
            e => RemoteCallError::Attach(e),
        }
    }
}

fn mem_err(addr: u64) -> impl Fn(std::io::Error) -> RemoteCallError {
    move |error| RemoteCallError::Memory { addr, error }
}

/// The full user-visible state of a stopped thread.
pub struct SavedState {
    pub regs: Regs,
    xstate: Vec<u8>,
    sigmask: u64,
    /// How the thread was stopped: a group-stopped thread is put back into group-stop.
    stop: Option<Stop>,
}

fn getregset_xstate(tid: i32) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, which outlives the call; the kernel shrinks iov_len.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if rc == -1 {
        return Err(Errno::last());
    }
    buf.truncate(iov.iov_len);
    Ok(buf)
}

fn setregset_xstate(tid: i32, xstate: &mut [u8]) -> Result<(), Errno> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_mut_ptr().cast(),
        iov_len: xstate.len(),
    };
    // SAFETY: iov describes `xstate`, which outlives the call.
    let rc = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            tid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    if rc == -1 {
        return Err(Errno::last());
    }
    Ok(())
}

fn get_sigmask(tid: i32) -> Result<u64, Errno> {
    let mut mask: u64 = 0;
    // SAFETY: the kernel writes 8 bytes (addr = size) to `mask`.
    let rc = unsafe { libc::ptrace(libc::PTRACE_GETSIGMASK, tid, 8usize, &mut mask as *mut u64) };
    if rc == -1 {
        return Err(Errno::last());
    }
    Ok(mask)
}

fn set_sigmask(tid: i32, mask: u64) -> Result<(), Errno> {
    // SAFETY: the kernel reads 8 bytes (addr = size) from `mask`.
    let rc = unsafe { libc::ptrace(libc::PTRACE_SETSIGMASK, tid, 8usize, &mask as *const u64) };
    if rc == -1 {
        return Err(Errno::last());
    }
    Ok(())
}

/// Saves registers, vector state and signal mask of a stopped thread.
pub fn save_state(proc: &Process, tid: i32) -> Result<SavedState, RemoteCallError> {
    proc.require_stopped(tid)?;
    let pe = |op| move |errno| RemoteCallError::Attach(AttachError::Ptrace { tid, op, errno });
    Ok(SavedState {
        regs: proc.regs(tid)?,
        xstate: getregset_xstate(tid).map_err(pe("PTRACE_GETREGSET(NT_X86_XSTATE)"))?,
        sigmask: get_sigmask(tid).map_err(pe("PTRACE_GETSIGMASK"))?,
        stop: proc.threads.get(&tid).and_then(|t| t.stop),
    })
}

/// Restores what [`save_state`] saved. A thread that was group-stopped is brought back
/// into a group-stop (`PTRACE_EVENT_STOP`) so that it stays stopped when resumed.
pub fn restore_state(
    proc: &mut Process,
    tid: i32,
    saved: &mut SavedState,
) -> Result<(), RemoteCallError> {
    fn lost<E: std::error::Error + Send + Sync + 'static>(
        tid: i32,
        step: &'static str,
    ) -> impl FnOnce(E) -> RemoteCallError {
        move |e| RemoteCallError::Lost {
            tid,
            step,
            error: Some(Box::new(e)),
        }
    }
    if saved.stop == Some(Stop::Group)
        && proc.threads.get(&tid).and_then(|t| t.stop) != Some(Stop::Group)
    {
        // Run the thread into a job-control trap: with the group stopped, the kernel reports
        // it as a group-stop again. Registers are restored afterwards (the trap happens
        // before any user instruction runs).
        ptrace::interrupt(Pid::from_raw(tid)).map_err(lost(tid, "PTRACE_INTERRUPT"))?;
        ptrace::cont(Pid::from_raw(tid), None).map_err(lost(tid, "PTRACE_CONT"))?;
        mark_running(proc, tid);
        wait_stop(proc, tid, Some(Instant::now() + SYSCALL_TIMEOUT)).map_err(lost(tid, ""))?;
    }
    proc.set_regs(tid, &saved.regs).map_err(lost(tid, ""))?;
    setregset_xstate(tid, &mut saved.xstate).map_err(lost(tid, "PTRACE_SETREGSET"))?;
    set_sigmask(tid, saved.sigmask).map_err(lost(tid, "PTRACE_SETSIGMASK"))?;
    Ok(())
}

fn mark_running(proc: &mut Process, tid: i32) {
    if let Some(t) = proc.threads.get_mut(&tid) {
        t.stop = None;
    }
}

/// Waits for the next stop of `tid`, servicing the other (running) threads meanwhile.
/// Returns the stop's status, or None on timeout.
fn wait_stop(
    proc: &mut Process,
    tid: i32,
    deadline: Option<Instant>,
) -> Result<Option<WaitStatus>, RemoteCallError> {
    loop {
        let short = Instant::now() + Duration::from_millis(2);
        let until = Some(deadline.map_or(short, |d| d.min(short)));
        match wait_tid(tid, until) {
            Ok(Some(st)) => {
                if proc.handle(tid, st)? == Handled::Gone {
                    return Err(RemoteCallError::Exited { pid: proc.pid() });
                }
                return Ok(Some(st));
            }
            Ok(None) => {}
            Err(Errno::ECHILD) => return Err(RemoteCallError::Exited { pid: proc.pid() }),
            Err(e) => {
                return Err(AttachError::Ptrace {
                    tid,
                    op: "waitpid",
                    errno: e,
                }
                .into());
            }
        }
        // Keep the other threads going: deliver their signals, start their new threads.
        let others_running = proc
            .threads
            .iter()
            .any(|(&t, th)| t != tid && th.stop.is_none());
        if others_running {
            proc.service_except(Duration::ZERO, Some(tid))?;
            if proc.exit_status().is_some() {
                return Err(RemoteCallError::Exited { pid: proc.pid() });
            }
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
    }
}

/// Options of [`call_with`].
#[derive(Clone, Copy, Debug)]
pub struct CallOptions {
    /// Give up (interrupt the thread and restore it) after this long.
    pub timeout: Duration,
    /// Block every signal in the thread during the call (they are delivered afterwards).
    pub block_signals: bool,
    /// If the call has not returned after this long, resume the other stopped threads (a
    /// lock one of them holds may be what it waits for); see
    /// [`crate::agent_thread::resume_others`].
    pub release_others_after: Option<Duration>,
}

impl Default for CallOptions {
    fn default() -> Self {
        CallOptions {
            timeout: Duration::from_secs(10),
            block_signals: true,
            release_others_after: None,
        }
    }
}

/// Calls `function(args...)` (System V ABI, up to 6 integer arguments) in the stopped
/// thread `tid` and returns `rax`. Other threads keep whatever state they are in: if some
/// are running they keep running (and are serviced) during the call.
pub fn call(
    proc: &mut Process,
    tid: i32,
    function: u64,
    args: &[u64],
    timeout: Duration,
) -> Result<u64, RemoteCallError> {
    call_with(
        proc,
        tid,
        function,
        args,
        CallOptions {
            timeout,
            ..CallOptions::default()
        },
    )
}

/// [`call`] with options.
pub fn call_with(
    proc: &mut Process,
    tid: i32,
    function: u64,
    args: &[u64],
    opts: CallOptions,
) -> Result<u64, RemoteCallError> {
    if args.len() > 6 {
        return Err(RemoteCallError::TooManyArgs(args.len()));
    }
    crate::timings::count("remote function calls");
    let scratch = ensure_scratch(proc, tid)?;
    let mut saved = save_state(proc, tid)?;
    let ret_addr = scratch.base + RETURN_PAD;

    let mut r = saved.regs;
    r.orig_rax = u64::MAX; // -1: not in a syscall, nothing to restart
                           // Skip the red zone, align, then push the return address: (rsp + 8) % 16 == 0 at entry.
    let mut sp = (saved.regs.rsp - 128) & !0xf;
    sp -= 8;
    proc.write_memory(sp, &ret_addr.to_le_bytes())
        .map_err(mem_err(sp))?;
    r.rsp = sp;
    r.rip = function;
    r.rax = 0; // no vector registers used by a variadic callee
    r.eflags &= !(0x400 | 0x100); // DF = 0 per ABI, no trap flag
    let slots = [
        &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.rcx, &mut r.r8, &mut r.r9,
    ];
    for (slot, &a) in slots.into_iter().zip(args) {
        *slot = a;
    }
    let outcome = run_until_pad(proc, tid, &r, ret_addr, function, opts);
    let restored = restore_state(proc, tid, &mut saved);
    let value = outcome?;
    restored?;
    Ok(value)
}

/// Sets `regs` (and a blocked signal mask), runs the thread until it traps at `pad + 1`.
fn run_until_pad(
    proc: &mut Process,
    tid: i32,
    regs: &Regs,
    pad: u64,
    function: u64,
    opts: CallOptions,
) -> Result<u64, RemoteCallError> {
    proc.set_regs(tid, regs)?;
    if opts.block_signals {
        set_sigmask(tid, !0).map_err(|errno| AttachError::Ptrace {
            tid,
            op: "PTRACE_SETSIGMASK",
            errno,
        })?;
    }
    let deadline = Instant::now() + opts.timeout;
    resume(proc, tid)?;
    let mut release_at = opts.release_others_after.map(|d| Instant::now() + d);
    loop {
        let until = release_at.map_or(deadline, |r| r.min(deadline));
        let Some(st) = wait_stop(proc, tid, Some(until))? else {
            if release_at.is_some_and(|r| r < deadline) {
                release_at = None;
                crate::agent_thread::resume_others(proc, Some(tid))?;
                continue;
            }
            return Err(interrupt_timed_out(proc, tid, function, opts.timeout));
        };
        match call_stop(proc, tid, st, pad, function)? {
            Some(value) => return Ok(value),
            // A signal (kept pending for later), a spurious job-control trap, a clone or
            // a group-stop: carry on with the call.
            None => resume(proc, tid)?,
        }
    }
}

/// Continues the stopped thread `tid`.
fn resume(proc: &mut Process, tid: i32) -> Result<(), RemoteCallError> {
    ptrace::cont(Pid::from_raw(tid), None).map_err(|errno| AttachError::Ptrace {
        tid,
        op: "PTRACE_CONT",
        errno,
    })?;
    mark_running(proc, tid);
    Ok(())
}

/// Brings a call that ran out of time back to a stop, so that its state can be
/// restored; the error to return.
fn interrupt_timed_out(
    proc: &mut Process,
    tid: i32,
    function: u64,
    timeout: Duration,
) -> RemoteCallError {
    if let Err(errno) = ptrace::interrupt(Pid::from_raw(tid)) {
        return AttachError::Ptrace {
            tid,
            op: "PTRACE_INTERRUPT",
            errno,
        }
        .into();
    }
    match wait_stop(proc, tid, Some(Instant::now() + SYSCALL_TIMEOUT)) {
        Err(e) => return e,
        Ok(None) => {
            return RemoteCallError::Lost {
                tid,
                step: "no stop after PTRACE_INTERRUPT",
                error: None,
            }
        }
        Ok(Some(_)) => {}
    }
    take_pending_if(proc, tid, |_| false);
    RemoteCallError::Timeout {
        tid,
        function,
        timeout,
    }
}

/// What a stop of the called thread means: the call's result when it trapped at
/// `pad + 1`, an error when it crashed or trapped elsewhere, None when the call goes on.
fn call_stop(
    proc: &mut Process,
    tid: i32,
    st: WaitStatus,
    pad: u64,
    function: u64,
) -> Result<Option<u64>, RemoteCallError> {
    let rip = proc.regs(tid)?.rip;
    let sig = match st {
        WaitStatus::Stopped(_, Signal::SIGTRAP) if rip == pad + 1 => {
            take_pending_if(proc, tid, |s| s == Signal::SIGTRAP);
            return Ok(Some(proc.regs(tid)?.rax));
        }
        WaitStatus::Stopped(_, sig) => sig,
        _ => return Ok(None),
    };
    if !matches!(
        sig,
        Signal::SIGSEGV
            | Signal::SIGBUS
            | Signal::SIGILL
            | Signal::SIGFPE
            | Signal::SIGTRAP
            // The called function gave up (abort, a failed assertion): it is
            // our call that failed, not the target, which must not die of it.
            | Signal::SIGABRT
    ) {
        return Ok(None);
    }
    take_pending_if(proc, tid, |s| s == sig);
    if sig == Signal::SIGTRAP {
        return Err(RemoteCallError::UnexpectedStop {
            tid,
            rip,
            expected: pad + 1,
        });
    }
    Err(RemoteCallError::Crashed {
        tid,
        function,
        signal: sig,
        rip,
    })
}

/// Drops the thread's pending signal if `pred` says it was caused by us.
fn take_pending_if(proc: &mut Process, tid: i32, pred: impl Fn(Signal) -> bool) {
    if let Some(t) = proc.threads.get_mut(&tid) {
        if t.pending.is_some_and(&pred) {
            t.pending = None;
        }
    }
}

/// Executes `syscall` with `nr` and up to 6 arguments in the stopped thread `tid`.
/// Returns the raw result (negative errno on failure). Needs the scratch page, or every
/// thread stopped (the instruction is then written over `rip` temporarily).
pub fn syscall(
    proc: &mut Process,
    tid: i32,
    nr: i64,
    args: &[u64],
) -> Result<i64, RemoteCallError> {
    let at = proc.scratch().map(|s| s.base + SYSCALL_PAD);
    syscall_at(proc, tid, nr, args, at)
}

/// Like [`syscall`], returning `Err(Syscall)` for a negative (errno) result.
pub fn syscall_ok(
    proc: &mut Process,
    tid: i32,
    nr: i64,
    args: &[u64],
) -> Result<u64, RemoteCallError> {
    let r = syscall(proc, tid, nr, args)?;
    if (-4095..0).contains(&r) {
        return Err(RemoteCallError::Syscall {
            name: syscall_name(nr),
            errno: Errno::from_raw(-r as i32),
        });
    }
    Ok(r as u64)
}

/// Name of the syscalls the tracer issues, for error messages.
fn syscall_name(nr: i64) -> &'static str {
    match nr {
        libc::SYS_mmap => "mmap",
        libc::SYS_munmap => "munmap",
        libc::SYS_mprotect => "mprotect",
        libc::SYS_memfd_create => "memfd_create",
        libc::SYS_write => "write",
        libc::SYS_close => "close",
        libc::SYS_openat => "openat",
        _ => "syscall",
    }
}

/// `at`: address of a `syscall; int3` sequence; None writes one over the thread's rip.
fn syscall_at(
    proc: &mut Process,
    tid: i32,
    nr: i64,
    args: &[u64],
    at: Option<u64>,
) -> Result<i64, RemoteCallError> {
    if args.len() > 6 {
        return Err(RemoteCallError::TooManyArgs(args.len()));
    }
    crate::timings::count("remote system calls");
    let mut saved = save_state(proc, tid)?;
    let (addr, original) = match at {
        Some(a) => (a, None),
        None => write_syscall_at_rip(proc, saved.regs.rip)?,
    };
    let r = syscall_regs(&saved.regs, addr, nr, args);
    // The int3 after `syscall` is at addr + 2; the trap reports rip = addr + 3.
    let opts = CallOptions {
        timeout: SYSCALL_TIMEOUT,
        block_signals: true,
        release_others_after: None,
    };
    let outcome = run_until_pad(proc, tid, &r, addr + 2, addr, opts);
    let mut restore_err = None;
    if let Some(orig) = original {
        if let Err(e) = proc.write_memory(addr, &orig) {
            restore_err = Some(RemoteCallError::Lost {
                tid,
                step: "restoring code bytes",
                error: Some(Box::new(e)),
            });
        }
    }
    let restored = restore_state(proc, tid, &mut saved);
    let value = outcome?;
    restored?;
    if let Some(e) = restore_err {
        return Err(e);
    }
    Ok(value as i64)
}

/// Writes `syscall; int3` over the code at `rip` (only with every thread stopped, so no
/// other runs it meanwhile); where, and the bytes to put back.
///
/// A thread still running (one born since the caller stopped every thread, whose first
/// stop nobody collected yet) is stopped first, and stays stopped: callers that make
/// remote system calls without a scratch page want every thread stopped anyway.
/// [`Process::stop_all`] goes round until no thread runs, however many are born
/// meanwhile. The calls made here (mmap, mprotect, memfd_create, ftruncate, close,
/// munmap) create no thread, so none is born while the code is overwritten.
fn write_syscall_at_rip(
    proc: &mut Process,
    rip: u64,
) -> Result<(u64, Option<[u8; 3]>), RemoteCallError> {
    if !proc.all_stopped() {
        proc.stop_all()?;
    }
    let mut orig = [0u8; 3];
    proc.read_memory(rip, &mut orig).map_err(mem_err(rip))?;
    proc.write_memory(rip, &[0x0f, 0x05, 0xcc])
        .map_err(mem_err(rip))?;
    Ok((rip, Some(orig)))
}

/// `regs` set for system call `nr` with `args` at `addr`, outside any system call to
/// restart and with no trap flag.
fn syscall_regs(regs: &Regs, addr: u64, nr: i64, args: &[u64]) -> Regs {
    let mut r = *regs;
    r.orig_rax = u64::MAX;
    r.rip = addr;
    r.rax = nr as u64;
    r.eflags &= !0x100;
    let slots = [
        &mut r.rdi, &mut r.rsi, &mut r.rdx, &mut r.r10, &mut r.r8, &mut r.r9,
    ];
    for (slot, &a) in slots.into_iter().zip(args) {
        *slot = a;
    }
    r
}

/// A stopped thread, `prefer` if it qualifies, whose `rip` lies in a private mapping: a
/// remote syscall without the scratch page writes its instruction there, and
/// `/proc/PID/mem` cannot force a write into a shared one (such as the agent's trampolines,
/// where a thread may well be stopped).
fn thread_at_private_code(proc: &Process, prefer: i32) -> Option<i32> {
    let maps = agent::maps::read_pid(proc.pid()).ok()?;
    let private = |tid: i32| {
        proc.is_stopped(tid)
            && proc.regs(tid).is_ok_and(|r| {
                maps.iter()
                    .any(|m| (m.start..m.end).contains(&r.rip) && !m.perms.shared)
            })
    };
    std::iter::once(prefer)
        .chain(proc.threads())
        .find(|&t| private(t))
}

/// Creates the scratch mapping on first use (needs every thread stopped then).
pub fn ensure_scratch(proc: &mut Process, tid: i32) -> Result<Scratch, RemoteCallError> {
    if let Some(s) = proc.scratch() {
        return Ok(s);
    }
    // An earlier session's park page has room for one: three remote system calls fewer.
    if let Some(s) = crate::agent_thread::park_scratch(proc) {
        proc.scratch = Some(s);
        return Ok(s);
    }
    let tid = thread_at_private_code(proc, tid).unwrap_or(tid);
    let len = PAGE + SCRATCH_DATA_LEN;
    let prot = (libc::PROT_READ | libc::PROT_WRITE) as u64;
    let flags = (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64;
    let r = syscall_at(
        proc,
        tid,
        libc::SYS_mmap,
        &[0, len, prot, flags, u64::MAX, 0],
        None,
    )?;
    if (-4095..0).contains(&r) {
        return Err(RemoteCallError::Syscall {
            name: "mmap",
            errno: Errno::from_raw(-r as i32),
        });
    }
    let base = r as u64;
    let code = scratch_code();
    let setup = (|| {
        proc.write_memory(base, &code).map_err(mem_err(base))?;
        let prot = (libc::PROT_READ | libc::PROT_EXEC) as u64;
        // Not from the scratch page itself: it is not executable yet.
        let r = syscall_at(proc, tid, libc::SYS_mprotect, &[base, PAGE, prot], None)?;
        if r != 0 {
            return Err(RemoteCallError::Syscall {
                name: "mprotect",
                errno: Errno::from_raw(-r as i32),
            });
        }
        Ok(())
    })();
    if let Err(e) = setup {
        let _ = syscall_at(proc, tid, libc::SYS_munmap, &[base, len], None);
        return Err(e);
    }
    let s = Scratch {
        base,
        data: base + PAGE,
        data_len: SCRATCH_DATA_LEN,
        len,
        borrowed: false,
    };
    proc.scratch = Some(s);
    Ok(s)
}

/// The code of a scratch area: `syscall; int3` at [`SYSCALL_PAD`], the `int3` return pad
/// at [`RETURN_PAD`].
pub(crate) fn scratch_code() -> [u8; 16] {
    let mut code = [0xccu8; 16];
    code[SYSCALL_PAD as usize..SYSCALL_PAD as usize + 2].copy_from_slice(&[0x0f, 0x05]);
    code
}

/// Removes the scratch mapping (best effort; needs every thread stopped).
pub fn release_scratch(proc: &mut Process) {
    let Some(s) = proc.scratch.take().filter(|s| !s.borrowed) else {
        return;
    };
    // munmap must not run from inside the page it removes: use the thread's rip.
    let Some(first) = proc.threads().into_iter().find(|&t| proc.is_stopped(t)) else {
        return;
    };
    let tid = thread_at_private_code(proc, first).unwrap_or(first);
    let _ = syscall_at(proc, tid, libc::SYS_munmap, &[s.base, s.len], None);
}

/// Copies `data` into the scratch data area at `offset` and returns its target address.
pub fn put_data(proc: &mut Process, offset: u64, data: &[u8]) -> Result<u64, RemoteCallError> {
    let s = proc.scratch().ok_or(RemoteCallError::Lost {
        tid: proc.pid(),
        step: "no scratch page",
        error: None,
    })?;
    if offset + data.len() as u64 > s.data_len {
        return Err(RemoteCallError::Memory {
            addr: s.data + offset,
            error: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "data larger than the scratch area",
            ),
        });
    }
    let addr = s.data + offset;
    proc.write_memory(addr, data).map_err(mem_err(addr))?;
    Ok(addr)
}

/// Copies a NUL-terminated `s` into the scratch data area at `offset`.
pub fn put_c_string(proc: &mut Process, offset: u64, s: &str) -> Result<u64, RemoteCallError> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    put_data(proc, offset, &v)
}

//! A traced process: every thread seized with `PTRACE_SEIZE`, stopped and resumed as a whole.
//!
//! Model:
//! - Every thread is seized (not `PTRACE_ATTACH`ed) so that `PTRACE_INTERRUPT` stops it
//!   uniformly and group-stops are reported as `PTRACE_EVENT_STOP` (and can be kept with
//!   `PTRACE_LISTEN`). `TRACECLONE` makes threads created later traced automatically.
//! - Waiting is per thread (`waitpid(tid, __WALL | WNOHANG)` polled), never `waitpid(-1)`,
//!   so that several [`Process`]es in one tracer (tests run in parallel) never steal each
//!   other's events.
//! - ptrace requests are only accepted from the tracer thread that seized the tracee: a
//!   [`Process`] is deliberately not `Send`; use it from the thread that created it.
//! - A signal that arrives while we hold a thread stopped is reported to us as a
//!   signal-delivery-stop; it is kept in the thread's `pending` slot and delivered by
//!   [`Process::resume_all`] or [`Process::detach`], so it is never lost.
//! - While the process runs attached, signal deliveries, new threads and group-stops still
//!   need the tracer: call [`Process::service`] (or [`Process::wait_exit`]) regularly, or
//!   detach.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::marker::PhantomData;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace::{self, Event, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

pub use libc::user_regs_struct as Regs;

/// Capability number of CAP_SYS_PTRACE (linux/capability.h).
const CAP_SYS_PTRACE: u32 = 19;

/// How long [`Process::stop_all`] waits for every thread to report its stop.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why attaching to, stopping, resuming or detaching from a process failed.
#[derive(Debug)]
pub enum AttachError {
    /// `/proc/PID` does not exist.
    NoSuchProcess { pid: i32 },
    /// A kernel thread or a zombie: `what` says which.
    NotAProgram { what: String },
    /// The kernel refused `PTRACE_SEIZE`; `reason` says which rule refused it.
    PermissionDenied { pid: i32, reason: String },
    /// Another tracer (debugger, strace, ...) already traces the process.
    AlreadyTraced { pid: i32, tracer: i32 },
    /// The process exited while we were attaching or working on it.
    Exited {
        pid: i32,
        status: Option<ExitStatus>,
    },
    /// The executable is not an x86-64 ELF file.
    NotX86_64 { pid: i32, machine: String },
    /// Some thread did not report a stop in time.
    Timeout {
        pid: i32,
        tid: i32,
        what: &'static str,
        /// The thread's state letter and kernel wait channel when we gave up.
        state: String,
    },
    /// A ptrace or wait request failed unexpectedly.
    Ptrace {
        tid: i32,
        op: &'static str,
        errno: Errno,
    },
    /// Reading a /proc file failed.
    Io {
        pid: i32,
        what: String,
        error: io::Error,
    },
}

impl fmt::Display for AttachError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AttachError::NoSuchProcess { pid } => {
                write!(f, "no process with PID {pid}: check the PID (see `ps`)")
            }
            AttachError::NotAProgram { what } => f.write_str(what),
            AttachError::PermissionDenied { pid, reason } => {
                write!(f, "not allowed to trace PID {pid}: {reason}")
            }
            AttachError::AlreadyTraced { pid, tracer } => write!(
                f,
                "PID {pid} is already traced by PID {tracer}: detach that debugger/tracer first"
            ),
            AttachError::Exited { pid, status } => match status {
                Some(s) => write!(f, "PID {pid} exited during the operation ({s})"),
                None => write!(f, "PID {pid} exited during the operation"),
            },
            AttachError::NotX86_64 { pid, machine } => write!(
                f,
                "PID {pid} runs a {machine} executable; tracer only supports x86-64 targets"
            ),
            AttachError::Timeout {
                pid,
                tid,
                what,
                state,
            } => write!(
                f,
                "thread {tid} of PID {pid} did not {what} within the time limit (it is {state}); retry"
            ),
            AttachError::Ptrace { tid, op, errno } => {
                write!(f, "{op} on thread {tid} failed: {errno}")
            }
            AttachError::Io { pid, what, error } => {
                write!(f, "cannot read {what} of PID {pid}: {error}")
            }
        }
    }
}

impl std::error::Error for AttachError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AttachError::Ptrace { errno, .. } => Some(errno),
            AttachError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal number.
    Signal(i32),
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

/// What a stopped thread is stopped in; decides how it must be resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stop {
    /// `PTRACE_EVENT_STOP` with SIGTRAP: our interrupt or a new thread's first stop.
    Interrupt,
    /// `PTRACE_EVENT_STOP` with a stop signal: the process is group-stopped (SIGSTOP etc.).
    Group,
    /// Signal-delivery-stop or another ptrace event stop.
    Other,
}

#[derive(Clone, Debug)]
pub(crate) struct Thread {
    /// `None` while running.
    pub(crate) stop: Option<Stop>,
    /// A signal that arrived while we held the thread; delivered when it is resumed.
    pub(crate) pending: Option<Signal>,
    /// The process was group-stopped when we last saw this thread stop: resume with LISTEN.
    pub(crate) group_stopped: bool,
    /// The thread reports a stop by itself (new clone child, seized while group-stopped):
    /// an extra `PTRACE_INTERRUPT` would leave a stale trap for after the next resume.
    pub(crate) self_trap: bool,
    /// Created by a traced clone and never resumed since: it has run no instruction of
    /// its own yet, so it holds no lock, and can run `dlopen` safely.
    pub(crate) fresh: bool,
}

/// The private scratch mapping used by remote calls (see `remote_call`).
#[derive(Clone, Copy, Debug)]
pub struct Scratch {
    /// Start of the mapping (code page, r-x): `syscall; int3` at +0, `int3` at +3.
    pub base: u64,
    /// Start of the data area (rw-).
    pub data: u64,
    /// Size of the data area in bytes.
    pub data_len: u64,
    /// Total size of the mapping.
    pub len: u64,
    /// Part of the agent thread's park page, which stays: not unmapped at detach.
    pub borrowed: bool,
}

/// A seized process. Every known thread is traced; see the module documentation.
pub struct Process {
    pid: i32,
    pub(crate) threads: BTreeMap<i32, Thread>,
    mem: fs::File,
    exit: Option<ExitStatus>,
    pub(crate) scratch: Option<Scratch>,
    /// Where the agent thread's park page is, once found or made (see `agent_thread`):
    /// looked up in the maps once rather than at every remote call.
    pub(crate) park_page: std::cell::Cell<Option<u64>>,
    /// Process launched by us (kill it if setup fails) rather than attached to.
    pub(crate) launched: bool,
    /// Programs the process has exec'd since we seized it (the code we patched is gone
    /// with each).
    execs: Vec<String>,
    /// ptrace requests must come from the seizing thread.
    _not_send: PhantomData<*const ()>,
}

fn options() -> Options {
    Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACEEXEC
}

fn pt_err(tid: i32, op: &'static str) -> impl Fn(Errno) -> AttachError {
    move |errno| AttachError::Ptrace { tid, op, errno }
}

/// A procfs error as the `io::Error` callers match on (`NotFound` for a process or
/// thread that is gone).
pub(crate) fn proc_io(e: procfs::ProcError) -> io::Error {
    use procfs::ProcError;
    match e {
        ProcError::Io(e, _) => e,
        ProcError::NotFound(_) => io::ErrorKind::NotFound.into(),
        ProcError::PermissionDenied(_) => io::ErrorKind::PermissionDenied.into(),
        e => io::Error::other(e),
    }
}

fn proc_task(pid: i32, tid: i32) -> io::Result<procfs::process::Task> {
    procfs::process::Process::new(pid)
        .and_then(|p| p.task_from_tid(tid))
        .map_err(proc_io)
}

/// Thread ids listed in `/proc/PID/task`, sorted.
pub fn list_tasks(pid: i32) -> io::Result<Vec<i32>> {
    crate::proc_text::tasks(pid)
}

/// The state letter of `/proc/PID/task/TID/stat` (`R`, `S`, `t`, `T`, ...).
pub fn thread_state(pid: i32, tid: i32) -> io::Result<char> {
    let text = crate::proc_text::read(format!("/proc/{pid}/task/{tid}/stat"))?;
    crate::process_kind::stat_state(&text)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unreadable stat"))
}

/// The state and wait channel of a thread, for messages: `S (sleeping) in do_nanosleep`.
pub fn describe_thread(pid: i32, tid: i32) -> String {
    let Ok(status) = proc_task(pid, tid).and_then(|t| t.status().map_err(proc_io)) else {
        return "gone".into();
    };
    let mut state = status.state;
    if status.tracerpid != 0 {
        state = format!("{state}, traced by {}", status.tracerpid);
    } else {
        state.push_str(", not traced");
    }
    // procfs reads a process's wchan, not a thread's: read the thread's file itself.
    match std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/wchan")) {
        Ok(w) if !w.is_empty() && w != "0" => format!("{state} in {w}"),
        _ => state,
    }
}

/// `TracerPid` of `/proc/PID/status` (0 when untraced).
pub fn tracer_pid(pid: i32) -> io::Result<i32> {
    let status = crate::proc_text::read(format!("/proc/{pid}/status"))?;
    crate::proc_text::status_field(&status, "TracerPid")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no TracerPid in status"))
}

/// Explains an EPERM from `PTRACE_SEIZE`: Yama, another uid, or a missing capability.
fn permission_reason(pid: i32) -> String {
    let yama = fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    let cap_eff = procfs::process::Process::myself()
        .and_then(|p| p.status())
        .ok()
        .map(|s| s.capeff);
    let has_cap = cap_eff.is_some_and(|c| c & (1 << CAP_SYS_PTRACE) != 0);
    let target_uid = procfs::process::Process::new(pid)
        .and_then(|p| p.status())
        .ok()
        .map(|s| s.euid);
    // SAFETY: geteuid has no preconditions.
    let my_uid = unsafe { libc::geteuid() };
    match yama {
        Some(3) => return "Yama ptrace_scope is 3 (ptrace disabled until reboot)".into(),
        Some(2) if !has_cap => {
            return "Yama ptrace_scope is 2 (admin-only attach): run as root or with CAP_SYS_PTRACE".into()
        }
        Some(1) if !has_cap => {
            return "Yama ptrace_scope is 1 (only descendants can be traced): run as root, use `tracer run`, or `sysctl kernel.yama.ptrace_scope=0`".into()
        }
        _ => {}
    }
    match target_uid {
        Some(u) if u != my_uid && !has_cap => format!(
            "it runs as uid {u} and we run as uid {my_uid} without CAP_SYS_PTRACE: run as that user or as root"
        ),
        _ if !has_cap => "the process is not dumpable or is set-uid: run as root (CAP_SYS_PTRACE)".into(),
        _ => "the kernel refused PTRACE_SEIZE (LSM policy such as SELinux/AppArmor?)".into(),
    }
}

/// ELF machine of `/proc/PID/exe`: Ok(None) when it is x86-64, Ok(Some(name)) otherwise.
fn foreign_machine(pid: i32) -> io::Result<Option<String>> {
    let f = fs::File::open(format!("/proc/{pid}/exe"))?;
    let mut hdr = [0u8; 20];
    f.read_exact_at(&mut hdr, 0)?;
    if &hdr[..4] != b"\x7fELF" {
        return Ok(Some("non-ELF".into()));
    }
    let machine = u16::from_le_bytes([hdr[18], hdr[19]]);
    Ok(match (hdr[4], machine) {
        (2, 62) => None,
        (1, 3) => Some("32-bit x86 (i386)".into()),
        (1, 62) => Some("x32".into()),
        (_, 183) => Some("AArch64".into()),
        (_, m) => Some(format!("ELF machine {m}")),
    })
}

/// Waits for `waitpid(tid)` to report something or `deadline` to pass (`None`: forever),
/// woken by `SIGCHLD` (see [`crate::child_events`]).
pub(crate) fn wait_tid(tid: i32, deadline: Option<Instant>) -> Result<Option<WaitStatus>, Errno> {
    let block = crate::child_events::ChildSignalBlock::new();
    loop {
        match waitpid(
            Pid::from_raw(tid),
            Some(WaitPidFlag::__WALL | WaitPidFlag::WNOHANG),
        ) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(s) => return Ok(Some(s)),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e),
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(None);
        }
        block.sleep(deadline);
    }
}

/// A ptrace event reported from inside a system call (clone, fork, vfork, exec), as
/// opposed to a stop at a clean point (our interrupt, a group-stop, a signal).
fn in_syscall_event(st: WaitStatus) -> bool {
    matches!(st, WaitStatus::PtraceEvent(_, _, ev) if ev != Event::PTRACE_EVENT_STOP as i32)
}

/// What [`Process::handle`] made of a wait status.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Handled {
    /// The thread is now stopped (our interrupt, a group-stop, a signal or an event).
    Stopped,
    /// The thread is gone.
    Gone,
}

impl Process {
    fn new(pid: i32, launched: bool) -> Result<Process, AttachError> {
        let mem = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|error| match error.raw_os_error() {
                Some(libc::ENOENT) | Some(libc::ESRCH) => AttachError::NoSuchProcess { pid },
                Some(libc::EACCES) | Some(libc::EPERM) => AttachError::PermissionDenied {
                    pid,
                    reason: permission_reason(pid),
                },
                _ => AttachError::Io {
                    pid,
                    what: "memory".into(),
                    error,
                },
            })?;
        Ok(Process {
            pid,
            threads: BTreeMap::new(),
            mem,
            exit: None,
            scratch: None,
            park_page: std::cell::Cell::new(None),
            launched,
            execs: Vec::new(),
            _not_send: PhantomData,
        })
    }

    /// Wraps a freshly forked child that is already seized and stopped (used by `launch`).
    pub(crate) fn from_seized_child(pid: i32) -> Result<Process, AttachError> {
        let mut p = Process::new(pid, true)?;
        p.threads.insert(
            pid,
            Thread {
                stop: Some(Stop::Other),
                pending: None,
                group_stopped: false,
                self_trap: false,
                fresh: false,
            },
        );
        Ok(p)
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Whether we started the process (`launch`) rather than attached to it.
    pub fn is_launched(&self) -> bool {
        self.launched
    }

    /// Known thread ids, ascending.
    pub fn threads(&self) -> Vec<i32> {
        self.threads.keys().copied().collect()
    }

    /// How the process ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    /// Whether every known thread is stopped.
    pub fn all_stopped(&self) -> bool {
        self.threads.values().all(|t| t.stop.is_some())
    }

    /// Whether `tid` was created by a traced clone and has not run since: it holds no
    /// lock, whatever its instruction pointer says.
    pub fn is_fresh(&self, tid: i32) -> bool {
        self.threads
            .get(&tid)
            .is_some_and(|t| t.fresh && t.stop.is_some())
    }

    /// Programs the process exec'd while seized, in order.
    pub fn execs(&self) -> &[String] {
        &self.execs
    }

    /// Whether `tid` is known and stopped.
    pub fn is_stopped(&self, tid: i32) -> bool {
        self.threads.get(&tid).is_some_and(|t| t.stop.is_some())
    }

    /// The scratch mapping, once a remote call has created it.
    pub fn scratch(&self) -> Option<Scratch> {
        self.scratch
    }

    /// Reads target memory through `/proc/PID/mem` (works whatever the page protection).
    pub fn read_memory(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        self.mem.read_exact_at(buf, addr)
    }

    /// Writes target memory through `/proc/PID/mem`; the kernel forces writes to read-only
    /// and executable pages (copy-on-write for private file mappings).
    pub fn write_memory(&self, addr: u64, data: &[u8]) -> io::Result<()> {
        self.mem.write_all_at(data, addr)
    }

    /// Reads a NUL-terminated string of at most `max` bytes.
    pub fn read_c_string(&self, addr: u64, max: usize) -> io::Result<String> {
        let mut out = Vec::new();
        let mut chunk = [0u8; 256];
        while out.len() < max {
            // Never read across a page boundary in one go: the next page may be unmapped.
            let room = (4096 - (addr as usize + out.len()) % 4096).min(chunk.len());
            self.read_memory(addr + out.len() as u64, &mut chunk[..room])?;
            if let Some(n) = chunk[..room].iter().position(|&b| b == 0) {
                out.extend_from_slice(&chunk[..n]);
                return Ok(String::from_utf8_lossy(&out).into_owned());
            }
            out.extend_from_slice(&chunk[..room]);
        }
        out.truncate(max);
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// General registers of a stopped thread.
    pub fn regs(&self, tid: i32) -> Result<Regs, AttachError> {
        ptrace::getregs(Pid::from_raw(tid)).map_err(pt_err(tid, "PTRACE_GETREGS"))
    }

    /// Sets the general registers of a stopped thread.
    pub fn set_regs(&self, tid: i32, regs: &Regs) -> Result<(), AttachError> {
        ptrace::setregs(Pid::from_raw(tid), *regs).map_err(pt_err(tid, "PTRACE_SETREGS"))
    }

    /// `rip` of every stopped thread.
    pub fn thread_rips(&self) -> Result<Vec<(i32, u64)>, AttachError> {
        self.threads
            .iter()
            .filter(|(_, t)| t.stop.is_some())
            .map(|(&tid, _)| Ok((tid, self.regs(tid)?.rip)))
            .collect()
    }

    /// Executes one instruction of a stopped thread and returns its new `rip`. A signal
    /// that arrives meanwhile is kept pending (delivered at resume).
    pub fn single_step(&mut self, tid: i32) -> Result<u64, AttachError> {
        let before = self.regs(tid)?.rip;
        self.require_stopped(tid)?;
        ptrace::step(Pid::from_raw(tid), None).map_err(pt_err(tid, "PTRACE_SINGLESTEP"))?;
        self.threads.get_mut(&tid).expect("checked").stop = None;
        loop {
            let deadline = Some(Instant::now() + STOP_TIMEOUT);
            let st = wait_tid(tid, deadline)
                .map_err(pt_err(tid, "waitpid"))?
                .ok_or(AttachError::Timeout {
                    pid: self.pid,
                    tid,
                    what: "finish a single step",
                    state: describe_thread(self.pid, tid),
                })?;
            let trap = matches!(st, WaitStatus::Stopped(_, Signal::SIGTRAP));
            if self.handle(tid, st)? == Handled::Gone {
                return Err(AttachError::Exited {
                    pid: self.pid,
                    status: self.exit,
                });
            }
            if trap {
                // The step's SIGTRAP is ours: do not deliver it.
                self.threads.get_mut(&tid).expect("stopped").pending = None;
                return Ok(self.regs(tid)?.rip);
            }
            let rip = self.regs(tid)?.rip;
            if rip != before {
                return Ok(rip);
            }
            // Stopped for another reason before the step ran: step again.
            ptrace::step(Pid::from_raw(tid), None).map_err(pt_err(tid, "PTRACE_SINGLESTEP"))?;
            self.threads.get_mut(&tid).expect("checked").stop = None;
        }
    }

    /// Single-steps `tid` until its `rip` is outside `[start, end)`, at most `max_steps`
    /// steps. Returns the final `rip`.
    pub fn step_out_of(
        &mut self,
        tid: i32,
        start: u64,
        end: u64,
        max_steps: usize,
    ) -> Result<u64, AttachError> {
        let mut rip = self.regs(tid)?.rip;
        let mut n = 0;
        while (start..end).contains(&rip) {
            if n == max_steps {
                return Err(AttachError::Timeout {
                    pid: self.pid,
                    tid,
                    what: "leave the address range by single-stepping",
                    state: describe_thread(self.pid, tid),
                });
            }
            rip = self.single_step(tid)?;
            n += 1;
        }
        Ok(rip)
    }

    pub(crate) fn require_stopped(&self, tid: i32) -> Result<(), AttachError> {
        match self.threads.get(&tid) {
            Some(t) if t.stop.is_some() => Ok(()),
            Some(_) => Err(AttachError::Ptrace {
                tid,
                op: "use of a running thread",
                errno: Errno::ESRCH,
            }),
            None => Err(AttachError::Ptrace {
                tid,
                op: "use of an unknown thread",
                errno: Errno::ESRCH,
            }),
        }
    }

    /// Applies one wait status of `tid` to our bookkeeping. New threads reported by clone
    /// events are registered as running (their first stop is collected by `stop_all`).
    pub(crate) fn handle(&mut self, tid: i32, st: WaitStatus) -> Result<Handled, AttachError> {
        match st {
            WaitStatus::Exited(_, code) => {
                self.thread_gone(tid, Some(ExitStatus::Code(code)));
                Ok(Handled::Gone)
            }
            WaitStatus::Signaled(_, sig, _) => {
                self.thread_gone(tid, Some(ExitStatus::Signal(sig as i32)));
                Ok(Handled::Gone)
            }
            WaitStatus::Stopped(_, sig) => {
                self.signal_stop(tid, sig);
                Ok(Handled::Stopped)
            }
            WaitStatus::PtraceEvent(_, sig, ev) if ev == Event::PTRACE_EVENT_STOP as i32 => {
                let group = sig != Signal::SIGTRAP;
                let t = self.thread_mut(tid);
                t.stop = Some(if group { Stop::Group } else { Stop::Interrupt });
                t.group_stopped = group;
                // The stop a new or group-stopped thread reports by itself has come: from
                // now on only an interrupt stops it. (A clone child whose first stop was
                // handled by `service` and resumed would otherwise never be interrupted.)
                t.self_trap = false;
                Ok(Handled::Stopped)
            }
            WaitStatus::PtraceEvent(_, _, ev) if ev == Event::PTRACE_EVENT_CLONE as i32 => {
                self.cloned(tid);
                Ok(Handled::Stopped)
            }
            WaitStatus::PtraceEvent(_, _, ev) if ev == Event::PTRACE_EVENT_EXEC as i32 => {
                self.execed();
                Ok(Handled::Stopped)
            }
            WaitStatus::PtraceEvent(..) | WaitStatus::PtraceSyscall(_) => {
                self.thread_mut(tid).stop = Some(Stop::Other);
                Ok(Handled::Stopped)
            }
            WaitStatus::Continued(_) | WaitStatus::StillAlive => Ok(Handled::Stopped),
        }
    }

    /// `tid` stopped with `sig`, which stays pending for it.
    fn signal_stop(&mut self, tid: i32, sig: Signal) {
        let t = self.thread_mut(tid);
        t.stop = Some(Stop::Other);
        if let Some(prev) = t.pending.replace(sig) {
            // Only one signal can be pending per stop; the older one was already
            // dequeued by the kernel, so re-queue it rather than lose it.
            // SAFETY: tgkill with valid ids and a valid signal number.
            unsafe { libc::syscall(libc::SYS_tgkill, self.pid, tid, prev as i32) };
        }
    }

    /// `tid` made a thread: registered as running, its first stop still to come.
    fn cloned(&mut self, tid: i32) {
        self.thread_mut(tid).stop = Some(Stop::Other);
        if let Ok(new) = ptrace::getevent(Pid::from_raw(tid)) {
            self.threads.entry(new as i32).or_insert(Thread {
                stop: None,
                pending: None,
                group_stopped: false,
                self_trap: true,
                fresh: true,
            });
        }
    }

    /// The process ran another program: only the leader (which now has the exec'ing
    /// thread's body) is left, and the pages made in the old image are gone.
    fn execed(&mut self) {
        let pid = self.pid;
        self.threads.retain(|&t, _| t == pid);
        self.scratch = None;
        self.park_page.set(None);
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "another program".into());
        self.execs.push(exe);
        self.thread_mut(pid).stop = Some(Stop::Other);
    }

    fn thread_mut(&mut self, tid: i32) -> &mut Thread {
        self.threads.entry(tid).or_insert(Thread {
            stop: None,
            pending: None,
            group_stopped: false,
            self_trap: false,
            fresh: false,
        })
    }

    fn thread_gone(&mut self, tid: i32, status: Option<ExitStatus>) {
        self.threads.remove(&tid);
        if tid == self.pid {
            // The leader's status is reported last, for the whole thread group.
            self.exit = status;
            self.threads.clear();
        }
    }

    /// Seizes `tid` (one thread of our process). Ok(false) if it vanished meanwhile.
    fn seize_thread(&mut self, tid: i32) -> Result<bool, AttachError> {
        if self.threads.contains_key(&tid) {
            return Ok(true);
        }
        match ptrace::seize(Pid::from_raw(tid), options()) {
            Ok(()) => {
                self.threads.insert(
                    tid,
                    Thread {
                        stop: None,
                        pending: None,
                        group_stopped: false,
                        self_trap: false,
                        fresh: false,
                    },
                );
                Ok(true)
            }
            Err(Errno::ESRCH) => Ok(false),
            Err(Errno::EPERM) => {
                if tid != self.pid {
                    // The thread may be exiting; the leader's seize decides about permission.
                    return Ok(false);
                }
                match tracer_pid(self.pid) {
                    // SAFETY: getpid has no preconditions.
                    Ok(t) if t != 0 && t != unsafe { libc::getpid() } => {
                        Err(AttachError::AlreadyTraced {
                            pid: self.pid,
                            tracer: t,
                        })
                    }
                    _ => Err(AttachError::PermissionDenied {
                        pid: self.pid,
                        reason: permission_reason(self.pid),
                    }),
                }
            }
            Err(e) => Err(pt_err(tid, "PTRACE_SEIZE")(e)),
        }
    }

    /// Stops every thread: `PTRACE_INTERRUPT` then wait for each stop. Threads that appear
    /// meanwhile (clone events, or in attach mode threads listed in `/proc/PID/task` that
    /// are not seized yet) are seized and stopped too. Signals reported instead of our
    /// interrupt are kept pending.
    pub fn stop_all(&mut self) -> Result<(), AttachError> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            if self.exit.is_some() || self.threads.is_empty() {
                return Err(AttachError::Exited {
                    pid: self.pid,
                    status: self.exit,
                });
            }
            self.seize_unlisted()?;
            let running: Vec<(i32, bool)> = self
                .threads
                .iter()
                .filter(|(_, t)| t.stop.is_none())
                .map(|(&tid, t)| (tid, t.self_trap))
                .collect();
            if running.is_empty() {
                return Ok(());
            }
            for &(tid, seized_in_group_stop) in &running {
                if !seized_in_group_stop {
                    match ptrace::interrupt(Pid::from_raw(tid)) {
                        Ok(()) | Err(Errno::ESRCH) => {}
                        Err(e) => return Err(pt_err(tid, "PTRACE_INTERRUPT")(e)),
                    }
                }
            }
            for (tid, _) in running {
                if self.threads.contains_key(&tid) {
                    self.wait_stopped(tid, deadline)?;
                }
            }
        }
    }

    /// Seizes the threads in `/proc/PID/task` not seized yet: threads created by a thread
    /// before it was seized are not reported by clone events.
    fn seize_unlisted(&mut self) -> Result<(), AttachError> {
        let Ok(tasks) = list_tasks(self.pid) else {
            return Ok(());
        };
        for tid in tasks {
            if !self.threads.contains_key(&tid) && self.seize_thread(tid)? {
                // A thread already in group-stop re-traps by itself after the seize;
                // interrupting it as well would leave a stale trap for later.
                if thread_state(self.pid, tid).is_ok_and(|s| s == 'T') {
                    self.threads.get_mut(&tid).expect("seized").self_trap = true;
                }
            }
        }
        Ok(())
    }

    /// Waits for one interrupted thread's stop (or its end) until `deadline`.
    fn wait_stopped(&mut self, tid: i32, deadline: Instant) -> Result<(), AttachError> {
        match wait_tid(tid, Some(deadline)) {
            Ok(Some(st)) => {
                if self.handle(tid, st)? == Handled::Stopped {
                    if let Some(t) = self.threads.get_mut(&tid) {
                        t.self_trap = false;
                    }
                    if in_syscall_event(st) {
                        self.finish_syscall(tid)?;
                    }
                }
            }
            Ok(None) => {
                return Err(AttachError::Timeout {
                    pid: self.pid,
                    tid,
                    what: "stop",
                    state: describe_thread(self.pid, tid),
                })
            }
            Err(Errno::ECHILD) => self.thread_gone(tid, None),
            Err(e) => return Err(pt_err(tid, "waitpid")(e)),
        }
        Ok(())
    }

    /// A clone, fork or exec event stops the thread halfway through its system call: the
    /// kernel still writes the call's result into rax when it resumes, which would corrupt
    /// a remote call made from there (and a clone's child resumes at the same address).
    /// Let the call finish; the next round of `stop_all` stops the thread at a clean point.
    fn finish_syscall(&mut self, tid: i32) -> Result<(), AttachError> {
        ptrace::cont(Pid::from_raw(tid), None)
            .or_else(|e| if e == Errno::ESRCH { Ok(()) } else { Err(e) })
            .map_err(pt_err(tid, "PTRACE_CONT"))?;
        if let Some(t) = self.threads.get_mut(&tid) {
            t.stop = None;
        }
        Ok(())
    }

    /// Resumes one stopped thread: group-stopped threads stay stopped (`PTRACE_LISTEN`),
    /// others continue with their pending signal, if any.
    pub(crate) fn resume_thread(&mut self, tid: i32) -> Result<(), AttachError> {
        let Some(t) = self.threads.get_mut(&tid) else {
            return Ok(());
        };
        let Some(stop) = t.stop else { return Ok(()) };
        let pid = Pid::from_raw(tid);
        let r = if stop == Stop::Group && t.pending.is_none() {
            // SAFETY: PTRACE_LISTEN takes no pointers.
            let rc = unsafe { libc::ptrace(libc::PTRACE_LISTEN, tid, 0usize, 0usize) };
            if rc == -1 {
                Err(Errno::last())
            } else {
                Ok(())
            }
        } else {
            ptrace::cont(pid, t.pending)
        };
        match r {
            Ok(()) => {
                t.stop = None;
                t.pending = None;
                t.fresh = false;
                Ok(())
            }
            Err(Errno::ESRCH) => {
                // Killed meanwhile (SIGKILL): its exit is collected by the next wait.
                t.stop = None;
                Ok(())
            }
            Err(e) => Err(pt_err(tid, "PTRACE_CONT")(e)),
        }
    }

    /// Resumes every thread, delivering the signals that arrived while they were stopped.
    /// A process that was group-stopped (SIGSTOP) stays stopped.
    pub fn resume_all(&mut self) -> Result<(), AttachError> {
        // The program goes on with its own threads only.
        crate::agent_thread::dismiss(self);
        for tid in self.threads() {
            self.resume_thread(tid)?;
        }
        Ok(())
    }

    /// Handles whatever the running threads report for up to `timeout`: re-delivers
    /// signals, registers and starts new threads, keeps group-stops. Returns the exit
    /// status once the process has ended.
    pub fn service(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, AttachError> {
        self.service_except(timeout, None)
    }

    /// [`Process::service`] leaving the thread `skip` alone (its events are someone else's).
    pub(crate) fn service_except(
        &mut self,
        timeout: Duration,
        skip: Option<i32>,
    ) -> Result<Option<ExitStatus>, AttachError> {
        let deadline = Instant::now() + timeout;
        // Blocked before the first check, so that an event after it wakes the sleep below.
        let block = crate::child_events::ChildSignalBlock::new();
        loop {
            let mut any = false;
            for tid in self.threads() {
                if Some(tid) == skip {
                    continue;
                }
                let st = match wait_tid(tid, Some(Instant::now())) {
                    Ok(Some(st)) => st,
                    Ok(None) => continue,
                    Err(Errno::ECHILD) => {
                        self.thread_gone(tid, None);
                        continue;
                    }
                    Err(e) => return Err(pt_err(tid, "waitpid")(e)),
                };
                any = true;
                if self.handle(tid, st)? == Handled::Stopped {
                    self.resume_thread(tid)?;
                }
            }
            if self.exit.is_some() || self.threads.is_empty() {
                return Ok(self.exit);
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            if !any {
                block.sleep(Some(deadline));
            }
        }
    }

    /// Lets the process run (servicing its events) until it exits.
    pub fn wait_exit(&mut self) -> Result<ExitStatus, AttachError> {
        self.resume_all()?;
        loop {
            if let Some(s) = self.service(Duration::from_millis(100))? {
                return Ok(s);
            }
            if self.threads.is_empty() {
                return Err(AttachError::Exited {
                    pid: self.pid,
                    status: None,
                });
            }
        }
    }

    /// Detaches from every thread (stopping them first), delivering pending signals.
    /// A group-stopped process stays stopped. The scratch mapping is removed.
    pub fn detach(mut self) -> Result<(), AttachError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), AttachError> {
        if self.threads.is_empty() {
            return Ok(());
        }
        if !self.all_stopped() {
            self.stop_all()?;
        }
        let agent = crate::agent_thread::dismiss(self);
        crate::remote_call::release_scratch(self);
        // The agent's thread first and the main thread last: a thread let go runs at once,
        // and one that ends the process (`exit_group`, as a short program's main thread
        // does right away) kills the threads still stopped under us. Those become zombies
        // that only their tracer can reap, and until it does the process never ends (its
        // parent waited forever for a program that had printed everything).
        let mut order: Vec<(i32, Thread)> = std::mem::take(&mut self.threads).into_iter().collect();
        order.sort_by_key(|(tid, _)| (Some(*tid) != agent, *tid == self.pid));
        let mut first_err = None;
        for (tid, t) in order {
            match ptrace::detach(Pid::from_raw(tid), t.pending) {
                Ok(()) => {}
                Err(Errno::ESRCH) if tid != self.pid => reap_exited_thread(tid),
                Err(Errno::ESRCH) => {}
                Err(e) => {
                    first_err.get_or_insert(pt_err(tid, "PTRACE_DETACH")(e));
                }
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Kills the process (SIGKILL) and reaps it; for launched processes on error paths.
    pub fn kill(mut self) {
        // SAFETY: kill with our own child's pid.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        let _ = self.service(Duration::from_secs(2));
        self.threads.clear();
    }
}

/// Reaps a thread (not the main one) that died while traced by us, typically killed by
/// another thread's `exit_group` while we were letting threads go one by one. Its tracer
/// alone can collect it; the main thread's status is its parent's to collect.
fn reap_exited_thread(tid: i32) {
    // Exited and reaped, not ours (any more), or still dying after the deadline: either
    // way nothing more can be done from here.
    let _ = wait_tid(tid, Some(Instant::now() + Duration::from_millis(200)));
}

impl fmt::Debug for Process {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Process")
            .field("pid", &self.pid)
            .field("threads", &self.threads)
            .field("exit", &self.exit)
            .field("scratch", &self.scratch)
            .field("launched", &self.launched)
            .finish()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // Never leave a target stuck in a trace-stop because a caller forgot to detach.
        let _ = self.detach_inner();
    }
}

/// Seizes every thread of `pid` and stops them all.
///
/// Checks first that the process exists, is not traced by someone else and is x86-64.
/// On error the target is left as it was (every seized thread detached).
pub fn attach(pid: i32) -> Result<Process, AttachError> {
    check_attachable(pid)?;
    let mut p = Process::new(pid, false)?;
    if !p.seize_thread(pid)? {
        return Err(AttachError::Exited { pid, status: None });
    }
    if thread_state(pid, pid).is_ok_and(|s| s == 'T') {
        p.threads.get_mut(&pid).expect("seized").self_trap = true;
    }
    match p.stop_all() {
        Ok(()) => Ok(p),
        Err(e) => {
            let e = match e {
                AttachError::Exited { .. }
                | AttachError::Ptrace {
                    errno: Errno::ESRCH,
                    ..
                } if !std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                    AttachError::Exited {
                        pid,
                        status: p.exit,
                    }
                }
                e => e,
            };
            // Drop detaches whatever was seized.
            drop(p);
            Err(e)
        }
    }
}

/// Whether `pid` exists, is not tracer itself or traced by someone else, and is x86-64:
/// checked before anything is seized.
fn check_attachable(pid: i32) -> Result<(), AttachError> {
    if pid <= 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return Err(AttachError::NoSuchProcess { pid });
    }
    if let Some(what) = crate::process_kind::not_a_program(pid) {
        return Err(AttachError::NotAProgram { what });
    }
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() };
    if pid == me {
        return Err(AttachError::PermissionDenied {
            pid,
            reason: "a process cannot trace itself".into(),
        });
    }
    match tracer_pid(pid) {
        Ok(t) if t != 0 => return Err(AttachError::AlreadyTraced { pid, tracer: t }),
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AttachError::NoSuchProcess { pid })
        }
        Err(error) => {
            return Err(AttachError::Io {
                pid,
                what: "status".into(),
                error,
            })
        }
    }
    match foreign_machine(pid) {
        Ok(None) => {}
        Ok(Some(machine)) => return Err(AttachError::NotX86_64 { pid, machine }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(AttachError::NoSuchProcess { pid })
        }
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            return Err(AttachError::PermissionDenied {
                pid,
                reason: permission_reason(pid),
            })
        }
        Err(error) => {
            return Err(AttachError::Io {
                pid,
                what: "executable".into(),
                error,
            })
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The procfs readers on this very process: its threads are listed, the calling
    /// one is running, nobody traces it (unless the test runs under a debugger), and a
    /// thread that does not exist reads as gone rather than as an error text.
    #[test]
    fn proc_readers_see_this_process() {
        let pid = std::process::id() as i32;
        let me = nix::unistd::gettid().as_raw();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let helper = std::thread::spawn(move || rx.recv().ok());
        let tasks = list_tasks(pid).unwrap();
        assert!(tasks.contains(&pid) && tasks.contains(&me), "{tasks:?}");
        assert!(tasks.len() >= 2, "{tasks:?}");
        assert_eq!(thread_state(pid, me).unwrap(), 'R');
        let traced = tracer_pid(pid).unwrap();
        assert!(traced >= 0);
        let d = describe_thread(pid, me);
        assert!(d.starts_with("R (running), "), "{d}");
        assert_eq!(describe_thread(pid, i32::MAX), "gone");
        assert_eq!(
            thread_state(pid, i32::MAX).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        tx.send(()).unwrap();
        helper.join().unwrap();
    }
}

//! Starting a program under our control, stopped at its entry point.
//!
//! Technique: fork by hand; the child waits on a pipe until the parent has `PTRACE_SEIZE`d
//! it, then `execve`s. Seizing (rather than `PTRACE_TRACEME`) gives the launched process
//! exactly the same ptrace semantics as an attached one (`PTRACE_INTERRUPT`, group-stops as
//! `PTRACE_EVENT_STOP`), so the rest of the tracer has one code path. `std::process::Command`
//! cannot be used: its `spawn` blocks until the child has exec'd, so the child could not
//! wait for the seize.
//!
//! `TRACEEXEC` stops the child right after `execve` (at ld.so's entry); we then put an
//! `int3` at `AT_ENTRY` (auxv key 9, already relocated for PIE), run to it and remove it:
//! at that point every needed library is mapped, relocated and initialised, and the
//! executable's own constructors and `main` have not run. stdin/stdout/stderr are
//! inherited untouched.

use std::ffi::{CString, OsStr};
use std::fmt;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::ptrace::{self, Event, Options};
use nix::sys::signal::Signal;
use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;

use crate::threads::{wait_tid, AttachError, ExitStatus, Handled, Process};

/// Why a program could not be launched.
#[derive(Debug)]
pub enum LaunchError {
    /// No such file, or not found in `$PATH`.
    NotFound { program: String },
    /// The file exists but is not an executable regular file.
    NotExecutable { path: PathBuf },
    /// An argument or environment string contains a NUL byte.
    BadArgument { arg: String },
    /// `fork`, `pipe` or the seize of the child failed.
    Spawn { what: &'static str, errno: Errno },
    /// `execve` failed in the child.
    Exec { path: PathBuf, errno: Errno },
    /// The program ended before reaching its entry point.
    ExitedEarly { status: ExitStatus },
    /// `/proc/PID/auxv` has no `AT_ENTRY`, or reading it failed.
    Auxv { pid: i32, error: io::Error },
    /// The entry point was not reached in time.
    EntryTimeout { pid: i32 },
    /// ptrace bookkeeping failed.
    Attach(AttachError),
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::NotFound { program } => write!(
                f,
                "program {program:?} not found: give a path or make sure it is in $PATH"
            ),
            LaunchError::NotExecutable { path } => write!(
                f,
                "{} is not an executable file: check its permissions (chmod +x)",
                path.display()
            ),
            LaunchError::BadArgument { arg } => {
                write!(f, "argument or environment entry {arg:?} contains a NUL byte")
            }
            LaunchError::Spawn { what, errno } => write!(f, "cannot start the program: {what} failed: {errno}"),
            LaunchError::Exec { path, errno } => {
                write!(f, "cannot execute {}: {errno}", path.display())
            }
            LaunchError::ExitedEarly { status } => write!(
                f,
                "the program ended before reaching its entry point ({status}): a missing library or a dynamic loader error?"
            ),
            LaunchError::Auxv { pid, error } => {
                write!(f, "cannot find the entry point of PID {pid} in /proc/{pid}/auxv: {error}")
            }
            LaunchError::EntryTimeout { pid } => write!(
                f,
                "PID {pid} did not reach its entry point within the time limit"
            ),
            LaunchError::Attach(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for LaunchError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Shown as the inner error itself: its cause is this one's.
            LaunchError::Attach(e) => e.source(),
            LaunchError::Spawn { errno, .. } | LaunchError::Exec { errno, .. } => Some(errno),
            LaunchError::Auxv { error, .. } => Some(error),
            _ => None,
        }
    }
}

impl From<AttachError> for LaunchError {
    fn from(e: AttachError) -> Self {
        LaunchError::Attach(e)
    }
}

/// Time allowed from `execve` to the entry point (library constructors run in between).
pub const ENTRY_TIMEOUT: Duration = Duration::from_secs(30);

fn is_executable_file(p: &Path) -> bool {
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Resolves `program` like `execvp`: a name with a `/` is a path, otherwise search `$PATH`.
pub fn resolve_program(program: &str) -> Result<PathBuf, LaunchError> {
    if program.is_empty() {
        return Err(LaunchError::NotFound {
            program: program.into(),
        });
    }
    if program.contains('/') {
        let p = PathBuf::from(program);
        if !p.exists() {
            return Err(LaunchError::NotFound {
                program: program.into(),
            });
        }
        if !is_executable_file(&p) {
            return Err(LaunchError::NotExecutable { path: p });
        }
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        if is_executable_file(&candidate) {
            return Ok(candidate);
        }
    }
    Err(LaunchError::NotFound {
        program: program.into(),
    })
}

fn cstring(s: &OsStr) -> Result<CString, LaunchError> {
    CString::new(s.as_bytes()).map_err(|_| LaunchError::BadArgument {
        arg: s.to_string_lossy().into_owned(),
    })
}

/// `AT_ENTRY` of a process, from `/proc/PID/auxv`.
pub fn entry_point(pid: i32) -> io::Result<u64> {
    let auxv = procfs::process::Process::new(pid)
        .and_then(|p| p.auxv())
        .map_err(crate::threads::proc_io)?;
    auxv.get(&libc::AT_ENTRY)
        .copied()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no AT_ENTRY"))
}

struct Fd(i32);
impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn pipe() -> Result<(Fd, Fd), LaunchError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for the two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } == -1 {
        return Err(LaunchError::Spawn {
            what: "pipe2",
            errno: Errno::last(),
        });
    }
    Ok((Fd(fds[0]), Fd(fds[1])))
}

/// Starts `program` with `args` (argv[1..]; argv[0] is `program` as given) under ptrace and
/// returns it stopped at its entry point, every thread stopped. Either detach
/// ([`Process::detach`]: it stays our child, so a plain `waitpid` collects its end, and
/// its signals no longer stop it) or resume it traced with [`Process::resume_all`] and
/// collect its end with [`Process::wait_exit`].
pub fn launch(program: &str, args: &[String]) -> Result<Process, LaunchError> {
    let path = resolve_program(program)?;
    let strings = ExecStrings::new(&path, program, args)?;
    let (go_r, go_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    let child = fork_waiting(&strings, go_r, err_w)?;
    let pid = Pid::from_raw(child);
    let kill_child = || {
        // SAFETY: our own child.
        unsafe { libc::kill(child, libc::SIGKILL) };
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::__WALL));
    };
    if let Err(errno) = ptrace::seize(
        pid,
        Options::PTRACE_O_TRACECLONE | Options::PTRACE_O_TRACEEXEC,
    ) {
        kill_child();
        return Err(LaunchError::Spawn {
            what: "PTRACE_SEIZE of the child",
            errno,
        });
    }
    // SAFETY: writes one byte from a local to our pipe.
    unsafe { libc::write(go_w.0, [1u8].as_ptr().cast(), 1) };
    drop(go_w);

    let exec_wait = Instant::now();
    wait_for_exec(child, &err_r, path, &kill_child)?;
    crate::timings::add("  fork and exec", exec_wait.elapsed());
    drop(err_r);
    let mut proc = match Process::from_seized_child(child) {
        Ok(p) => p,
        Err(e) => {
            kill_child();
            return Err(e.into());
        }
    };
    match crate::timings::time("  run to the entry point", || run_to_entry(&mut proc)) {
        Ok(()) => Ok(proc),
        Err(e) => {
            proc.kill();
            Err(e)
        }
    }
}

/// What `execve` takes, made before the fork: the child may only call async-signal-safe
/// functions, so nothing is allocated there.
struct ExecStrings {
    path: CString,
    _argv: Vec<CString>,
    _env: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecStrings {
    fn new(path: &Path, program: &str, args: &[String]) -> Result<ExecStrings, LaunchError> {
        let c_path = cstring(path.as_os_str())?;
        let mut argv_c = vec![cstring(OsStr::new(program))?];
        for a in args {
            argv_c.push(cstring(OsStr::new(a))?);
        }
        let mut env_c = Vec::new();
        for (k, v) in std::env::vars_os() {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            env_c.push(CString::new(kv).map_err(|_| LaunchError::BadArgument {
                arg: k.to_string_lossy().into_owned(),
            })?);
        }
        let argv: Vec<*const libc::c_char> = argv_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = env_c
            .iter()
            .map(|c| c.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        Ok(ExecStrings {
            path: c_path,
            _argv: argv_c,
            _env: env_c,
            argv,
            envp,
        })
    }
}

/// Fork a child that waits for a byte on `go` (so that it can be seized first), then
/// execs; an exec failure's errno comes back through `err`.
fn fork_waiting(strings: &ExecStrings, go: Fd, err: Fd) -> Result<i32, LaunchError> {
    // SAFETY: the child only calls async-signal-safe functions (sigprocmask, signal, read,
    // execve, write, _exit) on memory prepared before the fork.
    let child = unsafe { libc::fork() };
    if child == -1 {
        return Err(LaunchError::Spawn {
            what: "fork",
            errno: Errno::last(),
        });
    }
    if child == 0 {
        // SAFETY: see above; every pointer refers to memory owned by the parent's copy.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            // Rust ignores SIGPIPE; programs expect the default.
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
            let mut b = 0u8;
            libc::read(go.0, (&mut b as *mut u8).cast(), 1);
            libc::execve(
                strings.path.as_ptr(),
                strings.argv.as_ptr(),
                strings.envp.as_ptr(),
            );
            let e = *libc::__errno_location();
            libc::write(err.0, (&e as *const i32).cast(), 4);
            libc::_exit(127);
        }
    }
    Ok(child)
}

/// Wait for the seized child's exec event, passing on signals that come before it; its
/// failure to exec (errno on `err`) or its end before the exec is the error.
fn wait_for_exec(
    child: i32,
    err: &Fd,
    path: PathBuf,
    kill_child: &dyn Fn(),
) -> Result<(), LaunchError> {
    let pid = Pid::from_raw(child);
    loop {
        match wait_tid(child, Some(Instant::now() + ENTRY_TIMEOUT)) {
            Ok(Some(WaitStatus::PtraceEvent(_, _, ev)))
                if ev == Event::PTRACE_EVENT_EXEC as i32 =>
            {
                return Ok(())
            }
            Ok(Some(WaitStatus::Exited(_, code))) => {
                let mut e = 0i32;
                // SAFETY: reads at most 4 bytes into a local.
                let n = unsafe { libc::read(err.0, (&mut e as *mut i32).cast(), 4) };
                if n == 4 {
                    return Err(LaunchError::Exec {
                        path,
                        errno: Errno::from_raw(e),
                    });
                }
                return Err(LaunchError::ExitedEarly {
                    status: ExitStatus::Code(code),
                });
            }
            Ok(Some(WaitStatus::Signaled(_, sig, _))) => {
                return Err(LaunchError::ExitedEarly {
                    status: ExitStatus::Signal(sig as i32),
                })
            }
            Ok(Some(WaitStatus::Stopped(_, sig))) => {
                // A signal before exec: deliver it.
                let _ = ptrace::cont(pid, sig);
            }
            Ok(Some(_)) => {
                let _ = ptrace::cont(pid, None);
            }
            Ok(None) => {
                kill_child();
                return Err(LaunchError::EntryTimeout { pid: child });
            }
            Err(errno) => {
                kill_child();
                return Err(LaunchError::Spawn {
                    what: "waitpid",
                    errno,
                });
            }
        }
    }
}

fn run_to_entry(proc: &mut Process) -> Result<(), LaunchError> {
    let pid = proc.pid();
    let entry = entry_point(pid).map_err(|error| LaunchError::Auxv { pid, error })?;
    let mut orig = [0u8; 1];
    let mem_err = |error| LaunchError::Auxv { pid, error };
    proc.read_memory(entry, &mut orig).map_err(mem_err)?;
    proc.write_memory(entry, &[0xcc]).map_err(mem_err)?;
    let deadline = Instant::now() + ENTRY_TIMEOUT;
    proc.resume_all()?;
    let reached = loop {
        match wait_tid(pid, Some(Instant::now() + Duration::from_millis(2))) {
            Ok(Some(st)) => {
                if proc.handle(pid, st)? == Handled::Gone {
                    let status = proc.exit_status().unwrap_or(ExitStatus::Code(0));
                    return Err(LaunchError::ExitedEarly { status });
                }
                let rip = proc.regs(pid)?.rip;
                if matches!(st, WaitStatus::Stopped(_, Signal::SIGTRAP)) && rip == entry + 1 {
                    break true;
                }
                proc.resume_thread(pid)?;
            }
            Ok(None) => {}
            Err(errno) => {
                return Err(AttachError::Ptrace {
                    tid: pid,
                    op: "waitpid",
                    errno,
                }
                .into())
            }
        }
        // Threads started by library constructors keep running until we reach the entry.
        proc.service_except(Duration::ZERO, Some(pid))?;
        if Instant::now() >= deadline {
            break false;
        }
    };
    if !reached {
        proc.stop_all()?;
        let _ = proc.write_memory(entry, &orig);
        return Err(LaunchError::EntryTimeout { pid });
    }
    proc.write_memory(entry, &orig).map_err(mem_err)?;
    let mut regs = proc.regs(pid)?;
    regs.rip = entry;
    proc.set_regs(pid, &regs)?;
    if let Some(t) = proc.threads.get_mut(&pid) {
        // The SIGTRAP was our breakpoint's.
        t.pending = None;
    }
    proc.stop_all()?;
    Ok(())
}

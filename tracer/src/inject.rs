//! Loading a shared library into the target with the target's own `dlopen`.
//!
//! 1. `dlopen`/`dlsym`/`dlerror`/`pthread_create` are resolved from the target's libc symbol
//!    table, read from the file through `/proc/PID/root/<path>` (works across mount
//!    namespaces), plus the load bias from `/proc/PID/maps`. Older glibc without an exported
//!    `dlopen` falls back to `__libc_dlopen_mode`/`__libc_dlsym` (and `pthread_create` from
//!    `libpthread`).
//! 2. The library bytes go into a file of the target's own file system (see
//!    [`crate::library_file`]: the path given to `dlopen` stays the library's name for
//!    debuggers, so it must keep naming that file) and `dlopen(PATH, RTLD_NOW)` loads it.
//!    When that file cannot be made or loaded (a read-only or `noexec` `/tmp`), the bytes go
//!    into a memfd created *inside the target* (remote `memfd_create`), filled through
//!    `/proc/PID/fd/N` (or remote `write`s from the scratch page if that open is refused),
//!    then `dlopen("/proc/self/fd/N", RTLD_NOW)`, the loader's name for it is rewritten to a
//!    `/proc/PID/map_files/...` path debuggers can open, and the fd is closed.
//! 3. `dlopen` takes the loader lock and may call `malloc`, so it, and every later call that
//!    may take a lock ([`call_safely`]), runs on the agent's parked thread (see
//!    [`crate::agent_thread`]), which holds no lock, while the other threads run, so that a
//!    lock another thread holds only delays it.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use agent::maps::{self, MapEntry};
use object::{Object, ObjectSegment, ObjectSymbol};

use crate::agent_thread;
use crate::library_file;
use crate::remote_call::{self, RemoteCallError};
use crate::threads::{AttachError, Process};

/// Time allowed for starting the agent's thread plus the `dlopen` call itself (Frida's
/// injector waits 5 s too).
pub const DLOPEN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an injection or remote symbol lookup failed.
#[derive(Debug)]
pub enum InjectError {
    /// Stopping or controlling the process failed.
    Remote(RemoteCallError),
    /// The target has no libc / dynamic loader mapped: statically linked.
    StaticTarget { pid: i32 },
    /// libc is mapped but exports neither `dlopen` nor `__libc_dlopen_mode`.
    NoDlopen { pid: i32, libc: String },
    /// Reading the target's libc file failed.
    LibcFile { path: String, error: String },
    /// Reading `/proc/PID/maps` failed.
    Maps { pid: i32, error: std::io::Error },
    /// No thread could run `pthread_create` (every one stayed inside libc/ld.so, running).
    NoSafeThread { pid: i32, waited: Duration },
    /// The target's `pthread_create` failed.
    ThreadCreate { errno: nix::errno::Errno },
    /// The agent's thread was created but did not reach its park loop in time.
    ThreadNotParked { pid: i32, waited: Duration },
    /// Filling the memfd failed.
    Transfer { error: std::io::Error },
    /// The library was loaded from a memfd but its loader name could not be made one that
    /// debuggers can open.
    Rename { error: std::io::Error },
    /// `dlopen` returned NULL; `message` is `dlerror()`.
    DlopenFailed { message: String },
    /// `dlsym` returned NULL.
    SymbolNotFound { name: String, message: String },
    /// The library was loaded but its mapping was not found in `/proc/PID/maps`.
    NotMapped { pid: i32 },
}

impl fmt::Display for InjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InjectError::Remote(e) => e.fmt(f),
            InjectError::StaticTarget { pid } => write!(
                f,
                "PID {pid} is statically linked (no libc.so / ld.so mapped): it cannot load the agent; trace a dynamically linked program"
            ),
            InjectError::NoDlopen { pid, libc } => write!(
                f,
                "the libc of PID {pid} ({libc}) exports neither dlopen nor __libc_dlopen_mode: unsupported C library"
            ),
            InjectError::LibcFile { path, error } => {
                write!(f, "cannot read the target's libc {path}: {error}")
            }
            InjectError::Maps { pid, error } => write!(f, "cannot read /proc/{pid}/maps: {error}"),
            InjectError::NoSafeThread { pid, waited } => write!(
                f,
                "no thread of PID {pid} left libc/ld.so or slept in a system call during {waited:?} (each may hold a malloc or loader lock), so the agent's thread could not be started safely; nothing was changed, retry later"
            ),
            InjectError::ThreadCreate { errno } => write!(
                f,
                "pthread_create in the target failed ({errno}): it cannot start the agent's thread; nothing was loaded"
            ),
            InjectError::ThreadNotParked { pid, waited } => write!(
                f,
                "the agent's thread in PID {pid} did not start within {waited:?} (the target may be overloaded); nothing was loaded, retry later"
            ),
            InjectError::Transfer { error } => {
                write!(f, "cannot copy the library into the target's memfd: {error}")
            }
            InjectError::Rename { error } => write!(
                f,
                "the library was loaded from a memfd but its name for debuggers could not be fixed ({error}): gdb -p may hang on this process"
            ),
            InjectError::DlopenFailed { message } => write!(f, "dlopen in the target failed: {message}"),
            InjectError::SymbolNotFound { name, message } => {
                write!(f, "symbol {name:?} not found in the injected library: {message}")
            }
            InjectError::NotMapped { pid } => write!(
                f,
                "dlopen succeeded but the library does not appear in /proc/{pid}/maps"
            ),
        }
    }
}

impl std::error::Error for InjectError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            // Shown as the inner error itself: its cause is this one's.
            InjectError::Remote(e) => e.source(),
            InjectError::Maps { error, .. }
            | InjectError::Transfer { error }
            | InjectError::Rename { error } => Some(error),
            InjectError::ThreadCreate { errno } => Some(errno),
            _ => None,
        }
    }
}

impl From<RemoteCallError> for InjectError {
    fn from(e: RemoteCallError) -> Self {
        InjectError::Remote(e)
    }
}

impl From<AttachError> for InjectError {
    fn from(e: AttachError) -> Self {
        InjectError::Remote(e.into())
    }
}

/// A library loaded into the target.
#[derive(Clone, Debug)]
pub struct Injected {
    /// The `dlopen` handle (valid in the target).
    pub handle: u64,
    /// The library's name in `/proc/PID/maps`: its file (`/tmp/tracer-UID/NAME-HASH.so`)
    /// or, when that could not be used, `/memfd:NAME (deleted)`.
    pub path_in_target: String,
    /// Lowest mapped address of the library (its load base for a 0-based ELF file).
    pub base: u64,
    /// Inode of the library's file or memfd, identifying its mappings.
    pub inode: u64,
}

/// Addresses of the target's dynamic-loading functions.
#[derive(Clone, Debug)]
pub struct LibcFunctions {
    pub dlopen: u64,
    pub dlsym: u64,
    /// `None` with old glibc (`__libc_dlopen_mode` has no `dlerror`).
    pub dlerror: Option<u64>,
    /// Extra mode bits for `dlopen` (`__RTLD_DLOPEN` for `__libc_dlopen_mode`).
    pub mode_extra: u64,
    /// Start the agent's thread, and let it end without a join.
    pub pthread_create: u64,
    pub pthread_detach: u64,
    /// Where libc and ld.so code lies: threads stopped there may hold their locks.
    pub unsafe_ranges: Vec<(u64, u64)>,
    /// Lowest address libc is mapped at: whether addresses remembered in the target (see
    /// [`agent_thread::remembered_functions`]) are still libc's.
    pub libc_base: u64,
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn is_libc(path: &str) -> bool {
    let n = file_name(path);
    n.starts_with("libc.so") || (n.starts_with("libc-") && n.ends_with(".so"))
}

fn is_ld_so(path: &str) -> bool {
    let n = file_name(path);
    n.starts_with("ld-linux") || n.starts_with("ld-") && n.contains(".so")
}

/// Addresses in the target of the dynamic symbols `names` of the object mapped from `path`.
fn exported(
    dir: &str,
    entries: &[MapEntry],
    path: &str,
    names: &[&str],
) -> Result<Vec<Option<u64>>, InjectError> {
    let map_base = entries
        .iter()
        .filter(|e| e.path == path)
        .map(|e| e.start)
        .min()
        .unwrap_or(0);
    let file_path = format!("{dir}/root{path}");
    let data = crate::symbols::map_file(std::path::Path::new(&file_path)).map_err(|e| {
        InjectError::LibcFile {
            path: file_path.clone(),
            error: e.to_string(),
        }
    })?;
    let file = object::File::parse(&*data).map_err(|e| InjectError::LibcFile {
        path: file_path.clone(),
        error: e.to_string(),
    })?;
    let first_vaddr = file.segments().map(|s| s.address()).min().unwrap_or(0) & !0xfff;
    let bias = map_base.wrapping_sub(first_vaddr);
    // One pass over the table (a pass per name took 0.5 ms over libc's 3,000 symbols).
    let mut found = vec![None; names.len()];
    for s in file.dynamic_symbols().filter(|s| s.is_definition()) {
        if let Some(i) = s
            .name()
            .ok()
            .and_then(|n| names.iter().position(|&w| w == n))
        {
            found[i].get_or_insert(s.address().wrapping_add(bias));
        }
    }
    Ok(found)
}

/// The path of the target's libc, or why there is none to load the agent with.
fn mapped_libc(pid: i32, entries: &[MapEntry]) -> Result<String, InjectError> {
    if let Some(path) = entries.iter().find(|e| is_libc(&e.path)) {
        return Ok(path.path.clone());
    }
    if entries.iter().any(|e| is_ld_so(&e.path)) {
        return Err(InjectError::NoDlopen {
            pid,
            libc: "none mapped".into(),
        });
    }
    Err(InjectError::StaticTarget { pid })
}

/// `pthread_create` and `pthread_detach` from libpthread: glibc before 2.34 keeps them
/// there.
fn libpthread_functions(
    pid: i32,
    dir: &str,
    entries: &[MapEntry],
    libc_path: &str,
) -> Result<(u64, u64), InjectError> {
    let libpthread = entries
        .iter()
        .find(|e| file_name(&e.path).starts_with("libpthread"))
        .map(|e| e.path.clone());
    let found = match libpthread {
        Some(p) => exported(dir, entries, &p, &["pthread_create", "pthread_detach"])?,
        None => vec![None, None],
    };
    match (found[0], found[1]) {
        (Some(c), Some(d)) => Ok((c, d)),
        _ => Err(InjectError::NoDlopen {
            pid,
            libc: format!("{libc_path}, without pthread_create"),
        }),
    }
}

/// Resolves the dynamic-loading functions of the target's libc.
pub fn libc_functions(pid: i32) -> Result<LibcFunctions, InjectError> {
    // Through a live thread when the main one has exited (its maps read empty).
    let dir = crate::process_kind::proc_dir(pid);
    let entries = maps::read_path(&format!("{dir}/maps"))
        .map_err(|error| InjectError::Maps { pid, error })?;
    libc_functions_in(pid, &dir, &entries)
}

/// [`libc_functions`] from maps `entries` already read through `dir` (`/proc/PID` or a
/// live thread's directory), for a caller that needs the maps for more.
pub fn libc_functions_in(
    pid: i32,
    dir: &str,
    entries: &[MapEntry],
) -> Result<LibcFunctions, InjectError> {
    let unsafe_ranges: Vec<(u64, u64)> = entries
        .iter()
        .filter(|e| e.perms.exec && (is_libc(&e.path) || is_ld_so(&e.path)))
        .map(|e| (e.start, e.end))
        .collect();
    let libc_path = mapped_libc(pid, entries)?;
    let libc_base = entries
        .iter()
        .filter(|e| e.path == libc_path)
        .map(|e| e.start)
        .min()
        .unwrap_or(0);
    // An earlier session wrote them into its park page: no need to read libc's file.
    if let Some(f) = agent_thread::remembered_functions(dir, entries, libc_base) {
        crate::timings::count("libc functions remembered in the target");
        return Ok(LibcFunctions { unsafe_ranges, ..f });
    }
    let names = [
        "dlopen",
        "dlsym",
        "dlerror",
        "__libc_dlopen_mode",
        "__libc_dlsym",
        "pthread_create",
        "pthread_detach",
    ];
    let found = exported(dir, entries, &libc_path, &names)?;
    let (dlopen, dlsym, dlerror, mode_extra) = match (found[0], found[1]) {
        (Some(o), Some(s)) => (o, s, found[2], 0),
        _ => match (found[3], found[4]) {
            (Some(o), Some(s)) => (o, s, None, 0x8000_0000),
            _ => {
                return Err(InjectError::NoDlopen {
                    pid,
                    libc: libc_path,
                })
            }
        },
    };
    let (pthread_create, pthread_detach) = match (found[5], found[6]) {
        (Some(c), Some(d)) => (c, d),
        _ => libpthread_functions(pid, dir, entries, &libc_path)?,
    };
    Ok(LibcFunctions {
        dlopen,
        dlsym,
        dlerror,
        mode_extra,
        pthread_create,
        pthread_detach,
        unsafe_ranges,
        libc_base,
    })
}

/// Calls `function(args)` on the agent's parked thread (made first if needed, see
/// [`crate::agent_thread`]); the other threads run too if the call takes longer than
/// [`agent_thread::RELEASE_OTHERS_AFTER`] (a lock one of them holds); then every thread is
/// stopped again.
/// `timeout` caps the whole: starting the thread and the call.
pub fn call_safely(
    proc: &mut Process,
    fns: &LibcFunctions,
    function: u64,
    args: &[u64],
    timeout: Duration,
) -> Result<u64, InjectError> {
    let start = Instant::now();
    let tid = agent_thread::ensure(proc, fns, timeout)?;
    remote_call::ensure_scratch(proc, tid)?;
    let remaining = timeout
        .saturating_sub(start.elapsed())
        .max(Duration::from_secs(1));
    let opts = remote_call::CallOptions {
        timeout: remaining,
        block_signals: true,
        release_others_after: Some(agent_thread::RELEASE_OTHERS_AFTER),
    };
    let r = remote_call::call_with(proc, tid, function, args, opts);
    let stopped = proc.stop_all();
    let v = r?;
    stopped?;
    Ok(v)
}

fn dlerror_text(proc: &mut Process, fns: &LibcFunctions) -> String {
    let Some(f) = fns.dlerror else {
        return "no dlerror in this libc".into();
    };
    match call_safely(proc, fns, f, &[], Duration::from_secs(5)) {
        Ok(0) => "(dlerror returned NULL)".into(),
        Ok(p) => proc
            .read_c_string(p, 4096)
            .unwrap_or_else(|e| format!("(unreadable dlerror text: {e})")),
        Err(e) => format!("(dlerror failed: {e})"),
    }
}

/// [`inject_named`] with the memfd name `tracer-lib`.
pub fn inject(proc: &mut Process, library: &[u8]) -> Result<Injected, InjectError> {
    inject_named(proc, library, "tracer-lib")
}

/// Loads `library` (the bytes of a shared object) into the target; `name` starts the name
/// of its file (or memfd) shown in the target's maps. Leaves every thread stopped.
pub fn inject_named(
    proc: &mut Process,
    library: &[u8],
    name: &str,
) -> Result<Injected, InjectError> {
    inject_with_timeout(proc, library, name, DLOPEN_TIMEOUT)
}

/// [`inject_named`] giving up after `timeout` when the agent's thread cannot be started
/// (see [`crate::agent_thread`]) or `dlopen` does not return.
pub fn inject_with_timeout(
    proc: &mut Process,
    library: &[u8],
    name: &str,
    timeout: Duration,
) -> Result<Injected, InjectError> {
    let fns = libc_functions(proc.pid())?;
    inject_with(proc, &fns, library, name, None, timeout)
}

/// [`inject_with_timeout`] with the target's libc functions already resolved and, when
/// known, the hash of `library` that names its file (see
/// [`library_file::place_hashed`]).
pub fn inject_with(
    proc: &mut Process,
    fns: &LibcFunctions,
    library: &[u8],
    name: &str,
    hash: Option<&str>,
    timeout: Duration,
) -> Result<Injected, InjectError> {
    let pid = proc.pid();
    if !proc.all_stopped() {
        proc.stop_all()?;
    }
    let tid = proc
        .threads()
        .first()
        .copied()
        .ok_or(AttachError::Exited { pid, status: None })?;
    remote_call::ensure_scratch(proc, tid)?;
    let placed = crate::timings::time("  agent file written", || match hash {
        Some(h) => library_file::place_hashed(pid, library, name, h),
        None => library_file::place(pid, library, name),
    });
    if let Ok(placed) = placed {
        let path_addr = remote_call::put_c_string(proc, 0, &placed.path_in_target)?;
        let mode = libc::RTLD_NOW as u64 | fns.mode_extra;
        let handle = crate::timings::time("  dlopen call", || {
            call_safely(proc, fns, fns.dlopen, &[path_addr, mode], timeout)
        })?;
        match handle {
            // Not loadable from there (a `noexec` /tmp, say): try a memfd.
            0 => library_file::discard(&placed),
            handle => return find_loaded(pid, handle, |e| e.path == placed.path_in_target),
        }
    }
    let name_addr = remote_call::put_c_string(proc, 0, name)?;
    let fd = remote_call::syscall_ok(
        proc,
        tid,
        libc::SYS_memfd_create,
        &[name_addr, libc::MFD_CLOEXEC as u64],
    )?;
    let result = load_from_fd(proc, fns, tid, fd, library, timeout);
    // The mapping keeps the file alive; the descriptor is not needed any more.
    let _ = remote_call::syscall(proc, tid, libc::SYS_close, &[fd]);
    let (handle, inode) = result?;
    let injected = find_loaded(pid, handle, |e| {
        e.inode == inode && e.path.contains("memfd:")
    })?;
    name_by_mapping(proc, &injected, &unique_fd_path(fd, inode))
        .map_err(|error| InjectError::Rename { error })?;
    Ok(injected)
}

/// Renames a library loaded from `/proc/self/fd/N` (`loaded_as`) to
/// `/proc/PID/map_files/START-END` of its first mapping.
///
/// The loader keeps the path given to `dlopen` as the library's name, and debuggers and
/// unwinders open it: `/proc/self/fd/N` means another file in every other process (gdb
/// opened its own fd 3, a pipe, and hung) and in the target too once the fd is closed. The
/// `map_files` entry is the memfd itself for as long as the library stays mapped, for
/// whoever may open it (root); for others it opens nothing. `PID` is the target's own,
/// as its PID namespace numbers it. The name is rewritten in place: [`unique_fd_path`]
/// makes the original long enough.
fn name_by_mapping(proc: &Process, injected: &Injected, loaded_as: &str) -> io::Result<()> {
    let pid = proc.pid();
    let first = maps::read_pid(pid)?
        .into_iter()
        .find(|e| e.start == injected.base)
        .ok_or_else(|| io::Error::other("the library's first mapping vanished"))?;
    let name = format!(
        "/proc/{}/map_files/{:x}-{:x}\0",
        own_namespace_pid(pid)?,
        first.start,
        first.end
    );
    // glibc's dlopen handle is its `struct link_map` (<link.h>, the layout debuggers
    // read): `l_addr`, then `l_name`, the loader's own copy of the path.
    let mut l_name = [0u8; 8];
    proc.read_memory(injected.handle + 8, &mut l_name)?;
    let l_name = u64::from_le_bytes(l_name);
    if proc.read_c_string(l_name, loaded_as.len() + 1)? != loaded_as {
        return Err(io::Error::other(format!(
            "the loader's name for the library is not {loaded_as:?}: unknown link_map layout"
        )));
    }
    if name.len() > loaded_as.len() + 1 {
        return Err(io::Error::other(format!(
            "{name:?} does not fit in place of {loaded_as:?}"
        )));
    }
    proc.write_memory(l_name, name.as_bytes())
}

/// `pid` as the process's own (innermost) PID namespace numbers it: the last `NSpid`.
fn own_namespace_pid(pid: i32) -> io::Result<String> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|ids| ids.split_whitespace().last())
        .map_or_else(|| pid.to_string(), str::to_string))
}

/// The library just loaded with `handle`, found in the maps by `is_mine`.
fn find_loaded(
    pid: i32,
    handle: u64,
    is_mine: impl Fn(&MapEntry) -> bool,
) -> Result<Injected, InjectError> {
    let entries = maps::read_pid(pid).map_err(|error| InjectError::Maps { pid, error })?;
    let mine: Vec<&MapEntry> = entries.iter().filter(|e| is_mine(e)).collect();
    let base = mine
        .iter()
        .map(|e| e.start)
        .min()
        .ok_or(InjectError::NotMapped { pid })?;
    Ok(Injected {
        handle,
        path_in_target: mine[0].path.clone(),
        base,
        inode: mine[0].inode,
    })
}

fn load_from_fd(
    proc: &mut Process,
    fns: &LibcFunctions,
    tid: i32,
    fd: u64,
    library: &[u8],
    timeout: Duration,
) -> Result<(u64, u64), InjectError> {
    let pid = proc.pid();
    let fd_path = format!("/proc/{pid}/fd/{fd}");
    let inode = match fs::OpenOptions::new().write(true).open(&fd_path) {
        Ok(mut f) => {
            f.write_all(library)
                .map_err(|error| InjectError::Transfer { error })?;
            f.metadata()
                .map_err(|error| InjectError::Transfer { error })?
                .ino()
        }
        Err(_) => {
            // Opening another process's fd can be refused (e.g. by an LSM): let the target
            // write the bytes itself, one scratch-sized chunk at a time.
            let chunk_len = proc.scratch().map(|s| s.data_len as usize).unwrap_or(4096);
            for chunk in library.chunks(chunk_len) {
                let addr = remote_call::put_data(proc, 0, chunk)?;
                let mut done = 0u64;
                while done < chunk.len() as u64 {
                    done += remote_call::syscall_ok(
                        proc,
                        tid,
                        libc::SYS_write,
                        &[fd, addr + done, chunk.len() as u64 - done],
                    )?;
                }
            }
            fs::metadata(&fd_path)
                .map_err(|error| InjectError::Transfer { error })?
                .ino()
        }
    };
    let path_addr = remote_call::put_c_string(proc, 0, &unique_fd_path(fd, inode))?;
    let mode = libc::RTLD_NOW as u64 | fns.mode_extra;
    let handle = call_safely(proc, fns, fns.dlopen, &[path_addr, mode], timeout)?;
    if handle == 0 {
        return Err(InjectError::DlopenFailed {
            message: dlerror_text(proc, fns),
        });
    }
    Ok((handle, inode))
}

/// Shortest [`unique_fd_path`]: room for the longest name [`name_by_mapping`] writes
/// over it (`/proc/` + 7-digit PID + `/map_files/` + two 16-digit addresses + NUL, 58 bytes).
const FD_PATH_MIN_LEN: usize = 64;

/// `/proc/self/fd/FD` spelled uniquely for the memfd's inode, at least
/// [`FD_PATH_MIN_LEN`] bytes long.
///
/// glibc's dlopen first compares the *name* with the names of loaded objects: a second
/// injection through a reused fd number would silently return the first library's handle.
/// Inserting `./` and empty components that encode the inode (each decimal digit `d` as
/// `d + 1` times `./`, digits separated by an empty component) makes the name unique while
/// the kernel still resolves it to the same fd. `./` components before `fd` pad it to
/// the minimum length without touching that code.
pub fn unique_fd_path(fd: u64, inode: u64) -> String {
    let mut code = String::new();
    for d in inode.to_string().bytes() {
        for _ in 0..=(d - b'0') {
            code.push_str("./");
        }
        code.push('/');
    }
    code.push_str(&fd.to_string());
    let mut p = String::from("/proc/self/");
    while p.len() + "fd/".len() + code.len() < FD_PATH_MIN_LEN {
        p.push_str("./");
    }
    p.push_str("fd/");
    p.push_str(&code);
    p
}

/// Looks `name` up in an injected library with the target's `dlsym`.
pub fn dlsym(proc: &mut Process, handle: u64, name: &str) -> Result<u64, InjectError> {
    let fns = libc_functions(proc.pid())?;
    dlsym_with(proc, &fns, handle, name)
}

/// [`dlsym`] with already resolved libc functions.
pub fn dlsym_with(
    proc: &mut Process,
    fns: &LibcFunctions,
    handle: u64,
    name: &str,
) -> Result<u64, InjectError> {
    if !proc.all_stopped() {
        proc.stop_all()?;
    }
    let tid = proc.threads().first().copied().ok_or(AttachError::Exited {
        pid: proc.pid(),
        status: None,
    })?;
    remote_call::ensure_scratch(proc, tid)?;
    let addr = remote_call::put_c_string(proc, 0, name)?;
    let v = call_safely(proc, fns, fns.dlsym, &[handle, addr], DLOPEN_TIMEOUT)?;
    if v == 0 {
        return Err(InjectError::SymbolNotFound {
            name: name.into(),
            message: dlerror_text(proc, fns),
        });
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fd_paths_are_unique_per_inode_and_long_enough() {
        let paths = [
            unique_fd_path(3, 7),
            unique_fd_path(3, 70),
            unique_fd_path(3, 16),
            unique_fd_path(4, 7),
            unique_fd_path(1023, u64::MAX),
        ];
        for (i, p) in paths.iter().enumerate() {
            assert!(p.len() >= FD_PATH_MIN_LEN, "{p}");
            assert!(!paths[..i].contains(p), "{p} twice");
        }
        // Still the same descriptor for the kernel, padded or not.
        let f = fs::File::open("/proc/self/status").unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&f) as u64;
        let direct = fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
        for inode in [7, u64::MAX] {
            assert_eq!(fs::read_link(unique_fd_path(fd, inode)).unwrap(), direct);
        }
        let longest = format!("/proc/4194304/map_files/{:x}-{:x}\0", u64::MAX, u64::MAX);
        assert!(longest.len() <= FD_PATH_MIN_LEN);
    }
}

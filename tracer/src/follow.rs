//! `tracer run --follow`: probes in every process the command starts, without ptrace while
//! they run.
//!
//! The launched program is told (a remote call into its agent, before `main`) to put the
//! agent's file first in `LD_PRELOAD` and to name a rendezvous, an abstract unix socket
//! this module listens on, in `TRACER_FOLLOW`; see `agent::follow` for the other side.
//! A thread of the tracer serves the rendezvous:
//!
//! - "exec": a new program image waits in the agent's constructor; the thread seizes it,
//!   resolves the specs against its modules (a spec that matches nothing there is skipped),
//!   installs through the ordinary session (the agent is already loaded), detaches, and
//!   answers "go". The program then runs untraced to `main`.
//! - "fork": a forked child took counters of its own and sends their memfd; it is
//!   reported with the probes of the process it was forked from (the region it copied,
//!   named by inode).
//!
//! When the launched program ends, the thread stops: connections still queued are
//! answered (forks recorded, new images let go untraced), and every followed process still
//! running has its probes taken out (seize, restore, detach) and is reported as running.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use probes::abi::remote::{FOLLOW_EXEC, FOLLOW_FORK, FOLLOW_GO, FOLLOW_SYMBOL};

use crate::agent_blob::agent_so;
use crate::detached::{self, PidFd};
use crate::inject;
use crate::library_file;
use crate::session::{self, ProbeReport, Session, SessionError};
use crate::spec::{self, ResolvedProbe};
use crate::symbols::{ProcessModules, SymbolCache};
use crate::threads::{self, Process};

/// What every followed process gets.
#[derive(Clone, Debug)]
pub struct Options {
    pub specs: Vec<String>,
    pub exit: bool,
}

/// How a process came to be reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The command tracer launched.
    Launched,
    /// A new program image (the pid may be one seen before: exec keeps it).
    Exec,
    /// A forked child of `parent`, until it execs.
    Fork { parent: i32 },
}

enum Probes {
    /// Probes installed in this image.
    Own(Session),
    /// A forked child: the probes of entry `template` (a copy of its code), counted in
    /// the child's own region.
    Copy { template: usize, region: File },
    /// Nothing installed; [`Entry::note`] says why.
    None,
}

/// One process image reported.
pub struct Entry {
    pub pid: i32,
    pub comm: String,
    pub origin: Origin,
    probes: Probes,
    pidfd: Option<PidFd>,
    /// Something to know about this process (why it has no probes, ...).
    pub note: Option<String>,
    /// Still running when the launched program ended (its probes were taken out).
    pub still_running: bool,
}

/// Every process image followed, in the order tracer learned of them.
#[derive(Default)]
pub struct Registry {
    pub entries: Vec<Entry>,
}

impl Registry {
    /// The session whose probes entry `i` holds: its own, or its template's.
    pub fn session(&self, i: usize) -> Option<&Session> {
        match &self.entries[i].probes {
            Probes::Own(s) => Some(s),
            Probes::Copy { template, .. } => self.session(*template),
            Probes::None => None,
        }
    }

    /// The counts of entry `i` (None: nothing installed there).
    pub fn report(&self, i: usize) -> Option<Result<Vec<ProbeReport>, SessionError>> {
        match &self.entries[i].probes {
            Probes::Own(s) => Some(Ok(s.report())),
            Probes::Copy { template, region } => {
                let s = self.session(*template)?;
                Some(s.report_from(region))
            }
            Probes::None => None,
        }
    }

    /// Whether the launched program's own pid exec'd and checked in.
    pub fn exec_of(&self, pid: i32) -> bool {
        self.entries
            .iter()
            .any(|e| e.pid == pid && e.origin == Origin::Exec)
    }

    fn region_inode(&self, i: usize) -> Option<u64> {
        match &self.entries[i].probes {
            Probes::Own(s) => Some(s.counters_inode()),
            Probes::Copy { region, .. } => region.metadata().ok().map(|m| m.ino()),
            Probes::None => None,
        }
    }
}

/// The rendezvous and the thread serving it.
pub struct Follower {
    registry: Arc<Mutex<Registry>>,
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

/// Why following the command's children could not start; the program is left as it was.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("{what} failed: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("the agent has no file children could preload: {0}")]
    NoAgentFile(#[source] std::io::Error),
    #[error("the agent is not loaded")]
    AgentNotLoaded,
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error(transparent)]
    Inject(#[from] inject::InjectError),
    #[error("the agent refused to follow")]
    Refused,
    #[error("cannot start the follow thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a followed image got no probes.
#[derive(Debug, thiserror::Error)]
enum NotProbed {
    #[error("not probed: {0}")]
    Attach(#[from] threads::AttachError),
    #[error("not probed: {0}")]
    Symbols(#[from] crate::symbols::SymbolError),
    #[error("no spec matches a function of this program")]
    NoMatch,
    #[error("not probed: {0}")]
    Install(#[from] SessionError),
    #[error("cannot let it go: {0}")]
    Detach(#[source] threads::AttachError),
}

/// Why a followed process still running at the end kept some of its probes.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    #[error("its probes stay in place: {0}")]
    Attach(#[source] threads::AttachError),
    #[error("its probes could not all be taken out: {0}")]
    Restore(#[source] SessionError),
}

fn os_err(what: &'static str) -> FollowError {
    FollowError::Os {
        what,
        source: std::io::Error::last_os_error(),
    }
}

/// A listening abstract unix socket named `name`.
fn listen(name: &str) -> Result<OwnedFd, FollowError> {
    // SAFETY: socket with constant arguments.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_err("socket"));
    }
    // SAFETY: a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as u16;
    for (d, s) in addr.sun_path[1..].iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let len = (size_of::<u16>() + 1 + name.len()) as libc::socklen_t;
    // SAFETY: a valid sockaddr_un of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const addr).cast(), len) } != 0 {
        return Err(os_err("bind"));
    }
    // SAFETY: listen on our socket; a deep backlog, since forks connect without waiting.
    if unsafe { libc::listen(fd.as_raw_fd(), 4096) } != 0 {
        return Err(os_err("listen"));
    }
    Ok(fd)
}

/// Every forked child's counters stay open until the report (two descriptors per
/// process): a command that forks thousands of times would pass the usual soft limit of
/// 1,024, so take the hard one.
fn raise_fd_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: get and set our own limit through a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd), FollowError> {
    let mut fds = [0i32; 2];
    // SAFETY: fds has room for two descriptors.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os_err("pipe2"));
    }
    // SAFETY: two new descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

impl Follower {
    /// Starts following from `proc`, the launched program, stopped with its probes
    /// installed (`top`): opens the rendezvous, and has the program pass the agent and the
    /// rendezvous on to what it execs. On error nothing is changed in the program.
    pub fn start(
        proc: &mut Process,
        top: Session,
        opts: Options,
    ) -> Result<Follower, Box<(Session, FollowError)>> {
        match Self::open(proc, opts) {
            Ok((f, registry_entry)) => {
                let pid = proc.pid();
                f.registry.lock().expect("registry").entries.push(Entry {
                    pid,
                    comm: registry_entry,
                    origin: Origin::Launched,
                    probes: Probes::Own(top),
                    pidfd: None,
                    note: None,
                    still_running: false,
                });
                Ok(f)
            }
            Err(e) => Err(Box::new((top, e))),
        }
    }

    fn open(proc: &mut Process, opts: Options) -> Result<(Follower, String), FollowError> {
        let pid = proc.pid();
        // LD_PRELOAD needs a file: a memfd (a noexec /tmp) cannot be passed on.
        let placed = library_file::place(pid, agent_so(), library_file::AGENT_NAME)
            .map_err(FollowError::NoAgentFile)?;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("tracer-follow-{}-{nanos:x}", std::process::id());
        let listener = listen(&name)?;
        let base = session::loaded_agent(pid).ok_or(FollowError::AgentNotLoaded)?;
        let function = base + session::agent_symbol(FOLLOW_SYMBOL)?;
        let fns = inject::libc_functions(pid)?;
        let mut input = name.as_bytes().to_vec();
        input.push(0);
        input.extend_from_slice(placed.path_in_target.as_bytes());
        input.push(0);
        let (ok, _) =
            session::call_with_buffers(proc, &fns, function, &input, input.len() as u64, 0)?;
        if ok != 1 {
            return Err(FollowError::Refused);
        }
        raise_fd_limit();
        let (stop_r, stop_w) = pipe()?;
        let registry = Arc::new(Mutex::new(Registry::default()));
        let shared = Arc::clone(&registry);
        let thread = std::thread::Builder::new()
            .name("follow".into())
            .spawn(move || serve(listener, stop_r, shared, opts))
            .map_err(FollowError::Thread)?;
        let comm = detached::comm(pid).unwrap_or_default();
        Ok((
            Follower {
                registry,
                stop: stop_w,
                thread: Some(thread),
            },
            comm,
        ))
    }

    /// Stops serving (queued check-ins are answered), takes the probes out of every
    /// followed process still running, and returns what was followed.
    pub fn finish(mut self) -> Registry {
        // SAFETY: one byte to our own pipe.
        unsafe { libc::write(self.stop.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut reg = std::mem::take(&mut *self.registry.lock().unwrap_or_else(|p| p.into_inner()));
        remove_from_running(&mut reg);
        reg
    }
}

/// The thread serving the rendezvous until `stop` is readable, then draining it.
fn serve(listener: OwnedFd, stop: OwnedFd, registry: Arc<Mutex<Registry>>, opts: Options) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            break;
        }
        match accept(&listener, false) {
            Some(conn) => handle(conn, &registry, Some(&opts)),
            // Out of descriptors, say: a check-in left queued is retried, not spun on.
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // The launched program ended: what is queued is answered without new installs.
    while let Some(conn) = accept(&listener, true) {
        handle(conn, &registry, None);
    }
}

fn accept(listener: &OwnedFd, nonblocking: bool) -> Option<OwnedFd> {
    if nonblocking {
        // SAFETY: fcntl on our own socket.
        unsafe {
            let fl = libc::fcntl(listener.as_raw_fd(), libc::F_GETFL);
            libc::fcntl(listener.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
    }
    // SAFETY: accept4 on our listening socket, no address wanted.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    // SAFETY: a new descriptor we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The peer's pid, as the kernel saw it connect (in our pid namespace).
fn peer_pid(conn: &OwnedFd) -> Option<i32> {
    // SAFETY: ucred is plain data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt into a local of the size given.
    let r = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid)
}

/// Reads one message (waiting at most [`MESSAGE_WAIT`]), with the descriptor it carries if any.
fn receive(conn: &OwnedFd) -> Option<(Vec<u8>, Option<File>)> {
    let tv = libc::timeval {
        tv_sec: MESSAGE_WAIT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt with a local timeval.
    unsafe {
        libc::setsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    let mut buf = [0u8; 64];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr().cast();
    hdr.msg_controllen = size_of_val(&control);
    // SAFETY: `hdr` describes local buffers.
    let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n <= 0 {
        return None;
    }
    let mut file = None;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let fd = (libc::CMSG_DATA(c) as *const i32).read_unaligned();
                file = Some(File::from_raw_fd(fd));
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    Some((buf[..n as usize].to_vec(), file))
}

/// One check-in. `opts` None: the launched program has ended, install nothing.
fn handle(conn: OwnedFd, registry: &Mutex<Registry>, opts: Option<&Options>) {
    let Some(pid) = peer_pid(&conn) else { return };
    let Some((msg, file)) = receive(&conn) else {
        return;
    };
    if msg.starts_with(FOLLOW_EXEC) {
        exec_checked_in(&conn, pid, registry, opts);
    } else if msg.starts_with(FOLLOW_FORK) {
        let (Some(region), Some(inode)) = (file, parse_inode(&msg)) else {
            return;
        };
        fork_checked_in(pid, region, inode, registry);
    }
}

/// A program image that checked in after exec: probe it (while it waits for the go),
/// then let it go.
fn exec_checked_in(conn: &OwnedFd, pid: i32, registry: &Mutex<Registry>, opts: Option<&Options>) {
    let comm = detached::comm(pid).unwrap_or_default();
    let pidfd = PidFd::open(pid).ok();
    let (probes, mut note) = match opts {
        Some(o) => {
            match crate::timings::time("followed images (check-in to go)", || install(pid, o)) {
                Ok(s) => (Probes::Own(s), None),
                Err(e) => (Probes::None, Some(e.to_string())),
            }
        }
        None => (
            Probes::None,
            Some("started as the command ended: not probed".into()),
        ),
    };
    // SAFETY: send on our connection; MSG_NOSIGNAL: a peer gone is no signal to us.
    let sent = unsafe {
        libc::send(
            conn.as_raw_fd(),
            FOLLOW_GO.as_ptr().cast(),
            FOLLOW_GO.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if sent < 0 && matches!(probes, Probes::Own(_)) {
        note = Some(format!(
            "it stopped waiting before its probes were in (after {} ms): the counts miss its start",
            probes::abi::remote::FOLLOW_WAIT_MS
        ));
    }
    registry.lock().expect("registry").entries.push(Entry {
        pid,
        comm,
        origin: Origin::Exec,
        probes,
        pidfd,
        note,
        still_running: false,
    });
}

/// A forked child that checked in with its copy of its parent's counters (`region`, the
/// memfd whose inode the parent's counters had).
fn fork_checked_in(pid: i32, region: File, inode: u64, registry: &Mutex<Registry>) {
    let mut reg = registry.lock().expect("registry");
    let Some(template) = (0..reg.entries.len())
        .rev()
        .find(|&i| reg.region_inode(i) == Some(inode))
    else {
        return;
    };
    let parent = reg.entries[template].pid;
    // The parent's: by now the child may have exec'd another program.
    let comm = reg.entries[template].comm.clone();
    reg.entries.push(Entry {
        pid,
        comm,
        origin: Origin::Fork { parent },
        probes: Probes::Copy { template, region },
        pidfd: PidFd::open(pid).ok(),
        note: None,
        still_running: false,
    });
}

fn parse_inode(msg: &[u8]) -> Option<u64> {
    std::str::from_utf8(&msg[FOLLOW_FORK.len()..])
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every spec that matches something in this image; a spec for another program's
/// functions (`main:work`) matches nothing here, which is no error.
fn resolve(specs: &[String], modules: &ProcessModules) -> Vec<ResolvedProbe> {
    let mut seen = std::collections::HashSet::new();
    specs
        .iter()
        .filter_map(|s| spec::resolve_str(s, modules).ok())
        .flatten()
        .filter(|p| seen.insert(p.address))
        .collect()
}

/// Seizes `pid` (waiting in the agent's constructor), installs the probes, detaches.
fn install(pid: i32, opts: &Options) -> Result<Session, NotProbed> {
    let mut proc = threads::attach(pid)?;
    let modules = SymbolCache::global().process(pid)?;
    let probes = resolve(&opts.specs, &modules);
    if probes.is_empty() {
        let _ = proc.detach();
        return Err(NotProbed::NoMatch);
    }
    let r = Session::install(&mut proc, &modules, &probes, opts.exit, None, false);
    let detached = proc.detach();
    let s = r?;
    detached.map_err(NotProbed::Detach)?;
    Ok(s)
}

/// Takes the probes out of every followed process still running (its last image: an exec
/// replaced the code the earlier ones patched) and marks it.
fn remove_from_running(reg: &mut Registry) {
    let mut done = std::collections::HashSet::new();
    for i in (0..reg.entries.len()).rev() {
        let e = &reg.entries[i];
        if e.origin == Origin::Launched || !done.insert(e.pid) {
            continue;
        }
        let running = e.pidfd.as_ref().is_some_and(|p| !p.ended().unwrap_or(true));
        if !running {
            continue;
        }
        let pid = e.pid;
        let r = match reg.session(i) {
            None => Ok(()),
            Some(s) => restore(pid, s),
        };
        let e = &mut reg.entries[i];
        e.still_running = true;
        if let Err(why) = r {
            e.note = Some(why.to_string());
        }
    }
}

fn restore(pid: i32, session: &Session) -> Result<(), RestoreError> {
    let mut proc = match threads::attach(pid) {
        Ok(p) => p,
        // Ended meanwhile: nothing to take out.
        Err(_) if !std::path::Path::new(&format!("/proc/{pid}")).exists() => return Ok(()),
        Err(e) => return Err(RestoreError::Attach(e)),
    };
    let r = session.restore_in(&mut proc);
    let _ = proc.detach();
    r.map(|_| ()).map_err(RestoreError::Restore)
}

/// How long the rendezvous waits for a check-in's message.
pub const MESSAGE_WAIT: Duration = Duration::from_secs(1);

/// Renders one process's probe reports as `tracer run` does without following: a table,
/// or JSON lines (then with `"pid"` and `"comm"` when given).
pub type Table<'a> = dyn Fn(&[ProbeReport], &Session, Option<(i32, &str)>) -> String + 'a;

/// The report of every process followed: with one process, as without following; else a
/// `process PID COMM (how)` line before each process's table, or with `json` the
/// process's `"pid"`, `"comm"`, `"origin"` (`launched`, `exec`, `fork`, with `"parent"`)
/// in each of its objects, and one object with `"note"` for a process with something to
/// say (no probes, still running, ...).
pub fn render(reg: &Registry, json: bool, table: &Table<'_>) -> String {
    let mut text = String::new();
    for (i, e) in reg.entries.iter().enumerate() {
        let report = reg.report(i);
        let mut notes: Vec<String> = Vec::new();
        if e.still_running {
            notes.push("still running when the command ended; its probes were taken out".into());
        }
        notes.extend(e.note.clone());
        if let Some(Err(why)) = &report {
            notes.push(format!("counts unreadable: {why}"));
        }
        let probes = match (&report, reg.session(i)) {
            (Some(Ok(r)), Some(s)) => Some((r.as_slice(), s)),
            _ => None,
        };
        if json {
            text.push_str(&json_lines(e, &notes, probes, table));
            continue;
        }
        if reg.entries.len() > 1 {
            let how = match e.origin {
                Origin::Launched => "the command".to_string(),
                Origin::Exec => "exec".to_string(),
                Origin::Fork { parent } => format!("fork of {parent}"),
            };
            text.push_str(&format!("process {} {} ({how})", e.pid, e.comm));
            if !notes.is_empty() {
                text.push_str(&format!(": {}", notes.join("; ")));
            }
            text.push('\n');
        }
        if let Some((r, s)) = probes {
            text.push_str(&table(r, s, None));
        }
    }
    text
}

/// One process's JSON lines: its probes' objects with the process's fields added, after
/// one object with its notes if it has any (or no probes).
fn json_lines(
    e: &Entry,
    notes: &[String],
    probes: Option<(&[ProbeReport], &Session)>,
    table: &Table<'_>,
) -> String {
    let mut head = serde_json::json!({ "pid": e.pid, "comm": e.comm });
    head["origin"] = match e.origin {
        Origin::Launched => "launched",
        Origin::Exec => "exec",
        Origin::Fork { .. } => "fork",
    }
    .into();
    if let Origin::Fork { parent } = e.origin {
        head["parent"] = parent.into();
    }
    if e.still_running {
        head["running"] = true.into();
    }
    let lines = probes.map_or(String::new(), |(r, s)| table(r, s, Some((e.pid, &e.comm))));
    let mut text = String::new();
    if lines.is_empty() || !notes.is_empty() {
        let mut v = head.clone();
        v["note"] = notes.join("; ").into();
        text.push_str(&v.to_string());
        text.push('\n');
    }
    for l in lines.lines() {
        let mut v: serde_json::Value = serde_json::from_str(l).expect("the table's own JSON");
        for (k, x) in head.as_object().expect("an object") {
            v[k] = x.clone();
        }
        text.push_str(&v.to_string());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::parse_inode;

    #[test]
    fn fork_messages_name_the_region_they_copied() {
        assert_eq!(parse_inode(b"fork 123456"), Some(123456));
        assert_eq!(parse_inode(b"fork "), None);
        assert_eq!(parse_inode(b"fork x1"), None);
    }
}

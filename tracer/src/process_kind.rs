//! Processes that exist but have no program to probe: kernel threads and zombies. Told
//! apart from a PID that does not exist, so that the user learns what the PID is.

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

/// The parts of `/proc/PID/stat` that say what a PID is.
#[derive(Debug, PartialEq, Eq)]
struct Stat {
    comm: String,
    state: char,
    ppid: i32,
    flags: u64,
}

/// Parse `/proc/PID/stat`. `comm` may hold spaces and parentheses, so the fields after
/// it are found from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    let mut rest = text.get(close + 1..)?.split_whitespace();
    let state = rest.next()?.chars().next()?;
    let ppid = rest.next()?.parse().ok()?;
    // pgrp, session, tty_nr, tpgid, then flags.
    let flags = rest.nth(4)?.parse().ok()?;
    Some(Stat {
        comm,
        state,
        ppid,
        flags,
    })
}

/// The state letter of a `stat` file's text (`R`, `S`, `t`, `T`, `Z`, ...).
pub(crate) fn stat_state(text: &str) -> Option<char> {
    parse_stat(text).map(|s| s.state)
}

/// Why `pid` cannot be probed although it exists, as one sentence; `None` for a process
/// running a program (or a PID that does not exist: the caller says that).
pub fn not_a_program(pid: i32) -> Option<String> {
    let text = crate::proc_text::read(format!("/proc/{pid}/stat")).ok()?;
    let stat = parse_stat(&text)?;
    // A main thread that called pthread_exit shows as a zombie while the other threads
    // of its process still run the program.
    if matches!(stat.state, 'Z' | 'X') && has_live_thread(pid) {
        return None;
    }
    describe(pid, &stat)
}

/// Why `pid` cannot be attached to now although it runs a program: it is stopped by a
/// job-control signal (SIGSTOP, SIGTSTP, ...). Its threads would have to run the remote
/// calls that load the agent and start its thread, which a stopped process does not do
/// until it is continued; so it is refused at once, untouched, instead of after a timeout.
pub fn stopped(pid: i32) -> Option<String> {
    let text = crate::proc_text::read(format!("/proc/{pid}/stat")).ok()?;
    let stat = parse_stat(&text)?;
    (stat.state == 'T').then(|| {
        format!(
            "PID {pid} ({}) is stopped (SIGSTOP, or Ctrl-Z in its shell), so it cannot run the calls that put the probes in: continue it with `kill -CONT {pid}`, then attach",
            stat.comm
        )
    })
}

/// Whether a thread of `pid` has not exited.
fn has_live_thread(pid: i32) -> bool {
    live_task(pid).is_some()
}

/// The `/proc/PID/task/TID` directory of a thread of `pid` that has not exited.
fn live_task(pid: i32) -> Option<std::path::PathBuf> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.filter_map(Result::ok).map(|t| t.path()).find(|t| {
        crate::proc_text::read(t.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
            .is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
    })
}

/// The `/proc` directory to read a process's memory, maps and files through:
/// `/proc/PID`, or when its main thread has exited (`pthread_exit`; its maps then read
/// empty and its `mem` and `exe` fail) that of a thread still running.
pub fn proc_dir(pid: i32) -> String {
    let leader = format!("/proc/{pid}");
    let exited = crate::proc_text::read(format!("{leader}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|s| matches!(s.state, 'Z' | 'X'));
    if exited {
        if let Some(t) = live_task(pid) {
            return t.to_string_lossy().into_owned();
        }
    }
    leader
}

fn describe(pid: i32, s: &Stat) -> Option<String> {
    if s.flags & PF_KTHREAD != 0 {
        return Some(format!(
            "PID {pid} ({}) is a kernel thread: it runs no user-space program, so there is nothing to probe",
            s.comm
        ));
    }
    match s.state {
        'Z' => Some(format!(
            "PID {pid} ({}) is a zombie: it has exited and waits for its parent (PID {}) to reap it; nothing is left to probe",
            s.comm, s.ppid
        )),
        'X' => Some(format!(
            "PID {pid} ({}) has exited: nothing is left to probe",
            s.comm
        )),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let s = parse_stat("77 (a) b (c)) Z 12 77 77 0 -1 4194560 0 0").unwrap();
        assert_eq!(
            s,
            Stat {
                comm: "a) b (c)".into(),
                state: 'Z',
                ppid: 12,
                flags: 4194560
            }
        );
        assert!(describe(77, &s).unwrap().contains("zombie"));
        let k = parse_stat("2 (kthreadd) S 0 0 0 0 -1 2129984 0 0").unwrap();
        assert!(describe(2, &k).unwrap().contains("kernel thread"));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn a_stopped_process_is_told_to_be_continued() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("sleep");
        let pid = child.id() as i32;
        assert_eq!(stopped(pid), None);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut said = None;
        while said.is_none() && std::time::Instant::now() < deadline {
            said = stopped(pid);
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = child.kill();
        let _ = child.wait();
        let said = said.expect("the stopped state seen");
        assert!(said.contains(&format!("kill -CONT {pid}")), "{said}");
    }

    #[test]
    fn a_running_process_is_a_program() {
        assert_eq!(not_a_program(std::process::id() as i32), None);
    }
}

//! Opening the agent's memory in a target: its counters, pack, trace and latency
//! regions are memfds the agent maps, named `/memfd:tracer-...`, and tells the tracer
//! their descriptor numbers.
//!
//! A number alone proves nothing: the program may have closed the agent's descriptor
//! (`closefrom(3)`, a close loop) and opened a file of its own under that number. So a
//! region is opened through `/proc/PID/fd/N` only when that descriptor's file is one the
//! target has mapped under the expected memfd name (same device and inode as a line of
//! `/proc/PID/maps`). Otherwise, when exactly one file of that name is mapped, it is
//! opened through `/proc/PID/map_files/START-END` of its mapping, which is certainly the
//! agent's file (that needs `CAP_SYS_ADMIN` or `CAP_CHECKPOINT_RESTORE`); failing both,
//! one clear error, and the program's file is never opened for writing or mapped.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;

/// A mapping of a file in the target: its range, device (major, minor) and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mapped {
    start: u64,
    end: u64,
    dev: (u32, u32),
    ino: u64,
}

/// The mappings in `maps` text (`/proc/PID/maps`) of files whose path starts with
/// `/memfd:NAME`.
fn mapped_memfds(maps: &str, name: &str) -> Vec<Mapped> {
    let prefix = format!("/memfd:{name}");
    maps.lines()
        .filter_map(|line| {
            let mut f = line.split_ascii_whitespace();
            let range = f.next()?;
            let (_perms, _offset, dev, ino) = (f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.next()?;
            // `/memfd:tracer-pack (deleted)`: the name, then a space or the end.
            let rest = path.strip_prefix(&prefix)?;
            if !rest.is_empty() {
                return None;
            }
            let (start, end) = range.split_once('-')?;
            let (major, minor) = dev.split_once(':')?;
            Some(Mapped {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                dev: (
                    u32::from_str_radix(major, 16).ok()?,
                    u32::from_str_radix(minor, 16).ok()?,
                ),
                ino: ino.parse().ok()?,
            })
        })
        .collect()
}

fn same_file(meta: &std::fs::Metadata, m: &Mapped) -> bool {
    let dev = meta.dev();
    meta.ino() == m.ino && (libc::major(dev), libc::minor(dev)) == m.dev
}

/// Open the agent's memfd named `name` (`tracer-shared`, `tracer-pack`, ...) that the
/// agent in `pid` keeps as descriptor `fd`, read-only or read-write, making sure it is
/// the agent's file (see the module documentation).
pub fn open(pid: i32, fd: i32, name: &str, write: bool) -> io::Result<File> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mapped = mapped_memfds(&maps, name);
    let opts = {
        let mut o = OpenOptions::new();
        o.read(true).write(write);
        o
    };
    let by_number = format!("/proc/{pid}/fd/{fd}");
    let now = match opts.open(&by_number) {
        Ok(f) => {
            let meta = f.metadata()?;
            if mapped.iter().any(|m| same_file(&meta, m)) {
                return Ok(f);
            }
            std::fs::read_link(&by_number)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "another file".into())
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => "closed".into(),
        Err(e) => return Err(e),
    };
    // The descriptor is not the agent's any more: its mapping, when it is the only one.
    let mut inodes: Vec<(u32, u32, u64)> =
        mapped.iter().map(|m| (m.dev.0, m.dev.1, m.ino)).collect();
    inodes.sort_unstable();
    inodes.dedup();
    if let ([m, ..], 1) = (mapped.as_slice(), inodes.len()) {
        let path = format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end);
        if let Ok(f) = opts.open(&path) {
            if f.metadata().is_ok_and(|meta| same_file(&meta, m)) {
                return Ok(f);
            }
        }
    }
    Err(io::Error::other(format!(
        "the target closed or reused the tracer agent's descriptor {fd} for its {name} memory (now: {now})"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_memfd_mappings_by_name() {
        let maps = "\
7f0000000000-7f0000010000 r-xp 00000000 00:01 99 /memfd:tracer-code (deleted)
7f0000020000-7f0000030000 rw-s 00000000 00:01 100 /memfd:tracer-shared (deleted)
7f0000040000-7f0000050000 rw-s 00000000 00:01 101 /memfd:tracer-shared-other (deleted)
7f0000060000-7f0000070000 rw-s 00000000 fd:01 102 /tmp/memfd:tracer-shared
";
        assert_eq!(
            mapped_memfds(maps, "tracer-shared"),
            vec![Mapped {
                start: 0x7f0000020000,
                end: 0x7f0000030000,
                dev: (0, 1),
                ino: 100
            }]
        );
    }

    #[test]
    fn refuses_a_descriptor_that_is_not_the_agents() {
        // This process has no tracer-shared memfd mapped: descriptor 0 is not one.
        let e = open(std::process::id() as i32, 0, "tracer-shared", false).unwrap_err();
        assert!(
            e.to_string()
                .contains("closed or reused the tracer agent's descriptor 0"),
            "{e}"
        );
    }
}

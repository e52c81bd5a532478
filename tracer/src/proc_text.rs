//! Text files of `/proc` read in as few `read` calls as they take. Their size reads as 0,
//! so `fs::read_to_string` starts with a 32-byte read and doubles: six reads for a
//! 300-byte `stat`, nine for the maps of a small program, each a round of the kernel's
//! file generator (for maps, the mmap lock and a VMA walk), plus a `statx` and an `lseek`.
//! Here: one read for a page or less, then one that returns 0.
//!
//! The attach path reads its few fields (a thread's state letter, `TracerPid`, the task
//! list, maps) through here rather than through `procfs`, which the rest of the tracer
//! uses: `procfs` reads the same files with `read_to_string`, parses every field of
//! `status` for one, reads the kernel version on first use and opens each thread's
//! directory when listing tasks, all of it paid on every attach (a later attach made
//! 344 system calls with it, 274 without; `bench/attach.md`).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

/// First buffer: a `stat` or `status` file, or the maps of a small program, in one read.
const FIRST_READ: usize = 8192;

/// The whole text of the `/proc` file at `path`.
pub fn read(path: impl AsRef<Path>) -> io::Result<String> {
    String::from_utf8(read_bytes(path)?).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

/// The whole content of the `/proc` file at `path` (`cmdline` need not be UTF-8).
pub fn read_bytes(path: impl AsRef<Path>) -> io::Result<Vec<u8>> {
    let mut f = File::open(path)?;
    let mut buf = vec![0u8; FIRST_READ];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize(2 * len, 0);
        }
        match f.read(&mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(len);
    Ok(buf)
}

/// The thread ids listed in `/proc/PID/task`, sorted: one directory listing, without
/// opening each thread's directory.
pub fn tasks(pid: i32) -> io::Result<Vec<i32>> {
    let mut v: Vec<i32> = std::fs::read_dir(format!("/proc/{pid}/task"))?
        // A thread that exits while the listing is read is simply not listed.
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

/// The value of the `key:` line of a `status` file (`TracerPid`, `State`, ...).
pub fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        Some(rest.trim())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Read in one go as in many small reads: the same text, for a file larger than the
    /// first buffer too (this process's maps grow past it with a few mappings).
    #[test]
    fn reads_the_same_text_as_read_to_string() {
        let stat = read("/proc/self/stat").unwrap();
        assert!(
            stat.starts_with(&format!("{} (", std::process::id())),
            "{stat}"
        );
        let status = read("/proc/self/status").unwrap();
        let pid = status_field(&status, "Pid").unwrap();
        assert_eq!(pid, std::process::id().to_string());
        assert_eq!(status_field(&status, "NoSuchKey"), None);
        // Enough separate mappings that the maps text outgrows FIRST_READ.
        let pages: Vec<memmap2::MmapMut> = (0..150)
            .map(|_| memmap2::MmapMut::map_anon(4096).unwrap())
            .collect();
        for (i, p) in pages.iter().enumerate() {
            // Alternate protections so that neighbouring mappings do not merge.
            if i % 2 == 0 {
                // SAFETY: a page this test owns, made read-only; not written after.
                unsafe { libc::mprotect(p.as_ptr() as *mut _, 4096, libc::PROT_READ) };
            }
        }
        let ours = read("/proc/self/maps").unwrap();
        let theirs = std::fs::read_to_string("/proc/self/maps").unwrap();
        assert!(ours.len() > FIRST_READ, "{}", ours.len());
        assert_eq!(ours.lines().count(), theirs.lines().count());
        drop(pages);
        assert_eq!(
            read("/proc/self/task/2147483647/stat").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn lists_this_process_threads() {
        let t = tasks(std::process::id() as i32).unwrap();
        assert!(t.contains(&(std::process::id() as i32)), "{t:?}");
        assert!(t.windows(2).all(|w| w[0] < w[1]), "{t:?}");
    }
}

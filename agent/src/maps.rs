//! Parsing of a `/proc/PID/maps` listing.
//!
//! The parser works on text, not on a file, so that the same code serves the agent
//! (reading `/proc/self/maps` inside the target) and the tracer (reading
//! `/proc/PID/maps` from outside), and so that tests can feed synthetic listings.
//!
//! Hand-written rather than `procfs` (which the tracer uses for tasks, status and auxv):
//! inside the target the agent reads its own maps while every other thread is stopped,
//! possibly with the target's locks held, so it keeps to one read and a small parser with
//! no dependency of its own; the tracer shares the parser so that both sides see the same
//! [`MapEntry`] the allocator works on.

use std::fmt;

/// One line of a maps listing: a virtual memory area.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapEntry {
    /// First address of the area.
    pub start: u64,
    /// One past the last address of the area.
    pub end: u64,
    /// Protection and sharing, as in the listing: `r`, `w`, `x`, and `p` or `s`.
    pub perms: Perms,
    /// Offset into the mapped file.
    pub offset: u64,
    /// Device as `major:minor`, verbatim.
    pub dev: String,
    /// Inode of the mapped file, 0 for anonymous memory.
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[vdso]`), empty for anonymous memory.
    /// A deleted file keeps its ` (deleted)` suffix.
    pub path: String,
}

/// Permissions of a mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Perms {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
}

impl fmt::Display for Perms {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = |b, ch| if b { ch } else { '-' };
        write!(
            f,
            "{}{}{}{}",
            c(self.read, 'r'),
            c(self.write, 'w'),
            c(self.exec, 'x'),
            if self.shared { 's' } else { 'p' }
        )
    }
}

impl MapEntry {
    /// Size of the area in bytes.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Whether the area is empty (never true for a kernel listing).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Whether `addr` lies inside the area.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// A line that is not a maps entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub line: usize,
    pub text: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "maps line {} is malformed: {:?}", self.line, self.text)
    }
}

impl std::error::Error for ParseError {}

/// Parse a whole maps listing. Entries come back in the order of the listing, which the
/// kernel sorts by address.
pub fn parse(text: &str) -> Result<Vec<MapEntry>, ParseError> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            parse_line(l).ok_or_else(|| ParseError {
                line: i + 1,
                text: l.to_string(),
            })
        })
        .collect()
}

/// Parse one line such as
/// `7f2c1a000000-7f2c1a022000 r--p 00000000 fd:01 1048 /usr/lib/x86_64-linux-gnu/libc.so.6`.
pub fn parse_line(line: &str) -> Option<MapEntry> {
    let mut rest = line.trim_start();
    let mut field = || {
        let s = rest.trim_start();
        let end = s.find(char::is_whitespace).unwrap_or(s.len());
        let (f, r) = s.split_at(end);
        rest = r;
        (!f.is_empty()).then_some(f)
    };
    let range = field()?;
    let perms = field()?;
    let offset = field()?;
    let dev = field()?.to_string();
    let inode = field()?.parse().ok()?;
    // The path is the remainder: it may contain spaces.
    let path = rest.trim().to_string();

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if end < start {
        return None;
    }
    let p = perms.as_bytes();
    if p.len() != 4 {
        return None;
    }
    let perms = Perms {
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        shared: p[3] == b's',
    };
    Some(MapEntry {
        start,
        end,
        perms,
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev,
        inode,
        path,
    })
}

/// Read and parse `/proc/self/maps`.
pub fn read_self() -> std::io::Result<Vec<MapEntry>> {
    read_path("/proc/self/maps")
}

/// Read and parse `/proc/PID/maps`.
pub fn read_pid(pid: i32) -> std::io::Result<Vec<MapEntry>> {
    read_path(&format!("/proc/{pid}/maps"))
}

/// Parse the maps file at `path` (e.g. a thread's `/proc/PID/task/TID/maps`).
pub fn read_path(path: &str) -> std::io::Result<Vec<MapEntry>> {
    let text = std::fs::read_to_string(path)?;
    parse(&text).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_anonymous_and_pseudo_entries() {
        let text = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234 /usr/bin/my prog
55d0c0a02000-55d0c0a05000 r-xp 00002000 fd:01 1234 /usr/bin/my prog
55d0c1000000-55d0c1021000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000010000 rw-s 00000000 00:01 99 /memfd:tracer-code (deleted)
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";
        let m = parse(text).unwrap();
        assert_eq!(m.len(), 6);
        assert_eq!(m[0].path, "/usr/bin/my prog");
        assert_eq!(m[1].offset, 0x2000);
        assert!(m[1].perms.exec && m[1].perms.read && !m[1].perms.write);
        assert_eq!(m[2].path, "[heap]");
        assert!(m[3].perms.shared);
        assert_eq!(m[3].path, "/memfd:tracer-code (deleted)");
        assert_eq!(m[4].path, "");
        assert_eq!(m[5].start, 0xffffffffff600000);
        assert_eq!(m[5].perms.to_string(), "--xp");
    }

    #[test]
    fn rejects_garbage_with_line_number() {
        let err = parse("00400000-00401000 r-xp 0 08:01 1 /a\nnot a line\n").unwrap_err();
        assert_eq!(err.line, 2);
    }

    #[test]
    fn reads_own_maps_and_finds_own_code() {
        let maps = read_self().unwrap();
        let here = reads_own_maps_and_finds_own_code as *const () as u64;
        let e = maps.iter().find(|e| e.contains(here)).unwrap();
        assert!(e.perms.exec);
    }
}

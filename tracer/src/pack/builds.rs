//! The event formats of every build of a pack loaded in the target.
//!
//! A hot swap (`tracer attach PID --pack NEW` while a session runs the pack, see
//! `session::swap_pack`) loads a new build into the target while the running session
//! drains the ring: records from the new build's `emit!` sites carry format ids that the
//! session did not read when it started. A format's id is a hash of its site (file, line,
//! column, format string), so two builds' formats do not clash: the session keeps the
//! formats it has (records of the old build still in the ring decode as before) and adds
//! those of each build of the pack it finds mapped in the target, read from the mapping
//! itself (`/proc/PID/map_files`), whether it was loaded from a file or a memfd.
//!
//! The target is untrusted: what is mapped under a pack's name is parsed like any pack
//! file, within size and count bounds.

use super::descriptors::{parse_pack, FormatDesc};
use agent::maps::MapEntry;
use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;

/// Larger mappings are not read (a pack is a few MB).
const MAX_FILE: u64 = 256 << 20;
/// Formats kept in all, whatever the builds declare.
const MAX_FORMATS: usize = 1 << 16;

/// The builds of one pack in one process, read so far.
pub struct Builds {
    pid: i32,
    /// The pack's library name in the target (`pack-NAME`).
    name: String,
    /// Builds already read, by (device, inode).
    seen: HashSet<(String, u64)>,
}

impl Builds {
    pub fn new(pid: i32, name: &str) -> Builds {
        Builds {
            pid,
            name: name.to_owned(),
            seen: HashSet::new(),
        }
    }

    /// Add to `formats` those of the builds of the pack mapped in the target now and not
    /// read before; returns how many formats were added.
    pub fn refresh(&mut self, formats: &mut BTreeMap<u32, FormatDesc>) -> Result<usize, String> {
        let entries = agent::maps::read_pid(self.pid)
            .map_err(|e| format!("cannot read the maps of process {}: {e}", self.pid))?;
        let mut added = 0;
        for e in entries
            .iter()
            .filter(|e| e.offset == 0 && is_build(&e.path, &self.name))
        {
            if !self.seen.insert((e.dev.clone(), e.inode)) {
                continue;
            }
            for (id, f) in read_formats(self.pid, e)? {
                if formats.len() >= MAX_FORMATS {
                    return Err(format!(
                        "more than {MAX_FORMATS} event formats: not reading more"
                    ));
                }
                if let std::collections::btree_map::Entry::Vacant(v) = formats.entry(id) {
                    v.insert(f);
                    added += 1;
                }
            }
        }
        Ok(added)
    }
}

/// Whether a mapped path is a build of the pack `name` (`pack-NAME`): the file tracer
/// placed, `/tmp/tracer-UID/pack-NAME-HASH.so`, or the memfd `/memfd:pack-NAME (deleted)`.
pub fn is_build(path: &str, name: &str) -> bool {
    if let Some(rest) = path.strip_prefix("/memfd:") {
        return rest == name || rest.strip_prefix(name).is_some_and(|r| r.starts_with(' '));
    }
    let file = path.rsplit('/').next().unwrap_or(path);
    let hash = file
        .strip_prefix(name)
        .and_then(|r| r.strip_prefix('-'))
        .and_then(|r| r.strip_suffix(".so"));
    hash.is_some_and(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn read_formats(pid: i32, e: &MapEntry) -> Result<BTreeMap<u32, FormatDesc>, String> {
    let path = format!("/proc/{pid}/map_files/{:x}-{:x}", e.start, e.end);
    let mut data = Vec::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(MAX_FILE + 1).read_to_end(&mut data))
        .map_err(|err| format!("cannot read the pack build {} at {path}: {err}", e.path))?;
    if data.len() as u64 > MAX_FILE {
        return Err(format!(
            "the pack build {} is over {MAX_FILE} bytes",
            e.path
        ));
    }
    parse_pack(Path::new(&e.path), &data)
        .map(|info| info.formats)
        .map_err(|err| format!("the pack build {} mapped in the target: {err}", e.path))
}

#[cfg(test)]
mod tests {
    use super::is_build;

    #[test]
    fn builds_are_told_by_their_file_or_memfd_name() {
        let n = "pack-hot";
        assert!(is_build("/tmp/tracer-0/pack-hot-0123456789abcdef.so", n));
        assert!(is_build("/memfd:pack-hot (deleted)", n));
        assert!(is_build("/memfd:pack-hot", n));
        assert!(!is_build(
            "/tmp/tracer-0/pack-hotswap-0123456789abcdef.so",
            n
        ));
        assert!(!is_build("/tmp/tracer-0/pack-hot_x-0123456789abcdef.so", n));
        assert!(!is_build("/memfd:pack-hotswap (deleted)", n));
        assert!(!is_build("/tmp/tracer-0/pack-hot-.so", n));
        assert!(!is_build("/usr/lib/libhot.so", n));
    }
}

//! A real file, in the target's own file system, for a library about to be injected.
//!
//! The loader keeps the path given to `dlopen` as the object's name (`l_name` in the link
//! map that debuggers walk, `dlpi_name` of `dl_iterate_phdr`), and gdb, profilers and
//! in-process unwinders open that path long after the injection. A `/proc/self/fd/N` path
//! names another file in every other process, and in the target itself once the descriptor
//! is closed: `gdb -p` opened its own fd 3, a pipe, and waited on it forever. So the
//! library goes into `/tmp/tracer-UID/NAME-HASH.so` under the target's root (written through
//! `/proc/PID/root`, so a container sees it at that path too), named by its contents, and
//! is kept: the library stays loaded until the process exits, and a debugger may come at
//! any time until then. That is one file per library build, reused by every session.
//!
//! The directory must belong to us and be writable by nobody else, and a file already
//! there must be ours, closed to others and byte-identical to the library, and the file
//! system must allow executable mappings: otherwise [`place`] fails and the caller uses a
//! memfd instead.

use nix::sys::statvfs::FsFlags;
use std::fs::{self, DirBuilder, OpenOptions, Permissions};
use std::hash::{DefaultHasher, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Where the library file is, seen from the target and from here.
#[derive(Clone, Debug)]
pub struct Placed {
    /// The path the target opens (`/tmp/tracer-UID/NAME-HASH.so`).
    pub path_in_target: String,
    /// The same file through `/proc/PID/root`.
    pub path_here: String,
    /// Whether this call wrote the file (it was not there yet).
    pub created: bool,
}

/// The directory the target sees, for the tracer's effective uid.
fn dir_in_target() -> String {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    format!("/tmp/tracer-{uid}")
}

/// File name for `library`: `name`, then a hash of the bytes. The hash only tells builds
/// apart; the bytes themselves are compared before a file is reused.
fn file_name(library: &[u8], name: &str) -> String {
    let mut h = DefaultHasher::new();
    h.write(library);
    hashed_name(name, &format!("{:016x}", h.finish()))
}

fn hashed_name(name: &str, hash: &str) -> String {
    format!("{name}-{hash}.so")
}

fn refuse(path: &Path, why: &str) -> io::Error {
    io::Error::other(format!("{}: {why}", path.display()))
}

/// Ours (effective uid) and writable by neither group nor others.
fn check_owned(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if meta.uid() != uid {
        return Err(refuse(path, "owned by another user"));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(path, "writable by other users"));
    }
    Ok(())
}

/// Creates (or checks) the directory: ours, a real directory, `rwxr-xr-x` so that a target
/// running as another user can read the library.
fn prepare_dir(dir: &Path) -> io::Result<()> {
    match DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(dir)?;
    if !meta.file_type().is_dir() {
        return Err(refuse(dir, "not a directory"));
    }
    check_owned(dir, &meta)?;
    // The loader would map the file's first segment, fail on the executable one and
    // leave that first mapping behind: find out before.
    let mount = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
    if mount.flags().contains(FsFlags::ST_NOEXEC) {
        return Err(refuse(dir, "on a noexec file system"));
    }
    // The umask may have narrowed the mode at creation.
    if meta.mode() & 0o7777 != 0o755 {
        fs::set_permissions(dir, Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// Whether `path` is already the library: a regular file of ours, closed to others, with
/// exactly these bytes. In a directory only we can write (`ours_alone`), a file of ours
/// of the library's size, named by the hash of its bytes and written whole by a rename, is
/// taken as it is: comparing 1.8 MB took 0.1 to 0.2 ms of every first attach.
fn holds(path: &Path, library: &[u8], ours_alone: bool) -> io::Result<bool> {
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_file() || check_owned(path, &meta).is_err() {
        return Ok(false);
    }
    if meta.len() != library.len() as u64 {
        return Ok(false);
    }
    // Mapped rather than read: no copy of 1.8 MB (the agent) when it is compared.
    Ok(ours_alone || *crate::symbols::map_file(path)? == *library)
}

/// Whether process `pid` sees the same root directory as we do: its `/tmp/tracer-UID`,
/// once checked ours and closed to others, is then ours alone. In another root (a
/// container), the same uid may be another principal: a file there is compared.
fn same_root(pid: i32) -> bool {
    let id = |p: &str| fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    id(&format!("/proc/{pid}/root")).is_some_and(|theirs| Some(theirs) == id("/"))
}

/// Writes the library next to `path` and renames it there, so that nobody (another
/// tracer, a loader) ever sees a partial file, and a file some process has mapped is
/// replaced, never rewritten in place.
fn write_atomically(path: &Path, library: &[u8]) -> io::Result<()> {
    // Unique per process and call: two threads may place the same library at once.
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp-{}-{call}", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    let written = f
        .write_all(library)
        .and_then(|()| f.set_permissions(Permissions::from_mode(0o644)))
        .and_then(|()| fs::rename(&tmp, path));
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Puts `library` in the file system of process `pid` (see the module doc) and returns
/// where. Fails when the target's `/tmp` cannot be used safely; nothing is left behind then
/// except possibly the empty directory.
pub fn place(pid: i32, library: &[u8], name: &str) -> io::Result<Placed> {
    place_as(pid, library, name, file_name(library, name))
}

/// [`place`] for a library whose hash is already known (16 hex digits of
/// `DefaultHasher` over its bytes, as [`crate::agent_blob::agent_hash`]): the same file.
pub fn place_hashed(pid: i32, library: &[u8], name: &str, hash: &str) -> io::Result<Placed> {
    place_as(pid, library, name, hashed_name(name, hash))
}

fn place_as(pid: i32, library: &[u8], name: &str, file: String) -> io::Result<Placed> {
    let dir = dir_in_target();
    let dir_here = format!("/proc/{pid}/root{dir}");
    prepare_dir(Path::new(&dir_here))?;
    let path_here = format!("{dir_here}/{file}");
    let created = !holds(Path::new(&path_here), library, same_root(pid))?;
    if created {
        write_atomically(Path::new(&path_here), library)?;
        prune_unused(&dir_here, &dir, name, &file);
    }
    Ok(Placed {
        path_in_target: format!("{dir}/{file}"),
        path_here,
        created,
    })
}

/// Removes the files of other builds of library `name` that no process has mapped, so
/// that rebuilding the tracer does not pile copies up in /tmp (run when a new build is
/// first placed). A file some process maps is kept: a debugger may still open it.
fn prune_unused(dir_here: &str, dir: &str, name: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(dir_here) else {
        return;
    };
    let old: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|f| f != keep && is_placed(&format!("{dir}/{f}"), name))
        .collect();
    if old.is_empty() {
        return;
    }
    let mut in_use = vec![false; old.len()];
    for proc_entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = proc_entry.file_name();
        if !pid.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // Unreadable maps (a process that just exited): nothing to learn from them.
        let Ok(maps) = fs::read_to_string(proc_entry.path().join("maps")) else {
            continue;
        };
        for (f, used) in old.iter().zip(in_use.iter_mut()) {
            *used |= maps.contains(&format!("{dir}/{f}"));
        }
    }
    for (f, used) in old.iter().zip(in_use) {
        if !used {
            let _ = fs::remove_file(format!("{dir_here}/{f}"));
        }
    }
}

/// Removes a file [`place`] just created that turned out unusable (the target could not
/// load it), so that failed attempts leave nothing behind.
pub fn discard(placed: &Placed) {
    if placed.created {
        let _ = fs::remove_file(&placed.path_here);
    }
}

/// The name the agent is loaded under (its file's or memfd's), visible in the target's maps.
pub const AGENT_NAME: &str = "tracer-agent";

/// Whether `path` (as `/proc/PID/maps` shows it) is the tracer's agent: the file [`place`]
/// made for it, or the memfd it was loaded from when no file could be placed. The agent is
/// the tracer's own code in the target, never something to probe: a probe inside it would
/// run the trampolines' handlers from themselves.
pub fn is_agent(path: &str) -> bool {
    path.starts_with(&format!("/memfd:{AGENT_NAME}")) || is_placed(path, AGENT_NAME)
}

/// Whether `path` (as `/proc/PID/maps` shows it) is a file [`place`] made for a library
/// loaded under `name`.
pub fn is_placed(path: &str, name: &str) -> bool {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    let Some((dir, file)) = path.rsplit_once('/') else {
        return false;
    };
    dir.starts_with("/tmp/tracer-")
        && file
            .strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(".so"))
            .is_some_and(|hash| hash.len() == 16 && hash.bytes().all(|b| b.is_ascii_hexdigit()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placed_names_are_recognised_by_library_name() {
        let lib = b"\x7fELF not really";
        let path = format!("{}/{}", dir_in_target(), file_name(lib, "tracer-agent"));
        assert!(is_placed(&path, "tracer-agent"));
        assert!(is_placed(&format!("{path} (deleted)"), "tracer-agent"));
        assert!(!is_placed(&path, "tracer"));
        assert!(!is_placed("/memfd:tracer-agent (deleted)", "tracer-agent"));
        assert!(!is_placed("/usr/lib/tracer-agent-1.so", "tracer-agent"));
    }

    /// A new build's file replaces an old build's one nobody maps; a mapped one stays.
    #[test]
    fn placing_a_new_build_prunes_unmapped_old_ones() {
        let pid = std::process::id() as i32;
        let name = format!("tracer-prune-test-{pid}");
        let mapped = place(pid, b"mapped build", &name).unwrap();
        let f = fs::File::open(&mapped.path_in_target).unwrap();
        // SAFETY: a private read-only mapping, as the loader maps a library; dropped
        // below, before the file is removed.
        let map = unsafe { memmap2::MmapOptions::new().map_copy_read_only(&f) }.unwrap();
        let old = place(pid, b"old build", &name).unwrap();
        assert!(
            Path::new(&mapped.path_in_target).exists(),
            "mapped build kept"
        );
        let new = place(pid, b"new build", &name).unwrap();
        assert!(
            !Path::new(&old.path_in_target).exists(),
            "unmapped old build pruned"
        );
        assert!(
            Path::new(&mapped.path_in_target).exists(),
            "mapped build kept"
        );
        drop(map);
        for p in [&mapped, &new] {
            fs::remove_file(&p.path_in_target).unwrap();
        }
    }

    /// The agent's file is named from the hash build.rs computed: it must be the name
    /// hashing the embedded bytes gives, or a tracer and an older build would disagree
    /// on which file holds which agent.
    #[test]
    fn the_agent_hash_of_the_build_is_the_hash_of_its_bytes() {
        let agent = crate::agent_blob::agent_so();
        assert_eq!(
            hashed_name(AGENT_NAME, crate::agent_blob::agent_hash()),
            file_name(agent, AGENT_NAME)
        );
    }

    #[test]
    fn different_bytes_get_different_files() {
        assert_ne!(file_name(b"one", "lib"), file_name(b"two", "lib"));
        assert_eq!(file_name(b"one", "lib"), file_name(b"one", "lib"));
    }

    /// Placing into this very process: written once, reused byte for byte, and rewritten
    /// (a new inode, never in place) when the file was altered.
    #[test]
    fn place_writes_once_reuses_and_replaces_altered_files() {
        let pid = std::process::id() as i32;
        let lib = format!("library bytes of test {pid}").into_bytes();
        let first = place(pid, &lib, "tracer-unit-test").unwrap();
        assert!(first.created);
        assert_eq!(fs::read(&first.path_in_target).unwrap(), lib);
        let meta = fs::metadata(&first.path_in_target).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o644);
        let dir_meta = fs::metadata(dir_in_target()).unwrap();
        assert_eq!(dir_meta.mode() & 0o777, 0o755);

        let again = place(pid, &lib, "tracer-unit-test").unwrap();
        assert!(!again.created);
        assert_eq!(again.path_in_target, first.path_in_target);

        fs::write(&first.path_in_target, b"altered").unwrap();
        let fixed = place(pid, &lib, "tracer-unit-test").unwrap();
        assert!(fixed.created);
        assert_eq!(fs::read(&fixed.path_in_target).unwrap(), lib);
        assert_ne!(
            fs::metadata(&fixed.path_in_target).unwrap().ino(),
            meta.ino()
        );
        discard(&fixed);
        assert!(!Path::new(&fixed.path_in_target).exists());
    }

    /// A file of the right size whose bytes differ is replaced when the directory may be
    /// another principal's (another root), and taken as it is only where we alone write.
    #[test]
    fn same_size_files_are_compared_unless_the_directory_is_ours_alone() {
        let pid = std::process::id() as i32;
        assert!(same_root(pid));
        let lib = format!("library bytes of the size test {pid}").into_bytes();
        let first = place(pid, &lib, "tracer-size-test").unwrap();
        let path = Path::new(&first.path_here);
        let mut altered = lib.clone();
        altered[0] ^= 1;
        fs::write(path, &altered).unwrap();
        assert!(!holds(path, &lib, false).unwrap(), "compared: differs");
        assert!(
            holds(path, &lib, true).unwrap(),
            "ours alone: size and name"
        );
        fs::set_permissions(path, Permissions::from_mode(0o666)).unwrap();
        assert!(!holds(path, &lib, true).unwrap(), "writable by others");
        fs::remove_file(path).unwrap();
    }
}

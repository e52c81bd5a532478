//! The tracer's mapping of a pack's shared region (a memfd the agent creates in the
//! target, opened through `/proc/PID/fd/N`).
//!
//! A mapped file that shrinks under the mapping turns reads past its new end into
//! SIGBUS, and the target owns the file: so a region is mapped only when sealed against
//! shrinking (`F_SEAL_SHRINK`, set by the agent when it creates the memfd), and never
//! beyond the file's length at mapping time.

use super::view::View;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

/// A shared region, mapped read-write (the ring's consumer frees space in it).
pub struct SharedRegion {
    map: memmap2::MmapRaw,
    len: usize,
}

#[derive(Debug)]
pub enum RegionError {
    Open(std::io::Error),
    /// The memfd can still shrink: mapping it would let the target crash the tracer.
    NotSealed,
    TooSmall {
        len: usize,
        needed: usize,
    },
    Map(std::io::Error),
}

impl std::fmt::Display for RegionError {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            RegionError::Open(e) => write!(f, "cannot open the pack's shared memory: {e}"),
            RegionError::NotSealed => write!(
                f,
                "the pack's shared memory is not sealed against shrinking; refusing to map it (the agent seals it: is the agent from another tracer build?)"
            ),
            RegionError::TooSmall { len, needed } => write!(
                f,
                "the pack's shared memory is {len} bytes, its layout needs {needed}"
            ),
            RegionError::Map(e) => write!(f, "cannot map the pack's shared memory: {e}"),
        }
    }
}

impl std::error::Error for RegionError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RegionError::Open(e) | RegionError::Map(e) => Some(e),
            _ => None,
        }
    }
}

/// Whether `file` is sealed against shrinking.
pub fn sealed_against_shrinking(file: &File) -> bool {
    // SAFETY: F_GET_SEALS only reads the descriptor's seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    seals >= 0 && seals & libc::F_SEAL_SHRINK != 0
}

impl SharedRegion {
    /// Map the region at `path` (e.g. `/proc/PID/fd/N`), which must hold `needed` bytes.
    pub fn open(path: &Path, needed: usize) -> Result<Self, RegionError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(RegionError::Open)?;
        Self::from_file(&file, needed)
    }

    /// Map the agent's memfd named `name` that it keeps as descriptor `fd` in `pid`,
    /// checked to be the agent's file ([`crate::agent_fd`]), which must hold `needed`
    /// bytes.
    pub fn open_agent(pid: i32, fd: i32, name: &str, needed: usize) -> Result<Self, RegionError> {
        let file = crate::agent_fd::open(pid, fd, name, true).map_err(RegionError::Open)?;
        Self::from_file(&file, needed)
    }

    pub fn from_file(file: &File, needed: usize) -> Result<Self, RegionError> {
        if !sealed_against_shrinking(file) {
            return Err(RegionError::NotSealed);
        }
        let len = file.metadata().map_err(RegionError::Open)?.len() as usize;
        if len < needed {
            return Err(RegionError::TooSmall { len, needed });
        }
        let map = memmap2::MmapOptions::new()
            .len(needed)
            .map_raw(file)
            .map_err(RegionError::Map)?;
        Ok(SharedRegion { map, len: needed })
    }

    pub fn view(&self) -> View<'_> {
        // SAFETY: the mapping is page-aligned, `len` bytes, lives as long as `self`, and
        // cannot lose pages under us since the file cannot shrink.
        unsafe { View::from_raw(self.map.as_ptr(), self.len) }
    }
}

//! Whether a function can be probed, decided from outside the target, for `tracer list`.
//!
//! The same relocator the agent runs decides, on the bytes of a running process (through
//! `/proc/PID/mem`) or of an ELF file on disk (through its loadable segments).

use crate::symbols::{LoadSegment, Module};
use agent::relocator::{self, Function, Memory, ProbeKind};
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Reads a live process's memory.
pub struct ProcMemory {
    mem: File,
}

impl ProcMemory {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        Ok(ProcMemory {
            mem: File::open(format!("/proc/{pid}/mem"))?,
        })
    }
}

impl Memory for ProcMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.mem.read_exact_at(buf, addr).is_ok()
    }
}

/// Reads an ELF file as the loader would map it with `bias`.
pub struct FileMemory<'a> {
    data: &'a [u8],
    segments: &'a [LoadSegment],
    bias: u64,
}

impl<'a> FileMemory<'a> {
    pub fn new(data: &'a [u8], segments: &'a [LoadSegment], bias: u64) -> Self {
        FileMemory {
            data,
            segments,
            bias,
        }
    }
}

impl Memory for FileMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> bool {
        let link = addr.wrapping_sub(self.bias);
        let len = buf.len() as u64;
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.vaddr <= link && link + len <= s.vaddr + s.filesz)
        else {
            return false;
        };
        let off = (seg.offset + link - seg.vaddr) as usize;
        match self.data.get(off..off + buf.len()) {
            Some(src) => {
                buf.copy_from_slice(src);
                true
            }
            None => false,
        }
    }
}

/// `Ok` when an entry probe at `address` would be installed, else the reason the agent
/// would give. The trampoline address is taken 64 MiB away: any address the near
/// allocator returns is within reach the same way.
pub fn check(mem: &dyn Memory, address: u64, size: u64) -> Result<(), String> {
    let f = Function {
        address,
        size: (size != 0).then_some(size),
    };
    let stolen =
        relocator::analyze(&f, address, ProbeKind::Entry, mem).map_err(|r| r.to_string())?;
    relocator::relocate(&stolen, stolen.site.wrapping_add(64 << 20))
        .map(|_| ())
        .map_err(|r| r.to_string())
}

/// The file bytes of a module, for [`FileMemory`].
pub fn module_bytes(m: &Module) -> std::io::Result<Vec<u8>> {
    std::fs::read(&m.elf.path)
}

//! Whether a function can be probed, decided from outside the target, for `tracer list`.
//!
//! The same relocator the agent runs decides, on the bytes of a running process (through
//! `/proc/PID/mem`) or of an ELF file on disk (through its loadable segments).

use crate::symbols::{LoadSegment, Module, ProcessModules};
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
            mem: File::open(format!("{}/mem", crate::process_kind::proc_dir(pid)))?,
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
pub fn check(mem: &dyn Memory, address: u64, size: u64) -> Result<(), relocator::Refusal> {
    let f = Function {
        address,
        size: (size != 0).then_some(size),
    };
    let stolen = relocator::analyze(&f, address, ProbeKind::Entry, mem)?;
    relocator::relocate(&stolen, stolen.site.wrapping_add(64 << 20)).map(|_| ())
}

/// The file bytes of a module, for [`FileMemory`].
pub fn module_bytes(m: &Module) -> std::io::Result<Vec<u8>> {
    std::fs::read(&m.elf.path)
}

/// Functions whose return cannot be redirected through a shadow stack: they return twice
/// (the second return would find its shadow entry gone) or switch stacks.
const RETURNS_TWICE: &[&str] = &[
    "setjmp",
    "_setjmp",
    "__setjmp",
    "sigsetjmp",
    "__sigsetjmp",
    "savectx",
    "getcontext",
    "__getcontext",
    "swapcontext",
    "__swapcontext",
    "vfork",
    "__vfork",
    "clone",
    "__clone",
    "clone3",
    "__clone3",
    "__clone_internal",
    // Split-stack (`-fsplit-stack`) prologue helper: runs the rest of its caller on a
    // new stack segment.
    "__morestack",
];

/// Process entry points: the kernel jumps there with `[rsp]` = argc, not a return
/// address (ld.so's `_dl_start_user` is reached by `jmp` with the same stack).
const PROCESS_ENTRIES: &[&str] = &["_start", "_dl_start_user"];

/// Code entered by `jmp` or `ret` with data at `[rsp]` that an exit probe would
/// overwrite:
/// - `__restore_rt`: a signal handler returns into it; `[rsp]` is the start of the
///   signal frame (`uc_flags`) that `rt_sigreturn` reads back;
/// - `__start_context`: a `makecontext` function returns into it; `[rsp]` is `uc_link`;
/// - `_dl_runtime_resolve*` / `_dl_runtime_profile*`: the PLT jumps there with `[rsp]`
///   = the `link_map` pointer (and the relocation index above it).
const ENTERED_WITH_DATA: &[&str] = &[
    "__restore_rt",
    "__start_context",
    "_dl_runtime_resolve_fxsave",
    "_dl_runtime_resolve_xsave",
    "_dl_runtime_resolve_xsavec",
    "_dl_runtime_profile_sse",
    "_dl_runtime_profile_avx",
    "_dl_runtime_profile_avx512",
];

/// The unwinder's walk starts from its own entry function's return address
/// (`uw_init_context` takes `__builtin_return_address(0)` of `_Unwind_RaiseException`
/// & co., and `uw_init_context_1` reads its own). With an exit probe there, that address
/// is the exit trampoline, which has no unwind information: the walk stops at once
/// (`_URC_END_OF_STACK`) and the C++ runtime calls `std::terminate` (seen: libgcc_s's
/// `_Unwind_RaiseException` and `_Unwind_Resume` under `-x` abort a program that
/// throws; its other 140-odd exported functions are fine with `-x`). The first four
/// also never return normally: they leave by `__builtin_eh_return` into a landing pad.
/// LLVM's libunwind reads its caller's address in `__unw_getcontext` the same way.
const UNWINDER_WALK_STARTS: &[&str] = &[
    "_Unwind_RaiseException",
    "_Unwind_ForcedUnwind",
    "_Unwind_Resume",
    "_Unwind_Resume_or_Rethrow",
    "_Unwind_Backtrace",
    "uw_init_context_1",
    "__unw_getcontext",
    "unw_getcontext",
];

/// Where the agent hooks the unwinder while exit probes are live (`UNWINDER_ENTRIES` in
/// `agent/src/interceptor.rs`); a probe of the user's on the same code gives way then.
const AGENT_UNWIND_HOOKS: &[&str] = &[
    "_Unwind_RaiseException",
    "_Unwind_ForcedUnwind",
    "_Unwind_Resume_or_Rethrow",
];

/// Whether the function named `names` is one the agent hooks under `-x`.
pub fn hooked_under_exit(names: &[String]) -> bool {
    names
        .iter()
        .any(|n| AGENT_UNWIND_HOOKS.contains(&n.split('@').next().unwrap_or(n)))
}

/// Why a function gets its entries probed but not its returns, if it does.
///
/// An exit probe replaces the return address at `[rsp]` on entry with the address of
/// the exit trampoline, and puts the real one back when the function returns. That is
/// only right for code entered by `call` that returns once, by `ret`, on the same stack,
/// and whose return address nobody reads in between. Each rule names code where one of
/// those fails; any of the function's names counts, symbol version ignored.
/// `is_entry_point`: the function starts at its file's ELF entry point (`e_entry`).
pub fn entries_only(names: &[String], is_entry_point: bool) -> Option<&'static str> {
    if is_entry_point {
        return Some("process entry point, [rsp] holds argc, not a return address");
    }
    let bases = || names.iter().map(|n| n.split('@').next().unwrap_or(n));
    let any = |list: &[&str]| bases().any(|b| list.contains(&b));
    // GCC's hot/cold splitting (`-freorder-blocks-and-partition`, on at -O2) moves
    // unlikely blocks into `f.cold` (`f.cold.N`, `f.part.N.cold`): the parent jumps
    // there and it jumps back, so `[rsp]` is whatever the parent keeps there (often a
    // saved register). `.part.N` (a split-off callee), `.isra.N`, `.constprop.N`,
    // `.lto_priv.N`, `.localalias` are functions entered by `call`: not matched.
    if bases().any(|b| b.split('.').skip(1).any(|part| part == "cold")) {
        return Some(".cold fragment, entered by jmp");
    }
    if any(PROCESS_ENTRIES) {
        return Some("process entry point, [rsp] holds argc, not a return address");
    }
    if any(RETURNS_TWICE) {
        return Some("returns twice or on another stack (setjmp, vfork, clone)");
    }
    if any(ENTERED_WITH_DATA) {
        return Some("entered by jmp or ret with data, not a return address, at [rsp]");
    }
    if any(UNWINDER_WALK_STARTS) {
        return Some("the unwinder starts its walk from this function's return address");
    }
    None
}

/// [`entries_only`] for the function of `module` starting at the runtime `address`.
pub fn entries_only_at(module: &Module, address: u64) -> Option<&'static str> {
    let f = module.symbol_containing(address)?;
    if f.address != address {
        return None;
    }
    let is_entry = module.elf.entry != 0 && module.elf.entry.wrapping_add(module.bias) == address;
    entries_only(f.names, is_entry)
}

/// Where the loader of process `pid` resolved the IFUNC `name` of `module`, whose
/// resolver is at the runtime address `resolver`. Read from a GOT slot the loader filled:
/// the module's own `R_X86_64_IRELATIVE` relocation for that resolver (applied at load
/// time), else a bound `GLOB_DAT`/`JUMP_SLOT` slot of any module importing `name` that
/// points into `module` (a lazy slot not yet bound points to its own PLT instead).
/// `None` when no slot tells.
pub fn ifunc_target(
    pid: i32,
    modules: &ProcessModules,
    module: &Module,
    resolver: u64,
    name: &str,
) -> Option<u64> {
    let mem = ProcMemory::open(pid).ok()?;
    let read = |slot: u64| {
        let mut buf = [0u8; 8];
        mem.read(slot, &mut buf).then(|| u64::from_le_bytes(buf))
    };
    let is_impl = |a: &u64| *a != 0 && *a != resolver && module.contains(*a);
    let link = resolver.wrapping_sub(module.bias);
    let own = module
        .elf
        .irelative()
        .iter()
        .filter(|(_, r)| *r == link)
        .find_map(|(slot, _)| read(slot.wrapping_add(module.bias)).filter(is_impl));
    let base = name.split('@').next().unwrap_or(name);
    own.or_else(|| {
        modules.modules.iter().find_map(|m| {
            m.elf
                .got_imports()
                .iter()
                .filter(|(_, n)| n == base)
                .find_map(|(slot, _)| read(slot.wrapping_add(m.bias)).filter(is_impl))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn why(names: &[&str]) -> Option<&'static str> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        entries_only(&names, false)
    }

    #[test]
    fn gcc_fragments_entered_by_jmp_only() {
        for cold in ["f.cold", "f.cold.3", "f.part.0.cold", "_ZN1A1fEv.cold"] {
            assert_eq!(
                why(&[cold]),
                Some(".cold fragment, entered by jmp"),
                "{cold}"
            );
        }
        // Split-off callees and clones are real functions, entered by call.
        for called in [
            "f.part.0",
            "f.isra.0",
            "f.constprop.2",
            "f.lto_priv.0",
            "f.localalias",
            "cold",
            "f.coldish",
        ] {
            assert_eq!(why(&[called]), None, "{called}");
        }
    }

    #[test]
    fn entry_points_trampolines_and_the_unwinder() {
        assert!(why(&["_start"]).unwrap().contains("entry point"));
        assert!(entries_only(&["whatever".into()], true)
            .unwrap()
            .contains("entry point"));
        assert!(why(&["__restore_rt"])
            .unwrap()
            .contains("entered by jmp or ret"));
        assert!(why(&["_dl_runtime_resolve_xsavec"]).is_some());
        assert!(why(&["_Unwind_Resume"]).unwrap().contains("unwinder"));
        assert!(why(&["_Unwind_Backtrace"]).is_some());
        // Any alias, any version.
        assert!(why(&["__sigsetjmp", "sigsetjmp@GLIBC_2.2.5"])
            .unwrap()
            .contains("returns twice"));
        assert!(why(&["my_fn", "_setjmp"]).is_some());
        for ordinary in ["malloc", "_Unwind_GetCFA", "__gcc_personality_v0", "main"] {
            assert_eq!(why(&[ordinary]), None, "{ordinary}");
        }
        assert!(hooked_under_exit(&["_Unwind_RaiseException".into()]));
        assert!(!hooked_under_exit(&["_Unwind_Resume".into()]));
    }
}

//! Runs the prologue relocator over every exported function of the libc.so.6 mapped in
//! this process and prints how many relocate and why the others are refused.
//!
//! `cargo run -p agent --example libc_census`
//!
//! The same census runs as a test (`agent/tests/relocator_census.rs`), which includes
//! this file as a module.

use agent::relocator::{analyze, relocate, Function, ProbeKind, Refusal, SelfMemory};
use object::read::elf::{ElfFile64, FileHeader, ProgramHeader, Sym};
use object::{elf, Endianness, Object, ObjectSymbol};
use std::collections::{BTreeMap, HashSet};
use std::ffi::{CStr, CString};

/// Distance from the site used as the trampoline address: inside the +-2 GiB any
/// allocator near the code would give.
pub const TRAMPOLINE_DISTANCE: u64 = 0x1000_0000;

/// Examples kept per refusal reason.
const EXAMPLES: usize = 4;

#[derive(Default, Debug)]
pub struct Census {
    /// Path of the libc examined.
    pub path: String,
    /// Exported STT_FUNC symbols with a size.
    pub symbols: usize,
    /// Distinct addresses among them (aliases counted once).
    pub functions: usize,
    /// Analysed and relocated.
    pub relocated: usize,
    /// Of those, how many moved the site past `endbr64`.
    pub after_endbr64: usize,
    /// Refusal counts and a few examples (symbol, message) per reason.
    pub refused: BTreeMap<&'static str, (usize, Vec<String>)>,
}

impl Census {
    pub fn refused_total(&self) -> usize {
        self.refused.values().map(|(n, _)| n).sum()
    }

    /// Reasons that must not occur on a sane libc: they indicate a relocator bug or
    /// a broken census, not an unsafe function.
    pub fn unexpected(&self) -> Vec<&'static str> {
        self.refused
            .keys()
            .copied()
            .filter(|r| !EXPECTED.contains(r))
            .collect()
    }

    pub fn print(&self) {
        println!("libc: {}", self.path);
        println!(
            "{} exported functions ({} symbols with aliases)",
            self.functions, self.symbols
        );
        println!(
            "relocated: {} ({:.1} %), {} of them after endbr64",
            self.relocated,
            100.0 * self.relocated as f64 / self.functions.max(1) as f64,
            self.after_endbr64
        );
        println!("refused:   {}", self.refused_total());
        for (reason, (n, examples)) in &self.refused {
            println!("  {reason:<22} {n:>5}");
            for e in examples {
                println!("      {e}");
            }
        }
    }
}

/// Refusals expected on real code: the function really is unsafe (or not understood).
pub const EXPECTED: &[&str] = &[
    "FunctionTooShort",
    "EndsTooSoon",
    "BranchIntoStolen",
    "JumpTableIntoStolen",
    "IndirectJump",
    "RipRelativeIntoStolen",
    "Unrelocatable",
];

pub fn reason(r: &Refusal) -> &'static str {
    match r {
        Refusal::Unreadable { .. } => "Unreadable",
        Refusal::Undecodable { .. } => "Undecodable",
        Refusal::EntryNotAtFunctionStart { .. } => "EntryNotAtFunctionStart",
        Refusal::SiteOutsideFunction { .. } => "SiteOutsideFunction",
        Refusal::NotInstructionBoundary { .. } => "NotInstructionBoundary",
        Refusal::FunctionTooShort { .. } => "FunctionTooShort",
        Refusal::EndsTooSoon { .. } => "EndsTooSoon",
        Refusal::BranchIntoStolen { .. } => "BranchIntoStolen",
        Refusal::JumpTableIntoStolen { .. } => "JumpTableIntoStolen",
        Refusal::IndirectJump { .. } => "IndirectJump",
        Refusal::RipRelativeIntoStolen { .. } => "RipRelativeIntoStolen",
        Refusal::Unrelocatable { .. } => "Unrelocatable",
        Refusal::TooFar { .. } => "TooFar",
        Refusal::EncodeFailed { .. } => "EncodeFailed",
        _ => "Other",
    }
}

/// The libc.so.6 of this process: its path and load address, from `dladdr` on one of
/// its functions.
fn mapped_libc() -> Result<(String, u64), String> {
    let mut info: libc::Dl_info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let probe = libc::getpid as *const libc::c_void;
    // SAFETY: `probe` is a code address in libc and `info` is a valid out-parameter.
    if unsafe { libc::dladdr(probe, &mut info) } == 0 || info.dli_fname.is_null() {
        return Err("dladdr found no object for getpid".into());
    }
    // SAFETY: dladdr returned a NUL-terminated name that lives as long as the mapping.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    Ok((path, info.dli_fbase as u64))
}

/// The exported functions of the libc.so.6 mapped in this process.
pub struct LibcFunctions {
    pub path: String,
    /// Exported STT_FUNC symbols with a size, aliases included.
    pub symbols: usize,
    /// (name, address, size), one per address, by address. IFUNCs (when asked for) are
    /// resolved with `dlsym` to the implementation selected for this CPU, whose size is
    /// unknown.
    pub functions: Vec<(String, u64, Option<u64>)>,
}

pub fn libc_functions(ifuncs: bool) -> Result<LibcFunctions, String> {
    let (path, fbase) = mapped_libc()?;
    let data = std::fs::read(&path).map_err(|e| format!("reading {path}: {e}"))?;
    let file = ElfFile64::<Endianness>::parse(&*data).map_err(|e| format!("{path}: {e}"))?;
    let endian = file.endian();
    // dli_fbase is where the lowest PT_LOAD (page-aligned) is mapped.
    let first_vaddr = file
        .elf_program_headers()
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| p.p_vaddr(endian) & !0xfff)
        .min()
        .ok_or_else(|| format!("{path}: no PT_LOAD"))?;
    let bias = fbase.wrapping_sub(first_vaddr);
    assert_eq!(file.elf_header().e_type(endian), elf::ET_DYN);

    let mut symbols = 0;
    let mut seen = HashSet::new();
    let mut functions = Vec::new();
    for sym in file.dynamic_symbols() {
        let raw = sym.elf_symbol();
        if sym.is_undefined() || raw.st_size(endian) == 0 {
            continue;
        }
        let name = sym.name().unwrap_or("?").to_string();
        let (addr, size) = match raw.st_type() {
            elf::STT_FUNC => {
                symbols += 1;
                (
                    bias.wrapping_add(raw.st_value(endian)),
                    Some(raw.st_size(endian)),
                )
            }
            elf::STT_GNU_IFUNC if ifuncs => {
                let c = CString::new(name.as_str()).map_err(|e| e.to_string())?;
                // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
                let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
                if p.is_null() {
                    continue;
                }
                (p as u64, None)
            }
            _ => continue,
        };
        if seen.insert(addr) {
            functions.push((name, addr, size));
        }
    }
    functions.sort_by_key(|f| f.1);
    Ok(LibcFunctions {
        path,
        symbols,
        functions,
    })
}

pub fn run() -> Result<Census, String> {
    let libc = libc_functions(false)?;
    let mut census = Census {
        path: libc.path,
        symbols: libc.symbols,
        functions: libc.functions.len(),
        ..Census::default()
    };
    for (name, address, size) in libc.functions {
        let func = Function { address, size };
        let result = analyze(&func, address, ProbeKind::Entry, &SelfMemory)
            .and_then(|s| relocate(&s, s.site + TRAMPOLINE_DISTANCE).map(|r| (s, r)));
        match result {
            Ok((s, _)) => {
                census.relocated += 1;
                if s.skipped_endbr64 {
                    census.after_endbr64 += 1;
                }
            }
            Err(e) => {
                let entry = census.refused.entry(reason(&e)).or_default();
                entry.0 += 1;
                if entry.1.len() < EXAMPLES {
                    entry.1.push(format!("{name}: {e}"));
                }
            }
        }
    }
    Ok(census)
}

#[allow(dead_code)] // The census test includes this file as a module without `main`.
fn main() {
    match run() {
        Ok(c) => {
            c.print();
            let unexpected = c.unexpected();
            if !unexpected.is_empty() {
                eprintln!("unexpected refusals: {unexpected:?}");
                std::process::exit(1);
            }
        }
        Err(e) => {
            eprintln!("census failed: {e}");
            std::process::exit(2);
        }
    }
}

//! Modules of a process (or of one ELF file on disk) and their function symbols.
//!
//! A module is one ELF file mapped into the target. Its symbols are read from the file
//! itself (through `/proc/PID/map_files` or `/proc/PID/root`, so that deleted files and
//! other mount namespaces work), from `.dynsym`, `.symtab` and the xz-compressed
//! `.gnu_debugdata` section (MiniDebugInfo) that distributions embed in stripped files.
//! Runtime addresses are file addresses plus the module's load bias, which is derived
//! from the mappings and the PT_LOAD program headers rather than assumed from the first
//! mapping. Parsed files are cached per (device, inode, path).

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Lookups by name answered by a scan before a file's name index is built.
const SCANS_BEFORE_INDEX: usize = 16;

/// Exact names looked up through `.gnu.hash` before a file's tables are read: a spec or
/// two name a function or two; more lookups read the tables.
const QUICK_LOOKUPS: usize = 4;

use agent::maps::MapEntry;
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader, Rela, SectionHeader, Sym};
use object::{Endian, Endianness};

/// x86-64 mappings are made of 4 KiB pages; the kernel maps segments from page-aligned
/// file offsets to page-aligned addresses.
const PAGE: u64 = 4096;

fn page_down(x: u64) -> u64 {
    x & !(PAGE - 1)
}

/// Which symbol table a function came from. The order is the order of preference when
/// several tables name the same address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SymbolSource {
    /// `.dynsym`: exported symbols, present even in stripped files.
    Dynsym,
    /// `.symtab`: full table, present in unstripped files.
    Symtab,
    /// `.symtab` of the ELF embedded in `.gnu_debugdata` (MiniDebugInfo).
    DebugData,
}

impl fmt::Display for SymbolSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SymbolSource::Dynsym => "dynsym",
            SymbolSource::Symtab => "symtab",
            SymbolSource::DebugData => "gnu_debugdata",
        })
    }
}

/// ELF symbol binding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Binding {
    Global,
    Weak,
    /// `STB_GNU_UNIQUE`.
    Unique,
    Local,
}

impl Binding {
    fn from_st_bind(b: elf::SymbolBind) -> Binding {
        match b {
            elf::STB_GLOBAL => Binding::Global,
            elf::STB_WEAK => Binding::Weak,
            elf::STB_GNU_UNIQUE => Binding::Unique,
            _ => Binding::Local,
        }
    }

    fn is_local(self) -> bool {
        self == Binding::Local
    }
}

impl fmt::Display for Binding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Binding::Global => "global",
            Binding::Weak => "weak",
            Binding::Unique => "unique",
            Binding::Local => "local",
        })
    }
}

/// Why symbols could not be obtained.
#[derive(Debug)]
pub enum SymbolError {
    /// `/proc/PID/maps` could not be read.
    Maps { pid: i32, source: std::io::Error },
    /// The ELF file could not be read.
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not a 64-bit ELF file.
    NotElf64 { path: PathBuf },
    /// The ELF headers or tables are malformed.
    Malformed { path: PathBuf, reason: String },
    /// None of the file's mappings lines up with its PT_LOAD segments.
    NoLoadBias { path: PathBuf },
}

impl fmt::Display for SymbolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SymbolError::Maps { pid, source } => write!(
                f,
                "cannot read /proc/{pid}/maps: {source} (check that process {pid} exists and that you may trace it)"
            ),
            SymbolError::Read { path, source } => {
                write!(f, "cannot read {}: {source}", path.display())
            }
            SymbolError::NotElf64 { path } => {
                write!(f, "{} is not a 64-bit ELF file", path.display())
            }
            SymbolError::Malformed { path, reason } => {
                write!(f, "{} is a malformed ELF file: {reason}", path.display())
            }
            SymbolError::NoLoadBias { path } => write!(
                f,
                "the mappings of {} do not match its PT_LOAD program headers (was the file replaced after it was mapped?)",
                path.display()
            ),
        }
    }
}

impl std::error::Error for SymbolError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SymbolError::Maps { source, .. } | SymbolError::Read { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// A PT_LOAD program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadSegment {
    pub vaddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
    /// `PF_R | PF_W | PF_X` bits.
    pub flags: u32,
}

/// One function of a file, at its link-time address, with all the names (aliases) that
/// denote that address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileFunction {
    /// Names, best first: global before local, `.dynsym` before `.symtab`, fewer leading
    /// underscores, shorter. Non-default symbol versions carry their `@VERSION` suffix
    /// (`memcpy@GLIBC_2.2.5`), as `nm -D` shows them, so that a plain `memcpy` names the
    /// version `dlsym` would return.
    pub names: Vec<String>,
    /// Link-time address (`st_value`).
    pub value: u64,
    /// Size in bytes, 0 when no table knows it.
    pub size: u64,
    pub binding: Binding,
    /// The address is a GNU IFUNC resolver, not the code that runs.
    pub is_ifunc: bool,
    /// Table of the best name.
    pub source: SymbolSource,
}

/// Function symbols of one ELF file, independent of where it is loaded.
///
/// The headers are read at once; the symbol tables and relocations of a mapped file only
/// when first asked for (see [`SymbolCache`]): an attach with `-p main:work` needs no
/// table of libc, and reading every module's took 1.2 of the 1.6 ms of symbol loading.
#[derive(Debug)]
pub struct ElfSymbols {
    /// The file that was read (for messages).
    pub path: PathBuf,
    /// `ET_DYN` (PIE or shared library) rather than `ET_EXEC`.
    pub is_dyn: bool,
    /// Link-time address of the entry point (`e_entry`), 0 if none.
    pub entry: u64,
    pub segments: Vec<LoadSegment>,
    pub has_symtab: bool,
    pub has_debugdata: bool,
    /// The mapped file, until its tables are read.
    image: Mutex<Option<memmap2::Mmap>>,
    tables: OnceLock<Tables>,
    /// Every name to the indices of the functions it denotes (a local name may exist
    /// at several addresses, e.g. two `static int helper()` in two files); made on the
    /// first lookup by name.
    by_name: OnceLock<HashMap<String, Vec<usize>>>,
    /// Lookups by name made without `by_name`.
    scans: AtomicUsize,
    /// Demangled forms of the C++ and Rust names, made on first use (most files are C).
    demangled: OnceLock<HashMap<String, crate::names::Demangled>>,
    /// Functions found by exact name through `.gnu.hash` while the tables are unread
    /// (see [`dynsym_named`]): a later attach naming `libc:malloc` spent 1 ms reading all
    /// of libc's 3,000 symbols for one.
    quick: [OnceLock<QuickLookup>; QUICK_LOOKUPS],
}

/// One name's functions, each as the full tables would give it.
#[derive(Debug)]
struct QuickLookup {
    name: String,
    found: Vec<FileFunction>,
}

/// What [`ElfSymbols`] reads from the symbol tables and relocations.
#[derive(Debug, Default)]
struct Tables {
    /// `R_X86_64_IRELATIVE` relocations as (slot, resolver), link-time addresses: the
    /// loader writes what the resolver returns into the slot at load time.
    irelative: Vec<(u64, u64)>,
    /// `R_X86_64_GLOB_DAT` / `R_X86_64_JUMP_SLOT` relocations as (slot, symbol name):
    /// once bound, the slot holds the address the loader resolved the name to.
    got_imports: Vec<(u64, String)>,
    /// Problems that lost some symbols but not the file (e.g. a corrupt `.gnu_debugdata`).
    warnings: Vec<String>,
    /// Sorted by `value`, one entry per address.
    functions: Vec<FileFunction>,
}

type Sections<'a> = object::read::elf::SectionTable<'a, elf::FileHeader64<Endianness>, &'a [u8]>;

impl Tables {
    /// Reads the tables; fails only when `.dynsym` is unreadable.
    fn read<'a>(
        endian: Endianness,
        data: &'a [u8],
        sections: &Sections<'a>,
        path: &Path,
    ) -> object::read::Result<Tables> {
        let (irelative, got_imports) = read_got_relocations(endian, data, sections);
        let mut raw = Vec::new();
        let mut warnings = Vec::new();
        read_table(
            endian,
            data,
            sections,
            elf::SHT_DYNSYM,
            SymbolSource::Dynsym,
            &mut raw,
        )?;
        // The exported symbols are what a loaded file needs; a damaged full table
        // only loses local names.
        if let Err(e) = read_table(
            endian,
            data,
            sections,
            elf::SHT_SYMTAB,
            SymbolSource::Symtab,
            &mut raw,
        ) {
            warnings.push(format!(".symtab of {}: {e}", path.display()));
        }
        if let Some((_, section)) = sections.section_by_name(endian, b".gnu_debugdata") {
            match section.data(endian, data) {
                Ok(compressed) => {
                    if let Err(w) = read_debugdata(compressed, &mut raw) {
                        warnings.push(format!(".gnu_debugdata of {}: {w}", path.display()));
                    }
                }
                Err(e) => warnings.push(format!(".gnu_debugdata of {}: {e}", path.display())),
            }
        }
        Ok(Tables {
            irelative,
            got_imports,
            warnings,
            functions: merge_aliases(raw),
        })
    }
}

/// A raw function symbol before aliases are merged.
struct RawFunction {
    name: String,
    value: u64,
    size: u64,
    binding: Binding,
    is_ifunc: bool,
    source: SymbolSource,
}

/// The ELF header of `data` and what it says at once.
struct Headers<'a> {
    endian: Endianness,
    sections: Sections<'a>,
    segments: Vec<LoadSegment>,
    is_dyn: bool,
    entry: u64,
}

fn read_headers<'a>(data: &'a [u8], path: &Path) -> Result<Headers<'a>, SymbolError> {
    let malformed = |e: object::read::Error| SymbolError::Malformed {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    if data.len() < 5 || &data[..4] != b"\x7fELF" || data[4] != elf::ELFCLASS64.0 {
        return Err(SymbolError::NotElf64 {
            path: path.to_path_buf(),
        });
    }
    let header = elf::FileHeader64::<Endianness>::parse(data).map_err(malformed)?;
    let endian = header.endian().map_err(malformed)?;
    let segments = header
        .program_headers(endian, data)
        .map_err(malformed)?
        .iter()
        .filter(|p| p.p_type(endian) == elf::PT_LOAD)
        .map(|p| LoadSegment {
            vaddr: p.p_vaddr(endian),
            memsz: p.p_memsz(endian),
            offset: p.p_offset(endian),
            filesz: p.p_filesz(endian),
            flags: p.p_flags(endian).0,
        })
        .collect();
    let sections = header.sections(endian, data).map_err(malformed)?;
    Ok(Headers {
        endian,
        segments,
        is_dyn: header.e_type(endian) == elf::ET_DYN,
        entry: header.e_entry(endian),
        sections,
    })
}

impl ElfSymbols {
    fn from_headers(h: &Headers<'_>, path: &Path, tables: OnceLock<Tables>) -> ElfSymbols {
        ElfSymbols {
            path: path.to_path_buf(),
            is_dyn: h.is_dyn,
            entry: h.entry,
            segments: h.segments.clone(),
            has_symtab: h
                .sections
                .iter()
                .any(|s| s.sh_type(h.endian) == elf::SHT_SYMTAB),
            has_debugdata: h
                .sections
                .section_by_name(h.endian, b".gnu_debugdata")
                .is_some(),
            image: Mutex::new(None),
            tables,
            by_name: OnceLock::new(),
            scans: AtomicUsize::new(0),
            demangled: OnceLock::new(),
            quick: Default::default(),
        }
    }

    /// Parse an ELF file image, tables included. `path` is only used in messages.
    pub fn parse(data: &[u8], path: &Path) -> Result<ElfSymbols, SymbolError> {
        let h = read_headers(data, path)?;
        let tables = Tables::read(h.endian, data, &h.sections, path).map_err(|e| {
            SymbolError::Malformed {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(ElfSymbols::from_headers(&h, path, OnceLock::from(tables)))
    }

    /// A mapped ELF file: its headers now, its tables on first use. What could make that
    /// later read fail (an unreadable `.dynsym` or version table) is checked now.
    pub fn parse_mapped(image: memmap2::Mmap, path: &Path) -> Result<ElfSymbols, SymbolError> {
        let h = read_headers(&image, path)?;
        let checked = h
            .sections
            .symbols(h.endian, &*image, elf::SHT_DYNSYM)
            .and_then(|_| h.sections.versions(h.endian, &*image).map(|_| ()));
        checked.map_err(|e| SymbolError::Malformed {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let e = ElfSymbols::from_headers(&h, path, OnceLock::new());
        drop(h);
        *e.image.lock().unwrap_or_else(|p| p.into_inner()) = Some(image);
        Ok(e)
    }

    /// Read and parse an ELF file.
    pub fn read(path: &Path) -> Result<ElfSymbols, SymbolError> {
        let data = std::fs::read(path).map_err(|source| SymbolError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        ElfSymbols::parse(&data, path)
    }

    fn tables(&self) -> &Tables {
        self.tables.get_or_init(|| {
            let image = self.image.lock().unwrap_or_else(|p| p.into_inner()).take();
            let Some(image) = image else {
                return Tables::default();
            };
            let read = read_headers(&image, &self.path)
                .map_err(|e| e.to_string())
                .and_then(|h| {
                    Tables::read(h.endian, &image, &h.sections, &self.path)
                        .map_err(|e| e.to_string())
                });
            // Checked when the file was mapped: only a file changed in place since (which
            // would break the processes mapping it too) gets here.
            read.unwrap_or_else(|e| Tables {
                warnings: vec![format!("{}: {e}", self.path.display())],
                ..Tables::default()
            })
        })
    }

    /// `R_X86_64_IRELATIVE` relocations as (slot, resolver), link-time addresses: the
    /// loader writes what the resolver returns into the slot at load time.
    pub fn irelative(&self) -> &[(u64, u64)] {
        &self.tables().irelative
    }

    /// `R_X86_64_GLOB_DAT` / `R_X86_64_JUMP_SLOT` relocations as (slot, symbol name without
    /// version): once bound, the slot holds the address the loader resolved the name to.
    pub fn got_imports(&self) -> &[(u64, String)] {
        &self.tables().got_imports
    }

    /// Problems that lost some symbols but not the file (e.g. a corrupt `.gnu_debugdata`).
    pub fn warnings(&self) -> &[String] {
        &self.tables().warnings
    }

    fn by_name(&self) -> &HashMap<String, Vec<usize>> {
        self.by_name.get_or_init(|| {
            let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
            for (i, f) in self.functions().iter().enumerate() {
                for n in &f.names {
                    by_name.entry(n.clone()).or_default().push(i);
                }
            }
            by_name
        })
    }

    /// All functions, sorted by link-time address, one per address.
    pub fn functions(&self) -> &[FileFunction] {
        &self.tables().functions
    }

    /// Functions one of whose names is exactly `name`.
    pub fn functions_named<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a FileFunction> {
        if let Some(quick) = self.quick_named(name) {
            return quick.iter().collect::<Vec<_>>().into_iter();
        }
        // A scan of every name costs 20 us for libc, the index 500 us to build: scan for
        // the first few lookups (a spec naming a function or two), index for more.
        let found: Vec<usize> = match self.by_name.get() {
            None if self.scans.fetch_add(1, Ordering::Relaxed) < SCANS_BEFORE_INDEX => self
                .functions()
                .iter()
                .enumerate()
                .filter(|(_, f)| f.names.iter().any(|n| n == name))
                .map(|(i, _)| i)
                .collect(),
            _ => self.by_name().get(name).cloned().unwrap_or_default(),
        };
        let functions = self.functions();
        found
            .into_iter()
            .map(|i| &functions[i])
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// The functions named `name` found through `.gnu.hash`, without reading the tables,
    /// when that gives what the tables would: `.dynsym` is the only table, the tables are
    /// not read yet, and `name` has no `@VERSION` (nor a replacement character, which a
    /// lossy conversion of a name may have made). `None`: ask the tables.
    fn quick_named(&self, name: &str) -> Option<&[FileFunction]> {
        if self.has_symtab
            || self.has_debugdata
            || name.is_empty()
            || name.contains(['@', char::REPLACEMENT_CHARACTER])
            || self.tables.get().is_some()
        {
            return None;
        }
        let mut computed = None;
        for slot in &self.quick {
            if let Some(q) = slot.get() {
                if q.name == name {
                    return Some(&q.found);
                }
                continue;
            }
            let found = match computed.take() {
                Some(found) => found,
                None => {
                    let image = self.image.lock().unwrap_or_else(|p| p.into_inner());
                    dynsym_named(image.as_ref()?, &self.path, name)?
                }
            };
            let name = name.to_string();
            match slot.set(QuickLookup { name, found }) {
                Ok(()) => return slot.get().map(|q| q.found.as_slice()),
                // Another thread filled the slot meanwhile: try the next one.
                Err(lost) => computed = Some(lost.found),
            }
        }
        None
    }

    /// The demangled forms of `name`, one of this file's function names, if it is a
    /// C++ or Rust symbol.
    pub fn demangled(&self, name: &str) -> Option<&crate::names::Demangled> {
        self.demangled
            .get_or_init(|| {
                self.by_name()
                    .keys()
                    .filter(|n| crate::names::looks_mangled(n))
                    .filter_map(|n| crate::names::demangle(n).map(|d| (n.clone(), d)))
                    .collect()
            })
            .get(name)
    }

    /// The function whose `[value, value + size)` covers the link-time address `value`
    /// (or that starts exactly there when its size is unknown).
    pub fn function_containing(&self, value: u64) -> Option<&FileFunction> {
        // A function found by name starts there: it is the one the tables give, which
        // spares reading them to check a probe found that way (one per address, and
        // the search below takes the one starting at `value` first).
        if self.tables.get().is_none() {
            let quick = self.quick.iter().filter_map(OnceLock::get);
            if let Some(f) = quick.flat_map(|q| &q.found).find(|f| f.value == value) {
                return Some(f);
            }
        }
        let functions = self.functions();
        let end = functions.partition_point(|f| f.value <= value);
        // Functions rarely overlap, but a few preceding entries may be labels inside a
        // bigger function (size 0 or small), so look back a little for a cover.
        functions[..end]
            .iter()
            .rev()
            .take(16)
            .find(|f| f.value == value || (value - f.value) < f.size)
    }
}

type SymbolTable<'a> = object::read::elf::SymbolTable<'a, elf::FileHeader64<Endianness>, &'a [u8]>;
type VersionTable<'a> = object::read::elf::VersionTable<'a, elf::FileHeader64<Endianness>>;

/// Append the function symbols of one table (`.dynsym` or `.symtab`).
fn read_table<'a>(
    endian: Endianness,
    data: &'a [u8],
    sections: &Sections<'a>,
    sh_type: elf::SectionType,
    source: SymbolSource,
    out: &mut Vec<RawFunction>,
) -> object::read::Result<()> {
    let table = sections.symbols(endian, data, sh_type)?;
    // Grown once: each doubling of a vector this size is fresh pages to fault in.
    out.reserve(table.len());
    let versions = if sh_type == elf::SHT_DYNSYM {
        sections.versions(endian, data)?
    } else {
        None
    };
    for (index, sym) in table.enumerate() {
        let raw = raw_function(endian, &table, versions.as_ref(), index, sym, source);
        out.extend(raw);
    }
    Ok(())
}

/// The symbol `index` of `table` as a function, if it is one.
fn raw_function(
    endian: Endianness,
    table: &SymbolTable<'_>,
    versions: Option<&VersionTable<'_>>,
    index: object::SymbolIndex,
    sym: &elf::Sym64<Endianness>,
    source: SymbolSource,
) -> Option<RawFunction> {
    let st_type = sym.st_type();
    // Only symbols typed as functions are probe sites. A `NOTYPE` label in code
    // (hand-written assembly) may sit inside another function, be reached by `jmp`,
    // or have bytes after it that its neighbour jumps into: nothing says it is an
    // entry, so it is never probed at all (stricter than entries only).
    if st_type != elf::STT_FUNC && st_type != elf::STT_GNU_IFUNC {
        return None;
    }
    if sym.st_shndx(endian) == elf::SHN_UNDEF || sym.st_value(endian) == 0 {
        return None;
    }
    let name = table.symbol_name(endian, sym).ok()?;
    if name.is_empty() {
        return None;
    }
    let mut name = String::from_utf8_lossy(name).into_owned();
    if let Some(versions) = versions {
        let vi = versions.version_index(endian, index);
        // A hidden (non-default) version is not what `dlsym` or a new link binds
        // to: keep it reachable under its explicit `name@VERSION`.
        if vi.is_hidden() {
            if let Ok(Some(v)) = versions.version(vi.index()) {
                name = format!("{name}@{}", String::from_utf8_lossy(v.name()));
            }
        }
    }
    Some(RawFunction {
        name,
        value: sym.st_value(endian),
        size: sym.st_size(endian),
        binding: Binding::from_st_bind(sym.st_bind()),
        is_ifunc: st_type == elf::STT_GNU_IFUNC,
        source,
    })
}

/// The functions of a file whose only table is `.dynsym` that have `name` (no
/// `@VERSION`) among their names, exactly as [`Tables::read`] would make them, found
/// as the dynamic loader finds a symbol: through `.gnu.hash`, whose chains hold every
/// symbol from its `symoffset` on (the few before it are compared by name). A function
/// also carries its aliases, the function symbols at the same address, found by a scan
/// of the addresses alone. `None` when the file has no usable `.gnu.hash`.
fn dynsym_named(data: &[u8], path: &Path, name: &str) -> Option<Vec<FileFunction>> {
    let h = read_headers(data, path).ok()?;
    let endian = h.endian;
    let table = h.sections.symbols(endian, data, elf::SHT_DYNSYM).ok()?;
    let versions = h.sections.versions(endian, data).ok()?;
    let hash = GnuHash::find(endian, data, &h.sections)?;
    let raw = |i: usize| {
        let index = object::SymbolIndex(i);
        let sym = table.symbol(index).ok()?;
        raw_function(
            endian,
            &table,
            versions.as_ref(),
            index,
            sym,
            SymbolSource::Dynsym,
        )
    };
    let named = hash.chain(name.as_bytes())?;
    let candidates = (0..hash.symoffset.min(table.len())).chain(named);
    let mut values: Vec<u64> = candidates
        .filter(|&i| {
            let bytes = table.symbols().get(i).map(|s| table.symbol_name(endian, s));
            matches!(bytes, Some(Ok(b)) if b == name.as_bytes())
        })
        .filter_map(|i| raw(i).filter(|r| r.name == name).map(|r| r.value))
        .collect();
    values.sort_unstable();
    values.dedup();
    let mut aliases = Vec::new();
    if !values.is_empty() {
        for (i, sym) in table.symbols().iter().enumerate() {
            if values.binary_search(&sym.st_value(endian)).is_ok() {
                aliases.extend(raw(i));
            }
        }
    }
    Some(merge_aliases(aliases))
}

/// A `.gnu.hash` section, as the dynamic loader reads it.
struct GnuHash<'a> {
    endian: Endianness,
    /// Index of the first symbol the chains hold.
    symoffset: usize,
    buckets: &'a [u8],
    chains: &'a [u8],
    /// Symbols in `.dynsym`.
    symbols: usize,
}

impl<'a> GnuHash<'a> {
    /// The `.gnu.hash` of the file's `.dynsym`, if it has one.
    fn find(endian: Endianness, data: &'a [u8], sections: &Sections<'a>) -> Option<GnuHash<'a>> {
        let dynsym = sections
            .iter()
            .position(|s| s.sh_type(endian) == elf::SHT_DYNSYM)?;
        let section = sections.iter().find(|s| {
            s.sh_type(endian) == elf::SHT_GNU_HASH && s.sh_link(endian) as usize == dynsym
        })?;
        let bytes = section.data(endian, data).ok()?;
        let word = |i| u32_at(endian, bytes, i).map(|w| w as usize);
        // Header: nbuckets, symoffset, bloom words (64-bit), bloom shift.
        let (nbuckets, symoffset, bloom) = (word(0)?, word(1)?, word(2)?);
        let buckets_at = bloom.checked_mul(8)?.checked_add(16)?;
        let chains_at = nbuckets.checked_mul(4)?.checked_add(buckets_at)?;
        Some(GnuHash {
            endian,
            symoffset,
            buckets: bytes.get(buckets_at..chains_at)?,
            chains: bytes.get(chains_at..)?,
            symbols: sections.symbols(endian, data, elf::SHT_DYNSYM).ok()?.len(),
        })
    }

    /// The indices of the symbols in `name`'s chain whose hash is `name`'s: every symbol
    /// from `symoffset` on named `name` is among them. `None` for a malformed table.
    fn chain(&self, name: &[u8]) -> Option<Vec<usize>> {
        let h = name.iter().fold(5381u32, |h, &c| {
            h.wrapping_mul(33).wrapping_add(u32::from(c))
        });
        let mut out = Vec::new();
        let nbuckets = self.buckets.len() / 4;
        if nbuckets == 0 {
            return Some(out);
        }
        let mut i = u32_at(self.endian, self.buckets, h as usize % nbuckets)? as usize;
        if i == 0 {
            return Some(out);
        }
        loop {
            if i >= self.symbols {
                return None;
            }
            let v = u32_at(self.endian, self.chains, i.checked_sub(self.symoffset)?)?;
            if v | 1 == h | 1 {
                out.push(i);
            }
            if v & 1 != 0 {
                return Some(out);
            }
            i += 1;
        }
    }
}

/// The `i`-th 32-bit word of `bytes`.
fn u32_at(endian: Endianness, bytes: &[u8], i: usize) -> Option<u32> {
    let at = i.checked_mul(4)?;
    let word = bytes.get(at..at.checked_add(4)?)?;
    Some(endian.read_u32(word.try_into().ok()?))
}

/// `(irelative, got_imports)` of [`ElfSymbols`].
type GotRelocations = (Vec<(u64, u64)>, Vec<(u64, String)>);

/// What the loader writes into this file's GOT slots, from its `SHT_RELA` sections: the
/// `R_X86_64_IRELATIVE` relocations as (slot, resolver) and the `R_X86_64_GLOB_DAT` /
/// `R_X86_64_JUMP_SLOT` ones as (slot, symbol name without version). A damaged section
/// only loses what an IFUNC is known to resolve to.
fn read_got_relocations<'a>(
    endian: Endianness,
    data: &'a [u8],
    sections: &object::read::elf::SectionTable<'a, elf::FileHeader64<Endianness>, &'a [u8]>,
) -> GotRelocations {
    let (mut irelative, mut imports) = (Vec::new(), Vec::new());
    for s in sections.iter() {
        let Ok(Some((relas, link))) = s.rela(endian, data) else {
            continue;
        };
        let symbols = sections.symbol_table_by_index(endian, data, link).ok();
        for r in relas {
            match r.r_type(endian, false) {
                elf::R_X86_64_IRELATIVE => {
                    irelative.push((r.r_offset(endian), r.r_addend(endian) as u64));
                }
                elf::R_X86_64_GLOB_DAT | elf::R_X86_64_JUMP_SLOT => {
                    let name = symbols.as_ref().and_then(|t| {
                        let sym = t.symbol(object::SymbolIndex(r.r_sym(endian, false) as usize));
                        t.symbol_name(endian, sym.ok()?).ok()
                    });
                    if let Some(n) = name.filter(|n| !n.is_empty()) {
                        imports.push((r.r_offset(endian), String::from_utf8_lossy(n).into()));
                    }
                }
                _ => {}
            }
        }
    }
    (irelative, imports)
}

/// Why the MiniDebugInfo of a file could not be read (a warning: the other tables stay).
#[derive(Debug, thiserror::Error)]
enum DebugDataError {
    #[error("xz decompression failed: {0}")]
    Xz(#[source] lzma_rs::error::Error),
    #[error(transparent)]
    Elf(#[from] object::read::Error),
}

/// Decompress MiniDebugInfo and append the functions of the embedded `.symtab`.
fn read_debugdata(compressed: &[u8], out: &mut Vec<RawFunction>) -> Result<(), DebugDataError> {
    let mut elf_image = Vec::new();
    lzma_rs::xz_decompress(&mut std::io::BufReader::new(compressed), &mut elf_image)
        .map_err(DebugDataError::Xz)?;
    let header = elf::FileHeader64::<Endianness>::parse(&elf_image[..])?;
    let endian = header.endian()?;
    let sections = header.sections(endian, &elf_image[..])?;
    read_table(
        endian,
        &elf_image,
        &sections,
        elf::SHT_SYMTAB,
        SymbolSource::DebugData,
        out,
    )?;
    Ok(())
}

/// Preference of a name among aliases of one address; smaller is better.
fn name_rank(r: &RawFunction) -> (bool, SymbolSource, bool, usize, usize) {
    let underscores = r.name.bytes().take_while(|&b| b == b'_').count();
    (
        r.binding.is_local(),
        r.source,
        r.name.contains('@'),
        underscores,
        r.name.len(),
    )
}

/// Merge symbols of the same address into one function carrying every name.
fn merge_aliases(raw: Vec<RawFunction>) -> Vec<FileFunction> {
    // Sorted by address, then by preference within each address: aliases are few, so
    // names are compared within small groups only.
    let mut raw = sorted_by_value(raw);
    for group in raw.chunk_by_mut(|a, b| a.value == b.value) {
        if group.len() > 1 {
            group.sort_by(|a, b| {
                name_rank(a)
                    .cmp(&name_rank(b))
                    .then_with(|| a.name.cmp(&b.name))
            });
        }
    }
    let mut out: Vec<FileFunction> = Vec::with_capacity(raw.len());
    for r in raw {
        match out.last_mut() {
            Some(f) if f.value == r.value => {
                f.size = f.size.max(r.size);
                f.is_ifunc |= r.is_ifunc;
                if !f.names.contains(&r.name) {
                    f.names.push(r.name);
                }
            }
            _ => out.push(FileFunction {
                names: vec![r.name],
                value: r.value,
                size: r.size,
                binding: r.binding,
                is_ifunc: r.is_ifunc,
                source: r.source,
            }),
        }
    }
    out
}

/// `raw` in the order a stable sort by value gives. Sorting the 56-byte entries moved them
/// through a scratch buffer of as many, fresh pages to fault in: that sort was 37 % of
/// reading libc's tables. (value, index) keys are unique, so an unstable sort of them
/// keeps the stable order.
fn sorted_by_value(raw: Vec<RawFunction>) -> Vec<RawFunction> {
    let mut keys: Vec<(u64, usize)> = raw.iter().map(|r| r.value).zip(0..).collect();
    keys.sort_unstable();
    let mut slots: Vec<Option<RawFunction>> = raw.into_iter().map(Some).collect();
    keys.iter().filter_map(|&(_, i)| slots[i].take()).collect()
}

/// Candidate biases for one mapping, each with a weight saying how well the mapping's
/// permissions fit the segment.
fn bias_candidates(segments: &[LoadSegment], m: &MapEntry) -> Vec<(u64, u32)> {
    let mut out = Vec::new();
    for s in segments {
        let first = page_down(s.offset);
        let file_end = s.offset.saturating_add(s.filesz);
        if m.offset < first || m.offset >= file_end.max(first + 1) {
            continue;
        }
        let link = page_down(s.vaddr).wrapping_add(m.offset - first);
        let bias = m.start.wrapping_sub(link);
        if page_down(bias) != bias {
            continue;
        }
        // A matching execute bit is the strongest hint; RELRO turns `rw` into `r`, so
        // the write bit is only a weak one.
        let mut weight = 1;
        if m.perms.exec == (s.flags & elf::PF_X.0 != 0) {
            weight += 2;
        }
        if m.perms.write == (s.flags & elf::PF_W.0 != 0) {
            weight += 1;
        }
        out.push((bias, weight));
    }
    out
}

/// Each instance of a file's mappings: its load bias, and its mappings.
type Instances<'m> = Vec<(u64, Vec<&'m MapEntry>)>;

/// The load biases (runtime address minus link-time address) of a file from its
/// mappings, with the mappings of each: every mapping is matched with the PT_LOAD
/// segments whose file range holds its offset, the biases are voted on, and each
/// mapping joins the best-supported bias it allows. Mappings split by `mprotect`
/// (RELRO), merged by the kernel, or not starting at offset 0 all work, and a file
/// loaded twice (`dlmopen`) gives two biases. Ordered by lowest mapping address.
pub fn load_biases<'m>(
    segments: &[LoadSegment],
    mappings: &[&'m MapEntry],
) -> Vec<(u64, Vec<&'m MapEntry>)> {
    let per: Vec<Vec<(u64, u32)>> = mappings
        .iter()
        .map(|m| bias_candidates(segments, m))
        .collect();
    let mut votes: HashMap<u64, u32> = HashMap::new();
    for (b, w) in per.iter().flatten() {
        *votes.entry(*b).or_default() += w;
    }
    let mut out: Vec<(u64, Vec<&MapEntry>)> = Vec::new();
    for (m, cands) in mappings.iter().zip(&per) {
        let Some(&(bias, _)) = cands.iter().max_by_key(|(b, w)| (*w, votes[b])) else {
            continue;
        };
        match out.iter_mut().find(|(b, _)| *b == bias) {
            Some((_, v)) => v.push(m),
            None => out.push((bias, vec![m])),
        }
    }
    out.sort_by_key(|(_, v)| v.iter().map(|m| m.start).min());
    out
}

/// The best-supported load bias of a file mapped once; see [`load_biases`].
pub fn load_bias(segments: &[LoadSegment], mappings: &[&MapEntry]) -> Option<u64> {
    load_biases(segments, mappings)
        .into_iter()
        .max_by_key(|(_, v)| v.len())
        .map(|(b, _)| b)
}

/// A function at its runtime address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function<'a> {
    pub address: u64,
    pub size: u64,
    /// Best name first; see [`FileFunction::names`].
    pub names: &'a [String],
    pub binding: Binding,
    pub is_ifunc: bool,
    pub source: SymbolSource,
}

impl<'a> Function<'a> {
    /// The preferred name.
    pub fn name(&self) -> &'a str {
        &self.names[0]
    }
}

/// One ELF file mapped into a process (or a file on disk for `tracer list PATH`).
#[derive(Clone, Debug)]
pub struct Module {
    /// Path as the process sees it (from maps, without ` (deleted)`), or the given path.
    pub path: String,
    /// Basename of `path`, e.g. `libc.so.6`.
    pub name: String,
    /// Lowest and one-past-highest mapped address (file-backed mappings only).
    pub start: u64,
    pub end: u64,
    /// Runtime address = link-time address + bias (wrapping).
    pub bias: u64,
    /// The process's executable (`/proc/PID/exe`), what `main:` denotes.
    pub is_main: bool,
    /// For the executable, the name the program was started under (basename of
    /// `argv[0]`) when it differs from the file's: a command that is a symlink,
    /// `redis-server` -> `redis-check-rdb`.
    pub run_as: Vec<String>,
    pub dev: u64,
    pub inode: u64,
    /// Whether the file was deleted or replaced since it was mapped.
    pub deleted: bool,
    pub elf: Arc<ElfSymbols>,
}

impl Module {
    fn at_runtime<'a>(&self, f: &'a FileFunction) -> Function<'a> {
        Function {
            address: f.value.wrapping_add(self.bias),
            size: f.size,
            names: &f.names,
            binding: f.binding,
            is_ifunc: f.is_ifunc,
            source: f.source,
        }
    }

    /// Every function, by ascending address.
    pub fn functions(&self) -> impl Iterator<Item = Function<'_>> {
        self.elf.functions().iter().map(|f| self.at_runtime(f))
    }

    /// Functions one of whose names is exactly `name`.
    pub fn functions_named<'a>(&'a self, name: &str) -> impl Iterator<Item = Function<'a>> {
        self.elf
            .functions_named(name)
            .map(move |f| self.at_runtime(f))
    }

    /// The function covering the runtime address `addr`.
    pub fn symbol_containing(&self, addr: u64) -> Option<Function<'_>> {
        if !self.contains(addr) {
            return None;
        }
        self.elf
            .function_containing(addr.wrapping_sub(self.bias))
            .map(|f| self.at_runtime(f))
    }

    /// Whether `addr` lies within the module's mapped range.
    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }
}

/// A mapped file whose symbols could not be read; the rest of the process still works.
#[derive(Debug)]
pub struct SkippedModule {
    pub path: String,
    pub error: SymbolError,
}

/// The modules of a process, or the single module of a file on disk.
#[derive(Debug)]
pub struct ProcessModules {
    /// `None` for a file on disk.
    pub pid: Option<i32>,
    /// By ascending start address.
    pub modules: Vec<Module>,
    pub skipped: Vec<SkippedModule>,
    /// The maps these modules were read from, and through which `/proc` directory (the
    /// process's, or a live thread's when the main one exited): a session that starts
    /// while the process is still stopped as it was then reads them no more (75 to 100
    /// us a read). Empty when not read from a process here.
    pub(crate) maps: Option<(String, Vec<MapEntry>)>,
}

impl ProcessModules {
    /// The maps of process `pid` as these modules were read from them, with the `/proc`
    /// directory they were read through.
    pub(crate) fn maps_of(&self, pid: i32) -> Option<(&str, &[MapEntry])> {
        match (&self.maps, self.pid) {
            (Some((dir, maps)), Some(p)) if p == pid => Some((dir, maps)),
            _ => None,
        }
    }

    /// The main executable.
    pub fn main(&self) -> Option<&Module> {
        self.modules.iter().find(|m| m.is_main)
    }

    /// Basename of the main executable (`main:` is an alias for it).
    pub fn main_name(&self) -> Option<&str> {
        self.main().map(|m| m.name.as_str())
    }

    pub fn module_containing(&self, addr: u64) -> Option<&Module> {
        self.modules.iter().find(|m| m.contains(addr))
    }

    /// The function covering a runtime address, e.g. the implementation an IFUNC
    /// resolved to (`__strlen_avx2`), with its module.
    pub fn symbol_containing(&self, addr: u64) -> Option<(&Module, Function<'_>)> {
        let m = self.module_containing(addr)?;
        m.symbol_containing(addr).map(|f| (m, f))
    }
}

/// The file-backed mappings grouped per file, in the order of first appearance; the
/// agent is the tracer's own code: not listed, never matched by a spec.
fn group_by_file(maps: &[MapEntry]) -> Vec<(FileId, Vec<&MapEntry>)> {
    let mut groups: Vec<(FileId, Vec<&MapEntry>)> = Vec::new();
    for e in maps {
        if e.inode == 0 || !e.path.starts_with('/') {
            continue;
        }
        if crate::library_file::is_agent(&e.path) || is_tracer_code(&e.path) {
            continue;
        }
        let key = FileId {
            dev: parse_dev(&e.dev),
            inode: e.inode,
            path: e.path.clone(),
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(e),
            None => groups.push((key, vec![e])),
        }
    }
    groups
}

/// One loaded instance of a file as a module; `run_as` are the names the main program
/// also runs under.
#[allow(clippy::too_many_arguments)]
fn module_instance(
    key: &FileId,
    path: &str,
    deleted: bool,
    elf: &Arc<ElfSymbols>,
    bias: u64,
    mapped: &[&MapEntry],
    is_main: bool,
    run_as: &[String],
) -> Module {
    let start = mapped.iter().map(|e| e.start).min().unwrap_or(0);
    let end = mapped.iter().map(|e| e.end).max().unwrap_or(0);
    let name = basename(path).to_string();
    let run_as = run_as.iter().filter(|n| **n != name).cloned().collect();
    Module {
        name,
        path: path.to_string(),
        start,
        end,
        bias,
        is_main,
        run_as,
        dev: key.dev,
        inode: key.inode,
        deleted,
        elf: elf.clone(),
    }
}

/// A mapped file as maps names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileId {
    dev: u64,
    inode: u64,
    path: String,
}

/// Identity of a parsed file: the same inode with the same size and modification time
/// has the same contents (a `cp` over a file keeps its inode but not its mtime).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct FileKey {
    id: FileId,
    size: u64,
    mtime_ns: i128,
}

/// Parsed files shared across attaches and resolutions.
#[derive(Debug, Default)]
pub struct SymbolCache {
    files: Mutex<HashMap<FileKey, Arc<ElfSymbols>>>,
}

impl SymbolCache {
    pub fn new() -> SymbolCache {
        SymbolCache::default()
    }

    /// The process-wide cache.
    pub fn global() -> &'static SymbolCache {
        static CACHE: OnceLock<SymbolCache> = OnceLock::new();
        CACHE.get_or_init(SymbolCache::new)
    }

    /// Number of files parsed and kept.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, Arc<ElfSymbols>>> {
        // A panic while parsing leaves no half-inserted entry, so a poisoned map is
        // still consistent.
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parse (or fetch from the cache) the file `id`, trying `sources` in order until
    /// one is that same inode and can be read.
    fn load(&self, id: &FileId, sources: &[PathBuf]) -> Result<Arc<ElfSymbols>, SymbolError> {
        let mut last = None;
        for src in sources {
            // Opened first and identified through the descriptor: a path under
            // `/proc/PID/map_files` costs a lookup (and an access check) each time it is
            // named, and stat, open and the mapping's own fstat named it twice.
            let opened = std::fs::File::open(src).and_then(|f| Ok((f.metadata()?, f)));
            let (meta, file) = match opened {
                Ok(m) => m,
                Err(e) => {
                    last = Some((src.clone(), e));
                    continue;
                }
            };
            if (meta.dev(), meta.ino()) != (id.dev, id.inode) {
                // The path now names another file (replaced since it was mapped).
                last = Some((
                    src.clone(),
                    std::io::Error::other("the file was replaced after it was mapped"),
                ));
                continue;
            }
            let key = FileKey {
                id: id.clone(),
                size: meta.len(),
                mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
            };
            if let Some(e) = self.lock().get(&key) {
                return Ok(e.clone());
            }
            match map_open_file(&file, meta.len()) {
                Ok(data) => {
                    let parsed = Arc::new(ElfSymbols::parse_mapped(data, Path::new(&id.path))?);
                    self.lock().insert(key, parsed.clone());
                    return Ok(parsed);
                }
                Err(e) => last = Some((src.clone(), e)),
            }
        }
        let (path, source) = last.unwrap_or_else(|| {
            (
                PathBuf::from(&id.path),
                std::io::Error::from(std::io::ErrorKind::NotFound),
            )
        });
        Err(SymbolError::Read { path, source })
    }

    /// The modules of a running process.
    pub fn process(&self, pid: i32) -> Result<ProcessModules, SymbolError> {
        let dir = crate::process_kind::proc_dir(pid);
        let maps = crate::proc_text::read(format!("{dir}/maps"))
            .and_then(|text| {
                agent::maps::parse(&text)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .map_err(|source| SymbolError::Maps { pid, source })?;
        let mut pm = self.process_from_maps_in(pid, &dir, &maps);
        pm.maps = Some((dir, maps));
        Ok(pm)
    }

    /// The modules of a process whose maps were already read.
    pub fn process_from_maps(&self, pid: i32, maps: &[MapEntry]) -> ProcessModules {
        self.process_from_maps_in(pid, &crate::process_kind::proc_dir(pid), maps)
    }

    /// [`Self::process_from_maps`] with the process's `/proc` directory already found.
    fn process_from_maps_in(&self, pid: i32, dir: &str, maps: &[MapEntry]) -> ProcessModules {
        let exe = std::fs::metadata(format!("{dir}/exe"))
            .ok()
            .map(|m| (m.dev(), m.ino()));
        let run_as = names_run_as(pid);

        let mut modules = Vec::new();
        let mut skipped = Vec::new();
        for (key, entries) in group_by_file(maps) {
            // Data files (locale archive, caches) are never executable: skip them
            // without reading them.
            if !entries.iter().any(|e| e.perms.exec) {
                continue;
            }
            let (path, deleted) = match key.path.strip_suffix(" (deleted)") {
                Some(p) => (p.to_string(), true),
                None => (key.path.clone(), false),
            };
            let (elf, instances) = match self.load_mapped(dir, &key, &path, &entries) {
                Ok(loaded) => loaded,
                Err(error) => {
                    skipped.push(SkippedModule { path, error });
                    continue;
                }
            };
            let is_main = exe == Some((key.dev, key.inode));
            for (bias, mapped) in instances {
                // A stray mapping that joined no executable instance is not a module.
                if !mapped.iter().any(|e| e.perms.exec) {
                    continue;
                }
                let main_names = if is_main { &run_as[..] } else { &[] };
                modules.push(module_instance(
                    &key, &path, deleted, &elf, bias, &mapped, is_main, main_names,
                ));
            }
        }
        modules.sort_by_key(|m| m.start);
        ProcessModules {
            pid: Some(pid),
            modules,
            skipped,
            maps: None,
        }
    }

    /// The ELF file mapped as `entries` (at `path` in the process whose `/proc` directory
    /// is `dir`), and the mappings of each instance of it by load bias.
    fn load_mapped<'m>(
        &self,
        dir: &str,
        key: &FileId,
        path: &str,
        entries: &[&'m MapEntry],
    ) -> Result<(Arc<ElfSymbols>, Instances<'m>), SymbolError> {
        let first = entries[0];
        // map_files names exactly the mapped inode, even deleted or in another
        // mount namespace; /proc/PID/root is the fallback when it is not readable.
        let sources = [
            PathBuf::from(format!("{dir}/map_files/{:x}-{:x}", first.start, first.end)),
            PathBuf::from(format!("{dir}/root{path}")),
        ];
        let elf = self.load(key, &sources)?;
        let instances = load_biases(&elf.segments, entries);
        if instances.is_empty() {
            return Err(SymbolError::NoLoadBias {
                path: PathBuf::from(path),
            });
        }
        Ok((elf, instances))
    }

    /// An ELF file on disk, as one module at bias 0 (link-time addresses), marked as
    /// the main module so that `main:` works on it too.
    pub fn file(&self, path: &Path) -> Result<ProcessModules, SymbolError> {
        let meta = std::fs::metadata(path).map_err(|source| SymbolError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let shown = path.to_string_lossy().into_owned();
        let id = FileId {
            dev: meta.dev(),
            inode: meta.ino(),
            path: shown.clone(),
        };
        let elf = self.load(&id, &[path.to_path_buf()])?;
        let start = elf.segments.iter().map(|s| s.vaddr).min().unwrap_or(0);
        let end = elf
            .segments
            .iter()
            .map(|s| s.vaddr.saturating_add(s.memsz))
            .max()
            .unwrap_or(0);
        Ok(ProcessModules {
            pid: None,
            modules: vec![Module {
                name: basename(&shown).to_string(),
                path: shown,
                start,
                end,
                bias: 0,
                is_main: true,
                run_as: Vec::new(),
                dev: meta.dev(),
                inode: meta.ino(),
                deleted: false,
                elf,
            }],
            skipped: Vec::new(),
            maps: None,
        })
    }
}

/// The agent's trampoline pages and the agent thread's park page: code a tracer wrote,
/// never an ELF file, whose reading as one only failed.
fn is_tracer_code(path: &str) -> bool {
    let name = path.strip_suffix(" (deleted)").unwrap_or(path);
    name == "/memfd:tracer-code" || name == format!("/memfd:{}", crate::agent_thread::PARK_NAME)
}

/// The bytes of the file at `path`, mapped rather than read: parsing touches the headers
/// and symbol tables only, and reading all of libc (2 MB) took about 1 ms per file.
pub fn map_file(path: &Path) -> std::io::Result<memmap2::Mmap> {
    let f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    map_open_file(&f, len)
}

/// [`map_file`] of a file already open, whose length is known.
fn map_open_file(f: &std::fs::File, len: u64) -> std::io::Result<memmap2::Mmap> {
    let mut options = memmap2::MmapOptions::new();
    // With the length given, memmap2 does not fstat the file again; an empty file keeps
    // memmap2's own handling of a zero length.
    if let Ok(len @ 1..) = usize::try_from(len) {
        options.len(len);
    }
    // SAFETY: a private read-only view. A file truncated in place while mapped would fault
    // (SIGBUS) when read, possibly mid-session now that a module's tables are read on
    // first use; it would equally break every process that maps it, the target first.
    // Libraries are replaced (a new inode) on upgrade, not rewritten in place.
    unsafe { options.map(f) }
}

/// The modules of a running process, through the global cache.
pub fn process_modules(pid: i32) -> Result<ProcessModules, SymbolError> {
    SymbolCache::global().process(pid)
}

/// An ELF file on disk, through the global cache.
pub fn file_modules(path: &Path) -> Result<ProcessModules, SymbolError> {
    SymbolCache::global().file(path)
}

/// The name process `pid` was started under: the basename of its `argv[0]`. Not
/// `comm`: for a script, `comm` is the script's name while the image is its
/// interpreter's (and the kernel puts the interpreter in `argv[0]`). A rewritten
/// `argv[0]` with spaces (`postgres: checkpointer`) names nothing.
fn names_run_as(pid: i32) -> Vec<String> {
    let Ok(cmdline) = crate::proc_text::read_bytes(format!("/proc/{pid}/cmdline")) else {
        return Vec::new();
    };
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let name = basename(&String::from_utf8_lossy(argv0)).to_string();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Vec::new();
    }
    vec![name]
}

fn basename(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// `major:minor` in hex, as in maps, to the `st_dev` encoding of stat.
fn parse_dev(dev: &str) -> u64 {
    let Some((maj, min)) = dev.split_once(':') else {
        return 0;
    };
    let (Ok(maj), Ok(min)) = (u32::from_str_radix(maj, 16), u32::from_str_radix(min, 16)) else {
        return 0;
    };
    libc::makedev(maj, min)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(start: u64, end: u64, perms: &str, offset: u64) -> MapEntry {
        let line = format!("{start:x}-{end:x} {perms} {offset:x} fd:01 7 /lib/x.so");
        agent::maps::parse_line(&line).unwrap()
    }

    fn seg(vaddr: u64, offset: u64, filesz: u64, flags: u32) -> LoadSegment {
        LoadSegment {
            vaddr,
            memsz: filesz,
            offset,
            filesz,
            flags,
        }
    }

    #[test]
    fn bias_from_libc_like_layout_with_relro_split() {
        // The layout of Debian's libc.so.6, its data segment split by RELRO.
        let segs = [
            seg(0, 0, 0x25388, elf::PF_R.0),
            seg(0x26000, 0x26000, 0x1550fc, elf::PF_R.0 | elf::PF_X.0),
            seg(0x17c000, 0x17c000, 0x52c31, elf::PF_R.0),
            seg(0x1cf8d0, 0x1cf8d0, 0x4f98, elf::PF_R.0 | elf::PF_W.0),
        ];
        let b = 0x7f00_0000_0000;
        let maps = [
            map(b, b + 0x26000, "r--p", 0),
            map(b + 0x26000, b + 0x17c000, "r-xp", 0x26000),
            map(b + 0x17c000, b + 0x1cf000, "r--p", 0x17c000),
            map(b + 0x1cf000, b + 0x1d3000, "r--p", 0x1cf000),
            map(b + 0x1d3000, b + 0x1d5000, "rw-p", 0x1d3000),
        ];
        let refs: Vec<&MapEntry> = maps.iter().collect();
        assert_eq!(load_bias(&segs, &refs), Some(b));
        // Without the first mapping (e.g. it was unmapped) the answer is the same.
        assert_eq!(load_bias(&segs, &refs[1..]), Some(b));
    }

    #[test]
    fn bias_when_vaddr_and_offset_differ_and_non_pie() {
        // Data segment at vaddr = offset + 0x1000, the usual ld layout; ET_EXEC at 0x400000.
        let segs = [
            seg(0x400000, 0, 0x600, elf::PF_R.0),
            seg(0x401000, 0x1000, 0x200, elf::PF_R.0 | elf::PF_X.0),
            seg(0x403df0, 0x2df0, 0x230, elf::PF_R.0 | elf::PF_W.0),
        ];
        let maps = [
            map(0x401000, 0x402000, "r-xp", 0x1000),
            map(0x403000, 0x404000, "r--p", 0x2000),
            map(0x404000, 0x405000, "rw-p", 0x3000),
        ];
        let refs: Vec<&MapEntry> = maps.iter().collect();
        assert_eq!(load_bias(&segs, &refs), Some(0));
    }

    #[test]
    fn a_file_loaded_twice_gives_two_biases() {
        let segs = [
            seg(0, 0, 0x500, elf::PF_R.0),
            seg(0x1000, 0x1000, 0x300, elf::PF_R.0 | elf::PF_X.0),
            seg(0x2e10, 0x1e10, 0x220, elf::PF_R.0 | elf::PF_W.0),
        ];
        let (a, b) = (0x7f00_0000_0000, 0x7f10_0000_0000);
        let maps = [
            map(a, a + 0x1000, "r--p", 0),
            map(a + 0x1000, a + 0x2000, "r-xp", 0x1000),
            map(a + 0x2000, a + 0x3000, "r--p", 0x1000),
            map(a + 0x3000, a + 0x4000, "rw-p", 0x2000),
            map(b, b + 0x1000, "r--p", 0),
            map(b + 0x1000, b + 0x2000, "r-xp", 0x1000),
            map(b + 0x2000, b + 0x3000, "r--p", 0x1000),
            map(b + 0x3000, b + 0x4000, "rw-p", 0x2000),
        ];
        let refs: Vec<&MapEntry> = maps.iter().collect();
        let got = load_biases(&segs, &refs);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!((got[0].0, got[0].1.len()), (a, 4));
        assert_eq!((got[1].0, got[1].1.len()), (b, 4));
    }

    #[test]
    fn no_bias_when_nothing_lines_up() {
        let segs = [seg(0x1000, 0x1000, 0x100, elf::PF_R.0 | elf::PF_X.0)];
        let maps = [map(0x7000, 0x8000, "r-xp", 0x9000)];
        let refs: Vec<&MapEntry> = maps.iter().collect();
        assert_eq!(load_bias(&segs, &refs), None);
    }

    #[test]
    fn aliases_merge_and_keep_every_name() {
        let raw = |name: &str, value, size, binding, source| RawFunction {
            name: name.to_string(),
            value,
            size,
            binding,
            is_ifunc: false,
            source,
        };
        let merged = merge_aliases(vec![
            raw(
                "__libc_malloc",
                0x100,
                0,
                Binding::Global,
                SymbolSource::Symtab,
            ),
            raw("malloc", 0x100, 0x40, Binding::Global, SymbolSource::Dynsym),
            raw(
                "__malloc",
                0x100,
                0x40,
                Binding::Local,
                SymbolSource::Symtab,
            ),
            raw("free", 0x200, 0x10, Binding::Weak, SymbolSource::Dynsym),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].names, ["malloc", "__libc_malloc", "__malloc"]);
        assert_eq!(merged[0].size, 0x40);
        assert_eq!(merged[0].source, SymbolSource::Dynsym);
        assert_eq!(merged[1].names, ["free"]);
    }

    #[test]
    fn rejects_non_elf_and_short_input() {
        assert!(matches!(
            ElfSymbols::parse(b"#!/bin/sh\n", Path::new("x")),
            Err(SymbolError::NotElf64 { .. })
        ));
        assert!(matches!(
            ElfSymbols::parse(b"\x7fELF\x02\x01", Path::new("x")),
            Err(SymbolError::Malformed { .. })
        ));
    }

    #[test]
    fn own_process_functions_resolve_to_real_addresses() {
        let pid = std::process::id() as i32;
        let cache = SymbolCache::new();
        let pm = cache.process(pid).unwrap();
        let main = pm.main().expect("main module");
        assert!(main.path.ends_with(&main.name));
        // libc's malloc, as the dynamic linker resolved it for this process.
        let libc_malloc = libc::malloc as *const () as usize as u64;
        let (m, f) = pm.symbol_containing(libc_malloc).expect("malloc covered");
        assert!(m.name.starts_with("libc"), "{}", m.name);
        assert_eq!(f.address, libc_malloc);
        assert!(f.names.iter().any(|n| n == "malloc"), "{:?}", f.names);
        assert!(f.size > 0);
        let again = cache.process(pid).unwrap();
        let m2 = again.modules.iter().find(|x| x.path == m.path).unwrap();
        assert!(Arc::ptr_eq(&m.elf, &m2.elf), "libc was parsed twice");
    }

    /// A module's tables are read when first asked for, and then say exactly what
    /// reading the whole file at once says.
    #[test]
    fn tables_read_on_first_use_equal_those_read_at_once() {
        let pid = std::process::id() as i32;
        let pm = SymbolCache::new().process(pid).unwrap();
        let libc = pm
            .modules
            .iter()
            .find(|m| m.name.starts_with("libc.so"))
            .expect("libc mapped");
        assert!(
            libc.elf.tables.get().is_none(),
            "libc's tables read before use"
        );
        let lazy = &libc.elf;
        let eager = ElfSymbols::read(Path::new(&libc.path)).unwrap();
        let names = [
            "malloc",
            "free",
            "memcpy",
            "memcpy@GLIBC_2.2.5",
            "no such name",
        ];
        let scanned: Vec<Vec<&FileFunction>> = names
            .iter()
            .map(|n| lazy.functions_named(n).collect())
            .collect();
        assert!(lazy.by_name.get().is_none(), "indexed for a few lookups");
        assert!(!scanned[0].is_empty());
        for _ in 0..SCANS_BEFORE_INDEX {
            let _ = lazy.functions_named("malloc").count();
        }
        assert!(lazy.by_name.get().is_some(), "never indexed");
        for (n, s) in names.iter().zip(&scanned) {
            assert_eq!(&lazy.functions_named(n).collect::<Vec<_>>(), s, "{n}");
        }
        assert_eq!(lazy.functions(), eager.functions());
        assert_eq!(lazy.irelative(), eager.irelative());
        assert_eq!(lazy.got_imports(), eager.got_imports());
        assert_eq!(lazy.warnings(), eager.warnings());
        assert_eq!(
            (
                lazy.has_symtab,
                lazy.has_debugdata,
                lazy.entry,
                &lazy.segments
            ),
            (
                eager.has_symtab,
                eager.has_debugdata,
                eager.entry,
                &eager.segments
            )
        );
    }

    /// Every exported function name of every `.dynsym`-only module of this process (libc
    /// and the loader here), found through `.gnu.hash`, gives what the full tables give:
    /// the same addresses, sizes, names in order, binding, IFUNC flag.
    #[test]
    fn gnu_hash_lookups_equal_the_tables_for_every_name() {
        let pm = SymbolCache::new()
            .process(std::process::id() as i32)
            .unwrap();
        let mut compared = Vec::new();
        for m in &pm.modules {
            if m.elf.has_symtab || m.elf.has_debugdata {
                continue;
            }
            let path = Path::new(&m.path);
            let eager = ElfSymbols::read(path).unwrap();
            let image = map_file(path).unwrap();
            let mut names = 0;
            for n in eager.functions().iter().flat_map(|f| &f.names) {
                if n.contains('@') {
                    continue;
                }
                let tables: Vec<FileFunction> = eager.functions_named(n).cloned().collect();
                assert_eq!(dynsym_named(&image, path, n), Some(tables), "{n}");
                names += 1;
            }
            assert_eq!(dynsym_named(&image, path, "no such name"), Some(Vec::new()));
            compared.push((m.name.clone(), names));
        }
        assert!(
            compared
                .iter()
                .any(|(m, n)| m.starts_with("libc.so") && *n > 1000),
            "libc not compared: {compared:?}"
        );
    }

    /// A spec's lookup and the check of the probe it finds (is a function there?) leave
    /// libc's tables unread and answer what the tables answer.
    #[test]
    fn a_name_and_its_address_are_found_without_reading_the_tables() {
        let pm = SymbolCache::new()
            .process(std::process::id() as i32)
            .unwrap();
        let libc = pm
            .modules
            .iter()
            .find(|m| m.name.starts_with("libc.so"))
            .expect("libc mapped");
        let eager = ElfSymbols::read(Path::new(&libc.path)).unwrap();
        for name in ["malloc", "memcpy", "free", "no such name"] {
            let quick: Vec<Function> = libc.functions_named(name).collect();
            let again: Vec<Function> = libc.functions_named(name).collect();
            assert_eq!(quick, again);
            let tables: Vec<&FileFunction> = eager.functions_named(name).collect();
            assert_eq!(quick.len(), tables.len(), "{name}");
            for (q, t) in quick.iter().zip(&tables) {
                assert_eq!(q.address, t.value.wrapping_add(libc.bias));
                assert_eq!(
                    (q.size, q.names, q.is_ifunc),
                    (t.size, &t.names[..], t.is_ifunc)
                );
                assert_eq!(libc.symbol_containing(q.address), Some(*q));
            }
        }
        if !libc.elf.has_symtab && !libc.elf.has_debugdata {
            assert!(libc.elf.tables.get().is_none(), "libc's tables were read");
        }
        // With the tables read, the same answers.
        let first = libc.functions_named("malloc").next().unwrap();
        assert!(!libc.elf.functions().is_empty());
        assert_eq!(libc.functions_named("malloc").next(), Some(first));
        assert_eq!(libc.symbol_containing(first.address), Some(first));
    }
}

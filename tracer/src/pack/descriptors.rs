//! Reading a pack's descriptors from its ELF file, before anything touches the target.
//!
//! A wrong or missing descriptor is refused here, with a message naming the problem and
//! what to do, so that a bad pack never reaches `dlopen` in a live process.

use super::format::{parse_format, Piece};
use crate::spec::ProbeSpec;
use object::{Object, ObjectSection, ObjectSymbol};
use probes::pack::abi::{
    self, desc_kind, map_kind, probe_kind, Descriptor, ABI_VERSION, DESCRIPTOR_SIZE, DESC_MAGIC,
    NAME_LEN, TEXT_LEN,
};
use probes::ProbeKind;
use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

/// A handler the pack declares.
#[derive(Clone, Debug, PartialEq)]
pub struct ProbeDesc {
    pub kind: ProbeKind,
    /// The Rust function's name.
    pub handler: String,
    /// Its exported `extern "C"` shim.
    pub symbol: String,
    pub spec: ProbeSpec,
    /// [`probes::pack::abi::probe_flags`], passed on to the agent with the shim.
    pub flags: u64,
}

/// A map the pack declares.
#[derive(Clone, Debug, PartialEq)]
pub struct MapDesc {
    /// The static's name.
    pub name: String,
    /// [`probes::pack::abi::map_kind`].
    pub kind: u32,
    pub params: [u64; 4],
    /// The exported handle the agent binds.
    pub symbol: String,
}

impl MapDesc {
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            map_kind::COUNTER => "counter",
            map_kind::HIST_LOG2 => "hist_log2",
            map_kind::HIST_LINEAR => "hist_linear",
            map_kind::HASH => "hash",
            _ => "unknown",
        }
    }
}

/// An `emit!` site's format.
#[derive(Clone, Debug, PartialEq)]
pub struct FormatDesc {
    pub id: u32,
    pub file: String,
    pub line: u32,
    pub nargs: usize,
    pub text: String,
    pub pieces: Vec<Piece>,
}

/// Everything a pack declares.
#[derive(Clone, Debug, PartialEq)]
pub struct PackInfo {
    pub path: PathBuf,
    pub probes: Vec<ProbeDesc>,
    pub maps: Vec<MapDesc>,
    pub formats: BTreeMap<u32, FormatDesc>,
    /// Whether the pack exports the event ring (any pack built with `probes` does).
    pub has_ring: bool,
}

#[derive(Debug)]
pub enum PackError {
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    NotElf {
        path: PathBuf,
        reason: String,
    },
    NotAPack {
        path: PathBuf,
    },
    Abi {
        path: PathBuf,
        found: u32,
    },
    Malformed {
        path: PathBuf,
        what: String,
    },
    /// A descriptor that does not read (`DescError` says which and why).
    Descriptor {
        path: PathBuf,
        source: DescError,
    },
    /// A directory given as a pack is not a crate.
    NoCargoToml {
        path: PathBuf,
    },
    /// Cargo could not be started to build a pack crate.
    Cargo {
        cargo: String,
        path: PathBuf,
        source: std::io::Error,
    },
    /// Cargo ran and failed (its errors went to stderr).
    BuildFailed {
        path: PathBuf,
    },
    /// The crate built but is not a cdylib.
    NoCdylib {
        path: PathBuf,
    },
}

impl fmt::Display for PackError {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            PackError::Read { path, source } => write!(f, "cannot read {}: {source}", path.display()),
            PackError::NotElf { path, reason } => write!(
                f,
                "{} is not a probe pack: not an ELF shared library ({reason}); give the crate directory or its target/release/lib*.so",
                path.display()
            ),
            PackError::NotAPack { path } => write!(
                f,
                "{} is not a probe pack (no {} section): a pack is a cdylib using probes::prelude with at least one #[entry], #[exit], #[at] or #[map]",
                path.display(),
                abi::SECTION
            ),
            PackError::Abi { path, found } => write!(
                f,
                "{} was built against probes ABI v{found}, this tracer speaks v{ABI_VERSION}: rebuild it against this tracer's probes crate",
                path.display()
            ),
            PackError::Malformed { path, what } => {
                write!(f, "{} has a malformed probe pack descriptor: {what}; rebuild it", path.display())
            }
            PackError::Descriptor { path, source } => {
                write!(f, "{} has a malformed probe pack descriptor: {source}; rebuild it", path.display())
            }
            PackError::NoCargoToml { path } => write!(
                f,
                "{} is a directory without Cargo.toml: give a pack crate's directory or its .so",
                path.display()
            ),
            PackError::Cargo { cargo, path, source } => write!(
                f,
                "cannot run {cargo} to build the pack {}: {source}",
                path.display()
            ),
            PackError::BuildFailed { path } => write!(
                f,
                "building the pack {} failed (cargo's errors above)",
                path.display()
            ),
            PackError::NoCdylib { path } => write!(
                f,
                "{} built no cdylib: a pack's Cargo.toml needs [lib] crate-type = [\"cdylib\"]",
                path.display()
            ),
        }
    }
}

impl std::error::Error for PackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            PackError::Read { source, .. } | PackError::Cargo { source, .. } => Some(source),
            PackError::Descriptor { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Read and check the descriptors of the pack at `path`.
pub fn read_pack(path: &Path) -> Result<PackInfo, PackError> {
    let data = std::fs::read(path).map_err(|source| PackError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_pack(path, &data)
}

/// [`read_pack`] on the file's bytes.
pub fn parse_pack(path: &Path, data: &[u8]) -> Result<PackInfo, PackError> {
    let file = object::File::parse(data).map_err(|e| PackError::NotElf {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let section = file
        .section_by_name(abi::SECTION)
        .ok_or_else(|| PackError::NotAPack {
            path: path.to_owned(),
        })?;
    let bytes = section.data().map_err(|e| PackError::Malformed {
        path: path.to_owned(),
        what: format!("section {} unreadable: {e}", abi::SECTION),
    })?;
    let exported: HashSet<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_owned))
        .collect();
    let mut info = parse_descriptors(bytes).map_err(|what| match what {
        DescError::Abi(found) => PackError::Abi {
            path: path.to_owned(),
            found,
        },
        DescError::Bad(what) => PackError::Malformed {
            path: path.to_owned(),
            what,
        },
        source => PackError::Descriptor {
            path: path.to_owned(),
            source,
        },
    })?;
    info.path = path.to_owned();
    info.has_ring = exported.contains(abi::RING_SYMBOL);
    let missing = info
        .probes
        .iter()
        .map(|p| &p.symbol)
        .chain(info.maps.iter().map(|m| &m.symbol))
        .map(String::as_str)
        .chain([probes::pack::shim::INIT_SYMBOL])
        .find(|s| !exported.contains(*s));
    if let Some(s) = missing {
        return Err(PackError::Malformed {
            path: path.to_owned(),
            what: format!("symbol {s} is declared but not exported"),
        });
    }
    if !info.formats.is_empty() && !info.has_ring {
        return Err(PackError::Malformed {
            path: path.to_owned(),
            what: format!("it emits events but does not export {}", abi::RING_SYMBOL),
        });
    }
    Ok(info)
}

/// Why the descriptors section does not read.
#[derive(Debug, thiserror::Error)]
pub enum DescError {
    /// Built for another pack ABI version.
    #[error("pack ABI version {0}")]
    Abi(u32),
    #[error("{0}")]
    Bad(String),
    #[error("probe {name}: {source}")]
    Spec {
        name: String,
        source: crate::spec::SpecError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: String,
        source: probes::pack::abi::PlanError,
    },
}

fn field(b: &[u8]) -> Result<String, DescError> {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..end])
        .map(str::to_owned)
        .map_err(|_| DescError::Bad("a name or text is not UTF-8".into()))
}

/// Decode the raw section: fixed-size descriptors, all-zero entries (alignment padding)
/// skipped. The ABI version is checked before anything else of an entry is trusted.
pub fn parse_descriptors(bytes: &[u8]) -> Result<PackInfo, DescError> {
    let mut info = PackInfo {
        path: PathBuf::new(),
        probes: Vec::new(),
        maps: Vec::new(),
        formats: BTreeMap::new(),
        has_ring: false,
    };
    if !bytes.len().is_multiple_of(DESCRIPTOR_SIZE) {
        return Err(DescError::Bad(format!(
            "section is {} bytes, not a multiple of {DESCRIPTOR_SIZE}",
            bytes.len()
        )));
    }
    for chunk in bytes.chunks_exact(DESCRIPTOR_SIZE) {
        if chunk.iter().all(|&b| b == 0) {
            continue;
        }
        let d = decode(chunk);
        if d.magic != DESC_MAGIC {
            return Err(DescError::Bad("bad magic".into()));
        }
        if d.abi != ABI_VERSION {
            return Err(DescError::Abi(d.abi));
        }
        add_descriptor(&mut info, &d)?;
    }
    if info.probes.is_empty() && info.maps.is_empty() {
        return Err(DescError::Bad("it declares no probe and no map".into()));
    }
    Ok(info)
}

fn decode(chunk: &[u8]) -> Descriptor {
    let u32_at = |o: usize| u32::from_le_bytes(chunk[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(chunk[o..o + 8].try_into().unwrap());
    let mut name = [0u8; NAME_LEN];
    let mut text = [0u8; TEXT_LEN];
    name.copy_from_slice(&chunk[48..48 + NAME_LEN]);
    text.copy_from_slice(&chunk[48 + NAME_LEN..48 + NAME_LEN + TEXT_LEN]);
    Descriptor {
        magic: u32_at(0),
        abi: u32_at(4),
        kind: u32_at(8),
        sub: u32_at(12),
        params: [u64_at(16), u64_at(24), u64_at(32), u64_at(40)],
        name,
        text,
    }
}

fn add_descriptor(info: &mut PackInfo, d: &Descriptor) -> Result<(), DescError> {
    let name = field(&d.name)?;
    let text = field(&d.text)?;
    match d.kind {
        desc_kind::PROBE => info.probes.push(probe_desc(d, name, &text)?),
        desc_kind::MAP => info.maps.push(map_desc(d, name)?),
        desc_kind::FORMAT => {
            let f = format_desc(d, name, text)?;
            if let Some(old) = info.formats.get(&f.id) {
                if *old != f {
                    return Err(DescError::Bad(format!("two formats share id {:#x}", f.id)));
                }
            }
            info.formats.insert(f.id, f);
        }
        k => return Err(DescError::Bad(format!("unknown descriptor kind {k}"))),
    }
    Ok(())
}

/// A probe descriptor: its kind, and the spec of where it goes (`text`).
fn probe_desc(d: &Descriptor, name: String, text: &str) -> Result<ProbeDesc, DescError> {
    let kind = match d.sub {
        probe_kind::ENTRY => ProbeKind::Entry,
        probe_kind::EXIT => ProbeKind::Exit,
        probe_kind::AT => ProbeKind::Offset,
        k => return Err(DescError::Bad(format!("probe {name}: unknown kind {k}"))),
    };
    let spec = ProbeSpec::parse(text).map_err(|source| DescError::Spec {
        name: name.clone(),
        source,
    })?;
    Ok(ProbeDesc {
        kind,
        symbol: format!("{}{name}", abi::PROBE_SYMBOL_PREFIX),
        handler: name,
        spec,
        flags: d.params[0],
    })
}

/// A map descriptor, once its kind and parameters give it a size.
fn map_desc(d: &Descriptor, name: String) -> Result<MapDesc, DescError> {
    abi::map_size(d.sub, &d.params).map_err(|source| DescError::Map {
        name: name.clone(),
        source,
    })?;
    Ok(MapDesc {
        symbol: format!("{}{name}", abi::MAP_SYMBOL_PREFIX),
        name,
        kind: d.sub,
        params: d.params,
    })
}

/// An `emit!` format descriptor (`name` is its source file), its placeholders counted
/// against what the descriptor says.
fn format_desc(d: &Descriptor, name: String, text: String) -> Result<FormatDesc, DescError> {
    let pieces =
        parse_format(&text).map_err(|e| DescError::Bad(format!("format {text:?}: {e}")))?;
    let nargs = pieces.iter().filter(|p| matches!(p, Piece::Arg(_))).count();
    if nargs != d.sub as usize {
        return Err(DescError::Bad(format!(
            "format {text:?} has {nargs} placeholders, descriptor says {}",
            d.sub
        )));
    }
    Ok(FormatDesc {
        id: d.params[0] as u32,
        file: name,
        line: d.params[1] as u32,
        nargs,
        text,
        pieces,
    })
}

/// The region layout the agent creates for this pack.
pub fn plan_for(info: &PackInfo, ring_bytes: usize) -> Result<abi::Plan, abi::PlanError> {
    let maps: Vec<_> = info.maps.iter().map(|m| (m.kind, m.params)).collect();
    abi::plan(&maps, ring_bytes)
}

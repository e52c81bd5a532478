//! Parameter names and types of traced functions from the DWARF of their object file
//! (`gimli`), when it has any.
//!
//! Only what registers can show is decoded: integer, character, boolean, enumeration,
//! pointer and floating-point parameters. A function taking a structure or union by value
//! (which moves the following arguments around) gets no signature here, and is traced
//! with the next source (prototypes, then raw registers).

use super::signature::{ArgType, Param, Signature, Source};
use gimli::{constants as dw, AttributeValue, EndianSlice, LittleEndian, UnitOffset};
use object::{Object, ObjectSection};
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;

type R<'a> = EndianSlice<'a, LittleEndian>;
type Unit<'a> = gimli::Unit<R<'a>>;

/// The signature of each function of `wanted` (addresses as in the file: DW_AT_low_pc)
/// that the file's DWARF describes.
pub fn signatures(path: &Path, wanted: &HashSet<u64>) -> HashMap<u64, Signature> {
    let Ok(file) = std::fs::File::open(path) else {
        return HashMap::new();
    };
    // SAFETY: a read-only private mapping of a file; a file changed under it gives wrong
    // bytes, which the parser treats as bad DWARF.
    let Ok(map) = (unsafe { memmap2::Mmap::map(&file) }) else {
        return HashMap::new();
    };
    let Ok(obj) = object::File::parse(&*map) else {
        return HashMap::new();
    };
    if obj.section_by_name(".debug_info").is_none() {
        return HashMap::new();
    }
    let sections = gimli::DwarfSections::load(|id| {
        Ok::<_, ()>(
            obj.section_by_name(id.name())
                .and_then(|s| s.uncompressed_data().ok())
                .unwrap_or(Cow::Borrowed(&[])),
        )
    });
    let Ok(sections) = sections else {
        return HashMap::new();
    };
    let dwarf = sections.borrow(|s| EndianSlice::new(s, LittleEndian));
    let mut out = HashMap::new();
    let mut units = dwarf.units();
    while let Ok(Some(header)) = units.next() {
        let Ok(unit) = dwarf.unit(header) else {
            continue;
        };
        let mut subprograms = Vec::new();
        let mut cursor = unit.entries();
        while let Ok(Some(e)) = cursor.next_dfs() {
            if e.tag() != dw::DW_TAG_subprogram {
                continue;
            }
            let Some(low) = e.attr_value(dw::DW_AT_low_pc) else {
                continue;
            };
            if let Ok(Some(pc)) = dwarf.attr_address(&unit, low) {
                if wanted.contains(&pc) && !out.contains_key(&pc) {
                    subprograms.push((pc, e.offset()));
                }
            }
        }
        for (pc, off) in subprograms {
            if let Some(sig) = subprogram(&dwarf, &unit, off) {
                out.insert(pc, sig);
            }
        }
    }
    out
}

/// The entry an attribute refers to in the same unit (cross-unit references are not
/// followed).
fn unit_ref(e: &gimli::DebuggingInformationEntry<R<'_>>, at: dw::DwAt) -> Option<UnitOffset> {
    match e.attr_value(at)? {
        AttributeValue::UnitRef(o) => Some(o),
        _ => None,
    }
}

fn name_of(
    dwarf: &gimli::Dwarf<R<'_>>,
    unit: &Unit<'_>,
    e: &gimli::DebuggingInformationEntry<R<'_>>,
) -> Option<String> {
    let v = e.attr_value(dw::DW_AT_name)?;
    let s = dwarf.attr_string(unit, v).ok()?;
    Some(s.to_string_lossy().into_owned())
}

/// An entry, or the one its `DW_AT_abstract_origin` (an inlined or out-of-line copy) or
/// `DW_AT_specification` (a C++ method defined out of its class) names, for attribute
/// `at`: the first that has it.
fn with_origin<'a, T>(
    unit: &Unit<'a>,
    e: &gimli::DebuggingInformationEntry<R<'a>>,
    mut get: impl FnMut(&gimli::DebuggingInformationEntry<R<'a>>) -> Option<T>,
) -> Option<T> {
    if let Some(v) = get(e) {
        return Some(v);
    }
    let mut cur =
        unit_ref(e, dw::DW_AT_abstract_origin).or_else(|| unit_ref(e, dw::DW_AT_specification))?;
    for _ in 0..4 {
        let o = unit.entry(cur).ok()?;
        if let Some(v) = get(&o) {
            return Some(v);
        }
        cur = unit_ref(&o, dw::DW_AT_abstract_origin)
            .or_else(|| unit_ref(&o, dw::DW_AT_specification))?;
    }
    None
}

fn subprogram(dwarf: &gimli::Dwarf<R<'_>>, unit: &Unit<'_>, off: UnitOffset) -> Option<Signature> {
    let e = unit.entry(off).ok()?;
    let ret = match with_origin(unit, &e, |o| unit_ref(o, dw::DW_AT_type)) {
        Some(t) => classify(unit, t, 0)?,
        None => ArgType::Void,
    };
    let mut tree = unit.entries_tree(Some(off)).ok()?;
    let root = tree.root().ok()?;
    let mut children = root.children();
    let mut params = Vec::new();
    let mut variadic = false;
    while let Ok(Some(child)) = children.next() {
        let c = child.entry();
        match c.tag() {
            dw::DW_TAG_formal_parameter => {
                let ty = with_origin(unit, c, |o| unit_ref(o, dw::DW_AT_type))?;
                params.push(Param {
                    name: with_origin(unit, c, |o| name_of(dwarf, unit, o)),
                    ty: classify(unit, ty, 0)?,
                });
            }
            dw::DW_TAG_unspecified_parameters => variadic = true,
            _ => {}
        }
    }
    Some(Signature {
        params,
        ret,
        variadic,
        source: Source::Dwarf,
    })
}

/// How a value of the type at `off` is shown; None for what registers cannot show
/// (structures by value, `long double`, ...).
fn classify(unit: &Unit<'_>, off: UnitOffset, depth: u32) -> Option<ArgType> {
    if depth > 16 {
        return None;
    }
    let e = unit.entry(off).ok()?;
    let size = || match e.attr_value(dw::DW_AT_byte_size) {
        Some(AttributeValue::Udata(n)) => Some(n as u8),
        Some(AttributeValue::Data1(n)) => Some(n),
        Some(AttributeValue::Data2(n)) => Some(n as u8),
        _ => None,
    };
    match e.tag() {
        dw::DW_TAG_base_type => {
            let Some(AttributeValue::Encoding(enc)) = e.attr_value(dw::DW_AT_encoding) else {
                return None;
            };
            let n = size()?;
            Some(match enc {
                dw::DW_ATE_boolean => ArgType::Bool,
                dw::DW_ATE_float if n == 4 => ArgType::F32,
                dw::DW_ATE_float if n == 8 => ArgType::F64,
                dw::DW_ATE_signed_char => ArgType::Char,
                dw::DW_ATE_unsigned_char => ArgType::Unsigned(1),
                dw::DW_ATE_signed if n <= 8 => ArgType::Signed(n),
                dw::DW_ATE_unsigned if n <= 8 => ArgType::Unsigned(n),
                _ => return None,
            })
        }
        dw::DW_TAG_typedef
        | dw::DW_TAG_const_type
        | dw::DW_TAG_volatile_type
        | dw::DW_TAG_restrict_type
        | dw::DW_TAG_atomic_type => match unit_ref(&e, dw::DW_AT_type) {
            Some(t) => classify(unit, t, depth + 1),
            None => Some(ArgType::Void),
        },
        dw::DW_TAG_pointer_type => {
            let target = unit_ref(&e, dw::DW_AT_type).and_then(|t| classify(unit, t, depth + 1));
            Some(if target == Some(ArgType::Char) {
                ArgType::Str
            } else {
                ArgType::Pointer
            })
        }
        dw::DW_TAG_reference_type | dw::DW_TAG_rvalue_reference_type => Some(ArgType::Pointer),
        dw::DW_TAG_enumeration_type => Some(ArgType::Signed(size().unwrap_or(4))),
        _ => None,
    }
}

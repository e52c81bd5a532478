//! What a traced function's arguments and return value are, and how their registers are
//! shown: from DWARF, from the shipped libc prototypes, or raw.

use probes::trace::{mask, str_flags};
use std::fmt::Write;

/// How one value is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgType {
    /// A signed integer of this many bytes.
    Signed(u8),
    /// An unsigned integer of this many bytes.
    Unsigned(u8),
    /// Flags: shown in hex.
    Hex,
    /// A file mode: shown in octal.
    Octal,
    Bool,
    Char,
    /// A pointer: hex, `NULL` for 0.
    Pointer,
    /// A `char *`: the string, quoted.
    Str,
    F32,
    F64,
    /// No value (a `void` function's return).
    Void,
}

impl ArgType {
    fn is_float(self) -> bool {
        matches!(self, ArgType::F32 | ArgType::F64)
    }
}

/// One parameter: its name when the debug info has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub name: Option<String>,
    pub ty: ArgType,
}

/// Where a signature came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Dwarf,
    Prototype,
    Raw,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Signature {
    pub params: Vec<Param>,
    pub ret: ArgType,
    /// More arguments may follow (`...`).
    pub variadic: bool,
    pub source: Source,
}

/// A string copied by the agent.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CopiedStr {
    pub bytes: Vec<u8>,
    pub flags: u8,
}

impl Signature {
    /// `n` integer registers shown in hex, the return in hex.
    pub fn raw(n: usize) -> Signature {
        Signature {
            params: (0..n.min(6))
                .map(|_| Param {
                    name: None,
                    ty: ArgType::Pointer,
                })
                .collect(),
            ret: ArgType::Pointer,
            variadic: false,
            source: Source::Raw,
        }
    }

    /// Where each parameter's value is: integer register n, or vector register n.
    fn slots(&self) -> Vec<Slot> {
        let (mut i, mut f) = (0, 0);
        self.params
            .iter()
            .map(|p| {
                if p.ty.is_float() {
                    f += 1;
                    Slot::Vector(f - 1)
                } else {
                    i += 1;
                    Slot::Int(i - 1)
                }
            })
            .collect()
    }

    /// The agent's string mask for this signature: which integer registers hold C strings,
    /// and whether the return value is one.
    pub fn string_mask(&self) -> u8 {
        let mut m = 0;
        for (p, s) in self.params.iter().zip(self.slots()) {
            if let (ArgType::Str, Slot::Int(n)) = (p.ty, s) {
                if n < 6 {
                    m |= 1 << n;
                }
            }
        }
        if self.ret == ArgType::Str {
            m |= mask::RETURN;
        }
        m
    }

    /// `a=2, b=3` (or `2, 3` without names) from the entry registers.
    pub fn format_args(
        &self,
        regs: &[u64; 6],
        fregs: &[u64; 4],
        strings: &[(u8, CopiedStr)],
    ) -> String {
        let mut out = String::new();
        for (k, (p, slot)) in self.params.iter().zip(self.slots()).enumerate() {
            if k > 0 {
                out.push_str(", ");
            }
            if let Some(n) = &p.name {
                let _ = write!(out, "{n}=");
            }
            let v = match slot {
                Slot::Int(n) if n < 6 => {
                    let s = strings
                        .iter()
                        .find(|(a, _)| *a as usize == n)
                        .map(|(_, s)| s);
                    format_value(p.ty, regs[n], s)
                }
                Slot::Vector(n) if n < 4 => format_value(p.ty, fregs[n], None),
                _ => "?".into(),
            };
            out.push_str(&v);
        }
        if self.variadic {
            out.push_str(if self.params.is_empty() {
                "..."
            } else {
                ", ..."
            });
        }
        out
    }

    /// The return value (None for `void`).
    pub fn format_ret(&self, rax: u64, xmm0: u64, string: Option<&CopiedStr>) -> Option<String> {
        match self.ret {
            ArgType::Void => None,
            t if t.is_float() => Some(format_value(t, xmm0, None)),
            t => Some(format_value(t, rax, string)),
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Slot {
    Int(usize),
    Vector(usize),
}

fn sign_extend(v: u64, bytes: u8) -> i64 {
    match bytes {
        1 => v as i8 as i64,
        2 => v as i16 as i64,
        4 => v as i32 as i64,
        _ => v as i64,
    }
}

fn truncate(v: u64, bytes: u8) -> u64 {
    match bytes {
        1 => v as u8 as u64,
        2 => v as u16 as u64,
        4 => v as u32 as u64,
        _ => v,
    }
}

/// One value as shown in a trace line.
pub fn format_value(ty: ArgType, v: u64, s: Option<&CopiedStr>) -> String {
    match ty {
        ArgType::Signed(b) => sign_extend(v, b).to_string(),
        ArgType::Unsigned(b) => truncate(v, b).to_string(),
        ArgType::Hex => format!("{:#x}", v as u32),
        ArgType::Octal => format!("0{:o}", v as u32),
        ArgType::Bool => (v as u8 != 0).to_string(),
        ArgType::Char => quote_char(v as u8),
        ArgType::Pointer if v == 0 => "NULL".into(),
        ArgType::Pointer => format!("{v:#x}"),
        ArgType::Str => match s {
            _ if v == 0 => "NULL".into(),
            Some(s) if s.flags & str_flags::UNREADABLE == 0 => quote(s),
            // Not readable, or not copied: the pointer itself.
            _ => format!("{v:#x}"),
        },
        ArgType::F32 => format!("{}", f32::from_bits(v as u32)),
        ArgType::F64 => format!("{}", f64::from_bits(v)),
        ArgType::Void => String::new(),
    }
}

fn quote_char(c: u8) -> String {
    match c {
        b'\'' => "'\\''".into(),
        b'\\' => "'\\\\'".into(),
        0x20..=0x7e => format!("'{}'", c as char),
        b'\n' => "'\\n'".into(),
        b'\t' => "'\\t'".into(),
        _ => format!("'\\x{c:02x}'"),
    }
}

/// A C string as a quoted, escaped literal; `...` after it when it was cut.
pub fn quote(s: &CopiedStr) -> String {
    let mut out = String::from("\"");
    for &c in &s.bytes {
        match c {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\r' => out.push_str("\\r"),
            0x20..=0x7e => out.push(c as char),
            _ => {
                let _ = write!(out, "\\x{c:02x}");
            }
        }
    }
    out.push('"');
    if s.flags & str_flags::TRUNCATED != 0 {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ty: ArgType) -> Param {
        Param { name: None, ty }
    }

    #[test]
    fn floats_take_vector_registers_and_ints_integer_ones() {
        let s = Signature {
            params: vec![p(ArgType::F64), p(ArgType::Str), p(ArgType::Signed(4))],
            ret: ArgType::Void,
            variadic: false,
            source: Source::Prototype,
        };
        assert_eq!(s.string_mask(), 1);
        let regs = [0x1000, (-7i64) as u64, 0, 0, 0, 0];
        let fregs = [2.5f64.to_bits(), 0, 0, 0];
        let hello = CopiedStr {
            bytes: b"hi\n".to_vec(),
            flags: 0,
        };
        assert_eq!(
            s.format_args(&regs, &fregs, &[(0, hello)]),
            "2.5, \"hi\\n\", -7"
        );
    }

    #[test]
    fn wild_and_null_strings_show_the_pointer() {
        let bad = CopiedStr {
            bytes: vec![],
            flags: str_flags::UNREADABLE,
        };
        assert_eq!(format_value(ArgType::Str, 0x10, Some(&bad)), "0x10");
        assert_eq!(format_value(ArgType::Str, 0, None), "NULL");
        let cut = CopiedStr {
            bytes: b"abc".to_vec(),
            flags: str_flags::TRUNCATED,
        };
        assert_eq!(format_value(ArgType::Str, 0x10, Some(&cut)), "\"abc\"...");
    }
}

//! Decoding and formatting event records against the pack's format strings.

use super::descriptors::FormatDesc;
use probes::pack::emit::{tag, MAX_ARGS, MAX_STR};
use std::collections::BTreeMap;

/// How a placeholder prints its argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    Display,
    Debug,
    Hex,
    AltHex,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    Text(String),
    Arg(Style),
}

/// Split a format string into literal text and placeholders: `{}`, `{:?}`, `{:x}`,
/// `{:#x}`; `{{` and `}}` are braces.
pub fn parse_format(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let spec: String = chars.by_ref().take_while(|&c| c != '}').collect();
                let style = match spec.as_str() {
                    "" => Style::Display,
                    ":?" => Style::Debug,
                    ":x" => Style::Hex,
                    ":#x" => Style::AltHex,
                    other => return Err(format!("placeholder {{{other}}} not supported (use {{}}, {{:?}}, {{:x}} or {{:#x}})")),
                };
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Arg(style));
            }
            '}' => return Err("unmatched }".into()),
            c => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
}

/// One decoded record.
#[derive(Clone, Debug, PartialEq)]
pub struct Event<'a> {
    pub format: &'a FormatDesc,
    pub args: Vec<Value>,
}

/// Decode a record payload (as the ring hands it over). Every length is checked against
/// the payload; a bad record is an error message, never a panic.
pub fn decode<'a>(
    payload: &[u8],
    formats: &'a BTreeMap<u32, FormatDesc>,
) -> Result<Event<'a>, String> {
    if payload.len() < 16 {
        return Err(format!(
            "event record of {} bytes is too short",
            payload.len()
        ));
    }
    let id = u32::from_le_bytes(payload[..4].try_into().unwrap());
    let format = formats
        .get(&id)
        .ok_or_else(|| format!("event record with unknown format {id:#x}"))?;
    let nargs = payload[4] as usize;
    if nargs > MAX_ARGS || nargs != format.nargs {
        return Err(format!(
            "event record for {:?} has {nargs} arguments",
            format.text
        ));
    }
    let mut at = 16;
    let mut args = Vec::with_capacity(nargs);
    for i in 0..nargs {
        let word = |at: usize| -> Result<u64, String> {
            payload
                .get(at..at + 8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
                .ok_or_else(|| "event record truncated".to_string())
        };
        let w = word(at)?;
        at += 8;
        args.push(match payload[8 + i] {
            tag::U64 => Value::U64(w),
            tag::I64 => Value::I64(w as i64),
            tag::F64 => Value::F64(f64::from_bits(w)),
            tag::BOOL => Value::Bool(w != 0),
            tag::STR => {
                let n = w as usize;
                if n > MAX_STR {
                    return Err("event record string longer than the bound".into());
                }
                let b = payload.get(at..at + n).ok_or("event record truncated")?;
                at += (n + 7) & !7;
                Value::Str(String::from_utf8_lossy(b).into_owned())
            }
            t => return Err(format!("event record argument of unknown type {t}")),
        });
    }
    Ok(Event { format, args })
}

fn render_value(v: &Value, style: Style, out: &mut String) {
    use std::fmt::Write;
    let _ = match (v, style) {
        (Value::U64(x), Style::Hex) => write!(out, "{x:x}"),
        (Value::U64(x), Style::AltHex) => write!(out, "{x:#x}"),
        (Value::I64(x), Style::Hex) => write!(out, "{x:x}"),
        (Value::I64(x), Style::AltHex) => write!(out, "{x:#x}"),
        (Value::Str(s), Style::Debug) => write!(out, "{s:?}"),
        (Value::F64(x), Style::Debug) => write!(out, "{x:?}"),
        (Value::U64(x), _) => write!(out, "{x}"),
        (Value::I64(x), _) => write!(out, "{x}"),
        (Value::F64(x), _) => write!(out, "{x}"),
        (Value::Bool(x), _) => write!(out, "{x}"),
        (Value::Str(s), _) => write!(out, "{s}"),
    };
}

impl Event<'_> {
    /// The line as the format string says.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut args = self.args.iter();
        for p in &self.format.pieces {
            match p {
                Piece::Text(t) => out.push_str(t),
                Piece::Arg(style) => {
                    if let Some(v) = args.next() {
                        render_value(v, *style, &mut out);
                    }
                }
            }
        }
        out
    }

    /// One JSON line (`"type": "event"`): the formatted message, its format and the raw
    /// arguments.
    pub fn to_json(&self) -> serde_json::Value {
        let args: Vec<serde_json::Value> = self
            .args
            .iter()
            .map(|a| match a {
                Value::U64(x) => (*x).into(),
                Value::I64(x) => (*x).into(),
                Value::F64(x) => (*x).into(),
                Value::Bool(x) => (*x).into(),
                Value::Str(s) => s.clone().into(),
            })
            .collect();
        serde_json::json!({
            "type": "event",
            "event": self.render(),
            "format": self.format.text,
            "at": format!("{}:{}", self.format.file, self.format.line),
            "args": args,
        })
    }
}

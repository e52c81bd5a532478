//! Demangled names of C++ and Rust symbols, for display and for matching specs.
//!
//! Symbols stay mangled everywhere they identify something (spec resolution results,
//! JSON `"symbol"`, what the agent is told); the demangled forms are what users read
//! and may write in specs:
//!
//! - C++ (Itanium `_Z...`): the full form is the name with its parameter list and
//!   without the return type (`ns::Parser::parse(char const*, int)`); the short form
//!   drops the parameter list too (`ns::Parser::parse`). A pattern with a `(` is
//!   matched against the full form, any other against the short form, so that
//!   `ns::Parser::*` takes every overload and `ns::Parser::parse(int)` one of them.
//! - Rust (legacy `_ZN...17h<hash>E` and v0 `_R...`): the path without the hash or
//!   crate disambiguators (`mycrate::parser::Parser::parse`); full and short are equal.
//! - Whitespace is not significant: names and patterns are compared with every run of
//!   whitespace removed, except a single space between two word characters
//!   (`unsigned int`), so `std::vector<int,std::allocator<int>>` and
//!   `std::vector<int, std::allocator<int> >` are the same name.
//! - A symbol version suffix (`@GLIBCXX_3.4`) is kept at the end of both forms.

use std::borrow::Cow;

/// The demangled forms of one mangled symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Demangled {
    /// With the parameter list (C++), for display: what tells overloads apart.
    pub full: String,
    /// Without the parameter list.
    pub short: String,
    /// `full` and `short` normalised for matching (see [`normalize`]).
    full_key: String,
    short_key: String,
}

impl Demangled {
    fn new(full: String, short: String) -> Demangled {
        Demangled {
            full_key: normalize(&full),
            short_key: normalize(&short),
            full,
            short,
        }
    }

    /// The form a normalised pattern is matched against: the full one when the pattern
    /// has a parameter list.
    pub fn key_for(&self, pattern_key: &str) -> &str {
        if pattern_key.contains('(') {
            &self.full_key
        } else {
            &self.short_key
        }
    }
}

/// Whether `name` may be a mangled C++ or Rust symbol (cheap, for skipping C names).
pub fn looks_mangled(name: &str) -> bool {
    name.starts_with("_Z") || name.starts_with("_R")
}

/// The demangled forms of `name`, or `None` when it is not a mangled name (C symbols)
/// or does not demangle.
pub fn demangle(name: &str) -> Option<Demangled> {
    if !looks_mangled(name) {
        return None;
    }
    let (base, version) = match name.split_once('@') {
        Some((b, v)) => (b, Some(v)),
        None => (name, None),
    };
    let mut d = demangle_rust(base).or_else(|| demangle_cpp(base))?;
    if let Some(v) = version {
        d = Demangled::new(format!("{}@{v}", d.full), format!("{}@{v}", d.short));
    }
    Some(d)
}

/// The name to show for a symbol: demangled with its parameter list when it demangles,
/// else as it is.
pub fn display(name: &str) -> Cow<'_, str> {
    match demangle(name) {
        Some(d) => Cow::Owned(d.full),
        None => Cow::Borrowed(name),
    }
}

/// Legacy Rust symbols are `_ZN` paths whose last element is `17h` and 16 hex digits
/// (the hash); a C++ `_ZN` name never ends so. v0 symbols start with `_R`.
fn demangle_rust(base: &str) -> Option<Demangled> {
    // Bytes, not `str` slices: a name read from a file may hold any character.
    let stem = base.split('.').next().unwrap_or(base).as_bytes();
    let n = stem.len();
    let legacy = stem.starts_with(b"_ZN")
        && n > 23
        && stem.ends_with(b"E")
        && stem[n - 20..n - 17] == *b"17h"
        && stem[n - 17..n - 1].iter().all(u8::is_ascii_hexdigit);
    if !legacy && !base.starts_with("_R") {
        return None;
    }
    let d = rustc_demangle::try_demangle(base).ok()?;
    // `{:#}` leaves out the hash and the crate disambiguators.
    let s = format!("{d:#}");
    Some(Demangled::new(s.clone(), s))
}

fn demangle_cpp(base: &str) -> Option<Demangled> {
    let sym = cpp_demangle::Symbol::new(base.as_bytes()).ok()?;
    let opts = cpp_demangle::DemangleOptions::new().no_return_type();
    let full = sym.demangle_with_options(&opts).ok()?;
    let short = sym.demangle_with_options(&opts.no_params()).ok()?;
    Some(Demangled::new(full, short))
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// `s` with whitespace removed except one space between two word characters.
pub fn normalize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut pending_space = false;
    for c in s.chars() {
        if c.is_whitespace() {
            pending_space = true;
            continue;
        }
        if pending_space && is_word(c) && out.chars().next_back().is_some_and(is_word) {
            out.push(' ');
        }
        pending_space = false;
        out.push(c);
    }
    out
}

/// Replaces every mangled symbol in `text` (a token starting with `_Z` or `_R` after a
/// non-word character) by its full demangled form, for messages built from labels.
pub fn demangle_in_text(text: &str) -> Cow<'_, str> {
    if !text.contains("_Z") && !text.contains("_R") {
        return Cow::Borrowed(text);
    }
    let is_sym = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '$' | '.' | '@');
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut prev: Option<char> = None;
    while let Some(c) = rest.chars().next() {
        if looks_mangled(rest) && !prev.is_some_and(is_sym) {
            let len = rest.find(|c: char| !is_sym(c)).unwrap_or(rest.len());
            let token = &rest[..len];
            // A sentence may end right after the symbol.
            let token = token.trim_end_matches('.');
            if let Some(d) = demangle(token) {
                out.push_str(&d.full);
                prev = token.chars().next_back();
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpp_names() {
        let d = demangle("_ZN2ns6Parser5parseEPKci").unwrap();
        assert_eq!(d.full, "ns::Parser::parse(char const*, int)");
        assert_eq!(d.short, "ns::Parser::parse");
        let t = demangle("_ZN2ns3maxIiEET_S1_S1_").unwrap();
        assert_eq!(t.full, "ns::max<int>(int, int)");
        assert_eq!(t.short, "ns::max<int>");
        let v = demangle("_ZNSt6vectorIiSaIiEE9push_backERKi@GLIBCXX_3.4").unwrap();
        assert_eq!(
            v.full,
            "std::vector<int, std::allocator<int> >::push_back(int const&)@GLIBCXX_3.4"
        );
        assert_eq!(
            v.key_for("std::vector*"),
            "std::vector<int,std::allocator<int>>::push_back@GLIBCXX_3.4"
        );
        assert!(demangle("malloc").is_none());
        assert!(demangle("_Zgarbage").is_none());
    }

    #[test]
    fn rust_names() {
        let legacy = demangle("_ZN7mycrate6parser5parse17h0123456789abcdefE").unwrap();
        assert_eq!(legacy.full, "mycrate::parser::parse");
        assert_eq!(legacy.short, legacy.full);
        let v0 = demangle("_RNvCs1234_7mycrate5parse").unwrap();
        assert_eq!(v0.full, "mycrate::parse");
        // A C++ `_ZN` name is not taken for Rust.
        assert_eq!(demangle("_ZN2ns1fEv").unwrap().full, "ns::f()");
    }

    #[test]
    fn odd_names_do_not_panic() {
        for n in [
            "_ZN",
            "_R",
            "_Z",
            "_ZNé7mycrate5parse17h0123456789abcdéE",
            "_ZN2nsé1234567890123456789012345678E",
            "_Z\u{fffd}\u{fffd}",
            "_ZN7mycrate5parse17h0123456789abcdefE@@V",
        ] {
            let _ = demangle(n);
            let _ = demangle_in_text(n);
        }
    }

    #[test]
    fn normalizes_whitespace() {
        assert_eq!(
            normalize("f(unsigned   int, char const *)"),
            "f(unsigned int,char const*)"
        );
        assert_eq!(normalize("a<b<c> >"), "a<b<c>>");
        assert_eq!(normalize(" x "), "x");
    }

    #[test]
    fn demangles_inside_messages() {
        assert_eq!(
            demangle_in_text("main:_ZN2ns1fEv+0x4: the same code as main:_ZN2ns1gEv."),
            "main:ns::f()+0x4: the same code as main:ns::g()."
        );
        assert_eq!(
            demangle_in_text("libc:malloc at 0x10"),
            "libc:malloc at 0x10"
        );
        assert_eq!(demangle_in_text("x_Zfoo"), "x_Zfoo");
    }
}

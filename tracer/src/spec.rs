//! Probe specifications: `[MODULE:]SYMBOL[+OFFSET]`, and their resolution to addresses.
//!
//! - `SYMBOL` and `MODULE` may use the globs `*` (any run of characters) and `?` (any
//!   one character). Symbol names are matched as stored in the file (mangled for C++
//!   and Rust) and, for C++ and Rust symbols, demangled too (see [`crate::names`]):
//!   `ns::Parser::*` matches every method of `ns::Parser`, every overload; a pattern
//!   with a `(` is matched against the name with its parameter list
//!   (`ns::Parser::parse(char const*)`), with whitespace not significant. A non-default
//!   symbol version is named `name@VERSION` (`memcpy@GLIBC_2.2.5`).
//! - The module ends at the first single `:`; `::` belongs to the symbol, so
//!   `main:ns::f` is `ns::f` in `main` and `ns::f` alone searches every module.
//!   Whitespace is allowed inside `(...)` and `<...>` only. A `+` that is part of an
//!   operator's name (`operator+`, `operator++`, `operator+=`) does not start an offset.
//! - `MODULE` names a loaded object by its file name: `main` is the executable; a path
//!   (with a `/`) must match the whole path; otherwise the pattern must match the whole
//!   basename (`libc.so.6`) or a prefix of it that ends where a version or extension
//!   starts, i.e. before `.`, `-`, `_` or a digit. So `libc` matches `libc.so.6` and
//!   `libc-2.36.so` but not `libcrypto.so.3`, and `libpython` matches
//!   `libpython3.11.so.1.0`. The executable also answers to the name the program was
//!   started under (`argv[0]`: a symlink's name). Without `MODULE`, every module is
//!   searched.
//! - `OFFSET` is decimal or `0x` hex, in bytes from the function's start; it must lie
//!   inside the function when its size is known.

use std::fmt;
use std::str::FromStr;

use crate::symbols::{Function, Module, ProcessModules};

/// A parsed `[MODULE:]SYMBOL[+OFFSET]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// The text as written, for messages and output.
    pub text: String,
    /// Module pattern; `None` means every module.
    pub module: Option<String>,
    /// Symbol pattern.
    pub symbol: String,
    /// Bytes from the start of the function.
    pub offset: u64,
}

/// A malformed spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SpecError {
    Empty,
    EmptyModule {
        spec: String,
    },
    EmptySymbol {
        spec: String,
    },
    EmptyOffset {
        spec: String,
    },
    BadOffset {
        spec: String,
        offset: String,
    },
    /// A single `:` in the symbol part (`::` is a C++/Rust path separator).
    ExtraColon {
        spec: String,
    },
    /// Whitespace or control characters, usually a shell quoting mistake.
    BadCharacter {
        spec: String,
        ch: char,
    },
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const FORM: &str = "expected [MODULE:]SYMBOL[+OFFSET]";
        match self {
            SpecError::Empty => write!(f, "empty probe spec; {FORM}"),
            SpecError::EmptyModule { spec } => {
                write!(f, "probe spec '{spec}' has an empty module before ':'; {FORM}")
            }
            SpecError::EmptySymbol { spec } => {
                write!(f, "probe spec '{spec}' has no symbol; {FORM}")
            }
            SpecError::EmptyOffset { spec } => write!(
                f,
                "probe spec '{spec}' has nothing after '+'; write an offset such as +4 or +0x10"
            ),
            SpecError::BadOffset { spec, offset } => write!(
                f,
                "probe spec '{spec}' has a bad offset '{offset}': use a decimal or 0x-prefixed hex byte count that fits 64 bits"
            ),
            SpecError::ExtraColon { spec } => write!(
                f,
                "probe spec '{spec}' has more than one single ':'; {FORM} (write C++ and Rust paths with '::', as in main:ns::Parser::parse)"
            ),
            SpecError::BadCharacter { spec, ch } => write!(
                f,
                "probe spec '{spec}' contains {ch:?}; symbol names have no whitespace outside (...) and <...>, and no control characters (check the quoting)"
            ),
        }
    }
}

impl std::error::Error for SpecError {}

impl ProbeSpec {
    /// Parse `[MODULE:]SYMBOL[+OFFSET]`.
    pub fn parse(text: &str) -> Result<ProbeSpec, SpecError> {
        let spec = text.to_string();
        if text.is_empty() {
            return Err(SpecError::Empty);
        }
        if let Some(ch) = bad_character(text) {
            return Err(SpecError::BadCharacter { spec, ch });
        }
        let (module, rest) = match module_separator(text) {
            Some(i) => {
                if i == 0 {
                    return Err(SpecError::EmptyModule { spec });
                }
                (Some(text[..i].to_string()), &text[i + 1..])
            }
            None => (None, text),
        };
        if module_separator(rest).is_some() {
            return Err(SpecError::ExtraColon { spec });
        }
        let (symbol, offset) = match offset_plus(rest) {
            Some(i) => {
                let (s, o) = (&rest[..i], &rest[i + 1..]);
                if o.is_empty() {
                    return Err(SpecError::EmptyOffset { spec });
                }
                let Some(v) = parse_offset(o) else {
                    return Err(SpecError::BadOffset {
                        offset: o.to_string(),
                        spec,
                    });
                };
                (s, v)
            }
            None => (rest, 0),
        };
        if symbol.is_empty() {
            return Err(SpecError::EmptySymbol { spec });
        }
        Ok(ProbeSpec {
            text: spec,
            module,
            symbol: symbol.to_string(),
            offset,
        })
    }
}

impl FromStr for ProbeSpec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ProbeSpec::parse(s)
    }
}

impl fmt::Display for ProbeSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The first control character, or whitespace outside `(...)` and `<...>` (where C++
/// names have it: `f(unsigned int)`).
fn bad_character(text: &str) -> Option<char> {
    let mut depth = 0i32;
    text.chars().find(|&c| {
        match c {
            '(' | '<' => depth += 1,
            ')' | '>' => depth -= 1,
            _ => {}
        }
        c.is_control() || (c.is_whitespace() && depth <= 0)
    })
}

/// The index of the first `:` that is not half of a `::`.
fn module_separator(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    (0..b.len())
        .find(|&i| b[i] == b':' && b.get(i + 1) != Some(&b':') && (i == 0 || b[i - 1] != b':'))
}

/// The index of the `+` that starts the offset: the last one that is not part of an
/// operator's name (`operator+`, `operator++`, `operator+=`).
fn offset_plus(text: &str) -> Option<usize> {
    let b = text.as_bytes();
    text.rmatch_indices('+').map(|(i, _)| i).find(|&i| {
        let part_of_operator = text[..i].ends_with("operator")
            || (i > 0 && b[i - 1] == b'+')
            || matches!(b.get(i + 1), Some(b'+' | b'='));
        !part_of_operator
    })
}

fn parse_offset(s: &str) -> Option<u64> {
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok()
    } else {
        if !s.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    }
}

/// Whether `pattern` contains glob characters.
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Match `text` against `pattern` in full, where `*` matches any run of characters
/// (including none) and `?` any one character. Linear backtracking on the last `*`,
/// so patterns with many stars stay fast.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// Whether a module pattern names `module` (see the module rules at the top), by its
/// file name or, for the executable, by a name the program was started under.
pub fn module_matches(pattern: &str, module: &Module) -> bool {
    module_name_matches(pattern, &module.name, &module.path, module.is_main)
        || (!pattern.contains('/')
            && module
                .run_as
                .iter()
                .any(|n| module_name_matches(pattern, n, &module.path, module.is_main)))
}

/// [`module_matches`] on the parts of a module: basename, full path, whether main.
pub fn module_name_matches(pattern: &str, name: &str, path: &str, is_main: bool) -> bool {
    if pattern == "main" && is_main {
        return true;
    }
    if pattern.contains('/') {
        return glob_match(pattern, path);
    }
    if glob_match(pattern, name) {
        return true;
    }
    name.char_indices()
        .filter(|&(_, c)| c == '.' || c == '-' || c == '_' || c.is_ascii_digit())
        .any(|(i, _)| i > 0 && glob_match(pattern, &name[..i]))
}

/// One probe location.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedProbe {
    /// The spec it came from, as written.
    pub spec_text: String,
    pub module_path: String,
    /// The function's name that matched (the preferred one if several did).
    pub symbol: String,
    /// Runtime address of the probe: function start + offset. For an IFUNC this is the
    /// resolver's address; the agent resolves the implementation and applies `offset`
    /// to it.
    pub address: u64,
    /// Size of the function, 0 if unknown.
    pub size: u64,
    pub offset: u64,
    pub is_ifunc: bool,
}

/// Why a spec resolved to nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResolveError {
    /// The module pattern matches no loaded module.
    NoModule {
        spec: String,
        module: String,
        loaded: Vec<String>,
    },
    /// No function name matches; `suggestions` are close names as `module:name`.
    NoFunction {
        spec: String,
        suggestions: Vec<String>,
        /// Selected modules with no function symbol at all (stripped), by path.
        symbolless: Vec<String>,
    },
    /// The offset is not inside a matching function.
    OffsetBeyondSize {
        spec: String,
        module: String,
        symbol: String,
        offset: u64,
        size: u64,
    },
    /// The spec text itself is malformed (from [`resolve_str`]).
    Parse(SpecError),
}

impl From<SpecError> for ResolveError {
    fn from(e: SpecError) -> Self {
        ResolveError::Parse(e)
    }
}

impl fmt::Display for ResolveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResolveError::Parse(e) => e.fmt(f),
            ResolveError::NoModule {
                spec,
                module,
                loaded,
            } => {
                write!(f, "no loaded module matches '{module}' in '{spec}'; ")?;
                if loaded.is_empty() {
                    write!(f, "no modules with readable symbols are loaded")
                } else {
                    write!(f, "loaded: {}", loaded.join(", "))
                }
            }
            ResolveError::NoFunction {
                spec,
                suggestions,
                symbolless,
            } => {
                write!(f, "no function matches '{spec}'")?;
                if !symbolless.is_empty() {
                    write!(
                        f,
                        " ({} has no function symbols: stripped, or not the program you meant, \
                         e.g. the interpreter of a script)",
                        symbolless.join(", ")
                    )?;
                }
                if !suggestions.is_empty() {
                    write!(f, "; did you mean {}?", suggestions.join(", "))?;
                }
                Ok(())
            }
            ResolveError::OffsetBeyondSize {
                spec,
                module,
                symbol,
                offset,
                size,
            } => write!(
                f,
                "offset {offset:#x} in '{spec}' is beyond the end of {module}:{symbol}, which is {size} ({size:#x}) bytes long"
            ),
        }
    }
}

impl std::error::Error for ResolveError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ResolveError::Parse(e) => e.source(),
            _ => None,
        }
    }
}

/// The modules a spec's module part selects.
fn selected_modules<'a>(spec: &ProbeSpec, modules: &'a ProcessModules) -> Vec<&'a Module> {
    modules
        .modules
        .iter()
        .filter(|m| spec.module.as_deref().is_none_or(|p| module_matches(p, m)))
        .collect()
}

/// A symbol pattern, ready to be matched against mangled and demangled names.
struct SymbolPattern<'p> {
    text: &'p str,
    /// `text` normalised as demangled names are (see [`crate::names::normalize`]).
    key: String,
    glob: bool,
}

impl<'p> SymbolPattern<'p> {
    fn new(text: &'p str) -> SymbolPattern<'p> {
        SymbolPattern {
            text,
            key: crate::names::normalize(text),
            glob: is_glob(text),
        }
    }

    fn matches(&self, pattern: &str, name: &str) -> bool {
        if self.glob {
            glob_match(pattern, name)
        } else {
            pattern == name
        }
    }
}

/// The first of `f`'s names matching the pattern, as stored or else demangled; the
/// name returned is the stored (mangled) one.
fn matching_name<'a>(pat: &SymbolPattern<'_>, m: &'a Module, f: &Function<'a>) -> Option<&'a str> {
    f.names
        .iter()
        .find(|n| pat.matches(pat.text, n))
        .or_else(|| {
            f.names.iter().find(|n| {
                m.elf
                    .demangled(n)
                    .is_some_and(|d| pat.matches(&pat.key, d.key_for(&pat.key)))
            })
        })
        .map(String::as_str)
}

/// The functions of `m` that `pat` names: by the exact stored name through the index
/// when it is one, else by scanning (globs, demangled names).
fn functions_matching<'a>(pat: &SymbolPattern<'_>, m: &'a Module) -> Vec<(Function<'a>, &'a str)> {
    if !pat.glob {
        let exact: Vec<_> = m
            .functions_named(pat.text)
            .map(|f| {
                let n = f
                    .names
                    .iter()
                    .find(|n| *n == pat.text)
                    .map_or(f.name(), String::as_str);
                (f, n)
            })
            .collect();
        if !exact.is_empty() {
            return exact;
        }
    }
    m.functions()
        .filter_map(|f| matching_name(pat, m, &f).map(|n| (f, n)))
        .collect()
}

/// The name to show for `f` when `matched` matched: a non-default symbol version
/// (`ver@V1`) of the very code the default version names is shown by the default name,
/// so that one function is one probe under one name.
fn shown_name<'a>(f: &Function<'a>, matched: &'a str) -> &'a str {
    match matched.split_once('@') {
        Some((base, _)) => f
            .names
            .iter()
            .find(|n| n.as_str() == base)
            .map_or(matched, String::as_str),
        None => matched,
    }
}

/// Resolve a spec against the modules of a process: one probe per distinct address,
/// by ascending address.
pub fn resolve(
    spec: &ProbeSpec,
    modules: &ProcessModules,
) -> Result<Vec<ResolvedProbe>, ResolveError> {
    let selected = selected_modules(spec, modules);
    if selected.is_empty() {
        return Err(no_module(spec, modules));
    }
    let pat = SymbolPattern::new(&spec.symbol);
    let mut found: Vec<(&Module, Function<'_>, &str)> = Vec::new();
    for m in &selected {
        for (f, n) in functions_matching(&pat, m) {
            found.push((m, f, shown_name(&f, n)));
        }
    }
    if found.is_empty() {
        return Err(no_function(spec, modules, &selected, &pat));
    }
    found.sort_by_key(|(_, f, _)| f.address);
    found.dedup_by_key(|(_, f, _)| f.address);
    probes_at(spec, found)
}

/// The error for a module pattern that matches no loaded module, listing the loaded ones.
fn no_module(spec: &ProbeSpec, modules: &ProcessModules) -> ResolveError {
    let mut loaded: Vec<String> = modules
        .modules
        .iter()
        .map(|m| {
            if m.is_main && !m.run_as.is_empty() {
                format!("{} (main, run as {})", m.name, m.run_as.join(", "))
            } else if m.is_main {
                format!("{} (main)", m.name)
            } else {
                m.name.clone()
            }
        })
        .collect();
    loaded.dedup();
    ResolveError::NoModule {
        spec: spec.text.clone(),
        module: spec.module.clone().unwrap_or_default(),
        loaded,
    }
}

/// The error for a symbol pattern that matches nothing in the `selected` modules, with
/// suggestions: the same name in other modules first, then close names.
fn no_function(
    spec: &ProbeSpec,
    modules: &ProcessModules,
    selected: &[&Module],
    pat: &SymbolPattern<'_>,
) -> ResolveError {
    // The right name in the wrong module is the likeliest mistake: say where it is.
    let mut suggestions = Vec::new();
    if spec.module.is_some() {
        for m in &modules.modules {
            if selected.iter().any(|s| std::ptr::eq(*s, m)) {
                continue;
            }
            let hit = !functions_matching(pat, m).is_empty();
            let shown = if m.is_main { "main" } else { m.name.as_str() };
            let s = format!("{shown}:{}", spec.symbol);
            if hit && !suggestions.contains(&s) {
                suggestions.push(s);
            }
        }
    }
    for s in suggest(spec, selected) {
        if suggestions.len() < 5 && !suggestions.contains(&s) {
            suggestions.push(s);
        }
    }
    suggestions.truncate(5);
    ResolveError::NoFunction {
        spec: spec.text.clone(),
        suggestions,
        symbolless: selected
            .iter()
            .filter(|m| m.functions().next().is_none())
            .map(|m| m.path.clone())
            .collect(),
    }
}

/// One probe per function found, at the spec's offset, which must lie inside it.
fn probes_at(
    spec: &ProbeSpec,
    found: Vec<(&Module, Function<'_>, &str)>,
) -> Result<Vec<ResolvedProbe>, ResolveError> {
    let mut out = Vec::with_capacity(found.len());
    for (m, f, name) in found {
        // An IFUNC's own size is the resolver's; the offset applies to the
        // implementation, whose size only the agent learns.
        if spec.offset > 0 && f.size > 0 && !f.is_ifunc && spec.offset >= f.size {
            return Err(ResolveError::OffsetBeyondSize {
                spec: spec.text.clone(),
                module: m.name.clone(),
                symbol: name.to_string(),
                offset: spec.offset,
                size: f.size,
            });
        }
        out.push(ResolvedProbe {
            spec_text: spec.text.clone(),
            module_path: m.path.clone(),
            symbol: name.to_string(),
            address: f.address.wrapping_add(spec.offset),
            size: f.size,
            offset: spec.offset,
            is_ifunc: f.is_ifunc,
        });
    }
    Ok(out)
}

/// Parse and resolve in one step.
pub fn resolve_str(
    text: &str,
    modules: &ProcessModules,
) -> Result<Vec<ResolvedProbe>, ResolveError> {
    resolve(&ProbeSpec::parse(text)?, modules)
}

/// Functions matching an optional pattern (a spec without offset; `None` lists all),
/// for `tracer list`, as (module, function, matching name) by module then address.
pub fn list<'a>(
    modules: &'a ProcessModules,
    pattern: Option<&ProbeSpec>,
) -> Vec<(&'a Module, Function<'a>, &'a str)> {
    let mut out = Vec::new();
    for m in &modules.modules {
        if let Some(p) = pattern.and_then(|p| p.module.as_deref()) {
            if !module_matches(p, m) {
                continue;
            }
        }
        let pat = pattern.map(|p| SymbolPattern {
            glob: true,
            ..SymbolPattern::new(&p.symbol)
        });
        for f in m.functions() {
            let name = match &pat {
                None => Some(f.name()),
                Some(p) => matching_name(p, m, &f).map(|n| shown_name(&f, n)),
            };
            if let Some(n) = name {
                out.push((m, f, n));
            }
        }
    }
    out
}

/// Levenshtein distance over characters.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.iter().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// Up to 5 names close to the spec's symbol in the selected modules, as `module:name`.
/// Close means: equal ignoring case, containing the typed text, sharing a long prefix
/// with it, or within a small edit distance.
fn suggest(spec: &ProbeSpec, selected: &[&Module]) -> Vec<String> {
    let typed: String = spec
        .symbol
        .chars()
        .filter(|&c| c != '*' && c != '?')
        .flat_map(char::to_lowercase)
        .collect();
    if typed.is_empty() {
        return Vec::new();
    }
    let typed_chars: Vec<char> = typed.chars().collect();
    let max_distance = (typed_chars.len() / 3).max(2);
    let min_prefix = typed_chars.len().saturating_sub(2).max(4);

    // (rank, distance, length, shown)
    let mut scored: Vec<(u8, usize, usize, String)> = Vec::new();
    for m in selected {
        let shown_module = match spec.module.as_deref() {
            Some(p) if !is_glob(p) => p.to_string(),
            _ if m.is_main && spec.module.as_deref() == Some("main") => "main".to_string(),
            _ => m.name.clone(),
        };
        for f in m.functions() {
            for name in f.names {
                // A C++ or Rust name is suggested as users write it.
                let name = m.elf.demangled(name).map_or(name.as_str(), |d| &d.short);
                let lower = name.to_lowercase();
                let lower_chars: Vec<char> = lower.chars().collect();
                let prefix = lower_chars
                    .iter()
                    .zip(&typed_chars)
                    .take_while(|(a, b)| a == b)
                    .count();
                let related = lower.contains(&typed) || prefix >= min_prefix;
                // The distance is at least the length gap: skip hopeless names cheaply.
                if !related && lower_chars.len().abs_diff(typed_chars.len()) > max_distance {
                    continue;
                }
                let d = edit_distance(&typed_chars, &lower_chars);
                if !related && d > max_distance {
                    continue;
                }
                let rank = u8::from(lower != typed);
                scored.push((rank, d, name.len(), format!("{shown_module}:{name}")));
            }
        }
    }
    scored.sort();
    let mut out: Vec<String> = Vec::new();
    for (_, _, _, s) in scored {
        if !out.contains(&s) {
            out.push(s);
            if out.len() == 5 {
                break;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> ProbeSpec {
        ProbeSpec::parse(s).unwrap()
    }

    #[test]
    fn parses_all_forms() {
        assert_eq!(
            p("malloc"),
            ProbeSpec {
                text: "malloc".into(),
                module: None,
                symbol: "malloc".into(),
                offset: 0
            }
        );
        let s = p("libc:malloc+0x10");
        assert_eq!(s.module.as_deref(), Some("libc"));
        assert_eq!(s.symbol, "malloc");
        assert_eq!(s.offset, 16);
        assert_eq!(p("main:work_*+12").offset, 12);
        assert_eq!(p("lib*:w?rk").symbol, "w?rk");
        assert_eq!(p("memcpy@GLIBC_2.2.5").symbol, "memcpy@GLIBC_2.2.5");
        assert_eq!(p("f+0").offset, 0);
        assert_eq!(p("f+0XfF").offset, 255);
        assert_eq!(
            p("/usr/lib/libz.so.1:inflate").module.as_deref(),
            Some("/usr/lib/libz.so.1")
        );
        assert_eq!("libc:free".parse::<ProbeSpec>().unwrap().symbol, "free");
    }

    #[test]
    fn rejects_malformed_specs_with_the_cause() {
        let e = |s: &str| ProbeSpec::parse(s).unwrap_err();
        assert_eq!(e(""), SpecError::Empty);
        assert!(matches!(e(":malloc"), SpecError::EmptyModule { .. }));
        assert!(matches!(e("libc:"), SpecError::EmptySymbol { .. }));
        assert!(matches!(e("libc:+4"), SpecError::EmptySymbol { .. }));
        assert!(matches!(e("+4"), SpecError::EmptySymbol { .. }));
        assert!(matches!(e("malloc+"), SpecError::EmptyOffset { .. }));
        assert!(matches!(e("malloc+x"), SpecError::BadOffset { .. }));
        assert!(matches!(e("malloc+0x"), SpecError::BadOffset { .. }));
        assert!(matches!(e("malloc+0xg1"), SpecError::BadOffset { .. }));
        assert!(matches!(e("malloc+-1"), SpecError::BadOffset { .. }));
        assert!(matches!(e("malloc+12a"), SpecError::BadOffset { .. }));
        assert!(matches!(
            e("malloc+0x10000000000000000"),
            SpecError::BadOffset { .. }
        ));
        assert!(matches!(
            e("malloc+99999999999999999999"),
            SpecError::BadOffset { .. }
        ));
        assert!(matches!(e("a:b:c"), SpecError::ExtraColon { .. }));
        assert!(matches!(
            e("libc: malloc"),
            SpecError::BadCharacter { ch: ' ', .. }
        ));
        let msg = e("malloc+zz").to_string();
        assert!(msg.contains("'zz'") && msg.contains("malloc+zz"), "{msg}");
    }

    #[test]
    fn parses_demangled_specs() {
        let s = p("main:ns::Parser::*");
        assert_eq!(
            (s.module.as_deref(), s.symbol.as_str()),
            (Some("main"), "ns::Parser::*")
        );
        let s = p("ns::Parser::parse");
        assert_eq!((s.module, s.symbol.as_str()), (None, "ns::Parser::parse"));
        let s = p("libfoo:ns::f(unsigned int, char const*)+0x4");
        assert_eq!(s.symbol, "ns::f(unsigned int, char const*)");
        assert_eq!(s.offset, 4);
        assert_eq!(
            p("main:std::vector<int, std::allocator<int> >::size").offset,
            0
        );
        assert_eq!(p("main:ns::V::operator+").symbol, "ns::V::operator+");
        assert_eq!(p("main:ns::V::operator++").symbol, "ns::V::operator++");
        assert_eq!(p("main:ns::V::operator+=").symbol, "ns::V::operator+=");
        let s = p("main:ns::V::operator+(ns::V const&)+8");
        assert_eq!(
            (s.symbol.as_str(), s.offset),
            ("ns::V::operator+(ns::V const&)", 8)
        );
        assert!(matches!(
            ProbeSpec::parse("main:ns:f"),
            Err(SpecError::ExtraColon { .. })
        ));
        assert!(matches!(
            ProbeSpec::parse("main:ns::f x"),
            Err(SpecError::BadCharacter { ch: ' ', .. })
        ));
    }

    #[test]
    fn glob_matching() {
        assert!(glob_match("malloc", "malloc"));
        assert!(!glob_match("malloc", "malloc_info"));
        assert!(!glob_match("malloc", "mallo"));
        assert!(glob_match("*", ""));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("work_*", "work_"));
        assert!(glob_match("work_*", "work_a_b"));
        assert!(!glob_match("work_*", "xwork_a"));
        assert!(glob_match("*_avx2", "__strlen_avx2"));
        assert!(!glob_match("*_avx2", "__strlen_avx2_rtm"));
        assert!(glob_match("*str*avx2*", "__strlen_avx2_rtm"));
        assert!(glob_match("w?rk", "work"));
        assert!(!glob_match("w?rk", "wrk"));
        assert!(glob_match("??", "ab"));
        assert!(!glob_match("??", "abc"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
        assert!(!glob_match("a*b*c", "aXbYbZ"));
        assert!(glob_match("**a**", "bab"));
        assert!(glob_match("é?", "éà"));
        // Pathological backtracking stays linear-ish.
        let long = "a".repeat(5000);
        assert!(!glob_match("*a*a*a*a*a*a*b", &long));
    }

    #[test]
    fn module_name_rules() {
        let m = |pat: &str, name: &str| {
            module_name_matches(pat, name, &format!("/usr/lib/{name}"), false)
        };
        assert!(m("libc", "libc.so.6"));
        assert!(m("libc", "libc-2.36.so"));
        assert!(!m("libc", "libcrypto.so.3"));
        assert!(m("libc.so.6", "libc.so.6"));
        assert!(m("libc.so", "libc.so.6"));
        assert!(m("libpython", "libpython3.11.so.1.0"));
        assert!(m("ld-linux", "ld-linux-x86-64.so.2"));
        assert!(m("libcrypto", "libcrypto.so.3"));
        assert!(m("libc*", "libcrypto.so.3"));
        assert!(m("lib?", "libc.so.6"));
        assert!(!m("ibc", "libc.so.6"));
        assert!(m("/usr/lib/*", "libc.so.6"));
        assert!(!m("/lib/*", "libc.so.6"));
        assert!(module_name_matches("main", "prog", "/bin/prog", true));
        assert!(!module_name_matches("main", "prog", "/bin/prog", false));
        assert!(module_name_matches("prog", "prog", "/bin/prog", true));
    }

    #[test]
    fn edit_distance_basics() {
        let d = |a: &str, b: &str| {
            edit_distance(
                &a.chars().collect::<Vec<_>>(),
                &b.chars().collect::<Vec<_>>(),
            )
        };
        assert_eq!(d("mallocc", "malloc"), 1);
        assert_eq!(d("", "abc"), 3);
        assert_eq!(d("kitten", "sitting"), 3);
        assert_eq!(d("same", "same"), 0);
    }
}

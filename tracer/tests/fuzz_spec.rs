//! Property tests ("fuzzing") of the probe-spec parser and the glob matcher: any text
//! is either a spec or a named `SpecError`, never a panic; a spec built from parts parses
//! back to those parts; `Display` round-trips; globs agree with a slow reference matcher.
//!
//! Case counts keep the whole fuzz set under a minute on a 2-core machine; set
//! `FUZZ_CASES=N` for a longer run (`bash bench/fuzz.sh` does).

use proptest::prelude::*;
use tracer::spec::{glob_match, is_glob, module_name_matches, ProbeSpec, SpecError};

/// Text that looks like a spec more often than uniform noise would.
fn spec_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[a-z_*?:+0-9xX. \t@-]{0,24}",
        "[a-z*?]{0,6}(:[a-z_*?]{0,8})?(\\+(0x)?[0-9a-fA-F]{0,20})?",
    ]
}

/// A symbol or module part with no `:`, `+`, whitespace or control characters.
fn part() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_.@*?$-]{1,20}"
}

/// Reference glob matcher: plain recursion over the pattern, exponential but obviously
/// right on the short inputs the tests give it.
fn reference_glob(p: &[char], t: &[char]) -> bool {
    match p.split_first() {
        None => t.is_empty(),
        Some(('*', rest)) => (0..=t.len()).any(|i| reference_glob(rest, &t[i..])),
        Some(('?', rest)) => !t.is_empty() && reference_glob(rest, &t[1..]),
        Some((c, rest)) => t.first() == Some(c) && reference_glob(rest, &t[1..]),
    }
}

proptest! {
    #![proptest_config(tests::fuzz_cases(4000))]

    #[test]
    fn parse_never_panics_and_errors_are_named(text in spec_like()) {
        match ProbeSpec::parse(&text) {
            Ok(spec) => {
                prop_assert_eq!(&spec.text, &text);
                prop_assert!(!spec.symbol.is_empty());
                prop_assert!(spec.module.as_ref().is_none_or(|m| !m.is_empty()));
                // `::` separates C++ and Rust path elements; a lone ':' ends the module.
                let b = spec.symbol.as_bytes();
                prop_assert!(!(0..b.len()).any(|i| b[i] == b':'
                    && b.get(i + 1) != Some(&b':')
                    && (i == 0 || b[i - 1] != b':')));
                // Display round-trips.
                prop_assert_eq!(ProbeSpec::parse(&spec.to_string()), Ok(spec.clone()));
                prop_assert_eq!(text.parse::<ProbeSpec>(), Ok(spec));
            }
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(!msg.is_empty());
                prop_assert!(!msg.contains('\n'), "error is not one line: {msg:?}");
                if text.is_empty() {
                    prop_assert_eq!(e, SpecError::Empty);
                }
            }
        }
    }

    #[test]
    fn spec_from_parts_parses_back(
        module in proptest::option::of(part()),
        symbol in part(),
        offset in proptest::option::of(any::<u64>()),
        hex in any::<bool>(),
    ) {
        let mut text = String::new();
        if let Some(m) = &module {
            text.push_str(m);
            text.push(':');
        }
        text.push_str(&symbol);
        if let Some(o) = offset {
            text.push_str(&if hex { format!("+{o:#x}") } else { format!("+{o}") });
        }
        let spec = ProbeSpec::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(spec.module, module);
        prop_assert_eq!(spec.symbol, symbol);
        prop_assert_eq!(spec.offset, offset.unwrap_or(0));
        prop_assert_eq!(spec.text, text);
    }

    #[test]
    fn offsets_that_overflow_are_refused_by_name(symbol in part(), digits in "[1-9][0-9]{20,30}") {
        let text = format!("{symbol}+{digits}");
        let refused = matches!(ProbeSpec::parse(&text), Err(SpecError::BadOffset { .. }));
        prop_assert!(refused);
    }

    #[test]
    fn glob_agrees_with_reference(pattern in "[ab*?]{0,10}", text in "[ab]{0,12}") {
        let p: Vec<char> = pattern.chars().collect();
        let t: Vec<char> = text.chars().collect();
        prop_assert_eq!(glob_match(&pattern, &text), reference_glob(&p, &t));
    }

    #[test]
    fn glob_never_panics_and_matches_itself(pattern in any::<String>(), text in any::<String>()) {
        let _ = glob_match(&pattern, &text);
        let _ = is_glob(&pattern);
        let _ = module_name_matches(&pattern, &text, &text, false);
        if !is_glob(&text) {
            prop_assert!(glob_match(&text, &text));
        }
        prop_assert!(glob_match("*", &text));
    }

    #[test]
    fn glob_with_wildcards_substituted_matches(text in "[a-z0-9_.]{0,16}", picks in proptest::collection::vec(0u8..4, 16)) {
        // Replace some characters by `?` and some runs by `*`: the result still matches.
        let mut pattern = String::new();
        for (i, c) in text.chars().enumerate() {
            match picks[i % picks.len()] {
                0 => pattern.push('?'),
                1 if !pattern.ends_with('*') => pattern.push('*'),
                1 => {}
                _ => pattern.push(c),
            }
        }
        prop_assert!(glob_match(&pattern, &text), "{pattern:?} vs {text:?}");
    }

    #[test]
    fn module_prefix_rule(name in "lib[a-z]{1,6}", version in "[.\\-_0-9][a-z0-9.]{0,6}") {
        // `libc` names `libc.so.6` and `libc-2.36.so`, never `libcrypto.so.3`.
        let full = format!("{name}{version}");
        let full_path = format!("/x/{full}");
        prop_assert!(module_name_matches(&name, &full, &full_path, false));
        let longer = format!("{name}x{version}");
        let longer_path = format!("/x/{longer}");
        prop_assert!(!module_name_matches(&name, &longer, &longer_path, false));
    }
}

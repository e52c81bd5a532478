//! Property tests ("fuzzing") of the `/proc/PID/maps` parser: any text parses or gives a
//! `ParseError` naming the bad line, never a panic; a listing printed the way the kernel
//! prints it parses back to the same entries; `Perms` round-trips through `Display`.
//!
//! Case counts keep the whole fuzz set under a minute on a 2-core machine; set
//! `FUZZ_CASES=N` for a longer run (`bash bench/fuzz.sh` does).

use agent::maps::{parse, parse_line, MapEntry, Perms};
use proptest::prelude::*;

fn perms() -> impl Strategy<Value = Perms> {
    (any::<bool>(), any::<bool>(), any::<bool>(), any::<bool>()).prop_map(
        |(read, write, exec, shared)| Perms {
            read,
            write,
            exec,
            shared,
        },
    )
}

fn entry() -> impl Strategy<Value = MapEntry> {
    (
        any::<u64>(),
        any::<u64>(),
        perms(),
        any::<u64>(),
        "[0-9a-f]{2,3}:[0-9a-f]{2,5}",
        any::<u64>(),
        prop_oneof![
            Just(String::new()),
            Just("[heap]".to_string()),
            Just("[vdso]".to_string()),
            "/[a-zA-Z0-9_./ -]{0,40}[a-zA-Z0-9_.]",
            "/[a-z]{1,10} \\(deleted\\)",
        ],
    )
        .prop_map(|(a, b, perms, offset, dev, inode, path)| MapEntry {
            start: a.min(b),
            end: a.max(b),
            perms,
            offset,
            dev,
            inode,
            path,
        })
}

/// One line as the kernel's `show_map_vma` prints it (the path column padded).
fn kernel_line(e: &MapEntry) -> String {
    let head = format!(
        "{:08x}-{:08x} {} {:08x} {} {}",
        e.start, e.end, e.perms, e.offset, e.dev, e.inode
    );
    if e.path.is_empty() {
        format!("{head} ")
    } else {
        format!("{head:<72} {}", e.path)
    }
}

/// Lines near the real format: fields mutated, dropped, doubled.
fn line_like() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<String>(),
        "[0-9a-fx-]{0,20} [rwxps-]{0,5} [0-9a-f]{0,9} [0-9a-f:]{0,6} [0-9 ]{0,8}[ /a-z]{0,10}",
        entry().prop_map(|e| kernel_line(&e)),
        (entry(), 0usize..80, any::<char>()).prop_map(|(e, at, c)| {
            let mut l: Vec<char> = kernel_line(&e).chars().collect();
            let at = at.min(l.len());
            l.insert(at, c);
            l.into_iter().collect()
        }),
        (entry(), 0usize..80).prop_map(|(e, cut)| kernel_line(&e).chars().take(cut).collect()),
    ]
}

proptest! {
    #![proptest_config(tests::fuzz_cases(3000))]

    #[test]
    fn any_line_parses_or_is_none(line in line_like()) {
        if let Some(e) = parse_line(&line) {
            prop_assert!(e.start <= e.end);
            prop_assert_eq!(e.len(), e.end - e.start);
            prop_assert!(!e.dev.is_empty());
        }
    }

    #[test]
    fn any_listing_parses_or_names_the_line(lines in proptest::collection::vec(line_like(), 0..8)) {
        let text = lines.join("\n");
        match parse(&text) {
            Ok(entries) => prop_assert!(entries.len() <= lines.len()),
            Err(e) => {
                prop_assert!(e.line >= 1 && e.line <= text.lines().count());
                prop_assert_eq!(text.lines().nth(e.line - 1), Some(e.text.as_str()));
                prop_assert!(parse_line(&e.text).is_none());
                prop_assert!(!e.to_string().contains('\n'));
            }
        }
    }

    #[test]
    fn kernel_listing_round_trips(entries in proptest::collection::vec(entry(), 0..10)) {
        let text: String = entries.iter().map(|e| kernel_line(e) + "\n").collect();
        prop_assert_eq!(parse(&text), Ok(entries));
    }

    #[test]
    fn perms_display_round_trips(p in perms(), start in any::<u32>()) {
        let line = format!("{start:x}-{start:x} {p} 00000000 00:00 0");
        let e = parse_line(&line).expect("valid line");
        prop_assert_eq!(e.perms, p);
        prop_assert_eq!(e.perms.to_string(), p.to_string());
        prop_assert!(e.is_empty());
    }

    #[test]
    fn contains_is_the_half_open_range(e in entry(), addr in any::<u64>()) {
        prop_assert_eq!(e.contains(addr), e.start <= addr && addr < e.end);
    }
}

//! `tracer list` end to end: the functions of an ELF file or of a live process that match
//! a pattern, with whether each can be probed.

mod common;
use common::*;

fn list(args: &[&str]) -> Vec<String> {
    let mut a = vec!["list"];
    a.extend_from_slice(args);
    let out = tracer_output(&a);
    assert!(
        out.status.success(),
        "tracer list {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// `tracer list PATH PATTERN` prints exactly the matching functions of the file, at
/// file addresses, refusing the 3-byte one; a pattern matching nothing is an error.
#[test]
fn list_file() {
    let dir = temp_dir("listfile");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let e = exe.to_str().unwrap();

    let good = list(&[e, "go*"]);
    assert_eq!(good.len(), 1, "{good:?}");
    assert!(good[0].starts_with("tiny:good  0x"), "{good:?}");
    assert!(good[0].ends_with("probeable"), "{good:?}");
    // A PIE's file addresses are small; a live process's are not.
    let addr = hex(good[0].split_whitespace().nth(1).unwrap());
    assert!(addr < 0x10_0000, "{good:?}");

    let tiny = list(&[e, "t?ny"]);
    assert_eq!(tiny.len(), 1, "{tiny:?}");
    assert!(
        tiny[0].contains("tiny:tiny") && tiny[0].contains("size 3") && tiny[0].contains("refused"),
        "{tiny:?}"
    );

    build_target(&dir);
    let lib = dir.join("libtarget.so");
    let work = list(&[lib.to_str().unwrap(), "w*k"]);
    assert_eq!(work.len(), 1, "{work:?}");
    assert!(work[0].starts_with("libtarget.so:work  0x"), "{work:?}");

    let out = tracer_output(&["list", e, "zzz*"]);
    assert_one_line_error(&out, &["zzz*"]);
}

/// `tracer list PID PATTERN` prints the matching functions of the executable and its
/// libraries at their run-time addresses, without disturbing the process.
#[test]
fn list_pid() {
    let dir = temp_dir("listpid");
    let exe = cc(&dir, "tiny", TINY_C, &["-pthread", "-pie", "-fPIE"]);
    let mut t = Target::spawn(&exe, &[]);
    let first = t.line();
    let f: Vec<&str> = first.split_whitespace().collect();
    let (tiny, good) = (hex(f[1]), hex(f[2]));
    let pid = t.pid().to_string();

    let main = list(&[&pid, "main:*"]);
    let find = |name: &str| {
        main.iter()
            .find(|l| l.starts_with(&format!("tiny:{name}  ")))
            .unwrap_or_else(|| panic!("{name} not listed: {main:?}"))
    };
    assert!(
        find("good").contains(&format!("{good:#x}")) && find("good").ends_with("probeable"),
        "{main:?}"
    );
    assert!(
        find("tiny").contains(&format!("{tiny:#x}")) && find("tiny").contains("refused"),
        "{main:?}"
    );
    find("main");
    assert!(
        !main.iter().any(|l| l.contains("malloc")),
        "libc leaked into main:*: {main:?}"
    );

    let malloc = list(&[&pid, "libc:mallo?"]);
    assert_eq!(malloc.len(), 1, "{malloc:?}");
    assert!(malloc[0].starts_with("libc.so.6:malloc  0x7"), "{malloc:?}");

    assert_eq!(tracer_pid(t.pid()), 0);
    let (last, ok) = t.finish();
    assert!(ok && last == "ok 1", "target disturbed: {last:?}");
}

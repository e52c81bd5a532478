//! The agent's descriptors and the program's: after a session the program's own next
//! `open` returns the number it would untraced, and a program that closes every
//! descriptor it does not know and opens files of its own under those numbers never has
//! them cut, grown or overwritten by a later session (whose probes work, or are refused
//! with the reason).

mod common;
use common::*;
use std::io::Write;
use std::path::Path;

/// Functions the generated program has: more than the 1024 counter slots the agent's
/// first session makes room for, so a second session over all of them must grow the
/// counter region and take new code chunks.
const N: usize = 1100;

/// Bytes each of the program's own files holds.
const FILE_LEN: usize = 10_000;

/// A program driven by stdin lines:
/// - `open`: opens `/dev/null`, prints `fd N`, closes it;
/// - `own A B`: closes every descriptor from 3 up (as daemons do), then creates its files
///   `A` and `B` (`FILE_LEN` known bytes each, kept open read-write), prints `own FA FB`;
/// - `work`: calls each `mNNNN` once, prints `sum S`;
/// - `check`: reads both files back through its descriptors, prints `check ok` or
///   `check bad`;
/// - `stop` (or EOF): prints `end`.
fn build(dir: &Path) -> std::path::PathBuf {
    let mut src = String::from(
        "#include <fcntl.h>\n#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n\
         #include <unistd.h>\n",
    );
    for i in 0..N {
        src.push_str(&format!(
            "__attribute__((noinline)) int m{i:04}(int x) {{ return x * 3 + {i} + 1; }}\n"
        ));
    }
    src.push_str("int (*const table[])(int) = {\n");
    for i in 0..N {
        src.push_str(&format!("m{i:04},\n"));
    }
    src.push_str(&format!(
        r#"}};
#define N {N}
#define LEN {FILE_LEN}
static int fa = -1, fb = -1;
static char byte_at(int file, int i) {{ return (char)(i * 7 + file * 13); }}
static int make(const char *path, int file) {{
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0600);
    char buf[LEN];
    for (int i = 0; i < LEN; i++) buf[i] = byte_at(file, i);
    if (fd < 0 || write(fd, buf, LEN) != LEN) {{ perror("own file"); exit(2); }}
    return fd;
}}
static int same(int fd, int file) {{
    char buf[LEN + 1];
    if (pread(fd, buf, LEN + 1, 0) != LEN) return 0;
    for (int i = 0; i < LEN; i++) if (buf[i] != byte_at(file, i)) return 0;
    return 1;
}}
int main(void) {{
    char line[4096];
    setvbuf(stdout, 0, _IOLBF, 0);
    printf("ready\n");
    while (fgets(line, sizeof line, stdin)) {{
        line[strcspn(line, "\n")] = 0;
        if (strcmp(line, "open") == 0) {{
            int fd = open("/dev/null", O_RDONLY);
            printf("fd %d\n", fd);
            close(fd);
        }} else if (strncmp(line, "own ", 4) == 0) {{
            char *a = line + 4, *b = strchr(a, ' ');
            *b++ = 0;
            long max = sysconf(_SC_OPEN_MAX);
            for (long fd = 3; fd < max; fd++) close((int)fd);
            fa = make(a, 1);
            fb = make(b, 2);
            printf("own %d %d\n", fa, fb);
        }} else if (strcmp(line, "work") == 0) {{
            long s = 0;
            for (int i = 0; i < N; i++) s = s * 31 + table[i](i);
            printf("sum %ld\n", s);
        }} else if (strcmp(line, "check") == 0) {{
            printf("check %s\n", same(fa, 1) && same(fb, 2) ? "ok" : "bad");
        }} else break;
    }}
    printf("end\n");
    return 0;
}}
"#
    ));
    cc(dir, "fds", &src, &["-O2", "-pie", "-fPIE"])
}

fn say(t: &mut Target, cmd: &str) -> String {
    let i = t.stdin.as_mut().expect("stdin");
    writeln!(i, "{cmd}").expect("write to the program");
    i.flush().expect("flush");
    t.line()
}

/// `tracer attach PID -p SPEC --duration 0.3 --json -o FILE`: its output and the JSON
/// lines it wrote.
fn attach(pid: i32, dir: &Path, tag: &str, spec: &str) -> (std::process::Output, String) {
    attach_with(pid, dir, tag, spec, &[])
}

/// [`attach`] with more options.
fn attach_with(
    pid: i32,
    dir: &Path,
    tag: &str,
    spec: &str,
    more: &[&str],
) -> (std::process::Output, String) {
    let json = dir.join(format!("{tag}.json"));
    let pid = pid.to_string();
    let mut args = vec![
        "attach",
        &pid,
        "-p",
        spec,
        "--duration",
        "0.3",
        "--json",
        "-o",
        json.to_str().unwrap(),
    ];
    args.extend_from_slice(more);
    let out = tracer_output(&args);
    (out, std::fs::read_to_string(&json).unwrap_or_default())
}

/// The agent's memfds are kept at high descriptor numbers, so after a session the
/// program's next `open` returns what it returned before (3 when it has only 0-2 open),
/// and no agent memfd sits at a low number.
#[test]
fn after_a_session_the_programs_next_open_gets_the_same_number() {
    let dir = temp_dir("fds-open");
    let exe = build(&dir);
    let mut t = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    let untraced = say(&mut t, "open");
    let (out, json) = attach(t.pid(), &dir, "first", "main:m000?");
    assert_success(&out);
    assert!(json.contains("m0001"), "no report: {json}");
    assert_eq!(
        say(&mut t, "open"),
        untraced,
        "the program's numbering moved"
    );
    // Where the agent's memfds are: none below 64.
    for e in std::fs::read_dir(format!("/proc/{}/fd", t.pid())).unwrap() {
        let e = e.unwrap();
        let n: i32 = e.file_name().to_string_lossy().parse().unwrap();
        let target = std::fs::read_link(e.path()).unwrap_or_default();
        if target.to_string_lossy().starts_with("/memfd:tracer") {
            assert!(n >= 64, "agent memfd at fd {n}: {}", target.display());
        }
    }
    // A second session leaves it too.
    let (out, _) = attach(t.pid(), &dir, "second", "main:m00*");
    assert_success(&out);
    assert_eq!(say(&mut t, "open"), untraced, "after a second session");
    assert_eq!(t.finish(), ("end".to_string(), true));
}

/// After a first session, the program closes every descriptor from 3 up and opens two
/// files of its own (which get the lowest numbers, where an agent memfd left at a low
/// number was). A `--hist` session still works, and a session over more probes than the counter region holds (it
/// must grow) and than one code chunk holds: the program's files are unchanged byte for
/// byte, the probes beyond the region's room are refused with the reason (or the attach
/// fails with one clear line), and the program computes what an untraced copy computes.
#[test]
fn a_program_that_closes_our_descriptors_keeps_its_files_intact() {
    let dir = temp_dir("fds-closefrom");
    let exe = build(&dir);
    let mut t = Target::spawn(&exe, &[]);
    let mut reference = Target::spawn(&exe, &[]);
    assert_eq!(t.line(), "ready");
    assert_eq!(reference.line(), "ready");
    let pid = t.pid();

    // With --hist, so that the agent also keeps a latency region and its descriptor.
    let (out, _) = attach_with(pid, &dir, "first", "main:m0000", &["--hist"]);
    assert_success(&out);

    let (a, b) = (dir.join("a.dat"), dir.join("b.dat"));
    let (ra, rb) = (dir.join("ra.dat"), dir.join("rb.dat"));
    let own = say(&mut t, &format!("own {} {}", a.display(), b.display()));
    let own_ref = say(
        &mut reference,
        &format!("own {} {}", ra.display(), rb.display()),
    );
    assert_eq!(own, own_ref, "the program's files got other numbers");
    let before = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert_eq!(before.0.len(), FILE_LEN);

    // The latency region's descriptor is gone: the agent makes a new one.
    let (hist, _) = attach_with(pid, &dir, "hist", "main:m000?", &["--hist"]);

    let (out, json) = attach(pid, &dir, "second", "main:m*");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let now = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
    assert!(
        now == before,
        "the program's files changed (now {} and {} bytes, were {FILE_LEN}); tracer said: {stderr}",
        now.0.len(),
        now.1.len()
    );
    if out.status.success() {
        let reports = json_lines(&json);
        let refused: Vec<&serde_json::Value> = reports
            .iter()
            .filter(|r| r.get("refused").is_some() || r.get("reason").is_some())
            .collect();
        let counted = reports.len() - refused.len();
        assert!(counted > 0, "no probe worked: {json}");
        for r in &refused {
            let text = r.to_string();
            assert!(
                text.contains("closed the tracer's shared-memory descriptor"),
                "refused for another reason: {text}"
            );
        }
    } else {
        assert_one_line_error(&out, &["closed or reused the tracer agent's descriptor"]);
    }

    assert_success(&hist);
    assert_eq!(say(&mut t, "check"), "check ok");
    assert_eq!(say(&mut t, "work"), say(&mut reference, "work"));
    assert_eq!(say(&mut t, "open"), say(&mut reference, "open"));
    assert_eq!(t.finish(), ("end".to_string(), true));
    assert_eq!(reference.finish(), ("end".to_string(), true));
}

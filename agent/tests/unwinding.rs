//! Unwinding through exit-probed frames: `longjmp` out of them, and C++ exceptions
//! thrown through them. The target code is C++ compiled with `c++` into a shared library
//! that the test loads.

use agent::interceptor::{Interceptor, ProbeRequest};
use probes::ExitContext;
use std::ffi::{CStr, CString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Mutex, OnceLock};

const SOURCE: &str = r#"
#include <setjmp.h>
#include <stdexcept>

static jmp_buf env;
static volatile int sink;

extern "C" __attribute__((noinline)) int jumper(int x) {
    if (x < 0) longjmp(env, 1);
    sink = x;
    return x + 1;
}

// Exit-probed; longjmp leaves it without returning.
extern "C" __attribute__((noinline)) int lj_middle(int x) {
    int r = jumper(x);
    sink = r;
    return r * 2;
}

extern "C" __attribute__((noinline)) int lj_top(int x) {
    if (setjmp(env)) return -100;
    int r = lj_middle(x);
    sink = r;
    return r;
}

extern "C" __attribute__((noinline)) int thrower(int x) {
    if (x < 0) throw std::runtime_error("negative");
    sink = x;
    return x + 1;
}

// Exit-probed; the exception passes through it.
extern "C" __attribute__((noinline)) int middle(int x) {
    int r = thrower(x);
    sink = r;
    return r * 2;
}

extern "C" __attribute__((noinline)) int catcher(int x) {
    try {
        int r = middle(x);
        sink = r;
        return r;
    } catch (const std::exception &e) {
        return -1;
    }
}

// Twins probed without handlers, which take the trampolines' inline paths.
extern "C" __attribute__((noinline)) int lj_middle2(int x) {
    int r = jumper(x);
    sink = r;
    return r * 2;
}

extern "C" __attribute__((noinline)) int lj_top2(int x) {
    if (setjmp(env)) return -100;
    int r = lj_middle2(x);
    sink = r;
    return r;
}

extern "C" __attribute__((noinline)) int middle2(int x) {
    int r = thrower(x);
    sink = r;
    return r * 2;
}

extern "C" __attribute__((noinline)) int catcher2(int x) {
    try {
        int r = middle2(x);
        sink = r;
        return r;
    } catch (const std::exception &e) {
        return -1;
    }
}
"#;

type F = unsafe extern "C" fn(i32) -> i32;

struct Lib {
    lj_top: F,
    lj_middle: u64,
    catcher: F,
    middle: u64,
    lj_top2: F,
    lj_middle2: u64,
    catcher2: F,
    middle2: u64,
}

/// Build the library once per test process and load it.
fn lib() -> &'static Lib {
    static LIB: OnceLock<Lib> = OnceLock::new();
    LIB.get_or_init(|| {
        // Loaded libraries stay mapped after their file is removed with the directory.
        let dir = tests::temp_dir("unwinding");
        let so: PathBuf = tests::cxx(
            &dir,
            "libunwindtest.so",
            SOURCE,
            &["-fPIC", "-shared", "-fno-optimize-sibling-calls"],
        );
        let path = CString::new(so.to_str().unwrap()).unwrap();
        // SAFETY: dlopen of the library just built, with a NUL-terminated path.
        let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        if h.is_null() {
            // SAFETY: dlerror returns a NUL-terminated message after a failure.
            let e = unsafe { CStr::from_ptr(libc::dlerror()) };
            panic!("dlopen {}: {}", so.display(), e.to_string_lossy());
        }
        let sym = |n: &str| {
            let c = CString::new(n).unwrap();
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(h, c.as_ptr()) };
            assert!(!p.is_null(), "{n} not found");
            p as u64
        };
        // SAFETY: the symbols are functions with these C signatures.
        unsafe {
            Lib {
                lj_top: std::mem::transmute::<u64, F>(sym("lj_top")),
                lj_middle: sym("lj_middle"),
                catcher: std::mem::transmute::<u64, F>(sym("catcher")),
                middle: sym("middle"),
                lj_top2: std::mem::transmute::<u64, F>(sym("lj_top2")),
                lj_middle2: sym("lj_middle2"),
                catcher2: std::mem::transmute::<u64, F>(sym("catcher2")),
                middle2: sym("middle2"),
            }
        }
    })
}

static INTERCEPTOR: Mutex<Option<Interceptor>> = Mutex::new(None);

/// Held for the whole of each test. The first exit probe patches the unwinder's entry
/// points (`_Unwind_RaiseException`, ...) in this very process, with no thread stopped:
/// another test throwing through them at that moment would execute half-written code
/// (the tracer itself patches with every thread stopped and none inside a patched range).
/// Without this, about one run in fifteen died of SIGSEGV.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn install(req: ProbeRequest) -> u32 {
    let mut g = INTERCEPTOR.lock().unwrap();
    let i = g.get_or_insert_with(|| Interceptor::new(64).unwrap());
    let p = i.prepare(&req).expect("prepare");
    i.commit_in_process(&p).expect("commit");
    p.id
}

/// (hits, exits, lost_exits)
fn counts(id: u32) -> (u64, u64, u64) {
    let g = INTERCEPTOR.lock().unwrap();
    let c = g.as_ref().unwrap().counters(id);
    (c.hits(), c.exits(), c.lost_exits())
}

static LJ_EXITS_SEEN: AtomicU64 = AtomicU64::new(0);

fn lj_exit(ctx: &mut ExitContext) {
    LJ_EXITS_SEEN.fetch_add(ctx.retval() & 0xffff_ffff, SeqCst);
}

#[test]
fn longjmp_out_of_an_exit_probed_frame() {
    let _serial = serial();
    let l = lib();
    // SAFETY: calling the library's functions with their signatures.
    let call = |x| unsafe { (l.lj_top)(x) };
    assert_eq!(call(5), 12);
    assert_eq!(call(-1), -100);
    let id = install(ProbeRequest::entry(l.lj_middle, None).on_exit(lj_exit));
    assert_eq!(call(5), 12);
    assert_eq!(call(-1), -100);
    assert_eq!(counts(id), (2, 1, 0));
    // The abandoned frame is found when the next probed frame takes its place.
    assert_eq!(call(6), 14);
    assert_eq!(counts(id), (3, 2, 1));
    for i in 0..100 {
        assert_eq!(call(-1), -100);
        assert_eq!(call(i), 2 * (i + 1));
    }
    assert_eq!(counts(id), (203, 102, 101));
    assert_eq!(
        LJ_EXITS_SEEN.load(SeqCst),
        12 + 14 + (0..100).map(|i| 2 * (i + 1)).sum::<i32>() as u64
    );
}

static MIDDLE_EXITS: AtomicU64 = AtomicU64::new(0);

fn middle_exit(_: &mut ExitContext) {
    MIDDLE_EXITS.fetch_add(1, SeqCst);
}

#[test]
fn exception_through_an_exit_probed_frame_is_caught() {
    let _serial = serial();
    let l = lib();
    // SAFETY: calling the library's functions with their signatures.
    let call = |x| unsafe { (l.catcher)(x) };
    assert_eq!(call(3), 8);
    assert_eq!(call(-3), -1);
    let id = install(ProbeRequest::entry(l.middle, None).on_exit(middle_exit));
    {
        let g = INTERCEPTOR.lock().unwrap();
        assert!(
            !g.as_ref().unwrap().internal().is_empty(),
            "the unwinder was not hooked"
        );
    }
    assert_eq!(call(3), 8);
    assert_eq!(call(-3), -1);
    assert_eq!(counts(id), (2, 1, 1));
    for i in 0..50 {
        assert_eq!(call(i), 2 * (i + 1));
        assert_eq!(call(-i - 1), -1);
    }
    assert_eq!(counts(id), (102, 51, 51));
    assert_eq!(MIDDLE_EXITS.load(SeqCst), 51);
}

/// `longjmp` out of a frame probed without handlers (inline entry and return paths):
/// the same results and the same accounting of abandoned frames.
#[test]
fn longjmp_out_of_a_handlerless_exit_probed_frame() {
    let _serial = serial();
    let l = lib();
    // SAFETY: calling the library's functions with their signatures.
    let call = |x| unsafe { (l.lj_top2)(x) };
    let id = install(ProbeRequest::entry(l.lj_middle2, None).with_exit());
    assert_eq!(call(5), 12);
    assert_eq!(call(-1), -100);
    assert_eq!(counts(id), (2, 1, 0));
    assert_eq!(call(6), 14);
    assert_eq!(counts(id), (3, 2, 1));
    for i in 0..100 {
        assert_eq!(call(-1), -100);
        assert_eq!(call(i), 2 * (i + 1));
    }
    assert_eq!(counts(id), (203, 102, 101));
}

/// A C++ exception through a frame probed without handlers is caught upstream.
#[test]
fn exception_through_a_handlerless_exit_probed_frame_is_caught() {
    let _serial = serial();
    let l = lib();
    // SAFETY: calling the library's functions with their signatures.
    let call = |x| unsafe { (l.catcher2)(x) };
    let id = install(ProbeRequest::entry(l.middle2, None).with_exit());
    assert_eq!(call(3), 8);
    assert_eq!(call(-3), -1);
    for i in 0..50 {
        assert_eq!(call(i), 2 * (i + 1));
        assert_eq!(call(-i - 1), -1);
    }
    let (hits, exits, _) = counts(id);
    assert_eq!((hits, exits), (102, 51));
}

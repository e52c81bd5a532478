//! The authoring API in-process: fault-free reads on real mappings, and the shims the
//! attribute macros generate, called as the agent will call them.

use probes::context::{EntryContext, ExitContext, OffsetContext};
use probes::pack::abi::{HitInfo, SHIM_OK, SHIM_PANICKED};
use probes::prelude::*;
use std::mem::MaybeUninit;

/// Two pages, the second unmapped: (start of the first page).
fn page_before_hole() -> u64 {
    // SAFETY: a fresh anonymous mapping of two pages; the second is unmapped again and
    // the first is leaked for the test's life.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        assert_eq!(libc::munmap((p as *mut u8).add(4096) as *mut _, 4096), 0);
        p as u64
    }
}

#[test]
fn reads_return_none_on_null_wild_and_unmapped_pointers() {
    let x: u64 = 0x1122_3344_5566_7788;
    assert_eq!(read::<u64>(&x as *const u64 as u64), Some(x));
    assert_eq!(read::<[u8; 2]>(&x as *const u64 as u64), Some([0x88, 0x77]));
    assert_eq!(read::<u64>(0), None);
    assert_eq!(read::<u64>(0xdead_0000_0000_0000), None, "non-canonical");
    assert_eq!(read::<u64>(0x10), None, "first page");
    let page = page_before_hole();
    assert_eq!(read::<u64>(page + 4096), None, "unmapped");
    assert_eq!(
        read::<u64>(page + 4092),
        None,
        "straddles the hole: no partial value"
    );
    assert!(read_str(0, 64).is_none());
    assert!(read_str(page + 4096, 64).is_none());
    assert!(read_str(0xffff_ffff_ffff_f000, 64).is_none(), "kernel half");
}

#[test]
fn read_str_stops_at_nul_bound_and_hole() {
    let page = page_before_hole();
    // SAFETY: the first page is mapped and writable.
    let mem = unsafe { std::slice::from_raw_parts_mut(page as *mut u8, 4096) };
    mem[4090..4096].copy_from_slice(b"abcde\0");
    let s = read_str(page + 4090, 64).unwrap();
    assert_eq!(
        (&*s, s.truncated),
        ("abcde", false),
        "ends just before the hole"
    );
    mem[4090..4096].copy_from_slice(b"abcdef");
    let s = read_str(page + 4090, 64).unwrap();
    assert_eq!((&*s, s.truncated), ("abcdef", true), "runs into the hole");
    let s = read_str(page + 4090, 3).unwrap();
    assert_eq!((&*s, s.truncated), ("abc", true), "cut at the bound");
    let long = [b'x'; 1000];
    let s = read_str(long.as_ptr() as u64, 10_000).unwrap();
    assert_eq!(s.len(), StrBuf::CAPACITY);
}

#[entry("libc:malloc")]
fn double_size(ctx: &mut EntryCtx) {
    let n: u64 = ctx.arg(0);
    ctx.set_arg(0, n * 2);
    let f = ctx.float_arg(1);
    ctx.set_float_arg(1, f + 0.5);
    assert_eq!(ctx.probe_name(), "libc:malloc");
    assert_eq!(ctx.tid(), 77);
}

#[exit("lib*:open*")]
fn fail_it(ctx: &mut ExitCtx) {
    if ctx.elapsed_ns() > 5 && ctx.ret::<i32>() >= 0 {
        ctx.set_ret(-1i32);
    }
    ctx.set_float_ret(ctx.float_ret() * 2.0);
    assert_ne!(
        ctx.tid(),
        0,
        "asked from the kernel when the agent gave none"
    );
}

#[at("main:parse+0x1c")]
fn bump_rbx(ctx: &mut FullCtx) {
    ctx.rbx += 1;
    if ctx.rbx == 3 {
        panic!("handler bug");
    }
}

fn hit(name: &'static str, tid: u32) -> HitInfo {
    HitInfo {
        probe: 0,
        tid,
        name: name.as_ptr(),
        name_len: name.len(),
    }
}

fn zeroed<T>() -> T {
    // SAFETY: only used for the register save areas, plain integers (and a null pointer).
    unsafe { MaybeUninit::<T>::zeroed().assume_init() }
}

#[test]
fn entry_shim_runs_the_handler_on_the_save_area() {
    let mut regs: EntryContext = zeroed();
    regs.rdi = 21;
    regs.xmm[1].set_f64(1.0);
    let h = hit("libc:malloc", 77);
    // SAFETY: the shim gets an EntryContext and a HitInfo, as the agent will pass them.
    let r = unsafe { __tracer_probe_double_size(&mut regs as *mut _ as *mut u8, &h) };
    assert_eq!(r, SHIM_OK);
    assert_eq!((regs.rdi, regs.xmm[1].f64()), (42, 1.5));
}

#[test]
fn exit_shim_can_change_the_return_value() {
    let mut regs: ExitContext = zeroed();
    regs.rax = 3;
    regs.duration_ns = 10;
    regs.xmm0.set_f64(2.0);
    let h = hit("libc:open64", 0);
    // SAFETY: as above, with an ExitContext.
    let r = unsafe { __tracer_probe_fail_it(&mut regs as *mut _ as *mut u8, &h) };
    assert_eq!(r, SHIM_OK);
    assert_eq!(regs.rax as i32, -1);
    assert_eq!(regs.xmm0.f64(), 4.0);
}

#[test]
fn a_panicking_handler_is_caught_in_the_shim() {
    let mut regs: OffsetContext = zeroed();
    regs.rbx = 1;
    let h = hit("main:parse+0x1c", 1);
    let call = |regs: &mut OffsetContext| {
        // SAFETY: as above, with an OffsetContext.
        unsafe { __tracer_probe_bump_rbx(regs as *mut _ as *mut u8, &h) }
    };
    assert_eq!(call(&mut regs), SHIM_OK);
    assert_eq!(regs.rbx, 2);
    assert_eq!(
        call(&mut regs),
        SHIM_PANICKED,
        "the panic stops in the shim"
    );
    assert_eq!(regs.rbx, 3);
}

/// The child's side of the next test: runs only when re-executed by it.
#[test]
fn child_panicking_handler() {
    if std::env::var_os("PACK_API_CHILD").is_none() {
        return;
    }
    if std::env::var_os("PACK_API_INIT").is_some() {
        assert_eq!(
            probes::pack::shim::pack_init(),
            probes::pack::abi::ABI_VERSION
        );
    }
    let mut regs: OffsetContext = zeroed();
    regs.rbx = 2;
    let h = hit("main:parse+0x1c", 1);
    // SAFETY: an OffsetContext and a HitInfo, as the agent passes them.
    let r = unsafe { __tracer_probe_bump_rbx(&mut regs as *mut _ as *mut u8, &h) };
    assert_eq!(r, SHIM_PANICKED);
}

#[test]
fn after_pack_init_a_handler_panic_prints_nothing_in_the_target() {
    let run = |init: bool| {
        let mut c = std::process::Command::new(std::env::current_exe().unwrap());
        c.args([
            "--exact",
            "child_panicking_handler",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("PACK_API_CHILD", "1");
        if init {
            c.env("PACK_API_INIT", "1");
        }
        let out = c.output().unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(
        run(false).contains("handler bug"),
        "without init std prints the panic"
    );
    assert!(
        !run(true).contains("handler bug"),
        "with init the target's stderr stays clean"
    );
}

#[test]
fn emit_checks_placeholders_at_compile_time() {
    use probes::pack::abi::{placeholders, placeholders_supported};
    assert!(placeholders_supported(
        "a {} b {:?} c {:x} d {:#x} {{literal}}"
    ));
    assert_eq!(placeholders("a {} b {:?} c {:x} d {:#x} {{literal}}"), 4);
    for bad in ["{:>5}", "{0}", "{name}", "{:#?}", "open {"] {
        assert!(!placeholders_supported(bad), "{bad}");
    }
}

#[exit("libc:malloc")]
fn reads_only_the_result(ctx: &mut ExitCtx) {
    if ctx.ret::<u64>() == 0 {
        ctx.set_ret(1u64);
    }
}

#[exit("libc:malloc")]
fn time_inside_a_macro(ctx: &mut ExitCtx) {
    emit!("{}", ctx.elapsed_ns());
}

fn helper(ctx: &mut ExitCtx) -> u64 {
    ctx.elapsed_ns()
}

#[exit("libc:malloc")]
fn time_through_a_helper(ctx: &mut ExitCtx) {
    if helper(ctx) == 0 {
        ctx.set_ret(0u64);
    }
}

#[exit("libc:malloc")]
fn time_through_regs(ctx: &mut ExitCtx) {
    let _ = ctx.regs().duration_ns;
}

#[exit("libc:malloc")]
fn unused_context(_ctx: &mut ExitCtx) {}

#[entry("libc:malloc")]
fn integer_arguments_only(ctx: &mut EntryCtx) {
    let n: u64 = ctx.arg(0);
    ctx.set_arg(0, n + 1);
}

/// Whether a handler may read the time since the entry is in its descriptor: the probe
/// reads the timestamp counter only for those that may.
#[test]
fn descriptors_say_which_handlers_read_the_time() {
    use probes::pack::abi::probe_flags::NO_TIME;
    let timeless = |d: &probes::pack::abi::Descriptor| d.params[0] & NO_TIME != 0;
    assert!(timeless(&__TRACER_DESC_reads_only_the_result));
    assert!(timeless(&__TRACER_DESC_unused_context));
    assert!(
        timeless(&__TRACER_DESC_double_size),
        "entry handlers never do"
    );
    assert!(!timeless(&__TRACER_DESC_fail_it));
    assert!(!timeless(&__TRACER_DESC_time_inside_a_macro));
    assert!(!timeless(&__TRACER_DESC_time_through_a_helper));
    assert!(!timeless(&__TRACER_DESC_time_through_regs));
    // And which entry handlers use the float arguments: the context gets them only then.
    use probes::pack::abi::probe_flags::NO_FLOATS;
    let floatless = |d: &probes::pack::abi::Descriptor| d.params[0] & NO_FLOATS != 0;
    assert!(floatless(&__TRACER_DESC_integer_arguments_only));
    assert!(!floatless(&__TRACER_DESC_double_size));
}

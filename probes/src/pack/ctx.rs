//! Typed views a handler receives over the trampolines' register save areas.
//!
//! Writes go to the very memory the trampoline restores registers from, so `set_arg` and
//! `set_ret` change what the probed code sees when it resumes.

use super::abi::HitInfo;
use crate::context::{EntryContext, ExitContext, OffsetContext};

/// Integer-class values an argument or return register can hold.
pub trait Reg: Copy {
    fn from_reg(r: u64) -> Self;
    fn to_reg(self) -> u64;
}

macro_rules! reg {
    ($($t:ty),*) => { $(
        impl Reg for $t {
            #[inline(always)] fn from_reg(r: u64) -> Self { r as $t }
            #[inline(always)] fn to_reg(self) -> u64 { self as u64 }
        }
    )* };
}
reg!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);

impl Reg for bool {
    fn from_reg(r: u64) -> Self {
        r as u8 != 0
    }
    fn to_reg(self) -> u64 {
        self as u64
    }
}

const SYS_GETTID: u64 = 186;

extern "C" {
    /// The target's libc (a pack is loaded into the target, next to it): glibc and musl
    /// both give each thread's `errno` through this function.
    fn __errno_location() -> *mut i32;
}

fn tid_of(hit: &HitInfo) -> u32 {
    if hit.tid != 0 {
        return hit.tid;
    }
    let tid: u64;
    // SAFETY: gettid takes no argument; the syscall clobbers rcx and r11, declared.
    unsafe {
        std::arch::asm!("syscall", inlateout("rax") SYS_GETTID => tid,
            lateout("rcx") _, lateout("r11") _, options(nostack));
    }
    tid as u32
}

fn name_of(hit: &HitInfo) -> &str {
    if hit.name.is_null() {
        return "";
    }
    // SAFETY: the agent passes a UTF-8 name that lives as long as the probe.
    let b = unsafe { std::slice::from_raw_parts(hit.name, hit.name_len) };
    std::str::from_utf8(b).unwrap_or("")
}

/// At a function entry: `#[entry(SPEC)]`.
pub struct EntryCtx<'a> {
    regs: &'a mut EntryContext,
    hit: &'a HitInfo,
}

impl<'a> EntryCtx<'a> {
    pub fn new(regs: &'a mut EntryContext, hit: &'a HitInfo) -> Self {
        EntryCtx { regs, hit }
    }

    /// Integer argument `n` (0-based; 6 and up are read from the caller's stack).
    #[inline]
    pub fn arg<T: Reg>(&self, n: usize) -> T {
        T::from_reg(self.regs.arg(n))
    }

    /// Change integer argument `n` before the function runs.
    #[inline]
    pub fn set_arg<T: Reg>(&mut self, n: usize, v: T) {
        self.regs.set_arg(n, v.to_reg())
    }

    /// Float argument `n` (0 to 7) as a double (a `float` argument: see `float_arg_f32`).
    pub fn float_arg(&self, n: usize) -> f64 {
        self.regs.float_arg(n)
    }

    pub fn float_arg_f32(&self, n: usize) -> f32 {
        self.regs.xmm[n].f32()
    }

    pub fn set_float_arg(&mut self, n: usize, v: f64) {
        self.regs.set_float_arg(n, v)
    }

    pub fn set_float_arg_f32(&mut self, n: usize, v: f32) {
        self.regs.xmm[n].set_f32(v)
    }

    pub fn return_address(&self) -> u64 {
        self.regs.return_address()
    }

    /// The kernel id of the calling thread.
    pub fn tid(&self) -> u32 {
        tid_of(self.hit)
    }

    /// The probe that hit, `module:symbol` (one handler may serve a glob of functions).
    pub fn probe_name(&self) -> &str {
        name_of(self.hit)
    }

    /// The raw register save area.
    pub fn regs(&mut self) -> &mut EntryContext {
        self.regs
    }
}

/// When a probed function returns: `#[exit(SPEC)]`.
pub struct ExitCtx<'a> {
    regs: &'a mut ExitContext,
    hit: &'a HitInfo,
}

impl<'a> ExitCtx<'a> {
    pub fn new(regs: &'a mut ExitContext, hit: &'a HitInfo) -> Self {
        ExitCtx { regs, hit }
    }

    /// The integer return value (`rax`).
    #[inline]
    pub fn ret<T: Reg>(&self) -> T {
        T::from_reg(self.regs.retval())
    }

    /// Change what the call returns (fault injection).
    #[inline]
    pub fn set_ret<T: Reg>(&mut self, v: T) {
        self.regs.set_retval(v.to_reg())
    }

    pub fn float_ret(&self) -> f64 {
        self.regs.float_retval()
    }

    pub fn float_ret_f32(&self) -> f32 {
        self.regs.xmm0.f32()
    }

    pub fn set_float_ret(&mut self, v: f64) {
        self.regs.set_float_retval(v)
    }

    pub fn set_float_ret_f32(&mut self, v: f32) {
        self.regs.xmm0.set_f32(v)
    }

    /// Set the calling thread's `errno` in the target, as a libc function that fails
    /// does: a fault injected with `set_ret` on a function whose contract says "returns
    /// -1 (or NULL) and sets errno" needs both, or the program reads a stale errno.
    pub fn set_errno(&mut self, e: i32) {
        // SAFETY: the target's libc `__errno_location` returns this thread's errno slot;
        // it only adds the thread pointer to an offset (no lock, no allocation), and the
        // pack is loaded with RTLD_NOW, so the call does not enter the dynamic linker
        // either: safe from a handler whatever the thread was doing.
        unsafe { *__errno_location() = e }
    }

    /// The calling thread's `errno` as the probed function left it.
    pub fn errno(&self) -> i32 {
        // SAFETY: as in `set_errno`.
        unsafe { *__errno_location() }
    }

    /// Nanoseconds from the entry to this return.
    pub fn elapsed_ns(&self) -> u64 {
        self.regs.duration_ns
    }

    pub fn return_address(&self) -> u64 {
        self.regs.return_address
    }

    pub fn tid(&self) -> u32 {
        tid_of(self.hit)
    }

    pub fn probe_name(&self) -> &str {
        name_of(self.hit)
    }

    pub fn regs(&mut self) -> &mut ExitContext {
        self.regs
    }
}

/// At any instruction: `#[at(SPEC)]`. Derefs to the full register file (`ctx.rbx`,
/// `ctx.rflags`, `ctx.xmm(3)`); writes take effect when the code resumes.
pub struct FullCtx<'a> {
    regs: &'a mut OffsetContext,
    hit: &'a HitInfo,
}

impl<'a> FullCtx<'a> {
    pub fn new(regs: &'a mut OffsetContext, hit: &'a HitInfo) -> Self {
        FullCtx { regs, hit }
    }

    pub fn tid(&self) -> u32 {
        tid_of(self.hit)
    }

    pub fn probe_name(&self) -> &str {
        name_of(self.hit)
    }
}

impl std::ops::Deref for FullCtx<'_> {
    type Target = OffsetContext;
    fn deref(&self) -> &OffsetContext {
        self.regs
    }
}

impl std::ops::DerefMut for FullCtx<'_> {
    fn deref_mut(&mut self) -> &mut OffsetContext {
        self.regs
    }
}

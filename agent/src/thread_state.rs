//! Per-thread state of the hot path: the re-entrancy guard and the shadow stack of
//! return addresses taken by exit probes.
//!
//! It lives in *static* TLS. A `thread_local!` in a library loaded by `dlopen` uses the
//! general-dynamic model: the first access from each thread goes through
//! `__tls_get_addr`, which allocates the thread's block with `malloc`. With `malloc`
//! probed that recurses into the probe before any guard exists. The initial-exec model
//! (`@gottpoff`) instead reserves the block in every thread's static TLS at `dlopen`
//! time, threads that already exist included (glibc keeps a surplus for this), so an
//! access is two instructions that never call anything. Stable Rust cannot choose the
//! TLS model, so the variable is declared in assembly.
//!
//! The shadow stack is mapped with a raw `mmap` system call, not through libc, which may
//! itself be probed.

use std::arch::{asm, global_asm};
use std::sync::atomic::{compiler_fence, Ordering};

global_asm!(
    ".pushsection .tbss,\"awT\",@nobits",
    ".p2align 6",
    ".globl tracer_agent_thread_state",
    ".type tracer_agent_thread_state,@object",
    ".size tracer_agent_thread_state, 64",
    "tracer_agent_thread_state:",
    ".zero 64",
    ".popsection",
);

/// [`ThreadState::busy`] while a handler runs, set by the trampolines' direct paths
/// (which push an exit-probed call's shadow entry before its entry action and pop it after
/// its return action) and by the agent's own entry points.
pub const BUSY: u64 = 1;
/// [`ThreadState::busy`] while `dispatch` runs a handler: the call's shadow entry is not
/// on the stack then (pushed after the entry action, popped before the return action).
pub const BUSY_OFF_FRAME: u64 = 2;

/// What a thread keeps. Zero-initialised by the loader for every thread.
#[repr(C)]
pub struct ThreadState {
    /// Non-zero while the thread runs agent code for a probe hit: [`BUSY`], or
    /// [`BUSY_OFF_FRAME`] while `dispatch` runs a handler.
    pub busy: u64,
    /// Shadow stack storage, mapped on first use.
    pub shadow: *mut ShadowEntry,
    /// Entries in use.
    pub depth: u64,
    /// Capacity in entries (0 before the first use, and after a failed map: every push
    /// then fails, as a full stack's does).
    pub capacity: u64,
    /// Non-zero once mapping the shadow stack failed: not tried again at every hit.
    map_failed: u64,
    _reserved: [u64; 3],
}

const _: () = assert!(std::mem::size_of::<ThreadState>() == 64);

/// A return redirected to the exit trampoline.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ShadowEntry {
    /// The real return address.
    pub return_address: u64,
    /// `rsp` at the function entry: the slot holding the return address.
    pub entry_rsp: u64,
    /// The probe (a `*const dispatch::Probe`).
    pub probe: u64,
    /// Timestamp counter at the entry.
    pub tsc: u64,
}

/// Entries per thread: deeper recursion than this loses exits (counted), never returns.
pub const SHADOW_CAPACITY: u64 = 2048;

/// This thread's state.
#[inline(always)]
pub fn current() -> &'static mut ThreadState {
    let p: *mut ThreadState;
    // SAFETY: `fs:0` is the thread pointer on x86-64 Linux; adding the variable's
    // TLS offset (from the GOT, resolved by the loader) gives this thread's copy.
    unsafe {
        asm!(
            "mov {p}, qword ptr fs:[0]",
            "add {p}, qword ptr [rip + tracer_agent_thread_state@GOTTPOFF]",
            p = out(reg) p,
            options(nostack, readonly, preserves_flags),
        );
        &mut *p
    }
}

/// Runs `f` with this thread marked busy, as while a handler runs: the probes it hits
/// count it as skipped, not as the program's own calls. For the agent's work that the
/// tracer asks for while probes may be live (a remote call on a program thread).
pub fn as_agent<T>(f: impl FnOnce() -> T) -> T {
    let was = current().busy;
    current().busy = 1;
    let r = f();
    current().busy = was;
    r
}

/// Offsets of [`ThreadState`] fields, for code generated at run time.
pub mod layout {
    pub const BUSY: i32 = 0;
    pub const SHADOW: i32 = 8;
    pub const DEPTH: i32 = 16;
    pub const CAPACITY: i32 = 24;
    /// log2 of `size_of::<ShadowEntry>()`.
    pub const ENTRY_SHIFT: u32 = 5;
    pub const E_RETURN_ADDRESS: i32 = 0;
    pub const E_ENTRY_RSP: i32 = 8;
    pub const E_PROBE: i32 = 16;
    pub const E_TSC: i32 = 24;
}

const _: () = assert!(std::mem::offset_of!(ThreadState, depth) == layout::DEPTH as usize);
const _: () = assert!(std::mem::offset_of!(ThreadState, shadow) == layout::SHADOW as usize);
const _: () = assert!(std::mem::offset_of!(ThreadState, capacity) == layout::CAPACITY as usize);
const _: () = assert!(std::mem::size_of::<ShadowEntry>() == 1 << layout::ENTRY_SHIFT);
const _: () = assert!(std::mem::offset_of!(ShadowEntry, probe) == layout::E_PROBE as usize);
const _: () = assert!(std::mem::offset_of!(ShadowEntry, tsc) == layout::E_TSC as usize);

/// Where this thread's state is relative to the thread pointer (`fs:0`). With static
/// TLS this is the same for every thread, so generated code can reach the state with
/// `mov r, fs:[0]` and this displacement; None if it does not fit a disp32.
pub fn offset_from_thread_pointer() -> Option<i32> {
    let tp: u64;
    // SAFETY: reads the thread pointer, as `current` does.
    unsafe {
        asm!("mov {tp}, qword ptr fs:[0]", tp = out(reg) tp, options(nostack, readonly, preserves_flags));
    }
    i32::try_from((current() as *mut ThreadState as u64).wrapping_sub(tp) as i64).ok()
}

impl ThreadState {
    /// Push a redirected return; false when the stack is full or cannot be mapped.
    ///
    /// A signal handler may hit probes between any two instructions of this thread, and
    /// push and pop entries of its own: so the entry is taken (`depth` raised) before it
    /// is filled, and its `entry_rsp`, 0 while it is free, is written last. (Filled first
    /// and taken after, a handler's push in between wrote over it, and the call returned
    /// to the handler's caller.)
    #[inline]
    pub fn push(&mut self, e: ShadowEntry) -> bool {
        let d = self.depth;
        if d >= self.capacity && !self.grow() {
            return false;
        }
        // SAFETY: depth < capacity entries are mapped.
        let slot = unsafe { self.shadow.add(d as usize) };
        // SAFETY: `depth` is this thread's; volatile and the fences keep the order a
        // signal handler on this thread sees.
        unsafe { std::ptr::addr_of_mut!(self.depth).write_volatile(d + 1) };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: `slot` is mapped and now ours alone (see above).
        unsafe {
            std::ptr::addr_of_mut!((*slot).return_address).write_volatile(e.return_address);
            std::ptr::addr_of_mut!((*slot).probe).write_volatile(e.probe);
            std::ptr::addr_of_mut!((*slot).tsc).write_volatile(e.tsc);
            compiler_fence(Ordering::SeqCst);
            std::ptr::addr_of_mut!((*slot).entry_rsp).write_volatile(e.entry_rsp);
        }
        true
    }

    /// The top entry, read and marked free (`entry_rsp` 0) before it is released, so that
    /// a signal handler pushing from then on neither changes what was read nor finds a
    /// stale frame there (see [`push`](Self::push)).
    #[inline]
    pub fn pop(&mut self) -> Option<ShadowEntry> {
        let d = self.depth;
        if d == 0 {
            return None;
        }
        // SAFETY: entries below `depth` were written by `push`.
        let slot = unsafe { self.shadow.add(d as usize - 1) };
        // SAFETY: as above; volatile and the fences keep the order (see `push`).
        let e = unsafe { slot.read_volatile() };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: as above.
        unsafe { std::ptr::addr_of_mut!((*slot).entry_rsp).write_volatile(0) };
        compiler_fence(Ordering::SeqCst);
        // SAFETY: this thread's own state.
        unsafe { std::ptr::addr_of_mut!(self.depth).write_volatile(d - 1) };
        Some(e)
    }

    /// Entries from the bottom.
    pub fn entries(&self) -> &[ShadowEntry] {
        if self.shadow.is_null() {
            return &[];
        }
        // SAFETY: `depth` entries are initialised.
        unsafe { std::slice::from_raw_parts(self.shadow, self.depth as usize) }
    }

    #[cold]
    fn grow(&mut self) -> bool {
        if self.capacity != 0 || self.map_failed != 0 {
            return false;
        }
        let bytes = SHADOW_CAPACITY as usize * std::mem::size_of::<ShadowEntry>();
        let p = raw_mmap(bytes);
        if p.is_null() {
            // Capacity stays 0, so pushes here and the trampolines' `depth < capacity`
            // test both see a full stack: exits lost and counted, no write through null.
            self.map_failed = 1;
            return false;
        }
        self.shadow = p as *mut ShadowEntry;
        self.capacity = SHADOW_CAPACITY;
        true
    }
}

/// Anonymous read-write memory from the kernel directly.
fn raw_mmap(len: usize) -> *mut u8 {
    let ret: i64;
    // SAFETY: the mmap system call with a null hint creates a new private mapping and
    // touches no existing memory; rcx and r11 are clobbered by `syscall`.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") libc::SYS_mmap => ret,
            in("rdi") 0u64,
            in("rsi") len,
            in("rdx") (libc::PROT_READ | libc::PROT_WRITE) as u64,
            in("r10") (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            in("r8") u64::MAX,
            in("r9") 0u64,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if (-4095..0).contains(&ret) {
        std::ptr::null_mut()
    } else {
        ret as *mut u8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_is_per_thread_and_zeroed() {
        let a = current() as *mut ThreadState as usize;
        current().busy = 7;
        let (b, busy) = std::thread::spawn(|| {
            let s = current();
            (s as *mut ThreadState as usize, s.busy)
        })
        .join()
        .unwrap();
        assert_ne!(a, b);
        assert_eq!(busy, 0);
        assert_eq!(current().busy, 7);
        current().busy = 0;
    }

    #[test]
    fn shadow_stack_pushes_pops_and_bounds() {
        std::thread::spawn(|| {
            let s = current();
            for i in 0..SHADOW_CAPACITY {
                assert!(s.push(ShadowEntry {
                    return_address: i,
                    entry_rsp: i,
                    probe: 0,
                    tsc: 0
                }));
            }
            assert!(!s.push(ShadowEntry {
                return_address: 0,
                entry_rsp: 0,
                probe: 0,
                tsc: 0
            }));
            assert_eq!(s.pop().unwrap().return_address, SHADOW_CAPACITY - 1);
            assert_eq!(s.entries().len() as u64, SHADOW_CAPACITY - 1);
        })
        .join()
        .unwrap();
    }

    /// A thread whose shadow stack cannot be mapped (address space limit reached) loses
    /// its exits, every time, and never writes through the missing stack.
    #[test]
    fn a_failed_shadow_map_refuses_pushes() {
        let e = ShadowEntry {
            return_address: 1,
            entry_rsp: 2,
            probe: 0,
            tsc: 0,
        };
        // SAFETY: the child only makes system calls and touches this thread's state
        // before `_exit`; no lock of the parent's other threads is taken.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork failed");
        if child == 0 {
            let lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: libc::RLIM_INFINITY,
            };
            // SAFETY: lowering this child's own address space limit; 0 makes every new
            // mapping fail with ENOMEM while existing ones stay.
            let code = unsafe {
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    libc::_exit(3);
                }
                let s = current();
                s.capacity = 0;
                s.shadow = std::ptr::null_mut();
                s.depth = 0;
                s.map_failed = 0;
                let first = s.push(e);
                let second = s.push(e);
                let state = (s.capacity, s.shadow.is_null(), s.depth, s.map_failed);
                match (first, second, state) {
                    (false, false, (0, true, 0, 1)) => 0,
                    _ => 1,
                }
            };
            // SAFETY: leaves the child without running the test harness's exit path.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        assert!(libc::WIFEXITED(status), "child died: status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 0, "pushes after a failed map");
    }
}

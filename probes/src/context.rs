//! Register contexts handed to handlers.
//!
//! The layouts are the save areas of the trampolines: a handler reads and writes the very
//! memory the trampoline restores registers from, so a write takes effect when the probed
//! code resumes.

/// One 128-bit vector register.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Xmm(pub [u64; 2]);

impl Xmm {
    /// The low lane as a `f64` (a `double` argument or return value).
    pub fn f64(&self) -> f64 {
        f64::from_bits(self.0[0])
    }

    /// The low lane as a `f32` (a `float` argument or return value).
    pub fn f32(&self) -> f32 {
        f32::from_bits(self.0[0] as u32)
    }

    pub fn set_f64(&mut self, v: f64) {
        self.0[0] = v.to_bits();
    }

    pub fn set_f32(&mut self, v: f32) {
        self.0[0] = (self.0[0] & !0xffff_ffff) | v.to_bits() as u64;
    }
}

/// Registers live at a SysV x86-64 function entry, as saved by the entry trampoline.
///
/// Integer arguments 1 to 6 are in `rdi rsi rdx rcx r8 r9`; `rax` holds the number of
/// vector registers used by a variadic call; `r10` the static chain. Float arguments 1 to
/// 8 are in `xmm0-7`. Arguments 7 and up are on the stack above the return address.
#[repr(C)]
#[derive(Debug)]
pub struct EntryContext {
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub r8: u64,
    pub r9: u64,
    pub rax: u64,
    pub r10: u64,
    pub xmm: [Xmm; 8],
    /// `rsp` at the probe site: for an entry probe it points at the return address.
    pub rsp: u64,
}

/// Offsets the trampolines rely on.
///
/// The entry trampoline's frame is the context followed by the other registers it must
/// keep for the probed function (which may receive values in any register when its
/// callers bind it locally): `r11` and the vector registers, upper halves included.
pub mod entry_layout {
    pub const GPRS: usize = 0;
    pub const XMM: usize = 64;
    pub const RSP: usize = 192;
    pub const SIZE: usize = 200;
    pub const R11: usize = 200;
    /// `ymm0-15` (32 bytes each) when the OS enabled AVX, else `xmm0-15`; 32-byte
    /// aligned.
    pub const VECTORS: usize = 224;
    /// The whole frame, a multiple of 32.
    pub const FRAME: usize = 736;
}

const _: () = assert!(entry_layout::VECTORS.is_multiple_of(32));
const _: () = assert!(entry_layout::FRAME.is_multiple_of(32));
const _: () = assert!(entry_layout::VECTORS + 16 * 32 == entry_layout::FRAME);

const _: () = assert!(std::mem::size_of::<EntryContext>() == entry_layout::SIZE);
const _: () = assert!(std::mem::offset_of!(EntryContext, xmm) == entry_layout::XMM);
const _: () = assert!(std::mem::offset_of!(EntryContext, rsp) == entry_layout::RSP);

impl EntryContext {
    /// Integer argument `n` (0-based) of a function whose integer arguments are all in
    /// integer registers or on the stack (no struct passed by value before it).
    pub fn arg(&self, n: usize) -> u64 {
        match n {
            0 => self.rdi,
            1 => self.rsi,
            2 => self.rdx,
            3 => self.rcx,
            4 => self.r8,
            5 => self.r9,
            // SAFETY: at an entry probe, rsp points at the return address and stack
            // arguments follow it; reading past the caller's arguments reads its frame,
            // which is mapped.
            _ => unsafe { *self.stack_arg_ptr(n - 6) },
        }
    }

    /// Overwrite integer argument `n`; the probed function sees the new value.
    pub fn set_arg(&mut self, n: usize, v: u64) {
        match n {
            0 => self.rdi = v,
            1 => self.rsi = v,
            2 => self.rdx = v,
            3 => self.rcx = v,
            4 => self.r8 = v,
            5 => self.r9 = v,
            // SAFETY: as in `arg`; the slot belongs to the caller's outgoing arguments.
            _ => unsafe { *self.stack_arg_ptr(n - 6) = v },
        }
    }

    /// Float argument `n` (0 to 7) as a double.
    pub fn float_arg(&self, n: usize) -> f64 {
        self.xmm[n].f64()
    }

    pub fn set_float_arg(&mut self, n: usize, v: f64) {
        self.xmm[n].set_f64(v)
    }

    /// The address the probed function will return to (entry probes).
    pub fn return_address(&self) -> u64 {
        // SAFETY: at an entry probe rsp points at the return address.
        unsafe { *(self.rsp as *const u64) }
    }

    fn stack_arg_ptr(&self, k: usize) -> *mut u64 {
        (self.rsp + 8 + 8 * k as u64) as *mut u64
    }
}

/// Registers live when a probed function returns, as saved by the exit trampoline:
/// integer results in `rax:rdx`, float results in `xmm0:xmm1`.
#[repr(C)]
#[derive(Debug)]
pub struct ExitContext {
    pub rax: u64,
    pub rdx: u64,
    pub xmm0: Xmm,
    pub xmm1: Xmm,
    /// Where the function returns to.
    pub return_address: u64,
    /// Nanoseconds from the entry to the return.
    pub duration_ns: u64,
    /// The entry's `rsp`, identifying the frame.
    pub entry_rsp: u64,
    /// The probe, for handlers shared between probes.
    pub probe: u32,
    _pad: u32,
}

/// Offsets the exit trampoline relies on. Its frame is the context followed by every
/// other call-clobbered register (callers may keep values in any of them across a call to
/// a function they know leaves them alone).
pub mod exit_layout {
    pub const RAX: usize = 0;
    pub const RDX: usize = 8;
    pub const XMM0: usize = 16;
    pub const XMM1: usize = 32;
    pub const RETURN_ADDRESS: usize = 48;
    pub const SIZE: usize = 80;
    /// `rcx rsi rdi r8 r9 r10 r11`.
    pub const GPRS: usize = 80;
    /// `ymm0-15` (32 bytes each) when the OS enabled AVX, else `xmm0-15`; 32-byte
    /// aligned.
    pub const VECTORS: usize = 160;
    /// The whole frame, a multiple of 32.
    pub const FRAME: usize = 672;
}

const _: () = assert!(exit_layout::GPRS + 7 * 8 <= exit_layout::VECTORS);
const _: () = assert!(exit_layout::VECTORS.is_multiple_of(32));
const _: () = assert!(exit_layout::FRAME.is_multiple_of(32));
const _: () = assert!(exit_layout::VECTORS + 16 * 32 == exit_layout::FRAME);

const _: () = assert!(std::mem::size_of::<ExitContext>() == exit_layout::SIZE);
const _: () = assert!(std::mem::offset_of!(ExitContext, xmm0) == exit_layout::XMM0);
const _: () =
    assert!(std::mem::offset_of!(ExitContext, return_address) == exit_layout::RETURN_ADDRESS);

impl ExitContext {
    /// The integer return value.
    pub fn retval(&self) -> u64 {
        self.rax
    }

    pub fn set_retval(&mut self, v: u64) {
        self.rax = v;
    }

    /// The float return value as a double.
    pub fn float_retval(&self) -> f64 {
        self.xmm0.f64()
    }

    pub fn set_float_retval(&mut self, v: f64) {
        self.xmm0.set_f64(v)
    }
}

/// Every general-purpose register, the flags and the vector state at an arbitrary
/// instruction, as saved by the offset (full-context) trampoline.
///
/// Writes to the general-purpose registers, `rflags` and the vector state take effect when
/// the probed code resumes. `rsp` and `rip` are informational: the trampoline restores the
/// stack pointer it found and resumes at the probed instruction.
#[repr(C)]
#[derive(Debug)]
pub struct OffsetContext {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    /// `rsp` at the probed instruction.
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rflags: u64,
    /// Address of the probed instruction.
    pub rip: u64,
    /// The `xsave` area (standard format, 64-byte aligned) holding x87, SSE, AVX and any
    /// other state the OS enabled in XCR0.
    pub xsave: *mut u8,
}

/// Offsets the offset trampoline relies on.
pub mod offset_layout {
    /// `rax rbx rcx rdx rsi rdi rbp rsp r8 .. r15`, 8 bytes each.
    pub const GPRS: usize = 0;
    pub const RSP: usize = 56;
    pub const RFLAGS: usize = 128;
    pub const RIP: usize = 136;
    pub const XSAVE: usize = 144;
    pub const SIZE: usize = 152;
    /// In the xsave area: the legacy region's xmm0 and the header's XSTATE_BV.
    pub const XSAVE_XMM0: usize = 160;
    pub const XSAVE_XSTATE_BV: usize = 512;
}

const _: () = assert!(std::mem::size_of::<OffsetContext>() == offset_layout::SIZE);
const _: () = assert!(std::mem::offset_of!(OffsetContext, rsp) == offset_layout::RSP);
const _: () = assert!(std::mem::offset_of!(OffsetContext, rflags) == offset_layout::RFLAGS);
const _: () = assert!(std::mem::offset_of!(OffsetContext, rip) == offset_layout::RIP);
const _: () = assert!(std::mem::offset_of!(OffsetContext, xsave) == offset_layout::XSAVE);

/// A handler run at an offset probe.
pub type OffsetHandler = fn(&mut OffsetContext);

impl OffsetContext {
    /// The low 128 bits of vector register `n` (0 to 15).
    pub fn xmm(&self, n: usize) -> Xmm {
        assert!(n < 16, "xmm{n} does not exist");
        // SAFETY: the trampoline's xsave area holds the legacy region, xmm0-15 at 160.
        unsafe {
            (self.xsave.add(offset_layout::XSAVE_XMM0 + 16 * n) as *const Xmm).read_unaligned()
        }
    }

    /// Overwrite the low 128 bits of vector register `n` (0 to 15); the upper bits of a
    /// wider register are kept.
    pub fn set_xmm(&mut self, n: usize, v: Xmm) {
        assert!(n < 16, "xmm{n} does not exist");
        // SAFETY: as in `xmm`. Setting the SSE bit of XSTATE_BV makes `xrstor` load the
        // register from the area instead of resetting it, in case it was in its initial
        // state when saved.
        unsafe {
            (self.xsave.add(offset_layout::XSAVE_XMM0 + 16 * n) as *mut Xmm).write_unaligned(v);
            let bv = self.xsave.add(offset_layout::XSAVE_XSTATE_BV) as *mut u64;
            bv.write(bv.read() | 2);
        }
    }
}

//! Which registers a pack's handler can change, found by reading its machine code: the
//! interprocedural register allocation GCC does with `-fipa-ra`, across the JIT boundary.
//!
//! A handler is a shim exported by a pack (see `probes::pack::shim`) and whatever it
//! reaches. Its code is decoded from the shim's entry, following every direct branch and
//! direct call into code that cannot change (executable, not writable, mapped from a
//! file: the pack, libc), and calls and jumps through a slot that cannot change either
//! (`call [rip+GOT]` once the loader made the GOT read-only), and the registers each
//! reached instruction writes are collected. Anything that cannot be followed (an
//! indirect call or jump through a register or writable memory, a target outside such
//! code, an instruction writing state this model does not track) makes the result
//! [`Clobbers::full`]: the caller then saves every vector register, as for arbitrary
//! code. A probe patched later into code the analysis read runs a trampoline that keeps
//! every register as the original code would (and a handler's own hits are skipped),
//! so what was read stays what the handler can change.
//!
//! What is *not* reached this way is only code entered by the unwinder (landing pads):
//! it runs only after a panic, and a panic starts in std's machinery, which the handler
//! reaches through calls this analysis meets first (they lead outside or through
//! indirect calls), so any handler that can panic is analysed as [`Clobbers::full`].
//!
//! Vector registers: legacy-SSE instructions writing `xmmN` leave bits 128-511 of `zmmN`
//! alone, VEX- and EVEX-encoded ones zero them (or write them), and `vzeroupper`/
//! `vzeroall` clear every upper half of registers 0-15. So the low halves and the upper
//! halves are tracked apart. EVEX code (glibc's `memcpy`, `strlen`... on a CPU with
//! AVX-512) also writes `zmm16-31`, which nothing else can, and the mask registers
//! `k0-7`: tracked too.

use iced_x86::{
    Code, Decoder, DecoderOptions, EncodingKind, FlowControl, Instruction, InstructionInfoFactory,
    Mnemonic, OpAccess, OpKind, Register,
};
use probes::abi::shared::saves;
use std::collections::HashSet;
use std::fmt;

/// Most instructions decoded for one handler; beyond, the handler counts as arbitrary
/// code.
const MAX_INSTRUCTIONS: usize = 20_000;

/// The registers a handler may change, as far as the caller must save them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Clobbers {
    /// General-purpose registers written, bit `n` for the register numbered `n` in
    /// `rax rcx rdx rbx rsp rbp rsi rdi r8 .. r15` order.
    pub gprs: u16,
    /// `xmm0-15` whose low 128 bits may change, bit per register.
    pub xmm: u16,
    /// Registers 0-15 whose bits above 127 (`ymm` upper halves, and `zmm` bits 256-511
    /// with AVX-512) may change.
    pub ymm_upper: u16,
    /// `zmm16-31` that may change, bit `n` for `zmm(16+n)` (EVEX code only).
    pub zmm16: u16,
    /// Mask registers `k0-7` that may change.
    pub masks: u8,
    /// Set when the code could not be followed: every register may change.
    pub full: bool,
}

/// Why the analysis gave up, kept for `-v`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Analysis {
    pub clobbers: Clobbers,
    /// What made it [`Clobbers::full`], with the instruction's address.
    pub reason: Option<String>,
    /// Instructions decoded.
    pub instructions: usize,
}

impl Clobbers {
    /// Arbitrary code: everything may change.
    pub const FULL: Clobbers = Clobbers {
        gprs: 0xffff,
        xmm: 0xffff,
        ymm_upper: 0xffff,
        zmm16: 0xffff,
        masks: 0xff,
        full: true,
    };
}

/// The vector state a stub keeps around a handler, bit per register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Saves {
    /// Registers 0-15, kept in full: `zmm` with AVX-512, `ymm` with AVX, else `xmm`.
    pub low: u16,
    /// `zmm16-31` (bit `n` for `zmm(16+n)`), with AVX-512 only.
    pub zmm16: u16,
    /// `k0-7`, with AVX-512 only.
    pub masks: u8,
}

impl Saves {
    pub const ALL: Saves = Saves {
        low: 0xffff,
        zmm16: 0xffff,
        masks: 0xff,
    };

    pub fn is_empty(&self) -> bool {
        *self == Saves::default()
    }

    /// What of this the state `v` has: no AVX-512 registers without AVX-512.
    pub fn for_state(self, v: crate::trampoline::Vectors) -> Saves {
        match v.avx512() {
            true => self,
            false => Saves {
                low: self.low,
                ..Saves::default()
            },
        }
    }
}

/// The vector state a stub must keep around a handler with `c`, given that the caller
/// already keeps the low halves of `caller_keeps` itself, on a machine with `v`.
pub fn vectors_to_save(c: &Clobbers, caller_keeps: u16, v: crate::trampoline::Vectors) -> Saves {
    let s = if c.full {
        Saves::ALL
    } else {
        Saves {
            low: (c.xmm & !caller_keeps) | c.ymm_upper,
            zmm16: c.zmm16,
            masks: c.masks,
        }
    };
    s.for_state(v)
}

/// Registers as a short list: `rax rcx xmm0-1 ymm0h zmm16-17 k0` (`h`: the bits above
/// 127); "all" for arbitrary code, "none" for nothing.
impl fmt::Display for Clobbers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.full {
            return f.write_str("all");
        }
        const GPR: [&str; 16] = [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ];
        let mut parts: Vec<String> = (0..16)
            .filter(|i| self.gprs & (1 << i) != 0)
            .map(|i| GPR[i].to_string())
            .collect();
        parts.extend(saves::ranges(self.xmm, "xmm", ""));
        parts.extend(saves::ranges(self.ymm_upper, "ymm", "h"));
        parts.extend(saves::ranges_from(16, self.zmm16, "zmm", ""));
        parts.extend(saves::ranges(self.masks as u16, "k", ""));
        if parts.is_empty() {
            return f.write_str("none");
        }
        f.write_str(&parts.join(" "))
    }
}

/// Where code and constant slots may be read: ranges that cannot change.
#[derive(Clone, Debug, Default)]
pub struct Ranges {
    /// Code that may be followed.
    pub code: Vec<std::ops::Range<u64>>,
    /// Memory whose 8-byte slots may be read as call and jump targets.
    pub constants: Vec<std::ops::Range<u64>>,
}

fn within(ranges: &[std::ops::Range<u64>], addr: u64, len: u64) -> Option<u64> {
    ranges
        .iter()
        .find(|r| r.contains(&addr) && addr + len <= r.end)
        .map(|r| r.end)
}

/// Analyse the code reachable from `entry`, following only code in `ranges`. `read`
/// fills a buffer from memory and says whether it could.
pub fn analyse(entry: u64, ranges: Ranges, read: impl Fn(u64, &mut [u8]) -> bool) -> Analysis {
    let mut w = Walker {
        c: Clobbers::default(),
        seen: HashSet::new(),
        todo: vec![entry],
        ranges,
        info: InstructionInfoFactory::new(),
        decoded: 0,
    };
    match w.run(&read) {
        Ok(()) => Analysis {
            clobbers: w.c,
            reason: None,
            instructions: w.decoded,
        },
        Err(reason) => Analysis {
            clobbers: Clobbers::FULL,
            reason: Some(reason),
            instructions: w.decoded,
        },
    }
}

struct Walker {
    c: Clobbers,
    /// Instruction addresses already decoded.
    seen: HashSet<u64>,
    /// Addresses still to walk from.
    todo: Vec<u64>,
    ranges: Ranges,
    info: InstructionInfoFactory,
    decoded: usize,
}

impl Walker {
    fn run(&mut self, read: &impl Fn(u64, &mut [u8]) -> bool) -> Result<(), String> {
        while let Some(start) = self.todo.pop() {
            let mut ip = start;
            while self.seen.insert(ip) {
                let i = self.decode(ip, read)?;
                self.decoded += 1;
                if self.decoded > MAX_INSTRUCTIONS {
                    return Err(format!("more than {MAX_INSTRUCTIONS} instructions"));
                }
                self.writes(&i)?;
                if !self.follow(&i, read)? {
                    break;
                }
                ip = i.next_ip();
            }
        }
        Ok(())
    }

    fn decode(
        &self,
        ip: u64,
        read: &impl Fn(u64, &mut [u8]) -> bool,
    ) -> Result<Instruction, String> {
        let Some(end) = within(&self.ranges.code, ip, 1) else {
            return Err(format!("{ip:#x}: runs out of code that cannot change"));
        };
        let len = (end - ip).min(15) as usize;
        let mut buf = [0u8; 15];
        if !read(ip, &mut buf[..len]) {
            return Err(format!("{ip:#x}: unreadable"));
        }
        let mut d = Decoder::with_ip(64, &buf[..len], ip, DecoderOptions::NONE);
        let i = d.decode();
        if i.is_invalid() {
            return Err(format!("{ip:#x}: undecodable instruction"));
        }
        Ok(i)
    }

    /// Where a direct branch or call, or one through a constant slot, goes.
    fn target(
        &self,
        i: &Instruction,
        read: &impl Fn(u64, &mut [u8]) -> bool,
    ) -> Result<u64, String> {
        let at = i.ip();
        let target = if i.op0_kind() == OpKind::Memory {
            if !i.is_ip_rel_memory_operand() {
                return Err(format!("{at:#x}: indirect {:?}", i.mnemonic()));
            }
            let slot = i.ip_rel_memory_address();
            if within(&self.ranges.constants, slot, 8).is_none() {
                return Err(format!(
                    "{at:#x}: {:?} through writable memory",
                    i.mnemonic()
                ));
            }
            let mut b = [0u8; 8];
            if !read(slot, &mut b) {
                return Err(format!("{at:#x}: unreadable slot"));
            }
            u64::from_le_bytes(b)
        } else {
            i.near_branch_target()
        };
        if within(&self.ranges.code, target, 1).is_none() {
            return Err(format!(
                "{at:#x}: {:?} out of code that cannot change",
                i.mnemonic()
            ));
        }
        Ok(target)
    }

    /// Queue where `i` may go besides the next instruction; false when it does not fall
    /// through.
    fn follow(
        &mut self,
        i: &Instruction,
        read: &impl Fn(u64, &mut [u8]) -> bool,
    ) -> Result<bool, String> {
        let at = i.ip();
        let through_slot = i.op_count() == 1 && i.op0_kind() == OpKind::Memory;
        match i.flow_control() {
            FlowControl::Next => Ok(true),
            FlowControl::Return => Ok(false),
            // int3 and ud2 trap: the handler does not go on from them.
            FlowControl::Exception => Ok(false),
            FlowControl::Interrupt if i.code() == Code::Int3 => Ok(false),
            FlowControl::ConditionalBranch | FlowControl::UnconditionalBranch
                if i.is_jcc_short_or_near() || i.is_jmp_short_or_near() || is_loop(i) =>
            {
                let target = self.target(i, read)?;
                self.todo.push(target);
                Ok(i.flow_control() == FlowControl::ConditionalBranch)
            }
            FlowControl::Call if i.is_call_near() => {
                let target = self.target(i, read)?;
                self.todo.push(target);
                Ok(true)
            }
            FlowControl::IndirectCall if through_slot && i.is_call_near_indirect() => {
                let target = self.target(i, read)?;
                self.todo.push(target);
                Ok(true)
            }
            FlowControl::IndirectBranch if through_slot && i.is_jmp_near_indirect() => {
                let target = self.target(i, read)?;
                self.todo.push(target);
                Ok(false)
            }
            // The kernel keeps every register but these (and vector state).
            FlowControl::Call if i.mnemonic() == Mnemonic::Syscall => {
                self.gpr(Register::RAX);
                self.gpr(Register::RCX);
                self.gpr(Register::R11);
                Ok(true)
            }
            FlowControl::IndirectCall => Err(format!("{at:#x}: indirect call")),
            FlowControl::IndirectBranch => Err(format!("{at:#x}: indirect jump")),
            other => Err(format!("{at:#x}: {:?} ({other:?})", i.mnemonic())),
        }
    }

    fn gpr(&mut self, r: Register) {
        // rsp is the stack discipline's (push/pop/call/ret), balanced by the ABI.
        if r.full_register() != Register::RSP {
            self.c.gprs |= 1 << r.full_register().number();
        }
    }

    /// Record what `i` writes; an error for state not tracked.
    fn writes(&mut self, i: &Instruction) -> Result<(), String> {
        let at = i.ip();
        if self.whole_state(i)? {
            return Ok(());
        }
        let vex = matches!(
            i.encoding(),
            EncodingKind::VEX | EncodingKind::EVEX | EncodingKind::XOP
        );
        let written: Vec<Register> = self
            .info
            .info(i)
            .used_registers()
            .iter()
            .filter(|u| {
                matches!(
                    u.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|u| u.register())
            .collect();
        for r in written {
            self.register_written(r, vex, at)?;
        }
        Ok(())
    }

    /// Instructions that write vector state as a whole: recorded (`Ok(true)`), or an
    /// error for those that load saved state; `Ok(false)` for any other.
    fn whole_state(&mut self, i: &Instruction) -> Result<bool, String> {
        match i.mnemonic() {
            Mnemonic::Vzeroupper => {
                self.c.ymm_upper = 0xffff;
                Ok(true)
            }
            Mnemonic::Vzeroall => {
                self.c.xmm = 0xffff;
                self.c.ymm_upper = 0xffff;
                Ok(true)
            }
            Mnemonic::Xrstor
            | Mnemonic::Xrstor64
            | Mnemonic::Xrstors
            | Mnemonic::Xrstors64
            | Mnemonic::Fxrstor
            | Mnemonic::Fxrstor64
            | Mnemonic::Emms
            | Mnemonic::Femms => Err(format!(
                "{:#x}: {:?} changes saved state",
                i.ip(),
                i.mnemonic()
            )),
            _ => Ok(false),
        }
    }

    /// Record that register `r` is written by the instruction at `at` (`vex`: a VEX,
    /// EVEX or XOP encoding, which zeroes the upper part of a vector register it writes).
    fn register_written(&mut self, r: Register, vex: bool, at: u64) -> Result<(), String> {
        let vector = r.is_xmm() || r.is_ymm() || r.is_zmm();
        if r.is_gpr() {
            self.gpr(r);
        } else if vector && r.number() >= 16 {
            // Only EVEX code reaches these; any write may change all 512 bits.
            self.c.zmm16 |= 1 << (r.number() - 16);
        } else if r.is_xmm() {
            self.c.xmm |= 1 << r.number();
            if vex {
                self.c.ymm_upper |= 1 << r.number();
            }
        } else if vector {
            // iced reports a VEX or EVEX write of xmmN as one of zmmN: it zeroes the rest.
            self.c.xmm |= 1 << r.number();
            self.c.ymm_upper |= 1 << r.number();
        } else if r.is_k() {
            self.c.masks |= 1 << r.number();
        } else if r.is_segment_register() && matches!(r, Register::FS | Register::GS) {
            return Err(format!("{at:#x}: writes {r:?}"));
        } else if r.is_segment_register() || r == Register::None {
            // ds/es/ss reads listed as writes never happen in 64-bit user code.
        } else {
            return Err(format!("{at:#x}: writes {r:?}, not tracked"));
        }
        Ok(())
    }
}

fn is_loop(i: &Instruction) -> bool {
    matches!(
        i.mnemonic(),
        Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jrcxz | Mnemonic::Jecxz
    )
}

/// What of this process cannot change: code mapped from files and not writable, and
/// read-only file-backed data (a GOT the loader made read-only after relocating it).
pub fn ranges_here() -> Ranges {
    let mut r = Ranges::default();
    for m in crate::maps::read_self().unwrap_or_default() {
        if !m.perms.read || m.perms.write || m.perms.shared || m.inode == 0 {
            continue;
        }
        if m.perms.exec {
            r.code.push(m.start..m.end);
        }
        r.constants.push(m.start..m.end);
    }
    r
}

/// Analyse code of this process (in-process: a pack loaded next to the agent).
pub fn analyse_here(entry: u64) -> Analysis {
    let ranges = ranges_here();
    let readable = ranges.clone();
    analyse(entry, ranges, |addr, buf| {
        if within(&readable.constants, addr, buf.len() as u64).is_none() {
            return false;
        }
        // SAFETY: inside a readable mapping of this process (just listed), which stays
        // mapped: file-backed code and data of loaded objects are not unmapped while a
        // pack's handlers are set up.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        true
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyse_bytes(code: &[u8]) -> Analysis {
        let base = 0x1000u64;
        let r = base..base + code.len() as u64;
        let ranges = Ranges {
            code: vec![r.clone()],
            constants: vec![r],
        };
        analyse(base, ranges, |a, buf| {
            let off = (a - base) as usize;
            buf.copy_from_slice(&code[off..off + buf.len()]);
            true
        })
    }

    #[test]
    fn legacy_sse_keeps_upper_halves_vex_does_not() {
        // pxor xmm9, xmm9 ; ret
        let a = analyse_bytes(&[0x66, 0x45, 0x0f, 0xef, 0xc9, 0xc3]);
        assert_eq!(a.clobbers.xmm, 1 << 9);
        assert_eq!(a.clobbers.ymm_upper, 0);
        // vpxor xmm3, xmm3, xmm3 ; ret
        let a = analyse_bytes(&[0xc5, 0xe1, 0xef, 0xdb, 0xc3]);
        assert!(!a.clobbers.full, "{:?}", a.reason);
        assert_eq!(a.clobbers.xmm, 1 << 3);
        assert_eq!(a.clobbers.ymm_upper, 1 << 3);
        // vzeroupper ; ret
        let a = analyse_bytes(&[0xc5, 0xf8, 0x77, 0xc3]);
        assert_eq!(a.clobbers.ymm_upper, 0xffff);
        assert_eq!(a.clobbers.xmm, 0);
    }

    /// glibc's EVEX string functions (picked on CPUs with AVX-512) write zmm16-31 and
    /// mask registers: each is tracked, and an EVEX write of a register below 16 changes
    /// its upper bits as a VEX one does.
    #[test]
    fn evex_writes_to_zmm16_31_and_masks_are_tracked() {
        let a = analyse_bytes(&[
            0x62, 0xf1, 0x65, 0x08, 0xef, 0xdb, // vpxord xmm3, xmm3, xmm3
            0x62, 0xa3, 0x5d, 0x20, 0x25, 0xe4, 0xff, // vpternlogd ymm20, ymm20, ymm20, 0xff
            0x62, 0xe1, 0xfe, 0x48, 0x6f, 0x0f, // vmovdqu64 zmm17, [rdi]
            0xc4, 0xe1, 0xec, 0x46, 0xd2, // kxnorq k2, k2, k2
            0x62, 0xf1, 0x7d, 0x20, 0x74, 0x07, // vpcmpeqb k0, ymm16, [rdi]
            0x62, 0xe1, 0x7f, 0x2a, 0x6f, 0x16, // vmovdqu8 ymm18{k2}, [rsi]
            0xc3,
        ]);
        assert!(!a.clobbers.full, "{:?}", a.reason);
        assert_eq!(a.clobbers.xmm, 1 << 3);
        assert_eq!(a.clobbers.ymm_upper, 1 << 3);
        assert_eq!(
            a.clobbers.zmm16,
            1 << 1 | 1 << 2 | 1 << 4,
            "zmm17 zmm18 zmm20"
        );
        assert_eq!(a.clobbers.masks, 1 | 1 << 2, "k0 k2");
        assert_eq!(a.clobbers.to_string(), "xmm3 ymm3h zmm17-18 zmm20 k0 k2");
        let v = crate::trampoline::Vectors::Avx512 { bw: true };
        let want = Saves {
            low: 1 << 3,
            zmm16: 0b10110,
            masks: 0b101,
        };
        assert_eq!(vectors_to_save(&a.clobbers, 0, v), want);
        // Without AVX-512 enabled that code cannot run: nothing of it to save.
        let avx = crate::trampoline::Vectors::Avx;
        assert_eq!(vectors_to_save(&a.clobbers, 0, avx).zmm16, 0);
        assert_eq!(vectors_to_save(&Clobbers::FULL, 0xff, v), Saves::ALL);
        // Gathers and scatters clear their mask as they go.
        let a = analyse_bytes(&[
            0x62, 0xf2, 0x7d, 0x49, 0x90, 0x04, 0x88, // vpgatherdd zmm0{k1}, [rax+zmm1*4]
            0x62, 0xf2, 0x7d, 0x4b, 0xa0, 0x14, 0x88, // vpscatterdd [rax+zmm1*4]{k3}, zmm2
            0xc3,
        ]);
        assert!(!a.clobbers.full, "{:?}", a.reason);
        assert_eq!(a.clobbers.masks, 1 << 1 | 1 << 3, "k1 k3");
        assert_eq!(a.clobbers.xmm, 1, "zmm0");
        // vp2intersectd writes a pair of masks: k2 and k3.
        let a = analyse_bytes(&[0x62, 0xf2, 0x77, 0x48, 0x68, 0xd2, 0xc3]);
        assert_eq!(a.clobbers.masks, 1 << 2 | 1 << 3, "{}", a.clobbers);
    }

    #[test]
    fn follows_branches_and_stops_at_indirect_calls() {
        // test edi, edi ; je +3 ; xor eax, eax ; ret ; mov ecx, 1 ; ret
        let a = analyse_bytes(&[
            0x85, 0xff, 0x74, 0x03, 0x31, 0xc0, 0xc3, 0xb9, 0x01, 0, 0, 0, 0xc3,
        ]);
        assert!(!a.clobbers.full, "{:?}", a.reason);
        assert_eq!(a.clobbers.gprs, 0b11, "rax and rcx");
        // call rax ; ret
        let a = analyse_bytes(&[0xff, 0xd0, 0xc3]);
        assert!(a.clobbers.full);
        assert!(a.reason.unwrap().contains("indirect call"));
        // call +0x100 (outside) ; ret
        let a = analyse_bytes(&[0xe8, 0, 1, 0, 0, 0xc3]);
        assert!(a.clobbers.full);
    }

    #[test]
    fn display_names_registers() {
        let c = Clobbers {
            gprs: 0b111,
            xmm: 0b1111 | 1 << 8,
            ymm_upper: 1,
            ..Clobbers::default()
        };
        assert_eq!(c.to_string(), "rax rcx rdx xmm0-3 xmm8 ymm0h");
        assert_eq!(Clobbers::default().to_string(), "none");
        assert_eq!(Clobbers::FULL.to_string(), "all");
    }
}
